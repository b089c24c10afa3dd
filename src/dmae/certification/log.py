"""The per-image certification log: the field's tab-separated format, written by ``certify``, read by ``report``.

One row per image under a header line: ``idx label predict radius correct time`` for CERTIFY (the format of
Cohen et al.'s reference ``certify.py``, so existing analysis scripts read it) and ``idx label predict correct
time`` for PREDICT; ``predict`` = -1 on abstain, ``time`` in seconds. Columns are found by name, so logs of
other tools with extra columns read too.
"""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

from dmae.errors import DmaeError

CERTIFY_HEADER = ("idx", "label", "predict", "radius", "correct", "time")
PREDICT_HEADER = ("idx", "label", "predict", "correct", "time")
# sequential CERTIFY: the standard columns first (other tools read them as they are), then its own
SEQUENTIAL_HEADER = (*CERTIFY_HEADER, "n_samples", "radius_continuous")


class LogError(DmaeError, ValueError):
    """A log could not be read; the message names the file, the line and what is wrong."""


class LogRows(NamedTuple):
    """A parsed log: its header, its complete rows (each a list of fields, strings), the 1-based file line of
    each row, and notices about lines that were not read as rows (each naming the file and the line)."""

    header: tuple[str, ...]
    rows: list[list[str]]
    lines: tuple[int, ...] = ()
    notices: tuple[str, ...] = ()


def format_row(
    header: tuple[str, ...],
    idx: int,
    label: int,
    pred: int,
    radius: float,
    seconds: float,
    n_samples: int = 0,
    radius_continuous: float = 0.0,
) -> str:
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
    always end rows with a newline; resuming) it is dropped; otherwise it is kept when it has every field (other
    tools' files may lack the final newline) and dropped when it is short. Either way ``notices`` says so, with
    the file and the line, so a report never drops or keeps a line without a word (resuming ignores them).

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
    rows, numbers, notices = [], [], []
    for n, ln in enumerate(body, start=2):
        if ln.strip():
            fields = ln.split()
            if len(fields) < len(header):
                raise LogError(f"{path}:{n}: {len(fields)} fields, expected {len(header)}")
            rows.append(fields)
            numbers.append(n)
    if tail.strip():
        n, fields = len(lines), tail.split()
        if not strict_tail and len(fields) >= len(header):
            rows.append(fields)
            numbers.append(n)
            notices.append(f"{path}:{n}: the last line has no newline; counted (it has all {len(header)} fields)")
        else:
            notices.append(
                f"{path}:{n}: the last line has no newline and {len(fields)} of {len(header)} fields "
                "(torn by a crash mid-write?): not counted"
            )
    return LogRows(header, rows, tuple(numbers), tuple(notices))


def unique_images(path: str | Path, log: LogRows, ignore: tuple[str, ...] = ("time",)) -> tuple[LogRows, list[int]]:
    """``log`` with each image (``idx``) once: a row that repeats an earlier row of the same image in every
    column but ``ignore`` (the wall-clock time differs between two runs of one image) is dropped, with a notice.
    Such repeats come from logs concatenated from overlapping shards (a padded ``DistributedSampler`` certifies
    a few images twice); counting them twice would weigh those images double. Logs without an ``idx`` column are
    returned as they are. Also returns, per kept row, how many rows of the file it stands for (for the noise
    samples the file spent).

    Raises:
        LogError: two rows of one image that differ in another column (two different certificates of one image:
            which one the report should count is the user's call), naming the file, the idx, both lines and the
            first column that differs.
    """
    if "idx" not in log.header:
        return log, [1] * len(log.rows)
    j = log.header.index("idx")
    keep = [c for c, name in enumerate(log.header) if name not in ignore]
    first: dict[str, int] = {}  # idx -> position in the kept rows
    rows: list[list[str]] = []
    lines: list[int] = []
    counts: list[int] = []
    repeated: list[str] = []
    for fields, n in zip(log.rows, log.lines or range(2, len(log.rows) + 2), strict=True):
        k = first.get(fields[j])
        if k is None:
            first[fields[j]] = len(rows)
            rows.append(fields)
            lines.append(n)
            counts.append(1)
            continue
        if differ := [c for c in keep if _value(rows[k][c]) != _value(fields[c])]:
            c = differ[0]
            raise LogError(
                f"{path}: idx {fields[j]} appears on lines {lines[k]} and {n} with different results "
                f"({log.header[c]} {rows[k][c]} vs {fields[c]}): two certificates of one image (e.g. "
                "logs of overlapping shards concatenated); keep one row per idx and report again"
            )
        counts[k] += 1
        repeated.append(fields[j])
    notices = list(log.notices)
    if repeated:
        shown = ", ".join(dict.fromkeys(repeated[:5])) + (" ..." if len(set(repeated)) > 5 else "")
        notices.append(
            f"{path}: {len(repeated)} row(s) repeat an earlier row of the same image (idx {shown}; e.g. "
            "overlapping shards concatenated): each image counted once"
        )
    return LogRows(log.header, rows, tuple(lines), tuple(notices)), counts


def _value(field: str) -> float | str:
    """A field as a number when it is one, so ``0.5`` and ``0.500000`` (two tools' formats) read as equal."""
    try:
        return float(field)
    except ValueError:
        return field


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


def write_json(path: Path, obj: object) -> None:
    """Atomically write ``obj`` as indented JSON (temp file, rename): a reader of a log's settings, a report or a
    merge running beside the job, never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def merge_rank_files(main_file: Path, header: tuple[str, ...], remove: bool) -> dict[int, str]:
    """The rows of the main log and of every ``.rank{r}`` file beside it (torchrun's ranks write one each); with
    ``remove``, the merge is written into the main file (atomically) and the rank files are deleted.

    Raises:
        LogError: a file is not a log with exactly ``header`` (:func:`read_rows`).
    """
    rank_files = sorted(main_file.parent.glob(f"{glob.escape(main_file.name)}.rank*"))
    rows = read_rows(main_file, header)
    for rf in rank_files:
        for i, row in read_rows(rf, header).items():
            rows.setdefault(i, row)
    if remove and rank_files:
        write_rows(main_file, header, rows)
        for rf in rank_files:
            rf.unlink()
    return rows
