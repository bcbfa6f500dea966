"""Reductions of parameters and norm parameters (registry kinds ``parameter`` and ``norm``, see
``lnprobe.stats``): Frobenius norms of values and gradients, and the gain/bias statistics of a norm.

All return small float64 device tensors without host synchronisation.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .runtime import fill_view as _fill_view


def norms_of(tensors: list[torch.Tensor], order: Sequence[int] | None = None) -> torch.Tensor:
    """Frobenius norms of a list of tensors as one ``(P,)`` float64 tensor: entry i is the norm of
    ``tensors[order[i]]`` (of ``tensors[i]`` without ``order``). On one device three operations: one
    fused multi-tensor norm, one stack (in ``order``), one conversion."""
    if not tensors:
        return torch.zeros((0,), dtype=torch.float64)
    order = range(len(tensors)) if order is None else order
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    if len(by_device) == 1:
        norms = torch._foreach_norm([t.detach().float() for t in tensors])
        return torch.stack([norms[i] for i in order]).double()
    # Model spread over devices: reduce per device, gather the small results on the first device.
    first = tensors[0].device
    out = torch.empty(len(tensors), dtype=torch.float64, device=first)
    for dev, idx in by_device.items():
        n = torch.stack(torch._foreach_norm([tensors[i].detach().float() for i in idx])).double()
        out[torch.tensor(idx, device=first)] = n.to(first, non_blocking=True)
    return out if order == range(len(tensors)) else torch.stack([out[i] for i in order])


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


def gain_stats_many(
    weights: Sequence[torch.Tensor | None], offsets: Sequence[float], biases: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """``(P, 3)`` float64: ``gain_stats`` of P norms with fused multi-tensor kernels (one device).

    Row p is ``gain_stats(weights[p], offsets[p], biases[p])``; at least one weight or bias overall.
    A fixed number of device operations whatever P: one norm over every γ and β, one max-norm over
    every γ, one division, one stack, one conversion, one square and one stack into the rows (plus
    one addition when a norm has a gain offset).
    """
    present = [t for t in (*weights, *biases) if t is not None]
    if not present:
        raise ValueError("gain_stats_many: expected at least one norm weight or bias, found none")
    dev = present[0].device
    wi = [i for i, w in enumerate(weights) if w is not None]
    bi = [i for i, b in enumerate(biases) if b is not None]
    g = [weights[i].detach().float() for i in wi]
    if any(offsets[i] != 0 for i in wi):
        g = list(torch._foreach_add(g, [float(offsets[i]) for i in wi]))  # new tensors: never touch params
    b = [biases[i].detach().float() for i in bi]
    # mean γ² = (‖γ‖ / sqrt(numel))²; dividing by a Scalar list needs no index/size tensor on the device
    rms = list(torch._foreach_div(torch._foreach_norm(g + b), [math.sqrt(t.numel()) for t in g + b]))
    mx = list(torch._foreach_norm(g, math.inf)) if g else []
    flat = torch.stack(rms + mx).double()  # (W + B + W,): rms γ, rms β, max |γ|
    flat[: len(g) + len(b)].square_()  # mean γ², mean β² (squared in float64)
    one = _fill_view(1.0, 1, torch.float64, dev)[0]  # a norm without gain has γ = 1
    nan = _fill_view(math.nan, 1, torch.float64, dev)[0]  # without bias: NaN (the row is not written)
    gms, gmax, bms = [one] * len(weights), [one] * len(weights), [nan] * len(weights)
    for j, i in enumerate(wi):
        gms[i], gmax[i] = flat[j], flat[len(g) + len(b) + j]
    for j, i in enumerate(bi):
        bms[i] = flat[len(g) + j]
    return torch.stack([v for row in zip(gms, gmax, bms) for v in row]).view(len(weights), 3)  # (P, 3)


def gain_values(weight: torch.Tensor | None, offset: float, bias: torch.Tensor | None) -> torch.Tensor:
    """``gain_stats``, also for an empty local shard (FSDP2 with fewer rows than ranks): there the
    means are NaN and the max is -inf; they carry weight 0 in the cross-rank reduction."""
    if (weight is None or weight.numel()) and (bias is None or bias.numel()):
        return gain_stats(weight, offset, bias)
    dev = (weight if weight is not None else bias).device
    nan = torch.full((), float("nan"), dtype=torch.float64, device=dev)
    w = gain_stats(weight, offset, None)[:2] if weight is not None and weight.numel() else \
        torch.stack([nan, torch.full_like(nan, float("-inf"))])
    b = gain_stats(None, offset, bias)[2:] if bias is not None and bias.numel() else nan.reshape(1)
    return torch.cat([w.to(dev), b.to(dev)])  # (3,)


def norm_param_entries(norms, params: dict) -> list[tuple[str, str | None, str | None, float]]:
    """(norm name, weight name, bias name, gain offset) of every norm in ``norms`` (NormInfo) whose
    gain or bias is among ``params`` (name -> parameter); the gain statistics are read from these."""
    out = []
    for norm in norms:
        w = norm.weight if norm.weight in params else None
        b = norm.bias if norm.bias in params else None
        if w is not None or b is not None:
            out.append((norm.name, w, b, float(norm.gain_offset)))
    return out
