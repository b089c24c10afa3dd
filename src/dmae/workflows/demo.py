"""``dmae demo``: the end-to-end job on the built-in data (Fashion-MNIST), sized for a laptop CPU.

Start from the DMAE checkpoint shipped inside the package (pretrained at sigma = 0.25 by ``dmae pretrain --config
demo``; ``--from-scratch`` runs that command here instead), write the reconstruction figure, fine-tune its
encoder into a smoothed classifier at sigma = 0.25, certify 200 test images with sequential randomized
smoothing, and print the certified-accuracy report (and write report.html). Re-running the demo in the same
folder resumes (or reuses) its runs instead of starting over; a stage stopped by SIGINT / SIGTERM stops the demo
(:class:`StageInterrupted`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmae import config as C
from dmae.checkpoint import read_provenance
from dmae.errors import InputError, MissingFileError, StageInterrupted
from dmae.training.engine import TrainResult

# the certification slice: every 50th test image (200 images), sequential CERTIFY at the standard radii with at
# most n_max = 1,000 estimation samples per image (radius ceiling 0.61 at sigma 0.25; docs/sequential.md). The
# demo measures certified accuracy on labelled test images, so the candidate is each image's label: the same
# certified accuracy as selecting a class with n0 samples, without the selection samples or the samples spent
# pursuing a misclassified image's class (382 samples per image against 434; benchmarks/RESULTS.md)
DEMO_CERTIFY = {
    "n0": 100,
    "n": 1000,
    "alpha": 0.001,
    "skip": 50,
    "batch": 1000,
    "sequential": "targets",
    "candidate": "label",
}


@dataclass
class DemoConfig(C.Options):
    """Every option of ``dmae demo``."""

    output_dir: str = C.option("dmae-demo", "where the demo writes its runs and figures")
    from_scratch: bool = C.option(
        False,
        "pretrain the encoder here with the shipped checkpoint's command instead of "
        "loading the shipped checkpoint (about 25 min on one thread)",
    )
    epochs: int | None = C.option(None, "pretraining epochs with --from-scratch (default: the demo preset's)", low=1)
    device: str = C.option("auto", "auto, cpu, cuda")
    progress: bool = C.option(True, "show progress bars")

    def check_combination(self) -> None:
        super().check_combination()
        if self.epochs is not None and not self.from_scratch:
            raise InputError(
                f"--epochs {self.epochs} sets the pretraining of --from-scratch; the shipped checkpoint "
                "is already pretrained (add --from-scratch to pretrain here)"
            )


# the checkpoint shipped in the package: a run folder of `dmae pretrain --config demo` (config.yaml, log.jsonl,
# model_config.json, model.safetensors) and PROVENANCE.json (command, seed, threads, CPU time, sha256 of the weights)
SHIPPED_DIR = Path(__file__).parents[1] / "pretrained" / "fmnist_demo"
SHIPPED_FILES = ("config.yaml", "log.jsonl", "model_config.json", "model.safetensors", "PROVENANCE.json")


def shipped_provenance() -> dict[str, Any]:
    """How the shipped demo checkpoint was made (its ``PROVENANCE.json``).

    Raises:
        FileNotFoundError: the installed package lacks the file (reinstall dmae).
    """
    return json.loads((SHIPPED_DIR / "PROVENANCE.json").read_text())


def preset_differences(values: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{option: (value in values, value of the pretrain/demo preset)}`` for every option where a run's resolved
    config ``values`` differs from ``dmae pretrain --config demo`` (where it ran and how it showed progress aside);
    empty when the run is the shipped command's."""
    from dmae.training.pretrain import PretrainConfig

    preset = C.to_dict(C.build_config(PretrainConfig, C.load_values(C.preset_path("pretrain", "demo"), PretrainConfig)))
    return {
        k: (values.get(k), v)
        for k, v in preset.items()
        if k not in ("output_dir", "progress", "device") and values.get(k) != v
    }


def install_shipped_pretraining(run: Path) -> dict[str, Any]:
    """Copy the shipped checkpoint's run folder into ``run`` (once) and return the provenance of what ``run`` holds.

    The weights are checked against the sha256 recorded when they were made before they are copied, so a damaged
    install (or a Git LFS pointer in place of the file) is an error rather than a silently bad demo. The copy is
    made in a private temporary folder and renamed into place, so ``run`` is whole or absent.

    Raises:
        FileNotFoundError: a shipped file is missing from the installed package.
        ValueError: the shipped weights' sha256 differs from the recorded one, or ``run`` holds anything that is
            not a copy of a shipped checkpoint (e.g. a run of ``--from-scratch``: the two are never mixed).
    """
    from dmae.models.external import file_sha256

    copied = read_provenance(run)
    if copied is not None:
        return copied  # the copy this folder was made with
    if run.exists() and (found := sorted(p.name for p in run.iterdir())):
        raise InputError(
            f"{run} holds {', '.join(found[:5])}{' ...' if len(found) > 5 else ''} and no copy of the "
            "shipped checkpoint (a pretraining run made here with dmae demo --from-scratch?); run the "
            "demo with --from-scratch again to continue it, or give another --output-dir for the "
            "shipped checkpoint"
        )
    for name in SHIPPED_FILES:
        if not (SHIPPED_DIR / name).is_file():
            raise MissingFileError(f"the shipped checkpoint file {SHIPPED_DIR / name} is missing; reinstall dmae")
    prov = shipped_provenance()
    digest = file_sha256(SHIPPED_DIR / "model.safetensors")
    if digest != prov["sha256"]:
        raise InputError(
            f"the shipped weights {SHIPPED_DIR / 'model.safetensors'} have sha256 {digest}, not the "
            f"recorded {prov['sha256']}; reinstall dmae"
        )
    run.parent.mkdir(parents=True, exist_ok=True)
    for stale in run.parent.glob(run.name + ".tmp*"):  # left by a copy that was killed (SIGKILL) part way
        if _is_stale_copy(stale, run.name):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = run.parent / f"{run.name}.tmp{os.getpid()}"  # mkdir keeps the user's umask (mkdtemp would make it 0700)
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own earlier attempt
    tmp.mkdir()
    try:
        for name in SHIPPED_FILES:
            shutil.copyfile(SHIPPED_DIR / name, tmp / name)
        if run.exists():
            run.rmdir()  # empty (checked above)
        tmp.replace(run)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return prov


def _is_stale_copy(folder: Path, name: str) -> bool:
    """Whether ``folder`` is ``NAME.tmp<pid>`` of a copy whose process is gone, holding only shipped files: a
    folder the user made (``NAME.tmp_backup``) or a copy still running is never removed."""
    pid = folder.name[len(name) + 4 :]
    if not folder.is_dir() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        return False
    except ProcessLookupError:
        pass
    except PermissionError:  # exists, another user's
        return False
    return {p.name for p in folder.iterdir()} <= set(SHIPPED_FILES)


def _evals(log: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()] if log.is_file() else []
    return [r for r in rows if r.get("type") == "eval"]


def _require_finished(result: TrainResult, stage: str) -> None:
    if not result.finished:
        raise StageInterrupted(
            f"{stage} stopped at step {result.step}/{result.total_steps} (checkpoint saved in "
            f"{result.output_dir}); run the same `dmae demo` command again to resume"
        )


def _stage_config(cls: type, command: str, preset: str, run: Path, given: dict[str, Any]) -> Any:
    """A stage's config: the shipped preset, the demo's settings, resuming when the run folder holds a run."""
    values = C.load_values(C.preset_path(command, preset), cls)
    return C.build_config(cls, values, {"output_dir": str(run), "resume": (run / "checkpoint.pt").exists(), **given})


def run_demo(
    out: Path,
    epochs: int | None = None,
    device: str = "auto",
    progress: bool = True,
    from_scratch: bool = False,
    overrides: dict | None = None,
    finetune_overrides: dict | None = None,
    certify_overrides: dict | None = None,
) -> dict[str, float]:
    """Run the demo into ``out``; returns its headline numbers.

    Without ``from_scratch`` the shipped checkpoint is the pretrained encoder; with it, ``dmae pretrain --config
    demo`` runs here (``epochs`` / ``overrides`` replace its options). ``finetune_overrides`` /
    ``certify_overrides`` replace options of the fine-tuning / certification settings (tests use them to shrink
    the run).

    Raises:
        StageInterrupted: a training stage was stopped by a signal; re-running resumes it.
        ValueError: ``out`` holds a pretraining run of the other kind (shipped vs from scratch), the shipped
            weights fail their sha256 check, or ``epochs`` / ``overrides`` are given without ``from_scratch``.
        FileNotFoundError: a shipped checkpoint file is missing from the installed package.
    """
    from dmae.reporting.visualize import visualize_checkpoint

    t0 = time.perf_counter()
    common = {"device": device, "progress": progress}
    if not from_scratch and (epochs is not None or overrides):
        raise InputError(
            f"epochs / pretraining overrides ({epochs}, {overrides}) apply to from_scratch=True only; "
            "the shipped checkpoint is already pretrained"
        )
    cfg = _pretrain_stage(out, common, epochs, overrides) if from_scratch else _shipped_stage(out)
    fig = visualize_checkpoint(cfg.output_dir, out=str(out / "reconstructions.png"), num=8, seed=1)
    print(f"[dmae demo] 2/4 wrote the reconstruction figure {fig}", flush=True)
    ft_cfg, ft = _finetune_stage(out, cfg, common, finetune_overrides)
    cert = _certify(out, ft_cfg, common, certify_overrides)
    numbers = _print_summary(out, cfg, ft_cfg, cert)
    from dmae.reporting.html_report import write_html_report

    page = write_html_report(out / "report.html", [], [out], "dmae demo")
    print(f"[dmae demo] done in {(time.perf_counter() - t0) / 60:.1f} min; outputs in {out}; report: {page}")
    return {**numbers, "finetune_steps": ft.step}


def _pretrain_stage(out: Path, common: dict[str, Any], epochs: int | None, overrides: dict | None) -> Any:
    """Stage 1 from scratch: ``dmae pretrain --config demo`` into ``out/pretrain``; its config.

    Raises:
        ValueError: ``out/pretrain`` holds the shipped checkpoint.
        StageInterrupted: the pretraining was stopped by a signal.
    """
    from dmae.training.pretrain import PretrainConfig, pretrain

    if read_provenance(out / "pretrain") is not None:
        raise InputError(
            f"{out / 'pretrain'} holds the shipped checkpoint; give another --output-dir to pretrain from scratch"
        )
    cfg = _stage_config(
        PretrainConfig,
        "pretrain",
        "demo",
        out / "pretrain",
        {**common, **({"epochs": epochs} if epochs is not None else {}), **(overrides or {})},
    )
    print(
        f"[dmae demo] 1/4 pretraining a DMAE ({cfg.model}) on Fashion-MNIST at sigma={cfg.sigma}, "
        f"{cfg.epochs} epoch(s) -> {cfg.output_dir}",
        flush=True,
    )
    _require_finished(pretrain(cfg), "pretraining")
    return cfg


def _shipped_stage(out: Path) -> Any:
    """Stage 1 without pretraining: the shipped checkpoint installed as ``out/pretrain``; its config.

    Raises:
        ValueError: ``out/pretrain`` holds a run pretrained from scratch, or the weights fail their sha256 check.
        FileNotFoundError: a shipped checkpoint file is missing from the installed package.
    """
    from dmae.training.pretrain import PretrainConfig

    prov = install_shipped_pretraining(out / "pretrain")
    cfg = C.build_config(
        PretrainConfig,
        C.load_values(out / "pretrain" / "config.yaml", PretrainConfig),
        {"output_dir": str(out / "pretrain")},
    )
    print(
        f"[dmae demo] 1/4 the shipped DMAE ({cfg.model}), pretrained on Fashion-MNIST at sigma={cfg.sigma} for "
        f"{cfg.epochs} epochs ({prov['cpu_minutes']:.0f} CPU-minutes: `{prov['command']}`) -> "
        f"{cfg.output_dir}; `dmae demo --from-scratch` pretrains it here",
        flush=True,
    )
    return cfg


def _finetune_stage(
    out: Path, cfg: Any, common: dict[str, Any], finetune_overrides: dict | None
) -> tuple[Any, TrainResult]:
    """Stage 3: fine-tune the encoder of the pretraining run ``cfg`` into ``out/finetune``; its config and result.

    Raises:
        StageInterrupted: the fine-tuning was stopped by a signal.
    """
    from dmae.training.finetune import FinetuneConfig, finetune

    ft_cfg = _stage_config(
        FinetuneConfig,
        "finetune",
        "demo",
        out / "finetune",
        {"init": str(Path(cfg.output_dir) / "model.safetensors"), **common, **(finetune_overrides or {})},
    )
    print(
        f"[dmae demo] 3/4 fine-tuning the encoder with consistency regularization at sigma={ft_cfg.sigma} -> "
        f"{ft_cfg.output_dir}",
        flush=True,
    )
    ft = finetune(ft_cfg)
    _require_finished(ft, "fine-tuning")
    return ft_cfg, ft


def _certify(out: Path, ft_cfg: Any, common: dict[str, Any], certify_overrides: dict | None) -> Any:
    from dmae.certification.runner import CertifyConfig, run_certification

    cert_cfg = CertifyConfig(
        checkpoint=ft_cfg.output_dir,
        data="fashion-mnist",
        sigma=(ft_cfg.sigma,),
        output_dir=str(out / "certify"),
        **common,
        **{**DEMO_CERTIFY, **(certify_overrides or {})},
    )
    what = "sequential CERTIFY" if cert_cfg.sequential else "CERTIFY"
    whose = " of each image's label" if cert_cfg.candidate == "label" else f", n0={cert_cfg.n0}"  # n0 unused then
    budget = f"n_max={cert_cfg.n_max or cert_cfg.n}" if cert_cfg.sequential else f"n={cert_cfg.n}"
    how = f"{what}{whose}, {budget}"
    print(
        f"[dmae demo] 4/4 certifying every {cert_cfg.skip}th test image with randomized smoothing "
        f"({how}, alpha={cert_cfg.alpha}) -> {cert_cfg.output_dir}",
        flush=True,
    )
    return run_certification(cert_cfg)[0]


def _print_summary(out: Path, cfg: Any, ft_cfg: Any, cert: Any) -> dict[str, float]:
    """Print the demo's headline numbers (reconstruction, base classifier, certified accuracy) and return them."""
    from dmae.checkpoint import load_classifier
    from dmae.data import build_dataset, build_transform, dataset_info, dataset_size
    from dmae.reporting.report import fixed_n_passes, forward_passes, plot_curves, read_log, summarize
    from dmae.training.finetune import noisy_accuracy

    evals = _evals(Path(cfg.output_dir) / "log.jsonl")
    first, last = evals[0], evals[-1]
    print(
        f"\n[dmae demo] reconstruction of {cfg.eval_images} held-out test images (noise sigma={cfg.sigma}, "
        f"{int(cfg.mask_ratio * 100)}% of patches masked):"
    )
    print(
        f"  pixel MSE to the clean image: {first['mse']:.4f} before pretraining -> {last['mse']:.4f} after "
        f"(the noisy input itself: {last['noisy_mse']:.4f})"
    )
    print(f"  training objective:           {first['loss']:.4f} -> {last['loss']:.4f}")
    test = build_dataset(
        "fashion-mnist", "test", ft_cfg.data_root, build_transform(dataset_info("fashion-mnist"), False, 28)
    )
    model, _ = load_classifier(ft_cfg.output_dir, 10)
    acc_noisy = noisy_accuracy(model, test, ft_cfg.sigma, seed=0, limit=ft_cfg.eval_images, precision="fp32")
    acc_clean = noisy_accuracy(model, test, 0.0, seed=0, limit=ft_cfg.eval_images, precision="fp32")
    n = dataset_size(test) if ft_cfg.eval_images is None else min(ft_cfg.eval_images, dataset_size(test))
    print(f"[dmae demo] base classifier (selected on held-out training images) on {n} test images:")
    print(f"  accuracy under noise sigma={ft_cfg.sigma}: {100 * acc_noisy:.2f}%   clean: {100 * acc_clean:.2f}%")
    log = read_log(cert.path)
    print(f"[dmae demo] certified accuracy of the smoothed classifier on {len(log)} test images ({cert.path}):")
    print(summarize([log]).text())
    meta = json.loads(cert.path.with_suffix(".json").read_text())
    budget = f"n={meta['n']}" if meta.get("n") else f"n_max={meta['n_max']}"
    if log.n_samples is not None:
        spent, fixed = forward_passes(log, cert.path), fixed_n_passes(log, cert.path)
        assert spent is not None and fixed is not None  # a sequential log, with its JSON
        print(
            f"[dmae demo] noise samples (forward passes): {spent:,} in all, {spent / len(log):,.0f} per image; "
            f"fixed-n CERTIFY at n={meta['n_max']:,} would have drawn {fixed:,} ({fixed / spent:.1f}x more)"
        )
    plot = plot_curves([log], out / "certified_accuracy.png", f"Fashion-MNIST, sigma={ft_cfg.sigma}, {budget}")
    print(f"[dmae demo] wrote {plot}")
    return {
        "mse_before": first["mse"],
        "mse_after": last["mse"],
        "noisy_mse": last["noisy_mse"],
        "noisy_acc": acc_noisy,
        "clean_acc": acc_clean,
        "certified_acc_0": log.certified_accuracy(0.0),
        "certified_acc_0.25": log.certified_accuracy(0.25),
        "certified_acc_0.5": log.certified_accuracy(0.5),
        "acr": log.acr,
        "certified_images": len(log),
        "samples": None if log.n_samples is None else forward_passes(log, cert.path),
    }
