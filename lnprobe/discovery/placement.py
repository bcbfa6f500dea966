"""Norm roles and placement of a block, and the remaining labels of its sublayers.

In a block with Y = X + T1 + T2 norms are labelled by what they see: input == X -> pre-attention,
input == X + T1 -> pre-MLP (or input == X in a parallel block), output == T1 / T2 -> output norm of
that sublayer. The placement of the block follows from the set of roles found: pre, output, peri
(both), none, or mixed. Inside each sublayer the Linear-like modules give the projections and mlp_act.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from torch import nn

from .modules import is_attention
from .moe import label_moe
from .trace import amax, close, outermost_linears

if TYPE_CHECKING:
    from .blocks import Block, BlockResult
    from .trace import Call, Pt, Trace


def label_sum_block(blk: Block, t1: Pt, t2: Pt, ranges, res: BlockResult,
                     notes: list[str]) -> None:
    """Norm roles, placement and the remaining points of a block with Y = X + T1 + T2: output norms
    produce T1 / T2 (their inputs are *_raw), a pre-attention norm reads X, a pre-MLP norm reads
    X + T1 (= resid_mid), or X in a parallel block."""
    info, index = res.info, blk.index
    attn_range, mlp_range = ranges
    X = blk.x.t
    xt1 = X + t1.t                                                     # (B, T, D)
    atol, atol1 = blk.atol(), blk.atol(t1.t, xt1)
    roles: dict[str, tuple[Call, tuple[Pt, Pt]]] = {}
    for c, (ni, no) in blk.dnorms:  # later matches win: the outermost norm
        if _in_range(c, attn_range) and close(no.t, t1.t, atol1):
            roles["norm.post_attn"] = (c, (ni, no))
        elif _in_range(c, mlp_range) and close(no.t, t2.t, blk.tol * max(amax(t2.t), 1e-30)):
            roles["norm.post_mlp"] = (c, (ni, no))
    for c, (ni, no) in blk.dnorms:
        if any(c is r[0] for r in roles.values()):
            continue
        if _in_range(c, attn_range) and close(ni.t, X, atol) and "norm.pre_attn" not in roles:
            roles["norm.pre_attn"] = (c, (ni, no))
        elif _in_range(c, mlp_range) and close(ni.t, xt1, atol1) and "norm.pre_mlp" not in roles:
            roles["norm.pre_mlp"] = (c, (ni, no))
        elif close(ni.t, X, atol) and "norm.pre_mlp" not in roles and "norm.pre_attn" in roles:
            roles["norm.pre_mlp"] = (c, (ni, no))
            notes.append(f"block {index}: parallel attention/MLP block; the pre-MLP norm "
                         f"'{c.name}' reads the block input; resid_mid does not exist")
    res.norm_calls = {r: v[0] for r, v in roles.items()}

    present = set(roles)
    mlp_ins = [p for p in blk.ins if mlp_range[0] < p.seq <= mlp_range[1]]
    if ("norm.pre_attn" in roles and "norm.pre_mlp" not in roles
            and not any(close(p.t, xt1, atol1) for p in mlp_ins)
            and any(close(p.t, roles["norm.pre_attn"][1][1].t, atol) for p in mlp_ins)):
        present.add("norm.pre_mlp")  # parallel block: the one pre-norm feeds both sublayers
        notes.append(f"block {index}: parallel attention/MLP block; the pre-attention norm "
                     f"'{roles['norm.pre_attn'][0].name}' also feeds the MLP; resid_mid does not exist")
    info.placement = _placement_of(present)
    info.points.update(attn_out=t1.point, mlp_out=t2.point)
    # *_raw: the output norm's input; without an output norm the branch output itself
    out_attn, out_mlp = roles.get("norm.post_attn"), roles.get("norm.post_mlp")
    info.points["attn_raw"] = t1.point if out_attn is None else out_attn[1][0].point
    info.points["mlp_raw"] = t2.point if out_mlp is None else out_mlp[1][0].point

    pre_mlp = roles.get("norm.pre_mlp")
    if pre_mlp is not None and close(pre_mlp[1][0].t, xt1, atol1):
        info.points["resid_mid"] = pre_mlp[1][0].point
        return
    # no pre-MLP norm (Output-LN): the first module input after the attention that carries X + T1
    mid = next((p for p in sorted(blk.ins, key=lambda p: p.seq)
                if p.seq > t1.seq and close(p.t, xt1, atol1)), None)
    if mid is not None:
        info.points["resid_mid"] = mid.point
    elif not any(n.startswith(f"block {index}: parallel") for n in notes):
        notes.append(f"block {index}: no hook point carries X + attn_out (resid_mid not found)")


def label_sublayers(blk: Block, ranges, res: BlockResult, tr: Trace, notes: list[str]) -> None:
    """Projections, mlp_act and parameter roles from the modules that ran inside each sublayer:
    the last Linear-like module writing back to width D is the out projection, the others are
    qkv / in; norms in the attention sublayer without a residual role are QK-norms."""
    info, index, width = res.info, blk.index, blk.x.t.shape[-1]
    attn_range, mlp_range = ranges
    for rng, kind in ((attn_range, "attn"), (mlp_range, "mlp")):
        calls = [c for c in blk.inner if _in_range(c, rng)]
        lins = sorted(outermost_linears(calls), key=lambda c: c.end)
        # the last projection writes back to the residual width (a MoE router does not)
        last = next((c for c in reversed(lins) if c.outs and c.outs[0][1].shape[-1] == width), None)
        for c in lins:
            other = "qkv" if kind == "attn" else "in"
            res.module_roles[c.name] = f"{kind}.{'out' if c is last else other}"
        if kind == "attn":
            info.attn_out_proj = None if last is None else last.name
            res.mha = [c.name for c in calls if isinstance(c.module, nn.MultiheadAttention)]
            # an attention module that starts in the sublayer counts even when it ends after T1:
            # BLOOM's adds the residual inside, so its output is X + T1 and T1 is its dense's output
            if not any(is_attention(c.module) and rng[0] < c.start < rng[1] for c in blk.inner):
                notes.append(f"block {index}: no attention module (class named *Attention*/*attn* "
                             f"or nn.MultiheadAttention) ran in the first sublayer")
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
        if _in_range(c, attn_range):
            res.module_roles[c.name] = "attn.qk_norm"
        else:
            notes.append(f"block {index}: norm '{c.name}' has no residual-stream role")
    if info.placement == "none":
        notes.append(f"block {index}: no norm module on the residual path (functional norms such as "
                     f"F.layer_norm are invisible to hooks); pass placement= if this is wrong")


def _in_range(c: Call, rng: tuple[int, int]) -> bool:
    return rng[0] < c.start and c.end <= rng[1]


def _placement_of(roles: set[str]) -> str:
    pre = {"norm.pre_attn", "norm.pre_mlp"}
    out = {"norm.post_attn", "norm.post_mlp"}
    if not roles:
        return "none"
    if roles == pre:
        return "pre"
    if roles == out:
        return "output"
    if roles == pre | out:
        return "peri"
    return "mixed"


