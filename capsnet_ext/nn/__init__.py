"""Capsule network modules."""
from .layers import PrimaryCaps, RoutingCapsules
from .deep import DeepCapsNet
from .mitterreiter import MitterreiterCapsNet
from .models import (
    BaselineCNN,
    CapsNet,
    CapsNetOutput,
    MODEL_REGISTRY,
    build_model,
    register_model,
)

__all__ = ["PrimaryCaps", "RoutingCapsules", "CapsNet", "CapsNetOutput", "BaselineCNN", "DeepCapsNet", "MitterreiterCapsNet",
           "MODEL_REGISTRY", "build_model", "register_model"]
