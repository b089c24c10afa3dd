"""Corruptions of the DMAE pretraining task: Gaussian noise in [0, 1] pixel space and random masking.

Everything here is a pure function of its inputs and an optional ``torch.Generator``, so a training step
(and a test) is reproducible from a seed. Patchify/unpatchify follow the MAE layout: a patch is flattened
as ``(p, p, C)``, i.e. channel last, which is what the official ``decoder_pred`` weights expect.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def check_sigma(sigma: float) -> float:
    """Validate a noise level (pixel units of [0, 1] images); 0 means no noise."""
    if not isinstance(sigma, (int, float)) or sigma != sigma or sigma < 0:
        raise ValueError(f"sigma must be a number >= 0 (std of the noise in [0, 1] pixel units), got {sigma!r}")
    return float(sigma)


def check_mask_ratio(mask_ratio: float) -> float:
    """Validate a masking ratio: the fraction of patches removed, in [0, 1)."""
    if not isinstance(mask_ratio, (int, float)) or not (0.0 <= mask_ratio < 1.0):
        raise ValueError(f"mask_ratio must be in [0, 1) (fraction of patches removed), got {mask_ratio!r}")
    return float(mask_ratio)


def add_gaussian_noise(x: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return ``x + eta`` with ``eta ~ N(0, sigma^2 I)``, drawn on ``x``'s device, not clipped.

    Args:
        x: images in [0, 1], ``[N, C, H, W]``.
        sigma: a float, or a per-sample tensor ``[N]`` (one model for many noise levels).
        generator: source of randomness; must live on ``x.device``.
    Returns:
        The noisy images, same shape and dtype as ``x``.
    """
    if isinstance(sigma, torch.Tensor):
        if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
            raise ValueError(f"per-sample sigma must have shape [{x.shape[0]}], got {tuple(sigma.shape)}")
        if bool((sigma < 0).any()):
            raise ValueError(f"sigma must be >= 0, got min {sigma.min().item()}")
        scale = sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    else:
        scale = check_sigma(sigma)
        if scale == 0.0:
            return x.clone()
    eta = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + eta * scale


class Masking(NamedTuple):
    """A per-sample random masking of ``L`` patches.

    ids_keep: ``[N, L_keep]`` indices of the visible patches, in shuffled order.
    mask: ``[N, L]`` 0 for visible, 1 for removed patches, in the original patch order.
    ids_restore: ``[N, L]`` inverse permutation: ``gather(shuffled, ids_restore)`` is the original order.
    """

    ids_keep: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor


def random_masking(
    n: int, num_patches: int, mask_ratio: float, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> Masking:
    """Per-sample random masking: keep the first ``int(L * (1 - ratio))`` of a random permutation.

    The permutation is the argsort of uniform noise (per-sample shuffling by argsort of random noise),
    and ``ids_restore`` is its inverse.
    """
    check_mask_ratio(mask_ratio)
    len_keep = int(num_patches * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}")
    noise = torch.rand(n, num_patches, generator=generator, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(n, num_patches, device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return Masking(ids_keep=ids_keep, mask=mask, ids_restore=ids_restore)


def no_masking(n: int, num_patches: int, device: torch.device | str = "cpu") -> Masking:
    """The identity masking: every patch visible, in order (used to reconstruct a whole noisy image)."""
    ids = torch.arange(num_patches, device=device).expand(n, num_patches)
    return Masking(ids_keep=ids, mask=torch.zeros(n, num_patches, device=device), ids_restore=ids)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, L, p*p*C]`` with each patch flattened as (p, p, C)."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """``[N, L, p*p*C]`` -> ``[N, C, H, W]``, the inverse of :func:`patchify` (square grid unless given)."""
    n, L, d = x.shape
    p = patch_size
    if d != p * p * channels:
        raise ValueError(f"patch dim {d} != patch_size^2 * channels = {p * p * channels}")
    if grid is None:
        side = int(round(L**0.5))
        if side * side != L:
            raise ValueError(f"{L} patches do not form a square grid; pass grid=(h, w)")
        grid = (side, side)
    gh, gw = grid
    x = x.reshape(n, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, gh * p, gw * p)


def check_sigma_range(low: float, high: float) -> tuple[float, float]:
    """Validate a per-sample noise range ``U[low, high]``."""
    if not (0.0 <= low <= high) or high <= 0.0:
        raise ValueError(f"sigma range must satisfy 0 <= low <= high, high > 0, got [{low}, {high}]")
    return float(low), float(high)


def sample_sigma(n: int, sigma: float | tuple[float, float], generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> float | torch.Tensor:
    """A fixed noise level, or one level per sample drawn from ``U[low, high]`` (one model for many sigmas)."""
    if isinstance(sigma, tuple):
        low, high = check_sigma_range(*sigma)
        return low + (high - low) * torch.rand(n, generator=generator, device=device)
    return check_sigma(sigma)
