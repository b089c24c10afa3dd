import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import PICO
from dmae.checkpoint import load_dmae, safe_load
from dmae.models import create_model
from dmae.training.engine import build_scheduler
from dmae.training.pretrain import PretrainConfig, build_optimizer, pretrain


def _run(kw, **over):
    return pretrain(PretrainConfig(**{**kw, **over}))


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tiny_pretrain_kwargs, tmp_path):
    kw = tiny_pretrain_kwargs  # 256 images / 32 = 8 steps per epoch, 2 epochs
    full = _run(kw, output_dir=str(tmp_path / "full"))
    assert full.finished
    assert full.step == 16
    assert [s for s, _ in full.losses] == list(range(1, 17))

    split = str(tmp_path / "split")
    a = _run(kw, output_dir=split, stop_after=5)  # mid-epoch
    assert a.step == 5
    assert not a.finished
    b = _run(kw, output_dir=split, stop_after=11, resume=True)  # crosses the epoch boundary
    c = _run(kw, output_dir=split, resume=True)
    assert c.finished
    assert a.losses + b.losses + c.losses == full.losses  # bit-identical, step by step

    sd_full = safe_load(tmp_path / "full" / "checkpoint.pt")["model"]
    sd_split = safe_load(Path(split) / "checkpoint.pt")["model"]
    assert all(torch.equal(sd_full[k], sd_split[k]) for k in sd_full)
    steps = [
        json.loads(ln)["step"]
        for ln in (Path(split) / "log.jsonl").read_text().splitlines()
        if json.loads(ln)["type"] == "train"
    ]
    assert steps == sorted(set(steps))  # nothing logged twice


@pytest.mark.slow
def test_resume_with_gradient_accumulation(tiny_pretrain_kwargs, tmp_path):
    kw = {**tiny_pretrain_kwargs, "batch_size": 16, "accum_iter": 2, "epochs": 1}
    full = _run(kw, output_dir=str(tmp_path / "full"))
    assert full.total_steps == 8
    a = _run(kw, output_dir=str(tmp_path / "s"), stop_after=3)
    b = _run(kw, output_dir=str(tmp_path / "s"), resume=True)
    assert a.losses + b.losses == full.losses


@pytest.mark.slow
def test_run_folder_contents_and_learning(tiny_pretrain_kwargs, tmp_path):
    res = _run(tiny_pretrain_kwargs, epochs=3, norm_pix_loss=False)
    out = Path(res.output_dir)
    assert {"config.yaml", "model_config.json", "checkpoint.pt", "model.safetensors", "log.jsonl", "tb"} <= {
        p.name for p in out.iterdir()
    }
    assert res.eval_start is not None
    assert res.eval_end is not None
    assert res.eval_end["loss"] < res.eval_start["loss"]
    assert res.eval_end["mse"] < res.eval_start["mse"]
    exported, _ = load_dmae(out / "model.safetensors")
    for k, v in safe_load(out / "checkpoint.pt")["model"].items():
        assert torch.equal(exported.state_dict()[k], v)
    assert exported.config.in_chans == 1
    assert exported.config.mean == (0.2860,)  # fitted to the data


@pytest.mark.slow
def test_existing_run_is_not_overwritten_and_resume_checks_options(tiny_pretrain_kwargs):
    _run(tiny_pretrain_kwargs, stop_after=2)
    with pytest.raises(FileExistsError, match="already holds a run; pass --resume"):
        _run(tiny_pretrain_kwargs)
    with pytest.raises(ValueError, match=r"options differ from the saved run \(sigma: 0.25 -> 0.5\)"):
        _run(tiny_pretrain_kwargs, sigma=0.5, resume=True)


@pytest.mark.slow
def test_mae_switch_trains(tiny_pretrain_kwargs):
    res = _run(tiny_pretrain_kwargs, sigma=0.0, loss="masked", epochs=1)
    assert res.finished
    assert res.eval_start["noisy_mse"] == 0.0
    assert all(math.isfinite(v) for _, v in res.losses)


def test_lr_schedule_warmup_then_cosine():
    model = create_model(PICO)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    sched = build_scheduler(opt, total_steps=100, warmup_steps=10, min_lr=1e-5)
    lrs = []
    for s in range(101):
        sched.step_update(s)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(5e-4)
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs[100] == pytest.approx(1e-5)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_weight_decay_groups():
    model = create_model(PICO)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"cls_token", "mask_token", "norm.weight", "blocks.0.attn.qkv.bias", "decoder_norm.bias"} <= no_decay
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "decoder_pred.weight"} <= decay
    assert all(p.ndim > 1 for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"])
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


@pytest.mark.parametrize(
    "over,message",
    [
        ({"mask_ratio": 1.0}, r"mask_ratio must be in \[0, 1\).*1.0"),
        ({"mask_ratio": -0.2}, r"mask_ratio must be in \[0, 1\).*-0.2"),
        ({"sigma": -1.0}, r"sigma must be a number >= 0.*-1.0"),
        ({"model": "vit_giant"}, "unknown model 'vit_giant'"),
        ({"data": "mnist"}, "unknown data set 'mnist'"),
        ({"epochs": 0}, "--epochs must be >= 1, got 0"),
        ({"warmup_epochs": 5.0, "epochs": 2}, "--warmup-epochs 5.0 exceeds --epochs 2"),
        ({"batch_size": 1000}, "too few for batch size 1000"),
    ],
)
def test_bad_configs_fail_clearly(tiny_pretrain_kwargs, over, message):
    with pytest.raises(ValueError, match=message):
        _run(tiny_pretrain_kwargs, **over)


@pytest.mark.slow
def test_a_diverged_run_stops_without_saving(tiny_pretrain_kwargs, tmp_path):
    with pytest.raises(FloatingPointError, match="the run diverged, nothing was saved"):
        _run(tiny_pretrain_kwargs, lr=1e30, warmup_epochs=0.0, log_every=1, save_every=1)
    ckpt_file = Path(tiny_pretrain_kwargs["output_dir"]) / "checkpoint.pt"
    if ckpt_file.exists():  # any checkpoint written before the divergence holds finite weights only
        assert all(torch.isfinite(v).all() for v in safe_load(ckpt_file)["model"].values())
    assert not (Path(tiny_pretrain_kwargs["output_dir"]) / "model.safetensors").exists()


@pytest.mark.slow
def test_resume_refuses_other_training_data(tiny_pretrain_kwargs, tmp_path):
    import shutil

    root = tmp_path / "fm"
    shutil.copytree("/usr/share/datasets/fashion-mnist", root)
    _run(tiny_pretrain_kwargs, data_root=str(root), stop_after=2)
    import gzip

    import numpy as np

    from dmae.data import read_idx

    images = read_idx(root / "train-images-idx3-ubyte.gz").copy()
    images[0] = 255 - images[0]  # the same path, other data
    header = root / "train-images-idx3-ubyte.gz"
    with gzip.open(header) as f:
        raw = f.read()[:16]
    with gzip.open(header, "wb") as f:
        f.write(raw + np.ascontiguousarray(images).tobytes())
    with pytest.raises(
        ValueError, match="the data or the --init weights differ from the saved run \\(data_fingerprint"
    ):
        _run(tiny_pretrain_kwargs, data_root=str(root), resume=True)


@pytest.mark.slow
def test_small_grey_folder_with_defaults(tmp_path, capsys):
    # a grey ImageFolder gives a small preset 1-channel input (it was 3), and the defaults fit 60 images
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(30):
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(d / f"{i}.png")
    res = pretrain(
        PretrainConfig(
            model=PICO,
            data="folder",
            data_root=str(tmp_path / "data"),
            epochs=2,
            progress=False,
            device="cpu",
            output_dir=str(tmp_path / "run"),
        )
    )
    assert res.finished
    assert json.loads((tmp_path / "run" / "model_config.json").read_text())["in_chans"] == 1
    changes = {a.option: (a.old, a.new) for a in res.adapted}
    assert changes["warmup_epochs"] == (1.0, 0.2)
    assert changes["batch_size"] == (64, 60)  # 60 images: no full batch
    assert changes["lr"] == (pytest.approx(1.5e-4 * 60 / 256), pytest.approx(1.5e-4 * 4096 / 256))  # a small model
    assert "adapted to 60 training images" in capsys.readouterr().out
