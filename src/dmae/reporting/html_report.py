"""``dmae report --html``: one self-contained HTML page for a run, readable offline.

Every figure is a PNG embedded as a ``data:`` URI and the style sheet is inline, so the file can be mailed or
archived and opened without a network. Sections, each present even when it has nothing to show (it then says
why): settings (resolved configs, certification settings, versions), training curves (pretraining and
fine-tuning losses and evaluations), the reconstruction figure, the certified-accuracy table (best sigma per
radius, the paper's Tables 1-2 layout) with ACR, abstention and compute (samples per image, total forward
passes), the certified-accuracy curves, and per-image examples (certified, abstained and misclassified test
images with their class and radius, redrawn from the data set the logs name).

Inputs: certification logs and/or run folders (``dmae demo``'s output, an experiment's output folder, or any
folder holding training runs and logs); a run folder is searched recursively.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import platform
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import dmae
from dmae.errors import DmaeError, InputError, MissingFileError
from dmae.reporting.figures import png_bytes, pyplot
from dmae.reporting.report import (
    CertLog,
    compare,
    curves_figure,
    distinct_names,
    expand_folders,
    find_logs,
    fixed_n_passes,
    forward_passes,
    read_log,
    read_meta,
    summarize,
)

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}pre{background:#f7f7f7;padding:.6em;
overflow-x:auto;font-size:.85em}.figs{display:flex;flex-wrap:wrap;gap:1em}.ex{display:inline-block;margin:.3em;
text-align:center;font-size:.8em}.ex img{width:84px;height:84px;image-rendering:pixelated;border:1px solid #999}
.note{color:#666;font-style:italic}.wide{max-width:560px;height:auto}"""


_TMP_COPY = re.compile(r"\.tmp\d+$")  # the temporary folder of the demo's copy of the shipped checkpoint


@dataclass
class RunContents:
    """What a report shows: certification logs, training runs (folders with ``config.yaml`` and ``log.jsonl``)
    and figures (PNG files) found in the inputs."""

    logs: list[Path] = field(default_factory=list)
    given: int = 0  # the first ``given`` logs are the files given (a folder given as a file: its logs), in order
    training: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)


def discover(files: list[str | Path], runs: list[str | Path]) -> RunContents:
    """Collect the logs given (a folder among them stands for its logs, as in ``dmae report``) and everything
    under the run folders (logs ``*_sigma*.tsv`` without rank or non-finite side files, training runs,
    reconstruction figures).

    Raises:
        FileNotFoundError: a given file or folder does not exist.  ReportError: a folder given as a log holds none.
    """
    found = RunContents()
    if missing := next((f for f in map(Path, files) if not f.exists()), None):
        raise MissingFileError(f"no such log: {missing}")
    found.logs = expand_folders(files)
    found.given = len(found.logs)
    for r in map(Path, runs):
        if not r.is_dir():
            if r.is_file():  # --run-dir takes every value after it, log files included
                raise MissingFileError(f"--run-dir takes folders, and {r} is a file: give log files before --run-dir")
            raise MissingFileError(f"no such run folder: {r}")
        found.logs += find_logs(r)
        # a folder NAME.tmp<pid> is a copy being written (or left by a killed process), not a run
        runs_found = [
            p.parent
            for p in r.rglob("log.jsonl")
            if (p.parent / "config.yaml").is_file()
            and not any(_TMP_COPY.search(part) for part in p.parent.relative_to(r).parts)
        ]
        # pretraining runs (they export model.safetensors) first: the order a run was made in
        found.training += sorted(runs_found, key=lambda d: (not (d / "model.safetensors").is_file(), str(d)))
        found.figures += sorted(p for p in r.rglob("*.png") if "reconstruction" in p.name)
    return found


def _png(fig: Any) -> str:
    """A matplotlib figure as an ``<img>`` tag with the PNG inline."""
    return _img(png_bytes(fig, dpi=100))


def _img(png: bytes, alt: str = "figure", cls: str = "") -> str:
    return (
        f'<img alt="{html.escape(alt)}"{f" class={cls!r}" if cls else ""} '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
    )


def _table(head: list[str], body: list[list[str]]) -> str:
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + rows + "</table>"


def read_records(log: Path) -> list[dict]:
    """The records of a run's ``log.jsonl``; a torn line (a run killed while writing) is skipped."""
    return read_records_counted(log)[0]


def read_records_counted(log: Path) -> tuple[list[dict], list[int]]:
    """The JSON-object records of ``log.jsonl`` and the 1-based numbers of the lines skipped (torn by a run
    killed while writing, or not a JSON object), so a report can say what it left out."""
    out, skipped = [], []
    for n, ln in enumerate(log.read_text().splitlines(), start=1):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        elif ln.strip():
            skipped.append(n)
    return out, skipped


def _points(recs: list[dict], key: str) -> list[tuple[float, float]]:
    """(step, value) of the records that hold a number under both ``step`` and ``key``."""
    num = (int, float)
    return [(r["step"], r[key]) for r in recs if isinstance(r.get("step"), num) and isinstance(r.get(key), num)]


def training_section(runs: list[Path]) -> str:
    """Loss curves and evaluations of each training run, one figure per run."""
    if not runs:
        return '<p class="note">No training runs in the inputs.</p>'
    plt, parts = pyplot(), []
    for run in runs:
        recs, skipped = read_records_counted(run / "log.jsonl")
        train = [r for r in recs if r.get("type") == "train"]
        evals = [r for r in recs if r.get("type") == "eval"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3))
        if pts := _points(train, "loss"):
            axes[0].plot(*zip(*pts, strict=True))
        axes[0].set(xlabel="step", ylabel="training loss", title=run.name)
        for key in sorted({k for r in evals for k in r if k not in ("type", "step", "epoch")}):
            if pts := _points(evals, key):
                axes[1].plot(*zip(*pts, strict=True), marker="o", label=key)
        axes[1].set(xlabel="step", ylabel="evaluation", title="held-out evaluations")
        if evals:
            axes[1].legend(fontsize=7)
        last = evals[-1] if evals else {}
        text = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if isinstance(v, float) and k != "epoch")
        torn = (
            (
                f'<p class="note">{html.escape(str(run / "log.jsonl"))}: line(s) '
                f"{', '.join(map(str, skipped[:10]))} not read (not a JSON record: torn by a run killed while "
                "writing?)</p>"
            )
            if skipped
            else ""
        )
        parts.append(
            f"<h3>{html.escape(str(run))}</h3>{_png(fig)}<p>last evaluation: {html.escape(text) or '-'}</p>"
            + torn
            + _provenance(run)
        )
    return "".join(parts)


def _provenance(run: Path) -> str:
    """How a shipped checkpoint's run was made (its PROVENANCE.json), or nothing for a run made here."""
    from dmae.checkpoint import read_provenance

    p = read_provenance(run)
    if p is None:
        return ""
    return (
        f'<p class="note">Shipped checkpoint, made by <code>{html.escape(str(p["command"]))}</code> in '
        f"{p['cpu_minutes']:.1f} CPU-minutes ({p['wall_minutes']:.1f} min wall, torch {html.escape(str(p['torch']))}); "
        f"weights sha256 {html.escape(str(p['sha256']))}.</p>"
    )


def settings_section(contents: RunContents) -> str:
    """The resolved config of every training run and the settings of every certification log, plus versions."""
    import torch

    parts = [
        _table(
            ["package", "version"],
            [
                ["dmae", dmae.__version__],
                ["torch", torch.__version__],
                ["python", platform.python_version()],
                ["machine", platform.machine()],
            ],
        )
    ]
    for run in contents.training:
        parts.append(
            f"<details><summary>{html.escape(str(run / 'config.yaml'))}</summary>"
            f"<pre>{html.escape((run / 'config.yaml').read_text())}</pre></details>"
        )
    for log in contents.logs:
        if meta := read_meta(log):
            shown = {k: v for k, v in meta.items() if k != "config"}
            parts.append(
                f"<details><summary>{html.escape(str(log.with_suffix('.json')))}</summary>"
                f"<pre>{html.escape(json.dumps(shown, indent=1))}</pre></details>"
            )
        else:
            parts.append(
                f'<p class="note">{html.escape(str(log))}: no settings recorded (no '
                f"{html.escape(log.with_suffix('.json').name)} beside it)</p>"
            )
    return "".join(parts)


def log_groups(paths: list[Path]) -> dict[str, list[int]]:
    """Positions of the logs that belong in one table: same folder (one classifier) and same kind of log
    (``certify`` / ``sequential`` / ``predict``), so a "best sigma" row never mixes models or procedures."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        groups.setdefault(f"{p.parent} ({p.name.split('_sigma')[0]})", []).append(i)
    return groups


def certification_section(logs: list[CertLog], paths: list[Path], radii: tuple[float, ...] | None = None) -> str:
    """Per group of logs (:func:`log_groups`): the certified-accuracy table (best sigma per radius) at ``radii``
    (default: the data set's, :func:`dmae.reporting.report.summarize`) and the curves, marked at them; then the forward
    passes spent in all."""
    if not logs:
        return '<p class="note">No certification logs in the inputs.</p>'
    lines = []
    for label, members in log_groups(paths).items():
        table = summarize([logs[i] for i in members], radii)
        head, body = table.cells()
        lines += [
            f"<h3>{html.escape(label)}</h3>",
            _table(head, body),
            *(f'<p class="note">{html.escape(n)}</p>' for n in table.notes),
            _png(curves_figure([logs[i] for i in members], title="certified accuracy vs radius", radii=table.radii)),
        ]
    passes = [forward_passes(lg) for lg in logs]
    total = sum(x for x in passes if x is not None)
    fixed = [fixed_n_passes(lg) if x is not None else x for lg, x in zip(logs, passes, strict=True)]
    saved = sum(x for x in fixed if x is not None)
    if all(x is None for x in passes):
        return "".join(lines) + "<p>Forward passes: unknown (the logs do not say their n0 / n)</p>"
    lines.append(
        f"<p>Forward passes in all: {total:,}"
        + (" (some logs do not say)" if None in passes else "")
        + (
            f"; fixed-n CERTIFY with the sequential logs' n_max as n would have drawn {saved:,} "
            f"({saved / total:.1f}x more)"
            if total and saved > total
            else ""
        )
        + "</p>"
    )
    return "".join(lines)


def _thumb(x: Any) -> bytes:
    """A ``[C, H, W]`` image in [0, 1] (values outside are clipped for display only) as PNG bytes."""
    from PIL import Image

    arr = (np.clip(x.numpy().transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def pick_examples(lg: CertLog, k: int) -> dict[str, list[int]]:
    """Rows (positions in the log) to show: the ``k`` certified images with the largest radii, the first ``k``
    abstentions and the first ``k`` misclassified images (for a ``--candidate label`` log: certified correct and
    not certified correct, the only two kinds of row it has)."""
    order = np.argsort(-lg.radius, kind="stable")
    certified = [int(i) for i in order if lg.correct[i] == 1][:k]
    abstained = [i for i in range(len(lg)) if lg.predict[i] == -1][:k]
    if lg.candidate == "label":  # rows certify the label: -1 is "not certified correct", nothing is misclassified
        return {"certified correct": certified, "not certified correct (misclassified or not certifiable)": abstained}
    return {
        "certified": certified,
        "abstained": abstained,
        "misclassified": [i for i in range(len(lg)) if lg.predict[i] not in (-1, lg.label[i])][:k],
    }


def examples_section(logs: list[CertLog], paths: list[Path], k: int = 4, seed: int = 0) -> str:
    """Per log: a few certified, abstained and misclassified test images, each clean and under one noise draw
    at the log's sigma, with label, prediction and radius (images read from the data set the log's JSON names).
    A log whose images cannot be read (no JSON naming a data set, no idx column, a data set not on this
    machine, an idx or label outside it) gets a line saying why; the rest of the page is unaffected."""
    import torch

    if not logs:
        return '<p class="note">No certification logs in the inputs.</p>'
    parts: list[str] = []
    datasets: dict[tuple[Any, ...], Any] = {}  # logs of one data set and split share the images: read them once
    for lg, path in zip(logs, paths, strict=True):
        try:
            ds, idx = _log_images(lg, path, datasets)
        except Exception as e:  # the page still renders; it says why the images are missing
            why = str(e) if isinstance(e, _NoImages) else f"{type(e).__name__}: {e}"
            parts.append(f"<h3>{html.escape(lg.name)}</h3><p class='note'>images unavailable: {html.escape(why)}</p>")
            continue
        names = getattr(ds, "classes", None)
        name = functools.partial(_class_name, names)
        gen = torch.Generator().manual_seed(seed)
        sigma = "unknown" if lg.sigma is None else f"{lg.sigma:g}"
        parts.append(f"<h3>{html.escape(lg.name)} (sigma = {sigma})</h3>")
        for kind, rows in pick_examples(lg, k).items():
            cells = []
            for i in rows:
                if not 0 <= int(idx[i]) < len(ds):
                    cells.append(f"<p class='note'>#{idx[i]}: no such image in a data set of {len(ds)}</p>")
                    continue
                x = ds[int(idx[i])][0]
                noisy = x + torch.randn(x.shape, generator=gen) * (lg.sigma or 0.0)
                none = "not certified" if lg.candidate == "label" else "abstain"
                pred = none if lg.predict[i] == -1 else name(int(lg.predict[i]))
                cells.append(
                    f"<div class='ex'>{_img(_thumb(x), 'clean', 'ex')}{_img(_thumb(noisy), 'noisy', 'ex')}<br>"
                    f"#{idx[i]} {html.escape(str(name(int(lg.label[i]))))} -> {html.escape(str(pred))}, "
                    f"r = {lg.radius[i]:.3f}</div>"
                )
            parts.append(f"<h4>{kind} ({len(rows)})</h4>" + ("".join(cells) or "<p class='note'>none</p>"))
    return "".join(parts)


def _class_name(names: Sequence[str] | None, c: int) -> str | int:
    """Class ``c``'s name in the data set's ``names``; a label outside them (or no names): its number."""
    return names[c] if names and 0 <= c < len(names) else c


class _NoImages(DmaeError):
    """Why a log's images cannot be shown, in words for the page."""


def _log_images(lg: CertLog, path: Path, cache: dict[tuple[Any, ...], Any]) -> tuple[Any, np.ndarray]:
    """The data set a log's rows index (cached in ``cache`` by data set, split and root) and the log's idx column.

    Raises:
        _NoImages: the log has no idx column or its JSON names no data set (a hand-made log).  Anything
            :func:`dmae.data.build_dataset` raises (a data set not on this machine).
    """
    from dmae.data import DATASET_NAMES, build_dataset, build_transform, dataset_info

    if lg.idx is None:
        raise _NoImages("the log has no idx column naming its images")
    if not lg.meta.get("data"):
        why = "lacks the key data" if lg.meta else "does not exist"
        raise _NoImages(
            f"no data set recorded ({path.with_suffix('.json').name} beside the log {why}); the rows "
            "cannot be matched to images"
        )
    if lg.meta["data"] not in DATASET_NAMES:  # dmae.certify over a data set of the caller's own
        raise _NoImages(
            f"the log certifies a data set of your own ({lg.meta['data']!r}), which the report cannot read back; "
            "the table, curves and settings above are complete"
        )
    info = dataset_info(lg.meta["data"])
    key = (lg.meta["data"], lg.meta.get("split") or info.splits[1], (lg.meta.get("config") or {}).get("data_root"))
    if key not in cache:
        cache[key] = build_dataset(*key, build_transform(info, False, info.size or 224))
    return cache[key], lg.idx


def comparison_section(logs: list[CertLog], radii: tuple[float, ...] | None = None) -> str:
    """Every later log against the first, paired on the same images at ``radii``
    (:func:`dmae.reporting.report.compare`): one table each, with its header and notes, the logs under their names
    on the page.

    Raises:
        ReportError: the logs are not of the same images (see :func:`dmae.reporting.report.compare`).
    """
    parts = []
    for c in (compare(logs[0], lg, radii) for lg in logs[1:]):
        head, body = c.cells()
        parts += [
            f"<h3>{html.escape(c.header())}</h3>",
            _table(head, body),
            *(f'<p class="note">Note: {html.escape(n)}</p>' for n in c.notes),
        ]
    return "".join(parts)


def build_html(
    contents: RunContents,
    title: str = "dmae report",
    examples: int = 4,
    paired: bool = False,
    radii: tuple[float, ...] | None = None,
) -> str:
    """The whole page as a string (see the module docstring for its sections); with ``paired``, a section that
    compares every later given log with the first (:func:`comparison_section`). Tables and comparisons are at
    ``radii`` ([0, 1] pixel units; default: the data set's standard radii).

    Raises:
        LogError: a log cannot be read (file and line named); ReportError (the same class): ``paired`` and the
            given logs are not of the same images.
    """
    logs = [read_log(p) for p in contents.logs]
    for lg, name in zip(
        logs, distinct_names(contents.logs), strict=True
    ):  # two runs' certify/sequential_sigma0.25 told apart
        lg.name = name
    figs = "".join(_img(p.read_bytes(), p.name, "wide") + f"<p>{html.escape(str(p))}</p>" for p in contents.figures)
    paired_html = comparison_section(logs[: contents.given], radii) if paired and contents.given > 1 else ""
    sections = [
        ("Certified accuracy", certification_section(logs, contents.logs, radii)),
        *([("Paired comparisons", paired_html)] if paired_html else []),
        ("Training curves", training_section(contents.training)),
        ("Reconstructions", figs or '<p class="note">No reconstruction figure in the inputs.</p>'),
        ("Per-image examples", examples_section(logs, contents.logs, examples)),
        ("Settings", settings_section(contents)),
    ]
    body = "".join(f'<h2 id="{t.split()[0].lower()}">{t}</h2>{s}' for t, s in sections)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style>"
        f"</head><body><h1>{html.escape(title)}</h1><p class='note'>written {stamp} by dmae {dmae.__version__}</p>"
        f"{body}</body></html>"
    )


def write_html_report(
    path: str | Path,
    files: list[str | Path],
    runs: list[str | Path],
    title: str = "dmae report",
    paired: bool = False,
    radii: tuple[float, ...] | None = None,
) -> Path:
    """Write the page for ``files`` (logs) and ``runs`` (folders) to ``path`` (atomically); returns it. With
    ``paired`` (``dmae report --compare``), it includes the paired comparisons of the logs in ``files``; its
    tables are at ``radii`` (``--radii``; default: the data set's standard radii).

    Raises:
        FileNotFoundError: an input does not exist.  ValueError: no input at all.  LogError: a bad log, or
            (``paired``) logs of different images.
    """
    if not files and not runs:
        raise InputError("give certification logs and/or --run-dir folders to report on")
    page = build_html(discover(files, runs), title, paired=paired, radii=radii)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path
