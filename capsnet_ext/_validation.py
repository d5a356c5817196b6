"""Input checks shared by every backend.

Each public op validates its arguments here, before dispatch, so every backend sees the same
clear errors and nothing reaches a kernel unchecked. Messages name the argument, what was
expected and what was given.
"""
from __future__ import annotations

from typing import Optional

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(name: str, x, rank: Optional[int] = None, layout: str = "") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype}"
        )
    if rank is not None and x.dim() != rank:
        raise ValueError(
            f"{name} must have {rank} dimensions{' ' + layout if layout else ''}, "
            f"got shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def check_same_device_dtype(ref_name: str, ref: torch.Tensor, name: str, x: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(
            f"{name} is on {x.device} but {ref_name} is on {ref.device}; "
            "all inputs must be on the same device"
        )
    if x.dtype != ref.dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but {ref_name} has dtype {ref.dtype}; "
            "all inputs must have the same dtype"
        )


def check_predict_inputs(u, W) -> None:
    check_float_tensor("u", u, 3, "[B, I, Din]")
    check_float_tensor("W", W, 4, "[I, J, Dout, Din]")
    check_same_device_dtype("u", u, "W", W)
    if W.shape[0] != u.shape[1]:
        raise ValueError(
            f"W has {W.shape[0]} input capsules (W.shape[0]) but u has {u.shape[1]} (u.shape[1]); "
            f"expected W of shape [{u.shape[1]}, J, Dout, {u.shape[2]}], got {tuple(W.shape)}"
        )
    if W.shape[3] != u.shape[2]:
        raise ValueError(
            f"W has input dimension {W.shape[3]} (W.shape[3]) but u has {u.shape[2]} (u.shape[2]); "
            f"expected W of shape [{u.shape[1]}, J, Dout, {u.shape[2]}], got {tuple(W.shape)}"
        )


def check_routing_options(iterations, bias, J: int, D: int, ref_name: str, ref: torch.Tensor,
                          prior=None, temperature=1.0, I: Optional[int] = None) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise TypeError(f"iterations must be an int, got {type(iterations).__name__}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if bias is not None:
        check_float_tensor("bias", bias, 2, "[J, Dout]")
        if tuple(bias.shape) != (J, D):
            raise ValueError(f"bias must have shape [J, Dout] = [{J}, {D}], got {tuple(bias.shape)}")
        check_same_device_dtype(ref_name, ref, "bias", bias)
    if prior is not None:
        check_float_tensor("prior", prior, 2, "[I, J]")
        if tuple(prior.shape) != (I, J):
            raise ValueError(f"prior must have shape [I, J] = [{I}, {J}], got {tuple(prior.shape)}")
        check_same_device_dtype(ref_name, ref, "prior", prior)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (0.0 < float(temperature) < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")


def check_routing_inputs(u_hat, iterations, bias, prior=None, temperature=1.0) -> None:
    check_float_tensor("u_hat", u_hat, 4, "[B, I, J, Dout]")
    check_routing_options(iterations, bias, u_hat.shape[2], u_hat.shape[3], "u_hat", u_hat,
                          prior, temperature, I=u_hat.shape[1])


def check_capsule_routing_inputs(u, W, iterations, bias, prior=None, temperature=1.0) -> None:
    check_predict_inputs(u, W)
    check_routing_options(iterations, bias, W.shape[1], W.shape[2], "u", u,
                          prior, temperature, I=W.shape[0])
