"""The DMAE pretraining loss, in one place so its choices are visible and switchable.

DMAE reconstructs the *clean* image and scores **all** patches (it must also denoise the visible ones);
MAE scores only the removed patches. Both optionally normalize each target patch by its own mean and
variance (``norm_pix_loss``), as the paper's runs do.
"""

from __future__ import annotations

from typing import Literal

import torch

LossOn = Literal["all", "masked"]
LOSS_ON: tuple[str, ...] = ("all", "masked")


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalize each patch ``[..., p*p*C]`` by its own mean and (unbiased) variance."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def reconstruction_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    norm_pix_loss: bool = True,
    on: LossOn = "all",
) -> torch.Tensor:
    """Mean squared error between predicted and target patches.

    Args:
        pred: ``[N, L, p*p*C]`` decoder output.
        target: ``[N, L, p*p*C]`` clean image patches (normalized by the model's mean/std).
        mask: ``[N, L]``, 1 for removed patches, 0 for visible ones.
        norm_pix_loss: normalize each target patch by its own statistics first.
        on: ``"all"`` (DMAE: every patch) or ``"masked"`` (MAE: removed patches only).
    Returns:
        A scalar: per-patch MSE averaged over the scored patches.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match patches {tuple(pred.shape[:2])}")
    if norm_pix_loss:
        target = normalize_patches(target)
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [N, L]
    if on == "all":
        return per_patch.mean()
    if on == "masked":
        mask = mask.to(per_patch.dtype)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
    raise ValueError(f"loss must be one of {LOSS_ON}, got {on!r}")
