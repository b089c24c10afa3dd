"""The training loop every dmae job shares: steps across epochs, logging, checkpoints, stopping, resuming.

A job (pretraining, fine-tuning, linear probing) supplies one ``train_step`` (its micro-steps, backward
and optimizer step) and an end-of-epoch evaluation; this module does the rest the same way for all:

- the learning rate is set per optimizer step (``scheduler.step_update(step)``) before the step;
- losses stay on the device and are synchronised once per log line, not once per step;
- a JSON-lines log and TensorBoard scalars in the run folder (rank 0), no step logged twice on resume;
- SIGINT/SIGTERM or ``stop_after`` checkpoint at the next step boundary and return; ranks agree first;
- the sampler restarts mid-epoch from the step stored in the checkpoint, so resumption is exact.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dmae.config import option
from dmae.data import SeededDataset, ShardedEpochSampler
from dmae.distributed import DistInfo, all_reduce_mean, cleanup, init_distributed, resolve_device

R = TypeVar("R")

# Options that may change when a run is resumed; any other difference would change the trajectory.
RESUMABLE_OPTIONS = frozenset({"output_dir", "resume", "num_workers", "progress", "log_every", "save_every",
                               "stop_after", "device", "data_root", "download", "compile", "eval_images"})


@dataclass
class RunOptions:
    """The options every training job shares: seeding, hardware, the run folder, checkpoints and logging.

    Job configs subclass it (their own options come after these in ``--help``) and redefine ``output_dir``.
    """

    seed: int = option(0, "seed of every random draw (data order, augmentation, noise, masks)")
    num_workers: int = option(0, "data-loading worker processes")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    precision: Literal["auto", "bf16", "fp32"] = option("auto", "auto: bf16 autocast on GPUs, fp32 on CPUs")
    compile: bool = option(False, "torch.compile the model (GPUs)")
    output_dir: str = option("runs/run", "run folder: config, checkpoint, logs, exported weights")
    resume: bool = option(False, "continue the run in --output-dir from its last checkpoint")
    save_every: int = option(0, "also checkpoint every N optimizer steps (0: at the end of each epoch only)")
    log_every: int = option(20, "optimizer steps between log lines")
    stop_after: Optional[int] = option(None, "checkpoint and stop once this many optimizer steps are done (resume later)")
    progress: bool = option(True, "show a progress bar")

    def validate_run(self) -> None:
        """Fail early on a bad run option, naming the value."""
        if self.log_every < 1:
            raise ValueError(f"--log-every must be >= 1, got {self.log_every}")
        for name in ("save_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"--stop-after must be >= 1, got {self.stop_after}")


def launch(job: Callable[[torch.device, DistInfo], R], device: str) -> R:
    """Resolve the device, join torchrun's process group when launched by it, run ``job``, leave the group."""
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = init_distributed(dev)
    try:
        return job(dev, dist)
    finally:
        cleanup(dist)


def epoch_loader(ds: Dataset, batch_size: int, accum_iter: int, num_workers: int, seed: int, dist: DistInfo,
                 device: torch.device) -> tuple[ShardedEpochSampler, DataLoader, int]:
    """This rank's shard of every epoch, in a seeded order with seeded augmentation; also the optimizer
    steps per epoch (whole accumulation cycles only)."""
    sampler = ShardedEpochSampler(len(ds), batch_size, dist.rank, dist.world_size, seed, multiple_of=accum_iter)  # type: ignore[arg-type]
    loader = DataLoader(SeededDataset(ds, seed), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=device.type == "cuda", drop_last=True)
    return sampler, loader, sampler.batches_per_epoch // accum_iter


def wrap_for_training(model: nn.Module, compile: bool, dist: DistInfo, device: torch.device) -> nn.Module:
    """The module the training step calls: optionally compiled, wrapped in DDP when distributed."""
    wrapped: nn.Module = torch.compile(model) if compile else model  # type: ignore[assignment]
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    return wrapped


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision='bf16'``, or ``'auto'`` on a GPU; nothing otherwise (fp32 on CPUs)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and exits. A second
    Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
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
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, self.path)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step or None)
        except ImportError:  # tensorboard is a dependency; a broken install still trains
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("type", "step") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['type']}/{k}", v, record["step"])

    def rows(self, kind: str) -> list[dict[str, Any]]:
        """The records of one type written so far (rank 0)."""
        if not self.path.exists():
            return []
        rows = [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]
        return [r for r in rows if r.get("type") == kind]

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def check_run_folder(out: Path, resume: bool) -> Path:
    """The checkpoint path of a run folder; refuses to overwrite a run, or to resume a missing one."""
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it, or choose another --output-dir")
    if resume and not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    return ckpt_path


def check_resumable(saved: dict[str, Any], now: dict[str, Any], resumable: frozenset[str], path: Path) -> None:
    """Refuse a resume whose options (other than ``resumable`` ones) differ from the saved run's."""
    diff = {k: (saved.get(k), now[k]) for k in now if k not in resumable and saved.get(k) != now[k]}
    if diff:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume {path}: options differ from the saved run ({detail})")


@dataclass
class LoopResult:
    step: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, this rank's loss)
    stopped: bool = False


def run_loop(
    *,
    step: int,
    total_steps: int,
    steps_per_epoch: int,
    accum_iter: int,
    sampler: Any,
    loader: Any,
    scheduler: Any,
    train_step: Callable[[Iterator, int], torch.Tensor],
    on_epoch_end: Callable[[int], None],
    save: Callable[[int], None],
    log: RunLog,
    dist: DistInfo,
    device: torch.device,
    images_per_step: int,
    log_every: int,
    save_every: int = 0,
    stop_after: int | None = None,
    progress: bool = True,
    desc: str = "train",
) -> LoopResult:
    """Run optimizer steps ``step .. total_steps``; ``train_step(batches, step)`` returns the step's loss.

    ``on_epoch_end(step)`` evaluates and logs (it runs on every rank; gate rank-0 work inside it), and
    ``save(step)`` writes the checkpoint (likewise). Returns the step reached and this call's losses.
    """
    result = LoopResult(step)
    if stop_after is not None and step >= stop_after:
        if dist.is_main:
            print(f"already at step {step} >= --stop-after {stop_after}; nothing to do", flush=True)
        result.stopped = step < total_steps
        return result
    bar = None
    if dist.is_main and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, desc=desc)
    window: list[torch.Tensor] = []
    t_window = time.perf_counter()
    stop_agreed = False
    try:
        with StopFlag() as stop:
            while step < total_steps:
                epoch, step_in_epoch = divmod(step, steps_per_epoch)
                sampler.set_epoch(epoch, step_in_epoch * accum_iter)
                batches = iter(loader)
                for _ in range(step_in_epoch, steps_per_epoch):
                    scheduler.step_update(step)
                    window.append(train_step(batches, step))
                    step += 1
                    if bar is not None:
                        bar.update(1)
                    end_of_epoch = step % steps_per_epoch == 0
                    at_stop_after = stop_after is not None and step >= stop_after
                    if not dist.enabled:
                        stop_agreed = stop.set
                    if step % log_every == 0 or end_of_epoch or step == total_steps or at_stop_after or stop_agreed:
                        local = torch.stack(window)
                        mean_loss = all_reduce_mean(local.mean(), dist).item()
                        if not math.isfinite(mean_loss):
                            raise FloatingPointError(f"loss is {mean_loss} at step {step}; lower the learning rate or clip gradients")
                        result.losses += [(step - len(window) + i + 1, v) for i, v in enumerate(local.tolist())]
                        ips = len(window) * images_per_step / max(time.perf_counter() - t_window, 1e-9)
                        lr = scheduler.optimizer.param_groups[-1]["lr"]
                        log.write({"type": "train", "step": step, "epoch": step / steps_per_epoch, "loss": mean_loss,
                                   "lr": lr, "img_per_s": ips})
                        if bar is not None:
                            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                        window, t_window = [], time.perf_counter()
                        if dist.enabled:  # ranks agree on stopping only here, so all of them stop at the same step
                            stop_agreed = all_reduce_mean(torch.tensor(float(stop.set), device=device), dist).item() > 0
                    if end_of_epoch:
                        if bar is not None:
                            bar.clear()
                        on_epoch_end(step)
                        save(step)
                    elif save_every and step % save_every == 0:
                        save(step)
                    if stop_agreed or at_stop_after:
                        if not end_of_epoch:
                            save(step)
                        if dist.is_main:
                            why = "interrupted" if stop_agreed else f"--stop-after {stop_after}"
                            print(f"\nstopped at step {step}/{total_steps} ({why}); checkpoint saved, continue with --resume", flush=True)
                        result.step, result.stopped = step, True
                        return result
    finally:
        if bar is not None:
            bar.close()
    result.step = step
    return result
