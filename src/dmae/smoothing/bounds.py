"""The statistics of randomized smoothing: confidence bounds, the abstention test, and the radius."""

from __future__ import annotations

from scipy.stats import beta, binomtest, norm


def check_alpha(alpha: float) -> float:
    """A failure probability must lie strictly between 0 and 1."""
    if not isinstance(alpha, (int, float)) or not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from ``n_a`` successes in ``n`` trials.

    Equals the ``alpha`` quantile of Beta(n_a, n - n_a + 1); 0 when ``n_a = 0``.
    """
    check_alpha(alpha)
    if n < 1 or not (0 <= n_a <= n):
        raise ValueError(f"need 0 <= n_a <= n and n >= 1, got n_a={n_a}, n={n}")
    if n_a == 0:
        return 0.0
    return float(beta.ppf(alpha, n_a, n - n_a + 1))


def certified_radius(p_a_lower: float, sigma: float) -> float:
    """``sigma * Phi^-1(p_A_lower)``: the l2 radius within which the smoothed class cannot change."""
    return float(sigma * norm.ppf(p_a_lower))


def radius_ceiling(n: int, alpha: float, sigma: float) -> float:
    """The largest radius ``n`` samples can certify (every sample correct): ``sigma * Phi^-1(alpha^(1/n))``."""
    return certified_radius(alpha ** (1.0 / n), sigma)


def predict_pvalue(c1: int, c2: int) -> float:
    """Two-sided binomial test p-value that the top two counts come from a fair coin (PREDICT's abstention)."""
    if c1 + c2 == 0:
        return 1.0
    return float(binomtest(c1, c1 + c2, 0.5).pvalue)
