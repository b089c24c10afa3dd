"""Shared fixtures: tiny models and configs so the suite runs in minutes on two CPU cores."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch import nn

# Tests are deterministic and small; one thread per op keeps timings stable next to torchrun workers.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

PICO = "dmae_vit_pico_patch4_dec32d1b"


@pytest.fixture
def tiny_pretrain_kwargs(tmp_path):
    """Options for a pretraining run of a few seconds on 256 Fashion-MNIST images."""
    return dict(
        model=PICO,
        data="fashion-mnist",
        train_subset=256,
        batch_size=32,
        epochs=2,
        warmup_epochs=0.5,
        lr=1e-3,
        eval_images=32,
        log_every=2,
        progress=False,
        device="cpu",
        output_dir=str(tmp_path / "run"),
    )


def kill_after_rows(args: list[str], log: os.PathLike, rows: int, timeout: float = 120.0) -> None:
    """Run ``python -m dmae ARGS`` and SIGKILL it once ``log`` holds ``rows`` lines (header included)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    proc = subprocess.Popen(
        [sys.executable, "-m", "dmae", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log, deadline = Path(log), time.time() + timeout
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < rows):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def run_torchrun(args: list[str], nproc: int = 2) -> Any:
    """``torchrun --standalone --nproc_per_node NPROC -m dmae ARGS`` (gloo on the CPU); fails the test on error."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "dmae",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A small classifier saved as a fine-tuning run folder would hold it (head scaled so classes differ)."""
    import yaml

    from dmae.checkpoint import load_classifier, save_export

    run = tmp_path_factory.mktemp("clf")
    torch.manual_seed(0)
    model, _ = load_classifier(None, 10, model=PICO, stats=((0.286,), (0.353,)))
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0)
    save_export(model, run / "model_best.safetensors")
    (run / "config.yaml").write_text(yaml.safe_dump({"sigma": 0.25, "data": "fashion-mnist"}))
    return run


# toy base classifiers, shared by the smoothing and certification tests
class Linear2(nn.Module):
    """f(x) = 1 if w . x + b > 0 else 0, on [1, 2, 2] images; ||w|| = 1."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.register_buffer("w", w / w.norm())
        self.b = b
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.w + self.b
        return torch.stack([-z, z], dim=1)


class Constant(nn.Module):
    def __init__(self, k: int, c: int) -> None:
        super().__init__()
        self.k, self.c = k, c
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.k)
        out[:, self.c] = 1.0
        return out


class AlwaysNaN(nn.Module):
    """The reference code certifies this as class 0 at the largest radius n allows: argmax of NaN is 0."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 3), float("nan"))
