"""``dmae certify --estimate`` (dmae.certification.estimate) and the Bernoulli oracles behind it
(sequential.oracle_certificates)."""

import numpy as np
import pytest
import torch

from conftest import AlwaysNaN, Constant
from dmae.certification.estimate import estimate_cost, pilot_positions
from dmae.certification.runner import CertifyConfig, estimate_certification, run_certification
from dmae.cli import main
from dmae.reporting.report import read_log
from dmae.smoothing import Smooth
from dmae.smoothing.sequential import SequentialCertifier, SequentialSettings, oracle_certificates

SETTINGS = dict(n0=20, n_max=3000, alpha=0.001, radii=(0.0, 0.25, 0.5, 0.75, 1.0))


def test_oracle_at_p_one_costs_what_a_constant_classifier_costs():
    """p_A = 1 is deterministic: the oracle and the engine on a classifier that always says class 3 stop at the
    same sample with the same certificate (targets and continuous)."""
    for mode in ("targets", "continuous"):
        s = SequentialSettings(mode=mode, **SETTINGS)
        [real] = SequentialCertifier(Smooth(Constant(10, 3), 10, 0.5, seed=0), s).certify_batch(
            torch.rand(1, 1, 4, 4), [0], 500
        )
        [oracle] = oracle_certificates(s, 0.5, [1.0])
        assert (oracle.n_samples, oracle.radius, oracle.radius_continuous) == (
            real.n_samples,
            real.radius,
            real.radius_continuous,
        )


def test_oracle_has_the_requested_probabilities_and_follows_the_label_shortcut():
    s = SequentialSettings(**{**SETTINGS, "n_max": 20_000})
    certs = oracle_certificates(s, 0.25, [0.7] * 20)
    won = [c for c in certs if c.prediction == 0]
    assert len(won) >= 17  # abstains only when the 20 selection samples pick class 1
    freq = sum(c.n_a for c in won) / sum(c.n_samples - 20 for c in won)
    assert abs(freq - 0.7) < 0.02, freq  # the oracle's votes have the requested frequency
    # many classes: the top class may have p < 1/2 and still be the guess; the others are never certified
    probs = np.array([[0.3, 0.25, 0.25, 0.2]] * 10 + [[0.1, 0.6, 0.2, 0.1]] * 10)
    many = oracle_certificates(s, 0.25, probs)
    assert all(c.prediction == Smooth.ABSTAIN for c in many[:10])  # p_A < 1/2: nothing certifies
    assert sum(c.prediction == 1 for c in many[10:]) >= 8
    short = oracle_certificates(
        SequentialSettings(**SETTINGS, stop_on_wrong_guess=True),
        0.25,
        np.array([[0.9, 0.1], [0.9, 0.1]]),
        labels=[0, 1],
    )
    assert short[0].n_samples > 20
    assert not short[0].wrong_guess
    assert short[1].wrong_guess
    assert short[1].n_samples == 20
    with pytest.raises(ValueError, match=r"probs must be probabilities in \[0, 1\] \(rows summing to 1\), got \[1.5\]"):
        oracle_certificates(s, 0.25, [1.5])
    with pytest.raises(ValueError, match="rows summing to 1"):
        oracle_certificates(s, 0.25, np.array([[0.5, 0.4]]))


def test_pilot_positions_spread_over_the_images():
    assert pilot_positions(0) == []
    assert pilot_positions(3) == [0, 1, 2]
    pos = pilot_positions(1000)
    assert len(pos) == 8
    assert pos[0] == 0
    assert pos[-1] == 999


def test_sequential_estimate_brackets_and_predicts_a_constant_classifier_exactly():
    smooth = Smooth(Constant(10, 3), 10, 0.5, seed=0)
    s = SequentialSettings(**SETTINGS)
    x = torch.rand(4, 1, 4, 4)
    est = estimate_cost(smooth, "sequential", x, [0, 1, 2, 3], [3, 3, 3, 3], 50, 0, 20, 3000, 500, s)
    actual = sum(
        c.n_samples
        for c in SequentialCertifier(smooth, s).certify_batch(torch.rand(50, 1, 4, 4), list(range(50)), 1000)
    )
    assert est.passes_min <= actual <= est.passes_max
    assert est.passes_max == 50 * 3020
    assert est.passes_expected == actual  # p_A = 1 everywhere: the pilot's oracles are exact
    assert est.probe_passes == 4 * 1000
    assert est.probe_seconds > 0
    assert "expected about" in est.text()
    fixed = estimate_cost(smooth, "certify", x, [0, 1, 2, 3], [3] * 4, 50, 7, 20, 3000, 500)
    assert fixed.passes_min == fixed.passes_max == fixed.passes_expected == 50 * 3020
    assert "already in the log" in fixed.text()


def test_estimate_of_a_classifier_with_non_finite_logits_is_finite():
    """Every pilot sample non-finite (no class frequencies to run oracles on) once divided by zero; such an image
    abstains after its first selection round (10 of the n0 = 20 samples), which is what the estimate now says."""
    smooth = Smooth(AlwaysNaN(), 3, 0.5, seed=0)
    s = SequentialSettings(**SETTINGS)
    est = estimate_cost(smooth, "sequential", torch.rand(2, 1, 4, 4), [0, 1], [0, 1], 10, 0, 20, 3000, 500, s)
    actual = SequentialCertifier(smooth, s).certify_batch(torch.rand(10, 1, 4, 4), list(range(10)), 500)
    assert est.passes_expected == sum(c.n_samples for c in actual) == 10 * 10 == est.passes_min


@pytest.mark.slow
def test_estimate_through_the_cli_counts_what_is_left_and_writes_nothing(classifier_run, tmp_path, capsys):
    out = tmp_path / "est"
    argv = [
        "certify",
        "--checkpoint",
        str(classifier_run),
        "--n0",
        "20",
        "--n",
        "500",
        "--skip",
        "1000",
        "--batch",
        "256",
        "--output-dir",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
        "--estimate",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "10 image(s) to certify" in text
    assert "5,200 forward passes" in text
    assert not out.exists()
    cfg = dict(
        checkpoint=str(classifier_run),
        n0=20,
        n=500,
        skip=1000,
        max=4,
        batch=256,
        output_dir=str(out),
        device="cpu",
        progress=False,
    )
    run_certification(CertifyConfig(**cfg))  # 4 of the 10 images certified
    [est] = estimate_certification(CertifyConfig(**{**cfg, "max": None, "estimate": True}))
    assert (est.images, est.done, est.passes_max) == (6, 4, 6 * 520)
    assert len(read_log(out / "certify_sigma0.25.tsv")) == 4  # the estimate wrote nothing
    with pytest.raises(ValueError, match=r"other settings \(n: 500 -> 600\)"):  # as the run itself would refuse
        estimate_certification(CertifyConfig(**{**cfg, "n": 600, "estimate": True}))
    seq = estimate_certification(CertifyConfig(**{**cfg, "max": None, "sequential": "targets", "n_max": 2000}))[0]
    assert seq.images == 10
    assert seq.passes_min < seq.passes_expected <= seq.passes_max == 10 * 2020


def test_nothing_left_to_certify_costs_nothing_and_bounds_are_images_times_samples():
    """With no pilot images (every planned image already in the log) there is nothing to time: fixed-n costs 0
    passes; sequential CERTIFY is bounded by its least and most samples per image times the images left."""
    from dmae.smoothing.sequential import select_looks, sequence_for

    smooth, none = Smooth(Constant(10, 3), 10, 0.5, seed=0), torch.zeros(0)
    done = estimate_cost(smooth, "certify", none, [], [], 0, 12, 20, 3000, 500)
    assert (done.passes_min, done.passes_max, done.images, done.done) == (0, 0, 0, 12)
    assert "0 forward passes: about 0 s" in done.text()
    s = SequentialSettings(**SETTINGS)
    seq = estimate_cost(smooth, "sequential", none, [], [], 5, 0, 20, 3000, 500, s)
    first = sequence_for(s, 0.5).looks[0]
    assert seq.passes_min == 5 * (select_looks(s)[0] + first)  # the first selection round, then the first look
    assert seq.passes_max == 5 * (20 + 3000)  # n0 selection samples, then n_max
    label = SequentialSettings(**SETTINGS, candidate="label")
    seq = estimate_cost(smooth, "sequential", none, [], [], 5, 0, 20, 3000, 500, label)
    assert seq.passes_min == 5 * sequence_for(label, 0.5).looks[0]  # no selection samples
    assert seq.passes_max == 5 * 3000
    with pytest.raises(ValueError, match="a sequential estimate needs the sequential settings"):
        estimate_cost(smooth, "sequential", none, [], [], 5, 0, 20, 3000, 500)


@pytest.mark.parametrize(
    ("passes", "said"),
    [(119_000, "about 119 s"), (120_000, "about 2.0 min"), (7_199_000, "about 120.0 min"), (7_200_000, "about 2.0 h")],
)
def test_the_estimated_time_is_said_in_seconds_minutes_or_hours(passes, said):
    from dmae.certification.estimate import CostEstimate

    est = CostEstimate(
        mode="certify",
        sigma=0.25,
        images=10,
        done=0,
        passes_min=passes,
        passes_max=passes,
        passes_expected=float(passes),
        probe_passes=1000,
        probe_seconds=1.0,  # 1,000 passes a second
        device="cpu",
    )
    assert f"{passes:,} forward passes: {said}" in est.text()
