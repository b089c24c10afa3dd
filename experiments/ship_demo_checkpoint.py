"""Copy a finished ``dmae pretrain --config demo`` run into the package as the demo's shipped checkpoint.

The run must have been made by the shipped command (its resolved config equals the ``pretrain/demo`` preset's with
the default seed); its CPU and wall time are given here (measured around the command, e.g. with
``/usr/bin/time -f '%U %S %e'``), and PROVENANCE.json records them with the command, threads, versions and the
weights' sha256, which ``dmae demo`` checks before using the weights.

    OMP_NUM_THREADS=1 /usr/bin/time -f '%U %S %e' \\
        dmae pretrain --config demo --output-dir runs/demo_pretrain --no-progress
    python experiments/ship_demo_checkpoint.py runs/demo_pretrain --cpu-seconds 1450 --wall-seconds 1460 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import torch

import dmae
from dmae import config as C
from dmae.models.external import file_sha256
from dmae.training.pretrain import PretrainConfig
from dmae.workflows.demo import SHIPPED_DIR, SHIPPED_FILES, preset_differences


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the finished pretraining run folder")
    ap.add_argument("--cpu-seconds", type=float, required=True, help="user + system CPU time of the command")
    ap.add_argument("--wall-seconds", type=float, required=True, help="wall time of the command")
    ap.add_argument("--threads", type=int, required=True, help="OMP_NUM_THREADS the command ran with")
    args = ap.parse_args()
    made = C.load_values(args.run / "config.yaml", PretrainConfig)
    differ = preset_differences(made)
    if differ:
        raise SystemExit(f"{args.run} was not made by `dmae pretrain --config demo`: (run, preset) differ in {differ}")
    evals = [json.loads(ln) for ln in (args.run / "log.jsonl").read_text().splitlines() if '"eval"' in ln]
    if not evals or evals[-1]["epoch"] < made["epochs"]:
        raise SystemExit(f"{args.run} has not finished its {made['epochs']} epochs")
    SHIPPED_DIR.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES[:-1]:
        shutil.copyfile(args.run / name, SHIPPED_DIR / name)
    prov = {
        "command": f"OMP_NUM_THREADS={args.threads} dmae pretrain --config demo --seed {made['seed']}",
        "seed": made["seed"],
        "threads": args.threads,
        "epochs": made["epochs"],
        "model": made["model"],
        "cpu_minutes": args.cpu_seconds / 60,
        "wall_minutes": args.wall_seconds / 60,
        "final_eval": evals[-1],
        "sha256": file_sha256(SHIPPED_DIR / "model.safetensors"),
        "dmae": dmae.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
    }
    (SHIPPED_DIR / "PROVENANCE.json").write_text(json.dumps(prov, indent=1) + "\n")
    print(json.dumps(prov, indent=1))


if __name__ == "__main__":
    main()
