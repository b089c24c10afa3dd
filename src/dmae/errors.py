"""The base of every error dmae raises on purpose, so a caller can catch them all with ``except DmaeError``.

Each error keeps the built-in base a Python caller expects (``CheckpointError`` is a ``RuntimeError``, ``LogError``
and :class:`InputError` are ``ValueError``s, :class:`MissingFileError` a ``FileNotFoundError``), so code that catches
those keeps working. The errors of one subject live beside the code that raises them (``CheckpointError``,
``DataError``, ``LogError``, ``ShardError``, ``ReportError``, ``ExperimentError``); this module holds the base and
the errors every part of the package raises.

Messages name options as the command line spells them (``--output-dir``). Inside a call of the Python API
(:func:`python_terms`), every error and warning dmae makes is worded in that call's terms instead (``log_dir``,
``resume=True``), so a notebook user is never told about a flag they did not use.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from contextvars import ContextVar

# the Python names of the options a call of the API is under (None: the command line's spelling stands)
_PYTHON_NAMES: ContextVar[Mapping[str, str] | None] = ContextVar("dmae_python_names", default=None)
_TEMPORARY: ContextVar[str | None] = ContextVar("dmae_temporary_folder", default=None)
# options that are switches on the command line and booleans in Python
_SWITCHES = frozenset(
    {"resume", "merge", "allow_partial", "sound", "stop_on_wrong_guess", "download", "from_scratch", "linprobe"}
)
# phrases whose Python counterpart is not one option of the call
_PHRASES = {"--input-mean / --input-std": "the normalization inside the model", "--shard K/N": "shard=(K, N)"}
# one pass over a message: a `quoted command` (left as written), a phrase, or --a-flag, an option of the command
# line (not inside a path or a word: runs/a--b stays), with the number after it as its value (--n 1000 -> n=1000)
_TERMS = re.compile(
    r"(`[^`]*`)|("
    + "|".join(map(re.escape, _PHRASES))
    + r")|(?<![\w/.-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?: (-?\d(?:[\w.,/+-]*\w)?))?"
)


def in_python_terms(message: str, renames: Mapping[str, str]) -> str:
    """``message`` with each command-line flag outside backquotes written as the Python keyword of the call:
    ``--output-dir`` -> ``output_dir`` (or ``renames[name]``, e.g. ``log_dir``), ``--n 1000`` -> ``n=1000``, a
    switch ``--resume`` -> ``resume=True``."""

    def spell(m: re.Match[str]) -> str:
        quoted, phrase, flag, value = m.groups()
        if quoted:
            return quoted
        if phrase:
            return _PHRASES[phrase]
        name = renames.get(flag.replace("-", "_"), flag.replace("-", "_"))
        if value:
            return f"{name}={value}"
        return f"{name}=True" if name in _SWITCHES else name

    return _TERMS.sub(spell, message)


@contextlib.contextmanager
def python_terms(**renames: str) -> Iterator[None]:
    """Word the errors and warnings made inside the block in the Python API's terms (:func:`in_python_terms`);
    ``renames`` maps a command-line option to the call's keyword where they differ (``output_dir="log_dir"``)."""
    token = _PYTHON_NAMES.set(renames)
    try:
        yield
    finally:
        _PYTHON_NAMES.reset(token)


@contextlib.contextmanager
def temporary_folder(path: str) -> Iterator[None]:
    """Inside the block, messages name ``path`` (a folder an API call removes when it returns) as what it is, not
    as a path the user could open afterwards."""
    token = _TEMPORARY.set(path)
    try:
        yield
    finally:
        _TEMPORARY.reset(token)


def in_call_terms(message: str) -> str:
    """``message`` in the terms of the API call under way (:func:`python_terms`; unchanged outside one), with a
    temporary folder (:func:`temporary_folder`) named as such. For what dmae prints as well as what it raises."""
    renames, folder = _PYTHON_NAMES.get(), _TEMPORARY.get()
    if renames is not None:
        message = in_python_terms(message, renames)
    if folder is not None:
        message = message.replace(folder, "<a temporary folder: give log_dir to keep the logs>")
    return message


def worded(args: tuple[object, ...]) -> tuple[object, ...]:
    """The message argument in the terms of the API call under way, if any (:func:`in_call_terms`)."""
    if not args or not isinstance(args[0], str):
        return args
    return (in_call_terms(args[0]), *args[1:])


class DmaeError(Exception):
    """An error dmae raised on purpose; the message names the offending value and what fixes it (in the terms of
    the Python call when raised inside one)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*worded(args))


class StageInterrupted(DmaeError, RuntimeError):
    """A stage of the demo or an experiment stopped before its end (SIGINT / SIGTERM); its run folder is
    resumable: run the same command again."""


class InputError(DmaeError, ValueError):
    """A value dmae refuses: an argument, an option, an image, a label, a setting that contradicts another, or a
    log or run written with other settings; the message names the value and what would be accepted."""


class MissingFileError(DmaeError, FileNotFoundError):
    """A file or run folder that was named does not exist (a log, a config, ``--init`` weights, a run to resume)."""


class RunExistsError(DmaeError, FileExistsError):
    """A run folder already holds a run, and nothing said to resume it: it is never overwritten."""


class DivergedError(DmaeError, FloatingPointError):
    """Training produced a NaN or infinite loss or weights; nothing was saved from the diverged state."""


class PlatformError(DmaeError, RuntimeError):
    """The machine cannot do what was asked (a CUDA device that is not there, a random generator that misbehaves)."""
