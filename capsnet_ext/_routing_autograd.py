"""The autograd plumbing every kernel backend's routing ops share: what the forward saves,
which gradients the backward is asked for, and how the backward's results map back onto the
op's inputs. The reference needs none of it (autograd differentiates it directly); the CUDA
backend's registered operators (:mod:`capsnet_ext.cuda_ops._schema`) and the Triton backend's
autograd.Functions and registered operators (:mod:`capsnet_ext.triton_ops._gemm_core`) all go
through it, so the rules below are stated once.

Every routing forward op of a backend takes its inputs in one order,

    ``*sources, bias, prior, iterations, leaky, detach_inner, return_coupling, temperature``

with ``sources`` either ``(u_hat,)`` (``dynamic_routing``) or ``(u, W)`` (``capsule_routing``),
and returns ``(v, c, s_all, V_all)``: the output capsules, the last couplings (empty unless
``return_coupling``) and the routing state of every iteration, ``s_all [R, B, J, D]`` (each
iteration's ``s``, bias included) and ``V_all [R, B, J, D]`` (the running sums of the earlier
outputs), in the accumulation dtype. The couplings and the state carry no gradient.

Saved for the backward: the sources and the prior (the caller's tensors, no copies) and
``s_all``, ``V_all``; nothing of size ``B * I * J * D``. A backend's backward is a callable

    ``backward(grad_v, sources, prior, s_all, V_all, options, need) -> (source_grads, d_bias,
    d_prior)``

where ``options`` is a :class:`RoutingOptions` and ``need`` a :class:`NeededGrads`; it returns
a gradient for every source (``None`` where not needed), the bias gradient (any floating dtype:
it is cast to the bias's) and the prior gradient.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch

# iterations, leaky, detach_inner, return_coupling, temperature: the inputs after the prior.
N_OPTIONS = 5


class RoutingOptions(NamedTuple):
    """The non-tensor inputs the backward needs; ``extra``: a backend's own inputs after
    ``temperature`` (the CUDA ops' ``lane_samples``), as the forward got them."""
    iterations: int
    leaky: bool
    detach_inner: bool
    temperature: float
    extra: tuple = ()


class NeededGrads(NamedTuple):
    """Which gradients the backward must compute: one flag per source, the bias, the prior
    (``False`` when there is none)."""
    sources: Tuple[bool, ...]
    bias: bool
    prior: bool


def split_inputs(inputs: Sequence, n_sources: int):
    """``(sources, bias, prior, RoutingOptions)`` of a routing op's inputs."""
    sources = tuple(inputs[:n_sources])
    bias, prior, iterations, leaky, detach_inner, _return_coupling, temperature = (
        inputs[n_sources:])
    return sources, bias, prior, RoutingOptions(int(iterations), bool(leaky),
                                                bool(detach_inner), float(temperature))


def save(ctx, sources: Sequence[torch.Tensor], bias: Optional[torch.Tensor],
         prior: Optional[torch.Tensor], s_all: torch.Tensor, V_all: torch.Tensor,
         options: RoutingOptions) -> None:
    """Keep what the backward needs on ``ctx``."""
    ctx.save_for_backward(*sources, prior, s_all, V_all)
    ctx.n_sources = len(sources)
    ctx.routing_options = options
    ctx.bias_dtype = None if bias is None else bias.dtype


def setup_context(ctx, inputs, output, n_options: int = N_OPTIONS) -> None:
    """``setup_context`` of a registered routing forward op (see the module docstring for
    the input and output order). A backend whose ops take further non-tensor inputs after
    ``temperature`` (the CUDA ops' ``lane_samples``) passes their total as ``n_options``."""
    n_sources = len(inputs) - 2 - n_options
    sources, bias, prior, options = split_inputs(inputs[:len(inputs) - n_options + N_OPTIONS], n_sources)
    options = options._replace(extra=tuple(inputs[len(inputs) - n_options + N_OPTIONS:]))
    ctx.n_options = n_options
    _, c, s_all, V_all = output
    ctx.mark_non_differentiable(c, s_all, V_all)
    save(ctx, sources, bias, prior, s_all, V_all, options)


def needed(ctx) -> NeededGrads:
    """The gradients autograd asks of the backward (``ctx.needs_input_grad`` in the input
    order above)."""
    n = ctx.n_sources
    need = ctx.needs_input_grad
    prior = ctx.saved_tensors[n]
    return NeededGrads(tuple(bool(x) for x in need[:n]),
                       ctx.bias_dtype is not None and bool(need[n]),
                       prior is not None and bool(need[n + 1]))


Backward = Callable[..., Tuple[Sequence[Optional[torch.Tensor]], Optional[torch.Tensor],
                               Optional[torch.Tensor]]]


def run_backward(ctx, grad_v: torch.Tensor, backward: Backward) -> tuple:
    """Gradients of every input of the routing op, in order (``None`` for the non-tensor
    inputs and for what was not asked), from the backend's ``backward``."""
    saved = ctx.saved_tensors
    n = ctx.n_sources
    sources, (prior, s_all, V_all) = saved[:n], saved[n:]
    need = needed(ctx)
    source_grads, d_bias, d_prior = backward(grad_v, sources, prior, s_all, V_all,
                                             ctx.routing_options, need)
    grads = [g if wanted else None for g, wanted in zip(source_grads, need.sources)]
    grads.append(d_bias.to(ctx.bias_dtype) if need.bias else None)
    grads.append(d_prior if need.prior else None)
    return tuple(grads) + (None,) * getattr(ctx, "n_options", N_OPTIONS)


def make_backward_formula(backward: Backward):
    """The ``backward`` to register with :func:`torch.library.register_autograd` for a
    routing forward op whose outputs are ``(v, c, s_all, V_all)``."""
    def formula(ctx, grad_v, *unused_grads):
        return run_backward(ctx, grad_v, backward)

    return formula
