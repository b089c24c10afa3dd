"""Sequential vs fixed-n CERTIFY on real classifiers: forward passes, certified accuracy, wall time, the limit.

For each (classifier run folder, sigma): the same test images are certified by fixed-n CERTIFY (the engine of
``dmae certify``, n0 = 100, n = --n) and by sequential CERTIFY in targets mode (n_max = --n, the data set's
standard radii), same seed, alpha = 0.001: the earlier schedule (``schedule="chunks"``, which reproduces the engine
before the early schedule), the current default (early schedule, selection step) and ``candidate="label"``.
Printed per sigma: forward passes of each, certified accuracy at each radius, wall time and forward passes per
second, and the **information limit**: per image, the Wald limit of the decisions it needs,
max over the targets of ln(1/alpha) / KL(p || tau) (capped at n_max; 0 for a target no stream can certify within
n_max, which the budget test refutes at once), with p the class's probability measured by the long fixed-n run;
the mean samples per image over the mean limit says how far each procedure is from what any sequential test
needs (Wald 1945; the selection samples count in the samples, not in the limit). Then, for the CIFAR-10 budget
n_max = 100,000, the sequential cost is estimated with categorical oracles at the per-image p_A measured by the
fixed-n run (the sequential decisions only see the counts, so an oracle with the right p_A costs what the model
would).

    python benchmarks/sequential_certify.py --run dmae-demo/finetune:0.25 --run runs/cr05:0.5 --images 100

A run given as FOLDER:SIGMA; missing folders with ``--make-from PRETRAIN_EXPORT`` are fine-tuned first with the
demo's recipe at that sigma (a few minutes on a CPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from certify_throughput import reference_counts  # same folder: run this file by its path

from dmae.checkpoint import load_classifier
from dmae.data import build_dataset, build_transform, dataset_info
from dmae.smoothing import Smooth, certified_radius, lower_confidence_bound
from dmae.smoothing.confseq import threshold
from dmae.smoothing.core import PHASE_ESTIMATE, PHASE_SELECT
from dmae.smoothing.sequential import DEFAULT_FUTILITY, SequentialCertifier, SequentialSettings, oracle_certificates

RADII = dataset_info("fashion-mnist").radii
ALPHA = 0.001
# the sequential procedures compared: the earlier schedule (the engine before the early schedule, exactly), the
# default, and the label as the candidate
SEQUENTIAL = {"before": {"schedule": "chunks"}, "select": {}, "label": {"candidate": "label"}}


def kl(p: float, q: float) -> float:
    """KL(Bernoulli(p) || Bernoulli(q)) in nats (0 log 0 = 0), for 0 < q < 1."""
    return sum(a * np.log(a / b) for a, b in ((p, q), (1 - p, 1 - q)) if a > 0)


def wald_limit(p: float, taus: list[float], n_max: int, alpha: float = ALPHA) -> float:
    """The samples a sequential test needs, in expectation, to decide every target for a class of probability p
    (Wald 1945): the largest ln(1/alpha) / KL(p || tau) over the targets tau, each capped at n_max (the last look
    decides everything); a target no stream can certify within n_max (alpha^(1/n_max) <= tau) needs none (the
    budget test refutes it before any sample)."""
    out = 0.0
    for tau in taus:
        if alpha ** (1 / n_max) <= tau:
            continue
        d = kl(p, tau)
        out = max(out, n_max if d <= 0 else min(n_max, np.log(1 / alpha) / d))
    return float(out)


def _finetune(run: Path, sigma: float, init: str) -> None:
    from dmae import config as C
    from dmae.training.finetune import FinetuneConfig, finetune

    values = C.load_values(C.preset_path("finetune", "demo"), FinetuneConfig)
    cfg = C.build_config(
        FinetuneConfig,
        values,
        {
            "init": init,
            "sigma": sigma,
            "output_dir": str(run),
            "progress": False,
            "resume": (run / "checkpoint.pt").exists(),
        },
    )
    if not finetune(cfg).finished:
        raise SystemExit(f"fine-tuning {run} was interrupted; run again to resume")


def _accuracy(preds: list[int], radii: list[float], labels: list[int]) -> list[float]:
    return [float(np.mean([(p == y and r >= t) for p, r, y in zip(preds, radii, labels, strict=True)])) for t in RADII]


def _oracle(
    p_hat: np.ndarray,
    guess: list[int],
    labels: list[int],
    sigma: float,
    n_max: int,
    futility: float | None = DEFAULT_FUTILITY,
) -> tuple[float, list[float]]:
    """Mean samples (selection included) of sequential CERTIFY (targets) at ``n_max`` on categorical oracles: the
    n0 guess with the p_A measured by the fixed-n run, the rest spread evenly over the other nine classes (fixed-n
    logs only n_A); and the oracles' certified accuracy per radius (a certificate counts when its class is the
    label)."""
    probs = np.tile(((1.0 - p_hat) / 9)[:, None], (1, 10))
    probs[np.arange(len(p_hat)), guess] = p_hat
    certs = oracle_certificates(
        SequentialSettings(100, n_max, ALPHA, "targets", RADII, futility=futility), sigma, probs, labels=labels
    )
    acc = [
        float(np.mean([c.prediction == y and c.radius >= r for c, y in zip(certs, labels, strict=True)])) for r in RADII
    ]
    return float(np.mean([c.n_samples for c in certs])), acc


def _fixed(smooth: Smooth, x: torch.Tensor, idx: list[int], labels: list[int], n: int, batch: int) -> dict:
    """Fixed-n CERTIFY (n0 = 100, n) from the class counts of its own noise streams (``sample_counts`` of the
    selection and estimation phases: the samples ``certify_batch`` draws), and from the same estimation counts
    the label as the candidate (``certify_label_batch``'s certificates)."""
    t0 = time.perf_counter()
    select = smooth.sample_counts(x, idx, 100, batch, phase=PHASE_SELECT)
    est = smooth.sample_counts(x, idx, n, batch, phase=PHASE_ESTIMATE)
    seconds = time.perf_counter() - t0
    guess = select.counts.argmax(1).tolist()  # first of the top counts, as CERTIFY
    counts = est.counts.cpu().numpy()
    bad = (select.non_finite + est.non_finite).tolist()
    rows = {"fixed": [], "fixed_label": []}
    for i, (g, y) in enumerate(zip(guess, labels, strict=True)):
        for key, c in (("fixed", g), ("fixed_label", y)):
            p_lower = lower_confidence_bound(int(counts[i, c]), n, ALPHA)
            ok = not bad[i] and (p_lower >= 0.5 if key == "fixed" else p_lower > 0.5)
            rows[key].append([c if ok else -1, certified_radius(p_lower, smooth.sigma) if ok else 0.0])
    passes = len(idx) * (100 + n)
    result = {"passes": passes, "seconds": seconds, "passes_per_s": passes / seconds}
    for key, r in rows.items():
        result["certified" if key == "fixed" else "certified_label"] = _accuracy(
            [a[0] for a in r], [a[1] for a in r], labels
        )
    return {"result": result, "guess": guess, "counts": counts.tolist(), **rows}


def _sequential(
    smooth: Smooth, x: torch.Tensor, idx: list[int], labels: list[int], settings: SequentialSettings, batch: int
) -> dict:
    """Sequential CERTIFY of the images under ``settings``: passes, time, certified accuracy and per-image rows."""
    t0 = time.perf_counter()
    seq = SequentialCertifier(smooth, settings).certify_batch(x, idx, batch, labels)
    seconds = time.perf_counter() - t0
    passes = sum(c.n_samples for c in seq)
    return {
        "passes": passes,
        "seconds": seconds,
        "passes_per_s": passes / seconds,
        "certified": _accuracy([c.prediction for c in seq], [c.radius for c in seq], labels),
        "rows": [[c.prediction, c.radius, c.n_samples] for c in seq],
    }


def limits(counts: np.ndarray, guess: list[int], labels: list[int], sigma: float, n: int) -> dict[str, list[float]]:
    """Per image, the Wald limit (:func:`wald_limit`) of the standard targets for the n0 guess's class and for the
    label's class, their probabilities measured by the fixed-n run's ``n`` estimation samples."""
    taus = [threshold(r, sigma) for r in RADII]
    p = np.asarray(counts) / n
    return {
        "select": [wald_limit(float(p[i, g]), taus, n) for i, g in enumerate(guess)],
        "label": [wald_limit(float(p[i, y]), taus, n) for i, y in enumerate(labels)],
    }


def _reference_seconds(model: torch.nn.Module, x: torch.Tensor, sigma: float, n: int, batch: int) -> float:
    """Wall time of the reference CERTIFY loop (n0 = 100 selection samples, then n estimation samples, one image
    at a time, plain ``randn_like`` noise and host-side counting) on the images of ``x``."""
    reference_counts(model, x[0:1], min(n, batch), batch, sigma, 10, "fp32")  # warm-up
    t0 = time.perf_counter()
    for i in range(len(x)):
        reference_counts(model, x[i : i + 1], 100, batch, sigma, 10, "fp32")
        reference_counts(model, x[i : i + 1], n, batch, sigma, 10, "fp32")
    return time.perf_counter() - t0


def _reference(model: torch.nn.Module, x: torch.Tensor, sigma: float, n: int, batch: int, images: int) -> dict:
    """The reference loop timed on the first ``images`` images, extrapolated to all of ``x`` ({} for none)."""
    if not images:
        return {}
    seconds = _reference_seconds(model, x[:images], sigma, n, batch)
    rate = images * (100 + n) / seconds
    return {
        "images_timed": images,
        "seconds": seconds,
        "passes_per_s": rate,
        "seconds_all_images": len(x) * (100 + n) / rate,
    }


def _earlier(path: str | None, run: Path, sigma: float, images: int, n: int) -> dict | None:
    """The result for the same classifier, sigma, images and n in an earlier results file, if any, with per-image
    class counts: its fixed-n part is reused (fixed-n CERTIFY is a pure function of the seed, the images and n, so
    re-running it would reproduce the same rows)."""
    if not path or not Path(path).exists():
        return None
    for r in json.loads(Path(path).read_text()):
        key = (Path(r["run"]).resolve(), r["sigma"], r["images"], r["n"])
        if key == (run.resolve(), sigma, images, n) and "counts" in r["per_image"]:
            return r
    return None


def bench(
    run: Path,
    sigma: float,
    images: int,
    n: int,
    batch: int,
    reference_images: int,
    earlier: dict | None = None,
    futility: float | None = DEFAULT_FUTILITY,
) -> dict:
    """Every measurement of the module docstring for one classifier and sigma, as a JSON-able dict."""
    model, _ = load_classifier(run, 10)
    model.eval()
    info = dataset_info("fashion-mnist")
    ds = build_dataset("fashion-mnist", "test", None, build_transform(info, False, model.config.encoder.img_size))
    idx = list(range(0, len(ds), len(ds) // images))[:images]
    x = torch.stack([ds[i][0] for i in idx])
    labels = [int(ds[i][1]) for i in idx]
    smooth = Smooth(model, 10, sigma, seed=0, precision="fp32")
    fixed = _fixed(smooth, x, idx, labels, n, batch) if earlier is None else None
    per = fixed if fixed is not None else earlier["per_image"]
    fixed_result = fixed["result"] if fixed is not None else earlier["fixed"]
    seq = {
        name: _sequential(
            smooth, x, idx, labels, SequentialSettings(100, n, ALPHA, "targets", RADII, futility=futility, **kw), batch
        )
        for name, kw in SEQUENTIAL.items()
    }
    p_hat = np.array([per["counts"][i][g] / n for i, g in enumerate(per["guess"])])
    oracle_samples, oracle_acc = _oracle(p_hat, per["guess"], labels, sigma, 100_000, futility)
    ref = (earlier or {}).get("reference_loop") or _reference(model, x, sigma, n, batch, reference_images)
    lim = limits(np.array(per["counts"]), per["guess"], labels, sigma, n)
    return {
        "run": str(run),
        "sigma": sigma,
        "images": images,
        "n": n,
        "futility": futility,
        "fixed": fixed_result,
        "sequential": {name: {k: v for k, v in r.items() if k != "rows"} for name, r in seq.items()},
        "limit": {"select": float(np.mean(lim["select"])), "label": float(np.mean(lim["label"]))},
        "oracle_n_max_100000": {
            "mean_samples": oracle_samples,
            "fewer_passes": (100 + 100_000) / oracle_samples,
            "certified": oracle_acc,
        },
        "reference_loop": ref,
        "per_image": {
            "idx": idx,
            "label": labels,
            "guess": per["guess"],
            "counts": per["counts"],
            "p_hat": p_hat.tolist(),
            "fixed": per["fixed"],
            "fixed_label": per["fixed_label"],
            "limit": lim,
            **{f"sequential_{name}": r["rows"] for name, r in seq.items()},
        },
    }


def print_result(r: dict) -> None:
    """One classifier and sigma: per procedure, passes, samples per image, the ratio to fixed-n, the ratio to the
    mean Wald limit of the decisions (the guess's class for CERTIFY's procedures, the label's for the label's),
    and certified accuracy per radius; then wall time, the reference loop and the n_max = 100,000 estimate."""
    f, seq, lim, images = r["fixed"], r["sequential"], r["limit"], r["images"]
    print(
        f"sigma={r['sigma']}: {images} images, n = n_max = {r['n']:,}; mean Wald limit per image "
        f"{lim['select']:,.0f} samples (the guess's class), {lim['label']:,.0f} (the label's class)"
    )
    print(f"  {'procedure':<22} {'passes':>10} {'samples/img':>11} {'fewer':>7} {'/limit':>7}  certified %")
    rows = [
        ("fixed-n", f["passes"], f["certified"], "select"),
        ("fixed-n, label", images * r["n"], f.get("certified_label"), "label"),
    ]
    rows += [
        (f"sequential {name}", s["passes"], s["certified"], "label" if name == "label" else "select")
        for name, s in seq.items()
    ]
    for name, passes, acc, kind in rows:
        cert = " / ".join(f"{100 * a:.0f}" for a in acc) if acc else "-"
        print(
            f"  {name:<22} {passes:>10,} {passes / images:>11,.0f} {f['passes'] / passes:>6.2f}x "
            f"{passes / images / lim[kind]:>6.2f}x  {cert}  (r = {', '.join(f'{t:g}' for t in RADII)})"
        )
    times = ", ".join(f"{name} {s['seconds']:.0f} s ({s['passes_per_s']:.0f}/s)" for name, s in seq.items())
    print(f"  wall time: fixed-n {f['seconds']:.0f} s ({f['passes_per_s']:.0f} passes/s); sequential {times}")
    if ref := r["reference_loop"]:
        print(
            f"  reference loop {ref['passes_per_s']:.0f} passes/s on {ref['images_timed']} images: fixed n on all "
            f"images ~{ref['seconds_all_images']:.0f} s (extrapolated)"
        )
    o = r["oracle_n_max_100000"]
    print(
        f"  n_max=100,000 (oracles at the measured p_A): {o['mean_samples']:.0f} samples per image, "
        f"{o['fewer_passes']:.1f}x fewer than fixed-n; certified "
        + "  ".join(f"r={t:g}: {100 * a:.0f}" for t, a in zip(RADII, o["certified"], strict=True))
        + " %"
    )


def _summarize(path: Path) -> None:
    """The tables of an earlier results file (no model is run), and the ratios over all of its sigma."""
    results = json.loads(path.read_text())
    for r in results:
        print_result(r)
    for name in SEQUENTIAL:
        ratios = [r["fixed"]["passes"] / r["sequential"][name]["passes"] for r in results]
        print(f"sequential {name}: mean over sigma {np.mean(ratios):.2f}x fewer forward passes than fixed-n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], help="FOLDER:SIGMA of a fine-tuned classifier")
    ap.add_argument("--summarize", default=None, help="print the tables of an earlier --json (no model is run)")
    ap.add_argument("--make-from", default=None, help="pretrained export to fine-tune missing runs from")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument(
        "--reference-images",
        type=int,
        default=5,
        help="images the reference fixed-n loop is timed on (its time for all images is extrapolated)",
    )
    ap.add_argument("--json", default=None, help="also write the results here (after each sigma)")
    ap.add_argument(
        "--fixed-from",
        default=None,
        help="an earlier --json: reuse its fixed-n counts and reference-loop "
        "timing for the same classifier, sigma, images and n (fixed-n is a pure function of those)",
    )
    ap.add_argument("--futility", type=float, default=DEFAULT_FUTILITY, help="beta of the futility rule (0: off)")
    args = ap.parse_args()
    if args.summarize:
        _summarize(Path(args.summarize))
        return
    if not args.run:
        ap.error("give --run FOLDER:SIGMA (or --summarize JSON)")
    results = []
    for spec in args.run:
        folder, sigma = spec.rsplit(":", 1)
        run = Path(folder)
        if not (run / "model_last.safetensors").exists():
            if not args.make_from:
                raise SystemExit(f"{run} holds no classifier; pass --make-from PRETRAIN_EXPORT to fine-tune it")
            _finetune(run, float(sigma), args.make_from)
        earlier = _earlier(args.fixed_from, run, float(sigma), args.images, args.n)
        r = bench(
            run, float(sigma), args.images, args.n, args.batch, args.reference_images, earlier, args.futility or None
        )
        results.append(r)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        print_result(r)


if __name__ == "__main__":
    main()
