"""The ``dmae`` command: parses options into typed configs and hands them to the modules that do the work."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import dmae
from dmae import config as C


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _resolve(command: str, cls: type, ns: argparse.Namespace) -> Any:
    """Defaults <- --config preset <- (with --resume) the run's saved config <- flags given."""
    given = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "func")}
    preset: dict[str, Any] = {}
    if ns.config:
        preset.update(C.load_values(C.preset_path(command, ns.config), cls))
    if given.get("resume"):
        out = Path(given.get("output_dir", preset.get("output_dir", cls.output_dir)))
        saved = out / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: no run in {out} (missing {saved})")
        # a stop point belongs to the invocation that set it, not to the run
        preset.update({k: v for k, v in C.load_values(saved, cls).items() if k != "stop_after"})
    return C.build_config(cls, preset, given)


def cmd_pretrain(ns: argparse.Namespace) -> int:
    from dmae.pretrain import PretrainConfig, pretrain

    result = pretrain(_resolve("pretrain", PretrainConfig, ns))
    return 0 if result.step > 0 or result.finished else 1


def cmd_finetune(ns: argparse.Namespace) -> int:
    from dmae.finetune import FinetuneConfig, LinprobeConfig, finetune

    cls = LinprobeConfig if ns.command == "linprobe" else FinetuneConfig
    finetune(_resolve(ns.command, cls, ns))
    return 0


def cmd_certify(ns: argparse.Namespace) -> int:
    from dmae.certify import CertifyConfig, run_certification
    from dmae.report import report

    runs = run_certification(_resolve(ns.command, CertifyConfig, ns), mode=ns.command)
    if ns.command == "certify" and runs and runs[0].rows_total:
        print()
        report([r.path for r in runs])
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from dmae.report import report

    report(ns.files, tuple(ns.radii) if ns.radii else None, ns.markdown, ns.csv, ns.plot)
    for label, path in (("markdown", ns.markdown), ("csv", ns.csv), ("plot", ns.plot)):
        if path:
            print(f"wrote {label}: {path}")
    return 0


def cmd_visualize(ns: argparse.Namespace) -> int:
    from dmae.visualize import visualize_checkpoint

    path = visualize_checkpoint(ns.checkpoint, out=ns.out, model=ns.model, data=ns.data, data_root=ns.data_root,
                                split=ns.split, num=ns.num, sigma=ns.sigma, mask_ratio=ns.mask_ratio, seed=ns.seed,
                                norm_pix_loss=ns.norm_pix_loss, device=ns.device)
    print(f"wrote {path}")
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from dmae.demo import run_demo

    run_demo(Path(ns.output_dir), epochs=ns.epochs, device=ns.device, progress=ns.progress)
    return 0


def cmd_models(ns: argparse.Namespace) -> int:
    from dmae.models.registry import get_preset, list_models

    print("model presets:")
    for name in list_models():
        p = get_preset(name)
        print(f"  {name:38s} {p.description}")
    for command in ("pretrain", "finetune", "linprobe"):
        print(f"{command} configs (dmae {command} --config NAME):")
        for name in C.list_presets(command):
            print(f"  {name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from dmae.pretrain import PretrainConfig

    parser = argparse.ArgumentParser(prog="dmae", description="Certifiably robust classifiers with Denoising Masked Autoencoders.")
    parser.add_argument("--version", action="version", version=f"dmae {dmae.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="pretrain a DMAE (or MAE: --sigma 0 --loss masked)", formatter_class=_Formatter,
                       description="Pretrain a denoising masked autoencoder. Options come from the defaults, then "
                                   "--config, then (with --resume) the run's saved config, then the flags given.")
    p.add_argument("--config", default=None, help="a shipped preset name (see `dmae models`) or a YAML file")
    C.add_dataclass_arguments(p, PretrainConfig)
    p.set_defaults(func=cmd_pretrain)

    from dmae.finetune import FinetuneConfig, LinprobeConfig

    f = sub.add_parser("finetune", help="fine-tune an encoder into a robust base classifier (CR or RS)", formatter_class=_Formatter,
                       description="Fine-tune a pretrained encoder (or a random one, --model) into the base classifier of a "
                                   "Gaussian-smoothed model: consistency regularization (--method cr) or noisy cross-entropy "
                                   "(--method rs), at one sigma or a per-sample range.")
    f.add_argument("--config", default=None, help="a shipped preset name (see `dmae models`) or a YAML file")
    C.add_dataclass_arguments(f, FinetuneConfig)
    f.set_defaults(func=cmd_finetune)

    lp = sub.add_parser("linprobe", help="linear probe under noise: frozen encoder, BatchNorm + Linear head, LARS",
                        formatter_class=_Formatter)
    lp.add_argument("--config", default=None, help="a shipped preset name (see `dmae models`) or a YAML file")
    C.add_dataclass_arguments(lp, LinprobeConfig)
    lp.set_defaults(func=cmd_finetune)

    from dmae.certify import CertifyConfig

    for command, text in (("certify", "CERTIFY each image: class and certified l2 radius, one TSV row per image"),
                          ("predict", "PREDICT each image: the smoothed class or abstain, one TSV row per image")):
        c = sub.add_parser(command, help=text, formatter_class=_Formatter,
                           description=text + ". Re-running the same command resumes; torchrun shards the images.")
        c.add_argument("--config", default=None, help="a YAML file of options")
        C.add_dataclass_arguments(c, CertifyConfig)
        c.set_defaults(func=cmd_certify)

    r = sub.add_parser("report", help="certified-accuracy tables and curves from certification TSVs", formatter_class=_Formatter)
    r.add_argument("files", nargs="+", help="TSVs with columns idx label predict radius correct time (one per sigma)")
    r.add_argument("--radii", type=float, nargs="+", default=None,
                   help="radii of the table (default: the data set's: ImageNet 0-3, CIFAR-10 / Fashion-MNIST 0-1)")
    r.add_argument("--markdown", default=None, help="also write the table as Markdown here")
    r.add_argument("--csv", default=None, help="also write the table as CSV here")
    r.add_argument("--plot", default=None, help="write certified accuracy vs radius as a PNG here")
    r.set_defaults(func=cmd_report)

    v = sub.add_parser("visualize", help="write the original | noisy | masked | reconstruction figure", formatter_class=_Formatter)
    v.add_argument("--checkpoint", required=True, help="a run folder, checkpoint.pt, model.safetensors or official .pth")
    v.add_argument("--out", default=None, help="PNG to write (default: reconstructions.png beside the checkpoint)")
    v.add_argument("--model", default=None, help="model preset, for official checkpoints whose shapes match several")
    v.add_argument("--data", default=None, help="data set (default: the run's, else fashion-mnist)")
    v.add_argument("--data-root", default=None, help="data set directory")
    v.add_argument("--split", default=None, help="split to draw images from (default: the evaluation split)")
    v.add_argument("--num", type=int, default=8, help="number of images (rows)")
    v.add_argument("--sigma", type=float, default=None, help="noise level (default: the run's, else 0.25)")
    v.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed")
    v.add_argument("--seed", type=int, default=0, help="seed of the noise and mask")
    v.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="whether the model predicts per-patch normalized pixels (default: the run's, else true)")
    v.add_argument("--device", default="auto", help="auto, cpu, cuda")
    v.set_defaults(func=cmd_visualize)

    d = sub.add_parser("demo", help="the end-to-end demo on Fashion-MNIST (CPU, a few minutes)", formatter_class=_Formatter)
    d.add_argument("--output-dir", default="dmae-demo", help="where the demo writes its runs and figures")
    d.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: the demo preset's)")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda")
    d.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("models", help="list model presets and shipped configs")
    m.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from dmae.checkpoint import CheckpointError
    from dmae.data import DataError

    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError, DataError, FloatingPointError) as e:
        # (ReportError is a ValueError)
        print(f"dmae {ns.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
