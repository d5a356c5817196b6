"""Datasets: file discovery, verification, decoding, generators and batched transforms."""
import gzip
import os
import pathlib
import shutil
import urllib.error

import numpy as np
import pytest
import torch

from capsnet_ext.data import (DATA_ENV, CorruptDataError, DataNotFoundError, DatasetBundle,
                              build_datasets, center_crop, data_roots, md5sum, random_crop,
                              random_shift, shift_images)
from capsnet_ext.data import files as data_files
from capsnet_ext.data import mnist as mnist_module
from capsnet_ext.data.idx import read_idx

SHARED = os.environ.get(DATA_ENV)
needs_mnist = pytest.mark.skipif(
    not SHARED or not (pathlib.Path(SHARED) / "mnist" / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"real MNIST files not found: set ${DATA_ENV} to a folder holding mnist/")

MNIST_COUNTS = {"train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
                "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]}


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A private user cache and no $CAPSNET_DATA, so nothing outside tmp_path is found or written."""
    cache = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv(DATA_ENV, raising=False)
    mnist_module.clear_cache()
    yield cache / "capsnet_ext" / "data"
    mnist_module.clear_cache()


def _offline(monkeypatch):
    def refuse(url, timeout=None):
        raise urllib.error.URLError("network disabled in this test")
    monkeypatch.setattr(data_files, "_urlopen", refuse)


# --------------------------------------------------------------------------------------------
# search order and real files

def test_data_roots_order(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    roots = data_roots(tmp_path / "arg")
    assert roots == [tmp_path / "arg", tmp_path / "env", tmp_path / "xdg" / "capsnet_ext" / "data"]
    monkeypatch.delenv(DATA_ENV)
    assert data_roots() == [tmp_path / "xdg" / "capsnet_ext" / "data"]


@needs_mnist
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_datasets_decode_with_published_counts(name):
    bundle = build_datasets(name, download=False)
    assert isinstance(bundle, DatasetBundle)
    assert (bundle.in_channels, bundle.input_size, bundle.num_classes, bundle.multi_label) == (1, 28, 10, False)
    assert len(bundle.train) == 60000 and len(bundle.test) == 10000
    for split, dataset in (("train", bundle.train), ("test", bundle.test)):
        assert dataset.images.shape == (len(dataset), 1, 28, 28) and dataset.images.dtype == torch.uint8
        counts = torch.bincount(dataset.labels, minlength=10).tolist()
        expected = MNIST_COUNTS[split] if name == "mnist" else [len(dataset) // 10] * 10
        assert counts == expected
    item = bundle.train[0]
    assert item["image"].shape == (1, 28, 28) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].dim() == 0
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0 and item["image"].max() > 0.5
    if name == "mnist":
        assert int(bundle.train[0]["label"]) == 5 and int(bundle.test[0]["label"]) == 7
    batch = bundle.test.batch([3, 1, 2])
    assert batch["image"].shape == (3, 1, 28, 28)
    assert torch.equal(batch["image"][1], bundle.test[1]["image"])
    limited = build_datasets(name, download=False, train_limit=100, test_limit=7)
    assert len(limited.train) == 100 and len(limited.test) == 7
    assert torch.equal(limited.train[99]["image"], bundle.train[99]["image"])


@needs_mnist
def test_decoded_arrays_are_cached_per_process():
    first = mnist_module.load_idx_dataset("mnist", "test", download=False)
    second = mnist_module.load_idx_dataset("mnist", "test", download=False)
    assert first[0] is second[0]


@needs_mnist
def test_md5_matches_published_checksums():
    path = pathlib.Path(SHARED) / "mnist" / "t10k-labels-idx1-ubyte.gz"
    assert md5sum(path) == mnist_module.MNIST.md5[path.name]


# --------------------------------------------------------------------------------------------
# corrupt, truncated, missing, downloaded

def _copy_mnist(dest_root: pathlib.Path) -> pathlib.Path:
    folder = dest_root / "mnist"
    folder.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(pathlib.Path(SHARED) / "mnist" / name, folder / name)
    return folder


@needs_mnist
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_file_gives_clear_error_and_is_not_overwritten(tmp_path, isolated_cache, monkeypatch, damage):
    _offline(monkeypatch)
    folder = _copy_mnist(tmp_path / "data")
    target = folder / "t10k-images-idx3-ubyte.gz"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF
    target.write_bytes(bytes(data))
    before = (target.read_bytes(), target.stat().st_mtime_ns)
    with pytest.raises(CorruptDataError, match="t10k-images-idx3-ubyte.gz.*MD5"):
        mnist_module.load_idx_dataset("mnist", "test", data_dir=tmp_path / "data", download=True)
    assert (target.read_bytes(), target.stat().st_mtime_ns) == before
    assert sorted(p.name for p in folder.iterdir()) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    # Without the checksum, the decoder itself still refuses the damaged file by name.
    with pytest.raises(CorruptDataError, match="t10k-images-idx3-ubyte.gz"):
        mnist_module.load_idx_dataset("mnist", "test", data_dir=tmp_path / "data", verify=False)


def test_truncated_raw_idx_is_rejected(tmp_path):
    header = bytes([0, 0, 8, 3]) + np.array([5, 28, 28], dtype=">u4").tobytes()
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(header + bytes(5 * 28 * 28 - 1))
    with pytest.raises(CorruptDataError, match="images-idx3-ubyte.*truncated"):
        read_idx(path)
    path.write_bytes(header + bytes(5 * 28 * 28))
    assert read_idx(path).shape == (5, 28, 28)


def test_offline_and_missing_lists_every_folder(tmp_path, isolated_cache, monkeypatch):
    _offline(monkeypatch)
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    with pytest.raises(DataNotFoundError) as info:
        build_datasets("mnist", data_dir=tmp_path / "arg")
    message = str(info.value)
    for folder in (tmp_path / "arg" / "mnist", tmp_path / "env" / "mnist", isolated_cache / "mnist"):
        assert str(folder) in message
    assert "train-images-idx3-ubyte.gz" in message and DATA_ENV in message
    assert "ossci-datasets.s3.amazonaws.com" in message  # the mirrors it tried
    assert not any(isolated_cache.rglob("*.gz")) and not any(isolated_cache.rglob("*.part"))
    with pytest.raises(DataNotFoundError, match="download=False"):
        build_datasets("mnist", data_dir=tmp_path / "arg", download=False)


@needs_mnist
def test_download_verifies_md5_and_writes_into_user_cache(tmp_path, isolated_cache):
    mirror = pathlib.Path(SHARED) / "mnist"
    bad_mirror = tmp_path / "bad"
    bad_mirror.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (bad_mirror / name).write_bytes(b"not the file")
    mirrors = [bad_mirror.as_uri(), (tmp_path / "missing").as_uri(), mirror.as_uri()]
    images, labels = mnist_module.load_idx_dataset("mnist", "test", mirrors=mirrors)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    cached = isolated_cache / "mnist"
    assert sorted(p.name for p in cached.iterdir()) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert md5sum(cached / "t10k-labels-idx1-ubyte.gz") == mnist_module.MNIST.md5["t10k-labels-idx1-ubyte.gz"]
    # Only corrupt mirrors: the error names the checksum failure and nothing is left behind.
    shutil.rmtree(cached)
    with pytest.raises(DataNotFoundError, match="MD5"):
        mnist_module.load_idx_dataset("mnist", "test", mirrors=[bad_mirror.as_uri()])
    assert not cached.exists() or not any(cached.iterdir())


# --------------------------------------------------------------------------------------------
# random_shift and crops

def _reference_shift(image, dx, dy):
    out = torch.zeros_like(image)
    _, height, width = image.shape
    for y in range(height):
        for x in range(width):
            if 0 <= y - dy < height and 0 <= x - dx < width:
                out[:, y, x] = image[:, y - dy, x - dx]
    return out


def test_shift_images_matches_a_pixel_loop():
    torch.manual_seed(0)
    images = torch.rand(6, 2, 7, 9) + 0.1
    dx = torch.tensor([0, 1, -2, 3, -9, 4])
    dy = torch.tensor([0, -1, 2, 3, 1, -7])
    out = shift_images(images, dx, dy)
    for b in range(6):
        assert torch.equal(out[b], _reference_shift(images[b], int(dx[b]), int(dy[b])))
    assert shift_images(images.to(torch.uint8), dx, dy).dtype == torch.uint8


def test_random_shift_properties():
    torch.manual_seed(1)
    images = torch.rand(64, 1, 11, 13) + 0.1   # no zeros inside, so the zero border is visible
    out = random_shift(images, 2, torch.Generator().manual_seed(5))
    assert out.shape == images.shape and out.dtype == images.dtype
    again = random_shift(images, 2, torch.Generator().manual_seed(5))
    assert torch.equal(out, again)
    assert not torch.equal(out, random_shift(images, 2, torch.Generator().manual_seed(6)))
    seen = set()
    for b in range(images.shape[0]):
        matches = [(dx, dy) for dx in range(-2, 3) for dy in range(-2, 3)
                   if torch.equal(out[b], _reference_shift(images[b], dx, dy))]
        assert len(matches) == 1, f"image {b} is not an exact shift within +-2"
        seen.add(matches[0])
    assert len(seen) > 15  # many of the 25 shifts occur in 64 draws
    assert torch.equal(random_shift(images, 0), images)
    with pytest.raises(ValueError, match="max_shift"):
        random_shift(images, -1)
    with pytest.raises(ValueError, match="images"):
        random_shift(images[0], 2)


def test_crops():
    images = torch.rand(8, 3, 32, 32)
    crops = random_crop(images, 24, torch.Generator().manual_seed(0))
    assert crops.shape == (8, 3, 24, 24)
    for b in range(8):
        found = [(t, l) for t in range(9) for l in range(9)
                 if torch.equal(crops[b], images[b, :, t:t + 24, l:l + 24])]
        assert found
    assert torch.equal(center_crop(images, 24), images[:, :, 4:28, 4:28])
    with pytest.raises(ValueError, match="size"):
        random_crop(images, 33)
