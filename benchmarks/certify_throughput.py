"""Certification throughput: noisy forward passes per second of the smoothing engine against a
straightforward re-implementation of the reference loop, on the same model and batch size.

The reference loop, per image and batch: repeat the image, ``randn_like`` noise, forward, ``argmax``,
copy the predictions to the host, count them in Python. The engine: seeded chunked noise on the device,
several images packed per batch, ``bincount`` on the device, one host read per group of images, bf16
autocast on GPUs. On a GPU it also prints model-FLOP utilisation (FlopCounterMode FLOPs of the forward
pass x passes per second over the chip's dense bf16 peak).

    python benchmarks/certify_throughput.py                                   # CPU: the demo classifier, 28 px
    python benchmarks/certify_throughput.py --model dmae_vit_base_patch16_dec512d8b --batch 1000 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import numpy as np
import torch
from pretrain_throughput import peak_tflops

from dmae.checkpoint import load_classifier
from dmae.smoothing import Smooth


def reference_counts(
    model: torch.nn.Module, x: torch.Tensor, num: int, batch: int, sigma: float, k: int, precision: str
) -> np.ndarray:
    """The reference sampling loop, written plainly."""
    counts = np.zeros(k, dtype=int)
    remaining = num
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with torch.no_grad():
        while remaining > 0:
            b = min(batch, remaining)
            remaining -= b
            rep = x.repeat((b, 1, 1, 1))
            noise = torch.randn_like(rep) * sigma
            with autocast:
                predictions = model(rep + noise).argmax(1)
            for idx in predictions.cpu().numpy():
                counts[idx] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dmae_vit_micro_patch4_dec64d2b")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--images", type=int, default=4, help="images certified per timing")
    ap.add_argument("--n", type=int, default=2000, help="noise samples per image")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--skip-reference", action="store_true", help="time the engine only")
    ap.add_argument("--compile", action="store_true", help="torch.compile the classifier for the engine")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(0)
    model, _ = load_classifier(None, args.num_classes, model=args.model)
    model.to(device).eval()
    c = model.config.encoder
    x = torch.rand(args.images, c.in_chans, c.img_size, c.img_size, device=device)
    engine_model = torch.compile(model) if args.compile else model
    smooth = Smooth(engine_model, args.num_classes, args.sigma, seed=0, precision=precision)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    smooth.sample_counts(x[:1], [0], args.n, args.batch)  # warm-up (and compilation) on every batch shape
    sync()
    t0 = time.perf_counter()
    smooth.sample_counts(x, list(range(args.images)), args.n, args.batch).counts.cpu()  # one host read, as CERTIFY does
    engine_s = time.perf_counter() - t0
    passes = args.images * args.n
    res = {
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "img_size": c.img_size,
        "batch": args.batch,
        "precision": precision,
        "compile": args.compile,
        "engine_passes_per_s": round(passes / engine_s, 1),
    }
    if not args.skip_reference:
        reference_counts(model, x[0:1], min(args.n, args.batch), args.batch, args.sigma, args.num_classes, precision)
        sync()
        t0 = time.perf_counter()
        for i in range(args.images):
            reference_counts(model, x[i : i + 1], args.n, args.batch, args.sigma, args.num_classes, precision)
        ref_s = time.perf_counter() - t0
        res["reference_passes_per_s"] = round(passes / ref_s, 1)
        res["speedup"] = round(ref_s / engine_s, 2)
    with contextlib.suppress(Exception):
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x[:1].expand(8, -1, -1, -1))
        flops_per_pass = counter.get_total_flops() / 8
        res["gflop_per_pass"] = round(flops_per_pass / 1e9, 3)
        peak = peak_tflops(device, None)
        if peak:
            res["mfu"] = round(flops_per_pass * passes / engine_s / 1e12 / peak, 4)
    if device.type == "cuda":
        res["max_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(res) if args.json else "\n".join(f"{k:>24}: {v}" for k, v in res.items()))


if __name__ == "__main__":
    main()
