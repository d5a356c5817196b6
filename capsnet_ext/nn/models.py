"""Models of the CapsNet paper: ``CapsNet`` (with reconstruction decoder) and the baseline CNN.

``build_model(config)`` builds any registered model from a plain dict (``{"arch": name,
**kwargs}``), which is what checkpoints store, so a checkpoint can be rebuilt without code.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

import torch
from torch import nn

from ..losses import one_hot_targets
from .layers import PrimaryCaps, RoutingCapsules


class CapsNetOutput(NamedTuple):
    lengths: torch.Tensor                   # [B, num_classes] capsule lengths (class scores)
    capsules: torch.Tensor                  # [B, num_classes, digit_dim]
    reconstructions: Optional[torch.Tensor]  # [B, in_channels * H * W] in [0, 1], or None
    couplings: Optional[torch.Tensor]       # [B, I, num_classes] if requested, else None


def reconstruction_decoder(in_features: int, hidden, out_features: int) -> nn.Sequential:
    """The CapsNet decoder: fully connected ReLU layers of the ``hidden`` widths (the paper:
    512, 1024), then ``out_features`` sigmoid pixels."""
    layers, width = [], in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
        width = size
    layers += [nn.Linear(width, out_features), nn.Sigmoid()]
    return nn.Sequential(*layers)


def capsule_output(model: nn.Module, capsules: torch.Tensor, couplings,
                   targets: Optional[torch.Tensor]) -> CapsNetOutput:
    """Lengths and masked reconstructions of class capsules ``[B, num_classes, D]``: the
    decoder of ``model`` (``model.decoder``, ``model.reconstruct``) sees the capsules of the
    ``targets`` when given (training), otherwise the longest capsule alone."""
    lengths = capsules.norm(dim=-1)
    reconstructions = None
    if model.decoder is not None:
        if targets is None:
            mask = torch.nn.functional.one_hot(lengths.argmax(dim=1), model.num_classes)
        else:
            mask = one_hot_targets(targets, model.num_classes, capsules.dtype)
        reconstructions = model.reconstruct(capsules, mask.to(capsules.dtype))
    return CapsNetOutput(lengths, capsules, reconstructions, couplings)


class CapsNet(nn.Module):
    """CapsNet of Sabour, Frosst & Hinton (2017).

    conv1 (``conv_channels`` kernels ``conv_kernel x conv_kernel``, ReLU) -> PrimaryCaps
    (``primary_channels`` channels of ``primary_dim``-D capsules, 9x9 stride 2) -> DigitCaps
    (``num_classes`` capsules of ``digit_dim`` dimensions, dynamic routing) -> decoder
    (FC 512 ReLU -> 1024 ReLU -> ``in_channels * input_size**2`` sigmoid).

    The decoder sees the digit capsules masked to one class (or several, for multi-hot
    targets): the true labels when ``targets`` are passed to ``forward`` (training), otherwise
    the longest capsule.
    """

    def __init__(self, input_size: int = 28, in_channels: int = 1, num_classes: int = 10,
                 conv_channels: int = 256, conv_kernel: int = 9, primary_channels: int = 32,
                 primary_dim: int = 8, primary_kernel: int = 9, digit_dim: int = 16,
                 iterations: int = 3, routing_bias: bool = True, leaky: bool = False,
                 detach_inner: bool = False, backend: str = "auto", decoder: bool = True,
                 decoder_hidden=(512, 1024)):
        super().__init__()
        self.config = dict(arch="capsnet", input_size=input_size, in_channels=in_channels,
                           num_classes=num_classes, conv_channels=conv_channels,
                           conv_kernel=conv_kernel, primary_channels=primary_channels,
                           primary_dim=primary_dim, primary_kernel=primary_kernel,
                           digit_dim=digit_dim, iterations=iterations, routing_bias=routing_bias,
                           leaky=leaky, detach_inner=detach_inner, backend=backend,
                           decoder=decoder, decoder_hidden=list(decoder_hidden))
        feature_size = input_size - conv_kernel + 1
        if feature_size < primary_kernel:
            raise ValueError(f"input_size {input_size} is too small for conv_kernel {conv_kernel} "
                             f"followed by primary_kernel {primary_kernel}")
        self.conv1 = nn.Conv2d(in_channels, conv_channels, conv_kernel)
        self.primary = PrimaryCaps(conv_channels, primary_channels, primary_dim, primary_kernel, stride=2)
        self.num_primary = self.primary.num_capsules(feature_size, feature_size)
        self.digits = RoutingCapsules(self.num_primary, num_classes, primary_dim, digit_dim,
                                      iterations=iterations, bias=routing_bias, leaky=leaky,
                                      detach_inner=detach_inner, backend=backend)
        self.num_classes = num_classes
        self.image_numel = in_channels * input_size * input_size
        self.decoder = None
        if decoder:
            self.decoder = reconstruction_decoder(num_classes * digit_dim, decoder_hidden, self.image_numel)

    def primary_capsules(self, x: torch.Tensor) -> torch.Tensor:
        return self.primary(torch.relu(self.conv1(x)))

    def reconstruct(self, capsules: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decode ``capsules [B, J, D]`` masked by ``mask [B, J]`` (0/1)."""
        if self.decoder is None:
            raise RuntimeError("this CapsNet was built with decoder=False")
        return self.decoder((capsules * mask.unsqueeze(-1)).flatten(1))

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None,
                return_coupling: bool = False) -> CapsNetOutput:
        """Args:
            x: images ``[B, in_channels, input_size, input_size]``.
            targets: class indices ``[B]`` or multi-hot ``[B, num_classes]``; when given, the
                decoder is masked by them, otherwise by the longest capsule.
            return_coupling: also return the DigitCaps couplings.
        """
        routed = self.digits(self.primary_capsules(x), return_coupling=return_coupling)
        capsules, couplings = routed if return_coupling else (routed, None)
        return capsule_output(self, capsules, couplings, targets)


class BaselineCNN(nn.Module):
    """The paper's baseline: three 5x5 stride-1 convolutions of 256, 256 and 128 channels,
    fully connected layers of 328 and 192, dropout, and a ``num_classes`` output (logits;
    train with cross-entropy).

    The convolutions use 'same' padding and the first two are followed by 2x2 max pooling,
    as in the official baseline code, so the fully connected layers stay small.
    """

    def __init__(self, input_size: int = 28, in_channels: int = 1, num_classes: int = 10,
                 dropout: float = 0.5):
        super().__init__()
        self.config = dict(arch="baseline-cnn", input_size=input_size, in_channels=in_channels,
                           num_classes=num_classes, dropout=dropout)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 256, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(256, 256, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(256, 128, 5, padding=2), nn.ReLU(inplace=True),
        )
        side = input_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * side * side, 328), nn.ReLU(inplace=True),
            nn.Linear(328, 192), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(192, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODEL_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "capsnet": CapsNet,
    "baseline-cnn": BaselineCNN,
}


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``build_model({"arch": name, ...})`` call ``builder(**kwargs)``."""
    MODEL_REGISTRY[name] = builder


def build_model(config: dict) -> nn.Module:
    """Build a model from ``{"arch": name, **kwargs}`` (the ``config`` attribute of every
    model here, and what checkpoints store)."""
    if "arch" not in config:
        raise ValueError(f"model config needs an 'arch' key (one of {sorted(MODEL_REGISTRY)})")
    kwargs = dict(config)
    arch = kwargs.pop("arch")
    if arch not in MODEL_REGISTRY:
        raise ValueError(f"unknown model arch {arch!r}; expected one of {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[arch](**kwargs)
