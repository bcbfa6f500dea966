"""Statistic registry: pure tensor reductions of one activation, one gradient or one parameter.

Everything here runs on the tensor's own device and returns small device tensors: no host
synchronisation (no ``.item()``, ``.cpu()``, ``bool(tensor)``), so these functions can run inside
forward hooks during GPU training. Reductions are done in float32 whatever the input dtype.

Two stages:

1. ``reduce_activation(x)`` / ``reduce_gradient(g)`` turn one forward call's tensor into a *partial*:
   additive moments, top-k candidates, counts and a subsample for the median. Partials of several
   micro-batches (gradient accumulation) merge exactly: sums add, maxima take the max of maxima.
2. ``finalize_activation(partials)`` / ``finalize_gradient(partials)`` merge the partials of one
   optimizer step and return the recorded statistics.

Definitions (x flattened to ``(N, D)`` tokens × channels; ``token`` is the sequence position, the
second-to-last dimension of x, so batch rows are folded together):

- ``m2``: mean of x² over all elements; ``rms`` = sqrt(m2).
- ``var``: per-token variance over channels (divide by D), averaged over tokens — what LayerNorm sees.
- ``kurtosis``: per-token non-excess kurtosis over channels (3 for a Gaussian), averaged over tokens;
  a token with zero variance contributes 0.
- ``absmax``/``top1..top3``: the three largest |x| with their token and channel (exact, see below).
- ``median_abs``: median of |x|, ESTIMATED from a strided subsample of about ``MEDIAN_SAMPLE``
  elements (stride coprime with D, so every channel and every token is visited evenly). For n samples
  the standard error of a sample median is about 1.25·σ_|x|/sqrt(n), i.e. ≈1.2 % of the median of
  |x| for Gaussian data at n = 8192; exact when the tensor has at most ``MEDIAN_SAMPLE`` elements.
- ``nonfinite``: count of NaN/Inf; ``over_fp16``: count of |x| > 65504.
- ``massive``: count of elements with |x| > 100 and |x| ≥ 1000 × median_abs (Sun et al. 2024), the
  median being the estimate of the same forward call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FP16_MAX = 65504.0
MASSIVE_ABS = 100.0
MASSIVE_RATIO = 1000.0
MEDIAN_SAMPLE = 8192
TOPK = 3

ACTIVATION_STATS: tuple[str, ...] = (
    "m2", "var", "rms", "absmax", "top1", "top2", "top3", "median_abs",
    "kurtosis", "nonfinite", "over_fp16", "massive",
)
GRADIENT_STATS: tuple[str, ...] = ("grad_rms", "grad_absmax")
PARAM_STATS: tuple[str, ...] = ("grad_norm", "param_norm")
NORM_STATS: tuple[str, ...] = ("gain_ms", "gain_absmax", "bias_ms")
LOCATED_STATS = frozenset({"absmax", "top1", "top2", "top3"})
# The default set leaves out only per-token kurtosis (it needs a centred copy of the tensor).
DEFAULT_ACTIVATION_STATS: tuple[str, ...] = tuple(s for s in ACTIVATION_STATS if s != "kurtosis")

# Index of each field in a partial's value vector.
_SUMSQ, _SUMVAR, _SUMKURT, _NONFINITE, _OVER16, _MASSIVE = range(6)
_N_SCALARS = 6


def check_stats(stats: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate requested activation statistics; raise ValueError naming the unknown ones."""
    unknown = [s for s in stats if s not in ACTIVATION_STATS]
    if unknown:
        raise ValueError(
            f"unknown statistic(s) {unknown}: expected a subset of {list(ACTIVATION_STATS)}; "
            "pass stats='all' for every statistic or leave it out for the default set"
        )
    return tuple(s for s in ACTIVATION_STATS if s in stats)  # canonical order


@dataclass
class ActivationPartial:
    """Mergeable reduction of one forward call. All tensors live on the activation's device."""

    scalars: torch.Tensor  # (6,) float32: sum x², Σ_tok var, Σ_tok kurt, #nonfinite, #>fp16, #massive
    top_vals: torch.Tensor  # (k,) float32, k ≤ 3: largest |x|
    top_tok: torch.Tensor  # (k,) int64: sequence position of each
    top_ch: torch.Tensor  # (k,) int64: channel of each
    sample: torch.Tensor | None  # (n,) float32 subsample of |x| for the median
    n_elem: int
    n_tok: int


@dataclass
class GradientPartial:
    sumsq: torch.Tensor  # () float32
    absmax: torch.Tensor  # () float32
    n_elem: int


@dataclass
class StatPlan:
    """Which groups of work a set of statistics needs (decided once, off the hot path)."""

    stats: tuple[str, ...]
    moments: bool = field(init=False)
    var: bool = field(init=False)
    kurtosis: bool = field(init=False)
    topk: bool = field(init=False)
    median: bool = field(init=False)
    counts: bool = field(init=False)

    def __post_init__(self) -> None:
        s = set(self.stats)
        self.moments = bool(s & {"m2", "rms"})
        self.var = "var" in s
        self.kurtosis = "kurtosis" in s
        self.topk = bool(s & LOCATED_STATS)
        self.median = bool(s & {"median_abs", "massive"})
        self.counts = bool(s & {"nonfinite", "over_fp16", "massive"})


def _median_stride(numel: int, d: int) -> int:
    """Smallest stride ≥ numel / MEDIAN_SAMPLE that is coprime with d (visits all channels)."""
    stride = max(1, numel // MEDIAN_SAMPLE)
    while math.gcd(stride, d) != 1:
        stride += 1
    return stride


def reduce_activation(x: torch.Tensor, plan: StatPlan) -> ActivationPartial:
    """Reduce one activation tensor ``(..., T, D)`` to a mergeable partial without host syncs."""
    d = x.shape[-1]
    t = x.shape[-2] if x.dim() >= 2 else 1
    xf = x.detach().reshape(-1, d).float()  # (N, D), N = tokens of all batch rows
    n_tok, n_elem = xf.shape[0], xf.numel()
    zero = xf.new_zeros(())
    sumsq = sumvar = sumkurt = nonfinite = over16 = massive = zero

    if plan.moments or plan.var:
        x2 = xf * xf  # (N, D)
        ms_tok = x2.mean(-1)  # (N,)
        sumsq = ms_tok.sum() * d
        if plan.var and not plan.kurtosis:
            mu = xf.mean(-1)  # (N,)
            sumvar = (ms_tok - mu * mu).clamp_min(0).sum()
    if plan.kurtosis:
        c = xf - xf.mean(-1, keepdim=True)  # (N, D) centred per token
        c2 = c * c
        var_tok = c2.mean(-1)  # (N,)
        m4_tok = (c2 * c2).mean(-1)  # (N,)
        kurt = torch.where(var_tok > 0, m4_tok / var_tok.square().clamp_min(1e-30), torch.zeros_like(var_tok))
        sumvar = var_tok.sum()
        sumkurt = kurt.sum()

    a = xf.abs()  # (N, D)
    k = min(TOPK, n_elem)
    if plan.topk and k > 0:
        # Exact top-k in one pass over the tensor: the k largest elements lie in the k tokens with the
        # largest per-token maximum, so only those k rows need a second look.
        tok_max = a.amax(-1)  # (N,)
        kt = min(k, n_tok)
        _, tok_idx = tok_max.topk(kt)  # (kt,)
        rows = a.index_select(0, tok_idx)  # (kt, D)
        top_vals, flat = rows.reshape(-1).topk(k)  # (k,)
        top_tok = tok_idx[flat // d] % t
        top_ch = flat % d
    else:
        top_vals = a.new_zeros((0,))
        top_tok = top_ch = torch.zeros((0,), dtype=torch.long, device=a.device)

    sample = None
    if plan.median:
        sample = a.reshape(-1)[:: _median_stride(n_elem, d)]  # (≈MEDIAN_SAMPLE,)
    if plan.counts:
        nonfinite = (~torch.isfinite(xf)).sum().float()
        over16 = (a > FP16_MAX).sum().float()
        if sample is not None:
            med = sample.median()
            massive = ((a > MASSIVE_ABS) & (a >= MASSIVE_RATIO * med)).sum().float()

    scalars = torch.stack([sumsq, sumvar, sumkurt, nonfinite, over16, massive])  # (6,)
    return ActivationPartial(scalars, top_vals, top_tok, top_ch, sample, n_elem, n_tok)


def finalize_activation(parts: list[ActivationPartial], stats: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the partials of one step; return ``values (S,)`` float64 and ``loc (2, S)`` float64.

    ``loc[0]`` is the token, ``loc[1]`` the channel of located statistics, NaN elsewhere. The order of
    the S entries is the order of ``stats``.
    """
    n_elem = sum(p.n_elem for p in parts)
    n_tok = sum(p.n_tok for p in parts)
    sc = parts[0].scalars if len(parts) == 1 else torch.stack([p.scalars for p in parts]).sum(0)  # (6,)
    device = sc.device
    nan = torch.full((), float("nan"), device=device)
    if any(s in LOCATED_STATS for s in stats):
        if len(parts) == 1:
            vals, tok, ch = parts[0].top_vals, parts[0].top_tok, parts[0].top_ch
        else:
            cand = torch.cat([p.top_vals for p in parts])  # (≤3C,)
            vals, order = cand.topk(min(TOPK, cand.numel()))
            tok = torch.cat([p.top_tok for p in parts])[order]
            ch = torch.cat([p.top_ch for p in parts])[order]
        pad = TOPK - vals.numel()
        if pad > 0:  # fewer than 3 elements in the tensor
            vals = torch.cat([vals, nan.expand(pad)])
            tok = torch.cat([tok.float(), nan.expand(pad)])
            ch = torch.cat([ch.float(), nan.expand(pad)])
    median = None
    if "median_abs" in stats:
        samples = [p.sample for p in parts if p.sample is not None]
        median = (samples[0] if len(samples) == 1 else torch.cat(samples)).median()

    values, toks, chans = [], [], []
    for s in stats:
        tk = chn = nan
        if s == "m2":
            v = sc[_SUMSQ] / n_elem
        elif s == "rms":
            v = (sc[_SUMSQ] / n_elem).sqrt()
        elif s == "var":
            v = sc[_SUMVAR] / n_tok
        elif s == "kurtosis":
            v = sc[_SUMKURT] / n_tok
        elif s in LOCATED_STATS:
            i = 0 if s in ("absmax", "top1") else int(s[-1]) - 1
            v, tk, chn = vals[i], tok[i], ch[i]
        elif s == "median_abs":
            v = median
        elif s == "nonfinite":
            v = sc[_NONFINITE]
        elif s == "over_fp16":
            v = sc[_OVER16]
        elif s == "massive":
            v = sc[_MASSIVE]
        else:  # pragma: no cover - check_stats guards this
            raise KeyError(s)
        values.append(v.float())
        toks.append(tk.float() if torch.is_tensor(tk) else tk)
        chans.append(chn.float() if torch.is_tensor(chn) else chn)
    out = torch.stack(values).double()  # (S,)
    loc = torch.stack([torch.stack(toks), torch.stack(chans)]).double()  # (2, S)
    return out, loc


def reduce_gradient(g: torch.Tensor) -> GradientPartial:
    """Reduce one hidden-state gradient (any shape) to sum of squares and max |g|."""
    gf = g.detach().float()
    return GradientPartial(gf.square().sum(), gf.abs().amax(), gf.numel())


def finalize_gradient(parts: list[GradientPartial], loss_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(2,)`` float64: grad_rms and grad_absmax over all micro-batches, divided by the AMP loss scale."""
    n = sum(p.n_elem for p in parts)
    sumsq = torch.stack([p.sumsq for p in parts]).sum()
    absmax = torch.stack([p.absmax for p in parts]).amax()
    out = torch.stack([(sumsq / n).sqrt(), absmax]).double()  # (2,)
    if loss_scale is not None:
        out = out / loss_scale.double()
    return out


def norms_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Frobenius norms of a list of tensors as one ``(P,)`` float64 tensor (fused where possible)."""
    if not tensors:
        return torch.zeros((0,), dtype=torch.float64)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    if len(by_device) == 1:
        return torch.stack(torch._foreach_norm([t.detach().float() for t in tensors])).double()
    # Model spread over devices: reduce per device, gather the small results on the first device.
    first = tensors[0].device
    out = torch.empty(len(tensors), dtype=torch.float64, device=first)
    for dev, idx in by_device.items():
        n = torch.stack(torch._foreach_norm([tensors[i].detach().float() for i in idx])).double()
        out[torch.tensor(idx, device=first)] = n.to(first, non_blocking=True)
    return out


def gain_stats(weight: torch.Tensor | None, offset: float, bias: torch.Tensor | None) -> torch.Tensor:
    """``(3,)`` float64: gain_ms = mean γ², gain_absmax = max |γ| with γ = offset + w, and bias_ms = mean β².

    A norm without gain has γ = 1; without bias the bias entry is NaN (the row is not written).
    """
    dev = (weight if weight is not None else bias).device if (weight is not None or bias is not None) else None
    if weight is not None:
        g = weight.detach().float() + offset
        gms, gmax = g.square().mean(), g.abs().amax()
    else:
        gms = gmax = torch.ones((), device=dev)
    bms = bias.detach().float().square().mean() if bias is not None else torch.full((), float("nan"), device=dev)
    return torch.stack([gms, gmax, bms]).double()
