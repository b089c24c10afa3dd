"""Typed options: declarations, validation messages, command-line flags, presets and overrides."""

import argparse
from dataclasses import dataclass
from typing import Literal

import pytest
import yaml

from conftest import PICO
from dmae.certification.runner import CertifyConfig
from dmae.config import (
    Options,
    add_dataclass_arguments,
    build_config,
    default,
    field_meta,
    list_presets,
    load_values,
    option,
    preset_path,
    save_config,
    to_dict,
)
from dmae.reporting.report import ReportConfig
from dmae.training.engine import TrainOptions
from dmae.training.finetune import FinetuneConfig, LinprobeConfig
from dmae.training.pretrain import PretrainConfig
from dmae.workflows.demo import DemoConfig


def _even(v):
    if v % 2:
        raise ValueError(f"not an even number: {v}")


@dataclass
class Toy(Options):
    epochs: int = option(10, "training epochs", low=1)
    ratio: float = option(0.5, "a fraction", low=0, high=1, high_open=True)
    rate: float = option(1.0, "a positive rate", low=0, low_open=True)
    prob: float = option(0.5, "strictly inside", low=0, high=1, low_open=True, high_open=True)
    cap: float = option(1.0, "at most one", high=1)
    betas: tuple[float, float] = option((0.9, 0.95), "a pair", low=0, high=1, high_open=True)
    sigmas: tuple[float, ...] | None = option(None, "one or more", low=0)
    mode: Literal["a", "b"] = option("a", "the mode")
    name: str = option("x", "a name", choices=("x", "y"))
    even: int = option(2, "an even number", check=_even)
    n: int = option(5, "samples", low=1, aliases=("--num-samples",))
    switch: bool = option(True, "a switch")
    limit: int | None = option(None, "an optional count", low=1)

    def check_combination(self):
        if self.epochs == 13:
            raise ValueError("unlucky --epochs")


@dataclass
class ToyChild(Toy):
    epochs: int = default(90)
    rate: float = default(0.1, "the rate, with a help line of its own")


def _parser(cls):
    p = argparse.ArgumentParser(prog="t")
    add_dataclass_arguments(p, cls)
    return p


def _actions(cls):
    return {a.dest: a for a in _parser(cls)._actions}


# ----------------------------------------------------------------------------- declarations
def test_option_records_its_declaration_and_copies_mutable_defaults():
    meta = field_meta(Toy, "ratio")
    assert (meta["help"], meta["low"], meta["high"]) == ("a fraction", 0, 1)
    assert (meta["low_open"], meta["high_open"]) == (False, True)
    assert field_meta(Toy, "name")["choices"] == ("x", "y")
    assert field_meta(Toy, "n")["aliases"] == ("--num-samples",)

    @dataclass
    class WithList(Options):
        items: list = option([1, 2], "a list")

    a, b = WithList(), WithList()
    a.items.append(3)
    assert b.items == [1, 2]  # one list per instance, not one shared by all


def test_default_redefines_only_the_default():
    assert (Toy().epochs, ToyChild().epochs) == (10, 90)
    assert field_meta(ToyChild, "epochs") == field_meta(Toy, "epochs")  # help and bounds inherited
    rate = field_meta(ToyChild, "rate")
    assert rate["help"] == "the rate, with a help line of its own"
    assert (rate["low"], rate["low_open"]) == (0, True)  # a new help line keeps the bounds
    with pytest.raises(ValueError, match=r"--epochs must be >= 1, got 0"):
        ToyChild(epochs=0).validate()
    with pytest.raises(ValueError, match=r"--rate must be > 0, got 0.0"):
        ToyChild(rate=0.0).validate()


def test_option_redeclared_in_a_subclass_drops_the_base_declaration():
    @dataclass
    class Redeclared(Toy):
        epochs: int = option(3, "other help")  # option(), not default(): nothing inherited

    assert field_meta(Redeclared, "epochs")["help"] == "other help"
    assert field_meta(Redeclared, "epochs")["low"] is None
    Redeclared(epochs=0).validate()


def test_linprobe_redefines_defaults_but_keeps_help_and_bounds():
    ft, lp = FinetuneConfig(), LinprobeConfig()
    assert (lp.blr, lp.epochs, lp.method, lp.linprobe, lp.warmup_epochs) == (0.1, 90, "rs", True, 10.0)
    assert (ft.blr, ft.epochs, ft.method, ft.linprobe) == (5e-4, 100, "cr", False)
    for name in ("blr", "epochs", "method", "linprobe", "warmup_epochs", "output_dir"):
        assert field_meta(LinprobeConfig, name)["help"] == field_meta(FinetuneConfig, name)["help"], name
    assert field_meta(LinprobeConfig, "blr") == field_meta(TrainOptions, "blr")
    # FinetuneConfig gives train_subset a help line of its own; its bound comes from TrainOptions
    sub = field_meta(FinetuneConfig, "train_subset")
    assert sub["help"] != field_meta(TrainOptions, "train_subset")["help"]
    assert sub["low"] == 1
    with pytest.raises(ValueError, match=r"--blr must be > 0, got 0.0"):
        LinprobeConfig(model=PICO, blr=0.0).validate()
    acts = _actions(LinprobeConfig)
    assert acts["blr"].help.endswith("(default: 0.1)")
    assert acts["epochs"].help.endswith("(default: 90)")
    assert acts["blr"].help.split(" (default")[0] == _actions(FinetuneConfig)["blr"].help.split(" (default")[0]


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "over,message",
    [
        ({"rate": float("nan")}, "--rate must be a finite number, got nan"),
        ({"rate": float("inf")}, "--rate must be a finite number, got inf"),
        ({"cap": float("-inf")}, "--cap must be a finite number, got -inf"),
        ({"epochs": 0}, "--epochs must be >= 1, got 0"),
        ({"ratio": 1.0}, "--ratio must be in [0, 1), got 1.0"),
        ({"ratio": -0.1}, "--ratio must be in [0, 1), got -0.1"),
        ({"prob": 0.0}, "--prob must be in (0, 1), got 0.0"),
        ({"rate": 0.0}, "--rate must be > 0, got 0.0"),
        ({"cap": 1.5}, "--cap must be <= 1, got 1.5"),
        ({"epochs": 2.5}, "--epochs must be an integer, got 2.5"),
        ({"epochs": True}, "--epochs must be an integer, got True"),
        ({"rate": "1"}, "--rate must be a number, got '1'"),
        ({"epochs": None}, "--epochs needs a value"),
        ({"betas": (0.9, 1.0)}, "--betas must be in [0, 1), got 1.0"),
        ({"betas": (0.9,)}, "--betas takes 2 values, got [0.9]"),
        ({"sigmas": ()}, "--sigmas needs at least one value"),
        ({"sigmas": (0.25, float("nan"))}, "--sigmas must be a finite number, got nan"),
        ({"sigmas": (0.25, -1.0)}, "--sigmas must be >= 0, got -1.0"),
        ({"mode": "c"}, "--mode must be one of a, b; got 'c'"),
        ({"name": "z"}, "--name must be one of x, y; got 'z'"),
        ({"even": 3}, "not an even number: 3"),
        ({"limit": 0}, "--limit must be >= 1, got 0"),
        ({"epochs": 13}, "unlucky --epochs"),  # the cross-field check runs after the field checks
    ],
)
def test_validate_names_the_flag_and_the_value(over, message):
    with pytest.raises(ValueError) as e:
        Toy(**over).validate()
    assert message in str(e.value)


def test_valid_values_pass():
    """Values on the closed side of each bound, ints for floats, and every choice are accepted."""
    Toy().validate()
    Toy(
        epochs=1,
        ratio=0.0,
        prob=0.999,
        cap=1,
        rate=1e-9,
        betas=(0.0, 0.5),
        sigmas=(0, 1.5),
        mode="b",
        name="y",
        even=4,
        limit=3,
    ).validate()


@pytest.mark.parametrize(
    "cfg,message",
    [
        (PretrainConfig(blr=float("nan")), "--blr must be a finite number, got nan"),
        (PretrainConfig(lr=float("inf")), "--lr must be a finite number, got inf"),
        (PretrainConfig(epochs=0), "--epochs must be >= 1, got 0"),
        (PretrainConfig(betas=(0.9, 1.0)), "--betas must be in [0, 1), got 1.0"),
        (PretrainConfig(loss="none"), "--loss must be one of all, masked; got 'none'"),
        (PretrainConfig(warmup_epochs=float("nan")), "--warmup-epochs must be a finite number, got nan"),
        (FinetuneConfig(model=PICO, layer_decay=0.0), "--layer-decay must be in (0, 1], got 0.0"),
        (FinetuneConfig(model=PICO, drop_path=1.0), "--drop-path must be in [0, 1), got 1.0"),
        (FinetuneConfig(model=PICO, sigma_range=(0.0, float("inf"))), "--sigma-range must be a finite number, got inf"),
        (FinetuneConfig(model=PICO, eval_sigmas=(0.25, float("nan"))), "sigma must be a number >= 0"),
        (FinetuneConfig(), "give --init (pretrained weights) or --model"),
        (CertifyConfig(checkpoint="x", n=0), "--n must be >= 1, got 0"),
        (CertifyConfig(checkpoint="x", sigma=(0.25, float("inf"))), "--sigma must be a finite number, got inf"),
        (CertifyConfig(checkpoint="x", batch=1.5), "--batch must be an integer, got 1.5"),
        (CertifyConfig(), "--checkpoint is required"),
        (ReportConfig(files=("a.tsv",), radii=(0.5, float("inf"))), "--radii must be a finite number, got inf"),
        (DemoConfig(epochs=0), "--epochs must be >= 1, got 0"),
    ],
)
def test_real_configs_validate(cfg, message):
    with pytest.raises(ValueError) as e:
        cfg.validate()
    assert message in str(e.value)


# ----------------------------------------------------------------------------- command line
def test_flags_from_the_declaration():
    p = _parser(Toy)
    assert vars(p.parse_args([])) == {}  # nothing given: presets are not overridden by defaults
    ns = p.parse_args(
        [
            "--epochs",
            "3",
            "--num-samples",
            "7",
            "--no-switch",
            "--betas",
            "0.1",
            "0.2",
            "--sigmas",
            "0.1",
            "0.2",
            "0.3",
            "--mode",
            "b",
            "--limit",
            "none",
        ]
    )
    assert vars(ns) == {
        "epochs": 3,
        "n": 7,
        "switch": False,
        "betas": [0.1, 0.2],
        "sigmas": [0.1, 0.2, 0.3],
        "mode": "b",
        "limit": None,
    }
    assert p.parse_args(["--n", "4", "--switch", "--limit", "9"]).__dict__ == {"n": 4, "switch": True, "limit": 9}
    acts = _actions(Toy)
    assert isinstance(acts["switch"], argparse.BooleanOptionalAction)
    assert acts["epochs"].help == "training epochs (default: 10)"
    assert acts["betas"].help == "a pair (default: (0.9, 0.95))"
    assert acts["mode"].choices == ("a", "b")
    assert acts["name"].choices == ("x", "y")
    for bad in (["--mode", "c"], ["--name", "z"], ["--betas", "0.1"], ["--epochs", "2.5"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_real_config_flags():
    cert = _actions(CertifyConfig)
    assert "--num-samples" in cert["n"].option_strings
    assert "--n" in cert["n"].option_strings
    assert cert["n"].help.endswith("(default: 100000)")
    rep = _parser(ReportConfig)
    assert rep.parse_args(["a.tsv", "b.tsv"]).files == ["a.tsv", "b.tsv"]  # positional
    assert _actions(ReportConfig)["files"].option_strings == []
    pre = _actions(PretrainConfig)
    assert isinstance(pre["norm_pix_loss"], argparse.BooleanOptionalAction)
    assert pre["mask_ratio"].help.endswith("(default: 0.75)")
    assert pre["output_dir"].help.endswith("(default: runs/pretrain)")  # the job's own default


def test_unsupported_option_type_is_refused():
    @dataclass
    class WithList(Options):
        items: list = option([1], "a list")

    with pytest.raises(TypeError, match="unsupported option type"):
        _parser(WithList)


# ----------------------------------------------------------------------------- presets and overrides
def test_build_config_layers_and_tuples():
    cfg = build_config(Toy, {"epochs": 3, "ratio": 0.25, "betas": [0.1, 0.2]}, {"epochs": 4, "sigmas": [0.5]})
    assert (cfg.epochs, cfg.ratio, cfg.n) == (4, 0.25, 5)  # override, preset, default
    assert cfg.betas == (0.1, 0.2)
    assert cfg.sigmas == (0.5,)  # lists from YAML / argparse become tuples
    cfg.validate()
    assert build_config(ToyChild).epochs == 90


def test_shipped_preset_then_overrides(tmp_path):
    path = preset_path("linprobe", "fashion_mnist")
    assert path.is_file()
    assert path.name == "fashion_mnist.yaml"
    values = load_values(path, LinprobeConfig)
    cfg = build_config(LinprobeConfig, values, {"epochs": 2, "warmup_epochs": 1.0, "model": PICO})
    assert cfg.lr == values["lr"]
    assert cfg.epochs == 2
    assert cfg.linprobe is True
    assert cfg.method == "rs"
    cfg.validate()
    # a saved config reads back into the same config (tuples included)
    pcfg = PretrainConfig(betas=(0.8, 0.9), epochs=3)
    save_config(pcfg, tmp_path / "c.yaml")
    again = build_config(PretrainConfig, load_values(tmp_path / "c.yaml", PretrainConfig))
    assert again == pcfg
    assert again.betas == (0.8, 0.9)
    assert to_dict(again)["betas"] == [0.8, 0.9]


def test_load_values_rejects_bad_files(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 3\nbogus: 1\nalso_bogus: 2\n")
    with pytest.raises(ValueError, match=r"unknown options \['also_bogus', 'bogus'\]"):
        load_values(f, Toy)
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping of option: value, got list"):
        load_values(f, Toy)
    f.write_text("epochs: [3\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_values(f, Toy)
    f.write_text("")
    assert load_values(f, Toy) == {}
    f.write_text("epochs: 3\nbetas: [0.1, 0.2]\n")
    assert load_values(f, Toy) == {"epochs": 3, "betas": [0.1, 0.2]}


def test_preset_path_errors(tmp_path):
    shipped = list_presets("pretrain")
    assert {"demo", "fashion_mnist_tiny", "imagenet_vit_base"} <= set(shipped)
    with pytest.raises(ValueError) as e:
        preset_path("pretrain", "no_such_preset")
    msg = str(e.value)
    assert "unknown pretrain preset 'no_such_preset'" in msg
    assert all(name in msg for name in shipped)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        preset_path("pretrain", str(tmp_path / "missing.yaml"))
    own = tmp_path / "mine.yaml"
    own.write_text(yaml.safe_dump({"epochs": 1}))
    assert preset_path("pretrain", str(own)) == own
    assert list_presets("no_such_command") == []


# ----------------------------------------------------------------------------- given or default
def test_given_tells_set_options_from_defaults(tmp_path):
    cfg = FinetuneConfig(epochs=3, model=PICO)
    assert cfg.given("epochs")
    assert cfg.given("model")
    assert not cfg.given("warmup_epochs")
    assert not cfg.given("val_size")
    # a preset file's values count as given, like the flags; the rest stay defaults
    built = build_config(FinetuneConfig, {"warmup_epochs": 0.3}, {"epochs": 3})
    assert built.given("warmup_epochs")
    assert built.given("epochs")
    assert not built.given("lr")
    assert Toy(20).given("epochs")
    assert not Toy(20).given("ratio")  # positional arguments too
    import copy

    assert copy.deepcopy(cfg).given("epochs")
    assert not copy.deepcopy(cfg).given("warmup_epochs")
    with pytest.raises(KeyError, match="no option 'epoch'"):
        cfg.given("epoch")


def test_a_default_warmup_longer_than_the_run_is_left_to_adapt_a_given_one_is_refused():
    # issue 19 example: `dmae finetune --init X --sigma 0.25 --epochs 3` was refused: "--warmup-epochs 5.0 exceeds
    # --epochs 3" though the user never set a warmup; it is now cut to fit when the run starts (adapt_to_data)
    FinetuneConfig(model=PICO, epochs=3).validate()
    PretrainConfig(epochs=1).validate()  # pretraining's default warmup of 1 epoch
    with pytest.raises(ValueError, match=r"--warmup-epochs 5\.0 exceeds --epochs 3"):
        FinetuneConfig(model=PICO, epochs=3, warmup_epochs=5.0).validate()


def test_save_config_writes_the_note_as_comments(tmp_path):
    save_config(Toy(epochs=3), tmp_path / "c.yaml", "adapted to 10 images:\n  --ratio 0.5 -> 0.1")
    text = (tmp_path / "c.yaml").read_text()
    assert text.startswith("# adapted to 10 images:\n#   --ratio 0.5 -> 0.1\n")
    assert load_values(tmp_path / "c.yaml", Toy) == to_dict(Toy(epochs=3))  # comments change no value


def test_updated_keeps_defaults_adaptable_unlike_replace():
    import dataclasses

    from dmae.training.finetune import FinetuneConfig

    cfg = FinetuneConfig(model="dmae_vit_pico_patch4_dec32d1b")
    short = cfg.updated(epochs=2, output_dir="runs/x")
    assert short.epochs == 2
    assert short.given("epochs")
    assert short.given("model")
    assert not short.given("warmup_epochs")
    short.validate()  # the default 5-epoch warmup is cut to fit a 2-epoch run later, not refused
    with pytest.raises(ValueError, match=r"--warmup-epochs 5\.0 exceeds --epochs 2"):
        dataclasses.replace(cfg, epochs=2).validate()  # replace counts every option as given
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) epoch \(epoch: did you mean epochs\?\); FinetuneConfig has: .*epochs"
    ):
        cfg.updated(epoch=2)
    assert cfg.epochs == 100
    assert not cfg.given("epochs")  # the original is untouched
