"""Sequential CERTIFY (dmae.smoothing.sequential): sound like fixed-n CERTIFY, reproducible like it, and cheaper."""

import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from conftest import AlwaysNaN, Constant, Linear2, kill_after_rows, run_torchrun
from dmae.certification.log import SEQUENTIAL_HEADER, read_rows
from dmae.certification.runner import CertifyConfig, run_certification
from dmae.cli import main
from dmae.reporting.report import read_log, summarize
from dmae.smoothing import Smooth
from dmae.smoothing.sequential import SequentialCertifier, SequentialSettings


def _certifier(model, k, sigma, seed=0, **settings):
    kw = dict(n0=20, n_max=2000, alpha=0.001, radii=(0.0, 0.25, 0.5, 0.75, 1.0))
    kw.update(settings)
    return SequentialCertifier(Smooth(model, k, sigma, seed=seed), SequentialSettings(**kw))


@pytest.mark.parametrize("mode", ["targets", "continuous"])
def test_certified_radius_exceeds_the_exact_radius_at_most_alpha_of_the_time(mode):
    """Linear f: the exact certified radius is d, the distance to the boundary. Over 600 independent images at
    alpha = 0.1, a sound certifier is wrong (class other than 1, or radius > d) in about <= 60; a certifier that
    trusts the point estimate k/t at its stopping time overshoots far more often (the test has power)."""
    sigma, alpha, trials = 0.5, 0.1, 600
    model = Linear2(torch.tensor([1.0, -0.5, 0.25, 0.0]), b=0.0)
    x = torch.tensor([0.8, 0.2, 0.1, 0.5]).view(1, 1, 2, 2)
    d = float(x.flatten() @ model.w)
    radii = (0.0, 0.9 * d, d, 1.1 * d)  # targets just below, at and above the exact radius
    certs = _certifier(
        model, 2, sigma, seed=7, n_max=1000, alpha=alpha, mode=mode, radii=radii, epsilon=0.02
    ).certify_batch(x.expand(trials, -1, -1, -1), list(range(trials)), batch_size=4096)
    wrong = sum(c.prediction != Smooth.ABSTAIN and (c.prediction != 1 or c.radius_continuous > d) for c in certs)
    assert wrong <= 80, f"{wrong} of {trials} certificates wrong at alpha={alpha}"  # binomial(600, 0.1) > 80: p < 0.005
    assert sum(c.prediction == 1 for c in certs) > 0.9 * trials  # it certifies
    naive = sum(sigma * norm.ppf(min(c.n_a / (c.n_samples - 20), 1 - 1e-9)) > d for c in certs)
    assert naive > 2 * alpha * trials
    assert all(c.radius <= c.radius_continuous + 1e-12 for c in certs)
    if mode == "targets":
        assert {c.radius for c in certs} <= set(radii) | {0.0}


def test_stops_early_when_settled_and_never_beyond_fixed_n():
    smooth_model = Constant(10, 3)
    certs = _certifier(smooth_model, 10, 0.5, n_max=10_000).certify_batch(torch.rand(3, 1, 4, 4), [0, 1, 2], 1000)
    for c in certs:  # p_A = 1: every target up to the largest 10,000 samples can reach, long before 10,000
        assert c.prediction == 3
        assert c.radius == 1.0
        assert c.n_samples < 2000
        fixed_ceiling = 0.5 * norm.ppf(0.001 ** (1 / 10_000))
        assert c.radius_continuous <= fixed_ceiling
    coin = _certifier(Linear2(torch.tensor([1.0, 0.0, 0.0, 0.0]), b=-0.5), 2, 0.25, n_max=10_000)
    [c] = coin.certify_batch(torch.full((1, 1, 2, 2), 0.5), [0], 1000)  # p_A = 1/2 exactly
    assert c.prediction == Smooth.ABSTAIN
    assert c.radius == 0.0


def test_non_finite_logits_abstain_and_pixels_are_errors():
    [c] = _certifier(AlwaysNaN(), 3, 0.25).certify_batch(torch.rand(1, 1, 4, 4), [5], 64)
    # stopped after the first selection round (10 of the n0 = 20 selection samples)
    assert c.prediction == Smooth.ABSTAIN
    assert c.non_finite == 10
    assert c.n_samples == 10
    [c] = _certifier(AlwaysNaN(), 3, 0.25, candidate="label").certify_batch(torch.rand(1, 1, 4, 4), [5], 64, [1])
    assert c.prediction == Smooth.ABSTAIN
    assert c.non_finite == c.n_samples == 12  # the first look, no selection
    x = torch.rand(2, 1, 4, 4)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"image\(s\) \[9\] have NaN or infinite pixels"):
        _certifier(Constant(3, 0), 3, 0.25).certify_batch(x, [8, 9], 64)


@pytest.mark.parametrize("candidate", ["select", "label"])
def test_answers_do_not_depend_on_batch_size_or_company(candidate):
    """Under the early schedule the rounds end at counts that are not whole chunks (12, 14, 16, ...): each sample
    is still element j % 100 of its chunk, so answers are the same for any batch size and company."""
    model = Linear2(torch.tensor([1.0, 1.0, -1.0, 0.5]), b=-0.4)
    x = torch.rand(6, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    idx, labels = [3, 14, 15, 92, 65, 35], [1, 0, 1, 1, 0, 1]
    certifier = _certifier(model, 2, 0.4, seed=9, candidate=candidate)
    assert any(t % 100 for t in certifier.cs.looks)
    ref = certifier.certify_batch(x, idx, 10_000, labels)
    assert len({c.n_samples for c in ref}) > 1  # images stop at different times
    for batch in (1, 37, 100, 333):
        assert _certifier(model, 2, 0.4, seed=9, candidate=candidate).certify_batch(x, idx, batch, labels) == ref
    alone = _certifier(model, 2, 0.4, seed=9, candidate=candidate).certify_batch(x[2:3], [15], 50, labels[2:3])
    assert alone == [ref[2]]


def test_early_schedule_looks_where_a_certificate_first_becomes_possible():
    """The early schedule's looks: the chunk schedule's, then from the first count at which an all-success stream
    clears 1/2, about 10% apart, and each count at which it first clears a target's threshold. An image with
    p_A = 1 (label candidate: no selection) stops exactly there, within 1.3x of the information limit
    ln(1/alpha) / ln(1/tau), the fewest samples after which any level-alpha bound can exceed tau."""
    import math

    from dmae.smoothing.confseq import threshold
    from dmae.smoothing.sequential import chunk_looks, oracle_certificates, sequence_for

    sigma, alpha, n_max = 0.5, 0.001, 10_000
    for r in (0.0, 0.25, 0.5, 0.75, 1.0):
        settings = SequentialSettings(n0=100, n_max=n_max, alpha=alpha, radii=(r,), candidate="label")
        cs = sequence_for(settings, sigma)
        tau = threshold(r, sigma)
        first = next(t for t in range(1, n_max) if cs.running_lower(t, t) > tau)
        assert first in cs.looks
        assert set(chunk_looks(n_max)) <= set(cs.looks)
        assert cs.looks[0] == next(t for t in range(1, n_max) if cs.running_lower(t, t) > 0.5)
        [c] = oracle_certificates(settings, sigma, [1.0])
        assert c.radius == r
        assert c.n_samples == first
        assert c.n_select == 0
        assert c.n_samples <= 1.3 * math.log(1 / alpha) / math.log(1 / tau), (r, c.n_samples)
    [c] = oracle_certificates(SequentialSettings(n0=100, n_max=n_max, alpha=alpha, radii=(1.0,)), sigma, [1.0])
    assert c.n_select == 10
    assert c.n_samples == 10 + first  # select: 10 unanimous votes end the selection
    with pytest.raises(ValueError, match="give sigma"):
        sequence_for(SequentialSettings(n0=100, n_max=n_max, alpha=alpha))


def test_chunk_schedule_answers_as_the_earlier_engine():
    """``schedule="chunks"`` is the engine that wrote earlier logs: the same answers, sample for sample (the values
    below were produced by the engine before the early schedule existed, on the same oracles and seed)."""
    from dmae.smoothing.sequential import oracle_certificates

    probs = [0.9, 0.99, 1.0, 0.8, 0.55]
    want = {
        "targets": [
            (0, 0.5, 820, 719),
            (0, 0.5, 120, 98),
            (0, 0.5, 120, 100),
            (0, 0.25, 620, 486),
            (0, 0.0, 2520, 1357),
        ],
        "continuous": [
            (0, 0.575531, 2320, 2068),
            (0, 1.033369, 2720, 2671),
            (0, 1.4137, 2720, 2700),
            (0, 0.368528, 2320, 1843),
            (-1, 0.0, 1720, 911),
        ],
    }
    for mode, rows in want.items():
        kw = dict(mode=mode, radii=(0.0, 0.25, 0.5), epsilon=0.05, schedule="chunks")
        certs = oracle_certificates(SequentialSettings(n0=20, n_max=3000, alpha=0.01, **kw), 0.5, probs, seed=3)
        assert [(c.prediction, round(c.radius, 6), c.n_samples, c.n_a) for c in certs] == rows


def test_label_candidate_certifies_the_label_without_selection_samples():
    """``candidate="label"``: no selection samples; the label is certified when p_label is high, and an image whose
    label the classifier never gives abstains (not certified correct) at the first look, where the upper bound
    falls below 1/2; labels are required and must be classes; the label shortcut has no meaning there."""
    model = Constant(3, 2)
    x = torch.rand(2, 1, 2, 2)
    right, wrong = _certifier(model, 3, 0.5, candidate="label").certify_batch(x, [0, 1], 500, labels=[2, 0])
    assert right.prediction == 2
    assert right.radius == 1.0
    assert right.n_select == 0
    assert right.n_samples == right.n_a
    assert wrong.prediction == Smooth.ABSTAIN
    assert wrong.n_a == 0
    assert wrong.n_samples == 12
    assert wrong.radius == 0.0
    with pytest.raises(ValueError, match="candidate='label' needs the label of image 0"):
        _certifier(model, 3, 0.5, candidate="label").certify_batch(x, [0, 1], 500)
    with pytest.raises(ValueError, match="image 1 has label 3, outside the classifier's 3 classes"):
        _certifier(model, 3, 0.5, candidate="label").certify_batch(x, [0, 1], 500, labels=[2, 3])
    with pytest.raises(ValueError, match="with candidate='label' there is no guess"):
        SequentialSettings(n0=20, n_max=100, alpha=0.01, candidate="label", stop_on_wrong_guess=True)


# ----------------------------------------------------------------------------- the command
def _rows_without_time(path):
    """Rows sorted by index, the time column (the sixth) left out."""
    rows = [ln.split("\t") for ln in path.read_text().splitlines()]
    return [r[:5] + r[6:] for r in rows]


def _cfg(run, out, **over):
    kw = dict(
        checkpoint=str(run),
        n0=20,
        n=2000,
        alpha=0.001,
        skip=1000,
        batch=256,
        seed=0,
        output_dir=str(out),
        device="cpu",
        progress=False,
        sequential="targets",
    )
    kw.update(over)
    return CertifyConfig(**kw)


@pytest.mark.slow
def test_cli_rows_keep_the_standard_columns_first_and_report_samples(classifier_run, tmp_path, capsys):
    argv = [
        "certify",
        "--checkpoint",
        str(classifier_run),
        "--sequential",
        "targets",
        "--n0",
        "20",
        "--n-max",
        "2000",
        "--skip",
        "1000",
        "--batch",
        "256",
        "--output-dir",
        str(tmp_path),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    path = tmp_path / "sequential_sigma0.25.tsv"
    lines = path.read_text().splitlines()
    assert tuple(lines[0].split("\t")) == SEQUENTIAL_HEADER
    assert len(lines) == 11
    log = read_log(path)  # other tools read the first six columns as they are
    assert len(log) == 10
    assert log.n_samples is not None
    assert (log.n_samples <= 2020).all()
    assert "samples/img" in out
    assert "samples/img" in summarize([log]).text()
    import json

    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["sequential"] == "targets"
    assert meta["n_max"] == 2000
    assert meta["radii"] == [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.slow
def test_rows_do_not_depend_on_batch_size_and_resume_exactly(classifier_run, tmp_path):
    ref = run_certification(_cfg(classifier_run, tmp_path / "a", batch=1000))[0].path
    other = run_certification(_cfg(classifier_run, tmp_path / "b", batch=77))[0].path
    assert (_rows_without_time(other)) == (_rows_without_time(ref))
    # killed mid-run, then the same command: the rows of one uninterrupted run. (A small batch, so that few images
    # are in flight at once: the early schedule's first rounds are a few samples each, and at batch 256 every
    # image of this run would share the batches and finish together.)
    out = tmp_path / "killed"
    target = out / "sequential_sigma0.25.tsv"
    kill_after_rows(
        [
            "certify",
            "--checkpoint",
            str(classifier_run),
            "--sequential",
            "targets",
            "--n0",
            "20",
            "--n",
            "2000",
            "--skip",
            "1000",
            "--batch",
            "16",
            "--output-dir",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ],
        target,
        3,
    )
    partial = read_rows(target, SEQUENTIAL_HEADER)
    assert 2 <= len(partial) < 10, "the run was not interrupted part-way"
    res = run_certification(_cfg(classifier_run, out))[0]
    assert res.rows_total == 10
    assert (_rows_without_time(res.path)) == (_rows_without_time(ref))
    with pytest.raises(ValueError, match=r"other settings \(n_max: 2000 -> 3000, sequence: "):
        run_certification(_cfg(classifier_run, out, n_max=3000))


@pytest.mark.distributed
def test_two_rank_torchrun_equals_one_process(classifier_run, tmp_path):
    single = run_certification(_cfg(classifier_run, tmp_path / "one"))[0].path
    out = tmp_path / "two"
    run_torchrun(
        [
            "certify",
            "--checkpoint",
            str(classifier_run),
            "--sequential",
            "targets",
            "--n0",
            "20",
            "--num-samples",
            "2000",
            "--skip",
            "1000",
            "--batch",
            "256",
            "--output-dir",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert (_rows_without_time(out / "sequential_sigma0.25.tsv")) == (_rows_without_time(single))


@pytest.mark.parametrize("schedule", ["early", "chunks"])
def test_replay_counts_only_estimation_samples_and_bounds_at_looks(schedule):
    """Recompute an image's votes by hand from the chunk seeds: c_hat from the selection samples only (under the
    early schedule: the first selection look where the top class holds a clear majority, else all n0), n_a from the
    estimation samples only, t a look (not a whole number of chunks under the early schedule: sample j is element
    j % 100 of chunk j // 100 wherever the rounds end), p_a_lower the running maximum of the lower bound."""
    from dmae.smoothing import CHUNK, chunk_seed
    from dmae.smoothing.sequential import majority_needed, select_looks

    model = Linear2(torch.tensor([1.0, 1.0, -1.0, 0.5]), b=-0.3)
    x = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    certifier = _certifier(model, 2, 0.4, seed=5, n0=150, n_max=3000, schedule=schedule)
    certs = certifier.certify_batch(x, [10, 11, 12], 256)
    cs = certifier.cs

    def votes(i, idx, phase, n):
        out = []
        for c in range((n + CHUNK - 1) // CHUNK):
            g = torch.Generator().manual_seed(chunk_seed(5, idx, phase, c))
            eta = torch.randn((CHUNK, 1, 2, 2), generator=g)
            out.append(model(x[i] + 0.4 * eta).argmax(1))
        return torch.cat(out)[:n]

    if schedule == "chunks":
        assert all(t % CHUNK == 0 for t in cs.looks)
        assert select_looks(certifier.settings) == (150,)
    else:
        assert any(t % CHUNK for t in cs.looks)
        assert select_looks(certifier.settings)[0] == 10
    for i, (idx, c) in enumerate(zip([10, 11, 12], certs, strict=True)):
        for m in select_looks(certifier.settings):
            sel = torch.bincount(votes(i, idx, 0, m), minlength=2)
            if m == 150 or sel.max() >= majority_needed(m):
                break
        c_hat = int(sel.argmax())
        t = c.n_samples - m
        assert t in cs.looks
        k = int((votes(i, idx, 1, t) == c_hat).sum())
        assert c.n_a == k
        running = max(cs.lower(int((votes(i, idx, 1, s) == c_hat).sum()), s) for s in cs.looks if s <= t)
        assert c.p_a_lower == running
        assert c.prediction in (c_hat, Smooth.ABSTAIN)
    if schedule == "early":
        assert any(c.n_samples - 150 not in cs.looks for c in certs), "no image stopped its selection early"


def test_nan_during_estimation_abstains_and_duplicates_are_refused():
    class LateNaN(nn.Module):
        """Finite on most noisy inputs; NaN when the noisy first pixel exceeds 1.2 (a few percent of samples)."""

        def __init__(self) -> None:
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            out = torch.zeros(x.shape[0], 3)
            out[:, 1] = 1.0
            out[x.flatten(1)[:, 0] > 1.2] = float("nan")
            return out

    x = torch.full((1, 1, 2, 2), 0.5)
    [c] = _certifier(LateNaN(), 3, 0.35, n0=10, n_max=5000).certify_batch(x, [0], 512)
    assert c.prediction == Smooth.ABSTAIN
    assert c.non_finite > 0
    assert c.n_samples > 10
    with pytest.raises(ValueError, match="image index 4 given twice"):
        _certifier(Constant(3, 0), 3, 0.25).certify_batch(torch.rand(2, 1, 2, 2), [4, 4], 64)


def test_options_that_would_do_nothing_are_errors(classifier_run, tmp_path, capsys):
    base = ["--checkpoint", str(classifier_run), "--output-dir", str(tmp_path), "--device", "cpu", "--no-progress"]
    for argv, message in (
        (["certify", "--n-max", "5000"], "--n-max 5000 is only used with --sequential"),
        (
            ["certify", "--sequential", "targets", "--epsilon", "0.1"],
            "--epsilon 0.1 is only used with --sequential continuous",
        ),
        (
            ["certify", "--sequential", "continuous", "--radii", "0", "0.5"],
            "--radii (0.0, 0.5) is only used with --sequential targets",
        ),
        (["certify", "--sequential", "targets", "--radii", "-1"], "--radii must be finite numbers >= 0, got -1.0"),
        (["predict", "--sequential", "targets"], "--sequential targets is a mode of certify, not of predict"),
    ):
        assert main([*argv, *base]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_continuous_mode_through_the_cli_and_resume_checks(classifier_run, tmp_path, capsys):
    res = run_certification(_cfg(classifier_run, tmp_path, sequential="continuous", epsilon=0.05))[0]
    log = read_log(res.path)
    assert len(log) == 10
    assert (log.radius >= 0).all()
    rows = [ln.split("\t") for ln in res.path.read_text().splitlines()[1:]]
    assert all(r[3] == r[7] for r in rows)  # continuous mode: radius is the continuous radius
    for over, what in (
        ({"epsilon": 0.1}, "epsilon: 0.05 -> 0.1"),
        ({"sequence": "union"}, "sequence: "),
        ({"sequential": "targets", "epsilon": None}, "sequential: 'continuous' -> 'targets'"),
    ):
        with pytest.raises(ValueError, match=what):
            run_certification(_cfg(classifier_run, tmp_path, **{"sequential": "continuous", "epsilon": 0.05, **over}))


def test_label_shortcut_skips_estimation_of_wrong_guesses_only():
    """``stop_on_wrong_guess``: an image whose n0 guess is not its label abstains after n0 samples; an image whose
    guess is right gets the certificate of the run without the shortcut (after all n0 selection samples); labels
    are required."""
    model = Constant(3, 2)  # always class 2: the guess is 2 for every image
    x = torch.rand(2, 1, 2, 2)
    plain = _certifier(model, 3, 0.5).certify_batch(x, [0, 1], 500)
    short = _certifier(model, 3, 0.5, stop_on_wrong_guess=True).certify_batch(x, [0, 1], 500, labels=[2, 0])
    # with the shortcut the selection draws all n0 = 20 samples (so a log tells the stopped images: n_samples ==
    # n0); without it, 10 unanimous votes end the selection. The estimation and the answer are the same.
    assert (short[0].n_select, plain[0].n_select) == (20, 10)
    assert short[0]._replace(n_samples=0, n_select=0) == plain[0]._replace(n_samples=0, n_select=0)
    assert short[0].n_samples - 20 == plain[0].n_samples - 10
    assert plain[1].n_samples > 20
    assert short[1].prediction == Smooth.ABSTAIN
    assert short[1].n_samples == 20
    assert short[1].wrong_guess
    assert short[1].radius == 0.0
    assert not plain[1].wrong_guess
    with pytest.raises(ValueError, match="stop_on_wrong_guess needs the label of image 0"):
        _certifier(model, 3, 0.5, stop_on_wrong_guess=True).certify_batch(x, [0, 1], 500)


@pytest.mark.slow
def test_label_shortcut_through_the_cli_keeps_certified_accuracy_and_is_recorded(classifier_run, tmp_path, capsys):
    import json

    full = read_log(run_certification(_cfg(classifier_run, tmp_path / "full", skip=500))[0].path)
    res = run_certification(_cfg(classifier_run, tmp_path / "short", skip=500, stop_on_wrong_guess=True))[0]
    short = read_log(res.path)
    wrong = full.predict != full.label
    assert wrong.any(), "the tiny classifier should get some of the 20 images wrong"
    assert (~wrong).any(), "the tiny classifier should get some of the 20 images wrong"
    for r in (0.0, 0.25, 0.5):
        assert short.certified_accuracy(r) == full.certified_accuracy(r)
    assert short.n_samples.sum() < full.n_samples.sum()
    meta = json.loads(res.path.with_suffix(".json").read_text())
    assert meta["stop_on_wrong_guess"] is True
    assert short.wrong_guess_skipped >= 1
    legacy = tmp_path / "full" / "sequential_sigma0.25.json"  # a log written before the option existed resumes
    old = json.loads(legacy.read_text())
    del old["stop_on_wrong_guess"]
    legacy.write_text(json.dumps(old))
    assert run_certification(_cfg(classifier_run, tmp_path / "full", skip=500))[0].rows_added == 0
    assert "--stop-on-wrong-guess" in summarize([short]).text()
    assert "--stop-on-wrong-guess" not in summarize([full]).text()
    with pytest.raises(ValueError, match=r"other settings \(stop_on_wrong_guess: True -> None\)"):
        run_certification(_cfg(classifier_run, tmp_path / "short", skip=500))
    argv = [
        "certify",
        "--checkpoint",
        str(classifier_run),
        "--stop-on-wrong-guess",
        "--output-dir",
        str(tmp_path),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(argv) == 2
    assert "--stop-on-wrong-guess True is only used with --sequential" in capsys.readouterr().err


def binomial_excess(wrong: int, trials: int, alpha: float) -> float:
    """One-sided binomial test of "wrong certificates happen at rate <= alpha": P(Binomial(trials, alpha) >= wrong).
    A sound certifier falls below 0.001 with probability below 0.001; one wrong twice as often as alpha does so
    nearly always at the trial counts used here."""
    return float(binom.sf(wrong - 1, trials, alpha))


@pytest.mark.parametrize(
    ("mode", "candidate", "schedule"),
    [
        ("targets", "select", "early"),
        ("continuous", "select", "early"),
        ("targets", "label", "early"),
        ("continuous", "label", "early"),
    ],
)
@pytest.mark.slow
def test_wrong_certificates_stay_within_alpha_on_bernoulli_oracles(mode, candidate, schedule):
    """End to end on the engine (selection or the label, rounds, budget test, futility, stop): Bernoulli oracles
    with p_A just below and just above each threshold Phi(r / sigma), at 1/2 and at 1, alpha = 0.05, 400 images
    each, n_max = 500. A certificate is wrong when its class is not g(x) (class 1, or any class at p_A = 1/2) or its
    radius exceeds the true one, sigma * Phi^-1(p). Per p_A, a one-sided binomial test at level 0.001 must not find the
    wrong certificates more frequent than alpha; the same test flags a certifier that trusts the point estimate
    k / t at the same stopping times (so the test has power: it cannot pass vacuously)."""
    from dmae.smoothing.sequential import oracle_certificates

    sigma, alpha, trials = 0.5, 0.05, 400
    radii = (0.0, 0.25, 0.5, 1.0)  # r = 1 at n_max = 500 is out of reach: the budget test refutes it early
    taus = [norm.cdf(r / sigma) for r in radii[1:]]
    ps = [0.5, 1.0] + [t + d for t in taus for d in (-0.01, 0.01)]
    settings = SequentialSettings(
        n0=20, n_max=500, alpha=alpha, mode=mode, radii=radii, epsilon=0.02, candidate=candidate, schedule=schedule
    )
    flagged, certified = 0, 0
    for j, p in enumerate(ps):
        true_radius = sigma * norm.ppf(p) if p < 1 else float("inf")
        wrong = naive = 0
        for c in oracle_certificates(settings, sigma, [p] * trials, seed=j):  # label: class 0
            if c.prediction != Smooth.ABSTAIN:
                certified += 1
                wrong += c.prediction != 0 or p == 0.5 or c.radius_continuous > true_radius or c.radius > true_radius
            t, k = c.n_samples - c.n_select, c.n_a
            naive += t > 0 and k / t > 0.5 and (p == 0.5 or sigma * norm.ppf(min(k / t, 1 - 1e-12)) > true_radius)
        assert binomial_excess(wrong, trials, alpha) > 1e-3, f"p_A = {p:.4f}: {wrong} of {trials} certificates wrong"
        flagged += binomial_excess(naive, trials, alpha) <= 1e-3
    assert flagged >= len(ps) // 2, f"the test flags the point-estimate certifier at only {flagged} p_A: no power"
    assert certified > trials * len(ps) / 2  # and the certifier under test does certify


@pytest.mark.slow
def test_futility_rule_saves_samples_on_hopeless_targets_and_is_recorded(classifier_run, tmp_path, capsys):
    """The futility rule (default beta = 0.01) refutes r = 0.5 for oracles at p_A = 0.82 (threshold 0.8413 at
    sigma = 0.5) long before the upper bound alone would; the same streams certify the same targets with and
    without it. Through the CLI it is recorded in the JSON, a resume with another beta is refused, and it needs
    --sequential."""
    import json

    from dmae.smoothing.sequential import DEFAULT_FUTILITY, oracle_certificates

    kw = dict(n0=20, n_max=10_000, alpha=0.001, radii=(0.0, 0.25, 0.5))
    off = oracle_certificates(SequentialSettings(**kw, futility=None), 0.5, [0.82] * 30, seed=4)
    on = oracle_certificates(SequentialSettings(**kw), 0.5, [0.82] * 30, seed=4)
    assert sum(c.n_samples for c in on) < 0.5 * sum(c.n_samples for c in off)
    assert [c.radius for c in on] == [c.radius for c in off] == [0.25] * 30
    res = run_certification(_cfg(classifier_run, tmp_path / "a", skip=2000))[0]
    assert json.loads(res.path.with_suffix(".json").read_text())["futility"] == DEFAULT_FUTILITY
    res = run_certification(_cfg(classifier_run, tmp_path / "b", skip=2000, futility=0.0))[0]
    assert json.loads(res.path.with_suffix(".json").read_text())["futility"] is None
    with pytest.raises(ValueError, match=r"other settings \(futility: None -> 0.01\)"):
        run_certification(_cfg(classifier_run, tmp_path / "b", skip=2000))
    argv = [
        "certify",
        "--checkpoint",
        str(classifier_run),
        "--futility",
        "0.05",
        "--output-dir",
        str(tmp_path),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(argv) == 2
    assert "--futility 0.05 is only used with --sequential" in capsys.readouterr().err
    assert main([*argv[:3], "--sequential", "targets", "--futility", "1", *argv[5:]]) == 2
    assert "--futility must be in [0, 0.5] (0 turns the rule off), got 1.0" in capsys.readouterr().err
    legacy = tmp_path / "b" / "sequential_sigma0.25.json"  # a log written before the option: no key at all
    old = json.loads(legacy.read_text())
    del old["futility"]
    legacy.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"other settings \(futility: None -> 0.01\)"):
        run_certification(_cfg(classifier_run, tmp_path / "b", skip=2000))
    assert run_certification(_cfg(classifier_run, tmp_path / "b", skip=2000, futility=0.0))[0].rows_added == 0


def test_label_candidate_through_the_cli_is_recorded_and_reported(classifier_run, tmp_path, capsys):
    """``--candidate label`` with ``--sequential``: rows are the label or -1, no selection samples are spent, the
    JSON records it (n0 unused), the report says what its rows mean, and resuming with the other candidate, the
    label shortcut beside it, or PREDICT with it are refused."""
    import json

    res = run_certification(_cfg(classifier_run, tmp_path / "label", skip=500, candidate="label"))[0]
    log = read_log(res.path)
    select = read_log(run_certification(_cfg(classifier_run, tmp_path / "select", skip=500))[0].path)
    assert all(p in (y, -1) for p, y in zip(log.predict, log.label, strict=True))
    assert log.candidate == "label"
    assert select.candidate == "select"
    assert log.n_samples.sum() < select.n_samples.sum()
    meta = json.loads(res.path.with_suffix(".json").read_text())
    assert meta["candidate"] == "label"
    assert meta["n0"] is None
    assert meta["schedule"] == "early"
    text = summarize([log]).text()
    assert "candidate" in text.splitlines()[0]
    assert "certified each image's label (--candidate label)" in text
    with pytest.raises(ValueError, match=r"other settings \(n0: None -> 20, .*candidate: 'label' -> 'select'"):
        run_certification(_cfg(classifier_run, tmp_path / "label", skip=500))
    base = ["--checkpoint", str(classifier_run), "--output-dir", str(tmp_path), "--device", "cpu", "--no-progress"]
    assert main(["predict", "--candidate", "label", *base]) == 2
    assert "--candidate label is a mode of certify, not of predict" in capsys.readouterr().err
    assert main(["certify", "--sequential", "targets", "--candidate", "label", "--stop-on-wrong-guess", *base]) == 2
    assert "with --candidate label there is no guess" in capsys.readouterr().err


def test_a_log_of_the_chunk_schedule_resumes_only_with_it(classifier_run, tmp_path, capsys):
    """A sequential log written before the early schedule (its JSON has no schedule or candidate) was certified
    with the chunk schedule: under the new default it is refused, naming the option that resumes it; with
    ``--schedule chunks`` it resumes. ``--schedule`` needs ``--sequential``."""
    import json

    out = tmp_path / "old"
    run_certification(_cfg(classifier_run, out, skip=2000, schedule="chunks"))
    meta_file = out / "sequential_sigma0.25.json"
    old = json.loads(meta_file.read_text())
    assert old["schedule"] == "chunks"
    assert "looks=[100, 200," in old["sequence"]
    del old["schedule"], old["candidate"]  # as the earlier version wrote it
    meta_file.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"schedule: 'chunks' -> 'early'.*resume it with --schedule chunks"):
        run_certification(_cfg(classifier_run, out, skip=2000))
    assert run_certification(_cfg(classifier_run, out, skip=2000, schedule="chunks"))[0].rows_added == 0
    base = ["--checkpoint", str(classifier_run), "--output-dir", str(tmp_path), "--device", "cpu", "--no-progress"]
    assert main(["certify", "--schedule", "chunks", *base]) == 2
    assert "--schedule chunks is only used with --sequential" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n0": 0}, "n0 must be an integer >= 1, got 0"),
        ({"n_max": 2.5}, "n_max must be an integer >= 1, got 2.5"),
        ({"mode": "target"}, "mode must be 'targets' or 'continuous', got 'target'"),
        ({"radii": ()}, r"radii must be finite numbers >= 0, got \(\)"),
        ({"radii": (0.25, -0.5)}, r"radii must be finite numbers >= 0, got \(0.25, -0.5\)"),
        ({"epsilon": 0.0}, "epsilon must be a finite number > 0, got 0.0"),
        ({"candidate": "labels"}, "candidate must be 'select' or 'label', got 'labels'"),
        ({"schedule": "late"}, "schedule must be 'early' or 'chunks', got 'late'"),
        ({"candidate": "label", "stop_on_wrong_guess": True}, "with candidate='label' there is no guess"),
    ],
)
def test_sequential_settings_name_the_value_that_cannot_be(change, message):
    valid = {"n0": 20, "n_max": 1000, "alpha": 0.001}
    SequentialSettings(**valid)
    with pytest.raises(ValueError, match=message):
        SequentialSettings(**{**valid, **change})
