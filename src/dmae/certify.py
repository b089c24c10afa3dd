"""``dmae certify`` / ``dmae predict``: run CERTIFY or PREDICT over a data set, one TSV row per image.

Rows follow the field's common format (tab-separated, header first) so existing analysis scripts read them:
``idx label predict radius correct time`` for CERTIFY, ``idx label predict correct time`` for PREDICT
(``predict`` = -1 on abstain; ``time`` in seconds). One file per sigma, ``{mode}_sigma{S}.tsv``, with a
``.json`` beside it holding the settings.

Runs are resumable and shardable without changing a single row: the noise of image ``idx`` depends only on
(seed, idx), every row is flushed as soon as its group of images is done, and re-running the same command
skips the images already in the file (a torn last line is dropped). Under ``torchrun`` each rank takes every
world-size-th remaining image into its own ``.rank{r}`` file; rank 0 merges them into the main file in
index order at the end (a later single-process run also picks up rank files left by an interrupted one).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from dmae import checkpoint as ckpt
from dmae.config import option, to_dict
from dmae.data import build_dataset, build_transform, dataset_info, num_classes_of
from dmae.distributed import DistInfo, barrier
from dmae.engine import launch
from dmae.models.classifier import ViTClassifier
from dmae.smoothing import Smooth, check_alpha

CERTIFY_HEADER = ("idx", "label", "predict", "radius", "correct", "time")
PREDICT_HEADER = ("idx", "label", "predict", "correct", "time")
# settings that change the rows; a resumed file must have been written with the same ones
ROW_SETTINGS = ("mode", "checkpoint", "data", "split", "sigma", "n0", "n", "alpha", "seed", "skip")


@dataclass
class CertifyConfig:
    """Every option of ``dmae certify`` and ``dmae predict``."""

    checkpoint: Optional[str] = option(None, "a fine-tuning run folder, model_best/model_last.safetensors, or a classifier checkpoint")
    data: Literal["fashion-mnist", "cifar10", "imagenet", "folder"] = option("fashion-mnist", "data set")
    data_root: Optional[str] = option(None, "data set directory (default: found automatically)")
    split: Optional[str] = option(None, "split to certify (default: the evaluation split: test or val)")
    sigma: Optional[tuple[float, ...]] = option(None, "noise level(s), one output file each (default: the run's training sigma)")
    n0: int = option(100, "CERTIFY: noise samples that select the class")
    # --num-samples: torchrun's parser mistakes a bare --n for an abbreviation of its own options
    n: int = option(100_000, "noise samples that estimate (CERTIFY) or vote (PREDICT); alias --num-samples",
                    aliases=("--num-samples",))
    alpha: float = option(0.001, "failure probability")
    skip: int = option(1, "certify every skip-th image (ImageNet protocol: 50)")
    max: Optional[int] = option(None, "stop after this many images (after skipping)")
    batch: int = option(1000, "noise samples per forward pass")
    seed: int = option(0, "seed of all noise; with it every row is reproducible")
    output_dir: str = option("runs/certify", "where the TSV (and JSON) files go")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    precision: Literal["auto", "bf16", "fp32"] = option("auto", "auto: bf16 autocast on GPUs, fp32 on CPUs")
    compile: bool = option(False, "torch.compile the classifier (GPUs; compiles once per batch shape)")
    progress: bool = option(True, "show a progress bar")

    def validate(self, mode: str) -> None:
        if not self.checkpoint:
            raise ValueError("--checkpoint is required")
        dataset_info(self.data)
        for s in self.sigma or ():
            if not s > 0:
                raise ValueError(f"sigma must be > 0, got {s}")
        if mode == "certify" and self.n0 < 1:
            raise ValueError(f"--n0 must be >= 1, got {self.n0}")
        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        check_alpha(self.alpha)
        if self.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {self.batch}")
        if self.skip < 1:
            raise ValueError(f"--skip must be >= 1, got {self.skip}")
        if self.max is not None and self.max < 1:
            raise ValueError(f"--max must be >= 1, got {self.max}")


@dataclass
class CertifyRun:
    """The files one sigma produced, and how many rows were added by this call."""

    sigma: float
    path: Path
    rows_added: int
    rows_total: int


def _fmt_row(mode: str, idx: int, label: int, pred: int, radius: float, seconds: float) -> str:
    correct = int(pred == label)
    if mode == "certify":
        return f"{idx}\t{label}\t{pred}\t{radius:.6f}\t{correct}\t{seconds:.4f}\n"
    return f"{idx}\t{label}\t{pred}\t{correct}\t{seconds:.4f}\n"


def read_rows(path: Path, header: tuple[str, ...]) -> dict[int, str]:
    """Complete rows of a (possibly interrupted) log by image index; a torn last line is left out."""
    if not path.exists():
        return {}
    text = path.read_text()
    lines = text.split("\n")
    if not lines or tuple(lines[0].split("\t")) != header:
        raise ValueError(f"{path}: not a {' '.join(header)} log (header {lines[0][:80]!r})")
    rows: dict[int, str] = {}
    body = lines[1:]
    complete = body[:-1]  # the part after the final newline is either empty or torn
    for ln in complete:
        if not ln.strip():
            continue
        fields = ln.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{path}: malformed row {ln[:80]!r}")
        rows.setdefault(int(fields[0]), ln + "\n")
    return rows


def _rewrite(path: Path, header: tuple[str, ...], rows: dict[int, str]) -> None:
    """Atomically write ``rows`` sorted by index under the header."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write("\t".join(header) + "\n")
        for i in sorted(rows):
            f.write(rows[i])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve_checkpoint(path: str) -> tuple[Path, dict]:
    """A classifier file from a path that may be a run folder; the run's config (if any) for defaults."""
    import yaml

    p = Path(path)
    if p.is_dir():
        for name in ("model_best.safetensors", "model_last.safetensors", "checkpoint.pt"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise FileNotFoundError(f"{path} holds no model_best.safetensors, model_last.safetensors or checkpoint.pt")
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    cfg_file = p.parent / "config.yaml"
    run_cfg = (yaml.safe_load(cfg_file.read_text()) or {}) if cfg_file.is_file() else {}
    return p, run_cfg


def run_certification(cfg: CertifyConfig, mode: Literal["certify", "predict"] = "certify") -> list[CertifyRun]:
    """Certify (or predict) the selected images at every sigma; returns the files written. Works under torchrun."""
    cfg.validate(mode)
    return launch(lambda device, dist: _run(cfg, mode, device, dist), cfg.device)


def _run(cfg: CertifyConfig, mode: str, device: torch.device, dist: DistInfo) -> list[CertifyRun]:
    path, run_cfg = resolve_checkpoint(cfg.checkpoint)  # type: ignore[arg-type]
    info = dataset_info(cfg.data)
    split = cfg.split or info.splits[1]
    sigmas = cfg.sigma or ((run_cfg["sigma"],) if run_cfg.get("sigma") and not run_cfg.get("sigma_range") else None)
    if not sigmas:
        raise ValueError("give --sigma (the checkpoint's run does not say which single sigma it was trained at)")
    probe = build_dataset(cfg.data, split, cfg.data_root, None)
    num_classes = num_classes_of(probe)
    model, report = ckpt.load_classifier(path, num_classes, pool=None)
    if any(k.startswith("head") for k in report.missing):
        raise ckpt.CheckpointError(f"{path} is not a trained classifier (it has no head); fine-tune it first")
    model.to(device).eval()
    ds = build_dataset(cfg.data, split, cfg.data_root, build_transform(info, False, model.config.encoder.img_size))
    planned = list(selected_indices(len(ds), cfg.skip, cfg.max))  # type: ignore[arg-type]
    header = CERTIFY_HEADER if mode == "certify" else PREDICT_HEADER
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for sigma in sigmas:
        runs.append(_run_sigma(cfg, mode, float(sigma), path, split, model, ds, planned, header, out, device, dist))
    return runs


def _run_sigma(cfg: CertifyConfig, mode: str, sigma: float, path: Path, split: str, model: ViTClassifier, ds: Any,
               planned: list[int], header: tuple[str, ...], out: Path, device: torch.device, dist: DistInfo) -> CertifyRun:
    main_file = out / f"{mode}_sigma{sigma:g}.tsv"
    meta_file = main_file.with_suffix(".json")
    meta = {"mode": mode, "checkpoint": str(path), "data": cfg.data, "split": split, "sigma": sigma, "n0": cfg.n0,
            "n": cfg.n, "alpha": cfg.alpha, "seed": cfg.seed, "skip": cfg.skip, "max": cfg.max,
            "images": len(planned), "config": to_dict(cfg)}
    if meta_file.exists():
        old = json.loads(meta_file.read_text())
        diff = {k: (old.get(k), meta[k]) for k in ROW_SETTINGS if old.get(k) != meta[k]}
        if diff:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{main_file} was written with other settings ({detail}); use another --output-dir")
    barrier(dist)
    if dist.is_main:
        meta_file.write_text(json.dumps(meta, indent=2))

    rank_files = sorted(out.glob(f"{main_file.name}.rank*"))
    done: dict[int, str] = read_rows(main_file, header)
    for rf in rank_files:
        for i, row in read_rows(rf, header).items():
            done.setdefault(i, row)
    todo = [i for i in planned if i not in done]
    mine = todo[dist.rank:: dist.world_size]
    barrier(dist)  # every rank has read the files before any rank writes
    my_file = Path(f"{main_file}.rank{dist.rank}") if dist.enabled else main_file
    if dist.is_main and not dist.enabled and rank_files:
        _rewrite(main_file, header, done)  # fold rows of an interrupted distributed run in now
        for rf in rank_files:
            rf.unlink()
    existing = read_rows(my_file, header)
    _rewrite(my_file, header, existing)  # drops a torn last line before appending

    base = torch.compile(model) if cfg.compile else model
    smooth = Smooth(base, model.config.num_classes, sigma, seed=cfg.seed, precision=cfg.precision)
    per_image = (cfg.n0 if mode == "certify" else 0) + cfg.n
    group = max(1, cfg.batch // per_image)  # pack several images into a forward batch when n is small
    bar = None
    if dist.is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="img", dynamic_ncols=True, desc=f"{mode} sigma={sigma:g}")
    certified = abstained = added = 0
    with open(my_file, "a") as f:
        for start in range(0, len(mine), group):
            idxs = mine[start: start + group]
            items = [ds[i] for i in idxs]
            x = torch.stack([it[0] for it in items])
            labels = [int(it[1]) for it in items]
            t0 = time.perf_counter()
            if mode == "certify":
                answers = [(c.prediction, c.radius) for c in smooth.certify_batch(x, idxs, cfg.n0, cfg.n, cfg.alpha, cfg.batch)]
            else:
                answers = [(p.prediction, 0.0) for p in smooth.predict_batch(x, idxs, cfg.n, cfg.alpha, cfg.batch)]
            seconds = (time.perf_counter() - t0) / len(idxs)
            for i, label, (pred, radius) in zip(idxs, labels, answers):
                f.write(_fmt_row(mode, i, label, pred, radius, seconds))
                certified += int(pred == label)
                abstained += int(pred == Smooth.ABSTAIN)
            f.flush()
            added += len(idxs)
            if bar is not None:
                bar.update(len(idxs) * dist.world_size)
                bar.set_postfix(certified=certified, abstain=abstained)
    if bar is not None:
        bar.close()
    barrier(dist)
    if dist.enabled and dist.is_main:
        rows = read_rows(main_file, header)
        for rf in sorted(out.glob(f"{main_file.name}.rank*")):
            for i, row in read_rows(rf, header).items():
                rows.setdefault(i, row)
        _rewrite(main_file, header, rows)
        for rf in sorted(out.glob(f"{main_file.name}.rank*")):
            rf.unlink()
    barrier(dist)
    total = len(read_rows(main_file, header)) if dist.is_main else 0
    if dist.is_main:
        print(f"{mode} sigma={sigma:g}: {total} rows in {main_file} ({added * (dist.world_size if dist.enabled else 1)} new)", flush=True)
    return CertifyRun(sigma, main_file, added, total)


def selected_indices(n_images: int, skip: int, maximum: int | None) -> Iterable[int]:
    """The image indices a run with ``skip`` and ``max`` covers."""
    idx = range(0, n_images, skip)
    return idx if maximum is None else idx[:maximum]
