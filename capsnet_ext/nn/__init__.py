"""Capsule network modules."""
from .layers import PrimaryCaps, RoutingCapsules
from .models import (
    BaselineCNN,
    CapsNet,
    CapsNetOutput,
    MODEL_REGISTRY,
    build_model,
    register_model,
)

__all__ = ["PrimaryCaps", "RoutingCapsules", "CapsNet", "CapsNetOutput", "BaselineCNN",
           "MODEL_REGISTRY", "build_model", "register_model"]
