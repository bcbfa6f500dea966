"""Virtual blocks for layer lists that hold sublayers, not blocks (x-transformers).

x-transformers keeps each sublayer as a ModuleList `(norms, block, residual)` and loops over them in
the parent's forward: no module is a Transformer block (the entries never run themselves), and the
list has two entries per block. Such a list is recognised from its structure (every entry a
ModuleList of three whose first item is a ModuleList of norms and whose last item is a module
called as `residual(branch_out, stream)`), and each attention + feed-forward pair becomes one
VIRTUAL block: a synthetic trace call spanning both entries whose input X is the stream entering the
first residual module (its argument 1) and whose output Y is the second residual module's output
(or, Post-LN, the output of the second entry's post-main norm).
The ordinary residual matching (`blocks.map_block`) then runs unchanged on that span; the hook
points of X and Y name the real residual modules, so the probe hooks modules that do run.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..sites import HookPoint
from .trace import Call, Pt, Trace


def _is_sublayer_entry(m: nn.Module) -> bool:
    kids = list(m.children()) if isinstance(m, nn.ModuleList) else []
    return (len(kids) == 3 and isinstance(kids[0], nn.ModuleList)
            and not isinstance(kids[1], nn.ModuleList) and not isinstance(kids[2], nn.ModuleList))


def sublayer_pairs(container: nn.Module) -> list[tuple[str, str]] | None:
    """[(attention entry, feed-forward entry)] relative names when `container` is a list of
    (norms, block, residual) entries whose sublayer classes alternate two by two; else None."""
    kids = list(container.named_children())
    if len(kids) < 2 or len(kids) % 2 or not all(_is_sublayer_entry(m) for _, m in kids):
        return None
    kinds = [type(list(m.children())[1]) for _, m in kids]
    if len(set(kinds[0::2])) != 1 or len(set(kinds[1::2])) != 1 or kinds[0] is kinds[1]:
        return None
    return [(kids[i][0], kids[i + 1][0]) for i in range(0, len(kids), 2)]


@dataclass
class VirtualCall(Call):
    """A synthetic call spanning one attention + feed-forward pair; its in/out points are the real
    residual modules' (argument 1 of the first, output of the second)."""

    x_point: HookPoint | None = None
    y_point: HookPoint | None = None

    def in_points(self) -> list[Pt]:
        """X: the stream entering the pair, as the first residual module sees it."""
        return [Pt(self.x_point, t, self.start, self) for _, t in self.ins]

    def out_points(self) -> list[Pt]:
        """Y: the stream leaving the pair, the second residual module's output."""
        return [Pt(self.y_point, t, self.end, self) for _, t in self.outs]


def virtual_blocks(root: nn.Module, path: str, pairs: list[tuple[str, str]],
                   tr: Trace) -> tuple[list[tuple[str, nn.Module]], Trace] | None:
    """([(virtual block name, ModuleList of its two entries)], the trace with one VirtualCall per
    pair), or None when a pair's residual modules did not each run once with (branch, stream)."""
    prefix = f"{path}." if path else ""
    blocks, virtual = [], []
    for a, f in pairs:
        ra, rf = f"{prefix}{a}.2", f"{prefix}{f}.2"
        if tr.count.get(ra) != 1 or tr.count.get(rf) != 1:
            return None
        ca, cf = tr.by_name[ra][0], tr.by_name[rf][0]
        # Post-LN (pre_norm=False): the stream leaving the pair is the output of the second entry's
        # post-main norm (its norms[2]), which runs after the residual module
        post = f"{prefix}{f}.0.2"
        if tr.count.get(post) == 1:
            cf, rf = tr.by_name[post][0], post
        x = dict(ca.ins).get(1)
        y = dict(cf.outs).get(None)
        if x is None or y is None:
            return None
        inside = [c for c in tr.calls if c.name.startswith((f"{prefix}{a}.", f"{prefix}{f}."))]
        # half steps: the span encloses every call of both entries (trace positions are integers)
        start, end = min(c.start for c in inside) - 0.5, max(c.end for c in inside) + 0.5
        name = f"{prefix}{a}"
        virtual.append(VirtualCall(name, root.get_submodule(name), start, end, ins=[(1, x)],
                                   outs=[(None, y)], dtype=ca.dtype,
                                   x_point=HookPoint(ra, "in", 1), y_point=HookPoint(rf, "out", None)))
        pair = nn.ModuleList([root.get_submodule(name), root.get_submodule(f"{prefix}{f}")])
        blocks.append((name, pair))
    return blocks, Trace(tr.calls + virtual)
