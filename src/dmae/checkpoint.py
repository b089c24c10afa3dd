"""Saving and loading: atomic training checkpoints, safetensors exports, and official checkpoints.

Nothing here executes code from a file: pickles are read with ``torch.load(weights_only=True)``,
allow-listing only ``argparse.Namespace`` (the ``args`` entry of official training checkpoints), and our
own exports are safetensors files whose metadata carries the model configuration as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmae.models.classifier import ClassifierConfig, ViTClassifier
from dmae.models.dmae import DenoisingMaskedAutoencoder, DMAEConfig
from dmae.models.registry import get_preset, list_models, model_config

FORMAT = "dmae-checkpoint-v1"
# Positional embeddings are fixed sin-cos functions of the grid; a checkpoint made at another input size
# keeps the model's own instead of failing.
FIXED_KEYS = ("pos_embed", "decoder_pos_embed")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model; the message names file and keys."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``.

    A crash mid-write leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def safe_load(path: str | os.PathLike) -> Any:
    """Read a PyTorch pickle without executing code from it (``weights_only=True``).

    Raises:
        CheckpointError: missing, truncated, corrupt, or needing types outside the allow-list.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first[:300]}") from e


def extract_state_dict(obj: Any, path: str | os.PathLike = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The model weights of a loaded checkpoint: ``obj['model']``, ``obj['state_dict']`` or ``obj`` itself.

    A ``module.`` prefix (saved from DDP) is stripped.
    """
    sd = obj
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state"):
            if key in obj and isinstance(obj[key], Mapping):
                sd = obj[key]
                break
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: no state dict found (expected {{'model': state_dict}} or a state dict)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


@dataclass
class LoadReport:
    """What a load did: keys the model has but the file lacked, keys the file has but the model lacks,
    fixed keys kept from the model because their shapes differ, and file keys ignored on purpose."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # keys of the file left out on purpose (decoder, old head)

    def summary(self) -> str:
        def short(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" ... (+{len(keys) - 6})" if len(keys) > 6 else "")

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing [{short(self.missing)}]")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected [{short(self.unexpected)}]")
        if self.kept:
            parts.append(f"kept model's own {self.kept}")
        if self.ignored:
            parts.append(f"{len(self.ignored)} ignored [{short(self.ignored)}]")
        return "; ".join(parts) or "all keys matched"


def load_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], path: str | os.PathLike = "<checkpoint>",
                    allow_missing: tuple[str, ...] = (), allow_unexpected: tuple[str, ...] = ()) -> LoadReport:
    """Load ``sd`` into ``model``, checking shapes and reporting missing/unexpected keys.

    Args:
        allow_missing / allow_unexpected: key prefixes that may be absent / extra; any other mismatch
            raises :class:`CheckpointError`, so a wrong architecture fails with the keys that differ.
    """
    own = model.state_dict()
    report = LoadReport()
    to_load: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k not in own:
            report.unexpected.append(k)
        elif own[k].shape != v.shape:
            if k in FIXED_KEYS:
                report.kept.append(k)
            else:
                raise CheckpointError(
                    f"{path}: {k} has shape {tuple(v.shape)} in the file but {tuple(own[k].shape)} in the model "
                    "(a different architecture or input size?)"
                )
        else:
            to_load[k] = v
    report.missing = [k for k in own if k not in sd]
    bad_missing = [k for k in report.missing if not k.startswith(allow_missing)]
    bad_unexpected = [k for k in report.unexpected if not k.startswith(allow_unexpected)]
    if bad_missing or bad_unexpected:
        raise CheckpointError(
            f"{path} does not fit the model: {len(bad_missing)} missing keys {bad_missing[:8]}, "
            f"{len(bad_unexpected)} unexpected keys {bad_unexpected[:8]}"
        )
    model.load_state_dict(to_load, strict=False)
    return report


# -------------------------------------------------------------------------------- DMAE models
DECODER_PREFIXES = ("decoder_", "mask_token")
# Keys a fine-tuned or linear-probe checkpoint carries that an autoencoder has no use for.
CLASSIFIER_PREFIXES = ("fc_norm.", "head.")


def infer_model_config(sd: Mapping[str, torch.Tensor], path: str | os.PathLike = "<checkpoint>") -> DMAEConfig:
    """Find the registered preset whose architecture matches a state dict's shapes (official files carry no config)."""
    try:
        embed_dim = sd["cls_token"].shape[-1]
        patch = sd["patch_embed.proj.weight"].shape[-1]
        in_chans = sd["patch_embed.proj.weight"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"{path}: not a ViT checkpoint (no {e.args[0]})") from None
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    dec_depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks.")), default=-1)
    for name in list_models():
        kw = get_preset(name).kwargs
        if (kw["embed_dim"], kw["depth"], kw["patch_size"], kw["in_chans"]) == (embed_dim, depth, patch, in_chans) and (
            dec_depth == 0 or kw["decoder_depth"] == dec_depth
        ):
            over: dict[str, Any] = {}
            if "pos_embed" in sd:
                side = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
                over["img_size"] = side * patch
            return model_config(name, **over)
    raise CheckpointError(
        f"{path}: no registered model has embed_dim {embed_dim}, depth {depth}, patch {patch}, {in_chans} channels; "
        f"pass --model (available: {', '.join(list_models())})"
    )


def save_export(model: nn.Module, path: str | os.PathLike, extra: dict[str, str] | None = None) -> None:
    """Export weights as safetensors, the model configuration in the file's metadata (atomic).

    Autoencoders store ``model_config``, classifiers ``classifier_config``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    key = "classifier_config" if isinstance(model, ViTClassifier) else "model_config"
    meta = {"format": FORMAT, key: json.dumps(model.config.to_dict()), **(extra or {})}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Weights and (if the file has one) its configuration, as ``{'model_config' | 'classifier_config': dict}``.

    Supported: our safetensors exports, our training checkpoints, official DMAE/MAE pickles.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
        key = next((k for k in ("classifier_config", "model_config") if k in meta), None)
        return sd, ({key: json.loads(meta[key])} if key else None)
    obj = safe_load(path)
    cfg = None
    if isinstance(obj, Mapping):
        key = next((k for k in ("classifier_config", "model_config") if k in obj), None)
        cfg = {key: obj[key]} if key else None
    return extract_state_dict(obj, path), cfg


def load_dmae(path: str | os.PathLike, model: str | None = None, **overrides: Any) -> tuple[DenoisingMaskedAutoencoder, LoadReport]:
    """Build a DMAE from a checkpoint: its own config if it has one, else ``model`` or the preset its shapes match.

    Encoder-only files (MAE's public ones) load with the decoder keys missing (randomly initialised);
    classifier keys of fine-tuned files are ignored.
    """
    sd, cfg = read_weights(path)
    if model is not None:
        mcfg = model_config(model, **overrides)
    elif cfg is not None and "model_config" in cfg:
        mcfg = DMAEConfig.from_dict({**cfg["model_config"], **{k: v for k, v in overrides.items() if v is not None}})
    elif cfg is not None:
        raise CheckpointError(f"{path} holds a classifier, not an autoencoder")
    else:
        mcfg = infer_model_config(sd, path)
    net = DenoisingMaskedAutoencoder(mcfg)
    report = load_state_dict(net, sd, path, allow_missing=DECODER_PREFIXES, allow_unexpected=CLASSIFIER_PREFIXES)
    return net, report


# -------------------------------------------------------------------------------- classifiers
def _head_classes(sd: Mapping[str, torch.Tensor]) -> tuple[int, str] | None:
    """(class count, pool) of a classifier state dict, or None for an encoder / autoencoder."""
    if "head.1.weight" in sd:
        return sd["head.1.weight"].shape[0], "token"  # linear probe: BatchNorm + Linear on the cls token
    if "head.weight" in sd:
        return sd["head.weight"].shape[0], ("avg" if "fc_norm.weight" in sd else "token")
    return None


def load_classifier(
    path: str | os.PathLike | None,
    num_classes: int,
    pool: str | None = "avg",
    drop_path: float = 0.0,
    model: str | None = None,
    img_size: int | None = None,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> tuple[ViTClassifier, LoadReport]:
    """Build a base classifier, from a checkpoint or (``path=None``) randomly initialised from preset ``model``.

    A classifier file (ours, an official fine-tuned one with ``fc_norm``/``head``, or an official linear probe
    with ``head.0``/``head.1``) with the same pooling and class count loads whole. Anything else contributes
    its encoder: the decoder, ``mask_token``, and a head of another pooling are dropped, and the new head
    (``fc_norm`` + ``head`` for average pooling) starts fresh. ``pool=None`` takes the file's own pooling
    (for evaluating a trained classifier). ``stats`` (mean, std) replaces the ImageNet
    statistics for files that carry no configuration, when the channel counts agree.
    """
    if path is None:
        pool = pool or "avg"
        if model is None:
            raise ValueError("a classifier needs --init (a checkpoint) or --model (a preset, random initialisation)")
        mcfg = model_config(model, img_size=img_size)
        if stats is not None and len(stats[0]) == mcfg.in_chans:
            mcfg = model_config(model, img_size=img_size, mean=stats[0], std=stats[1])
        return ViTClassifier(ClassifierConfig(mcfg, num_classes, pool, drop_path)), LoadReport()

    sd, cfg = read_weights(path)
    head = _head_classes(sd)
    if pool is None:  # whatever the file is: its own pooling, else average pooling
        if cfg is not None and "classifier_config" in cfg:
            pool = cfg["classifier_config"].get("pool", "avg")
        else:
            pool = head[1] if head is not None else "avg"
    if cfg is not None and "classifier_config" in cfg:
        mcfg = ClassifierConfig.from_dict(cfg["classifier_config"]).encoder
    elif cfg is not None:
        mcfg = DMAEConfig.from_dict(cfg["model_config"])
    else:
        mcfg = model_config(model) if model is not None else infer_model_config(sd, path)
        if stats is not None and len(stats[0]) == mcfg.in_chans:
            mcfg = DMAEConfig.from_dict({**mcfg.to_dict(), "mean": stats[0], "std": stats[1]})
    if model is not None and cfg is not None:
        want = model_config(model)
        if (want.embed_dim, want.depth, want.patch_size) != (mcfg.embed_dim, mcfg.depth, mcfg.patch_size):
            raise CheckpointError(f"{path} holds a {mcfg.embed_dim}-d {mcfg.depth}-block encoder, not --model {model}")
    if img_size is not None and img_size != mcfg.img_size:
        mcfg = DMAEConfig.from_dict({**mcfg.to_dict(), "img_size": img_size})
    net = ViTClassifier(ClassifierConfig(mcfg, num_classes, pool, drop_path))

    if head is not None and head[1] == pool:
        if head[0] != num_classes:
            raise CheckpointError(f"{path} classifies {head[0]} classes, the data set has {num_classes}")
        return net, load_state_dict(net, sd, path)
    # encoder only: keep what a fresh head does not replace
    drop = DECODER_PREFIXES + ("head", "fc_norm.") + (("norm.",) if pool == "avg" else ())
    enc = {k: v for k, v in sd.items() if not k.startswith(drop)}
    report = load_state_dict(net, enc, path, allow_missing=("head", "fc_norm.", "norm."))
    report.ignored = sorted(set(sd) - set(enc))
    return net, report
