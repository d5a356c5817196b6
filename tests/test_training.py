"""Trainer: configs and presets, augmentation, loss going down on real MNIST, bit-identical
resume (also after Ctrl-C), MultiMNIST objective, checkpoint errors.

Tiny CapsNets on small subsets of real MNIST (found through $CAPSNET_DATA, as in CI).
"""
import json
import os
import signal

import pytest
import torch
from torch import nn

from capsnet_ext.nn import build_model, register_model
from capsnet_ext.training import PRESETS, TrainConfig, load_checkpoint, load_config, train
from capsnet_ext.training.augment import BatchAugmenter, crop_images, shift_images
from capsnet_ext.training.evaluation import evaluate

TINY_CAPSNET = dict(conv_channels=8, primary_channels=4, decoder_hidden=[32, 64])


def _mnist(train_limit=256, test_limit=64):
    data = pytest.importorskip("capsnet_ext.data")
    try:
        return data.build_datasets("mnist", download=False, train_limit=train_limit, test_limit=test_limit)
    except FileNotFoundError as exc:
        pytest.skip(f"real MNIST files not found (set $CAPSNET_DATA): {exc}")


@pytest.fixture(scope="module")
def mnist():
    return _mnist()


def tiny_config(tmp_path, name="run", **overrides):
    fields = dict(preset="mnist", out=str(tmp_path / name), batch_size=16, log_every=3,
                  eval_limit=32, checkpoint_every=1000, progress=False, tensorboard=False,
                  model=dict(TINY_CAPSNET), max_steps=12)
    fields.update(overrides)
    return load_config(**fields)


def params_equal(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------- configuration

def test_every_preset_builds_a_valid_config():
    expected = {"mnist", "mnist-ablation", "multimnist", "affnist", "fashion-mnist", "cifar10",
                "svhn", "smallnorb", "baseline-cnn"}
    assert expected <= set(PRESETS)
    for name in PRESETS:
        cfg = load_config(preset=name)
        assert isinstance(cfg, TrainConfig) and cfg.model["arch"] in ("capsnet", "baseline-cnn",
                                                                       "mitterreiter-capsnet")
    assert load_config(preset="mnist").lr_decay == 0.96 and load_config(preset="mnist").lr_decay_steps == 2000
    assert load_config(preset="mnist-ablation-r1-norecon").recon_weight == 0.0
    assert load_config(preset="mnist-ablation-r1-norecon").model["iterations"] == 1
    cifar = load_config(preset="cifar10")
    assert cifar.model["primary_channels"] == 64 and cifar.model["leaky"] and cifar.crop_size == 24


def test_config_file_overrides_and_errors(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"preset": "mnist", "epochs": 3, "model": {"conv_channels": 64}}))
    cfg = load_config(path=path, seed=7, batch_size=None)
    assert (cfg.epochs, cfg.seed, cfg.batch_size) == (3, 7, 128)
    assert cfg.model["conv_channels"] == 64 and cfg.model["primary_channels"] == 32
    # Another arch replaces the model dict instead of merging into it.
    cnn = load_config(preset="mnist", model={"arch": "baseline-cnn"})
    assert cnn.model == {"arch": "baseline-cnn"}
    assert load_config(preset="mnist", iterations=1, backend="reference").model_config()["iterations"] == 1
    with pytest.raises(ValueError, match="unknown config fields"):
        load_config(preset="mnist", epoch=3)
    with pytest.raises(ValueError, match="unknown preset"):
        load_config(preset="mnist-2")
    with pytest.raises(ValueError, match="'precision'"):
        load_config(precision="fp16")
    with pytest.raises(ValueError, match="'batch_size'"):
        load_config(batch_size=0)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(path=path)


# ----------------------------------------------------------------- augmentation

def test_shift_matches_the_data_package_and_moves_components_alike():
    transforms = pytest.importorskip("capsnet_ext.data.transforms")
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(7, 2, 11, 13, generator=gen)
    offsets = torch.randint(-3, 4, (7, 2), generator=gen)
    shifted = shift_images(images, offsets, 3)
    expected = transforms.shift_images(images, dx=offsets[:, 1], dy=offsets[:, 0])
    assert torch.equal(shifted, expected)
    # [B, K, C, H, W] (MultiMNIST components) use each example's offset for all K.
    components = torch.rand(7, 2, 1, 11, 13, generator=gen)
    both = shift_images(components, offsets, 3)
    for k in range(2):
        assert torch.equal(both[:, k], shift_images(components[:, k], offsets, 3))
    crops = crop_images(images, torch.tensor([0, 1, 2, 0, 1, 2, 3]), torch.tensor([4, 3, 2, 1, 0, 1, 2]), 8)
    assert torch.equal(crops[1], images[1, :, 1:9, 3:11])


def test_each_rank_gets_its_rows_of_the_global_augmentation():
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(8, 1, 12, 12, generator=gen), "label": torch.arange(8)}
    whole = BatchAugmenter(seed=5, max_shift=2)(batch, step=17)["image"]
    assert not torch.equal(whole, batch["image"])
    for rank in range(2):
        local = {"image": batch["image"][rank::2], "label": batch["label"][rank::2]}
        part = BatchAugmenter(seed=5, max_shift=2, rank=rank, world_size=2)(local, step=17)["image"]
        assert torch.equal(part, whole[rank::2])
    # A different step draws different offsets; the same step the same ones.
    assert torch.equal(BatchAugmenter(5, 2)(batch, 17)["image"], whole)
    assert not torch.equal(BatchAugmenter(5, 2)(batch, 18)["image"], whole)


# ----------------------------------------------------------------- training

def test_a_few_steps_on_real_mnist_reduce_the_loss(tmp_path, mnist):
    cfg = tiny_config(tmp_path, max_steps=40, lr=3e-3, eval_every=40)
    torch.manual_seed(cfg.seed)
    from capsnet_ext.training.trainer import _fill_model_config
    initial = build_model(_fill_model_config(cfg.model_config(), mnist, None))
    probe = torch.utils.data.Subset(mnist.train, range(128))
    before = evaluate(initial, probe, num_classes=10)
    result = train(cfg, datasets=mnist)
    after_model = build_model(load_checkpoint(result["last_checkpoint"])["model_config"])
    after_model.load_state_dict(load_checkpoint(result["last_checkpoint"])["model"])
    after = evaluate(after_model, probe, num_classes=10)
    assert after["loss"] < 0.8 * before["loss"], (before["loss"], after["loss"])
    assert after["accuracy"] > 0.4 > before["accuracy"]
    assert result["step"] == 40 and result["backend"] == "reference"
    rows = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,lr,loss") and len(rows) == 1 + 40 // 3 + 1
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["step"] == 40 and saved["environment"]["torch"] == torch.__version__


class _InterruptAt:
    """Sends SIGINT to this process after the backward pass of ``step`` (as Ctrl-C would)."""

    def __init__(self, step):
        self.step = step

    def on_after_backward(self, step, model):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_and_resume_is_bit_identical(tmp_path, mnist):
    # 256 examples / 16 = 16 steps per epoch: the run crosses an epoch boundary, uses shifts.
    full = train(tiny_config(tmp_path, "full", max_steps=20, eval_every=7), datasets=mnist)
    assert full["interrupted"] is None
    cut = train(tiny_config(tmp_path, "cut", max_steps=20, eval_every=7), callbacks=[_InterruptAt(8)],
                datasets=mnist)
    assert cut["interrupted"] == "SIGINT" and cut["step"] == 9
    stopped = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert stopped["step"] == 9 and stopped["config"]["max_steps"] == 20
    resumed = train(tiny_config(tmp_path, "cut", max_steps=20, eval_every=7),
                    resume=str(tmp_path / "cut"), datasets=mnist)
    assert resumed["step"] == 20
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert params_equal(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert params_equal(sa, sb)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 20
    # The resumed run's logs continue without duplicated steps.
    steps = [line.split(",")[0] for line in (tmp_path / "cut" / "eval_log.csv").read_text().splitlines()[1:]]
    assert steps == ["7", "14", "20"]


class _DropoutNet(nn.Module):
    """A small classifier with dropout: its training draws from the global torch RNG, so an
    exact resume needs the saved RNG state."""

    def __init__(self, input_size=28, in_channels=1, num_classes=10):
        super().__init__()
        self.config = dict(arch="test-dropout-net", input_size=input_size, in_channels=in_channels,
                           num_classes=num_classes)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size ** 2, 32), nn.ReLU(),
                                 nn.Dropout(0.5), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.net(x)


def test_resume_restores_rng_for_classifiers_with_dropout(tmp_path, mnist):
    register_model("test-dropout-net", _DropoutNet)
    model = {"arch": "test-dropout-net"}
    train(tiny_config(tmp_path, "full", model=model, max_steps=10, recon_weight=0.0), datasets=mnist)
    train(tiny_config(tmp_path, "part", model=model, max_steps=4, recon_weight=0.0), datasets=mnist)
    train(tiny_config(tmp_path, "part", model=model, max_steps=10, recon_weight=0.0),
          resume=str(tmp_path / "part" / "checkpoints" / "last.pt"), datasets=mnist)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert params_equal(a["model"], b["model"])
    assert "ce" in (tmp_path / "full" / "train_log.csv").read_text().splitlines()[0]


def test_multimnist_trains_on_both_components(tmp_path):
    data = pytest.importorskip("capsnet_ext.data")
    try:
        bundle = data.build_datasets("multimnist", download=False, pairs_per_digit=1,
                                     test_pairs_per_digit=1, cache_dir=tmp_path / "cache",
                                     train_limit=64, test_limit=32)
    except FileNotFoundError as exc:
        pytest.skip(f"real MNIST files not found: {exc}")
    seen = []

    class Record:
        def on_eval(self, step, metrics):
            seen.append(metrics)

    cfg = tiny_config(tmp_path, preset="multimnist", max_steps=3, eval_every=3, eval_limit=None,
                      model=dict(TINY_CAPSNET, input_size=36))
    result = train(cfg, callbacks=[Record()], datasets=bundle)
    assert cfg.recon_target == "components" and result["step"] == 3
    assert len(seen) == 1 and seen[0]["n"] == 32 and 0.0 <= seen[0]["accuracy"] <= 1.0
    header, *rows = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    recon = float(rows[-1].split(",")[header.split(",").index("recon")])
    assert recon > 0


def test_truncated_checkpoint_gives_a_clear_error(tmp_path, mnist):
    result = train(tiny_config(tmp_path, max_steps=2), datasets=mnist)
    path = result["last_checkpoint"]
    blob = open(path, "rb").read()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint(broken)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="lacks the keys"):
        load_checkpoint(tmp_path / "foreign.pt")
    # The good checkpoint was not touched and no temporary files are left behind.
    assert open(path, "rb").read() == blob
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_global_batch_must_split_evenly_and_fit(tmp_path, mnist):
    with pytest.raises(ValueError, match="smaller than one global batch"):
        train(tiny_config(tmp_path, batch_size=512), datasets=mnist)


def test_epoch_order_is_distributed_samplers_for_every_world_size():
    """The trainer's tensor-held permutation equals DistributedSampler's, rank by rank."""
    from torch.utils.data.distributed import DistributedSampler

    from capsnet_ext.training.distributed import DistInfo
    from capsnet_ext.training.trainer import _StepBatches

    dataset = list(range(103))
    for world in (1, 2, 3):
        for rank in range(world):
            batches = _StepBatches(dataset, 5, DistInfo(rank=rank, world_size=world), 7, 0)
            sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                         seed=7, drop_last=True)
            for epoch in (0, 3):
                sampler.set_epoch(epoch)
                assert batches.epoch_indices(epoch).tolist() == list(iter(sampler))
