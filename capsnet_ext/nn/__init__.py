"""Capsule network modules.

* :class:`PrimaryCaps`: convolutional capsules.
* :class:`RoutingCapsules`: a fully connected capsule layer with dynamic routing (the module
  form of :func:`capsnet_ext.capsule_routing`, with its ``backend`` choice).
* :class:`CapsNet` (Sabour, Frosst & Hinton 2017, with the reconstruction decoder),
  :class:`DeepCapsNet` (several routing layers), :class:`MitterreiterCapsNet` (Mitterreiter
  et al., AAAI 2023) and the paper's :class:`BaselineCNN`. The capsule models return a
  :class:`CapsNetOutput`.
* :func:`build_model` / :func:`register_model` / ``MODEL_REGISTRY``: models from plain
  ``{"arch": name, **kwargs}`` configs, as checkpoints store them.
"""
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
