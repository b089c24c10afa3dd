"""Fine-tuning a DMAE encoder into the base classifier of a Gaussian-smoothed model, and linear probing.

``data -> mixup/cutmix -> noise (after mixing, so the model trains at exactly sigma) -> classifier -> loss``

- ``method='cr'``: consistency regularization over ``num_noise`` copies (Jeong & Shin, NeurIPS 2020; the
  DMAE paper's main method, Wu et al., ICLR 2023, Sec. 3.2); ``method='rs'``: cross-entropy on noisy inputs
  (Gaussian data augmentation, Cohen et al., ICML 2019).
- a fixed ``sigma``, or ``sigma_range`` (per-sample U[a, b]: one model for many noise levels, Table 10).
- fine-tuning (MAE's ``main_finetune`` recipe): AdamW (0.9, 0.999), layer-wise lr decay, drop path, warmup +
  cosine to ``min_lr``, RandAugment / mixup / cutmix / label smoothing from timm, global-average-pooled features.
- linear probing (MAE's ``main_linprobe``): frozen encoder, cls-token feature, BatchNorm(affine=False) +
  Linear, LARS (You et al., 2017).

Every epoch the noisy accuracy (one noise draw per image at each evaluation sigma) is logged on a
held-out part of the *training* set, which selects the best checkpoint, and on the test split, which is
only reported. The job plugs into :mod:`dmae.training.engine`, so runs resume exactly, like pretraining.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from dmae import checkpoint as ckpt
from dmae.config import default, option
from dmae.corrupt import add_gaussian_noise, check_sigma, check_sigma_range, corrupt_batch
from dmae.data import DatasetInfo, build_dataset, build_transform, dataset_info, dataset_size, num_classes_of
from dmae.datasets import UserData
from dmae.errors import InputError, MissingFileError
from dmae.models.classifier import Pool, ViTClassifier
from dmae.models.registry import get_preset
from dmae.runtime import autocast
from dmae.training.engine import Adaptation, Built, TrainingJob, TrainOptions, TrainResult, train
from dmae.training.losses import consistency_loss, default_mu, rs_loss

VAL_SPLIT_SEED = 20230201  # the held-out part of the training set is the same for every run
# A default --val-size holds out this share of the training set, at most the default (5000): ImageNet's 5000 of
# 1.28M is 0.4%, but 5000 of a 2000-image folder is everything.
VAL_FRACTION = 0.1
FINETUNE_REFERENCE_BATCH = 1024  # the effective batch of the paper's fine-tuning recipe, which its blr is for


@dataclass
class FinetuneConfig(TrainOptions):
    """Every option of ``dmae finetune`` (``dmae linprobe`` shares them with other defaults)."""

    output_dir: str = default("runs/finetune")
    train_subset: int | None = default(None, "train on only the first N images left after the held-out split")
    epochs: int = default(100)
    warmup_epochs: float = default(5.0)
    blr: float = default(5e-4)
    min_lr: float = default(1e-6)
    init: str | None = default(
        None, "pretrained weights: a dmae run folder or export, or an official DMAE/MAE/fine-tuned checkpoint"
    )
    model: str | None = option(
        None, "model preset; needed without --init (random initialisation) or for ambiguous files", check=get_preset
    )
    img_size: int | None = option(None, "model input side (default: the checkpoint's)", low=1)
    val_size: int = option(5000, "training images held out to select the best checkpoint (never the test set)", low=0)
    method: Literal["cr", "rs"] = option("cr", "cr: consistency regularization; rs: cross-entropy on noisy inputs")
    sigma: float = option(0.25, "noise std in [0, 1] pixel units", check=check_sigma)
    sigma_range: tuple[float, float] | None = option(
        None, "draw sigma per sample from U[A, B] instead (overrides --sigma)", check=lambda r: check_sigma_range(*r)
    )
    num_noise: int = option(2, "noise copies per image for consistency regularization (m)", low=1)
    cr_lambda: float = option(2.0, "weight of the KL consistency term", low=0)
    cr_mu: float | None = option(
        None, "weight of the entropy term (default: 0.5 for sigma <= 0.5, 0.1 for sigma 1.0)", low=0
    )
    linprobe: bool = option(False, "linear probe: frozen encoder, cls token, BatchNorm + Linear head, LARS")
    layer_decay: float = option(
        0.65, "layer-wise lr decay: block i gets decay^(depth + 1 - (i + 1))", low=0, low_open=True, high=1
    )
    drop_path: float = option(0.1, "stochastic depth rate", low=0, high=1, high_open=True)
    label_smoothing: float = option(0.1, "label smoothing", low=0, high=1, high_open=True)
    mixup: float = option(0.0, "mixup alpha (0: off)", low=0)
    cutmix: float = option(0.0, "cutmix alpha (0: off)", low=0)
    randaug: str | None = option(None, "RandAugment policy for ImageFolder data, e.g. rand-m9-mstd0.5-inc1")
    eval_sigmas: tuple[float, ...] | None = option(
        None,
        "noise levels of the per-epoch accuracy (default: the training sigma)",
        check=lambda s: [check_sigma(v) for v in s],
    )
    eval_images: int | None = option(
        None, "score at most N validation and N test images per epoch (default: all)", low=1
    )

    @property
    def noise(self) -> float | tuple[float, float]:
        """The training noise: a fixed sigma or a (low, high) range."""
        if self.sigma_range is None:
            return self.sigma
        low, high = self.sigma_range  # a list when read from a file
        return (low, high)

    @property
    def mu(self) -> float:
        """The entropy weight: ``--cr-mu``, else the paper's for the (largest) training sigma."""
        return (
            self.cr_mu
            if self.cr_mu is not None
            else default_mu(self.sigma_range[1] if self.sigma_range else self.sigma)
        )

    @property
    def sigmas_to_eval(self) -> tuple[float, ...]:
        """Noise levels of the per-epoch accuracy: ``--eval-sigmas``, the training sigma, or B/3, 2B/3, B of a range."""
        if self.eval_sigmas:
            return tuple(self.eval_sigmas)
        if self.sigma_range is not None:
            high = self.sigma_range[1]
            return tuple(round(high * k / 3, 4) for k in (1, 2, 3))
        return (self.sigma,)

    def check_combination(self) -> None:
        super().check_combination()
        if self.init is None and self.model is None:
            raise InputError(
                "give --init (pretrained weights) or --model (a preset, trained from random initialisation)"
            )
        if self.init is not None and not Path(self.init).exists():
            raise MissingFileError(f"--init {self.init} does not exist")
        if self.sigma_range is None and self.sigma <= 0:
            raise InputError(f"--sigma must be > 0 to train a smoothed classifier, got {self.sigma}")
        if self.method == "cr" and self.num_noise < 2:
            raise InputError(f"consistency regularization needs --num-noise >= 2, got {self.num_noise}")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise InputError(f"mixup/cutmix need an even --batch-size, got {self.batch_size}")


@dataclass
class LinprobeConfig(FinetuneConfig):
    """``dmae linprobe``: the paper's linear-probing recipe as defaults (LARS, blr 0.1, 90 epochs, 10 warmup)."""

    output_dir: str = default("runs/linprobe")
    linprobe: bool = default(True)
    method: Literal["cr", "rs"] = default("rs")
    epochs: int = default(90)
    warmup_epochs: float = default(10.0)
    blr: float = default(0.1)
    min_lr: float = default(0.0)
    weight_decay: float = default(0.0, "LARS weight decay")
    drop_path: float = default(0.0, "stochastic depth rate (the encoder is frozen)")
    label_smoothing: float = default(0.0)
    batch_size: int = default(256)


# ----------------------------------------------------------------------------- pieces
def build_finetune_optimizer(
    model: ViTClassifier, lr: float, weight_decay: float, layer_decay: float
) -> torch.optim.AdamW:
    """AdamW (0.9, 0.999) over timm's layer-decay groups (BEiT / MAE's ``param_groups_lrd``): cls token /
    positions / patch embedding are layer 0, block i is layer i + 1, the rest (fc_norm, head) layer depth + 1;
    lr scale = decay^(depth + 1 - layer)."""
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(
        model, weight_decay, no_weight_decay_list=model.no_weight_decay(), layer_decay=layer_decay
    )
    # every group starts at lr; the scheduler multiplies by the group's lr_scale whenever it sets the lr
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=on_cuda)


def build_linprobe_optimizer(model: ViTClassifier, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """LARS (momentum 0.9, trust 0.001; timm's) on the head only; the trust ratio adapts the weight matrix,
    not biases (MAE's linear-probing recipe)."""
    from timm.optim import Lars

    head = [p for n, p in model.named_parameters() if n.startswith("head") and p.requires_grad]
    mats = [p for p in head if p.ndim > 1]
    vecs = [p for p in head if p.ndim <= 1]
    groups = [
        {"params": mats, "weight_decay": weight_decay, "always_adapt": True},
        {"params": vecs, "weight_decay": 0.0, "always_adapt": False},
    ]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=0.9, trust_coeff=0.001)


def freeze_encoder(model: ViTClassifier) -> None:
    """Linear probing: only the head (BatchNorm statistics and Linear) trains."""
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("head")


@torch.no_grad()
def noisy_accuracy(
    model: nn.Module,
    data: Dataset,
    sigma: float,
    seed: int,
    batch_size: int = 256,
    limit: int | None = None,
    precision: str = "auto",
) -> float:
    """Top-1 accuracy of ``model`` on ``x + eta`` (one draw per image, sigma 0 = clean), reproducible from ``seed``;
    an image whose logits are not finite counts as misclassified.

    ``data`` yields ``([C, H, W] in [0, 1], label)``; at most ``limit`` images are scored. Returns a fraction.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    n = dataset_size(data) if limit is None else min(limit, dataset_size(data))
    loader = DataLoader(Subset(data, range(n)), batch_size=batch_size, shuffle=False)
    correct = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            logits = model(add_gaussian_noise(x, sigma, gen))
        # NaN / infinite logits are no prediction (argmax would call them class 0): they count as wrong
        pred = torch.where(torch.isfinite(logits).all(dim=-1), logits.argmax(-1), -1)
        correct += int((pred == y).sum())
    model.train(was_training)
    return correct / max(n, 1)


def near_chance(accuracy: float, num_classes: int, n: int) -> tuple[bool, float]:
    """Whether an accuracy (a fraction, measured on ``n`` images) is near chance ``1/C``; also the threshold.

    Near chance means below ``1/C + margin`` with ``margin = max(min(1/C, 0.1), 3 sqrt(p (1 - p) / n))``, ``p = 1/C``:
    at most twice chance (chance + 10 points for C < 10, where twice chance would be most of the scale), and never
    within three binomial standard errors of chance, which a guessing classifier reaches on a small held-out set.
    Ten classes: below 20%; two: below 60% (on >= 225 images); 1000: below 0.2% (plus the noise of n).
    """
    p = 1.0 / max(num_classes, 1)
    margin = max(min(p, 0.1), 3.0 * (p * (1 - p) / max(n, 1)) ** 0.5)
    return accuracy < p + margin, p + margin


def adapt_val_size(cfg: FinetuneConfig, n_images: int) -> list[Adaptation]:
    """A default ``--val-size`` fitted to a training set of ``n_images``: :data:`VAL_FRACTION` of it, at most the
    default; changes ``cfg`` in place. A given one is kept (:func:`split_train_val` refuses one that leaves no
    training image).

    Returns:
        The adaptation made, if any.
    """
    want = min(cfg.val_size, int(VAL_FRACTION * n_images))
    if cfg.given("val_size") or want == cfg.val_size:
        return []
    change = Adaptation(
        "val_size", cfg.val_size, want, f"{VAL_FRACTION:.0%} of the {n_images} training images, at most {cfg.val_size}"
    )
    cfg.val_size = want
    return [change]


def split_train_val(n: int, val_size: int) -> tuple[list[int], list[int]]:
    """A fixed split of ``n`` training indices: (train, held-out validation of ``val_size``).

    Raises:
        ValueError: ``val_size`` leaves no training image.
    """
    if val_size >= n:
        raise InputError(
            f"--val-size {val_size} leaves no training images out of {n}; give a smaller --val-size "
            f"(or leave it out: the default holds out {VAL_FRACTION:.0%})"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED)).tolist()
    return sorted(order[val_size:]), sorted(order[:val_size])


def _finetune_transform(info: DatasetInfo, train: bool, img_size: int, randaug: str | None) -> Any:
    if train and randaug and info.size is None:
        from timm.data import create_transform

        return create_transform(
            img_size,
            is_training=True,
            auto_augment=randaug,
            interpolation="bicubic",
            # timm's annotation leaves out None, which its code reads as "no colour jitter"
            color_jitter=None,  # type: ignore[arg-type]
            normalize=False,
        )  # [0, 1]: normalization is the model's
    return build_transform(info, train, img_size, recipe="finetune")


# ----------------------------------------------------------------------------- the job
class FinetuneJob(TrainingJob):
    """Fine-tuning / linear probing plugged into the engine: classifier, noisy copies, CR or RS loss, selection."""

    model: ViTClassifier  # set by the engine to what build() returned

    def __init__(self, cfg: FinetuneConfig, data: UserData | None = None) -> None:
        super().__init__(cfg)
        self.cfg: FinetuneConfig = self.cfg  # the engine's copy
        self.name = "linprobe" if cfg.linprobe else "finetune"
        # linear probing's LARS takes its lr per layer from the trust ratio: its blr is left as given
        self.reference_batch = None if cfg.linprobe else FINETUNE_REFERENCE_BATCH
        self.user = data
        if data is not None:  # the caller's own images: the run's config says so, and resuming checks them
            self.cfg.data = data.info.name
        # a grey ImageFolder says 1 channel; the caller's own set says what describe() found
        self.info = data.info if data is not None else dataset_info(cfg.data, cfg.data_root)
        self.m = cfg.num_noise if cfg.method == "cr" else 1
        self.mixup_fn: Any = None
        self.last_evals: list[dict[str, float]] = []  # this call's evaluations (rank 0)

    def build(self) -> Built:
        cfg, info = self.cfg, self.info
        probe = (
            self.user.train
            if self.user is not None
            else build_dataset(cfg.data, "train", cfg.data_root, None, cfg.download)
        )
        if self.user is not None:
            assert info.num_classes is not None  # user_data() refuses a set without a class count
            self.num_classes = info.num_classes
        else:
            self.num_classes = num_classes_of(probe)
        self.adapted += adapt_val_size(cfg, dataset_size(probe))
        train_idx, val_idx = split_train_val(dataset_size(probe), cfg.val_size)
        pool: Pool = "token" if cfg.linprobe else "avg"
        model, self.init_report = ckpt.load_classifier(
            cfg.init, self.num_classes, pool, 0.0 if cfg.linprobe else cfg.drop_path, cfg.model, cfg.img_size, data=info
        )
        train_set, val_set, self.test_ds = self._splits(model)
        train_ds: Dataset = Subset(train_set, train_idx)
        if cfg.train_subset is not None:
            train_ds = Subset(train_ds, range(min(cfg.train_subset, dataset_size(train_ds))))
        self.val_ds = Subset(val_set, val_idx) if val_idx else None
        self.sizes = (dataset_size(train_ds), len(val_idx))
        if cfg.linprobe:
            freeze_encoder(model)
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup

            self.mixup_fn = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                label_smoothing=cfg.label_smoothing,
                num_classes=self.num_classes,
            )
        return Built(model, train_ds)

    def _splits(self, model: ViTClassifier) -> tuple[Dataset, Dataset, Dataset | None]:
        """The training set with the training transform, the same images with the evaluation transform (the
        held-out ones are taken from it), and the test set (None: the caller gave none). The caller's own data
        sets are taken as they are: their own transform is theirs to choose."""
        if self.user is not None:
            return self.user.train, self.user.train, self.user.test
        cfg, info = self.cfg, self.info
        img_size, chans = model.config.encoder.img_size, model.config.encoder.in_chans
        train_tf = _finetune_transform(info, True, img_size, cfg.randaug)
        eval_tf = build_transform(info, False, img_size)
        return (
            build_dataset(cfg.data, "train", cfg.data_root, train_tf, channels=chans),
            build_dataset(cfg.data, "train", cfg.data_root, eval_tf, channels=chans),
            build_dataset(cfg.data, info.splits[1], cfg.data_root, eval_tf, channels=chans),
        )

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        cfg = self.cfg
        assert isinstance(model, ViTClassifier)  # the engine passes the model build() returned
        if cfg.linprobe:
            return build_linprobe_optimizer(model, lr, cfg.weight_decay)
        return build_finetune_optimizer(model, lr, cfg.weight_decay, cfg.layer_decay)

    def forward_loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, seed: int
    ) -> torch.Tensor:
        cfg = self.cfg
        target, noisy = corrupt_batch(x, y, cfg.noise, self.m, gen, self.mixup_fn, seed)
        with self.autocast():
            logits = model(noisy)
        logits = logits.float().view(self.m, y.shape[0], -1)  # [m, B, K], copy-major
        if cfg.method == "cr":
            return consistency_loss(logits, target, cfg.cr_lambda, cfg.mu, cfg.label_smoothing).total
        return rs_loss(logits, target, cfg.label_smoothing).total

    def architecture(self) -> tuple[str, dict[str, Any]]:
        return "classifier_config", self.model.config.to_dict()

    def _recorded_sigma(self) -> dict[str, str]:
        """The training noise in the weights' metadata (``trained_sigma``: sigma, or [low, high] for a range), so a
        file copied away from its run folder still warns when certified at another sigma."""
        import json

        noise = self.cfg.noise
        return {"trained_sigma": json.dumps(list(noise) if isinstance(noise, tuple) else float(noise))}

    def announce(self) -> str:
        cfg, p = self.cfg, self.plan
        assert p is not None
        what = "linear probe" if cfg.linprobe else f"fine-tuning ({cfg.method}{f', m={self.m}' if self.m > 1 else ''})"
        noise = f"sigma~U{list(cfg.sigma_range)}" if cfg.sigma_range else f"sigma={cfg.sigma}"
        src = cfg.init or f"random init ({cfg.model})"
        line = (
            f"{what} of {src} on {cfg.data} ({self.sizes[0]} train / {self.sizes[1]} held-out images, "
            f"{self.num_classes} classes), {noise}; {p.total_steps} steps of {p.effective_batch} images, "
            f"lr {p.lr:.3g}; "
            f"{self.dist.world_size} process(es) on {self.device}"
        )
        if cfg.init and not cfg.resume:
            line += f"\nweights from {cfg.init}: {self.init_report.summary()}"
        return line

    def _evaluate(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        precision = cfg.precision if self.device.type == "cuda" else "fp32"
        ev: dict[str, float] = {}
        for s in cfg.sigmas_to_eval:
            if self.val_ds is not None:
                ev[f"val_acc@{s:g}"] = noisy_accuracy(
                    self.model, self.val_ds, s, cfg.seed + 1, limit=cfg.eval_images, precision=precision
                )
            if self.test_ds is not None:
                ev[f"test_acc@{s:g}"] = noisy_accuracy(
                    self.model, self.test_ds, s, cfg.seed + 2, limit=cfg.eval_images, precision=precision
                )
        return ev

    def on_main_evaluated(self, step: int, row: dict[str, float]) -> str:
        """Select on the held-out training images (never the test set): export ``model_best`` when better."""
        key = f"val_acc@{self.cfg.sigmas_to_eval[0]:g}"
        if self.val_ds is None or (self.best is not None and row[key] <= self.best[key]):
            return ""  # never selected on the test set
        self.best = {k: v for k, v in row.items() if k != "step"}
        ckpt.save_export(
            self.model,
            self.output_dir / "model_best.safetensors",
            {"epoch": str(round(row["epoch"])), **self._recorded_sigma()},
        )
        return " (best so far)"

    def state(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")

    def on_main_finished(self) -> None:
        out = self.output_dir
        ckpt.save_export(self.model, out / "model_last.safetensors", self._recorded_sigma())
        if self.best is not None:
            print(
                f"done: best epoch {self.best['epoch']:.0f} -> {out / 'model_best.safetensors'}; "
                f"last -> {out / 'model_last.safetensors'}",
                flush=True,
            )
        warning = self.chance_warning()
        if warning:
            self.warnings.append(warning)

    def chance_warning(self) -> str | None:
        """A warning when the run's accuracy under noise stayed near chance (:func:`near_chance`), else None.

        The accuracy is the selected checkpoint's on the held-out images at the first evaluation sigma (the best
        the run reached), or without a held-out set the last evaluation's on the test split.
        """
        cfg, s = self.cfg, self.cfg.sigmas_to_eval[0]
        if self.best is not None:
            acc, where = self.best[f"val_acc@{s:g}"], f"held-out accuracy (best epoch, {self.sizes[1]} training images)"
            n = min(self.sizes[1], cfg.eval_images or self.sizes[1])
        else:
            rows = [r for r in self.last_evals if f"test_acc@{s:g}" in r]
            if not rows or self.test_ds is None:
                return None
            acc, where = rows[-1][f"test_acc@{s:g}"], "test accuracy (no held-out images)"
            n = min(dataset_size(self.test_ds), cfg.eval_images or dataset_size(self.test_ds))
        is_near, threshold = near_chance(acc, self.num_classes, n)
        if not is_near:
            return None
        p = self.plan
        assert p is not None
        return (
            f"{where} under noise (sigma={s:g}) is {100 * acc:.1f}%, near chance ({100 / self.num_classes:.1f}% for "
            f"{self.num_classes} classes; below {100 * threshold:.1f}%): this classifier has learned almost nothing "
            "and certifying it would certify chance. Likely causes: too little training "
            f"({p.total_steps} steps at lr {p.lr:.3g}: raise --epochs or --lr / --blr), noise too strong for the "
            "data (--sigma), --init weights that do not fit these images (other data, channels or size), or "
            "too few held-out images to tell (--val-size)."
        )

    def evaluate(self, step: int) -> dict[str, float]:
        """The per-epoch accuracies under noise (:meth:`_evaluate`), kept for :meth:`chance_warning`."""
        ev = self._evaluate(step)
        self.last_evals.append(ev)
        return ev


def finetune(cfg: FinetuneConfig, data: UserData | None = None) -> TrainResult:
    """Run (or resume) fine-tuning or linear probing as ``cfg`` says. Works under torchrun.

    ``data`` (:func:`dmae.datasets.user_data`) trains on the caller's own images instead of ``cfg.data``: the
    held-out images are taken from its training set, its test set (if any) is scored every epoch, and the run's
    config records ``data: custom`` (a resume is checked against the images' fingerprint).

    Raises:
        ValueError, FileExistsError, FileNotFoundError, FloatingPointError: see :func:`dmae.training.engine.train`;
        :class:`dmae.checkpoint.CheckpointError`: an ``--init`` that cannot be read or does not fit.
    """
    cfg.validate()
    return train(FinetuneJob(cfg, data))


FinetuneResult = TrainResult  # what finetune() returns; .best is the selected checkpoint's evaluation

__all__ = [
    "FinetuneConfig",
    "FinetuneJob",
    "FinetuneResult",
    "LinprobeConfig",
    "adapt_val_size",
    "build_finetune_optimizer",
    "build_linprobe_optimizer",
    "finetune",
    "freeze_encoder",
    "near_chance",
    "noisy_accuracy",
    "split_train_val",
]
