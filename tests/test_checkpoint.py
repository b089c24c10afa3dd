"""Saving and loading: run folders, atomic saves, the safe loader's refusals, state-dict checks, exports."""

import argparse
import collections
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import PICO
from dmae.checkpoint import (
    RUN_FILES,
    CheckpointError,
    atomic_save,
    load_classifier,
    load_dmae,
    load_state_dict,
    read_weights,
    resolve_checkpoint,
    run_config,
    safe_load,
    save_export,
    weights_digest,
)
from dmae.models import create_model

UNSAFE_ADVICE = ("weights_only", "will likely succeed")  # PyTorch's advice to turn the safe loader off


def _make_marker(path):
    Path(path).write_text("the payload ran")


class Payload:
    """Unpickling this calls ``_make_marker``: what a malicious checkpoint would do with a worse function."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_make_marker, (self.marker,))


class MyDict(collections.OrderedDict):
    pass


def _tmp_files(folder):
    return [p.name for p in Path(folder).iterdir() if ".tmp" in p.name]


# ----------------------------------------------------------------------------- run folders
def test_resolve_checkpoint_picks_the_first_run_file(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    assert resolve_checkpoint(weights) == weights
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").mkdir()  # a folder of that name is no weights file
    for name in ("checkpoint.pt", "model_last.safetensors", "model_best.safetensors"):
        (run / name).write_bytes(b"x")
        assert resolve_checkpoint(run) == run / name  # each one added takes precedence over those before
    (run / "model.safetensors").rmdir()
    (run / "model.safetensors").write_bytes(b"x")
    assert resolve_checkpoint(str(run)) == run / "model.safetensors"


def test_resolve_checkpoint_errors_say_what_was_looked_for(tmp_path):
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(tmp_path)
    assert f"run folder {tmp_path} holds none of" in str(e.value)
    assert all(name in str(e.value) for name in RUN_FILES)
    with pytest.raises(CheckpointError, match=r"nope.pt does not exist \(give a weights file or a run folder"):
        resolve_checkpoint(tmp_path / "nope.pt")


def test_run_config(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    assert run_config(tmp_path / "checkpoint.pt") == {}
    assert run_config(tmp_path) == {}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"sigma": 0.5, "epochs": 3}))
    assert run_config(tmp_path / "checkpoint.pt") == {"sigma": 0.5, "epochs": 3}
    assert run_config(tmp_path) == {"sigma": 0.5, "epochs": 3}


def test_weights_digest_follows_the_weights_not_the_file(tmp_path):
    torch.manual_seed(0)
    model = create_model(PICO)
    save_export(model, tmp_path / "a.safetensors", {"note": "first"})
    save_export(model, tmp_path / "b.safetensors", {"note": "another export, other metadata"})
    atomic_save({"model": model.state_dict(), "step": 5}, tmp_path / "c.pt")
    d = weights_digest(tmp_path / "a.safetensors")
    assert len(d) == 64  # a SHA-256 hex digest
    assert (tmp_path / "a.safetensors").read_bytes() != (tmp_path / "b.safetensors").read_bytes()
    assert weights_digest(tmp_path / "b.safetensors") == d
    assert weights_digest(tmp_path / "c.pt") == d
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[-1, -1] += 1e-6  # the last value of one tensor
    save_export(model, tmp_path / "a.safetensors", {"note": "first"})
    assert weights_digest(tmp_path / "a.safetensors") != d
    # names, dtypes and shapes count too, even where the bytes are the same
    base = {"a": torch.zeros(2, 3), "b": torch.ones(4)}
    variants = [
        base,
        {"a2": torch.zeros(2, 3), "b": torch.ones(4)},
        {"a": torch.zeros(3, 2), "b": torch.ones(4)},
        {"a": torch.zeros(2, 3, dtype=torch.int32), "b": torch.ones(4)},
    ]
    for i, sd in enumerate(variants):
        atomic_save(sd, tmp_path / f"v{i}.pt")
    assert len({weights_digest(tmp_path / f"v{i}.pt") for i in range(4)}) == 4
    with pytest.raises(CheckpointError):
        weights_digest(tmp_path / "missing.pt")


def test_atomic_save_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "checkpoint.pt"
    atomic_save({"step": 1, "w": torch.ones(3)}, path)
    atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    assert _tmp_files(path.parent) == []
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]
    state = safe_load(path)
    assert state["step"] == 2
    assert torch.equal(state["w"], torch.zeros(3))
    # cannot be pickled: fails mid-write (AttributeError or PicklingError, depending on the Python version)
    with pytest.raises((AttributeError, pickle.PicklingError)):
        atomic_save({"step": 3, "f": lambda: 0}, path)
    assert safe_load(path)["step"] == 2  # the previous checkpoint is intact
    assert _tmp_files(path.parent) == []  # and the failed write left no temporary file behind


# ----------------------------------------------------------------------------- the safe loader
@pytest.mark.parametrize(
    "text",
    [
        "not a checkpoint\n",
        '{"model": 1}\n',
        "seed: 0\nsigma: 0.25\n",  # a YAML config given as a checkpoint: the unpickler raised IndexError
        "hello world\n",  # ... and KeyError
    ],
)
def test_text_file_is_not_a_checkpoint(tmp_path, text):
    f = tmp_path / "x.pth"
    f.write_text(text)
    with pytest.raises(CheckpointError) as e:
        safe_load(f)
    msg = str(e.value)
    assert f"cannot read checkpoint {f}" in msg
    assert "not a PyTorch checkpoint" in msg
    assert not any(s in msg for s in UNSAFE_ADVICE)


@pytest.mark.parametrize("zip_format", [True, False])
def test_refused_globals_run_no_code_and_get_no_unsafe_advice(tmp_path, zip_format):
    marker = tmp_path / "marker"
    f = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "x": Payload(marker)}, f, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as e:
        safe_load(f)
    msg = str(e.value)
    assert "_make_marker" in msg
    assert "never runs code from a file" in msg
    assert not any(s in msg for s in UNSAFE_ADVICE)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        read_weights(f)
    assert not marker.exists()
    # the payload is live: an unsafe load runs it (which is what the safe loader prevents)
    torch.load(f, weights_only=False)
    assert marker.read_text() == "the payload ran"


def test_dict_subclass_is_refused_and_namespace_allowed(tmp_path):
    f = tmp_path / "od.pt"
    torch.save({"model": MyDict(w=torch.ones(2))}, f)
    with pytest.raises(CheckpointError) as e:
        safe_load(f)
    assert "MyDict" in str(e.value)
    assert not any(s in str(e.value) for s in UNSAFE_ADVICE)
    g = tmp_path / "official.pth"  # official training checkpoints carry their argparse args
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, g)
    assert safe_load(g)["args"].lr == 0.1


def test_truncated_and_missing_files(tmp_path):
    f = tmp_path / "c.pt"
    torch.save({"w": torch.ones(1000)}, f)
    f.write_bytes(f.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated or corrupt PyTorch file") as e:
        safe_load(f)
    assert not any(s in str(e.value) for s in UNSAFE_ADVICE)
    with pytest.raises(CheckpointError, match="does not exist"):
        safe_load(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- state dicts
def test_load_state_dict_checks_values_shapes_and_keys():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {k: torch.randn_like(v) for k, v in before.items()}

    bad = {**sd, "1.weight": sd["1.weight"].clone()}
    bad["1.weight"][0, 1] = float("nan")
    with pytest.raises(CheckpointError, match=r"1 tensors hold NaN or infinite values \['1.weight'\]"):
        load_state_dict(model, bad, "c.pt")
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)  # nothing loaded

    with pytest.raises(CheckpointError, match=r"c.pt: 0.weight has shape \(3, 5\) in the file but \(3, 4\) in the mod"):
        load_state_dict(model, {**sd, "0.weight": torch.zeros(3, 5)}, "c.pt")
    partial = {k: v for k, v in sd.items() if k != "1.bias"}
    with pytest.raises(CheckpointError, match=r"1 missing keys \['1.bias'\], 1 unexpected keys \['extra.w'\]"):
        load_state_dict(model, {**partial, "extra.w": torch.zeros(1)}, "c.pt")
    report = load_state_dict(
        model, {**partial, "extra.w": torch.zeros(1)}, "c.pt", allow_missing=("1.",), allow_unexpected=("extra.",)
    )
    assert report.missing == ["1.bias"]
    assert report.unexpected == ["extra.w"]
    assert torch.equal(model.state_dict()["0.weight"], sd["0.weight"])
    assert torch.equal(model.state_dict()["1.bias"], before["1.bias"])


# ----------------------------------------------------------------------------- exports and models
def test_save_export_round_trip(tmp_path):
    model = create_model(PICO)
    path = tmp_path / "model.safetensors"
    save_export(model, path, {"sigma": "0.25"})
    assert _tmp_files(tmp_path) == []
    sd, cfg = read_weights(path)
    assert cfg == {"model_config": model.config.to_dict()}
    assert sd.keys() == model.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["sigma"] == "0.25"
    clf, _ = load_classifier(None, 10, model=PICO)
    save_export(clf, tmp_path / "clf.safetensors")
    _, ccfg = read_weights(tmp_path / "clf.safetensors")
    assert ccfg == {"classifier_config": clf.config.to_dict()}
    assert ccfg["classifier_config"]["num_classes"] == 10


def test_load_dmae_from_a_run_folder(tmp_path):
    torch.manual_seed(0)
    model = create_model(PICO)
    run = tmp_path / "run"
    run.mkdir()
    # a training checkpoint alone (a stopped run), then the export beside it
    atomic_save({"model": model.state_dict(), "model_config": model.config.to_dict(), "step": 3}, run / "checkpoint.pt")
    net, report = load_dmae(run)
    assert net.config == model.config
    assert report.missing == []
    assert report.unexpected == []
    assert all(torch.equal(net.state_dict()[k], v) for k, v in model.state_dict().items())
    torch.manual_seed(1)
    exported = create_model(PICO)
    save_export(exported, run / "model.safetensors")
    net2, _ = load_dmae(run)  # the export takes precedence over the checkpoint
    assert all(torch.equal(net2.state_dict()[k], v) for k, v in exported.state_dict().items())
    clf, _ = load_classifier(None, 10, model=PICO)
    save_export(clf, tmp_path / "clf.safetensors")
    with pytest.raises(CheckpointError, match="holds a classifier, not an autoencoder"):
        load_dmae(tmp_path / "clf.safetensors")


def test_load_classifier_from_a_run_folder(tmp_path):
    torch.manual_seed(0)
    clf, report = load_classifier(None, 10, model=PICO)
    assert report.missing == []
    assert clf.config.num_classes == 10
    run = tmp_path / "finetune"
    run.mkdir()
    save_export(clf, run / "model_best.safetensors")
    loaded, report = load_classifier(run, 10, pool=None)
    assert loaded.config == clf.config
    assert report.missing == []
    assert report.ignored == []
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in clf.state_dict().items())
    with pytest.raises(CheckpointError, match="classifies 10 classes, the data set has 3"):
        load_classifier(run, 3, pool=None)
    # an autoencoder's run folder gives its encoder; the decoder is ignored and the head starts fresh
    ae = create_model(PICO)
    pre = tmp_path / "pretrain"
    pre.mkdir()
    save_export(ae, pre / "model.safetensors")
    enc, report = load_classifier(pre, 10)
    assert any(k.startswith("decoder_") for k in report.ignored)
    assert "head.weight" in report.missing
    assert torch.equal(enc.state_dict()["blocks.1.mlp.fc1.weight"], ae.state_dict()["blocks.1.mlp.fc1.weight"])
