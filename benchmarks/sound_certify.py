"""Sound against standard certification on a trained classifier: certified accuracy and forward passes per second.

Both modes certify the same test images (every ``--skip``-th) with fixed-n CERTIFY at the same n0, n, alpha, sigma
and seed, in one process, alternating in blocks of ``--block`` images (which mode goes first alternates too), so
load from other processes on the machine falls on both alike. The sound mode (``dmae.smoothing.SoundSmooth``,
Voráček & Hein, ICLR 2023) draws discretized Gaussian noise exactly on the 8-bit grid; the standard mode float32
Gaussian noise. Targets (issue 19): certified accuracy within 1 point at every radius, >= 0.9x the passes/s.

    OMP_NUM_THREADS=1 python benchmarks/sound_certify.py --checkpoint /work/runs/demo/finetune
"""

from __future__ import annotations

import argparse
import time

import torch

from dmae.checkpoint import load_classifier, resolve_checkpoint
from dmae.data import build_dataset, build_transform, dataset_info, num_classes_of
from dmae.smoothing import Smooth
from dmae.smoothing.sound import SoundSmooth

RADII = (0.0, 0.25, 0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="/work/runs/demo/finetune", help="a run folder or weights file")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--skip", type=int, default=50, help="certify every skip-th test image")
    ap.add_argument("--max", type=int, default=200, help="images in all")
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=1000, help="noisy samples per forward pass")
    ap.add_argument("--block", type=int, default=10, help="images per block; the modes alternate by block")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    args = ap.parse_args()

    device = torch.device(args.device)
    info = dataset_info(args.data)
    split = info.splits[1]
    num_classes = num_classes_of(build_dataset(args.data, split, args.data_root, None))
    path = resolve_checkpoint(args.checkpoint)
    model, _ = load_classifier(path, num_classes, pool=None)
    model.to(device).eval()
    ds = build_dataset(args.data, split, args.data_root, build_transform(info, False, model.config.encoder.img_size))
    indices = list(range(0, len(ds), args.skip))[: args.max]
    kw = dict(seed=args.seed, precision=args.precision, device=device)
    modes = {
        "standard": Smooth(model, num_classes, args.sigma, **kw),
        "sound": SoundSmooth(model, num_classes, args.sigma, **kw),
    }
    warm = torch.stack([ds[indices[0]][0]])
    for smooth in modes.values():  # threshold tables, allocator and kernels warmed outside the timing
        smooth.certify_batch(warm, [-1], args.n0, min(args.n, 200), args.alpha, args.batch)

    seconds = {m: 0.0 for m in modes}
    rows: dict[str, list[tuple[int, int, float]]] = {m: [] for m in modes}  # (label, prediction, radius)
    for b, start in enumerate(range(0, len(indices), args.block)):
        idx = indices[start : start + args.block]
        images = torch.stack([ds[i][0] for i in idx])
        labels = [ds[i][1] for i in idx]
        for name in list(modes) if b % 2 == 0 else list(modes)[::-1]:
            t0 = time.perf_counter()
            certs = modes[name].certify_batch(images, idx, args.n0, args.n, args.alpha, args.batch)
            seconds[name] += time.perf_counter() - t0
            rows[name] += [(y, c.prediction, c.radius) for y, c in zip(labels, certs, strict=True)]
        done = start + len(idx)
        print(
            f"{done}/{len(indices)} images: "
            + ", ".join(f"{m} {(args.n0 + args.n) * done / seconds[m]:.0f} passes/s" for m in modes),
            flush=True,
        )

    passes = (args.n0 + args.n) * len(indices)
    print(
        f"\n{path}: {len(indices)} {args.data} {split} images (every {args.skip}th), n0 = {args.n0}, n = {args.n}, "
        f"alpha = {args.alpha}, sigma = {args.sigma}, batch {args.batch}, {device}, precision {args.precision}, "
        f"torch threads {torch.get_num_threads()}\n"
    )
    print("| mode | " + " | ".join(f"r = {r:g}" for r in RADII) + " | abstain | passes/s |")
    print("|---|" + "---|" * (len(RADII) + 2))
    acc = {}
    for name, rs in rows.items():
        acc[name] = [100.0 * sum(p == y and rad >= r for y, p, rad in rs) / len(rs) for r in RADII]
        abstain = 100.0 * sum(p == Smooth.ABSTAIN for _, p, _ in rs) / len(rs)
        print(
            f"| {name} | " + " | ".join(f"{a:.1f} %" for a in acc[name]) + f" | {abstain:.1f} % | "
            f"{passes / seconds[name]:.0f} |"
        )
    same = sum(s[1] == t[1] for s, t in zip(rows["standard"], rows["sound"], strict=True))
    print(
        "\nsound - standard: "
        + ", ".join(
            f"{a - s:+.1f} points at r = {r:g}" for r, s, a in zip(RADII, acc["standard"], acc["sound"], strict=True)
        )
        + f"; passes/s ratio {seconds['standard'] / seconds['sound']:.3f}; "
        f"same prediction on {same} of {len(indices)}"
    )


if __name__ == "__main__":
    main()
