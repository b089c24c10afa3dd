import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from dmae.data import (DataError, FashionMNIST, SeededDataset, ShardedEpochSampler, build_dataset, build_transform,
                       dataset_info, find_fashion_mnist, read_idx)


def test_fashion_mnist_is_found_and_in_unit_range():
    # CI installs the Debian package dataset-fashion-mnist; this test fails (does not skip) without it
    train = build_dataset("fashion-mnist", "train")
    test = build_dataset("fashion-mnist", "test")
    assert len(train) == 60_000 and len(test) == 10_000
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    assert isinstance(y, int) and 0 <= y < 10
    assert sorted(torch.unique(test.targets).tolist()) == list(range(10))


def _write_idx(path, arr, magic_type=0x08, gz=True):
    header = bytes([0, 0, magic_type, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_fashion_mnist_from_a_given_root_in_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 6), ("t10k", 4)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", np.full((n, 28, 28), 255), gz=False)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, gz=False)
    ds = FashionMNIST(tmp_path, "test")
    assert len(ds) == 4 and ds[0][0].max() == 1.0 and ds[3][1] == 3


def test_missing_and_malformed_data_say_where(tmp_path):
    with pytest.raises(DataError, match=f"(?s)looked in:.*{tmp_path}.*apt-get install dataset-fashion-mnist"):
        find_fashion_mnist(tmp_path)
    bad = tmp_path / "x-images-idx3-ubyte.gz"
    gzip.open(bad, "wb").write(b"\x00\x00\x09\x03garbage")
    with pytest.raises(DataError, match="not an unsigned-byte idx file"):
        read_idx(bad)
    short = tmp_path / "y.gz"
    _write_idx(short, np.zeros((3, 2, 2)))
    content = gzip.open(short).read()
    gzip.open(short, "wb").write(content[:-2])
    with pytest.raises(DataError, match=r"header says \[3, 2, 2\]"):
        read_idx(short)
    with pytest.raises(DataError, match="cifar10: no .*cifar-10-batches-py"):
        build_dataset("cifar10", "train", root=tmp_path)
    with pytest.raises(DataError, match="folder: no directory .*train"):
        build_dataset("folder", "train", root=tmp_path)
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        dataset_info("mnist")
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("fashion-mnist", "val")


def test_image_folder_crops_to_unit_range_tensors(tmp_path):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 50, 3), dtype=np.uint8)).save(d / "0.png")
    info = dataset_info("folder")
    ds = build_dataset("folder", "val", tmp_path, build_transform(info, False, 32))
    x, y = ds[1]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1 and y == 1
    tr = build_dataset("folder", "train", tmp_path, build_transform(info, True, 32))
    assert tr[0][0].shape == (3, 32, 32)


def test_sampler_shards_are_disjoint_and_resume_skips_exactly():
    n, b = 103, 5
    shards = [list(ShardedEpochSampler(n, b, rank=r, world_size=2, seed=1)) for r in range(2)]
    idx = [set(i for _, i in s) for s in shards]
    assert not (idx[0] & idx[1])
    assert len(shards[0]) == len(shards[1]) == (n // (b * 2)) * b
    s = ShardedEpochSampler(n, b, seed=1)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_batch=3)
    assert list(s) == full[3 * b:] and len(s) == len(full) - 3 * b
    s.set_epoch(3)
    assert list(s) != full  # a new order every epoch
    with pytest.raises(ValueError, match="too few"):
        ShardedEpochSampler(8, 5, world_size=2)


def test_seeded_dataset_makes_augmentation_reproducible():
    info = dataset_info("fashion-mnist")
    base = build_dataset("fashion-mnist", "test", transform=build_transform(info, True, 28))
    ds = SeededDataset(base, seed=0)
    flips = {tuple(ds[(e, 0)][0].flatten().tolist()) for e in range(12)}
    assert len(flips) == 2  # flipped in some epochs, not in others
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = ds[(5, 0)][0]
    after = torch.rand(1)
    assert torch.equal(a, ds[(5, 0)][0])
    assert torch.equal(before, after)  # the global RNG is untouched
