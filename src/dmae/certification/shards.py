"""Shards: one certification split over independent jobs (a Slurm job array, preemptible machines), then merged.

``--shard K/N`` certifies the images at positions K, K + N, K + 2N, ... of the planned list (every ``skip``-th image
of the split, at most ``max`` of them) into a log of its own beside the main one::

    {mode}_sigma{S}.shard-{K}-of-{N}.tsv    the rows, in the main log's format
    {mode}_sigma{S}.shard-{K}-of-{N}.json   the settings: the main log's, plus "shard": [K, N]

A shard log is a log like any other: rerunning its command resumes it, other settings are refused, and under
torchrun its ranks write ``.rank{r}`` files that are folded into it. The noise of image ``idx`` depends only on
(seed, idx), so a shard's rows are the rows a single run writes for its images (the time column aside).

:func:`read_shards` reads the shard files of one sigma as one set and checks that they are one split of one run: a
single N, the same row settings in every JSON (the key and both values named otherwise), no image in two shards,
each image in the shard it belongs to. The images still missing are listed, never hidden. ``dmae certify --merge``
writes the set into the main log (:func:`write_merged`); ``dmae report`` reads an unmerged set as one log.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmae.certification.log import (
    CERTIFY_HEADER,
    PREDICT_HEADER,
    SEQUENTIAL_HEADER,
    LogError,
    merge_rank_files,
    write_json,
    write_rows,
)
from dmae.errors import InputError

# a shard's TSV or JSON; a ``.nonfinite.tsv`` side file or a ``.rank{r}`` file of a shard does not match
SHARD_NAME = re.compile(r"^(?P<main>.+)\.shard-(?P<k>\d+)-of-(?P<n>\d+)\.(?:tsv|json)$")
HEADERS = {"certify": CERTIFY_HEADER, "predict": PREDICT_HEADER, "sequential": SEQUENTIAL_HEADER}  # by JSON "mode"


class ShardError(LogError):
    """Shard files that do not make one log (several N, other settings, an image in two shards or in the wrong
    one, images missing); the message names the files, the images and what to do."""


def parse_shard(value: str) -> tuple[int, int]:
    """``"K/N"`` (``--shard``) as ``(K, N)``: shard K of N, numbered from 0.

    Raises:
        ValueError: not two integers K/N, N < 1, or K outside 0..N-1, naming the value.
    """
    m = re.fullmatch(r"\s*([+-]?\d+)\s*/\s*([+-]?\d+)\s*", value) if isinstance(value, str) else None
    if m is None:
        raise InputError(
            f"--shard takes K/N, two integers: this job's shard K of N shards, 0 <= K < N (e.g. --shard 0/10); "
            f"got {value!r}"
        )
    k, n = int(m[1]), int(m[2])
    if n < 1:
        raise InputError(f"--shard {value}: N, the number of shards, must be >= 1; got {n}")
    if not 0 <= k < n:
        raise InputError(f"--shard {value}: K must be in 0..{n - 1} (the {n} shards are numbered from 0); got {k}")
    return k, n


def shard_log_path(main_file: Path, k: int, n: int) -> Path:
    """The log of shard ``k`` of ``n`` of the main log ``main_file`` (``X.tsv`` -> ``X.shard-K-of-N.tsv``)."""
    return main_file.with_name(f"{main_file.stem}.shard-{k}-of-{n}.tsv")


def main_of_shard(path: Path) -> Path | None:
    """The main log a shard's TSV or JSON belongs to (``X.shard-K-of-N.tsv`` -> ``X.tsv``); None for other files."""
    m = SHARD_NAME.match(path.name)
    return path.with_name(m["main"] + ".tsv") if m else None


def shard_images(planned: Sequence[int], k: int, n: int) -> list[int]:
    """The images of shard ``k`` of ``n``: positions k, k + n, ... of the ``planned`` image indices."""
    return list(planned[k::n])


def planned_images(meta: dict[str, Any]) -> list[int]:
    """The image indices a run planned, from its JSON: the first ``images`` of every ``skip``-th image (what
    :func:`dmae.certification.runner.selected_indices` selects: always 0, skip, 2 skip, ...)."""
    return list(range(0, int(meta["skip"]) * int(meta["images"]), int(meta["skip"])))


def shard_files(main_file: Path) -> dict[tuple[int, int], Path]:
    """Every shard of ``main_file`` found beside it (by its TSV or its JSON), as ``{(K, N): TSV path}``, sorted."""
    found = {}
    for p in main_file.parent.glob(glob.escape(f"{main_file.stem}.shard-") + "*"):
        m = SHARD_NAME.match(p.name)
        if m and m["main"] == main_file.stem:
            k, n = int(m["k"]), int(m["n"])
            found[(k, n)] = shard_log_path(main_file, k, n)
    return dict(sorted(found.items(), key=lambda kv: (kv[0][1], kv[0][0])))


def setting_changes(old: dict[str, Any], new: dict[str, Any], keys: Sequence[str]) -> str:
    """``"key: old -> new, ..."`` for each of ``keys`` whose values differ ("" when none does)."""
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


@dataclass
class ShardSet:
    """The shard files of one sigma read as one log: ``rows`` by image index (lines of the main log's format),
    ``meta`` the settings they share (the first shard's JSON without its ``shard``), the ``planned`` image indices
    of the whole run, and per shard K present its TSV (``files``); ``n`` the number of shards."""

    main_file: Path
    n: int
    files: dict[int, Path]
    meta: dict[str, Any]
    header: tuple[str, ...]
    rows: dict[int, str]
    planned: list[int]

    @property
    def missing(self) -> list[int]:
        """The planned images no shard holds yet, in order."""
        return [i for i in self.planned if i not in self.rows]

    def progress(self) -> str:
        """What each unfinished shard holds: ``"shard 1/3 has 3 of 7 images, shard 2/3 has no file"``."""
        parts = []
        for k in range(self.n):
            mine = shard_images(self.planned, k, self.n)
            done = sum(i in self.rows for i in mine)
            if k not in self.files:
                parts.append(f"shard {k}/{self.n} has no log (not started)")
            elif done < len(mine):
                parts.append(f"shard {k}/{self.n} has {done} of {len(mine)} images")
        return ", ".join(parts)

    def missing_text(self) -> str:
        """The images missing, counted and named (the first ten), and which shards lack them."""
        missing = self.missing
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        return (
            f"{self.main_file}: the shards hold {len(self.planned) - len(missing)} of the "
            f"{len(self.planned)} planned images; {len(missing)} missing (idx {shown}): {self.progress()}"
        )


def _read_shard_meta(path: Path, k: int, n: int) -> dict[str, Any]:
    """A shard's JSON, checked to name the shard its file name says.

    Raises:
        ShardError: no JSON, not readable JSON, or a ``shard`` other than ``[k, n]`` (a renamed file).
    """
    meta_file = path.with_suffix(".json")
    if not meta_file.is_file():
        raise ShardError(
            f"{path.name} has no settings file {meta_file.name} (a shard's run writes it before its first row): "
            "not a shard log of dmae; move it away"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{meta_file} is not readable JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("shard") != [k, n]:
        got = meta.get("shard") if isinstance(meta, dict) else meta
        raise ShardError(f"{meta_file} records shard {got!r}, and its name says shard {k}/{n}: a renamed file?")
    return meta


def _one_split(main_file: Path, found: dict[tuple[int, int], Path]) -> int:
    """The number of shards N all of ``found`` share.

    Raises:
        ShardError: none found, or files of several N (which shards of each N named).
    """
    if not found:
        raise ShardError(
            f"no shard logs of {main_file.name} in {main_file.parent} (named {main_file.stem}.shard-K-of-N.tsv): "
            "certify each shard K of N first (--shard K/N), with the same --output-dir"
        )
    ns = sorted({n for _, n in found})
    if len(ns) > 1:
        split = "; ".join(f"N = {n}: shards {', '.join(str(k) for k, m in found if m == n)}" for n in ns)
        raise ShardError(
            f"the shard logs of {main_file.name} in {main_file.parent} split the images into different numbers of "
            f"shards ({split}): one log is one split; move the files of the other N away"
        )
    return ns[0]


def _same_settings(main_file: Path, metas: dict[int, dict[str, Any]], n: int, keys: Sequence[str]) -> None:
    """Every shard's JSON records the first one's ``keys``.

    Raises:
        ShardError: naming the key, both values and both files.
    """
    first = min(metas)
    for k, meta in metas.items():
        if k != first and (diff := [key for key in keys if meta.get(key) != metas[first].get(key)]):
            a, b = (shard_log_path(main_file, j, n).with_suffix(".json").name for j in (first, k))
            detail = "; ".join(
                f"{key} is {metas[first].get(key)!r} in {a} and {meta.get(key)!r} in {b}" for key in diff
            )
            raise ShardError(
                f"the shards of {main_file.name} were certified with different settings ({detail}): the shards of "
                f"one log need the same ones; rerun shard {k}/{n} with the others' options (its files moved away)"
            )


def read_shards(
    main_file: Path,
    keys: Sequence[str],
    header: tuple[str, ...] | None = None,
    planned: Sequence[int] | None = None,
    include_main: bool = False,
) -> ShardSet:
    """Read the shard logs of ``main_file`` (and their ``.rank{r}`` files) as one :class:`ShardSet`.

    Args:
        keys: the JSON keys every shard must share (the settings that change rows, and the planned image count).
        header: the log's columns (default: from the JSON's ``mode``).
        planned: the run's image indices (default: from the JSON, :func:`planned_images`).
        include_main: also take the rows of ``main_file`` itself (a partial merge, a single run): a shard's row
            replaces the main log's row of the same image.
    Raises:
        ShardError: no shard, several N, JSONs that differ in ``keys`` or name another shard, an image in two shards
            (both named), an image outside its shard's share.  LogError: a file that is not a log of ``header``.
    """
    found = shard_files(main_file)
    n = _one_split(main_file, found)
    metas = {k: _read_shard_meta(path, k, n) for (k, _), path in found.items()}
    _same_settings(main_file, metas, n, keys)
    meta = {key: v for key, v in metas[min(metas)].items() if key != "shard"}
    header = header or HEADERS[meta.get("mode", "certify")]
    planned = list(planned) if planned is not None else planned_images(meta)
    rows: dict[int, str] = {}
    owner: dict[int, int] = {}
    for (k, _), path in found.items():
        mine = set(shard_images(planned, k, n))
        for i, line in merge_rank_files(path, header, remove=False).items():
            if i in owner:
                raise ShardError(
                    f"idx {i} is in two shards of {main_file.name}: {shard_log_path(main_file, owner[i], n).name} and "
                    f"{path.name}; shards must not overlap (a file copied or renamed?): move the wrong one away"
                )
            if i not in mine:
                raise ShardError(f"{path.name} holds idx {i}, which is not one of shard {k}/{n}'s images")
            owner[i] = k
            rows[i] = line
    if include_main:
        rows = {**merge_rank_files(main_file, header, remove=False), **rows}
    files = {k: path for (k, _), path in found.items() if path.exists()}
    return ShardSet(main_file, n, files, meta, header, rows, planned)


def write_merged(shards: ShardSet, meta: dict[str, Any]) -> None:
    """Write ``shards`` as the main log: its JSON ``meta`` first, then the rows sorted by index (each file atomic),
    and the shards' ``.nonfinite.tsv`` records gathered beside it."""
    write_json(shards.main_file.with_suffix(".json"), meta)
    write_rows(shards.main_file, shards.header, shards.rows)
    side = [shards.main_file.with_suffix(".nonfinite.tsv")]
    side += [p.with_suffix(".nonfinite.tsv") for p in shards.files.values()]
    # whole lines only (idx, non-finite samples, samples): a line torn by a crash is left out
    lines = {ln for p in side if p.is_file() for ln in p.read_text().splitlines() if len(ln.split("\t")) == 3}
    if lines:
        text = "".join(ln + "\n" for ln in sorted(lines, key=lambda ln: int(ln.split("\t")[0])))
        tmp = side[0].with_name(f".{side[0].name}.tmp")
        tmp.write_text(text)
        tmp.replace(side[0])
