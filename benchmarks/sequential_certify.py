"""Sequential vs fixed-n CERTIFY on real classifiers: forward passes, certified accuracy, wall time.

For each (classifier run folder, sigma): the same test images are certified by fixed-n CERTIFY (the engine of
``dmae certify``, n0 = 100, n = --n) and by sequential CERTIFY in targets mode (n_max = --n, the data set's
standard radii), same seed, alpha = 0.001. Printed per sigma: forward passes of both, certified accuracy at each
radius for both, wall time and forward passes per second. Then, for the CIFAR-10 budget n_max = 100,000, the
sequential cost is estimated with Bernoulli oracles at the per-image p_A measured by the fixed-n run (the
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

from dmae.checkpoint import load_classifier
from dmae.data import build_dataset, build_transform, dataset_info
from dmae.smoothing import Smooth
from dmae.smoothing.confseq import decide, make_sequence, threshold
from dmae.smoothing.sequential import SequentialCertifier, SequentialSettings

RADII = dataset_info("fashion-mnist").radii


def _finetune(run: Path, sigma: float, init: str) -> None:
    from dmae import config as C
    from dmae.finetune import FinetuneConfig, finetune

    values = C.load_values(C.preset_path("finetune", "demo"), FinetuneConfig)
    cfg = C.build_config(FinetuneConfig, values, {"init": init, "sigma": sigma, "output_dir": str(run),
                                                  "progress": False, "resume": (run / "checkpoint.pt").exists()})
    if not finetune(cfg).finished:
        raise SystemExit(f"fine-tuning {run} was interrupted; run again to resume")


def _accuracy(preds: list[int], radii: list[float], labels: list[int]) -> list[float]:
    return [float(np.mean([(p == y and r >= t) for p, r, y in zip(preds, radii, labels)])) for t in RADII]


def _oracle_samples(p_hat: np.ndarray, sigma: float, n_max: int, rng: np.random.Generator) -> tuple[float, list[float]]:
    """Mean estimation samples of sequential CERTIFY (targets) on Bernoulli(p) streams, and its certified
    accuracy per radius (counting an image as correct when the model's n0 guess was right: ``p_hat`` > 0)."""
    cs = make_sequence("default", 0.001, n_max)
    taus = [threshold(r, sigma) for r in RADII]
    used, best = [], []
    for p in p_hat:
        k_prev, t_prev, lower, r_best = 0, 0, 0.0, -1.0
        for t in cs.looks:
            k_prev += int(rng.binomial(t - t_prev, p))
            t_prev = t
            lower = max(lower, cs.lower(k_prev, t))
            dec = decide(cs, k_prev, t, taus)
            if all(d != 0 for d in dec):
                break
        used.append(t_prev)
        certified = [r for r, tau in zip(RADII, taus) if lower > tau]
        best.append(max(certified) if certified else -1.0)
    acc = [float(np.mean([b >= r for b in best])) for r in RADII]
    return float(np.mean(used)), acc


def bench(run: Path, sigma: float, images: int, n: int, batch: int) -> dict:
    model, _ = load_classifier(run, 10)
    model.eval()
    info = dataset_info("fashion-mnist")
    ds = build_dataset("fashion-mnist", "test", None, build_transform(info, False, model.config.encoder.img_size))
    idx = list(range(0, len(ds), len(ds) // images))[:images]
    x = torch.stack([ds[i][0] for i in idx])
    labels = [int(ds[i][1]) for i in idx]
    smooth = Smooth(model, 10, sigma, seed=0, precision="fp32")

    t0 = time.perf_counter()
    fixed = []
    group = max(1, batch // (100 + n))
    for s in range(0, images, group):
        fixed += smooth.certify_batch(x[s:s + group], idx[s:s + group], 100, n, 0.001, batch)
    t_fixed = time.perf_counter() - t0
    passes_fixed = images * (100 + n)

    t0 = time.perf_counter()
    seq = SequentialCertifier(smooth, SequentialSettings(100, n, 0.001, "targets", RADII)).certify_batch(x, idx, batch)
    t_seq = time.perf_counter() - t0
    passes_seq = sum(c.n_samples for c in seq)

    # p_A of the n0 guess, measured by the fixed-n run (0 when the guess was wrong: never certified correct)
    p_hat = np.array([c.n_a / n if c.prediction == y or c.prediction == -1 else 0.0 for c, y in zip(fixed, labels)])
    oracle_passes, oracle_acc = _oracle_samples(p_hat, sigma, 100_000, np.random.default_rng(0))
    return {
        "run": str(run), "sigma": sigma, "images": images, "n": n,
        "fixed": {"passes": passes_fixed, "seconds": t_fixed, "passes_per_s": passes_fixed / t_fixed,
                  "certified": _accuracy([c.prediction for c in fixed], [c.radius for c in fixed], labels)},
        "sequential": {"passes": passes_seq, "seconds": t_seq, "passes_per_s": passes_seq / t_seq,
                       "certified": _accuracy([c.prediction for c in seq], [c.radius for c in seq], labels)},
        "oracle_n_max_100000": {"mean_estimation_samples": oracle_passes,
                                "fewer_passes": (100 + 100_000) / (100 + oracle_passes), "certified_upper": oracle_acc},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="FOLDER:SIGMA of a fine-tuned classifier")
    ap.add_argument("--make-from", default=None, help="pretrained export to fine-tune missing runs from")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    results = []
    for spec in args.run:
        folder, sigma = spec.rsplit(":", 1)
        run = Path(folder)
        if not (run / "model_last.safetensors").exists():
            if not args.make_from:
                raise SystemExit(f"{run} holds no classifier; pass --make-from PRETRAIN_EXPORT to fine-tune it")
            _finetune(run, float(sigma), args.make_from)
        r = bench(run, float(sigma), args.images, args.n, args.batch)
        results.append(r)
        f, s = r["fixed"], r["sequential"]
        print(f"sigma={r['sigma']}: {r['images']} images, n = n_max = {r['n']}")
        print(f"  forward passes  fixed {f['passes']:,}  sequential {s['passes']:,}  ({f['passes'] / s['passes']:.2f}x fewer)")
        print(f"  wall time       fixed {f['seconds']:.1f} s  sequential {s['seconds']:.1f} s; passes/s "
              f"{f['passes_per_s']:.0f} vs {s['passes_per_s']:.0f} ({s['passes_per_s'] / f['passes_per_s']:.2f}x)")
        print("  certified acc   " + "  ".join(f"r={t:g}: {100 * a:.0f}/{100 * b:.0f}"
                                               for t, a, b in zip(RADII, f["certified"], s["certified"])) + "  (fixed/seq, %)")
        o = r["oracle_n_max_100000"]
        print(f"  n_max=100,000 (Bernoulli oracles at the measured p_A): {o['mean_estimation_samples']:.0f} estimation "
              f"samples per image, {o['fewer_passes']:.1f}x fewer than fixed-n")
    total_f = sum(r["fixed"]["passes"] for r in results)
    total_s = sum(r["sequential"]["passes"] for r in results)
    print(f"all: {total_f / total_s:.2f}x fewer forward passes "
          f"(mean over sigma {np.mean([r['fixed']['passes'] / r['sequential']['passes'] for r in results]):.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
