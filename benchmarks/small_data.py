"""Small data with the defaults: `dmae pretrain` then `dmae finetune` on a 2,000-image grey ImageFolder.

The folder is made from the first 2,000 Fashion-MNIST training images (``train/<class>/<i>.png``, grey 28 x 28
PNGs) and the first 1,000 test images (``val/``), in a temporary directory. Then, on one thread:

    dmae pretrain --model PRESET --data folder --data-root DIR --epochs P
    dmae finetune --data folder --data-root DIR --init PRETRAIN_RUN --sigma 0.25 --epochs E

with nothing else given, so every other option is a default (adapted to the data set by dmae, which prints
what it adapted). It reports the accuracy under one noise draw (sigma = 0.25) on the 200 held-out training
images (what fine-tuning selects on) and on the 1,000 ``val/`` images, the wall time of each stage, and the CNN
of ``benchmarks/cnn_reference.py`` trained for the same total wall time on the same 1,800 training images
(its recipe: AdamW lr 2e-3, cosine, batch 128; the loss of the dmae run, CR by default) and scored on the same
images with the same noise seeds.

    OMP_NUM_THREADS=1 python benchmarks/small_data.py --pretrain-epochs 30 --epochs 30 --out runs/small_data
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from cnn_reference import SmallCNN, train
from finetune_on_imagefolder import write_folder

from dmae.data import build_dataset, build_transform, dataset_info
from dmae.training.finetune import VAL_SPLIT_SEED, noisy_accuracy, split_train_val


def run_stage(args: list[str], log: Path) -> tuple[float, float]:
    """Run ``dmae ARGS`` on one thread, its output to ``log`` and the terminal; returns (wall, CPU) seconds, the CPU
    time being the child's user + system time (what the budget counts: it does not grow on a busy machine).

    Raises:
        SystemExit: the command failed (its last output lines are printed).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, "-m", "dmae", *args, "--no-progress"], env=env, capture_output=True, text=True
    )
    seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    log.write_text(proc.stdout + proc.stderr)
    print(proc.stdout + proc.stderr, flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"dmae {args[0]} failed (exit {proc.returncode}); see {log}")
    return seconds, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dmae_vit_micro_patch7_dec64d2b", help="the pretraining preset")
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--cnn-method", choices=("rs", "cr"), default="cr")
    ap.add_argument("--no-cnn", action="store_true", help="skip the CNN reference")
    ap.add_argument("--out", default="runs/small_data")
    ap.add_argument("--folder", default=None, help="reuse (or make) the folder here instead of a temporary one")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.folder or tmp)
        if not (root / "train").is_dir():
            write_folder(root, 2000, 1000)
        pre, ft = out / "pretrain", out / "finetune"
        for d in (pre, ft):  # a fresh run each time (the folder name is the benchmark's own)
            if d.exists():
                import shutil

                shutil.rmtree(d)
        data = ["--data", "folder", "--data-root", str(root)]
        (t_pre, c_pre) = run_stage(
            ["pretrain", "--model", args.model, *data, "--epochs", str(args.pretrain_epochs), "--output-dir", str(pre)],
            out / "pretrain.txt",
        )
        (t_ft, c_ft) = run_stage(
            [
                "finetune",
                *data,
                "--init",
                str(pre),
                "--sigma",
                str(args.sigma),
                "--epochs",
                str(args.epochs),
                "--output-dir",
                str(ft),
            ],
            out / "finetune.txt",
        )
        rows = [json.loads(ln) for ln in (ft / "log.jsonl").read_text().splitlines()]
        evals = [r for r in rows if r["type"] == "eval"]
        key = f"val_acc@{args.sigma:g}"
        best = max(evals, key=lambda r: r[key])
        result = {
            "pretrain_seconds": t_pre,
            "finetune_seconds": t_ft,
            "pretrain_cpu_seconds": c_pre,
            "finetune_cpu_seconds": c_ft,
            "best_epoch": best["epoch"],
            "heldout_acc": best[key],
            "val_folder_acc": best[f"test_acc@{args.sigma:g}"],
            "last_heldout_acc": evals[-1][key],
        }
        print(
            f"dmae: pretrain {c_pre:.0f} + finetune {c_ft:.0f} CPU-s = {(c_pre + c_ft) / 60:.2f} CPU-min "
            f"(wall {(t_pre + t_ft) / 60:.2f} min); accuracy under "
            f"sigma={args.sigma} noise: held-out {100 * best[key]:.1f}% (200 training images, best epoch "
            f"{best['epoch']:.0f}), val/ {100 * result['val_folder_acc']:.1f}% (1,000 images)",
            flush=True,
        )
        if not args.no_cnn:
            info = dataset_info("folder", root)
            tf = build_transform(info, False, 28)
            train_all = build_dataset("folder", "train", root, tf)
            train_idx, val_idx = split_train_val(len(train_all), 200)  # the dmae run's split (seed VAL_SPLIT_SEED)
            model = SmallCNN()
            stats = train(
                model,
                args.cnn_method,
                args.sigma,
                (c_pre + c_ft) / 60,
                0,
                Subset(train_all, train_idx),
                clock=time.process_time,
            )  # the dmae stages' budget is CPU time
            model.eval()
            # the seeds of dmae's per-epoch evaluation (seed + 1 held-out, seed + 2 test), its default seed 0
            held = noisy_accuracy(model, Subset(train_all, val_idx), args.sigma, 1, precision="fp32")
            val = noisy_accuracy(model, build_dataset("folder", "val", root, tf), args.sigma, 2, precision="fp32")
            result |= {
                "cnn_method": args.cnn_method,
                "cnn_steps": stats["steps"],
                "cnn_seconds": stats["seconds"],
                "cnn_heldout_acc": held,
                "cnn_val_folder_acc": val,
            }
            print(
                f"CNN reference ({args.cnn_method.upper()}, {stats['steps']} steps of 128 in "
                f"{stats['seconds']:.0f} CPU-s): "
                f"held-out {100 * held:.1f}%, val/ {100 * val:.1f}%",
                flush=True,
            )
        result["val_split_seed"] = VAL_SPLIT_SEED
        (out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
