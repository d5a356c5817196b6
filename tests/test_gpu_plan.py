"""capsnet-ext gpu-plan: the plans' order, the runner's budget logic (estimates, skipping, the
cut at the deadline), packing, the dry runs of both plans, and folding an archive into a copy
of the repository without touching anything else."""
import argparse
import filecmp
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

from capsnet_ext import gpu_plan
from capsnet_ext.gpu_plan import Job, Runner

from test_usability import needs_mnist

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_seed_paper_full_order():
    jobs = gpu_plan.plan_seed_paper_full()
    names = [j.name for j in jobs]
    assert names[:3] == ["h1-r4/seed0", "h1-r4/seed1", "h1-r4/seed2"]
    depth = [n for n in names[3:] if not n.startswith("init-auto")]
    configs = {n.split("/")[0] for n in depth}
    assert len(configs) == 9 and "h1-r4" not in configs  # 5 depths x 2 iterations, less seed-paper
    first_seed1 = next(i for i, n in enumerate(depth) if n.endswith("seed1"))
    assert {n.split("/")[0] for n in depth[:first_seed1]} == configs  # one seed of each first
    assert [n.split("/")[0] for n in depth[:2]] == ["h1-r1", "h5-r4"]  # extremes first
    control = [j for j in jobs if j.name.startswith("init-auto")]
    assert len(control) == 5 and jobs[-5:] == control
    assert all("--epochs" in j.train_args and j.collect == "seed-paper" for j in jobs)
    assert all(j.images == 5 * 60000 for j in jobs)


def test_mnist_long_stretches_the_decay_over_its_epochs():
    [job] = gpu_plan.plan_mnist_long(30)
    args = job.train_args
    assert args[args.index("--preset") + 1] == "mnist" and args[args.index("--epochs") + 1] == "30"
    assert "lr_decay_steps=400" in args  # 2000 x 30 / 150: the paper's total decay in 30 epochs
    assert args[args.index("--eval-every") + 1] == str(60000 // 128)  # every epoch
    assert job.keep_weights
    assert gpu_plan.mnist_long_epochs(480) > gpu_plan.mnist_long_epochs(240) >= 1


class FakeRunner(Runner):
    """Runs a stand-in for the trainer: sleeps ``seconds`` (SIGTERM: exits 130 as the trainer
    does after saving), writes metrics.json and config.json."""

    def __init__(self, jobs, tmp_path, budget_s, seconds, parallel=1):
        args = argparse.Namespace(dry_run=False, device="cpu", root=str(tmp_path / "root"),
                                  out=str(tmp_path / "out"), budget_s=budget_s,
                                  parallel=parallel, max_runs=None, data_dir=None)
        super().__init__("mnist-long", jobs, args)
        self.seconds = seconds

    def train_command(self, job):
        run = self.root / job.name
        code = (
            "import json, pathlib, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(130))\n"
            f"run = pathlib.Path({str(run)!r}); run.mkdir(parents=True, exist_ok=True)\n"
            "(run / 'config.json').write_text(json.dumps({'batch_size': 100}))\n"
            f"time.sleep({self.seconds[job.name]})\n"
            "(run / 'metrics.json').write_text(json.dumps({'step': 10, 'epoch': 1.0, "
            "'images_per_sec': 500.0, 'train_seconds': 1.0, 'wall_seconds': 2.0, "
            "'test_error': 0.1, 'backend': 'reference'}))\n")
        return [sys.executable, "-c", code]


def test_budget_logic_skips_what_does_not_fit_and_cuts_at_the_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_plan, "RESERVE_SECONDS", 0.0)
    monkeypatch.setattr(gpu_plan, "START_SECONDS", 0.0)
    monkeypatch.setitem(gpu_plan.GUESS_IMAGES_PER_S, "capsnet", 1000.0)
    jobs = [Job("a", "capsnet", [], images=1000), Job("b", "capsnet", [], images=1000),
            Job("huge", "capsnet", [], images=10 ** 6), Job("c", "capsnet", [], images=100)]
    runner = FakeRunner(jobs, tmp_path, budget_s=4.0, seconds=dict(a=1.5, b=1.5, huge=0, c=0.1))
    assert runner.estimate(jobs[0]) == pytest.approx(1.0)  # the planning guess
    runner.run(log=lambda line: None)
    status = {r["name"]: r for r in runner.plan_json()["runs"]}
    assert status["a"]["status"] == "done" and status["a"]["images_per_sec"] == 500.0
    # after "a", the measured pace (~1.6 s per 1000 images) says "b" still fits; "huge" never
    # does and is skipped with its reason, while the small "c" still runs
    assert status["huge"]["status"] == "skipped" and "budget" in status["huge"]["reason"]
    assert status["c"]["status"] == "done"
    assert runner.pace["capsnet"] > 1 / 1000.0
    archive = next((tmp_path / "out").glob("gpu-plan-mnist-long-*.tar.gz"))
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert any(n.endswith("/plan.json") for n in names) and any(n.endswith("a/metrics.json") for n in names)
    assert next((tmp_path / "out").glob("*-summary.md")).read_text().startswith("# GPU plan mnist-long")


def test_a_run_past_the_deadline_is_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_plan, "RESERVE_SECONDS", 0.0)
    monkeypatch.setattr(gpu_plan, "START_SECONDS", 0.0)
    runner = FakeRunner([Job("slow", "capsnet", [], images=1)], tmp_path, budget_s=1.5,
                        seconds=dict(slow=30))
    runner.run(log=lambda line: None)
    [record] = runner.plan_json()["runs"]
    assert record["status"] == "cut at the deadline" and record["wall_s"] < 10


def test_checkpoints_stay_out_of_the_archive():
    keep = gpu_plan._pack_filter(tarfile.TarInfo("plan/h1-r4/seed0/metrics.json"))
    assert keep is not None
    for name in ("plan/h1-r4/seed0/checkpoints/last.pt", "plan/run/tensorboard/events"):
        assert gpu_plan._pack_filter(tarfile.TarInfo(name)) is None


def test_kept_weights_fall_back_to_no_decoder_and_evaluate(tmp_path, monkeypatch):
    import torch

    from capsnet_ext.training import train
    from capsnet_ext.training.checkpoint import model_from_checkpoint

    from test_usability import quadrants, quiet, tiny_cfg

    run = tmp_path / "run"
    train(tiny_cfg(run, max_steps=2), datasets=quadrants(), console=quiet())
    whole = gpu_plan.keep_weights(run)
    assert whole["file"] == "weights-bf16.pt"
    monkeypatch.setattr(gpu_plan, "FILE_LIMIT_BYTES", (1 << 20) + whole["bytes"] - 1)
    slim = gpu_plan.keep_weights(run)
    assert slim["file"] == "weights-bf16-no-decoder.pt" and slim["bytes"] < whole["bytes"]
    ckpt = torch.load(run / slim["file"], weights_only=False)
    assert ckpt["weights_dtype"] == "bfloat16" and not any(k.startswith("decoder.") for k in ckpt["model"])
    model = model_from_checkpoint(str(run / slim["file"]))
    original = model_from_checkpoint(str(run / "checkpoints" / "last.pt"))
    x = torch.rand(3, 1, 20, 20)
    assert torch.allclose(model(x).lengths if hasattr(model(x), "lengths") else model(x)[0],
                          original(x).lengths if hasattr(original(x), "lengths") else original(x)[0],
                          atol=5e-2)


def _repo_copy(tmp_path) -> pathlib.Path:
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "results", root / "results")
    (root / "docs").mkdir(parents=True)
    shutil.copy2(ROOT / "docs" / "seed-paper.md", root / "docs" / "seed-paper.md")
    shutil.copy2(ROOT / "README.md", root / "README.md")
    return root


def _cli(*args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "capsnet_ext.cli", "gpu-plan", *args], cwd=cwd,
                          env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                          timeout=600)


@needs_mnist
@pytest.mark.slow
@pytest.mark.parametrize("plan", ["seed-paper-full", "mnist-long"])
def test_dry_run_and_fold_into_a_copy(tmp_path, plan):
    proc = _cli(plan, "--dry-run", "--out", str(tmp_path / "out"), "--root", str(tmp_path / "root"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [archive] = (tmp_path / "out").glob(f"gpu-plan-{plan}-dryrun-*.tar.gz")
    with tarfile.open(archive) as tar:
        plan_json = json.load(tar.extractfile(next(m for m in tar.getmembers()
                                                   if m.name.endswith("/plan.json"))))
        assert not any("checkpoints" in n for n in tar.getnames())
    statuses = [r["status"] for r in plan_json["runs"]]
    expected_done = 2 if plan == "seed-paper-full" else 1
    assert statuses.count("done") == expected_done and plan_json["dry_run"]
    assert all(s == "skipped" for s in statuses[expected_done:])
    root = _repo_copy(tmp_path)
    refused = _cli("fold", str(archive), "--root", str(root))
    assert refused.returncode == 2 and "dry run" in refused.stderr
    before = tmp_path / "before"
    shutil.copytree(root, before)
    folded = _cli("fold", str(archive), "--root", str(root), "--allow-dry-run")
    assert folded.returncode == 0, folded.stderr[-2000:]
    # Only results/<plan>/ is new and only the plan's generated section changed.
    assert sorted(p.name for p in (root / "results").iterdir()) == sorted(
        [p.name for p in (before / "results").iterdir()] + [plan])
    compare = filecmp.dircmp(before / "results", root / "results")
    assert not compare.diff_files and not any(compare.subdirs[d].diff_files for d in compare.subdirs
                                               if d != plan)
    doc = "docs/seed-paper.md" if plan == "seed-paper-full" else "README.md"
    other = "README.md" if plan == "seed-paper-full" else "docs/seed-paper.md"
    assert (root / other).read_text() == (before / other).read_text()
    text = (root / doc).read_text()
    assert gpu_plan.FOLD_BEGIN[plan] in text and text.startswith((before / doc).read_text()[:200])
    if plan == "mnist-long":
        result = json.loads((root / "results" / "mnist-long" / "result.json").read_text())
        assert result["dry_run"] and result["test_error_per_epoch"]
        assert result["evaluation_command"].startswith("capsnet-ext eval results/mnist-long/")
    else:
        assert (root / "results" / plan / "results.json").is_file()
    again = _cli("fold", str(archive), "--root", str(root), "--allow-dry-run")  # idempotent
    assert again.returncode == 0 and (root / doc).read_text() == text


def test_unknown_plan_suggests_the_closest():
    proc = _cli("seed-paper-ful", "--dry-run")
    assert proc.returncode == 2 and "did you mean 'seed-paper-full'" in proc.stderr


def test_the_summary_says_what_limits_the_runs():
    done = [dict(train_share=0.5, gpu=dict(utilisation_pct=40.0)),
            dict(train_share=0.7, gpu=dict(utilisation_pct=50.0))]
    text = gpu_plan.what_limits(done)
    assert "60% of the runs' wall time" in text and "busy 45%" in text and "host" in text
    assert "kernels" in gpu_plan.what_limits([dict(gpu=dict(utilisation_pct=95.0))])
    assert gpu_plan.what_limits([dict()]) is None
