import pytest
import torch

from dmae.losses import normalize_patches, reconstruction_loss


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
