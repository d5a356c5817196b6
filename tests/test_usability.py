"""What a new user meets: run folders that are never silently overwritten, an evaluation
schedule that fits the run, console lines, errors as messages with an exit status, ``--set``
checks, the backend environment variable, resume messages, the bench output folder, the demo's
data rules, quiet progress off a terminal, figure labels and module errors."""
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from capsnet_ext import dispatch
from capsnet_ext.training import cli as train_cli
from capsnet_ext.training import load_config, train
from capsnet_ext.training.config import PRESETS, describe_preset
from capsnet_ext.training.logging_utils import Console
from capsnet_ext.training.trainer import RunFolderExistsError, auto_eval_every

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = dict(arch="capsnet", conv_channels=8, primary_channels=4, decoder_hidden=[32, 64])
TINY_FLAGS = ["--set", "model.conv_channels=8", "--set", "model.primary_channels=4",
              "--set", "model.decoder_hidden=[32,64]", "--device", "cpu", "--no-tensorboard",
              "--batch-size", "16", "--train-limit", "64", "--test-limit", "32"]
SHARED_MNIST = pathlib.Path(os.environ.get("CAPSNET_DATA", "/nonexistent")) / "mnist"
needs_mnist = pytest.mark.skipif(not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                 reason="real MNIST files not found (set $CAPSNET_DATA)")


def quadrants(n_train=64, n_test=40, seed=0):
    """Four classes, one bright quadrant each: a learnable in-memory data set."""
    from capsnet_ext.data import DatasetBundle, ImageDataset

    g = torch.Generator().manual_seed(seed)

    def make(n):
        labels = torch.arange(n) % 4
        images = 0.1 * torch.rand(n, 1, 20, 20, generator=g)
        for q in range(4):
            r, c = divmod(q, 2)
            images[labels == q, :, r * 10:(r + 1) * 10, c * 10:(c + 1) * 10] += 0.8
        return ImageDataset(images, labels, name="quadrants")

    return DatasetBundle(train=make(n_train), test=make(n_test), in_channels=1, input_size=20,
                         num_classes=4, multi_label=False, name="quadrants")


def tiny_cfg(out, **overrides):
    fields = dict(preset="mnist", out=str(out), batch_size=16, log_every=2, checkpoint_every=1000,
                  progress=False, tensorboard=False, device="cpu",
                  model=dict(TINY_MODEL, primary_kernel=5, conv_kernel=5), max_steps=4)
    fields.update(overrides)
    return load_config(**fields)


def quiet():
    return Console(io.StringIO())


# ------------------------------------------------------------------ run folders

def test_non_empty_run_folder_is_refused_unless_overwrite_or_resume(tmp_path):
    bundle = quadrants()
    run = tmp_path / "run"
    first = train(tiny_cfg(run, tensorboard=True), datasets=bundle, console=quiet())
    before = {p: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    with pytest.raises(RunFolderExistsError, match="--resume.*--overwrite"):
        train(tiny_cfg(run, lr=0.01), datasets=bundle, console=quiet())
    # Nothing of the first run was touched.
    assert {p: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    assert json.loads((run / "metrics.json").read_text())["step"] == first["step"]

    (run / "notes.txt").write_text("mine")
    events_before = list((run / "tensorboard").iterdir())
    assert events_before
    second = train(tiny_cfg(run, max_steps=2, tensorboard=True), datasets=bundle, overwrite=True,
                   console=quiet())
    assert second["step"] == 2
    # The earlier run's logs are gone, not mixed with the new ones; other files stay.
    rows = (run / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["2"]
    assert not any(p in events_before for p in (run / "tensorboard").iterdir())
    assert (run / "notes.txt").read_text() == "mine"
    # Resuming the same folder needs neither.
    third = train(tiny_cfg(run, max_steps=4), datasets=bundle, resume=str(run), console=quiet())
    assert third["step"] == 4
    # Resuming into another folder starts a new run folder there: it must be empty too.
    with pytest.raises(RunFolderExistsError):
        train(tiny_cfg(tmp_path, max_steps=6), datasets=bundle, resume=str(run), console=quiet())


def test_command_line_refusal_names_both_flags_and_exits_2(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert train_cli.main(["--out", str(run)] + TINY_FLAGS) == 2
    err = capsys.readouterr().err
    assert "capsnet-ext train: error: run folder" in err and "--resume" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert train_cli.main(["--out", str(run), "--resume", "--overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err


# ------------------------------------------------------------------ evaluation schedule

def test_auto_eval_every_is_per_epoch_but_never_more_test_than_training_images():
    assert auto_eval_every(steps_per_epoch=468, eval_items=10000, batch_size=128) == 468  # full MNIST
    assert auto_eval_every(steps_per_epoch=3, eval_items=10000, batch_size=128) == 79    # 500 images
    assert auto_eval_every(steps_per_epoch=15, eval_items=1000, batch_size=128) == 15
    assert auto_eval_every(steps_per_epoch=1, eval_items=1, batch_size=128) == 1


def test_evaluation_schedule_default_explicit_and_always_at_the_end(tmp_path):
    bundle = quadrants(n_train=32, n_test=40)   # 2 steps per epoch of 16; 40 test images
    steps = lambda run: [int(r.split(",")[0]) for r in (run / "eval_log.csv").read_text().splitlines()[1:]]
    # Default: at least ceil(40 / 16) = 3 steps apart (not every 2-step epoch), and at step 7.
    result = train(tiny_cfg(tmp_path / "auto", max_steps=7), datasets=bundle, console=quiet())
    assert result["eval_every"] == 3 and steps(tmp_path / "auto") == [3, 6, 7]
    train(tiny_cfg(tmp_path / "every5", max_steps=7, eval_every=5), datasets=bundle, console=quiet())
    assert steps(tmp_path / "every5") == [5, 7]


def test_console_lines_and_one_throughput_definition(tmp_path):
    bundle = quadrants()
    stream = io.StringIO()
    run = tmp_path / "run"
    result = train(tiny_cfg(run, max_steps=4, log_every=4, eval_every=2), datasets=bundle,
                   console=Console(stream))
    text = stream.getvalue()
    lines = text.splitlines()
    # Start-up: data set and sizes, model size, device, backend, precision, run folder.
    assert "quadrants (64 training / 40 test images)" in lines[0]
    assert "parameters" in lines[0] and "device cpu" in lines[0] and "routing backend reference" in lines[0]
    assert "fp32" in lines[0] and f"run folder {run}" in text and "evaluation every 2 steps" in text
    # One readable line per evaluation.
    evals = [ln for ln in lines if ln.startswith("train: step ")]
    assert len(evals) == 2 and "step 4/4 (epoch 1.0): train loss" in evals[1]
    assert "test error" in evals[1] and "training images/s" in evals[1]
    # Summary with where the checkpoints and logs are.
    assert "done: step 4/4" in text and str(run / "checkpoints") in text and "best.pt, last.pt" in text
    assert "{" not in text  # no JSON blob
    # train_log.csv and metrics.json measure the same thing: one log window spans the run.
    row = (run / "train_log.csv").read_text().splitlines()[1].split(",")
    header = (run / "train_log.csv").read_text().splitlines()[0].split(",")
    logged = float(row[header.index("images_per_sec")])
    saved = json.loads((run / "metrics.json").read_text())["images_per_sec"]
    assert logged == pytest.approx(saved, rel=1e-4) and result["images_per_sec"] == saved


def test_progress_is_sparse_when_not_a_terminal():
    stream = io.StringIO()
    console = Console(stream, plain_interval_s=3600)
    console.start_bar(100, 0, "train")
    for step in range(1, 101):
        console.advance(step, 100, loss="0.1")
    assert stream.getvalue() == ""         # no bar, and no line within the interval
    console = Console(stream, plain_interval_s=0)
    console.advance(5, 100, loss="0.1")
    assert stream.getvalue() == "train: step 5/100 (5%), loss 0.1\n"
    assert Console(stream, bar=False, plain_interval_s=0).plain_on is False


# ------------------------------------------------------------------ resume messages

def test_resume_messages(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train_cli.main(["--resume", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoints/last.pt" in err and "does not exist" not in err

    run = tmp_path / "run"
    train(tiny_cfg(run, max_steps=2), datasets=quadrants(), console=quiet())
    last = run / "checkpoints" / "last.pt"
    before = (last.read_bytes(), last.stat().st_mtime_ns)
    stream = io.StringIO()
    result = train(tiny_cfg(run, max_steps=2), datasets=quadrants(), resume=str(run), console=Console(stream))
    assert "is finished (step 2 of 2); nothing to do" in stream.getvalue()
    assert result["finished"] and result["step"] == 2
    assert (last.read_bytes(), last.stat().st_mtime_ns) == before


# ------------------------------------------------------------------ errors as messages

def test_set_values_are_json_and_checked(tmp_path, capsys):
    args = train_cli.build_parser().parse_args(["--set", "lr=0.01", "--set", "dataset=fashion-mnist",
                                                "--set", "model.decoder_hidden=[8,16]"])
    cfg = train_cli.config_from_args(args)
    assert cfg.lr == 0.01 and cfg.dataset == "fashion-mnist" and cfg.model["decoder_hidden"] == [8, 16]
    assert train_cli.main(["--set", "lr=abc", "--print-config"]) == 2
    assert "config field 'lr' must be a number, got 'abc'" in capsys.readouterr().err
    assert train_cli.main(["--set", "model.conv_chanels=128", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "conv_chanels" in err and "valid names:" in err and "conv_channels" in err
    assert train_cli.main(["--set", "model.conv_channels=\"wide\"", "--print-config"]) == 2
    assert "'model.conv_channels' must be an int" in capsys.readouterr().err
    assert train_cli.main(["--set", "noequals", "--print-config"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_bad_config_file_and_checkpoint_are_messages(tmp_path, capsys):
    from capsnet_ext.training import eval_cli

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert train_cli.main(["--config", str(bad)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert eval_cli.main([str(garbage)]) == 2
    err = capsys.readouterr().err
    assert "could not be read" in err and "Traceback" not in err


def test_top_level_command_exits_2_without_traceback(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "capsnet_ext.cli", "eval", str(garbage)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stderr.startswith("capsnet-ext eval: error: checkpoint") and "Traceback" not in done.stderr


def _offline(monkeypatch):
    from capsnet_ext.data import files

    def refuse(*args, **kwargs):
        raise OSError("offline (test)")
    monkeypatch.setattr(files, "_urlopen", refuse)


def test_missing_data_is_a_message(tmp_path, capsys, monkeypatch):
    _offline(monkeypatch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CAPSNET_DATA", raising=False)
    empty = tmp_path / "nodata"
    empty.mkdir()
    assert train_cli.main(["--out", str(tmp_path / "r1"), "--data-dir", str(empty)] + TINY_FLAGS) == 2
    err = capsys.readouterr().err
    assert "mnist: could not find" in err and str(empty) in err and "Traceback" not in err


@needs_mnist
def test_corrupt_data_file_is_a_message(tmp_path, capsys, monkeypatch):
    from capsnet_ext.data import mnist

    _offline(monkeypatch)
    data = tmp_path / "data" / "mnist"
    shutil.copytree(SHARED_MNIST, data)
    target = data / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:1000])
    mnist.clear_cache()
    assert train_cli.main(["--out", str(tmp_path / "r"), "--data-dir", str(tmp_path / "data")] + TINY_FLAGS) == 2
    err = capsys.readouterr().err
    assert "t10k-images-idx3-ubyte.gz" in err and "MD5" in err and "Traceback" not in err
    assert err.count("\n") < 6


# ------------------------------------------------------------------ backend variable

def test_backend_environment_variable_is_named(monkeypatch, capsys):
    from capsnet_ext import capsule_routing, dispatch_cli

    monkeypatch.setenv("CAPSNET_EXT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="environment variable CAPSNET_EXT_BACKEND='bogus'"):
        capsule_routing(torch.randn(2, 3, 5), torch.randn(3, 2, 4, 5), 3)
    # A bad argument still gets its own message.
    monkeypatch.delenv("CAPSNET_EXT_BACKEND")
    with pytest.raises(ValueError, match="backend must be") as info:
        capsule_routing(torch.randn(2, 3, 5), torch.randn(3, 2, 4, 5), 3, backend="bogus")
    assert "CAPSNET_EXT_BACKEND" not in str(info.value)
    monkeypatch.setenv("CAPSNET_EXT_BACKEND", "bogus")
    assert dispatch_cli.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "problem: the environment variable CAPSNET_EXT_BACKEND='bogus'" in out
    monkeypatch.setenv("CAPSNET_EXT_BACKEND", "reference")
    assert dispatch_cli.main(["--device", "cpu"]) == 0
    assert "CAPSNET_EXT_BACKEND=reference: replaces backend='auto'" in capsys.readouterr().out
    assert dispatch.env_backend() == "reference"


# ------------------------------------------------------------------ bench, demo

def test_bench_writes_to_runs_bench_by_default(tmp_path, monkeypatch):
    from benchmarks import cli as bench_cli

    assert bench_cli.build_parser().parse_args([]).out_dir == os.path.join("runs", "bench")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        payload = bench_cli.run(["--device", "cpu", "--contenders", "reference", "--ops", "predict",
                                 "--shape", "2,3,4,5,6,1", "--skip-e2e", "--no-plots", "--threads", "1",
                                 "--budget-ms", "1", "--min-reps", "1"], stdout=io.StringIO())
    finally:
        torch.set_num_threads(threads)
    path = pathlib.Path(payload["json_path"])
    assert path.parent == pathlib.Path("runs") / "bench" and (tmp_path / path).is_file()


def _demo_args(*extra):
    from capsnet_ext import demo

    return demo.build_parser().parse_args(list(extra))


def test_demo_data_rules(tmp_path, monkeypatch):
    from capsnet_ext import demo

    _offline(monkeypatch)   # the demo downloads MNIST when nothing is named: make that fail
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CAPSNET_DATA", raising=False)
    # A named folder without MNIST is an error, whichever way it was named.
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        demo._load_data(_demo_args("--data-dir", str(tmp_path / "empty")))
    monkeypatch.setenv("CAPSNET_DATA", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"\$CAPSNET_DATA"):
        demo._load_data(_demo_args())
    # Nothing named: the digits, saying where MNIST was looked for and how to name it.
    monkeypatch.delenv("CAPSNET_DATA")
    pytest.importorskip("sklearn")
    bundle, name, description = demo._load_data(_demo_args())
    assert name == "digits"
    assert str(tmp_path / "cache" / "capsnet_ext" / "data" / "mnist") in description
    assert "--data-dir" in description and "CAPSNET_DATA" in description
    assert demo.DEFAULT_OUT == pathlib.Path("runs") / "demo"


def test_runs_folder_is_git_ignored():
    assert "runs/" in (ROOT / ".gitignore").read_text().split()


# ------------------------------------------------------------------ presets, modules, figures

def test_every_preset_has_a_one_line_description(capsys):
    train_cli.list_presets()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(PRESETS)
    for name in PRESETS:
        description = describe_preset(name)
        assert description and "\n" not in description
        assert any(line.split()[0] == name and description in line for line in lines)


def test_routing_capsules_names_in_caps_and_the_module():
    from capsnet_ext.nn import RoutingCapsules

    layer = RoutingCapsules(in_caps=6, out_caps=3, in_dim=4, out_dim=5)
    with pytest.raises(ValueError, match=r"RoutingCapsules\(in_caps=6, in_dim=4\).*got \(2, 7, 4\)"):
        layer(torch.randn(2, 7, 4))
    with pytest.raises(ValueError, match="in_dim=4"):
        layer(torch.randn(2, 6, 3))


def test_figure_titles_and_labels(tmp_path, monkeypatch):
    from capsnet_ext.training import figures

    drawn = {}
    real_save = figures._save

    def keep(fig, path, dpi=100):
        drawn[pathlib.Path(path).name] = fig
        return real_save(fig, path, dpi)

    monkeypatch.setattr(figures, "_save", keep)
    figures.plot_confusion([[3, 1], [0, 4]], tmp_path / "confusion.png")
    ax, bar = drawn["confusion.png"].axes
    assert "Confusion matrix" in ax.get_title() and "8 test examples" in ax.get_title()
    assert bar.get_ylabel() == "fraction of the true class (row)"
    figures.plot_routing_dynamics({"step 5": [1.0, 0.5, 0.2, 0.1, 0.05, 0.01]},
                                  tmp_path / "routing.png", trained_iterations=3)
    title = drawn["routing.png"].axes[0].get_title()
    assert "routes with 3" in title and "4-6" in title
