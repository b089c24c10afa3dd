"""DMAE pretraining: ``data -> corrupt (noise, mask) -> model -> loss``, with the paper's recipe.

AdamW (0.9, 0.95), no weight decay on biases, norms, tokens and positions; lr = blr * effective_batch / 256;
per-iteration linear warmup then half-cycle cosine; gradient accumulation; bf16 autocast on GPUs, fp32 on
CPUs; DDP under torchrun. Every random draw comes from a generator seeded by (seed, step, rank) or
(seed, epoch, image), so a run resumed from its atomic checkpoint continues with exactly the losses it
would have had uninterrupted.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch.utils.data import Dataset, Subset

from dmae import checkpoint as ckpt
from dmae.config import option, save_config, to_dict
from dmae.corrupt import add_gaussian_noise, check_mask_ratio, check_sigma, random_masking
from dmae.data import DatasetInfo, build_dataset, build_transform, dataset_info
from dmae.distributed import DistInfo, barrier
from dmae.engine import RESUMABLE_OPTIONS, RunLog, RunOptions, autocast, check_resumable, check_run_folder, epoch_loader, launch, run_loop, wrap_for_training
from dmae.losses import reconstruction_loss
from dmae.models.dmae import DenoisingMaskedAutoencoder, DMAEConfig
from dmae.models.registry import get_preset, model_config

# Parameters that get no weight decay besides 1-D ones (biases, norms); positions are fixed anyway.
NO_WEIGHT_DECAY = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")


@dataclass
class PretrainConfig(RunOptions):
    """Every option of ``dmae pretrain``."""

    model: str = option("dmae_vit_micro_patch4_dec64d2b", "model preset (list them with `dmae models`)")
    img_size: Optional[int] = option(None, "model input side; default: the preset's (small presets: the data's native size)")
    data: Literal["fashion-mnist", "cifar10", "imagenet", "folder"] = option("fashion-mnist", "data set")
    data_root: Optional[str] = option(None, "data set directory (default: found automatically, see README)")
    download: bool = option(False, "download the data set when it is missing (needs internet)")
    train_subset: Optional[int] = option(None, "use only the first N training images")
    sigma: float = option(0.25, "std of the Gaussian noise in [0, 1] pixel units; 0 with --loss masked is plain MAE")
    mask_ratio: float = option(0.75, "fraction of patches removed, in [0, 1)")
    loss: Literal["all", "masked"] = option("all", "patches the loss scores: all (DMAE) or masked only (MAE)")
    norm_pix_loss: bool = option(True, "normalize each target patch by its own mean and variance")
    epochs: int = option(10, "training epochs")
    warmup_epochs: float = option(1.0, "linear warmup length in epochs (set per iteration)")
    batch_size: int = option(64, "images per process per micro-step")
    accum_iter: int = option(1, "micro-steps accumulated per optimizer step")
    blr: float = option(1.5e-4, "base learning rate: lr = blr * effective_batch / 256")
    lr: Optional[float] = option(None, "absolute learning rate (overrides --blr)")
    min_lr: float = option(0.0, "learning rate at the end of the cosine")
    weight_decay: float = option(0.05, "AdamW weight decay (none on biases, norms, tokens, positions)")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas")
    clip_grad: Optional[float] = option(None, "clip the gradient norm to this value")
    init: Optional[str] = option(None, "start from these weights (a dmae checkpoint/export, or an official DMAE/MAE one)")
    output_dir: str = option("runs/pretrain", "run folder: config, checkpoint, logs, exported weights")
    eval_images: int = option(256, "held-out images scored for reconstruction after every epoch")

    def validate(self) -> None:
        """Fail early with the offending value."""
        get_preset(self.model)
        dataset_info(self.data)
        check_sigma(self.sigma)
        check_mask_ratio(self.mask_ratio)
        self.validate_run()
        for name in ("epochs", "batch_size", "accum_iter", "eval_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_epochs", "weight_decay", "min_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"--warmup-epochs {self.warmup_epochs} exceeds --epochs {self.epochs}")
        if self.blr <= 0 or (self.lr is not None and self.lr <= 0):
            raise ValueError(f"learning rate must be > 0, got blr={self.blr}, lr={self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"--betas must be in [0, 1), got {self.betas}")
        if self.train_subset is not None and self.train_subset < 1:
            raise ValueError(f"--train-subset must be >= 1, got {self.train_subset}")


@dataclass
class PretrainResult:
    """What a call of :func:`pretrain` did."""

    output_dir: Path
    step: int  # optimizer steps done in total
    total_steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, this rank's loss) of this call
    eval_start: dict[str, float] | None = None
    eval_end: dict[str, float] | None = None
    model: DenoisingMaskedAutoencoder | None = None  # the trained model (this rank's copy)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps


def resolve_model_config(cfg: PretrainConfig, info: DatasetInfo) -> DMAEConfig:
    """The preset's architecture, fitted to the data: small presets take the data's size, channels and
    statistics; larger ones take the data's statistics when the channel counts agree."""
    preset = get_preset(cfg.model)
    over: dict[str, Any] = {}
    if preset.native_input:
        over["in_chans"] = info.channels
        if info.size is not None:
            over["img_size"] = info.size
    if over.get("in_chans", preset.kwargs.get("in_chans", 3)) == info.channels:
        over["mean"], over["std"] = info.mean, info.std
    if cfg.img_size is not None:
        over["img_size"] = cfg.img_size
    return model_config(cfg.model, **over)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: none on biases, norms, tokens and positions (timm's groups)."""
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=on_cuda)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float) -> Any:
    """Per-iteration schedule: linear warmup from 0 over ``warmup_steps``, then half-cycle cosine to ``min_lr``
    at ``total_steps``. Call ``step_update(step)`` before each optimizer step."""
    import logging

    from timm.scheduler import CosineLRScheduler

    # timm warns that a one-step cosine has no effect; with all-warmup runs that is expected
    logging.getLogger("timm.scheduler.cosine_lr").setLevel(logging.ERROR)
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=min_lr,
                             warmup_t=warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


def noise_seed(seed: int, micro_step: int, rank: int) -> int:
    """Seed of the noise and mask of one micro-batch on one rank."""
    return (seed * 1_000_003 + micro_step * 65_537 + rank * 8_191 + 17) % (2**63 - 1)


@torch.no_grad()
def evaluate_reconstruction(
    model: DenoisingMaskedAutoencoder,
    images: torch.Tensor,
    sigma: float,
    mask_ratio: float,
    norm_pix_loss: bool,
    loss_on: str,
    seed: int,
    precision: str = "fp32",
    batch_size: int = 256,
) -> dict[str, float]:
    """Score reconstructions of fixed held-out images under fixed noise and masks.

    Returns ``loss`` (the training objective), ``noisy_mse`` (MSE of the noisy input to the clean image, in
    [0, 1] pixel space, about sigma^2) and, for models without ``norm_pix_loss``, ``mse``: the pixel-space MSE
    of the reconstruction to the clean image over all patches.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    tot = {"loss": 0.0, "mse": 0.0, "noisy_mse": 0.0}
    n_seen = 0
    for i in range(0, len(images), batch_size):
        x = images[i: i + batch_size].to(device)
        x_noisy = add_gaussian_noise(x, sigma, gen)
        masking = random_masking(x.shape[0], model.num_patches, mask_ratio, gen, device)
        with autocast(device, precision):
            pred = model(x_noisy, masking)
        pred = pred.float()
        loss = reconstruction_loss(pred, model.target(x), masking.mask, norm_pix_loss, loss_on)
        clean = model.preprocess.resize(x)
        tot["loss"] += loss.item() * x.shape[0]
        tot["noisy_mse"] += (x_noisy - x).pow(2).mean().item() * x.shape[0]
        if not norm_pix_loss:
            tot["mse"] += (model.to_pixels(pred) - clean).pow(2).mean().item() * x.shape[0]
        n_seen += x.shape[0]
    model.train(was_training)
    out = {k: v / n_seen for k, v in tot.items()}
    if norm_pix_loss:
        del out["mse"]
    return out


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Run (or resume) DMAE pretraining as ``cfg`` says; returns what was done. Works under torchrun."""
    cfg.validate()
    return launch(lambda device, dist: _pretrain(cfg, device, dist), cfg.device)


def _pretrain(cfg: PretrainConfig, device: torch.device, dist: DistInfo) -> PretrainResult:
    out = Path(cfg.output_dir)
    ckpt_path = check_run_folder(out, cfg.resume)
    info = dataset_info(cfg.data)
    mcfg = resolve_model_config(cfg, info)
    train_ds: Dataset = build_dataset(cfg.data, "train", cfg.data_root, build_transform(info, True, mcfg.img_size), cfg.download)
    if cfg.train_subset is not None:
        train_ds = Subset(train_ds, range(min(cfg.train_subset, len(train_ds))))  # type: ignore[arg-type]
    sampler, loader, steps_per_epoch = epoch_loader(train_ds, cfg.batch_size, cfg.accum_iter, cfg.num_workers, cfg.seed,
                                                    dist, device)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    eff_batch = cfg.batch_size * cfg.accum_iter * dist.world_size
    lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256

    torch.manual_seed(cfg.seed)  # the initial weights are a function of the seed (identical on every rank)
    model = DenoisingMaskedAutoencoder(mcfg)
    init_report = None
    if cfg.init and not cfg.resume:
        sd, _ = ckpt.read_weights(cfg.init)
        init_report = ckpt.load_state_dict(model, sd, cfg.init, allow_missing=ckpt.DECODER_PREFIXES,
                                           allow_unexpected=ckpt.CLASSIFIER_PREFIXES)
    model.to(device)
    optimizer = build_optimizer(model, lr, cfg.weight_decay, cfg.betas)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps, cfg.min_lr)

    step = 0
    if cfg.resume:
        state = ckpt.safe_load(ckpt_path)
        check_resumable(state.get("config", {}), to_dict(cfg), RESUMABLE_OPTIONS, ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "model_config.json").write_text(json.dumps(mcfg.to_dict(), indent=2))
    barrier(dist)

    raw_model = model
    train_model = wrap_for_training(model, cfg.compile, dist, device)

    log = RunLog(out, dist.is_main, step)
    result = PretrainResult(out, step, total_steps)
    eval_images = None
    if dist.is_main:
        eval_ds = build_dataset(cfg.data, info.splits[1], cfg.data_root, build_transform(info, False, mcfg.img_size), cfg.download)
        k = min(cfg.eval_images, len(eval_ds))  # type: ignore[arg-type]
        eval_images = torch.stack([eval_ds[i][0] for i in range(k)])

    def run_eval() -> dict[str, float]:
        assert eval_images is not None
        return evaluate_reconstruction(raw_model, eval_images, cfg.sigma, cfg.mask_ratio, cfg.norm_pix_loss, cfg.loss,
                                       seed=cfg.seed + 12345, precision=cfg.precision if device.type == "cuda" else "fp32")

    def on_epoch_end(at: int) -> None:
        if dist.is_main:
            ev = run_eval()
            log.write({"type": "eval", "step": at, "epoch": at / steps_per_epoch, **ev})
            result.eval_end = ev
            print(f"epoch {at // steps_per_epoch}/{cfg.epochs}: eval " + _fmt(ev), flush=True)

    def save(at: int) -> None:
        if dist.is_main:
            ckpt.atomic_save({"format": ckpt.FORMAT, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                              "step": at, "epoch": at // steps_per_epoch, "config": to_dict(cfg),
                              "model_config": mcfg.to_dict()}, ckpt_path)
        barrier(dist)

    if dist.is_main:
        print(f"pretraining {cfg.model} ({raw_model.num_params('encoder') / 1e6:.2f}M encoder params, input "
              f"{mcfg.in_chans}x{mcfg.img_size}x{mcfg.img_size}) on {cfg.data} ({len(train_ds)} images), "  # type: ignore[arg-type]
              f"{dist.world_size} process(es) on {device}; sigma={cfg.sigma} loss={cfg.loss} mask={cfg.mask_ratio}; "
              f"{total_steps} steps of {eff_batch} images, lr {lr:.3g}", flush=True)
        if init_report is not None:
            print(f"initialised from {cfg.init}: {init_report.summary()}", flush=True)
        if step == 0:
            result.eval_start = run_eval()
            log.write({"type": "eval", "step": 0, "epoch": 0.0, **result.eval_start})
            print("eval before training: " + _fmt(result.eval_start), flush=True)

    gen = torch.Generator(device=device)
    num_patches = raw_model.num_patches

    def train_step(batches: Iterator, at: int) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.accum_iter):
            x, _ = next(batches)
            x = x.to(device, non_blocking=True)
            gen.manual_seed(noise_seed(cfg.seed, at * cfg.accum_iter + micro, dist.rank))
            x_noisy = add_gaussian_noise(x, cfg.sigma, gen)
            masking = random_masking(x.shape[0], num_patches, cfg.mask_ratio, gen, device)
            # sync gradients only on the last micro-step
            last = micro == cfg.accum_iter - 1
            with contextlib.nullcontext() if (not dist.enabled or last) else train_model.no_sync():
                with autocast(device, cfg.precision):
                    pred = train_model(x_noisy, masking)
                loss = reconstruction_loss(pred, raw_model.target(x), masking.mask, cfg.norm_pix_loss, cfg.loss)
                (loss / cfg.accum_iter).backward()
            loss_sum += loss.detach()
        if cfg.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.clip_grad)
        optimizer.step()
        return loss_sum / cfg.accum_iter

    raw_model.train()
    loop = run_loop(step=step, total_steps=total_steps, steps_per_epoch=steps_per_epoch, accum_iter=cfg.accum_iter,
                    sampler=sampler, loader=loader, scheduler=scheduler, train_step=train_step,
                    on_epoch_end=on_epoch_end, save=save, log=log, dist=dist, device=device,
                    images_per_step=eff_batch, log_every=cfg.log_every, save_every=cfg.save_every,
                    stop_after=cfg.stop_after, progress=cfg.progress, desc="pretrain")
    result.step, result.losses, result.model = loop.step, loop.losses, raw_model
    if not loop.stopped and dist.is_main:
        ckpt.save_export(raw_model, out / "model.safetensors", {"sigma": str(cfg.sigma), "loss": cfg.loss})
        print(f"done: {out / 'checkpoint.pt'} (resumable) and {out / 'model.safetensors'} (weights + config)", flush=True)
    log.close()
    return result


def _fmt(ev: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.5f}" for k, v in ev.items())


__all__ = ["PretrainConfig", "PretrainResult", "build_optimizer", "build_scheduler", "evaluate_reconstruction", "pretrain",
           "resolve_model_config"]
