"""Base classifiers from elsewhere: a timm or torchvision architecture by name plus a weights file.

Randomized smoothing certifies any base classifier, so a network trained outside dmae (a timm or torchvision
ResNet, ViT, ...) can be certified as it is. What such a file does not say is its input layer: dmae's pixel
convention (noise in native-resolution [0, 1] space, then resize, then normalize) is kept by putting dmae's own
:class:`~dmae.models.preprocess.InputAdapter` in front of the network, configured from options (input size,
channels, mean/std), so ``sigma`` and every radius mean the same as for dmae's own classifiers.

Weights are read without executing code from the file (safetensors, or ``torch.load(weights_only=True)`` via
:func:`dmae.checkpoint.safe_load`) and loaded strictly: a file that does not fit the named architecture, has a
head for another class count, or holds NaN / infinite values is refused with the offending names.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmae.checkpoint import CheckpointError, extract_state_dict, safe_load
from dmae.errors import InputError, MissingFileError
from dmae.models.preprocess import InputAdapter

MODEL_SOURCES = ("timm", "torchvision")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# What torchvision's reference training scripts (and timm's default) normalize ImageNet inputs with.
_SHOWN = 4  # keys named per kind of mismatch in an error message


def parse_model_name(spec: str) -> tuple[str, str]:
    """``'timm:resnet18'`` -> ``('timm', 'resnet18')``; ``'torchvision:resnet18'`` -> ``('torchvision', 'resnet18')``;
    ``'mypackage.models:SmallCNN'`` or ``'models.py:SmallCNN'`` -> ``('python', spec)`` (the user's own code).

    A bare name means timm. The source prefix is case-insensitive; the name is kept as given (timm accepts
    pretrained tags such as ``resnet18.a1_in1k``; the tag only matters for downloads, which dmae never does).

    Raises:
        ValueError: an unknown source prefix or an empty name, naming ``spec``.
    """
    text = spec.strip()
    source, sep, name = text.partition(":")
    if not sep:
        source, name = "timm", text
    if sep and source.strip().lower() not in MODEL_SOURCES and (source.endswith(".py") or _DOTTED.match(source)):
        if not _DOTTED.match(name.strip()):
            raise InputError(
                f"model {spec!r}: after the module or file comes the name of a class or function in it, "
                "e.g. 'mypackage.models:SmallCNN' or 'models.py:SmallCNN'"
            )
        return "python", text  # an architecture of the user's own code
    source, name = source.strip().lower(), name.strip()
    if source not in MODEL_SOURCES:
        raise InputError(
            f"model {spec!r}: unknown source {source!r} (use one of {', '.join(MODEL_SOURCES)}, "
            "e.g. 'timm:resnet18' or 'torchvision:resnet18'; a bare name means timm)"
        )
    if not name:
        raise InputError(f"model {spec!r}: no architecture name after the source (e.g. '{source}:resnet18')")
    return source, name


def _input_adapter(img_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float]) -> InputAdapter:
    """dmae's input layer, a single mean / std value standing for every channel (as timm's data config does).

    Raises:
        ValueError: bad size / channels, or mean / std rejected by InputAdapter, with the option names.
    """
    if int(img_size) < 1 or int(in_chans) < 1:
        raise InputError(f"input size {img_size} and channels {in_chans} must be positive")
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    mean, std = (mean * in_chans if len(mean) == 1 else mean), (std * in_chans if len(std) == 1 else std)
    try:
        return InputAdapter(img_size, in_chans, mean, std)
    except ValueError as e:
        raise InputError(f"--input-mean {mean} / --input-std {std}: {e}") from None


class ExternalClassifier(nn.Module):
    """A base classifier from timm or torchvision behind dmae's input layer.

    ``forward``: [0, 1] images ``[N, C, H, W]`` (C = ``in_chans``, or 1 for a 3-channel network: repeated; any
    H = W: resized bicubically to ``img_size``) -> logits ``[N, num_classes]``. The input layer is
    ``preprocess`` (an :class:`~dmae.models.preprocess.InputAdapter`, no parameters, mean/std as non-persistent
    buffers), so ``net.state_dict()`` is exactly the weights file's and noise stays in [0, 1] pixel units.

    Attributes:
        preprocess, net, img_size, in_chans (channels the network takes), num_classes, source ('timm' or
        'torchvision'), name (the architecture name).

    Raises:
        ValueError: (on construction) mean / std rejected, naming ``--input-mean`` / ``--input-std``.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        source: str,
        name: str,
        num_classes: int,
        img_size: int,
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.preprocess = _input_adapter(img_size, in_chans, mean, std)
        self.net = net
        self.img_size, self.in_chans, self.num_classes = int(img_size), int(in_chans), int(num_classes)
        self.source, self.name = source, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images ``[N, C, H, W]`` -> logits ``[N, num_classes]``.

        Raises:
            ValueError: ``x`` is not 4-D or has a channel count the input layer cannot map (see InputAdapter).
        """
        return self.net(self.preprocess(x))

    def extra_repr(self) -> str:
        """Source, architecture and class count, shown in the module's ``repr``."""
        return f"source={self.source}, name={self.name}, num_classes={self.num_classes}"


def _unknown_name(source: str, name: str, known: Sequence[str]) -> InputError:
    """The error for an architecture the library lacks, listing up to 8 close names (spelling, then substring)."""
    close = difflib.get_close_matches(name, known, n=8, cutoff=0.6)
    stem = re.match(r"[A-Za-z_]+", name)
    if stem and len(close) < 8:  # e.g. 'resnet' for 'resnet18x': same family, whatever the suffix
        close += [k for k in known if stem.group(0).rstrip("_").lower() in k.lower() and k not in close]
    hint = f"close names: {', '.join(close[:8])}" if close else f"see {source}'s list_models()"
    return InputError(f"unknown {source} architecture {name!r} ({hint})")


def _create(source: str, name: str, num_classes: int, img_size: int, in_chans: int) -> nn.Module:
    """The named architecture, randomly initialised, nothing downloaded.

    timm: ``timm.create_model(name, pretrained=False, num_classes=, in_chans=, img_size=)``; torchvision:
    ``torchvision.models.get_model(name, weights=None, num_classes=, image_size=)``. The size is passed because
    ViTs fix their position grid at construction; architectures that take no size are built without it.

    Raises:
        ValueError: an unknown name, with close names.
    """
    if source == "python":
        return _create_python(name, num_classes, img_size, in_chans)
    if source == "timm":
        import timm

        if not timm.is_model(name):
            raise _unknown_name("timm", name, timm.list_models())
        build, size_kw = timm.create_model, "img_size"
        kw: dict[str, Any] = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans)
    else:
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)  # classification models only
        if name not in known:
            raise _unknown_name("torchvision", name, known)
        build, size_kw = torchvision.models.get_model, "image_size"
        kw = dict(weights=None, num_classes=num_classes)
    try:
        return build(name, **{**kw, size_kw: img_size})
    except TypeError as e:
        if size_kw not in str(e):
            raise
        return build(name, **kw)  # a size-agnostic network (CNNs): its constructor takes no size


def _create_python(spec: str, num_classes: int, img_size: int, in_chans: int) -> nn.Module:
    """``module.path:factory`` or ``file.py:factory``: the user's own architecture, built by calling the class or
    function with whichever of ``num_classes``, ``in_chans``, ``img_size`` it takes. This imports (runs) the named
    module, the user's own code, as ``import`` would; the weights still come from ``--checkpoint`` with no code.

    Raises:
        ValueError: the module or file cannot be imported, has no such name, or the factory returns no module.
    """
    import importlib
    import importlib.util
    import inspect

    where, _, attr = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            file = Path(where).resolve()
            loaded = importlib.util.spec_from_file_location(file.stem, file)
            if loaded is None or loaded.loader is None or not file.is_file():
                raise MissingFileError(f"no such file {file}")
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except (ImportError, FileNotFoundError, SyntaxError) as e:
        raise InputError(f"--model {spec}: cannot import {where}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"--model {spec}: {where} has no class or function {attr!r}")
    offered = {"num_classes": num_classes, "in_chans": in_chans, "img_size": img_size}
    params = inspect.signature(factory).parameters
    net = factory(**{k: v for k, v in offered.items() if k in params})
    if not isinstance(net, nn.Module):
        raise InputError(f"--model {spec}: {attr}(...) returned {type(net).__name__}, not an nn.Module")
    return net


def read_external_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a weights file: ``.safetensors`` via ``safetensors.torch.load_file``, anything else via
    :func:`dmae.checkpoint.safe_load` (``torch.load(weights_only=True)``: no code from the file runs) and
    :func:`dmae.checkpoint.extract_state_dict` (``obj['model']`` / ``obj['state_dict']`` / ``obj``). A leading
    ``module.`` (saved from DataParallel / DDP) is stripped.

    Raises:
        CheckpointError: the file is missing, unreadable, unsafe, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a weights file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"weights file {path} {what}")
    if path.suffix != ".safetensors":
        return extract_state_dict(safe_load(path), path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    return extract_state_dict(sd, path)


def _head_keys(net: nn.Module, num_classes: int) -> list[str]:
    """State-dict keys of the classifier head: the last module whose weight has ``num_classes`` outputs."""
    head = [
        n
        for n, m in net.named_modules()
        if isinstance(w := getattr(m, "weight", None), torch.Tensor) and w.ndim >= 1 and w.shape[0] == num_classes
    ]
    if not head:
        return []
    prefix = f"{head[-1]}." if head[-1] else ""
    return [k for k in net.state_dict() if k.startswith(prefix) and "." not in k[len(prefix) :]]


def _check_fit(net: nn.Module, sd: Mapping[str, torch.Tensor], path: Path, spec: str, num_classes: int) -> None:
    """Refuse a state dict that a strict load would reject or that holds non-finite values, naming the keys.

    Raises:
        CheckpointError: missing / unexpected keys, a head for another class count, other shape mismatches
            (with a hint for channels or input size), or NaN / infinite floating tensors.
    """
    own = net.state_dict()
    # BatchNorm fills in a missing step counter itself (files from before PyTorch 0.4.1 lack it)
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit {spec}: {len(missing)} missing keys {missing[:_SHOWN]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:_SHOWN]} "
            "(weights of another architecture?)"
        )
    wrong = {k: (tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if k in sd and sd[k].shape != v.shape}
    head = [k for k in _head_keys(net, num_classes) if k in wrong]
    if head:
        file_classes = wrong[head[0]][0][0] if wrong[head[0]][0] else "?"
        raise CheckpointError(
            f"{path} classifies {file_classes} classes ({head[0]} has shape {wrong[head[0]][0]}), "
            f"the data set has {num_classes}"
        )
    if wrong:
        k, (theirs, ours) = next(iter(wrong.items()))
        hint = ""
        if len(theirs) == 4 and theirs[0] == ours[0] and theirs[1] != ours[1]:
            hint = f" (the file's network takes {theirs[1]}-channel inputs, this one {ours[1]})"
        elif "pos" in k:
            hint = " (the file's network was made for another input size)"
        listed = ", ".join(f"{n}: {a} in the file, {b} in the model" for n, (a, b) in list(wrong.items())[:_SHOWN])
        raise CheckpointError(f"{path} does not fit {spec}: {len(wrong)} shapes differ [{listed}]{hint}")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} tensors hold NaN or infinite values {bad[:8]} (a diverged run?); "
            "nothing certified with them could be trusted"
        )


def build_external_classifier(
    spec: str,
    weights: str | os.PathLike,
    num_classes: int,
    *,
    img_size: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[ExternalClassifier, str]:
    """A timm / torchvision base classifier with the weights of a file, behind dmae's input layer, in eval mode.

    Args:
        spec: ``'timm:NAME'``, ``'torchvision:NAME'`` or a bare timm name (see :func:`parse_model_name`).
        weights: a ``.safetensors`` file or a PyTorch file (a state dict, or one under ``'model'`` /
            ``'state_dict'``; ``module.`` prefixes are stripped). Built with ``num_classes`` outputs and loaded
            strictly (``load_state_dict(strict=True)``).
        img_size: the network's input side in pixels; inputs of other sizes are resized bicubically after noise.
        in_chans: channels the network takes (timm: passed to ``create_model``). torchvision networks take 3:
            ``in_chans=1`` builds them with 3, and 1-channel images are repeated by the input layer.
        mean / std: per-channel normalization in [0, 1] pixel units, one value per channel or one for all.

    Returns:
        (the classifier on the CPU, the SHA-256 hex digest of the weights file's bytes).

    Raises:
        ValueError: an unknown source or architecture (with close names), torchvision with ``in_chans`` other
            than 1 or 3, bad mean / std (naming ``--input-mean`` / ``--input-std``).
        CheckpointError: a missing, unreadable or unsafe file; keys, class count or shapes that do not fit;
            NaN / infinite weights.
    """
    source, name = parse_model_name(spec)
    if source == "torchvision":
        if in_chans not in (1, 3):
            raise InputError(f"torchvision:{name} takes 3-channel images; {in_chans} channels cannot be mapped to 3")
        in_chans = 3
    if num_classes < 1:
        raise InputError(f"num_classes must be positive, got {num_classes}")
    model = ExternalClassifier(
        _create(source, name, num_classes, img_size, in_chans),
        source=source,
        name=name,
        num_classes=num_classes,
        img_size=img_size,
        in_chans=in_chans,
        mean=mean,
        std=std,
    )
    path = Path(weights)
    sd = read_external_weights(path)
    _check_fit(model.net, sd, path, f"{source}:{name}", num_classes)
    model.net.load_state_dict(sd, strict=True)
    return model.eval(), file_sha256(path)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB chunks (weights files can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
