"""dmae.datasets: the built-in sets as [0, 1] tensors, and a user's own set described and checked."""

import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from dmae import datasets
from dmae.data import DataError
from dmae.errors import DmaeError


@pytest.mark.slow
def test_the_built_in_loaders_give_unit_range_tensors(tmp_path):
    test = datasets.fashion_mnist()
    x, y = test[0]
    assert len(test) == 10_000
    assert x.shape == (1, 28, 28)
    assert x.dtype == torch.float32
    assert float(x.min()) >= 0
    assert float(x.max()) <= 1
    assert isinstance(y, int)
    assert len(datasets.fashion_mnist("train")) == 60_000
    for split, count in (("train", 2), ("val", 1)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (300, 200), (40 * i, 90, 200)).save(tmp_path / split / cls / f"{i}.png")
    folder = datasets.image_folder(tmp_path, "val", size=64)
    assert len(folder) == 2
    assert folder.classes == ["cat", "dog"]
    assert folder[0][0].shape == (3, 64, 64)
    with pytest.raises(DataError, match=r"cifar10: no .*cifar-10-batches-py"):
        datasets.cifar10(root=tmp_path)


def test_describe_measures_channels_size_statistics_and_classes():
    x = torch.zeros(10, 3, 6, 6)
    x[:, 1] = 0.5
    x[:, 2, :, :3] = 1.0  # half the pixels at 1: mean 0.5, sd over pixels ~0.5
    info = datasets.describe(TensorDataset(x, torch.arange(10)), num_classes=10)
    assert (info.channels, info.size, info.num_classes, info.name) == (3, 6, 10, "custom")
    assert info.mean == pytest.approx((0.0, 0.5, 0.5))
    assert info.std[2] == pytest.approx(0.5, abs=0.01)
    assert info.std[0] == info.std[1] == 1e-3  # constant channels never divide by zero
    assert datasets.describe(TensorDataset(torch.rand(4, 1, 5, 7), torch.zeros(4))).size is None  # not square
    assert datasets.describe(datasets.fashion_mnist(), images=8).num_classes == 10  # its `classes`


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([], "the data set is empty"),
        ([torch.rand(1, 4, 4)], r"item 0 is a Tensor, expected an \(image, label\) pair"),
        ([(torch.randint(0, 255, (1, 4, 4), dtype=torch.uint8), 0)], r"torch.uint8 tensor of shape \[1, 4, 4\]"),
        ([(torch.rand(4, 4), 0)], r"shape \[4, 4\]; expected a float \[C, H, W\]"),
        ([(torch.rand(2, 4, 4), 0)], r"shape \[2, 4, 4\]; expected a float \[C, H, W\] tensor with C = 1 or 3"),
        ([(torch.rand(1, 4, 4), 0), (torch.rand(1, 4, 4) * 2 - 1, 1)], r"item 1's pixels span \[-"),
        ([(torch.rand(1, 4, 4), 0), (torch.rand(1, 5, 5), 1)], r"item 1's image is \[1, 5, 5\], item 0's \[1, 4, 4\]"),
    ],
)
def test_describe_refuses_what_would_certify_the_wrong_units(items, message):
    with pytest.raises(DataError, match=message) as e:
        datasets.describe(items)
    assert isinstance(e.value, DmaeError)


def test_user_data_needs_a_class_count_and_one_shape():
    train = TensorDataset(torch.rand(6, 1, 4, 4), torch.zeros(6, dtype=torch.long))
    with pytest.raises(DataError, match="pass num_classes=K"):
        datasets.user_data(train)
    assert datasets.user_data(train, need_classes=False).info.num_classes is None
    with pytest.raises(DataError, match=r"training images are \[1, 4, 4\], test images \[1, 8, 8\]"):
        datasets.user_data(train, TensorDataset(torch.rand(2, 1, 8, 8), torch.zeros(2)), num_classes=2)
    assert datasets.user_data(train, num_classes=3).info.num_classes == 3
