"""The paper's Figure 2: original | noisy | masked noisy | reconstruction, for a few images."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from dmae.corrupt import add_gaussian_noise, check_mask_ratio, check_sigma, random_masking
from dmae.models.dmae import DenoisingMaskedAutoencoder


class Reconstruction(NamedTuple):
    """Four views of each image, ``[N, C, S, S]`` in [0, 1] pixel space at the model's resolution."""

    original: torch.Tensor
    noisy: torch.Tensor
    masked: torch.Tensor
    reconstruction: torch.Tensor


@torch.no_grad()
def reconstruct(model: DenoisingMaskedAutoencoder, images: torch.Tensor, sigma: float, mask_ratio: float,
                seed: int = 0, norm_pix_loss: bool | None = None, fill: float = 0.5) -> Reconstruction:
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path



def _run_folder(checkpoint: Path) -> Path:
    return checkpoint if checkpoint.is_dir() else checkpoint.parent


def visualize_checkpoint(checkpoint: str | Path, out: str | Path | None = None, model: str | None = None,
                         data: str | None = None, data_root: str | None = None, split: str | None = None,
                         num: int = 8, sigma: float | None = None, mask_ratio: float = 0.75, seed: int = 0,
                         norm_pix_loss: bool | None = None, device: str = "auto") -> Path:
    """Load a checkpoint (a run folder, ``checkpoint.pt``, ``model.safetensors`` or an official file) and write
    the reconstruction figure for the first ``num`` images of a split. Unset options come from the run's
    ``config.yaml`` when there is one."""
    import yaml

    from dmae.checkpoint import load_dmae
    from dmae.data import build_dataset, build_transform, dataset_info
    from dmae.distributed import resolve_device

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        found = [checkpoint / n for n in ("model.safetensors", "checkpoint.pt") if (checkpoint / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{checkpoint} holds neither model.safetensors nor checkpoint.pt")
        checkpoint = found[0]
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    run_cfg: dict = {}
    cfg_file = _run_folder(checkpoint) / "config.yaml"
    if cfg_file.is_file():
        run_cfg = yaml.safe_load(cfg_file.read_text()) or {}
    data = data or run_cfg.get("data", "fashion-mnist")
    data_root = data_root or run_cfg.get("data_root")
    sigma = sigma if sigma is not None else float(run_cfg.get("sigma", 0.25))
    norm_pix_loss = norm_pix_loss if norm_pix_loss is not None else bool(run_cfg.get("norm_pix_loss", True))

    net, _ = load_dmae(checkpoint, model)
    net.to(resolve_device(device))
    info = dataset_info(data)
    split = split or info.splits[1]
    ds = build_dataset(data, split, data_root, build_transform(info, False, net.config.img_size))
    images = torch.stack([ds[i][0] for i in range(min(num, len(ds)))])  # type: ignore[arg-type]
    rec = reconstruct(net, images, sigma, mask_ratio, seed, norm_pix_loss)
    out = Path(out) if out else _run_folder(checkpoint) / "reconstructions.png"
    note = " (patch mean/var from the clean image)" if norm_pix_loss else ""
    return save_figure(rec, out, f"{data} {split}, sigma={sigma}, mask ratio={mask_ratio}{note}")


__all__ = ["Reconstruction", "reconstruct", "save_figure", "visualize_checkpoint"]
