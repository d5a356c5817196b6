"""Test configuration shared by every test module.

Without a GPU, Triton kernels run in Triton's CPU interpreter, which must be switched on
before triton is first imported: that happens here, before any test module is collected.
"""
import os
import pathlib
import re

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Local runs find the shared data beside the project the way CI does.
_shared = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "CAPSNET_DATA" not in os.environ and _shared.is_dir():
    os.environ["CAPSNET_DATA"] = str(_shared)

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device present: the CPU always, CUDA when a GPU is there."""
    return torch.device(request.param)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on a CUDA GPU (selected by `pytest -m gpu`, as "
                            "benchmarks/gpu_check.sh does; marked here for every test that takes a "
                            "CUDA device as a parameter or skips without a GPU)")
    config.addinivalue_line("markers", "slow: longer-running test (still part of CI)")


_GPU_WORDS = re.compile(r"\b(cuda|gpu)\b", re.IGNORECASE)


def _is_cuda_device(name: str, value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    # Strings count only as a device parameter ("cuda" is also a backend name).
    return ("device" in name and isinstance(value, str)
            and (value == "cuda" or value.startswith("cuda:")))


def _skips_without_gpu(mark, gpu_available: bool) -> bool:
    """A ``skipif`` that skips exactly when there is no GPU (its condition is ``not
    torch.cuda.is_available()`` or alike) and says so in its reason."""
    condition = mark.args[0] if mark.args else mark.kwargs.get("condition")
    return (isinstance(condition, bool) and condition == (not gpu_available)
            and bool(_GPU_WORDS.search(str(mark.kwargs.get("reason", "")))))


def runs_on_gpu(params: dict, markers, gpu_available: bool = torch.cuda.is_available()) -> bool:
    """Whether a test runs on a GPU: marked ``gpu`` already, parametrized with a CUDA device
    (a ``torch.device``, or ``"cuda"`` in a parameter named like ``device``, e.g. the
    ``device`` fixture's), or skipped exactly when no GPU is there, by a ``skipif`` whose
    reason names CUDA or a GPU (a test that exists only for the GPU)."""
    if any(_is_cuda_device(k, v) for k, v in params.items()):
        return True
    for mark in markers:
        if mark.name == "gpu":
            return True
        if mark.name == "skipif" and _skips_without_gpu(mark, gpu_available):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    """Mark the GPU tests centrally, so `pytest -m gpu` selects every backend's GPU tests
    without each test file keeping its own list."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if runs_on_gpu(callspec.params if callspec else {}, list(item.iter_markers())):
            item.add_marker(pytest.mark.gpu)
