"""Fold the archive of a GPU check (``benchmarks/gpu_check.sh``) back into the repository.

    python -m benchmarks.fold_gpu_check runs/gpu-check/gpu-check-20270101T120000Z.tar.gz
    python -m benchmarks.fold_gpu_check ARCHIVE --dry-run     # say what would change, change nothing

What it writes:

* every benchmark JSON of the archive into ``benchmarks/results/`` (and its plots into
  ``benchmarks/results/plots/``), with the commit of the checked tree filled in where the GPU
  machine had no ``.git``;
* the check itself (environment, each step with its time and budget, the verdict per backend)
  as ``benchmarks/results/gpu-check/<device>-<date>.json``;
* ``benchmarks/README.md``, regenerated from those files;
* ``capsnet_ext/cuda_ops/verified.json``: a record for the GPU model **only** when every
  verification step of the CUDA backend passed (install, extension, its GPU tests and every GPU
  test shared by the backends, memcheck, racecheck, initcheck, synccheck, and no wrong result
  in the benchmark's correctness gate) on sources identical to this checkout's. Otherwise the
  failed check is listed under ``failures`` with each failure named, and any earlier record of
  that GPU model is moved to ``revoked``, so the backend stays (or becomes) unavailable there
  and says why.

The verdict is recomputed from the raw files in the archive (:func:`benchmarks.gpu_check.evaluate`),
not read from its summary. A dry-run archive holds no GPU result and is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
from typing import Dict, List, Optional, Sequence

from capsnet_ext._atomic import atomic_write

from . import gpu_check, make_readme

REPO_ROOT = gpu_check.REPO_ROOT
# The committed results that benchmarks/README.md is generated from (not where a plain
# `capsnet-ext bench` run writes by default).
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
VERIFIED = os.path.join(REPO_ROOT, "capsnet_ext", "cuda_ops", "verified.json")


class FoldError(RuntimeError):
    """The archive cannot be folded back (the message says why)."""


def extract(archive: str, into: str) -> str:
    """Extract ``archive`` into ``into`` (plain files and folders only, no path leaving it) and
    return the results folder inside it."""
    if not os.path.isfile(archive):
        raise FoldError(f"archive not found: {archive}")
    try:
        tar = tarfile.open(archive, "r:*")
    except tarfile.TarError as exc:
        raise FoldError(f"{archive} is not a readable tar archive: {exc}") from exc
    with tar:
        members = tar.getmembers()
        for m in members:
            norm = os.path.normpath(m.name)
            if os.path.isabs(m.name) or norm.startswith("..") or not (m.isfile() or m.isdir()):
                raise FoldError(f"{archive}: refusing the member {m.name!r} (absolute, outside the "
                                "folder, or not a plain file)")
        tops = {os.path.normpath(m.name).split(os.sep)[0] for m in members}
        if len(tops) != 1:
            raise FoldError(f"{archive}: expected one results folder, found {sorted(tops)}")
        for m in members:
            target = os.path.join(into, os.path.normpath(m.name))
            if m.isdir():
                os.makedirs(target, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with tar.extractfile(m) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    folder = os.path.join(into, tops.pop())
    for required in ("env.json", "steps.tsv"):
        if not os.path.exists(os.path.join(folder, required)):
            raise FoldError(f"{archive}: the results folder has no {required}; not a GPU check archive")
    return folder


def _slug(text: str) -> str:
    slug = "".join(ch if ch.isalnum() else "-" for ch in text.lower())
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug.strip("-")[:60]


def _write_json(path: str, payload: dict, dry_run: bool, changes: List[str]) -> None:
    text = json.dumps(payload, indent=1, allow_nan=False) + "\n"
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    changes.append(path)
    if not dry_run:
        atomic_write(path, text)


def fold_bench(folder: str, env: dict, verdict: dict, archive_name: str, results_dir: str, dry_run: bool,
               changes: List[str]) -> List[str]:
    """Copy the archive's benchmark JSON (commit filled in) and plots into ``results_dir``."""
    written = []
    bench = os.path.join(folder, "bench")
    for name in sorted(os.listdir(bench)) if os.path.isdir(bench) else []:
        if not name.endswith(".json"):
            continue
        with open(os.path.join(bench, name)) as f:
            payload = json.load(f)
        if not isinstance(payload, dict) or "meta" not in payload or "results" not in payload:
            continue
        meta = payload["meta"]
        if meta.get("device", {}).get("type") != "cuda":
            continue  # a CPU stand-in; never folded as a result
        checked = env.get("commit")
        if checked and env.get("commit_source") != "git" and meta.get("git_commit") != checked:
            # The check was told its commit (COMMIT or .gpu-check-commit); what git found from
            # inside the copy (an enclosing checkout, say) is kept aside, not shown as the commit.
            if meta.get("git_commit"):
                meta["recorded_git_commit"] = meta["git_commit"]
            meta["git_commit"] = checked
            meta["git_dirty"] = env.get("dirty")
        elif not meta.get("git_commit"):
            meta["git_commit"] = checked
            meta["git_dirty"] = env.get("dirty")
        # The check times the CUDA backend before it is verified (CAPSNET_EXT_CUDA_UNVERIFIED=1).
        meta["gpu_check"] = dict(archive=archive_name, commit_source=env.get("commit_source"),
                                 source_digest=env.get("source_digest"),
                                 verified={b: v["verified"] for b, v in verdict["backends"].items()})
        payload.pop("json_path", None)
        payload.pop("plot_paths", None)
        path = os.path.join(results_dir, name)
        _write_json(path, payload, dry_run, changes)
        written.append(path)
    plots = os.path.join(bench, "plots")
    for name in sorted(os.listdir(plots)) if os.path.isdir(plots) else []:
        if name.endswith(".png"):
            dest = os.path.join(results_dir, "plots", name)
            changes.append(dest)
            if not dry_run:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copyfile(os.path.join(plots, name), dest)
    return written


def check_record(verdict: dict, archive_name: str) -> dict:
    """What ``benchmarks/results/gpu-check/`` keeps of one check."""
    env = verdict["env"]
    keep = ("date", "commit", "commit_source", "dirty", "source_digest", "gpu", "nvidia_smi", "torch",
            "torch_cuda", "triton", "nvcc", "compute_sanitizer", "host")
    junit = verdict.get("junit") or {}
    return dict(kind="gpu-check", archive=archive_name, env={k: env.get(k) for k in keep},
                steps=verdict["steps"], backends=verdict["backends"],
                gpu_tests={g: {k: v for k, v in c.items() if k in ("tests", "failed", "errors", "skipped")}
                           for g, c in junit.items()},
                bench_files=verdict["bench_files"])


def update_verification(verdict: dict, archive_name: str, verified_path: str, source_matches: bool,
                        dry_run: bool, changes: List[str]) -> str:
    """Record the CUDA backend's verification (or its failure) in ``verified.json``; returns
    one line saying what was done."""
    env = verdict["env"]
    gpu = env["gpu"]
    cuda = verdict["backends"]["cuda"]
    try:
        with open(verified_path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    records = data.setdefault("records", [])
    entry_key = dict(device=gpu["name"], commit=env.get("commit"), date=env.get("date"))
    failures = list(cuda["failures"])
    if cuda["verified"] and source_matches:
        record = dict(**entry_key, capability=gpu.get("capability"), torch=env.get("torch"),
                      cuda=env.get("torch_cuda"), triton=env.get("triton"), driver=env.get("nvidia_smi"),
                      source_digest=env.get("source_digest"), archive=archive_name,
                      checks=[s["step"] for s in verdict["steps"]
                              if s["step"] in gpu_check.VERIFICATION_STEPS["cuda"] and s["status"] == "pass"])
        if any(all(r.get(k) == v for k, v in entry_key.items()) for r in records):
            return f"verified.json already holds the record of {gpu['name']} at {env.get('date')}"
        records.append(record)
        message = (f"CUDA backend VERIFIED on {gpu['name']}: record "
                   f"{'to be added' if dry_run else 'added'} to {verified_path}")
    elif cuda["verified"]:
        return ("CUDA backend passed every step, but on sources that differ from this checkout "
                f"(digest {str(env.get('source_digest'))[:16]} there, {gpu_check.source_digest()[:16]} here): "
                "no record written; check out the commit that was checked, or rerun the check "
                "(--allow-source-mismatch overrides)")
    else:
        fails = data.setdefault("failures", [])
        if any(all(r.get(k) == v for k, v in entry_key.items()) for r in fails):
            return f"verified.json already lists the failed check of {gpu['name']} at {env.get('date')}"
        fails.append(dict(**entry_key, archive=archive_name, failures=failures))
        revoked = [r for r in records if r.get("device") == gpu["name"] and str(r.get("date", "")) <= str(env.get("date"))]
        if revoked:
            data["records"] = [r for r in records if r not in revoked]
            data.setdefault("revoked", []).extend(
                dict(r, revoked_by=dict(date=env.get("date"), commit=env.get("commit"))) for r in revoked)
        message = (f"CUDA backend NOT verified on {gpu['name']}"
                   + (f" ({len(revoked)} earlier record(s) revoked)" if revoked else "")
                   + ": " + "; ".join(failures[:4]))
    changes.append(verified_path)
    if not dry_run:
        atomic_write(verified_path, json.dumps(data, indent=2) + "\n")
    return message


def fold(archive: str, *, results_dir: str = RESULTS_DIR, verified_path: str = VERIFIED,
         readme: str = make_readme.README, dry_run: bool = False,
         allow_source_mismatch: bool = False, log=print) -> Dict[str, object]:
    """Fold ``archive`` back; returns the verdict, the files changed and what was decided."""
    archive_name = os.path.basename(archive)
    with tempfile.TemporaryDirectory(prefix="fold-gpu-check-") as tmp:
        folder = extract(archive, tmp)
        verdict = gpu_check.evaluate(folder)
        env = verdict["env"]
        if verdict["dry_run"]:
            raise FoldError(f"{archive_name} is a dry run: it holds no GPU result, nothing to fold")
        if not env.get("gpu"):
            raise FoldError(f"{archive_name}: no GPU was visible to torch in that run ({env.get('torch')}); "
                            "nothing to fold")
        local_digest = gpu_check.source_digest()
        source_matches = env.get("source_digest") == local_digest or allow_source_mismatch
        if env.get("source_digest") != local_digest:
            log(f"warning: the checked sources (digest {str(env.get('source_digest'))[:16]}, commit "
                f"{env.get('commit')}) differ from this checkout's ({local_digest[:16]})")
        changes: List[str] = []
        if not dry_run:
            os.makedirs(results_dir, exist_ok=True)
        fold_bench(folder, env, verdict, archive_name, results_dir, dry_run, changes)
        stamp = str(env.get("date", "")).replace("-", "").replace(":", "")[:15]
        record_path = os.path.join(results_dir, "gpu-check", f"{_slug(env['gpu']['name'])}-{stamp}.json")
        if not dry_run:
            os.makedirs(os.path.dirname(record_path), exist_ok=True)
        _write_json(record_path, check_record(verdict, archive_name), dry_run, changes)
        decision = update_verification(verdict, archive_name, verified_path, source_matches, dry_run, changes)
        if not dry_run:
            make_readme.main(["--results-dir", results_dir, "--output", readme])
        changes.append(readme)
    log(decision)
    triton = verdict["backends"]["triton"]
    log("Triton backend: " + ("passed every GPU step" if triton["verified"] else
                              "FAILED: " + "; ".join(triton["failures"][:4])))
    log(("would change" if dry_run else "changed") + ":\n  " + "\n  ".join(sorted(set(changes))))
    return dict(verdict=verdict, changes=sorted(set(changes)), decision=decision)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fold_gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archive", help="the .tar.gz that benchmarks/gpu_check.sh left in $OUT")
    p.add_argument("--results-dir", default=RESULTS_DIR)
    p.add_argument("--verified", default=VERIFIED, help="the CUDA backend's verification records")
    p.add_argument("--readme", default=make_readme.README)
    p.add_argument("--dry-run", action="store_true", help="say what would change; change nothing")
    p.add_argument("--allow-source-mismatch", action="store_true",
                   help="write the verification record even if the checked sources differ from this checkout")
    args = p.parse_args(argv)
    try:
        fold(args.archive, results_dir=args.results_dir, verified_path=args.verified, readme=args.readme,
             dry_run=args.dry_run, allow_source_mismatch=args.allow_source_mismatch)
    except FoldError as exc:
        print(f"fold_gpu_check: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
