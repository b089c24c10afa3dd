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
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmae.data import DatasetInfo
from dmae.errors import DmaeError, InputError
from dmae.models.classifier import ClassifierConfig, Pool, ViTClassifier
from dmae.models.dmae import DenoisingMaskedAutoencoder, DMAEConfig
from dmae.models.registry import get_preset, list_models, model_config, model_config_for_data

FORMAT = "dmae-checkpoint-v1"
# Position embeddings ([1, 1 + L, D], cls first) follow the patch grid: a checkpoint made at another input size
# is fitted to the model's grid (see fit_positions) instead of failing.
POSITION_KEYS = ("pos_embed", "decoder_pos_embed")


# What a run folder is taken to mean, in order: a pretraining export, the selected / last fine-tuned
# classifier, the resumable training checkpoint.
RUN_FILES = ("model.safetensors", "model_best.safetensors", "model_last.safetensors", "checkpoint.pt")


class CheckpointError(DmaeError, RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model; the message names file and keys."""


def read_provenance(folder: Path) -> dict[str, Any] | None:
    """A run folder's ``PROVENANCE.json`` (command, seed, threads, times, sha256) when it is a copy of a shipped
    checkpoint; None for a run made here."""
    path = Path(folder) / "PROVENANCE.json"
    return json.loads(path.read_text()) if path.is_file() else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The weights file a ``--checkpoint`` / ``--init`` names: the file itself, or in a run folder the first
    of :data:`RUN_FILES` it holds. Every command that takes a checkpoint resolves it here.

    Raises:
        CheckpointError: nothing there, naming what was looked for where.
    """
    p = Path(path)
    if p.is_dir():
        for name in RUN_FILES:
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"run folder {p} holds none of {', '.join(RUN_FILES)}")
    if not p.is_file():
        raise CheckpointError(
            f"checkpoint {p} does not exist (give a weights file or a run folder holding one of {', '.join(RUN_FILES)})"
        )
    return p


def run_config(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The options of the run a checkpoint belongs to (``config.yaml`` beside it, or in the folder); {} if none."""
    import yaml

    p = Path(checkpoint)
    cfg_file = (p if p.is_dir() else p.parent) / "config.yaml"
    return (yaml.safe_load(cfg_file.read_text()) or {}) if cfg_file.is_file() else {}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors export (``format``, the configuration, and what the run recorded, such as
    ``trained_sigma``); {} for other files or a file without metadata. Reads the header only.

    Raises:
        CheckpointError: an unreadable safetensors file.
    """
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e


def training_sigma(checkpoint: str | os.PathLike) -> float | list[float] | None:
    """The noise a classifier was fine-tuned at: its run's ``sigma``, or ``[low, high]`` for a ``sigma_range`` run
    (``config.yaml`` beside the weights, else the ``trained_sigma`` the weights file records); None if unknown.

    Raises:
        CheckpointError: an unreadable safetensors file.
    """
    run_cfg = run_config(checkpoint)
    if run_cfg.get("sigma_range"):
        return [float(v) for v in run_cfg["sigma_range"]]
    if run_cfg.get("sigma"):
        return float(run_cfg["sigma"])
    recorded = read_metadata(checkpoint).get("trained_sigma")
    value = json.loads(recorded) if recorded else None
    return [float(v) for v in value] if isinstance(value, list) else (float(value) if value is not None else None)


def weights_digest(path: str | os.PathLike) -> str:
    """SHA-256 of the weights a checkpoint holds (names, dtypes, shapes and values, in key order): what a resumed
    run or log compares, so replaced weights are noticed. Content, not file bytes: re-exporting the same weights
    (safetensors does not keep its metadata's order) gives the same digest.

    Raises:
        CheckpointError: see :func:`read_weights`.
    """
    return state_dict_digest(read_weights(path)[0])


def state_dict_digest(sd: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and values in key order (:func:`weights_digest` of a file
    is this of its weights, so a module and its saved file agree)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``.

    A crash mid-write leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when writing failed: the previous file is untouched


def safe_load(path: str | os.PathLike) -> Any:
    """Read a PyTorch pickle without executing code from it (``weights_only=True``).

    Raises:
        CheckpointError: missing, not a PyTorch file, truncated, or holding Python objects outside the
            allow-list. The message says what the file is not; it never suggests turning the safe loader off.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    # text or garbage makes the weights-only unpickler fail in many ways (IndexError / KeyError among them)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        ValueError,
        OSError,
        IndexError,
        KeyError,
        TypeError,
        AttributeError,
    ) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {_why_unreadable(path, e)}") from None


def _why_unreadable(path: Path, error: BaseException) -> str:
    """What a file that torch.load refused is not, in our words: PyTorch's own message for a refused global
    advises loading with weights_only=False, which would run code from the file."""
    with open(path, "rb") as f:
        head = f.read(4)
    text = str(error)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found or "Weights only load failed" in text:
            what = f" ({found.group(1)})" if found else ""
            return (
                f"it holds Python objects{what} that a weights-only load does not allow; dmae reads only tensors "
                "and plain containers and never runs code from a file (re-save the state dict alone)"
            )
        return f"a truncated or corrupt PyTorch file ({type(error).__name__})"
    return "not a PyTorch checkpoint (neither a zip archive nor a pickle), nor a .safetensors file"


def extract_state_dict(obj: Any, path: str | os.PathLike = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The model weights of a loaded checkpoint: ``obj['model']``, ``obj['state_dict']`` or ``obj`` itself.

    A ``module.`` prefix (saved from DDP) is stripped.

    Raises:
        CheckpointError: no mapping of names to tensors found.
    """
    sd = obj
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state"):
            if key in obj and isinstance(obj[key], Mapping):
                sd = obj[key]
                break
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: no state dict found (expected {{'model': state_dict}} or a state dict)")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in sd.items()}


@dataclass
class LoadReport:
    """What a load did: keys the model has but the file lacked, keys the file has but the model lacks,
    position embeddings fitted to another grid (how), and file keys ignored on purpose."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    positions: list[str] = field(default_factory=list)  # e.g. "pos_embed: learned 7x7 resampled to 8x8"
    ignored: list[str] = field(default_factory=list)  # keys of the file left out on purpose (decoder, old head)

    def summary(self) -> str:
        def short(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" ... (+{len(keys) - 6})" if len(keys) > 6 else "")

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing [{short(self.missing)}]")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected [{short(self.unexpected)}]")
        if self.positions:
            parts.append("; ".join(self.positions))
        if self.ignored:
            parts.append(f"{len(self.ignored)} ignored [{short(self.ignored)}]")
        return "; ".join(parts) or "all keys matched"


def _grid_side(pos: torch.Tensor) -> int:
    side = round((pos.shape[1] - 1) ** 0.5)
    if side * side != pos.shape[1] - 1:
        raise CheckpointError(f"position embedding of {pos.shape[1]} tokens is not a cls token plus a square grid")
    return side


def fit_positions(saved: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Position embeddings ``[1, 1 + s*s, D]`` from a file made for another grid, fitted to the model's ``own``.

    Fixed 2-D sin-cos positions (DMAE / MAE pretraining) are a function of the grid: the model's own, computed
    for its grid, are exact. Learned ones (fine-tuned classifiers) are resampled bicubically with timm's
    ``resample_abs_pos_embed``, the cls position kept (as timm and MAE's ``interpolate_pos_embed`` do).
    Returns the embedding and a note saying which was done.
    """
    from timm.layers import resample_abs_pos_embed

    from dmae.models.pos_embed import sincos_2d

    old, new = _grid_side(saved), _grid_side(own)
    if torch.allclose(saved.float(), sincos_2d(saved.shape[-1], (old, old)), atol=1e-5):
        return own, f"sin-cos for the {new}x{new} grid (the file's are the {old}x{old} sin-cos)"
    fitted = resample_abs_pos_embed(saved.float(), [new, new], [old, old], num_prefix_tokens=1)
    return fitted.to(saved.dtype), f"learned {old}x{old} positions resampled to {new}x{new} (bicubic)"


def load_state_dict(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    path: str | os.PathLike = "<checkpoint>",
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: tuple[str, ...] = (),
) -> LoadReport:
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
            if k in POSITION_KEYS and v.ndim == 3 and v.shape[-1] == own[k].shape[-1]:
                to_load[k], note = fit_positions(v, own[k])
                report.positions.append(f"{k}: {note}")
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
    bad = [k for k, v in to_load.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} tensors hold NaN or infinite values {bad[:8]} (a diverged run?); "
            "nothing computed from them could be trusted"
        )
    model.load_state_dict(to_load, strict=False)
    return report


# -------------------------------------------------------------------------------- DMAE models
DECODER_PREFIXES = ("decoder_", "mask_token")
# Keys a fine-tuned or linear-probe checkpoint carries that an autoencoder has no use for.
CLASSIFIER_PREFIXES = ("fc_norm.", "head.")


def infer_model_config(sd: Mapping[str, torch.Tensor], path: str | os.PathLike = "<checkpoint>") -> DMAEConfig:
    """Find the registered preset whose architecture matches a state dict's shapes (official files carry no config).

    Raises:
        CheckpointError: not a ViT state dict, or no preset with its width, depth, patch and channels.
    """
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
                side = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
                over["img_size"] = side * patch
            return model_config(name, **over)
    raise CheckpointError(
        f"{path}: no registered model has embed_dim {embed_dim}, depth {depth}, patch {patch}, {in_chans} channels; "
        f"pass --model (available: {', '.join(list_models())})"
    )


def save_export(
    model: DenoisingMaskedAutoencoder | ViTClassifier, path: str | os.PathLike, extra: dict[str, str] | None = None
) -> None:
    """Export weights as safetensors, the model configuration in the file's metadata (atomic).

    Autoencoders store ``model_config``, classifiers ``classifier_config``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    key = "classifier_config" if isinstance(model, ViTClassifier) else "model_config"
    meta = {"format": FORMAT, key: json.dumps(model.config.to_dict()), **(extra or {})}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    try:
        save_file(sd, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Weights and (if the file has one) its configuration, as ``{'model_config' | 'classifier_config': dict}``.

    Supported: our safetensors exports, our training checkpoints, official DMAE/MAE pickles; ``path`` may be a
    run folder (:func:`resolve_checkpoint`).

    Raises:
        CheckpointError: nothing there, an unreadable or unsafe file, or no state dict in it.
    """
    path = resolve_checkpoint(path)
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


def load_dmae(
    path: str | os.PathLike, model: str | None = None, **overrides: Any
) -> tuple[DenoisingMaskedAutoencoder, LoadReport]:
    """Build a DMAE from a checkpoint: its own config if it has one, else ``model`` or the preset its shapes match.

    Encoder-only files (MAE's public ones) load with the decoder keys missing (randomly initialised; the report
    lists them); classifier keys of fine-tuned files are ignored.

    Raises:
        CheckpointError: unreadable file, a classifier file, no matching preset, keys or shapes that do not fit,
        or non-finite weights.
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
def head_classes(sd: Mapping[str, torch.Tensor]) -> tuple[int, Pool] | None:
    """(class count, pool) of a classifier state dict, or None for an encoder / autoencoder."""
    if "head.1.weight" in sd:
        return sd["head.1.weight"].shape[0], "token"  # linear probe: BatchNorm + Linear on the cls token
    if "head.weight" in sd:
        return sd["head.weight"].shape[0], ("avg" if "fc_norm.weight" in sd else "token")
    return None


def _classifier_encoder(
    path: str | os.PathLike,
    sd: Mapping[str, torch.Tensor],
    cfg: dict[str, Any] | None,
    model: str | None,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None,
) -> DMAEConfig:
    """The encoder architecture of a file: its own configuration, else ``model`` or the preset its shapes match
    (with ``stats`` as mean / std when the channel counts agree: official files store none)."""
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
    return mcfg


def _fresh_classifier(
    model: str | None,
    num_classes: int,
    pool: Pool | None,
    drop_path: float,
    img_size: int | None,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None,
    data: DatasetInfo | None,
) -> ViTClassifier:
    """:func:`load_classifier` without a checkpoint: preset ``model`` randomly initialised, fitted to ``data``.

    Raises:
        ValueError: no ``model``.
    """
    if model is None:
        raise InputError("a classifier needs --init (a checkpoint) or --model (a preset, random initialisation)")
    if data is not None:
        mcfg = model_config_for_data(model, data, img_size)
    else:
        mcfg = model_config(model, img_size=img_size)
        if stats is not None and len(stats[0]) == mcfg.in_chans:
            mcfg = model_config(model, img_size=img_size, mean=stats[0], std=stats[1])
    return ViTClassifier(ClassifierConfig(mcfg, num_classes, pool or "avg", drop_path))


def load_classifier(
    path: str | os.PathLike | None,
    num_classes: int,
    pool: Pool | None = "avg",
    drop_path: float = 0.0,
    model: str | None = None,
    img_size: int | None = None,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    data: DatasetInfo | None = None,
) -> tuple[ViTClassifier, LoadReport]:
    """Build a base classifier, from a checkpoint (a file or run folder) or (``path=None``) randomly initialised
    from preset ``model``.

    A classifier file (ours, an official fine-tuned one with ``fc_norm``/``head``, or an official linear probe
    with ``head.0``/``head.1``) with the same pooling and class count loads whole. Anything else contributes
    its encoder: the decoder, ``mask_token``, and a head of another pooling are dropped, and the new head
    (``fc_norm`` + ``head`` for average pooling) starts fresh. ``pool=None`` takes the file's own pooling
    (for evaluating a trained classifier). ``data`` fits a preset to the data set (channels, size, statistics;
    see :func:`model_config_for_data`) and gives files that carry no configuration its statistics; ``stats``
    (mean, std) does the latter alone. An ``img_size`` other than the file's resamples learned positions.

    Raises:
        ValueError: neither ``path`` nor ``model``.  CheckpointError: unreadable file, an architecture other
        than ``model``, another class count, keys or shapes that do not fit, or non-finite weights.
    """
    if data is not None:
        stats = (data.mean, data.std)
    if path is None:
        return _fresh_classifier(model, num_classes, pool, drop_path, img_size, stats, data), LoadReport()

    sd, cfg = read_weights(path)
    head = head_classes(sd)
    if pool is None:  # whatever the file is: its own pooling, else average pooling
        if cfg is not None and "classifier_config" in cfg:
            pool = cfg["classifier_config"].get("pool", "avg")
        else:
            pool = head[1] if head is not None else "avg"
    mcfg = _classifier_encoder(path, sd, cfg, model, stats)
    if img_size is not None and img_size != mcfg.img_size:
        mcfg = DMAEConfig.from_dict({**mcfg.to_dict(), "img_size": img_size})
    net = ViTClassifier(ClassifierConfig(mcfg, num_classes, pool, drop_path))
    if head is not None and head[1] == pool:
        if head[0] != num_classes:
            raise CheckpointError(f"{path} classifies {head[0]} classes, the data set has {num_classes}")
        report = load_state_dict(net, sd, path)
        net.trained_sigma = training_sigma(resolve_checkpoint(path))  # a whole classifier: the noise it was trained at
        return net, report
    # encoder only: keep what a fresh head does not replace
    drop = DECODER_PREFIXES + ("head", "fc_norm.") + (("norm.",) if pool == "avg" else ())
    enc = {k: v for k, v in sd.items() if not k.startswith(drop)}
    report = load_state_dict(net, enc, path, allow_missing=("head", "fc_norm.", "norm."))
    report.ignored = sorted(set(sd) - set(enc))
    return net, report
