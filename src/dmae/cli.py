"""The ``dmae`` command: parses options into typed configs and hands them to the modules that do the work."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dmae
from dmae import config as C
from dmae.errors import MissingFileError

EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows an option's default, except a None (nothing to show)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _resolve(command: str, cls: type[C.Options], ns: argparse.Namespace) -> Any:
    """Defaults <- --config preset <- (with --resume) the run's saved config <- flags given."""
    given = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "func")}
    preset: dict[str, Any] = {}
    if getattr(ns, "config", None):
        preset.update(C.load_values(C.preset_path(command, ns.config), cls))
    if given.get("resume"):
        default_dir = cls.__dataclass_fields__["output_dir"].default  # every config that resumes has one
        out = Path(given.get("output_dir", preset.get("output_dir", default_dir)))
        saved = out / "config.yaml"
        if not saved.is_file():
            raise MissingFileError(f"--resume: no run in {out} (missing {saved})")
        # a stop point belongs to the invocation that set it, not to the run
        preset.update({k: v for k, v in C.load_values(saved, cls).items() if k != "stop_after"})
    return C.build_config(cls, preset, given)


def _train_exit(result: Any) -> int:
    return EXIT_INTERRUPTED if result.interrupted else 0


def cmd_pretrain(ns: argparse.Namespace) -> int:
    """`dmae pretrain`: 0 when done or stopped by --stop-after, 130 when interrupted."""
    from dmae.training.pretrain import PretrainConfig, pretrain

    return _train_exit(pretrain(_resolve("pretrain", PretrainConfig, ns)))


def cmd_finetune(ns: argparse.Namespace) -> int:
    """`dmae finetune` / `dmae linprobe`: exit status as for pretraining."""
    from dmae.training.finetune import FinetuneConfig, LinprobeConfig, finetune

    return _train_exit(
        finetune(_resolve(ns.command, LinprobeConfig if ns.command == "linprobe" else FinetuneConfig, ns))
    )


def cmd_certify(ns: argparse.Namespace) -> int:
    """`dmae certify` / `dmae predict` (or `--merge` of their shards), then (certify) the report of the logs written;
    a shard's log holds a share of the images, so a `--shard` run prints no table."""
    from dmae.certification.runner import CertifyConfig, estimate_certification, run_certification
    from dmae.reporting.report import report

    cfg = _resolve(ns.command, CertifyConfig, ns)
    if cfg.estimate:
        estimate_certification(cfg, mode=ns.command)
        return 0
    runs = run_certification(cfg, mode=ns.command)
    if ns.command == "certify" and runs and runs[0].rows_total and not cfg.shard:
        print()
        report([r.path for r in runs])
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    """`dmae report`: the table, and the Markdown / CSV / PNG files asked for."""
    from dmae.reporting.html_report import discover, log_groups, write_html_report
    from dmae.reporting.report import ReportConfig, report

    cfg = _resolve("report", ReportConfig, ns)
    cfg.validate()
    if cfg.files:
        report(list(cfg.files), cfg.radii, cfg.markdown, cfg.csv, cfg.plot, cfg.compare)
    found = discover([], list(cfg.run_dir or ())).logs
    for label, members in log_groups(found).items():  # one table per classifier and kind of log
        print(f"\n{label}")
        report([found[i] for i in members], cfg.radii)
    if cfg.html:
        write_html_report(
            cfg.html, list(cfg.files), list(cfg.run_dir or ()), cfg.title, paired=cfg.compare, radii=cfg.radii
        )
    for label, path in (("markdown", cfg.markdown), ("csv", cfg.csv), ("plot", cfg.plot), ("html", cfg.html)):
        if path:
            print(f"wrote {label}: {path}")
    return 0


def cmd_visualize(ns: argparse.Namespace) -> int:
    """`dmae visualize`: the reconstruction figure."""
    from dmae.reporting.visualize import VisualizeConfig, visualize

    print(f"wrote {visualize(_resolve('visualize', VisualizeConfig, ns))}")
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    """`dmae demo`: the end-to-end job."""
    from dmae.workflows.demo import DemoConfig, run_demo

    cfg = _resolve("demo", DemoConfig, ns)
    cfg.validate()
    run_demo(
        Path(cfg.output_dir), epochs=cfg.epochs, device=cfg.device, progress=cfg.progress, from_scratch=cfg.from_scratch
    )
    return 0


def cmd_experiment(ns: argparse.Namespace) -> int:
    """`dmae experiment NAME`: run (or resume) a whole experiment; `--dry-run` describes it."""
    from dmae.workflows.experiments import ExperimentConfig, describe, load_experiment, run_experiment

    cfg = _resolve("experiment", ExperimentConfig, ns)
    cfg.validate()
    exp = load_experiment(cfg.name)
    opts = cfg.options(exp)
    if cfg.dry_run:
        print(describe(exp, opts))
        return 0
    run_experiment(exp, opts)
    return 0


def cmd_experiments(ns: argparse.Namespace) -> int:
    """`dmae experiments`: the shipped experiments with their stages and GPU-hour estimates."""
    from dmae.workflows.experiments import describe, list_experiments, load_experiment

    for name in list_experiments():
        print(describe(load_experiment(name)) + "\n")
    print("run one: dmae experiment NAME [--smoke] [--data-root DIR] [--use STAGE=PATH] [--dry-run]")
    return 0


def cmd_models(ns: argparse.Namespace) -> int:
    """`dmae models`: presets and shipped configs."""
    from dmae.models.registry import get_preset, list_models

    print("model presets:")
    for name in list_models():
        print(f"  {name:38s} {get_preset(name).description}")
    for command in ("pretrain", "finetune", "linprobe"):
        print(f"{command} configs (dmae {command} --config NAME):")
        for name in C.list_presets(command):
            print(f"  {name}")
    return 0


# (name, help, description, config class, handler, takes --config) of a subcommand
Command = tuple[str, str, str, Any, Any, bool]

# how the training jobs resolve their options (said in their --help)
_LAYERS = (
    " Options come from the defaults, then --config, then (with --resume) the run's saved config, then the flags given."
)


def _commands() -> list[Command]:
    """Every subcommand, in the order ``dmae --help`` lists them."""
    return _training_commands() + _certification_commands() + _workflow_commands()


def _training_commands() -> list[Command]:
    """pretrain, finetune, linprobe."""
    from dmae.training.finetune import FinetuneConfig, LinprobeConfig
    from dmae.training.pretrain import PretrainConfig

    return [
        (
            "pretrain",
            "pretrain a DMAE (or MAE: --sigma 0 --loss masked)",
            "Pretrain a denoising masked autoencoder." + _LAYERS,
            PretrainConfig,
            cmd_pretrain,
            True,
        ),
        (
            "finetune",
            "fine-tune an encoder into a robust base classifier (CR or RS)",
            "Fine-tune a pretrained encoder (or a random one, --model) into the base classifier of a Gaussian-smoothed "
            "model: consistency regularization (--method cr) or noisy cross-entropy (--method rs), at one sigma or a "
            "per-sample range." + _LAYERS,
            FinetuneConfig,
            cmd_finetune,
            True,
        ),
        (
            "linprobe",
            "linear probe under noise: frozen encoder, BatchNorm + Linear head, LARS",
            "Linear probing of a frozen encoder under noise (the paper's Table 4 recipe)." + _LAYERS,
            LinprobeConfig,
            cmd_finetune,
            True,
        ),
    ]


def _certification_commands() -> list[Command]:
    """certify, predict, report, visualize."""
    from dmae.certification.runner import CertifyConfig
    from dmae.reporting.report import ReportConfig
    from dmae.reporting.visualize import VisualizeConfig

    cert = "CERTIFY each image: class and certified l2 radius, one TSV row per image"
    pred = "PREDICT each image: the smoothed class or abstain, one TSV row per image"
    resumes = ". Re-running the same command resumes; torchrun or --shard K/N jobs shard the images (docs/cluster.md)."
    return [
        ("certify", cert, cert + resumes, CertifyConfig, cmd_certify, True),
        ("predict", pred, pred + resumes, CertifyConfig, cmd_certify, True),
        (
            "report",
            "certified-accuracy tables and curves from certification TSVs",
            "Certified accuracy at the standard radii, ACR and abstention per log, plus the best sigma per radius.",
            ReportConfig,
            cmd_report,
            False,
        ),
        (
            "visualize",
            "write the original | noisy | masked | reconstruction figure",
            "The reconstruction figure of a pretrained (or official) DMAE / MAE checkpoint.",
            VisualizeConfig,
            cmd_visualize,
            False,
        ),
    ]


def _workflow_commands() -> list[Command]:
    """experiment, experiments, demo."""
    from dmae.workflows.demo import DemoConfig
    from dmae.workflows.experiments import ExperimentConfig, ExperimentsConfig

    return [
        (
            "experiment",
            "run one of the paper's experiments end to end (pretrain -> fine-tune -> certify -> report)",
            "Run (or resume) a shipped experiment or an experiment YAML: every stage in order, skipping finished ones, "
            "then a report per comparison in OUT/report.md.",
            ExperimentConfig,
            cmd_experiment,
            False,
        ),
        (
            "experiments",
            "list the shipped experiments with their GPU-hour estimates",
            "The paper's experiments as shipped configs: stages, estimates, torchrun commands.",
            ExperimentsConfig,
            cmd_experiments,
            False,
        ),
        (
            "demo",
            "the end-to-end demo on Fashion-MNIST (CPU, a few minutes)",
            "Pretrain, fine-tune, certify and report on Fashion-MNIST; re-running resumes.",
            DemoConfig,
            cmd_demo,
            False,
        ),
    ]


def build_parser() -> argparse.ArgumentParser:
    """The ``dmae`` parser: one subcommand per job, its flags built from the job's typed config."""
    parser = argparse.ArgumentParser(
        prog="dmae", description="Certifiably robust classifiers with Denoising Masked Autoencoders."
    )
    parser.add_argument("--version", action="version", version=f"dmae {dmae.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_, description, cls, func, takes_config in _commands():
        p = sub.add_parser(name, help=help_, description=description, formatter_class=_Formatter)
        if takes_config:
            p.add_argument("--config", default=None, help="a shipped preset name (see `dmae models`) or a YAML file")
        C.add_dataclass_arguments(p, cls)
        p.set_defaults(func=func)
    sub.add_parser("models", help="list model presets and shipped configs").set_defaults(func=cmd_models)
    return parser


def _format_warning(command: str) -> Any:
    """Our own warnings (a mistake caught before it gives a wrong answer) read like the errors, without a
    source line; other libraries' warnings keep Python's format."""
    from dmae.runtime import DmaeWarning

    default = warnings.formatwarning

    def fmt(
        message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
    ) -> str:
        if issubclass(category, DmaeWarning):
            return f"dmae {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    return fmt


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dmae`` command; returns the exit status (2: bad input, 130: interrupted, resumable)."""
    from dmae.certification.log import LogError
    from dmae.checkpoint import CheckpointError
    from dmae.data import DataError
    from dmae.errors import StageInterrupted

    ns = build_parser().parse_args(argv)
    previous_format, warnings.formatwarning = warnings.formatwarning, _format_warning(ns.command)
    main_thread = threading.current_thread() is threading.main_thread()
    # SIGTERM unwinds like Ctrl-C (training loops catch both and checkpoint first), so files are closed
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
    try:
        return ns.func(ns)
    except BrokenPipeError:  # the output went to a reader that stopped (`dmae report ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 0
    except KeyboardInterrupt:
        print(
            f"\ndmae {ns.command}: interrupted; what was done is saved: run the same command again to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        CheckpointError,
        DataError,
        FloatingPointError,
        LogError,
    ) as e:
        print(f"dmae {ns.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StageInterrupted as e:
        print(f"dmae {ns.command}: interrupted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        warnings.formatwarning = previous_format
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
