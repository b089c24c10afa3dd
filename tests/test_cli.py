import subprocess
import sys

import pytest
import yaml
from PIL import Image

from dmae.cli import main

from conftest import PICO

TINY = ["--model", PICO, "--train-subset", "128", "--batch-size", "32", "--eval-images", "16", "--no-progress",
        "--device", "cpu"]


def test_models_lists_presets_and_configs(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "dmae_vit_base_patch16_dec512d8b" in out and "dmae_vit_large_patch16_dec512d8b" in out
    assert "demo" in out and "imagenet_vit_base" in out


def test_every_option_has_help():
    out = subprocess.run([sys.executable, "-m", "dmae", "pretrain", "--help"], capture_output=True, text=True).stdout
    for flag in ("--sigma", "--mask-ratio", "--loss", "--norm-pix-loss", "--blr", "--accum-iter", "--resume",
                 "--stop-after", "--init", "--betas", "--precision"):
        assert flag in out
    assert "(default: 0.75)" in out


def test_pretrain_preset_then_flags_then_resume_then_visualize(tmp_path, capsys):
    run = tmp_path / "run"
    # the demo preset, with flags on top; stop after 2 of 4 steps
    assert main(["pretrain", "--config", "demo", *TINY, "--output-dir", str(run), "--stop-after", "2"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"] == PICO and saved["norm_pix_loss"] is False and saved["lr"] == 0.001  # flag, preset, preset
    # resuming needs only the folder: the rest comes from the saved config
    assert main(["pretrain", "--output-dir", str(run), "--resume"]) == 0
    assert (run / "model.safetensors").exists()
    png = tmp_path / "fig.png"
    assert main(["visualize", "--checkpoint", str(run), "--num", "3", "--out", str(png), "--device", "cpu"]) == 0
    w, h = Image.open(png).size
    assert w > 300 and h > 200


@pytest.mark.parametrize("args,message", [
    (["--mask-ratio", "1.0"], "mask_ratio must be in [0, 1)"),
    (["--sigma", "-0.5"], "sigma must be a number >= 0 (std of the noise in [0, 1] pixel units), got -0.5"),
    (["--model", "vit_nope"], "unknown model 'vit_nope'"),
    (["--config", "no_such_preset"], "unknown pretrain preset 'no_such_preset'"),
])
def test_bad_options_exit_2_with_the_value(tmp_path, capsys, args, message):
    assert main(["pretrain", *TINY, "--output-dir", str(tmp_path / "r"), *args]) == 2
    assert message in capsys.readouterr().err


def test_unknown_data_set_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--data", "mnist"])
    assert e.value.code == 2 and "invalid choice: 'mnist'" in capsys.readouterr().err


def test_missing_checkpoint_and_resume(tmp_path, capsys):
    assert main(["visualize", "--checkpoint", str(tmp_path / "nope.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["pretrain", "--output-dir", str(tmp_path / "empty"), "--resume"]) == 2
    assert "no run in" in capsys.readouterr().err
