import argparse

import pytest
import torch

from conftest import PICO
from dmae.checkpoint import CheckpointError, load_dmae, load_state_dict
from dmae.corrupt import random_masking
from dmae.models import DMAEConfig, create_model, get_preset, list_models
from dmae.models.pos_embed import sincos_2d
from dmae.models.preprocess import InputAdapter

OFFICIAL = ["dmae_vit_base_patch16_dec512d8b", "dmae_vit_large_patch16_dec512d8b"]


@pytest.fixture(scope="module")
def base_model():
    return create_model("dmae_vit_base_patch16_dec512d8b")


def official_keys(depth: int, decoder_depth: int) -> list[str]:
    """The key list of an official DMAE checkpoint, written out from the published layout."""
    wb = ("weight", "bias")
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    block = [f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for p in wb]
    keys += [f"blocks.{i}.{b}" for i in range(depth) for b in block]
    keys += [
        "norm.weight",
        "norm.bias",
        "mask_token",
        "decoder_pos_embed",
        "decoder_embed.weight",
        "decoder_embed.bias",
    ]
    keys += [f"decoder_blocks.{i}.{b}" for i in range(decoder_depth) for b in block]
    keys += ["decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    return keys


@pytest.mark.parametrize("name", list_models())
@pytest.mark.slow
def test_output_shapes_every_preset(name):
    m = create_model(name)
    c = m.config
    x = torch.rand(2, c.in_chans, c.img_size, c.img_size)
    mk = random_masking(2, m.num_patches, 0.75, torch.Generator().manual_seed(0))
    with torch.no_grad():
        latent = m.forward_encoder(x, mk)
        pred = m(x, mk)
    assert latent.shape == (2, 1 + int(m.num_patches * 0.25), c.embed_dim)
    assert pred.shape == (2, m.num_patches, c.patch_size**2 * c.in_chans)
    assert m.target(x).shape == pred.shape
    assert sorted(m.state_dict()) == sorted(official_keys(c.depth, c.decoder_depth))


@pytest.mark.slow
def test_official_parameter_counts(base_model):
    # SPEC: ViT-B encoder ~86-87M (timm's vit_base_patch16_224 less its 1000-class head), ViT-L ~304M
    assert 85.5e6 < base_model.num_params("encoder") < 87.0e6
    large = create_model("dmae_vit_large_patch16_dec512d8b")
    assert 303.0e6 < large.num_params("encoder") < 305.0e6
    assert large.config.depth == 24


@pytest.mark.slow
def test_encoder_layout_equals_timm_vit(base_model):
    import timm

    ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).state_dict()
    ours = {k: v for k, v in base_model.state_dict().items() if k in base_model.encoder_keys()}
    assert set(ours) == set(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)
    # and timm's model accepts our encoder weights as they are
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    vit.load_state_dict(ours, strict=True)


@pytest.mark.parametrize("name", [PICO, "dmae_vit_micro_patch4_dec64d2b"])
@pytest.mark.slow
def test_every_parameter_gets_a_gradient(name):
    m = create_model(name)
    x = torch.rand(4, 1, 28, 28)
    mk = random_masking(4, m.num_patches, 0.75, torch.Generator().manual_seed(0))
    m(x, mk).pow(2).mean().backward()
    for n, p in m.named_parameters():
        if n in ("pos_embed", "decoder_pos_embed"):
            assert not p.requires_grad  # fixed sin-cos
            assert p.grad is None
        else:
            assert p.grad is not None, n
            assert p.grad.abs().sum() > 0, n


def test_init_follows_recipe():
    m = create_model("dmae_vit_micro_patch4_dec64d2b")
    assert torch.allclose(m.blocks[0].norm1.weight, torch.ones(128))
    assert m.blocks[0].norm1.bias.abs().sum() == 0
    assert m.blocks[0].attn.qkv.bias.abs().sum() == 0
    assert 0.01 < m.cls_token.std().item() < 0.03
    assert 0.01 < m.mask_token.std().item() < 0.03
    w = m.blocks[0].mlp.fc1.weight  # xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.9 * bound
    assert m.norm.eps == 1e-6
    assert m.blocks[0].norm1.eps == 1e-6


def test_sincos_positions_formula():
    D, gh, gw = 8, 2, 3
    pe = sincos_2d(D, (gh, gw))
    assert pe.shape == (1, 1 + gh * gw, D)
    assert pe[0, 0].abs().sum() == 0
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2)
    for r in range(gh):
        for c in range(gw):
            row = pe[0, 1 + r * gw + c].double()
            expected = torch.cat(
                [torch.sin(c * omega), torch.cos(c * omega), torch.sin(r * omega), torch.cos(r * omega)]
            )
            assert torch.allclose(row, expected, atol=1e-6)


def test_input_adapter_resizes_after_noise_and_normalizes():
    a = InputAdapter(224, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = torch.full((2, 1, 32, 32), 0.75)  # grey, CIFAR-sized
    y = a(x)
    assert y.shape == (2, 3, 224, 224)
    assert torch.allclose(y, torch.ones_like(y), atol=1e-5)  # (0.75 - 0.5) / 0.25
    assert "mean" not in a.state_dict()
    assert len(a.state_dict()) == 0  # not checkpoint keys
    assert a.to(torch.float64).mean.dtype == torch.float64  # buffers follow .to()
    with pytest.raises(ValueError, match="takes 1-channel images, got 3"):
        InputAdapter(28, 1, (0.5,), (0.5,))(torch.rand(1, 3, 28, 28))


def test_bad_model_configs():
    with pytest.raises(ValueError, match="unknown model 'vit_huge'"):
        get_preset("vit_huge")
    with pytest.raises(ValueError, match="not divisible by patch_size 16"):
        DMAEConfig(img_size=100)
    with pytest.raises(ValueError, match="mean/std need 1 values"):
        create_model(PICO, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))


# ------------------------------------------------------------------ official checkpoints
def _official_file(tmp_path, sd, name="checkpoint.pth"):
    """A training checkpoint in the official layout, args as an argparse.Namespace."""
    path = tmp_path / name
    args = argparse.Namespace(model="dmae_vit_base_patch16_dec512d8b", mask_ratio=0.75, norm_pix_loss=True, blr=1.5e-4)
    torch.save(
        {
            "model": sd,
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 1099,
            "scaler": {"scale": 65536.0},
            "args": args,
        },
        path,
    )
    return path


@pytest.mark.slow
def test_official_dmae_checkpoint_loads_exactly(tmp_path, base_model):
    sd = {k: v.clone() + 0.01 for k, v in base_model.state_dict().items()}
    assert sorted(sd) == sorted(official_keys(12, 8))
    net, report = load_dmae(_official_file(tmp_path, sd))
    assert report.missing == []
    assert report.unexpected == []
    assert report.positions == []
    assert net.config.embed_dim == 768
    assert net.config.depth == 12  # preset inferred from shapes
    assert torch.equal(net.blocks[3].attn.qkv.weight, sd["blocks.3.attn.qkv.weight"])


@pytest.mark.slow
def test_mae_encoder_only_checkpoint(tmp_path, base_model):
    enc = {k: v for k, v in base_model.state_dict().items() if not (k.startswith("decoder") or k == "mask_token")}
    _, report = load_dmae(_official_file(tmp_path, enc))
    expected_missing = {k for k in official_keys(12, 8) if k.startswith("decoder") or k == "mask_token"}
    assert set(report.missing) == expected_missing
    assert report.unexpected == []


def test_wrong_architecture_and_corrupt_files(tmp_path):
    pico = create_model(PICO)
    sd = pico.state_dict()
    sd["blocks.7.norm1.weight"] = torch.ones(32)  # a block the model does not have
    with pytest.raises(CheckpointError, match=r"unexpected keys \['blocks.7.norm1.weight'\]"):
        load_state_dict(create_model(PICO), sd, "x.pth")
    bad_shape = create_model("dmae_vit_micro_patch4_dec64d2b").state_dict()
    with pytest.raises(CheckpointError, match="cls_token has shape"):
        load_state_dict(create_model(PICO), bad_shape, "x.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02not a checkpoint" * 8)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*corrupt\.pth"):
        load_dmae(corrupt)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dmae(tmp_path / "missing.pth")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch EVIL_MARKER",))


def test_loading_never_executes_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_dmae(path)
    assert not (tmp_path / "EVIL_MARKER").exists()
