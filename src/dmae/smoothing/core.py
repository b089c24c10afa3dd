"""The smoothed classifier ``g(x) = argmax_c P(f(x + eta) = c)``, eta ~ N(0, sigma^2 I) in [0, 1] pixel space.

CERTIFY and PREDICT are those of Cohen, Rosenfeld & Kolter (ICML 2019, Algorithm "certify" / "predict",
reference ``core.py``) and read like the published pseudocode; what differs is how the samples are counted:

- noise is drawn on the model's device, in fixed chunks of ``CHUNK`` samples, each from a generator seeded
  by (seed, image index, phase, chunk). So the samples an image sees depend only on the seed and its index,
  never on the batch size, on which rank certifies it, or on where a run was resumed;
- several images are packed into one forward batch when ``n`` is smaller than the batch;
- class counts accumulate on the device (``bincount``), and the host reads them once per group of images;
- selection (n0) and estimation (n) samples are both counted before that single read: the estimation
  counts do not depend on the selected class, so no intermediate round-trip is needed;
- bf16 autocast on GPUs (``precision='auto'``).

Never certify what was not computed: a noisy sample whose logits are NaN or infinite is no vote for any class
(``argmax`` would call it class 0); an image with any such sample abstains, and the count is reported
(``non_finite``). An input image with a NaN or infinite pixel is an error naming its index.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from dmae.corrupt import check_sigma
from dmae.runtime import autocast, derive_seed, module_device
from dmae.smoothing.bounds import (certified_radius, check_alpha, check_certify_budget, check_predict_budget,
                                   lower_confidence_bound, predict_pvalue)

CHUNK = 100  # noise samples per seeded draw; part of the reproducibility contract
PHASE_SELECT, PHASE_ESTIMATE, PHASE_PREDICT = 0, 1, 2
RANGE_TOLERANCE = 1e-3  # how far outside [0, 1] a pixel may be before the range warning


def chunk_seed(seed: int, idx: int, phase: int, chunk: int) -> int:
    """The seed of one chunk of noise samples of one image (a pure function of its arguments)."""
    return derive_seed(seed, idx, phase, chunk)


class Certificate(NamedTuple):
    """CERTIFY's answer for one image: the class (``Smooth.ABSTAIN`` = -1) and the certified l2 radius
    (0.0 on abstain), with the counts behind it; ``non_finite`` > 0 says the image abstained because that
    many noisy samples gave NaN or infinite logits."""

    prediction: int
    radius: float
    n_a: int
    p_a_lower: float
    non_finite: int = 0


class Prediction(NamedTuple):
    """PREDICT's answer for one image: the class or ``Smooth.ABSTAIN``, the binomial test's p-value, and the
    number of noisy samples with non-finite logits (an image with any abstains)."""

    prediction: int
    pvalue: float
    non_finite: int = 0


class SampleCounts(NamedTuple):
    """Votes of the base classifier over noisy samples, on the device: ``counts [I, K]`` of samples whose
    logits are finite, and ``non_finite [I]``, the samples whose logits are not (votes for no class)."""

    counts: torch.Tensor
    non_finite: torch.Tensor


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
        device: where noise is drawn and the classifier runs; default: the classifier's own device.
    Raises:
        ValueError: sigma <= 0 or not finite, num_classes < 2, or no device can be told.
    """

    ABSTAIN = -1

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float, seed: int | None = None,
                 precision: str = "auto", device: torch.device | str | None = None) -> None:
        if check_sigma(sigma) <= 0:
            raise ValueError(f"sigma must be > 0 to smooth a classifier, got {sigma!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = float(sigma)
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
        self.precision = precision
        # no silent fallback: a classifier without parameters or buffers needs an explicit device
        self.device = torch.device(device) if device is not None else module_device(base_classifier)
        self._calls = 0
        self._warned_range = False
        self._budgets_checked: set[tuple[Any, int, float]] = set()

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
        """CERTIFY for several images ``[I, C, H, W]`` at once; ``indices`` name their noise streams.

        Raises:
            ValueError: bad counts or alpha, an image with a non-finite pixel, or logits of the wrong shape.
        """
        _check_counts(n0, n, batch_size)
        check_alpha(alpha)
        self._check_budget(check_certify_budget, n, alpha)
        select = self.sample_counts(images, indices, n0, batch_size, PHASE_SELECT)
        estimate = self.sample_counts(images, indices, n, batch_size, PHASE_ESTIMATE)
        c_hat = select.counts.argmax(dim=1)  # first of the top counts
        n_a = estimate.counts.gather(1, c_hat.unsqueeze(1)).squeeze(1)
        bad = select.non_finite + estimate.non_finite
        c_hat, n_a, bad = torch.stack([c_hat, n_a, bad]).tolist()  # the one host read for this group
        out = []
        for c, k, b in zip(c_hat, n_a, bad):
            p_lower = lower_confidence_bound(int(k), n, alpha)
            if b or p_lower < 0.5:
                out.append(Certificate(self.ABSTAIN, 0.0, int(k), p_lower, int(b)))
            else:
                out.append(Certificate(int(c), certified_radius(p_lower, self.sigma), int(k), p_lower))
        return out

    def predict_batch(self, images: torch.Tensor, indices: Sequence[int], n: int, alpha: float,
                      batch_size: int) -> list[Prediction]:
        """PREDICT for several images at once (see :meth:`certify_batch` for what it raises)."""
        _check_counts(None, n, batch_size)
        check_alpha(alpha)
        self._check_budget(check_predict_budget, n, alpha)
        votes = self.sample_counts(images, indices, n, batch_size, PHASE_PREDICT)
        top = torch.sort(votes.counts, dim=1, descending=True, stable=True)  # ties keep the lower class first
        vals, cls, bad = top.values[:, :2].tolist(), top.indices[:, :2].tolist(), votes.non_finite.tolist()
        out = []
        for (c1, c2), (k1, _), b in zip(vals, cls, bad):
            p = predict_pvalue(int(c1), int(c2))
            out.append(Prediction(self.ABSTAIN if (b or p > alpha) else int(k1), p, int(b)))
        return out

    @torch.no_grad()
    def sample_counts(self, images: torch.Tensor, indices: Sequence[int], num: int, batch_size: int,
                      phase: int = PHASE_ESTIMATE) -> SampleCounts:
        """Votes of ``f(x_i + eta)`` over ``num`` noise draws per image ``[I, C, H, W]``, kept on the device.

        Chunks of ``CHUNK`` samples (the last one shorter) are generated from their own seeds and packed into
        forward batches of at most ``batch_size`` samples across images.

        Raises:
            ValueError: images not ``[I, C, H, W]``, a count of indices that differs, an image with a NaN or
                infinite pixel (named by its index), or logits not ``[B, num_classes]``.
        """
        if images.ndim != 4:
            raise ValueError(f"expected images [I, C, H, W], got shape {tuple(images.shape)}")
        if len(indices) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(indices)} indices")
        self._check_inputs(images, indices)
        x = images.to(self.device)
        k = self.num_classes
        counts = torch.zeros(x.shape[0] * (k + 1), dtype=torch.long, device=self.device)  # bin k: non-finite
        batches = _PackedBatches(batch_size)
        gen = torch.Generator(device=self.device)
        for row, idx in enumerate(indices):
            for chunk, start in enumerate(range(0, num, CHUNK)):
                size = min(CHUNK, num - start)
                gen.manual_seed(chunk_seed(self.seed, int(idx), phase, chunk))
                eta = torch.randn((size, *x.shape[1:]), generator=gen, device=self.device, dtype=x.dtype)
                batches.add(x[row].unsqueeze(0) + eta * self.sigma, row)
                for noisy, owner in batches.full():
                    counts.add_(self._votes(noisy, owner, counts.numel()))
        for noisy, owner in batches.rest():
            counts.add_(self._votes(noisy, owner, counts.numel()))
        counts = counts.view(x.shape[0], k + 1)
        return SampleCounts(counts[:, :k], counts[:, k])

    def _votes(self, noisy: torch.Tensor, owner: torch.Tensor, size: int) -> torch.Tensor:
        """Bincount of (image row, class) over one forward batch; non-finite logits vote in bin ``k``."""
        return torch.bincount(owner * (self.num_classes + 1) + self.classify(noisy), minlength=size)

    @torch.no_grad()
    def classify(self, noisy: torch.Tensor) -> torch.Tensor:
        """The base classifier's class of every noisy sample ``[B, C, H, W]`` -> ``[B]`` on the device;
        ``num_classes`` (no class) where the logits are NaN or infinite (argmax would call them class 0).

        Raises:
            ValueError: logits not ``[B, num_classes]``.
        """
        k = self.num_classes
        with autocast(self.device, self.precision):
            logits = self.base_classifier(noisy)
        if logits.ndim != 2 or logits.shape[1] != k:
            raise ValueError(f"base classifier returned {tuple(logits.shape)}, expected [B, {k}] logits")
        return torch.where(torch.isfinite(logits).all(dim=1), logits.argmax(dim=1), k)

    def _check_budget(self, check: Any, n: int, alpha: float) -> None:
        """Warn once per (kind, n, alpha) when n samples can never give an answer at alpha, whatever the model."""
        if (check, n, alpha) not in self._budgets_checked:
            self._budgets_checked.add((check, n, alpha))
            check(n, alpha)

    def _check_inputs(self, images: torch.Tensor, indices: Sequence[int]) -> None:
        """Refuse non-finite pixels; warn once about pixels outside [0, 1]. Reads the images where they are:
        free for CPU images (the usual path), one host read per group for images already on an accelerator."""
        finite = torch.isfinite(images.flatten(1)).all(dim=1)
        out_of_range = ((images < -RANGE_TOLERANCE) | (images > 1 + RANGE_TOLERANCE)).any()
        flags = torch.cat([finite, out_of_range.view(1)]).tolist()
        bad = [int(i) for i, ok in zip(indices, flags[:-1]) if not ok]
        if bad:
            raise ValueError(f"image(s) {bad[:10]} have NaN or infinite pixels; nothing can be certified for them")
        if flags[-1] and not self._warned_range:
            self._warned_range = True
            lo, hi = float(images.min()), float(images.max())
            warnings.warn(f"images span [{lo:.3g}, {hi:.3g}], outside [0, 1]: sigma and radii are in [0, 1] "
                          "pixel units, so normalized inputs make them mean something else", stacklevel=4)


class _PackedBatches:
    """Noisy chunks waiting for a forward pass, cut into batches of exactly ``batch_size`` samples
    (the last one shorter), whatever the chunk and image boundaries."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.noisy: list[torch.Tensor] = []
        self.owners: list[torch.Tensor] = []
        self.size = 0

    def add(self, noisy: torch.Tensor, row: int) -> None:
        self.noisy.append(noisy)
        self.owners.append(torch.full((noisy.shape[0],), row, device=noisy.device, dtype=torch.long))
        self.size += noisy.shape[0]

    def full(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The whole batches available now; the remainder keeps waiting."""
        return self._cut(final=False) if self.size >= self.batch_size else []

    def rest(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Everything left, the last batch shorter."""
        return self._cut(final=True) if self.size else []

    def _cut(self, final: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        noisy, owner = torch.cat(self.noisy), torch.cat(self.owners)
        b = self.batch_size
        full = noisy.shape[0] if final else (noisy.shape[0] // b) * b
        out = [(noisy[s: min(s + b, full)], owner[s: min(s + b, full)]) for s in range(0, full, b)]
        keep = full < noisy.shape[0]
        self.noisy, self.owners = ([noisy[full:]], [owner[full:]]) if keep else ([], [])
        self.size = noisy.shape[0] - full
        return out
