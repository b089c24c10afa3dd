"""The pre-flight accuracy probe: one look at the base classifier on a few labelled images before any sample of
a certification is spent.

A certificate is valid whatever the classifier, so a classifier fed the wrong input layer (images normalized
twice, or not at all), certified at a sigma it never saw, or given the wrong labels still gets certificates,
only worthless ones, and a run of 10^5 samples per image finds out hours later. Two forward passes per probe
image tell it at once: the clean accuracy of ``f(x)`` (is the input layer right?) and the accuracy of
``f(x + eta)`` under one draw of the certification noise (is sigma right?). Both are printed as the run's
first line and recorded in the log's JSON, with a warning when either is near chance (1/C) or when the noise
takes more than half of the clean accuracy away.

The noise of image ``idx`` is its own seeded stream (phase :data:`~dmae.smoothing.core.PHASE_PROBE`), drawn by
the smoother itself (so a sound smoother probes with its own noise); no certification sample is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from dmae.errors import InputError
from dmae.smoothing.core import PHASE_PROBE, Smooth

PROBE_IMAGES = 100  # images of the probe: a few seconds on a CPU, a standard error of at most 5 points
MIN_JUDGED = 20  # fewer probe images are reported, not judged


@dataclass(frozen=True)
class Probe:
    """The probe's result: accuracies in [0, 1] of ``f`` on ``images`` clean and under one noise draw at ``sigma``.

    ``chance`` is 1 / num_classes. :meth:`concerns` lists what looks wrong, in words a user can act on.
    """

    images: int
    num_classes: int
    sigma: float
    clean_accuracy: float
    noisy_accuracy: float

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes

    def near_chance(self, accuracy: float) -> bool:
        """At most twice chance, and never more than 15 points above it (so two-class problems are judged by
        60-65%, not 100%): a classifier this weak on its own images is almost always misconfigured."""
        return accuracy <= min(2 * self.chance, self.chance + 0.15)

    def concerns(self) -> list[str]:
        """What looks wrong: each a sentence naming the number and the setting to check (none from fewer than
        :data:`MIN_JUDGED` images, too few to tell a weak classifier from a misconfigured one)."""
        out: list[str] = []
        if self.images < MIN_JUDGED:
            return out
        clean, noisy = self.clean_accuracy, self.noisy_accuracy
        if self.near_chance(clean):
            out.append(
                f"the base classifier's clean accuracy on {self.images} images is {clean:.1%}, near chance "
                f"({self.chance:.1%}): check its input layer (images are [0, 1] pixels; the model must "
                "normalize them itself: --input-mean / --input-std), the channel order and the labels"
            )
        elif self.near_chance(noisy):
            out.append(
                f"the base classifier's accuracy under noise sigma={self.sigma:g} is {noisy:.1%}, near chance "
                f"({self.chance:.1%}; clean {clean:.1%}): was it trained at this sigma, and with this input "
                "layer (--input-mean / --input-std)? Certify at its training sigma"
            )
        elif noisy < clean / 2:
            out.append(
                f"noise sigma={self.sigma:g} takes the accuracy from {clean:.1%} (clean) to {noisy:.1%}: "
                "was the classifier trained at this sigma, and with this input layer (--input-mean / "
                "--input-std)?"
            )
        return out

    def text(self) -> str:
        """One line: ``probe (100 images, sigma 0.25): clean accuracy 87.0%, under noise 85.0% (chance 10.0%)``."""
        images = f"{self.images} image{'s' if self.images != 1 else ''}"
        return (
            f"probe ({images}, sigma {self.sigma:g}): clean accuracy {self.clean_accuracy:.1%}, "
            f"under noise {self.noisy_accuracy:.1%} (chance {self.chance:.1%})"
        )

    def to_dict(self) -> dict[str, float | int]:
        """What the log's JSON records under ``probe``."""
        return {**asdict(self), "chance": self.chance}


@torch.no_grad()
def accuracy_probe(
    smooth: Smooth, images: torch.Tensor, indices: Sequence[int], labels: Sequence[int], batch_size: int = 1000
) -> Probe:
    """Clean and noisy top-1 accuracy of ``smooth``'s base classifier on ``images [I, C, H, W]`` ([0, 1] pixels)
    with their ``labels``; the noise of image ``indices[i]`` is one draw of its own probe stream, so the probe is
    reproducible from the smoother's seed and touches no certification sample. Logits that are NaN or infinite
    count as wrong. The classifier runs in eval mode (see :meth:`Smooth.evaluating`).

    Raises:
        ValueError: no images, ``indices`` / ``labels`` of another length, a label outside [0, num_classes),
            what :meth:`Smooth.classify` raises, or images that :func:`~dmae.smoothing.core.check_images` refuses.
    """
    if images.shape[0] == 0 or len(indices) != images.shape[0] or len(labels) != images.shape[0]:
        raise InputError(
            f"the probe needs images with one index and one label each, got {images.shape[0]} images, "
            f"{len(indices)} indices and {len(labels)} labels"
        )
    outside = [(int(i), int(y)) for i, y in zip(indices, labels, strict=True) if not 0 <= int(y) < smooth.num_classes]
    if outside:  # no class could ever be counted right: certified accuracy 0 whatever the classifier
        raise InputError(
            f"label(s) outside the classifier's {smooth.num_classes} classes (image, label): {outside[:5]}"
        )
    smooth._check_inputs(images, indices)
    x = images.to(smooth.device)
    y = torch.as_tensor(list(labels), device=smooth.device)
    noisy = torch.cat([smooth.noisy_chunk(x[r], int(i), PHASE_PROBE, 0, 1) for r, i in enumerate(indices)])
    right = torch.zeros(2, dtype=torch.long, device=smooth.device)
    for start in range(0, x.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        right[0] += (smooth.classify(x[sl]) == y[sl]).sum()
        right[1] += (smooth.classify(noisy[sl]) == y[sl]).sum()
    clean, under_noise = right.tolist()
    m = x.shape[0]
    return Probe(m, smooth.num_classes, smooth.sigma, clean / m, under_noise / m)


__all__ = ["PROBE_IMAGES", "Probe", "accuracy_probe"]
