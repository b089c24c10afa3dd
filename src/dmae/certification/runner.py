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
Without torchrun (a Slurm job array, preemptible machines), ``--shard K/N`` certifies every N-th planned image from
the K-th into a shard log of its own, which resumes the same way (under torchrun too), and ``--merge`` combines the
N shard logs into the main file (:mod:`dmae.certification.shards`, docs/cluster.md).

The steps: :func:`prepare` (checkpoint, model, data; :func:`module_task` for a model and data set of the
caller's own), :func:`settings` / :func:`claim_log` (what the file is checked against), :func:`run_probe`,
:func:`merge_rank_files`, :func:`certify_images` (the loop), :func:`merge_shards` (``--merge``);
:func:`run_certification` and :func:`certify_module` (the Python API's path) share :func:`_run_task`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from scipy.stats import norm
from torch import nn

from dmae import checkpoint as ckpt
from dmae.certification.estimate import CostEstimate, estimate_cost, pilot_positions
from dmae.certification.log import (
    CERTIFY_HEADER,
    PREDICT_HEADER,
    SEQUENTIAL_HEADER,
    format_row,
    merge_rank_files,
    read_rows,
    write_json,
    write_rows,
)
from dmae.certification.preflight import PROBE_IMAGES, Probe, accuracy_probe
from dmae.certification.shards import (
    ShardError,
    ShardSet,
    parse_shard,
    read_shards,
    setting_changes,
    shard_images,
    shard_log_path,
    write_merged,
)
from dmae.config import Options, option, to_dict
from dmae.data import (
    DATASET_NAMES,
    build_dataset,
    build_transform,
    dataset_info,
    dataset_size,
    fingerprint,
    num_classes_of,
)
from dmae.distributed import DistInfo, barrier, launch
from dmae.errors import InputError, in_call_terms
from dmae.runtime import warn_user
from dmae.smoothing import Smooth, SoundSmooth, check_alpha, radius_ceiling
from dmae.smoothing.confseq import ALIASES, SEQUENCES
from dmae.smoothing.core import check_images, eval_mode
from dmae.smoothing.sequential import (
    DEFAULT_FUTILITY,
    DEFAULT_SCHEDULE,
    SequentialCertifier,
    SequentialSettings,
    sequence_for,
)

if TYPE_CHECKING:
    from dmae.models.classifier import ViTClassifier
    from dmae.models.external import ExternalClassifier

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
    "shard",  # a shard log's (K, N); absent (None) from a main log's JSON
    "candidate",
    "schedule",
)
# what a log written before a setting existed was certified with (by the mode its JSON records): such a log resumes
# under exactly that setting, and is refused under any other
LEGACY_SETTINGS = {
    "candidate": {"certify": "select", "sequential": "select"},
    "schedule": {"sequential": "chunks"},
}
# what the shard logs of one sigma must share to be one log: the row settings, and the planned image count (their
# shares of the images are cut from the same list)
MERGE_KEYS = (*(k for k in ROW_SETTINGS if k != "shard"), "images")


def _check_radii(radii: tuple[float, ...]) -> None:
    for r in radii:
        if not 0 <= r < float("inf"):
            raise InputError(f"--radii must be finite numbers >= 0, got {r}")


def _check_futility(beta: float) -> None:
    if not 0 <= beta <= 0.5:
        raise InputError(f"--futility must be in [0, 0.5] (0 turns the rule off), got {beta}")


def _check_sigmas(sigmas: tuple[float, ...]) -> None:
    for s in sigmas:
        if not s > 0:
            raise InputError(f"sigma must be > 0, got {s}")


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
        "--model: per-channel mean the network was trained to subtract, [0, 1] pixel units (default: the data set's "
        "for timm / torchvision; 0 for your own module:Factory, which takes [0, 1] images as in the Python API)",
    )
    input_std: tuple[float, ...] | None = option(
        None, "--model: per-channel std (default: the data set's for timm / torchvision; 1 for your own module:Factory)"
    )
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
    shard: str | None = option(
        None,
        "K/N: certify only shard K of N (0 <= K < N): every N-th image of the planned list (after --skip / --max) "
        "from the K-th, into its own log {mode}_sigma{S}.shard-K-of-N.tsv (+ .json) beside the main one; it "
        "resumes like any log; combine the N shards with --merge (docs/cluster.md)",
        check=parse_shard,
    )
    merge: bool = option(
        False,
        "merge the shard logs of each sigma (run with the same options, without --shard) into the main log "
        "{mode}_sigma{S}.tsv (+ .json), rows by idx, as one run writes it; refuses shards of other settings, "
        "several N, overlapping or (without --allow-partial) incomplete shards; certifies nothing",
    )
    allow_partial: bool = option(
        False,
        "--merge: write the merged log even when images are missing (counted in its JSON under merge; the "
        "report marks the log incomplete); the shards can be finished and merged again later",
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
            raise InputError("--checkpoint is required")
        for name in ("input_size", "input_mean", "input_std"):
            if getattr(self, name) is not None and not self.model:
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)} is only used with --model")
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
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)} is only used with {need}")
        if self.merge and self.shard:
            raise InputError(f"--shard {self.shard} certifies one shard and --merge combines them: give one of the two")
        if self.merge and self.estimate:
            raise InputError("--estimate prices a certification and --merge certifies nothing: give one of the two")
        if self.allow_partial and not self.merge:
            raise InputError("--allow-partial is only used with --merge")
        if self.stop_on_wrong_guess and self.candidate == "label":
            raise InputError(
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


@dataclass(kw_only=True)
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
    model: ExternalClassifier | ViTClassifier
    if cfg.model:
        model, path, digest = _external_model(cfg.model, cfg, info, num_classes)
        img_size = model.img_size
    else:
        assert cfg.checkpoint is not None  # CertifyConfig.check_combination requires it
        path = ckpt.resolve_checkpoint(cfg.checkpoint)
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
        raise InputError("give --sigma (the checkpoint's run does not say which single sigma it was trained at)")
    model.to(device).eval()
    ds = build_dataset(
        cfg.data, split, cfg.data_root, build_transform(info, False, img_size), channels=model.preprocess.in_chans
    )  # a grey folder for a grey model, colour for colour
    planned = list(selected_indices(dataset_size(ds), cfg.skip, cfg.max))
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
        raise InputError("the data set is empty")
    x, _ = dataset[0]
    _check_first_image(model, x)
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


def _check_first_image(model: Any, x: Any) -> None:
    """The first image of a user's data set, checked before the model sees it: a ``[C, H, W]`` floating-point
    tensor in [0, 1] (channels first) of the dtype of the model's parameters.

    Raises:
        InputError: anything else, naming what the image is and how to make it what is needed.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise InputError(
            f"data set items must be (image, label) with image a [C, H, W] tensor of [0, 1] pixels, got "
            f"{type(x).__name__}{' of shape ' + str(tuple(x.shape)) if isinstance(x, torch.Tensor) else ''}"
        )
    if x.shape[0] not in (1, 3) and x.shape[-1] in (1, 3):
        raise InputError(
            f"the images are {list(x.shape)}: channels last; give [C, H, W] (x.permute(2, 0, 1), or torchvision's "
            "ToTensor)"
        )
    check_images(x.unsqueeze(0), [0])  # float, finite, in [0, 1]: before the first forward pass
    param = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    if param is not None and torch.is_floating_point(param) and x.dtype != param.dtype:
        raise InputError(
            f"the images are {x.dtype} and the model's parameters {param.dtype}: convert one of them (e.g. "
            f"x.to({param.dtype}) in the data set's transform)"
        )


def _output_classes(model: Any, x: torch.Tensor, device: torch.device) -> int:
    """The class count a model's logits have, from one clean forward pass (in eval mode, modes restored)."""
    with eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext(), torch.no_grad():
        logits = model(x.unsqueeze(0).to(device))
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise InputError(f"the model returned {tuple(logits.shape)} for one image, expected logits [1, K] with K >= 2")
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
        raise InputError("give sigma: a model of your own records no training sigma to default to")
    sigmas = tuple(float(s) for s in cfg.sigma)

    def job(device: torch.device, dist: DistInfo) -> list[CertifyRun]:
        task = module_task(model, dataset, cfg, mode, device, dist, num_classes)
        return _run_task(task, sigmas)

    return launch(job, cfg.device)


def _run_task(task: CertifyTask, sigmas: tuple[float, ...]) -> list[CertifyRun]:
    """Every sigma of a task, in order (``--merge``: :func:`merge_shards`); every sigma's log is checked before the
    first sample is spent."""
    for sigma in sigmas:
        check_settings(log_path(task, sigma), settings(task, sigma))
    if task.cfg.merge:
        return merge_shards(task, sigmas)
    task.out.mkdir(parents=True, exist_ok=True)
    return [_run_sigma(task, sigma) for sigma in sigmas]


def merge_shards(task: CertifyTask, sigmas: tuple[float, ...]) -> list[CertifyRun]:
    """``--merge``: the shard logs of each sigma (:func:`dmae.certification.shards.read_shards`, with the rows of
    an existing main log) written into the main log, rows by index, with the JSON a single run writes (plus
    ``merge``: the number of shards and of images missing). Every sigma is checked before any file is written;
    rank 0 writes. The shard logs are kept (each is its shard's resume point).

    Raises:
        ShardError: a sigma's shards are none, of several N, of settings other than each other's or this
            command's (the key and both values named), overlap, or (without ``--allow-partial``) miss images
            (counted, and which shards named).
    """
    sets = [_shard_set(task, sigma) for sigma in sigmas]
    if not task.cfg.allow_partial and (short := [ss for ss in sets if ss.missing]):
        raise ShardError(
            "; ".join(ss.missing_text() for ss in short) + ". Finish them (rerun their --shard commands: each "
            "resumes), or write the merged log of what is there with --allow-partial"
        )
    runs = []
    for sigma, ss in zip(sigmas, sets, strict=True):
        missing, added = len(ss.missing), 0
        if task.dist.is_main:
            added = len(ss.rows) - len(read_rows(ss.main_file, task.header))
            probe = {"probe": ss.meta["probe"]} if "probe" in ss.meta else {}  # as a single run's JSON has it
            write_merged(ss, {**settings(task, sigma), **probe, "merge": {"shards": ss.n, "missing": missing}})
            print(
                in_call_terms(
                    f"{task.mode} sigma={sigma:g}: merged {len(ss.files)} shard logs (of {ss.n}) into "
                    f"{ss.main_file}: {len(ss.rows)} of {len(ss.planned)} images"
                ),
                flush=True,
            )
            if missing:
                warn_user(f"{ss.missing_text()}; the merged log is incomplete (--allow-partial)")
        runs.append(CertifyRun(sigma, ss.main_file, added, len(ss.rows)))
    barrier(task.dist)
    return runs


def _shard_set(task: CertifyTask, sigma: float) -> ShardSet:
    """The shard logs of one sigma with the rows of its main log, checked against this command's settings.

    Raises:
        ShardError: see :func:`merge_shards`.
    """
    main_file = main_log_path(task, sigma)
    ss = read_shards(main_file, MERGE_KEYS, task.header, task.planned, include_main=True)
    if changes := setting_changes(ss.meta, settings(task, sigma), MERGE_KEYS):
        raise ShardError(
            f"the shard logs of {main_file} were certified with other settings than this command's ({changes}): give "
            "--merge the options the shards were certified with"
        )
    return ss


def _external_model(name: str, cfg: CertifyConfig, info: Any, num_classes: int) -> tuple[ExternalClassifier, Path, str]:
    """``--model`` (``name``): the timm / torchvision network with its input layer, its weights file and that file's
    SHA-256 (of the file's bytes, recorded as ``weights_sha256``).

    Raises:
        ValueError: an unknown architecture (close names listed) or a bad ``--input-mean`` / ``--input-std``.
        CheckpointError: a missing, unreadable or unsafe weights file, keys or shapes that do not fit, NaN weights.
    """
    from dmae.models.external import build_external_classifier, parse_model_name

    assert cfg.checkpoint is not None  # CertifyConfig.check_combination requires it
    path = Path(cfg.checkpoint)
    # timm / torchvision networks expect normalized input: the data set's statistics by default. Code of the
    # user's own takes [0, 1] images, as everywhere in the Python API: normalizing it again would shift its input
    own = parse_model_name(name)[0] == "python"
    mean = cfg.input_mean or ((0.0,) if own else info.mean)
    std = cfg.input_std or ((1.0,) if own else info.std)
    model, digest = build_external_classifier(
        name,
        path,
        num_classes,
        img_size=cfg.input_size or info.size or 224,
        in_chans=info.channels,
        mean=mean,
        std=std,
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
        **({"shard": list(parse_shard(cfg.shard))} if cfg.shard else {}),  # a main log's JSON has no shard key
        # what a row means: select: CERTIFY's class; label: whether the label is certified (predict: neither)
        "candidate": None if task.mode == "predict" else cfg.candidate,
    }


def _input_layer(task: CertifyTask) -> str | None:
    """``--model``'s resolved input layer (size, channels, mean, std), which changes every row; None otherwise."""
    # with --model, the model is the ExternalClassifier prepare() built
    return cast("ExternalClassifier", task.model).preprocess.extra_repr() if task.cfg.model else None


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
        diff = {k: (recorded(old, k), meta.get(k)) for k in ROW_SETTINGS if recorded(old, k) != meta.get(k)}
        if diff:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            hint = ""
            if "schedule" in diff:
                hint = (
                    f"; it was certified with the {diff['schedule'][0]} schedule: resume it with --schedule "
                    f"{diff['schedule'][0]} (another schedule looks at other sample counts: its rows would not mix)"
                )
            raise InputError(f"{main_file} was written with other settings ({detail}){hint}; use another --output-dir")


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
        write_json(main_file.with_suffix(".json"), meta)  # atomic: a report or merge beside the job reads it whole


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
    # torch.compile is typed as returning a plain callable; given a module it returns a module (OptimizedModule)
    base = cast(nn.Module, torch.compile(task.model)) if cfg.compile and compiled else task.model
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


def unreachable_note(task: CertifyTask, sigma: float) -> str | None:
    """A note when some of the radii the report shows (``--radii``, else the data set's standard ones) lie beyond
    what the sample budget can certify even with every sample correct (sigma * Phi^-1(alpha^(1/n)), Cohen et al.,
    ICML 2019): their certified accuracy is 0 whatever the classifier, and the note says which budget reaches the
    largest. None when every radius is reachable, and for PREDICT."""
    cfg = task.cfg
    if task.mode == "predict":
        return None
    n = (cfg.n_max or cfg.n) if cfg.sequential else cfg.n
    radii = tuple(cfg.radii) if cfg.radii else standard_radii(cfg.data)
    ceiling = radius_ceiling(n, cfg.alpha, sigma)
    above = [r for r in radii if r > ceiling]
    if not above or ceiling <= 0:  # no radius at all: check_certify_budget warns
        return None
    need = math.ceil(math.log(cfg.alpha) / math.log(float(norm.cdf(max(above) / sigma))))
    flag = "--n-max" if cfg.sequential else "--n"
    return (
        f"note: at sigma {sigma:g} with {n:,} samples per image (alpha {cfg.alpha:g}) no radius above {ceiling:.3f} "
        f"can be certified, even with every sample correct: certified accuracy at r = "
        f"{', '.join(f'{r:g}' for r in above)} will be 0 ({flag} {need:,} reaches r = {max(above):g})"
    )


def _run_sigma(task: CertifyTask, sigma: float) -> CertifyRun:
    """Certify this run's images at one sigma into its log (the main log, or a shard's: the same steps)."""
    cfg, dist = task.cfg, task.dist
    main_file = log_path(task, sigma)
    meta = settings(task, sigma)
    check_settings(main_file, meta)  # a log of other settings is refused before anything is spent
    smooth = smoother(task, sigma)
    if task.planned:
        meta["probe"] = run_probe(task, smooth).to_dict()
    if dist.is_main and (note := unreachable_note(task, sigma)):  # after the probe, which is always the first line
        print(in_call_terms(note), flush=True)
    claim_log(main_file, meta, dist)
    done = merge_rank_files(main_file, task.header, remove=False)
    todo = [i for i in my_images(task) if i not in done]
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
        done_line = f"{task.mode} sigma={sigma:g}: {total} rows in {main_file} ({added * dist.world_size} new)"
        print(in_call_terms(done_line), flush=True)
    if dist.is_main and cfg.shard:
        k, n = parse_shard(cfg.shard)
        print(
            in_call_terms(
                f"shard {k}/{n} holds {total} of its {len(my_images(task))} images; once all {n} shards are done, "
                "merge them: the same command with --merge instead of --shard (docs/cluster.md)"
            ),
            flush=True,
        )
    return CertifyRun(sigma, main_file, added, total)


def _validate(cfg: CertifyConfig, mode: str) -> None:
    """Every option's check, then what the command (certify / predict) allows."""
    cfg.validate()
    if mode == "predict" and cfg.sequential:
        raise InputError(f"--sequential {cfg.sequential} is a mode of certify, not of predict")
    if mode == "predict" and cfg.candidate == "label":
        raise InputError(
            "--candidate label is a mode of certify, not of predict: PREDICT returns the smoothed class of an "
            "input without reading its label; to certify that the label is the smoothed class, run "
            "dmae certify --candidate label"
        )


def main_log_path(task: CertifyTask, sigma: float) -> Path:
    """The log of one sigma of a run: ``{mode}_sigma{S}.tsv`` in the output folder (what ``--merge`` writes)."""
    return task.out / f"{task.mode}_sigma{sigma:g}.tsv"


def log_path(task: CertifyTask, sigma: float) -> Path:
    """The log this run writes at one sigma: the main log, or with ``--shard K/N`` that shard's
    ``{mode}_sigma{S}.shard-K-of-N.tsv`` beside it (:mod:`dmae.certification.shards`)."""
    main = main_log_path(task, sigma)
    return shard_log_path(main, *parse_shard(task.cfg.shard)) if task.cfg.shard else main


def my_images(task: CertifyTask) -> list[int]:
    """The planned images this run certifies: all of them, or with ``--shard K/N`` positions K, K + N, ..."""
    return shard_images(task.planned, *parse_shard(task.cfg.shard)) if task.cfg.shard else task.planned


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
        todo = [i for i in my_images(task) if i not in done]
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
            len(my_images(task)) - len(todo),
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
    "log_path",
    "main_log_path",
    "merge_rank_files",
    "merge_shards",
    "module_task",
    "prepare",
    "run_certification",
    "selected_indices",
    "settings",
]
