"""Compare two classifiers on the same images: the difference in certified accuracy at each radius, its paired
standard error and the exact McNemar p-value (what `dmae report A.tsv B.tsv --compare` prints).

Here the two are the same small CNN trained under noise for fewer or more steps; any two models work.

    python examples/compare_two_classifiers.py --out runs/compare
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from certify_your_model import SmallCNN, train

import dmae
from dmae.data import build_dataset
from dmae.reporting.report import compare


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--train-images", type=int, default=10_000)
    p.add_argument("--steps", type=int, nargs=2, default=(100, 400), help="training steps of A and of B")
    p.add_argument("--skip", type=int, default=50)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--n-max", type=int, default=1000)
    args = p.parse_args(argv)
    data = Subset(build_dataset("fashion-mnist", "train"), range(args.train_images))
    test = build_dataset("fashion-mnist", "test")
    logs = []
    for name, steps in zip("AB", args.steps, strict=True):
        torch.manual_seed(0)
        model = SmallCNN()
        train(model, data, steps, sigma=0.25)
        result = dmae.certify(
            model,
            test,
            sigma=0.25,
            n_max=args.n_max,
            sequential="targets",
            skip=args.skip,
            max_images=args.max_images,
            log_dir=Path(args.out) / name,
        )
        log = result.logs[0]
        log.name = f"{name} ({steps} steps)"  # how the comparison names each side (default: the file's stem)
        logs.append(log)
    text = compare(logs[0], logs[1]).text()  # A - B on the same images, paired
    print(text)
    return text


if __name__ == "__main__":
    main()
