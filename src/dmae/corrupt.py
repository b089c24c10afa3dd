"""Every corruption dmae applies, for both flows: Gaussian noise in [0, 1] pixel space, random masking
(pretraining), and the noisy copies of a mixed batch (fine-tuning).

- DMAE (Wu et al., ICLR 2023, Sec. 3): ``Mask(x + eta)`` with eta ~ N(0, sigma^2 I), 75% of the patches removed.
- MAE (He et al., CVPR 2022; reference ``models_mae.py``): per-sample random masking by argsort of uniform
  noise; patchify/unpatchify in MAE's layout, a patch flattened as ``(p, p, C)`` (channel last), which the
  official ``decoder_pred`` expects.
- Randomized-smoothing training (Cohen et al., ICML 2019) and consistency regularization (Jeong & Shin,
  NeurIPS 2020): ``m`` independent noise draws per image, added *after* mixup/cutmix so the model trains at
  exactly the sigma it is certified at.

Everything here is a pure function of its inputs and an optional ``torch.Generator``, so a training step
(and a test) is reproducible from a seed.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from dmae.errors import InputError


def check_sigma(sigma: float) -> float:
    """Validate a noise level (std in [0, 1] pixel units); 0 means no noise.

    Returns:
        ``sigma`` as a float.
    Raises:
        ValueError: a bool, not an int/float, not finite, or < 0; naming the value.
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise InputError(f"sigma must be a number >= 0 (std of the noise in [0, 1] pixel units), got {sigma!r}")
    return float(sigma)


def check_mask_ratio(mask_ratio: float) -> float:
    """Validate a masking ratio: the fraction of patches removed, in [0, 1).

    Returns:
        ``mask_ratio`` as a float.
    Raises:
        ValueError: not an int/float, or outside [0, 1); naming the value.
    """
    if not isinstance(mask_ratio, (int, float)) or not (0.0 <= mask_ratio < 1.0):
        raise InputError(f"mask_ratio must be in [0, 1) (fraction of patches removed), got {mask_ratio!r}")
    return float(mask_ratio)


def add_gaussian_noise(
    x: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Return ``x + eta`` with ``eta ~ N(0, sigma^2 I)``, drawn on ``x``'s device, not clipped.

    The Gaussian corruption of randomized smoothing (Cohen et al., ICML 2019) and of DMAE's pretraining
    input (Wu et al., ICLR 2023, Sec. 3).

    Args:
        x: images in [0, 1], ``[N, C, H, W]`` (any ``[N, ...]`` works).
        sigma: noise std in [0, 1] pixel units: a float, or a per-sample tensor ``[N]`` (one model for many
            noise levels). A float 0 returns a copy of ``x`` without drawing.
        generator: source of randomness; must live on ``x.device``.
    Returns:
        The noisy images, same shape and dtype as ``x``.
    Raises:
        ValueError: a tensor ``sigma`` not of shape ``[N]`` or with a negative entry; a float ``sigma``
            that :func:`check_sigma` rejects.
    """
    if isinstance(sigma, torch.Tensor):
        if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
            raise InputError(f"per-sample sigma must have shape [{x.shape[0]}], got {tuple(sigma.shape)}")
        if bool((sigma < 0).any()):
            raise InputError(f"sigma must be >= 0, got min {sigma.min().item()}")
        scale: torch.Tensor | float = sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    else:
        scale = check_sigma(sigma)
        if scale == 0.0:
            return x.clone()
    eta = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + eta * scale


class Masking(NamedTuple):
    """A per-sample random masking of ``L`` patches (MAE's ``random_masking`` outputs, He et al., CVPR 2022).

    ids_keep: ``[N, L_keep]`` indices of the visible patches, in shuffled order.
    mask: ``[N, L]`` 0 for visible, 1 for removed patches, in the original patch order.
    ids_restore: ``[N, L]`` inverse permutation: ``gather(shuffled, ids_restore)`` is the original order.
    """

    ids_keep: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor


def random_masking(
    n: int,
    num_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Masking:
    """Per-sample random masking: keep the first ``int(L * (1 - ratio))`` of a random permutation.

    The permutation is the argsort of uniform noise (per-sample shuffling by argsort of random noise),
    and ``ids_restore`` is its inverse, as in MAE's ``random_masking`` (He et al., CVPR 2022); unlike it,
    only indices are returned, so the same masking can be applied to any tensor.

    Args:
        n: batch size ``N``.
        num_patches: patches per image ``L``.
        mask_ratio: fraction of patches removed, in [0, 1).
        generator: source of randomness; must live on ``device``.
        device: where the returned tensors live.
    Returns:
        A :class:`Masking`: ``ids_keep [N, L_keep]``, float ``mask [N, L]``, ``ids_restore [N, L]``.
    Raises:
        ValueError: ``mask_ratio`` rejected by :func:`check_mask_ratio`, or it leaves no visible patch.
    """
    check_mask_ratio(mask_ratio)
    len_keep = int(num_patches * (1 - mask_ratio))
    if len_keep < 1:
        raise InputError(f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}")
    noise = torch.rand(n, num_patches, generator=generator, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(n, num_patches, device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return Masking(ids_keep=ids_keep, mask=mask, ids_restore=ids_restore)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, L, p*p*C]`` with each patch flattened as (p, p, C).

    MAE's ``patchify`` layout (He et al., CVPR 2022), patches in row-major order, ``L = (H/p) * (W/p)``;
    unlike MAE's, non-square images are accepted.

    Raises:
        ValueError: ``H`` or ``W`` is not divisible by ``patch_size``.
    """
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise InputError(f"image size {h}x{w} is not divisible by patch size {p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """``[N, L, p*p*C]`` -> ``[N, C, H, W]``, the inverse of :func:`patchify` (square grid unless given).

    MAE's ``unpatchify`` layout (He et al., CVPR 2022); ``grid=(gh, gw)`` gives ``H = gh*p``, ``W = gw*p``.

    Raises:
        ValueError: the last dim is not ``patch_size**2 * channels``, or no ``grid`` is given and ``L`` is
            not a perfect square.
        RuntimeError: from ``torch.reshape``, when a given ``grid`` does not hold ``L`` patches.
    """
    n, L, d = x.shape
    p = patch_size
    if d != p * p * channels:
        raise InputError(f"patch dim {d} != patch_size^2 * channels = {p * p * channels}")
    if grid is None:
        side = round(L**0.5)
        if side * side != L:
            raise InputError(f"{L} patches do not form a square grid; pass grid=(h, w)")
        grid = (side, side)
    gh, gw = grid
    x = x.reshape(n, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, gh * p, gw * p)


def check_sigma_range(low: float, high: float) -> tuple[float, float]:
    """Validate a per-sample noise range ``U[low, high]`` (std in [0, 1] pixel units).

    Returns:
        ``(low, high)`` as floats.
    Raises:
        ValueError: unless ``0 <= low <= high`` and ``high > 0`` (NaN fails both).
    """
    if not (0.0 <= low <= high) or high <= 0.0:
        raise InputError(f"sigma range must satisfy 0 <= low <= high, high > 0, got [{low}, {high}]")
    return float(low), float(high)


def sample_sigma(
    n: int,
    sigma: float | tuple[float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> float | torch.Tensor:
    """A fixed noise level, or one level per sample drawn from ``U[low, high]`` (one model for many sigmas).

    Returns:
        The float ``sigma``, or for a ``(low, high)`` tuple a float32 tensor ``[n]`` on ``device``.
    Raises:
        ValueError: ``sigma`` rejected by :func:`check_sigma` or :func:`check_sigma_range`.
    """
    if isinstance(sigma, tuple):
        low, high = check_sigma_range(*sigma)
        return low + (high - low) * torch.rand(n, generator=generator, device=device)
    return check_sigma(sigma)


def noisy_copies(
    x: torch.Tensor, noise: float | tuple[float, float], m: int, generator: torch.Generator
) -> torch.Tensor:
    """``m`` independently noised copies of an (already mixed) batch ``[B, C, H, W]``, copy-major: ``[m * B, C, H, W]``.

    With a noise range ``(low, high)``, each image draws one sigma from U[low, high], shared by its copies
    (one model for many noise levels, the paper's Table 10). The ``m`` draws are the noise copies of
    consistency regularization (Jeong & Shin, NeurIPS 2020); ``m = 1`` is Gaussian data augmentation
    (Cohen et al., ICML 2019). Sigma is in [0, 1] pixel units.

    Raises:
        ValueError: ``noise`` rejected by :func:`check_sigma` or :func:`check_sigma_range`.
    """
    sig = sample_sigma(x.shape[0], noise, generator, x.device)
    reps = x.repeat(m, *([1] * (x.ndim - 1)))
    if isinstance(sig, torch.Tensor):
        sig = sig.repeat(m)
    return add_gaussian_noise(reps, sig, generator)


class NoisyBatch(NamedTuple):
    """A fine-tuning batch after mixing and noise: ``target`` (class indices ``[B]`` or soft targets
    ``[B, K]``) and ``noisy`` ``[m * B, C, H, W]`` (copy-major: copy ``i`` of image ``b`` at ``i * B + b``)."""

    target: torch.Tensor
    noisy: torch.Tensor


def corrupt_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    noise: float | tuple[float, float],
    m: int,
    generator: torch.Generator,
    mixup_fn: Any = None,
    seed: int = 0,
) -> NoisyBatch:
    """Mix (timm's mixup/cutmix, if any; it mixes ``x`` in place) and *then* add ``m`` noise draws per image.

    The official fine-tuning code noises first and mixes after, which shrinks the noise std to
    sigma * sqrt(l^2 + (1 - l)^2); noising the mixed batch keeps it at exactly sigma.
    ``seed`` seeds numpy, which timm's mixup draws its lambda and boxes from.

    Args:
        x: clean images in [0, 1], ``[B, C, H, W]``.
        y: class indices ``[B]``.
        noise: sigma, or a ``(low, high)`` range, in [0, 1] pixel units.
        m: noise copies per image.
        generator: source of the noise (and of per-sample sigmas); must live on ``x.device``.
        mixup_fn: timm's ``Mixup`` or ``None``.
        seed: seeds numpy's global RNG before ``mixup_fn`` is called.
    Returns:
        A :class:`NoisyBatch`.
    Raises:
        ValueError: ``noise`` rejected by :func:`check_sigma` or :func:`check_sigma_range`.
    """
    target = y
    if mixup_fn is not None:
        np.random.seed(seed % 2**32)
        x, target = mixup_fn(x, y)
    return NoisyBatch(target, noisy_copies(x, noise, m, generator))
