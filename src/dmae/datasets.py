"""Data sets for the Python API: the built-in ones as ready-to-use ``(image, label)`` sets, and your own described.

Every image an API call takes is a float tensor ``[C, H, W]`` with pixels in [0, 1] (no normalization: each
model's first layer normalizes), because sigma and every certified radius are measured in those units. The
loaders below give the evaluation transform of ``dmae certify`` (images as they are for Fashion-MNIST and
CIFAR-10; Resize + CenterCrop for ImageFolders of photos), so ``dmae.certify(model, dmae.datasets.cifar10())``
certifies the images the CLI would. :func:`describe` tells the training calls what they need to know of a data set
of your own (channels, size, per-channel statistics, classes).

Data sets: Fashion-MNIST (Xiao et al., 2017), CIFAR-10 (Krizhevsky, 2009), ImageNet ILSVRC-2012 (Russakovsky
et al., 2015).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from dmae.data import (
    DataError,
    DatasetInfo,
    build_dataset,
    build_transform,
    dataset_info,
    num_classes_of,
)

STATS_IMAGES = 1024  # images (spread over the set) whose pixels give a custom set's mean and std


def fashion_mnist(split: str = "test", root: str | os.PathLike | None = None, download: bool = False) -> Dataset:
    """Fashion-MNIST: 60,000 training / 10,000 test images, items ``([1, 28, 28] float in [0, 1], label)``.

    Found under ``root``, torchvision's default data folder, or Debian's ``dataset-fashion-mnist`` package
    (``/usr/share/datasets/fashion-mnist``); ``download`` lets torchvision fetch it when missing.

    Raises:
        ValueError: ``split`` other than ``'train'`` / ``'test'``.  DataError: no copy found, or unreadable.
    """
    info = dataset_info("fashion-mnist")
    return build_dataset("fashion-mnist", split, root, build_transform(info, False, 28), download)


def cifar10(split: str = "test", root: str | os.PathLike | None = None, download: bool = False) -> Dataset:
    """CIFAR-10 in torchvision's layout (``root/cifar-10-batches-py``): items ``([3, 32, 32] in [0, 1], label)``.

    Raises:
        ValueError: ``split`` other than ``'train'`` / ``'test'``.  DataError: not found (and ``download`` off).
    """
    info = dataset_info("cifar10")
    return build_dataset("cifar10", split, root, build_transform(info, False, 32), download)


def image_folder(root: str | os.PathLike, split: str = "val", size: int = 224, channels: int | None = None) -> Dataset:
    """The ImageFolder ``root/split/<class>/<image>`` as ``([C, size, size] in [0, 1], label)`` items.

    Photos are Resized (256/224 * ``size``, bicubic) and center-cropped to ``size``, as ``dmae certify``
    evaluates; small square images (at most 64 pixels a side, MNIST- or CIFAR-sized) are kept at their own size.
    A folder of grey images, or ``channels=1``, gives one channel; else RGB. ``classes`` lists the class folders.

    Raises:
        DataError: no ``root/split`` folder, or not an ImageFolder.  ValueError: ``channels`` other than None, 1, 3.
    """
    return build_dataset("folder", split, root, build_transform(dataset_info("folder"), False, size), False, channels)


@dataclass(frozen=True)
class UserData:
    """A data set of the caller's own for training (:func:`dmae.pretrain`, :func:`dmae.finetune`): the training
    set, an optional evaluation (test) set, and what :func:`describe` found out about them."""

    train: Dataset
    test: Dataset | None
    info: DatasetInfo


def describe(
    dataset: Dataset, *, num_classes: int | None = None, name: str = "custom", images: int = STATS_IMAGES
) -> DatasetInfo:
    """What a model needs to know about a map-style data set of ``(image [C, H, W] float in [0, 1], label)``
    items: its channels (1 or 3), its side (square images; else None and the model's own size), its per-channel
    mean and std (over the pixels of ``images`` items spread evenly over the set; the model's first layer
    normalizes with them) and its class count (``num_classes``, else the set's ``classes`` attribute).

    Raises:
        DataError: an empty set, an item that is not an ``(image, label)`` pair, an image that is not a float
            ``[C, H, W]`` tensor with C in {1, 3}, pixels outside [0, 1] (the values named), images of
            different shapes.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError(f"{name}: the data set is empty")
    picked = sorted({round(i * (n - 1) / max(1, min(n, images) - 1)) for i in range(min(n, images))})
    first = _image(dataset, picked[0], name)
    xs = [first] + [_image(dataset, i, name) for i in picked[1:]]
    if odd := [i for i, x in zip(picked, xs, strict=True) if x.shape != first.shape]:
        raise DataError(
            f"{name}: item {odd[0]}'s image is {list(xs[picked.index(odd[0])].shape)}, item {picked[0]}'s "
            f"{list(first.shape)}: a batch needs images of one shape (resize them in the data set's transform)"
        )
    stacked = torch.stack(xs)
    c, h, w = stacked.shape[1:]
    flat = stacked.transpose(0, 1).reshape(c, -1).double()
    if num_classes is None:
        try:
            num_classes = num_classes_of(dataset)
        except ValueError:
            num_classes = None
    return DatasetInfo(
        name,
        num_classes,
        int(c),
        int(h) if h == w else None,
        tuple(float(m) for m in flat.mean(dim=1)),
        tuple(max(float(s), 1e-3) for s in flat.std(dim=1)),  # a constant channel must not divide by zero
        ("train", "test"),
    )


def _image(dataset: Dataset, i: int, name: str) -> torch.Tensor:
    """Item ``i``'s image, checked to be a float ``[C, H, W]`` tensor in [0, 1] with C in {1, 3}.

    Raises:
        DataError: naming the item and what is wrong with it.
    """
    item = dataset[i]
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise DataError(f"{name}: item {i} is a {type(item).__name__}, expected an (image, label) pair")
    x = item[0]
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x) or x.dim() != 3 or x.shape[0] not in (1, 3):
        what = f"{x.dtype} tensor of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(
            f"{name}: item {i}'s image is a {what}; expected a float [C, H, W] tensor with C = 1 or 3 and pixels "
            "in [0, 1] (torchvision's ToTensor, no Normalize: the model's first layer normalizes)"
        )
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= 0.0 and hi <= 1.0):
        raise DataError(
            f"{name}: item {i}'s pixels span [{lo:.4g}, {hi:.4g}], outside [0, 1]: sigma and radii are in [0, 1] "
            "pixel units (use ToTensor without Normalize; the model's first layer normalizes)"
        )
    return x


def user_data(
    train: Dataset, test: Dataset | None = None, *, num_classes: int | None = None, need_classes: bool = True
) -> UserData:
    """Check and describe a training set of the caller's own (and its test set, whose images must have the same
    shape) for a training job.

    Raises:
        DataError: as :func:`describe`; test images of another shape; with ``need_classes``, no class count
            (no ``num_classes`` and no ``classes`` attribute).
    """
    info = describe(train, num_classes=num_classes)
    if test is not None:
        shape, test_shape = tuple(_image(train, 0, "custom").shape), tuple(_image(test, 0, "custom test").shape)
        if shape != test_shape:
            raise DataError(f"custom: training images are {list(shape)}, test images {list(test_shape)}")
    if need_classes and info.num_classes is None:
        raise DataError(
            f"cannot tell the class count of {type(train).__name__}: pass num_classes=K (or give the data set a "
            "`classes` list)"
        )
    return UserData(train, test, info)


__all__ = ["UserData", "cifar10", "describe", "fashion_mnist", "image_folder", "user_data"]
