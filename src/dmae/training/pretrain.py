"""DMAE pretraining (Wu et al., ICLR 2023, Sec. 3.1): ``data -> corrupt (noise, mask) -> model -> loss``.

The paper's recipe, after MAE (He et al., CVPR 2022): AdamW (0.9, 0.95), no weight decay on biases, norms,
tokens and positions; lr = blr * effective_batch / 256; per-iteration linear warmup then half-cycle cosine;
the loss on the *clean* image over all patches (DMAE) or on the removed patches only (MAE). The job plugs
into :mod:`dmae.training.engine`, which makes it resumable bit for bit and distributed under torchrun.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from dmae import checkpoint as ckpt
from dmae.config import default, option
from dmae.corrupt import add_gaussian_noise, check_mask_ratio, check_sigma, random_masking
from dmae.data import DatasetInfo, build_dataset, build_transform, dataset_info, dataset_size
from dmae.datasets import UserData
from dmae.models.dmae import DenoisingMaskedAutoencoder, DMAEConfig
from dmae.models.registry import get_preset, model_config_for_data
from dmae.runtime import autocast
from dmae.training.engine import Built, TrainingJob, TrainOptions, TrainResult, build_scheduler, train
from dmae.training.losses import reconstruction_loss

# Parameters that get no weight decay besides 1-D ones (biases, norms); positions are fixed anyway.
NO_WEIGHT_DECAY = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")
EVAL_SEED_OFFSET = 12345  # held-out reconstructions are scored under noise and masks of seed + this
PRETRAIN_REFERENCE_BATCH = 4096  # the effective batch of the paper's pretraining recipe, which its blr is for


@dataclass
class PretrainConfig(TrainOptions):
    """Every option of ``dmae pretrain``."""

    output_dir: str = default("runs/pretrain")
    model: str = option(
        "dmae_vit_micro_patch4_dec64d2b", "model preset (list them with `dmae models`)", check=get_preset
    )
    img_size: int | None = option(
        None, "model input side; default: the preset's (small presets: the data's native size)", low=1
    )
    sigma: float = option(
        0.25, "std of the Gaussian noise in [0, 1] pixel units; 0 with --loss masked is plain MAE", check=check_sigma
    )
    mask_ratio: float = option(0.75, "fraction of patches removed, in [0, 1)", check=check_mask_ratio)
    loss: Literal["all", "masked"] = option("all", "patches the loss scores: all (DMAE) or masked only (MAE)")
    norm_pix_loss: bool = option(True, "normalize each target patch by its own mean and variance")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas", low=0, high=1, high_open=True)
    eval_images: int = option(256, "held-out images scored for reconstruction after every epoch", low=1)


def resolve_model_config(cfg: PretrainConfig, info: DatasetInfo) -> DMAEConfig:
    """The preset's architecture fitted to the data (see :func:`dmae.models.registry.model_config_for_data`)."""
    return model_config_for_data(cfg.model, info, cfg.img_size)


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: none on biases, norms, tokens and positions (timm's groups,
    as MAE's ``param_groups_weight_decay``)."""
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=on_cuda)


@torch.no_grad()
def evaluate_reconstruction(
    model: DenoisingMaskedAutoencoder,
    images: torch.Tensor,
    sigma: float,
    mask_ratio: float,
    norm_pix_loss: bool,
    loss_on: Literal["all", "masked"],
    seed: int,
    precision: str = "fp32",
    batch_size: int = 256,
) -> dict[str, float]:
    """Score reconstructions of fixed held-out images ``[N, C, H, W]`` (in [0, 1]) under fixed noise and masks.

    Returns ``loss`` (the training objective), ``noisy_mse`` (MSE of the noisy input to the clean image, in
    [0, 1] pixel space, about sigma^2) and, for models without ``norm_pix_loss``, ``mse``: the pixel-space MSE
    of the reconstruction to the clean image over all patches.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    tot = {"loss": 0.0, "mse": 0.0, "noisy_mse": 0.0}
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device)
        x_noisy = add_gaussian_noise(x, sigma, gen)
        masking = random_masking(x.shape[0], model.num_patches, mask_ratio, gen, device)
        with autocast(device, precision):
            pred = model(x_noisy, masking)
        pred = pred.float()
        loss = reconstruction_loss(pred, model.target(x), masking.mask, norm_pix_loss, loss_on)
        tot["loss"] += loss.item() * x.shape[0]
        tot["noisy_mse"] += (x_noisy - x).pow(2).mean().item() * x.shape[0]
        if not norm_pix_loss:
            clean = model.preprocess.resize(x)
            tot["mse"] += (model.to_pixels(pred) - clean).pow(2).mean().item() * x.shape[0]
    model.train(was_training)
    out = {k: v / len(images) for k, v in tot.items()}
    if norm_pix_loss:
        del out["mse"]
    return out


class PretrainJob(TrainingJob):
    """DMAE / MAE pretraining plugged into the engine: the model, the corruption and the reconstruction loss."""

    name = "pretrain"
    eval_before_training = True
    reference_batch = PRETRAIN_REFERENCE_BATCH
    model: DenoisingMaskedAutoencoder  # set by the engine to what build() returned

    def __init__(self, cfg: PretrainConfig, data: UserData | None = None) -> None:
        super().__init__(cfg)
        self.cfg: PretrainConfig = self.cfg  # the engine's copy
        self.user = data
        if data is not None:  # the caller's own images: the run's config says so, and resuming checks them
            self.cfg.data = data.info.name
        # a grey ImageFolder says 1 channel; the caller's own set says what describe() found
        self.info = data.info if data is not None else dataset_info(cfg.data, cfg.data_root)
        self.mcfg = resolve_model_config(cfg, self.info)
        self.init_report: ckpt.LoadReport | None = None
        self.eval_images: torch.Tensor | None = None

    def build(self) -> Built:
        cfg, info = self.cfg, self.info
        train_ds: Dataset = (
            self.user.train
            if self.user is not None
            else build_dataset(
                cfg.data,
                "train",
                cfg.data_root,
                build_transform(info, True, self.mcfg.img_size),
                cfg.download,
                channels=self.mcfg.in_chans,
            )
        )
        if cfg.train_subset is not None:
            train_ds = Subset(train_ds, range(min(cfg.train_subset, dataset_size(train_ds))))
        model = DenoisingMaskedAutoencoder(self.mcfg)
        if cfg.init and not cfg.resume:
            sd, _ = ckpt.read_weights(cfg.init)
            self.init_report = ckpt.load_state_dict(
                model, sd, cfg.init, allow_missing=ckpt.DECODER_PREFIXES, allow_unexpected=ckpt.CLASSIFIER_PREFIXES
            )
        self.train_size = dataset_size(train_ds)
        return Built(model, train_ds)

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return build_optimizer(model, lr, self.cfg.weight_decay, self.cfg.betas)

    def forward_loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, seed: int
    ) -> torch.Tensor:
        cfg = self.cfg
        x_noisy = add_gaussian_noise(x, cfg.sigma, gen)
        masking = random_masking(x.shape[0], self.mcfg.num_patches, cfg.mask_ratio, gen, x.device)
        with self.autocast():
            pred = model(x_noisy, masking)
        return reconstruction_loss(pred, self.model.target(x), masking.mask, cfg.norm_pix_loss, cfg.loss)

    def architecture(self) -> tuple[str, dict[str, Any]]:
        return "model_config", self.mcfg.to_dict()

    def announce(self) -> str:
        cfg, m, p = self.cfg, self.mcfg, self.plan
        assert p is not None and isinstance(self.model, DenoisingMaskedAutoencoder)
        line = (
            f"pretraining {cfg.model} ({self.model.num_params('encoder') / 1e6:.2f}M encoder params, input "
            f"{m.in_chans}x{m.img_size}x{m.img_size}) on {cfg.data} ({self.train_size} images), "
            f"{self.dist.world_size} process(es) on {self.device}; sigma={cfg.sigma} loss={cfg.loss} "
            f"mask={cfg.mask_ratio}; {p.total_steps} steps of {p.effective_batch} images, lr {p.lr:.3g}"
        )
        if self.init_report is not None:
            line += f"\ninitialised from {cfg.init}: {self.init_report.summary()}"
        return line

    def evaluate(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        if self.eval_images is None:
            eval_ds = self._eval_set()
            k = min(cfg.eval_images, dataset_size(eval_ds))
            self.eval_images = torch.stack([eval_ds[i][0] for i in range(k)])
        precision = cfg.precision if self.device.type == "cuda" else "fp32"
        return evaluate_reconstruction(
            self.model,
            self.eval_images,
            cfg.sigma,
            cfg.mask_ratio,
            cfg.norm_pix_loss,
            cfg.loss,
            seed=cfg.seed + EVAL_SEED_OFFSET,
            precision=precision,
        )

    def _eval_set(self) -> Dataset:
        """The held-out images scored for reconstruction: the evaluation split; for the caller's own data, their
        test set, else (none given) the first training images."""
        cfg = self.cfg
        if self.user is not None:
            return self.user.test if self.user.test is not None else self.user.train
        return build_dataset(
            cfg.data,
            self.info.splits[1],
            cfg.data_root,
            build_transform(self.info, False, self.mcfg.img_size),
            cfg.download,
            channels=self.mcfg.in_chans,
        )

    def on_main_finished(self) -> None:
        out = self.output_dir
        ckpt.save_export(self.model, out / "model.safetensors", {"sigma": str(self.cfg.sigma), "loss": self.cfg.loss})
        print(
            f"done: {out / 'checkpoint.pt'} (resumable) and {out / 'model.safetensors'} (weights + config)", flush=True
        )


def pretrain(cfg: PretrainConfig, data: UserData | None = None) -> TrainResult:
    """Run (or resume) DMAE pretraining as ``cfg`` says; returns what was done. Works under torchrun.

    ``data`` (:func:`dmae.datasets.user_data`) trains on the caller's own images instead of ``cfg.data`` (the
    run's config then records ``data: custom``, and a resume is checked against the images' fingerprint).

    Raises:
        ValueError, FileExistsError, FileNotFoundError, FloatingPointError: see :func:`dmae.training.engine.train`;
        :class:`dmae.data.DataError` / :class:`dmae.checkpoint.CheckpointError`: unreadable data or ``--init``.
    """
    cfg.validate()
    return train(PretrainJob(cfg, data))


PretrainResult = TrainResult  # what pretrain() returns; eval_start / eval_end hold the reconstruction scores

__all__ = [
    "PretrainConfig",
    "PretrainJob",
    "PretrainResult",
    "build_optimizer",
    "build_scheduler",
    "evaluate_reconstruction",
    "pretrain",
    "resolve_model_config",
]
