"""Fashion-MNIST on a CPU: does DMAE pretraining help robust fine-tuning and linear probing under noise?

1. Pretrain the micro preset twice with the same budget: DMAE (sigma 0.25, loss on all patches) and
   MAE (sigma 0, loss on masked patches).
2. Consistency-regularized fine-tuning at sigma 0.25 from the DMAE encoder and from random
   initialisation, same budget.
3. Linear probes under noise (sigma 0.25) on the DMAE, MAE and random encoders, same budget.
Every model is then scored on the full test set (10,000 images), clean and with one noise draw per
image at sigma 0.25; the checkpoint used is the one selected on held-out training images.

    python experiments/fashion_mnist_finetune.py [--out experiments/runs/fmnist] [--scale 1.0]

``--scale`` multiplies every training budget (0.1 for a smoke run). Runs already finished are reused.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dmae.checkpoint import load_classifier
from dmae.data import build_dataset, build_transform, dataset_info
from dmae.training.engine import TrainResult
from dmae.training.finetune import FinetuneConfig, LinprobeConfig, finetune, noisy_accuracy
from dmae.training.pretrain import PretrainConfig, pretrain

MODEL = "dmae_vit_micro_patch4_dec64d2b"


def _done(run: Path, name: str) -> bool:
    return (run / name).is_file()


def _finished(result: TrainResult) -> None:
    """A stage stopped early (Ctrl-C, SIGTERM) stops the experiment: later stages would use a half-trained model."""
    if not result.finished:
        raise SystemExit(
            f"stopped at step {result.step}/{result.total_steps} in {result.output_dir}; "
            "run the same command again to resume"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/runs/fmnist")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every training budget")
    ap.add_argument("--sigma", type=float, default=0.25)
    args = ap.parse_args()
    out = Path(args.out)
    s = args.scale
    t0 = time.perf_counter()
    common = dict(device="cpu", progress=False, seed=0)

    pre = {}
    for name, over in (("dmae", dict(sigma=args.sigma, loss="all")), ("mae", dict(sigma=0.0, loss="masked"))):
        run = out / f"pretrain_{name}"
        if not _done(run, "model.safetensors"):
            _finished(
                pretrain(
                    PretrainConfig(
                        model=MODEL,
                        epochs=2,
                        warmup_epochs=0.2,
                        batch_size=128,
                        lr=1e-3,
                        norm_pix_loss=True,
                        train_subset=int(60000 * s),
                        eval_images=256,
                        log_every=50,
                        output_dir=str(run),
                        resume=(run / "checkpoint.pt").exists(),
                        **over,
                        **common,
                    )
                )
            )
        pre[name] = str(run / "model.safetensors")

    ft_budget = dict(
        epochs=1,
        warmup_epochs=0.1,
        batch_size=64,
        train_subset=int(20000 * s),
        eval_images=2000,
        log_every=50,
        sigma=args.sigma,
        **common,
    )
    runs: dict[str, Path] = {}
    for name, init in (("cr_from_dmae", pre["dmae"]), ("cr_from_random", None)):
        run = out / name
        if not _done(run, "model_last.safetensors"):
            _finished(
                finetune(
                    FinetuneConfig(
                        init=init,
                        model=None if init else MODEL,
                        method="cr",
                        blr=1e-3,
                        layer_decay=0.75,
                        output_dir=str(run),
                        resume=(run / "checkpoint.pt").exists(),
                        **ft_budget,
                    )
                )
            )
        runs[name] = run
    # LARS scales each step by ||w|| / ||grad||, so its lr does not follow the batch size: use the paper's absolute
    # lr (blr 0.1 x 16384 / 256 = 6.4); blr x 256 / 256 = 0.1 here would barely move the head in 2 epochs
    lp_budget = {**ft_budget, "epochs": 2, "batch_size": 256, "lr": 6.4}
    for name, init in (("linprobe_dmae", pre["dmae"]), ("linprobe_mae", pre["mae"]), ("linprobe_random", None)):
        run = out / name
        if not _done(run, "model_last.safetensors"):
            _finished(
                finetune(
                    LinprobeConfig(
                        init=init,
                        model=None if init else MODEL,
                        output_dir=str(run),
                        resume=(run / "checkpoint.pt").exists(),
                        **lp_budget,
                    )
                )
            )
        runs[name] = run

    info = dataset_info("fashion-mnist")
    test = build_dataset("fashion-mnist", "test", transform=build_transform(info, False, 28))
    print(f"\n| run | selected epoch | clean test acc | noisy test acc (sigma={args.sigma}) |")
    print("|---|---|---|---|")
    for name, run in runs.items():
        path = run / "model_best.safetensors"
        model, _ = load_classifier(path, 10, pool="token" if name.startswith("linprobe") else "avg")
        clean = noisy_accuracy(model, test, 0.0, seed=0, precision="fp32")
        noisy = noisy_accuracy(model, test, args.sigma, seed=0, precision="fp32")
        print(f"| {name} | {_best_epoch(run)} | {100 * clean:.2f} | {100 * noisy:.2f} |")
    print(f"\ntotal {(time.perf_counter() - t0) / 60:.1f} min on {out}")


def _best_epoch(run: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(run / "model_best.safetensors"), framework="pt") as f:
        return (f.metadata() or {}).get("epoch", "?")


if __name__ == "__main__":
    main()
