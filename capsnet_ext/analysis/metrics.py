"""Routing diagnostics of a capsule layer, computed over a data set in one streaming pass.

The parse-tree measures follow Mitterreiter, Koch, Giesen & Laue, "Why Capsule Neural Networks
Do Not Scale: Challenging the Dynamic Parse-Tree Assumption" (AAAI 2023); the T- and D-scores
follow Peer, Stabinger & Rodriguez-Sanchez ("Training Deep Capsule Networks", 2018).

Inputs, for one routing layer over ``N`` inputs:

* ``couplings C [N, I, J]``: the coupling coefficients of the last routing iteration, lower
  capsule ``l`` (``I`` of them) to upper capsule ``h`` (``J`` of them). Rows sum to 1, or to
  less than 1 for leaky routing (the "none of the above" share is simply left out: every
  measure below uses the couplings to the real parents only).
* ``lower_lengths [N, I]`` and ``upper_lengths [N, J]`` (optional): the capsule lengths
  ``|u_l|`` and ``|v_h|`` on the same inputs.

Definitions (``tau = 1.5 / J``; ``Ct = C`` where ``C > tau`` and 0 elsewhere):

* **dead capsule**: the mean *and* the standard deviation over inputs of its length are
  both below 0.01 (a capsule that is always short is dead; one that is usually short but
  sometimes long is not). ``dead_rate`` is the fraction of dead lower capsules,
  ``upper_dead_rate`` that of the upper capsules.
* **inactive instance**: lower capsule ``l`` is active on input ``x`` when some coupling
  ``C[x, l, h] > tau``; ``pr_l`` is the fraction of inputs on which it is inactive.
* **vibrance**: ``rate_alive = 1 - dead_rate``; ``rate_active = mean_l (1 - pr_l)``;
  ``rate_active_alive = mean over alive l of (1 - pr_l)`` (NaN when no capsule is alive or
  lengths were not given).
* **bonding strength**: per capsule ``b_l = mean_x max_h Ct[x, l, h] / (1 - pr_l)``, the mean
  largest coupling over the inputs on which ``l`` is active; per layer the average of ``b_l``
  weighted by ``w_l = (1 - pr_l) / sum_l (1 - pr_l)``.
* **dynamics**: per pair ``(l, h)`` the mean ``m`` over active inputs of ``Ct`` and its
  standard deviation over active inputs,
  ``sqrt(max(0, mean_x (Ct - m)^2 / (1 - pr_l) - m^2 pr_l / (1 - pr_l)))`` (the inactive
  inputs, where ``Ct = 0``, are taken back out of the mean over all inputs); per capsule
  ``d_l = mean_h sd_lh / max_{x, h} Ct[x, l, h]`` (the deviation relative to the largest
  coupling ``l`` ever makes, so leaky routing that sums to less than 1 is not penalised);
  per layer the ``w_l``-weighted average of ``d_l`` divided by ``sqrt((1/J)(1 - 1/J))``.
  Routing every input one-hot to a uniformly random parent scores about 1; routing that never
  changes with the input scores 0.
* A capsule that is never active (``pr_l = 1``) has no bonding or dynamics (NaN per capsule)
  and weight 0 in the layer averages; when no capsule is ever active the layer's bonding and
  dynamics are NaN.
* **act_coupling_corr** (the paper's definition, as ``activation_coupling_corr`` in the
  authors' code, EfficientCN ``misc/metrics.py``): Pearson correlation between the
  thresholded largest coupling ``max_h Ct[x, l, h]`` (0 where ``l`` is inactive on ``x``)
  and the length ``|u_l|``, over all ``(x, l)`` pairs (NaN when either is constant).
* **act_coupling_corr_unthresholded**: the same with the raw largest coupling
  ``max_h C[x, l, h]``, which ignores whether the capsule is active; it differs from the
  paper's number whenever some capsules are inactive on some inputs (by a few hundredths on
  typical couplings). Kept for comparison with numbers computed that way.
* **t_score** (Peer et al.): ``1 - mean_{x, l} H(c_{x,l}) / log J`` with ``c`` renormalised to
  sum 1 over the real parents; 1 when every capsule routes one-hot, 0 when uniformly.
* **d_score** (Peer et al.): the largest standard deviation over inputs of an upper capsule's
  length; near 0 when the layer's output hardly depends on the input.
* **lower/upper_mean_length**: mean capsule length over inputs and capsules;
  **lower/upper_squash_slope**: the squash's slope ``d|v|/d|s| = 2|s| / (1 + |s|^2)^2`` at
  each capsule's mean length (``|s|`` recovered from ``|v|``), averaged over capsules: near 0
  for capsules that are either starved or saturated.

Everything is accumulated as float64 sums over chunks of inputs, so a whole test set never has
to be in memory, and chunked and unchunked results agree to rounding.

Departures from the authors' code (EfficientCN ``misc/metrics.py``), where there are any:
its functions add ``1e-9`` to denominators (``1 - pr_l + 1e-9``); here a never-active capsule
gets NaN and weight 0 instead, and the layer's values are NaN when no capsule is ever active.
The threshold, the dead-capsule rule, bonding, dynamics and the activation-coupling
correlation follow its definitions.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Tuple, Union

import numpy as np
import torch

DEAD_THRESHOLD = 0.01
TAU_FACTOR = 1.5
_ROW_SUM_SLACK = 1e-3  # couplings are softmax outputs; rows may exceed 1 only by rounding

Chunk = Union[torch.Tensor, Tuple, Dict]


def squash_slope(s_norm: torch.Tensor) -> torch.Tensor:
    """Slope of the squash's length map ``|v| = |s|^2 / (1 + |s|^2)``:
    ``d|v|/d|s| = 2 |s| / (1 + |s|^2)^2`` (largest, about 0.65, at ``|s| = 1/sqrt(3)``;
    it vanishes both for short and for long vectors)."""
    s_norm = torch.as_tensor(s_norm)
    return 2 * s_norm / (1 + s_norm * s_norm) ** 2


def squash_input_norm(v_norm: torch.Tensor) -> torch.Tensor:
    """Invert the squash's length map: ``|s| = sqrt(|v| / (1 - |v|))`` for ``0 <= |v| < 1``."""
    v_norm = torch.as_tensor(v_norm)
    v = v_norm.clamp(0.0, 1.0 - torch.finfo(v_norm.dtype).eps)
    return torch.sqrt(v / (1 - v))


def squash_slope_at_length(v_norm: torch.Tensor) -> torch.Tensor:
    """Squash slope ``d|v|/d|s|`` where a capsule of length ``|v|`` sits."""
    return squash_slope(squash_input_norm(v_norm))


def _check_chunk(name: str, x, rank: int, layout: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array {layout}, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point {layout}, got dtype {x.dtype}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions {layout}, got shape {tuple(x.shape)}")
    return x.detach()


class RoutingMetricsAccumulator:
    """Streaming accumulator of :func:`routing_metrics` for one routing layer.

    Call :meth:`update` with consecutive chunks of inputs (``couplings [n, I, J]`` and,
    optionally, ``lower_lengths [n, I]``, ``upper_lengths [n, J]``; give the lengths with
    every chunk or with none), then :meth:`compute`. Sums are kept in float64 on the device
    of the first chunk.
    """

    def __init__(self):
        self.num_inputs = 0
        self.I: Optional[int] = None
        self.J: Optional[int] = None
        self._has_lower: Optional[bool] = None
        self._has_upper: Optional[bool] = None

    # -- accumulation --------------------------------------------------------------------
    def _init_sums(self, I: int, J: int, device: torch.device) -> None:
        f64 = dict(dtype=torch.float64, device=device)
        self.I, self.J = I, J
        self.tau = TAU_FACTOR / J
        self.active_count = torch.zeros(I, **f64)     # inputs on which l is active
        self.max_sum = torch.zeros(I, **f64)          # sum_x max_h Ct[x, l, h]
        self.max_ever = torch.zeros(I, **f64)         # max_{x, h} Ct[x, l, h]
        self.ct_sum = torch.zeros(I, J, **f64)        # sum_x Ct
        self.ct_sq_sum = torch.zeros(I, J, **f64)     # sum_x Ct^2
        self.entropy_sum = torch.zeros((), **f64)     # sum_{x, l} H(c_{x, l}) / log J
        self.lower_sum = torch.zeros(I, **f64)
        self.lower_sq_sum = torch.zeros(I, **f64)
        self.upper_sum = torch.zeros(J, **f64)
        self.upper_sq_sum = torch.zeros(J, **f64)
        # Pearson moments of (largest coupling, lower length) over (x, l) pairs: with the
        # thresholded coupling (the paper's) and with the raw one.
        self.corr_sums = torch.zeros(5, **f64)        # sx, sy, sxx, syy, sxy
        self.corr_sums_raw = torch.zeros(5, **f64)

    def update(self, couplings, lower_lengths=None, upper_lengths=None) -> "RoutingMetricsAccumulator":
        C = _check_chunk("couplings", couplings, 3, "[N, I, J]")
        n, I, J = C.shape
        if I < 1 or J < 1:
            raise ValueError(f"couplings must have at least one lower and one upper capsule, got shape {tuple(C.shape)}")
        if J < 2:
            raise ValueError(f"couplings need J >= 2 upper capsules (with J = 1 every coupling is fixed), "
                             f"got shape {tuple(C.shape)}")
        if self.I is None:
            self._init_sums(I, J, C.device)
            self._has_lower = lower_lengths is not None
            self._has_upper = upper_lengths is not None
        elif (I, J) != (self.I, self.J):
            raise ValueError(f"couplings chunk has shape {tuple(C.shape)} but earlier chunks had "
                             f"[*, {self.I}, {self.J}]")
        if (lower_lengths is not None) != self._has_lower or (upper_lengths is not None) != self._has_upper:
            raise ValueError("lower_lengths / upper_lengths must be given with every chunk or with none")
        if n == 0:
            return self
        C = C.to(self.active_count.device, torch.float64)
        if not bool(torch.isfinite(C).all()):
            raise ValueError("couplings contain NaN or inf")
        if float(C.min()) < 0 or float(C.sum(-1).max()) > 1 + _ROW_SUM_SLACK:
            raise ValueError("couplings must be coupling coefficients: non-negative with rows summing to at "
                             f"most 1 over J, got values in [{float(C.min()):.4g}, {float(C.max()):.4g}] and "
                             f"row sums up to {float(C.sum(-1).max()):.4g} (were logits passed?)")

        lower = upper = None
        if lower_lengths is not None:
            lower = _check_chunk("lower_lengths", lower_lengths, 2, "[N, I]")
            if tuple(lower.shape) != (n, I):
                raise ValueError(f"lower_lengths must have shape [N, I] = {(n, I)}, got {tuple(lower.shape)}")
            lower = lower.to(C.device, torch.float64)
        if upper_lengths is not None:
            upper = _check_chunk("upper_lengths", upper_lengths, 2, "[N, J]")
            if tuple(upper.shape) != (n, J):
                raise ValueError(f"upper_lengths must have shape [N, J] = {(n, J)}, got {tuple(upper.shape)}")
            upper = upper.to(C.device, torch.float64)

        self.num_inputs += n
        Ct = torch.where(C > self.tau, C, torch.zeros((), dtype=C.dtype, device=C.device))
        ct_max = Ct.amax(dim=-1)                                  # [n, I]; 0 where inactive
        self.active_count += (ct_max > 0).sum(0)
        self.max_sum += ct_max.sum(0)
        self.max_ever = torch.maximum(self.max_ever, ct_max.amax(0))
        self.ct_sum += Ct.sum(0)
        self.ct_sq_sum += (Ct * Ct).sum(0)

        p = C / C.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        entropy = -(torch.special.xlogy(p, p)).sum(-1)           # [n, I], 0 log 0 = 0
        self.entropy_sum += entropy.sum() / math.log(J)

        if lower is not None:
            self.lower_sum += lower.sum(0)
            self.lower_sq_sum += (lower * lower).sum(0)
            for sums, x in ((self.corr_sums, ct_max), (self.corr_sums_raw, C.amax(dim=-1))):
                sums += torch.stack([x.sum(), lower.sum(), (x * x).sum(), (lower * lower).sum(),
                                     (x * lower).sum()])
        if upper is not None:
            self.upper_sum += upper.sum(0)
            self.upper_sq_sum += (upper * upper).sum(0)
        return self

    # -- results -------------------------------------------------------------------------
    @staticmethod
    def _mean_std(total: torch.Tensor, sq_total: torch.Tensor, n: int):
        mean = total / n
        std = (sq_total / n - mean * mean).clamp_min(0).sqrt()
        return mean, std

    def compute(self) -> Dict[str, object]:
        """The metrics as a dict: scalars (Python floats) and, under ``"per_capsule"``,
        numpy arrays (see the module docstring for every definition)."""
        if self.num_inputs == 0:
            raise ValueError("no inputs: routing metrics need at least one input (couplings with N >= 1)")
        n, J = self.num_inputs, self.J
        nan = float("nan")
        active_frac = self.active_count / n                       # 1 - pr_l
        pr = 1 - active_frac
        ever_active = self.active_count > 0
        weights = active_frac / active_frac.sum() if bool(ever_active.any()) else torch.zeros_like(active_frac)
        safe_count = self.active_count.clamp_min(1)

        bonding_l = torch.where(ever_active, self.max_sum / safe_count, torch.full_like(pr, nan))
        m = self.ct_sum / safe_count[:, None]                     # mean over active inputs
        var = (self.ct_sq_sum / safe_count[:, None] - m * m).clamp_min(0)
        sd_mean = var.sqrt().mean(-1)
        dynamics_l = torch.where(ever_active, sd_mean / self.max_ever.clamp_min(torch.finfo(torch.float64).tiny),
                                 torch.full_like(pr, nan))
        uniform_sd = math.sqrt((1.0 / J) * (1.0 - 1.0 / J))
        if bool(ever_active.any()):
            bonding = float((weights * bonding_l.nan_to_num(0.0)).sum())
            dynamics = float((weights * dynamics_l.nan_to_num(0.0)).sum()) / uniform_sd
        else:
            bonding = dynamics = nan

        out: Dict[str, object] = dict(
            num_inputs=n, lower_capsules=self.I, upper_capsules=J, tau=self.tau,
            inactive_rate=float(pr.mean()),
            rate_active=float(active_frac.mean()),
            bonding=bonding, dynamics=dynamics,
            t_score=float(1 - self.entropy_sum / (n * self.I)),
            dead_rate=nan, upper_dead_rate=nan, rate_alive=nan, rate_active_alive=nan,
            act_coupling_corr=nan, act_coupling_corr_unthresholded=nan, d_score=nan,
            lower_mean_length=nan, upper_mean_length=nan,
            lower_squash_slope=nan, upper_squash_slope=nan,
        )
        per_capsule = dict(pr=pr.cpu().numpy(), bonding=bonding_l.cpu().numpy(),
                           dynamics=dynamics_l.cpu().numpy() / uniform_sd, weight=weights.cpu().numpy())
        if self._has_lower:
            mean, std = self._mean_std(self.lower_sum, self.lower_sq_sum, n)
            dead = (mean < DEAD_THRESHOLD) & (std < DEAD_THRESHOLD)
            alive = ~dead
            out["dead_rate"] = float(dead.double().mean())
            out["rate_alive"] = 1.0 - out["dead_rate"]
            if bool(alive.any()):
                out["rate_active_alive"] = float(active_frac[alive].mean())
            out["lower_mean_length"] = float(mean.mean())
            out["lower_squash_slope"] = float(squash_slope_at_length(mean).mean())
            out["act_coupling_corr"] = _pearson(self.corr_sums, n * self.I)
            out["act_coupling_corr_unthresholded"] = _pearson(self.corr_sums_raw, n * self.I)
            per_capsule.update(lower_dead=dead.cpu().numpy(), lower_mean_length=mean.cpu().numpy(),
                               lower_std_length=std.cpu().numpy())
        if self._has_upper:
            mean, std = self._mean_std(self.upper_sum, self.upper_sq_sum, n)
            dead = (mean < DEAD_THRESHOLD) & (std < DEAD_THRESHOLD)
            out["upper_dead_rate"] = float(dead.double().mean())
            out["d_score"] = float(std.max())
            out["upper_mean_length"] = float(mean.mean())
            out["upper_squash_slope"] = float(squash_slope_at_length(mean).mean())
            per_capsule.update(upper_dead=dead.cpu().numpy(), upper_mean_length=mean.cpu().numpy(),
                               upper_std_length=std.cpu().numpy())
        out["per_capsule"] = per_capsule
        return out


def _pearson(sums: torch.Tensor, k: int) -> float:
    """Pearson r from the sums ``(sx, sy, sxx, syy, sxy)`` of ``k`` pairs; NaN when either
    variable is constant."""
    sx, sy, sxx, syy, sxy = sums.tolist()
    cov = sxy / k - (sx / k) * (sy / k)
    var_x, var_y = sxx / k - (sx / k) ** 2, syy / k - (sy / k) ** 2
    if var_x > 1e-12 and var_y > 1e-12:
        return float(np.clip(cov / math.sqrt(var_x * var_y), -1.0, 1.0))
    return float("nan")


def _as_chunk_tuple(chunk: Chunk):
    if isinstance(chunk, dict):
        unknown = set(chunk) - {"couplings", "lower_lengths", "upper_lengths"}
        if unknown or "couplings" not in chunk:
            raise ValueError("a chunk given as a dict needs the key 'couplings' and optionally "
                             f"'lower_lengths', 'upper_lengths'; got keys {sorted(chunk)}")
        return chunk["couplings"], chunk.get("lower_lengths"), chunk.get("upper_lengths")
    if isinstance(chunk, (tuple, list)):
        if not 1 <= len(chunk) <= 3:
            raise ValueError(f"a chunk given as a tuple must be (couplings[, lower_lengths[, upper_lengths]]), "
                             f"got {len(chunk)} items")
        return tuple(chunk) + (None,) * (3 - len(chunk))
    return chunk, None, None


def routing_metrics(
    couplings: Union[torch.Tensor, np.ndarray, Iterable[Chunk]],
    lower_lengths: Optional[torch.Tensor] = None,
    upper_lengths: Optional[torch.Tensor] = None,
    chunk_size: int = 1024,
) -> Dict[str, object]:
    """Every routing diagnostic of one layer (definitions in the module docstring).

    Args:
        couplings: ``[N, I, J]`` coupling coefficients (tensor or numpy array), or an iterable
            of chunks over the inputs, each ``C [n, I, J]``, a tuple ``(C, lower, upper)``
            (``None`` for a missing one) or a dict with those keys, so a whole test set never
            has to be in memory. With chunks, ``lower_lengths``/``upper_lengths`` must be None.
        lower_lengths: ``[N, I]`` lower capsule lengths (dead rate, vibrance among alive,
            activation-coupling correlation).
        upper_lengths: ``[N, J]`` upper capsule lengths (upper dead rate, D-score).
        chunk_size: inputs processed at a time when ``couplings`` is one array.
    Returns:
        dict with ``dead_rate``, ``upper_dead_rate``, ``inactive_rate``, ``rate_alive``,
        ``rate_active``, ``rate_active_alive``, ``bonding``, ``dynamics``,
        ``act_coupling_corr`` (the paper's, thresholded), ``act_coupling_corr_unthresholded``,
        ``t_score``, ``d_score``, ``lower_mean_length``,
        ``upper_mean_length``, ``lower_squash_slope``, ``upper_squash_slope``, ``tau``,
        ``num_inputs``, ``lower_capsules``, ``upper_capsules`` (floats/ints; NaN where the
        needed lengths were not given or the value is undefined) and ``per_capsule`` (numpy
        arrays ``pr``, ``bonding``, ``dynamics``, ``weight`` and, with lengths, dead masks
        and length statistics).
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    acc = RoutingMetricsAccumulator()
    if isinstance(couplings, (torch.Tensor, np.ndarray)):
        C = _check_chunk("couplings", couplings, 3, "[N, I, J]")
        if C.shape[0] == 0:
            raise ValueError(f"couplings is empty: got shape {tuple(C.shape)}, need N >= 1 inputs")
        N = C.shape[0]
        for name, x in (("lower_lengths", lower_lengths), ("upper_lengths", upper_lengths)):
            if x is not None and (not hasattr(x, "shape") or len(x.shape) < 1 or x.shape[0] != N):
                raise ValueError(f"{name} must have N = {N} rows like couplings, got shape "
                                 f"{tuple(getattr(x, 'shape', ()))}")
        for start in range(0, N, chunk_size):
            stop = start + chunk_size
            acc.update(C[start:stop],
                       None if lower_lengths is None else lower_lengths[start:stop],
                       None if upper_lengths is None else upper_lengths[start:stop])
        return acc.compute()
    if lower_lengths is not None or upper_lengths is not None:
        raise ValueError("with an iterable of chunks, pass the lengths inside each chunk "
                         "as (couplings, lower_lengths, upper_lengths)")
    try:
        iterator = iter(couplings)
    except TypeError:
        raise TypeError("couplings must be a tensor/array [N, I, J] or an iterable of chunks, "
                        f"got {type(couplings).__name__}") from None
    for chunk in iterator:
        acc.update(*_as_chunk_tuple(chunk))
    if acc.num_inputs == 0:
        raise ValueError("couplings is empty: the iterable gave no inputs (need N >= 1)")
    return acc.compute()


SCALAR_KEYS = ("dead_rate", "upper_dead_rate", "inactive_rate", "rate_alive", "rate_active",
               "rate_active_alive", "bonding", "dynamics", "act_coupling_corr",
               "act_coupling_corr_unthresholded", "t_score", "d_score",
               "lower_mean_length", "upper_mean_length", "lower_squash_slope", "upper_squash_slope")
