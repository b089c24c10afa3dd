"""Fine-tune the shipped DMAE encoder on an ImageFolder of your own, then certify it.

The shipped checkpoint is a micro DMAE pretrained on Fashion-MNIST at sigma 0.25 (`dmae demo` uses it). Point
``--data-root`` at a folder ``ROOT/{train,val}/<class>/<image>``; without one, the script writes a small grey
folder from Fashion-MNIST images to show the layout. Options you do not give are fitted to a small data set and
printed (held-out size, warmup, lr).

    python examples/finetune_on_imagefolder.py --data-root my_images --out runs/my_folder --epochs 10
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from dmae.certification.runner import CertifyConfig, run_certification
from dmae.data import build_dataset
from dmae.training.finetune import FinetuneConfig, finetune
from dmae.workflows.demo import SHIPPED_DIR


def write_folder(root: Path, train_images: int, val_images: int) -> Path:
    """Fashion-MNIST images as grey PNGs in ImageFolder layout (a stand-in for the user's own folder)."""
    for split, src, n in (("train", "train", train_images), ("val", "test", val_images)):
        ds = build_dataset("fashion-mnist", src)
        for i in range(n):
            d = root / split / f"{int(ds.targets[i]):02d}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ds.images[i, 0].numpy(), mode="L").save(d / f"{i:05d}.png")
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None, help="an ImageFolder (default: write one from Fashion-MNIST)")
    p.add_argument("--out", default="runs/my_folder")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-images", type=int, default=2000, help="without --data-root: images to write")
    p.add_argument("--n", type=int, default=1000, help="noise samples per certified image")
    args = p.parse_args(argv)
    out = Path(args.out)
    # without a folder: the first test images as val/ (the first 20 already hold all 10 classes)
    root = (
        Path(args.data_root)
        if args.data_root
        else write_folder(out / "folder", args.train_images, max(20, args.train_images // 4))
    )

    run = finetune(
        FinetuneConfig(
            init=str(SHIPPED_DIR / "model.safetensors"),
            data="folder",
            data_root=str(root),
            sigma=0.25,
            epochs=args.epochs,
            output_dir=str(out / "finetune"),
            progress=False,
        )
    )
    print("held-out accuracy under noise:", run.best)
    [log] = run_certification(
        CertifyConfig(
            checkpoint=str(out / "finetune"),
            data="folder",
            data_root=str(root),
            split="val",
            n0=100,
            n=args.n,
            output_dir=str(out / "certs"),
            progress=False,
        )
    )
    print("certification log:", log.path)


if __name__ == "__main__":
    main()
