"""The reference a user would pick instead of DMAE: a small plain CNN trained with Gaussian noise, certified alike.

A ~1.1M-parameter CNN (six 3x3 conv + BatchNorm + ReLU layers, two max-pools, global average pool, linear head;
the input layer normalizes with Fashion-MNIST's statistics inside the model, so noise is added in [0, 1] pixels
as for every dmae model) is trained on Fashion-MNIST for a fixed wall-clock budget with

- ``--method rs``: cross-entropy on noisy inputs (Gaussian data augmentation, Cohen et al., ICML 2019), or
- ``--method cr``: consistency regularization over m = 2 noise copies (Jeong & Shin, NeurIPS 2020; the loss of
  ``dmae.training.losses.consistency_loss`` with lambda = 2, mu = 0.5),

AdamW, lr 2e-3 with a cosine schedule over the number of steps the budget allows (measured on the first 20
steps), batch 128. Then it reports its accuracy under one noise draw on the first ``--eval-images`` test images
and certifies the test images ``dmae demo`` certifies (every ``--skip``-th, n0 = 100, alpha = 0.001, the same
seeds) with fixed-n CERTIFY (``--n``) or sequential CERTIFY (``--n-max``), printing the table of ``dmae report``.

    python benchmarks/cnn_reference.py --minutes 5 --method rs --sigma 0.25 --skip 50 --n 1000 --out runs/cnn_rs

``--load DIR`` skips training and certifies the model a previous run saved in ``DIR`` (its ``result.json`` keeps
the training record), so one timed training can be certified on other images or with other settings; the
training budget is wall time, so train with the machine to yourself and certify whenever.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from dmae.certification.log import CERTIFY_HEADER, SEQUENTIAL_HEADER, format_row
from dmae.corrupt import noisy_copies
from dmae.data import build_dataset, build_transform, dataset_info
from dmae.models.preprocess import InputAdapter
from dmae.reporting.report import read_log, summarize
from dmae.smoothing import Smooth
from dmae.smoothing.sequential import SequentialCertifier, SequentialSettings, sequence_for
from dmae.training.finetune import noisy_accuracy
from dmae.training.losses import consistency_loss, rs_loss


class SmallCNN(nn.Module):
    """[0, 1] images [N, 1, 28, 28] -> logits [N, 10]."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        info = dataset_info("fashion-mnist")
        self.preprocess = InputAdapter(28, 1, info.mean, info.std)
        widths, layers, c_in = (32, 64, "pool", 128, 128, "pool", 256, 256), [], 1
        for w in widths:
            if w == "pool":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c_in = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.preprocess(x)).mean((2, 3)))


def _to_tensor():
    return build_transform(dataset_info("fashion-mnist"), False, 28)


def train(
    model: nn.Module,
    method: str,
    sigma: float,
    minutes: float,
    seed: int,
    ds: Any = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Train on ``ds`` (default: Fashion-MNIST's training set) for ``minutes`` of ``clock`` (wall time; pass
    ``time.process_time`` for CPU time): AdamW lr 2e-3, weight decay 0.05, batch 128, cosine over the steps the
    budget allows from the speed of the first 20. Returns steps, seconds and the mean of the last 50 losses."""
    torch.manual_seed(seed)
    ds = build_dataset("fashion-mnist", "train", None, _to_tensor()) if ds is None else ds
    loader = DataLoader(ds, batch_size=128, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed + 1)
    m = 2 if method == "cr" else 1
    step, total, t0, losses = 0, None, clock(), []
    model.train()
    while True:
        for x, y in loader:
            if total is None and step == 20:  # the budget in steps, from the speed of the first 20
                total = max(21, int(minutes * 60 / ((clock() - t0) / 20)))
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total - 20)
            logits = model(noisy_copies(x, sigma, m, gen)).view(m, x.shape[0], -1)
            loss = (consistency_loss(logits, y, 2.0, 0.5) if m > 1 else rs_loss(logits[0], y)).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if total is not None:
                sched.step()
            step += 1
            losses.append(float(loss.detach()))
            if total is not None and step >= total:
                return {"steps": step, "seconds": clock() - t0, "final_loss": sum(losses[-50:]) / 50}


def certify(model: nn.Module, sigma: float, skip: int, n: int, n_max: int | None, out: Path) -> Path:
    """CERTIFY (or sequential CERTIFY) every ``skip``-th test image with dmae's engine; returns the TSV."""
    info = dataset_info("fashion-mnist")
    test = build_dataset("fashion-mnist", "test", None, _to_tensor())
    idx = list(range(0, len(test), skip))
    x = torch.stack([test[i][0] for i in idx])
    labels = [int(test[i][1]) for i in idx]
    smooth = Smooth(model.eval(), info.num_classes or 10, sigma, seed=0, precision="fp32")
    protocol = {"mode": "certify", "split": "test", "n0": 100, "n": n, "alpha": 0.001, "candidate": "select"}
    if n_max:  # what dmae report checks, recorded as dmae certify records it, so the two logs' protocols compare
        header, path = SEQUENTIAL_HEADER, out / f"sequential_sigma{sigma:g}.tsv"
        settings = SequentialSettings(100, n_max, 0.001, "targets", info.radii)
        cs = sequence_for(settings, sigma)
        protocol |= {
            "mode": "sequential",
            "n": None,
            "n_max": n_max,
            "sequential": "targets",
            "radii": list(info.radii),
            "sequence": f"{cs!r} looks={list(cs.looks)}",
            "schedule": settings.schedule,
        }
        certs = SequentialCertifier(smooth, settings).certify_batch(x, idx, 2000)
        rows = [
            format_row(header, i, y, c.prediction, c.radius, 0.0, c.n_samples, c.radius_continuous)
            for i, y, c in zip(idx, labels, certs, strict=True)
        ]
    else:
        header, path = CERTIFY_HEADER, out / f"certify_sigma{sigma:g}.tsv"
        certs = [
            c
            for s in range(0, len(idx), 2)
            for c in smooth.certify_batch(x[s : s + 2], idx[s : s + 2], 100, n, 0.001, 2200)
        ]
        rows = [
            format_row(header, i, y, c.prediction, c.radius, 0.0) for i, y, c in zip(idx, labels, certs, strict=True)
        ]
    path.write_text("\t".join(header) + "\n" + "".join(rows))
    path.with_suffix(".json").write_text(
        json.dumps({"sigma": sigma, "data": "fashion-mnist", "skip": skip, **protocol})
    )
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="training wall time")
    ap.add_argument("--method", choices=("rs", "cr"), default="rs")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--skip", type=int, default=50, help="certify every skip-th test image")
    ap.add_argument("--n", type=int, default=1000, help="fixed-n CERTIFY samples")
    ap.add_argument("--n-max", type=int, default=None, help="sequential CERTIFY instead, with this budget")
    ap.add_argument("--eval-images", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/cnn_reference")
    ap.add_argument("--load", default=None, help="certify the model saved by an earlier run in this folder")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = SmallCNN()
    params = sum(p.numel() for p in model.parameters())
    if args.load:
        if Path(args.load).resolve() == out.resolve():  # would overwrite the trained run's record and log
            raise SystemExit(f"--out {args.out} is the --load folder; certify into another folder")
        if not (Path(args.load) / "model.safetensors").is_file():  # a run that itself certified a loaded model
            raise SystemExit(f"{args.load} holds no model.safetensors: --load the folder that trained the model")
        trained = json.loads((Path(args.load) / "result.json").read_text())
        need = [k for k in ("steps", "seconds", "final_loss", "args") if k not in trained]
        need += [f"args.{k}" for k in ("method", "sigma", "seed", "minutes") if k not in trained.get("args", {})]
        if need:
            raise SystemExit(f"{Path(args.load) / 'result.json'} lacks {', '.join(need)}: not a result of this script")
        for key in (
            "method",
            "sigma",
            "seed",
        ):  # certifying under another noise level than trained is a different experiment
            if trained["args"][key] != getattr(args, key):
                raise SystemExit(f"--{key} {getattr(args, key)} differs from the loaded run's {trained['args'][key]}")
        model.load_state_dict(load_file(str(Path(args.load) / "model.safetensors")))
        # a run certified from a loaded one keeps the training time of the run that trained it
        minutes = trained.get("trained_minutes", trained["args"]["minutes"])
        stats = {k: trained[k] for k in ("steps", "seconds", "final_loss")} | {
            "loaded_from": str(args.load),
            "trained_minutes": minutes,
        }
    else:
        stats = train(model, args.method, args.sigma, args.minutes, args.seed)
    model.eval()
    if not args.load:
        save_file(model.state_dict(), str(out / "model.safetensors"))
    test = build_dataset("fashion-mnist", "test", None, _to_tensor())
    acc = noisy_accuracy(model, test, args.sigma, seed=0, limit=args.eval_images, precision="fp32")
    t0 = time.perf_counter()
    log = certify(model, args.sigma, args.skip, args.n, args.n_max, out)
    cert_s = time.perf_counter() - t0
    print(
        f"CNN ({params / 1e6:.2f}M parameters), {args.method.upper()} at sigma={args.sigma}: {stats['steps']} steps "
        f"of 128 in {stats['seconds'] / 60:.1f} min; accuracy under noise on {args.eval_images} test images "
        f"{100 * acc:.2f}%; certification {cert_s:.0f} s"
    )
    print(summarize([read_log(log)]).text())
    (out / "result.json").write_text(
        json.dumps(
            {"params": params, **stats, "noisy_accuracy": acc, "certify_seconds": cert_s, "args": vars(args)}, indent=2
        )
    )


if __name__ == "__main__":
    main()
