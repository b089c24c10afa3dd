import math

import pytest
import torch
import torch.nn.functional as F

from dmae.training.losses import (
    consistency_loss,
    cross_entropy,
    default_mu,
    normalize_patches,
    reconstruction_loss,
    rs_loss,
)


def test_all_vs_masked_on_hand_made_case():
    # 1 image, 4 patches of 2 values; patches 1 and 3 masked
    target = torch.zeros(1, 4, 2)
    pred = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [0.0, 0.0], [3.0, 3.0]]])
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    # per-patch MSE: [1, 2, 0, 9]
    assert reconstruction_loss(pred, target, mask, norm_pix_loss=False, on="all").item() == pytest.approx(12 / 4)
    assert reconstruction_loss(pred, target, mask, norm_pix_loss=False, on="masked").item() == pytest.approx(11 / 2)


def test_dmae_loss_sees_visible_patch_errors_mae_does_not():
    target = torch.zeros(2, 3, 4)
    pred = torch.zeros(2, 3, 4)
    pred[:, 0] = 5.0  # error only on a visible patch
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    assert reconstruction_loss(pred, target, mask, False, "masked").item() == 0.0
    assert reconstruction_loss(pred, target, mask, False, "all").item() == pytest.approx(25 / 3)


def test_norm_pix_loss_formula():
    t = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])
    mean, var = 3.0, ((4 + 1 + 0 + 9) / 3)  # unbiased variance
    expected = (t - mean) / (var + 1e-6) ** 0.5
    assert torch.allclose(normalize_patches(t), expected)
    pred = torch.zeros_like(t)
    loss = reconstruction_loss(pred, t, torch.ones(1, 1), norm_pix_loss=True, on="all")
    assert loss.item() == pytest.approx(expected.pow(2).mean().item())


def test_shape_and_mode_errors():
    with pytest.raises(ValueError, match="differ"):
        reconstruction_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="loss must be one of"):
        reconstruction_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2), on="visible")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- fine-tuning losses


def _hand_cr(probs: list[list[float]], y: int, lbd: float, mu: float) -> float:
    """The formula written out for one image: probs[i] = softmax of copy i."""
    m, k = len(probs), len(probs[0])
    bar = [sum(p[j] for p in probs) / m for j in range(k)]
    ce = sum(-math.log(p[y]) for p in probs) / m
    kl = sum(sum(bar[j] * (math.log(bar[j]) - math.log(p[j])) for j in range(k)) for p in probs) / m
    ent = -sum(b * math.log(b) for b in bar)
    return ce + lbd * kl + mu * ent


def test_consistency_loss_hand_computed_m2():
    # copy 1 predicts (1/2, 1/2), copy 2 predicts (3/4, 1/4); the label is class 0
    logits = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])  # [m=2, B=1, K=2]
    out = consistency_loss(logits, torch.tensor([0]), lbd=2.0, mu=0.5)
    # CE = (ln 2 + ln 4/3) / 2; F_bar = (5/8, 3/8); KL terms 0.031584 and 0.038098; H(F_bar) = 0.661563
    assert out.total.item() == pytest.approx(0.890879, abs=1e-5)
    assert out.total.item() == pytest.approx(_hand_cr([[0.5, 0.5], [0.75, 0.25]], 0, 2.0, 0.5), rel=1e-6)
    assert out.ce.item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2, rel=1e-6)


def test_consistency_loss_m4_and_batch_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 5, generator=g)  # m=4 copies of 3 images, 5 classes
    y = torch.tensor([1, 4, 0])
    out = consistency_loss(logits, y, lbd=2.0, mu=0.1)
    probs = logits.softmax(-1)
    expected = sum(_hand_cr([probs[i, b].tolist() for i in range(4)], int(y[b]), 2.0, 0.1) for b in range(3)) / 3
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    # two distinct copies repeated twice (m=4) give the m=2 loss: the terms are means over copies
    two = logits[:2]
    assert consistency_loss(torch.cat([two, two]), y).total.item() == pytest.approx(
        consistency_loss(two, y).total.item(), rel=1e-6
    )
    # identical copies: no disagreement, so the KL term is zero
    same = consistency_loss(logits[:1].expand(4, -1, -1), y)
    assert same.kl.item() == pytest.approx(0.0, abs=1e-7)


def test_entropy_term_sign_rewards_confident_mean():
    logits = torch.tensor([[[0.2, 0.0, -0.1]], [[0.0, 0.3, 0.1]]], requires_grad=True)
    y = torch.tensor([0])
    base = consistency_loss(logits, y, lbd=0.0, mu=0.0).total
    with_ent = consistency_loss(logits, y, lbd=0.0, mu=1.0)
    assert (with_ent.total - base).item() == pytest.approx(with_ent.entropy.item())
    assert with_ent.entropy.item() > 0
    # a gradient step on the entropy term alone makes the mean prediction more confident
    ent = consistency_loss(logits, y, lbd=0.0, mu=1.0).total - consistency_loss(logits, y, lbd=0.0, mu=0.0).total
    ent.backward()
    with torch.no_grad():
        stepped = logits - 0.5 * logits.grad
    assert consistency_loss(stepped, y, 0.0, 1.0).entropy < with_ent.entropy


def test_rs_loss_is_cross_entropy_on_noisy_inputs():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 10, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    assert rs_loss(logits, y).total.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    stacked = torch.randn(3, 6, 10, generator=g)  # [m, B, K]: the mean CE over all noisy copies
    expected = torch.stack([F.cross_entropy(stacked[i], y) for i in range(3)]).mean()
    assert rs_loss(stacked, y).total.item() == pytest.approx(expected.item(), rel=1e-6)
    smooth = rs_loss(logits, y, label_smoothing=0.1).total.item()
    assert smooth == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.1).item(), rel=1e-6)


def test_soft_targets_and_default_mu():
    logits = torch.randn(4, 3)
    y = torch.tensor([0, 2, 1, 1])
    assert cross_entropy(logits, F.one_hot(y, 3).float()).item() == pytest.approx(
        F.cross_entropy(logits, y).item(), rel=1e-6
    )
    assert (default_mu(0.25), default_mu(0.5), default_mu(1.0)) == (0.5, 0.5, 0.1)
    with pytest.raises(ValueError, match=r"logits \[m, B, K\]"):
        consistency_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
