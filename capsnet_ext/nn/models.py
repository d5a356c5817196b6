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
    """What the capsule models' ``forward`` returns (a named tuple).

    Attributes:
        lengths (Tensor): ``[B, num_classes]`` lengths of the class capsules, in ``[0, 1)``:
            the class scores (``lengths.argmax(1)`` is the prediction; the input of
            :func:`capsnet_ext.margin_loss`).
        capsules (Tensor): ``[B, num_classes, D]`` the class capsules themselves.
        reconstructions (Tensor or None): ``[B, in_channels * H * W]`` decoder output in
            ``[0, 1]`` (for :func:`capsnet_ext.reconstruction_loss`), or ``None`` when the model
            has no decoder.
        couplings (Tensor, tuple or None): the routing couplings when ``return_coupling=True``
            (``[B, I, num_classes]``; for the stacked models a tuple with one ``[B, I_k, J_k]``
            tensor per routing layer), else ``None``.
    """

    lengths: torch.Tensor                   # [B, num_classes] capsule lengths (class scores)
    capsules: torch.Tensor                  # [B, num_classes, digit_dim]
    reconstructions: Optional[torch.Tensor]  # [B, in_channels * H * W] in [0, 1], or None
    couplings: Optional[torch.Tensor]       # [B, I, num_classes] if requested, else None


def reconstruction_decoder(in_features: int, hidden, out_features: int) -> nn.Sequential:
    """The CapsNet decoder: fully connected ReLU layers of the ``hidden`` widths (the paper:
    512, 1024), then ``out_features`` sigmoid pixels.

    Args:
        in_features (int): width of the flattened masked capsules (``num_classes * D``).
        hidden (sequence of int): widths of the hidden ReLU layers.
        out_features (int): number of pixels (``in_channels * H * W``).

    Returns:
        nn.Sequential: ``[B, in_features] -> [B, out_features]`` in ``[0, 1]``.
    """
    layers, width = [], in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
        width = size
    layers += [nn.Linear(width, out_features), nn.Sigmoid()]
    return nn.Sequential(*layers)


def check_primary_capsules(model: nn.Module, x: torch.Tensor, u: torch.Tensor) -> None:
    """Raise a ``ValueError`` naming the images ``x`` and the model's ``input_size`` when the
    primary capsules ``u`` computed from ``x`` are not as many as the first routing layer
    expects (otherwise that layer would report its own ``in_caps``, which the user never
    passed)."""
    if u.dim() == 3 and u.shape[1] != model.num_primary:
        config = model.config
        raise ValueError(
            f"{type(model).__name__}(input_size={config['input_size']}, in_channels="
            f"{config['in_channels']}) expects images x of shape [B, {config['in_channels']}, "
            f"{config['input_size']}, {config['input_size']}], got {tuple(x.shape)}, which gives "
            f"{u.shape[1]} primary capsules instead of {model.num_primary}; build the model with "
            f"the input_size of your images")


def capsule_output(model: nn.Module, capsules: torch.Tensor, couplings,
                   targets: Optional[torch.Tensor]) -> CapsNetOutput:
    """Lengths and masked reconstructions of class capsules ``[B, num_classes, D]``: the
    decoder of ``model`` (``model.decoder``, ``model.reconstruct``) sees the capsules of the
    ``targets`` when given (training), otherwise the longest capsule alone.

    Args:
        model (nn.Module): a capsule model with ``decoder`` (or ``None``), ``num_classes`` and
            ``reconstruct(capsules, mask)``.
        capsules (Tensor): class capsules ``[B, num_classes, D]``.
        couplings: passed through to the result.
        targets (Tensor, optional): class indices ``[B]`` or multi-hot ``[B, num_classes]``.

    Returns:
        CapsNetOutput: lengths, capsules, reconstructions (``None`` without a decoder) and
        ``couplings``.
    """
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
    (``primary_channels`` channels of ``primary_dim``-D capsules, ``primary_kernel`` kernels,
    stride 2) -> DigitCaps (``num_classes`` capsules of ``digit_dim`` dimensions, dynamic
    routing: a :class:`RoutingCapsules` layer) -> decoder (FC 512 ReLU -> 1024 ReLU ->
    ``in_channels * input_size**2`` sigmoid).

    The decoder sees the digit capsules masked to one class (or several, for multi-hot
    targets): the true labels when ``targets`` are passed to ``forward`` (training), otherwise
    the longest capsule.

    Args:
        input_size (int, optional): height and width of the square input images.
            Default: ``28``.
        in_channels (int, optional): image channels. Default: ``1``.
        num_classes (int, optional): number of classes, i.e. of digit capsules. Default: ``10``.
        conv_channels (int, optional): channels of conv1. Default: ``256``.
        conv_kernel (int, optional): kernel size of conv1 (stride 1, no padding).
            Default: ``9``.
        primary_channels (int, optional): capsule channels of PrimaryCaps. Default: ``32``.
        primary_dim (int, optional): dimension of the primary capsules. Default: ``8``.
        primary_kernel (int, optional): kernel size of PrimaryCaps (stride 2). Default: ``9``.
        digit_dim (int, optional): dimension of the digit (class) capsules. Default: ``16``.
        iterations (int, optional): routing iterations of DigitCaps. Default: ``3``.
        routing_bias (bool, optional): learn DigitCaps' routing bias. Default: ``True``.
        leaky (bool, optional): "none of the above" routing in DigitCaps. Default: ``False``.
        detach_inner (bool, optional): gradient only through the last routing iteration.
            Default: ``False``.
        backend (str, optional): routing backend of DigitCaps: ``"auto"``, ``"reference"``,
            ``"triton"`` or ``"cuda"`` (see :func:`capsnet_ext.capsule_routing`).
            Default: ``"auto"``.
        decoder (bool, optional): build the reconstruction decoder. Default: ``True``.
        decoder_hidden (sequence of int, optional): hidden widths of the decoder.
            Default: ``(512, 1024)``.

    Attributes:
        config (dict): the constructor arguments with ``arch="capsnet"``, what checkpoints
            store; :func:`build_model` rebuilds the model from it.
        num_primary (int): the number of primary capsules (1152 at the MNIST defaults).

    Raises:
        ValueError: ``input_size`` is too small for ``conv_kernel`` followed by
            ``primary_kernel``, or a :class:`RoutingCapsules` argument is invalid.

    Example::

        >>> import torch
        >>> from capsnet_ext.nn import CapsNet
        >>> model = CapsNet(conv_channels=16, primary_channels=4, decoder_hidden=(32,))
        >>> out = model(torch.rand(2, 1, 28, 28), targets=torch.tensor([3, 7]))
        >>> out.lengths.shape, out.capsules.shape, out.reconstructions.shape
        (torch.Size([2, 10]), torch.Size([2, 10, 16]), torch.Size([2, 784]))
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
        """Squashed primary capsules ``[B, num_primary, primary_dim]`` of images ``x``."""
        return self.primary(torch.relu(self.conv1(x)))

    def reconstruct(self, capsules: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decode ``capsules [B, J, D]`` masked by ``mask [B, J]`` (0/1) into
        ``[B, in_channels * input_size**2]`` pixels in ``[0, 1]``; ``RuntimeError`` without a
        decoder."""
        if self.decoder is None:
            raise RuntimeError("this CapsNet was built with decoder=False")
        return self.decoder((capsules * mask.unsqueeze(-1)).flatten(1))

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None,
                return_coupling: bool = False) -> CapsNetOutput:
        """Class capsules, their lengths and the masked reconstruction of images ``x``.

        Args:
            x (Tensor): images ``[B, in_channels, input_size, input_size]`` (pixels in
                ``[0, 1]`` for the reconstruction loss).
            targets (Tensor, optional): class indices ``[B]`` or multi-hot
                ``[B, num_classes]``; when given (training), the decoder sees the capsules of
                these classes, otherwise the longest capsule. Default: ``None``.
            return_coupling (bool, optional): also return the DigitCaps couplings.
                Default: ``False``.

        Returns:
            CapsNetOutput: ``lengths [B, num_classes]``, ``capsules [B, num_classes,
            digit_dim]``, ``reconstructions [B, in_channels * input_size**2]`` (``None``
            with ``decoder=False``) and ``couplings [B, num_primary, num_classes]`` (``None``
            unless ``return_coupling``).

        Raises:
            ValueError: ``x`` does not give the model's number of primary capsules (wrong
                image size), or ``targets`` are out of range or of the wrong shape.
        """
        u = self.primary_capsules(x)
        check_primary_capsules(self, x, u)
        routed = self.digits(u, return_coupling=return_coupling)
        capsules, couplings = routed if return_coupling else (routed, None)
        return capsule_output(self, capsules, couplings, targets)


class BaselineCNN(nn.Module):
    """The paper's baseline: three 5x5 stride-1 convolutions of 256, 256 and 128 channels,
    fully connected layers of 328 and 192, dropout, and a ``num_classes`` output (logits;
    train with cross-entropy).

    The convolutions use 'same' padding and the first two are followed by 2x2 max pooling,
    as in the official baseline code, so the fully connected layers stay small.

    Args:
        input_size (int, optional): height and width of the square input images.
            Default: ``28``.
        in_channels (int, optional): image channels. Default: ``1``.
        num_classes (int, optional): number of outputs. Default: ``10``.
        dropout (float, optional): dropout probability before the last layer.
            Default: ``0.5``.

    Example::

        >>> import torch
        >>> from capsnet_ext.nn import BaselineCNN
        >>> BaselineCNN()(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
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
        """Class logits of images ``x``.

        Args:
            x (Tensor): images ``[B, in_channels, input_size, input_size]``.

        Returns:
            Tensor: logits ``[B, num_classes]`` (for ``torch.nn.functional.cross_entropy``).
        """
        return self.classifier(self.features(x))


#: ``arch`` name -> model class (or builder) for :func:`build_model`: ``"capsnet"``,
#: ``"baseline-cnn"``, ``"deep-capsnet"``, ``"mitterreiter-capsnet"`` and any added by
#: :func:`register_model`.
MODEL_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "capsnet": CapsNet,
    "baseline-cnn": BaselineCNN,
}


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``build_model({"arch": name, ...})`` call ``builder(**kwargs)``.

    Args:
        name (str): the ``arch`` name; an existing entry is replaced.
        builder (callable): called with the config's other keys as keyword arguments; should
            return an ``nn.Module`` (give it a ``config`` attribute so checkpoints can rebuild
            it).

    Returns:
        None.
    """
    MODEL_REGISTRY[name] = builder


def build_model(config: dict) -> nn.Module:
    """Build a model from ``{"arch": name, **kwargs}`` (the ``config`` attribute of every
    model here, and what checkpoints store).

    Args:
        config (dict): ``"arch"``, a key of :data:`MODEL_REGISTRY`, and the model's keyword
            arguments.

    Returns:
        nn.Module: the new model.

    Raises:
        ValueError: ``config`` has no ``"arch"`` or names no registered model.

    Example::

        >>> from capsnet_ext.nn import build_model
        >>> model = build_model({"arch": "capsnet", "conv_channels": 16, "primary_channels": 4})
        >>> type(model).__name__, model.num_primary
        ('CapsNet', 144)
    """
    if "arch" not in config:
        raise ValueError(f"model config needs an 'arch' key (one of {sorted(MODEL_REGISTRY)})")
    kwargs = dict(config)
    arch = kwargs.pop("arch")
    if arch not in MODEL_REGISTRY:
        raise ValueError(f"unknown model arch {arch!r}; expected one of {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[arch](**kwargs)
