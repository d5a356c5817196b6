#!/usr/bin/env python
"""Launch or resume every run of the Mitterreiter et al. reproduction (``seed-paper`` presets)
and collect each finished run, in priority order, a few at a time, on the CPU.

Plan (one job per run folder ``<root>/h<H>-r<R>/seed<S>-e<E>-n<N>``):

1. ``seed-paper`` (1 hidden layer of 16 capsules, 4 routing iterations) for every seed;
2. the depth study (``seed-paper-depth-h<H>-r<R>``: 1..5 hidden layers, 1 or 4 iterations),
   seed by seed, depths in the order 1, 5, 3, 2, 4, so that a cut-short plan still spans the
   range for the first seed. With the same budget as the main runs (``--depth-epochs``,
   ``--depth-train-limit``) the 1-hidden-layer, 4-iteration configuration is the ``seed-paper``
   run itself; with a smaller one it is trained again at that budget.

A run folder whose ``<run>.plan.pid`` (beside it) names a live process is being trained by another driver: this
one waits for it (counting it among the ``--parallel`` jobs), then collects or resumes it.

A job whose ``metrics.json`` says it finished is only collected; one with a checkpoint is
resumed (``capsnet-ext train --resume``); others start fresh. After training, the job runs
``capsnet-ext analyze seed-paper collect`` on its folder. At ``--deadline`` (UTC) running jobs
get SIGTERM (the trainer saves ``last.pt`` and stops; a later call resumes them) and no new job
starts. Training runs with one thread per job (``--threads``); start the driver under
``nice -n 19`` on a shared machine. ``--report DIR`` writes the report of every collected run
at the end.

Example::

    nohup nice -n 19 python results/seed-paper/run_plan.py --root /work/runs/seed-paper \\
        --train-limit 6400 --epochs 5 --parallel 2 --deadline 23:55 > plan.log 2>&1 &
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the package of this checkout, installed or not

from capsnet_ext.gpu_plan import depth_order  # noqa: E402 - the GPU plan's order, shared


def jobs(args):
    main_budget = (args.epochs, args.train_limit)
    depth_budget = (args.depth_epochs or args.epochs, args.depth_train_limit or args.train_limit)
    plan = [] if args.depth_only else [(1, 4, seed, main_budget) for seed in args.seeds]
    if not args.main_only:
        for seed in args.depth_seeds or args.seeds:
            for hidden in depth_order(args.depths):
                for iterations in sorted(args.iterations, reverse=True):
                    if (hidden, iterations) != (1, 4) or depth_budget != main_budget:
                        plan.append((hidden, iterations, seed, depth_budget))
    for hidden, iterations, seed, (epochs, limit) in plan:
        name = f"seed{seed}-e{epochs}-" + (f"n{limit}" if limit else "nall")
        yield dict(hidden=hidden, iterations=iterations, seed=seed, epochs=epochs, train_limit=limit,
                   run=args.root / f"h{hidden}-r{iterations}" / name)


def finished(run: pathlib.Path) -> bool:
    path = run / "metrics.json"
    if not path.is_file():
        return False
    metrics = json.loads(path.read_text())
    return metrics.get("interrupted") is None


def train_command(args, job) -> list:
    base = [sys.executable, "-m", "capsnet_ext.cli", "train"]
    run = job["run"]
    if (run / "checkpoints" / "last.pt").is_file():
        return base + ["--resume", str(run), "--no-progress", "--no-tensorboard", "--device", args.device]
    command = base + ["--preset", f"seed-paper-depth-h{job['hidden']}-r{job['iterations']}",
                      "--seed", str(job["seed"]), "--out", str(run), "--epochs", str(job["epochs"]),
                      "--device", args.device, "--no-progress", "--no-tensorboard",
                      "--set", f"eval_limit={args.eval_limit}"]
    for item in args.set:
        command += ["--set", item]
    if job["train_limit"]:
        command += ["--train-limit", str(job["train_limit"])]
    return command


def collect_command(args, job) -> list:
    command = [sys.executable, "-m", "capsnet_ext.cli", "analyze", "seed-paper", "collect", str(job["run"]),
               "--device", args.device]
    if args.collect_limit:
        command += ["--limit", str(args.collect_limit)]
    return command


def deadline_of(text: str) -> datetime.datetime:
    now = datetime.datetime.now(datetime.timezone.utc)
    if len(text) <= 5:  # HH:MM today (UTC)
        hour, minute = map(int, text.split(":"))
        return now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return datetime.datetime.fromisoformat(text).astimezone(datetime.timezone.utc)


def pid_file(run: pathlib.Path) -> pathlib.Path:
    """Beside the run folder, not in it: the trainer refuses a non-empty folder it has not written."""
    return run.with_name(run.name + ".plan.pid")


def lock_holder(run: pathlib.Path):
    """The pid of a live process training ``run`` (from its ``plan.pid``), else None."""
    path = pid_file(run)
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def log(message: str) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=pathlib.Path, default=pathlib.Path("runs/seed-paper"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="hidden layers")
    p.add_argument("--iterations", type=int, nargs="+", default=[1, 4])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-limit", type=int, default=None, help="first N training images (default: all)")
    p.add_argument("--depth-epochs", type=int, default=None, help="epochs of the depth study (default --epochs)")
    p.add_argument("--depth-train-limit", type=int, default=None, help="default --train-limit")
    p.add_argument("--depth-seeds", type=int, nargs="+", default=None, help="default --seeds")
    p.add_argument("--eval-limit", type=int, default=1000, help="test images evaluated after each epoch")
    p.add_argument("--collect-limit", type=int, default=None, help="test images per set when collecting")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--device", default="cpu", help="device of training and collection (cpu, cuda, ...)")
    p.add_argument("--threads", type=int, default=1, help="threads per training process")
    p.add_argument("--deadline", default=None, help="UTC HH:MM or ISO time: stop (resumably) at this time")
    p.add_argument("--main-only", action="store_true", help="only the seed-paper runs, no depth study")
    p.add_argument("--depth-only", action="store_true", help="only the depth study, no seed-paper runs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to every new run's 'capsnet-ext train --set' (e.g. model.init=trunc_normal "
                        "model.init_std=auto, with another --root)")
    p.add_argument("--code", type=pathlib.Path, default=REPO, help="folder whose capsnet_ext is run")
    p.add_argument("--report", type=pathlib.Path, default=None, help="write the report here at the end")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    args.root = args.root.resolve()
    if args.main_only and args.depth_only:
        p.error("--main-only and --depth-only exclude each other")
    deadline = deadline_of(args.deadline) if args.deadline else None
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(args.code.resolve()))
    queue = list(jobs(args))
    log(f"{len(queue)} jobs, code {args.code}, deadline {deadline}")
    if args.dry_run:
        for job in queue:
            print(" ".join(train_command(args, job)))
        return 0
    running = {}   # run folder -> (Popen, job, stage)
    stopping = False

    def launch(job, stage):
        command = train_command(args, job) if stage == "train" else collect_command(args, job)
        job["run"].parent.mkdir(parents=True, exist_ok=True)
        logfile = open(job["run"].with_name(f"{job['run'].name}.{stage}.log"), "a")
        log(f"start {stage} {job['run']}: {' '.join(command)}")
        process = subprocess.Popen(command, cwd=str(args.code), env=env, stdout=logfile, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        pid_file(job["run"]).write_text(f"{process.pid}\n")
        running[job["run"]] = (process, job, stage, logfile)

    elsewhere = []   # jobs whose run folder another live process is training (plan.pid)
    while queue or running or elsewhere:
        now = datetime.datetime.now(datetime.timezone.utc)
        if deadline is not None and now >= deadline and not stopping:
            stopping = True
            log("deadline reached: stopping running jobs (resumable)")
            for process, job, stage, _ in running.values():
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)
            queue, elsewhere = [], []
        for run, (process, job, stage, logfile) in list(running.items()):
            code = process.poll()
            if code is None:
                continue
            logfile.close()
            del running[run]
            pid_file(run).unlink(missing_ok=True)
            log(f"{stage} {run} exited {code}")
            if stage == "train" and code == 0 and finished(run) and not stopping:
                launch(job, "collect")
        for job in list(elsewhere):
            if lock_holder(job["run"]) is None:
                elsewhere.remove(job)
                if not stopping:
                    queue.insert(0, job)
        while queue and len(running) + len(elsewhere) < args.parallel and not stopping:
            job = queue.pop(0)
            if lock_holder(job["run"]) is not None:
                log(f"{job['run']} is being trained by pid {lock_holder(job['run'])}: waiting for it")
                elsewhere.append(job)
                continue
            if finished(job["run"]):
                if not (job["run"] / "collected" / "seed_paper.json").is_file():
                    launch(job, "collect")
                continue
            launch(job, "train")
        time.sleep(5)
    if args.report is not None:
        command = [sys.executable, "-m", "capsnet_ext.cli", "analyze", "seed-paper", "report", str(args.root),
                   "--out", str(args.report)]
        log(f"report: {' '.join(command)}")
        subprocess.run(command, cwd=str(args.code), env=env)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
