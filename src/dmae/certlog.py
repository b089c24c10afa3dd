"""The per-image certification log: the field's tab-separated format, written by ``certify``, read by ``report``.

One row per image under a header line: ``idx label predict radius correct time`` for CERTIFY (the format of
Cohen et al.'s reference ``certify.py``, so existing analysis scripts read it) and ``idx label predict correct
time`` for PREDICT; ``predict`` = -1 on abstain, ``time`` in seconds. Columns are found by name, so logs of
other tools with extra columns read too.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

CERTIFY_HEADER = ("idx", "label", "predict", "radius", "correct", "time")
PREDICT_HEADER = ("idx", "label", "predict", "correct", "time")
# sequential CERTIFY: the standard columns first (other tools read them as they are), then its own
SEQUENTIAL_HEADER = CERTIFY_HEADER + ("n_samples", "radius_continuous")


class LogError(ValueError):
    """A log could not be read; the message names the file, the line and what is wrong."""


class LogRows(NamedTuple):
    """A parsed log: its header and its complete rows, each a list of fields (strings)."""

    header: tuple[str, ...]
    rows: list[list[str]]


def format_row(header: tuple[str, ...], idx: int, label: int, pred: int, radius: float, seconds: float,
               n_samples: int = 0, radius_continuous: float = 0.0) -> str:
    """One row (newline included) of a CERTIFY, PREDICT or sequential CERTIFY log; ``correct`` is ``pred == label``."""
    correct = int(pred == label)
    if header == PREDICT_HEADER:
        return f"{idx}\t{label}\t{pred}\t{correct}\t{seconds:.4f}\n"
    row = f"{idx}\t{label}\t{pred}\t{_radius(radius)}\t{correct}\t{seconds:.4f}"
    if header == SEQUENTIAL_HEADER:
        row += f"\t{n_samples}\t{_radius(radius_continuous)}"
    return row + "\n"


def _radius(r: float) -> str:
    """A radius with 6 decimals, rounded *down*: a printed radius must never exceed the certified one."""
    return f"{math.floor(r * 1e6) / 1e6:.6f}"


def read_log_rows(path: str | Path, need: tuple[str, ...] = (), strict_tail: bool = False) -> LogRows:
    """Read a log's header and complete rows (fields split on whitespace).

    A last line without its newline is torn by a crash mid-write: with ``strict_tail`` (our own files, which
    always end rows with a newline) it is dropped; otherwise it is kept when it has every field (other tools'
    files may lack the final newline) and dropped when it is short.

    Raises:
        LogError: unreadable or empty file, a header without the ``need`` columns, or a short row that is
            not the last line.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise LogError(f"cannot read {path}: {e}") from e
    lines = text.split("\n")
    if not lines[0].strip():
        raise LogError(f"{path} is empty (no header line)")
    header = tuple(lines[0].split())
    missing = [c for c in need if c not in header]
    if missing:
        raise LogError(f"{path}: header {list(header)} lacks columns {missing} (expected {' '.join(need)})")
    body, tail = lines[1:-1], lines[-1]  # ``tail`` follows the final newline: empty, or a torn line
    rows = []
    for n, ln in enumerate(body, start=2):
        if ln.strip():
            fields = ln.split()
            if len(fields) < len(header):
                raise LogError(f"{path}:{n}: {len(fields)} fields, expected {len(header)}")
            rows.append(fields)
    if tail.strip() and not strict_tail and len(tail.split()) >= len(header):
        rows.append(tail.split())
    return LogRows(header, rows)


def read_rows(path: Path, header: tuple[str, ...]) -> dict[int, str]:
    """Our own log's complete rows by image index, as lines (for resuming); {} when there is no file.

    Raises:
        LogError: the file is not a log with exactly this header, or a row is malformed.
    """
    if not path.exists():
        return {}
    log = read_log_rows(path, strict_tail=True)
    if log.header != header:
        raise LogError(f"{path}: not a {' '.join(header)} log (header {' '.join(log.header)[:80]!r})")
    out: dict[int, str] = {}
    for fields in log.rows:
        if len(fields) != len(header):
            raise LogError(f"{path}: malformed row {' '.join(fields)[:80]!r}")
        out.setdefault(int(fields[0]), "\t".join(fields) + "\n")
    return out


def write_rows(path: Path, header: tuple[str, ...], rows: dict[int, str]) -> None:
    """Atomically write ``rows`` sorted by index under the header (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write("\t".join(header) + "\n")
        for i in sorted(rows):
            f.write(rows[i])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
