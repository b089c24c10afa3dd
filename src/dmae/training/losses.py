"""The losses of dmae, in one place so their choices are visible and switchable.

Pretraining: DMAE (Wu et al., ICLR 2023, Sec. 3) reconstructs the *clean* image and scores **all** patches
(it must also denoise the visible ones); MAE (He et al., CVPR 2022, reference ``forward_loss``) scores only
the removed patches. Both optionally normalize each target patch by its own mean and variance
(``norm_pix_loss``), as the paper's runs do.

Fine-tuning: consistency regularization over ``m`` noise copies (Jeong & Shin, NeurIPS 2020; the DMAE
paper's main method) or plain cross-entropy on noisy inputs (RS: Gaussian data augmentation, Cohen et al.,
ICML 2019).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from dmae.errors import InputError

LossOn = Literal["all", "masked"]
LOSS_ON: tuple[str, ...] = ("all", "masked")


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalize each patch ``[..., p*p*C]`` by its own mean and (unbiased) variance.

    MAE's ``norm_pix_loss`` target (He et al., CVPR 2022): ``(t - mean) / sqrt(var + eps)``. Same shape.
    """
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
    """Mean squared error between predicted and target patches, computed in float32.

    ``on="all"`` is DMAE's loss (Wu et al., ICLR 2023, Sec. 3); ``on="masked"`` is MAE's ``forward_loss``
    (He et al., CVPR 2022).

    Args:
        pred: ``[N, L, p*p*C]`` decoder output.
        target: ``[N, L, p*p*C]`` clean image patches (normalized by the model's mean/std).
        mask: ``[N, L]``, 1 for removed patches, 0 for visible ones.
        norm_pix_loss: normalize each target patch by its own statistics first.
        on: ``"all"`` (DMAE: every patch) or ``"masked"`` (MAE: removed patches only).
    Returns:
        A scalar: per-patch MSE averaged over the scored patches (0 when ``"masked"`` finds none).
    Raises:
        ValueError: ``pred`` and ``target`` shapes differ, ``mask`` is not ``[N, L]``, or ``on`` is not
            one of :data:`LOSS_ON`.
    """
    if pred.shape != target.shape:
        raise InputError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if mask.shape != pred.shape[:2]:
        raise InputError(f"mask {tuple(mask.shape)} does not match patches {tuple(pred.shape[:2])}")
    if norm_pix_loss:
        target = normalize_patches(target)
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [N, L]
    if on == "all":
        return per_patch.mean()
    if on == "masked":
        mask = mask.to(per_patch.dtype)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
    raise InputError(f"loss must be one of {LOSS_ON}, got {on!r}")


# ----------------------------------------------------------------------------- fine-tuning
class ClassificationLoss(NamedTuple):
    """The total loss and its parts (each a scalar), for logging; only ``total`` carries gradients."""

    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, K]`` (in float32) against class indices ``[B]`` (with optional
    label smoothing) or soft targets ``[B, K]`` (mixup/cutmix targets already carry their smoothing, so
    ``label_smoothing`` is not applied to them). Returns a scalar."""
    if target.ndim == logits.ndim:
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def rs_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> ClassificationLoss:
    """Gaussian-augmentation training (Cohen et al., ICML 2019): cross-entropy on noisy inputs.

    Args:
        logits: ``[B, K]`` or copy-major ``[m, B, K]`` (``m * B`` rows once flattened).
        target: class indices ``[B]`` or soft targets ``[B, K]``, repeated for every copy.
        label_smoothing: for class-index targets only.
    Returns:
        A :class:`ClassificationLoss` with ``total = ce`` and zero ``kl`` / ``entropy``.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    m = flat.shape[0] // target.shape[0]
    ce = cross_entropy(flat, target.repeat(m, *([1] * (target.ndim - 1))), label_smoothing)
    zero = torch.zeros((), device=logits.device)
    return ClassificationLoss(ce, ce.detach(), zero, zero)


def consistency_loss(
    logits: torch.Tensor, target: torch.Tensor, lbd: float = 2.0, mu: float = 0.5, label_smoothing: float = 0.0
) -> ClassificationLoss:
    """Consistency regularization over ``m`` noise copies of each image (Jeong & Shin, NeurIPS 2020).

    ``L = mean_i CE(F_i, y) + lbd * mean_i KL(F_bar || F_i) + mu * H(F_bar)``, with ``F_i`` the softmax
    of copy ``i`` and ``F_bar`` their mean; averaged over the batch. Computed in float32.

    Args:
        logits: ``[m, B, K]``, copy-major (copy ``i`` of image ``b`` at ``[i, b]``).
        target: class indices ``[B]`` or soft targets ``[B, K]``.
        lbd: weight of the KL consistency term (paper: 2.0).
        mu: weight of the entropy of the mean prediction (paper: 0.5 for sigma 0.25 / 0.5, 0.1 for 1.0).
        label_smoothing: for class-index targets only (see :func:`cross_entropy`).
    Returns:
        A :class:`ClassificationLoss`: ``total`` and its detached ``ce``, ``kl`` and ``entropy`` parts.
    Raises:
        ValueError: ``logits`` is not 3-D ``[m, B, K]``.
    """
    if logits.ndim != 3:
        raise InputError(f"consistency_loss wants logits [m, B, K], got {tuple(logits.shape)}")
    m = logits.shape[0]
    log_p = F.log_softmax(logits.float(), dim=-1)  # [m, B, K]
    ce = torch.stack([cross_entropy(logits[i], target, label_smoothing) for i in range(m)]).mean()
    p_bar = log_p.exp().mean(0)  # [B, K]
    log_p_bar = p_bar.clamp_min(1e-20).log()
    kl = (p_bar.unsqueeze(0) * (log_p_bar.unsqueeze(0) - log_p)).sum(-1).mean()  # mean over copies and batch
    entropy = -(p_bar * log_p_bar).sum(-1).mean()
    total = ce + lbd * kl + mu * entropy
    return ClassificationLoss(total, ce.detach(), kl.detach(), entropy.detach())


def default_mu(sigma: float) -> float:
    """The paper's entropy weight for a sigma in [0, 1] pixel units: 0.1 for sigma >= 1.0, else 0.5."""
    return 0.1 if sigma >= 1.0 else 0.5
