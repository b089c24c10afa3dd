"""Typed configuration: dataclasses whose fields carry a type, a default, a help line and their bounds.

A run's configuration is resolved in three layers: the dataclass defaults, then a preset file
(``--config NAME`` for a file shipped in ``dmae/configs/<command>/``, or a path to a YAML file), then the
flags given on the command line. The resolved configuration is saved beside the run's outputs.

Everything about one option is declared once, next to the field: ``option(default, help, low=..., high=...,
choices=..., check=...)``. :meth:`Options.validate` checks every field against that declaration (numbers
must be finite, within their bounds, of the declared type) before the cross-field checks of each config,
and ``add_dataclass_arguments`` builds the command-line flags from the same declaration.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import inspect
import math
import types
import typing
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import yaml

from dmae.errors import InputError, MissingFileError

C = TypeVar("C")
_INHERIT = "inherit"


def option(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: Sequence[Any] | None = None,
    check: Callable[[Any], Any] | None = None,
    aliases: tuple[str, ...] = (),
    positional: bool = False,
) -> Any:
    """A dataclass field with its help line (shown by ``--help``) and what values it accepts.

    Args:
        default: the default value (lists/dicts are copied per instance).
        help: one line for ``--help``.
        low / high: bounds of a number (of each element of a tuple); ``low_open`` / ``high_open`` exclude them.
        choices: the allowed values (a registry's names, for instance).
        check: a domain validator called with the value; it raises ``ValueError`` naming the value.
        aliases: further flags for the option (``--num-samples`` for ``--n``).
        positional: a positional command-line argument instead of a flag.
    """
    meta = {
        "help": help,
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
        "choices": tuple(choices) if choices is not None else None,
        "check": check,
        "aliases": aliases,
        "positional": positional,
    }
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def default(value: Any, help: str | None = None) -> Any:
    """Redefine only the default of an option declared by a base config (help and bounds are inherited)."""
    meta: dict[str, Any] = {_INHERIT: True}
    if help is not None:
        meta["help"] = help
    return dataclasses.field(default=value, metadata=meta)


def field_meta(cls: type, name: str) -> dict[str, Any]:
    """The declaration of option ``name`` of config class ``cls``, merged down its base classes."""
    meta: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is None or name not in inspect.get_annotations(klass):
            continue
        own = dict(f.metadata)
        if not own.pop(_INHERIT, False):
            meta = {}
        meta.update(own)
    return meta


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def flag(name: str) -> str:
    """The command-line flag of a field name: ``mask_ratio`` -> ``--mask-ratio``."""
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------- validation
def _bounds_text(meta: dict[str, Any]) -> str:
    low, high = meta.get("low"), meta.get("high")
    if low is not None and high is not None:
        return f"in {'(' if meta['low_open'] else '['}{low:g}, {high:g}{')' if meta['high_open'] else ']'}"
    if low is not None:
        return f"{'>' if meta['low_open'] else '>='} {low:g}"
    return f"{'<' if meta['high_open'] else '<='} {high:g}"


def _check_number(name: str, value: Any, tp: type, meta: dict[str, Any]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and not isinstance(value, int)):
        raise InputError(f"{flag(name)} must be {'an integer' if tp is int else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise InputError(f"{flag(name)} must be a finite number, got {value!r}")
    low, high = meta.get("low"), meta.get("high")
    too_low = low is not None and (value <= low if meta["low_open"] else value < low)
    too_high = high is not None and (value >= high if meta["high_open"] else value > high)
    if too_low or too_high:
        raise InputError(f"{flag(name)} must be {_bounds_text(meta)}, got {value!r}")


def check_field(cls: type[Options], name: str, value: Any) -> None:
    """Check one value against its field's declaration.

    Order: presence, tuple arity, the domain's own ``check`` (its message names the domain, e.g. "unknown data
    set"), then choices, type, finiteness and bounds of every element.

    Raises:
        ValueError: naming the flag and the value: ``None`` for a non-Optional field, a tuple of the wrong
            length or empty, a value outside its choices, of the wrong type, not finite or out of bounds;
            or whatever the field's ``check`` raises (``ValueError`` by convention).
        KeyError: ``name`` is not a field of ``cls``.
    """
    meta = field_meta(cls, name)
    tp, optional = _unwrap_optional(typing.get_type_hints(cls)[name])
    if value is None:
        if not optional:
            raise InputError(f"{flag(name)} needs a value")
        return
    items, item_tp = [value], tp
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        items, item_tp = list(value), args[0]
        if not (len(args) == 2 and args[1] is Ellipsis) and len(items) != len(args):
            raise InputError(f"{flag(name)} takes {len(args)} values, got {list(value)}")
        if not items and not (meta.get("positional") and cls.__dataclass_fields__[name].default == ()):
            raise InputError(f"{flag(name)} needs at least one value")
    if meta.get("check") is not None:
        meta["check"](value)
    choices = meta.get("choices") or (typing.get_args(item_tp) if typing.get_origin(item_tp) is Literal else None)
    for v in items:
        if choices is not None and v not in choices:
            raise InputError(f"{flag(name)} must be one of {', '.join(map(str, choices))}; got {v!r}")
        if item_tp in (int, float):
            _check_number(name, v, item_tp, meta)


O = TypeVar("O", bound="Options")


class Options:
    """Base of every config dataclass: :meth:`validate` checks each field, then :meth:`check_combination`.

    An instance remembers which options were set explicitly (:meth:`given`): those passed to the constructor,
    which is how :func:`build_config` passes a preset file's values and the flags given. Defaults that a run
    adapts to its data (:mod:`dmae.training.engine`) are only the ones left unset.
    """

    if TYPE_CHECKING:  # every subclass is a dataclass: the fields dataclasses.fields() and check_field read
        __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    _given: frozenset[str] = frozenset()

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        self = super().__new__(cls)
        # the dataclass __init__ sets every field alike; only the call tells a given value from a default
        positional = [f.name for f in dataclasses.fields(cls)][: len(args)]
        object.__setattr__(self, "_given", frozenset(positional) | frozenset(kwargs))
        return self

    def given(self, name: str) -> bool:
        """True when option ``name`` was set explicitly (a constructor keyword, a preset file, a flag).

        ``dataclasses.replace`` passes every option to the constructor: its result counts all of them as given.

        Raises:
            KeyError: ``name`` is not an option of this config.
        """
        if name not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(f"{type(self).__name__} has no option {name!r}")
        return name in self._given

    def updated(self: O, **changes: Any) -> O:
        """A copy with ``changes`` made: the changed options count as given, the others stay as they were (a default
        stays a default that a run may adapt), unlike ``dataclasses.replace``. Nothing is validated here.

        Raises:
            ValueError: a name that is not an option of this config (the known ones listed).
        """
        known = {f.name for f in dataclasses.fields(self)}
        if unknown := sorted(set(changes) - known):
            close = {u: difflib.get_close_matches(u.replace("-", "_"), known, n=1) for u in unknown}
            hints = "; ".join(f"{u}: did you mean {c[0]}?" for u, c in close.items() if c)
            raise InputError(
                f"unknown option(s) {', '.join(unknown)}{f' ({hints})' if hints else ''}; {type(self).__name__} "
                f"has: {', '.join(sorted(known))}"
            )
        new = copy.copy(self)
        for name, value in changes.items():
            setattr(new, name, value)
        object.__setattr__(new, "_given", self._given | frozenset(changes))
        return new

    def validate(self) -> None:
        """Fail early, naming the offending option and value.

        Raises:
            ValueError: a value outside its declared type, bounds or choices, or a bad combination.
        """
        for f in dataclasses.fields(self):
            check_field(type(self), f.name, getattr(self, f.name))
        self.check_combination()

    def check_combination(self) -> None:
        """Checks that involve several options (each config overrides this; the base checks nothing).

        Raises:
            ValueError: (in overrides) a combination of options that cannot run, naming the options.
        """


# ----------------------------------------------------------------------------- command line
def _default(f: dataclasses.Field[Any]) -> Any:
    """A field's default value; a list / dict default comes from its factory (a fresh copy).

    Raises:
        TypeError: the field has no default (every option needs one: a flag may be left out).
    """
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is dataclasses.MISSING:
        raise TypeError(f"option {f.name} has no default")
    return f.default_factory()


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of ``cls``; flags default to 'not given' so presets are not overridden.

    Fields declared ``positional`` become positional arguments; ``bool`` fields get ``--x/--no-x``.

    Raises:
        TypeError: a field whose type (``Optional`` removed) is not bool, int, float, str, a ``Literal``
            or a tuple.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = field_meta(cls, f.name)
        tp, optional = _unwrap_optional(hints[f.name])
        dflt = _default(f)
        text = meta.get("help", "")
        # the default is shown unless the help already says it or there is none (None, "", ())
        shown = "(default" not in text and dflt is not None and dflt not in ("", ())
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{text} (default: {dflt})" if shown else text}
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            choices = typing.get_args(tp)
            kw.update(type=type(choices[0]), choices=choices)
        elif origin is tuple:
            args = typing.get_args(tp)
            variadic = len(args) == 2 and args[1] is Ellipsis
            kw.update(type=args[0], nargs="+" if variadic else len(args))
            if variadic and not meta.get("positional"):
                kw["action"] = "extend"  # --use a=X --use b=Y means both, not just the last
        elif tp in (int, float, str):
            kw["type"] = _none_or(tp) if optional else tp
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
        else:
            raise TypeError(f"unsupported option type {tp} for {cls.__name__}.{f.name}")
        if optional and tp in (int, float, str) and not meta.get("choices"):
            kw["metavar"] = tp.__name__.upper()
        if meta.get("positional"):
            kw.pop("default")
            if dflt == () and kw.get("nargs") == "+":  # an empty default: the argument may be left out
                kw.update(nargs="*", default=argparse.SUPPRESS)
            parser.add_argument(f.name, **kw)
        else:
            parser.add_argument(flag(f.name), *meta.get("aliases", ()), dest=f.name, **kw)


def _none_or(tp: type) -> Any:
    def convert(s: str) -> Any:
        return None if s.lower() in ("none", "null", "") else tp(s)

    convert.__name__ = tp.__name__
    return convert


def preset_path(command: str, name_or_path: str) -> Path:
    """Resolve ``--config``: a shipped preset name (``configs/<command>/<name>.yaml``) or a file path.

    Raises:
        FileNotFoundError: a path (a ``.yaml``/``.yml``/``.json`` name, or an existing path) that is not a file.
        ValueError: an unknown preset name, listing the shipped ones.
    """
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml", ".json") or p.exists():
        if not p.is_file():
            raise MissingFileError(f"config file {p} does not exist")
        return p
    shipped = resources.files("dmae") / "configs" / command / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise InputError(
            f"unknown {command} preset {name_or_path!r}; shipped presets: {', '.join(list_presets(command))}"
        )
    return Path(str(shipped))


def list_presets(command: str) -> list[str]:
    """Names of the preset files shipped for ``command``."""
    d = resources.files("dmae") / "configs" / command
    if not d.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in d.iterdir() if p.name.endswith(".yaml"))


def load_values(path: Path, cls: type) -> dict[str, Any]:
    """Read a YAML/JSON preset and check its keys against ``cls``'s fields.

    Raises:
        ValueError: invalid YAML, not a mapping, or unknown option names.
    """
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise InputError(f"config file {path} must hold a mapping of option: value, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"config file {path}: unknown options {unknown}")
    return values


def build_config(cls: type[C], preset: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Instantiate ``cls`` from defaults <- preset values <- overrides, coercing lists to tuples.

    The options of the preset and the overrides count as given (:meth:`Options.given`); the rest are defaults.
    Values are not validated here (see :meth:`Options.validate`).

    Raises:
        KeyError: a key that is not a field of ``cls`` (:func:`load_values` rejects those in files first).
    """
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


def save_config(cfg: Any, path: str | Path, note: str = "") -> None:
    """Write the resolved configuration as YAML, ``note`` (if any) above it as comment lines."""
    head = "".join(f"# {line}\n" for line in note.splitlines())
    Path(path).write_text(head + yaml.safe_dump(to_dict(cfg), sort_keys=False))
