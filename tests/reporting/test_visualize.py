import torch
import torch.nn.functional as F

from conftest import PICO
from dmae.models import create_model
from dmae.reporting.visualize import reconstruct, save_figure


def test_reconstruct_views_and_figure(tmp_path):
    model = create_model(PICO)
    x = torch.rand(3, 1, 28, 28)
    rec = reconstruct(model, x, sigma=0.5, mask_ratio=0.75, seed=0, norm_pix_loss=False, fill=0.5)
    assert all(v.shape == (3, 1, 28, 28) for v in rec)
    assert torch.allclose(rec.original, x)
    assert (rec.noisy - x).std() > 0.4  # noise at sigma 0.5
    patches = model.patchify(rec.masked)
    removed = (patches == 0.5).all(-1)
    assert torch.all(removed.sum(1) == 49 - 12)  # 75% of 49 patches filled
    kept = model.patchify(rec.noisy)[~removed]
    assert torch.equal(kept, patches[~removed])  # visible patches are the noisy ones
    again = reconstruct(model, x, sigma=0.5, mask_ratio=0.75, seed=0, norm_pix_loss=False)
    assert torch.equal(rec.reconstruction, again.reconstruction)
    path = save_figure(rec, tmp_path / "f.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_three_channel_model_on_grey_images():
    """A grey image meets a 3-channel, 32-px model as its three copies resized; with ``norm_pix_loss`` each predicted
    patch takes the mean and variance of the clean image's patch, so a model that predicts the normalized target
    exactly gives the clean image back."""
    model = create_model("dmae_vit_pico_patch4_dec32d1b", in_chans=3, img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    x = torch.rand(2, 1, 28, 28)
    resized = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False)
    target = model.target(x)  # the clean image's normalized patches [N, L, p*p*C]
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    model.forward = lambda noisy, masking: (target - mean) / (var + 1e-6) ** 0.5  # a perfect norm-pix predictor
    rec = reconstruct(model, x, sigma=0.25, mask_ratio=0.5, norm_pix_loss=True)
    assert rec.original.shape == (2, 3, 32, 32)
    for c in range(3):
        assert torch.allclose(rec.original[:, c : c + 1], resized, atol=1e-6), c
    assert torch.allclose(rec.reconstruction, rec.original, atol=1e-3)
    # without the patch statistics the same prediction is not the image: the statistics are what restores it
    plain = reconstruct(model, x, sigma=0.25, mask_ratio=0.5, norm_pix_loss=False)
    assert not torch.allclose(plain.reconstruction, rec.original, atol=0.1)


def test_encoder_only_checkpoint_is_refused_naming_the_decoder_keys(tmp_path, capsys):
    """MAE's public encoder-only files have no decoder: a figure from a random decoder would be noise."""
    from dmae.cli import main

    model = create_model(PICO)
    encoder_only = {k: v for k, v in model.state_dict().items() if k in model.encoder_keys()}
    path = tmp_path / "mae_encoder.pth"
    torch.save({"model": encoder_only}, path)
    assert main(["visualize", "--checkpoint", str(path), "--device", "cpu", "--out", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err
    assert "holds no decoder" in err
    assert "decoder_embed.weight" in err
    assert "mask_token" in err
    assert not (tmp_path / "f.png").exists()
