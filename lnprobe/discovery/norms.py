"""Norms on the residual path: the norms outside the blocks (embedding norm, final norm), and the
kind (LayerNorm vs RMSNorm) and gain offset (`w` vs Gemma's `1 + w`) of every residual norm, fitted
from its traced input and output."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..sites import NORM_ROLES, NormInfo
from .modules import norm_eps, norm_params
from .trace import Call, Pt, Trace, amax, close, norm_io, outermost_norms, rel_tol

if TYPE_CHECKING:
    from .blocks import BlockResult


def _fit_norm(x: torch.Tensor, y: torch.Tensor, m: nn.Module, low_precision: bool
             ) -> tuple[str, float]:
    """(kind, gain_offset) of a norm from its traced input x and output y, both (..., D).

    Tries output = z / sqrt(s + eps) * (offset + w) + b with z = x - mean(x) (LayerNorm) or x
    (RMSNorm), s = mean(z²) per token, offset 0 or 1, and eps the module's own or, if it has
    none, the per-token median implied by the data. The best fit within tolerance wins; a tie
    between kinds (input already centred) goes to the class name ("RMS"). Sharded (FSDP2) gain
    and bias are read whole, see `_whole`."""
    weight, bias = (_whole(p) for p in norm_params(m))
    x64 = x.reshape(-1, x.shape[-1]).double()                          # (N, D)
    y64 = y.reshape(-1, y.shape[-1]).double()                          # (N, D)
    if weight is not None and weight.shape != x64.shape[-1:]:
        return "unknown", 0.0
    w = None if weight is None else weight.double().to(x64.device)
    b = 0.0 if bias is None else bias.double().to(x64.device)
    target = y64 - b                                                   # (N, D)
    scale = max(amax(y64), 1e-30)
    tol = 3e-2 if low_precision else 1e-3
    fits = []
    for kind in ("layernorm", "rmsnorm"):
        z = x64 - x64.mean(-1, keepdim=True) if kind == "layernorm" else x64  # (N, D)
        s = z.square().mean(-1, keepdim=True)                          # (N, 1)
        for offset in ((0.0, 1.0) if w is not None else (0.0,)):
            g = 1.0 if w is None else w + offset                       # (D,)
            u = z * g                                                  # (N, D)
            eps_list = []
            if norm_eps(m) is not None:
                eps_list.append(norm_eps(m))
            uu = u.square().sum(-1, keepdim=True)
            if bool((uu > 0).all()):
                r = (target * u).sum(-1, keepdim=True) / uu            # (N, 1) = 1/sqrt(s+eps)
                if bool((r > 0).all()):
                    eps_list.append(max(float((1 / r.square() - s).median()), 0.0))
            for eps in eps_list:
                pred = z / torch.sqrt(s + eps) * g + b                 # (N, D)
                err = float((pred - y64).abs().max()) / scale
                fits.append((err, kind, offset))
    good = [f for f in fits if f[0] <= tol]
    if not good:
        return "unknown", 0.0
    kinds = {f[1] for f in good}
    if len(kinds) > 1:  # centred input: both fit; trust the class name
        hint = "rmsnorm" if "rms" in type(m).__name__.lower() else "layernorm"
        good = [f for f in good if f[1] == hint]
    err, kind, offset = min(good)
    return kind, offset


def _whole(p: torch.Tensor | None) -> torch.Tensor | None:
    """`p` detached and whole. Under FSDP2 a norm's gain and bias are DTensor shards, which cannot
    be mixed with the plain traced tensors: `full_tensor()` all-gathers one (every rank runs the
    same discovery, so the collectives match) into a new tensor; the module keeps its shards."""
    if p is None:
        return None
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def outside_norms(tr: Trace, first_call: Call, last_call: Call, x0: Pt, y_last: Pt
                  ) -> dict[str, tuple[Call, Pt]]:
    """{"norm.embed": (call, output), "norm.final": (call, output)} for those found: the last norm
    before block 0 whose output is block 0's input; the first norm after the last block whose
    input is its output."""
    tol = rel_tol(first_call.dtype)
    found: dict[str, tuple[Call, Pt]] = {}
    for c in outermost_norms(tr.calls):
        if tr.count[c.name] != 1:
            continue
        if c.end < first_call.start:
            io = norm_io(c, x0.t.shape)
            if io and close(io[1].t, x0.t, tol * max(amax(x0.t), 1e-30)):
                found["norm.embed"] = (c, io[1])
        elif c.start > last_call.end and "norm.final" not in found:
            io = norm_io(c, y_last.t.shape)
            if io and close(io[0].t, y_last.t, tol * max(amax(y_last.t), 1e-30)):
                found["norm.final"] = (c, io[1])
    return found


def residual_norms(root: nn.Module, stacks: list[tuple[list[BlockResult], dict]],
                   dtype: torch.dtype | None, notes: list[str]) -> list[NormInfo]:
    """NormInfo of every residual norm in execution order (per stack: embed, blocks, final; `stacks`
    holds each stack's BlockResults and its `outside_norms`), with kind and gain offset fitted from
    its traced input/output; block norms also go to their BlockInfo."""
    low = dtype in (torch.float16, torch.bfloat16)
    pname = {id(p): n for n, p in root.named_parameters()}
    role_calls = []
    by_index = {}
    for results, outside in stacks:
        role_calls += [(-1, "norm.embed", outside["norm.embed"][0])] if "norm.embed" in outside else []
        for r in results:
            by_index[r.info.index] = r
            role_calls += sorted(((r.info.index, role, c) for role, c in r.norm_calls.items()),
                                 key=lambda v: v[2].start)
        if "norm.final" in outside:
            role_calls.append((-1, "norm.final", outside["norm.final"][0]))
    infos = []
    for layer, role, c in role_calls:
        ni, no = c.io()
        kind, offset = _fit_norm(ni.t, no.t, c.module, low)
        weight, bias = norm_params(c.module)
        assert role in NORM_ROLES, role
        info = NormInfo(c.name, role, layer, kind, offset,
                        None if weight is None else pname.get(id(weight)),
                        None if bias is None else pname.get(id(bias)))
        infos.append(info)
        if layer >= 0:
            by_index[layer].info.norms.append(info)
        if kind == "unknown":
            notes.append(f"norm '{c.name}': output fits neither LayerNorm nor RMSNorm of its input")
    return infos


