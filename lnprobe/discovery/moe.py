"""Mixture-of-experts MLP sublayers: the router, the experts and the shared expert.

A block's MLP sublayer is a mixture of experts when the module whose output is `mlp_out` holds
E ≥ 2 experts: a ModuleList of E identical non-leaf modules, or a module whose parameters are
stacked per expert (3-D tensors with the same leading size E, as in the fused experts of recent
transformers versions). The router is the outermost module run in the sublayer, outside the
experts, that reads a width-D tensor and writes a tensor whose last dim is E (the router logits).
Every other submodule with parameters (Qwen2-MoE's shared expert and its gate) is the shared part.
Roles: `mlp.router`, `mlp.experts`, `mlp.shared`. `mlp_act` is not defined for such a sublayer
(each expert has its own hidden activation), so it is not mapped.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .blocks import Block, BlockResult
    from .trace import Call


def _experts(mlp: nn.Module) -> tuple[str, int] | None:
    """(relative path, number of experts) of the experts inside `mlp`, or None."""
    for name, m in mlp.named_modules():
        kids = list(m.children())
        if isinstance(m, nn.ModuleList) and len(kids) >= 2 and len({type(k) for k in kids}) == 1 \
                and any(True for _ in kids[0].children()):
            return name, len(kids)
        stacked = [p for p in m.parameters(recurse=False) if p.dim() == 3]
        if stacked and len({p.shape[0] for p in stacked}) == 1 and stacked[0].shape[0] >= 2:
            return name, int(stacked[0].shape[0])
    return None


def label_moe(blk: Block, calls: list[Call], res: BlockResult, width: int, notes: list[str]) -> bool:
    """Relabel the MLP sublayer of `blk` if it is a mixture of experts (see the module docstring);
    `calls` are the calls inside the sublayer. Returns True when it is one."""
    mlp_point = res.info.points.get("mlp_out")
    if mlp_point is None:
        return False
    owner = next((c for c in calls + blk.inner if c.name == mlp_point.module), None)
    if owner is None or owner.name == blk.call.name:
        return False
    found = _experts(owner.module)
    if found is None:
        return False
    rel, n_exp = found
    prefix = owner.name + "."
    experts = prefix + rel if rel else owner.name
    inside = [c for c in calls if c.name.startswith(prefix)]
    router = None
    for c in sorted(inside, key=lambda c: c.start):
        if c.name == experts or c.name.startswith(experts + "."):
            continue
        reads = any(t.shape[-1] == width for _, t in c.ins)
        if reads and any(t.shape[-1] == n_exp for _, t in c.outs):
            router = c.name
            break
    for path in [p for p in res.module_roles if p.startswith(prefix)]:
        del res.module_roles[path]
    res.module_roles[experts] = "mlp.experts"
    if router is not None:
        res.module_roles[router] = "mlp.router"
    taken = {experts, router}
    for name, child in owner.module.named_children():
        path = prefix + name
        if path not in taken and not experts.startswith(path + ".") and any(True for _ in child.parameters()):
            res.module_roles[path] = "mlp.shared"
    res.info.mlp_out_proj = None
    res.info.points.pop("mlp_act", None)
    notes.append(f"block {blk.index}: mixture of experts: {n_exp} experts '{experts}', router "
                 f"'{router}'; mlp_act not mapped (each expert has its own)")
    return True
