import argparse
import json

import pytest
import timm
import torch
import yaml
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from conftest import PICO
from dmae.checkpoint import CheckpointError, load_classifier, read_metadata, read_weights, safe_load
from dmae.cli import main
from dmae.training.engine import build_scheduler
from dmae.training.finetune import FinetuneConfig, LinprobeConfig, build_finetune_optimizer, finetune
from dmae.training.pretrain import PretrainConfig, pretrain


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    pretrain(
        PretrainConfig(
            model=PICO,
            train_subset=256,
            batch_size=64,
            epochs=1,
            eval_images=16,
            progress=False,
            device="cpu",
            output_dir=str(out),
        )
    )
    return out


def _ft(tmp_path, name="ft", **over):
    kw = dict(
        train_subset=256,
        val_size=200,
        batch_size=32,
        epochs=2,
        warmup_epochs=0.5,
        eval_images=64,
        log_every=2,
        progress=False,
        device="cpu",
        output_dir=str(tmp_path / name),
    )
    kw.update(over)
    cls = LinprobeConfig if kw.pop("linprobe_cfg", False) else FinetuneConfig
    return finetune(cls(**kw))


# ----------------------------------------------------------------------------- recipe pieces
def test_layer_decay_scales_follow_the_rule():
    model, _ = load_classifier(None, 10, model=PICO)  # depth 2
    decay, depth = 0.65, 2
    opt = build_finetune_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=decay)
    scale = {
        n: g["lr_scale"]
        for g in opt.param_groups
        for n, p in model.named_parameters()
        if any(p is q for q in g["params"])
    }
    layer = {
        "cls_token": 0,
        "pos_embed": 0,
        "patch_embed.proj.weight": 0,
        "blocks.0.attn.qkv.weight": 1,
        "blocks.1.mlp.fc2.bias": 2,
        "fc_norm.weight": depth + 1,
        "head.weight": depth + 1,
        "head.bias": depth + 1,
    }
    for name, lyr in layer.items():
        assert scale[name] == pytest.approx(decay ** (depth + 1 - lyr)), name
    wd = {
        n: g["weight_decay"]
        for g in opt.param_groups
        for n, p in model.named_parameters()
        if any(p is q for q in g["params"])
    }
    assert wd["cls_token"] == wd["pos_embed"] == wd["blocks.0.norm1.weight"] == wd["head.bias"] == 0.0
    assert wd["blocks.0.attn.qkv.weight"] == wd["head.weight"] == 0.05
    # the scheduler applies each group's scale exactly once
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2, min_lr=0.0)
    sched.step_update(2)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])


# ----------------------------------------------------------------------------- official checkpoints
def _official(tmp_path, model: nn.Module, name: str):
    path = tmp_path / name
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": {},
            "epoch": 99,
            "scaler": {},
            "args": argparse.Namespace(model="vit_base_patch16", global_pool=True),
        },
        path,
    )
    return path


@pytest.mark.slow
def test_official_finetuned_checkpoint_loads_whole(tmp_path):
    ref = timm.create_model("vit_base_patch16_224", global_pool="avg", num_classes=1000)  # the official layout
    assert "fc_norm.weight" in ref.state_dict()
    assert "norm.weight" not in ref.state_dict()
    path = _official(tmp_path, ref, "finetuned.pth")
    model, report = load_classifier(path, 1000, pool="avg")
    assert report.missing == []
    assert report.unexpected == []
    assert report.ignored == []
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(model.preprocess(x)), atol=1e-4)
    with pytest.raises(CheckpointError, match="classifies 1000 classes, the data set has 10"):
        load_classifier(path, 10, pool="avg")


def test_official_linear_probe_checkpoint_loads_whole(tmp_path):
    ref = VisionTransformer(
        img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, global_pool="token", num_classes=10
    )
    ref.head = nn.Sequential(nn.BatchNorm1d(32, affine=False, eps=1e-6), ref.head)  # as the linear-probe code does
    keys = set(ref.state_dict())
    assert {"head.0.running_mean", "head.1.weight", "norm.weight"} <= keys
    model, report = load_classifier(_official(tmp_path, ref, "linprobe.pth"), 10, pool="token")
    assert report.missing == []
    assert report.unexpected == []
    assert set(model.state_dict()) == keys


@pytest.mark.slow
def test_pretrained_encoder_contributes_encoder_only(pretrained):
    model, report = load_classifier(pretrained / "checkpoint.pt", 10, pool="avg")
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report.unexpected == []
    assert any(k.startswith("decoder") for k in report.ignored)
    enc = safe_load(pretrained / "checkpoint.pt")["model"]
    assert torch.equal(model.blocks[1].attn.qkv.weight, enc["blocks.1.attn.qkv.weight"])
    assert model.head.weight.std() < 1e-4  # fresh head, init std 2e-5


@pytest.mark.slow
def test_bad_init_fails_clearly(tmp_path, pretrained):
    with pytest.raises(FileNotFoundError, match=r"--init .*nope\.pth does not exist"):
        _ft(tmp_path, init=str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match="not --model dmae_vit_tiny_patch4_dec128d2b"):
        _ft(tmp_path, init=str(pretrained / "model.safetensors"), model="dmae_vit_tiny_patch4_dec128d2b")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        _ft(tmp_path, init=str(bad))
    with pytest.raises(ValueError, match=r"give --init .* or --model"):
        _ft(tmp_path)


# ----------------------------------------------------------------------------- the job
@pytest.mark.slow
def test_finetune_resumes_exactly_and_selects_on_held_out(tmp_path, pretrained):
    init = str(pretrained / "model.safetensors")
    full = _ft(tmp_path, "full", init=init)
    assert full.finished
    assert full.total_steps == 16  # 256 images in batches of 32, 2 epochs
    a = _ft(tmp_path, "split", init=init, stop_after=5)
    assert a.step == 5
    stopped = safe_load(tmp_path / "split" / "checkpoint.pt")
    assert stopped["step"] == 5
    assert stopped["epoch"] == 0  # 5 of the first epoch's 8 steps
    b = _ft(tmp_path, "split", init=init, resume=True)
    assert b.losses[0][0] == 6  # the resumed call starts at the step after the saved one
    assert a.losses + b.losses == full.losses
    assert _same_weights(b.model.state_dict(), full.model.state_dict())
    # the selected epoch is the one with the best held-out accuracy (the first of equals), whatever the test split says
    selected = max(full.evals, key=lambda row: row["val_acc@0.25"])
    assert full.best == {k: v for k, v in selected.items() if k != "step"}
    assert b.best == full.best
    # the run folder says what the run did
    run = tmp_path / "full"
    saved = safe_load(run / "checkpoint.pt")
    assert saved["step"] == 16
    assert saved["epoch"] == 2
    assert saved["config"]["sigma"] == 0.25
    assert saved["best"] == full.best  # what a resume selects against
    assert _same_weights(saved["model"], full.model.state_dict())
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["sigma"] == 0.25
    assert config["epochs"] == 2
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [row for row in log if row["type"] == "eval"]
    assert [row["step"] for row in evals] == [8, 16]  # one evaluation per epoch
    assert [row["val_acc@0.25"] for row in evals] == [row["val_acc@0.25"] for row in full.evals]
    assert _same_weights(read_weights(run / "model_last.safetensors")[0], full.model.state_dict())
    assert read_metadata(run / "model_best.safetensors")["epoch"] == str(round(full.best["epoch"]))
    for name in ("model_best.safetensors", "model_last.safetensors"):  # the training noise travels with the weights
        assert read_metadata(run / name)["trained_sigma"] == "0.25"
    # without a held-out split nothing is selected (the test set never chooses a checkpoint)
    none = _ft(tmp_path, "noval", init=init, val_size=0, epochs=1)
    assert none.best is None
    assert not (tmp_path / "noval" / "model_best.safetensors").exists()


def _same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_rs_and_many_sigma(tmp_path, pretrained):
    res = _ft(tmp_path, init=str(pretrained / "model.safetensors"), method="rs", sigma_range=(0.0, 0.75), epochs=1)
    assert set(res.evals[-1]) >= {"test_acc@0.25", "test_acc@0.5", "test_acc@0.75", "val_acc@0.25"}
    assert read_metadata(tmp_path / "ft" / "model_last.safetensors")["trained_sigma"] == "[0.0, 0.75]"


@pytest.mark.slow
def test_linprobe_trains_only_the_head(tmp_path, pretrained):
    res = _ft(tmp_path, init=str(pretrained / "checkpoint.pt"), linprobe_cfg=True, epochs=1, batch_size=64)
    enc = safe_load(pretrained / "checkpoint.pt")["model"]
    sd = res.model.state_dict()
    assert all(torch.equal(sd[k], enc[k]) for k in sd if k in enc)  # frozen encoder, norm included
    assert sd["head.0.num_batches_tracked"] > 0
    assert sd["head.1.weight"].abs().sum() > 0
    assert isinstance(res.model.head[0], nn.BatchNorm1d)
    assert res.model.head[0].affine is False


@pytest.mark.slow
def test_cli_finetune_and_linprobe(tmp_path, pretrained, capsys):
    small = [
        "--train-subset",
        "128",
        "--val-size",
        "100",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--eval-images",
        "32",
        "--no-progress",
        "--device",
        "cpu",
        "--init",
        str(pretrained / "model.safetensors"),
    ]
    assert main(["finetune", "--config", "fashion_mnist_cr", *small, "--output-dir", str(tmp_path / "f")]) == 0
    assert main(["linprobe", "--config", "fashion_mnist", *small, "--output-dir", str(tmp_path / "l")]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning (cr, m=2)" in out
    assert "linear probe of" in out
    assert "test_acc@0.25" in out
    assert main(["finetune", *small, "--sigma", "-1", "--output-dir", str(tmp_path / "x")]) == 2
    assert "sigma must be a number >= 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- loading and data (field faults)
@pytest.mark.slow
def test_init_takes_a_run_folder_like_certify_and_visualize(tmp_path, pretrained, capsys):
    """`dmae finetune --config fashion_mnist_cr --init RUN_FOLDER`, as the README shows it."""
    small = [
        "--train-subset",
        "64",
        "--val-size",
        "100",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--eval-images",
        "16",
        "--warmup-epochs",
        "0.5",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert (
        main(
            [
                "finetune",
                "--config",
                "fashion_mnist_cr",
                "--init",
                str(pretrained),
                *small,
                "--output-dir",
                str(tmp_path / "f"),
            ]
        )
        == 0
    )
    assert f"weights from {pretrained}" in capsys.readouterr().out
    assert main(["finetune", "--init", str(tmp_path / "empty"), *small, "--output-dir", str(tmp_path / "g")]) == 2
    assert "--init" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["finetune", "--init", str(tmp_path / "empty"), *small, "--output-dir", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert "holds none of model.safetensors, model_best.safetensors, model_last.safetensors, checkpoint.pt" in err


@pytest.mark.slow
def test_small_presets_follow_an_rgb_folder(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("val", 4)):
        for c in ("a", "b"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(n // 2):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    res = _ft(
        tmp_path,
        model=PICO,
        data="folder",
        data_root=str(tmp_path / "data"),
        img_size=28,
        val_size=8,
        train_subset=None,
        batch_size=16,
        epochs=1,
        eval_images=4,
    )
    assert res.finished
    assert res.model.config.encoder.in_chans == 3


@pytest.mark.slow
def test_another_input_size_resamples_learned_positions(tmp_path, pretrained):
    ft = _ft(tmp_path, "ft28", init=str(pretrained / "model.safetensors"), epochs=1)
    learned = ft.model.pos_embed.detach().clone()  # fine-tuned: no longer sin-cos
    model, report = load_classifier(tmp_path / "ft28", 10, img_size=32)
    assert report.positions == ["pos_embed: learned 7x7 positions resampled to 8x8 (bicubic)"]
    from timm.layers import resample_abs_pos_embed

    assert torch.allclose(model.pos_embed, resample_abs_pos_embed(learned, [8, 8], [7, 7], num_prefix_tokens=1))
    # a pretrained encoder's fixed sin-cos positions are recomputed exactly for the new grid
    model, report = load_classifier(pretrained / "model.safetensors", 10, img_size=32)
    assert report.positions == ["pos_embed: sin-cos for the 8x8 grid (the file's are the 7x7 sin-cos)"]


def test_non_finite_logits_are_never_a_class_in_the_accuracy():
    """argmax of NaN logits is 0: on images of class 0 a NaN model would score 100% if they counted."""
    from torch.utils.data import TensorDataset

    from dmae.training.finetune import noisy_accuracy

    class NaNModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(x.shape[0], 10)
            out[::2] = float("nan")  # half the images
            return out

    data = TensorDataset(torch.rand(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
    assert noisy_accuracy(NaNModel(), data, 0.25, seed=0, precision="fp32") == 0.5


# ----------------------------------------------------------------------------- small grey folders with the defaults
def _grey_folder(root, classes=(1, 8), train=120, val=20, random_labels=False):
    """An ImageFolder of Fashion-MNIST images of ``classes`` as grey 28-px PNGs (``train`` / ``val`` per split);
    ``random_labels``: noise images whose class says nothing."""
    import numpy as np
    from PIL import Image

    from dmae.data import build_dataset

    rng = np.random.default_rng(0)
    for split, src, n in (("train", "train", train), ("val", "test", val)):
        ds = build_dataset("fashion-mnist", src)
        idx = [i for i in range(len(ds)) if int(ds.targets[i]) in classes][:n]
        for k, i in enumerate(idx):
            label = int(rng.integers(len(classes))) if random_labels else classes.index(int(ds.targets[i]))
            d = root / split / f"c{label}"
            d.mkdir(parents=True, exist_ok=True)
            img = rng.integers(0, 256, (28, 28), dtype=np.uint8) if random_labels else ds.images[i, 0].numpy()
            Image.fromarray(img, mode="L").save(d / f"{k:04d}.png")
    return root


@pytest.mark.slow
def test_issue_example_small_grey_folder_with_defaults_adapts_and_runs(tmp_path, pretrained, capsys):
    # issue 19: `dmae finetune --init PRETRAINED --sigma 0.25 --epochs 3` on a small grey folder was refused
    # (--warmup-epochs 5.0 exceeds --epochs 3; then --val-size 5000 leaves no training images), and the folder
    # came as 3 channels to a 1-channel model
    root = _grey_folder(tmp_path / "data")
    out = tmp_path / "ft"
    argv = [
        "finetune",
        "--data",
        "folder",
        "--data-root",
        str(root),
        "--init",
        str(pretrained),
        "--sigma",
        "0.25",
        "--epochs",
        "3",
        "--output-dir",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "adapted to 108 training images" in printed
    for line in (
        "--val-size 5000 -> 12 (10% of the 120 training images",
        "--warmup-epochs 5 -> 0.3 (10% of 3 epochs",
        "--batch-size 64 -> 54 (44 of 108 images would be left out",
        "--lr 0.000105 -> 0.002 (blr 0.0005 x 54 / 256 scales the recipe's batch-1024 lr down",
    ):
        assert line in printed

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["val_size"], saved["warmup_epochs"], saved["batch_size"]) == (12, 0.3, 54)
    assert saved["lr"] == pytest.approx(2e-3)  # a small model keeps the recipe's lr (blr 5e-4 x 1024 / 256)
    assert "# adapted to 108 training images" in (out / "config.yaml").read_text()
    model, _ = load_classifier(out / "model_best.safetensors", 2)
    assert model.config.encoder.in_chans == 1
    # an option given is never adapted, and a given one that cannot fit is refused naming the flag
    assert (
        main(
            [*argv[:-5], "--output-dir", str(tmp_path / "ft2"), "--val-size", "200", "--device", "cpu", "--no-progress"]
        )
        == 2
    )
    assert "--val-size 200 leaves no training images out of 120; give a smaller --val-size" in capsys.readouterr().err


def test_a_run_that_stays_near_chance_says_so_loudly_and_records_it(tmp_path, capsys):
    import json

    from dmae.training.finetune import near_chance

    root = _grey_folder(tmp_path / "data", train=100, val=10, random_labels=True)
    res = finetune(
        FinetuneConfig(
            model=PICO,
            data="folder",
            data_root=str(root),
            sigma=0.25,
            epochs=1,
            val_size=40,
            progress=False,
            device="cpu",
            output_dir=str(tmp_path / "ft"),
        )
    )
    assert len(res.warnings) == 1
    assert "near chance (50.0% for 2 classes" in res.warnings[0]
    err = capsys.readouterr().err
    assert (
        "dmae finetune: WARNING: held-out accuracy (best epoch, 40 training images) under noise (sigma=0.25) is" in err
    )
    assert "raise --epochs or --lr / --blr" in err
    assert "--sigma" in err
    rows = [json.loads(ln) for ln in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert [r["message"] for r in rows if r["type"] == "warning"] == res.warnings
    # the threshold: twice chance (chance + 10 points for few classes), never within 3 standard errors of chance
    assert near_chance(0.105, 10, 200) == (True, pytest.approx(0.2))
    assert not near_chance(0.37, 10, 200)[0]
    assert near_chance(0.55, 2, 1000)[1] == pytest.approx(0.6)
    assert near_chance(0.7, 2, 12)[0]  # 12 images cannot tell 70% from a coin
    assert near_chance(0.003, 1000, 50_000)[1] == pytest.approx(0.002)
