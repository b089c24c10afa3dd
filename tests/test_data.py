import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from dmae.data import (
    DataError,
    FashionMNIST,
    SeededDataset,
    ShardedEpochSampler,
    build_dataset,
    build_transform,
    dataset_info,
    find_fashion_mnist,
    read_idx,
)


def test_fashion_mnist_is_found_and_in_unit_range():
    # CI installs the Debian package dataset-fashion-mnist; this test fails (does not skip) without it
    train = build_dataset("fashion-mnist", "train")
    test = build_dataset("fashion-mnist", "test")
    assert len(train) == 60_000
    assert len(test) == 10_000
    x, y = train[0]
    assert x.shape == (1, 28, 28)
    assert x.dtype == torch.float32
    assert x.min() >= 0.0
    assert x.max() <= 1.0
    assert x.max() > 0.5
    assert isinstance(y, int)
    assert 0 <= y < 10
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
    assert len(ds) == 4
    assert ds[0][0].max() == 1.0
    assert ds[3][1] == 3


def test_missing_and_malformed_data_say_where(tmp_path):
    with pytest.raises(DataError, match=f"(?s)looked in:.*{tmp_path}.*apt-get install dataset-fashion-mnist"):
        find_fashion_mnist(tmp_path)
    bad = tmp_path / "x-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x09\x03garbage")
    with pytest.raises(DataError, match="not an unsigned-byte idx file"):
        read_idx(bad)
    short = tmp_path / "y.gz"
    _write_idx(short, np.zeros((3, 2, 2)))
    with gzip.open(short) as f:
        content = f.read()
    with gzip.open(short, "wb") as f:
        f.write(content[:-2])
    with pytest.raises(DataError, match=r"header says \[3, 2, 2\]"):
        read_idx(short)
    with pytest.raises(DataError, match=r"cifar10: no .*cifar-10-batches-py"):
        build_dataset("cifar10", "train", root=tmp_path)
    with pytest.raises(DataError, match=r"folder: no directory .*train"):
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
    assert x.shape == (3, 32, 32)
    assert x.min() >= 0
    assert x.max() <= 1
    assert y == 1
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
    assert list(s) == full[3 * b :]
    assert len(s) == len(full) - 3 * b
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


# ----------------------------------------------------------------------------- grey and small ImageFolders
def _folder(root, mode="L", side=28, per_class=3, classes=("a", "b"), splits=("train", "val")):
    rng = np.random.RandomState(0)
    shape = (side, side) if mode == "L" else (side, side, 3)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.randint(0, 256, shape, dtype=np.uint8), mode=mode).save(d / f"{i}.png")
    return root


def test_a_grey_folder_loads_as_one_channel_in_every_split(tmp_path):
    # issue 19: a grey ImageFolder came out as 3 channels, so a 1-channel model refused it ("model takes 1-channel
    # images, got 3 channels") in fine-tuning and certification alike
    from dmae.data import GREY_MEAN, folder_channels

    root = _folder(tmp_path)
    assert folder_channels(root) == 1
    info = dataset_info("folder", root)
    assert (info.channels, info.mean, info.std) == (1, GREY_MEAN, (0.226,))
    assert dataset_info("folder").channels == 3  # without a root the declaration stands
    for split in ("train", "val"):
        x, _ = build_dataset("folder", split, root, build_transform(info, False, 28))[0]
        assert x.shape == (1, 28, 28)
    # a 3-channel model still gets the grey images (its input layer repeats the channel after the noise)
    assert build_dataset("folder", "val", root, build_transform(info, False, 28), channels=3)[0][0].shape == (1, 28, 28)


def test_a_colour_folder_loads_as_the_model_takes_it(tmp_path):
    root = _folder(tmp_path, mode="RGB")
    info = dataset_info("folder", root)
    assert info.channels == 3
    tf = build_transform(info, False, 28)
    assert build_dataset("folder", "val", root, tf)[0][0].shape == (3, 28, 28)
    grey = build_dataset("folder", "val", root, tf, channels=1)[0][0]  # a 1-channel model: luminance
    assert grey.shape == (1, 28, 28)
    with pytest.raises(ValueError, match=r"channels must be 1 or 3 .* got 2"):
        build_dataset("folder", "val", root, tf, channels=2)


def test_a_colour_image_the_probe_missed_is_refused_not_made_grey(tmp_path):
    from dmae.data import DataError

    root = _folder(tmp_path, per_class=70, classes=("a",), splits=("train",))  # more files than the probe reads
    Image.fromarray(np.zeros((28, 28, 3), dtype=np.uint8)).save(root / "train" / "a" / "z.png")  # sorted last
    ds = build_dataset("folder", "train", root, None)
    assert ds[0][0].mode == "L"
    assert ds.samples[-1][0].endswith("z.png")
    with pytest.raises(DataError, match=r"z\.png is a RGB image, but its folder was read as grey"):
        ds[len(ds) - 1]


def test_small_folder_images_are_not_cropped(tmp_path):
    # ImageNet's recipe (Resize 256/224 + CenterCrop, RandomResizedCrop down to 8%) zoomed and cropped 28-px images
    root = _folder(tmp_path)
    info = dataset_info("folder", root)
    x, _ = build_dataset("folder", "val", root, build_transform(info, False, 28))[0]
    png = np.asarray(Image.open(sorted((root / "val" / "a").iterdir())[0]), dtype=np.float32) / 255
    assert torch.equal(x[0], torch.from_numpy(png))
    tr = build_dataset("folder", "train", root, build_transform(info, True, 28, recipe="finetune"))[0][0]
    png = torch.from_numpy(np.asarray(Image.open(sorted((root / "train" / "a").iterdir())[0]), dtype=np.float32) / 255)
    assert torch.equal(tr[0], png) or torch.equal(tr[0], png.flip(-1))  # flipped or not, never cropped
    # photos (larger than SMALL_IMAGE_SIDE) still get the crop recipe
    big = _folder(tmp_path / "big", mode="RGB", side=80)
    assert build_dataset("folder", "val", big, build_transform(dataset_info("folder", big), False, 32))[0][0].shape == (
        3,
        32,
        32,
    )


def test_certify_prepare_line_with_a_grey_model(tmp_path):
    """What `dmae certify`'s prepare() builds (build_dataset(..., build_transform(info, False, img_size))) feeds a
    1-channel classifier, with or without the model's channel count passed."""
    from dmae.checkpoint import load_classifier

    root = _folder(tmp_path)
    model, _ = load_classifier(None, 2, model="dmae_vit_pico_patch4_dec32d1b")
    assert model.preprocess.in_chans == 1
    info = dataset_info("folder")  # prepare() reads the declaration, without the root
    for chans in (None, model.preprocess.in_chans):
        ds = build_dataset("folder", "val", root, build_transform(info, False, 28), channels=chans)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        assert model.eval()(x).shape == (len(ds), 2)
    rgb = _folder(tmp_path / "rgb", mode="RGB")
    x = build_dataset("folder", "val", rgb, build_transform(info, False, 28), channels=model.preprocess.in_chans)[0][0]
    assert model(x[None]).shape == (1, 2)
