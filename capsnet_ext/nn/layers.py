"""Capsule layers: drop-in ``nn.Module`` shells over the functional ops."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..dispatch import preload


class PrimaryCaps(nn.Module):
    """Convolutional capsules: one convolution whose ``caps_channels * caps_dim`` output
    channels are grouped into ``caps_dim``-dimensional capsules at every position, then squashed.

    MNIST (Sabour et al.): 256 input channels, 32 channels of 8D capsules, 9x9 kernels,
    stride 2: a 20x20 map gives 6x6x32 = 1152 capsules.

    Args:
        in_channels (int, optional): channels of the input feature map. Default: ``256``.
        caps_channels (int, optional): capsule channels (capsules per position).
            Default: ``32``.
        caps_dim (int, optional): dimension of each capsule. Default: ``8``.
        kernel_size (int, optional): square convolution kernel size. Default: ``9``.
        stride (int, optional): convolution stride. Default: ``2``.
        padding (int, optional): zero padding on each side. Default: ``0``.

    Shape:
        - Input: ``[B, in_channels, H, W]``.
        - Output: ``[B, caps_channels * H' * W', caps_dim]`` with ``(H', W') =
          output_hw(H, W)``, ordered channel-major (all positions of capsule channel 0, then
          channel 1, ...).

    Attributes:
        conv (nn.Conv2d): the convolution, ``in_channels -> caps_channels * caps_dim``.

    Example::

        >>> import torch
        >>> from capsnet_ext.nn import PrimaryCaps
        >>> primary = PrimaryCaps(in_channels=16, caps_channels=4, caps_dim=8)
        >>> primary(torch.randn(2, 16, 20, 20)).shape     # 4 channels x 6 x 6 positions
        torch.Size([2, 144, 8])
        >>> primary.num_capsules(20, 20)
        144
    """

    def __init__(self, in_channels: int = 256, caps_channels: int = 32, caps_dim: int = 8,
                 kernel_size: int = 9, stride: int = 2, padding: int = 0):
        super().__init__()
        self.caps_channels = caps_channels
        self.caps_dim = caps_dim
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.conv = nn.Conv2d(in_channels, caps_channels * caps_dim, kernel_size, stride, padding)

    def output_hw(self, height: int, width: int):
        """Spatial size ``(H', W')`` of the capsule grid for an input map of
        ``height x width``."""
        k, s, p = self.kernel_size, self.stride, self.padding
        return (height + 2 * p - k) // s + 1, (width + 2 * p - k) // s + 1

    def num_capsules(self, height: int, width: int) -> int:
        """Number of capsules, ``caps_channels * H' * W'``, for an input map of
        ``height x width``."""
        h, w = self.output_hw(height, width)
        return self.caps_channels * h * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x``, group the channels into capsules and squash them.

        Args:
            x (Tensor): feature map ``[B, in_channels, H, W]``.

        Returns:
            Tensor: squashed capsules ``[B, caps_channels * H' * W', caps_dim]`` (lengths in
            ``[0, 1)``), channel-major.
        """
        out = self.conv(x)
        B, _, H, W = out.shape
        out = out.view(B, self.caps_channels, self.caps_dim, H, W)
        out = out.permute(0, 1, 3, 4, 2).reshape(B, self.caps_channels * H * W, self.caps_dim)
        return ops.squash(out)


WEIGHT_INITS = ("trunc_normal", "uniform_fan_in")


class RoutingCapsules(nn.Module):
    """Fully connected capsule layer with dynamic routing (Sabour et al. 2017).

    The module form of :func:`capsnet_ext.capsule_routing`: every input capsule predicts every
    output capsule through its own matrix (``u_hat = W @ u``) and routing by agreement combines
    the predictions into the output capsules. Holds ``weight``
    ``[in_caps, out_caps, out_dim, in_dim]`` and, with ``bias=True``, a routing bias
    ``[out_caps, out_dim]`` added to ``s`` before the squash in every iteration.
    ``forward(u [B, in_caps, in_dim]) -> v [B, out_caps, out_dim]``, or ``(v, c)`` with the last
    iteration's couplings ``c [B, in_caps, out_caps]`` when ``return_coupling=True``.

    Args:
        in_caps (int): number of input capsules ``I`` (e.g. 1152 after the MNIST PrimaryCaps).
        out_caps (int): number of output capsules ``J`` (e.g. 10 classes).
        in_dim (int): dimension ``Din`` of the input capsules.
        out_dim (int): dimension ``Dout`` of the output capsules.
        iterations (int, optional): routing iterations (weighted sums), ``>= 1``. Default: ``3``.
        bias (bool, optional): learn a routing bias ``[out_caps, out_dim]``, initialised to
            ``bias_init``. Default: ``False``.
        leaky (bool, optional): add a zero "none of the above" logit to each softmax.
            Default: ``False``.
        detach_inner (bool, optional): gradient only through the last iteration's weighted
            sum (see :func:`capsnet_ext.dynamic_routing`). Default: ``False``.
        backend (str, optional): ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``,
            passed to :func:`capsnet_ext.capsule_routing` on every call (``"auto"``: the
            backend ``$CAPSNET_EXT_BACKEND`` names if set, else for CUDA tensors the first
            usable of ``"cuda"``, ``"triton"``, ``"reference"``, for CPU tensors
            ``"reference"``; see that op for what each backend supports). The name is checked,
            and the backend imported, at construction. Default: ``"auto"``.
        init_std (float, optional): std of the truncated normal of ``init="trunc_normal"``.
            Default: ``0.1``.
        bias_init (float, optional): initial value of every bias entry. Default: ``0.1``.
        prior (bool, optional): keyword only; learn a prior logit ``[in_caps, out_caps]``
            (below). Default: ``False``.
        temperature (float, optional): keyword only; softmax temperature ``T``, finite and
            ``> 0`` (below). Default: ``1.0``.
        init (str, optional): keyword only; initialisation of ``weight``,
            ``"trunc_normal"`` or ``"uniform_fan_in"`` (below). Default: ``"trunc_normal"``.

    Attributes:
        weight (Parameter): ``[in_caps, out_caps, out_dim, in_dim]``.
        bias (Parameter or None): ``[out_caps, out_dim]`` when ``bias=True``.
        prior (Parameter or None): ``[in_caps, out_caps]`` when ``prior=True``.

    Raises:
        ValueError: a size is not a positive int, ``iterations`` is not an int ``>= 1``,
            ``temperature`` is not a finite number ``> 0``, ``init`` or ``backend`` is not one
            of the names above.
        TypeError: ``prior`` is not a bool.

    Example::

        >>> import torch
        >>> from capsnet_ext.nn import RoutingCapsules
        >>> caps = RoutingCapsules(in_caps=32, out_caps=10, in_dim=8, out_dim=16, bias=True)
        >>> u = torch.randn(4, 32, 8)
        >>> caps(u).shape
        torch.Size([4, 10, 16])
        >>> v, c = caps(u, return_coupling=True)
        >>> c.shape
        torch.Size([4, 32, 10])

    Routing options of Mitterreiter et al. (AAAI 2023, ``AgreementRouting`` in their code):

    * ``prior=True`` adds a learned parameter ``prior [in_caps, out_caps]`` (initialised to
      zero, shared by all samples) to the routing logits before every softmax, so the first
      couplings are ``softmax(prior / T)`` rather than uniform and the prior is trained with
      the rest of the model.
    * ``temperature`` ``T > 0``: couplings are ``softmax((prior + agreement) / T)``.

    Their routing runs ``n_iter = 3`` agreement updates after a first weighted sum from the
    prior: 4 weighted sums, i.e. ``iterations=4`` here (``iterations`` counts weighted sums).

    Initialisation of ``weight`` (the ``W`` of :func:`capsnet_ext.capsule_routing`; ``init``):

    * ``"trunc_normal"`` (default): a normal distribution truncated at two standard
      deviations with std ``init_std`` (default 0.1), the official CapsNet code's choice, so
      that the paper's recipe is reproduced as written. At the MNIST shape this makes ``|s|``
      of order 1 at the start, where the squash is neither saturated nor vanishing. For much
      wider or deeper stacks pass a smaller ``init_std`` (e.g.
      ``1 / sqrt(in_caps * in_dim / out_caps)``) to keep ``|s|`` in that range.
    * ``"uniform_fan_in"``: uniform in ``+-1 / sqrt(in_caps)``, Mitterreiter et al.'s
      ``CapsLayer.reset_parameters`` (their ``n_l`` is the number of *lower* capsules, the
      ``input_caps`` of that layer, not ``in_caps * in_dim``); ``init_std`` is then unused.

    The bias (when present) starts at ``bias_init`` (default 0.1).
    """

    def __init__(self, in_caps: int, out_caps: int, in_dim: int, out_dim: int,
                 iterations: int = 3, bias: bool = False, leaky: bool = False,
                 detach_inner: bool = False, backend: str = "auto",
                 init_std: float = 0.1, bias_init: float = 0.1, *, prior: bool = False,
                 temperature: float = 1.0, init: str = "trunc_normal"):
        super().__init__()
        for name, value in (("in_caps", in_caps), ("out_caps", out_caps),
                            ("in_dim", in_dim), ("out_dim", out_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
        if not isinstance(prior, bool):
            raise TypeError(f"prior must be a bool (True makes a learned [in_caps, out_caps] "
                            f"prior logit), got {prior!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if init not in WEIGHT_INITS:
            raise ValueError(f"init must be one of {WEIGHT_INITS}, got {init!r}")
        preload(backend)  # validates the name; imports now so torch.compile never traces an import
        self.in_caps, self.out_caps, self.in_dim, self.out_dim = in_caps, out_caps, in_dim, out_dim
        self.iterations = iterations
        self.leaky = leaky
        self.detach_inner = detach_inner
        self.backend = backend
        self.init_std = init_std
        self.bias_init = bias_init
        self.init = init
        self.temperature = float(temperature)
        self.weight = nn.Parameter(torch.empty(in_caps, out_caps, out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(out_caps, out_dim)) if bias else None
        self.prior = nn.Parameter(torch.empty(in_caps, out_caps)) if prior else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise ``weight`` by ``init`` (and ``init_std``), ``bias`` to ``bias_init``
        and ``prior`` to zero, in place."""
        if self.init == "uniform_fan_in":
            bound = 1.0 / math.sqrt(self.in_caps)
            nn.init.uniform_(self.weight, -bound, bound)
        else:
            nn.init.trunc_normal_(self.weight, std=self.init_std, a=-2 * self.init_std, b=2 * self.init_std)
        if self.bias is not None:
            nn.init.constant_(self.bias, self.bias_init)
        if self.prior is not None:
            nn.init.zeros_(self.prior)

    def forward(self, u: torch.Tensor, return_coupling: bool = False):
        """Route the input capsules ``u`` to this layer's ``out_caps`` capsules.

        Runs :func:`capsnet_ext.capsule_routing` with this layer's ``weight``, ``bias``,
        ``prior`` and options on the layer's ``backend``. Under autocast the input and the
        parameters are cast to the autocast dtype (gradients still reach the float32
        parameters), the way ``nn.Linear`` behaves.

        Args:
            u (Tensor): input capsules ``[B, in_caps, in_dim]``, with the dtype and device of
                the layer's parameters (outside autocast).
            return_coupling (bool, optional): also return the last iteration's couplings.
                Default: ``False``.

        Returns:
            Tensor or tuple: ``v [B, out_caps, out_dim]``, the output capsules (lengths in
            ``[0, 1)``); with ``return_coupling=True`` the tuple ``(v, c)``, ``c`` of shape
            ``[B, in_caps, out_caps]`` (detached, without the leaky column).

        Raises:
            ValueError: ``u`` is not ``[B, in_caps, in_dim]``, or is on another device than
                the layer.
            TypeError: ``u`` is not a floating-point tensor, or its dtype is not the layer's.
            BackendUnavailableError, NotImplementedError: the layer's explicitly named
                ``backend`` cannot run this call (see :func:`capsnet_ext.capsule_routing`).
        """
        # Checked here so a mismatch names the module's own arguments, not the weight tensor
        # the functional op would complain about.
        if not isinstance(u, torch.Tensor) or u.dim() != 3 or tuple(u.shape[1:]) != (self.in_caps, self.in_dim):
            got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
            raise ValueError(f"RoutingCapsules(in_caps={self.in_caps}, in_dim={self.in_dim}) expects input "
                             f"capsules u of shape [B, in_caps={self.in_caps}, in_dim={self.in_dim}], got "
                             f"{got}; build the layer with in_caps/in_dim matching the layer below")
        weight, bias, prior = self.weight, self.bias, self.prior
        if torch.is_autocast_enabled(u.device.type):
            # Under autocast routing is a matmul-like op: it runs in the autocast dtype, with
            # the float32 parameters cast to it (gradients still reach them in float32), the
            # way nn.Linear behaves. Kernel backends accumulate in float32 regardless.
            dtype = torch.get_autocast_dtype(u.device.type)
            u, weight = u.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            prior = None if prior is None else prior.to(dtype)
        # The op would name these W, the op's argument; the user passed the layer.
        if u.device != weight.device:
            raise ValueError(f"u is on {u.device} but the parameters of this RoutingCapsules layer "
                             f"are on {weight.device}; move the input or the layer "
                             f"(layer.to({str(u.device)!r}))")
        if u.dtype.is_floating_point and u.dtype != weight.dtype:
            raise TypeError(f"u has dtype {u.dtype} but the parameters of this RoutingCapsules "
                            f"layer are {weight.dtype}; convert the input (u.to({weight.dtype})) "
                            f"or the layer (layer.to({u.dtype}))")
        return ops.capsule_routing(
            u, weight, self.iterations, bias=bias, leaky=self.leaky,
            detach_inner=self.detach_inner, return_coupling=return_coupling,
            prior=prior, temperature=self.temperature, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"in_caps={self.in_caps}, out_caps={self.out_caps}, in_dim={self.in_dim}, "
                f"out_dim={self.out_dim}, iterations={self.iterations}, bias={self.bias is not None}, "
                f"leaky={self.leaky}, detach_inner={self.detach_inner}, prior={self.prior is not None}, "
                f"temperature={self.temperature}, init={self.init!r}, backend={self.backend!r}")
