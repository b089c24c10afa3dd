"""The base of every error dmae raises on purpose, so a caller can catch them all with ``except DmaeError``.

Each error keeps the built-in base a Python caller expects (``CheckpointError`` is a ``RuntimeError``, ``LogError``
and :class:`InputError` are ``ValueError``s, :class:`MissingFileError` a ``FileNotFoundError``), so code that catches
those keeps working. The errors of one subject live beside the code that raises them (``CheckpointError``,
``DataError``, ``LogError``, ``ShardError``, ``ReportError``, ``ExperimentError``); this module holds the base and
the errors every part of the package raises.
"""

from __future__ import annotations


class DmaeError(Exception):
    """An error dmae raised on purpose; the message names the offending value and what fixes it."""


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
