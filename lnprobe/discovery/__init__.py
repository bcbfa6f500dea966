"""Model discovery: find the blocks, sublayers, norms, placement and hook points of any Transformer.

`discover(model)` runs ONE traced forward (eval mode, a tiny example input) with hooks on every
submodule, records every floating tensor seen by a pre-hook (inputs) or a forward hook (outputs) in
execution order (`trace`), and then works out the residual structure numerically, from the
DATAFLOW, not from module names:

- per block, with X = block input and Y = block output (both from the block's own hooks):
  Post-LN when Y is the output of a norm inside the block (`Norm(Norm(X + T1) + T2)`); otherwise
  two module outputs T1 (attention branch, earlier) and T2 (MLP branch, later) with
  `X + T1 + T2 == Y` (`blocks`), or three, T2 the cross-attention of a decoder block. Norms are
  then labelled by what they see: input == X -> pre-attention, input == X + T1 -> pre-MLP (pre-
  cross-attention in a decoder block), output == T1 / T2 -> output norm of that sublayer
  (`placement`).
- an encoder–decoder: a second list of blocks whose block 0 reads the first list's output besides
  its own stream is its decoder; both are mapped, numbered in forward order (`stacks`).
- outside the blocks: a norm whose output is the block-0 input is the embedding norm; a norm after
  the last block whose input is the last block output is the final norm (`norms`).
- norm kind (LayerNorm vs RMSNorm) and gain offset (`w` vs Gemma's `1 + w`) are fitted from the
  traced input/output of each norm (`norms`); parameter roles follow (`roles`).

Hook points name a (module, pre-hook argument or forward-hook output) pair relative to the
unwrapped root, so a probe can register hooks that fetch exactly the tensor of a site. Site names,
roles and the returned types are those of `lnprobe.sites`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..sites import PLACEMENTS, DiscoveryError, ModelMap
from .blocks import block_list_hints, describe_lists, describe_norms, find_blocks, map_block, other_block_lists
from .modules import is_norm, unwrap
from .norms import residual_norms
from .roles import embed_and_head, parameter_roles
from .stacks import STACK_NAMES, Stack, decoder_pair, make_stack
from .sublayers import sublayer_pairs, virtual_blocks
from .trace import example_inputs, run_trace

__all__ = ["discover", "unwrap"]


def discover(model: nn.Module, example_input: Any = None, *, blocks: str | None = None,
             placement: str | None = None) -> ModelMap:
    """Map `model` (bare, DDP/FSDP-wrapped or torch.compile'd) from one traced forward.

    example_input: a tensor, a tuple of positional args or a dict of kwargs; by default token ids
    (1, 8) for models with a vocabulary or a float (1, 8, d) sequence for embedding-free stacks.
    blocks: dotted path of the module list holding the blocks (default: the ModuleList/Sequential
    of identical blocks with the most parameters). placement: force this label on every block
    (what can be mapped still is). Raises DiscoveryError when the model cannot be mapped.
    The trace leaves parameters, buffers, training flags and the RNG state unchanged."""
    if placement is not None and placement not in PLACEMENTS:
        raise DiscoveryError(f"placement='{placement}' is not one of {', '.join(PLACEMENTS)}")
    root = unwrap(model)
    blocks_path, block_list = find_blocks(root, blocks)
    # the trace needs a forward that records autograd like training does: leave inference mode
    with torch.inference_mode(False):
        args, kwargs = example_inputs(root, example_input)
        try:
            tr = run_trace(root, args, kwargs)
        except Exception as err:
            if example_input is not None:
                raise
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            raise DiscoveryError(
                f"the traced forward of {type(root).__name__} failed on the automatic example input "
                f"{shapes} {sorted(kwargs)}: {type(err).__name__}: {err}. Pass example_input= (a "
                f"tensor, a tuple of args or a dict of kwargs that its forward accepts).") from err

    notes: list[str] = []
    pairs = sublayer_pairs(root.get_submodule(blocks_path))
    if pairs is not None:
        # x-transformers: (norms, block, residual) entries, two per block, run by the parent
        found = virtual_blocks(root, blocks_path, pairs, tr)
        if found is not None:
            block_list, tr = found
            notes.append(f"'{blocks_path}' holds sublayers (norms, block, residual), not blocks: each "
                         f"attention + feed-forward pair is one block, hooked on its residual modules")
    mark = len(notes)
    results = [map_block(i, n, tr, notes) for i, (n, _) in enumerate(block_list)]
    failed = [r for r in results if not r.mapped]
    if failed and blocks is None and placement is None:
        # e.g. the decoder of an encoder–decoder (self-attention, cross-attention, MLP): map the
        # next list of identical blocks that does map, and say so
        for path, blist in other_block_lists(root, blocks_path):
            if not all(n in tr.by_name for n, _ in blist):
                continue
            trial: list[str] = []
            alt = [map_block(i, n, tr, trial) for i, (n, _) in enumerate(blist)]
            if all(r.mapped for r in alt):
                notes += trial + [f"blocks '{blocks_path}' not mapped ({failed[0].why}); mapped '{path}' "
                                  f"instead (pass blocks='{blocks_path}' with placement= to force it)"]
                blocks_path, block_list, results, failed = path, blist, alt, []
                break
    stacks: list[Stack] = []
    if not failed and blocks is None and pairs is None:
        # an encoder–decoder: both stacks, mapped again with global layer numbers (encoder first)
        found = decoder_pair(root, blocks_path, block_list, results, tr)
        if found is not None:
            notes[mark:] = [n for n in notes[mark:] if not n.startswith("block ")]
            block_list, results = [], []
            for name, (path, blist) in zip(STACK_NAMES, found):
                mapped = [map_block(len(results) + i, n, tr, notes) for i, (n, _) in enumerate(blist)]
                stacks.append(make_stack(name, path, blist, mapped, tr))
                block_list, results = block_list + blist, results + mapped
            blocks_path = ", ".join(path for path, _ in found)
            notes.append(f"encoder–decoder: encoder '{found[0][0]}' (layers 0..{len(found[0][1]) - 1}) and decoder "
                         f"'{found[1][0]}' (layers {len(found[0][1])}..{len(results) - 1}) recorded together")
    if failed and (placement is None or all(r.x is None for r in results)):
        hints = block_list_hints(root, exclude=blocks_path)
        other = (f"Pass {' or '.join(hints[:3])} if '{blocks_path}' does not hold the Transformer blocks"
                 if hints else "")
        if all(r.x is not None for r in results) and placement is None:
            # forcing a placement maps resid (and whatever else maps) once every block has an X
            guess = "none" if not any(is_norm(m) for _, b in block_list for m in b.modules()) else "pre"
            force = (f"pass placement='{guess}' (or 'pre'|'post'|'peri'|'output'|'none') to label the "
                     f"blocks and map only what can be mapped")
            other = f"{other}, or {force}" if other else force[0].upper() + force[1:]
        raise DiscoveryError(
            f"cannot map the residual structure of {type(root).__name__} (blocks='{blocks_path}', "
            f"{len(block_list)} x {type(block_list[0][1]).__name__}): {failed[0].why}. "
            f"Module lists found: {describe_lists(root)}; norms found: {describe_norms(root)}. "
            f"{other or 'Pass example_input= matching its forward, or blocks= naming the list of blocks'}.")
    for r in failed:
        notes.append(f"{r.why}; only resid mapped")
    x0, y_last = results[0].x, results[-1].y
    if x0 is None or y_last is None:
        raise DiscoveryError(f"cannot find the input of block 0 or the output of the last block of "
                             f"{type(root).__name__}; pass example_input= matching its forward")
    d_model = x0.t.shape[-1]

    if not stacks:
        stacks = [make_stack("", blocks_path, block_list, results, tr)]
    for st in stacks:
        if "norm.embed" in st.outside:
            _identity_pre_attn(root, st.results, notes)
    norm_infos = residual_norms(root, [(st.results, st.outside) for st in stacks], stacks[0].first_call.dtype,
                                notes)
    outside = stacks[-1].outside
    after = [c for c in tr.calls if c.start > stacks[-1].last_call.end and tr.count[c.name] == 1]
    embed, head = embed_and_head(root, block_list, after, outside.get("norm.final"))
    param_roles = parameter_roles(root, block_list, results, norm_infos, embed, head)

    block_infos = [r.info for r in results]
    if placement is not None:
        for b in block_infos:
            b.placement = placement
        notes.append(f"placement forced to '{placement}' by the caller")
    common = {b.placement for b in block_infos}
    final = outside["norm.final"][1].point if "norm.final" in outside else None
    if final is None:
        notes.append("no final norm found after the last block (site final not mapped)")
    return ModelMap(
        model_class=type(root).__name__, d_model=int(d_model), n_layers=len(block_infos),
        blocks_path=blocks_path, blocks=block_infos,
        placement=common.pop() if len(common) == 1 else "mixed",
        resid_out=y_last.point, final=final,
        embed=embed[0] if embed else None, norms=norm_infos, param_roles=param_roles, notes=notes,
        stacks=[st.info() for st in stacks] if len(stacks) > 1 else [],
    )


def _identity_pre_attn(root: nn.Module, results: list, notes: list[str]) -> None:
    """Block 0 of ModernBERT replaces its pre-attention norm by nn.Identity because the embeddings
    already end in a norm: when every other block has one placement with a pre-attention norm and
    block 0 lacks only that norm, while its module of the same relative name is an nn.Identity and
    an embedding norm feeds block 0, block 0 gets the placement of the others."""
    if len(results) < 2 or results[0].info.placement != "mixed" or "norm.pre_attn" in results[0].norm_calls:
        return
    others = {r.info.placement for r in results[1:]}
    if len(others) != 1 or not {"pre", "peri"} & others:
        return
    if set(results[0].norm_calls) | {"norm.pre_attn"} != set(results[1].norm_calls):
        return
    b0, b1 = results[0].info.name, results[1].info.name
    rel = results[1].norm_calls["norm.pre_attn"].name[len(b1) + 1:]
    try:
        twin = root.get_submodule(f"{b0}.{rel}")
    except AttributeError:
        return
    if isinstance(twin, nn.Identity):
        results[0].info.placement = others.pop()
        notes.append(f"block 0: '{b0}.{rel}' is nn.Identity where the other blocks have their pre-attention "
                     f"norm; the embedding norm normalises block 0's input, so block 0 counts as "
                     f"'{results[0].info.placement}'")

