"""Test configuration shared by every test module.

Without a GPU, Triton kernels run in Triton's CPU interpreter, which must be switched on
before triton is first imported: that happens here, before any test module is collected.
"""
import os
import pathlib

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
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    config.addinivalue_line("markers", "slow: longer-running test (still part of CI)")
