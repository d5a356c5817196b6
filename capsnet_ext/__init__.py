"""capsnet_ext: fast capsule networks with dynamic routing for PyTorch.

Public API::

    squash, predict, dynamic_routing, capsule_routing   # ops, each with backend=...
    margin_loss, reconstruction_loss                    # losses of the CapsNet paper
    available_backends, backend_status, unavailable_reason
    capsnet_ext.nn: PrimaryCaps, RoutingCapsules, CapsNet, BaselineCNN
"""
from .dispatch import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend_status,
    unavailable_reason,
)
from .losses import margin_loss, reconstruction_loss
from .ops import capsule_routing, dynamic_routing, predict, squash

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "backend_status",
    "unavailable_reason",
    "squash",
    "predict",
    "dynamic_routing",
    "capsule_routing",
    "margin_loss",
    "reconstruction_loss",
]
