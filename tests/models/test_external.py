"""dmae.models.external: timm / torchvision base classifiers from a weights file, behind dmae's input layer."""

from __future__ import annotations

import builtins
import hashlib
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from dmae.checkpoint import CheckpointError
from dmae.models.external import (
    MODEL_SOURCES,
    ExternalClassifier,
    build_external_classifier,
    parse_model_name,
)

TIMM = "test_efficientnet"  # a tiny timm CNN with BatchNorm (few ms per forward at 32 px)
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def timm_net(name: str = TIMM, num_classes: int = 10, in_chans: int = 3, seed: int = 1) -> torch.nn.Module:
    """A tiny timm network with weights (and BatchNorm statistics) unlike a fresh random init's."""
    torch.manual_seed(seed)
    kw = {"img_size": 32} if "vit" in name else {}
    net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kw)
    for k, v in net.state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            v.copy_(torch.rand_like(v) + 0.5)  # eval-mode BatchNorm must use the file's statistics, not 0 / 1
    return net.eval()


def save(sd: dict[str, torch.Tensor], path, wrap: str = "plain") -> None:
    """Write a state dict as safetensors (by suffix) or a torch pickle: plain, under 'model' or 'state_dict'."""
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd if wrap == "plain" else {wrap: sd, "epoch": 3}, path)


def reference_logits(net: torch.nn.Module, x: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """What the classifier must compute, written out: grey -> RGB, bicubic resize, normalize, network."""
    if x.shape[1] == 1 and len(mean) == 3:
        x = x.repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        return net((x - m) / s)


def test_parse_model_name():
    assert MODEL_SOURCES == ("timm", "torchvision")
    assert parse_model_name("models.py:Net") == ("python", "models.py:Net")
    assert parse_model_name("timm:resnet18") == ("timm", "resnet18")
    assert parse_model_name("torchvision:resnet18") == ("torchvision", "resnet18")
    assert parse_model_name("resnet18") == ("timm", "resnet18")
    assert parse_model_name(" TorchVision:vit_b_16 ") == ("torchvision", "vit_b_16")
    assert parse_model_name("timm:resnet18.a1_in1k") == ("timm", "resnet18.a1_in1k")


@pytest.mark.parametrize("spec", ["hf-hub:timm/resnet18", "timm:", "torchvision: ", "", "mynets:bad-name"])
def test_parse_model_name_rejects(spec):
    with pytest.raises(ValueError) as e:
        parse_model_name(spec)
    assert repr(spec) in str(e.value)


@pytest.mark.parametrize(
    "suffix,wrap,prefix",
    [
        (".safetensors", "plain", ""),
        (".safetensors", "plain", "module."),
        (".pt", "plain", ""),
        (".pt", "model", "module."),
        (".pth", "state_dict", ""),
    ],
)
def test_timm_weights_load_and_match_reference(tmp_path, suffix, wrap, prefix):
    net = timm_net()
    path = tmp_path / f"w{suffix}"
    save({prefix + k: v for k, v in net.state_dict().items()}, path, wrap)
    torch.manual_seed(99)  # the built network's own random init differs from the file's
    model, digest = build_external_classifier(f"timm:{TIMM}", path, 10, img_size=32, in_chans=3, mean=MEAN, std=STD)
    assert isinstance(model, ExternalClassifier)
    assert not model.training
    assert not model.net.training
    assert (model.source, model.name, model.num_classes, model.img_size, model.in_chans) == ("timm", TIMM, 10, 32, 3)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.rand(5, 3, 28, 28)  # native 28 px, resized to 32 after (would-be) noise
    with torch.no_grad():
        out = model(x)
    assert out.shape == (5, 10)
    torch.testing.assert_close(out, reference_logits(net, x, 32, MEAN, STD), rtol=0, atol=1e-6)


def test_timm_vit_built_at_input_size(tmp_path):
    net = timm_net("test_vit")
    path = tmp_path / "vit.safetensors"
    save(net.state_dict(), path)
    model, _ = build_external_classifier("test_vit", path, 10, img_size=32, in_chans=3, mean=[0.5], std=[0.5])
    assert model.net.patch_embed.img_size == (32, 32)  # timm's ViT made for 32 px, not its default 160
    assert model.preprocess.mean.flatten().tolist() == [0.5, 0.5, 0.5]  # one value stands for every channel
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, reference_logits(net, x, 32, (0.5,) * 3, (0.5,) * 3), rtol=0, atol=1e-6)


def test_torchvision_grey_input_expanded_and_resized(tmp_path):
    torch.manual_seed(2)
    net = torchvision.models.get_model("squeezenet1_1", weights=None, num_classes=10).eval()
    path = tmp_path / "sq.pt"
    torch.save(net.state_dict(), path)
    torch.manual_seed(3)
    model, digest = build_external_classifier(
        "torchvision:squeezenet1_1", path, 10, img_size=32, in_chans=1, mean=[0.3], std=[0.35]
    )
    assert model.in_chans == 3
    assert model.preprocess.in_chans == 3
    assert model.source == "torchvision"
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (4, 10)
    torch.testing.assert_close(out, reference_logits(net, x, 32, (0.3,) * 3, (0.35,) * 3), rtol=0, atol=1e-6)


def test_unknown_architecture_lists_close_names(tmp_path):
    with pytest.raises(ValueError) as e:
        build_external_classifier("timm:resnet18x", tmp_path / "w.pt", 10, img_size=32, in_chans=3, mean=MEAN, std=STD)
    assert "'resnet18x'" in str(e.value)
    assert "resnet18" in str(e.value).replace("'resnet18x'", "")
    with pytest.raises(ValueError) as e:
        build_external_classifier(
            "torchvision:squeezenet1_2", tmp_path / "w.pt", 10, img_size=32, in_chans=3, mean=MEAN, std=STD
        )
    assert "'squeezenet1_2'" in str(e.value)
    assert "squeezenet1_1" in str(e.value)


def test_missing_and_unreadable_files(tmp_path):
    kw = dict(img_size=32, in_chans=3, mean=MEAN, std=STD)
    with pytest.raises(CheckpointError, match=r"nothere\.pt.*does not exist"):
        build_external_classifier(TIMM, tmp_path / "nothere.pt", 10, **kw)
    for name in ("garbage.pt", "garbage.safetensors"):
        (tmp_path / name).write_text("not weights at all")
        with pytest.raises(CheckpointError, match=name):
            build_external_classifier(TIMM, tmp_path / name, 10, **kw)


def test_missing_and_unexpected_keys_named(tmp_path):
    sd = timm_net().state_dict()
    dropped = "classifier.bias"
    sd.pop(dropped)
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "w.safetensors"
    save(sd, path)
    with pytest.raises(CheckpointError) as e:
        build_external_classifier(TIMM, path, 10, img_size=32, in_chans=3, mean=MEAN, std=STD)
    assert dropped in str(e.value)
    assert "extra.weight" in str(e.value)
    assert "w.safetensors" in str(e.value)


def test_head_for_another_class_count(tmp_path):
    path = tmp_path / "imagenet.pt"
    torch.save(timm_net(num_classes=1000).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"classifies 1000 classes.*the data set has 10"):
        build_external_classifier(TIMM, path, 10, img_size=32, in_chans=3, mean=MEAN, std=STD)


def test_input_channels_mismatch(tmp_path):
    path = tmp_path / "grey.pt"
    torch.save(timm_net(in_chans=1).state_dict(), path)
    with pytest.raises(CheckpointError, match="1-channel inputs"):
        build_external_classifier(TIMM, path, 10, img_size=32, in_chans=3, mean=MEAN, std=STD)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_refused(tmp_path, value):
    sd = timm_net().state_dict()
    key = next(k for k, v in sd.items() if k.endswith("conv.weight") or (v.ndim == 4))
    sd[key].view(-1)[3] = value
    path = tmp_path / "diverged.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="NaN or infinite") as e:
        build_external_classifier(TIMM, path, 10, img_size=32, in_chans=3, mean=MEAN, std=STD)
    assert key in str(e.value)


def test_bad_mean_std_name_the_options(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(timm_net().state_dict(), path)
    with pytest.raises(ValueError, match=r"--input-mean.*--input-std.*3 values"):
        build_external_classifier(TIMM, path, 10, img_size=32, in_chans=3, mean=[0.5, 0.5], std=STD)
    with pytest.raises(ValueError, match=r"--input-std \[0\.2, 0\.0, 0\.3\].*positive"):
        build_external_classifier(TIMM, path, 10, img_size=32, in_chans=3, mean=MEAN, std=[0.2, 0.0, 0.3])
    with pytest.raises(ValueError, match="4 channels"):
        build_external_classifier("torchvision:squeezenet1_1", path, 10, img_size=32, in_chans=4, mean=MEAN, std=STD)


class _Payload:
    """Unpickling this calls open(marker, 'w'): a file that runs code on load would create the marker."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def test_pickle_that_runs_code_is_refused(tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(str(control))))  # the payload really runs under an ordinary unpickler
    assert control.exists()
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": timm_net().state_dict(), "extra": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*never runs code"):
        build_external_classifier(TIMM, path, 10, img_size=32, in_chans=3, mean=MEAN, std=STD)
    assert not marker.exists()


# ----------------------------------------------------------------------------- through `dmae certify --model`
@pytest.mark.slow
def test_certify_a_timm_model_by_name_matches_smoothing_it_directly(tmp_path, capsys):
    """`dmae certify --model timm:NAME --checkpoint FILE` gives the rows of Smooth over the same network and input
    layer; the JSON records the model and its input layer, and a resume with another input layer is refused."""
    import json

    from dmae.certification.log import CERTIFY_HEADER, format_row, read_rows
    from dmae.certification.runner import CertifyConfig, run_certification
    from dmae.cli import main
    from dmae.data import build_dataset, build_transform, dataset_info
    from dmae.smoothing import Smooth

    weights = tmp_path / "net.safetensors"
    save(timm_net(in_chans=1).state_dict(), weights)
    argv = [
        "certify",
        "--model",
        f"timm:{TIMM}",
        "--checkpoint",
        str(weights),
        "--input-size",
        "32",
        "--input-mean",
        "0.3",
        "--input-std",
        "0.35",
        "--sigma",
        "0.25",
        "--n0",
        "10",
        "--n",
        "100",
        "--skip",
        "2500",
        "--batch",
        "500",
        "--output-dir",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(argv) == 0
    rows = read_rows(tmp_path / "out" / "certify_sigma0.25.tsv", CERTIFY_HEADER)
    assert sorted(rows) == [0, 2500, 5000, 7500]
    model, _ = build_external_classifier(f"timm:{TIMM}", weights, 10, img_size=32, in_chans=1, mean=(0.3,), std=(0.35,))
    ds = build_dataset("fashion-mnist", "test", None, build_transform(dataset_info("fashion-mnist"), False, 32))
    smooth = Smooth(model, 10, 0.25, seed=0, precision="fp32")
    for i, row in rows.items():
        c = smooth.certify_batch(ds[i][0].unsqueeze(0), [i], 10, 100, 0.001, 500)[0]
        expected = format_row(CERTIFY_HEADER, i, int(ds[i][1]), c.prediction, c.radius, 0.0)
        assert row.split("\t")[:5] == expected.split("\t")[:5]
    meta = json.loads((tmp_path / "out" / "certify_sigma0.25.json").read_text())
    assert meta["model"] == f"timm:{TIMM}"
    assert "img_size=32" in meta["input_layer"]
    assert "0.3" in meta["input_layer"]
    assert meta["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    cfg = CertifyConfig(
        model=f"timm:{TIMM}",
        checkpoint=str(weights),
        input_size=32,
        input_mean=(0.5,),
        input_std=(0.35,),
        sigma=(0.25,),
        n0=10,
        n=100,
        skip=2500,
        batch=500,
        output_dir=str(tmp_path / "out"),
        device="cpu",
        progress=False,
    )
    with pytest.raises(ValueError, match="input_layer: "):
        run_certification(cfg)
    capsys.readouterr()
    assert main(["certify", "--checkpoint", str(weights), "--input-size", "32", "--device", "cpu"]) == 2
    assert "--input-size 32 is only used with --model" in capsys.readouterr().err


def test_certify_an_architecture_of_ones_own_code_from_the_cli(tmp_path, capsys):
    """`--model file.py:Class` (and `module.path:Class`) builds the user's own network, called with the arguments it
    takes; the weights still load with no code run; bad names are errors that name them."""
    import json
    import sys

    from dmae.cli import main

    (tmp_path / "mynets.py").write_text(
        "from torch import nn\n"
        "class TinyNet(nn.Module):\n"
        "    def __init__(self, num_classes, in_chans=3):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_chans * 28 * 28, num_classes))\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n"
        "def not_a_module():\n"
        "    return 3\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        from mynets import TinyNet

        weights = tmp_path / "tiny.safetensors"
        save(TinyNet(10, 1).state_dict(), weights)
        base = [
            "certify",
            "--checkpoint",
            str(weights),
            "--sigma",
            "0.25",
            "--n0",
            "10",
            "--n",
            "50",
            "--skip",
            "5000",
            "--device",
            "cpu",
            "--no-progress",
            "--input-mean",
            "0",
            "--input-std",
            "1",
        ]
        for i, spec in enumerate((f"{tmp_path / 'mynets.py'}:TinyNet", "mynets:TinyNet")):
            assert main([*base, "--model", spec, "--output-dir", str(tmp_path / f"o{i}")]) == 0
            meta = json.loads((tmp_path / f"o{i}" / "certify_sigma0.25.json").read_text())
            assert meta["model"] == spec
            assert meta["images"] == 2
        assert parse_model_name("mynets:TinyNet") == ("python", "mynets:TinyNet")
        # without --input-mean / --input-std, code of one's own takes [0, 1] images as in the Python API: the
        # input layer does not normalize it a second time, and the rows are those of dmae.certify on the module
        plain = [a for a in base if a not in ("--input-mean", "--input-std", "0", "1")]
        assert main([*plain, "--model", "mynets:TinyNet", "--output-dir", str(tmp_path / "own")]) == 0
        meta = json.loads((tmp_path / "own" / "certify_sigma0.25.json").read_text())
        assert (
            meta["input_layer"] == json.loads((tmp_path / "o1" / "certify_sigma0.25.json").read_text())["input_layer"]
        )
        assert "0.286" not in json.dumps(meta["input_layer"])
        capsys.readouterr()
        for spec, why in (
            ("mynets:Nope", "mynets has no class or function 'Nope'"),
            ("mynets:not_a_module", "not_a_module(...) returned int, not an nn.Module"),
            ("no_such_module_x:Net", "cannot import no_such_module_x"),
        ):
            assert main([*base, "--model", spec, "--output-dir", str(tmp_path / "bad")]) == 2
            assert why in capsys.readouterr().err
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mynets", None)
