"""Sequential CERTIFY: stop sampling an image as soon as its answer is settled, with CERTIFY's guarantee.

Per image (docs/sequential.md gives the validity argument step by step):

1. the candidate class: with ``candidate="select"``, selection samples choose c_hat (the first of the top
   counts), as in fixed-n CERTIFY; with ``candidate="label"``, c_hat is the image's label, fixed before any sample
   is drawn (the certificate then says "g(x) is the label, robust at this radius": certified accuracy directly);
2. estimation, in rounds: fresh samples are drawn up to the next *look* t of an anytime-valid confidence
   sequence (:mod:`dmae.smoothing.confseq`); with k of them for c_hat, the bounds ``lower(k, t)`` and
   ``upper(k, t)`` decide each target radius (certified / refuted / open) or, in continuous mode, how much the
   radius could still grow;
3. stop when every target is decided (or the radius gap is below epsilon), or at ``n_max``; return c_hat with
   the largest certified target and the continuous radius sigma * Phi^-1(max over looks of lower), or abstain
   when that bound is not above 1/2. Any sample with NaN / infinite logits makes the image abstain.

The look schedule (``schedule="early"``, the default) looks where a certificate first becomes possible: at the
sample count where an all-success stream first clears 1/2, then about 10% apart, plus the count where it first
clears each target's threshold; the selection step stops as soon as one class holds a clear majority. The
earlier schedule (``"chunks"``: rounds at whole chunks of 100 samples from 100, n0 selection samples at once)
is kept so that logs written with it resume unchanged.

The engine keeps every forward batch full while images stop at different times (continuous batching): the
images still sampling share each batch, and a finished image is replaced by the next one. The noise of sample
j of image idx in a phase is element ``j % CHUNK`` of the chunk seeded by (seed, idx, phase, j // CHUNK)
(:func:`dmae.smoothing.core.chunk_seed`), drawn whole and sliced: a pure function of (seed, idx, sample number),
so rows do not depend on where the rounds end, on the batch size, on sharding or on where a run was resumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
import torch
from scipy.stats import binom
from torch import nn

from dmae.errors import InputError
from dmae.smoothing.bounds import check_certify_budget
from dmae.smoothing.confseq import (
    LEGACY_BETTING,
    BettingMixture,
    ConfidenceSequence,
    check_futility,
    geometric_looks,
    make_sequence,
    radius_or_zero,
    refute_ceiling,
    sequence_kind,
    threshold,
)
from dmae.smoothing.core import CHUNK, PHASE_ESTIMATE, PHASE_SELECT, Smooth

FIRST_LOOK, LOOK_RATIO = 100, 1.1  # the chunk schedule: one chunk, then about 10% more each round, at chunk ends
# the early schedule: looks about 10% apart from the first count that can certify anything (docs/sequential.md:
# 5% apart saved under 1% more samples, 20% apart cost under 1%)
EARLY_RATIO = 1.1
# early selection: after 10, 15, 23, ... of the n0 selection samples, stop when the top class holds a majority that
# a fair coin gives with probability <= SELECT_LEVEL (then it is the only class that could be certified, unless
# that 1% event happened); measured in docs/sequential.md
SELECT_FIRST, SELECT_RATIO, SELECT_LEVEL = 10, 1.5, 0.01
# beta of the futility rule (confseq.projected_lower): the most samples saved for at most ~1 target lost in 300
# against fixed-n CERTIFY on the benchmark's per-image p_A (docs/sequential.md, "Futility"); evaluated at the
# chunk schedule's looks only, where it was measured (at every look of a denser schedule it fires more often)
DEFAULT_FUTILITY = 0.01

Mode = Literal["targets", "continuous"]
Candidate = Literal["select", "label"]
Schedule = Literal["early", "chunks"]
DEFAULT_SCHEDULE: Schedule = "early"


class SequentialCertificate(NamedTuple):
    """Sequential CERTIFY's answer for one image.

    ``prediction`` is the class or ``Smooth.ABSTAIN``; ``radius`` the largest certified target (targets mode)
    or the continuous radius (continuous mode); ``radius_continuous`` = sigma * Phi^-1(p_a_lower) (0 on
    abstain); ``n_samples`` = the selection samples drawn (none with ``candidate="label"``) + the estimation
    samples drawn; ``n_a`` of those voted for c_hat; ``p_a_lower`` / ``p_a_upper`` the bounds at the stop
    (running max / min over the looks); ``non_finite`` > 0 when the image abstained because that many samples
    gave non-finite logits; ``wrong_guess`` when the label shortcut skipped estimation (the guess was not the
    label: the image abstains, ``n_samples`` = the selection samples); ``n_select`` of the ``n_samples`` were
    selection samples.
    """

    prediction: int
    radius: float
    radius_continuous: float
    n_samples: int
    n_a: int
    p_a_lower: float
    p_a_upper: float
    non_finite: int = 0
    wrong_guess: bool = False
    n_select: int = 0


@dataclass(frozen=True)
class SequentialSettings:
    """What sequential CERTIFY does per image.

    Args:
        n0: selection samples (the most, under the early schedule; unused with ``candidate="label"``).
        n_max: the most estimation samples per image.  alpha: failure probability.
        mode: ``"targets"`` (stop when every target radius is certified or refuted) or ``"continuous"`` (stop
            when the radius the bounds allow is known within ``epsilon``).
        radii: the target radii (l2, [0, 1] pixel units) of targets mode.
        epsilon: the radius tolerance of continuous mode.
        sequence: the confidence sequence (``"default"``, ``"betting"``, ``"union"``).
        stop_on_wrong_guess: the label shortcut: an image whose selection guess is not its label cannot count as
            certified at any radius, so it abstains without estimation samples (certified accuracy is unchanged;
            the class and radius of wrong images are). Needs labels (:meth:`SequentialCertifier.certify_stream`).
            Its selection always draws all n0 samples, so a log tells the images it stopped (n_samples == n0).
        futility: beta of the futility rule (:func:`dmae.smoothing.confseq.projected_lower`): a target the last
            look would most likely not certify, even at p_A's (1 - beta) upper bound, is refuted; ``None`` turns
            the rule off. A stopping rule only: it never changes what a certificate claims.
        candidate: ``"select"`` (CERTIFY's selection step chooses the class) or ``"label"`` (the class is the
            image's label, fixed before any sample: no selection samples; needs labels).
        schedule: ``"early"`` (looks where a certificate first becomes possible, early selection, the betting
            sequence's measured defaults) or ``"chunks"`` (the earlier schedule, for logs written with it).
    """

    n0: int
    n_max: int
    alpha: float
    mode: Mode = "targets"
    radii: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    epsilon: float = 0.01
    sequence: str = "default"
    stop_on_wrong_guess: bool = False
    futility: float | None = DEFAULT_FUTILITY
    candidate: Candidate = "select"
    schedule: Schedule = DEFAULT_SCHEDULE

    def __post_init__(self) -> None:
        if not isinstance(self.n0, int) or self.n0 < 1:
            raise InputError(f"n0 must be an integer >= 1, got {self.n0!r}")
        if not isinstance(self.n_max, int) or self.n_max < 1:
            raise InputError(f"n_max must be an integer >= 1, got {self.n_max!r}")
        if self.mode not in ("targets", "continuous"):
            raise InputError(f"mode must be 'targets' or 'continuous', got {self.mode!r}")
        if not self.radii or any(not (0.0 <= r < math.inf) for r in self.radii):
            raise InputError(f"radii must be finite numbers >= 0, got {self.radii!r}")
        if not (0.0 < self.epsilon < math.inf):
            raise InputError(f"epsilon must be a finite number > 0, got {self.epsilon!r}")
        if self.futility is not None:
            check_futility(self.futility)
        if self.candidate not in ("select", "label"):
            raise InputError(f"candidate must be 'select' or 'label', got {self.candidate!r}")
        if self.schedule not in ("early", "chunks"):
            raise InputError(f"schedule must be 'early' or 'chunks', got {self.schedule!r}")
        if self.stop_on_wrong_guess and self.candidate == "label":
            raise InputError(
                "stop_on_wrong_guess skips the estimation of a wrong selection guess; with "
                "candidate='label' there is no guess (the label is the candidate)"
            )


def chunk_looks(n_max: int, first: int = FIRST_LOOK, ratio: float = LOOK_RATIO) -> tuple[int, ...]:
    """Geometric looks rounded up to whole chunks of noise (``CHUNK`` samples), the last one ``n_max``: the chunk
    schedule. (Any schedule fixed in advance keeps the sequences valid; the union bound splits alpha over exactly
    these looks.)"""
    looks = {min(n_max, math.ceil(t / CHUNK) * CHUNK) for t in geometric_looks(n_max, first, ratio)}
    return tuple(sorted(looks))


def first_clearing(bound: Callable[[int], float], tau: float, n_max: int) -> int | None:
    """The least t <= ``n_max`` with ``bound(t) > tau`` for a ``bound`` nondecreasing in t (bisection), or None."""
    if not bound(n_max) > tau:
        return None
    lo, hi = 1, n_max
    while lo < hi:
        mid = (lo + hi) // 2
        if bound(mid) > tau:
            hi = mid
        else:
            lo = mid + 1
    return lo


def early_looks(cs: BettingMixture, thresholds: Sequence[float], ratio: float = EARLY_RATIO) -> tuple[int, ...]:
    """The early schedule of a betting sequence: looks ``ratio`` apart from the first count at which an all-success
    stream clears 1/2 (nothing can be certified sooner), each count at which it first clears one of
    ``thresholds`` (an image with p_A = 1 then stops exactly there), and the chunk schedule's looks (where the
    futility rule is evaluated). The mixture holds at every t, so any schedule fixed in advance is valid."""
    n_max = cs.n_max

    def all_success(t: int) -> float:
        return cs.running_lower(t, t)

    looks = set(chunk_looks(n_max))
    first = first_clearing(all_success, 0.5, n_max)
    if first is not None:
        looks |= set(geometric_looks(n_max, first, ratio))
    looks |= {t for tau in thresholds if (t := first_clearing(all_success, tau, n_max)) is not None}
    return tuple(sorted(looks))


def sequence_for(settings: SequentialSettings, sigma: float | None = None) -> ConfidenceSequence:
    """The confidence sequence of ``settings`` and its looks. The chunk schedule: rounds at whole chunks
    (:func:`chunk_looks`), the betting sequence with ``LEGACY_BETTING``. The early schedule: the betting sequence
    with its defaults at :func:`early_looks` (targets mode: the thresholds Phi(r / sigma) of the radii at
    ``sigma``); the union bound splits alpha over its looks, so it keeps the chunk looks under both schedules.

    Raises:
        ValueError: the early schedule in targets mode without ``sigma``, or what ``make_sequence`` raises.
    """
    s = settings
    kind = sequence_kind(s.sequence)
    legacy = LEGACY_BETTING if kind == "betting" and s.schedule == "chunks" else {}
    base = make_sequence(s.sequence, s.alpha, s.n_max, looks=chunk_looks(s.n_max), **legacy)
    if s.schedule == "chunks" or not isinstance(base, BettingMixture):
        return base
    if s.mode == "targets" and sigma is None:
        raise InputError("the early schedule places looks at the targets' thresholds: give sigma")
    taus = [threshold(r, sigma) for r in s.radii] if s.mode == "targets" else []  # type: ignore[arg-type]
    return make_sequence(s.sequence, s.alpha, s.n_max, looks=early_looks(base, taus))


def select_looks(settings: SequentialSettings) -> tuple[int, ...]:
    """The selection rounds: all n0 samples at once under the chunk schedule or with the label shortcut (whose
    stopped images a log tells apart by n_samples == n0), else 10, 15, 23, ... then n0 (early selection)."""
    s = settings
    if s.schedule == "chunks" or s.stop_on_wrong_guess or s.n0 <= SELECT_FIRST:
        return (s.n0,)
    return geometric_looks(s.n0, SELECT_FIRST, SELECT_RATIO)


def majority_needed(m: int, level: float = SELECT_LEVEL) -> int:
    """The least count k of m votes with P(Binomial(m, 1/2) >= k) <= ``level`` (m + 1 if none): a class with
    p <= 1/2, the only kind that cannot be certified, reaches it with probability at most ``level``."""
    return int(binom.isf(level, m, 0.5)) + 1


@dataclass(eq=False)  # slots are compared by identity (their tensors have no truth value)
class _Slot:
    """One image being certified: its phase, the samples drawn so far, the votes counted."""

    idx: int
    x: torch.Tensor  # [C, H, W] on the device
    phase: int = PHASE_SELECT
    target: int = 0  # samples of this phase to draw by the end of the current round
    drawn: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # [K + 1]: bin K non-finite
    c_hat: int = -1
    label: int | None = None  # known only for the label shortcut and candidate="label"
    look: int = 0  # index of the current round's look (selection looks, then the sequence's)
    n_select: int = 0  # selection samples drawn, once the selection is over
    lower: float = 0.0  # running max / min over looks (both stay valid: the sequence holds at every look)
    upper: float = 1.0


class SequentialCertifier:
    """Sequential CERTIFY over a stream of images with continuous batching (see the module docstring).

    Args:
        smooth: the smoothed classifier (base classifier, sigma, seed, precision, device).
        settings: :class:`SequentialSettings`.
    Raises:
        ValueError: bad settings, or what :func:`dmae.smoothing.confseq.make_sequence` raises.
    """

    def __init__(self, smooth: Smooth, settings: SequentialSettings) -> None:
        self.smooth, self.settings = smooth, settings
        self.cs = sequence_for(settings, smooth.sigma)
        self.thresholds = [threshold(r, smooth.sigma) for r in settings.radii]
        self.k = smooth.num_classes
        self.futility_looks = frozenset(chunk_looks(settings.n_max))
        self.select_looks = select_looks(settings)
        self.select_need = {m: majority_needed(m) for m in self.select_looks}
        check_certify_budget(settings.n_max, settings.alpha)

    def certify_stream(
        self, items: Iterable[tuple[int, torch.Tensor]], batch_size: int, labels: Mapping[int, int] | None = None
    ) -> Iterator[tuple[int, SequentialCertificate]]:
        """Certify ``(idx, image [C, H, W] in [0, 1])`` pairs; yields ``(idx, certificate)`` as images finish
        (not in input order). Forward batches hold ``batch_size`` samples until the stream runs dry. ``labels``
        (idx -> class, read when an image is admitted) are needed by the label shortcut and ``candidate="label"``.

        Raises:
            ValueError: an image with NaN / infinite pixels (named by its index), bad logits, bad batch size,
                a missing label under ``stop_on_wrong_guess`` or ``candidate="label"``, a label outside the classes.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        source = iter(items)
        active: list[_Slot] = []
        seen: set[int] = set()
        exhausted = False
        while True:
            while not exhausted and sum(s.target - s.drawn for s in active) < batch_size:
                nxt = next(source, None)
                if nxt is None:
                    exhausted = True
                else:
                    if int(nxt[0]) in seen:  # the index names the noise stream: one image, one stream
                        raise InputError(f"image index {nxt[0]} given twice")
                    seen.add(int(nxt[0]))
                    active.append(self._admit(*nxt, labels))
            if not active:
                return
            for slot, cert in self._step(active, batch_size):
                active.remove(slot)
                yield slot.idx, cert

    def certify_batch(
        self, images: torch.Tensor, indices: Sequence[int], batch_size: int, labels: Sequence[int] | None = None
    ) -> list[SequentialCertificate]:
        """Sequential CERTIFY of images ``[I, C, H, W]`` named by ``indices`` (``labels``: their classes, for
        the label shortcut and ``candidate="label"``); answers in input order."""
        by_idx = None if labels is None else {int(i): int(y) for i, y in zip(indices, labels, strict=True)}
        done = dict(self.certify_stream(zip((int(i) for i in indices), images, strict=True), batch_size, by_idx))
        return [done[int(i)] for i in indices]

    # ------------------------------------------------------------------ the engine
    def _admit(self, idx: int, image: torch.Tensor, labels: Mapping[int, int] | None) -> _Slot:
        self.smooth._check_inputs(image.unsqueeze(0), [idx])
        s = self.settings
        label = None
        if s.stop_on_wrong_guess or s.candidate == "label":
            if labels is None or int(idx) not in labels:
                need = "candidate='label'" if s.candidate == "label" else "stop_on_wrong_guess"
                raise InputError(f"{need} needs the label of image {idx}")
            label = int(labels[int(idx)])
            if not 0 <= label < self.k:
                raise InputError(f"image {idx} has label {label}, outside the classifier's {self.k} classes")
        slot = _Slot(idx, image.to(self.smooth.device), target=self.select_looks[0], label=label)
        slot.counts = np.zeros(self.k + 1, dtype=np.int64)
        if s.candidate == "label":  # the class is fixed before any sample: no selection step
            self._start_estimation(slot, label)  # type: ignore[arg-type]
        return slot

    def _start_estimation(self, slot: _Slot, c_hat: int) -> None:
        """Phase 1 for candidate ``c_hat``: fresh samples from their own streams, counted from zero."""
        slot.n_select, slot.c_hat = slot.drawn, c_hat  # drawn: the selection samples (0 for candidate="label")
        slot.phase, slot.drawn, slot.look = PHASE_ESTIMATE, 0, 0
        slot.counts = np.zeros(self.k + 1, dtype=np.int64)
        slot.target = self.cs.looks[0]

    def _step(self, active: list[_Slot], batch_size: int) -> list[tuple[_Slot, SequentialCertificate]]:
        """One forward batch over the slots with samples due; then the decisions of the rounds it completed."""
        noisy, owners, rows, room = [], [], [], batch_size
        for row, slot in enumerate(active):
            m = min(slot.target - slot.drawn, room)
            if m > 0:
                noisy.append(self._noise(slot, slot.drawn, m))
                owners.append(np.full(m, row))
                rows.append(row)
                slot.drawn += m
                room -= m
            if room == 0:
                break
        classes = self.smooth.classify(torch.cat(noisy)).cpu().numpy()  # one host read per batch
        per_slot = np.bincount(np.concatenate(owners) * (self.k + 1) + classes, minlength=len(active) * (self.k + 1))
        per_slot = per_slot.reshape(len(active), self.k + 1)
        finished = []
        for row in rows:
            slot = active[row]
            slot.counts += per_slot[row]
            if slot.drawn == slot.target:  # its round is complete: decide
                cert = self._decide(slot)
                if cert is not None:
                    finished.append((slot, cert))
        return finished

    def _noise(self, slot: _Slot, start: int, m: int) -> torch.Tensor:
        """Noisy copies for samples ``start .. start + m`` of the slot's phase: element ``j % CHUNK`` of chunk
        ``j // CHUNK``, each chunk drawn whole from its own seed (so a sample never depends on the rounds)."""
        parts = []
        for c in range(start // CHUNK, (start + m - 1) // CHUNK + 1):
            lo, hi = max(start, c * CHUNK) - c * CHUNK, min(start + m, (c + 1) * CHUNK) - c * CHUNK
            parts.append(self.smooth.noisy_chunk(slot.x, slot.idx, slot.phase, c)[lo:hi])  # drawn whole, as ever
        return torch.cat(parts)

    def _decide(self, slot: _Slot) -> SequentialCertificate | None:
        """After a completed round: the next round, or the certificate (None while sampling goes on)."""
        if slot.phase == PHASE_SELECT:
            return self._select(slot)
        cs = self.cs
        bad = int(slot.counts[self.k])
        t, k = slot.drawn, int(slot.counts[slot.c_hat])
        if bad:
            return SequentialCertificate(
                Smooth.ABSTAIN, 0.0, 0.0, slot.n_select + t, k, 0.0, 1.0, bad, n_select=slot.n_select
            )
        slot.lower, slot.upper = max(slot.lower, cs.lower(k, t)), min(slot.upper, cs.upper(k, t))
        if not self._settled(slot, k, t) and t < cs.n_max:
            slot.look += 1
            slot.target = cs.looks[slot.look]
            return None
        return self._certificate(slot, t, k)

    def _select(self, slot: _Slot) -> SequentialCertificate | None:
        """After a selection round: c_hat (the first of the top counts, as CERTIFY) once all n0 samples are in or
        one class holds a clear majority (:func:`majority_needed`; a function of the selection samples only, so
        the estimation samples stay independent of c_hat), else the next selection round."""
        bad = int(slot.counts[self.k])
        if bad:
            return SequentialCertificate(Smooth.ABSTAIN, 0.0, 0.0, slot.drawn, 0, 0.0, 1.0, bad, n_select=slot.drawn)
        votes = slot.counts[: self.k]
        c_hat = int(np.argmax(votes))
        if slot.drawn < self.settings.n0 and votes[c_hat] < self.select_need[slot.drawn]:
            slot.look += 1
            slot.target = self.select_looks[slot.look]
            return None
        if slot.label is not None and c_hat != slot.label:  # the label shortcut: certified correct is impossible
            return SequentialCertificate(
                Smooth.ABSTAIN, 0.0, 0.0, slot.drawn, 0, 0.0, 1.0, wrong_guess=True, n_select=slot.drawn
            )
        self._start_estimation(slot, c_hat)
        return None

    def _settled(self, slot: _Slot, k: int, t: int) -> bool:
        """Whether more samples could change the answer, judged on the running bounds (docs/sequential.md):
        a target is decided when ``lower > tau`` (certified), or ``upper < tau`` or ``refute_ceiling(k, t) <= tau``
        (the budget test and the futility rule: refuted); continuous mode stops when the radius the remaining
        budget and the upper bound still allow exceeds the certified one by less than epsilon."""
        futility = self.settings.futility if t in self.futility_looks else None
        best = refute_ceiling(self.cs, k, t, futility)
        if self.settings.mode == "targets":
            return all(slot.lower > tau or slot.upper < tau or best <= tau for tau in self.thresholds)
        sigma = self.smooth.sigma
        return radius_or_zero(min(slot.upper, best), sigma) - radius_or_zero(slot.lower, sigma) < self.settings.epsilon

    def _certificate(self, slot: _Slot, t: int, k: int) -> SequentialCertificate:
        s, sigma = self.settings, self.smooth.sigma
        n = slot.n_select + t
        if not slot.lower > 0.5:  # p_A > 1/2 is what makes c_hat the smoothed class
            return SequentialCertificate(Smooth.ABSTAIN, 0.0, 0.0, n, k, slot.lower, slot.upper, n_select=slot.n_select)
        r_cont = radius_or_zero(slot.lower, sigma)
        certified = [r for r, tau in zip(s.radii, self.thresholds, strict=True) if slot.lower > tau]
        radius = r_cont if s.mode == "continuous" else max(certified, default=0.0)
        return SequentialCertificate(slot.c_hat, radius, r_cont, n, k, slot.lower, slot.upper, n_select=slot.n_select)


ID_SPACING = 1e4  # the oracle's image-number pixel: far apart enough that no noise (sigma <= 100) blurs two numbers


class _CategoricalOracle(nn.Module):
    """K classes with fixed probabilities per image, drawn from the noise itself. Image i is two pixels: pixel 0 is
    0 (its noise eta ~ N(0, sigma^2) gives u = Phi(eta / sigma) ~ U(0, 1)), pixel 1 is ``i * ID_SPACING`` (read
    back by rounding, so the oracle knows which image's probabilities to use). The class is the interval of the
    cumulative probabilities u falls in: class j with probability exactly ``probs[i, j]``."""

    cum: torch.Tensor  # a buffer (registered in __init__): the cumulative probabilities [I, K - 1]

    def __init__(self, probs: np.ndarray, sigma: float) -> None:
        super().__init__()
        self.register_buffer("cum", torch.tensor(np.cumsum(probs, axis=1)[:, :-1], dtype=torch.float64))
        self.k, self.sigma = probs.shape[1], sigma
        self.anchor = nn.Parameter(torch.zeros(1, dtype=torch.float64))  # gives the module a device (the CPU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1).double()
        u = torch.special.ndtr(flat[:, 0] / self.sigma)
        row = torch.round(flat[:, 1] / ID_SPACING).long()
        cls = (u.unsqueeze(1) > self.cum[row]).sum(1)
        return nn.functional.one_hot(cls, self.k).double()


def oracle_certificates(
    settings: SequentialSettings,
    sigma: float,
    probs: Sequence[float] | np.ndarray,
    seed: int = 0,
    labels: Sequence[int] | None = None,
) -> list[SequentialCertificate]:
    """What sequential CERTIFY answers (and spends) on images whose noisy samples fall in each class with known
    probabilities: the real engine (selection, rounds, decisions, budget test) run on categorical oracles.

    Args:
        settings: the sequential settings.  sigma: the noise level (the radii's scale).
        probs: ``[P, K]`` class probabilities per image (rows summing to 1), or ``[P]`` values p for two classes
            ``[p, 1 - p]`` (so class 0 is the top class when p > 1/2; p = 1 never draws class 1).
        seed: seed of the oracle's noise.  labels: the label of each image (the label shortcut and
            ``candidate="label"`` need them; default: each row's most probable class).
    Returns:
        one :class:`SequentialCertificate` per image, in order. The decisions see only vote counts, so an oracle
        with an image's class probabilities costs what the model would on it (used by ``dmae certify
        --estimate``, the soundness tests and the benchmarks).
    Raises:
        ValueError: probabilities outside [0, 1], rows not summing to 1, labels of the wrong length.
    """
    pr = np.asarray(probs, dtype=np.float64)
    pr = np.stack([pr, 1.0 - pr], axis=1) if pr.ndim == 1 else pr
    if pr.ndim != 2 or not np.all((pr >= 0) & (pr <= 1)) or not np.allclose(pr.sum(1), 1.0, atol=1e-9):
        raise InputError(
            f"probs must be probabilities in [0, 1] (rows summing to 1), got {np.asarray(probs).tolist()!r}"
        )
    if labels is not None and len(labels) != len(pr):
        raise InputError(f"{len(labels)} labels for {len(pr)} images")
    x = torch.zeros(len(pr), 1, 1, 2, dtype=torch.float64)
    x[:, 0, 0, 1] = torch.arange(len(pr), dtype=torch.float64) * ID_SPACING
    given = labels if labels is not None else pr.argmax(1).tolist()
    by_idx = {i: int(y) for i, y in enumerate(given)}
    # the oracle's "pixels" are (noise, image number), not [0, 1] pixels: no range check
    smooth = Smooth(
        _CategoricalOracle(pr, sigma).eval(),
        pr.shape[1],
        sigma,
        seed=seed,
        precision="fp32",
        device=torch.device("cpu"),
        input_range=None,
    )
    done = dict(
        SequentialCertifier(smooth, settings).certify_stream(zip(range(len(pr)), x, strict=True), 100_000, by_idx)
    )
    return [done[i] for i in range(len(pr))]
