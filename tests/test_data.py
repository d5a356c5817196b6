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
    assert len(bundle.classes) == 10 and bundle.classes[9] == ("9" if name == "mnist" else "Ankle boot")
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
    with pytest.raises(DataNotFoundError, match="Downloading was switched off.*--no-download"):
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


def test_random_shift_on_every_device(device):
    images = torch.rand(16, 3, 9, 9, device=device) + 0.1
    generator = torch.Generator(device="cpu").manual_seed(0)   # a CPU generator drives any device
    out = random_shift(images, 1, generator)
    assert out.device == images.device and out.shape == images.shape
    again = random_shift(images.cpu(), 1, torch.Generator().manual_seed(0))
    assert torch.equal(out.cpu(), again)
    # Every image lost exactly the rows/columns its shift moved out: zero borders only.
    zero_rows = (out == 0).all(dim=(1, 3)).sum(1)
    zero_cols = (out == 0).all(dim=(1, 2)).sum(1)
    assert (zero_rows <= 1).all() and (zero_cols <= 1).all()
    assert (out.sum((1, 2, 3)) <= images.sum((1, 2, 3)) + 1e-4).all()


def test_image_dataset_validation():
    from capsnet_ext.data import ImageDataset
    with pytest.raises(ValueError, match="images must be"):
        ImageDataset(torch.zeros(4, 28, 28), torch.zeros(4))
    with pytest.raises(ValueError, match="labels must be"):
        ImageDataset(torch.zeros(4, 1, 28, 28), torch.zeros(3))
    with pytest.raises(ValueError, match="limit"):
        ImageDataset(torch.zeros(4, 1, 2, 2), torch.zeros(4), limit=0)
    dataset = ImageDataset(np.full((4, 1, 2, 2), 255, dtype=np.uint8), np.arange(4), limit=3)
    assert len(dataset) == 3 and torch.equal(dataset[2]["image"], torch.ones(1, 2, 2))
    assert dataset[2]["label"].dtype == torch.int64


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


# --------------------------------------------------------------------------------------------
# MultiMNIST

def _bounding_boxes(masks):
    """(top, bottom, left, right) of each mask [B, H, W] (inclusive)."""
    rows, cols = masks.any(2), masks.any(1)
    ar = torch.arange(masks.shape[-1])
    return (torch.where(rows, ar, 10**6).amin(1), torch.where(rows, ar, -1).amax(1),
            torch.where(cols, ar, 10**6).amin(1), torch.where(cols, ar, -1).amax(1))


@needs_mnist
def test_multimnist_properties_and_determinism(tmp_path, isolated_cache, monkeypatch):
    monkeypatch.setenv(DATA_ENV, SHARED)
    bundle = build_datasets("multimnist", pairs_per_digit=2, test_pairs_per_digit=3,
                            cache_dir=tmp_path / "mm", seed=3)
    assert (bundle.in_channels, bundle.input_size, bundle.num_classes, bundle.multi_label) == (1, 36, 10, True)
    assert len(bundle.train) == 2 * 60000 and len(bundle.test) == 3 * 10000
    test = bundle.test
    # Different classes and bounded shifts for every pair of the recipe, not only a sample.
    base_labels = test.digit_labels[None, :].expand(3, -1)
    assert (test.digit_labels[test.partners.long()] != base_labels).all()
    assert test.shifts.abs().max() <= 4 and test.shifts.min() == -4 and test.shifts.max() == 4
    # The partner classes cover all nine other classes for every base class.
    pairs = set(zip(base_labels.flatten().tolist(), test.digit_labels[test.partners.long()].flatten().tolist()))
    assert len(pairs) == 90

    indices = torch.arange(0, 30000, 15)
    batch = test.batch(indices)
    images, components, labels = batch["image"], batch["components"], batch["labels"]
    assert images.shape == (2000, 1, 36, 36) and components.shape == (2000, 2, 1, 36, 36)
    assert labels.dtype == torch.int64 and (labels[:, 0] != labels[:, 1]).all()
    assert torch.equal(batch["label"].sum(1), torch.full((2000,), 2.0))
    assert torch.equal(batch["label"].gather(1, labels), torch.ones(2000, 2))
    assert torch.equal(images, components.sum(1).clamp(max=1.0))
    assert (images >= 0).all() and (images <= 1).all() and (components.sum(1) > 1).any()
    # Each component is its digit placed at (4 + dy, 4 + dx) on an empty canvas.
    base, partner, shifts = test.pair_indices(indices)
    for row in (0, 7, 1999):
        for slot, digit in ((0, base[row]), (1, partner[row])):
            dx, dy = int(shifts[row, 2 * slot]), int(shifts[row, 2 * slot + 1])
            expected = torch.zeros(36, 36)
            expected[4 + dy:32 + dy, 4 + dx:32 + dx] = test.digits[digit].float() / 255
            assert torch.equal(components[row, slot, 0], expected)
        assert torch.equal(labels[row], torch.stack([test.digit_labels[base[row]], test.digit_labels[partner[row]]]))
    # The digits overlap heavily (the paper reports 80% bounding-box overlap on average).
    top0, bottom0, left0, right0 = _bounding_boxes(components[:, 0, 0] > 0)
    top1, bottom1, left1, right1 = _bounding_boxes(components[:, 1, 0] > 0)
    inter = ((torch.minimum(bottom0, bottom1) - torch.maximum(top0, top1) + 1).clamp(min=0)
             * (torch.minimum(right0, right1) - torch.maximum(left0, left1) + 1).clamp(min=0))
    smaller = torch.minimum((bottom0 - top0 + 1) * (right0 - left0 + 1), (bottom1 - top1 + 1) * (right1 - left1 + 1))
    assert (inter > 0).float().mean() > 0.99
    assert (inter / smaller).mean() > 0.6
    item = test[15]
    assert set(item) == {"image", "label", "labels", "components"}
    assert torch.equal(item["components"], components[1]) and item["label"].dtype == torch.float32

    # Deterministic by seed, cached on disk, and a different seed gives different pairs.
    cached = sorted(p.name for p in (tmp_path / "mm").iterdir())
    assert len(cached) == 2 and all(name.endswith(".npz") and "seed3" in name for name in cached)
    again = build_datasets("multimnist", pairs_per_digit=2, test_pairs_per_digit=3,
                           cache_dir=tmp_path / "other", seed=3)
    assert torch.equal(again.test.partners, test.partners) and torch.equal(again.test.shifts, test.shifts)
    assert torch.equal(again.train.partners, bundle.train.partners)
    assert torch.equal(again.test.batch(indices)["image"], images)
    other = build_datasets("multimnist", pairs_per_digit=2, test_pairs_per_digit=3,
                           cache_dir=tmp_path / "mm", seed=4, test_limit=100)
    assert not torch.equal(other.test.partners, test.partners) and len(other.test) == 100
    assert not torch.equal(other.train.partners, bundle.train.partners)
    assert not torch.equal(bundle.train.partners[:, :10000], test.partners[:2])  # streams differ per split
    assert len(list((tmp_path / "mm").iterdir())) == 4
    # A limited set is a prefix of the full one and generates only the pairings it reaches.
    prefix = build_datasets("multimnist", pairs_per_digit=2, test_pairs_per_digit=3,
                            cache_dir=tmp_path / "mm", seed=3, train_limit=10, test_limit=10005)
    assert prefix.test.partners.shape == (2, 10000) and len(prefix.test) == 10005
    assert torch.equal(prefix.test.partners, test.partners[:2]) and torch.equal(prefix.test.shifts, test.shifts[:2])
    assert torch.equal(prefix.test.batch([10004])["image"], test.batch([10004])["image"])
    assert prefix.train.partners.shape == (1, 60000)
    # Without cache_dir, recipes are written to the user cache, never into a data folder.
    build_datasets("multimnist", data_dir=SHARED, pairs_per_digit=5, test_pairs_per_digit=1,
                   train_limit=1)
    assert len(list((isolated_cache / "multimnist").glob("*.npz"))) == 2


# --------------------------------------------------------------------------------------------
# affine test set

@needs_mnist
def test_affine_test_set_within_affnist_ranges_and_inside_frame():
    from capsnet_ext.data.affnist import affine_matrices, make_affine_test_set
    digits, labels = mnist_module.load_idx_dataset("mnist", "test", download=False)
    dataset = make_affine_test_set(digits, labels, seed=11, limit=400)
    assert dataset.images.shape == (400, 1, 40, 40) and dataset.images.dtype == torch.uint8
    assert torch.equal(dataset.labels, torch.from_numpy(labels[:400].astype(np.int64)))
    params = dataset.params
    assert params["rotation"].abs().max() <= 20 and params["rotation"].abs().max() > 15
    assert params["shear"].abs().max() <= 0.2 and params["shear"].abs().max() > 0.15
    for key in ("scale_x", "scale_y"):
        assert 0.8 <= params[key].min() < 0.85 and 1.15 < params[key].max() <= 1.2
    assert params["translate_x"].abs().max() > 5 and params["translate_y"].abs().max() > 5
    images = dataset.images.float()
    # Nothing cut off: no ink on the frame's border, and the ink is the source's ink scaled by
    # the map's area change (bilinear resampling preserves it to a few percent).
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], -1)
    assert border.max() == 0
    det = torch.linalg.det(affine_matrices(params["rotation"], params["shear"], params["scale_x"], params["scale_y"]))
    source_mass = torch.from_numpy(digits[:400].astype(np.float64)).sum((1, 2))
    ratio = images.sum((1, 2, 3)).double() / (source_mass * det)
    assert ratio.min() > 0.9 and ratio.max() < 1.1
    # Deterministic by seed.
    assert torch.equal(make_affine_test_set(digits, labels, seed=11, limit=400).images, dataset.images)
    assert not torch.equal(make_affine_test_set(digits, labels, seed=12, limit=400).images, dataset.images)


def test_affine_warp_geometry():
    from capsnet_ext.data.affnist import warp
    image = torch.zeros(1, 1, 41, 41)
    image[0, 0, 20, 30] = 1.0   # 10 px right of the centre (20, 20)
    zero = torch.zeros(1, dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    def params(**kw):
        base = dict(rotation=zero, shear=zero, scale_x=one, scale_y=one, translate_x=zero, translate_y=zero)
        base.update({k: torch.tensor([float(v)], dtype=torch.float64) for k, v in kw.items()})
        return base
    def ink_at(out):
        flat = int(out.flatten().argmax())
        return divmod(flat, 41)
    assert torch.allclose(warp(image, params()), image, atol=1e-6)
    assert ink_at(warp(image, params(rotation=90))) == (10, 20)          # counter-clockwise: up
    assert ink_at(warp(image, params(scale_x=1.2))) == (20, 32)
    assert ink_at(warp(image, params(translate_x=-3, translate_y=4))) == (24, 27)


@needs_mnist
def test_affnist_bundle(tmp_path):
    bundle = build_datasets("affnist", download=False, train_limit=50, test_limit=30, seed=2)
    assert (bundle.in_channels, bundle.input_size, bundle.multi_label) == (1, 40, False)
    assert len(bundle.train) == 50 and len(bundle.test) == 30
    train_image = bundle.train[0]["image"]
    assert train_image.shape == (1, 40, 40)
    assert train_image[:, :6].max() == 0 and train_image[:, :, -6:].max() == 0   # centred, padded
    assert bundle.test[0]["image"].shape == (1, 40, 40)
    with pytest.raises(DataNotFoundError, match="affnist"):
        build_datasets("affnist", data_dir=tmp_path, download=False, test_source="real")


def test_real_affnist_mat_reader(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    from capsnet_ext.data.affnist import load_affnist_mat
    rng = np.random.default_rng(0)
    folder = tmp_path / "test_batches"
    folder.mkdir()
    expected_images, expected_labels = [], []
    for batch in (1, 2, 10):   # numeric, not lexicographic, order
        images = rng.integers(0, 256, size=(3, 40, 40), dtype=np.uint8)
        labels = rng.integers(0, 10, size=3)
        # affNIST stores one row-major image per column.
        scipy_io.savemat(folder / f"{batch}.mat", {"affNISTdata": {
            "image": images.reshape(3, 1600).T, "label_int": labels.astype(np.uint8)}})
        expected_images.append(images)
        expected_labels.append(labels)
    images, labels = load_affnist_mat(folder)
    assert np.array_equal(images, np.concatenate(expected_images))
    assert np.array_equal(labels, np.concatenate(expected_labels))
    images, labels = load_affnist_mat(folder, limit=4)
    assert images.shape == (4, 40, 40)
    (tmp_path / "bad.mat").write_bytes(b"garbage")
    with pytest.raises(CorruptDataError, match="bad.mat"):
        load_affnist_mat(tmp_path / "bad.mat")


# --------------------------------------------------------------------------------------------
# scikit-learn digits

def test_digits_fallback():
    pytest.importorskip("sklearn")
    bundle = build_datasets("digits", seed=1)
    assert (bundle.in_channels, bundle.input_size, bundle.num_classes) == (1, 28, 10)
    assert len(bundle.train) + len(bundle.test) == 1797 and len(bundle.test) == 359
    item = bundle.train[0]
    assert item["image"].shape == (1, 28, 28) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1 and item["image"].max() > 0.5
    assert set(torch.bincount(bundle.test.labels, minlength=10).tolist()) != {0}
    same = build_datasets("digits", seed=1)
    assert torch.equal(same.test.labels, bundle.test.labels)
    assert not torch.equal(build_datasets("digits", seed=2).test.labels, bundle.test.labels)


def test_unknown_dataset_name_and_option():
    with pytest.raises(ValueError, match="mnist.*fashion-mnist"):
        build_datasets("imagenet")
    with pytest.raises(TypeError, match="pairs_per_digit.*train_limit"):
        build_datasets("mnist", pairs_per_digit=3)


# --------------------------------------------------------------------------------------------
# CIFAR-10, SVHN, smallNORB: the real files are large and not in CI, so these tests write small
# files in the official formats and read them through the public entry point.

def _cifar_batch(count, seed):
    import pickle
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=count).tolist()
    return pickle.dumps({b"data": data, b"labels": labels, b"batch_label": b"x"}), data, labels


def test_cifar10_reader_from_archive_and_folder(tmp_path, isolated_cache, monkeypatch):
    import io
    import tarfile
    _offline(monkeypatch)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {name: _cifar_batch(4, seed) for seed, name in enumerate(names)}
    archive = tmp_path / "data" / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        for name, (raw, _, _) in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    # The published checksum protects the real archive: this one is refused by name...
    with pytest.raises(CorruptDataError, match="cifar-10-python.tar.gz.*MD5"):
        build_datasets("cifar10", data_dir=tmp_path / "data")
    # ...and read when verification is switched off.
    bundle = build_datasets("cifar10", data_dir=tmp_path / "data", verify=False)
    assert (bundle.in_channels, bundle.input_size, bundle.num_classes) == (3, 32, 10)
    assert len(bundle.train) == 20 and len(bundle.test) == 4
    _, data, labels = batches["data_batch_2"]
    item = bundle.train[5]   # second image of the second batch
    assert item["image"].shape == (3, 32, 32) and int(item["label"]) == labels[1]
    assert torch.equal((item["image"] * 255).round().to(torch.uint8).flatten(), torch.from_numpy(data[1]))
    # An extracted folder (torchvision layout, directly in the root) is read too.
    folder = tmp_path / "tv" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, (raw, _, _) in batches.items():
        (folder / name).write_bytes(raw)
    assert len(build_datasets("cifar10", data_dir=tmp_path / "tv", verify=False).test) == 4
    # A pickle that tries to import anything but numpy arrays is refused, naming the file.
    import pickle
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": pathlib.Path("x"), b"labels": []}))
    with pytest.raises(CorruptDataError, match="test_batch.*refusing"):
        build_datasets("cifar10", data_dir=tmp_path / "tv", verify=False)


def test_cifar10_missing_offline_lists_folders(tmp_path, isolated_cache, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(DataNotFoundError) as info:
        build_datasets("cifar10", data_dir=tmp_path)
    assert str(tmp_path / "cifar10") in str(info.value) and "www.cs.toronto.edu" in str(info.value)


def test_svhn_reader(tmp_path, isolated_cache, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")
    _offline(monkeypatch)
    folder = tmp_path / "svhn"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = {split: rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8) for split, n in (("train", 6), ("test", 3))}
    labels = {"train": np.array([[10], [1], [2], [3], [9], [10]], dtype=np.uint8), "test": np.array([[5], [10], [7]], dtype=np.uint8)}
    for split in ("train", "test"):
        scipy_io.savemat(folder / f"{split}_32x32.mat", {"X": images[split], "y": labels[split]})
    with pytest.raises(CorruptDataError, match="train_32x32.mat.*MD5"):
        build_datasets("svhn", data_dir=tmp_path)
    bundle = build_datasets("svhn", data_dir=tmp_path, verify=False)
    assert (bundle.in_channels, bundle.input_size) == (3, 32)
    assert bundle.train.labels.tolist() == [0, 1, 2, 3, 9, 0] and bundle.test.labels.tolist() == [5, 0, 7]
    item = bundle.test[1]
    expected = torch.from_numpy(images["test"][:, :, :, 1].transpose(2, 0, 1).copy())
    assert torch.equal((item["image"] * 255).round().to(torch.uint8), expected)


def _norb_bytes(array, magic):
    dims = list(array.shape) + [1] * max(0, 3 - array.ndim)
    header = np.array([magic, array.ndim] + dims, dtype="<i4").tobytes()
    return header + array.astype(array.dtype.newbyteorder("<")).tobytes()


def test_smallnorb_reader(tmp_path, isolated_cache, monkeypatch):
    from capsnet_ext.data.smallnorb import FILES
    _offline(monkeypatch)
    folder = tmp_path / "smallnorb"
    folder.mkdir()
    rng = np.random.default_rng(0)
    stored = {}
    for split, count in (("train", 5), ("test", 3)):
        dat = rng.integers(0, 256, size=(count, 2, 96, 96), dtype=np.uint8)
        cat = rng.integers(0, 5, size=count).astype(np.int32)
        dat_name, cat_name = FILES[split]
        with gzip.open(folder / dat_name, "wb") as handle:
            handle.write(_norb_bytes(dat, 0x1E3D4C55))
        (folder / cat_name[:-3]).write_bytes(_norb_bytes(cat, 0x1E3D4C54))   # uncompressed works too
        stored[split] = (dat, cat)
    bundle = build_datasets("smallnorb", data_dir=tmp_path)
    assert (bundle.in_channels, bundle.input_size, bundle.num_classes) == (2, 48, 5)
    assert len(bundle.train) == 5 and bundle.test.labels.tolist() == stored["test"][1].tolist()
    dat = stored["train"][0].astype(np.float64)
    expected = dat.reshape(5, 2, 48, 2, 48, 2).mean((3, 5))   # area downsampling by 2
    assert np.abs(bundle.train.images.numpy() - expected).max() <= 0.5 + 1e-9
    mono = build_datasets("smallnorb", data_dir=tmp_path, size=32, stereo=False)
    assert mono.in_channels == 1 and mono.train[0]["image"].shape == (1, 32, 32)
    # A truncated file is refused by name.
    (folder / FILES["test"][1][:-3]).write_bytes(_norb_bytes(stored["test"][1], 0x1E3D4C54)[:-2])
    with pytest.raises(CorruptDataError, match="testing-cat.mat.*truncated"):
        build_datasets("smallnorb", data_dir=tmp_path)
