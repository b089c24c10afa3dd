"""Typed configuration: dataclasses whose fields carry a type, a default and a help line.

A run's configuration is resolved in three layers: the dataclass defaults, then a preset file
(``--config NAME`` for a file shipped in ``dmae/configs/<command>/``, or a path to a YAML file), then the
flags given on the command line. The resolved configuration is saved beside the run's outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

C = TypeVar("C")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help line (shown by ``--help``)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of ``cls``; flags default to 'not given' so presets are not overridden."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_ = f"{f.metadata.get('help', '')} (default: {default})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_}
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            choices = typing.get_args(tp)
            kw.update(type=type(choices[0]), choices=choices)
        elif origin is tuple:
            args = typing.get_args(tp)
            kw.update(type=args[0], nargs="+" if (len(args) == 2 and args[1] is Ellipsis) else len(args))
        elif tp in (int, float, str):
            kw["type"] = _none_or(tp) if optional else tp
        else:
            raise TypeError(f"unsupported option type {tp} for {cls.__name__}.{f.name}")
        if optional and tp in (int, float, str):
            kw["metavar"] = tp.__name__.upper()
        parser.add_argument(_flag(f.name), *f.metadata.get("aliases", ()), **kw)


def _none_or(tp: type) -> Any:
    def convert(s: str) -> Any:
        return None if s.lower() in ("none", "null", "") else tp(s)

    convert.__name__ = tp.__name__
    return convert


def preset_path(command: str, name_or_path: str) -> Path:
    """Resolve ``--config``: a shipped preset name (``configs/<command>/<name>.yaml``) or a file path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml", ".json") or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        return p
    shipped = resources.files("dmae") / "configs" / command / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise ValueError(f"unknown {command} preset {name_or_path!r}; shipped presets: {', '.join(list_presets(command))}")
    return Path(str(shipped))


def list_presets(command: str) -> list[str]:
    """Names of the preset files shipped for ``command``."""
    d = resources.files("dmae") / "configs" / command
    if not d.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in d.iterdir() if p.name.endswith(".yaml"))


def load_values(path: Path, cls: type) -> dict[str, Any]:
    """Read a YAML/JSON preset and check its keys against ``cls``'s fields."""
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config file {path}: unknown options {unknown}")
    return values


def build_config(cls: type[C], preset: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Instantiate ``cls`` from defaults <- preset values <- overrides, coercing lists to tuples."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for source in (preset or {}, overrides or {}):
        for k, v in source.items():
            tp, _ = _unwrap_optional(hints[k])
            if typing.get_origin(tp) is tuple and isinstance(v, list):
                v = tuple(v)
            values[k] = v
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain (YAML/JSON-safe) dict of a config dataclass."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved configuration as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
