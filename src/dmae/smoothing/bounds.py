"""The statistics of randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): the one-sided
Clopper-Pearson lower bound on p_A (Clopper & Pearson, Biometrika 1934), the radius sigma * Phi^-1(p_A_lower)
(their Theorem 1), and PREDICT's two-sided binomial test (scipy's ``binomtest``, which replaces the removed
``binom_test`` the reference code calls)."""

from __future__ import annotations

import math
import warnings

from scipy.stats import beta, binomtest, norm

from dmae.errors import InputError


def check_alpha(alpha: float) -> float:
    """alpha is a failure probability (the chance that a certificate is wrong, 0.001 in the field's protocol), so it
    lies strictly between 0 and 1/2. A value of 1/2 or more is never meant: it is a confidence level given in its
    place (0.999 for 0.001), and it would certify radii far beyond what the samples support.

    Raises:
        ValueError: naming the value (and 1 - alpha when that is what was probably meant).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 < alpha < 0.5):
        hint = ""
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0.5 < alpha < 1.0:
            hint = (
                f"; alpha is the failure probability, not a confidence level: for {alpha:g} confidence "
                f"give alpha {1 - alpha:.6g}"
            )
        raise InputError(f"alpha must be in (0, 0.5), got {alpha!r}{hint}")
    return float(alpha)


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from ``n_a`` successes in ``n`` trials.

    Equals the ``alpha`` quantile of Beta(n_a, n - n_a + 1); 0 when ``n_a = 0``.

    Raises:
        ValueError: alpha outside (0, 1/2), or not 0 <= n_a <= n with n >= 1.
    """
    check_alpha(alpha)
    if n < 1 or not (0 <= n_a <= n):
        raise InputError(f"need 0 <= n_a <= n and n >= 1, got n_a={n_a}, n={n}")
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


def min_certify_samples(alpha: float) -> int:
    """The smallest n with which CERTIFY can return a class with a positive radius: alpha^(1/n) > 1/2."""
    return math.floor(math.log(check_alpha(alpha)) / math.log(0.5)) + 1


def min_predict_samples(alpha: float) -> int:
    """The smallest n with which PREDICT can return a class: the p-value of n votes to 0, 2 * 0.5^n, <= alpha."""
    return max(1, math.ceil(math.log2(2.0 / check_alpha(alpha))))


def check_certify_budget(n: int, alpha: float) -> bool:
    """Warn (and return False) when ``n`` samples can certify no positive radius at ``alpha``, whatever the model."""
    if n >= min_certify_samples(alpha):
        return True
    warnings.warn(
        f"n={n} cannot certify any radius at alpha={alpha:g}: even with every sample for one class the "
        f"lower bound alpha^(1/n) = {alpha ** (1 / n):.3g} <= 1/2, so every image abstains; "
        f"use n >= {min_certify_samples(alpha)}",
        stacklevel=3,
    )
    return False


def check_predict_budget(n: int, alpha: float) -> bool:
    """Warn (and return False) when PREDICT with ``n`` samples can never return a class at ``alpha``."""
    if n >= min_predict_samples(alpha):
        return True
    warnings.warn(
        f"n={n} can never return a class at alpha={alpha:g}: the smallest p-value n votes can give is "
        f"2 * 0.5^n = {2 * 0.5**n:.3g} > alpha, so every image abstains; use n >= {min_predict_samples(alpha)}",
        stacklevel=3,
    )
    return False
