import numpy as np
import pytest
import torch
from timm.data import Mixup

from dmae.corrupt import (
    add_gaussian_noise,
    corrupt_batch,
    noisy_copies,
    patchify,
    random_masking,
    sample_sigma,
    unpatchify,
)


@pytest.mark.parametrize("L,ratio", [(49, 0.75), (196, 0.75), (64, 0.5), (16, 0.0), (10, 0.8)])
def test_masking_keeps_exact_count(L, ratio):
    m = random_masking(8, L, ratio, torch.Generator().manual_seed(0))
    keep = int(L * (1 - ratio))
    assert m.ids_keep.shape == (8, keep)
    assert m.mask.shape == (8, L)
    assert torch.all(m.mask.sum(1) == L - keep)
    # the kept indices are exactly the unmasked positions, each once
    for i in range(8):
        assert sorted(m.ids_keep[i].tolist()) == torch.nonzero(m.mask[i] == 0).flatten().tolist()


def test_masking_that_leaves_nothing_visible_fails():
    with pytest.raises(ValueError, match="leaves no visible patch out of 10"):
        random_masking(1, 10, 0.95)


def test_restore_inverts_the_shuffle():
    g = torch.Generator().manual_seed(3)
    L = 49
    m = random_masking(5, L, 0.75, g)
    x = torch.randn(5, L, 7)
    # shuffle with the full permutation, then restore
    ids_shuffle = torch.argsort(m.ids_restore, dim=1)
    assert torch.equal(ids_shuffle[:, : m.ids_keep.shape[1]], m.ids_keep)
    shuffled = torch.gather(x, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, 7))
    restored = torch.gather(shuffled, 1, m.ids_restore.unsqueeze(-1).expand(-1, -1, 7))
    assert torch.equal(restored, x)


def test_masking_is_per_sample_and_deterministic():
    a = random_masking(16, 49, 0.75, torch.Generator().manual_seed(7))
    b = random_masking(16, 49, 0.75, torch.Generator().manual_seed(7))
    c = random_masking(16, 49, 0.75, torch.Generator().manual_seed(8))
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.ids_keep, b.ids_keep)
    assert not torch.equal(a.mask, c.mask)
    assert len({tuple(r.tolist()) for r in a.mask}) > 1  # samples get different masks


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_bad_mask_ratio(ratio):
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\).*" + str(ratio).replace(".", r"\.")):
        random_masking(2, 49, ratio)


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_noise_std_matches_sigma(sigma):
    x = torch.rand(64, 3, 32, 32)
    eta = add_gaussian_noise(x, sigma, torch.Generator().manual_seed(0)) - x
    n = eta.numel()  # 196,608 draws: the std estimate is within ~0.5% with overwhelming probability
    assert abs(eta.std().item() - sigma) < 0.01 * sigma
    assert abs(eta.mean().item()) < 5 * sigma / n**0.5


def test_noise_not_clipped_and_reproducible():
    x = torch.ones(4, 1, 28, 28)
    a = add_gaussian_noise(x, 0.5, torch.Generator().manual_seed(1))
    b = add_gaussian_noise(x, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.max() > 1.0  # in [0, 1] space, not clipped


def test_sigma_zero_is_identity_and_negative_fails():
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(add_gaussian_noise(x, 0.0), x)
    with pytest.raises(ValueError, match=r"sigma must be a number >= 0.*-0\.1"):
        add_gaussian_noise(x, -0.1)


def test_per_sample_sigma():
    x = torch.zeros(3, 1, 64, 64)
    sig = torch.tensor([0.0, 0.25, 1.0])
    eta = add_gaussian_noise(x, sig, torch.Generator().manual_seed(0))
    stds = eta.flatten(1).std(1)
    assert stds[0] == 0
    assert abs(stds[1] - 0.25) < 0.02
    assert abs(stds[2] - 1.0) < 0.08


def test_patchify_layout_and_roundtrip():
    # one 2-channel 4x4 image, patch 2: patch (0, 1) holds rows 0-1, cols 2-3, flattened as (p, p, C)
    img = torch.arange(32, dtype=torch.float32).reshape(1, 2, 4, 4)
    p = patchify(img, 2)
    assert p.shape == (1, 4, 8)
    expected = torch.stack([img[0, :, r, c] for r in (0, 1) for c in (2, 3)]).flatten()  # (p, p, C) order
    assert torch.equal(p[0, 1], expected)
    assert torch.equal(unpatchify(p, 2, 2), img)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(x, 4), 4, 3), x)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 1, 30, 30), 4)


def test_noise_is_added_after_mixing():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    b = corrupt_batch(x.clone(), y, 0.5, 2, g, mix, seed=3)
    assert b.target.shape == (64, 10)
    assert torch.allclose(b.target.sum(1), torch.ones(64))
    np.random.seed(3)  # the same mixing, redone: corrupt_batch seeds numpy, which timm's Mixup draws from
    mixed, _ = mix(x.clone(), y)
    assert not torch.equal(mixed, x)  # the batch was mixed
    eta = b.noisy - mixed.repeat(2, 1, 1, 1)
    assert abs(eta.std().item() - 0.5) < 0.005  # exactly sigma around the mixed images
    # the official order (noise, then mixing) shrinks the noise to sigma * sqrt(l^2 + (1 - l)^2): same lambda
    mix_only = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, num_classes=10)
    noise = 0.5 * torch.randn(x.shape, generator=g)
    np.random.seed(3)
    official, _ = mix_only(x + noise, y)
    np.random.seed(3)
    clean_mixed, _ = mix_only(x.clone(), y)
    assert (official - clean_mixed).std().item() < 0.45


def test_sigma_range_sampling():
    g = torch.Generator().manual_seed(0)
    s = sample_sigma(20000, (0.1, 0.6), g)
    assert s.min() >= 0.1
    assert s.max() <= 0.6
    assert s.min() < 0.101
    assert s.max() > 0.599
    assert abs(s.mean().item() - 0.35) < 0.005
    x = torch.zeros(8, 1, 64, 64)
    noisy = noisy_copies(x, (0.0, 0.75), 2, g).view(2, 8, -1)
    per_image = noisy.std(-1)  # [copies, images]
    assert (per_image < 0.8).all()
    assert torch.allclose(per_image[0], per_image[1], rtol=0.1, atol=0.01)  # copies of an image share its sigma
    with pytest.raises(ValueError, match=r"sigma range must satisfy .*\[0.5, 0.2\]"):
        sample_sigma(4, (0.5, 0.2))
