"""``predict`` on the CUDA backend: ``u_hat [B, I, J, Dout] = W [I, J, Dout, Din] @ u [B, I, Din]``.

Kernels: ``csrc/predict.cu`` (forward, ``du`` and ``dW``, one thread per output element,
float32/float64 accumulation). Autograd and the fake implementation: :mod:`._schema`.
"""
from __future__ import annotations

import torch


def predict_with(ops, u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return ops.predict(u, W)


def predict(u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``u [B, I, Din]``, ``W [I, J, Dout, Din]`` -> ``u_hat [B, I, J, Dout]``."""
    return predict_with(torch.ops.capsnet_ext, u, W)
