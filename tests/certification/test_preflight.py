"""The pre-flight probe and the certification run's guards: what a user sees before any sample is spent."""

import json

import pytest
import torch
from torch import nn

from dmae.certification.preflight import Probe, accuracy_probe
from dmae.certification.runner import CertifyConfig, run_certification
from dmae.cli import main
from dmae.smoothing import Smooth


class Templates(nn.Module):
    """Nearest of 10 fixed [1, 16, 16] templates (pixel l2), after an input layer ``(x - mean) / std``: right on
    clean template images when the input layer matches how they were made, and under noise while sigma is small."""

    def __init__(self, templates: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("templates", templates.flatten(1))
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = ((x - self.mean) / self.std).flatten(1)
        return -torch.cdist(z, self.templates)


def _templates() -> torch.Tensor:
    """Ten flat grey images, 0.05 to 0.95: under sigma 0.25 the mean of 256 pixels still tells them apart."""
    return (0.05 + 0.1 * torch.arange(10.0)).view(10, 1, 1, 1).expand(10, 1, 16, 16).clone()


def test_probe_measures_clean_and_noisy_accuracy_and_is_reproducible():
    t = _templates()
    images, labels = t.repeat(5, 1, 1, 1), list(range(10)) * 5
    smooth = Smooth(Templates(t).eval(), 10, 0.25, seed=0)
    probe = accuracy_probe(smooth, images, list(range(50)), labels)
    assert probe.clean_accuracy == 1.0
    assert probe.noisy_accuracy >= 0.9
    assert probe.images == 50
    assert probe.concerns() == []
    # wrong input layer: the model normalizes by the data set's statistics it was not trained with
    wrong = accuracy_probe(
        Smooth(Templates(t, mean=0.5, std=0.05).eval(), 10, 0.25, seed=0), images, list(range(50)), labels
    )
    assert wrong.clean_accuracy == 0.2  # everything darker than 0.5 is class 0, the rest class 9
    [concern] = wrong.concerns()
    assert "clean accuracy on 50 images" in concern
    assert "--input-mean / --input-std" in concern
    # a sigma far above what the templates can carry: near chance under noise only
    loud = accuracy_probe(Smooth(Templates(t).eval(), 10, 8.0, seed=0), images, list(range(50)), labels)
    assert loud.clean_accuracy == 1.0
    assert loud.noisy_accuracy <= 0.2
    [concern] = loud.concerns()
    assert "under noise sigma=8 is" in concern
    assert "trained at this sigma" in concern
    again = accuracy_probe(Smooth(Templates(t).eval(), 10, 8.0, seed=0), images, list(range(50)), labels)
    assert again == loud


def test_probe_concerns_thresholds():
    ok = Probe(100, 10, 0.25, 0.9, 0.85)
    assert ok.concerns() == []
    assert ok.text() == ("probe (100 images, sigma 0.25): clean accuracy 90.0%, under noise 85.0% (chance 10.0%)")
    assert len(Probe(100, 10, 0.25, 0.20, 0.20).concerns()) == 1  # twice chance: near chance
    assert Probe(100, 10, 0.25, 0.21, 0.21).concerns() == []
    assert len(Probe(100, 2, 0.25, 0.64, 0.64).concerns()) == 1  # two classes: within 15 points of chance
    [halved] = Probe(100, 10, 1.0, 0.9, 0.4).concerns()
    assert "from 90.0% (clean) to 40.0%" in halved
    assert Probe(19, 10, 0.25, 0.0, 0.0).concerns() == []  # too few images to judge
    assert Probe(100, 10, 0.25, 0.9, 0.85).to_dict()["chance"] == 0.1


def test_probe_refuses_mismatched_inputs():
    smooth = Smooth(Templates(_templates()).eval(), 10, 0.25, seed=0)
    with pytest.raises(ValueError, match="2 images, 2 indices and 1 labels"):
        accuracy_probe(smooth, torch.rand(2, 1, 8, 8), [0, 1], [0])
    with pytest.raises(
        ValueError, match=r"label\(s\) outside the classifier's 10 classes \(image, label\): \[\(1, 10\)\]"
    ):
        accuracy_probe(smooth, torch.rand(2, 1, 8, 8), [0, 1], [0, 10])
    with pytest.raises(ValueError, match=r"got dtype torch\.uint8"):
        accuracy_probe(smooth, torch.zeros(2, 1, 8, 8, dtype=torch.uint8), [0, 1], [0, 1])


def _cfg(run, out, **over):
    kw = dict(
        checkpoint=str(run),
        n0=20,
        n=100,
        alpha=0.001,
        skip=500,
        batch=128,
        seed=0,
        output_dir=str(out),
        device="cpu",
        progress=False,
    )
    kw.update(over)
    return CertifyConfig(**kw)


@pytest.mark.slow
def test_certification_json_records_the_probe_and_the_training_sigma(classifier_run, tmp_path, capsys):
    [res] = run_certification(_cfg(classifier_run, tmp_path))
    meta = json.loads(res.path.with_suffix(".json").read_text())
    assert meta["trained_sigma"] == 0.25
    assert meta["probe"]["images"] == 20
    assert meta["probe"]["sigma"] == 0.25
    assert meta["probe"]["chance"] == 0.1
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("probe (20 images, sigma 0.25): clean accuracy ")
    assert f"{meta['probe']['clean_accuracy']:.1%}" in out.splitlines()[0]


def test_cli_warns_on_another_sigma_and_refuses_a_confidence_level(classifier_run, tmp_path, capsys):
    args = [
        "certify",
        "--checkpoint",
        str(classifier_run),
        "--n0",
        "10",
        "--n",
        "50",
        "--skip",
        "2000",
        "--output-dir",
        str(tmp_path),
        "--device",
        "cpu",
        "--no-progress",
    ]
    with pytest.warns(UserWarning, match=r"sigma 1 is not the sigma the classifier was trained at \(0.25\)"):
        assert main([*args, "--sigma", "1.0"]) == 0
    assert json.loads((tmp_path / "certify_sigma1.json").read_text())["trained_sigma"] == 0.25
    assert main([*args, "--alpha", "0.999"]) == 2
    err = capsys.readouterr().err
    assert (
        "dmae certify: error: alpha must be in (0, 0.5), got 0.999; alpha is the failure probability, not a "
        "confidence level: for 0.999 confidence give alpha 0.001"
    ) in err
    assert not (tmp_path / "certify_sigma0.25.tsv").exists()  # refused before anything was written


def test_cli_shows_our_warnings_like_its_errors():
    from dmae.cli import _format_warning
    from dmae.runtime import DmaeWarning

    fmt = _format_warning("certify")
    assert (
        fmt(DmaeWarning("sigma 1 is not ..."), DmaeWarning, "x.py", 3) == "dmae certify: warning: sigma 1 is not ...\n"
    )
    assert "x.py:3: UserWarning: torch says" in fmt(UserWarning("torch says"), UserWarning, "x.py", 3)
    assert "DeprecationWarning" in fmt(DeprecationWarning("old"), DeprecationWarning, "x.py", 3)


def test_certifying_on_another_data_set_than_the_training_one_warns(classifier_run, tmp_path):
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(classifier_run, run)
    (run / "config.yaml").write_text(yaml.safe_dump({"sigma": 0.25, "data": "folder"}))
    with pytest.warns(UserWarning, match="the classifier was fine-tuned on folder, and --data is fashion-mnist"):
        run_certification(_cfg(run, tmp_path / "c", skip=5000))


def test_a_loaded_classifier_carries_its_training_sigma_into_smooth(classifier_run, tmp_path):
    from safetensors.torch import load_file

    from dmae.checkpoint import load_classifier, save_export

    model, _ = load_classifier(classifier_run, 10, pool=None)
    assert model.trained_sigma == 0.25  # from the run's config.yaml
    with pytest.warns(UserWarning, match=r"sigma 0.5 is not the sigma the classifier was trained at \(0.25\)"):
        Smooth(model.eval(), 10, 0.5)
    # a weights file away from its run folder keeps what its metadata records
    alone = tmp_path / "alone.safetensors"
    save_export(model, alone, {"trained_sigma": "[0.0, 0.75]"})
    assert set(load_file(alone)) == set(model.state_dict())
    assert load_classifier(alone, 10, pool=None)[0].trained_sigma == [0.0, 0.75]
    save_export(model, alone)
    assert load_classifier(alone, 10, pool=None)[0].trained_sigma is None


def test_a_mismatched_log_at_a_later_sigma_is_refused_before_the_first_sigma_is_certified(classifier_run, tmp_path):
    run_certification(_cfg(classifier_run, tmp_path, sigma=(0.5,), skip=5000))
    with pytest.raises(ValueError, match=r"certify_sigma0.5.tsv was written with other settings \(n: 100 -> 50\)"):
        run_certification(_cfg(classifier_run, tmp_path, sigma=(0.25, 0.5), n=50, skip=5000))
    assert not (tmp_path / "certify_sigma0.25.tsv").exists()
