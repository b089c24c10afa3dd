"""Pretraining throughput: images/s of full DMAE training steps (noise, masking, forward, loss, backward, AdamW).

Synthetic [0, 1] images on the device, so the number is the model's, not the data loader's. On a GPU it
also prints model-FLOP utilisation: FLOPs of one step counted by torch's FlopCounterMode (matmuls and
attention, forward and backward) times steps per second, over the chip's dense bf16 peak.

    python benchmarks/pretrain_throughput.py                          # CPU: the demo preset at 28 px
    python benchmarks/pretrain_throughput.py --model dmae_vit_base_patch16_dec512d8b --batch 256 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from dmae.corrupt import add_gaussian_noise, random_masking
from dmae.models import create_model
from dmae.training.losses import reconstruction_loss
from dmae.training.pretrain import build_optimizer

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name substring, most specific first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.2),
)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dmae_vit_micro_patch4_dec64d2b")
    ap.add_argument("--img-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--in-chans", type=int, default=None)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--peak-tflops", type=float, default=None, help="chip peak for MFU (default: looked up by name)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    ap.add_argument("--profile", type=int, default=0, help="print the top-N ops by device time over 3 profiled steps")
    args = ap.parse_args()

    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(0)
    model = create_model(
        args.model,
        img_size=args.img_size,
        in_chans=args.in_chans,
        **({"mean": (0.5,) * args.in_chans, "std": (0.5,) * args.in_chans} if args.in_chans else {}),
    ).to(device)
    c = model.config
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.05)
    fwd = torch.compile(model) if args.compile else model
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(args.batch, c.in_chans, c.img_size, c.img_size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step() -> torch.Tensor:
        x_noisy = add_gaussian_noise(x, args.sigma, gen)
        masking = random_masking(x.shape[0], model.num_patches, args.mask_ratio, gen, device)
        with autocast:
            pred = fwd(x_noisy, masking)
        loss = reconstruction_loss(pred, model.target(x), masking.mask, True, "all")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    flops = None
    with contextlib.suppress(Exception):  # counting must never stop the benchmark
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = counter.get_total_flops()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.item()
    sync()
    dt = time.perf_counter() - t0
    ips = args.batch * args.steps / dt
    res = {
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "img_size": c.img_size,
        "batch": args.batch,
        "precision": precision,
        "compile": args.compile,
        "images_per_s": round(ips, 1),
        "step_ms": round(1000 * dt / args.steps, 2),
    }
    if flops:
        res["gflop_per_image"] = round(flops / args.batch / 1e9, 3)
        achieved = flops * args.steps / dt / 1e12
        res["achieved_tflops"] = round(achieved, 2)
        peak = peak_tflops(device, args.peak_tflops)
        if peak:
            res["mfu"] = round(achieved / peak, 4)
    if device.type == "cuda":
        res["max_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                step()
            sync()
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.profile, max_name_column_width=60))
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>16}: {v}")


if __name__ == "__main__":
    main()
