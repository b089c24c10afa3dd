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

Guards before any sample is spent, because each mistake would give a wrong certificate without a word: images
must be floating point in [0, 1] (the pixel convention in which sigma and radii are measured; a uint8 or a
normalized tensor is refused, naming its dtype or range); alpha is a failure probability in (0, 1/2); a base
classifier left in training mode (BatchNorm statistics, dropout) is evaluated in eval mode and restored
afterwards, with a warning, so its parameters and buffers are bit-identical after certification; a classifier
that records the sigma it was trained at (``trained_sigma``) warns when smoothed at another.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from dmae.corrupt import check_sigma
from dmae.errors import InputError
from dmae.runtime import autocast, derive_seed, module_device, warn_user
from dmae.smoothing.bounds import (
    certified_radius,
    check_alpha,
    check_certify_budget,
    check_predict_budget,
    lower_confidence_bound,
    predict_pvalue,
)

CHUNK = 100  # noise samples per seeded draw; part of the reproducibility contract
PHASE_SELECT, PHASE_ESTIMATE, PHASE_PREDICT, PHASE_PROBE = 0, 1, 2, 3  # PROBE: the pre-flight accuracy probe
RANGE_TOLERANCE = 1e-3  # how far outside the input range a pixel may be (float error of a resize) before it is refused


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
        raise InputError(f"n0 must be an integer >= 1, got {n0!r}")
    if not isinstance(n, int) or n < 1:
        raise InputError(f"n must be an integer >= 1, got {n!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")


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
        input_range: the (low, high) pixel range images must lie in (default [0, 1], the pixel convention);
            ``None`` turns the check off (synthetic oracles whose "pixels" are not pixels).
    Raises:
        ValueError: sigma <= 0 or not finite, num_classes < 2, a bad input_range, or no device can be told.
    Warns:
        UserWarning: the base classifier records a training sigma (attribute ``trained_sigma``: a float, or a
            (low, high) range for a model trained at sigma ~ U[low, high]) that ``sigma`` does not match.
    """

    ABSTAIN = -1

    def __init__(
        self,
        base_classifier: nn.Module,
        num_classes: int,
        sigma: float,
        seed: int | None = None,
        precision: str = "auto",
        device: torch.device | str | None = None,
        input_range: tuple[float, float] | None = (0.0, 1.0),
    ) -> None:
        if check_sigma(sigma) <= 0:
            raise InputError(f"sigma must be > 0 to smooth a classifier, got {sigma!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = float(sigma)
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
        self.precision = precision
        # no silent fallback: a classifier without parameters or buffers needs an explicit device
        self.device = torch.device(device) if device is not None else module_device(base_classifier)
        if input_range is not None and not (len(input_range) == 2 and input_range[0] < input_range[1]):
            raise InputError(f"input_range must be (low, high) with low < high, or None; got {input_range!r}")
        self.input_range = None if input_range is None else (float(input_range[0]), float(input_range[1]))
        check_trained_sigma(base_classifier, self.sigma)
        self._calls = 0
        self._warned_train = False
        self._budgets_checked: set[tuple[Any, int, float]] = set()

    # ------------------------------------------------------------------ the published API, one image
    def certify(
        self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int, idx: int | None = None
    ) -> tuple[int, float]:
        """CERTIFY(x, n0, n, alpha): ``(class, radius)``, or ``(Smooth.ABSTAIN, 0.0)``.

        With probability at least ``1 - alpha`` over the noise, a returned class is g(x) and g is constant
        on the l2 ball of the returned radius around x. ``x``: one [0, 1] image ``[C, H, W]``.
        """
        cert = self.certify_batch(x.unsqueeze(0), [self._index(idx)], n0, n, alpha, batch_size)[0]
        return cert.prediction, cert.radius

    def certify_label(
        self, x: torch.Tensor, label: int, n: int, alpha: float, batch_size: int, idx: int | None = None
    ) -> tuple[int, float]:
        """CERTIFY with the candidate class fixed in advance to ``label``: ``(label, radius)`` when the lower bound
        on P(f(x + eta) = label) from ``n`` samples exceeds 1/2, else ``(Smooth.ABSTAIN, 0.0)``. With probability
        at least ``1 - alpha``, a returned label is g(x) and g is constant on the l2 ball of the returned radius
        (see :meth:`certify_label_batch`). ``x``: one [0, 1] image ``[C, H, W]``."""
        cert = self.certify_label_batch(x.unsqueeze(0), [self._index(idx)], [label], n, alpha, batch_size)[0]
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
    def certify_batch(
        self, images: torch.Tensor, indices: Sequence[int], n0: int, n: int, alpha: float, batch_size: int
    ) -> list[Certificate]:
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
        for c, k, b in zip(c_hat, n_a, bad, strict=True):
            p_lower = lower_confidence_bound(int(k), n, alpha)
            if b or p_lower < 0.5:
                out.append(Certificate(self.ABSTAIN, 0.0, int(k), p_lower, int(b)))
            else:
                out.append(Certificate(int(c), certified_radius(p_lower, self.sigma), int(k), p_lower))
        return out

    def certify_label_batch(
        self,
        images: torch.Tensor,
        indices: Sequence[int],
        labels: Sequence[int],
        n: int,
        alpha: float,
        batch_size: int,
    ) -> list[Certificate]:
        """CERTIFY without a selection step, for images ``[I, C, H, W]`` with known ``labels``: the candidate class
        of each image is its label, fixed before any sample is drawn, so the ``n`` estimation samples (the noise
        streams of CERTIFY's estimation phase) bound p_y = P(f(x + eta) = label) directly: one-sided
        Clopper-Pearson at ``alpha``. The label is returned with radius sigma * Phi^-1(p_y_lower) when
        p_y_lower > 1/2 (then p_y > 1/2 makes the label the smoothed class, and Theorem 1 of Cohen et al., ICML
        2019, with p_B <= 1 - p_y gives the radius), else the image abstains (not certified correct: it may be
        misclassified, or correct but not certifiable with these samples). Certified accuracy, without the n0
        samples and the wrong guesses of the selection step (docs/sequential.md, "The label as the candidate").

        Raises:
            ValueError: bad counts or alpha, labels not one per image or outside the classes, an image with a
                non-finite pixel, or logits of the wrong shape.
        """
        _check_counts(None, n, batch_size)
        check_alpha(alpha)
        if len(labels) != images.shape[0] or any(not 0 <= int(y) < self.num_classes for y in labels):
            raise InputError(
                f"labels must be one class in [0, {self.num_classes}) per image, got {list(labels)[:10]!r} "
                f"for {images.shape[0]} image(s)"
            )
        self._check_budget(check_certify_budget, n, alpha)
        estimate = self.sample_counts(images, indices, n, batch_size, PHASE_ESTIMATE)
        y = torch.tensor([int(v) for v in labels], dtype=torch.long, device=self.device)
        n_y = estimate.counts.gather(1, y.unsqueeze(1)).squeeze(1)
        n_y, bad = torch.stack([n_y, estimate.non_finite]).tolist()  # the one host read for this group
        out = []
        for label, k, b in zip(y.tolist(), n_y, bad, strict=True):
            p_lower = lower_confidence_bound(int(k), n, alpha)
            if b or not p_lower > 0.5:  # strict: p_y = 1/2 would not make the label the smoothed class
                out.append(Certificate(self.ABSTAIN, 0.0, int(k), p_lower, int(b)))
            else:
                out.append(Certificate(label, certified_radius(p_lower, self.sigma), int(k), p_lower))
        return out

    def predict_batch(
        self, images: torch.Tensor, indices: Sequence[int], n: int, alpha: float, batch_size: int
    ) -> list[Prediction]:
        """PREDICT for several images at once (see :meth:`certify_batch` for what it raises)."""
        _check_counts(None, n, batch_size)
        check_alpha(alpha)
        self._check_budget(check_predict_budget, n, alpha)
        votes = self.sample_counts(images, indices, n, batch_size, PHASE_PREDICT)
        top = torch.sort(votes.counts, dim=1, descending=True, stable=True)  # ties keep the lower class first
        vals, cls, bad = top.values[:, :2].tolist(), top.indices[:, :2].tolist(), votes.non_finite.tolist()
        out = []
        for (c1, c2), (k1, _), b in zip(vals, cls, bad, strict=True):
            p = predict_pvalue(int(c1), int(c2))
            out.append(Prediction(self.ABSTAIN if (b or p > alpha) else int(k1), p, int(b)))
        return out

    @torch.no_grad()
    def sample_counts(
        self, images: torch.Tensor, indices: Sequence[int], num: int, batch_size: int, phase: int = PHASE_ESTIMATE
    ) -> SampleCounts:
        """Votes of ``f(x_i + eta)`` over ``num`` noise draws per image ``[I, C, H, W]``, kept on the device.

        Chunks of ``CHUNK`` samples (the last one shorter) are generated from their own seeds and packed into
        forward batches of at most ``batch_size`` samples across images.

        Raises:
            ValueError: images not ``[I, C, H, W]``, a count of indices that differs, an image with a NaN or
                infinite pixel (named by its index), or logits not ``[B, num_classes]``.
        """
        if images.ndim != 4:
            raise InputError(f"expected images [I, C, H, W], got shape {tuple(images.shape)}")
        if len(indices) != images.shape[0]:
            raise InputError(f"{images.shape[0]} images but {len(indices)} indices")
        self._check_inputs(images, indices)
        x = images.to(self.device)
        k = self.num_classes
        counts = torch.zeros(x.shape[0] * (k + 1), dtype=torch.long, device=self.device)  # bin k: non-finite
        batches = _PackedBatches(batch_size)
        for row, idx in enumerate(indices):
            for chunk, start in enumerate(range(0, num, CHUNK)):
                batches.add(self.noisy_chunk(x[row], int(idx), phase, chunk, min(CHUNK, num - start)), row)
                for noisy, owner in batches.full():
                    counts.add_(self._votes(noisy, owner, counts.numel()))
        for noisy, owner in batches.rest():
            counts.add_(self._votes(noisy, owner, counts.numel()))
        counts = counts.view(x.shape[0], k + 1)
        return SampleCounts(counts[:, :k], counts[:, k])

    def noisy_chunk(self, x: torch.Tensor, idx: int, phase: int, chunk: int, size: int = CHUNK) -> torch.Tensor:
        """The first ``size`` noisy copies ``x + eta`` of chunk ``chunk`` of image ``idx``'s phase, ``[size, C, H, W]``
        for ``x`` ``[C, H, W]`` on the device. A pure function of (seed, idx, phase, chunk): the one place noise is
        drawn, for fixed-n and sequential CERTIFY alike (fixed-n draws a last, shorter chunk at its own size;
        sequential CERTIFY draws every chunk whole)."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(chunk_seed(self.seed, idx, phase, chunk))
        eta = torch.randn((size, *x.shape), generator=gen, device=self.device, dtype=x.dtype)
        return x.unsqueeze(0) + eta * self.sigma

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
        with self.evaluating(), autocast(self.device, self.precision):
            logits = self.base_classifier(noisy)
        if logits.ndim != 2 or logits.shape[1] != k:
            raise InputError(f"base classifier returned {tuple(logits.shape)}, expected [B, {k}] logits")
        return torch.where(torch.isfinite(logits).all(dim=1), logits.argmax(dim=1), k)

    def _check_budget(self, check: Any, n: int, alpha: float) -> None:
        """Warn once per (kind, n, alpha) when n samples can never give an answer at alpha, whatever the model."""
        if (check, n, alpha) not in self._budgets_checked:
            self._budgets_checked.add((check, n, alpha))
            check(n, alpha)

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """The base classifier in eval mode for the forward passes inside, every submodule's mode restored after.

        A module left in training mode would certify another function than the user's classifier (dropout
        active, BatchNorm normalizing by batch statistics, so one image's votes depend on the others in its
        batch) and would change the model (BatchNorm running statistics). Warns once per smoother.
        """
        if not isinstance(self.base_classifier, nn.Module):  # a plain function has no mode
            yield
            return
        check_row_independent(self.base_classifier)
        training = sorted({type(m).__name__ for m in self.base_classifier.modules() if m.training})
        if training and not self._warned_train:
            self._warned_train = True
            telling = [k for k in training if "Norm" in k or "Drop" in k]  # the usual layers that differ in eval mode
            names = (telling or training)[:4] + (["..."] if len(telling or training) > 4 else [])
            warn_user(
                f"the base classifier is in training mode ({', '.join(names)}): it is certified in eval "
                "mode and restored to training mode afterwards; call model.eval() before smoothing it"
            )
        with eval_mode(self.base_classifier):
            yield

    def _check_inputs(self, images: torch.Tensor, indices: Sequence[int]) -> None:
        """Refuse non-floating images, non-finite pixels and pixels outside ``input_range`` (default [0, 1]).
        Reads the images where they are: free for CPU images (the usual path), one host read per group for
        images already on an accelerator.

        Raises:
            ValueError: naming the dtype, or the image indices and the range their pixels span.
        """
        check_images(images, indices, self.input_range)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside, every submodule's own ``training`` flag restored after (also on an error)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, t in modes:  # set each flag itself: train(t) would also reset the children
            m.training = t


def check_images(
    images: torch.Tensor, indices: Sequence[int], input_range: tuple[float, float] | None = (0.0, 1.0)
) -> None:
    """Images ``[I, C, H, W]`` must be floating point, finite, and (unless ``input_range`` is None) within
    ``input_range`` up to :data:`RANGE_TOLERANCE`: sigma and every radius are in [0, 1] pixel units, so a uint8
    tensor (0-255) or a normalized one (mean 0, std 1) would certify radii that mean something else.

    Raises:
        ValueError: a non-floating dtype (named), NaN / infinite pixels, or pixels outside the range (the image
            indices and the range they span named).
    """
    if not torch.is_floating_point(images):
        hint = " (8-bit pixels: divide by 255, or use torchvision's ToTensor)" if images.dtype == torch.uint8 else ""
        raise InputError(
            f"images must be a floating-point tensor with pixels in [0, 1], got dtype {images.dtype}{hint}"
        )
    flat = images.flatten(1)
    finite = torch.isfinite(flat).all(dim=1)
    if input_range is None:
        inside = torch.ones_like(finite)
    else:
        lo, hi = input_range
        inside = ((flat >= lo - RANGE_TOLERANCE) & (flat <= hi + RANGE_TOLERANCE)).all(dim=1) | ~finite
    flags = torch.stack([finite, inside]).tolist()
    bad = [int(i) for i, ok in zip(indices, flags[0], strict=True) if not ok]
    if bad:
        raise InputError(f"image(s) {bad[:10]} have NaN or infinite pixels; nothing can be certified for them")
    outside = [int(i) for i, ok in zip(indices, flags[1], strict=True) if not ok]
    if outside:
        lo_seen, hi_seen = float(images.min()), float(images.max())
        raise InputError(
            f"image(s) {outside[:10]} have pixels in [{lo_seen:.4g}, {hi_seen:.4g}], outside "
            f"[{lo:g}, {hi:g}]: images must be [0, 1] pixels (ToTensor, no "
            "Normalize: the model's first layer normalizes), because sigma and every radius are "
            "measured in [0, 1] pixel units"
        )


def check_row_independent(model: nn.Module) -> None:
    """Refuse a base classifier whose answer for one input depends on the other inputs of its batch even in eval
    mode: BatchNorm without running statistics (``track_running_stats=False``) normalizes by each batch's own.
    CERTIFY's bound needs independent votes, one per noisy sample, and rows that do not depend on ``batch_size``.

    Raises:
        ValueError: naming the module.
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            raise InputError(
                f"module {name or type(m).__name__} ({type(m).__name__}, track_running_stats=False) "
                "normalizes every batch by its own statistics, even in eval mode: one noisy sample's "
                "class would depend on the others in its batch, and the certificate's bound (independent "
                "votes) would not hold; give it running statistics (e.g. estimate them on training data "
                "with track_running_stats=True) before smoothing it"
            )


def check_trained_sigma(model: nn.Module, sigma: float) -> None:
    """Warn when ``model`` records the noise level it was trained at (attribute ``trained_sigma``: a float, or a
    (low, high) range) and ``sigma`` is another: a classifier smoothed at a sigma it never saw is usually near
    chance under that noise, and its certificates, though valid, say little about it."""
    trained = getattr(model, "trained_sigma", None)
    if trained is None:
        return
    if isinstance(trained, (tuple, list)):
        lo, hi = (float(v) for v in trained)
        if not lo - 1e-9 <= sigma <= hi + 1e-9:
            warn_user(
                f"sigma {sigma:g} is outside the range U[{lo:g}, {hi:g}] the classifier was trained at; "
                "certify at a sigma in that range"
            )
    elif abs(float(trained) - sigma) > 1e-9:
        warn_user(
            f"sigma {sigma:g} is not the sigma the classifier was trained at ({float(trained):g}); its "
            f"accuracy under this noise may be near chance: certify at sigma {float(trained):g}"
        )


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
        out = [(noisy[s : min(s + b, full)], owner[s : min(s + b, full)]) for s in range(0, full, b)]
        keep = full < noisy.shape[0]
        self.noisy, self.owners = ([noisy[full:]], [owner[full:]]) if keep else ([], [])
        self.size = noisy.shape[0] - full
        return out
