"""``dmae demo``: the end-to-end job on the built-in data (Fashion-MNIST), sized for a laptop CPU.

Today: pretrain a small DMAE at sigma = 0.25 and write the reconstruction figure. Re-running the demo
in the same folder resumes (or reuses) the pretraining run instead of starting over.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dmae import config as C


def _evals(log: Path) -> list[dict]:
    if not log.is_file():
        return []
    rows = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    return [r for r in rows if r.get("type") == "eval"]


def run_demo(out: Path, epochs: int | None = None, device: str = "auto", progress: bool = True,
             overrides: dict | None = None) -> dict[str, float]:
    """Run the demo into ``out``; returns the reconstruction metrics before and after pretraining.

    ``overrides`` replaces options of the demo's pretraining preset (tests use it to shrink the run).
    """
    from dmae.pretrain import PretrainConfig, pretrain
    from dmae.visualize import visualize_checkpoint

    t0 = time.perf_counter()
    run = out / "pretrain"
    preset = C.load_values(C.preset_path("pretrain", "demo"), PretrainConfig)
    given = {"output_dir": str(run), "device": device, "progress": progress, "resume": (run / "checkpoint.pt").exists()}
    if epochs is not None:
        given["epochs"] = epochs
    given.update(overrides or {})
    cfg = C.build_config(PretrainConfig, preset, given)
    print(f"[dmae demo] 1/2 pretraining a DMAE ({cfg.model}) on Fashion-MNIST at sigma={cfg.sigma}, "
          f"{cfg.epochs} epoch(s) -> {run}", flush=True)
    pretrain(cfg)
    fig = visualize_checkpoint(run, out=out / "reconstructions.png", num=8, seed=1)
    print(f"[dmae demo] 2/2 wrote the reconstruction figure {fig}", flush=True)

    evals = _evals(run / "log.jsonl")
    first, last = evals[0], evals[-1]
    print(f"\n[dmae demo] reconstruction of {cfg.eval_images} held-out test images (noise sigma={cfg.sigma}, "
          f"{int(cfg.mask_ratio * 100)}% of patches masked):")
    print(f"  pixel MSE to the clean image: {first['mse']:.4f} before pretraining -> {last['mse']:.4f} after "
          f"(the noisy input itself: {last['noisy_mse']:.4f})")
    print(f"  training objective:           {first['loss']:.4f} -> {last['loss']:.4f}")
    print(f"[dmae demo] done in {(time.perf_counter() - t0) / 60:.1f} min; outputs in {out}")
    return {"mse_before": first["mse"], "mse_after": last["mse"], "noisy_mse": last["noisy_mse"]}
