"""``dmae demo``: the end-to-end job on the built-in data (Fashion-MNIST), sized for a laptop CPU.

Pretrain a small DMAE at sigma = 0.25, write the reconstruction figure, fine-tune its encoder with
consistency regularization at sigma = 0.25, certify a slice of the test set with randomized smoothing, and
print the certified-accuracy report. Re-running the demo in the same folder resumes (or reuses) its runs
instead of starting over.
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


# the certification slice: every 200th test image (50 images), n = 1,000 samples (radius ceiling 0.62 at sigma 0.25)
DEMO_CERTIFY = {"n0": 100, "n": 1000, "alpha": 0.001, "skip": 200, "batch": 1100}


def run_demo(out: Path, epochs: int | None = None, device: str = "auto", progress: bool = True,
             overrides: dict | None = None, finetune_overrides: dict | None = None,
             certify_overrides: dict | None = None) -> dict[str, float]:
    """Run the demo into ``out``; returns its headline numbers.

    ``overrides`` / ``finetune_overrides`` / ``certify_overrides`` replace options of the demo's pretraining /
    fine-tuning / certification settings (tests use them to shrink the run).
    """
    from dmae.finetune import FinetuneConfig, finetune, noisy_accuracy
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
    print(f"[dmae demo] 1/4 pretraining a DMAE ({cfg.model}) on Fashion-MNIST at sigma={cfg.sigma}, "
          f"{cfg.epochs} epoch(s) -> {run}", flush=True)
    pretrain(cfg)
    fig = visualize_checkpoint(run, out=out / "reconstructions.png", num=8, seed=1)
    print(f"[dmae demo] 2/4 wrote the reconstruction figure {fig}", flush=True)

    ft_run = out / "finetune"
    ft_preset = C.load_values(C.preset_path("finetune", "demo"), FinetuneConfig)
    ft_given = {"init": str(run / "model.safetensors"), "output_dir": str(ft_run), "device": device,
                "progress": progress, "resume": (ft_run / "checkpoint.pt").exists(), **(finetune_overrides or {})}
    ft_cfg = C.build_config(FinetuneConfig, ft_preset, ft_given)
    print(f"[dmae demo] 3/4 fine-tuning the encoder with consistency regularization at sigma={ft_cfg.sigma} -> {ft_run}",
          flush=True)
    ft = finetune(ft_cfg)

    from dmae.certify import CertifyConfig, run_certification
    from dmae.report import plot_curves, read_log, summarize

    cert_cfg = CertifyConfig(checkpoint=str(ft_run), data="fashion-mnist", sigma=(ft_cfg.sigma,), device=device,
                             output_dir=str(out / "certify"), progress=progress, **{**DEMO_CERTIFY, **(certify_overrides or {})})
    print(f"[dmae demo] 4/4 certifying every {cert_cfg.skip}th test image with randomized smoothing "
          f"(n0={cert_cfg.n0}, n={cert_cfg.n}, alpha={cert_cfg.alpha}) -> {cert_cfg.output_dir}", flush=True)
    cert = run_certification(cert_cfg)[0]

    evals = _evals(run / "log.jsonl")
    first, last = evals[0], evals[-1]
    print(f"\n[dmae demo] reconstruction of {cfg.eval_images} held-out test images (noise sigma={cfg.sigma}, "
          f"{int(cfg.mask_ratio * 100)}% of patches masked):")
    print(f"  pixel MSE to the clean image: {first['mse']:.4f} before pretraining -> {last['mse']:.4f} after "
          f"(the noisy input itself: {last['noisy_mse']:.4f})")
    print(f"  training objective:           {first['loss']:.4f} -> {last['loss']:.4f}")
    from dmae.checkpoint import load_classifier
    from dmae.data import build_dataset, build_transform, dataset_info

    info = dataset_info("fashion-mnist")
    test = build_dataset("fashion-mnist", "test", ft_cfg.data_root, build_transform(info, False, 28))
    best_path = ft_run / ("model_best.safetensors" if (ft_run / "model_best.safetensors").exists() else "model_last.safetensors")
    model, _ = load_classifier(best_path, 10)
    acc_noisy = noisy_accuracy(model, test, ft_cfg.sigma, seed=0, limit=ft_cfg.eval_images, precision="fp32")
    acc_clean = noisy_accuracy(model, test, 0.0, seed=0, limit=ft_cfg.eval_images, precision="fp32")
    n = len(test) if ft_cfg.eval_images is None else min(ft_cfg.eval_images, len(test))
    print(f"[dmae demo] base classifier (selected on held-out training images) on {n} test images:")
    print(f"  accuracy under noise sigma={ft_cfg.sigma}: {100 * acc_noisy:.2f}%   clean: {100 * acc_clean:.2f}%")
    log = read_log(cert.path)
    table = summarize([log])
    print(f"[dmae demo] certified accuracy of the smoothed classifier on {len(log)} test images ({cert.path}):")
    print(table.text())
    plot = plot_curves([log], out / "certified_accuracy.png", f"Fashion-MNIST, sigma={ft_cfg.sigma}, n={cert_cfg.n}")
    print(f"[dmae demo] wrote {plot}")
    print(f"[dmae demo] done in {(time.perf_counter() - t0) / 60:.1f} min; outputs in {out}")
    return {"mse_before": first["mse"], "mse_after": last["mse"], "noisy_mse": last["noisy_mse"],
            "noisy_acc": acc_noisy, "clean_acc": acc_clean, "finetune_steps": ft.step,
            "certified_acc_0": log.certified_accuracy(0.0), "certified_acc_0.25": log.certified_accuracy(0.25),
            "acr": log.acr, "certified_images": len(log)}
