"""Block matching: which module list holds the Transformer blocks, and the residual structure of
each block from its traced dataflow.

With X = block input and Y = block output (both from the block's own hooks), a block is Post-LN
when Y is the output of a norm inside it (`Norm(Norm(X + T1) + T2)`); otherwise two module outputs
T1 (attention branch, earlier) and T2 (MLP branch, later) with `X + T1 + T2 == Y` are searched for,
and failing that three (`X + T1 + T2 + T3 == Y`, or three chained norms for Post-LN): a decoder
block, self-attention, cross-attention and MLP (`lnprobe.sites.SUBLAYERS`).
What the norms of a block are, and so its placement, is worked out in `placement`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..sites import SUBLAYERS, BlockInfo, DiscoveryError
from .modules import is_norm
from .placement import label_sublayers, label_sum_block
from .trace import Call, Pt, Trace, amax, close, norm_io, outermost_norms, rel_tol, shaped


def _module_lists(root: nn.Module) -> list[tuple[str, nn.Module, bool, int]]:
    """(path, container, is a list of identical non-leaf blocks, parameter count) for every
    ModuleList / Sequential."""
    found = []
    for name, m in root.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        kids = list(m.children())
        if not kids:
            continue
        same = len({type(k) for k in kids}) == 1 and any(True for _ in kids[0].children())
        found.append((name, m, same, sum(p.numel() for p in m.parameters())))
    return found


def describe_lists(root: nn.Module) -> str:
    """One line naming each ModuleList/Sequential of blocks: classes, count, params; "none" when there is none."""
    items = []
    for name, m, same, n in _module_lists(root):
        classes = sorted({type(k).__name__ for k in m.children()})
        items.append(f"'{name}' ({type(m).__name__} of {len(list(m.children()))}: "
                     f"{'/'.join(classes)}, {n} params{'' if same else ', not identical blocks'})")
    return "; ".join(items) or "none"


def describe_norms(root: nn.Module) -> str:
    """The norm modules' names and classes, the first 12 then a count; "none" when there is none."""
    names = [f"'{n}' ({type(m).__name__})" for n, m in root.named_modules() if is_norm(m)]
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    return shown or "none"


def block_list_hints(root: nn.Module, exclude: str | None = None) -> list[str]:
    """`blocks='path'` for every ModuleList/Sequential (other than `exclude`) with a non-leaf entry:
    the lists an explicit `blocks=` accepts (its entries need not be identical), most params first."""
    found = sorted(((n, c) for name, m, _, c in _module_lists(root) for n in [name]
                    if n != exclude and any(any(True for _ in k.children()) for k in m.children())),
                   key=lambda v: v[1], reverse=True)
    return [f"blocks='{n}'" for n, _ in found]


def find_blocks(root: nn.Module, blocks: str | None) -> tuple[str, list[tuple[str, nn.Module]]]:
    """(path of the block container, [(block path, block)]): the container at `blocks`, or the
    ModuleList/Sequential of identical non-leaf blocks with the most parameters."""
    if blocks is not None:
        try:
            container = root.get_submodule(blocks)
        except AttributeError:
            raise DiscoveryError(
                f"blocks='{blocks}' is not a submodule of {type(root).__name__}; module lists "
                f"found: {describe_lists(root)}") from None
        kids = list(container.named_children())
        if not kids:
            raise DiscoveryError(f"blocks='{blocks}' has no children; expected a list of blocks")
    else:
        cands = [c for c in _module_lists(root) if c[2]]
        if not cands:
            hints = block_list_hints(root)
            # name the lists an explicit blocks= would accept, so the override in the message works
            what = (" or ".join(hints[:3]) + " (a list of blocks need not hold identical ones)" if hints
                    else "blocks='...' (the dotted path of the ModuleList/Sequential holding the blocks)")
            raise DiscoveryError(
                f"no Transformer blocks found in {type(root).__name__}: looked for a "
                f"ModuleList/Sequential of identical blocks; module lists found: "
                f"{describe_lists(root)}; norms found: {describe_norms(root)}. Pass {what}.")
        blocks, container, _, _ = max(cands, key=lambda c: (c[3], len(list(c[1].children()))))
        kids = list(container.named_children())
    prefix = f"{blocks}." if blocks else ""
    return blocks, [(prefix + n, m) for n, m in kids]


def other_block_lists(root: nn.Module, chosen: str) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    """The other ModuleLists/Sequentials of identical non-leaf blocks, most parameters first: where
    discovery looks next when the chosen list cannot be mapped (an encoder–decoder's decoder blocks
    have three sublayers; its encoder blocks have the two of a Transformer block)."""
    cands = sorted((c for c in _module_lists(root) if c[2] and c[0] != chosen),
                   key=lambda c: (c[3], len(list(c[1].children()))), reverse=True)
    return [(name, [(f"{name}." + n, m) for n, m in container.named_children()])
            for name, container, _, _ in cands]


# ----------------------------------------------------------------------------- one block


@dataclass
class BlockResult:
    """One block's mapping: its BlockInfo, whether it was mapped (else `why`), X and Y, norm calls and roles."""

    info: BlockInfo
    mapped: bool
    why: str = ""
    x: Pt | None = None
    y: Pt | None = None
    norm_calls: dict[str, Call] = field(default_factory=dict)      # role -> call
    module_roles: dict[str, str] = field(default_factory=dict)      # module path -> param role
    mha: dict[str, str] = field(default_factory=dict)              # nn.MultiheadAttention path -> attn/xattn


def _block_io(call: Call) -> tuple[Pt, Pt] | None:
    """(X, Y): the first floating input of the block whose shape matches a floating output."""
    outs = call.out_points()
    for inp in call.in_points():
        if inp.t.dim() < 2:
            continue
        out = next((o for o in outs if o.t.shape == inp.t.shape), None)
        if out is not None:
            return inp, out
    return None


@dataclass
class Block:
    """What ran inside one block call: X, Y and the candidate points and norms, all viewed with
    the residual shape; `tol` is relative to the largest magnitude involved."""

    index: int
    call: Call
    x: Pt
    y: Pt
    inner: list[Call]
    outs: list[Pt]
    ins: list[Pt]
    norms: list[Call]
    dnorms: list[tuple[Call, tuple[Pt, Pt]]]
    tol: float

    def atol(self, *ts: torch.Tensor) -> float:
        """Absolute tolerance: `tol` times the largest |value| of X, Y and `ts`."""
        return self.tol * max([amax(self.x.t), amax(self.y.t)] + [amax(t) for t in ts])


def map_block(index: int, name: str, tr: Trace, notes: list[str]) -> BlockResult:
    """Map one block: Post-LN if its output is a norm output, else the residual sum X + T1 + T2."""
    info = BlockInfo(index, name, "none", {}, [], None, None)
    calls = tr.by_name.get(name, [])
    if len(calls) != 1:
        return BlockResult(info, False, f"block '{name}' ran {len(calls)} times in the traced "
                                         f"forward (expected once)")
    io = _block_io(calls[0])
    if io is None:
        return BlockResult(info, False, f"block '{name}' has no floating input with an output of "
                                         f"the same shape")
    xp, yp = io
    info.points["resid"] = xp.point
    res = BlockResult(info, False, x=xp, y=yp)
    inner = tr.within(calls[0].start, calls[0].end)
    if not inner:
        res.why = (f"block '{name}': no submodule ran inside it (a fused fast path such as "
                   f"nn.TransformerEncoderLayer's?)")
        return res
    once = [c for c in inner if tr.count[c.name] == 1]  # a hook on a shared module fires twice
    shape = xp.t.shape
    norms = outermost_norms(inner)
    dnorms = [(c, norm_io(c, shape)) for c in norms if tr.count[c.name] == 1]
    blk = Block(index, calls[0], xp, yp, inner,
                 outs=shaped([p for c in once for p in c.out_points()], shape),
                 ins=shaped([p for c in once for p in c.in_points()], shape),
                 norms=norms, dnorms=[(c, io) for c, io in dnorms if io is not None],
                 tol=rel_tol(calls[0].dtype))

    found = _match_post(blk)
    if found is not None:
        post_norms, branches = found
        kinds = SUBLAYERS[len(branches)]
        info.placement = "post"
        res.norm_calls = {f"norm.post_{k}": c for k, c in zip(kinds, post_norms)}
        # the stream after sublayer i is the output of its norm: resid_mid after the attention,
        # resid_xattn after a decoder's cross-attention
        for site, c in zip(("resid_mid", "resid_xattn"), post_norms[:-1]):
            info.points[site] = next(io for d, io in blk.dnorms if d is c)[1].point
        for kind, t in zip(kinds, branches):
            info.points.update({f"{kind}_out": t.point, f"{kind}_raw": t.point})
        starts = [blk.call.start] + [c.end for c in post_norms[:-1]]
        ranges = tuple((lo, t.seq) for lo, t in zip(starts, branches))
    else:
        branches = _match_sum(blk)
        if branches is None:
            res.why = (f"block '{name}': its output is neither a norm output (Post-LN) nor X + T1 + T2 "
                       f"(+ T3) for two (three) module outputs T1, T2 (T3) inside it (norms in block: "
                       f"{', '.join(c.name for c in norms) or 'none'})")
            return res
        starts = [blk.call.start] + [t.seq for t in branches]
        ranges = tuple(zip(starts[:-1], starts[1:]))
        label_sum_block(blk, branches, ranges, res, notes)
    label_sublayers(blk, ranges, res, tr, notes)
    if len(once) < len(inner):
        shared = sorted({c.name for c in inner if tr.count[c.name] > 1})
        notes.append(f"block {index}: modules that ran more than once were not used as hook "
                     f"points: {', '.join(shared)}")
    res.mapped = True
    return res


def _match_sum(blk: Block) -> list[Pt] | None:
    """[T1, T2] with X + T1 + T2 == Y, each branch's module finished before the next one started;
    failing that [T1, T2, T3] with X + T1 + T2 + T3 == Y (a decoder block: self-attention,
    cross-attention, MLP). Among equal-valued candidates the one that finishes LAST wins: the
    outermost module, after dropout, which is the tensor actually added to the stream in training
    mode."""
    for n in sorted(SUBLAYERS):
        found = _match_branches(blk, n)
        if found is not None:
            return found
    return None


def _match_branches(blk: Block, n: int) -> list[Pt] | None:
    """[T1 … Tn] in forward order with X + ΣTi == Y, latest candidates first. A random projection
    of every candidate screens the combinations (a necessary condition, in float64 scalars) before
    the tensors are compared."""
    X, Y = blk.x.t, blk.y.t                                            # (B, T, D)
    outs = sorted(blk.outs, key=lambda p: p.seq, reverse=True)
    if len(outs) < n:
        return None
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(X.shape, generator=gen, dtype=torch.float64)    # (B, T, D)
    sig = [float((p.t.double() * proj).sum()) for p in outs]
    slack = float(proj.abs().sum())  # |Σ (a - b)·proj| <= max|a - b| · Σ|proj|

    def search(rest: torch.Tensor, rest_sig: float, before: float, k: int, used: list[Pt]) -> list[Pt] | None:
        # the k-th branch from the end: it ends before `before` (the start of the branch after it)
        for i, p in enumerate(outs):
            if p.seq >= before:
                continue
            if k == 1:
                atol = blk.atol(*(u.t for u in used))
                if abs(sig[i] - rest_sig) <= atol * slack * 1.01 and close(p.t, rest, atol):
                    return [p, *used]
                continue
            found = search(rest - p.t, rest_sig - sig[i], p.call.start, k - 1, [p, *used])
            if found is not None:
                return found
        return None

    return search(Y - X, float(((Y - X).double() * proj).sum()), float("inf"), n, [])


def _match_post(blk: Block) -> tuple[list[Call], list[Pt]] | None:
    """([norm1 … norm_n], [T1 … Tn]) of a Post-LN block, n = 2: Y = norm2(norm1(X + T1) + T2), or
    n = 3 (a decoder block): Y = norm3(norm2(norm1(X + T1) + T2) + T3)."""
    X, Y = blk.x.t, blk.y.t                                            # (B, T, D)
    last = [(c, io) for c, io in blk.dnorms if close(io[1].t, Y, blk.tol * max(amax(Y), 1e-30))]
    if not last:
        return None
    nl, nl_io = max(last, key=lambda v: v[0].end)

    def search(norm: Call, norm_in: Pt, k: int) -> tuple[list[Call], list[Pt]] | None:
        # norm's input is (the output of the norm before it, or X for the first) + its branch T_k
        if k == 1:
            for t in sorted((p for p in blk.outs if p.seq < norm.start), key=lambda p: p.seq, reverse=True):
                if close(norm_in.t, X + t.t, blk.atol(t.t, norm_in.t)):
                    return [norm], [t]
            return None
        for prev, (prev_in, prev_out) in sorted(blk.dnorms, key=lambda v: v[0].start):
            if prev.end >= norm.start:
                break
            for t in sorted((p for p in blk.outs if prev.end < p.seq < norm.start), key=lambda p: p.seq,
                            reverse=True):
                if close(norm_in.t, prev_out.t + t.t, blk.atol(prev_out.t, t.t, norm_in.t)):
                    found = search(prev, prev_in, k - 1)
                    if found is not None:
                        return found[0] + [norm], found[1] + [t]
        return None

    for n in sorted(SUBLAYERS):
        found = search(nl, nl_io[0], n)
        if found is not None:
            return found
    return None
