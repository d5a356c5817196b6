"""The second new-user round: a missing GPU is a one-line error for every command, options given
with --resume are honoured or refused (never ignored), a failed start leaves no half-made run
folder, the start-up line estimates the duration, and the closing summary names only files
that exist."""
import io
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from capsnet_ext._cli import closest, parse_device
from capsnet_ext.training import cli as train_cli
from capsnet_ext.training import train
from capsnet_ext.training.logging_utils import Console, format_duration
from capsnet_ext.training.trainer import _ETA, _summary

from test_usability import TINY_FLAGS, needs_mnist, quadrants, quiet, tiny_cfg

ROOT = pathlib.Path(__file__).resolve().parents[1]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")


def run_cli(*args, env=None, timeout=300):
    """``python -m capsnet_ext.cli ARGS`` as a user runs it: exit status, stdout, stderr."""
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("CAPSNET_EXT_TRACEBACK", None)
    proc = subprocess.run([sys.executable, "-m", "capsnet_ext.cli", *args], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


# ------------------------------------------------------------------ 1. --device, one place
@no_gpu
@pytest.mark.parametrize("command", [
    ["train", "--out", "{tmp}/run"],
    ["eval", "{tmp}/run"],
    ["analyze", "{tmp}/run"],
    ["demo", "--no-download", "--out", "{tmp}/run"],
])
@pytest.mark.parametrize("device,expected", [
    ("cuda", "no CUDA"), ("cuda:1", "no CUDA"), ("gpu", "did you mean 'cuda'"),
])
def test_device_errors_are_one_line_exit_2(tmp_path, command, device, expected):
    args = [a.format(tmp=tmp_path) for a in command] + ["--device", device]
    code, out, err = run_cli(*args)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "--device" in lines[0] and expected in lines[0], err
    assert not (tmp_path / "run").exists()  # refused before anything is made


def test_parse_device_names_the_option_and_the_closest_choice():
    assert parse_device("cpu") == "cpu" and parse_device("auto") == "auto"
    with pytest.raises(ValueError, match=r"--device 'gpu' is not a device.*did you mean 'cuda'"):
        parse_device("gpu")
    with pytest.raises(ValueError, match=r"--device 'cpU'.*did you mean 'cpu'"):
        parse_device("cpU")
    with pytest.raises(ValueError, match="not on xpu"):
        parse_device("xpu")
    with pytest.raises(ValueError, match=r"^device 'gpu'"):
        parse_device("gpu", option="device")
    assert closest("refernce", ["auto", "reference", "triton"]) == "reference"
    assert closest("zzz", ["auto", "reference"]) is None


@no_gpu
def test_train_from_python_with_a_missing_gpu_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="no CUDA"):
        train(tiny_cfg(tmp_path / "run", device="cuda"), datasets=quadrants(), console=quiet())
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 2. options with --resume
def _first_run(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, max_steps=2), datasets=quadrants(), console=quiet())
    return out


def _resume_args(out, *extra):
    return train_cli.build_parser().parse_args(["--resume", str(out), *extra])


def test_resume_refuses_options_that_cannot_change(tmp_path):
    out = _first_run(tmp_path)
    args = _resume_args(out, "--lr", "0.5", "--batch-size", "32", "--set",
                        "model.conv_channels=256", "--max-steps", "6")
    with pytest.raises(ValueError) as info:
        train_cli.config_from_args(args)
    message = str(info.value)
    for option in ("--lr 0.5", "--batch-size 32", "--set model.conv_channels 256"):
        assert option in message, message
    assert "--max-steps" in message.split(": a resumed run")[1]  # named among what may change
    assert "--lr" not in message.split(": a resumed run")[1]


def test_resume_honours_what_may_change_and_accepts_the_saved_values(tmp_path):
    out = _first_run(tmp_path)
    saved = json.loads((out / "config.json").read_text())
    args = _resume_args(out, "--max-steps", "6", "--eval-every", "3", "--log-every", "1",
                        "--batch-size", str(saved["batch_size"]), "--lr", str(saved["lr"]))
    cfg = train_cli.config_from_args(args)
    assert (cfg.max_steps, cfg.eval_every, cfg.log_every) == (6, 3, 1)
    result = train(cfg, resume=str(out), datasets=quadrants(), console=quiet())
    assert result["step"] == 6 and result["eval_every"] == 3


def test_resume_refuses_preset_and_config(tmp_path):
    out = _first_run(tmp_path)
    with pytest.raises(ValueError, match="--preset and --config cannot be given"):
        train_cli.config_from_args(_resume_args(out, "--preset", "mnist"))


def test_elapsed_continues_after_resume(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, max_steps=4, log_every=2), datasets=quadrants(), console=quiet())
    train(tiny_cfg(out, max_steps=8, log_every=2), resume=str(out), datasets=quadrants(),
          console=quiet())
    import csv

    rows = list(csv.DictReader(open(out / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[2] > elapsed[1]


# ------------------------------------------------------------------ 3. no half-made run folder
@no_gpu
@pytest.mark.parametrize("how", ["flag", "environment"])
def test_unavailable_backend_leaves_no_run_folder(tmp_path, how):
    out = tmp_path / "run"
    flags = ["--backend", "cuda"] if how == "flag" else []
    env = {"CAPSNET_EXT_BACKEND": "cuda"} if how == "environment" else {}
    code, stdout, err = run_cli("train", "--out", str(out), *TINY_FLAGS, "--max-steps", "1",
                                "--set", "dataset=digits", "--no-progress", *flags, env=env)
    assert code == 2 and "Traceback" not in err, err
    assert "cuda" in err.splitlines()[-1], err
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_a_start_that_fails_after_the_folder_is_made_cleans_up(tmp_path, monkeypatch):
    """A failure in the first step (after config.json and the logs exist) removes them, and the
    same command then simply runs."""
    from capsnet_ext.training import trainer

    out = tmp_path / "run"

    def broken(*args, **kwargs):
        raise RuntimeError("first step failed")

    monkeypatch.setattr(trainer, "forward_and_loss", broken)
    with pytest.raises(RuntimeError, match="first step failed"):
        train(tiny_cfg(out, tensorboard=True), datasets=quadrants(), console=quiet())
    assert not out.exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        train(tiny_cfg(tmp_path / "kept", tensorboard=True), datasets=quadrants(), console=quiet(),
              overwrite=True)
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["notes.txt"]
    monkeypatch.undo()
    result = train(tiny_cfg(out), datasets=quadrants(), console=quiet())  # the retry just runs
    assert result["step"] == 4


def test_a_run_with_a_checkpoint_is_never_cleaned_up(tmp_path, monkeypatch):
    from capsnet_ext.training import trainer

    out = _first_run(tmp_path)
    calls = []
    original = trainer.forward_and_loss

    def fail_later(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("later failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "forward_and_loss", fail_later)
    with pytest.raises(RuntimeError):
        train(tiny_cfg(out, max_steps=6), resume=str(out), datasets=quadrants(), console=quiet())
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "train_log.csv").is_file()


# ------------------------------------------------------------------ 4. durations
def test_eta_line_after_the_first_steps_and_in_a_file(tmp_path):
    stream = io.StringIO()  # not a terminal: the line is printed all the same
    train(tiny_cfg(tmp_path / "run", max_steps=9), datasets=quadrants(), console=Console(stream))
    lines = [line for line in stream.getvalue().splitlines() if line.startswith("train: pace:")]
    assert len(lines) == 1, stream.getvalue()
    assert "s per step" in lines[0] and "remaining" in lines[0] and "evaluation" in lines[0]


def test_eta_skips_the_first_step_and_estimates_the_rest():
    eta = _ETA(start_step=0, total_steps=105, eval_interval=50, eval_items=1000, batch_size=100)
    assert eta.after_step(1, 30.0) is None  # warm-up
    messages = [eta.after_step(step, 0.1) for step in range(2, 7)]
    assert messages[:4] == [None] * 4 and not eta.pending
    assert "0.1 s per step" in messages[4] and "remaining 99 steps take about 9.9 s" in messages[4]
    assert "3 evaluations of 1000 images" in messages[4]  # at steps 50, 100 and 105
    slow = _ETA(start_step=0, total_steps=100, eval_interval=50, eval_items=10, batch_size=10)
    slow.after_step(1, 9.0)
    assert "2 evaluations" in slow.after_step(2, 3.0)  # 3 s >= 2 s: one timed step is enough
    assert format_duration(3 * 86400 + 4 * 3600) == "3 days 4h"


@needs_mnist
def test_default_train_command_says_how_long_it_would_take(tmp_path):
    """`capsnet-ext train` with no arguments would run for days on a CPU: it says so early."""
    proc = subprocess.Popen([sys.executable, "-m", "capsnet_ext.cli", "train", "--out",
                             str(tmp_path / "run"), "--no-progress", "--device", "cpu"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("train: pace:") or len(seen) > 20:
                break
    finally:
        proc.kill()
        proc.wait()
    assert any("pace:" in line and "remaining" in line for line in seen), seen


# ------------------------------------------------------------------ 6. the closing summary
def test_summary_names_only_files_that_exist(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.pt").write_bytes(b"x")
    (out / "config.json").write_text("{}")
    stream = io.StringIO()
    result = dict(out=str(out), interrupted="SIGINT", step=27, total_steps=100, test_error=None,
                  best_error=None, wall_seconds=3.0, train_seconds=2.0, eval_seconds=0.0,
                  images_per_sec=10.0, best_step=None,
                  best_checkpoint=None, last_checkpoint=str(out / "checkpoints" / "last.pt"))
    _summary(Console(stream), result, tiny_cfg(out, tensorboard=True))
    text = stream.getvalue()
    assert "logs: config.json in" in text
    for absent in ("train_log.csv", "eval_log.csv", "metrics.json", "tensorboard", "best.pt"):
        assert absent not in text, text
    assert "checkpoints: last.pt" in text


# ------------------------------------------------------------------ 7. option names, suggestions
@pytest.mark.parametrize("args,expected", [
    (["train", "--train-limit", "-5"], "argument --train-limit: must be at least 1, got -5"),
    (["train", "--epochs", "x"], "argument --epochs: expected a whole number, got 'x'"),
    (["train", "--backend", "refernce"], "did you mean 'reference'?"),
    (["train", "--precision", "bf61"], "did you mean 'bf16'?"),
    (["train", "--preset", "mnsit"], "unknown preset 'mnsit'"),
    (["train", "--set", "dataset=mnsit"], "dataset 'mnsit' is not known"),
    (["eval", "x", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["demo", "--dataset", "digts"], "did you mean 'digits'?"),
    (["analyze", "x", "--limit", "0"], "argument --limit: must be at least 1"),
])
def test_errors_name_the_users_option_and_the_closest_choice(tmp_path, args, expected):
    code, out, err = run_cli(*args, "--out", str(tmp_path / "run"))
    assert code == 2 and "Traceback" not in err, err
    assert expected in err.strip().splitlines()[-1], err
    if "mnsit" in expected:
        assert "(did you mean 'mnist'?)" in err


def test_bench_progress_lines_do_not_repeat_the_table():
    """`bench` printed every result twice (a progress line, then the table): the progress line
    now says what was measured, and the numbers appear once, in the table."""
    from benchmarks import end_to_end, suite

    record = dict(op="predict", contender="reference", mode="forward", dtype="float32",
                  shape=dict(B=16, I=8, J=10, iterations=3), status="ok",
                  time_s=dict(median=0.001234), fraction_of_floor=0.5)
    line = suite._one_line(record)
    assert line.endswith("measured") and "1.234" not in line and "floor" not in line
    failed = suite._one_line(dict(record, status="error", reason="boom"))
    assert failed.endswith("ERROR: boom")
    e2e = end_to_end._one_line(dict(backend="reference", compiled=False, precision="float32",
                                    batch=8, status="ok", steps_per_s=0.9, images_per_s=7.2))
    assert "7.2" not in e2e and "measured" in e2e


def test_replacing_a_run_does_not_name_an_option_the_user_did_not_pass(tmp_path):
    """The demo replaces its folder without --overwrite from the user: the line says what
    happened, not which option would have done it."""
    out = tmp_path / "run"
    train(tiny_cfg(out, max_steps=2), datasets=quadrants(), console=quiet())
    stream = io.StringIO()
    train(tiny_cfg(out, max_steps=2), datasets=quadrants(), console=Console(stream),
          overwrite=True)
    text = stream.getvalue()
    assert f"replacing the earlier run in {out}" in text and "--overwrite" not in text
    assert text.count(f"run folder {out}") == 1


def test_no_download_for_train_and_eval(tmp_path, monkeypatch):
    """`--no-download` never fetches (train and eval), and a resumed run accepts it."""
    from capsnet_ext.data import files

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(files, "_urlopen", refuse)
    monkeypatch.setenv("CAPSNET_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code = train_cli.main(["--out", str(tmp_path / "run"), "--no-download", *TINY_FLAGS,
                           "--max-steps", "1"])
    assert code == 2 and not (tmp_path / "run").exists()
    from capsnet_ext.training import eval_cli

    out = _first_run(tmp_path)
    assert eval_cli.main([str(out), "--no-download", "--out", str(tmp_path / "ev")]) == 2
    cfg = train_cli.config_from_args(_resume_args(out, "--no-download", "--max-steps", "3"))
    assert cfg.dataset_options["download"] is False and cfg.max_steps == 3
