"""``dmae certify`` / ``dmae predict``: run CERTIFY or PREDICT over a data set, one TSV row per image.

Rows follow the field's common format (see :mod:`dmae.certification.log`). One file per sigma, ``{mode}_sigma{S}.tsv``,
with a ``.json`` beside it holding the settings.

Runs are resumable and shardable without changing a single row: the noise of image ``idx`` depends only on
(seed, idx), every row is flushed as soon as its group of images is done, and re-running the same command
skips the images already in the file (a torn last line is dropped). A file is only continued with the same
settings: everything that changes a row (mode, sigma, n0, n, alpha, seed, skip, split, the SHA-256 of the
weights, the data and its transform) is compared first. Under ``torchrun`` each rank takes every
world-size-th remaining image into its own ``.rank{r}`` file; rank 0 merges them into the main file in
index order at the end (a later single-process run also picks up rank files left by an interrupted one).

The steps: :func:`prepare` (checkpoint, model, data; :func:`module_task` for a model and data set of the
caller's own), :func:`settings` / :func:`claim_log` (what the file is checked against), :func:`run_probe`,
:func:`merge_rank_files`, :func:`certify_images` (the loop); :func:`run_certification` and
:func:`certify_module` (the Python API's path) share :func:`_run_task`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from dmae import checkpoint as ckpt
from dmae.certification.estimate import CostEstimate, estimate_cost, pilot_positions
from dmae.certification.log import CERTIFY_HEADER, PREDICT_HEADER, SEQUENTIAL_HEADER, format_row, read_rows, write_rows
from dmae.certification.preflight import PROBE_IMAGES, Probe, accuracy_probe
from dmae.config import Options, option, to_dict
from dmae.data import DATASET_NAMES, build_dataset, build_transform, dataset_info, fingerprint, num_classes_of
from dmae.distributed import DistInfo, barrier, launch
from dmae.runtime import warn_user
from dmae.smoothing import Smooth, SoundSmooth, check_alpha
from dmae.smoothing.confseq import ALIASES, SEQUENCES
from dmae.smoothing.core import eval_mode
from dmae.smoothing.sequential import (
    DEFAULT_FUTILITY,
    DEFAULT_SCHEDULE,
    SequentialCertifier,
    SequentialSettings,
    sequence_for,
)

SEQUENCE_NAMES = ("default", *SEQUENCES, *ALIASES)

# settings that change the rows; a resumed file must have been written with the same ones
ROW_SETTINGS = (
    "mode",
    "data",
    "split",
    "sigma",
    "n0",
    "n",
    "alpha",
    "seed",
    "skip",
    "weights_sha256",
    "data_fingerprint",
    "sequential",
    "n_max",
    "radii",
    "epsilon",
    "sequence",
    "stop_on_wrong_guess",
    "futility",
    "model",
    "input_layer",
    "sound",
    "candidate",
    "schedule",
)
# what a log written before a setting existed was certified with (by the mode its JSON records): such a log resumes
# under exactly that setting, and is refused under any other
LEGACY_SETTINGS = {
    "candidate": {"certify": "select", "sequential": "select"},
    "schedule": {"sequential": "chunks"},
}


def _check_radii(radii: tuple[float, ...]) -> None:
    for r in radii:
        if not 0 <= r < float("inf"):
            raise ValueError(f"--radii must be finite numbers >= 0, got {r}")


def _check_futility(beta: float) -> None:
    if not 0 <= beta <= 0.5:
        raise ValueError(f"--futility must be in [0, 0.5] (0 turns the rule off), got {beta}")


def _check_sigmas(sigmas: tuple[float, ...]) -> None:
    for s in sigmas:
        if not s > 0:
            raise ValueError(f"sigma must be > 0, got {s}")


@dataclass
class CertifyConfig(Options):
    """Every option of ``dmae certify`` and ``dmae predict``."""

    checkpoint: str | None = option(
        None,
        "a fine-tuning run folder, model_best/model_last.safetensors, or a classifier "
        "checkpoint; with --model, that architecture's weights file",
    )
    model: str | None = option(
        None,
        "certify another classifier: a timm or torchvision architecture "
        "(timm:NAME, torchvision:NAME; a bare NAME is timm) or your own "
        "(module.path:Factory or file.py:Factory, called with whichever of num_classes, "
        "in_chans, img_size it takes) whose weights --checkpoint gives (.safetensors, or a "
        "state dict read with weights_only)",
    )
    input_size: int | None = option(
        None,
        "--model: the side the network takes (default: the data set's); images "
        "are noised at their own size, then resized inside the model",
        low=1,
    )
    input_mean: tuple[float, ...] | None = option(
        None,
        "--model: per-channel mean the network was trained to subtract, [0, 1] pixel units (default: the data set's)",
    )
    input_std: tuple[float, ...] | None = option(None, "--model: per-channel std (default: the data set's)")
    data: str = option("fashion-mnist", "data set", choices=DATASET_NAMES, check=dataset_info)
    data_root: str | None = option(None, "data set directory (default: found automatically)")
    split: str | None = option(None, "split to certify (default: the evaluation split: test or val)")
    sigma: tuple[float, ...] | None = option(
        None, "noise level(s), one output file each (default: the run's training sigma)", check=_check_sigmas
    )
    n0: int = option(
        100,
        "CERTIFY: noise samples that select the class (sequential: the most; unused with --candidate label)",
        low=1,
    )
    # torchrun's parser takes a bare --n / --max for abbreviations of its own options: the aliases pass through
    n: int = option(
        100_000,
        "noise samples that estimate (CERTIFY) or vote (PREDICT); alias --num-samples",
        low=1,
        aliases=("--num-samples",),
    )
    alpha: float = option(0.001, "failure probability", check=check_alpha)
    skip: int = option(1, "certify every skip-th image (ImageNet protocol: 50)", low=1)
    max: int | None = option(
        None, "stop after this many images (after skipping); alias --max-images", low=1, aliases=("--max-images",)
    )
    batch: int = option(1000, "noise samples per forward pass", low=1)
    seed: int = option(0, "seed of all noise; with it every row is reproducible")
    output_dir: str = option("runs/certify", "where the TSV (and JSON) files go")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    precision: Literal["auto", "bf16", "fp32"] = option("auto", "auto: bf16 autocast on GPUs, fp32 on CPUs")
    compile: bool = option(False, "torch.compile the classifier (GPUs; compiles once per batch shape)")
    progress: bool = option(True, "show a progress bar")
    sequential: Literal["targets", "continuous"] | None = option(
        None,
        "sequential CERTIFY (docs/sequential.md): stop sampling an image once every target radius is "
        "certified or refuted (targets), or once its radius is known within --epsilon (continuous)",
    )
    radii: tuple[float, ...] | None = option(
        None, "--sequential targets: the target radii (default: the data set's standard radii)", check=_check_radii
    )
    n_max: int | None = option(None, "--sequential: the most estimation samples per image (default: --n)", low=1)
    epsilon: float | None = option(
        None,
        "--sequential continuous: stop once the radius is known within this (l2, [0, 1] pixel units; default 0.01)",
        low=0,
        low_open=True,
    )
    sequence: str | None = option(
        None,
        "--sequential: the anytime-valid confidence sequence: betting (the default: "
        "fewest samples in docs/sequential.md) or union (Clopper-Pearson per round, "
        "alpha split over the rounds)",
        choices=SEQUENCE_NAMES,
    )
    sound: bool = option(
        False,
        "sound certification in floating point (docs/sound.md): 8-bit images, noise from the "
        "discretized Gaussian on the same grid drawn from random bits, so the classifier sees an exact "
        "function of the integer pixel + noise; images off the 8-bit grid are refused",
    )
    estimate: bool = option(
        False,
        "print the forward passes and the time this run would take (from a short timed "
        "probe of the classifier; sequential: the range and a pilot's expectation), then exit",
    )
    stop_on_wrong_guess: bool = option(
        False,
        "--sequential: skip estimation for images whose n0 guess is not "
        "their label (they abstain; certified accuracy is unchanged, the class and "
        "radius of wrong images are not; recorded in the JSON and the report)",
    )
    futility: float | None = option(
        None,
        "--sequential: beta of the futility rule: refute a target that the last "
        "look would most likely miss even at p_A's (1 - beta) upper bound (a stopping "
        f"rule, never a claim; default {DEFAULT_FUTILITY}, 0 turns it off; "
        "docs/sequential.md)",
        check=_check_futility,
    )

    candidate: Literal["select", "label"] = option(
        "select",
        "certify: the class to certify: select (CERTIFY's n0 samples choose it: the smoothed classifier's "
        "answer) or label (the image's label, fixed before any sample: rows say 'certified correct at this "
        "radius' or -1, for certified accuracy with no selection samples; docs/sequential.md)",
    )
    schedule: Literal["early", "chunks"] | None = option(
        None,
        f"--sequential: when to look: early (looks where a certificate first becomes possible, early "
        f"selection; the default: {DEFAULT_SCHEDULE}) or chunks (rounds of whole chunks of 100, n0 at once: how "
        "logs written before it were certified; resume those with it)",
    )

    def check_combination(self) -> None:
        if not self.checkpoint:
            raise ValueError("--checkpoint is required")
        for name in ("input_size", "input_mean", "input_std"):
            if getattr(self, name) is not None and not self.model:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} is only used with --model")
        only = {
            "radii": "targets",
            "epsilon": "continuous",
            "n_max": None,
            "sequence": None,
            "stop_on_wrong_guess": None,
            "futility": None,
            "schedule": None,
        }
        for name, mode in only.items():  # an option that would do nothing is an error, not a silent default
            if (
                getattr(self, name) is not None
                and getattr(self, name) is not False
                and (self.sequential is None or (mode and self.sequential != mode))
            ):
                need = f"--sequential {mode}" if mode else "--sequential"
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} is only used with {need}")
        if self.stop_on_wrong_guess and self.candidate == "label":
            raise ValueError(
                "--stop-on-wrong-guess skips the estimation of a wrong n0 guess; with --candidate label there is "
                "no guess (the label is certified directly, with no selection samples at all)"
            )


@dataclass
class CertifyRun:
    """The files one sigma produced, and how many rows were added by this call."""

    sigma: float
    path: Path
    rows_added: int
    rows_total: int


@dataclass
class CertifyTask:
    """What every sigma of one run shares: the classifier, the images, and where the logs go."""

    cfg: CertifyConfig
    mode: str
    header: tuple[str, ...]
    checkpoint: Path
    weights_sha256: str
    model: nn.Module
    num_classes: int
    dataset: Any
    split: str
    planned: list[int]
    data_fingerprint: str
    out: Path
    device: torch.device
    dist: DistInfo
    trained_sigma: float | list[float] | None = None  # what the classifier was trained at (a range: [low, high])


def standard_radii(data: str) -> tuple[float, ...]:
    """The radii a data set's papers report (its registry entry); CIFAR-10's for a data set of the user's own."""
    return dataset_info(data if data in DATASET_NAMES else "cifar10").radii


def selected_indices(n_images: int, skip: int, maximum: int | None) -> Iterable[int]:
    """The image indices a run with ``skip`` and ``max`` covers."""
    idx = range(0, n_images, skip)
    return idx if maximum is None else idx[:maximum]


def prepare(
    cfg: CertifyConfig, mode: str, device: torch.device, dist: DistInfo
) -> tuple[CertifyTask, tuple[float, ...]]:
    """Load the classifier and the images to certify; the sigmas (default: the run's training sigma).

    Raises:
        CheckpointError: no such checkpoint, not a trained classifier, non-finite weights, wrong class count.
        ValueError: no sigma given and the run does not tell a single one; a bad ``--model`` name or input layer.
    """
    info = dataset_info(cfg.data)
    split = cfg.split or info.splits[1]
    num_classes = num_classes_of(build_dataset(cfg.data, split, cfg.data_root, None))
    trained: float | list[float] | None = None
    if cfg.model:
        model, path, digest = _external_model(cfg, info, num_classes)
        img_size = model.img_size
    else:
        path = ckpt.resolve_checkpoint(cfg.checkpoint)  # type: ignore[arg-type]
        model, report = ckpt.load_classifier(path, num_classes, pool=None)
        if any(k.startswith("head") for k in report.missing):
            raise ckpt.CheckpointError(f"{path} is not a trained classifier (it has no head); fine-tune it first")
        digest, img_size = ckpt.weights_digest(path), model.config.encoder.img_size
        trained = model.trained_sigma  # recorded by our fine-tuning runs; Smooth warns when certified at another
        trained_on = ckpt.run_config(path).get("data")
        if trained_on and trained_on != cfg.data:  # same class count, other classes: certificates of nothing
            warn_user(f"the classifier was fine-tuned on {trained_on}, and --data is {cfg.data}")
    sigmas = cfg.sigma or ((trained,) if isinstance(trained, float) else None)
    if not sigmas:
        raise ValueError("give --sigma (the checkpoint's run does not say which single sigma it was trained at)")
    model.to(device).eval()
    ds = build_dataset(
        cfg.data, split, cfg.data_root, build_transform(info, False, img_size), channels=model.preprocess.in_chans
    )  # a grey folder for a grey model, colour for colour
    planned = list(selected_indices(len(ds), cfg.skip, cfg.max))  # type: ignore[arg-type]
    mode, header = _mode_header(cfg, mode)
    task = CertifyTask(
        cfg=cfg,
        mode=mode,
        header=header,
        checkpoint=path,
        weights_sha256=digest,
        model=model,
        num_classes=num_classes,
        dataset=ds,
        split=split,
        planned=planned,
        data_fingerprint=fingerprint(ds),
        out=Path(cfg.output_dir),
        device=device,
        dist=dist,
        trained_sigma=trained,
    )
    return task, tuple(float(s) for s in sigmas)


def _mode_header(cfg: CertifyConfig, mode: str) -> tuple[str, tuple[str, ...]]:
    """The log's mode (``certify`` with ``--sequential`` is ``sequential``) and its TSV header."""
    if mode == "certify" and cfg.sequential:
        mode = "sequential"
    return mode, {"certify": CERTIFY_HEADER, "predict": PREDICT_HEADER, "sequential": SEQUENTIAL_HEADER}[mode]


def module_task(
    model: nn.Module,
    dataset: Any,
    cfg: CertifyConfig,
    mode: str,
    device: torch.device,
    dist: DistInfo,
    num_classes: int | None = None,
) -> CertifyTask:
    """The task of a user's own ``model`` (any ``nn.Module`` or function mapping [0, 1] images ``[B, C, H, W]`` to
    logits ``[B, K]``, on ``device``) over any map-style ``dataset`` of ``(image [C, H, W], label)`` pairs: what
    :func:`prepare` builds from a checkpoint and a data-set name, with the weights fingerprinted from the module's
    state dict and the data from the data set (so a log resumes, or refuses, exactly as the CLI's). The model is
    neither moved nor changed.

    Raises:
        ValueError: an empty data set, items that are not (tensor image [C, H, W], label), or fewer than 2 classes.
    """
    if len(dataset) == 0:
        raise ValueError("the data set is empty")
    x, _ = dataset[0]
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise ValueError(
            f"data set items must be (image, label) with image a [C, H, W] tensor of [0, 1] pixels, got "
            f"{type(x).__name__}{' of shape ' + str(tuple(x.shape)) if isinstance(x, torch.Tensor) else ''}"
        )
    k = num_classes if num_classes is not None else _output_classes(model, x, device)
    mode, header = _mode_header(cfg, mode)
    digest = ckpt.state_dict_digest(model.state_dict()) if isinstance(model, nn.Module) else "unknown (a function)"
    return CertifyTask(
        cfg=cfg,
        mode=mode,
        header=header,
        checkpoint=Path(f"<{type(model).__name__}>"),
        weights_sha256=digest,
        model=model,
        num_classes=k,
        dataset=dataset,
        split=cfg.split or "custom",
        planned=list(selected_indices(len(dataset), cfg.skip, cfg.max)),
        data_fingerprint=fingerprint(dataset),
        out=Path(cfg.output_dir),
        device=device,
        dist=dist,
        trained_sigma=getattr(model, "trained_sigma", None),
    )


def _output_classes(model: Any, x: torch.Tensor, device: torch.device) -> int:
    """The class count a model's logits have, from one clean forward pass (in eval mode, modes restored)."""
    with eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext(), torch.no_grad():
        logits = model(x.unsqueeze(0).to(device))
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"the model returned {tuple(logits.shape)} for one image, expected logits [1, K] with K >= 2")
    return int(logits.shape[1])


def certify_module(
    model: nn.Module,
    dataset: Any,
    cfg: CertifyConfig,
    mode: Literal["certify", "predict"] = "certify",
    num_classes: int | None = None,
) -> list[CertifyRun]:
    """:func:`run_certification` for a model and data set of the user's own (see :func:`module_task`): the same
    checks, probe, logs, resumption and torchrun sharding. ``cfg.checkpoint`` only names the model in the JSON;
    ``cfg.data`` names the data set; ``cfg.sigma`` is required; ``cfg.device`` must be the model's device.

    Raises:
        ValueError: a bad option, no sigma, an existing log written with other settings, a bad data set.
    """
    # every option is checked as the CLI's; the data set's name is the caller's own (no registry entry to check)
    _validate(cfg if cfg.data in DATASET_NAMES else dataclasses.replace(cfg, data=DATASET_NAMES[0]), mode)
    if not cfg.sigma:
        raise ValueError("give sigma: a model of your own records no training sigma to default to")

    def job(device: torch.device, dist: DistInfo) -> list[CertifyRun]:
        task = module_task(model, dataset, cfg, mode, device, dist, num_classes)
        return _run_task(task, tuple(float(s) for s in cfg.sigma))  # type: ignore[union-attr]

    return launch(job, cfg.device)


def _run_task(task: CertifyTask, sigmas: tuple[float, ...]) -> list[CertifyRun]:
    """Every sigma of a task, in order; every sigma's log is checked before the first sample is spent."""
    for sigma in sigmas:
        check_settings(log_path(task, sigma), settings(task, sigma))
    task.out.mkdir(parents=True, exist_ok=True)
    return [_run_sigma(task, sigma) for sigma in sigmas]


def _external_model(cfg: CertifyConfig, info: Any, num_classes: int) -> tuple[nn.Module, Path, str]:
    """``--model``: the timm / torchvision network with its input layer, its weights file and that file's SHA-256
    (of the file's bytes, recorded as ``weights_sha256``).

    Raises:
        ValueError: an unknown architecture (close names listed) or a bad ``--input-mean`` / ``--input-std``.
        CheckpointError: a missing, unreadable or unsafe weights file, keys or shapes that do not fit, NaN weights.
    """
    from dmae.models.external import build_external_classifier

    path = Path(cfg.checkpoint)  # type: ignore[arg-type]
    model, digest = build_external_classifier(
        cfg.model,
        path,
        num_classes,  # type: ignore[arg-type]
        img_size=cfg.input_size or info.size or 224,
        in_chans=info.channels,
        mean=cfg.input_mean or info.mean,
        std=cfg.input_std or info.std,
    )
    return model, path, digest


def settings(task: CertifyTask, sigma: float) -> dict[str, Any]:
    """The JSON beside a log: what produced its rows (:data:`ROW_SETTINGS` and context)."""
    cfg = task.cfg
    label = cfg.candidate == "label" and task.mode != "predict"  # no selection step: n0 is not used
    return {
        "mode": task.mode,
        "checkpoint": str(task.checkpoint),
        "weights_sha256": task.weights_sha256,
        "data": cfg.data,
        "split": task.split,
        "data_fingerprint": task.data_fingerprint,
        "sigma": sigma,
        "n0": None if label else cfg.n0,
        "n": cfg.n,
        "alpha": cfg.alpha,
        "seed": cfg.seed,
        "skip": cfg.skip,
        "max": cfg.max,
        "images": len(task.planned),
        "config": to_dict(cfg),
        **_sequential_settings(task, sigma),
        "model": cfg.model,
        "input_layer": _input_layer(task),
        "trained_sigma": task.trained_sigma,
        "sound": True if cfg.sound else None,  # None when off: logs written before --sound existed match
        # what a row means: select: CERTIFY's class; label: whether the label is certified (predict: neither)
        "candidate": None if task.mode == "predict" else cfg.candidate,
    }


def _input_layer(task: CertifyTask) -> str | None:
    """``--model``'s resolved input layer (size, channels, mean, std), which changes every row; None otherwise."""
    return task.model.preprocess.extra_repr() if task.cfg.model else None


def _sequential_settings(task: CertifyTask, sigma: float) -> dict[str, Any]:
    """What changes the rows of a sequential log (None where it changes nothing): n_max replaces n, the
    resolved confidence sequence (its kind, looks and alpha shares), the radii (targets) or epsilon (continuous),
    the label shortcut, the futility beta and the look schedule."""
    if task.mode != "sequential":
        return {
            "sequential": None,
            "n_max": None,
            "radii": None,
            "epsilon": None,
            "sequence": None,
            "stop_on_wrong_guess": None,
            "futility": None,
            "schedule": None,
        }
    s = sequential_settings(task)
    cs = sequence_for(s, sigma)
    return {
        "sequential": s.mode,
        "n": None,
        "n_max": s.n_max,
        "sequence": f"{cs!r} looks={list(cs.looks)}",
        "radii": list(s.radii) if s.mode == "targets" else None,
        "epsilon": s.epsilon if s.mode == "continuous" else None,
        # None when off: logs written before these options match
        "stop_on_wrong_guess": s.stop_on_wrong_guess or None,
        "futility": s.futility,
        "schedule": s.schedule,
    }


def sequential_settings(task: CertifyTask) -> SequentialSettings:
    """``--sequential``'s settings: targets default to the data set's standard radii, n_max to --n."""
    cfg = task.cfg
    radii = tuple(cfg.radii) if cfg.radii else standard_radii(cfg.data)
    return SequentialSettings(
        cfg.n0,
        cfg.n_max or cfg.n,
        cfg.alpha,
        cfg.sequential or "targets",
        radii,
        cfg.epsilon if cfg.epsilon is not None else 0.01,
        cfg.sequence or "default",
        cfg.stop_on_wrong_guess,
        DEFAULT_FUTILITY if cfg.futility is None else (cfg.futility or None),
        cfg.candidate,
        cfg.schedule or DEFAULT_SCHEDULE,
    )


def check_settings(main_file: Path, meta: dict[str, Any]) -> None:
    """Refuse a log whose JSON says it was written with other row settings (:data:`ROW_SETTINGS`); reads only.

    Raises:
        ValueError: naming each setting that differs, with both values.
    """
    meta_file = main_file.with_suffix(".json")
    if meta_file.exists():
        old = json.loads(meta_file.read_text())
        diff = {k: (recorded(old, k), meta[k]) for k in ROW_SETTINGS if recorded(old, k) != meta[k]}
        if diff:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            hint = ""
            if "schedule" in diff:
                hint = (
                    f"; it was certified with the {diff['schedule'][0]} schedule: resume it with --schedule "
                    f"{diff['schedule'][0]} (another schedule looks at other sample counts: its rows would not mix)"
                )
            raise ValueError(f"{main_file} was written with other settings ({detail}){hint}; use another --output-dir")


def recorded(meta: dict[str, Any], key: str) -> Any:
    """The value a log's JSON records for ``key``; for a log written before the setting existed, the value it was
    certified with (:data:`LEGACY_SETTINGS`, by the log's mode), else None."""
    if key in meta:
        return meta[key]
    return LEGACY_SETTINGS.get(key, {}).get(meta.get("mode", "certify"))


def claim_log(main_file: Path, meta: dict[str, Any], dist: DistInfo) -> None:
    """Refuse to continue a log written with other row settings; then (rank 0) write this run's settings.

    Raises:
        ValueError: naming each setting that differs, with both values.
    """
    check_settings(main_file, meta)
    barrier(dist)
    if dist.is_main:
        main_file.with_suffix(".json").write_text(json.dumps(meta, indent=2))


def merge_rank_files(main_file: Path, header: tuple[str, ...], remove: bool) -> dict[int, str]:
    """The rows of the main log and of every ``.rank{r}`` file beside it; with ``remove``, the merge is
    written into the main file (atomically) and the rank files are deleted."""
    rank_files = sorted(main_file.parent.glob(f"{main_file.name}.rank*"))
    rows = read_rows(main_file, header)
    for rf in rank_files:
        for i, row in read_rows(rf, header).items():
            rows.setdefault(i, row)
    if remove and rank_files:
        write_rows(main_file, header, rows)
        for rf in rank_files:
            rf.unlink()
    return rows


def certify_images(task: CertifyTask, smooth: Smooth, todo: list[int], log_file: Path, bar: Any = None) -> int:
    """CERTIFY / PREDICT the images ``todo``, appending a row each to ``log_file`` (flushed per group of images
    sharing a forward batch); returns the rows added. Images whose noisy samples gave non-finite logits abstain,
    and ``<log>.nonfinite.tsv`` records them."""
    cfg = task.cfg
    if task.mode == "sequential":
        return _certify_sequential(task, smooth, todo, log_file, bar)
    select = task.mode == "certify" and cfg.candidate == "select"  # CERTIFY's selection step draws n0 samples
    per_image = (cfg.n0 if select else 0) + cfg.n
    group = max(1, cfg.batch // per_image)  # pack several images into a forward batch when n is small
    certified = abstained = added = 0
    with open(log_file, "a") as f:
        for start in range(0, len(todo), group):
            idxs = todo[start : start + group]
            items = [task.dataset[i] for i in idxs]
            x = torch.stack([it[0] for it in items])
            t0 = time.perf_counter()
            if select:
                answers = [
                    (c.prediction, c.radius, c.non_finite)
                    for c in smooth.certify_batch(x, idxs, cfg.n0, cfg.n, cfg.alpha, cfg.batch)
                ]
            elif task.mode == "certify":  # --candidate label: the label is the class certified
                labels = [int(it[1]) for it in items]
                answers = [
                    (c.prediction, c.radius, c.non_finite)
                    for c in smooth.certify_label_batch(x, idxs, labels, cfg.n, cfg.alpha, cfg.batch)
                ]
            else:
                answers = [
                    (p.prediction, 0.0, p.non_finite)
                    for p in smooth.predict_batch(x, idxs, cfg.n, cfg.alpha, cfg.batch)
                ]
            seconds = (time.perf_counter() - t0) / len(idxs)
            for i, (_, label), (pred, radius, bad) in zip(idxs, items, answers, strict=True):
                f.write(format_row(task.header, i, int(label), pred, radius, seconds))
                certified += int(pred == int(label))
                abstained += int(pred == Smooth.ABSTAIN)
                if bad:
                    _record_non_finite(log_file, i, bad, per_image)
            f.flush()
            added += len(idxs)
            if bar is not None:
                bar.update(len(idxs) * task.dist.world_size)
                bar.set_postfix(certified=certified, abstain=abstained)
    return added


def _certify_sequential(task: CertifyTask, smooth: Smooth, todo: list[int], log_file: Path, bar: Any) -> int:
    """Sequential CERTIFY of ``todo`` with continuous batching; a row per image as it finishes (``time``: the
    wall time since the previous image finished, so the column sums to the run's time)."""
    labels: dict[int, int] = {}

    def images() -> Iterator[tuple[int, torch.Tensor]]:
        for i in todo:
            x, y = task.dataset[i]
            labels[i] = int(y)
            yield i, x

    certifier = SequentialCertifier(smooth, sequential_settings(task))
    certified = abstained = added = 0
    t0 = time.perf_counter()
    with open(log_file, "a") as f:
        for i, c in certifier.certify_stream(images(), task.cfg.batch, labels):
            now = time.perf_counter()
            f.write(
                format_row(
                    task.header, i, labels[i], c.prediction, c.radius, now - t0, c.n_samples, c.radius_continuous
                )
            )
            f.flush()
            t0 = now
            if c.non_finite:
                _record_non_finite(log_file, i, c.non_finite, c.n_samples)
            certified += int(c.prediction == labels[i])
            abstained += int(c.prediction == Smooth.ABSTAIN)
            added += 1
            if bar is not None:
                bar.update(task.dist.world_size)
                bar.set_postfix(certified=certified, abstain=abstained)
    return added


def _record_non_finite(log_file: Path, idx: int, bad: int, total: int) -> None:
    main = log_file.with_name(log_file.name.split(".rank")[0])
    with open(main.with_suffix(".nonfinite.tsv"), "a") as f:  # O_APPEND: one short line per write, safe across ranks
        f.write(f"{idx}\t{bad}\t{total}\n")
    print(
        f"warning: image {idx} abstains: the base classifier gave NaN or infinite logits on {bad} of its {total} "
        "noisy samples",
        file=sys.stderr,
        flush=True,
    )


def smoother(task: CertifyTask, sigma: float, compiled: bool = True) -> Smooth:
    """The smoothed classifier of one sigma: :class:`~dmae.smoothing.SoundSmooth` with ``--sound``, else
    :class:`~dmae.smoothing.Smooth`; the base classifier ``torch.compile``-d with ``--compile`` (and ``compiled``)."""
    cfg = task.cfg
    base = torch.compile(task.model) if cfg.compile and compiled else task.model
    kind = SoundSmooth if cfg.sound else Smooth
    return kind(base, task.num_classes, sigma, seed=cfg.seed, precision=cfg.precision, device=task.device)


def run_probe(task: CertifyTask, smooth: Smooth) -> Probe:
    """The pre-flight probe (:mod:`dmae.certification.preflight`) on the first planned images: printed (rank 0)
    before any certification sample, its concerns as warnings.

    Raises:
        ValueError: what :func:`~dmae.certification.preflight.accuracy_probe` raises (e.g. images outside [0, 1]).
    """
    idxs = task.planned[:PROBE_IMAGES]
    items = [task.dataset[i] for i in idxs]
    probe = accuracy_probe(
        smooth, torch.stack([it[0] for it in items]), idxs, [int(it[1]) for it in items], task.cfg.batch
    )
    if task.dist.is_main:
        print(probe.text(), flush=True)
        for concern in probe.concerns():
            warn_user(concern)
    return probe


def _run_sigma(task: CertifyTask, sigma: float) -> CertifyRun:
    cfg, dist = task.cfg, task.dist
    main_file = log_path(task, sigma)
    meta = settings(task, sigma)
    check_settings(main_file, meta)  # a log of other settings is refused before anything is spent
    smooth = smoother(task, sigma)
    if task.planned:
        meta["probe"] = run_probe(task, smooth).to_dict()
    claim_log(main_file, meta, dist)
    done = merge_rank_files(main_file, task.header, remove=False)
    todo = [i for i in task.planned if i not in done]
    barrier(dist)  # every rank has read the files before any rank writes
    if dist.is_main and not dist.enabled:
        merge_rank_files(main_file, task.header, remove=True)  # fold rows of an interrupted distributed run in now
    my_file = Path(f"{main_file}.rank{dist.rank}") if dist.enabled else main_file
    write_rows(my_file, task.header, read_rows(my_file, task.header))  # drops a torn last line before appending
    bar = None
    if dist.is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="img", dynamic_ncols=True, desc=f"{task.mode} sigma={sigma:g}")
    try:
        added = certify_images(task, smooth, todo[dist.rank :: dist.world_size], my_file, bar)
    finally:
        if bar is not None:
            bar.close()
    barrier(dist)
    if dist.enabled and dist.is_main:
        merge_rank_files(main_file, task.header, remove=True)
    elif dist.is_main:  # images finish out of order under sequential CERTIFY: keep the file in index order
        write_rows(main_file, task.header, read_rows(main_file, task.header))
    barrier(dist)
    total = len(read_rows(main_file, task.header)) if dist.is_main else 0
    if dist.is_main:
        print(f"{task.mode} sigma={sigma:g}: {total} rows in {main_file} ({added * dist.world_size} new)", flush=True)
    return CertifyRun(sigma, main_file, added, total)


def _validate(cfg: CertifyConfig, mode: str) -> None:
    """Every option's check, then what the command (certify / predict) allows."""
    cfg.validate()
    if mode == "predict" and cfg.sequential:
        raise ValueError(f"--sequential {cfg.sequential} is a mode of certify, not of predict")
    if mode == "predict" and cfg.candidate == "label":
        raise ValueError(
            "--candidate label is a mode of certify, not of predict: PREDICT returns the smoothed class of an "
            "input without reading its label; to certify that the label is the smoothed class, run "
            "dmae certify --candidate label"
        )


def log_path(task: CertifyTask, sigma: float) -> Path:
    """The log of one sigma of a run: ``{mode}_sigma{S}.tsv`` in the output folder."""
    return task.out / f"{task.mode}_sigma{sigma:g}.tsv"


def estimate_certification(cfg: CertifyConfig, mode: Literal["certify", "predict"] = "certify") -> list[CostEstimate]:
    """``--estimate``: the cost of the run ``cfg`` describes (images not yet in its logs), per sigma, printed and
    returned; nothing is written. Runs in one process (under ``torchrun`` divide the time by the world size).

    Raises:
        ValueError / CheckpointError / DataError: as :func:`run_certification`.
    """
    _validate(cfg, mode)
    from dmae.runtime import resolve_device

    device = resolve_device(cfg.device)
    task, sigmas = prepare(cfg, mode, device, DistInfo())
    out = []
    for sigma in sigmas:
        main_file = log_path(task, sigma)
        check_settings(main_file, settings(task, sigma))  # the run itself would refuse such a log
        done = merge_rank_files(main_file, task.header, remove=False) if main_file.with_suffix(".json").exists() else {}
        todo = [i for i in task.planned if i not in done]
        pilot = [todo[j] for j in pilot_positions(len(todo))]
        items = [task.dataset[i] for i in pilot]
        x = torch.stack([it[0] for it in items]) if items else torch.zeros(0)
        smooth = smoother(task, sigma, compiled=False)
        if task.planned:
            run_probe(task, smooth)
        seq = sequential_settings(task) if task.mode == "sequential" else None
        est = estimate_cost(
            smooth,
            task.mode,
            x,
            pilot,
            [int(it[1]) for it in items],
            len(todo),
            len(task.planned) - len(todo),
            0 if cfg.candidate == "label" else cfg.n0,  # --candidate label: no selection samples
            cfg.n,
            cfg.batch,
            seq,
        )
        print(est.text(), flush=True)
        out.append(est)
    return out


def run_certification(cfg: CertifyConfig, mode: Literal["certify", "predict"] = "certify") -> list[CertifyRun]:
    """Certify (or predict) the selected images at every sigma; returns the files written. Works under torchrun.

    Raises:
        ValueError: a bad option, or an existing log written with other settings.
        CheckpointError / DataError: see :func:`prepare`.
    """
    _validate(cfg, mode)

    def job(device: torch.device, dist: DistInfo) -> list[CertifyRun]:
        task, sigmas = prepare(cfg, mode, device, dist)
        return _run_task(task, sigmas)

    return launch(job, cfg.device)


__all__ = [
    "CertifyConfig",
    "CertifyRun",
    "CertifyTask",
    "certify_images",
    "certify_module",
    "claim_log",
    "estimate_certification",
    "merge_rank_files",
    "module_task",
    "prepare",
    "run_certification",
    "selected_indices",
    "settings",
]
