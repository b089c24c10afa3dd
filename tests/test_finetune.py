import argparse

import pytest
import timm
import torch
from timm.data import Mixup
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dmae.checkpoint import CheckpointError, load_classifier, safe_load
from dmae.cli import main
from dmae.corrupt import sample_sigma
from dmae.finetune import (FinetuneConfig, LinprobeConfig, build_finetune_optimizer, corrupt_batch, finetune,
                           noisy_copies)
from dmae.pretrain import PretrainConfig, build_scheduler, pretrain

from conftest import PICO


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    pretrain(PretrainConfig(model=PICO, train_subset=256, batch_size=64, epochs=1, eval_images=16, progress=False,
                            device="cpu", output_dir=str(out)))
    return out


def _ft(tmp_path, name="ft", **over):
    kw = dict(train_subset=256, val_size=200, batch_size=32, epochs=2, warmup_epochs=0.5, eval_images=64,
              log_every=2, progress=False, device="cpu", output_dir=str(tmp_path / name))
    kw.update(over)
    cls = LinprobeConfig if kw.pop("linprobe_cfg", False) else FinetuneConfig
    return finetune(cls(**kw))


# ----------------------------------------------------------------------------- recipe pieces
def test_layer_decay_scales_follow_the_rule():
    model, _ = load_classifier(None, 10, model=PICO)  # depth 2
    decay, depth = 0.65, 2
    opt = build_finetune_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=decay)
    scale = {n: g["lr_scale"] for g in opt.param_groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    layer = {"cls_token": 0, "pos_embed": 0, "patch_embed.proj.weight": 0, "blocks.0.attn.qkv.weight": 1,
             "blocks.1.mlp.fc2.bias": 2, "fc_norm.weight": depth + 1, "head.weight": depth + 1, "head.bias": depth + 1}
    for name, lyr in layer.items():
        assert scale[name] == pytest.approx(decay ** (depth + 1 - lyr)), name
    wd = {n: g["weight_decay"] for g in opt.param_groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    assert wd["cls_token"] == wd["pos_embed"] == wd["blocks.0.norm1.weight"] == wd["head.bias"] == 0.0
    assert wd["blocks.0.attn.qkv.weight"] == wd["head.weight"] == 0.05
    # the scheduler applies each group's scale exactly once
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2, min_lr=0.0)
    sched.step_update(2)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])


def test_noise_is_added_after_mixing():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    b = corrupt_batch(x.clone(), y, 0.5, 2, g, mix, seed=3)
    assert b.target.shape == (64, 10) and torch.allclose(b.target.sum(1), torch.ones(64))
    assert not torch.equal(b.mixed, x)  # the batch was mixed
    eta = b.noisy - b.mixed.repeat(2, 1, 1, 1)
    assert abs(eta.std().item() - 0.5) < 0.005  # exactly sigma around the mixed images
    # the official order (noise, then mixing) would shrink it: mixup of two noisy images
    lam = 0.5
    assert (0.5 * (lam**2 + (1 - lam) ** 2) ** 0.5) < 0.36


def test_sigma_range_sampling():
    g = torch.Generator().manual_seed(0)
    s = sample_sigma(20000, (0.1, 0.6), g)
    assert s.min() >= 0.1 and s.max() <= 0.6 and s.min() < 0.101 and s.max() > 0.599
    assert abs(s.mean().item() - 0.35) < 0.005
    x = torch.zeros(8, 1, 64, 64)
    noisy = noisy_copies(x, (0.0, 0.75), 2, g).view(2, 8, -1)
    per_image = noisy.std(-1)  # [copies, images]
    assert (per_image < 0.8).all()
    assert torch.allclose(per_image[0], per_image[1], rtol=0.1, atol=0.01)  # copies of an image share its sigma
    with pytest.raises(ValueError, match=r"sigma range must satisfy .*\[0.5, 0.2\]"):
        sample_sigma(4, (0.5, 0.2))


# ----------------------------------------------------------------------------- official checkpoints
def _official(tmp_path, model: nn.Module, name: str):
    path = tmp_path / name
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 99, "scaler": {},
                "args": argparse.Namespace(model="vit_base_patch16", global_pool=True)}, path)
    return path


def test_official_finetuned_checkpoint_loads_whole(tmp_path):
    ref = timm.create_model("vit_base_patch16_224", global_pool="avg", num_classes=1000)  # the official layout
    assert "fc_norm.weight" in ref.state_dict() and "norm.weight" not in ref.state_dict()
    path = _official(tmp_path, ref, "finetuned.pth")
    model, report = load_classifier(path, 1000, pool="avg")
    assert report.missing == [] and report.unexpected == [] and report.ignored == []
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(model.preprocess(x)), atol=1e-4)
    with pytest.raises(CheckpointError, match="classifies 1000 classes, the data set has 10"):
        load_classifier(path, 10, pool="avg")


def test_official_linear_probe_checkpoint_loads_whole(tmp_path):
    ref = VisionTransformer(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                                 global_pool="token", num_classes=10)
    ref.head = nn.Sequential(nn.BatchNorm1d(32, affine=False, eps=1e-6), ref.head)  # as the linear-probe code does
    keys = set(ref.state_dict())
    assert {"head.0.running_mean", "head.1.weight", "norm.weight"} <= keys
    model, report = load_classifier(_official(tmp_path, ref, "linprobe.pth"), 10, pool="token")
    assert report.missing == [] and report.unexpected == [] and set(model.state_dict()) == keys


def test_pretrained_encoder_contributes_encoder_only(pretrained):
    model, report = load_classifier(pretrained / "checkpoint.pt", 10, pool="avg")
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report.unexpected == [] and any(k.startswith("decoder") for k in report.ignored)
    enc = safe_load(pretrained / "checkpoint.pt")["model"]
    assert torch.equal(model.blocks[1].attn.qkv.weight, enc["blocks.1.attn.qkv.weight"])
    assert model.head.weight.std() < 1e-4  # fresh head, init std 2e-5


def test_bad_init_fails_clearly(tmp_path, pretrained):
    with pytest.raises(FileNotFoundError, match="--init .*nope.pth does not exist"):
        _ft(tmp_path, init=str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match="not --model dmae_vit_tiny_patch4_dec128d2b"):
        _ft(tmp_path, init=str(pretrained / "model.safetensors"), model="dmae_vit_tiny_patch4_dec128d2b")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        _ft(tmp_path, init=str(bad))
    with pytest.raises(ValueError, match="give --init .* or --model"):
        _ft(tmp_path)


# ----------------------------------------------------------------------------- the job
def test_finetune_resumes_exactly_and_selects_on_held_out(tmp_path, pretrained):
    init = str(pretrained / "model.safetensors")
    full = _ft(tmp_path, "full", init=init)
    assert full.finished and full.total_steps == 16
    a = _ft(tmp_path, "split", init=init, stop_after=5)
    b = _ft(tmp_path, "split", init=init, resume=True)
    assert a.losses + b.losses == full.losses
    assert b.best == full.best and "val_acc@0.25" in full.best and "test_acc@0.25" in full.best
    for name in ("model_best.safetensors", "model_last.safetensors", "checkpoint.pt", "config.yaml", "log.jsonl"):
        assert (tmp_path / "full" / name).is_file()
    # without a held-out split nothing is selected (the test set never chooses a checkpoint)
    none = _ft(tmp_path, "noval", init=init, val_size=0, epochs=1)
    assert none.best is None and not (tmp_path / "noval" / "model_best.safetensors").exists()


def test_rs_and_many_sigma(tmp_path, pretrained):
    res = _ft(tmp_path, init=str(pretrained / "model.safetensors"), method="rs", sigma_range=(0.0, 0.75), epochs=1)
    assert set(res.evals[-1]) >= {"test_acc@0.25", "test_acc@0.5", "test_acc@0.75", "val_acc@0.25"}


def test_linprobe_trains_only_the_head(tmp_path, pretrained):
    res = _ft(tmp_path, init=str(pretrained / "checkpoint.pt"), linprobe_cfg=True, epochs=1, batch_size=64)
    enc = safe_load(pretrained / "checkpoint.pt")["model"]
    sd = res.model.state_dict()
    assert all(torch.equal(sd[k], enc[k]) for k in sd if k in enc)  # frozen encoder, norm included
    assert sd["head.0.num_batches_tracked"] > 0 and sd["head.1.weight"].abs().sum() > 0
    assert isinstance(res.model.head[0], nn.BatchNorm1d) and res.model.head[0].affine is False


def test_cli_finetune_and_linprobe(tmp_path, pretrained, capsys):
    small = ["--train-subset", "128", "--val-size", "100", "--batch-size", "32", "--epochs", "1", "--eval-images", "32",
             "--no-progress", "--device", "cpu", "--init", str(pretrained / "model.safetensors")]
    assert main(["finetune", "--config", "fashion_mnist_cr", *small, "--output-dir", str(tmp_path / "f")]) == 0
    assert main(["linprobe", "--config", "fashion_mnist", *small, "--output-dir", str(tmp_path / "l")]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning (cr, m=2)" in out and "linear probe of" in out and "test_acc@0.25" in out
    assert main(["finetune", *small, "--sigma", "-1", "--output-dir", str(tmp_path / "x")]) == 2
    assert "sigma must be a number >= 0" in capsys.readouterr().err
