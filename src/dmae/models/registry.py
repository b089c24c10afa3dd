"""Named model presets: each is a set of :class:`DMAEConfig` values that override the defaults.

The official names are the ones the paper's code and checkpoints use (Wu et al., ICLR 2023, after MAE's
``mae_vit_*_dec512d8b``, He et al., CVPR 2022; ViT sizes from Dosovitskiy et al., ICLR 2021). The small
presets are for CPUs and 28-32 px images; their input size and channel count default to the data set's
(``native_input``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dmae.data import DATASETS, DatasetInfo
from dmae.errors import InputError
from dmae.models.dmae import DenoisingMaskedAutoencoder, DMAEConfig


@dataclass(frozen=True)
class Preset:
    """A named architecture: :class:`DMAEConfig` values over the defaults, and a one-line description."""

    name: str
    kwargs: dict[str, Any]
    description: str
    native_input: bool = False  # True: img_size / in_chans follow the data set unless given


_PRESETS: dict[str, Preset] = {}
# Small presets default to Fashion-MNIST's single channel and statistics; the CLI replaces these with the
# data set's own when the input follows the data (native_input).
_GREY: dict[str, Any] = {"mean": DATASETS["fashion-mnist"].mean, "std": DATASETS["fashion-mnist"].std}


def register(name: str, description: str, native_input: bool = False, **kwargs: Any) -> None:
    """Add a preset; ``kwargs`` are :class:`DMAEConfig` values (checked when :func:`model_config` uses them).

    Raises:
        ValueError: ``name`` is already registered.
    """
    if name in _PRESETS:
        raise InputError(f"model preset {name!r} registered twice")
    _PRESETS[name] = Preset(name, kwargs, description, native_input)


# name: (description, img_size, patch_size, in_chans, encoder (embed_dim, depth, num_heads), decoder (the same))
_VITS: dict[str, tuple[str, int, int, int, tuple[int, int, int], tuple[int, int, int]]] = {
    "dmae_vit_base_patch16_dec512d8b": (
        "ViT-B/16 encoder (~86M), 512-d 8-block decoder; paper's main model",
        224,
        16,
        3,
        (768, 12, 12),
        (512, 8, 16),
    ),
    "dmae_vit_large_patch16_dec512d8b": (
        "ViT-L/16 encoder (~304M, 24 blocks), 512-d 8-block decoder",
        224,
        16,
        3,
        (1024, 24, 16),
        (512, 8, 16),
    ),
    # small presets: native input (the data set's size, channels and statistics; Fashion-MNIST's by default)
    "dmae_vit_tiny_patch4_dec128d2b": (
        "ViT-Ti width (192-d, 12 blocks) on 4x4 patches of 28-32 px images",
        28,
        4,
        1,
        (192, 12, 3),
        (128, 2, 4),
    ),
    "dmae_vit_micro_patch4_dec64d2b": (
        "128-d, 6 blocks on 4x4 patches, 64-d 2-block decoder: the CPU demo model",
        28,
        4,
        1,
        (128, 6, 4),
        (64, 2, 2),
    ),
    "dmae_vit_micro_patch7_dec64d2b": (
        "128-d, 6 blocks on 7x7 patches (16 tokens), 64-d 2-block decoder: ~3x faster",
        28,
        7,
        1,
        (128, 6, 4),
        (64, 2, 2),
    ),
    "dmae_vit_mini_patch7_dec64d2b": (
        "192-d, 6 blocks on 7x7 patches (16 tokens), 64-d 2-block decoder",
        28,
        7,
        1,
        (192, 6, 3),
        (64, 2, 2),
    ),
    "dmae_vit_pico_patch4_dec32d1b": ("32-d, 2 blocks: for tests and smoke runs", 28, 4, 1, (32, 2, 2), (32, 1, 2)),
}


def _register_vits() -> None:
    """Register every preset of :data:`_VITS`: the small ones (under 224 px) follow the data set's input."""
    for name, (desc, size, patch, chans, enc, dec) in _VITS.items():
        native = size < 224
        register(
            name,
            desc,
            native_input=native,
            img_size=size,
            patch_size=patch,
            in_chans=chans,
            **dict(zip(("embed_dim", "depth", "num_heads"), enc, strict=True)),
            **dict(zip(("decoder_embed_dim", "decoder_depth", "decoder_num_heads"), dec, strict=True)),
            **(_GREY if native else {}),
        )


_register_vits()


def list_models() -> list[str]:
    """Names of every registered preset."""
    return sorted(_PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        ValueError: an unknown name, listing the registered ones.
    """
    try:
        return _PRESETS[name]
    except KeyError:
        raise InputError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None


def model_config(name: str, **overrides: Any) -> DMAEConfig:
    """The :class:`DMAEConfig` of preset ``name`` with ``overrides`` (``None`` values are ignored).

    Raises:
        ValueError: an unknown name (:func:`get_preset`), or values :class:`DMAEConfig` rejects.
        TypeError: an override that is not a :class:`DMAEConfig` field.
    """
    preset = get_preset(name)
    kwargs = {**preset.kwargs, **{k: v for k, v in overrides.items() if v is not None}}
    return DMAEConfig(**kwargs)


def model_config_for_data(name: str, info: DatasetInfo, img_size: int | None = None) -> DMAEConfig:
    """Preset ``name`` fitted to a data set, the same way in every command: small (``native_input``) presets take
    the data's channels, native size and statistics; others take the data's statistics when the channel counts
    agree (a grey set on an RGB model keeps the model's: the input layer repeats the channel). ``img_size``
    overrides the input side.

    Raises:
        ValueError: an unknown preset, or a configuration :class:`DMAEConfig` rejects.
    """
    preset = get_preset(name)
    over: dict[str, Any] = {}
    if preset.native_input:
        over["in_chans"] = info.channels
        if info.size is not None:
            over["img_size"] = info.size
    if over.get("in_chans", preset.kwargs.get("in_chans", 3)) == info.channels:
        over["mean"], over["std"] = info.mean, info.std
    if img_size is not None:
        over["img_size"] = img_size
    return model_config(name, **over)


def create_model(name: str, **overrides: Any) -> DenoisingMaskedAutoencoder:
    """Build a freshly initialised DMAE from a preset name, e.g. ``create_model('dmae_vit_base_patch16_dec512d8b')``.

    Raises:
        ValueError, TypeError: as :func:`model_config`; ``ValueError`` also for ``mean``/``std`` that do not
            match ``in_chans`` (from the model's ``InputAdapter``).
    """
    return DenoisingMaskedAutoencoder(model_config(name, **overrides))
