"""Launched by test_distributed.py under torchrun: a short pretraining run, then each rank saves its weights."""

import json
import os
import sys

import torch

from dmae.training.pretrain import PretrainConfig, pretrain

out = sys.argv[1]
torch.set_num_threads(1)
res = pretrain(
    PretrainConfig(
        model="dmae_vit_pico_patch4_dec32d1b",
        train_subset=256,
        batch_size=16,
        epochs=1,
        warmup_epochs=0.5,
        lr=1e-3,
        eval_images=16,
        log_every=2,
        progress=False,
        device="cpu",
        output_dir=os.path.join(out, "run"),
    )
)
rank = int(os.environ["RANK"])
torch.save(res.model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"total_steps": res.total_steps, "losses": res.losses}, f)
