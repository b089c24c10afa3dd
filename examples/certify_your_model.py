"""Certify a classifier of your own on a data set of your own, in one call.

A small CNN (its own normalization as the first layer, so it takes [0, 1] images) is trained for a few hundred
steps on Fashion-MNIST under Gaussian noise (sigma 0.25, Cohen et al.'s Gaussian data augmentation), then
certified with sequential CERTIFY on every 50th test image; the log resumes if the script is run again.

    python examples/certify_your_model.py --out runs/my_cnn          # under a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset

import dmae
from dmae.data import build_dataset


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head; normalizes [0, 1] pixels itself (Fashion-MNIST's mean and std)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 1, 28, 28] in [0, 1]
        return self.body((x - 0.286) / 0.353)


def train(model: nn.Module, data: torch.utils.data.Dataset, steps: int, sigma: float, seed: int = 0) -> None:
    """Cross-entropy on noisy copies (noise in [0, 1] pixel space, the space of the certified radius)."""
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    step = 0
    while step < steps:
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x + sigma * torch.randn(x.shape, generator=g)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    model.eval()


def main(argv: list[str] | None = None) -> dmae.CertifyResult:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/my_cnn", help="where the log and the report go")
    p.add_argument("--train-images", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--skip", type=int, default=50, help="certify every skip-th test image")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--n-max", type=int, default=1000)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = SmallCNN()
    train(model, Subset(build_dataset("fashion-mnist", "train"), range(args.train_images)), args.steps, sigma=0.25)
    test = build_dataset("fashion-mnist", "test")  # (image [1, 28, 28] in [0, 1], label)

    result = dmae.certify(
        model,
        test,
        sigma=0.25,
        n0=100,
        n_max=args.n_max,
        sequential="targets",
        skip=args.skip,
        max_images=args.max_images,
        log_dir=Path(args.out) / "certs",
    )
    print(result.table())
    print("report:", result.html(Path(args.out) / "report.html"))
    return result


if __name__ == "__main__":
    main()
