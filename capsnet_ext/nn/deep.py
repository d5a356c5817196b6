"""Deep CapsNet: several fully connected routing layers stacked after PrimaryCaps.

Used to study how capsule networks behave with depth (Mitterreiter et al., "Why Capsule
Neural Networks Do Not Scale", AAAI 2023; Peer et al., "Training Deep Capsule Networks"):
dead capsules, routing that does not depend on the input, and gradients that vanish layer by
layer. The model is otherwise the CapsNet of :mod:`capsnet_ext.nn.models` (same conv1,
PrimaryCaps, masked decoder, ``CapsNetOutput``), so the same trainer and losses apply.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .layers import PrimaryCaps, RoutingCapsules
from .models import (CapsNetOutput, capsule_output, check_primary_capsules, reconstruction_decoder,
                     register_model)

# Variance of a standard normal truncated at +-2 (what RoutingCapsules' trunc_normal_ draws):
# 1 - 4 phi(2) / (Phi(2) - Phi(-2)).
_PHI2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
_TRUNC2_VAR = 1.0 - 4.0 * _PHI2 / math.erf(2.0 / math.sqrt(2.0))

# Target of the "auto" initialisation: input capsules of length ~0.5 give |s| ~ 1, whose
# squash output has length 0.5 again, so the typical length is a fixed point of the stack.
_TYPICAL_LENGTH = 0.5


def auto_init_std(in_caps: int, out_caps: int, out_dim: int) -> float:
    """Per-layer ``init_std`` that keeps ``|s_j|`` near 1 at initialisation.

    With uniform couplings ``c = 1/J`` and ``W`` entries of variance ``sigma^2``,
    ``E|s_j|^2 = out_dim * sigma^2 * I * E|u|^2 / J^2``. Setting it to 1 for inputs of typical
    length ``|u| = 0.5`` gives ``sigma = 2 J / sqrt(I * out_dim)``, and ``|s| = 1`` squashes to
    length 0.5: the typical length is preserved layer after layer, where the squash's slope
    ``2|s| / (1 + |s|^2)^2`` is 0.5, near its maximum. (The fixed ``init_std = 0.1`` of the
    original CapsNet gives ``|s| ~ 0.05 |u|`` for a 32-to-32 layer of 8D capsules, so lengths
    shrink quadratically layer by layer and a deep stack starts dead.) The returned value is
    the std *before* truncation at two standard deviations, corrected so that the truncated
    draw has the intended variance.

    Args:
        in_caps (int): input capsules ``I`` of the layer.
        out_caps (int): output capsules ``J`` of the layer.
        out_dim (int): dimension ``Dout`` of the output capsules.

    Returns:
        float: the ``init_std`` to pass to :class:`~capsnet_ext.nn.RoutingCapsules`.
    """
    sigma = out_caps / (_TYPICAL_LENGTH * math.sqrt(in_caps * out_dim))
    return sigma / math.sqrt(_TRUNC2_VAR)


class DeepCapsTrace(NamedTuple):
    """Every layer of a stacked capsule model, from :meth:`StackedRoutingCapsNet.routing_trace`.

    Attributes:
        capsules (tuple of Tensor): ``L + 1`` tensors: the primary capsules ``[B, I0, D0]``,
            then each routing layer's output ``[B, caps[k], dims[k]]``.
        couplings (tuple of Tensor): ``L`` tensors: routing layer ``k``'s couplings
            ``[B, caps[k-1], caps[k]]`` (``I0`` input capsules for the first), without gradient.
    """

    capsules: Tuple[torch.Tensor, ...]   # L + 1 tensors: primary [B, I0, D0], then [B, caps[k], dims[k]]
    couplings: Tuple[torch.Tensor, ...]  # L tensors: layer k's [B, caps[k-1] (I0 for k=0), caps[k]]


def _per_layer(name: str, value, num_layers: int, kind):
    if isinstance(value, (list, tuple)):
        if len(value) != num_layers:
            raise ValueError(f"{name} must be one value or one per routing layer ({num_layers}), "
                             f"got {len(value)}: {list(value)}")
        return list(value)
    if not isinstance(value, kind):
        kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise TypeError(f"{name} must be a {kinds} or a list of them, got {value!r}")
    return [value] * num_layers


def per_layer_init_std(init_std, num_layers: int):
    """``init_std`` of a stack of routing layers: ``"auto"`` gives ``None`` (the caller takes
    :func:`auto_init_std` per layer); a float or one float per layer gives the list of floats.

    Args:
        init_std: ``"auto"``, a float, or a sequence of ``num_layers`` floats.
        num_layers (int): number of routing layers.

    Returns:
        list of float or None.

    Raises:
        ValueError: another string, or a sequence of the wrong length.
        TypeError: neither a string, a number nor a sequence of numbers.
    """
    if isinstance(init_std, str):
        if init_std != "auto":
            raise ValueError(f"init_std must be 'auto', a float or a list of floats, got {init_std!r}")
        return None
    return [float(s) for s in _per_layer("init_std", init_std, num_layers, (int, float))]


class StackedRoutingCapsNet(nn.Module):
    """What every stack of routing layers shares: subclasses define ``primary_capsules(x)``,
    ``routing`` (an ``nn.ModuleList`` of :class:`RoutingCapsules`), ``num_primary``,
    ``num_classes``, ``config`` and ``decoder`` (or ``None``); the trace, the masked
    reconstruction and the forward pass are the same. Not built directly: see
    :class:`DeepCapsNet` and :class:`~capsnet_ext.nn.MitterreiterCapsNet`."""

    def _primary(self, x: torch.Tensor) -> torch.Tensor:
        u = self.primary_capsules(x)
        check_primary_capsules(self, x, u)
        return u

    def routing_trace(self, x: torch.Tensor) -> DeepCapsTrace:
        """Every capsule layer and every routing layer's couplings for images ``x``:
        capsules ``(primary [B, I0, D0], layer 1 [B, caps[0], dims[0]], ...)`` and couplings
        ``(layer 1 [B, I0, caps[0]], ...)`` (couplings carry no gradient).

        Args:
            x (Tensor): images ``[B, in_channels, input_size, input_size]``.

        Returns:
            DeepCapsTrace: ``(capsules, couplings)``, tuples of ``L + 1`` and ``L`` tensors.
        """
        u = self._primary(x)
        capsules, couplings = [u], []
        for layer in self.routing:
            u, c = layer(u, return_coupling=True)
            capsules.append(u)
            couplings.append(c)
        return DeepCapsTrace(tuple(capsules), tuple(couplings))

    def reconstruct(self, capsules: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decode class capsules ``[B, num_classes, dims[-1]]`` masked by ``mask [B, num_classes]``
        into ``[B, in_channels * input_size**2]`` pixels in ``[0, 1]``; ``RuntimeError``
        without a decoder."""
        if self.decoder is None:
            raise RuntimeError(f"this {type(self).__name__} was built with decoder=False")
        return self.decoder((capsules * mask.unsqueeze(-1)).flatten(1))

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None,
                return_coupling: bool = False) -> CapsNetOutput:
        """Class capsules, their lengths and the masked reconstruction of images ``x``, through
        every routing layer.

        Args:
            x (Tensor): images ``[B, in_channels, input_size, input_size]``.
            targets (Tensor, optional): class indices ``[B]`` or multi-hot
                ``[B, num_classes]``; when given (training), the decoder sees the capsules of
                these classes, otherwise the longest capsule. Default: ``None``.
            return_coupling (bool, optional): also return every routing layer's couplings.
                Default: ``False``.

        Returns:
            CapsNetOutput: ``lengths [B, num_classes]``, ``capsules [B, num_classes,
            dims[-1]]``, ``reconstructions [B, in_channels * input_size**2]`` (``None``
            with ``decoder=False``) and ``couplings``: ``None``, or with ``return_coupling``
            a tuple of one ``[B, I_k, J_k]`` tensor per routing layer (no gradient).

        Raises:
            ValueError: ``x`` does not give the model's number of primary capsules (wrong
                image size), or ``targets`` are out of range or of the wrong shape.
        """
        if return_coupling:
            trace = self.routing_trace(x)
            capsules, couplings = trace.capsules[-1], trace.couplings
        else:
            capsules = self._primary(x)
            for layer in self.routing:
                capsules = layer(capsules)
            couplings = None
        return capsule_output(self, capsules, couplings, targets)


class DeepCapsNet(StackedRoutingCapsNet):
    """conv1 -> PrimaryCaps -> ``len(caps)`` fully connected routing layers -> masked decoder.

    Args:
        input_size (int, optional): height and width of the square input images.
            Default: ``28``.
        in_channels (int, optional): image channels. Default: ``1``.
        num_classes (int, optional): number of classes (capsules of the last layer).
            Default: ``10``.
        caps (sequence of int, optional): capsules per routing layer, the last being the class
            capsules (default ``[32, 32, 32, num_classes]``); must end with ``num_classes``.
        dims (sequence of int, optional): capsule dimensions per routing layer (default 8 for
            every hidden layer and 16 for the class capsules).
        conv_channels, conv_kernel (int, optional): conv1, as for
            :class:`~capsnet_ext.nn.CapsNet`. Default: ``256``, ``9``.
        primary_channels, primary_dim, primary_kernel (int, optional): PrimaryCaps, as for
            :class:`~capsnet_ext.nn.CapsNet`. Default: ``32``, ``8``, ``9``.
        iterations (int or sequence of int, optional): routing iterations, one int or one per
            layer. Default: ``3``.
        init_std (str, float or sequence of float, optional): ``"auto"`` (default:
            :func:`auto_init_std` per layer, which keeps lengths from shrinking with depth at
            initialisation), one float for every layer, or one per layer.
        routing_bias (bool, optional): a routing bias in every layer. Default: ``True``.
        leaky, detach_inner (bool, optional): as for
            :class:`~capsnet_ext.nn.RoutingCapsules`, for every layer. Default: ``False``.
        backend (str, optional): routing backend of every layer, ``"auto"``, ``"reference"``,
            ``"triton"`` or ``"cuda"`` (see :func:`capsnet_ext.capsule_routing`).
            Default: ``"auto"``.
        decoder (bool, optional): build the reconstruction decoder. Default: ``True``.
        decoder_hidden (sequence of int, optional): its hidden widths.
            Default: ``(512, 1024)``.

    ``forward(x [B, C, H, W], targets=None, return_coupling=False) -> CapsNetOutput``; with
    ``return_coupling`` the ``couplings`` field is a tuple with one ``[B, I_k, J_k]`` tensor per
    routing layer. :meth:`routing_trace` returns every layer's capsules and couplings.

    Raises:
        ValueError: ``caps`` is empty or does not end with ``num_classes``; ``dims`` or a
            per-layer ``iterations``/``init_std`` list has the wrong length; ``input_size`` is
            too small.
        TypeError: ``iterations`` or ``init_std`` of the wrong type.

    Example::

        >>> import torch
        >>> from capsnet_ext.nn import DeepCapsNet
        >>> model = DeepCapsNet(caps=[8, 10], dims=[8, 16], conv_channels=16,
        ...                     primary_channels=4, decoder=False)
        >>> out = model(torch.rand(2, 1, 28, 28), return_coupling=True)
        >>> out.lengths.shape, [c.shape for c in out.couplings]
        (torch.Size([2, 10]), [torch.Size([2, 144, 8]), torch.Size([2, 8, 10])])
    """

    def __init__(self, input_size: int = 28, in_channels: int = 1, num_classes: int = 10,
                 caps: Optional[Sequence[int]] = None, dims: Optional[Sequence[int]] = None,
                 conv_channels: int = 256, conv_kernel: int = 9, primary_channels: int = 32,
                 primary_dim: int = 8, primary_kernel: int = 9,
                 iterations: Union[int, Sequence[int]] = 3,
                 init_std: Union[str, float, Sequence[float]] = "auto",
                 routing_bias: bool = True, leaky: bool = False, detach_inner: bool = False,
                 backend: str = "auto", decoder: bool = True, decoder_hidden=(512, 1024)):
        super().__init__()
        caps = [32, 32, 32, num_classes] if caps is None else [int(c) for c in caps]
        if not caps:
            raise ValueError("caps must list at least one routing layer")
        if caps[-1] != num_classes:
            raise ValueError(f"the last routing layer holds the class capsules: caps[-1] must equal "
                             f"num_classes={num_classes}, got caps={caps}")
        L = len(caps)
        dims = [8] * (L - 1) + [16] if dims is None else [int(d) for d in dims]
        if len(dims) != L:
            raise ValueError(f"dims must give one capsule dimension per routing layer ({L}), got {dims}")
        iters = _per_layer("iterations", iterations, L, int)
        stds = per_layer_init_std(init_std, L)
        self.config = dict(arch="deep-capsnet", input_size=input_size, in_channels=in_channels,
                           num_classes=num_classes, caps=caps, dims=dims, conv_channels=conv_channels,
                           conv_kernel=conv_kernel, primary_channels=primary_channels,
                           primary_dim=primary_dim, primary_kernel=primary_kernel,
                           iterations=iterations if isinstance(iterations, int) else list(iterations),
                           init_std=init_std if isinstance(init_std, (str, int, float)) else list(init_std),
                           routing_bias=routing_bias, leaky=leaky, detach_inner=detach_inner,
                           backend=backend, decoder=decoder, decoder_hidden=list(decoder_hidden))
        feature_size = input_size - conv_kernel + 1
        if feature_size < primary_kernel:
            raise ValueError(f"input_size {input_size} is too small for conv_kernel {conv_kernel} "
                             f"followed by primary_kernel {primary_kernel}")
        self.conv1 = nn.Conv2d(in_channels, conv_channels, conv_kernel)
        self.primary = PrimaryCaps(conv_channels, primary_channels, primary_dim, primary_kernel, stride=2)
        self.num_primary = self.primary.num_capsules(feature_size, feature_size)
        layers = []
        in_caps, in_dim = self.num_primary, primary_dim
        for k, (out_caps, out_dim) in enumerate(zip(caps, dims)):
            std = auto_init_std(in_caps, out_caps, out_dim) if stds is None else stds[k]
            layers.append(RoutingCapsules(in_caps, out_caps, in_dim, out_dim, iterations=iters[k],
                                          bias=routing_bias, leaky=leaky, detach_inner=detach_inner,
                                          backend=backend, init_std=std))
            in_caps, in_dim = out_caps, out_dim
        self.routing = nn.ModuleList(layers)
        self.num_classes = num_classes
        self.image_numel = in_channels * input_size * input_size
        self.decoder = None
        if decoder:
            self.decoder = reconstruction_decoder(num_classes * dims[-1], decoder_hidden, self.image_numel)

    def primary_capsules(self, x: torch.Tensor) -> torch.Tensor:
        """Squashed primary capsules ``[B, num_primary, primary_dim]`` of images ``x``."""
        return self.primary(torch.relu(self.conv1(x)))


register_model("deep-capsnet", DeepCapsNet)
