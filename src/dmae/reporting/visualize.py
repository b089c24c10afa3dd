"""The paper's Figure 2: original | noisy | masked noisy | reconstruction, for a few images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from dmae.checkpoint import DECODER_PREFIXES, CheckpointError, load_dmae, resolve_checkpoint, run_config
from dmae.config import Options, option
from dmae.corrupt import add_gaussian_noise, check_mask_ratio, check_sigma, random_masking
from dmae.data import DATASET_NAMES, build_dataset, build_transform, dataset_info, dataset_size
from dmae.errors import InputError
from dmae.models.dmae import DenoisingMaskedAutoencoder
from dmae.models.registry import get_preset
from dmae.reporting.figures import pyplot, write_png
from dmae.runtime import resolve_device


class Reconstruction(NamedTuple):
    """Four views of each image, ``[N, C, S, S]`` in [0, 1] pixel space at the model's resolution."""

    original: torch.Tensor
    noisy: torch.Tensor
    masked: torch.Tensor
    reconstruction: torch.Tensor


@torch.no_grad()
def reconstruct(
    model: DenoisingMaskedAutoencoder,
    images: torch.Tensor,
    sigma: float,
    mask_ratio: float,
    seed: int = 0,
    norm_pix_loss: bool | None = None,
    fill: float = 0.5,
) -> Reconstruction:
    """Corrupt ``images`` ([0, 1], ``[N, C, H, W]``) with noise and a mask and reconstruct them.

    A model trained with ``norm_pix_loss`` predicts each patch up to its mean and variance; those are then
    taken from the clean image's patch, so the figure shows the predicted structure.
    """
    check_sigma(sigma)
    check_mask_ratio(mask_ratio)
    model.eval()
    device = next(model.parameters()).device
    x = images.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    x_noisy = add_gaussian_noise(x, sigma, gen)
    masking = random_masking(x.shape[0], model.num_patches, mask_ratio, gen, device)
    pred = model(x_noisy, masking).float()
    if norm_pix_loss:
        target = model.target(x)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    recon = model.to_pixels(pred)
    noisy = model.preprocess.resize(x_noisy)
    patches = model.patchify(noisy)
    patches = torch.where(masking.mask.bool().unsqueeze(-1), torch.full_like(patches, fill), patches)
    masked = model.unpatchify(patches)
    return Reconstruction(model.preprocess.resize(x), noisy, masked, recon)


def save_figure(rec: Reconstruction, path: str | Path, title: str = "") -> Path:
    """Write the four views as a PNG grid, one row per image (values clipped to [0, 1] for display)."""
    plt = pyplot()
    cols = ("original", "noisy", "masked noisy", "reconstruction")
    n = rec.original.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(4 * 1.6, n * 1.6 + (0.4 if title else 0)), squeeze=False)
    for i in range(n):
        for j, view in enumerate(rec):
            img = view[i].detach().float().cpu().clamp(0, 1)
            ax = axes[i][j]
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    return write_png(fig, path, dpi=100)


@dataclass
class VisualizeConfig(Options):
    """Every option of ``dmae visualize``; unset ones come from the run's ``config.yaml`` when there is one."""

    checkpoint: str | None = option(None, "a run folder, checkpoint.pt, model.safetensors or official .pth")
    out: str | None = option(None, "PNG to write (default: reconstructions.png beside the checkpoint)")
    model: str | None = option(
        None, "model preset, for official checkpoints whose shapes match several", check=get_preset
    )
    data: str | None = option(None, "data set (default: the run's, else fashion-mnist)", choices=DATASET_NAMES)
    data_root: str | None = option(None, "data set directory")
    split: str | None = option(None, "split to draw images from (default: the evaluation split)")
    num: int = option(
        8, "number of images (rows); alias --num-images (under torchrun)", low=1, aliases=("--num-images",)
    )
    sigma: float | None = option(None, "noise level (default: the run's, else 0.25)", check=check_sigma)
    mask_ratio: float = option(0.75, "fraction of patches removed", check=check_mask_ratio)
    seed: int = option(0, "seed of the noise and mask")
    norm_pix_loss: bool | None = option(
        None, "whether the model predicts per-patch normalized pixels (default: the run's, else true)"
    )
    device: str = option("auto", "auto, cpu, cuda")

    def check_combination(self) -> None:
        if not self.checkpoint:
            raise InputError("--checkpoint is required")


def visualize(cfg: VisualizeConfig) -> Path:
    """Load a checkpoint (a run folder, ``checkpoint.pt``, ``model.safetensors`` or an official file) and write
    the reconstruction figure for the first ``num`` images of a split; returns the PNG's path.

    Raises:
        ValueError: a bad option.  DataError: unreadable data.  CheckpointError: an unreadable checkpoint, or
        one without a decoder (MAE's public encoder-only files), whose reconstructions would be a random
        decoder's.
    """
    cfg.validate()
    assert cfg.checkpoint is not None  # check_combination requires it
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    run_cfg = run_config(checkpoint)
    data = cfg.data or run_cfg.get("data", "fashion-mnist")
    data_root = cfg.data_root or run_cfg.get("data_root")
    sigma = cfg.sigma if cfg.sigma is not None else float(run_cfg.get("sigma", 0.25))
    norm_pix_loss = cfg.norm_pix_loss if cfg.norm_pix_loss is not None else bool(run_cfg.get("norm_pix_loss", True))

    net, report = load_dmae(checkpoint, cfg.model)
    no_decoder = [k for k in report.missing if k.startswith(DECODER_PREFIXES)]
    if no_decoder:  # an encoder-only file (MAE's public layout): a random decoder would draw noise
        raise CheckpointError(
            f"{checkpoint} holds no decoder ({len(no_decoder)} missing keys: {', '.join(no_decoder[:4])}"
            f"{' ...' if len(no_decoder) > 4 else ''}); reconstructions need a full pretraining "
            "checkpoint (encoder and decoder), not an encoder-only file"
        )
    net.to(resolve_device(cfg.device))
    info = dataset_info(data)
    split = cfg.split or info.splits[1]
    ds = build_dataset(data, split, data_root, build_transform(info, False, net.config.img_size))
    images = torch.stack([ds[i][0] for i in range(min(cfg.num, dataset_size(ds)))])
    rec = reconstruct(net, images, sigma, cfg.mask_ratio, cfg.seed, norm_pix_loss)
    out = Path(cfg.out) if cfg.out else checkpoint.parent / "reconstructions.png"
    note = " (patch mean/var from the clean image)" if norm_pix_loss else ""
    return save_figure(rec, out, f"{data} {split}, sigma={sigma}, mask ratio={cfg.mask_ratio}{note}")


def visualize_checkpoint(checkpoint: str | Path, **options: Any) -> Path:
    """:func:`visualize` with its options as keywords (``out``, ``num``, ``seed``, ...)."""
    return visualize(VisualizeConfig(checkpoint=str(checkpoint), **options))


__all__ = ["Reconstruction", "VisualizeConfig", "reconstruct", "save_figure", "visualize", "visualize_checkpoint"]
