"""The one training-job skeleton every dmae job plugs into: pretraining, fine-tuning and linear probing.

A job (:class:`TrainingJob`) supplies only what differs: its model and training set, its optimizer, the
loss of one micro-batch (``forward_loss``), its evaluation, and what it exports. :func:`train` does the
rest the same way for all, following MAE's ``engine_pretrain`` / ``engine_finetune`` loop:

- lr = blr * effective_batch / 256 (Goyal et al. 2017's linear scaling, as MAE), set per optimizer step
  (``scheduler.step_update(step)``) before the step: linear warmup, then half-cycle cosine;
- gradient accumulation, synchronising DDP gradients only on the last micro-step;
- every micro-step's randomness (noise, masks, drop path, mixup) is seeded by (seed, micro-step, rank),
  and the data order and augmentation by (seed, epoch, image): a resumed run is bit-identical;
- losses stay on the device and are synchronised once per log line, not once per step;
- a JSON-lines log and TensorBoard scalars in the run folder (rank 0), no step logged twice on resume;
- SIGINT/SIGTERM or ``stop_after`` checkpoint (atomically) at the next step boundary and return; ranks
  agree first; a non-finite loss or weight stops the run before anything is saved.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dmae import checkpoint as ckpt
from dmae.config import Options, default, flag, option, save_config, to_dict
from dmae.data import DATASET_NAMES, SeededDataset, ShardedEpochSampler, dataset_info, dataset_size, fingerprint
from dmae.datasets import UserData
from dmae.distributed import DistInfo, all_reduce_mean, barrier, launch
from dmae.errors import DivergedError, InputError, MissingFileError, RunExistsError, in_call_terms
from dmae.runtime import autocast, derive_seed

# Options that may change when a run is resumed; any other difference would change the trajectory.
RESUMABLE_OPTIONS = frozenset(
    {
        "output_dir",
        "resume",
        "num_workers",
        "progress",
        "log_every",
        "save_every",
        "stop_after",
        "device",
        "data_root",
        "download",
        "compile",
        "eval_images",
    }
)
STREAM_STEP = 0x5354455020  # leading key of the per-micro-step streams (noise, masks, drop path, mixup)
# A warmup longer than this share of the run's epochs is cut to it (unless given): the paper's recipes warm up
# for 4-5% of their epochs, the shipped CPU presets for 10% (0.3 of 3 epochs); a 5-epoch warmup of a 3-epoch run
# would never reach the learning rate at all.
WARMUP_FRACTION = 0.1
# The tail the sampler drops (an incomplete batch) may cost at most this share of an epoch's images before a
# default batch size is resized to spread the images evenly over the steps.
MAX_DROPPED_FRACTION = 0.25
# Models below this many parameters (the CPU presets: pico, micro, mini) keep the recipe's lr at any batch: the
# fine-tuning sweep of experiments/RESULTS.md trains the micro ViT best at lr 2e-3 to 4e-3 with batch 64, the
# lr the paper's recipe gives ViT-B at batch 1024.
SMALL_MODEL_PARAMS = 5_000_000

__all__ = [
    "RESUMABLE_OPTIONS",
    "Adaptation",
    "RunLog",
    "RunOptions",
    "StopFlag",
    "TrainOptions",
    "TrainResult",
    "TrainingJob",
    "adapt_to_data",
    "adaptation_block",
    "build_scheduler",
    "check_resumable",
    "check_run_folder",
    "default",
    "epoch_loader",
    "step_seed",
    "train",
    "wrap_for_training",
]


@dataclass
class RunOptions(Options):
    """The options every training job shares: seeding, hardware, the run folder, checkpoints and logging.

    Job configs subclass it (their own options come after these in ``--help``) and redefine ``output_dir``.
    """

    seed: int = option(0, "seed of every random draw (data order, augmentation, noise, masks)")
    num_workers: int = option(0, "data-loading worker processes", low=0)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    precision: Literal["auto", "bf16", "fp32"] = option("auto", "auto: bf16 autocast on GPUs, fp32 on CPUs")
    compile: bool = option(False, "torch.compile the model (GPUs)")
    output_dir: str = option("runs/run", "run folder: config, checkpoint, logs, exported weights")
    resume: bool = option(False, "continue the run in --output-dir from its last checkpoint")
    save_every: int = option(0, "also checkpoint every N optimizer steps (0: at the end of each epoch only)", low=0)
    log_every: int = option(20, "optimizer steps between log lines", low=1)
    stop_after: int | None = option(
        None, "checkpoint and stop once this many optimizer steps are done (resume later)", low=1
    )
    progress: bool = option(True, "show a progress bar")


@dataclass
class TrainOptions(RunOptions):
    """The data, schedule and optimizer options of every training job; jobs redefine the defaults."""

    data: str = option("fashion-mnist", "data set", choices=DATASET_NAMES, check=dataset_info)
    data_root: str | None = option(None, "data set directory (default: found automatically, see README)")
    download: bool = option(False, "download the data set when it is missing (needs internet)")
    train_subset: int | None = option(None, "use only the first N training images", low=1)
    epochs: int = option(10, "training epochs", low=1)
    warmup_epochs: float = option(1.0, "linear warmup length in epochs (set per iteration)", low=0)
    batch_size: int = option(64, "images per process per micro-step", low=1)
    accum_iter: int = option(1, "micro-steps accumulated per optimizer step", low=1)
    blr: float = option(1.5e-4, "base learning rate: lr = blr * effective_batch / 256", low=0, low_open=True)
    lr: float | None = option(None, "absolute learning rate (overrides --blr)", low=0, low_open=True)
    min_lr: float = option(0.0, "learning rate at the end of the cosine", low=0)
    weight_decay: float = option(0.05, "weight decay (none on biases, norms, tokens, positions)", low=0)
    clip_grad: float | None = option(None, "clip the gradient norm to this value", low=0, low_open=True)
    init: str | None = option(
        None, "start from these weights: a run folder or weights file of dmae, or an official one"
    )

    def check_combination(self) -> None:
        # a default warmup longer than the run is cut to fit it when the run starts (adapt_to_data); a given one
        # is the user's choice and is refused instead
        if self.warmup_epochs > self.epochs and self.given("warmup_epochs"):
            raise InputError(f"--warmup-epochs {self.warmup_epochs} exceeds --epochs {self.epochs}")

    def learning_rate(self, effective_batch: int) -> float:
        """``--lr`` if given, else ``blr * effective_batch / 256`` (MAE's linear scaling rule)."""
        return self.lr if self.lr is not None else self.blr * effective_batch / 256


def step_seed(seed: int, micro_step: int, rank: int) -> int:
    """Seed of the randomness (noise, masks, drop path, mixup) of one micro-batch on one rank."""
    return derive_seed(seed, STREAM_STEP, micro_step, rank)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float) -> Any:
    """Per-iteration schedule: linear warmup from 0 over ``warmup_steps``, then half-cycle cosine to ``min_lr``
    at ``total_steps`` (MAE's ``adjust_learning_rate``, as timm's ``CosineLRScheduler``). Call
    ``step_update(step)`` before each optimizer step; each group's ``lr_scale`` (layer decay) is applied."""
    import logging

    from timm.scheduler import CosineLRScheduler

    # timm warns that a one-step cosine has no effect; with all-warmup runs that is expected
    logging.getLogger("timm.scheduler.cosine_lr").setLevel(logging.ERROR)
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps - warmup_steps),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )


@dataclass(frozen=True)
class Adaptation:
    """A default that a run changed to fit its data: option ``option`` went from ``old`` to ``new`` because ``why``."""

    option: str
    old: Any
    new: Any
    why: str

    def __str__(self) -> str:
        return f"{flag(self.option)} {_short(self.old)} -> {_short(self.new)} ({self.why})"

    def to_dict(self) -> dict[str, Any]:
        return {"option": self.option, "old": self.old, "new": self.new, "why": self.why}


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def adaptation_block(adapted: list[Adaptation], n_images: int) -> str:
    """The lines that tell the user what was adapted to ``n_images`` training images (empty if nothing)."""
    if not adapted:
        return ""
    head = (
        f"adapted to {n_images:,} training images (defaults sized for ImageNet; give an option to keep your own value):"
    )
    return "\n".join([head, *(f"  {a}" for a in adapted)])


def adapt_to_data(
    cfg: TrainOptions,
    n_images: int,
    world_size: int = 1,
    reference_batch: int | None = None,
    model_params: int | None = None,
) -> list[Adaptation]:
    """Fit the schedule's defaults to a training set of ``n_images`` images; changes ``cfg`` in place.

    Only options not given (:meth:`dmae.config.Options.given`) change; each change is returned, with its reason:

    - ``accum_iter``, then ``batch_size``: one optimizer step takes ``batch x accum x processes`` images and the
      sampler drops the incomplete tail, so a step larger than the data set would give zero steps; a default
      batch that drops more than :data:`MAX_DROPPED_FRACTION` of the images is resized to spread them evenly;
    - ``warmup_epochs``: at most :data:`WARMUP_FRACTION` of ``epochs``;
    - ``lr`` (when neither ``--lr`` nor ``--blr`` is given and ``reference_batch``, the batch the recipe's
      ``blr`` was tuned at, is larger than the effective batch): the linear rule ``blr x batch / 256`` (Goyal et
      al., 2017) shrinks the lr by ``reference / batch``, which for a small batch leaves an lr that moves a model
      little in a short run; Adam's lr scales with the square root of the batch instead (Malladi et al.,
      NeurIPS 2022), so ``lr = blr x reference / 256 x sqrt(batch / reference)``; a model of fewer than
      :data:`SMALL_MODEL_PARAMS` parameters (``model_params``) keeps the recipe's ``blr x reference / 256``.

    Returns:
        The adaptations made, in that order (none when every default fits).
    """
    # in this order: each step sees the options the previous ones changed
    found = [
        _fit_accum_iter(cfg, n_images, world_size),
        _fit_batch_size(cfg, n_images, world_size),
        _fit_warmup(cfg),
        _scale_lr(cfg, world_size, reference_batch, model_params),
    ]
    return [a for a in found if a is not None]


def _change(cfg: TrainOptions, name: str, new: Any, why: str) -> Adaptation:
    """Set option ``name`` of ``cfg`` to ``new``; returns the change, with the old value and ``why``."""
    adaptation = Adaptation(name, getattr(cfg, name), new, why)
    setattr(cfg, name, new)
    return adaptation


def _fit_accum_iter(cfg: TrainOptions, n_images: int, procs: int) -> Adaptation | None:
    """A default ``accum_iter`` whose optimizer step takes more images than there are: as many as fit (>= 1)."""
    if cfg.batch_size * cfg.accum_iter * procs > n_images and cfg.accum_iter > 1 and not cfg.given("accum_iter"):
        accum = max(1, n_images // (cfg.batch_size * procs))
        return _change(
            cfg,
            "accum_iter",
            accum,
            f"a step of {cfg.batch_size} x {cfg.accum_iter} x {procs} images needs more "
            f"than the {n_images} training images",
        )
    return None


def _fit_batch_size(cfg: TrainOptions, n_images: int, procs: int) -> Adaptation | None:
    """A default ``batch_size`` that makes no full step, or drops more than :data:`MAX_DROPPED_FRACTION` of the
    images every epoch: the batch that spreads them evenly over the steps (even, for mixup)."""
    per_step = cfg.batch_size * cfg.accum_iter * procs
    full = n_images // per_step
    dropped = n_images - full * per_step
    if (
        not cfg.given("batch_size")
        and n_images >= cfg.accum_iter * procs
        and (full == 0 or dropped > MAX_DROPPED_FRACTION * n_images)
    ):
        steps = -(-n_images // per_step)  # ceil: the steps an epoch would take with the tail included
        batch = n_images // (steps * cfg.accum_iter * procs)
        if getattr(cfg, "mixup", 0) > 0 or getattr(cfg, "cutmix", 0) > 0:
            batch = max(2, batch - batch % 2)  # mixup pairs the images of a batch
        if batch != cfg.batch_size:
            why = (
                f"{n_images} images make no full batch of {per_step}"
                if full == 0
                else f"{dropped} of {n_images} images would be left out of every epoch"
            )
            return _change(
                cfg, "batch_size", batch, f"{why}; {steps} step(s) of {batch * cfg.accum_iter * procs} per epoch"
            )
    return None


def _fit_warmup(cfg: TrainOptions) -> Adaptation | None:
    """A default ``warmup_epochs`` over :data:`WARMUP_FRACTION` of the epochs: that fraction."""
    if not cfg.given("warmup_epochs") and cfg.warmup_epochs > WARMUP_FRACTION * cfg.epochs:
        return _change(
            cfg,
            "warmup_epochs",
            round(WARMUP_FRACTION * cfg.epochs, 4),
            f"{WARMUP_FRACTION:.0%} of {cfg.epochs} epochs; the default is sized for the paper's long runs",
        )
    return None


def _scale_lr(
    cfg: TrainOptions, procs: int, reference_batch: int | None, model_params: int | None
) -> Adaptation | None:
    """The lr of an effective batch below ``reference_batch`` when neither lr nor blr is given (see
    :func:`adapt_to_data`); the adaptation's old value is the linear rule's lr."""
    eff = cfg.batch_size * cfg.accum_iter * procs
    if reference_batch is None or eff >= reference_batch or cfg.given("lr") or cfg.given("blr") or cfg.lr is not None:
        return None
    linear, recipe = cfg.blr * eff / 256, cfg.blr * reference_batch / 256
    why = (
        f"blr {cfg.blr:g} x {eff} / 256 scales the recipe's batch-{reference_batch} lr down "
        f"{reference_batch / eff:g}x; "
    )
    if model_params is not None and model_params < SMALL_MODEL_PARAMS:
        lr = recipe
        why += f"a small model ({model_params / 1e6:.2f}M parameters) keeps the recipe's {recipe:.3g}"
    else:
        lr = recipe * math.sqrt(eff / reference_batch)
        why += f"Adam's lr follows sqrt(batch): {recipe:.3g} x sqrt({eff}/{reference_batch})"
    cfg.lr = lr
    return Adaptation("lr", linear, lr, why)


def epoch_loader(
    ds: Dataset, batch_size: int, accum_iter: int, num_workers: int, seed: int, dist: DistInfo, device: torch.device
) -> tuple[ShardedEpochSampler, DataLoader, int]:
    """This rank's shard of every epoch, in a seeded order with seeded augmentation; also the optimizer
    steps per epoch (whole accumulation cycles only).

    Raises:
        ValueError: too few images for one optimizer step.
    """
    sampler = ShardedEpochSampler(
        dataset_size(ds), batch_size, dist.rank, dist.world_size, seed, multiple_of=accum_iter
    )
    loader = DataLoader(
        SeededDataset(ds, seed),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    return sampler, loader, sampler.batches_per_epoch // accum_iter


def wrap_for_training(model: nn.Module, compile: bool, dist: DistInfo, device: torch.device) -> nn.Module:
    """The module the training step calls: optionally compiled, wrapped in DDP when distributed."""
    # torch.compile is typed as returning a plain callable; given a module it returns a module (OptimizedModule)
    wrapped = cast(nn.Module, torch.compile(model)) if compile else model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    return wrapped


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and exits. A second
    Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _step_of(line: str) -> float:
    """The step of a log line; a blank or torn line (a crash mid-write) counts as after any checkpoint."""
    try:
        return float(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return math.inf


class RunLog:
    """JSON-lines log (every rank-0 record) plus TensorBoard scalars, both in the run folder."""

    def __init__(self, out: Path, enabled: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = out / "log.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step and self.path.exists():
            # drop rows written after the checkpoint we resume from, so no step is logged twice
            keep = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, self.path)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step or None)
        except ImportError:  # tensorboard is a dependency; a broken install still trains
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (``type`` and ``step`` keys, numbers besides) to the log and TensorBoard."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("type", "step") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['type']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def check_run_folder(out: Path, resume: bool) -> Path:
    """The checkpoint path of a run folder.

    Raises:
        FileExistsError: the folder holds a run and ``resume`` is off.  FileNotFoundError: nothing to resume.
    """
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not resume:
        raise RunExistsError(f"{out} already holds a run; pass --resume to continue it, or choose another --output-dir")
    if resume and not ckpt_path.exists():
        raise MissingFileError(f"--resume: no checkpoint at {ckpt_path}")
    return ckpt_path


def check_resumable(
    saved: dict[str, Any], now: dict[str, Any], resumable: frozenset[str], path: Path, what: str = "options"
) -> None:
    """Refuse a resume whose options (other than ``resumable`` ones) differ from the saved run's.

    Raises:
        ValueError: naming every option that differs, with both values.
    """
    diff = {k: (saved.get(k), now[k]) for k in now if k not in resumable and saved.get(k) != now[k]}
    if diff:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise InputError(f"cannot resume {path}: {what} differ from the saved run ({detail})")


def check_finite_parameters(model: nn.Module, step: int) -> None:
    """Refuse to save a diverged model.

    Raises:
        FloatingPointError: naming the first parameter with a NaN or infinite value.
    """
    params = [(n, p) for n, p in model.named_parameters()]
    finite = torch.stack([torch.isfinite(p).all() for _, p in params]).tolist()  # one host read
    bad = [n for (n, _), ok in zip(params, finite, strict=True) if not ok]
    if bad:
        raise DivergedError(
            f"weights are not finite at step {step} ({', '.join(bad[:4])}); the run diverged, "
            "nothing was saved: lower the learning rate or clip gradients, then --resume"
        )


# ----------------------------------------------------------------------------- what a job supplies
class Built(NamedTuple):
    """What :meth:`TrainingJob.build` returns: the model (on the CPU) and the training set."""

    model: nn.Module
    train_set: Dataset


@dataclass
class Plan:
    """The numbers of a run: steps, warmup, the effective batch and the learning rate."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    effective_batch: int
    lr: float


class TrainingJob(ABC):
    """What differs between training jobs. The engine sets ``device``, ``dist``, ``model``, ``plan``,
    ``output_dir`` before calling the hooks; hooks named ``on_main_*`` / ``evaluate`` run on rank 0 only."""

    name = "train"  # progress-bar label
    eval_before_training = False  # also evaluate at step 0
    best: dict[str, float] | None = None  # the evaluation of the selected checkpoint, for jobs that select one
    reference_batch: int | None = None  # the effective batch the default blr was tuned at (see adapt_to_data)
    user: UserData | None = None  # the caller's own data set, when the job trains on one (else cfg.data)

    def __init__(self, cfg: TrainOptions) -> None:
        # the job adapts defaults to the data (adapt_to_data): it works on a copy, the caller's config is untouched
        self.cfg = copy.copy(cfg)
        self.adapted: list[Adaptation] = []  # defaults changed to fit the data (build() may add its own)
        self.warnings: list[str] = []  # said on stderr and logged once the run has finished (on_main_finished)
        self.device = torch.device("cpu")
        self.dist = DistInfo()
        self.model: nn.Module = nn.Identity()
        self.plan: Plan | None = None
        self.output_dir = Path(cfg.output_dir)

    @abstractmethod
    def build(self) -> Built:
        """The model (initial weights drawn after the global RNG is seeded with ``cfg.seed``) and training set."""

    @abstractmethod
    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """The optimizer of ``model`` (already on the device)."""

    @abstractmethod
    def forward_loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, seed: int
    ) -> torch.Tensor:
        """The scalar loss of one micro-batch; ``gen`` (on the device) and ``seed`` are this micro-step's."""

    @abstractmethod
    def architecture(self) -> tuple[str, dict[str, Any]]:
        """``(key, config)``: the architecture, saved as ``<key>.json`` and in the checkpoint under ``key``."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context of the forward pass (``--precision``)."""
        return autocast(self.device, self.cfg.precision)

    def announce(self) -> str:
        """The line printed before training (rank 0)."""
        return f"{self.name}: {self.plan}"

    def evaluate(self, step: int) -> dict[str, float]:
        """Metrics at the end of an epoch (rank 0); none by default."""
        return {}

    def on_main_evaluated(self, step: int, metrics: dict[str, float]) -> str:
        """After an evaluation (rank 0): select / export; returns a note for the printed line."""
        return ""

    def state(self) -> dict[str, Any]:
        """Job state saved in the checkpoint besides model, optimizer and step."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` from a checkpoint being resumed."""

    def on_main_finished(self) -> None:
        """Export the trained weights (rank 0, only when the run reached its last step)."""


@dataclass
class TrainResult:
    """What a call of :func:`train` did."""

    output_dir: Path
    step: int  # optimizer steps done in total
    total_steps: int
    # (step, this rank's loss) of this call; the repr leaves it and the model out (a page of numbers and layers)
    losses: list[tuple[int, float]] = field(default_factory=list, repr=False)
    evals: list[dict[str, float]] = field(default_factory=list)  # {step, epoch, metrics...} of this call (rank 0)
    best: dict[str, float] | None = None  # the evaluation of the selected checkpoint (fine-tuning)
    model: nn.Module | None = field(default=None, repr=False)  # the trained model (this rank's copy)
    stopped: bool = False  # stopped early (signal or stop_after); resume to finish
    interrupted: bool = False  # stopped by SIGINT / SIGTERM
    adapted: list[Adaptation] = field(default_factory=list)  # defaults changed to fit the data
    warnings: list[str] = field(default_factory=list)  # what the finished run warned about (rank 0)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    @property
    def eval_start(self) -> dict[str, float] | None:
        """The evaluation before training, when this call started the run."""
        return self.evals[0] if self.evals and self.evals[0]["step"] == 0 else None

    @property
    def eval_end(self) -> dict[str, float] | None:
        """The last end-of-epoch evaluation of this call."""
        return self.evals[-1] if self.evals and self.evals[-1]["step"] > 0 else None


def train(job: TrainingJob) -> TrainResult:
    """Run (or resume) ``job`` as its config says; works under torchrun.

    Raises:
        ValueError: a bad option or a resume with other options.  FileExistsError / FileNotFoundError: the run
        folder already holds a run / holds none to resume.  FloatingPointError: the run diverged.
    """
    # the caller's own images are named "custom", no registry entry: every other option is checked as usual
    cfg = job.cfg if job.user is None else job.cfg.updated(data=DATASET_NAMES[0])
    cfg.validate()
    return launch(lambda device, dist: _Trainer(job, device, dist).run(), job.cfg.device)


# ----------------------------------------------------------------------------- the skeleton
class _Trainer:
    """Set-up, resume, the step loop, logging, checkpoints: the same for every job."""

    def __init__(self, job: TrainingJob, device: torch.device, dist: DistInfo) -> None:
        cfg = job.cfg
        self.job, self.cfg, self.device, self.dist = job, cfg, device, dist
        job.device, job.dist = device, dist
        self.ckpt_path = check_run_folder(job.output_dir, cfg.resume)
        torch.manual_seed(cfg.seed)  # the initial weights are a function of the seed (identical on every rank)
        self.model, train_set = job.build()
        job.model = self.model
        self.n_train = dataset_size(train_set)
        # before the loader and the plan, which follow the adapted batch, warmup and lr
        params = sum(p.numel() for p in self.model.parameters())
        job.adapted += adapt_to_data(cfg, self.n_train, dist.world_size, job.reference_batch, params)
        self.sampler, self.loader, spe = epoch_loader(
            train_set, cfg.batch_size, cfg.accum_iter, cfg.num_workers, cfg.seed, dist, device
        )
        eff_batch = cfg.batch_size * cfg.accum_iter * dist.world_size
        total = cfg.epochs * spe
        job.plan = self.plan = Plan(spe, total, round(cfg.warmup_epochs * spe), eff_batch, cfg.learning_rate(eff_batch))
        self.model.to(device)
        self.optimizer = job.build_optimizer(self.model, self.plan.lr)
        self.scheduler = build_scheduler(self.optimizer, total, self.plan.warmup_steps, cfg.min_lr)
        # what the run's trajectory depends on beyond its options: a resume is checked against it
        init_file = ckpt.resolve_checkpoint(cfg.init) if cfg.init and Path(cfg.init).exists() else None
        self.provenance = {
            "data_fingerprint": fingerprint(train_set),
            "init_sha256": ckpt.weights_digest(init_file) if init_file else None,
        }
        self.step = self._resume() if cfg.resume else 0
        self.result = TrainResult(job.output_dir, self.step, total)
        self.gen = torch.Generator(device=device)
        self.window: list[torch.Tensor] = []
        self.stop_agreed = False

    def _resume(self) -> int:
        state = ckpt.safe_load(self.ckpt_path)
        check_resumable(state.get("config", {}), to_dict(self.cfg), RESUMABLE_OPTIONS, self.ckpt_path)
        saved = state.get("provenance", {})
        if self.provenance["init_sha256"] is None:  # --init gone since: the checkpoint holds what it gave
            self.provenance["init_sha256"] = saved.get("init_sha256")
        check_resumable(saved, self.provenance, frozenset(), self.ckpt_path, "the data or the --init weights")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.job.load_state(state)
        return int(state["step"])

    def _write_run_files(self) -> None:
        out = self.job.output_dir
        if self.dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            # the resolved values are the adapted ones; the comment says which were adapted and why
            save_config(self.cfg, out / "config.yaml", adaptation_block(self.job.adapted, self.n_train))
            key, arch = self.job.architecture()
            (out / f"{key}.json").write_text(json.dumps(arch, indent=2))
        barrier(self.dist)

    def run(self) -> TrainResult:
        self._write_run_files()
        self.train_model = wrap_for_training(self.model, self.cfg.compile, self.dist, self.device)
        self.log = RunLog(self.job.output_dir, self.dist.is_main, self.step)
        if self.dist.is_main:
            block = adaptation_block(self.job.adapted, self.n_train)
            if block:
                print(block, flush=True)
                if self.step == 0:
                    self.log.write(
                        {
                            "type": "adapted",
                            "step": 0,
                            "train_images": self.n_train,
                            "changes": [a.to_dict() for a in self.job.adapted],
                        }
                    )
            print(self.job.announce(), flush=True)
            if self.step == 0 and self.job.eval_before_training:
                self._evaluate(0, "eval before training")
        self.model.train()
        try:
            self._loop()
        finally:
            self.log.close()
        self.result.step, self.result.model, self.result.best = self.step, self.model, self.job.best
        self.result.adapted = list(self.job.adapted)
        if not self.result.stopped and self.dist.is_main:
            self.job.on_main_finished()
            self._warn(self.job.warnings)
        barrier(self.dist)  # the exports exist for every rank before any rank goes on (experiments chain stages)
        return self.result

    def _warn(self, messages: list[str]) -> None:
        """Say each warning on stderr, where it is not lost among the progress lines, and keep it in the log."""
        if not messages:
            return
        with open(self.log.path, "a") as f:  # the training log is closed by now: append to its file
            for m in messages:
                print(f"dmae {self.job.name}: WARNING: {in_call_terms(m)}", file=sys.stderr, flush=True)
                f.write(json.dumps({"type": "warning", "step": self.step, "message": m}) + "\n")
        self.result.warnings = list(messages)

    def _loop(self) -> None:
        cfg, total = self.cfg, self.plan.total_steps
        if cfg.stop_after is not None and self.step >= cfg.stop_after:
            if self.dist.is_main:
                said = f"already at step {self.step} >= --stop-after {cfg.stop_after}; nothing to do"
                print(in_call_terms(said), flush=True)
            self.result.stopped = self.step < total
            return
        self.bar = None
        if self.dist.is_main and cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, desc=self.job.name)
        self.t_window = time.perf_counter()
        try:
            with StopFlag() as stop:
                while self.step < total and not self._epoch(stop):
                    pass
        finally:
            if self.bar is not None:
                self.bar.close()

    def _epoch(self, stop: StopFlag) -> bool:
        """Steps to the end of the current epoch; True when the run stopped early."""
        spe = self.plan.steps_per_epoch
        epoch, start = divmod(self.step, spe)
        self.sampler.set_epoch(epoch, start * self.cfg.accum_iter)
        batches = iter(self.loader)
        for _ in range(start, spe):
            self.scheduler.step_update(self.step)
            self.window.append(self._train_step(batches))
            self.step += 1
            if self.bar is not None:
                self.bar.update(1)
            if self._after_step(stop):
                return True
        return False

    def _no_sync(self) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync``: this micro-step's gradients are not all-reduced (distributed runs only)."""
        from torch.nn.parallel import DistributedDataParallel

        ddp = self.train_model
        assert isinstance(ddp, DistributedDataParallel)  # wrap_for_training wraps every distributed run in DDP
        return ddp.no_sync()

    def _train_step(self, batches: Iterator) -> torch.Tensor:
        cfg, job = self.cfg, self.job
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.accum_iter):
            x, y = next(batches)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            seed = step_seed(cfg.seed, self.step * cfg.accum_iter + micro, self.dist.rank)
            self.gen.manual_seed(seed)
            torch.manual_seed(seed)  # drop path draws from the global generator: make it a function of the step too
            last = micro == cfg.accum_iter - 1  # sync gradients only on the last micro-step
            with contextlib.nullcontext() if (not self.dist.enabled or last) else self._no_sync():
                loss = job.forward_loss(self.train_model, x, y, self.gen, seed)
                (loss / cfg.accum_iter).backward()
            loss_sum += loss.detach()
        if cfg.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.clip_grad)
        self.optimizer.step()
        return loss_sum / cfg.accum_iter

    def _after_step(self, stop: StopFlag) -> bool:
        """Log, evaluate, checkpoint and stop as due after a step; True when the run stops here."""
        cfg, step = self.cfg, self.step
        end_of_epoch = step % self.plan.steps_per_epoch == 0
        at_stop_after = cfg.stop_after is not None and step >= cfg.stop_after
        if not self.dist.enabled:
            self.stop_agreed = stop.set
        if (
            step % cfg.log_every == 0
            or end_of_epoch
            or step == self.plan.total_steps
            or at_stop_after
            or self.stop_agreed
        ):
            self._log_window()
            if self.dist.enabled:  # ranks agree on stopping only here, so all of them stop at the same step
                flag = torch.tensor(float(stop.set), device=self.device)
                self.stop_agreed = all_reduce_mean(flag, self.dist).item() > 0
        if end_of_epoch:
            if self.bar is not None:
                self.bar.clear()
            if self.dist.is_main:
                self._evaluate(step, f"epoch {step // self.plan.steps_per_epoch}/{cfg.epochs}")
            self._save()
        elif cfg.save_every and step % cfg.save_every == 0:
            self._save()
        if not (self.stop_agreed or at_stop_after):
            return False
        if not end_of_epoch:
            self._save()
        if self.dist.is_main:
            why = "interrupted" if self.stop_agreed else f"--stop-after {cfg.stop_after}"
            print(
                f"\nstopped at step {step}/{self.plan.total_steps} ({why}); checkpoint saved, continue with --resume",
                flush=True,
            )
        self.result.stopped, self.result.interrupted = True, self.stop_agreed
        return True

    def _log_window(self) -> None:
        local = torch.stack(self.window)
        mean_loss = all_reduce_mean(local.mean(), self.dist).item()
        if not math.isfinite(mean_loss):
            raise DivergedError(
                f"loss is {mean_loss} at step {self.step}; the run diverged, nothing was saved: "
                "lower the learning rate or clip gradients, then --resume"
            )
        first = self.step - len(self.window) + 1
        self.result.losses += [(first + i, v) for i, v in enumerate(local.tolist())]
        ips = len(self.window) * self.plan.effective_batch / max(time.perf_counter() - self.t_window, 1e-9)
        lr = self.optimizer.param_groups[-1]["lr"]
        self.log.write(
            {
                "type": "train",
                "step": self.step,
                "epoch": self.step / self.plan.steps_per_epoch,
                "loss": mean_loss,
                "lr": lr,
                "img_per_s": ips,
            }
        )
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
        self.window, self.t_window = [], time.perf_counter()

    def _evaluate(self, step: int, label: str) -> None:
        metrics = self.job.evaluate(step)
        if not metrics:
            return
        row = {"step": step, "epoch": step / self.plan.steps_per_epoch, **metrics}
        self.log.write({"type": "eval", **row})
        self.result.evals.append(row)
        note = self.job.on_main_evaluated(step, row)
        print(f"{label}: " + ", ".join(f"{k} {v:.5f}" for k, v in metrics.items()) + note, flush=True)

    def _save(self) -> None:
        if self.window:  # losses since the last log line: a diverged step is never saved
            bad = (~torch.isfinite(torch.stack(self.window))).any().float()
            if all_reduce_mean(bad, self.dist).item() > 0:  # every rank takes the same branch
                self._log_window()  # raises FloatingPointError naming the step
        check_finite_parameters(self.model, self.step)  # on every rank, so all of them stop together
        if self.dist.is_main:
            key, arch = self.job.architecture()
            ckpt.atomic_save(
                {
                    "format": ckpt.FORMAT,
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "step": self.step,
                    "epoch": self.step // self.plan.steps_per_epoch,
                    "config": to_dict(self.cfg),
                    "provenance": self.provenance,
                    key: arch,
                    **self.job.state(),
                },
                self.ckpt_path,
            )
        barrier(self.dist)
