"""The deep CapsNet of Mitterreiter, Koch, Giesen & Laue, "Why Capsule Neural Networks Do Not
Scale: Challenging the Dynamic Parse-Tree Assumption" (AAAI 2023), as in their public code
(EfficientCN: ``notebooks/affnist/paper_capsnet.ipynb``).

* Input normalisation ``(x - 0.0641) / 0.2257`` (their ``T.Normalize``; the mean and std of
  MNIST on a 40x40 canvas). The decoder reconstructs the un-normalised image in ``[0, 1]``.
* Backbone, all convolutions "valid": Conv 5x5 (1 -> 32), ReLU, BN; Conv 3x3 (32 -> 64), ReLU,
  BN; Conv 3x3 (64 -> 128), ReLU, BN; Conv 3x3 stride 2 (128 -> C), ReLU, BN; depthwise Conv
  KxK (C -> C, groups C) with K the remaining map size (15 for 40x40 inputs), so one feature
  vector of ``C = n0 * d0`` channels remains, read as ``n0`` primary capsules of ``d0``
  dimensions (capsule ``n`` is channels ``n*d0 .. n*d0 + d0 - 1``) and squashed.
* Fully connected capsule layers (:class:`RoutingCapsules`) of ``caps`` capsules with
  ``dims`` dimensions, no bias, ``W`` uniform in ``+-1/sqrt(n_l)`` (``n_l`` the number of
  lower capsules), routing with a learned prior logit and temperature ``T``: their
  ``AgreementRouting(n_iter=3)`` is ``iterations=4`` here (a first weighted sum from
  ``softmax(prior / T)``, then 3 agreement updates each followed by a softmax, weighted sum
  and squash).
* Decoder 512 - 1024 - ``H*W`` (sigmoid) on the class capsules masked by the label in
  training and by the longest capsule in evaluation.

With ``ns = [16, 16, 10]``, ``ds = [8, 8, 8]`` (16 primary capsules, one hidden layer of 16,
10 class capsules) the model has about 2.5 M parameters, most of them in the decoder.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .. import ops
from .deep import StackedRoutingCapsNet, _per_layer, auto_init_std, per_layer_init_std
from .layers import RoutingCapsules
from .models import reconstruction_decoder, register_model

MNIST40_MEAN = 0.0641
MNIST40_STD = 0.2257


class MitterreiterCapsNet(StackedRoutingCapsNet):
    """Mitterreiter et al.'s deep CapsNet (the module docstring describes the architecture).

    Args:
        input_size (int, optional): height and width of the square input images (at least
            11). Default: ``40``.
        in_channels (int, optional): image channels. Default: ``1``.
        num_classes (int, optional): number of class capsules. Default: ``10``.
        primary_caps, primary_dim (int, optional): ``n0`` primary capsules of ``d0``
            dimensions (``C = n0 * d0`` backbone output channels). Default: ``16``, ``8``.
        caps, dims (sequence of int, optional): capsules and dimensions of each routing layer
            after the primary capsules (default ``[16, num_classes]`` and ``[8, 8]``: the
            paper's ``ns = [16, 16, 10]``, ``ds = [8, 8, 8]``); ``caps[-1]`` must be
            ``num_classes``.
        iterations (int or sequence of int, optional): weighted sums per routing (one int or
            one per layer; 4 = their ``n_iter`` 3). Default: ``4``.
        prior (bool, optional): a learned prior logit in every routing layer (see
            :class:`~capsnet_ext.nn.RoutingCapsules`). Default: ``True``.
        temperature (float, optional): the softmax temperature of every routing layer.
            Default: ``1.0``.
        init (str, optional): ``W`` initialisation of every routing layer
            (``"uniform_fan_in"``: theirs; ``"trunc_normal"``: a truncated normal of std
            ``init_std``). Default: ``"uniform_fan_in"``.
        init_std (None, str, float or sequence of float, optional): with
            ``init="trunc_normal"`` only: ``None`` (0.1), a float, one float per layer, or
            ``"auto"`` (:func:`~capsnet_ext.nn.deep.auto_init_std` per layer: capsule lengths
            near 0.5 in every layer at initialisation, so a deep stack starts alive; not the
            authors' choice, a control for the depth study). Default: ``None``.
        routing_bias (bool, optional): add a routing bias (their model has none).
            Default: ``False``.
        backbone_channels (sequence of 3 int, optional): output channels of the first three
            convolutions. Default: ``(32, 64, 128)``.
        input_mean, input_std (float or None, optional): input normalisation
            ``(x - input_mean) / input_std`` (both ``None`` for none). Default: ``0.0641``,
            ``0.2257`` (MNIST on a 40x40 canvas).
        backend (str, optional): routing backend of every layer, ``"auto"``, ``"reference"``,
            ``"triton"`` or ``"cuda"`` (see :func:`capsnet_ext.capsule_routing`).
            Default: ``"auto"``.
        decoder (bool, optional): build the reconstruction decoder. Default: ``True``.
        decoder_hidden (sequence of int, optional): its hidden widths.
            Default: ``(512, 1024)``.

    ``forward(x [B, in_channels, input_size, input_size], targets=None,
    return_coupling=False) -> CapsNetOutput`` and :meth:`routing_trace` as for
    :class:`~capsnet_ext.nn.DeepCapsNet`.

    Raises:
        ValueError: ``caps``, ``dims``, ``iterations``, ``init_std``, ``backbone_channels``,
            ``input_mean``/``input_std`` or ``input_size`` invalid (the message says which),
            or ``init_std`` given with ``init="uniform_fan_in"``.
        TypeError: ``iterations`` or ``init_std`` of the wrong type.

    Example::

        >>> import torch
        >>> from capsnet_ext.nn import MitterreiterCapsNet
        >>> model = MitterreiterCapsNet(decoder_hidden=(32,))
        >>> out = model(torch.rand(2, 1, 40, 40))
        >>> out.lengths.shape, out.reconstructions.shape
        (torch.Size([2, 10]), torch.Size([2, 1600]))
    """

    def __init__(self, input_size: int = 40, in_channels: int = 1, num_classes: int = 10,
                 primary_caps: int = 16, primary_dim: int = 8,
                 caps: Optional[Sequence[int]] = None, dims: Optional[Sequence[int]] = None,
                 iterations: Union[int, Sequence[int]] = 4, prior: bool = True,
                 temperature: float = 1.0, init: str = "uniform_fan_in",
                 init_std: Union[None, str, float, Sequence[float]] = None,
                 routing_bias: bool = False, backbone_channels: Sequence[int] = (32, 64, 128),
                 input_mean: Optional[float] = MNIST40_MEAN, input_std: Optional[float] = MNIST40_STD,
                 backend: str = "auto", decoder: bool = True, decoder_hidden=(512, 1024)):
        super().__init__()
        caps = [16, num_classes] if caps is None else [int(c) for c in caps]
        if not caps:
            raise ValueError("caps must list at least one routing layer")
        if caps[-1] != num_classes:
            raise ValueError(f"the last routing layer holds the class capsules: caps[-1] must equal "
                             f"num_classes={num_classes}, got caps={caps}")
        L = len(caps)
        dims = [8] * L if dims is None else [int(d) for d in dims]
        if len(dims) != L:
            raise ValueError(f"dims must give one capsule dimension per routing layer ({L}), got {dims}")
        iters = _per_layer("iterations", iterations, L, int)
        if init_std is not None and init != "trunc_normal":
            raise ValueError(f"init_std applies to init='trunc_normal' only, got init={init!r} "
                             f"with init_std={init_std!r}")
        stds = [0.1] * L if init_std is None else per_layer_init_std(init_std, L)
        if stds is not None and not all(math.isfinite(v) and v > 0 for v in stds):
            raise ValueError(f"init_std must be > 0, got {init_std!r}")
        backbone_channels = [int(c) for c in backbone_channels]
        if len(backbone_channels) != 3:
            raise ValueError(f"backbone_channels must list the 3 widths of the first convolutions, "
                             f"got {backbone_channels}")
        if (input_mean is None) != (input_std is None):
            raise ValueError("input_mean and input_std must both be given or both be None")
        if input_std is not None and input_std <= 0:
            raise ValueError(f"input_std must be > 0, got {input_std!r}")
        # Map size after 5x5, 3x3, 3x3 (valid) and 3x3 stride 2 (valid).
        side = input_size - 4 - 2 - 2
        side = (side - 3) // 2 + 1
        if side < 1:
            raise ValueError(f"input_size {input_size} is too small for the backbone (needs >= 11)")
        self.config = dict(arch="mitterreiter-capsnet", input_size=input_size, in_channels=in_channels,
                           num_classes=num_classes, primary_caps=primary_caps, primary_dim=primary_dim,
                           caps=caps, dims=dims,
                           iterations=iterations if isinstance(iterations, int) else list(iterations),
                           prior=prior, temperature=float(temperature), init=init,
                           init_std=init_std if init_std is None or isinstance(init_std, (str, int, float))
                           else list(init_std),
                           routing_bias=routing_bias, backbone_channels=backbone_channels,
                           input_mean=input_mean, input_std=input_std, backend=backend,
                           decoder=decoder, decoder_hidden=list(decoder_hidden))
        features = primary_caps * primary_dim
        c1, c2, c3 = backbone_channels

        def block(cin, cout, kernel, stride=1):
            return [nn.Conv2d(cin, cout, kernel, stride), nn.ReLU(inplace=True), nn.BatchNorm2d(cout)]

        self.backbone = nn.Sequential(*block(in_channels, c1, 5), *block(c1, c2, 3), *block(c2, c3, 3),
                                      *block(c3, features, 3, stride=2))
        self.depthwise = nn.Conv2d(features, features, side, groups=features)
        self.num_primary, self.primary_dim = primary_caps, primary_dim
        if input_mean is not None:
            self.register_buffer("input_mean", torch.tensor(float(input_mean)), persistent=False)
            self.register_buffer("input_std", torch.tensor(float(input_std)), persistent=False)
        else:
            self.input_mean = self.input_std = None
        layers = []
        in_caps, in_dim = primary_caps, primary_dim
        for k, (out_caps, out_dim) in enumerate(zip(caps, dims)):
            std = auto_init_std(in_caps, out_caps, out_dim) if stds is None else stds[k]
            layers.append(RoutingCapsules(in_caps, out_caps, in_dim, out_dim, iterations=iters[k],
                                          bias=routing_bias, backend=backend, prior=prior,
                                          temperature=temperature, init=init, init_std=std))
            in_caps, in_dim = out_caps, out_dim
        self.routing = nn.ModuleList(layers)
        self.num_classes = num_classes
        self.image_numel = in_channels * input_size * input_size
        self.decoder = None
        if decoder:
            self.decoder = reconstruction_decoder(num_classes * dims[-1], decoder_hidden, self.image_numel)

    def primary_capsules(self, x: torch.Tensor) -> torch.Tensor:
        """Squashed primary capsules ``[B, n0, d0]`` of images ``x`` (in ``[0, 1]``)."""
        if self.input_mean is not None:
            x = (x - self.input_mean) / self.input_std
        features = self.depthwise(self.backbone(x))          # [B, n0 * d0, 1, 1]
        return ops.squash(features.reshape(x.shape[0], self.num_primary, self.primary_dim))


register_model("mitterreiter-capsnet", MitterreiterCapsNet)
