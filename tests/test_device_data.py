"""Data held on the training device (``device_data``): the same batches, augmentation, trained
parameters and logged losses as the host path, bit for bit. On the CPU here the device copy
runs the device path's code (index_select, the uint8 table); the CUDA tests compare a GPU
against the CPU and skip without one."""
import csv

import pytest
import torch

from capsnet_ext.data import DatasetBundle, ImageDataset
from capsnet_ext.data.base import to_float_image, uint8_to_float
from capsnet_ext.nn import build_model
from capsnet_ext.training import TrainConfig, load_checkpoint, train
from capsnet_ext.training.augment import BatchAugmenter, affine_images, random_affine_matrices, step_generator
from capsnet_ext.training.distributed import DistInfo
from capsnet_ext.training.evaluation import evaluate
from capsnet_ext.training.logging_utils import Console
from capsnet_ext.training.trainer import _fill_model_config, _StepBatches, device_datasets
from test_usability import quadrants, tiny_cfg

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
AFFINE = dict(degrees=8.0, shear=15.0, scale=[0.9, 1.1])
AUGMENTATIONS = {"shifts": dict(max_shift=2), "affine": dict(random_affine=AFFINE),
                 "shifts+affine": dict(max_shift=2, random_affine=AFFINE), "crops": dict(crop_size=9)}
TIMING = ("images_per_sec", "elapsed_s")


def images_of(dtype, n=103, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    if dtype != torch.uint8:
        images = images.to(dtype) / 255
    return ImageDataset(images, torch.arange(n) % 10, name=f"random-{dtype}")


def uint8_quadrants():
    bundle = quadrants()

    def as_bytes(d):
        return ImageDataset((d.images * 255).round().clamp(0, 255).to(torch.uint8), d.labels,
                            name="quadrants-uint8")

    return DatasetBundle(train=as_bytes(bundle.train), test=as_bytes(bundle.test), in_channels=1,
                         input_size=20, num_classes=4, multi_label=False, name="quadrants")


def both_paths(dataset, world=1, rank=0, epoch=0, start=0, device="cpu", local=5, seed=7):
    """The batches of one epoch from ``start`` for this rank: host-collated, and from a copy
    of the dataset held on ``device``."""
    info = DistInfo(rank=rank, world_size=world)
    host = list(_StepBatches(dataset, local, info, seed, 0).epoch(epoch, start))
    resident = dataset.to_device(device)
    on_device = list(_StepBatches(dataset, local, info, seed, 0, device_dataset=resident).epoch(epoch, start))
    return host, on_device


def assert_same_batch(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key].to(a[key].device)), key


# ------------------------------------------------------------------ batches

def test_the_uint8_table_is_the_cpu_conversion():
    values = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(uint8_to_float(values), to_float_image(values))
    images = torch.randint(0, 256, (3, 2, 5, 7), dtype=torch.uint8)
    assert torch.equal(uint8_to_float(images), to_float_image(images))
    dataset = images_of(torch.uint8)
    resident = dataset.to_device("cpu")
    assert resident.images.dtype == torch.uint8 and resident.device_nbytes() == 103 * 144 + 103 * 8
    assert torch.equal(resident[5]["image"], dataset[5]["image"])
    assert images_of(torch.float64).device_nbytes() == 103 * 144 * 4 + 103 * 8


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_device_batches_equal_host_batches_for_every_rank_epoch_and_start(dtype):
    dataset = images_of(dtype)
    for world in (1, 2):
        steps = 103 // world // 5
        for rank in range(world):
            for epoch in (0, 3):
                whole = None
                for start in (0, 4):          # 4: a run resumed in the middle of the epoch
                    host, on_device = both_paths(dataset, world, rank, epoch, start)
                    assert len(host) == len(on_device) == steps - start
                    for a, b in zip(host, on_device):
                        assert_same_batch(a, b)
                    if start == 0:
                        whole = on_device
                    else:
                        for a, b in zip(whole[start:], on_device):
                            assert_same_batch(a, b)
    # Ranks split each global batch as DistributedSampler does: together they are world 1's.
    single, _ = both_paths(dataset, 1, 0, 2, local=10)
    halves = [both_paths(dataset, 2, rank, 2)[1] for rank in range(2)]
    for k, batch in enumerate(single[:10]):
        images = torch.stack([halves[0][k]["image"], halves[1][k]["image"]], dim=1).flatten(0, 1)
        assert torch.equal(images, batch["image"])


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_augmentation_is_the_same_for_host_and_device_batches(name):
    options = AUGMENTATIONS[name]
    dataset = images_of(torch.uint8)
    for world in (1, 2):
        for rank in range(world):
            augment = BatchAugmenter(seed=5, rank=rank, world_size=world, **options)
            host, on_device = both_paths(dataset, world, rank, epoch=1, start=2)
            rng = torch.get_rng_state()
            for step, (a, b) in enumerate(zip(host, on_device), start=2):
                x, y = augment(a, step), augment(b, step)
                assert_same_batch(x, y)
                assert not torch.equal(x["image"], a["image"])
            # Only its own (seed, step) generator is drawn from: the global stream is untouched.
            assert torch.equal(torch.get_rng_state(), rng)
    # A rank's rows of the global batch's augmentation, for every kind.
    batch = both_paths(dataset, local=8)[1][0]
    whole = BatchAugmenter(seed=5, **options)(batch, 11)["image"]
    for rank in range(2):
        local = {k: v[rank::2] for k, v in batch.items()}
        part = BatchAugmenter(seed=5, rank=rank, world_size=2, **options)(local, 11)["image"]
        assert torch.equal(part, whole[rank::2])


def test_affine_grid_on_the_cpu_is_the_former_warp():
    """The sampling grid is now always made on the CPU: for CPU images exactly what
    ``affine_grid`` on the images' device gave before."""
    images = torch.rand(6, 1, 11, 15, generator=torch.Generator().manual_seed(1))
    matrices = random_affine_matrices(6, step_generator(0, 3), 8.0, 15.0, (0.9, 1.1))
    size = torch.tensor([(15 - 1) / 2, (11 - 1) / 2], dtype=torch.float64)
    theta = torch.zeros(6, 2, 3, dtype=torch.float64)
    theta[:, :, :2] = torch.linalg.inv(matrices) * (size.view(1, 1, 2) / size.view(1, 2, 1))
    grid = torch.nn.functional.affine_grid(theta.float(), list(images.shape), align_corners=True)
    former = torch.nn.functional.grid_sample(images, grid, mode="nearest", align_corners=True)
    assert torch.equal(affine_images(images, matrices), former)


# ------------------------------------------------------------------ the rule

def test_device_data_rule():
    bundle = uint8_quadrants()
    train_set, test_set = bundle.train, bundle.test
    cpu = torch.device("cpu")
    moved = device_datasets("auto", cpu, train_set, test_set)
    assert all(d is not None and d.device == cpu and d._resident for d in moved)
    assert device_datasets("auto", cpu, train_set, test_set, num_workers=2) == (None, None)
    assert device_datasets("off", cpu, train_set, test_set) == (None, None)
    # A GPU (the meta device stands in): each set whose copy fits in a quarter of the free
    # memory, the training set first.
    need_train, need_test = train_set.device_nbytes(), test_set.device_nbytes()
    meta = torch.device("meta")
    both = device_datasets("auto", meta, train_set, test_set, free_bytes=4 * (need_train + need_test))
    assert [d.device.type for d in both] == ["meta", "meta"]
    first = device_datasets("auto", meta, train_set, test_set, free_bytes=4 * need_train)
    assert first[0].device.type == "meta" and first[1] is None
    assert device_datasets("auto", meta, train_set, test_set, free_bytes=4 * need_train - 1)[0] is None
    forced = device_datasets("on", meta, train_set, test_set, free_bytes=0)
    assert [d.device.type for d in forced] == ["meta"] * 2
    # Data sets without to_device (MultiMNIST's pairs, a Subset) stay on the host, or "on" says why.
    subset = torch.utils.data.Subset(train_set, range(32))
    assert device_datasets("auto", cpu, subset, subset) == (None, None)
    with pytest.raises(ValueError, match="device_data='on'.*Subset"):
        device_datasets("on", cpu, subset, test_set)
    with pytest.raises(ValueError, match="'device_data'"):
        TrainConfig(device_data="yes")
    assert TrainConfig().device_data == "auto"


def test_evaluation_by_index_and_on_the_device_equals_the_loader():
    bundle = uint8_quadrants()
    torch.manual_seed(0)
    cfg = tiny_cfg("unused")
    model = build_model(_fill_model_config(cfg.model_config(), bundle, None))
    kwargs = dict(num_classes=4, batch_size=16, limit=37)
    loader = evaluate(model, torch.utils.data.Subset(bundle.test, range(40)), **kwargs)  # no batch(): loader
    by_index = evaluate(model, bundle.test, **kwargs)
    on_device = evaluate(model, bundle.test.to_device("cpu"), return_scores=True, **kwargs)
    scores = on_device.pop("scores")
    assert on_device.pop("labels").tolist() == bundle.test.labels[:37].tolist()
    assert loader == by_index == on_device and loader["n"] == 37
    assert scores.shape == (37, 4)


# ------------------------------------------------------------------ training

def _rows(path, drop=TIMING):
    with open(path) as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def _assert_same_run(a, b, evaluations=True):
    ca, cb = (load_checkpoint(run / "checkpoints" / "last.pt") for run in (a, b))
    assert ca["model"].keys() == cb["model"].keys()
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _rows(a / "train_log.csv") == _rows(b / "train_log.csv")
    if evaluations:  # (a run stopped early also evaluated where it stopped)
        assert _rows(a / "eval_log.csv") == _rows(b / "eval_log.csv")


def _record_resident(monkeypatch):
    seen = []
    original = ImageDataset.batch

    def batch(self, indices, device=None):
        seen.append(self._resident)
        return original(self, indices, device)

    monkeypatch.setattr(ImageDataset, "batch", batch)
    return seen


@pytest.mark.parametrize("data, augmentation", [("float", "shifts"), ("uint8", "shifts+affine")])
def test_training_is_bitwise_the_same_with_the_data_on_the_device(tmp_path, monkeypatch, data, augmentation):
    bundle = quadrants() if data == "float" else uint8_quadrants()
    options = dict(AUGMENTATIONS[augmentation], max_steps=6, log_every=2, eval_every=3)
    options.setdefault("max_shift", 0)
    seen = _record_resident(monkeypatch)
    runs = {}
    for mode in ("off", "on"):
        seen.clear()
        runs[mode] = tmp_path / mode
        result = train(tiny_cfg(runs[mode], device_data=mode, **options), datasets=bundle,
                       console=Console(enabled=False))
        assert result["step"] == 6
        # Every training and test batch came from the path asked for.
        assert seen and set(seen) == {mode == "on"}
    _assert_same_run(runs["off"], runs["on"])
    losses = [float(row["loss"]) for row in _rows(runs["on"] / "train_log.csv")]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)


def test_resume_across_paths_is_exact(tmp_path):
    bundle = uint8_quadrants()   # 4 steps per epoch: the resumed run crosses an epoch boundary
    quiet = Console(enabled=False)
    train(tiny_cfg(tmp_path / "full", max_steps=7, log_every=1, device_data="on"), datasets=bundle,
          console=quiet)
    train(tiny_cfg(tmp_path / "cut", max_steps=3, log_every=1, device_data="off"), datasets=bundle,
          console=quiet)
    resumed = train(tiny_cfg(tmp_path / "cut", max_steps=7, log_every=1, device_data="on"),
                    resume=str(tmp_path / "cut"), datasets=bundle, console=quiet)
    assert resumed["step"] == 7
    _assert_same_run(tmp_path / "full", tmp_path / "cut", evaluations=False)


# ------------------------------------------------------------------ a GPU against the CPU

@needs_cuda
@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_cuda_batches_and_augmentation_equal_the_cpu(name):
    dataset = images_of(torch.uint8)
    float_set = images_of(torch.float32)
    for world, rank in ((1, 0), (2, 1)):
        augment = BatchAugmenter(seed=5, rank=rank, world_size=world, **AUGMENTATIONS[name])
        for data in (dataset, float_set):
            host, on_gpu = both_paths(data, world, rank, epoch=1, start=2, device="cuda")
            for step, (a, b) in enumerate(zip(host, on_gpu), start=2):
                assert b["image"].is_cuda
                assert_same_batch(a, b)
                assert_same_batch(augment(a, step), augment(b, step))


@needs_cuda
def test_cuda_training_with_the_data_on_the_device(tmp_path):
    bundle = uint8_quadrants()
    options = dict(max_steps=6, log_every=2, eval_every=3)
    quiet = Console(enabled=False)
    runs = (("cpu", "cpu", "off"), ("gpu-host", "cuda", "off"), ("gpu-device", "cuda", "on"))
    for name, device, mode in runs:
        train(tiny_cfg(tmp_path / name, device=device, device_data=mode, **options), datasets=bundle,
              console=quiet)
    params = {name: load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")["model"]
              for name, _, _ in runs}
    for key, value in params["cpu"].items():
        # The same inputs on the GPU either way (kernels that add in another order aside) ...
        torch.testing.assert_close(params["gpu-device"][key].cpu(), params["gpu-host"][key].cpu(),
                                   rtol=1e-4, atol=1e-5)
        # ... and near the CPU's run (other kernels, TF32 convolutions by default).
        torch.testing.assert_close(params["gpu-device"][key].cpu(), value, rtol=1e-2, atol=1e-3)
    rows = {name: _rows(tmp_path / name / "train_log.csv") for name in params}
    assert len(rows["gpu-device"]) == len(rows["cpu"]) == 3
    for a, b, c in zip(rows["cpu"], rows["gpu-host"], rows["gpu-device"]):
        assert float(c["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4)
        assert float(c["loss"]) == pytest.approx(float(a["loss"]), rel=1e-2)
