"""The Triton tuning table (capsnet_ext.triton_ops.tuning), its use by the dispatch of the
fused kernels, and the tuning sweep (benchmarks/tune.py) as a dry run, folded into a copy."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from benchmarks import tune  # noqa: E402
from capsnet_ext.triton_ops import _gemm_core, tuning  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _entry(B, I, config, gpu="NVIDIA H200", direction="fwd", dtype="bfloat16",
           precision="ieee", J=10, D=16, Din=8):
    return dict(gpu=gpu, direction=direction, dtype=dtype, precision=precision,
                shape=[B, I, J, D, Din], iterations=3, config=config)


def _config(**changes):
    return dict(_gemm_core.Config(16, 16, 16, 16, 16, 16)._replace(**changes)._asdict())


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    monkeypatch.setenv(tuning.TABLE_ENV, str(path))
    tuning._CACHE.clear()
    yield path
    tuning._CACHE.clear()


def test_committed_table_is_valid():
    table = tuning.read_table(tuning.TABLE_PATH)
    for entry in table["entries"]:
        config = _gemm_core.Config(**entry["config"])
        assert _gemm_core.config_is_valid(config, *entry["shape"])
        assert entry["check"]["passed"], entry  # fold keeps only checked winners
        assert entry["direction"] in tuning.DIRECTIONS


def test_lookup_takes_the_nearest_entry_of_the_same_gpu_dtype_and_padded_sizes(table):
    entries = [_entry(128, 1152, _config(BB=32)), _entry(512, 1152, _config(BB=64)),
               _entry(128, 1152, _config(warps=4), dtype="float32"),
               _entry(128, 1152, _config(warps=8), gpu="NVIDIA H100 80GB HBM3"),
               _entry(128, 1152, _config(max_isplit=4), J=40)]
    tuning.write_table(tuning.merge(tuning.empty_table(), entries)[0], table)
    look = lambda B, I, **kw: tuning.lookup(  # noqa: E731
        kw.get("gpu", "NVIDIA H200"), "fwd", kw.get("dtype", torch.bfloat16), "ieee", B, I,
        kw.get("J", 10), 16, 8)
    assert look(128, 1152)["config"]["BB"] == 32
    assert look(100, 1000)["config"]["BB"] == 32
    assert look(400, 1152)["config"]["BB"] == 64
    assert look(128, 1152, dtype=torch.float32)["config"]["warps"] == 4
    assert look(128, 1152, gpu="NVIDIA H100 80GB HBM3")["config"]["warps"] == 8
    assert look(128, 1152, J=33)["config"]["max_isplit"] == 4  # J=33 and 40 both pad to 64
    assert look(128, 1152, J=9)["config"]["BB"] == 32  # 9 and 10 pad to 16
    assert look(128, 1152, gpu="NVIDIA A100") is None
    assert look(8, 1152) is None and look(128, 64) is None  # beyond 4x of every entry
    assert look(2048, 1152)["config"]["BB"] == 64
    assert look(128, 1152, dtype=torch.float16) is None
    assert tuning.lookup("NVIDIA H200", "bwd", torch.bfloat16, "ieee", 128, 1152, 10, 16,
                         8) is None
    # an entry the shape cannot take is passed over
    assert tuning.lookup("NVIDIA H200", "fwd", torch.bfloat16, "ieee", 128, 1152, 10, 16, 8,
                         valid=lambda c: c["BB"] != 32)["config"]["BB"] == 64


def test_merge_replaces_the_same_key_and_keeps_the_rest():
    first, _, added = tuning.merge(tuning.empty_table(), [_entry(128, 1152, _config(BB=32)),
                                                          _entry(512, 1152, _config(BB=64))])
    assert added == 2
    merged, replaced, added = tuning.merge(first, [_entry(128, 1152, _config(BB=16)),
                                                   _entry(128, 1152, _config(), dtype="float32")])
    assert (replaced, added) == (1, 1)
    assert len(merged["entries"]) == 3
    by = {(e["dtype"], e["shape"][0]): e["config"]["BB"] for e in merged["entries"]}
    assert by == {("bfloat16", 128): 16, ("bfloat16", 512): 64, ("float32", 128): 16}


def test_malformed_table_is_named(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="t.json"):
        tuning.read_table(bad)
    bad.write_text(json.dumps({"version": 99, "entries": []}))
    with pytest.raises(ValueError, match="version"):
        tuning.read_table(bad)
    bad.write_text(json.dumps({"version": 1, "entries": [{"gpu": "x"}]}))
    with pytest.raises(ValueError, match="entry 0"):
        tuning.read_table(bad)


def test_no_table(monkeypatch):
    monkeypatch.setenv(tuning.TABLE_ENV, "none")
    tuning._CACHE.clear()
    assert tuning.table_path() is None
    assert tuning.lookup("NVIDIA H200", "fwd", torch.bfloat16, "ieee", 128, 1152, 10, 16,
                         8) is None
    tuning._CACHE.clear()


def test_config_for_prefers_forced_then_table_then_autotune(table, monkeypatch):
    """The order of :func:`_gemm_core._config_for`, with a CUDA-looking device."""
    tuned = _config(BB=32, warps=8)
    tuning.write_table(tuning.merge(tuning.empty_table(), [_entry(128, 1152, tuned)])[0],
                       table)
    monkeypatch.setattr(_gemm_core, "_TUNED", {})
    monkeypatch.setattr(_gemm_core, "_gpu_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(_gemm_core, "dot_precision", lambda dtype: "ieee")

    class FakeCuda:  # only what _config_for reads
        def __init__(self, *shape, dtype=torch.bfloat16):
            self.shape, self.dtype, self.device = shape, dtype, torch.device("cuda", 0)

    u, W = FakeCuda(128, 1152, 8), FakeCuda(1152, 10, 16, 8)
    timed = []
    monkeypatch.setattr(_gemm_core, "tuned_config",
                        lambda key, cands, run, timer=None: timed.append(key) or cands[0])
    options = ("fwd", False, False, False, 1.0, False)
    assert _gemm_core._config_for(u, W, 3, options, None) == _gemm_core.Config(**tuned)
    assert not timed
    forced = _gemm_core.Config(64, 4, 4, 16, 4, 8)
    with tuning.forced(forced):
        assert _gemm_core._config_for(u, W, 3, options, None) == forced
    # no entry for the backward: the default, through the autotuner
    chosen = _gemm_core._config_for(u, W, 3, ("bwd",) + options[1:], None)
    assert chosen == _gemm_core.default_config(128, 1152, 10, 16, 8, torch.bfloat16, "ieee")
    assert len(timed) == 1


def test_forced_config_drives_the_kernels(device, monkeypatch):
    """Under tuning.forced the launches use the forced tiles and warps (the sweep's lever)."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on the CPU only in the interpreter")
    from capsnet_ext.triton_ops import _gemm_kernels as K

    seen = []
    kernel_class = type(K._fwd_sweep_kernel)
    original = kernel_class.run

    def run(self, *args, **kwargs):
        if self.fn.__name__ == "_fwd_sweep_kernel":
            seen.append((kwargs["BB"], kwargs["num_warps"], kwargs["grid"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", run)
    g = torch.Generator().manual_seed(3)
    u = torch.randn(40, 7, 3, generator=g).to(device)
    W = (torch.randn(7, 3, 5, 3, generator=g) * 0.1).to(device)
    config = _gemm_core.Config(32, 4, 4, 16, 4, 2)
    with tuning.forced(config):
        v, *_ = _gemm_core.routing_forward(u, W, 2, None, None, False, 1.0, False)
    assert seen and all(bb == 32 and warps == 4 and grid[0] == 2 for bb, warps, grid in seen)
    expected = __import__("capsnet_ext").capsule_routing(u.double(), W.double(), 2,
                                                         backend="reference")
    assert torch.allclose(v.double(), expected, atol=1e-5)


@pytest.mark.slow
def test_tune_dry_run_and_fold(tmp_path):
    """The sweep's CPU dry run writes an archive and a summary; fold merges its checked winners
    into a copy of the table and keeps the archive, touching nothing else."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), COMMIT="0" * 40)
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-m", "benchmarks.tune", "--dry-run", "--dtypes",
                          "float32", "--jobs", "2"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    archives = list((tmp_path / "out").glob("tune-dryrun-*.tar.gz"))
    assert len(archives) == 1
    assert list((tmp_path / "out").glob("tune-dryrun-*-summary.md"))
    with tarfile.open(archives[0]) as tar:
        names = tar.getnames()
        data = json.load(tar.extractfile(next(n for n in names if n.endswith("tune.json"))))
    assert data["precompile"]["jobs"] == 4 and not data["precompile"]["errors"]
    directions = sorted(e["direction"] for e in data["entries"])
    assert directions == ["bwd", "fwd"]
    assert all(e["check"]["passed"] and e["gpu"] == "cpu" for e in data["entries"])
    # Two grid candidates, then the grid's winner in the other design and at one other
    # pipelining depth (the backward's grid starts from the forward's winner, either design).
    assert all(len(r["candidates"]) == 4 and "winner" in r for r in data["results"])
    by_direction = {r["direction"]: r for r in data["results"]}
    assert set(by_direction) == {"fwd", "bwd"}
    # The forward grid starts at the default's depth 1; the backward grid at the forward
    # winner's depth (1, or 2 when the forward's second pass won), then the first other depth.
    base_stages = {"fwd": 1, "bwd": by_direction["fwd"]["winner"]["stages"]}
    for direction, r in by_direction.items():
        designs = [c["config"]["design"] for c in r["candidates"]]
        stages = [c["config"]["stages"] for c in r["candidates"]]
        assert designs[0] == designs[1] == designs[3] != designs[2], designs
        base = base_stages[direction]
        other = next(s for s in tune.STAGES if s != base)
        assert stages == [base, base, base, other], (direction, stages)
    table = tmp_path / "table.json"
    table.write_text(json.dumps(tuning.merge(tuning.empty_table(),
                                             [_entry(128, 1152, _config())])[0]))
    results = tmp_path / "results"
    fold = subprocess.run([sys.executable, "-m", "benchmarks.tune", "fold", str(archives[0]),
                           "--table", str(table), "--results", str(results)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert fold.returncode == 0, fold.stderr
    assert "2 entries added, 0 replaced" in fold.stdout
    merged = tuning.read_table(table)["entries"]
    assert len(merged) == 3 and {e["gpu"] for e in merged} == {"cpu", "NVIDIA H200"}
    assert (results / archives[0].name).exists()
    assert sorted(p.name for p in results.iterdir()) == sorted(
        [archives[0].name, archives[0].name.replace(".tar.gz", "-summary.md")])
