"""Sound randomized smoothing in floating point, for images on a quantization grid (8-bit images).

Voráček & Hein, "Sound Randomized Smoothing in Floating-Point Arithmetic" (ICLR 2023, arXiv 2207.07209) show
that the standard procedure (:class:`dmae.smoothing.Smooth`: float32 ``x + sigma * randn``) can certify a
radius around x while the same procedure certifies another class at a point much closer than that radius: the
classifier sees ``fl(x + fl(eta))``, whose distribution is not the shifted Gaussian the certificate assumes,
and a classifier can read the difference in the low bits of its input. Their remedy, implemented here:

- the input is a grid image: every pixel is ``a / L`` for an integer ``0 <= a <= L`` (``L = levels = 255``);
- the noise is on the same grid, ``j / L`` with ``j`` drawn from the **discretized Gaussian**
  ``P(j) = Phi((j + 1/2) / (L sigma)) - Phi((j - 1/2) / (L sigma))`` (the mass of N(0, sigma^2) on the cell of
  ``j / L``), sampled *exactly* from uniform random words ("a fair coin");
- the classifier sees a value computed from the integer ``m = a + j`` alone (a table lookup of ``m / L``),
  with ``m`` clipped to ``[-B, L + B]`` (B about 8 sigma), so rounding can no longer depend on how x and eta
  combine.

Why this is sound (docs/sound.md writes it out): let q(z) = round(L z) per coordinate and
F(z) = f(table[clip(q(z))]). For a grid image x = a / L, q(x + eta) = a + q(eta) exactly, and q(eta) has the
discretized Gaussian law, so the votes this module counts are i.i.d. draws of F(x + eta) with continuous
eta ~ N(0, sigma^2 I). Cohen et al.'s theorem holds for any F, so CERTIFY's Clopper-Pearson bound and radius
sigma * Phi^-1(p_A_lower) certify the continuous smoothing of F on the whole l2 ball; at grid points that
smoothing is exactly what this module estimates.

The sampler (:class:`DiscreteGaussian`) inverts the CDF on 62-bit uniform integers against integer thresholds
``floor(2^62 Phi(.))`` computed with mpmath. A word that equals a threshold's integer part leaves the comparison
undecided; more words are drawn for it, digit by digit, until it is decided (probability about 1e-16 per pixel
at bits = 62). So the sampled law is the discretized Gaussian exactly, not within a bound: no alpha has to be
set aside for sampling error, and fixed-n and sequential CERTIFY use alpha as given.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from functools import lru_cache

import mpmath
import torch
from torch import nn

from dmae.errors import InputError, PlatformError
from dmae.smoothing.core import CHUNK, Smooth, chunk_seed

LEVELS = 255  # 8-bit images: pixels k / 255
TAIL_SIGMAS = 8.0  # noisy integers clipped B = ceil(8 sigma L) steps outside [0, L]: changes ~1e-15 of pixels
BITS = 62  # bits per uniform word: 2^62 divides torch's 2^64 random words, so torch.randint's modulo keeps it uniform
GUIDE_BITS = 16  # guide table on a word's top bits: most words need no binary search
GRID_TOLERANCE = 1e-6  # pixel units: float32 k / 255 is within 3e-8 of the grid; interpolated pixels are not
_GUARD_BITS = 128  # mpmath works this many bits beyond the digits a threshold needs
_MAX_LEVELS = 64  # refinement words per undecided pixel before giving up (probability 2^-3968: never)


class DiscreteGaussian:
    """The discretized Gaussian on the grid ``Z / levels``, sampled exactly from uniform ``bits``-bit words.

    Noise values are integers ``j`` (grid steps, pixel value ``j / levels``) in ``[low, high]``; the two end
    values carry the whole tails (``P(low) = P(j <= low)``, ``P(high) = P(j >= high)``). That is exact for the
    smoothed classifier, not an approximation: with ``low = -B - levels`` and ``high = levels + B`` every noisy
    integer ``a + j`` (``0 <= a <= levels``) beyond an end lies outside ``[clip_low, clip_high] = [-B, levels + B]``
    and is clipped to the same value as the end itself.

    Sampling (inverse CDF): the thresholds ``t_i = Phi((low + i + 1/2) / (levels sigma))``, ``i < M = high - low``,
    split [0, 1) into the cells of ``low .. high``; a uniform V in [0, 1) falls in cell ``low + #{i : t_i <= V}``.
    V's first ``bits`` bits are a uniform word u; ``L_i = floor(2^bits t_i)`` (exact, mpmath) decides every
    threshold with ``L_i != u``; thresholds with ``L_i == u`` are decided by V's next words against t_i's next
    base-2^bits digits, drawn only when needed.

    Args:
        sigma: noise std in pixel units (> 0).  levels: grid steps per pixel unit (255 for 8-bit images).
        tail: B = ceil(tail * sigma * levels).  bits: bits per uniform word (1 to 62; tests use few bits to
            exercise the undecided path).
    Raises:
        ValueError: sigma not a finite number > 0, levels < 1, tail <= 0, bits outside 1 .. 62.
    """

    def __init__(self, sigma: float, levels: int = LEVELS, tail: float = TAIL_SIGMAS, bits: int = BITS) -> None:
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (0 < sigma < math.inf):
            raise InputError(f"sigma must be a finite number > 0, got {sigma!r}")
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise InputError(f"levels must be an integer >= 1 (255 for 8-bit images), got {levels!r}")
        if not (0 < tail < math.inf):
            raise InputError(f"tail must be a finite number > 0, got {tail!r}")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 62:
            raise InputError(f"bits must be an integer in 1 .. 62, got {bits!r}")
        self.sigma, self.levels, self.bits = float(sigma), levels, bits
        b = math.ceil(tail * self.sigma * levels)
        self.clip_low, self.clip_high = -b, levels + b
        self.low, self.high = -b - levels, levels + b
        self.size = self.high - self.low  # M thresholds, M + 1 noise values
        self.thresholds = [self._scaled_floor(i, bits) for i in range(self.size)]  # L_i, non-decreasing
        self._digits: dict[tuple[int, int], int] = {}
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ exact arithmetic (mpmath)
    def _boundary(self, i: int) -> mpmath.mpf:
        """Threshold i's point in units of sigma: (low + i + 1/2) / (levels sigma), exact at the working precision
        (sigma is a binary float, so mpmath holds it exactly)."""
        return mpmath.mpf(2 * (self.low + i) + 1) / (2 * self.levels * mpmath.mpf(self.sigma))

    def _scaled_floor(self, i: int, scale_bits: int) -> int:
        """``floor(2^scale_bits * t_i)`` exactly: computed with ``_GUARD_BITS`` to spare and accepted only when the
        value is farther from an integer than mpmath's error bound (else recomputed at twice the precision)."""
        prec = scale_bits + _GUARD_BITS
        while True:
            with mpmath.workprec(prec):
                z = self._boundary(i)
                # above the mean t_i = 1 - Phi(-z): compute the tail, which mpmath gives to a relative error, so that
                # far tails (z ~ 1 / sigma + 8 for small sigma) need no precision of the order of -log2(1 - t_i)
                upper = z > 0
                y = mpmath.ldexp(mpmath.ncdf(-z if upper else z), scale_bits)
                f = mpmath.floor(y)
                # relative error bound: a few ulps, times z^2 (erfc's condition number at z / sqrt 2), generously
                err = y * (64 + 4 * z * z) * mpmath.ldexp(1, -prec)
                if y - f > err and f + 1 - y > err:  # y is no integer: floor(2^s - y) = 2^s - floor(y) - 1
                    return (1 << scale_bits) - int(f) - 1 if upper else int(f)
            prec *= 2

    def _digit(self, i: int, k: int) -> int:
        """Digit ``k >= 1`` of t_i in base 2^bits after the point, beyond ``L_i`` (digit 0)."""
        key = (i, k)
        if key not in self._digits:
            self._digits[key] = self._scaled_floor(i, self.bits * (k + 1)) % (1 << self.bits)
        return self._digits[key]

    def probabilities(self) -> list[float]:
        """``P(j)`` for ``j = low .. high`` (ends holding the tails), exact values rounded to float64."""
        with mpmath.workprec(128):
            t = [mpmath.ncdf(self._boundary(i)) for i in range(self.size)]
            cells = [t[0]] + [t[i] - t[i - 1] for i in range(1, self.size)] + [1 - t[-1]]
            return [float(p) for p in cells]

    # ------------------------------------------------------------------ sampling
    def _device_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(thresholds [M], thresholds + sentinel 2^bits [M + 1], guide [2^g]) as int64 on ``device``;
        ``guide[b]`` = #{i : L_i < b * 2^(bits - g)}, the cell count at the start of bucket b."""
        if device not in self._tables:
            g = min(GUIDE_BITS, self.bits)
            th = torch.tensor(self.thresholds, dtype=torch.int64)
            ext = torch.cat([th, torch.tensor([1 << self.bits], dtype=torch.int64)])
            guide = torch.searchsorted(th, torch.arange(1 << g, dtype=torch.int64) << (self.bits - g))
            self._tables[device] = (th.to(device), ext.to(device), guide.to(device))
        return self._tables[device]

    def positions(self, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """Exact draws of ``j - low`` (the cell index, in ``0 .. M``), int64 of ``shape`` on the generator's device.

        A pure function of the generator's state: the main words first, then (rarely) refinement words for the
        undecided draws in flat order. One host read per call (which draws need a binary search).
        """
        device = generator.device
        th, ext, guide = self._device_tables(device)
        u = torch.randint(0, 1 << self.bits, tuple(shape), generator=generator, device=device, dtype=torch.int64)
        pos = guide[u >> (self.bits - min(GUIDE_BITS, self.bits))].reshape(-1)
        flat = u.reshape(-1)
        # the guide's count is final unless a threshold's integer part lies in [bucket start, u]
        rare = torch.nonzero(ext[pos] <= flat).squeeze(1)
        if rare.numel():
            ur = flat[rare]
            exact = torch.searchsorted(th, ur)  # #{i : L_i < u}: those thresholds are below V for sure
            pos[rare] = exact
            tied = torch.nonzero(ext[exact] == ur).squeeze(1)  # L_i == u: V's next digits decide
            if tied.numel():
                extra = self._refine(ur[tied].tolist(), exact[tied].tolist(), generator)
                pos[rare[tied]] += torch.tensor(extra, dtype=torch.int64, device=device)
        return pos.view(tuple(shape))

    def _refine(self, words: list[int], starts: list[int], generator: torch.Generator) -> list[int]:
        """For draws whose word u equals ``L_i`` for i in ``[start, start + r)``: how many of those t_i are below V,
        comparing V's further words with t_i's further digits (the first differing digit decides). Words are drawn
        from ``generator`` level by level, one per draw still undecided, in the order given."""
        q = 1 << self.bits
        pending = []  # (draw, undecided threshold indices)
        for e, (u, s) in enumerate(zip(words, starts, strict=True)):
            pending.append((e, list(range(s, bisect.bisect_right(self.thresholds, u)))))
        below = [0] * len(words)
        for k in range(1, _MAX_LEVELS + 1):
            if not pending:
                return below
            w = torch.randint(0, q, (len(pending),), generator=generator, device=generator.device).tolist()
            still = []
            for (e, idxs), wk in zip(pending, w, strict=True):
                open_ = []
                for i in idxs:
                    d = self._digit(i, k)
                    if wk > d:
                        below[e] += 1  # V > t_i
                    elif wk == d:
                        open_.append(i)
                if open_:
                    still.append((e, open_))
            pending = still
        raise PlatformError(
            f"{len(pending)} noise draws still undecided after {_MAX_LEVELS} words (a broken generator?)"
        )

    def sample(self, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """Exact draws of the noise ``j`` in grid steps (``low .. high``), int64 of ``shape``."""
        return self.positions(shape, generator) + self.low


@lru_cache(maxsize=16)
def discrete_gaussian(sigma: float, levels: int = LEVELS) -> DiscreteGaussian:
    """The shared sampler of (sigma, levels): its threshold table costs ~0.1 s of mpmath per 1,000 thresholds."""
    return DiscreteGaussian(sigma, levels)


def check_grid(
    images: torch.Tensor, indices: Sequence[int], levels: int = LEVELS, tolerance: float = GRID_TOLERANCE
) -> None:
    """Images ``[I, C, H, W]`` must have every pixel within ``tolerance`` of ``k / levels``, ``0 <= k <= levels``.

    Raises:
        ValueError: naming each offending image index with its largest distance to the grid (pixel units).
    """
    scaled = images.detach().double().flatten(1) * levels
    k = torch.round(scaled)
    dist = ((scaled - k).abs().amax(dim=1) / levels).tolist()
    outside = ((k < 0) | (k > levels)).any(dim=1).tolist()
    off = [(int(i), d) for i, d in zip(indices, dist, strict=True) if d > tolerance]
    if off:
        worst = ", ".join(f"image {i}: {d:.3g}" for i, d in off[:10])
        made = " (ToTensor of 8-bit images gives it)" if levels == LEVELS else ""
        raise InputError(
            f"sound certification needs images on the {levels}-level grid (every pixel k/{levels}"
            f"{made}), within {tolerance:g}; largest distance to the grid: {worst}. "
            f"Resized, interpolated or normalized images are not on it: certify the quantized image "
            f"(x * {levels}).round() / {levels}, or use the standard (unsound) mode"
        )
    bad = [int(i) for i, o in zip(indices, outside, strict=True) if o]
    if bad:
        raise InputError(f"image(s) {bad[:10]} have grid pixels outside 0 .. {levels}: pixels must lie in [0, 1]")


class SoundSmooth(Smooth):
    """:class:`~dmae.smoothing.Smooth` with noise that makes its certificates sound in floating point
    (Voráček & Hein, ICLR 2023): grid images only, discretized Gaussian noise sampled exactly, the noisy image
    a function of integers. CERTIFY, PREDICT, :meth:`sample_counts` and
    :class:`~dmae.smoothing.SequentialCertifier` work on it unchanged (all noise is drawn in :meth:`noisy_chunk`).

    What a certificate means: with probability >= 1 - alpha over the random words, the returned class is the
    class of the smoothed classifier G of F = f o (quantize to the grid, clip) at x, and G keeps it on the whole
    l2 ball of the radius (docs/sound.md, "Guarantee"). Assumes f is a deterministic function of each input row
    (true of an eval-mode network up to GPU kernels that depend on the batch) and torch's generator as the fair
    coin. ``precision`` is the caller's: autocast only changes which function f is, not the argument.

    ``base_classifier``, ``num_classes``, ``sigma``, ``seed``, ``precision`` and ``device`` are as for
    :class:`~dmae.smoothing.Smooth`.

    Args:
        levels: grid steps per pixel unit (255: 8-bit images).
    Raises:
        ValueError: as :class:`~dmae.smoothing.Smooth`, or levels < 1. At certification: images off the grid or
            outside [0, 1], each named with its distance to the grid.
    """

    def __init__(
        self,
        base_classifier: nn.Module,
        num_classes: int,
        sigma: float,
        seed: int | None = None,
        precision: str = "auto",
        device: torch.device | str | None = None,
        levels: int = LEVELS,
    ) -> None:
        super().__init__(base_classifier, num_classes, sigma, seed=seed, precision=precision, device=device)
        if self.device.type not in ("cpu", "cuda"):  # randint's exact uniformity over 2^62 is shown for these only
            raise InputError(f"sound certification runs on cpu or cuda, got device {self.device}")
        self.levels = levels
        self.noise = discrete_gaussian(self.sigma, levels)
        self._values: dict[torch.dtype, torch.Tensor] = {}

    def _check_inputs(self, images: torch.Tensor, indices: Sequence[int]) -> None:
        """The standard checks (floating point, finite, in [0, 1]), then every pixel on the grid."""
        super()._check_inputs(images, indices)
        check_grid(images, indices, self.levels)

    def noisy_chunk(self, x: torch.Tensor, idx: int, phase: int, chunk: int, size: int = CHUNK) -> torch.Tensor:
        """``size`` noisy copies of the grid image ``x`` ``[C, H, W]`` (on the device), ``[size, C, H, W]`` in x's
        dtype: pixel ``table[a + j]`` = ``clip(a + j) / levels`` rounded once, for ``a = round(levels x)`` and j
        the discretized Gaussian. A pure function of (seed, idx, phase, chunk), like the standard noise."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(chunk_seed(self.seed, idx, phase, chunk))
        a = torch.round(x * self.levels).to(torch.int64)  # exact: inputs were checked on the grid
        pos = self.noise.positions((size, *x.shape), gen)  # j - low, so a + pos indexes the table
        return self._value_table(x.dtype)[a.unsqueeze(0) + pos]

    def _value_table(self, dtype: torch.dtype) -> torch.Tensor:
        """``table[k] = clip(k + low, clip_low, clip_high) / levels`` for ``k = 0 .. levels + M``, in ``dtype`` on the
        device: the classifier's input is a fixed function of the integer a + j (one rounding, made once here)."""
        if dtype not in self._values:
            nz = self.noise
            m = torch.arange(nz.low, nz.high + self.levels + 1, dtype=torch.float64).clamp(nz.clip_low, nz.clip_high)
            self._values[dtype] = (m / self.levels).to(dtype).to(self.device)
        return self._values[dtype]
