"""The smoothed classifier ``g(x) = argmax_c P(f(x + eta) = c)``, eta ~ N(0, sigma^2 I) in [0, 1] pixel space.

CERTIFY and PREDICT read like the published pseudocode; what differs is how the samples are counted:

- noise is drawn on the model's device, in fixed chunks of ``CHUNK`` samples, each from a generator seeded
  by (seed, image index, phase, chunk). So the samples an image sees depend only on the seed and its index,
  never on the batch size, on which rank certifies it, or on where a run was resumed;
- several images are packed into one forward batch when ``n`` is smaller than the batch;
- class counts accumulate on the device (``bincount``), and the host reads them once per group of images;
- selection (n0) and estimation (n) samples are both counted before that single read: the estimation
  counts do not depend on the selected class, so no intermediate round-trip is needed;
- bf16 autocast on GPUs (``precision='auto'``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from dmae.corrupt import check_sigma
from dmae.engine import autocast
from dmae.smoothing.bounds import check_alpha, certified_radius, lower_confidence_bound, predict_pvalue

CHUNK = 100  # noise samples per seeded draw; part of the reproducibility contract
PHASE_SELECT, PHASE_ESTIMATE, PHASE_PREDICT = 0, 1, 2
_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a well-spread 64-bit value from an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def chunk_seed(seed: int, idx: int, phase: int, chunk: int) -> int:
    """The seed of one chunk of noise samples of one image (a pure function of its arguments)."""
    h = _mix64(seed)
    for v in (idx, phase, chunk):
        h = _mix64(h ^ (v & _MASK64))
    return h & ((1 << 63) - 1)


class Certificate(NamedTuple):
    """CERTIFY's answer for one image: the class (``Smooth.ABSTAIN`` = -1) and the certified l2 radius
    (0.0 on abstain), with the counts behind it."""

    prediction: int
    radius: float
    n_a: int
    p_a_lower: float


class Prediction(NamedTuple):
    """PREDICT's answer for one image: the class or ``Smooth.ABSTAIN``, and the binomial test's p-value."""

    prediction: int
    pvalue: float


def _check_counts(n0: int | None, n: int, batch_size: int) -> None:
    if n0 is not None and (not isinstance(n0, int) or n0 < 1):
        raise ValueError(f"n0 must be an integer >= 1, got {n0!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


class Smooth:
    """A Gaussian-smoothed classifier around any ``nn.Module`` base classifier taking [0, 1] images.

    Args:
        base_classifier: maps ``[B, C, H, W]`` to logits ``[B, num_classes]``.
        num_classes: number of classes.
        sigma: noise std in [0, 1] pixel units (> 0).
        seed: seed of all noise; with ``idx`` given to :meth:`certify` / :meth:`predict` the answers are
            reproducible. ``None`` draws a seed from torch's global generator.
        precision: ``'auto'`` (bf16 autocast on GPUs), ``'bf16'`` or ``'fp32'``.
    """

    ABSTAIN = -1

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float, seed: int | None = None,
                 precision: str = "auto") -> None:
        if check_sigma(sigma) <= 0:
            raise ValueError(f"sigma must be > 0 to smooth a classifier, got {sigma!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = float(sigma)
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
        self.precision = precision
        self._calls = 0
        self._warned_range = False

    @property
    def device(self) -> torch.device:
        try:
            return next(self.base_classifier.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    # ------------------------------------------------------------------ the published API, one image
    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int, idx: int | None = None) -> tuple[int, float]:
        """CERTIFY(x, n0, n, alpha): ``(class, radius)``, or ``(Smooth.ABSTAIN, 0.0)``.

        With probability at least ``1 - alpha`` over the noise, a returned class is g(x) and g is constant
        on the l2 ball of the returned radius around x. ``x``: one [0, 1] image ``[C, H, W]``.
        """
        cert = self.certify_batch(x.unsqueeze(0), [self._index(idx)], n0, n, alpha, batch_size)[0]
        return cert.prediction, cert.radius

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int, idx: int | None = None) -> int:
        """PREDICT(x, n, alpha): the top class, or ``Smooth.ABSTAIN`` when the two-sided binomial test of the
        top two counts has p-value above ``alpha`` (then g(x) is wrongly returned with prob. <= alpha)."""
        return self.predict_batch(x.unsqueeze(0), [self._index(idx)], n, alpha, batch_size)[0].prediction

    def _index(self, idx: int | None) -> int:
        if idx is not None:
            return int(idx)
        self._calls += 1  # fresh noise for every call without an index
        return -self._calls

    # ------------------------------------------------------------------ many images
    def certify_batch(self, images: torch.Tensor, indices: Sequence[int], n0: int, n: int, alpha: float,
                      batch_size: int) -> list[Certificate]:
        """CERTIFY for several images ``[I, C, H, W]`` at once; ``indices`` name their noise streams."""
        _check_counts(n0, n, batch_size)
        check_alpha(alpha)
        select = self.sample_counts(images, indices, n0, batch_size, PHASE_SELECT)
        estimate = self.sample_counts(images, indices, n, batch_size, PHASE_ESTIMATE)
        c_hat = select.argmax(dim=1)  # first of the top counts
        n_a = estimate.gather(1, c_hat.unsqueeze(1)).squeeze(1)
        c_hat, n_a = c_hat.tolist(), n_a.tolist()  # the one host read for this group
        out = []
        for c, k in zip(c_hat, n_a):
            p_lower = lower_confidence_bound(int(k), n, alpha)
            if p_lower < 0.5:
                out.append(Certificate(self.ABSTAIN, 0.0, int(k), p_lower))
            else:
                out.append(Certificate(int(c), certified_radius(p_lower, self.sigma), int(k), p_lower))
        return out

    def predict_batch(self, images: torch.Tensor, indices: Sequence[int], n: int, alpha: float,
                      batch_size: int) -> list[Prediction]:
        """PREDICT for several images at once."""
        _check_counts(None, n, batch_size)
        check_alpha(alpha)
        counts = self.sample_counts(images, indices, n, batch_size, PHASE_PREDICT)
        top = torch.sort(counts, dim=1, descending=True, stable=True)  # ties keep the lower class first
        vals, cls = top.values[:, :2].tolist(), top.indices[:, :2].tolist()
        out = []
        for (c1, c2), (k1, _) in zip(vals, cls):
            p = predict_pvalue(int(c1), int(c2))
            out.append(Prediction(self.ABSTAIN if p > alpha else int(k1), p))
        return out

    @torch.no_grad()
    def sample_counts(self, images: torch.Tensor, indices: Sequence[int], num: int, batch_size: int,
                      phase: int = PHASE_ESTIMATE) -> torch.Tensor:
        """Class counts ``[I, num_classes]`` (on the device) of ``f(x_i + eta)`` over ``num`` noise draws per image.

        Chunks of ``CHUNK`` samples (the last one shorter) are generated from their own seeds and packed into
        forward batches of at most ``batch_size`` samples across images.
        """
        if images.ndim != 4:
            raise ValueError(f"expected images [I, C, H, W], got shape {tuple(images.shape)}")
        if len(indices) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(indices)} indices")
        device = self.device
        x = images.to(device)
        self._check_range(x)
        k = self.num_classes
        counts = torch.zeros(x.shape[0] * k, dtype=torch.long, device=device)
        gen = torch.Generator(device=device)
        pending: list[torch.Tensor] = []  # noisy chunks waiting for a forward pass
        owners: list[torch.Tensor] = []  # the image row of each of their samples
        pending_size = 0

        def run(noisy: torch.Tensor, owner: torch.Tensor) -> None:
            with autocast(device, self.precision):
                logits = self.base_classifier(noisy)
            if logits.ndim != 2 or logits.shape[1] != k:
                raise ValueError(f"base classifier returned {tuple(logits.shape)}, expected [B, {k}] logits")
            counts.add_(torch.bincount(owner * k + logits.argmax(dim=1), minlength=counts.numel()))

        def flush(final: bool) -> None:
            nonlocal pending, owners, pending_size
            noisy, owner = torch.cat(pending), torch.cat(owners)
            full = noisy.shape[0] if final else (noisy.shape[0] // batch_size) * batch_size
            for s in range(0, full, batch_size):
                run(noisy[s: min(s + batch_size, full)], owner[s: min(s + batch_size, full)])
            pending, owners = ([noisy[full:]], [owner[full:]]) if full < noisy.shape[0] else ([], [])
            pending_size = noisy.shape[0] - full

        for row, idx in enumerate(indices):
            for chunk, start in enumerate(range(0, num, CHUNK)):
                size = min(CHUNK, num - start)
                gen.manual_seed(chunk_seed(self.seed, int(idx), phase, chunk))
                eta = torch.randn((size, *x.shape[1:]), generator=gen, device=device, dtype=x.dtype)
                pending.append(x[row].unsqueeze(0) + eta * self.sigma)
                owners.append(torch.full((size,), row, device=device, dtype=torch.long))
                pending_size += size
                if pending_size >= batch_size:
                    flush(final=False)
        if pending_size:
            flush(final=True)
        return counts.view(x.shape[0], k)

    def _check_range(self, x: torch.Tensor) -> None:
        if not self._warned_range:
            lo, hi = float(x.min()), float(x.max())
            if lo < -1e-3 or hi > 1 + 1e-3:
                self._warned_range = True
                warnings.warn(f"images span [{lo:.3g}, {hi:.3g}], outside [0, 1]: sigma and radii are in [0, 1] "
                              "pixel units, so normalized inputs make them mean something else", stacklevel=3)
