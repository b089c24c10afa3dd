"""Shared fixtures: tiny models and configs so the suite runs in minutes on two CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

# Tests are deterministic and small; one thread per op keeps timings stable next to torchrun workers.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

PICO = "dmae_vit_pico_patch4_dec32d1b"


@pytest.fixture
def tiny_pretrain_kwargs(tmp_path):
    """Options for a pretraining run of a few seconds on 256 Fashion-MNIST images."""
    return dict(model=PICO, data="fashion-mnist", train_subset=256, batch_size=32, epochs=2, warmup_epochs=0.5,
                lr=1e-3, eval_images=32, log_every=2, progress=False, device="cpu", output_dir=str(tmp_path / "run"))
