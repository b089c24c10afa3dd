"""Anytime-valid confidence sequences for sequential CERTIFY: bounds on p_A that hold at every look at once.

CERTIFY (Cohen, Rosenfeld & Kolter, ICML 2019) draws a fixed number n of noisy samples and bounds
p_A = P(f(x + eta) = c_hat) once. Here the estimation samples arrive in rounds; after the round that brings
their count to a *look* t, with k of them voting for c_hat, a lower bound ``lower(k, t)`` and an upper bound
``upper(k, t)`` are updated, and sampling stops as soon as the answer is settled. A confidence sequence at
level alpha guarantees

    P( exists a look t : lower(k_t, t) > p_A ) <= alpha,

so the lower bound at ANY stopping time, however it depends on the data, is a (1 - alpha) lower confidence
bound, and CERTIFY's guarantee carries over unchanged. The upper bound (its own level ``upper_alpha``) only
decides when to stop, never what is claimed. See docs/sequential.md for the proofs and the measurements
behind the default.

Two sequences:

* :class:`UnionBoundCP`: one-sided Clopper-Pearson bounds at geometrically spaced looks, the looks sharing
  alpha (a union bound; Horvath et al., ICLR 2022).
* :class:`BettingMixture`: the capital of a mixture of constant bets on the successes, a nonnegative
  martingale in closed form; Ville's inequality makes the bound hold at every t (Waudby-Smith & Ramdas,
  JRSS-B 2023; Robbins 1970 for the beta-binomial mixture it generalises).

Then the decisions the sampling engine stops on: per target radius (:func:`decide`, or
:class:`DecisionTable` for many images at once) and for the continuous radius (:func:`continuous_gap`).
"""

from __future__ import annotations

import itertools
import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

import numpy as np
from scipy.optimize import brentq
from scipy.special import betaincc, betaincinv, betaln, ndtr, ndtri
from scipy.stats import binom

from dmae.errors import InputError
from dmae.smoothing.bounds import check_alpha

# Per-instance memo of lower/upper per (k, t): the engine asks for the same counts for many images.
CACHE_SIZE = 1 << 16
# The largest float below 1, the top of the search for a lower bound when every sample succeeded.
_BELOW_ONE = math.nextafter(1.0, 0.0)


@runtime_checkable
class ConfidenceSequence(Protocol):
    """Lower and upper bounds on a Bernoulli mean p from ``k`` successes in the first ``t`` draws.

    ``looks`` are the draw counts at which the bounds may be evaluated (increasing, the last one
    ``n_max``). ``lower`` is valid simultaneously over all looks: P(exists t in looks: lower(k_t, t) > p)
    <= ``alpha``; ``upper`` likewise at ``upper_alpha`` with the inequality reversed. ``reachable_lower(k, t)``
    is the largest lower bound any later look could give if every remaining draw succeeded (the budget test).

    Raises (every method): ValueError when ``t`` is not a look or not 0 <= ``k`` <= ``t``.
    """

    alpha: float
    upper_alpha: float
    n_max: int
    looks: tuple[int, ...]

    def lower(self, k: int, t: int) -> float: ...

    def upper(self, k: int, t: int) -> float: ...

    def reachable_lower(self, k: int, t: int) -> float: ...


# ---------------------------------------------------------------------------------------------------- checks
def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        out = operator.index(value)  # ints and numpy integers, not floats
    except TypeError:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if out < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return out


def _check_share(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value < 1.0):
        raise InputError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _check_sigma(sigma: object) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (0.0 < sigma < math.inf):
        raise InputError(f"sigma must be a finite number > 0, got {sigma!r}")
    return float(sigma)


def _check_probability(p: object, name: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p <= 1.0):
        raise InputError(f"{name} must be in [0, 1], got {p!r}")
    return float(p)


def _check_looks(looks: Sequence[int], n_max: int) -> tuple[int, ...]:
    out = tuple(_check_int(t, "each look", 1) for t in looks)
    if not out or out[-1] != n_max or any(b <= a for a, b in itertools.pairwise(out)):
        raise InputError(f"looks must be strictly increasing integers >= 1 ending at n_max={n_max}, got {looks!r}")
    return out


def geometric_looks(n_max: int, first: int, ratio: float) -> tuple[int, ...]:
    """The looks ``first, ceil(first * ratio), ...`` (each at least one more than the last), then ``n_max``.

    Raises:
        ValueError: ``n_max`` or ``first`` not an integer >= 1, or ``ratio`` not a finite number > 1.
    """
    n_max = _check_int(n_max, "n_max", 1)
    t = _check_int(first, "first", 1)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (1.0 < ratio < math.inf):
        raise InputError(f"ratio must be a finite number > 1, got {ratio!r}")
    looks = []
    while t < n_max:
        looks.append(t)
        t = max(t + 1, math.ceil(t * ratio))
    looks.append(n_max)
    return tuple(looks)


class _Looks(ABC):
    """What the sequences share: the looks, argument checks, and the per-(k, t) memo of the bounds; each
    sequence supplies ``_lower`` and ``_upper``."""

    looks: tuple[int, ...]
    n_max: int
    _lower_cached: Callable[[int, int], float]
    _upper_cached: Callable[[int, int], float]

    def _init_caches(self) -> None:
        self._lower_cached = lru_cache(maxsize=CACHE_SIZE)(self._lower)
        self._upper_cached = lru_cache(maxsize=CACHE_SIZE)(self._upper)

    def __getstate__(self) -> dict[str, Any]:
        # the memo holds bound methods, which do not pickle: ship the parameters, rebuild the memo on arrival
        return {key: v for key, v in self.__dict__.items() if key not in ("_lower_cached", "_upper_cached")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_caches()

    @abstractmethod
    def _lower(self, k: int, t: int) -> float:
        """The lower bound, uncached (arguments already checked)."""

    @abstractmethod
    def _upper(self, k: int, t: int) -> float:
        """The upper bound, uncached (arguments already checked)."""

    def lower(self, k: int, t: int) -> float:
        """The lower confidence bound on p after ``k`` successes in ``t`` draws; 0 when ``k = 0``.

        Raises:
            ValueError: ``t`` not a look, or not 0 <= ``k`` <= ``t``.
        """
        return self._lower_cached(k, t)

    def upper(self, k: int, t: int) -> float:
        """The upper confidence bound on p after ``k`` successes in ``t`` draws; 1 when ``k = t``.

        Raises:
            ValueError: ``t`` not a look, or not 0 <= ``k`` <= ``t``.
        """
        return self._upper_cached(k, t)

    def _init_levels(
        self,
        alpha: float,
        upper_alpha: float | None,
        final_share: float,
        n_max: int,
        looks: Sequence[int] | None,
        geometric: tuple[int, float],
    ) -> None:
        """``alpha``, ``upper_alpha`` (default: alpha) and ``final_share`` checked and kept; the looks: ``looks``
        as given (checked to end at ``n_max``), else ``geometric`` = (first, ratio): from first, by ratio.

        Raises:
            ValueError: as the sequences' constructors say.
        """
        self.alpha = check_alpha(alpha)
        self.upper_alpha = self.alpha if upper_alpha is None else check_alpha(upper_alpha)
        n_max = _check_int(n_max, "n_max", 1)
        self.final_share = _check_share(final_share, "final_share")
        self._init_looks(geometric_looks(n_max, *geometric) if looks is None else _check_looks(looks, n_max))

    def _init_looks(self, looks: tuple[int, ...]) -> None:
        self.looks = looks
        self.n_max = looks[-1]
        self._index = {t: j for j, t in enumerate(looks)}

    def look_index(self, t: int) -> int:
        """The position of ``t`` in ``looks``.

        Raises:
            ValueError: ``t`` is not one of the looks.
        """
        j = self._index.get(t) if isinstance(t, (int, np.integer)) and not isinstance(t, bool) else None
        if j is None:
            shown = self.looks if len(self.looks) <= 12 else (*self.looks[:5], "...", *self.looks[-3:])
            raise InputError(f"t must be one of the looks {shown}, got {t!r}")
        return j

    def _check(self, k: int, t: int) -> tuple[int, int]:
        self.look_index(t)
        k = _check_int(k, "k", 0)
        if k > t:
            raise InputError(f"need 0 <= k <= t, got k={k}, t={t}")
        return k, int(t)


# ---------------------------------------------------------------------------------------------- union bound
def _cp_lower(k: int, t: int, a: float) -> float:
    """One-sided (1 - a) Clopper-Pearson lower bound: the a-quantile of Beta(k, t - k + 1); 0 when k = 0."""
    if k == 0:
        return 0.0
    if k == t:
        return a ** (1.0 / t)  # Beta(t, 1) has cdf p^t: exact, and the case that sets the radius ceiling
    return float(betaincinv(k, t - k + 1, a))


class UnionBoundCP(_Looks):
    """Clopper-Pearson bounds at geometric looks, alpha shared among the looks by a union bound.

    At look ``t_j`` the lower bound is the one-sided Clopper-Pearson bound at level ``a_j`` (the
    ``a_j``-quantile of Beta(k, t_j - k + 1); ``a_j^(1/t_j)`` when k = t_j) and the upper bound the one at
    ``u_j`` (``1 - lower(t_j - k, t_j)`` at ``u_j``). The last look (n_max) gets ``final_share * alpha`` and
    the others split the rest equally, so that sum_j a_j = alpha; the upper shares split ``upper_alpha`` alike.
    Then P(exists j: lower_j > p) <= sum_j P(lower_j > p) <= sum_j a_j = alpha (Clopper & Pearson, Biometrika
    1934, at each look; the union bound over looks as in Horvath et al., ICLR 2022).

    Raises:
        ValueError: alpha or upper_alpha outside (0, 1/2), n_max or first not an integer >= 1, ratio <= 1,
            final_share outside [0, 1) (0 = equal shares), or bad ``looks``.
    """

    kind = "union"

    def __init__(
        self,
        alpha: float,
        n_max: int,
        first: int = 64,
        ratio: float = 1.1,
        final_share: float = 0.98,
        upper_alpha: float | None = None,
        looks: Sequence[int] | None = None,
    ) -> None:
        self._init_levels(alpha, upper_alpha, final_share, n_max, looks, (first, ratio))
        self.lower_shares = self._shares(self.alpha)
        self.upper_shares = self._shares(self.upper_alpha)
        self._last_share_is_largest = self.lower_shares[-1] >= max(self.lower_shares)
        self._init_caches()

    def _shares(self, total: float) -> tuple[float, ...]:
        m = len(self.looks)
        if m == 1:
            return (total,)
        last = total * self.final_share if self.final_share > 0 else total / m
        return (*([(total - last) / (m - 1)] * (m - 1)), last)

    def __repr__(self) -> str:
        return (
            f"UnionBoundCP(alpha={self.alpha:g}, n_max={self.n_max}, looks={len(self.looks)} from "
            f"{self.looks[0]}, final_share={self.final_share:g}, upper_alpha={self.upper_alpha:g})"
        )

    def _lower(self, k: int, t: int) -> float:
        k, t = self._check(k, t)
        return _cp_lower(k, t, self.lower_shares[self._index[t]])

    def _upper(self, k: int, t: int) -> float:
        k, t = self._check(k, t)
        return 1.0 - _cp_lower(t - k, t, self.upper_shares[self._index[t]])

    def reachable_lower(self, k: int, t: int) -> float:
        """``max over looks s >= t of lower(k + s - t, s)``: the best lower bound the budget can still give.

        At a fixed share the Clopper-Pearson bound grows along a run of successes (Beta(k + 1, m) dominates
        Beta(k, m)) and with the share, so when the last look has the largest share (``final_share`` >= the
        others', as by default) the maximum is at n_max; otherwise every later look is tried."""
        k, t = self._check(k, t)
        if self._last_share_is_largest:
            return self.lower(k + self.n_max - t, self.n_max)
        j = self._index[t]
        return max(self.lower(k + s - t, s) for s in self.looks[j:])


# -------------------------------------------------------------------------------------- mixture of bets
def _mixture_log_capital(p: float, k: int, t: int, b: float) -> float:
    """log M_t(p) for the bet fractions lam ~ Beta(1, b) (see :class:`BettingMixture`), 0 < p < 1."""
    return (
        math.log(b)
        - k * math.log(p)
        - (t - k + b) * math.log1p(-p)
        + betaln(k + 1, t - k + b)
        + math.log(betaincc(k + 1, t - k + b, p))
    )


def _mixture_lower(k: int, t: int, b: float, log_level: float) -> float:
    """inf{p : M_t(p) < 1/a} with log_level = log(1/a): the root of the decreasing log M_t(p) - log(1/a)."""
    if k == 0:
        return 0.0
    top = _BELOW_ONE if k == t else k / t  # M_t(k/t) <= 1 < 1/a: the root lies below the empirical mean

    def f(p: float) -> float:
        return _mixture_log_capital(p, k, t, b) - log_level

    bottom = 0.5**52
    while f(bottom) < 0.0:  # only for tiny k/t: walk down until p is rejected
        bottom *= 2.0**-64
        if bottom < 1e-300:
            return 0.0
    root = brentq(f, bottom, top, xtol=1e-15, rtol=4 * np.finfo(float).eps)
    # Return a rejected p (M_t(p) >= 1/a): since M_t decreases in p, it is <= the exact infimum.
    step = root * 1e-14
    while f(root) < 0.0:
        root = max(root - step, 0.5 * root)
        step *= 2.0
        if root < 1e-300:
            return 0.0
    return root


class BettingMixture(_Looks):
    """The capital of a mixture of constant bets against "mean <= p": anytime valid by Ville's inequality.

    For a candidate p, bet the fraction lam of the capital on each draw being a success: after k successes in
    t draws the capital is prod_i (1 + (lam/p)(X_i - p)) = (1 + lam(1-p)/p)^k (1-lam)^(t-k). Mixing
    lam ~ Beta(1, b),

        M_t(p) = E_lam[(1 + lam(1-p)/p)^k (1-lam)^(t-k)]
               = b p^(-k) (1-p)^(-(t-k+b)) B(k+1, t-k+b) I_{1-p}(t-k+b, k+1)

    (substitute q = p + (1-p)lam; B the beta function, I the regularized incomplete beta function). When the
    draws are Bernoulli(p), each bet is a nonnegative martingale with mean 1, so M_t(p) is one too, and
    Ville's inequality gives P(exists t: M_t(p) >= 1/alpha) <= alpha. Every factor decreases in p, so
    M_t(p) >= 1/alpha exactly for p below a point, and the lower bound is

        lower(k, t) = inf{p : M_t(p) < 1/alpha},  returned as a point where M_t >= 1/alpha (never above the root).

    The upper bound is the same construction on the failures at ``upper_alpha``:
    ``upper(k, t) = 1 - lower(t - k, t)``. Because the guarantee holds at every t, ``looks`` may be any
    increasing schedule ending at ``n_max`` (denser looks stop sooner at no cost in validity). With
    ``final_share > 0``, the mixture runs at ``(1 - final_share) * alpha`` and the last look also takes the
    Clopper-Pearson bound at ``final_share * alpha`` (the larger of the two; a union bound of two events).
    ``prior`` is b: b < 1 puts more weight on large bets, which pays when nearly every draw succeeds. The
    defaults (b = 0.35, ``final_share`` = 0.45) were chosen by measurement against the information limit
    (docs/sequential.md, "Measurements"): an all-success stream clears every threshold within 1.27x of the
    fewest samples any valid procedure needs, ln(1/alpha) / ln(1/tau), while no stream near a threshold costs
    more samples than under the earlier defaults (b = 0.5, half of alpha on the last look: ``LEGACY_BETTING``).

    Sources: Waudby-Smith & Ramdas, "Estimating means of bounded random variables by betting", JRSS-B 2023
    (capital processes, mixtures of bets, Ville's inequality); Robbins, "Statistical methods related to the
    law of the iterated logarithm", Ann. Math. Statist. 1970 (beta-binomial mixture; b = 1 here is his
    uniform mixture restricted to alternatives above p).

    Raises:
        ValueError: alpha or upper_alpha outside (0, 1/2), n_max or first not an integer >= 1, ratio <= 1,
            prior not a finite number > 0, final_share outside [0, 1), or bad ``looks``.
    """

    kind = "betting"

    def __init__(
        self,
        alpha: float,
        n_max: int,
        first: int = 64,
        ratio: float = 1.05,
        prior: float = 0.35,
        final_share: float = 0.45,
        upper_alpha: float | None = None,
        looks: Sequence[int] | None = None,
    ) -> None:
        if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not (0.0 < prior < math.inf):
            raise InputError(f"prior must be a finite number > 0, got {prior!r}")
        self.prior = float(prior)
        self._init_levels(alpha, upper_alpha, final_share, n_max, looks, (first, ratio))
        self._log_lower = math.log(1.0 / (self.alpha * (1.0 - self.final_share)))
        self._log_upper = math.log(1.0 / (self.upper_alpha * (1.0 - self.final_share)))
        self._init_caches()

    def __repr__(self) -> str:
        return (
            f"BettingMixture(alpha={self.alpha:g}, n_max={self.n_max}, looks={len(self.looks)} from "
            f"{self.looks[0]}, prior={self.prior:g}, final_share={self.final_share:g}, "
            f"upper_alpha={self.upper_alpha:g})"
        )

    def _one_sided(self, k: int, t: int, a: float, log_level: float) -> float:
        out = _mixture_lower(k, t, self.prior, log_level)
        if self.final_share > 0 and t == self.n_max:
            out = max(out, _cp_lower(k, t, a * self.final_share))
        return out

    def _lower(self, k: int, t: int) -> float:
        k, t = self._check(k, t)
        return self._one_sided(k, t, self.alpha, self._log_lower)

    def _upper(self, k: int, t: int) -> float:
        k, t = self._check(k, t)
        return 1.0 - self._one_sided(t - k, t, self.upper_alpha, self._log_upper)

    def reachable_lower(self, k: int, t: int) -> float:
        """``lower(k + n_max - t, n_max)``: a success multiplies every bet's capital by 1 + lam(1-p)/p >= 1 (and
        raises the Clopper-Pearson bound), so no earlier look along a run of successes gives more."""
        k, t = self._check(k, t)
        return self.lower(k + self.n_max - t, self.n_max)

    def running_lower(self, k: int, t: int) -> float:
        """The mixture's lower bound after ``k`` successes in ``t`` draws for ANY t (not only a look): the part of
        :meth:`lower` that holds at every t by Ville's inequality, without the last look's Clopper-Pearson bound.
        It is what an all-success stream can certify at t, which places the looks (``dmae.smoothing.sequential``).

        Raises:
            ValueError: not 0 <= ``k`` <= ``t`` with ``t`` >= 1.
        """
        t = _check_int(t, "t", 1)
        k = _check_int(k, "k", 0)
        if k > t:
            raise InputError(f"need 0 <= k <= t, got k={k}, t={t}")
        return _mixture_lower(k, t, self.prior, self._log_lower)


# --------------------------------------------------------------------------------------------- factory
SEQUENCES = {"union": UnionBoundCP, "betting": BettingMixture}
ALIASES = {"mixture": "betting", "cp": "union"}
DEFAULT_KIND = "betting"  # the most samples saved in docs/sequential.md's measurements
# the betting sequence's options before the information-limit measurements (docs/sequential.md): logs written with
# the chunk schedule were certified with these, and resume with them
LEGACY_BETTING = {"prior": 0.5, "final_share": 0.5}


def sequence_kind(kind: str) -> str:
    """The class name behind ``kind``: ``"union"`` or ``"betting"`` (``"default"`` is ``DEFAULT_KIND``).

    Raises:
        ValueError: an unknown kind.
    """
    name = DEFAULT_KIND if kind == "default" else ALIASES.get(kind, kind)
    if name not in SEQUENCES:
        raise InputError(
            f"unknown confidence sequence {kind!r}; available: default, {', '.join(sorted([*SEQUENCES, *ALIASES]))}"
        )
    return name


def make_sequence(kind: str, alpha: float, n_max: int, **options: object) -> ConfidenceSequence:
    """A confidence sequence by name: ``"union"`` (:class:`UnionBoundCP`), ``"betting"`` or ``"mixture"``
    (:class:`BettingMixture`), or ``"default"`` (``DEFAULT_KIND``); ``options`` go to its constructor.

    Raises:
        ValueError: an unknown kind, or what the constructor raises. TypeError: an option it does not take.
    """
    return SEQUENCES[sequence_kind(kind)](alpha, n_max, **options)


# ---------------------------------------------------------------------------------------------- radii
def threshold(r: float, sigma: float) -> float:
    """``Phi(r / sigma)``: the p_A a lower bound must exceed to certify radius ``r`` (exactly 0.5 at r = 0).

    Cohen et al. (ICML 2019), Theorem 1: g is constant on the l2 ball of radius sigma * Phi^-1(p_A_lower).

    Raises:
        ValueError: ``r`` not a finite number >= 0, or ``sigma`` not a finite number > 0.
    """
    sigma = _check_sigma(sigma)
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 <= r < math.inf):
        raise InputError(f"r must be a finite number >= 0, got {r!r}")
    return float(ndtr(r / sigma))


def radius_from_lower(p_lower: float, sigma: float) -> float | None:
    """``sigma * Phi^-1(p_lower)`` when ``p_lower > 1/2``; ``None`` (abstain) when ``p_lower <= 1/2``.

    Strict, as every decision here: p_A > 1/2 is what makes c_hat the smoothed class whatever the tie-breaking.
    (Fixed-n CERTIFY in core.py abstains only below 1/2; the two differ only when a bound equals 1/2 exactly.)
    ``p_lower = 1`` gives ``inf``.

    Raises:
        ValueError: ``p_lower`` outside [0, 1], or ``sigma`` not a finite number > 0.
    """
    sigma = _check_sigma(sigma)
    p_lower = _check_probability(p_lower, "p_lower")
    return sigma * float(ndtri(p_lower)) if p_lower > 0.5 else None


def radius_or_zero(p: float, sigma: float) -> float:
    """``sigma * Phi^-1(p)`` when ``p > 1/2``, else 0: the radius a bound certifies (0 when it certifies none)."""
    return sigma * float(ndtri(p)) if p > 0.5 else 0.0


# ------------------------------------------------------------------------------------------ decisions
class Decision(IntEnum):
    """A target radius after a look: still OPEN, CERTIFIED (lower > threshold) or REFUTED."""

    OPEN = 0
    CERTIFIED = 1
    REFUTED = 2


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    out = []
    for tau in thresholds:
        if isinstance(tau, bool) or not isinstance(tau, (int, float, np.floating)) or not (0.5 <= tau <= 1.0):
            raise InputError(f"thresholds must be in [0.5, 1] (Phi(r / sigma) for r >= 0), got {tau!r}")
        out.append(float(tau))
    return tuple(out)


def check_futility(futility: object) -> float:
    """``futility`` as a float in (0, 0.5]: above 1/2 the "optimistic" continuation would be pessimistic (the
    upper bound below the observed rate, the quantile below the median).

    Raises:
        ValueError: anything else (None included: callers pass None only where the rule is off).
    """
    if isinstance(futility, bool) or not isinstance(futility, (int, float)) or not (0.0 < futility <= 0.5):
        raise InputError(f"futility must be a number in (0, 0.5], got {futility!r}")
    return float(futility)


def projected_lower(cs: ConfidenceSequence, k: int, t: int, futility: float) -> float:
    """The lower bound the last look would give after an optimistic continuation of the stream: with
    beta = ``futility``, ``U_beta`` the one-sided (1 - beta) Clopper-Pearson upper bound on p_A at (k, t) and
    ``m = n_max - t`` samples left, the remaining votes for c_hat at the (1 - beta) quantile of Binomial(m, U_beta):

        projected_lower(k, t) = lower(k + F^-1_{Binomial(m, U_beta)}(1 - beta), n_max).

    A target with ``projected_lower <= tau`` is refuted for futility: only a stream both luckier than its
    (1 - beta) upper bound on p_A so far and luckier than the (1 - beta) quantile of what is left could still
    certify it by n_max. This is the conditional-power argument of group-sequential trials (Lan, Simon &
    Halperin, "Stochastically curtailed tests in long-term clinical trials", Communications in Statistics C:
    Sequential Analysis 1, 1982). It is a stopping rule only: refuting never makes a claim, so the guarantee
    is untouched (docs/sequential.md); beta trades samples for the rare target the full budget would have
    certified (measured there). Increasing in k (U_beta, the quantile and lower are), so decisions stay
    monotone in k.

    Raises:
        ValueError: ``futility`` outside (0, 0.5], or what ``cs.lower`` raises.
    """
    futility = check_futility(futility)
    cs.lower(k, t)  # argument checks
    if t >= cs.n_max:
        return cs.lower(k, t)
    m = cs.n_max - t
    u_beta = 1.0 - _cp_lower(t - k, t, futility)
    more = m if u_beta >= 1.0 else int(binom.ppf(1.0 - futility, m, u_beta))
    return cs.lower(k + min(m, more), cs.n_max)


def decide(
    cs: ConfidenceSequence, k: int, t: int, thresholds: Sequence[float], futility: float | None = None
) -> list[Decision]:
    """The state of each target after ``k`` of ``t`` estimation samples (``t`` a look) voted for c_hat.

    For the threshold tau = Phi(r / sigma) of each target radius r (see :func:`threshold`):

    * CERTIFIED when ``lower(k, t) > tau`` (strictly, r = 0 included: certifying means p_A > 1/2);
    * REFUTED when ``upper(k, t) < tau``, or when ``reachable_lower(k, t) <= tau``: even if every one of the
      ``n_max - t`` remaining samples voted for c_hat, no later look could certify r (the budget test);
    * with ``futility`` = beta, also REFUTED when ``projected_lower(cs, k, t, beta) <= tau`` (futility: the
      final look would most likely not certify r; :func:`projected_lower`);
    * OPEN otherwise. At ``t == n_max`` nothing is OPEN. Stop when nothing is OPEN.

    Only CERTIFIED is a claim; REFUTED only ends the sampling for that target. Decisions are monotone in k.

    Raises:
        ValueError: a threshold outside [0.5, 1], ``futility`` outside (0, 0.5], or what ``cs.lower`` raises (``t``
            not a look, bad ``k``).
    """
    taus = _check_thresholds(thresholds)
    futility = None if futility is None else check_futility(futility)
    lo = cs.lower(k, t)
    out = []
    cap = None
    for tau in taus:
        if lo > tau:
            out.append(Decision.CERTIFIED)
            continue
        cap = _refute_cap(cs, k, t, futility) if cap is None else cap
        out.append(Decision.REFUTED if cap[0] < tau or cap[1] <= tau else Decision.OPEN)
    return out


def refute_ceiling(cs: ConfidenceSequence, k: int, t: int, futility: float | None) -> float:
    """The least of the budget test's ``reachable_lower`` and (with ``futility``) :func:`projected_lower`: a target
    tau at or above it is refuted whatever the upper bound says. Used by :func:`decide` and the engine."""
    best = cs.reachable_lower(k, t)
    if futility is not None:
        best = min(best, projected_lower(cs, k, t, futility))
    return best


def _refute_cap(cs: ConfidenceSequence, k: int, t: int, futility: float | None) -> tuple[float, float]:
    """(upper bound, :func:`refute_ceiling`): a target tau is refuted when ``upper < tau`` or ``ceiling <= tau``."""
    return cs.upper(k, t), refute_ceiling(cs, k, t, futility)


def continuous_gap(cs: ConfidenceSequence, k: int, t: int, sigma: float, futility: float | None = None) -> float:
    """How much the certified radius could still grow: ``r_hi - r_lo`` (>= 0, possibly ``inf``), where

        r_lo = sigma * Phi^-1(lower(k, t))                        (0 when lower <= 1/2: nothing certified yet)
        r_hi = sigma * Phi^-1(min(upper(k, t), reachable_lower(k, t)))   (0 when that is <= 1/2)

    ``upper`` caps p_A (so r_hi is infinite while ``upper == 1``) and ``reachable_lower`` caps what the
    remaining budget can certify, so the gap is finite whenever ``t < n_max`` leaves a finite ceiling and is 0
    at ``t == n_max`` or when the image is bound to abstain. With ``futility`` = beta, r_hi is also capped by
    :func:`projected_lower` (what the last look would most likely certify). Stop when the gap is below epsilon
    or t == n_max.

    Raises:
        ValueError: ``sigma`` not a finite number > 0, ``futility`` outside (0, 0.5], or what ``cs.lower`` raises.
    """
    sigma = _check_sigma(sigma)
    futility = None if futility is None else check_futility(futility)
    lo = cs.lower(k, t)
    hi = min(_refute_cap(cs, k, t, futility))
    return max(0.0, radius_or_zero(hi, sigma) - radius_or_zero(lo, sigma))


# ------------------------------------------------------------------------------- many images at once
@dataclass(frozen=True)
class DecisionTable:
    """:func:`decide` as integer comparisons, for every look and target at once.

    ``certify_from[j, i]``: the least k with ``lower(k, looks[j]) > thresholds[i]`` (``looks[j] + 1`` if
    none); ``refute_upto[j, i]``: the largest k that is REFUTED there (-1 if none). Because lower, upper and
    reachable_lower all increase with k, the decision at (k, looks[j]) is CERTIFIED iff
    ``k >= certify_from[j, i]``, REFUTED iff ``k <= refute_upto[j, i]``, else OPEN.
    """

    looks: tuple[int, ...]
    thresholds: tuple[float, ...]
    certify_from: np.ndarray  # [len(looks), len(thresholds)] int64
    refute_upto: np.ndarray

    @classmethod
    def build(cls, cs: ConfidenceSequence, thresholds: Sequence[float], futility: float | None = None) -> DecisionTable:
        """Tabulate ``cs`` (and the futility rule at ``futility``, as in :func:`decide`) by bisection over k
        (about 2 log2(t) bound evaluations per look and target).

        Raises:
            ValueError: a threshold outside [0.5, 1], or ``futility`` outside (0, 0.5].
        """
        taus = _check_thresholds(thresholds)
        futility = None if futility is None else check_futility(futility)
        certify = np.empty((len(cs.looks), len(taus)), dtype=np.int64)
        refute = np.empty_like(certify)
        for j, t in enumerate(cs.looks):
            for i, tau in enumerate(taus):
                # least k in [0, t + 1] with lower > tau (t + 1 stands for "none")
                lo, hi = 0, t + 1
                while lo < hi:
                    mid = (lo + hi) // 2
                    if cs.lower(mid, t) > tau:
                        hi = mid
                    else:
                        lo = mid + 1
                certify[j, i] = lo
                # largest k in [-1, t] that is refuted (-1 stands for "none")
                lo, hi = -1, t
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    up, best = _refute_cap(cs, mid, t, futility)
                    if up < tau or best <= tau:
                        lo = mid
                    else:
                        hi = mid - 1
                refute[j, i] = lo
        certify.setflags(write=False)
        refute.setflags(write=False)
        return cls(tuple(cs.looks), taus, certify, refute)

    def decide(self, k: np.ndarray | Sequence[int], t: int) -> np.ndarray:
        """Decisions ``[len(k), len(thresholds)]`` (``Decision`` values as int8) for counts ``k`` at look ``t``.

        Raises:
            ValueError: ``t`` not a look, or a count outside [0, t].
        """
        if t not in self.looks or isinstance(t, bool):
            raise InputError(f"t must be one of the looks, got {t!r}")
        j = self.looks.index(t)
        k = np.asarray(k)
        if k.ndim != 1 or not np.issubdtype(k.dtype, np.integer) or (k.size and (k.min() < 0 or k.max() > t)):
            raise InputError(f"k must be a 1-d array of integers in [0, {t}], got {k!r}")
        out = np.zeros((k.size, len(self.thresholds)), dtype=np.int8)
        out[k[:, None] <= self.refute_upto[j]] = Decision.REFUTED
        out[k[:, None] >= self.certify_from[j]] = Decision.CERTIFIED  # a certified target wins, as in decide()
        return out


__all__ = [
    "ALIASES",
    "DEFAULT_KIND",
    "LEGACY_BETTING",
    "SEQUENCES",
    "BettingMixture",
    "ConfidenceSequence",
    "Decision",
    "DecisionTable",
    "UnionBoundCP",
    "check_futility",
    "continuous_gap",
    "decide",
    "geometric_looks",
    "make_sequence",
    "projected_lower",
    "radius_from_lower",
    "refute_ceiling",
    "sequence_kind",
    "threshold",
]
