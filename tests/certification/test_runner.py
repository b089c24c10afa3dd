import math
from pathlib import Path

import pytest
import torch
from scipy.stats import beta, norm

from conftest import PICO, kill_after_rows, run_torchrun
from dmae.certification.log import CERTIFY_HEADER, read_rows
from dmae.certification.runner import CertifyConfig, run_certification
from dmae.checkpoint import CheckpointError, load_classifier, save_export
from dmae.cli import main
from dmae.data import build_dataset
from dmae.smoothing import Smooth

HERE = Path(__file__).parent


def _cfg(run, out, **over):
    kw = dict(
        checkpoint=str(run),
        n0=20,
        n=300,
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


def _rows_without_time(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    return [ln.split("\t")[:-1] for ln in lines]


@pytest.mark.slow
def test_certify_writes_the_common_format(classifier_run, tmp_path):
    [res] = run_certification(_cfg(classifier_run, tmp_path))
    lines = res.path.read_text().splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    assert res.rows_total == 20
    assert len(lines) == 21  # 10,000 test images, every 500th
    idx = [int(ln.split("\t")[0]) for ln in lines[1:]]
    assert idx == list(range(0, 10_000, 500))
    assert res.path.with_suffix(".json").is_file()
    assert res.sigma == 0.25  # sigma from the run's config
    test = build_dataset("fashion-mnist", "test")
    assert [int(ln.split("\t")[1]) for ln in lines[1:]] == [int(test.targets[i]) for i in idx]
    # a class's radius is sigma * Phi^-1(p_A_lower), p_A_lower the one-sided Clopper-Pearson bound at alpha (the alpha
    # quantile of Beta(k, n - k + 1)) of the count k of n = 300 samples (Cohen et al., Theorem 1), rounded down
    possible = [0.25 * norm.ppf(beta.ppf(0.001, k, 300 - k + 1)) for k in range(1, 301)]
    radii = [float(ln.split("\t")[3]) for ln in lines[1:] if int(ln.split("\t")[2]) != -1]
    assert radii, "the classifier should certify some of the 20 images"
    for r in radii:
        assert any(0.0 <= exact - r < 1.01e-6 for exact in possible), r
    # n = 9 cannot clear 1/2 at alpha = 0.001: every image abstains, so both kinds of row are checked below
    with pytest.warns(UserWarning, match="cannot certify any radius"):
        [abstained] = run_certification(_cfg(classifier_run, tmp_path / "few", n=9))
    rows = [ln.split("\t") for p in (res.path, abstained.path) for ln in p.read_text().splitlines()[1:]]
    kinds = set()
    for _idx, label, pred, radius, correct, _seconds in rows:
        assert -1 <= int(pred) < 10, pred  # a class of Fashion-MNIST, or -1 (abstain)
        assert int(correct) == int(int(pred) == int(label))
        # an abstention carries radius 0; a class carries a radius >= 0 (0 exactly when p_A_lower = 1/2)
        if int(pred) == -1:
            assert float(radius) == 0.0, (pred, radius)
        else:
            assert float(radius) >= 0.0, (pred, radius)
        kinds.add(int(pred) == -1)
    assert kinds == {True, False}


@pytest.mark.slow
def test_rows_do_not_depend_on_batch_size(classifier_run, tmp_path):
    ref = run_certification(_cfg(classifier_run, tmp_path / "a", batch=1000, skip=1000))[0].path
    for b in (7, 64, 333):
        other = run_certification(_cfg(classifier_run, tmp_path / f"b{b}", batch=b, skip=1000))[0].path
        assert _rows_without_time(other) == _rows_without_time(ref)


@pytest.fixture(scope="module")
def varied_run(tmp_path_factory):
    """A run folder whose classifier answers differently from image to image, and whose votes split under noise on
    some (``classifier_run`` calls every image class 6)."""
    import yaml

    run = tmp_path_factory.mktemp("varied")
    torch.manual_seed(0)
    model, _ = load_classifier(None, 10, model=PICO, stats=((0.286,), (0.353,)))
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0)
        model.patch_embed.proj.weight.normal_(0, 1.0)
    save_export(model, run / "model_best.safetensors")
    (run / "config.yaml").write_text(yaml.safe_dump({"sigma": 0.25, "data": "fashion-mnist"}))
    return run


@pytest.mark.slow
def test_predict_rows(varied_run, tmp_path):
    """PREDICT's log: the planned images in order with their labels, and in each row PREDICT's answer for that
    image (Smooth.predict with the run's seed and n), whether it is the label, and the seconds it took."""
    [res] = run_certification(_cfg(varied_run, tmp_path, n=200, max=10), mode="predict")
    lines = res.path.read_text().splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tcorrect\ttime"
    rows = [ln.split("\t") for ln in lines[1:]]
    idx = [int(r[0]) for r in rows]
    assert idx == list(range(0, 5000, 500))  # every 500th test image, the first 10 (--max 10)
    test = build_dataset("fashion-mnist", "test")
    labels = [int(test.targets[i]) for i in idx]
    assert [int(r[1]) for r in rows] == labels
    model, _ = load_classifier(varied_run, 10)
    x = torch.stack([test[i][0] for i in idx])
    expected = [p.prediction for p in Smooth(model.eval(), 10, 0.25, seed=0).predict_batch(x, idx, 200, 0.001, 128)]
    assert [int(r[2]) for r in rows] == expected
    assert Smooth.ABSTAIN in expected, "some image should abstain, or the rows would not tell n from fewer samples"
    assert len(set(expected) - {Smooth.ABSTAIN}) >= 2, "the classes should vary from image to image"
    assert all(-1 <= p < 10 for p in expected)
    correct = [int(p == y) for p, y in zip(expected, labels, strict=True)]
    assert [int(r[3]) for r in rows] == correct
    assert 0 < sum(correct) < len(correct)  # both kinds of row
    assert all(float(r[4]) > 0 for r in rows)  # seconds per image


@pytest.mark.slow
def test_killed_run_resumes_without_losing_or_duplicating_rows(classifier_run, tmp_path):
    full = run_certification(_cfg(classifier_run, tmp_path / "full", n=1000, skip=625))[0].path
    out = tmp_path / "killed"
    target = out / "certify_sigma0.25.tsv"
    kill_after_rows(
        [
            "certify",
            "--checkpoint",
            str(classifier_run),
            "--n0",
            "20",
            "--n",
            "1000",
            "--skip",
            "625",
            "--batch",
            "128",
            "--output-dir",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ],
        target,
        4,
    )
    partial = read_rows(target, CERTIFY_HEADER)
    assert 3 <= len(partial) < 16, "the run was not interrupted part-way"
    with open(target, "a") as f:
        f.write("9999\t3\t3\t0.12")  # a torn last line, as a crash mid-write leaves
    res = run_certification(_cfg(classifier_run, out, n=1000, skip=625))[0]
    assert res.rows_added == 16 - len(partial)
    assert res.rows_total == 16
    assert _rows_without_time(res.path) == _rows_without_time(full)


@pytest.mark.slow
def test_extending_max_and_refusing_other_settings(classifier_run, tmp_path):
    run_certification(_cfg(classifier_run, tmp_path, max=3))
    res = run_certification(_cfg(classifier_run, tmp_path, max=8))[0]
    assert res.rows_added == 5
    assert res.rows_total == 8
    with pytest.raises(ValueError, match=r"written with other settings \(n: 300 -> 400\)"):
        run_certification(_cfg(classifier_run, tmp_path, n=400))


@pytest.mark.distributed
def test_two_rank_torchrun_equals_one_process(classifier_run, tmp_path):
    single = run_certification(_cfg(classifier_run, tmp_path / "one"))[0].path
    out = tmp_path / "two"
    run_torchrun(
        [
            "certify",
            "--checkpoint",
            str(classifier_run),
            "--n0",
            "20",
            "--num-samples",
            "300",
            "--skip",
            "500",
            "--batch",
            "128",
            "--output-dir",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    merged = out / "certify_sigma0.25.tsv"
    assert _rows_without_time(merged) == _rows_without_time(single)
    assert not list(out.glob("*.rank*"))


def test_bad_inputs_fail_clearly(classifier_run, tmp_path, capsys):
    base = [
        "certify",
        "--checkpoint",
        str(classifier_run),
        "--output-dir",
        str(tmp_path),
        "--device",
        "cpu",
        "--no-progress",
    ]
    for args, msg in (
        (["--sigma", "0"], "sigma must be > 0, got 0.0"),
        (["--alpha", "1.5"], "alpha must be in (0, 0.5), got 1.5"),
        (["--n0", "0"], "--n0 must be >= 1, got 0"),
        (["--n", "0"], "--n must be >= 1, got 0"),
        (["--batch", "0"], "--batch must be >= 1, got 0"),
    ):
        assert main(base + args) == 2
        assert msg in capsys.readouterr().err
    assert main(["certify", "--checkpoint", str(tmp_path / "none.safetensors"), "--sigma", "0.25"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a 10-class classifier cannot certify a 3-class data set
    import numpy as np
    from PIL import Image

    for c in ("a", "b", "c"):
        d = tmp_path / "folder" / "val" / c
        d.mkdir(parents=True)
        Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(d / "0.png")
    with pytest.raises(CheckpointError, match="classifies 10 classes, the data set has 3"):
        run_certification(_cfg(classifier_run, tmp_path / "o", data="folder", data_root=str(tmp_path / "folder")))


def test_what_a_checkpoint_or_the_options_leave_unsaid_is_refused_naming_the_fix(tmp_path, capsys):
    """An autoencoder has no head; a classifier of a run that recorded no sigma needs --sigma; --merge certifies
    nothing, so it has no --estimate."""
    from dmae.models import create_model

    encoder = tmp_path / "encoder.safetensors"
    save_export(create_model(PICO), encoder)
    with pytest.raises(CheckpointError, match=r"is not a trained classifier \(it has no head\); fine-tune it first"):
        run_certification(_cfg(encoder, tmp_path / "o"))
    bare = tmp_path / "bare"
    bare.mkdir()
    model, _ = load_classifier(None, 10, model=PICO, stats=((0.286,), (0.353,)))
    save_export(model, bare / "model_best.safetensors")  # no config.yaml, no trained_sigma in the file
    with pytest.raises(ValueError, match=r"give --sigma \(the checkpoint's run does not say which single sigma"):
        run_certification(_cfg(bare, tmp_path / "o"))
    assert main(["certify", "--checkpoint", str(bare), "--sigma", "0.25", "--merge", "--estimate"]) == 2
    assert "--estimate prices a certification and --merge certifies nothing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


class NaNOnBright(torch.nn.Module):
    """Class 1 on dark images; NaN logits on images whose mean is above 1/2."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 3)
        out[:, 1] = 1.0
        out[x.flatten(1).mean(1) > 0.5] = float("nan")
        return out


def test_images_with_non_finite_logits_abstain_and_are_recorded_beside_the_log(tmp_path):
    """Fixed-n CERTIFY: an image whose noisy samples give NaN logits abstains, and ``<log>.nonfinite.tsv`` says
    which image and how many of its samples (n0 + n) were not finite; the other images are unaffected."""
    import dmae

    x = torch.full((4, 1, 8, 8), 0.2)
    x[2] = 0.8  # mean noise on 64 pixels at sigma 0.25 is about 0.03: image 2 stays bright, the others dark
    data = torch.utils.data.TensorDataset(x, torch.tensor([1, 1, 2, 0]))
    result = dmae.certify(NaNOnBright().eval(), data, sigma=0.25, n0=10, n=50, log_dir=tmp_path)
    [log] = result.logs
    assert log.predict.tolist() == [1, 1, -1, 1]
    assert log.radius[2] == 0.0
    assert (log.radius[[0, 1, 3]] > 0).all()
    assert (tmp_path / "certify_sigma0.25.nonfinite.tsv").read_text() == "2\t60\t60\n"  # idx, non-finite, samples


# ----------------------------------------------------------------------------- never certify what was not computed
def test_nan_head_weights_are_refused_through_the_cli(classifier_run, tmp_path, capsys):
    bad = tmp_path / "nan_run"
    model, _ = load_classifier(classifier_run / "model_best.safetensors", 10)
    with torch.no_grad():
        model.head.weight[3, 0] = float("nan")
    bad.mkdir()
    save_export(model, bad / "model_best.safetensors")
    argv = [
        "certify",
        "--checkpoint",
        str(bad),
        "--sigma",
        "0.25",
        "--n0",
        "10",
        "--n",
        "100",
        "--max",
        "2",
        "--output-dir",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "NaN or infinite" in err
    assert "head.weight" in err
    assert not (tmp_path / "out" / "certify_sigma0.25.tsv").exists()


@pytest.mark.slow
def test_resume_refuses_replaced_weights_and_other_data(classifier_run, tmp_path):
    """Rows of two models (or two data sets) must never share a file: the weights' content is compared, not the path."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((classifier_run / "config.yaml").read_text())
    (run / "model_best.safetensors").write_bytes((classifier_run / "model_best.safetensors").read_bytes())
    run_certification(_cfg(run, tmp_path / "out", max=3))
    other, _ = load_classifier(run / "model_best.safetensors", 10)
    with torch.no_grad():
        other.head.bias.add_(1.0)
    save_export(other, run / "model_best.safetensors")  # same path, other weights
    with pytest.raises(ValueError, match="written with other settings \\(weights_sha256: "):
        run_certification(_cfg(run, tmp_path / "out", max=8))
    assert len(read_rows(tmp_path / "out" / "certify_sigma0.25.tsv", CERTIFY_HEADER)) == 3  # nothing appended


def test_budget_warnings_when_n_cannot_reach_alpha(classifier_run, tmp_path):
    with pytest.warns(UserWarning, match="n=9 cannot certify any radius at alpha=0.001"):
        run_certification(_cfg(classifier_run, tmp_path / "c", n=9, max=1))
    with pytest.warns(UserWarning, match="n=10 can never return a class at alpha=0.001"):
        run_certification(_cfg(classifier_run, tmp_path / "p", n=10, max=1), mode="predict")


def test_radii_beyond_the_sample_budget_are_named_before_sampling(classifier_run, tmp_path, capsys):
    """n = 100 at sigma 0.25 and alpha 0.001 reaches at most 0.25 * Phi^-1(0.001 ** (1 / 100)) = 0.307: the
    report's radii 0.5, 0.75 and 1 cannot be certified whatever the classifier, and the run says so first."""
    from scipy.stats import norm

    cfg = CertifyConfig(
        checkpoint=str(classifier_run), sigma=(0.25,), n0=10, n=100, max=1, output_dir=str(tmp_path), progress=False
    )
    run_certification(cfg)
    out = capsys.readouterr().out
    ceiling = 0.25 * norm.ppf(0.001 ** (1 / 100))
    assert f"no radius above {ceiling:.3f} can be certified" in out
    need = math.ceil(math.log(0.001) / math.log(norm.cdf(1 / 0.25)))  # alpha ** (1 / n) > Phi(r / sigma)
    assert f"certified accuracy at r = 0.5, 0.75, 1 will be 0 (--n {need:,} reaches r = 1)" in out
    assert 218_000 < need < 219_000


def test_candidate_label_certifies_the_label_with_n_samples_only(classifier_run, tmp_path, capsys):
    """``dmae certify --candidate label``: no selection samples; where CERTIFY's class is the label the row is the
    same (the same estimation samples), elsewhere the label or -1; the JSON records it (n0 unused) and a resume with
    the other candidate is refused; the forward passes are n per image."""
    import json

    from dmae.reporting.report import forward_passes, read_log, summarize

    def rows(path):
        return {i: line.split("\t")[:5] for i, line in read_rows(path, CERTIFY_HEADER).items()}  # without time

    select = rows(run_certification(_cfg(classifier_run, tmp_path / "s"))[0].path)
    res = run_certification(_cfg(classifier_run, tmp_path / "l", candidate="label"))[0]
    label = rows(res.path)
    assert label.keys() == select.keys()
    assert any(r[2] == r[1] for r in select.values())
    for i, row in label.items():
        assert row[2] in (row[1], "-1")
        if select[i][2] == row[1]:
            assert row == select[i]
    meta = json.loads(res.path.with_suffix(".json").read_text())
    assert meta["candidate"] == "label"
    assert meta["n0"] is None
    log = read_log(res.path)
    assert forward_passes(log) == 20 * 300
    assert "--candidate label" in summarize([log]).text()
    with pytest.raises(ValueError, match=r"other settings \(n0: None -> 20, candidate: 'label' -> 'select'\)"):
        run_certification(_cfg(classifier_run, tmp_path / "l"))
    legacy = tmp_path / "s" / "certify_sigma0.25.json"  # a fixed-n log written before the option resumes unchanged
    old = json.loads(legacy.read_text())
    del old["candidate"]
    legacy.write_text(json.dumps(old))
    assert run_certification(_cfg(classifier_run, tmp_path / "s"))[0].rows_added == 0
