"""``dmae certify --estimate``: what a certification run will cost, before paying for it.

Per sigma: the images still to certify (rows already in the log are skipped, as a resumed run would), the
number of forward passes, and the wall time it implies on this machine, from a short timed probe of the real
classifier at the run's batch size and precision.

- fixed-n CERTIFY spends exactly ``n0 + n`` passes per image (PREDICT ``n``);
- fixed-n CERTIFY with ``--candidate label`` spends ``n`` (no selection samples);
- sequential CERTIFY spends between the first selection round (``n0`` with the label shortcut) plus the first look
  and ``n0 + n_max`` per image (no selection samples with ``--candidate label``).
  Its expected cost comes from a pilot: ``PILOT_IMAGES`` images spread over the run draw ``PILOT_SAMPLES``
  noisy samples each, their class frequencies stand in for the class probabilities, and the sequential engine is
  run on categorical oracles with those probabilities and the images' labels
  (:func:`dmae.smoothing.sequential.oracle_certificates`). The pilot's samples double as the timing probe (the
  classifier as loaded: ``--compile`` is not applied to the probe). The expectation is only as good as the
  pilot's sample of images; the bounds hold for every image (an image whose selection samples give non-finite
  logits stops at n0, below the lower bound without the label shortcut).

Nothing is written: no log, no settings file.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from dmae.errors import InputError
from dmae.smoothing import Smooth
from dmae.smoothing.core import PHASE_SELECT
from dmae.smoothing.sequential import SequentialSettings, oracle_certificates, select_looks, sequence_for

PILOT_IMAGES = 8  # images the probe samples (spread evenly over the images still to certify)
PILOT_SAMPLES = 1000  # noisy samples per pilot image (fewer when n_max is smaller)
PROBE_SAMPLES = 200  # noisy samples per pilot image when only the speed is needed (fixed-n)


@dataclass(kw_only=True)
class CostEstimate:
    """The cost of one sigma of a run: forward passes and the time they imply.

    ``passes_min`` / ``passes_max`` bound the passes (equal for fixed-n); ``passes_expected`` is the pilot's
    expectation (fixed-n: exact). ``probe_passes`` forward passes took ``probe_seconds`` on ``device``.
    """

    mode: str
    sigma: float
    images: int
    done: int
    passes_min: int
    passes_max: int
    passes_expected: float
    probe_passes: int
    probe_seconds: float
    device: str
    pilot_images: int = 0
    pilot_samples: int = 0

    @property
    def passes_per_s(self) -> float:
        """Forward passes per second measured by the probe (inf for an empty probe)."""
        return self.probe_passes / self.probe_seconds if self.probe_seconds > 0 else math.inf

    def seconds(self, passes: float) -> float:
        """The wall time ``passes`` forward passes take at the probed speed, in seconds (one process)."""
        return passes / self.passes_per_s

    def text(self) -> str:
        """A few lines for the terminal."""
        head = f"{self.mode} sigma={self.sigma:g}: {self.images:,} image(s) to certify" + (
            f" ({self.done:,} already in the log)" if self.done else ""
        )
        speed = (
            f"  probe: {self.probe_passes:,} forward passes in {self.probe_seconds:.1f} s on {self.device} = "
            f"{self.passes_per_s:,.0f} passes/s"
        )
        if self.passes_min == self.passes_max:
            cost = f"  {self.passes_max:,} forward passes: about {_duration(self.seconds(self.passes_max))}"
            return "\n".join([head, cost, speed])
        lines = [
            head,
            f"  between {self.passes_min:,} and {self.passes_max:,} forward passes "
            f"({_duration(self.seconds(self.passes_min))} to {_duration(self.seconds(self.passes_max))})",
            f"  expected about {self.passes_expected:,.0f} ({_duration(self.seconds(self.passes_expected))}), from a "
            f"pilot of {self.pilot_images} image(s) x {self.pilot_samples:,} samples",
            speed,
        ]
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _pilot(
    smooth: Smooth, x: torch.Tensor, idx: list[int], num: int, batch: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Class counts ``[P, K]`` of ``num`` noisy samples per pilot image, the non-finite samples ``[P]``, and the
    seconds they took (after a one-batch warm-up, so start-up costs do not count)."""
    smooth.sample_counts(x[:1], idx[:1], min(num, batch), batch, phase=PHASE_SELECT)
    t0 = time.perf_counter()
    out = smooth.sample_counts(x, idx, num, batch, phase=PHASE_SELECT)
    return out.counts.cpu().numpy(), out.non_finite.cpu().numpy(), time.perf_counter() - t0


def estimate_cost(
    smooth: Smooth,
    mode: str,
    images: torch.Tensor,
    indices: list[int],
    labels: list[int],
    todo: int,
    done: int,
    n0: int,
    n: int,
    batch: int,
    sequential: SequentialSettings | None = None,
) -> CostEstimate:
    """The cost of certifying ``todo`` images with ``smooth``; ``images [P, C, H, W]`` (named by ``indices``,
    with ``labels``) are the pilot images, a spread-out sample of those to certify.

    ``mode``: ``"certify"``, ``"predict"`` or ``"sequential"`` (then ``sequential`` gives its settings).

    Raises:
        ValueError: ``mode`` is sequential without settings, or what :meth:`Smooth.sample_counts` raises.
    """
    device = str(smooth.device)
    if mode != "sequential":
        per_image = n if mode == "predict" else n0 + n
        if not len(indices):
            return _cost(mode, smooth.sigma, todo, done, device, 0, 0)
        _, _, seconds = _pilot(smooth, images, indices, PROBE_SAMPLES, batch)
        passes = todo * per_image
        probe = (PROBE_SAMPLES * len(indices), seconds)
        return _cost(mode, smooth.sigma, todo, done, device, passes, passes, float(passes), probe)
    if sequential is None:
        raise InputError("a sequential estimate needs the sequential settings")
    return _sequential_estimate(smooth, sequential, images, indices, labels, todo, done, batch)


def _sequential_estimate(
    smooth: Smooth,
    s: SequentialSettings,
    images: torch.Tensor,
    indices: list[int],
    labels: list[int],
    todo: int,
    done: int,
    batch: int,
) -> CostEstimate:
    """The sequential part of :func:`estimate_cost`: bounds from the schedule, the expectation from the pilot."""
    device = str(smooth.device)
    first = sequence_for(s, smooth.sigma).looks[0]
    label = s.candidate == "label"
    selection = 0 if label else s.n0  # the most selection samples
    least_selection = 0 if label else select_looks(s)[0]
    floor = s.n0 if s.stop_on_wrong_guess else least_selection + first
    lo, hi = todo * floor, todo * (selection + s.n_max)
    if not len(indices):
        return _cost("sequential", smooth.sigma, todo, done, device, lo, hi)
    num = min(PILOT_SAMPLES, s.n_max)
    counts, bad, seconds = _pilot(smooth, images, indices, num, batch)
    # an image with non-finite samples abstains at the round of the first one (at the pilot's rate q per sample):
    # a selection round, or (about) the first look; the rest run through oracles
    ok = bad == 0
    rounds = (0, *(() if label else select_looks(s)))
    costs = [_non_finite_cost(q, rounds, first) for q in bad[~ok] / num]
    if ok.any():
        freq = counts[ok] / counts[ok].sum(1, keepdims=True)  # class frequencies stand in for the class probabilities
        certs = [
            c
            for rep in range(4)  # four oracle runs per pilot image smooth out the oracle's own luck
            for c in oracle_certificates(
                s, smooth.sigma, freq, seed=rep, labels=[y for y, good in zip(labels, ok, strict=True) if good]
            )
        ]
        costs += [float(np.mean([c.n_samples for c in certs]))] * int(ok.sum())
    expected = todo * float(np.mean(costs))
    if not ok.all():  # this classifier can give non-finite logits: an image may abstain in its first round
        lo = todo * (least_selection or first)
    probe, pilot = (num * len(indices), seconds), (len(indices), num)
    return _cost("sequential", smooth.sigma, todo, done, device, lo, hi, expected, probe, pilot)


def _cost(
    mode: str,
    sigma: float,
    todo: int,
    done: int,
    device: str,
    lo: int,
    hi: int,
    expected: float = 0.0,
    probe: tuple[int, float] = (0, 0.0),
    pilot: tuple[int, int] = (0, 0),
) -> CostEstimate:
    """A :class:`CostEstimate` from the numbers in the order the estimates compute them: passes ``lo`` .. ``hi``
    (``expected``), the timing ``probe`` (passes, seconds), the ``pilot`` (images, samples per image)."""
    return CostEstimate(
        mode=mode,
        sigma=sigma,
        images=todo,
        done=done,
        passes_min=lo,
        passes_max=hi,
        passes_expected=expected,
        probe_passes=probe[0],
        probe_seconds=probe[1],
        device=device,
        pilot_images=pilot[0],
        pilot_samples=pilot[1],
    )


def _non_finite_cost(q: float, rounds: tuple[int, ...], first: int) -> float:
    """The expected samples of an image whose samples are non-finite at rate ``q``: it stops at the end of the
    selection round (``rounds``: 0, then the selection looks) holding the first one, else (about) after the first
    look of the estimation (selection samples + ``first``). (An early-selection stop is not modelled: an upper
    estimate.)"""
    cost, none_yet = 0.0, 1.0
    for a, b in itertools.pairwise(rounds):
        clean = (1.0 - q) ** (b - a)
        cost += none_yet * (1.0 - clean) * b
        none_yet *= clean
    return float(cost + none_yet * (rounds[-1] + first))


def pilot_positions(todo: int, count: int = PILOT_IMAGES) -> list[int]:
    """Positions (into the list of images still to certify) of ``count`` pilot images spread evenly over it."""
    if todo <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, todo - 1, min(count, todo))})


__all__ = ["PILOT_IMAGES", "PILOT_SAMPLES", "CostEstimate", "estimate_cost", "pilot_positions"]
