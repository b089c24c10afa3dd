"""The base of every error dmae raises on purpose, so a caller can catch them all with ``except DmaeError``.

Each error keeps the built-in base it had before (``CheckpointError`` is still a ``RuntimeError``, ``LogError``
a ``ValueError``), so code that catches those keeps working; options with a bad value still raise plain
``ValueError``. The errors live beside the code that raises them; this module holds only the base and the one
error raised by more than one workflow.
"""

from __future__ import annotations


class DmaeError(Exception):
    """An error dmae raised on purpose; the message names the offending value and what fixes it."""


class StageInterrupted(DmaeError, RuntimeError):
    """A stage of the demo or an experiment stopped before its end (SIGINT / SIGTERM); its run folder is
    resumable: run the same command again."""
