"""Fine-tuning a DMAE encoder into the base classifier of a Gaussian-smoothed model, and linear probing.

``data -> mixup/cutmix -> noise (after mixing, so the model trains at exactly sigma) -> classifier -> loss``

- ``method='cr'``: consistency regularization over ``num_noise`` copies (the paper's main method);
  ``method='rs'``: cross-entropy on noisy inputs.
- a fixed ``sigma``, or ``sigma_range`` (per-sample U[a, b]: one model for many noise levels).
- fine-tuning: AdamW (0.9, 0.999), layer-wise lr decay, drop path, warmup + cosine to ``min_lr``,
  RandAugment / mixup / cutmix / label smoothing from timm, global-average-pooled features.
- linear probing: frozen encoder, cls-token feature, BatchNorm(affine=False) + Linear, LARS.

Every epoch the noisy accuracy (one noise draw per image at each evaluation sigma) is logged on a
held-out part of the *training* set, which selects the best checkpoint, and on the test split, which is
only reported. Runs resume exactly, like pretraining.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from dmae import checkpoint as ckpt
from dmae.config import option, save_config, to_dict
from dmae.corrupt import add_gaussian_noise, check_sigma, check_sigma_range, sample_sigma
from dmae.data import build_dataset, build_transform, dataset_info, num_classes_of
from dmae.distributed import DistInfo, barrier
from dmae.engine import RESUMABLE_OPTIONS, RunLog, RunOptions, autocast, check_resumable, check_run_folder, epoch_loader, launch, run_loop, wrap_for_training
from dmae.losses import ClassificationLoss, consistency_loss, default_mu, rs_loss
from dmae.models.classifier import ViTClassifier
from dmae.models.registry import get_preset
from dmae.pretrain import build_scheduler, noise_seed

VAL_SPLIT_SEED = 20230201  # the held-out part of the training set is the same for every run


@dataclass
class FinetuneConfig(RunOptions):
    """Every option of ``dmae finetune`` (``dmae linprobe`` shares them with other defaults)."""

    init: Optional[str] = option(None, "pretrained weights: a dmae run/export, or an official DMAE/MAE/fine-tuned checkpoint")
    model: Optional[str] = option(None, "model preset; needed without --init (random initialisation) or for ambiguous files")
    img_size: Optional[int] = option(None, "model input side (default: the checkpoint's)")
    data: Literal["fashion-mnist", "cifar10", "imagenet", "folder"] = option("fashion-mnist", "data set")
    data_root: Optional[str] = option(None, "data set directory (default: found automatically)")
    download: bool = option(False, "download the data set when it is missing (needs internet)")
    train_subset: Optional[int] = option(None, "train on only the first N images left after the held-out split")
    val_size: int = option(5000, "training images held out to select the best checkpoint (never the test set)")
    method: Literal["cr", "rs"] = option("cr", "cr: consistency regularization; rs: cross-entropy on noisy inputs")
    sigma: float = option(0.25, "noise std in [0, 1] pixel units")
    sigma_range: Optional[tuple[float, float]] = option(None, "draw sigma per sample from U[A, B] instead (overrides --sigma)")
    num_noise: int = option(2, "noise copies per image for consistency regularization (m)")
    cr_lambda: float = option(2.0, "weight of the KL consistency term")
    cr_mu: Optional[float] = option(None, "weight of the entropy term (default: 0.5 for sigma <= 0.5, 0.1 for sigma 1.0)")
    linprobe: bool = option(False, "linear probe: frozen encoder, cls token, BatchNorm + Linear head, LARS")
    epochs: int = option(100, "training epochs")
    warmup_epochs: float = option(5.0, "linear warmup length in epochs (set per iteration)")
    batch_size: int = option(64, "images per process per micro-step")
    accum_iter: int = option(1, "micro-steps accumulated per optimizer step")
    blr: float = option(5e-4, "base learning rate: lr = blr * effective_batch / 256")
    lr: Optional[float] = option(None, "absolute learning rate (overrides --blr)")
    min_lr: float = option(1e-6, "learning rate at the end of the cosine")
    weight_decay: float = option(0.05, "weight decay (none on biases, norms, cls token, positions)")
    layer_decay: float = option(0.65, "layer-wise lr decay: block i gets decay^(depth + 1 - (i + 1))")
    drop_path: float = option(0.1, "stochastic depth rate")
    label_smoothing: float = option(0.1, "label smoothing")
    mixup: float = option(0.0, "mixup alpha (0: off)")
    cutmix: float = option(0.0, "cutmix alpha (0: off)")
    randaug: Optional[str] = option(None, "RandAugment policy for ImageFolder data, e.g. rand-m9-mstd0.5-inc1")
    clip_grad: Optional[float] = option(None, "clip the gradient norm to this value")
    eval_sigmas: Optional[tuple[float, ...]] = option(None, "noise levels of the per-epoch accuracy (default: the training sigma)")
    eval_images: Optional[int] = option(None, "score at most N validation and N test images per epoch (default: all)")
    output_dir: str = option("runs/finetune", "run folder")

    @property
    def noise(self) -> float | tuple[float, float]:
        """The training noise: a fixed sigma or a (low, high) range."""
        return tuple(self.sigma_range) if self.sigma_range is not None else self.sigma  # type: ignore[return-value]

    @property
    def mu(self) -> float:
        return self.cr_mu if self.cr_mu is not None else default_mu(self.sigma_range[1] if self.sigma_range else self.sigma)

    @property
    def sigmas_to_eval(self) -> tuple[float, ...]:
        if self.eval_sigmas:
            return tuple(self.eval_sigmas)
        if self.sigma_range is not None:
            high = self.sigma_range[1]
            return tuple(round(high * k / 3, 4) for k in (1, 2, 3))
        return (self.sigma,)

    def validate(self) -> None:
        """Fail early with the offending value."""
        dataset_info(self.data)
        if self.model is not None:
            get_preset(self.model)
        if self.init is None and self.model is None:
            raise ValueError("give --init (pretrained weights) or --model (a preset, trained from random initialisation)")
        if self.init is not None and not Path(self.init).exists():
            raise FileNotFoundError(f"--init {self.init} does not exist")
        check_sigma(self.sigma)
        if self.sigma_range is not None:
            check_sigma_range(*self.sigma_range)
        elif self.sigma <= 0:
            raise ValueError(f"--sigma must be > 0 to train a smoothed classifier, got {self.sigma}")
        for s in self.eval_sigmas or ():
            check_sigma(s)
        self.validate_run()
        for name in ("epochs", "batch_size", "accum_iter", "num_noise"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_epochs", "weight_decay", "min_lr", "cr_lambda", "val_size",
                     "mixup", "cutmix", "label_smoothing"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.cr_mu is not None and self.cr_mu < 0:
            raise ValueError(f"--cr-mu must be >= 0, got {self.cr_mu}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"--warmup-epochs {self.warmup_epochs} exceeds --epochs {self.epochs}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"--drop-path must be in [0, 1), got {self.drop_path}")
        if self.method == "cr" and self.num_noise < 2:
            raise ValueError(f"consistency regularization needs --num-noise >= 2, got {self.num_noise}")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(f"mixup/cutmix need an even --batch-size, got {self.batch_size}")
        if self.blr <= 0 or (self.lr is not None and self.lr <= 0):
            raise ValueError(f"learning rate must be > 0, got blr={self.blr}, lr={self.lr}")
        if self.eval_images is not None and self.eval_images < 1:
            raise ValueError(f"--eval-images must be >= 1, got {self.eval_images}")


@dataclass
class LinprobeConfig(FinetuneConfig):
    """``dmae linprobe``: the paper's linear-probing recipe as defaults (LARS, blr 0.1, 90 epochs, 10 warmup)."""

    linprobe: bool = option(True, "linear probe: frozen encoder, cls token, BatchNorm + Linear head, LARS")
    method: Literal["cr", "rs"] = option("rs", "cr: consistency regularization; rs: cross-entropy on noisy inputs")
    epochs: int = option(90, "training epochs")
    warmup_epochs: float = option(10.0, "linear warmup length in epochs (set per iteration)")
    blr: float = option(0.1, "base learning rate: lr = blr * effective_batch / 256")
    min_lr: float = option(0.0, "learning rate at the end of the cosine")
    weight_decay: float = option(0.0, "LARS weight decay")
    drop_path: float = option(0.0, "stochastic depth rate (the encoder is frozen)")
    label_smoothing: float = option(0.0, "label smoothing")
    batch_size: int = option(256, "images per process per micro-step")
    output_dir: str = option("runs/linprobe", "run folder")


@dataclass
class FinetuneResult:
    """What a call of :func:`finetune` did."""

    output_dir: Path
    step: int
    total_steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)  # one per epoch run in this call
    best: dict[str, float] | None = None  # the evaluation of the selected checkpoint
    model: ViTClassifier | None = None

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps


# ----------------------------------------------------------------------------- pieces
def build_finetune_optimizer(model: ViTClassifier, lr: float, weight_decay: float, layer_decay: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.999) over timm's layer-decay groups: cls token / positions / patch embedding are layer 0,
    block i is layer i + 1, the rest (fc_norm, head) layer depth + 1; lr scale = decay^(depth + 1 - layer)."""
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=layer_decay)
    # every group starts at lr; the scheduler multiplies by the group's lr_scale whenever it sets the lr
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=on_cuda)


def build_linprobe_optimizer(model: ViTClassifier, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """LARS (momentum 0.9, trust 0.001) on the head only; the trust ratio adapts the weight matrix, not biases."""
    from timm.optim import Lars

    head = [p for n, p in model.named_parameters() if n.startswith("head") and p.requires_grad]
    mats = [p for p in head if p.ndim > 1]
    vecs = [p for p in head if p.ndim <= 1]
    groups = [{"params": mats, "weight_decay": weight_decay, "always_adapt": True},
              {"params": vecs, "weight_decay": 0.0, "always_adapt": False}]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=0.9, trust_coeff=0.001)


def freeze_encoder(model: ViTClassifier) -> None:
    """Linear probing: only the head (BatchNorm statistics and Linear) trains."""
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("head")


def noisy_copies(x: torch.Tensor, noise: float | tuple[float, float], m: int, generator: torch.Generator) -> torch.Tensor:
    """``m`` independently noised copies of an (already mixed) batch, copy-major: ``[m * B, C, H, W]``.

    With a noise range, each image draws one sigma shared by its copies.
    """
    sig = sample_sigma(x.shape[0], noise, generator, x.device)
    reps = x.repeat(m, *([1] * (x.ndim - 1)))
    if isinstance(sig, torch.Tensor):
        sig = sig.repeat(m)
    return add_gaussian_noise(reps, sig, generator)


class NoisyBatch(NamedTuple):
    """A training batch after mixing and noise: ``mixed [B, ...]``, ``target`` (indices [B] or soft [B, K]),
    ``noisy [m * B, ...]`` (copy-major)."""

    mixed: torch.Tensor
    target: torch.Tensor
    noisy: torch.Tensor


def corrupt_batch(x: torch.Tensor, y: torch.Tensor, noise: float | tuple[float, float], m: int,
                  generator: torch.Generator, mixup_fn: Any = None, seed: int = 0) -> NoisyBatch:
    """Mix (mixup/cutmix, if any) and *then* add noise, so the model trains at exactly sigma.

    (Noising first and mixing after would shrink the noise std to sigma * sqrt(l^2 + (1 - l)^2).)
    """
    target = y
    if mixup_fn is not None:
        np.random.seed(seed % 2**32)  # timm's mixup draws from numpy
        x, target = mixup_fn(x, y)
    return NoisyBatch(x, target, noisy_copies(x, noise, m, generator))


@torch.no_grad()
def noisy_accuracy(model: torch.nn.Module, data: Dataset, sigma: float, seed: int, batch_size: int = 256,
                   limit: int | None = None, precision: str = "auto") -> float:
    """Top-1 accuracy on ``x + eta`` (one draw per image, sigma 0 = clean), reproducible from ``seed``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    n = len(data) if limit is None else min(limit, len(data))  # type: ignore[arg-type]
    loader = DataLoader(Subset(data, range(n)), batch_size=batch_size, shuffle=False)
    correct = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            logits = model(add_gaussian_noise(x, sigma, gen))
        correct += int((logits.argmax(-1) == y).sum())
    model.train(was_training)
    return correct / max(n, 1)


def split_train_val(n: int, val_size: int) -> tuple[list[int], list[int]]:
    """A fixed split of training indices: (train, held-out validation)."""
    if val_size >= n:
        raise ValueError(f"--val-size {val_size} leaves no training images out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED)).tolist()
    return sorted(order[val_size:]), sorted(order[:val_size])


def _finetune_transform(info: Any, train: bool, img_size: int, randaug: str | None) -> Any:
    if train and randaug and info.size is None:
        from timm.data import create_transform

        return create_transform(img_size, is_training=True, auto_augment=randaug, interpolation="bicubic",
                                color_jitter=None, normalize=False)  # [0, 1]: normalization is the model's
    return build_transform(info, train, img_size, recipe="finetune")


# ----------------------------------------------------------------------------- the job
def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Run (or resume) fine-tuning or linear probing as ``cfg`` says. Works under torchrun."""
    cfg.validate()
    return launch(lambda device, dist: _finetune(cfg, device, dist), cfg.device)


def _finetune(cfg: FinetuneConfig, device: torch.device, dist: DistInfo) -> FinetuneResult:
    out = Path(cfg.output_dir)
    ckpt_path = check_run_folder(out, cfg.resume)
    info = dataset_info(cfg.data)
    pool = "token" if cfg.linprobe else "avg"

    # data: held-out validation from the training split, the test split only reported
    probe = build_dataset(cfg.data, "train", cfg.data_root, None, cfg.download)
    num_classes = num_classes_of(probe)
    train_idx, val_idx = split_train_val(len(probe), cfg.val_size)  # type: ignore[arg-type]
    del probe
    torch.manual_seed(cfg.seed)  # the fresh head (and a random init) is a function of the seed
    model, report = ckpt.load_classifier(cfg.init, num_classes, pool, 0.0 if cfg.linprobe else cfg.drop_path,
                                         cfg.model, cfg.img_size, (info.mean, info.std))
    img_size = model.config.encoder.img_size
    train_ds: Dataset = Subset(build_dataset(cfg.data, "train", cfg.data_root, _finetune_transform(info, True, img_size, cfg.randaug)), train_idx)
    if cfg.train_subset is not None:
        train_ds = Subset(train_ds, range(min(cfg.train_subset, len(train_ds))))
    eval_tf = build_transform(info, False, img_size)
    val_ds = Subset(build_dataset(cfg.data, "train", cfg.data_root, eval_tf), val_idx) if val_idx else None
    test_ds = build_dataset(cfg.data, info.splits[1], cfg.data_root, eval_tf)

    sampler, loader, steps_per_epoch = epoch_loader(train_ds, cfg.batch_size, cfg.accum_iter, cfg.num_workers, cfg.seed,
                                                    dist, device)
    total_steps = cfg.epochs * steps_per_epoch
    eff_batch = cfg.batch_size * cfg.accum_iter * dist.world_size
    lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256

    if cfg.linprobe:
        freeze_encoder(model)
    model.to(device)
    optimizer = (build_linprobe_optimizer(model, lr, cfg.weight_decay) if cfg.linprobe
                 else build_finetune_optimizer(model, lr, cfg.weight_decay, cfg.layer_decay))
    scheduler = build_scheduler(optimizer, total_steps, round(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr)

    step, best = 0, None
    if cfg.resume:
        state = ckpt.safe_load(ckpt_path)
        check_resumable(state.get("config", {}), to_dict(cfg), RESUMABLE_OPTIONS, ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best = int(state["step"]), state.get("best")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "classifier_config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    barrier(dist)

    raw_model = model
    train_model = wrap_for_training(model, cfg.compile, dist, device)

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                         num_classes=num_classes)
    m = cfg.num_noise if cfg.method == "cr" else 1
    log = RunLog(out, dist.is_main, step)
    result = FinetuneResult(out, step, total_steps, best=best)
    sigmas = cfg.sigmas_to_eval
    eval_precision = cfg.precision if device.type == "cuda" else "fp32"

    def evaluate(at: int) -> dict[str, float]:
        ev: dict[str, float] = {}
        for s in sigmas:
            if val_ds is not None:
                ev[f"val_acc@{s:g}"] = noisy_accuracy(raw_model, val_ds, s, cfg.seed + 1, limit=cfg.eval_images, precision=eval_precision)
            ev[f"test_acc@{s:g}"] = noisy_accuracy(raw_model, test_ds, s, cfg.seed + 2, limit=cfg.eval_images, precision=eval_precision)
        return ev

    def on_epoch_end(at: int) -> None:
        nonlocal best
        if not dist.is_main:
            return
        ev = evaluate(at)
        key = f"val_acc@{sigmas[0]:g}"
        improved = val_ds is not None and (best is None or ev[key] > best[key])  # never selected on the test set
        log.write({"type": "eval", "step": at, "epoch": at / steps_per_epoch, **ev})
        result.evals.append({"epoch": at / steps_per_epoch, **ev})
        if improved:
            best = {"epoch": at / steps_per_epoch, **ev}
            ckpt.save_export(raw_model, out / "model_best.safetensors", {"epoch": str(at // steps_per_epoch)})
        print(f"epoch {at // steps_per_epoch}/{cfg.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items())
              + (" (best so far)" if improved else ""), flush=True)

    def save(at: int) -> None:
        if dist.is_main:
            ckpt.atomic_save({"format": ckpt.FORMAT, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                              "step": at, "epoch": at // steps_per_epoch, "best": best, "config": to_dict(cfg),
                              "classifier_config": raw_model.config.to_dict()}, ckpt_path)
        barrier(dist)

    if dist.is_main:
        what = "linear probe" if cfg.linprobe else f"fine-tuning ({cfg.method}{f', m={m}' if m > 1 else ''})"
        noise = f"sigma~U{list(cfg.sigma_range)}" if cfg.sigma_range else f"sigma={cfg.sigma}"
        src = cfg.init or f"random init ({cfg.model})"
        print(f"{what} of {src} on {cfg.data} ({len(train_ds)} train / {len(val_idx)} held-out images, "
              f"{num_classes} classes), {noise}; {total_steps} steps of {eff_batch} images, lr {lr:.3g}; "
              f"{dist.world_size} process(es) on {device}", flush=True)
        if cfg.init and not cfg.resume:
            print(f"weights from {cfg.init}: {report.summary()}", flush=True)

    gen = torch.Generator(device=device)

    def train_step(batches: Iterator, at: int) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.accum_iter):
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            s = noise_seed(cfg.seed, at * cfg.accum_iter + micro, dist.rank)
            gen.manual_seed(s)
            torch.manual_seed(s)  # drop path draws from the global generator: make it a function of the step too
            _, target, noisy = corrupt_batch(x, y, cfg.noise, m, gen, mixup_fn, s)
            last = micro == cfg.accum_iter - 1
            with contextlib.nullcontext() if (not dist.enabled or last) else train_model.no_sync():
                with autocast(device, cfg.precision):
                    logits = train_model(noisy)
                logits = logits.float().view(m, y.shape[0], -1)
                parts: ClassificationLoss = (consistency_loss(logits, target, cfg.cr_lambda, cfg.mu, cfg.label_smoothing)
                                             if cfg.method == "cr" else rs_loss(logits, target, cfg.label_smoothing))
                (parts.total / cfg.accum_iter).backward()
            loss_sum += parts.total.detach()
        if cfg.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_([p for p in raw_model.parameters() if p.requires_grad], cfg.clip_grad)
        optimizer.step()
        return loss_sum / cfg.accum_iter

    raw_model.train()
    loop = run_loop(step=step, total_steps=total_steps, steps_per_epoch=steps_per_epoch, accum_iter=cfg.accum_iter,
                    sampler=sampler, loader=loader, scheduler=scheduler, train_step=train_step,
                    on_epoch_end=on_epoch_end, save=save, log=log, dist=dist, device=device,
                    images_per_step=eff_batch, log_every=cfg.log_every, save_every=cfg.save_every,
                    stop_after=cfg.stop_after, progress=cfg.progress, desc="linprobe" if cfg.linprobe else "finetune")
    result.step, result.losses, result.model, result.best = loop.step, loop.losses, raw_model, best
    if not loop.stopped and dist.is_main:
        ckpt.save_export(raw_model, out / "model_last.safetensors")
        if best is not None:
            print(f"done: best epoch {best['epoch']:.0f} -> {out / 'model_best.safetensors'}; "
                  f"last -> {out / 'model_last.safetensors'}", flush=True)
    log.close()
    return result


__all__ = ["FinetuneConfig", "LinprobeConfig", "FinetuneResult", "NoisyBatch", "corrupt_batch", "finetune",
           "noisy_accuracy", "noisy_copies",
           "build_finetune_optimizer", "build_linprobe_optimizer", "freeze_encoder", "split_train_val"]
