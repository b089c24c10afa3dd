"""Statistical correctness of CERTIFY / PREDICT on base classifiers whose smoothed behaviour is known exactly."""

import math

import pytest
import torch
from scipy.stats import beta, binom, norm
from torch import nn

from dmae.smoothing import Smooth, chunk_seed, lower_confidence_bound, radius_ceiling


class Linear2(nn.Module):
    """f(x) = 1 if w . x + b > 0 else 0, on [1, 2, 2] images; ||w|| = 1."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.register_buffer("w", w / w.norm())
        self.b = b
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.w + self.b
        return torch.stack([-z, z], dim=1)


class Constant(nn.Module):
    def __init__(self, k: int, c: int) -> None:
        super().__init__()
        self.k, self.c = k, c
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.k)
        out[:, self.c] = 1.0
        return out


class CoinFlip(nn.Module):
    """Class 1 iff the noisy first pixel exceeds 0.5: for images with that pixel at 0.5, P = 1/2 exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1)[:, 0] - 0.5
        return torch.stack([-z, z], dim=1)


@pytest.mark.parametrize("n_a,n,alpha", [(1, 1, 0.001), (990, 1000, 0.001), (50, 100, 0.05), (7, 10, 0.3), (99_990, 100_000, 0.001)])
def test_lower_bound_is_the_clopper_pearson_beta_quantile(n_a, n, alpha):
    p = lower_confidence_bound(n_a, n, alpha)
    assert p == pytest.approx(beta.ppf(alpha, n_a, n - n_a + 1), rel=1e-12)
    # the defining property: at p, seeing n_a or more successes has probability exactly alpha
    assert binom.sf(n_a - 1, n, p) == pytest.approx(alpha, rel=1e-6)
    assert lower_confidence_bound(0, n, alpha) == 0.0


def test_bound_arguments_are_checked():
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
            lower_confidence_bound(5, 10, bad)
    with pytest.raises(ValueError, match="n_a <= n"):
        lower_confidence_bound(11, 10, 0.01)


def test_constant_classifier_gets_the_radius_ceiling():
    sigma, n, alpha = 0.5, 1000, 0.001
    smooth = Smooth(Constant(10, 3), 10, sigma, seed=0)
    c, r = smooth.certify(torch.rand(3, 8, 8), n0=100, n=n, alpha=alpha, batch_size=256, idx=0)
    assert c == 3
    assert r == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-9)
    assert r == pytest.approx(radius_ceiling(n, alpha, sigma)) and 1.2 < r < 1.25  # about 2.46 sigma at n = 1,000
    assert radius_ceiling(10_000, 0.001, 1.0) == pytest.approx(3.2, abs=0.05)  # SPEC: ~3.2 sigma at 10^4
    assert radius_ceiling(100_000, 0.001, 1.0) == pytest.approx(3.8, abs=0.05)  # ~3.8 sigma at 10^5
    assert smooth.predict(torch.rand(3, 8, 8), n=100, alpha=alpha, batch_size=64, idx=0) == 3


def test_fifty_fifty_classifier_abstains():
    smooth = Smooth(CoinFlip(), 2, 0.25, seed=1)
    x = torch.full((20, 1, 2, 2), 0.5)
    certs = smooth.certify_batch(x, list(range(20)), n0=100, n=2000, alpha=0.001, batch_size=4000)
    assert all(c.prediction == Smooth.ABSTAIN and c.radius == 0.0 for c in certs)
    preds = smooth.predict_batch(x, list(range(20)), n=2000, alpha=0.001, batch_size=4000)
    assert sum(p.prediction == Smooth.ABSTAIN for p in preds) >= 19  # each abstains with prob >= 1 - alpha


def test_certified_radius_exceeds_the_exact_radius_at_most_alpha_of_the_time():
    """Linear f: the smoothed probability is Phi(d / sigma) and the exact certified radius is d, the
    distance to the decision boundary. With alpha = 0.1 over 1,000 independent trials, a sound CERTIFY
    fails (wrong class or radius > d) in at most about 100; the naive point estimate fails in far more."""
    sigma, alpha, n0, n, trials = 0.5, 0.1, 20, 200, 1000
    w = torch.tensor([1.0, -0.5, 0.25, 0.0])
    model = Linear2(w, b=0.0)
    x = torch.tensor([0.8, 0.2, 0.1, 0.5]).view(1, 1, 2, 2)
    d = float(x.flatten() @ model.w)  # signed distance to w.x = 0; class 1 side
    assert 0.3 < d < 0.9
    smooth = Smooth(model, 2, sigma, seed=12345)
    certs = smooth.certify_batch(x.expand(trials, -1, -1, -1), list(range(trials)), n0, n, alpha, batch_size=20_000)
    fail = sum((c.prediction != Smooth.ABSTAIN) and (c.prediction != 1 or c.radius > d) for c in certs)
    # binomial(1000, 0.1) exceeds 130 with probability < 0.002
    assert fail <= 130, f"{fail} of {trials} certificates were wrong at alpha={alpha}"
    radii = [c.radius for c in certs if c.prediction == 1]
    assert len(radii) > 0.9 * trials and sum(radii) / len(radii) > 0.5 * d  # the test has power: not all abstain
    # the same counts with the point estimate p_hat instead of the lower bound overshoot about half the time
    naive = sum(sigma * norm.ppf(min(c.n_a / n, 1 - 1e-9)) > d for c in certs)
    assert naive > 3 * alpha * trials


def test_noise_depends_only_on_seed_and_index():
    model = Linear2(torch.tensor([1.0, 1.0, -1.0, 0.5]), b=-0.4)
    x = torch.rand(5, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    ref = Smooth(model, 2, 0.7, seed=9).certify_batch(x, [3, 14, 15, 92, 65], 100, 1234, 0.001, batch_size=10_000)
    for batch in (1, 7, 100, 333):
        again = Smooth(model, 2, 0.7, seed=9).certify_batch(x, [3, 14, 15, 92, 65], 100, 1234, 0.001, batch_size=batch)
        assert again == ref
    # one image alone, by its index, gets the same answer as inside a group
    alone = Smooth(model, 2, 0.7, seed=9).certify(x[2], 100, 1234, 0.001, 50, idx=15)
    assert alone == (ref[2].prediction, ref[2].radius)
    other_seed = Smooth(model, 2, 0.7, seed=10).certify_batch(x, [3, 14, 15, 92, 65], 100, 1234, 0.001, 10_000)
    assert [c.n_a for c in other_seed] != [c.n_a for c in ref]
    assert len({chunk_seed(0, i, p, c) for i in range(50) for p in range(3) for c in range(20)}) == 3000


def test_arguments_and_range_warning():
    model = Constant(3, 0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        Smooth(model, 3, 0.0)
    with pytest.raises(ValueError, match="sigma must be a number >= 0"):
        Smooth(model, 3, -1.0)
    smooth = Smooth(model, 3, 0.25, seed=0)
    x = torch.rand(1, 4, 4)
    with pytest.raises(ValueError, match="n0 must be an integer >= 1, got 0"):
        smooth.certify(x, 0, 100, 0.001, 10)
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        smooth.certify(x, 10, 0, 0.001, 10)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        smooth.predict(x, 10, 0.001, 0)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\), got 1.0"):
        smooth.predict(x, 10, 1.0, 10)
    with pytest.warns(UserWarning, match="outside \\[0, 1\\]"):
        smooth.certify((x - 0.5) / 0.2, 10, 20, 0.001, 10)
    assert math.isfinite(smooth.certify(x, 10, 20, 0.001, 10)[1])
