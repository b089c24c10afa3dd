"""Sequential vs fixed-n CERTIFY on real classifiers: forward passes, certified accuracy, wall time.

For each (classifier run folder, sigma): the same test images are certified by fixed-n CERTIFY (the engine of
``dmae certify``, n0 = 100, n = --n) and by sequential CERTIFY in targets mode (n_max = --n, the data set's
standard radii), same seed, alpha = 0.001. Printed per sigma: forward passes of both, certified accuracy at each
radius for both, wall time and forward passes per second. Then, for the CIFAR-10 budget n_max = 100,000, the
sequential cost is estimated with categorical oracles at the per-image p_A measured by the fixed-n run (the
sequential decisions only see the counts, so an oracle with the right p_A costs what the model would).

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
from dmae.smoothing import Smooth
from dmae.smoothing.core import PHASE_SELECT
from dmae.smoothing.sequential import DEFAULT_FUTILITY, SequentialCertifier, SequentialSettings, oracle_certificates

RADII = dataset_info("fashion-mnist").radii


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
    """Mean samples (n0 included) of sequential CERTIFY (targets) at ``n_max`` on categorical oracles: the n0 guess
    with the p_A measured by the fixed-n run, the rest spread evenly over the other nine classes (fixed-n logs
    only n_A); and the oracles' certified accuracy per radius (a certificate counts when its class is the label)."""
    probs = np.tile(((1.0 - p_hat) / 9)[:, None], (1, 10))
    probs[np.arange(len(p_hat)), guess] = p_hat
    certs = oracle_certificates(
        SequentialSettings(100, n_max, 0.001, "targets", RADII, futility=futility), sigma, probs, labels=labels
    )
    acc = [
        float(np.mean([c.prediction == y and c.radius >= r for c, y in zip(certs, labels, strict=True)])) for r in RADII
    ]
    return float(np.mean([c.n_samples for c in certs])), acc


def _reference_seconds(model: torch.nn.Module, x: torch.Tensor, sigma: float, n: int, batch: int) -> float:
    """Wall time of the reference CERTIFY loop (n0 = 100 selection samples, then n estimation samples, one image
    at a time, plain ``randn_like`` noise and host-side counting) on the images of ``x``."""
    reference_counts(model, x[0:1], min(n, batch), batch, sigma, 10, "fp32")  # warm-up
    t0 = time.perf_counter()
    for i in range(len(x)):
        reference_counts(model, x[i : i + 1], 100, batch, sigma, 10, "fp32")
        reference_counts(model, x[i : i + 1], n, batch, sigma, 10, "fp32")
    return time.perf_counter() - t0


def _earlier(path: str | None, run: Path, sigma: float, images: int, n: int) -> dict | None:
    """The result for the same classifier, sigma, images and n in an earlier results file, if any: its fixed-n
    part is reused (fixed-n CERTIFY is a pure function of the seed, the images and n, so re-running it would
    reproduce the same rows)."""
    if not path or not Path(path).exists():
        return None
    for r in json.loads(Path(path).read_text()):
        if (Path(r["run"]).resolve(), r["sigma"], r["images"], r["n"]) == (run.resolve(), sigma, images, n):
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
    model, _ = load_classifier(run, 10)
    model.eval()
    info = dataset_info("fashion-mnist")
    ds = build_dataset("fashion-mnist", "test", None, build_transform(info, False, model.config.encoder.img_size))
    idx = list(range(0, len(ds), len(ds) // images))[:images]
    x = torch.stack([ds[i][0] for i in idx])
    labels = [int(ds[i][1]) for i in idx]
    smooth = Smooth(model, 10, sigma, seed=0, precision="fp32")

    passes_fixed = images * (100 + n)
    if earlier is None:
        t0 = time.perf_counter()
        fixed = []
        group = max(1, batch // (100 + n))
        for s in range(0, images, group):
            fixed += smooth.certify_batch(x[s : s + group], idx[s : s + group], 100, n, 0.001, batch)
        t_fixed = time.perf_counter() - t0
        fixed_rows = [[c.prediction, c.radius] for c in fixed]
        # p_A of the n0 guess as measured by the fixed-n run, and whether that guess was the label (re-drawn from
        # the same selection seeds: fixed-n does not report the guess of an image it abstains on)
        p_hat = np.array([c.n_a / n for c in fixed])
        guess = smooth.sample_counts(x, idx, 100, batch, phase=PHASE_SELECT).counts.argmax(1).tolist()
        fixed_result = {
            "passes": passes_fixed,
            "seconds": t_fixed,
            "passes_per_s": passes_fixed / t_fixed,
            "certified": _accuracy([r[0] for r in fixed_rows], [r[1] for r in fixed_rows], labels),
        }
    else:
        fixed_result, pi = earlier["fixed"], earlier["per_image"]
        fixed_rows, p_hat, guess = pi["fixed"], np.array(pi["p_hat"]), pi["guess"]

    settings = SequentialSettings(100, n, 0.001, "targets", RADII, futility=futility)
    t0 = time.perf_counter()
    seq = SequentialCertifier(smooth, settings).certify_batch(x, idx, batch)
    t_seq = time.perf_counter() - t0
    passes_seq = sum(c.n_samples for c in seq)

    oracle_samples, oracle_acc = _oracle(p_hat, guess, labels, sigma, 100_000, futility)
    ref = earlier["reference_loop"] if earlier else {}
    if reference_images and not ref:
        ref_s = _reference_seconds(model, x[:reference_images], sigma, n, batch)
        rate = reference_images * (100 + n) / ref_s
        ref = {
            "images_timed": reference_images,
            "seconds": ref_s,
            "passes_per_s": rate,
            "seconds_all_images": passes_fixed / rate,
        }
    return {
        "run": str(run),
        "sigma": sigma,
        "images": images,
        "n": n,
        "futility": futility,
        "fixed": fixed_result,
        "sequential": {
            "passes": passes_seq,
            "seconds": t_seq,
            "passes_per_s": passes_seq / t_seq,
            "certified": _accuracy([c.prediction for c in seq], [c.radius for c in seq], labels),
        },
        "oracle_n_max_100000": {
            "mean_samples": oracle_samples,
            "fewer_passes": (100 + 100_000) / oracle_samples,
            "certified": oracle_acc,
        },
        "reference_loop": ref,
        "per_image": {
            "idx": idx,
            "label": labels,
            "guess": guess,
            "p_hat": p_hat.tolist(),
            "fixed": fixed_rows,
            "sequential": [[c.prediction, c.radius, c.n_samples] for c in seq],
        },
    }


def _summarize(path: Path, n_max: int) -> None:
    """From a results file: per sigma, the passes of fixed-n, sequential and sequential with the label shortcut,
    and the oracle estimate at ``n_max`` (categorical oracles at the per-image p_hat, guesses and labels).

    The label shortcut's passes are exact, not estimated: an image whose n0 guess is its label gets the very same
    samples and certificate with or without the shortcut (same noise streams), and every other image stops after
    its n0 = 100 selection samples."""
    ratios, short_ratios, oracle_ratios, tot = [], [], [], np.zeros(3)
    for r in json.loads(path.read_text()):
        pi = r["per_image"]
        right = np.array(pi["guess"]) == np.array(pi["label"])
        seq = np.array([c[2] for c in pi["sequential"]])
        fixed, passes, short = r["fixed"]["passes"], int(seq.sum()), int(seq[right].sum() + 100 * (~right).sum())
        ratios.append(fixed / passes)
        short_ratios.append(fixed / short)
        tot += (fixed, passes, short)
        mean, acc = _oracle(np.array(pi["p_hat"]), pi["guess"], pi["label"], r["sigma"], n_max, r.get("futility"))
        oracle_ratios.append((100 + n_max) / mean)
        print(
            f"sigma={r['sigma']}: {r['images']} images; forward passes fixed {fixed:,}, sequential {passes:,} "
            f"({ratios[-1]:.2f}x fewer), with --stop-on-wrong-guess {short:,} ({short_ratios[-1]:.2f}x fewer)"
        )
        print(
            f"  n_max={n_max:,} (oracles at the p_A measured with n = {r['n']:,}): {mean:,.0f} samples per image, "
            f"{oracle_ratios[-1]:.1f}x fewer than fixed-n; certified "
            + "  ".join(f"r={t:g}: {100 * a:.0f}" for t, a in zip(RADII, acc, strict=True))
            + " %"
        )
    print(
        f"mean over sigma: {np.mean(ratios):.2f}x fewer (with the label shortcut {np.mean(short_ratios):.2f}x; "
        f"n_max={n_max:,} oracles {np.mean(oracle_ratios):.1f}x); all sigma together: {tot[0] / tot[1]:.2f}x "
        f"({tot[0] / tot[2]:.2f}x with the shortcut)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], help="FOLDER:SIGMA of a fine-tuned classifier")
    ap.add_argument(
        "--summarize",
        default=None,
        help="summarize the per-image results of an earlier --json: the "
        "label shortcut's passes (exact) and the n_max oracle estimate (no model is run)",
    )
    ap.add_argument("--oracle-n-max", type=int, default=100_000)
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
        help="an earlier --json: reuse its fixed-n rows and reference-loop "
        "timing for the same classifier, sigma, images and n (fixed-n is a pure function of those)",
    )
    ap.add_argument("--futility", type=float, default=DEFAULT_FUTILITY, help="beta of the futility rule (0: off)")
    args = ap.parse_args()
    if args.summarize:
        _summarize(Path(args.summarize), args.oracle_n_max)
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
        r = bench(
            run,
            float(sigma),
            args.images,
            args.n,
            args.batch,
            args.reference_images,
            _earlier(args.fixed_from, run, float(sigma), args.images, args.n),
            args.futility or None,
        )
        results.append(r)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        f, s = r["fixed"], r["sequential"]
        print(f"sigma={r['sigma']}: {r['images']} images, n = n_max = {r['n']}")
        print(
            f"  forward passes  fixed {f['passes']:,}  sequential {s['passes']:,}  "
            f"({f['passes'] / s['passes']:.2f}x fewer)"
        )
        print(
            f"  wall time       fixed {f['seconds']:.1f} s  sequential {s['seconds']:.1f} s; passes/s "
            f"{f['passes_per_s']:.0f} vs {s['passes_per_s']:.0f} ({s['passes_per_s'] / f['passes_per_s']:.2f}x)"
        )
        print(
            "  certified acc   "
            + "  ".join(
                f"r={t:g}: {100 * a:.0f}/{100 * b:.0f}"
                for t, a, b in zip(RADII, f["certified"], s["certified"], strict=True)
            )
            + "  (fixed/seq, %)"
        )
        if r["reference_loop"]:
            ref = r["reference_loop"]
            print(
                f"  reference loop  {ref['passes_per_s']:.0f} passes/s on {ref['images_timed']} images: fixed n on all "
                f"images ~{ref['seconds_all_images']:.0f} s (extrapolated) vs sequential {s['seconds']:.1f} s "
                f"({ref['seconds_all_images'] / s['seconds']:.2f}x faster)"
            )
        o = r["oracle_n_max_100000"]
        print(
            f"  n_max=100,000 (Bernoulli oracles at the measured p_A): {o['mean_samples']:.0f} samples per image, "
            f"{o['fewer_passes']:.1f}x fewer than fixed-n; certified "
            + "  ".join(f"r={t:g}: {100 * a:.0f}" for t, a in zip(RADII, o["certified"], strict=True))
            + " %"
        )
    total_f = sum(r["fixed"]["passes"] for r in results)
    total_s = sum(r["sequential"]["passes"] for r in results)
    print(
        f"all: {total_f / total_s:.2f}x fewer forward passes "
        f"(mean over sigma {np.mean([r['fixed']['passes'] / r['sequential']['passes'] for r in results]):.2f}x)"
    )


if __name__ == "__main__":
    main()
