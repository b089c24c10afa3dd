"""What every flow needs from the hardware and from randomness: the device, mixed precision, seeds.

Training (``engine``) and certification (``smoothing``, ``certify``) both use this module, so neither
depends on the other. Nothing here falls back silently: an unavailable device or a module whose device
cannot be told is an error naming what was asked for.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from types import FrameType

import torch
from torch import nn

from dmae.errors import InputError, PlatformError, worded

_MASK64 = (1 << 64) - 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """The device of ``--device``: ``'auto'`` is this process's GPU when there is one, else the CPU.

    A ``'cuda'`` without an index becomes ``cuda:<local_rank>``, so each torchrun process takes its own GPU.

    Raises:
        RuntimeError: a CUDA device was asked for and PyTorch sees none, or ``preference`` is not a device
            string ``torch.device`` accepts.
    """
    if preference == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(preference)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PlatformError(f"--device {preference!r} asked for, but PyTorch sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer).

    Raises:
        ValueError: the module has neither, so its device cannot be told (pass one explicitly).
    """
    for t in module.parameters():
        return t.device
    for b in module.buffers():
        return b.device
    raise InputError(f"{type(module).__name__} has no parameters or buffers to tell its device; pass device=")


def use_bf16(device: torch.device, precision: str) -> bool:
    """Whether ``precision`` means bf16 autocast on ``device``: ``'bf16'``, or ``'auto'`` on a GPU.

    Raises:
        ValueError: ``precision`` is not ``'auto'``, ``'bf16'`` or ``'fp32'``.
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise InputError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision='bf16'``, or ``'auto'`` on a GPU; nothing otherwise (fp32 on CPUs).

    Raises:
        ValueError: ``precision`` is not ``'auto'``, ``'bf16'`` or ``'fp32'`` (from :func:`use_bf16`).
    """
    return (
        torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(device, precision) else contextlib.nullcontext()
    )


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit value from an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *keys: int) -> int:
    """The seed of one random stream, a pure function of the run's ``seed`` and the stream's integer ``keys``.

    Every seeded draw in dmae goes through here (training noise and masks per (step, rank), augmentation per
    (epoch, image), certification noise per (image, phase, chunk)), each use with its own leading key, so
    streams never collide and a result never depends on batch size, worker count, sharding or resumption.
    A splitmix64 chain (Steele, Lea & Flood, OOPSLA 2014): each key is folded in and re-mixed. Returns a non-negative
    63-bit integer, a valid ``torch.Generator.manual_seed`` argument.
    """
    h = _mix64(seed & _MASK64)
    for k in keys:
        h = _mix64(h ^ (k & _MASK64))
    return h & ((1 << 63) - 1)


class DmaeWarning(UserWarning):
    """A mistake dmae caught before it would give a wrong answer (the CLI prints these like its errors); worded in
    the terms of the Python call when made inside one (:func:`dmae.errors.python_terms`)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*worded(args))


def warn_user(message: str) -> None:
    """``warnings.warn`` attributed to the first caller outside dmae, torch and contextlib (the user's line),
    however deep inside the library the mistake is noticed."""
    inside = (str(Path(__file__).parent), str(Path(torch.__file__).parent), contextlib.__file__)
    level = 1
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, DmaeWarning, stacklevel=level + 1)
