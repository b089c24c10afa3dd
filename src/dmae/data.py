"""Data sets and transforms. Every image leaves here as a float tensor in [0, 1] (never normalized).

Supported: ``fashion-mnist`` (always available: torchvision's layout, or the Debian package
``dataset-fashion-mnist`` under ``/usr/share/datasets/fashion-mnist``), ``cifar10`` (torchvision's
``cifar-10-batches-py``), ``imagenet`` and ``folder`` (ImageFolder ``ROOT/{train,val}/<class>/*``).
Grey images stay one channel: small presets take them as they are; a 3-channel model repeats the
channel in its first layer, after the noise, so radii stay in the data's own pixel space. An ImageFolder
whose images are grey is read as one channel too (:func:`folder_channels`), as is any ImageFolder given to a
1-channel model (``build_dataset(..., channels=1)``). Small square images (MNIST / CIFAR-sized, at most
:data:`SMALL_IMAGE_SIDE` pixels) in an ImageFolder are not cropped: like CIFAR-10 they are only flipped to train,
and the model resizes them after the noise.

Data sets: Fashion-MNIST (Xiao et al., 2017), CIFAR-10 (Krizhevsky, 2009), ImageNet ILSVRC-2012
(Russakovsky et al., 2015).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import random
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T

from dmae.errors import DmaeError, InputError
from dmae.runtime import derive_seed

# ImageNet's channel statistics: the normalization of official checkpoints, which do not store theirs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STREAM_AUGMENT = 0x41554720  # leading key of the per-(epoch, image) augmentation streams
# Grey ImageFolders are normalized with the mean of ImageNet's channel statistics (timm's 1-channel convention).
GREY_MEAN, GREY_STD = (0.449,), (0.226,)
# PIL modes of one-channel images (with or without alpha): such a folder is read as 1 channel.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"})
FOLDER_PROBE_IMAGES = 64  # images whose headers decide an ImageFolder's channel count (spread over the folder)
# ImageFolder images no larger than this (square) are taken at native size, as CIFAR-10: ImageNet's crop recipe
# (RandomResizedCrop down to 8% of the area, Resize 256/224 + CenterCrop) destroys a 28-px image.
SMALL_IMAGE_SIDE = 64


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set (``mean``/``std``: per-channel, [0, 1] pixel units)."""

    name: str
    num_classes: int | None  # None: known only once the folder is read
    channels: int
    size: int | None  # native side in pixels; None: images are cropped to the model's size
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: tuple[str, str]  # (train split, evaluation split)
    radii: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # the l2 radii its certified-accuracy tables report


# Fashion-MNIST: Xiao et al., 2017; CIFAR-10: Krizhevsky, 2009; ImageNet: Russakovsky et al., 2015.
DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), ("train", "test")),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), ("train", "test")),
    "imagenet": DatasetInfo(
        "imagenet", 1000, 3, None, IMAGENET_MEAN, IMAGENET_STD, ("train", "val"), (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
    ),
    "folder": DatasetInfo("folder", None, 3, None, IMAGENET_MEAN, IMAGENET_STD, ("train", "val")),
}

DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)  # the choices of every --data option

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(DmaeError, RuntimeError):
    """A data set could not be found or read; the message says what was looked for where."""


def dataset_info(name: str, root: str | os.PathLike | None = None) -> DatasetInfo:
    """The registry entry of data set ``name``; with ``root``, a ``folder`` of grey images says 1 channel.

    ``folder`` is declared 3-channel (ImageNet's statistics); given its ``root``, its images are looked at
    (:func:`folder_channels`) and a grey folder gets ``channels=1`` and :data:`GREY_MEAN` / :data:`GREY_STD`, so a
    small preset fitted to it (:func:`dmae.models.registry.model_config_for_data`) takes 1-channel images.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    try:
        info = DATASETS[name]
    except KeyError:
        raise InputError(f"unknown data set {name!r}; available: {', '.join(DATASETS)}") from None
    if name == "folder" and root is not None and folder_channels(root) == 1:
        info = dataclasses.replace(info, channels=1, mean=GREY_MEAN, std=GREY_STD)
    return info


def folder_channels(
    root: str | os.PathLike, splits: tuple[str, ...] = ("train", "val"), probe: int = FOLDER_PROBE_IMAGES
) -> int:
    """The channel count of an ImageFolder's images: 1 when every probed image is grey, else 3.

    Reads only the headers of up to ``probe`` images of the first split of ``splits`` that exists under ``root``:
    the first images (ImageFolder's sorted order) of classes spread evenly over the sorted class folders, so a
    folder of a million images costs ``probe`` directory listings. A folder that does not exist, or holds no
    image, says 3 (:func:`build_dataset` reports it). A colour image among grey ones that the probe missed is
    refused when it is loaded.
    """
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets.folder import IMG_EXTENSIONS

    for split in splits:
        d = Path(root) / split
        if not d.is_dir():
            continue
        classes = sorted(p for p in d.iterdir() if p.is_dir())
        if not classes:
            return 3
        per_class = max(1, -(-probe // len(classes)))  # ceil: a few-class folder is probed deeper
        picked = classes[:: max(1, len(classes) // probe)][:probe]
        files = [
            f
            for c in picked
            for f in sorted(p for p in c.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())[:per_class]
        ]
        if not files:
            return 3
        for path in files:
            try:
                with Image.open(path) as im:
                    if im.mode not in GREY_MODES:
                        return 3
            except (OSError, UnidentifiedImageError):
                return 3  # unreadable: ImageFolder's loader names the file when it is read
        return 1
    return 3


def default_data_root() -> Path:
    """Where downloads go and roots are looked for by default: ``$DMAE_DATA`` or ``~/.cache/dmae/data``."""
    return Path(os.environ.get("DMAE_DATA", Path.home() / ".cache" / "dmae" / "data"))


# ----------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (``.gz`` or raw): unsigned-byte tensors of MNIST-style data sets.

    Returns:
        A ``uint8`` array of the shape the header gives (``[N, 28, 28]`` images, ``[N]`` labels).
    Raises:
        DataError: the file cannot be read, is not an unsigned-byte idx file (bad magic), or its size
            disagrees with its header.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file (bad magic {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DataError(f"{path}: header says {dims} ({expected} bytes), file holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def find_fashion_mnist(root: str | os.PathLike | None) -> Path:
    """Locate the directory holding the four Fashion-MNIST idx files (``.gz`` or not).

    Looks in ``root`` if given, else in :func:`default_data_root` and :data:`FASHION_MNIST_DIRS`; in each,
    the directory itself, ``FashionMNIST/raw`` (torchvision's layout) and ``fashion-mnist``.

    Raises:
        DataError: no candidate holds all four files; the message lists where it looked.
    """
    candidates: list[Path] = []
    bases = [Path(root)] if root else [default_data_root(), *map(Path, FASHION_MNIST_DIRS)]
    for base in bases:
        candidates += [base, base / "FashionMNIST" / "raw", base / "fashion-mnist"]
    for d in candidates:
        if all(_idx_file(d, name) is not None for pair in FASHION_MNIST_FILES.values() for name in pair):
            return d
    looked = "\n  ".join(str(c) for c in candidates)
    raise DataError(
        "fashion-mnist: no directory holds train/t10k idx files (e.g. train-images-idx3-ubyte[.gz]); looked in:\n  "
        f"{looked}\nInstall it offline with `apt-get install dataset-fashion-mnist`, pass --data-root, "
        "or add --download when online."
    )


def _idx_file(d: Path, name: str) -> Path | None:
    for suffix in ("", ".gz"):
        if (d / (name + suffix)).is_file():
            return d / (name + suffix)
    return None


class FashionMNIST(Dataset):
    """Fashion-MNIST (Xiao et al., 2017) held in memory as uint8; items are ``([1, 28, 28] float in [0, 1], label)``.

    ``transform`` is applied to the float tensor. With ``download``, torchvision fetches both splits into
    ``root`` (or :func:`default_data_root`) when no copy is found.

    Raises:
        ValueError: ``split`` is not ``'train'`` or ``'test'``.
        DataError: no copy is found (and ``download`` is off), a file cannot be read (:func:`read_idx`),
            or images and labels disagree.
    """

    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

    def __init__(
        self, root: str | os.PathLike | None, split: str, transform: Callable | None = None, download: bool = False
    ) -> None:
        if split not in FASHION_MNIST_FILES:
            raise InputError(f"fashion-mnist split must be 'train' or 'test', got {split!r}")
        try:
            d = find_fashion_mnist(root)
        except DataError:
            if not download:
                raise
            from torchvision.datasets import FashionMNIST as TVFashionMNIST

            base = Path(root) if root else default_data_root()
            TVFashionMNIST(str(base), train=True, download=True)
            TVFashionMNIST(str(base), train=False, download=True)
            d = find_fashion_mnist(base)
        img_file, lbl_file = (_idx_file(d, name) for name in FASHION_MNIST_FILES[split])
        if img_file is None or lbl_file is None:  # find_fashion_mnist saw them: removed since
            raise DataError(f"fashion-mnist in {d}: the {split} idx files are gone")
        images, labels = read_idx(img_file), read_idx(lbl_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"fashion-mnist in {d}: images {images.shape} and labels {labels.shape} do not match")
        self.root = d
        self.images = torch.from_numpy(images.copy()).unsqueeze(1)  # [N, 1, 28, 28] uint8
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        x = self.images[idx].float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[idx])


# ----------------------------------------------------------------------------- transforms
def build_transform(info: DatasetInfo, train: bool, img_size: int, recipe: str = "pretrain") -> Callable:
    """Transforms that end in [0, 1] float tensors ``[C, H, W]``.

    Native-size data sets (Fashion-MNIST, CIFAR-10) are only flipped when training (the paper's CIFAR-10
    recipe); the model resizes them after the noise. ImageFolder data is cropped to ``img_size`` here:
    RandomResizedCrop(scale 0.2-1 for ``recipe='pretrain'``, as MAE's pretraining; 0.08-1 otherwise;
    bicubic) + flip to train, Resize(256/224 * size) + CenterCrop to evaluate; except small square images
    (side <= :data:`SMALL_IMAGE_SIDE`), which are treated like CIFAR-10's (see :class:`FolderTransform`).
    """
    to_tensor = [] if info.name == "fashion-mnist" else [T.ToTensor()]
    if info.size is not None:
        return T.Compose(to_tensor + ([T.RandomHorizontalFlip()] if train else []))
    return FolderTransform(train, img_size, recipe)


class FolderTransform:
    """An ImageFolder image (PIL) -> ``[C, H, W]`` in [0, 1]: ImageNet's crop recipe for photos, native size for
    small images.

    A square image of side <= :data:`SMALL_IMAGE_SIDE` (an MNIST- or CIFAR-sized image) is kept at its size and only
    flipped to train; the model resizes it after the noise, so radii stay in its own pixel space (as CIFAR-10's).
    Any other image: RandomResizedCrop(``img_size``, scale 0.2-1 for ``recipe='pretrain'``, 0.08-1 otherwise,
    bicubic) + flip to train, Resize(256/224 * ``img_size``) + CenterCrop(``img_size``) to evaluate.
    """

    def __init__(self, train: bool, img_size: int, recipe: str = "pretrain") -> None:
        self.train, self.img_size, self.recipe = train, img_size, recipe
        bicubic = T.InterpolationMode.BICUBIC
        self.native = T.Compose([T.ToTensor()] + ([T.RandomHorizontalFlip()] if train else []))
        if train:
            scale = (0.2, 1.0) if recipe == "pretrain" else (0.08, 1.0)
            self.crop = T.Compose(
                [
                    T.RandomResizedCrop(img_size, scale=scale, interpolation=bicubic),
                    T.RandomHorizontalFlip(),
                    T.ToTensor(),
                ]
            )
        else:
            self.crop = T.Compose(
                [
                    T.Resize(round(img_size * 256 / 224), interpolation=bicubic),
                    T.CenterCrop(img_size),
                    T.ToTensor(),
                ]
            )

    def __call__(self, img: Any) -> torch.Tensor:
        w, h = img.size
        return (self.native if w == h <= SMALL_IMAGE_SIDE else self.crop)(img)

    def __repr__(self) -> str:
        return (
            f"FolderTransform(small square images (<= {SMALL_IMAGE_SIDE} px): {self.native!r}; others: {self.crop!r})"
        )


class _FolderLoader:
    """ImageFolder's loader reading every image as ``mode`` ('L' or 'RGB'); picklable for worker processes.

    With ``strict`` (a folder read as grey because its images are), a colour image is refused rather than
    silently turned grey.
    """

    def __init__(self, mode: str, strict: bool) -> None:
        self.mode, self.strict = mode, strict

    def __call__(self, path: str) -> Any:
        from PIL import Image

        with open(path, "rb") as f:
            img = Image.open(f)
            if self.strict and img.mode not in GREY_MODES:
                raise DataError(
                    f"{path} is a {img.mode} image, but its folder was read as grey (its first images "
                    "are); make the folder all grey or all colour"
                )
            return img.convert(self.mode)


def build_dataset(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    transform: Callable | None = None,
    download: bool = False,
    channels: int | None = None,
) -> Dataset:
    """Build a data set by name; ``split`` is ``'train'`` or the evaluation split (``'test'``/``'val'``).

    Items are ``(image, label)``; with a :func:`build_transform` transform the image is a ``[C, H, W]``
    float tensor in [0, 1]. ``imagenet`` and ``folder`` need ``root`` holding ``<split>/<class>/<image>``.

    ``channels`` is the channel count of the model the images are for (None: unknown). An ImageFolder is
    read as 1 channel when that is 1 (colour images are made grey for a grey model) or when the folder's images
    are grey (:func:`folder_channels`; a 3-channel model repeats the channel after the noise), else as RGB.
    Other data sets keep their own channels (a 3-channel model repeats Fashion-MNIST's one).

    Raises:
        ValueError: an unknown name (:func:`dataset_info`) or a split the data set does not have.
        DataError: the data cannot be found or read (no ``cifar-10-batches-py`` without ``download``, no
            ``root`` or ``root/<split>`` for ImageFolder sets, not an ImageFolder, an ``imagenet`` folder
            without exactly 1000 classes), or as :class:`FashionMNIST` raises; when an item is read, a colour
            image in a folder read as grey.
        ValueError: ``channels`` other than None, 1 or 3.
    """
    if channels not in (None, 1, 3):
        raise InputError(f"channels must be 1 or 3 (the model's input channels), got {channels!r}")
    info = dataset_info(name)
    if split not in info.splits:
        raise InputError(f"{name}: split must be one of {info.splits}, got {split!r}")
    if name == "fashion-mnist":
        return FashionMNIST(root, split, transform=transform, download=download)
    if name == "cifar10":
        from torchvision.datasets import CIFAR10

        base = Path(root) if root else default_data_root()
        if not download and not (base / "cifar-10-batches-py").is_dir():
            raise DataError(
                f"cifar10: no {base / 'cifar-10-batches-py'} (torchvision layout); pass --data-root or --download"
            )
        try:
            return CIFAR10(str(base), train=(split == "train"), transform=transform, download=download)
        except RuntimeError as e:
            raise DataError(f"cifar10 in {base}: {e}") from e
    return _image_folder(name, info, split, root, transform, channels)


def _image_folder(
    name: str,
    info: DatasetInfo,
    split: str,
    root: str | os.PathLike | None,
    transform: Callable | None,
    channels: int | None,
) -> Dataset:
    """``imagenet`` / ``folder``: the ImageFolder ``root/split``, read as 1 or 3 channels (see :func:`build_dataset`).

    Raises:
        DataError: no ``root`` or ``root/split``, not an ImageFolder, an ``imagenet`` folder without 1000 classes.
    """
    from torchvision.datasets import ImageFolder

    if root is None:
        raise DataError(f"{name}: pass --data-root, a directory with {'/'.join(info.splits)}/<class>/<image> inside")
    d = Path(root) / split
    if not d.is_dir():
        raise DataError(
            f"{name}: no directory {d} (expected ImageFolder layout {root}/{{{','.join(info.splits)}}}/<class>/<image>)"
        )
    # the folder's own channel count decides for 3-channel and unknown models (same probe for every split)
    grey_images = name == "folder" and folder_channels(root) == 1
    loader = _FolderLoader("L" if channels == 1 or grey_images else "RGB", strict=grey_images and channels != 1)
    try:
        ds = ImageFolder(str(d), transform=transform, loader=loader)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{name}: {d} is not an ImageFolder ({e})") from e
    if name == "imagenet" and len(ds.classes) != 1000:
        raise DataError(
            f"imagenet: {d} has {len(ds.classes)} class folders, expected 1000 (use 'folder' for other sets)"
        )
    return ds


def dataset_size(ds: Dataset) -> int:
    """``len(ds)``. torch's ``Dataset`` declares no ``__len__`` (an iterable-style data set needs none); every data
    set dmae reads is map-style and has one.

    Raises:
        TypeError: ``ds`` has no length.
    """
    return len(cast(Sized, ds))


def num_classes_of(ds: Dataset) -> int:
    """Class count of a built data set (its ``classes`` attribute).

    Raises:
        ValueError: the data set has no ``classes`` attribute.
    """
    if isinstance(ds, FashionMNIST):
        return len(FashionMNIST.classes)
    classes = getattr(ds, "classes", None)
    if classes is None:
        raise InputError(f"cannot tell the class count of {type(ds).__name__}")
    return len(classes)


# ----------------------------------------------------------------------------- determinism
def sample_seed(seed: int, epoch: int, idx: int) -> int:
    """A seed for one sample's augmentation, a pure function of (run seed, epoch, index)."""
    return derive_seed(seed, STREAM_AUGMENT, epoch, idx)


def fingerprint(ds: Dataset, images: int = 16) -> str:
    """What a resumed run compares to tell one data set (or transform) from another: its size, its transform,
    and a SHA-256 of its first ``images`` items as the transform yields them (random augmentation seeded, as in
    :class:`SeededDataset`), labels included."""
    import hashlib

    h = hashlib.sha256()
    seeded = SeededDataset(ds, 0)
    for i in range(min(images, dataset_size(ds))):
        x, y = seeded[(0, i)]
        h.update(np.asarray(x).tobytes())
        h.update(str(int(y)).encode())
    base = ds
    while hasattr(base, "dataset"):  # Subset wrappers: the transform is the underlying set's
        base = base.dataset
    return f"{dataset_size(ds)} images; transform {getattr(base, 'transform', None)!r}; sha256 {h.hexdigest()[:16]}"


class SeededDataset(Dataset):
    """Wraps a data set so that item ``(epoch, idx)`` is augmented with RNGs seeded from (seed, epoch, idx).

    This makes a run's data independent of worker count and of where it was resumed. Python's ``random``
    state and torch's CPU RNG are restored after each item, so the caller's streams are untouched.
    """

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = seed

    def __len__(self) -> int:
        return dataset_size(self.base)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, idx = key
        s = sample_seed(self.seed, epoch, idx)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            try:
                return self.base[idx]
            finally:
                random.setstate(py_state)


class ShardedEpochSampler(Sampler):
    """Shuffles once per epoch from ``seed + epoch``, drops the tail, and gives each rank a disjoint share.

    Yields ``(epoch, idx)`` keys for :class:`SeededDataset`. ``set_epoch(epoch, start_batch)`` skips the
    first ``start_batch`` batches of this rank, which is how a resumed run picks up mid-epoch. Each
    rank's batch count per epoch is rounded down to a multiple of ``multiple_of`` (gradient accumulation).

    Raises:
        ValueError: (from the constructor) ``n`` images give no full batch per rank after that rounding.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        multiple_of: int = 1,
    ) -> None:
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        per_rank_batches = n // (batch_size * world_size)
        self.batches_per_epoch = (per_rank_batches // multiple_of) * multiple_of
        if self.batches_per_epoch < 1:
            raise InputError(
                f"{n} images are too few for batch size {batch_size} x {world_size} process(es) x {multiple_of} "
                "accumulation steps; lower --batch-size or --accum-iter"
            )
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to iterate (its shuffle) and skip this rank's first ``start_batch`` batches."""
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        total = self.batches_per_epoch * self.batch_size * self.world_size
        mine = order[:total][self.rank :: self.world_size]
        for idx in mine[self.start_batch * self.batch_size :].tolist():
            yield self.epoch, idx

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
