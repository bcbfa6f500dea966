"""Hooks traced into a ``torch.compile``d graph, and how their results reach the probe.

When Dynamo traces a model, it also traces the forward hooks of its submodules and the tensor hooks
they register on intermediate outputs. The probe's hooks then become part of the model's graph: the
reductions of ``lnprobe.stats`` (its fixed-shape ``torch`` path, which inductor fuses with the model's
own kernels) run inside the compiled code, with no graph break (design page section 8).

The results are small device tensors (a few sums, three candidate rows, the median sample) that must
reach the probe's accumulators, which are Python lists. Appending to a Python list inside traced code
would make Dynamo guard on the list's length, so every micro-batch of a step would compile its own
variant. Instead the traced code calls the custom operator ``lnprobe::deliver`` with the tensors: to
Dynamo it is one opaque operator with a side effect (never removed as dead code); at run time its
implementation hands the tensors to a receiver registered by the probe, in plain Python, exactly as an
eager hook would file them. Nothing that changes from call to call is read by the traced code, so a
probed model compiles two variants, one for recorded and one for unrecorded steps (the schedule flag is
the only guard the probe adds), and never recompiles after that.

Measurement points and definitions are those of the eager hooks; only the delivery differs.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Callable

import torch

#: receiver key -> weak reference to ``receive(point, fields, tensors, sizes)``
_receivers: dict[int, "weakref.WeakMethod"] = {}
_keys = itertools.count(1)

# The operator runs host code (the receiver) at every call: replaying a captured CUDA graph would skip
# it, so it asks inductor's CUDA-graph trees to keep it out of their graphs (tag of PyTorch ≥ 2.6).
_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def _custom_op(name: str):
    """``torch.library.custom_op`` with the tags above where this PyTorch takes them (2.4 does not)."""
    try:
        return torch.library.custom_op(name, mutates_args=(), tags=_TAGS)
    except TypeError:
        return torch.library.custom_op(name, mutates_args=())


@_custom_op("lnprobe::deliver")
def deliver(key: int, point: int, fields: str, tensors: list[torch.Tensor], sizes: list[int]) -> None:
    """Hand ``tensors`` (the fields named in ``fields``, comma-separated) and the host ``sizes`` of one
    reduction at hook point ``point`` to the receiver registered under ``key``; nothing when it is gone.

    The tensors are copied first: a compiled graph may reuse the memory of an operator's inputs once
    the operator has run, and the probe keeps them until the step is closed.
    """
    ref = _receivers.get(key)
    receiver = ref() if ref is not None else None
    if receiver is not None:
        receiver(point, fields, [t.clone() for t in tensors], list(sizes))


@deliver.register_fake
def _deliver_fake(key, point, fields, tensors, sizes) -> None:
    return None


# Its result is unused: without this, graph passes would drop the call as dead code.
torch.fx.node.has_side_effect(torch.ops.lnprobe.deliver.default)


def register(receive: Callable[[int, str, list, list], None]) -> int:
    """Register a bound method ``receive(point, fields, tensors, sizes)``; returns its key for
    ``deliver``. Held by a weak reference: a receiver that is garbage-collected receives nothing."""
    key = next(_keys)
    _receivers[key] = weakref.WeakMethod(receive)
    return key


def unregister(key: int) -> None:
    """Forget the receiver of ``key``: compiled graphs that still call ``deliver`` with it do nothing."""
    _receivers.pop(key, None)

