"""Several stacks of blocks in one model: the encoder and the decoder of an encoder–decoder.

An encoder–decoder (T5, BART, Whisper, nn.Transformer) has two lists of blocks, each carrying its
own residual stream; the decoder's blocks also read the encoder's output (the memory their
cross-attention attends to). That dataflow is the criterion, not a module name or a config flag:
a second list of identical blocks, disjoint from the first and run once per block, is the decoder
of the first when its block 0 receives, besides its own stream X, a tensor equal to the first
list's output Y (the output of its last block) or to the output of the first list's final norm.
The list that runs first is the encoder. Blocks are numbered globally in forward order (encoder
0..Le-1, decoder Le..Le+Ld-1), and each stack has its own embedding and final norm
(`norms.outside_norms` per stack).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ..sites import StackInfo
from .blocks import map_block, other_block_lists
from .norms import outside_norms
from .trace import amax, close, rel_tol

if TYPE_CHECKING:
    from .blocks import BlockResult
    from .trace import Call, Pt, Trace

STACK_NAMES = ("encoder", "decoder")


@dataclass
class Stack:
    """One mapped stack: its block list, the BlockResults (global indices), the calls of its first
    and last block, and its embedding and final norms (`outside_norms`)."""

    name: str
    path: str
    block_list: list[tuple[str, nn.Module]]
    results: list[BlockResult]
    first_call: Call
    last_call: Call
    outside: dict[str, tuple[Call, Pt]]

    def info(self) -> StackInfo:
        """The StackInfo: name, path, first global layer, block count, common placement."""
        placements = {r.info.placement for r in self.results}
        return StackInfo(self.name, self.path, self.results[0].info.index, len(self.results),
                         placements.pop() if len(placements) == 1 else "mixed")


def make_stack(name: str, path: str, block_list, results: list[BlockResult], tr: Trace) -> Stack:
    """A Stack of mapped `results` (block 0 has an input, the last block an output)."""
    first_call, last_call = tr.by_name[block_list[0][0]][0], tr.by_name[block_list[-1][0]][0]
    outside = outside_norms(tr, first_call, last_call, results[0].x, results[-1].y)
    return Stack(name, path, block_list, results, first_call, last_call, outside)


def _reads_output(enc: Stack, dec_first: BlockResult, dec_call: Call) -> bool:
    """True when the decoder's block 0 gets, besides its stream X, the encoder's output or its final
    norm's output, and X itself is not that output (a second list continuing one stream is not a
    decoder)."""
    memories = [enc.results[-1].y.t] + ([enc.outside["norm.final"][1].t] if "norm.final" in enc.outside else [])
    tol = rel_tol(enc.first_call.dtype)

    def same(a, b) -> bool:
        return close(a, b, tol * max(amax(a), amax(b), 1e-30))

    if any(same(dec_first.x.t, m) for m in memories):
        return False
    # X is no memory, so an input equal to one is another argument (the cross-attention's memory)
    return any(same(t, m) for _, t in dec_call.ins for m in memories)


def decoder_pair(root: nn.Module, path: str, block_list, results: list[BlockResult], tr: Trace
                 ) -> tuple[tuple[str, list], tuple[str, list]] | None:
    """((encoder path, blocks), (decoder path, blocks)) when another list of identical blocks pairs
    with the mapped list at `path` as described in the module docstring (either one may be the
    encoder); else None."""
    first = make_stack("", path, block_list, results, tr)
    for other_path, blist in other_block_lists(root, path):
        if other_path.startswith(path + ".") or path.startswith(other_path + "."):
            continue  # nested lists (experts inside blocks) are not stacks
        if not all(tr.count.get(n) == 1 for n, _ in blist):
            continue
        other_results = [map_block(i, n, tr, []) for i, (n, _) in enumerate(blist)]
        if not all(r.mapped for r in other_results):
            continue
        other = make_stack("", other_path, blist, other_results, tr)
        enc, dec = (first, other) if first.first_call.start < other.first_call.start else (other, first)
        if enc.last_call.end < dec.first_call.start and _reads_output(enc, dec.results[0], dec.first_call):
            return (enc.path, enc.block_list), (dec.path, dec.block_list)
    return None
