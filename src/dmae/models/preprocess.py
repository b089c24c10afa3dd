"""The first layer of every dmae model: [0, 1] images in, normalized model inputs out.

Keeping channel expansion, resizing and mean/std normalization inside the model means that noise is
always added in native-resolution [0, 1] pixel space, so ``sigma`` and every certified radius mean the
same thing in pretraining, fine-tuning and certification (CIFAR-10 is noised at 32 px, then upsampled).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmae.errors import InputError


class InputAdapter(nn.Module):
    """Grey-to-RGB expansion (if needed), bicubic resize to ``img_size`` (if needed), then normalize.

    ``mean``/``std`` are non-persistent buffers: they follow ``.to(device)`` but are not state-dict keys,
    so official checkpoints (which do not store them) load with exactly their own keys.

    Raises:
        ValueError: (on construction) ``mean``/``std`` do not have ``in_chans`` values, or a std is not
            positive.
    """

    # buffers [1, C, 1, 1], registered in __init__ (declared here for the type checker: nn.Module's attribute
    # lookup would type them as Tensor | Module)
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, img_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != in_chans or len(std) != in_chans:
            raise InputError(f"mean/std need {in_chans} values (one per channel), got {list(mean)} / {list(std)}")
        if any(s <= 0 for s in std):
            raise InputError(f"std must be positive, got {list(std)}")
        self.img_size = int(img_size)
        self.in_chans = int(in_chans)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """Expand channels and resize ``[N, C, H, W]`` in [0, 1] pixel space (no normalization).

        A 1-channel input to a 3-channel model is repeated; a size other than ``img_size`` is resized
        bicubically (antialiased when shrinking) to ``[N, in_chans, img_size, img_size]``.

        Raises:
            ValueError: ``x`` is not 4-D, or its channel count is neither ``in_chans`` nor 1 for a
                3-channel model.
        """
        if x.ndim != 4:
            raise InputError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")
        c = x.shape[1]
        if c != self.in_chans:
            if c == 1 and self.in_chans == 3:
                x = x.expand(-1, 3, -1, -1)
            else:
                raise InputError(f"model takes {self.in_chans}-channel images, got {c} channels")
        if x.shape[-2:] != (self.img_size, self.img_size):
            down = x.shape[-1] > self.img_size
            x = F.interpolate(
                x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False, antialias=down
            )
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel, in ``x``'s dtype; ``x: [N, in_chans, H, W]`` in [0, 1]."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize`: back to [0, 1] pixel units (not clipped)."""
        return x * self.std.to(x.dtype) + self.mean.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images ``[N, C, H, W]`` -> normalized ``[N, in_chans, img_size, img_size]``.

        Raises:
            ValueError: as :meth:`resize`.
        """
        return self.normalize(self.resize(x))

    def extra_repr(self) -> str:
        """Size, channels and normalization, shown in the module's ``repr``."""
        mean, std = self.mean.flatten().tolist(), self.std.flatten().tolist()
        return f"img_size={self.img_size}, in_chans={self.in_chans}, mean={mean}, std={std}"
