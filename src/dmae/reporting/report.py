"""``dmae report``: certified-accuracy tables and curves from per-image certification logs.

Reads TSVs with the columns ``idx label predict radius correct time`` (the log format of Cohen et al.'s
``certify.py``, ICML 2019; ours or any tool's in that format). Certified accuracy at r (Cohen et al.) =
fraction of images with ``correct == 1`` and ``radius >= r``; the average certified radius (ACR, Zhai et
al., MACER, ICLR 2020) = mean(correct * radius); the abstention rate = fraction with ``predict == -1``.
Radii are l2 distances in [0, 1] pixel units. Several files (one per sigma) give one row each plus the
best-sigma-per-radius row (the paper's Tables 1-2 layout).

Every output says what the logs hold: each image counts once (identical repeated rows, as concatenated
overlapping shards give, are counted once with a note; two different rows of one image are refused), a torn last
line is named, the radii asked for reach every output, an ACR is labelled with the radius it averages (a
sequential log's continuous radius is not a fixed-n one), and a log without its JSON is reported from its
columns alone.

Two classifiers certified on the same images are compared pairwise (:func:`compare`): the difference of their
certified accuracies at each radius with its paired standard error, and the exact McNemar test on the images
where exactly one of them is certified (the two accuracies are correlated through the images, so the paired
error is the right yardstick, usually far smaller than the unpaired one).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dmae.certification.log import LogError, LogRows, read_log_rows, unique_images
from dmae.certification.shards import main_of_shard, read_shards, shard_files
from dmae.config import Options, option
from dmae.data import DATASETS
from dmae.errors import InputError
from dmae.reporting.figures import pyplot, write_png

RADII = {name: info.radii for name, info in DATASETS.items()}  # the standard radii of each data set
DEFAULT_RADII = RADII["cifar10"]


ReportError = LogError  # what reading a log raises: the file, the line and what is wrong


def _check_radii(radii: tuple[float, ...]) -> None:
    for r in radii:
        if not r >= 0:
            raise InputError(f"--radii must be >= 0, got {r}")


@dataclass
class ReportConfig(Options):
    """Every option of ``dmae report``."""

    files: tuple[str, ...] = option(
        (), "TSVs with columns idx label predict radius correct time (one per sigma)", positional=True
    )
    radii: tuple[float, ...] | None = option(
        None,
        "radii of the table (default: the data set's: ImageNet 0-3, CIFAR-10 / Fashion-MNIST 0-1)",
        check=_check_radii,
    )
    markdown: str | None = option(None, "also write the table as Markdown here")
    csv: str | None = option(None, "also write the table as CSV here")
    plot: str | None = option(None, "write certified accuracy vs radius as a PNG here")
    compare: bool = option(
        False,
        "also compare every later log with the first on the same images: difference "
        "in certified accuracy per radius and in ACR, paired standard error, exact McNemar p",
    )
    run_dir: tuple[str, ...] | None = option(
        None,
        "run folder(s) to report on: every certification log, training run "
        "and reconstruction figure inside (a `dmae demo` or experiment folder)",
    )
    html: str | None = option(None, "also write one self-contained HTML report here (figures embedded; opens offline)")
    title: str = option("dmae report", "title of the HTML report")

    def check_combination(self) -> None:
        if not self.files and not self.run_dir:
            raise InputError("give certification logs (TSV files) and/or --run-dir FOLDER")
        for name in ("markdown", "csv", "plot"):
            if getattr(self, name) and not self.files:
                raise InputError(f"--{name} writes the table of the log files given; with only --run-dir use --html")
        if self.compare and len(self.files) < 2 and not any(Path(f).is_dir() for f in self.files):
            raise InputError(
                f"--compare compares log files with the first one: give at least two, as files or "
                f"folders of logs (got {len(self.files)}; --run-dir folders are not compared)"
            )


@dataclass(kw_only=True)
class CertLog:
    """One certification log as arrays ``[n]`` (one entry per image); ``radius`` in [0, 1] pixel units.

    ``sigma`` and ``dataset`` come from the log's sidecar ``.json`` (or ``sigma`` from the file name), else
    ``None``; ``meta`` is that whole JSON (empty without one). For sequential logs, ``radius`` is the continuous
    radius (``radius_continuous``), not the largest target reached: both are valid certificates, the continuous
    one is finer, and ACR is computed from it; ``radius_column`` names the column read, so an ACR is labelled
    with the radius it averages. ``notes`` are what the reader saw that the numbers alone do not say (a torn last
    line, repeated rows, unmerged rank files), each naming the file.
    """

    name: str
    sigma: float | None
    dataset: str | None
    label: np.ndarray
    predict: np.ndarray
    radius: np.ndarray
    correct: np.ndarray
    n_samples: np.ndarray | None = None  # noise samples spent per image (sequential CERTIFY logs)
    wrong_guess_skipped: int | None = None  # images the label shortcut stopped after selection (None: shortcut off)
    idx: np.ndarray | None = None  # the images' data-set indices (None: the log has no idx column)
    meta: dict[str, Any] = field(default_factory=dict)  # the sidecar JSON: protocol, weights' sha256, ...
    radius_column: str = "radius"  # the column ``radius`` was read from: "radius" or "radius_continuous"
    rows_in_file: np.ndarray | None = None  # [n] rows of the file each image stands for (> 1: repeated rows)
    notes: list[str] = field(default_factory=list)
    planned: int | None = None  # images its run planned (JSON ``images``; a shard's share); None: unknown

    @property
    def incomplete(self) -> bool:
        """Whether the log holds fewer images than its run planned (see ``planned``)."""
        return self.planned is not None and len(self) < self.planned

    def __len__(self) -> int:
        return len(self.correct)

    def certified_accuracy(self, r: float) -> float:
        """Fraction of images correct with ``radius >= r`` (Cohen et al., ICML 2019); NaN for an empty log."""
        return float(np.mean((self.correct == 1) & (self.radius >= r))) if len(self) else float("nan")

    @property
    def acr(self) -> float:
        """Average certified radius, ``mean(correct * radius)`` (Zhai et al., ICLR 2020), with the continuous
        radius of sequential logs (see the class); NaN when empty."""
        return float(np.mean(self.correct * self.radius)) if len(self) else float("nan")

    @property
    def acr_label(self) -> str:
        """What this log's ACR averages: "ACR" (the CERTIFY radius at fixed n, Clopper-Pearson) or
        "ACR (continuous)" (sequential CERTIFY's continuous radius, which stops early: not comparable)."""
        return ACR_LABELS[self.radius_column]

    @property
    def abstain_rate(self) -> float:
        """Fraction of images with ``predict == -1`` (abstained; for a ``--candidate label`` log: not certified
        correct); NaN for an empty log."""
        return float(np.mean(self.predict == -1)) if len(self) else float("nan")

    @property
    def candidate(self) -> str | None:
        """What the log's rows certify, from its JSON: ``"select"`` (CERTIFY's class, the smoothed classifier's
        answer), ``"label"`` (``--candidate label``: whether the label is certified; -1 = not certified correct),
        or None (PREDICT logs, and logs without a JSON). Logs written before the option are ``"select"``."""
        if not self.meta or self.meta.get("mode") == "predict":
            return None
        return self.meta.get("candidate") or "select"


ACR_LABELS = {"radius": "ACR", "radius_continuous": "ACR (continuous)"}  # by the column the radius is read from
_SIGMA_IN_NAME = re.compile(r"(?:sigma|noise)[_=-]?(\d+(?:\.\d+)?)")


def read_meta(path: str | Path) -> dict[str, Any]:
    """The sidecar JSON of the log ``path`` (``<stem>.json``), or {} when there is none; for a main log not merged
    from its shard logs yet (no such file), the first shard's JSON without its ``shard`` (the settings they share).

    Raises:
        LogError: the file is not valid JSON, is not a JSON object, or records a ``sigma`` that is not a
            number (the file named).
    """
    meta_file = Path(path).with_suffix(".json")
    if not Path(path).exists() and not meta_file.is_file() and (shards := shard_files(Path(path))):
        first = read_meta(next(iter(shards.values())))
        return {k: v for k, v in first.items() if k != "shard"}
    if not meta_file.is_file():
        return {}
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LogError(f"{meta_file} (the settings beside {Path(path).name}) is not readable JSON: {e}") from e
    if not isinstance(meta, dict):
        raise LogError(f"{meta_file} holds a JSON {type(meta).__name__}, expected an object of certification settings")
    if meta.get("sigma") is not None and not isinstance(meta["sigma"], (int, float)):
        raise LogError(f"{meta_file}: sigma {meta['sigma']!r} is not a number")
    return meta


def read_log(path: str | Path) -> CertLog:
    """Parse a certification TSV (ours or any tool's: header required, columns found by name).

    ``sigma`` and ``dataset`` are read from ``<path stem>.json`` beside the log when it exists (keys
    ``sigma`` and ``data``); without a ``sigma`` there, it is parsed from the file name (``sigma0.25``,
    ``noise_0.5``, ...). An image repeated in identical rows is counted once, and a torn last line is not
    counted; both are said in ``notes`` (see :func:`dmae.certification.log.read_log_rows`,
    :func:`dmae.certification.log.unique_images`). So is a log that holds fewer images than its JSON planned
    (``planned``: a run interrupted or still running, a partial merge) and a shard log (its share of the images).

    A main log that does not exist but whose shard logs do (``{stem}.shard-K-of-N.tsv``, ``dmae certify --shard``)
    is read from them as one log (:func:`read_shard_logs`).

    Raises:
        LogError: unreadable, no header, missing columns, a malformed row (file and line named), a value that is
            not finite or a ``correct`` other than 0 / 1, one image with two different rows, or a sidecar
            ``.json`` that is not a JSON object (:func:`read_meta`); ShardError (a LogError): shard logs that are
            not one split (:func:`read_shard_logs`).
    """
    path = Path(path)
    if not path.exists() and shard_files(path):
        return read_shard_logs(path)
    lg = _read_one_log(path)
    lg.notes += _completeness_notes(path, lg)
    return lg


def _read_one_log(path: Path) -> CertLog:
    """One log file as :func:`read_log` reads it, without the notes on its completeness."""
    log, rows_in_file = unique_images(path, read_log_rows(path, need=("label", "predict", "radius", "correct")))
    radius, arr = _certificates(path, log)
    n_samples, idx = _int_column(log, "n_samples", path), _int_column(log, "idx", path)
    meta = read_meta(path)
    sigma = meta.get("sigma")
    if sigma is None and (m := _SIGMA_IN_NAME.search(path.name)):
        sigma = float(m.group(1))
    skipped = None
    if meta.get("stop_on_wrong_guess") and n_samples is not None and meta.get("n0"):
        # rows that stopped after the n0 selection samples and abstained (a wrong guess, or non-finite logits)
        skipped = int(np.sum((arr[:, 1] == -1) & (n_samples == int(meta["n0"]))))
    return CertLog(
        name=log_stem(path),
        sigma=sigma,
        dataset=meta.get("data"),
        label=arr[:, 0].astype(int),
        predict=arr[:, 1].astype(int),
        radius=arr[:, 2],
        correct=arr[:, 3].astype(int),
        n_samples=n_samples,
        wrong_guess_skipped=skipped,
        idx=idx,
        meta=meta,
        radius_column=radius,
        rows_in_file=np.array(rows_in_file),
        notes=_log_notes(path, log),
        planned=_planned_count(meta),
    )


def _log_notes(path: Path, log: LogRows) -> list[str]:
    """The log's notices (lines not read as rows, repeated rows), and rank files of a distributed run beside it."""
    notes = [f"note: {n}" for n in log.notices]
    if ranks := sorted(p.name for p in path.parent.glob(f"{glob.escape(path.name)}.rank*")):
        notes.append(
            f"note: {', '.join(ranks)} beside {path} hold rows of a distributed run not merged into it yet "
            "(running, or stopped): they are not in this report; rerun the certify command to merge them"
        )
    return notes


def _certificates(path: Path, log: Any) -> tuple[str, np.ndarray]:
    """The radius column a log is read by (a sequential log's ``radius`` is the largest target reached: its
    ``radius_continuous`` is read) and its rows as ``[n, 4]`` (label, predict, radius, correct).

    Raises:
        LogError: a field that is not a number, a radius that is not finite and >= 0, a ``correct`` not 0 / 1, or
            a row that contradicts itself (file and line named).
    """
    radius = "radius_continuous" if "radius_continuous" in log.header else "radius"
    col = {c: log.header.index(c) for c in ("label", "predict", radius, "correct")}
    rows = []
    for n, f in zip(log.lines, log.rows, strict=True):
        try:
            rows.append((int(f[col["label"]]), int(f[col["predict"]]), float(f[col[radius]]), int(f[col["correct"]])))
        except ValueError as e:
            raise LogError(f"{path}:{n}: {e}") from e
        # ACR weighs radii by ``correct`` and accuracy counts ``correct == 1``: any other value makes them disagree
        label, pred, r, correct = rows[-1]
        if not np.isfinite(r) or r < 0 or correct not in (0, 1):
            raise LogError(
                f"{path}:{n}: {radius} {f[col[radius]]}, correct {f[col['correct']]}: a certified radius "
                "is a finite number >= 0 and correct is 0 or 1"
            )
        if correct != int(pred == label) or (pred == -1 and r != 0):  # the row contradicts itself: count nothing
            raise LogError(
                f"{path}:{n}: label {label}, predict {pred}, {radius} {f[col[radius]]}, correct {correct}: "
                "correct must be 1 exactly when predict equals label, and an abstention (predict -1) has "
                "radius 0"
            )
    return radius, np.array(rows, dtype=np.float64).reshape(-1, 4)


def _planned_count(meta: dict[str, Any]) -> int | None:
    """The images a log's run planned, from its JSON: ``images``, or a shard log's share of them (None: unknown)."""
    images, shard = meta.get("images"), meta.get("shard")
    if not isinstance(images, int):
        return None
    if isinstance(shard, list) and len(shard) == 2 and all(isinstance(x, int) for x in shard) and shard[1] > 0:
        return len(range(shard[0], images, shard[1]))
    return images


def _completeness_notes(path: Path, lg: CertLog) -> list[str]:
    """What a log lacks: images its run planned (interrupted, running, merged partially), and for a shard log,
    that it is a share; for a main log, images its shard logs hold and it does not (a merge out of date)."""
    notes = []
    if isinstance(shard := lg.meta.get("shard"), list):
        notes.append(
            f"note: {path.name} is shard {shard[0]}/{shard[1]} of {path.name.split('.shard-')[0]}: it holds that "
            "shard's share of the images only; report the folder (its shards read as one log) or merge them "
            "(dmae certify --merge)"
        )
    if lg.incomplete:
        merged = isinstance(lg.meta.get("merge"), dict)
        how = (
            "merged from shard logs with --allow-partial: finish the shards (rerun their --shard commands) and merge "
            "again"
            if merged
            else "the run is still going, or was stopped: rerun the same command to finish it"
        )
        notes.append(f"note: {lg.name} is incomplete: {len(lg)} of the {lg.planned} images its run planned; {how}")
    if not shard_files(path):
        return notes
    from dmae.certification.runner import MERGE_KEYS

    try:
        extra = set(read_shards(path, MERGE_KEYS).rows) - set(lg.idx.tolist() if lg.idx is not None else [])
    except LogError as e:
        return [*notes, f"note: the shard logs beside {path.name} were not read: {e}"]
    if extra:
        notes.append(
            f"note: the shard logs beside {path.name} hold {len(extra)} image(s) it lacks: they are not in this "
            "report; merge them again (dmae certify --merge)"
        )
    return notes


def read_shard_logs(path: Path) -> CertLog:
    """The shard logs of the main log ``path`` (which does not exist: not merged yet) read as one log, after the
    checks of ``dmae certify --merge`` (:func:`dmae.certification.shards.read_shards`: one N, the same settings,
    no image in two shards); each shard file is read as :func:`read_log` reads a file. Its ``meta`` is the
    settings they share; ``planned`` the whole run's images, so a set with images missing is marked incomplete,
    its notes naming what each unfinished shard holds.

    Raises:
        ShardError: the shard logs are not one split (the files, key or image named).  LogError: a bad shard file.
    """
    from dmae.certification.runner import MERGE_KEYS

    shards = read_shards(path, MERGE_KEYS)
    parts = [_read_one_log(f) for f in shards.files.values()]

    def cat(name: str, dtype: Any) -> np.ndarray:
        arrays = [getattr(p, name) for p in parts]
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype)

    order = np.argsort(cat("idx", np.int64), kind="stable")
    n_samples = [p.n_samples for p in parts if p.n_samples is not None]  # every shard's, or none (fixed-n)
    skipped = [p.wrong_guess_skipped for p in parts if p.wrong_guess_skipped is not None]
    radius = "radius_continuous" if shards.meta.get("mode") == "sequential" else "radius"
    lg = CertLog(
        name=log_stem(path),
        sigma=shards.meta.get("sigma"),
        dataset=shards.meta.get("data"),
        label=cat("label", int)[order],
        predict=cat("predict", int)[order],
        radius=cat("radius", float)[order],
        correct=cat("correct", int)[order],
        n_samples=np.concatenate(n_samples)[order] if parts and len(n_samples) == len(parts) else None,
        wrong_guess_skipped=sum(skipped) if skipped else None,
        idx=cat("idx", np.int64)[order],
        meta=shards.meta,
        radius_column=parts[0].radius_column if parts else radius,
        rows_in_file=cat("rows_in_file", np.int64)[order],
        notes=[n for p in parts for n in p.notes],
        planned=len(shards.planned),
    )
    missing = lg.planned - len(lg)  # type: ignore[operator]
    state = f"{missing} missing: {shards.progress()}" if missing else "complete"
    lg.notes.append(
        f"note: {lg.name} is read from its {len(parts)} shard logs (of {shards.n}; not merged: dmae certify --merge "
        f"writes it): {len(lg)} of the {lg.planned} planned images, {state}"
    )
    return lg


def _int_column(log: Any, name: str, path: Path) -> np.ndarray | None:
    """An optional integer column of a log as an array (None when the header lacks it).

    Raises:
        LogError: a value that is not an integer (file, line and column named).
    """
    if name not in log.header:
        return None
    j = log.header.index(name)
    out = []
    for n, f in zip(log.lines, log.rows, strict=True):
        try:
            out.append(int(f[j]))
        except ValueError as e:
            raise LogError(f"{path}:{n}: {name} column: {e}") from e
    return np.array(out, dtype=np.int64)


def fixed_n_passes(lg: CertLog, path: Path | None = None) -> int | None:
    """What fixed-n CERTIFY at n = n_max would have spent on a sequential log's images, repeated rows included
    (the log's own passes for any other log, or a log without a JSON); None when its JSON lacks ``n_max``.
    ``path`` is unused (the log carries its JSON) and kept for callers that pass it."""
    if lg.n_samples is None or not lg.meta:
        return forward_passes(lg)
    m = lg.meta
    return _rows(lg) * ((m.get("n0") or 0) + m["n_max"]) if m.get("n_max") else None


def forward_passes(lg: CertLog, path: Path | None = None) -> int | None:
    """Noisy forward passes the log's rows spent, repeated rows included: the sum of ``n_samples``
    (sequential), else rows x (n0 + n) from its JSON (None without one). ``path`` is unused, as above."""
    weights = lg.rows_in_file if lg.rows_in_file is not None else np.ones(len(lg), dtype=np.int64)
    if lg.n_samples is not None:
        return int((lg.n_samples * weights).sum())
    m = lg.meta
    per = (m.get("n0") or 0) + (m.get("n") or 0) if m.get("mode", "certify") == "certify" else m.get("n")
    return _rows(lg) * per if per else None


def _rows(lg: CertLog) -> int:
    """Rows of the log's file (an image repeated in identical rows counts each time: each row cost samples)."""
    return int(lg.rows_in_file.sum()) if lg.rows_in_file is not None else len(lg)


def find_logs(folder: str | Path) -> list[Path]:
    """Every certification log under ``folder`` (``*_sigma*.tsv``), without the ``.rank{r}`` files of a running
    distributed job or the ``.nonfinite.tsv`` side files; sorted. The shard logs of a sigma
    (``*.shard-K-of-N.tsv``) stand as their main log's path, once, whether that exists (merged) or not
    (:func:`read_log` then reads the shards as one log)."""
    found = {
        main_of_shard(p) or p
        for p in Path(folder).rglob("*_sigma*.tsv")
        if ".rank" not in p.name and not p.name.endswith(".nonfinite.tsv")
    }
    return sorted(found)


def _aligned_table(head: list[str], body: list[list[str]]) -> list[str]:
    """The lines of a plain-text table: the header, a rule, the rows, each column as wide as its widest cell."""
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    return [_aligned(cells, widths) for cells in (head, ["-" * w for w in widths], *body)]


def _aligned(cells: list[str], widths: list[int]) -> str:
    """One line of a plain-text table: the first cell left-aligned (a name), the others right-aligned (numbers)."""
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


@dataclass
class Table:
    """Rows of a certified-accuracy table: name, sigma, images, accuracy per radius, ACR, abstention."""

    radii: tuple[float, ...]
    rows: list[dict]
    notes: list[str] = field(default_factory=list)  # printed under the table

    @property
    def has_samples(self) -> bool:
        """Whether any log says how many noise samples it spent (sequential CERTIFY)."""
        return any(r.get("samples") is not None for r in self.rows)

    @property
    def has_label_rows(self) -> bool:
        """Whether any log certifies labels (``--candidate label``): the table then names each row's candidate."""
        return any(r.get("candidate") == "label" for r in self.rows)

    def acr_label(self) -> str | None:
        """The ACR column's header when every row averages the same radius ("ACR" or "ACR (continuous)", see
        :attr:`CertLog.acr_label`); None when the rows mix them (each continuous cell then says so)."""
        kinds = {r["acr_radius"] for r in self.rows if r.get("acr_radius")}
        return ACR_LABELS[kinds.pop()] if len(kinds) == 1 else (None if kinds else "ACR")

    def cells(self) -> tuple[list[str], list[list[str]]]:
        """The header and the rows as display strings (accuracies and abstention in %)."""
        acr_label = self.acr_label()
        labels = self.has_label_rows
        head = ["log", "sigma", *(["candidate"] if labels else []), "images"] + [f"r={r:g}" for r in self.radii]
        head += [acr_label or "ACR", "abstain"] + (["samples/img", "samples"] if self.has_samples else [])
        body = []
        for r in self.rows:
            sig = "best" if r["name"] == "best" else ("-" if r["sigma"] is None else f"{r['sigma']:g}")
            cells = [r["name"], sig, *([r.get("candidate") or "-"] if labels else []), str(r["images"])]
            cells += [f"{100 * a:.1f}" for a in r["acc"]]
            acr = "-" if r["acr"] is None else f"{r['acr']:.3f}"
            if acr_label is None and r.get("acr_radius") == "radius_continuous":
                acr += " (continuous)"
            cells += [acr, "-" if r["abstain"] is None else f"{100 * r['abstain']:.1f}%"]
            if self.has_samples:
                n = r.get("samples")
                cells += ["-", "-"] if n is None else [f"{n / max(r['images'], 1):.0f}", f"{n:,}"]
            body.append(cells)
        return head, body

    def __str__(self) -> str:
        return self.text()

    def text(self) -> str:
        """The table as aligned plain text (accuracies and abstention in %)."""
        return "\n".join([*_aligned_table(*self.cells()), *self.notes])

    def markdown(self) -> str:
        """The table as a Markdown table (accuracies and abstention in %)."""
        head, body = self.cells()
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        notes = ["", *self.notes] if self.notes else []
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body] + notes) + "\n"

    def csv(self) -> str:
        """The table as CSV with unrounded fractions (not %), for further processing; ``acr_radius`` names the
        log column each ACR averages (``radius`` or ``radius_continuous``)."""
        buf = io.StringIO()
        w = csv.writer(buf)
        labels = ["candidate"] if self.has_label_rows else []  # select / label, when a log certifies labels
        w.writerow(
            ["log", "sigma", "images"]
            + [f"r={r:g}" for r in self.radii]
            + ["acr", "abstain", "samples", *labels, "acr_radius"]
        )  # acr_radius: the column the ACR averages
        for r in self.rows:
            w.writerow(
                [r["name"], r["sigma"], r["images"]]
                + [f"{a:.6f}" for a in r["acc"]]
                + [
                    "" if r["acr"] is None else f"{r['acr']:.6f}",
                    "" if r["abstain"] is None else f"{r['abstain']:.6f}",
                    "" if r.get("samples") is None else r["samples"],
                    *([r.get("candidate") or ""] if labels else []),
                    r.get("acr_radius") or "",
                ]
            )
        return buf.getvalue()


def summarize(logs: list[CertLog], radii: tuple[float, ...] | None = None, best: bool = True) -> Table:
    """Certified accuracy at ``radii`` (default: the data set's standard radii), ACR and abstention per log,
    plus (``best``) the best-sigma-per-radius row of the paper's Tables 1-2 when there are several logs.

    The best row is a maximum over noise levels of one classifier, so it is left out, with a note saying why,
    when the logs are not that: a sigma is repeated or unknown (different classifiers), or the logs hold
    different numbers of images (a maximum of accuracies over different images).

    Rows are sorted by sigma (logs without one last). The default radii are :data:`RADII` of the logs'
    data set when they all name the same one, else :data:`DEFAULT_RADII`. Radii in [0, 1] pixel units.

    Raises:
        ReportError: ``logs`` is empty.
    """
    if not logs:
        raise ReportError("no logs to report")
    if radii is None:
        datasets = {lg.dataset for lg in logs if lg.dataset}
        radii = RADII.get(datasets.pop(), DEFAULT_RADII) if len(datasets) == 1 else DEFAULT_RADII
    rows = [_log_row(lg, radii) for lg in sorted(logs, key=lambda lg: (lg.sigma is None, lg.sigma or 0))]
    notes = list(dict.fromkeys(n for lg in logs for n in lg.notes))  # a file given twice: its notes once
    kinds = {lg.radius_column for lg in logs}
    if len(kinds) > 1:
        notes.append(
            "note: "
            + acr_mix_note(
                [lg for lg in logs if lg.radius_column == "radius_continuous"],
                [lg for lg in logs if lg.radius_column == "radius"],
            )
        )
    if best and len(logs) > 1:
        notes += _add_best_row(logs, rows, len(radii), kinds)
    return Table(tuple(radii), rows, notes + mode_notes(logs))


def _add_best_row(logs: list[CertLog], rows: list[dict], n_radii: int, kinds: set[str]) -> list[str]:
    """Append the best-sigma-per-radius row to ``rows`` when it means something (:func:`best_row_refusal`);
    returns the notes it needs (different protocols behind it, or why there is none)."""
    if (why_not := best_row_refusal(logs)) is not None:
        return [f"note: no best-sigma row: {why_not}"]
    rows.append(
        {
            "name": "best",
            "sigma": None,
            "images": len(logs[0]),
            "acc": [max(r["acc"][i] for r in rows) for i in range(n_radii)],
            "acr": max(r["acr"] for r in rows) if len(kinds) == 1 else None,
            "abstain": None,
            "acr_radius": next(iter(kinds)) if len(kinds) == 1 else None,
        }
    )
    if differ := [d for lg in logs[1:] for d in setting_differences(logs[0], lg, protocol_keys())]:
        return [
            f"note: the best row takes, per radius, the best of logs certified with different "
            f"protocols ({'; '.join(dict.fromkeys(differ))})"
        ]
    return []


def mode_notes(logs: list[CertLog]) -> list[str]:
    """What a table's rows mean beyond the columns: logs that certify labels (``--candidate label``) and logs that
    used the label shortcut (``--stop-on-wrong-guess``)."""
    notes = []
    if label := [lg.name for lg in logs if lg.candidate == "label"]:
        notes.append(
            f"note: {', '.join(label)} certified each image's label (--candidate label): a row says whether the "
            "label is certified correct at its radius (g(x) = label and g robust there, at level alpha), not "
            "which class the smoothed classifier returns; predict -1 (abstain) means not certified correct: "
            "misclassified, or correct but not certifiable with these samples. Certified accuracy means what "
            "it means for CERTIFY"
        )
    notes += [
        f"note: {lg.name} used --stop-on-wrong-guess: {lg.wrong_guess_skipped} image(s) stopped after the n0 "
        "selection samples and abstain (a wrong n0 guess, or non-finite logits); certified accuracy is "
        "unchanged, their class and radius are not those of full CERTIFY"
        for lg in logs
        if lg.wrong_guess_skipped is not None
    ]
    return notes


def _log_row(lg: CertLog, radii: Sequence[float]) -> dict[str, Any]:
    """A log's row of the table; an incomplete log (:attr:`CertLog.incomplete`) is named so in the table itself."""
    return {
        "name": lg.name + (" (incomplete)" if lg.incomplete else ""),
        "sigma": lg.sigma,
        "images": len(lg),
        "acc": [lg.certified_accuracy(r) for r in radii],
        "acr": lg.acr,
        "abstain": lg.abstain_rate,
        "acr_radius": lg.radius_column,
        "samples": None if lg.n_samples is None else int(lg.n_samples.sum()),
        "candidate": lg.candidate,
    }


def acr_mix_note(continuous: list[CertLog], fixed: list[CertLog]) -> str:
    """Why ACRs of sequential logs (``continuous``) and fixed-n logs (``fixed``) are not compared."""

    def names(logs: list[CertLog]) -> str:
        return ", ".join(lg.name for lg in logs)

    return (
        f"the ACR of {names(continuous)} averages the continuous radius of sequential CERTIFY "
        "(radius_continuous: sampling stops once the targets are decided, so it is smaller than the fixed-n "
        f"radius of the same classifier), that of {names(fixed)} the Clopper-Pearson radius of fixed-n CERTIFY: "
        "the two are not comparable, and their gap measures the protocols, not the classifiers"
    )


def best_row_refusal(logs: list[CertLog]) -> str | None:
    """Why a best-sigma row over two or more ``logs`` would mean nothing (None when it is meaningful): see
    :func:`summarize`. Raises ValueError for fewer than two logs (a best row over one log is the log)."""
    if len(logs) < 2:
        raise InputError(f"a best-sigma row needs two logs or more, got {len(logs)}")
    sigmas = [None if lg.sigma is None else round(lg.sigma, 6) for lg in logs]
    if None in sigmas:
        return f"the sigma of {logs[sigmas.index(None)].name} is unknown"
    if len(set(sigmas)) < len(sigmas):
        return "two logs share a sigma (different classifiers, not one classifier at several sigma)"
    if len({len(lg) for lg in logs}) > 1:
        return f"the logs hold different numbers of images ({', '.join(str(len(lg)) for lg in logs)})"
    idx = [lg.idx for lg in logs if lg.idx is not None]
    if len(idx) == len(logs):
        first = np.sort(idx[0])
        pairs = zip(logs[1:], idx[1:], strict=True)
        if other := next((lg for lg, i in pairs if not np.array_equal(np.sort(i), first)), None):
            return f"{logs[0].name} and {other.name} hold different images (idx columns)"
    return None


@dataclass(kw_only=True)
class Comparison:
    """Classifier ``a`` against ``b`` on the same ``images`` test images (paired).

    Per radius in ``radii`` ([0, 1] pixel units): the certified accuracies ``acc_a`` / ``acc_b`` (fractions),
    ``diff`` = acc_a - acc_b, ``se`` its paired standard error (the sample standard deviation of the per-image
    differences, ddof 1, over sqrt(images)) and ``p`` the exact two-sided McNemar p-value (a binomial test of
    the images certified by only one of the two: the exact version of McNemar's test, 1947). ``acr_*``: the
    same for the average certified radius (no test); ``acr_label`` says which radius both ACRs average
    (:attr:`CertLog.acr_label`), and is None when they average different ones (a sequential log's continuous
    radius against a fixed-n one): ``acr_diff`` and ``acr_se`` are then NaN and a note says why.
    ``sigma_a`` / ``sigma_b``: the noise levels of the two logs (None when a log does not record it); comparing
    different sigmas is allowed, and the header says so.
    """

    a: str
    b: str
    images: int
    radii: tuple[float, ...]
    acc_a: list[float]
    acc_b: list[float]
    diff: list[float]
    se: list[float]
    p: list[float]
    acr_a: float
    acr_b: float
    acr_diff: float
    acr_se: float
    sigma_a: float | None = None
    sigma_b: float | None = None
    notes: list[str] = field(default_factory=list)  # what may confound the difference (protocols, same weights)
    acr_label: str | None = "ACR"

    def csv_rows(self) -> list[list[Any]]:
        """Rows for a CSV of comparisons (unrounded fractions): a, b, sigma_a, sigma_b, images, radius ("acr" for
        the ACR row: "acr_continuous" when both average sequential CERTIFY's continuous radius), value_a, value_b,
        difference, paired_se ("" when the two ACRs average different radii), mcnemar_p ("" for ACR)."""
        head = [self.a, self.b, self.sigma_a, self.sigma_b, self.images]
        rows = [
            [*head, r, f"{x:.6f}", f"{y:.6f}", f"{d:.6f}", f"{e:.6f}", f"{q:.6g}"]
            for r, x, y, d, e, q in zip(self.radii, self.acc_a, self.acc_b, self.diff, self.se, self.p, strict=True)
        ]
        name = {"ACR": "acr", "ACR (continuous)": "acr_continuous", None: "acr (different radii)"}[self.acr_label]
        diff = ["", ""] if self.acr_label is None else [f"{self.acr_diff:.6f}", f"{self.acr_se:.6f}"]
        return [*rows, [*head, name, f"{self.acr_a:.6f}", f"{self.acr_b:.6f}", *diff, ""]]

    def header(self) -> str:
        """The line above the table: the pair, their sigmas where known, and the number of images."""

        def side(name: str, sigma: float | None) -> str:
            return f"{name} (sigma {sigma:g})" if sigma is not None else name

        images = "the same image" if self.images == 1 else f"the same {self.images} images"
        return f"A = {side(self.a, self.sigma_a)} vs B = {side(self.b, self.sigma_b)}, {images} (difference A - B):"

    def cells(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows as display strings: one row per radius, then ACR (accuracies in %)."""
        head = ["radius", self.a, self.b, "difference", "paired SE", "McNemar p"]
        body = [
            [f"r={r:g}", f"{100 * x:.1f}", f"{100 * y:.1f}", f"{100 * d:+.1f}", f"{100 * e:.1f}", f"{q:.2g}"]
            for r, x, y, d, e, q in zip(self.radii, self.acc_a, self.acc_b, self.diff, self.se, self.p, strict=True)
        ]
        if self.acr_label is None:  # different radii: the two values are shown, their difference is not
            body.append(["ACR (not comparable)", f"{self.acr_a:.3f}", f"{self.acr_b:.3f}", "-", "-", "-"])
        else:
            body.append(
                [
                    self.acr_label,
                    f"{self.acr_a:.3f}",
                    f"{self.acr_b:.3f}",
                    f"{self.acr_diff:+.3f}",
                    f"{self.acr_se:.3f}",
                    "-",
                ]
            )
        return head, body

    def __str__(self) -> str:
        return self.text()

    def text(self) -> str:
        """Aligned plain text, with the number of images."""
        return "\n".join([self.header(), *_aligned_table(*self.cells()), *(f"note: {n}" for n in self.notes)])

    def markdown(self) -> str:
        """A Markdown table under a line naming the pair and the number of images."""
        head, body = self.cells()
        lines = [self.header(), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        notes = ["", *(f"Note: {n}" for n in self.notes)] if self.notes else []
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body] + notes) + "\n"


# What the keys of a log's sidecar JSON (certify's ROW_SETTINGS: the settings that change its rows) mean when two
# logs are compared. Every row setting not named here is a protocol setting, so one added to certify later is
# compared without a change here.
CLASSIFIER_KEYS = ("weights_sha256", "model", "input_layer", "trained_sigma")  # what the classifier is
IMAGE_KEYS = ("data", "split", "data_fingerprint")  # which images (the rows are also matched by idx)
# sigma: in the comparison's header; seed: the noise draws, whose randomness the paired error already holds; skip /
# max / shard: which images, matched by idx; probe: a description of the classifier on a small batch, not a setting
UNCOMPARED_KEYS = ("sigma", "seed", "skip", "max", "probe", "shard")
PROTOCOL_KEYS = (
    "mode",
    "n0",
    "n",
    "n_max",
    "alpha",
    "sequential",
    "radii",
    "epsilon",
    "sequence",
    "stop_on_wrong_guess",
    "futility",
    "sound",
    "candidate",
    "schedule",
)


def protocol_keys() -> tuple[str, ...]:
    """The settings of a certification that change its certified accuracies for a given classifier and images:
    :data:`PROTOCOL_KEYS` and every row setting of :data:`dmae.certification.runner.ROW_SETTINGS` not classed above."""
    from dmae.certification.runner import ROW_SETTINGS

    named = set(PROTOCOL_KEYS + CLASSIFIER_KEYS + IMAGE_KEYS + UNCOMPARED_KEYS)
    return PROTOCOL_KEYS + tuple(k for k in ROW_SETTINGS if k not in named)


def setting_differences(a: CertLog, b: CertLog, keys: tuple[str, ...]) -> list[str]:
    """``"key A-value vs B-value"`` for every key of ``keys`` both sidecar JSONs record with different values."""
    return [f"{k} {a.meta[k]} vs {b.meta[k]}" for k in keys if k in a.meta and k in b.meta and a.meta[k] != b.meta[k]]


def protocol_notes(a: CertLog, b: CertLog) -> list[str]:
    """What besides the classifiers' weights differs between two logs, read from their sidecar JSONs: protocol
    settings (:func:`protocol_keys`), the classifier around the weights (model, input layer, training sigma),
    the images, a key that only one JSON records (named as unchecked), no record at all, or the same weights on
    both sides (said only when nothing else of the classifier differs)."""
    protocol = protocol_keys()
    unrecorded = [lg.name for lg in (a, b) if not any(k in lg.meta for k in protocol)]
    if unrecorded:
        return [
            f"{' and '.join(unrecorded)} {'has' if len(unrecorded) == 1 else 'have'} no protocol record (.json "
            "beside the log with the certification settings): the protocols could not be checked"
        ]
    notes = []
    if differ := setting_differences(a, b, protocol):
        notes.append(
            "the certification protocols differ (" + "; ".join(differ) + "): the difference mixes the "
            "classifiers with the protocols"
        )
    if differ := setting_differences(a, b, IMAGE_KEYS):
        notes.append(
            "the logs record different images (" + "; ".join(differ) + "): images with one idx in both "
            "may not be the same images"
        )
    around = setting_differences(a, b, CLASSIFIER_KEYS[1:])  # what makes a classifier of the weights
    sha: str = a.meta.get("weights_sha256") or ""
    same_file = bool(sha) and sha == b.meta.get("weights_sha256")
    if same_file and around:
        notes.append(
            f"both logs load the same checkpoint file (sha256 {sha[:12]}...) but the classifiers differ ("
            + "; ".join(around)
            + "): the difference measures that, not the weights"
        )
    elif around:
        notes.append("the classifiers also differ in " + "; ".join(around))
    elif same_file:
        notes.append(f"both logs certify the same weights (sha256 {sha[:12]}...)")
    for lg, other in ((a, b), (b, a)):
        if one_sided := [
            k
            for k in protocol + CLASSIFIER_KEYS + IMAGE_KEYS
            if k in other.meta and k not in lg.meta and other.meta[k] is not None
        ]:
            notes.append(f"{lg.name} does not record {', '.join(one_sided)}: not checked")
    return notes


def _paired_se(d: np.ndarray) -> float:
    return float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def _match_images(a: CertLog, b: CertLog) -> tuple[np.ndarray, np.ndarray]:
    """Row orders ``ia``, ``ib`` that put the same image at the same position in ``a`` and ``b`` (see
    :func:`compare`, whose ReportErrors this raises)."""
    if (a.idx is None) != (b.idx is None):
        with_idx, without = (a, b) if a.idx is not None else (b, a)
        raise ReportError(
            f"{with_idx.name} names its images (idx column) and {without.name} does not: the images cannot be matched"
        )
    if a.idx is not None and b.idx is not None:
        # a resumed log of another tool can repeat an image; pairing it would count it twice
        for lg, idx in ((a, a.idx), (b, b.idx)):
            u, counts = np.unique(idx, return_counts=True)
            if (counts > 1).any():
                k = int(np.flatnonzero(counts > 1)[0])
                raise ReportError(
                    f"{lg.name}: idx {int(u[k])} appears {int(counts[k])} times; a "
                    "paired comparison needs each image once"
                )
        ia, ib = np.argsort(a.idx), np.argsort(b.idx)
        if len(a) != len(b) or not np.array_equal(a.idx[ia], b.idx[ib]):
            only_in_a = sorted(set(a.idx.tolist()) - set(b.idx.tolist()))
            where, missing = (
                (a.name, only_in_a[0]) if only_in_a else (b.name, min(set(b.idx.tolist()) - set(a.idx.tolist())))
            )
            raise ReportError(
                f"{a.name} ({len(a)} images) and {b.name} ({len(b)} images) are not logs of the same "
                f"images (e.g. idx {missing} is only in {where}); a paired comparison needs both "
                "certified on the same test images"
            )
    elif len(a) != len(b):
        raise ReportError(
            f"{a.name} has {len(a)} rows and {b.name} {len(b)}; without idx columns the logs must "
            "list the same images in the same order"
        )
    else:
        ia = ib = np.arange(len(a))
    if (bad := np.flatnonzero(a.label[ia] != b.label[ib])).size:
        k = int(bad[0])
        image = f"idx {int(a.idx[ia][k])}" if a.idx is not None else f"row {k + 1}"
        raise ReportError(
            f"{a.name} and {b.name} give {image} different labels ({int(a.label[ia][k])} and "
            f"{int(b.label[ib][k])}): not the same test set"
        )
    return ia, ib


def compare(a: CertLog, b: CertLog, radii: tuple[float, ...] | None = None) -> Comparison:
    """Paired comparison of two certification logs of the same images (see :class:`Comparison`).

    Images are matched by their ``idx`` column when both logs have one (each index at most once per log), by row
    order when neither has (then the labels must agree row by row). Radii in [0, 1] pixel units (default: the
    data set's standard ones, as in :func:`summarize`); the result holds fractions, not %. With one image the
    standard errors are NaN; with no image certified by exactly one of the two, p = 1. The paired standard error
    is the sample standard deviation (ddof 1) of the per-image differences over sqrt(N): for a difference of
    proportions it is sqrt(N / (N - 1)) times the matched-pairs one (Agresti, Categorical Data Analysis, 10.1),
    slightly conservative. No correction is made for testing several radii or pairs.

    Raises:
        ReportError: a log is empty or repeats an index; the logs do not hold the same images (an index found in
            only one of them named); they give an image different labels (the image and both labels named); only
            one of them has an ``idx`` column; they name different data sets.
    """
    if not len(a) or not len(b):
        raise ReportError(f"cannot compare an empty log ({a.name}: {len(a)} rows, {b.name}: {len(b)} rows)")
    if a.dataset and b.dataset and a.dataset != b.dataset:
        raise ReportError(f"{a.name} certifies {a.dataset} and {b.name} {b.dataset}: not the same test set")
    ia, ib = _match_images(a, b)
    if radii is None:
        radii = summarize([a, b]).radii
    acc_a, acc_b, diff, se, p = _paired_accuracies(a, b, ia, ib, radii)
    ra, rb = (a.correct * a.radius)[ia], (b.correct * b.radius)[ib]
    same_radius = a.radius_column == b.radius_column
    notes = _comparison_notes(a, b)
    nan = float("nan")
    return Comparison(
        a=a.name,
        b=b.name,
        images=len(a),
        radii=tuple(radii),
        acc_a=acc_a,
        acc_b=acc_b,
        diff=diff,
        se=se,
        p=p,
        acr_a=float(ra.mean()),
        acr_b=float(rb.mean()),
        acr_diff=float((ra - rb).mean()) if same_radius else nan,
        acr_se=_paired_se(ra - rb) if same_radius else nan,
        sigma_a=a.sigma,
        sigma_b=b.sigma,
        notes=notes,
        acr_label=a.acr_label if same_radius else None,
    )


def _paired_accuracies(
    a: CertLog, b: CertLog, ia: np.ndarray, ib: np.ndarray, radii: tuple[float, ...]
) -> tuple[list[float], list[float], list[float], list[float], list[float]]:
    """Per radius, with the images paired by the row orders ``ia`` / ``ib``: the certified accuracies of ``a`` and
    ``b``, their difference, its paired standard error and the exact McNemar p-value (see :func:`compare`)."""
    from scipy.stats import binomtest

    acc_a, acc_b, diff, se, p = [], [], [], [], []
    for r in radii:
        ca = ((a.correct == 1) & (a.radius >= r))[ia].astype(np.float64)
        cb = ((b.correct == 1) & (b.radius >= r))[ib].astype(np.float64)
        d = ca - cb
        only_a, only_b = int((d > 0).sum()), int((d < 0).sum())
        acc_a.append(float(ca.mean()))
        acc_b.append(float(cb.mean()))
        diff.append(float(d.mean()))
        se.append(_paired_se(d))
        p.append(binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0)
    return acc_a, acc_b, diff, se, p


def _comparison_notes(a: CertLog, b: CertLog) -> list[str]:
    """What may confound the difference of ``a`` and ``b``: the logs' own notes, the protocols
    (:func:`protocol_notes`), and ACRs of different radii."""
    notes = [*a.notes, *(n for n in b.notes if n not in a.notes)]  # a log given twice: its notes once
    notes = [n.removeprefix("note: ") for n in notes] + protocol_notes(a, b)
    if a.radius_column != b.radius_column:
        seq, fixed = (a, b) if a.radius_column == "radius_continuous" else (b, a)
        notes.append("ACR not compared: " + acr_mix_note([seq], [fixed]))
    return notes


def curves_figure(
    logs: list[CertLog], title: str = "", best: bool = True, radii: tuple[float, ...] | None = None
) -> Any:
    """Certified accuracy vs radius for every log (and, with ``best``, their upper envelope where a best-sigma
    row is meaningful: :func:`best_row_refusal`): a matplotlib figure. Curves are labelled by sigma when the
    sigmas tell the logs apart, else by log name and sigma. ``radii`` (the table's, [0, 1] pixel units) are
    marked on each curve, and the radius axis reaches the largest of them even where no image is certified.

    Raises:
        ValueError: ``logs`` is empty (from ``max``).
    """
    plt = pyplot()
    r_max = max([float(lg.radius.max()) if len(lg) else 0.0 for lg in logs] + list(radii or ()))
    grid = np.linspace(0.0, max(r_max, 1e-3) * 1.05, 400)
    fig, ax = plt.subplots(figsize=(6, 4))
    curves = []
    one_classifier = best and len(logs) > 1 and best_row_refusal(logs) is None
    for lg in sorted(logs, key=lambda lg: (lg.sigma is None, lg.sigma or 0)):
        acc = np.array([lg.certified_accuracy(r) for r in grid])
        curves.append(acc)
        sigma = f"sigma = {lg.sigma:g}" if lg.sigma is not None else ""
        label = sigma if sigma and (one_classifier or len(logs) == 1) else ", ".join(x for x in (lg.name, sigma) if x)
        (line,) = ax.plot(grid, 100 * acc, label=label)
        if radii:  # the table's numbers on the curve (no label: the legend names curves, not markers)
            ax.plot(radii, [100 * lg.certified_accuracy(r) for r in radii], "o", color=line.get_color(), markersize=4)
    if one_classifier:
        ax.plot(grid, 100 * np.max(curves, axis=0), "k--", linewidth=1, label="best sigma")
    ax.set_xlabel("l2 radius (pixels in [0, 1])")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def plot_curves(
    logs: list[CertLog], path: str | Path, title: str = "", best: bool = True, radii: tuple[float, ...] | None = None
) -> Path:
    """:func:`curves_figure` written as a PNG; returns its path.

    Raises:
        ValueError: ``logs`` is empty.  OSError: the file cannot be written.
    """
    return write_png(curves_figure(logs, title, best, radii), path, dpi=120)


def distinct_names(files: Sequence[str | Path]) -> list[str]:
    """Short display names that tell ``files`` apart: each file's stem, with as many of its folders in front
    (``certify/certify_sigma0.25``, then ``run_a/certify/certify_sigma0.25``, ...) as it takes for the names to
    differ; the same file given twice is numbered (``#2``). Folders are taken from the absolute path, so a file
    in the current folder is named by that folder too when needed."""
    paths = [Path(os.path.abspath(f)) for f in files]  # absolute, but links not followed: the names the user gave
    unique = list(dict.fromkeys(paths))
    parts = {p: (*p.parent.relative_to(p.anchor).parts, log_stem(p)) for p in unique}
    names: dict[Path, str] = {}
    for k in range(1, max((len(x) for x in parts.values()), default=0) + 1):
        names = {p: "/".join(x[-k:]) for p, x in parts.items()}
        if len(set(names.values())) == len(names):
            break
    return [f"{names[p]}#{paths[:i].count(p) + 1}" if paths.count(p) > 1 else names[p] for i, p in enumerate(paths)]


def log_stem(path: Path) -> str:
    """A log's file name without its ``.tsv`` / ``.txt`` extension; other names whole (``sigma_0.25`` of the
    reference scripts has no extension, and its ``.25`` is not one)."""
    return path.name[: -len(path.suffix)] if path.suffix in (".tsv", ".txt") else path.name


def expand_folders(files: list[str | Path], one_log_each: bool = False) -> list[Path]:
    """``files`` in order, each folder among them replaced by the logs in it (:func:`find_logs`); other paths are
    kept as given (not checked here), except shard logs: the shard logs of one sigma stand as their main log's
    path, once (read as one log by :func:`read_log`; the merged log once it exists).

    Raises:
        ReportError: a folder holds no log, or (``one_log_each``, as ``--compare`` needs: every later log is
            compared with the first) more than one, naming them.
    """
    paths: list[Path] = []
    for f in map(Path, files):
        if not f.is_dir():
            main = main_of_shard(f)
            if main is None or main not in paths:  # several shard logs of one sigma given: one log
                paths.append(main or f)
            continue
        if not (found := find_logs(f)):
            raise ReportError(f"{f} is a folder with no certification log (*_sigma*.tsv) in it")
        if one_log_each and len(found) > 1:
            raise ReportError(
                f"--compare: {f} holds {len(found)} logs ({', '.join(p.name for p in found[:4])}"
                f"{' ...' if len(found) > 4 else ''}); give the logs to compare as files"
            )
        paths += found
    return paths


def report(
    files: list[str | Path],
    radii: tuple[float, ...] | None = None,
    markdown: str | Path | None = None,
    csv_path: str | Path | None = None,
    plot: str | Path | None = None,
    paired: bool = False,
) -> Table:
    """Read ``files`` (a folder stands for the logs in it, :func:`find_logs`), print the table, and write the
    optional Markdown / CSV / PNG outputs. With ``paired``, also print :func:`compare` of every later log against
    the first, add it to the Markdown, and write it as ``<csv stem>_paired.csv`` beside the CSV; the table then
    has no best-sigma row (the logs are different classifiers).

    Raises:
        LogError: a file cannot be read as a log (:func:`read_log`); ``ReportError`` (the same class)
            when ``files`` is empty, a folder holds no log, ``paired`` has fewer than two logs, or (``paired``)
            the logs are not of the same images.
    """
    paths = expand_folders(files, one_log_each=paired)
    if paired and len(paths) < 2:
        raise ReportError(f"--compare compares logs with the first one: give at least two (got {len(paths)})")
    logs = [read_log(f) for f in paths]
    for lg, name in zip(logs, distinct_names(paths), strict=True):
        lg.name = name
    table = summarize(logs, radii, best=not paired)
    print(table.text())
    if markdown:
        Path(markdown).write_text(table.markdown())
    if csv_path:
        Path(csv_path).write_text(table.csv())
    if plot:
        plot_curves(logs, plot, best=not paired, radii=table.radii)
    comparisons = [compare(logs[0], lg, table.radii) for lg in logs[1:]] if paired else []  # after the files: a
    for c in comparisons:  # refused pair loses none of them
        print("\n" + c.text())
    if markdown and comparisons:
        Path(markdown).write_text("\n".join([table.markdown(), *(c.markdown() for c in comparisons)]))
    if csv_path and comparisons:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(
            [
                "a",
                "b",
                "sigma_a",
                "sigma_b",
                "images",
                "radius",
                "value_a",
                "value_b",
                "difference",
                "paired_se",
                "mcnemar_p",
            ]
        )
        w.writerows(row for c in comparisons for row in c.csv_rows())
        Path(csv_path).with_name(Path(csv_path).stem + "_paired.csv").write_text(buf.getvalue())
    return table
