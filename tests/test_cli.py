import subprocess
import sys

import pytest
import yaml
from PIL import Image

from conftest import PICO
from dmae.cli import main

TINY = [
    "--model",
    PICO,
    "--train-subset",
    "128",
    "--batch-size",
    "32",
    "--eval-images",
    "16",
    "--no-progress",
    "--device",
    "cpu",
]


def test_models_lists_presets_and_configs(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "dmae_vit_base_patch16_dec512d8b" in out
    assert "dmae_vit_large_patch16_dec512d8b" in out
    assert "demo" in out
    assert "imagenet_vit_base" in out


@pytest.mark.slow
def test_every_option_has_help():
    out = subprocess.run([sys.executable, "-m", "dmae", "pretrain", "--help"], capture_output=True, text=True).stdout
    for flag in (
        "--sigma",
        "--mask-ratio",
        "--loss",
        "--norm-pix-loss",
        "--blr",
        "--accum-iter",
        "--resume",
        "--stop-after",
        "--init",
        "--betas",
        "--precision",
    ):
        assert flag in out
    assert "(default: 0.75)" in out
    out = subprocess.run([sys.executable, "-m", "dmae", "experiment", "--help"], capture_output=True, text=True).stdout
    flat = " ".join(out.split())  # argparse wraps the help text
    assert "(default: runs/NAME, runs/NAME-smoke with --smoke)" in flat
    assert "(default: False)" in flat
    assert "(default: None)" not in flat
    assert "(default: )" not in flat
    assert ") (default:" not in flat
    out = subprocess.run([sys.executable, "-m", "dmae", "certify", "--help"], capture_output=True, text=True).stdout
    assert "(default: None)" not in out
    assert "--config CONFIG" in out


@pytest.mark.slow
def test_output_cut_short_by_its_reader_is_not_an_error(tmp_path):
    """`dmae report LOG | head -1`: the reader stops early; dmae ends quietly (exit 0, no traceback)."""
    log = tmp_path / "certify_sigma0.25.tsv"
    log.write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\n" + "".join(f"{i}\t1\t1\t0.3\t1\t0\n" for i in range(5))
    )
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dmae",
            "report",
            str(log),
            str(log),
            str(log),
            "--radii",
            *[str(r / 100) for r in range(200)],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdout.close()  # the reader is gone before dmae writes
    err = p.stderr.read().decode()
    assert p.wait() == 0, err
    assert "Traceback" not in err, err


@pytest.mark.slow
def test_pretrain_preset_then_flags_then_resume_then_visualize(tmp_path, capsys):
    run = tmp_path / "run"
    # the demo preset, with flags on top (TINY); stop after 2 steps, then resume to the end
    assert main(["pretrain", "--config", "demo", *TINY, "--output-dir", str(run), "--stop-after", "2"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"] == PICO  # from the flag
    assert saved["norm_pix_loss"] is False  # from the preset
    assert saved["lr"] == 0.001  # from the preset
    # resuming needs only the folder: the rest comes from the saved config
    assert main(["pretrain", "--output-dir", str(run), "--resume"]) == 0
    assert (run / "model.safetensors").exists()
    png = tmp_path / "fig.png"
    assert main(["visualize", "--checkpoint", str(run), "--num", "3", "--out", str(png), "--device", "cpu"]) == 0
    w, h = Image.open(png).size
    assert w > 300
    assert h > 200


@pytest.mark.parametrize(
    "args,message",
    [
        (["--mask-ratio", "1.0"], "mask_ratio must be in [0, 1)"),
        (["--sigma", "-0.5"], "sigma must be a number >= 0 (std of the noise in [0, 1] pixel units), got -0.5"),
        (["--model", "vit_nope"], "unknown model 'vit_nope'"),
        (["--config", "no_such_preset"], "unknown pretrain preset 'no_such_preset'"),
    ],
)
def test_bad_options_exit_2_with_the_value(tmp_path, capsys, args, message):
    assert main(["pretrain", *TINY, "--output-dir", str(tmp_path / "r"), *args]) == 2
    assert message in capsys.readouterr().err


def test_unknown_data_set_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--data", "mnist"])
    assert e.value.code == 2
    assert "invalid choice: 'mnist'" in capsys.readouterr().err


def test_missing_checkpoint_and_resume(tmp_path, capsys):
    assert main(["visualize", "--checkpoint", str(tmp_path / "nope.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["pretrain", "--output-dir", str(tmp_path / "empty"), "--resume"]) == 2
    assert "no run in" in capsys.readouterr().err


def _subcommands():
    import argparse

    from dmae.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


@pytest.mark.distributed
def test_every_option_of_every_command_passes_through_torchrun():
    """torchrun's parser takes an unambiguous prefix of its own options (--n, --max, --num ...) for its own:
    every option must have a spelling that reaches dmae, and that spelling must set the option."""
    from torch.distributed.run import get_args_parser

    launcher = get_args_parser()
    parser, commands = _subcommands()
    unusable = []
    for name, sub in commands.items():
        for action in sub._actions:
            flags = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
            if not flags:
                continue
            value = [] if action.nargs == 0 else ["1"] * (action.nargs if isinstance(action.nargs, int) else 1)
            usable = []
            for flag in flags:
                argv = ["--nproc-per-node", "2", "-m", "dmae", name, flag, *value]
                try:
                    ns = launcher.parse_args(argv)
                except SystemExit:
                    continue
                if ns.training_script_args == [name, flag, *value]:
                    usable.append(flag)
            if not usable:
                unusable.append(f"{name} {'/'.join(flags)}")
    assert not unusable, f"options torchrun swallows: {unusable}"
    # the aliases set the same option
    ns = parser.parse_args(["certify", "--max-images", "3", "--num-samples", "50"])
    assert ns.max == 3
    assert ns.n == 50
    assert parser.parse_args(["visualize", "--num-images", "2"]).num == 2


@pytest.mark.parametrize(
    "argv,message",
    [
        (["certify", "--checkpoint", "x", "--sigma", "inf"], "--sigma must be a finite number, got inf"),
        (["certify", "--checkpoint", "x", "--sigma", "nan"], "sigma must be > 0, got nan"),
        (["certify", "--checkpoint", "x", "--alpha", "nan"], "alpha must be in (0, 0.5), got nan"),
        (["predict", "--checkpoint", "x", "--n", "-5"], "--n must be >= 1, got -5"),
        (["report", "r.tsv", "--radii", "-1"], "--radii must be >= 0, got -1.0"),
        (["report", "r.tsv", "--radii", "nan"], "--radii must be >= 0, got nan"),
        (["visualize", "--checkpoint", "x", "--num", "0"], "--num must be >= 1, got 0"),
        (["visualize", "--checkpoint", "x", "--sigma", "inf"], "sigma must be a number >= 0"),
        (["demo", "--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["pretrain", "--blr", "inf"], "--blr must be a finite number, got inf"),
        (["pretrain", "--lr", "-1"], "--lr must be > 0, got -1.0"),
        (["pretrain", "--sigma", "inf"], "sigma must be a number >= 0"),
        (["pretrain", "--betas", "0.9", "1.5"], "--betas must be in [0, 1), got 1.5"),
        (["pretrain", "--clip-grad", "0"], "--clip-grad must be > 0, got 0.0"),
        (["finetune", "--model", PICO, "--layer-decay", "0"], "--layer-decay must be in (0, 1], got 0.0"),
        (["finetune", "--model", PICO, "--drop-path", "nan"], "--drop-path must be a finite number, got nan"),
        (["finetune", "--model", PICO, "--sigma-range", "0", "inf"], "--sigma-range must be a finite number, got inf"),
        (["finetune", "--model", PICO, "--sigma-range", "0.5", "0.2"], "sigma range must satisfy"),
        (["finetune", "--model", PICO, "--eval-sigmas", "0.25", "-1"], "sigma must be a number >= 0"),
        (["linprobe", "--model", PICO, "--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
    ],
)
def test_every_numeric_option_is_checked_for_finiteness_and_range(tmp_path, capsys, argv, message):
    assert (
        main(
            [
                *argv,
                *(
                    ["--output-dir", str(tmp_path / "o")]
                    if argv[0] in ("pretrain", "finetune", "linprobe", "certify", "predict", "demo")
                    else []
                ),
            ]
        )
        == 2
    )
    assert message in capsys.readouterr().err
