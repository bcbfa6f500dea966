"""Counting the device operations that code dispatches: the measure of the hot path's cost on an
accelerator, where every operation is a kernel launch and every activation-sized temporary a pass over
memory.

``OpCounter`` is a ``TorchDispatchMode``: it sees every aten operation below Python (also those made
inside torch functions) and sorts them into *kernels* (operations that compute: one launch each on a
GPU), *views* (``reshape``, ``slice``, ``detach``, ...: metadata only) and *allocations* (``empty``,
``empty_like``: no kernel). Fused kernels of ``lnprobe.kernels`` are not aten operations; they report
their launches to the active counter themselves (``note_launch``), one kernel each, and what runs
inside them (Triton's interpreter on CPU) is not counted. It also adds up the bytes of the tensors
that kernels create, and the largest of them, so a test can bound the temporaries of a reduction.
Used by ``tests/test_hotpath.py`` and ``benchmarks/overhead.py``; not on any hot path.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_ALLOC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
_METADATA = {"detach", "alias", "lift_fresh", "_to_copy_meta", "set_", "resize_", "_local_scalar_dense",
             "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size"}
_ACTIVE: list["OpCounter"] = []


def _kind(func: Any) -> str:
    name = func._schema.name.split("::")[-1]
    if name in _ALLOC:
        return "alloc"
    if getattr(func, "is_view", False) or name in _METADATA:
        return "view"
    return "kernel"


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while active: ``kernels``, ``views``, ``allocs`` and
    ``names`` (a Counter of kernel names), ``new_bytes`` (bytes of the tensors created by kernels and
    allocations) and ``largest`` (the largest of them)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = self.views = self.allocs = 0
        self.names: Counter = Counter()
        self.new_bytes = self.largest = 0
        self._muted = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._muted:
            return out
        kind = _kind(func)
        if kind == "view":
            self.views += 1
            return out
        if kind == "alloc":
            self.allocs += 1
        else:
            self.kernels += 1
            self.names[func._schema.name.split("::")[-1]] += 1
        ins = {id(a) for a in tree_flatten((args, kwargs))[0] if torch.is_tensor(a)}
        for t in tree_flatten(out)[0]:
            if torch.is_tensor(t) and id(t) not in ins and not func._schema.name.endswith("_"):
                nbytes = t.numel() * t.element_size()
                self.new_bytes += nbytes
                self.largest = max(self.largest, nbytes)
        return out

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def note_launch(self, name: str, new_bytes: int = 0) -> None:
        """Count one fused kernel launch (not an aten operation) and the bytes of what it creates."""
        self.kernels += 1
        self.names[name] += 1
        self.new_bytes += new_bytes
        self.largest = max(self.largest, new_bytes)

    @contextmanager
    def muted(self) -> Iterator[None]:
        """Operations inside are not counted (the inside of a fused kernel run by an interpreter)."""
        self._muted += 1
        try:
            yield
        finally:
            self._muted -= 1

    @property
    def total(self) -> int:
        """Kernels: the operations that launch device work."""
        return self.kernels


def active() -> "OpCounter | None":
    """The innermost active OpCounter, or None (the common case: one list test on the hot path)."""
    return _ACTIVE[-1] if _ACTIVE else None
