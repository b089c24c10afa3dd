"""Sequential CERTIFY statistics: anytime validity of the confidence sequences, their closed forms, and the
stopping decisions, on simulated Bernoulli streams whose p_A is known exactly."""

import itertools
import math
import pickle

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.stats import beta, binom, norm

from dmae.smoothing.bounds import lower_confidence_bound, radius_ceiling
from dmae.smoothing.confseq import (
    DEFAULT_KIND,
    BettingMixture,
    ConfidenceSequence,
    Decision,
    DecisionTable,
    UnionBoundCP,
    continuous_gap,
    decide,
    geometric_looks,
    make_sequence,
    projected_lower,
    radius_from_lower,
    threshold,
)

KINDS = ["union", "betting"]


def _least(pred, lo: int, hi: int) -> int:
    """The least integer in [lo, hi] where the monotone (False..., True...) ``pred`` holds; hi + 1 if none."""
    hi += 1
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _paths(rng, p: float, looks, streams: int) -> np.ndarray:
    """Success counts at each look of ``streams`` independent Bernoulli(p) streams: [streams, len(looks)]."""
    steps = np.diff((0, *looks))
    return np.cumsum(rng.binomial(steps, p, size=(streams, len(looks))), axis=1)


def _ever_above(paths: np.ndarray, looks, lower, p: float) -> np.ndarray:
    """Per stream: did ``lower(k, t)`` exceed p at any look? (lower is increasing in k, so a count threshold.)"""
    first = np.array([_least(lambda k, t=t: lower(k, t) > p, 0, t) for t in looks])
    return (paths >= first).any(axis=1)


def _ever_below(paths: np.ndarray, looks, upper, p: float) -> np.ndarray:
    last = np.array([_least(lambda k, t=t: upper(k, t) >= p, 0, t) - 1 for t in looks])
    return (paths <= last).any(axis=1)


@pytest.mark.parametrize("final_share", [0.98, 0.5, 0.0])  # 0: alpha spread evenly, so the sequence itself is tested
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [0.5, 0.8, 0.99, 0.997])
def test_bounds_hold_at_every_look_at_once(kind, p, final_share):
    """4,000 streams to n_max = 2,000 at alpha = upper_alpha = 0.1: the lower bound exceeds p at SOME look in
    at most ~10% of them (binomial sd 0.005, so 0.115 is a 3-sd margin), the upper bound falls below p likewise,
    and either fails in at most ~20%. Clopper-Pearson at the full alpha, re-checked at every look, fails more."""
    alpha, n_max, streams = 0.1, 2000, 4000
    cs = make_sequence(kind, alpha, n_max, upper_alpha=alpha, final_share=final_share)
    rng = np.random.default_rng(int(p * 1000) + 17 * KINDS.index(kind))
    paths = _paths(rng, p, cs.looks, streams)
    low = _ever_above(paths, cs.looks, cs.lower, p)
    up = _ever_below(paths, cs.looks, cs.upper, p)
    margin = 3 * math.sqrt(alpha * (1 - alpha) / streams)
    assert low.mean() <= alpha + margin, f"lower bound above p={p} in {low.mean():.3f} of the streams"
    assert up.mean() <= alpha + margin, f"upper bound below p={p} in {up.mean():.3f} of the streams"
    assert (low | up).mean() <= 2 * alpha + margin
    if p <= 0.8:  # the test has power: peeking at every look with a fixed-n bound overshoots clearly
        naive = _ever_above(paths, cs.looks, lambda k, t: lower_confidence_bound(k, t, alpha), p)
        assert naive.mean() > 2 * alpha, f"naive: {naive.mean():.3f}"
        assert naive.mean() > low.mean() + 10 * margin


def test_two_sided_split_holds_jointly_at_alpha():
    """Splitting alpha between the two sides gives an interval that holds everywhere at once with prob 1 - alpha."""
    alpha, n_max, streams = 0.1, 1000, 4000
    cs = BettingMixture(alpha / 2, n_max, upper_alpha=alpha / 2)
    paths = _paths(np.random.default_rng(5), 0.7, cs.looks, streams)
    fail = _ever_above(paths, cs.looks, cs.lower, 0.7) | _ever_below(paths, cs.looks, cs.upper, 0.7)
    assert fail.mean() <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / streams)


def test_union_bound_all_successes_give_the_share_root():
    cs = UnionBoundCP(0.001, 1000, first=10, ratio=2.0, final_share=0.5)
    assert cs.looks == (10, 20, 40, 80, 160, 320, 640, 1000)
    assert sum(cs.lower_shares) == pytest.approx(0.001, rel=1e-12)
    assert cs.lower_shares[-1] == 0.0005
    for t, share in zip(cs.looks, cs.lower_shares, strict=True):
        assert cs.lower(t, t) == share ** (1.0 / t)
        assert cs.lower(t, t) == pytest.approx(beta.ppf(share, t, 1), rel=1e-12)
        for k in (1, t // 3, t - 1):  # the Clopper-Pearson quantile at every count
            assert cs.lower(k, t) == pytest.approx(beta.ppf(share, k, t - k + 1), rel=1e-10)
            assert cs.upper(k, t) == pytest.approx(beta.ppf(1 - share, k + 1, t - k), rel=1e-10)
    equal = UnionBoundCP(0.01, 100, first=25, ratio=2.0, final_share=0.0)
    assert equal.looks == (25, 50, 100)
    assert equal.lower_shares == pytest.approx((0.01 / 3,) * 3, rel=1e-15)
    assert UnionBoundCP(0.01, 50, first=64).looks == (50,)
    assert UnionBoundCP(0.01, 50, first=64).lower_shares == (0.01,)


def test_betting_capital_matches_its_defining_expectation():
    """M_t(p) = E_U[(1 + U(1-p)/p)^k (1-U)^(t-k)], U ~ Beta(1, b): the closed form against quadrature, and the
    lower bound is the point where M_t reaches 1/alpha."""
    from dmae.smoothing.confseq import _mixture_log_capital

    for k, t, b, p in [(5, 10, 0.5, 0.3), (90, 100, 1.0, 0.8), (100, 100, 0.5, 0.97), (999, 1000, 2.0, 0.99)]:
        direct = quad(
            lambda u, k=k, t=t, b=b, p=p: b * (1 - u) ** (b - 1) * (1 + u * (1 - p) / p) ** k * (1 - u) ** (t - k),
            0,
            1,
            limit=200,
        )[0]
        assert math.exp(_mixture_log_capital(p, k, t, b)) == pytest.approx(direct, rel=1e-8)
    cs = BettingMixture(0.01, 1000, prior=0.5, final_share=0.0)
    for k, t in [(60, 64), (700, 1000), (1000, 1000)]:
        low = cs.lower(k, t)
        level = math.log(1 / 0.01)
        assert _mixture_log_capital(low, k, t, 0.5) >= level  # rejected: never above the exact root
        assert _mixture_log_capital(low * (1 + 1e-9), k, t, 0.5) < level  # and no looser than needed
    hybrid = BettingMixture(0.01, 1000, prior=0.5, final_share=0.9)
    assert hybrid.lower(990, 1000) >= lower_confidence_bound(990, 1000, 0.009)  # the last look's Clopper-Pearson


@pytest.mark.parametrize("kind", KINDS)
def test_bounds_are_monotone_and_bracket_the_mean(kind):
    cs = make_sequence(kind, 0.001, 400)
    for t in (cs.looks[0], cs.looks[len(cs.looks) // 2], cs.n_max):
        lows = [cs.lower(k, t) for k in range(t + 1)]
        ups = [cs.upper(k, t) for k in range(t + 1)]
        assert lows[0] == 0.0
        assert ups[-1] == 1.0
        assert all(a < b for a, b in itertools.pairwise(lows))
        assert all(a < b for a, b in itertools.pairwise(ups))
        assert all(lo <= k / t <= up for k, (lo, up) in enumerate(zip(lows, ups, strict=True)))
        assert all(0.0 <= lo < 1.0 for lo in lows)
        assert all(0.0 < up <= 1.0 for up in ups)


@pytest.mark.parametrize(
    "kind,options",
    [("union", {}), ("union", {"final_share": 0.0}), ("betting", {}), ("union", {"final_share": 0.01, "ratio": 1.5})],
)
def test_reachable_lower_is_the_best_any_later_look_can_give(kind, options):
    cs = make_sequence(kind, 0.001, 3000, **options)
    for j in (0, len(cs.looks) // 3, len(cs.looks) - 1):
        t = cs.looks[j]
        for k in (0, t // 2, t - 3, t):
            brute = max(cs.lower(k + s - t, s) for s in cs.looks[j:])
            assert cs.reachable_lower(k, t) == brute
            assert cs.reachable_lower(k, t) >= cs.lower(k, t)


@pytest.mark.parametrize("kind", KINDS)
def test_no_radius_beyond_what_fixed_n_certify_could_give(kind):
    """Even every sample a success certifies no more than fixed-n CERTIFY with k = n_max successes."""
    alpha, n_max, sigma = 0.001, 10_000, 0.5
    cs = make_sequence(kind, alpha, n_max)
    ceiling = radius_ceiling(n_max, alpha, sigma)
    for t in cs.looks:
        assert cs.lower(t, t) <= alpha ** (1.0 / n_max)
        r = radius_from_lower(cs.lower(t, t), sigma)
        assert r is None or r <= ceiling
    # at the last look the default sequences give up almost nothing: within 1% of the fixed-n ceiling
    assert radius_from_lower(cs.lower(n_max, n_max), sigma) > 0.99 * ceiling


def _run(cs, stream, taus, futility=None):
    """Feed a stream of counts at the looks to :func:`decide`; stop when nothing is OPEN."""
    for t, k in zip(cs.looks, stream, strict=True):
        d = decide(cs, int(k), t, taus, futility)
        if Decision.OPEN not in d:
            return t, d
    raise AssertionError("the last look must decide every target")


@pytest.mark.parametrize("kind", KINDS)
def test_perfect_classifier_stops_at_the_largest_reachable_target(kind):
    """p_A = 1 with targets far apart: 4 sigma is out of reach of 10,000 samples (ceiling ~3.2 sigma) and is
    refuted by the budget test at the first look; 2 sigma is certified after a few hundred samples."""
    alpha, n_max, sigma = 0.001, 10_000, 1.0
    radii = [0.0, 0.5, 1.0, 2.0, 4.0]
    taus = [threshold(r, sigma) for r in radii]
    cs = make_sequence(kind, alpha, n_max)
    assert decide(cs, cs.looks[0], cs.looks[0], taus)[-1] == Decision.REFUTED
    t_stop, d = _run(cs, cs.looks, taus)  # every sample a success
    assert t_stop < n_max / 10
    certified = [r for r, x in zip(radii, d, strict=True) if x == Decision.CERTIFIED]
    assert max(certified) == 2.0 == max(r for r in radii if r < radius_ceiling(n_max, alpha, sigma))
    assert d[-1] == Decision.REFUTED


@pytest.mark.parametrize("kind", KINDS)
def test_fifty_fifty_refutes_every_positive_target_early(kind):
    alpha, n_max, sigma = 0.001, 10_000, 0.25
    taus = [threshold(r, sigma) for r in (0.25, 0.5, 0.75, 1.0)]
    cs = make_sequence(kind, alpha, n_max)
    rng = np.random.default_rng(0)
    for stream in _paths(rng, 0.5, cs.looks, 20):
        t_stop, d = _run(cs, stream, taus)
        assert t_stop <= n_max / 20
        assert d == [Decision.REFUTED] * 4


@pytest.mark.parametrize("kind", KINDS)
def test_last_look_decides_everything_and_ties_do_not_certify(kind):
    cs = make_sequence(kind, 0.01, 500)
    taus = [threshold(r, 0.5) for r in (0.0, 0.1, 0.3, 0.6, 1.0)]
    for k in range(0, 501, 7):
        assert Decision.OPEN not in decide(cs, k, 500, taus)
    t = cs.looks[3]
    low = cs.lower(t - 2, t)
    assert decide(cs, t - 2, t, [max(0.5, low)])[0] != Decision.CERTIFIED  # lower == threshold: not certified
    assert decide(cs, t, t, [0.5])[0] == Decision.CERTIFIED


@pytest.mark.parametrize("futility", [None, 0.01])
@pytest.mark.parametrize("kind", KINDS)
def test_decision_table_agrees_with_decide(kind, futility):
    cs = make_sequence(kind, 0.001, 600)
    taus = [threshold(r, 0.25) for r in (0.0, 0.25, 0.5, 0.75)]
    table = DecisionTable.build(cs, taus, futility)
    for t in (*cs.looks[::4], cs.n_max):
        ks = np.arange(t + 1)
        got = table.decide(ks, t)
        want = np.array([decide(cs, int(k), t, taus, futility) for k in ks], dtype=np.int8)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_projected_lower_is_the_last_looks_bound_at_an_optimistic_rate(kind):
    """projected_lower(k, t) = lower(k + the (1 - beta) quantile of Binomial(n_max - t, U_beta), n_max), U_beta
    the one-sided Clopper-Pearson upper bound: increasing in k, never above the budget test's reachable_lower,
    equal to lower at n_max."""
    cs = make_sequence(kind, 0.001, 5000)
    t = next(t for t in cs.looks if t >= 1000)
    u = beta.ppf(1 - 0.01, 600 + 1, t - 600)  # the (1 - beta) upper bound after 600 of t successes
    more = binom.ppf(0.99, 5000 - t, u)
    assert u * (5000 - t) < more < 5000 - t
    assert projected_lower(cs, 600, t, 0.01) == pytest.approx(cs.lower(600 + int(more), 5000))
    values = [projected_lower(cs, k, t, 0.01) for k in range(0, t + 1, 7)]
    assert values == sorted(values)
    for k in (0, t // 2, t - 3, t):
        assert projected_lower(cs, k, t, 0.01) <= cs.reachable_lower(k, t)
        assert projected_lower(cs, k, t, 0.01) >= projected_lower(cs, k, t, 0.2)  # smaller beta, more optimistic
    assert projected_lower(cs, 3100, 5000, 0.01) == cs.lower(3100, 5000)
    for bad in (0, 0.6, 1, -0.5, True, None):
        with pytest.raises(ValueError, match=f"futility must be a number in \\(0, 0.5\\], got {bad}"):
            projected_lower(cs, 5, t, bad)


@pytest.mark.parametrize("kind", KINDS)
def test_futility_refutes_hopeless_targets_early_and_keeps_the_reachable_ones(kind):
    """p_A = 0.82 against r = 0.5 at sigma = 0.5 (threshold 0.8413): the upper bound alone refutes it late (the
    two are close); the futility rule refutes it once the last look's bound is out of reach. p_A = 0.86, which
    the last look certifies in nearly every stream, is certified in as many streams with the rule as without."""
    alpha, n_max, sigma = 0.001, 10_000, 0.5
    taus = [threshold(0.5, sigma)]
    cs = make_sequence(kind, alpha, n_max)
    rng = np.random.default_rng(3)
    results = {}
    for p in (0.82, 0.86):
        streams = _paths(rng, p, cs.looks, 40)
        results[p] = [[_run(cs, s, taus, futility) for s in streams] for futility in (None, 0.01)]
    without, with_rule = results[0.82]
    assert np.mean([t for t, _ in with_rule]) <= 0.5 * np.mean([t for t, _ in without])
    assert all(d[0] == Decision.REFUTED for _, d in without + with_rule)
    without, with_rule = results[0.86]
    cert = [sum(d[0] == Decision.CERTIFIED for _, d in runs) for runs in (without, with_rule)]
    assert cert[0] >= 36
    assert cert[1] == cert[0]  # the reachable target: certified as often, on the same streams


@pytest.mark.parametrize("kind", KINDS)
def test_continuous_gap(kind):
    sigma = 0.5
    cs = make_sequence(kind, 0.001, 5000)
    t = cs.looks[10]
    assert continuous_gap(cs, 3000, 5000, sigma) == 0.0  # the last look: nothing left to gain
    assert continuous_gap(cs, t // 4, t, sigma) == 0.0  # upper < 1/2: bound to abstain
    all_hits = continuous_gap(cs, t, t, sigma)  # upper == 1, but the budget caps the radius
    assert 0.0 < all_hits < math.inf
    assert all_hits == pytest.approx(sigma * norm.ppf(cs.reachable_lower(t, t)) - sigma * norm.ppf(cs.lower(t, t)))
    k = int(0.9 * t)
    want = sigma * (norm.ppf(min(cs.upper(k, t), cs.reachable_lower(k, t))) - norm.ppf(cs.lower(k, t)))
    assert continuous_gap(cs, k, t, sigma) == pytest.approx(want)
    # the gap closes as evidence accumulates: a p = 0.9 path
    gaps = [continuous_gap(cs, round(0.9 * s), s, sigma) for s in cs.looks[5::10]]
    assert gaps[-1] < gaps[0]


def test_threshold_and_radius():
    for s in (0.12, 0.25, 0.5, 1.0):
        assert threshold(0, s) == 0.5
        assert threshold(0.0, s) == 0.5
        assert threshold(0.3, s) == pytest.approx(norm.cdf(0.3 / s), rel=1e-14)
        assert radius_from_lower(threshold(0.3, s), s) == pytest.approx(0.3, rel=1e-12)
    assert radius_from_lower(0.5, 0.25) is None
    assert radius_from_lower(0.2, 0.25) is None
    assert radius_from_lower(1.0, 0.25) == math.inf


def test_factory_and_defaults():
    assert DEFAULT_KIND == "betting"
    assert isinstance(make_sequence("default", 0.001, 1000), BettingMixture)
    assert isinstance(make_sequence("mixture", 0.001, 1000), BettingMixture)
    cs = make_sequence("union", 0.001, 1000, ratio=2.0, first=100)
    assert isinstance(cs, UnionBoundCP)
    assert cs.looks == (100, 200, 400, 800, 1000)
    assert cs.alpha == cs.upper_alpha == 0.001
    assert geometric_looks(10, 3, 1.1) == (3, 4, 5, 6, 7, 8, 9, 10)
    b = BettingMixture(0.01, 100, looks=[10, 50, 100])
    assert b.looks == (10, 50, 100)
    for seq in (cs, b):
        assert isinstance(seq, ConfidenceSequence)
        again = pickle.loads(pickle.dumps(seq))  # the engine may ship a sequence to worker processes
        assert again.lower(60, 100) == seq.lower(60, 100)
        assert again.looks == seq.looks


def test_bad_inputs_raise():
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"alpha must be in \(0, 0.5\), got {bad}"):
            make_sequence("union", bad, 100)
        with pytest.raises(ValueError, match=rf"alpha must be in \(0, 0.5\), got {bad}"):
            BettingMixture(0.01, 100, upper_alpha=bad)
    with pytest.raises(ValueError, match="n_max must be an integer >= 1, got 0"):
        UnionBoundCP(0.01, 0)
    with pytest.raises(ValueError, match=r"n_max must be an integer >= 1, got 10\.5"):
        BettingMixture(0.01, 10.5)
    with pytest.raises(ValueError, match="first must be an integer >= 1, got 0"):
        UnionBoundCP(0.01, 100, first=0)
    with pytest.raises(ValueError, match=r"ratio must be a finite number > 1, got 1\.0"):
        BettingMixture(0.01, 100, ratio=1.0)
    with pytest.raises(ValueError, match=r"final_share must be in \[0, 1\), got 1.0"):
        UnionBoundCP(0.01, 100, final_share=1.0)
    with pytest.raises(ValueError, match="prior must be a finite number > 0, got 0"):
        BettingMixture(0.01, 100, prior=0)
    with pytest.raises(ValueError, match=r"looks must be strictly increasing.*ending at n_max=100"):
        BettingMixture(0.01, 100, looks=[10, 50])
    with pytest.raises(ValueError, match="unknown confidence sequence 'bayes'"):
        make_sequence("bayes", 0.01, 100)
    cs = UnionBoundCP(0.01, 100, first=10, ratio=2.0)
    with pytest.raises(ValueError, match=r"need 0 <= k <= t, got k=11, t=10"):
        cs.lower(11, 10)
    with pytest.raises(ValueError, match="k must be an integer >= 0, got -1"):
        cs.upper(-1, 10)
    with pytest.raises(ValueError, match=r"t must be one of the looks \(10, 20, 40, 80, 100\), got 11"):
        cs.lower(5, 11)
    with pytest.raises(ValueError, match="t must be one of the looks"):
        decide(cs, 5, 11, [0.5])
    with pytest.raises(ValueError, match=r"thresholds must be in \[0.5, 1\].*got 0.4"):
        decide(cs, 5, 10, [0.6, 0.4])
    with pytest.raises(ValueError, match="sigma must be a finite number > 0, got 0"):
        threshold(0.5, 0)
    with pytest.raises(ValueError, match=r"r must be a finite number >= 0, got -0\.1"):
        threshold(-0.1, 0.25)
    with pytest.raises(ValueError, match=r"p_lower must be in \[0, 1\], got 1.5"):
        radius_from_lower(1.5, 0.25)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0, got -1"):
        continuous_gap(cs, 5, 10, -1)
    table = DecisionTable.build(cs, [0.6])
    with pytest.raises(ValueError, match=r"k must be a 1-d array of integers in \[0, 10\]"):
        table.decide([3, 11], 10)
