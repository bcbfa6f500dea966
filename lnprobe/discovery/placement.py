"""Norm roles and placement of a block, and the remaining labels of its sublayers.

In a block with Y = X + T1 + T2 norms are labelled by what they see: input == X -> pre-attention,
input == X + T1 -> pre-MLP (or input == X in a parallel block), output == T1 / T2 -> output norm of
that sublayer; a decoder block with Y = X + T1 + T2 + T3 has a cross-attention sublayer between
them (input == X + T1 -> pre-cross-attention, output == T2 -> its output norm).
The placement of the block follows from the set of roles found: pre, output, peri
(both), none, or mixed. Inside each sublayer the Linear-like modules give the projections and mlp_act.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from torch import nn

from ..sites import SUBLAYERS
from .modules import is_attention
from .moe import label_moe
from .trace import amax, close, outermost_linears

if TYPE_CHECKING:
    from .blocks import Block, BlockResult
    from .trace import Call, Pt, Trace


def label_sum_block(blk: Block, branches: list[Pt], ranges, res: BlockResult,
                     notes: list[str]) -> None:
    """Norm roles, placement and the remaining points of a block with Y = X + T1 + T2 (+ T3), the
    branches of the sublayers `SUBLAYERS[len(branches)]`: an output norm produces its branch Ti (its
    input is <kind>_raw); a pre-norm reads the stream entering its sublayer (X, X + T1, X + T1 + T2),
    or, for the MLP of a parallel block, X."""
    info, index = res.info, blk.index
    kinds = SUBLAYERS[len(branches)]
    X = blk.x.t
    streams = [X]                                                      # (B, T, D) each
    for t in branches[:-1]:
        streams.append(streams[-1] + t.t)
    roles: dict[str, tuple[Call, tuple[Pt, Pt]]] = {}
    for c, (ni, no) in blk.dnorms:  # later matches win: the outermost norm
        for kind, t, rng, s_in in zip(kinds, branches, ranges, streams):
            atol = blk.atol(t.t, s_in + t.t) if kind != "mlp" else blk.tol * max(amax(t.t), 1e-30)
            if _in_range(c, rng) and close(no.t, t.t, atol):
                roles[f"norm.post_{kind}"] = (c, (ni, no))
                break
    for c, (ni, no) in blk.dnorms:
        if any(c is r[0] for r in roles.values()):
            continue
        for i, (kind, rng, s_in) in enumerate(zip(kinds, ranges, streams)):
            atol = blk.atol() if i == 0 else blk.atol(branches[i - 1].t, s_in)
            if _in_range(c, rng) and close(ni.t, s_in, atol) and f"norm.pre_{kind}" not in roles:
                roles[f"norm.pre_{kind}"] = (c, (ni, no))
                break
        else:
            if (len(kinds) == 2 and close(ni.t, X, blk.atol()) and "norm.pre_mlp" not in roles
                    and "norm.pre_attn" in roles):
                roles["norm.pre_mlp"] = (c, (ni, no))
                notes.append(f"block {index}: parallel attention/MLP block; the pre-MLP norm "
                             f"'{c.name}' reads the block input; resid_mid does not exist")
    res.norm_calls = {r: v[0] for r, v in roles.items()}

    present = set(roles)
    if len(kinds) == 2:
        xt1, atol1 = streams[1], blk.atol(branches[0].t, streams[1])
        mlp_ins = [p for p in blk.ins if ranges[1][0] < p.seq <= ranges[1][1]]
        if ("norm.pre_attn" in roles and "norm.pre_mlp" not in roles
                and not any(close(p.t, xt1, atol1) for p in mlp_ins)
                and any(close(p.t, roles["norm.pre_attn"][1][1].t, blk.atol()) for p in mlp_ins)):
            present.add("norm.pre_mlp")  # parallel block: the one pre-norm feeds both sublayers
            notes.append(f"block {index}: parallel attention/MLP block; the pre-attention norm "
                         f"'{roles['norm.pre_attn'][0].name}' also feeds the MLP; resid_mid does not exist")
    info.placement = _placement_of(present, kinds)
    for kind, t in zip(kinds, branches):
        info.points[f"{kind}_out"] = t.point
        # *_raw: the output norm's input; without an output norm the branch output itself
        out_norm = roles.get(f"norm.post_{kind}")
        info.points[f"{kind}_raw"] = t.point if out_norm is None else out_norm[1][0].point

    # resid_mid = X + T1 enters the sublayer after the attention; resid_xattn = X + T1 + T2 the MLP of
    # a decoder block: the pre-norm's input, else the first module input after the branch carrying it
    for site, kind, i in (("resid_mid", kinds[1], 1), ("resid_xattn", "mlp", 2))[:len(kinds) - 1]:
        stream, atol_i = streams[i], blk.atol(branches[i - 1].t, streams[i])
        pre = roles.get(f"norm.pre_{kind}")
        if pre is not None and close(pre[1][0].t, stream, atol_i):
            info.points[site] = pre[1][0].point
            continue
        mid = next((p for p in sorted(blk.ins, key=lambda p: p.seq)
                    if p.seq > branches[i - 1].seq and close(p.t, stream, atol_i)), None)
        if mid is not None:
            info.points[site] = mid.point
        elif not any(n.startswith(f"block {index}: parallel") for n in notes):
            notes.append(f"block {index}: no hook point carries the stream after the {kinds[i - 1]} "
                         f"sublayer ({site} not found)")


def label_sublayers(blk: Block, ranges, res: BlockResult, tr: Trace, notes: list[str]) -> None:
    """Projections, mlp_act and parameter roles from the modules that ran inside each sublayer:
    the last Linear-like module writing back to width D is the out projection, the others are
    qkv / in; norms in the attention sublayer without a residual role are QK-norms."""
    info, index, width = res.info, blk.index, blk.x.t.shape[-1]
    kinds = SUBLAYERS[len(ranges)]
    for rng, kind in zip(ranges, kinds):
        calls = [c for c in blk.inner if _in_range(c, rng)]
        lins = sorted(outermost_linears(calls), key=lambda c: c.end)
        # the last projection writes back to the residual width (a MoE router does not)
        last = next((c for c in reversed(lins) if c.outs and c.outs[0][1].shape[-1] == width), None)
        for c in lins:
            other = "in" if kind == "mlp" else "qkv"
            res.module_roles[c.name] = f"{kind}.{'out' if c is last else other}"
        if kind in ("attn", "xattn"):
            setattr(info, f"{kind}_out_proj", None if last is None else last.name)
            res.mha.update({c.name: kind for c in calls if isinstance(c.module, nn.MultiheadAttention)})
            # an attention module that starts in the sublayer counts even when it ends after T1:
            # BLOOM's adds the residual inside, so its output is X + T1 and T1 is its dense's output
            if not any(is_attention(c.module) and rng[0] < c.start < rng[1] for c in blk.inner):
                which = "first" if kind == "attn" else "cross-attention"
                notes.append(f"block {index}: no attention module (class named *Attention*/*attn* "
                             f"or nn.MultiheadAttention) ran in the {which} sublayer")
            continue
        info.mlp_out_proj = None if last is None else last.name
        if label_moe(blk, calls, res, width, notes):
            continue
        if last is not None and tr.count[last.name] == 1 and last.in_points():
            act = last.in_points()[0]
            # (B·T, hidden) while the stream is (B, T, D): fetched as (B, T, hidden)
            flat = act.t.dim() == 2 and blk.x.t.dim() == 3
            info.points["mlp_act"] = replace(act.point, flat=True) if flat else act.point
        else:
            notes.append(f"block {index}: mlp_act not found: no Linear-like projection back to "
                         f"width {width} ran (once) in the MLP sublayer")
    assigned = {c.name for c in res.norm_calls.values()}
    for c in blk.norms:
        if c.name in assigned:
            continue
        if any(_in_range(c, rng) for rng, kind in zip(ranges, kinds) if kind != "mlp"):
            res.module_roles[c.name] = "attn.qk_norm"
        else:
            notes.append(f"block {index}: norm '{c.name}' has no residual-stream role")
    if info.placement == "none":
        notes.append(f"block {index}: no norm module on the residual path (functional norms such as "
                     f"F.layer_norm are invisible to hooks); pass placement= if this is wrong")


def _in_range(c: Call, rng: tuple[int, int]) -> bool:
    return rng[0] < c.start and c.end <= rng[1]


def _placement_of(roles: set[str], kinds: tuple[str, ...]) -> str:
    """pre: a pre-norm before every sublayer and nothing else; output: an output norm on every one;
    peri: both; none: no norm; anything else mixed."""
    pre = {f"norm.pre_{k}" for k in kinds}
    out = {f"norm.post_{k}" for k in kinds}
    if not roles:
        return "none"
    if roles == pre:
        return "pre"
    if roles == out:
        return "output"
    if roles == pre | out:
        return "peri"
    return "mixed"
