"""Per-step training scalars: ``train`` rows ``loss``, ``grad_norm`` and ``lr`` at every optimizer step.

The probe's recorded steps carry these rows already (``lnprobe.steprows``, with ``grad_norm`` derived
from the parameters' norms). ``StepScalars`` adds them for the steps the schedule does not record, so
a loss or gradient-norm curve (and the spike score of docs/theory.md §5) has every step.

Measurement point: ``probe.step()``, i.e. after backward (and ``scaler.unscale_``), before clipping:
``grad_norm`` is the global gradient norm before clipping, sqrt(Σ_p ‖∇p‖²) over every parameter with a
``.grad``, computed on the device from the gradients in one fused multi-tensor norm
(``lnprobe.paramstats.norms_of``, ``torch._foreach_norm``).

Hot path (design page §6): each step writes its values into one row of a small preallocated device
buffer (``CAPACITY`` rows of 3 float64; a full buffer is replaced by a fresh one, the old one is freed
once flushed) and adds a ``StepRows`` that views that row; a flush concatenates all buffered rows and
moves them to the host in its one transfer. No host synchronisation on any step.

Under torch.distributed (§7) the rows merge like the recorded ones, except ``grad_norm``: with no
parameter rows to derive it from, each rank sends sqrt(Σ_p c_p ‖∇p_local‖²) and the rows merge as
``sqsum`` (root of the sum over ranks), with c_p = 1 / replicas for a sharded (FSDP2) parameter and
1 / world size for a replicated one (DDP: every rank holds the same reduced gradient), so the result
is the global norm one process would compute.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import distributed as D
from . import stats as S
from .runtime import local_shard
from .steprows import Layout, StepRows

CAPACITY = 1024  # rows of one device buffer: 24 KiB
SCALARS = ("loss", "grad_norm", "lr")  # the per-step train statistics, in row order


class StepScalars:
    """Builds the per-step ``train`` rows of unrecorded steps, and the global gradient norm."""

    def __init__(self, layout: Callable[[tuple], Layout], world_size: int = 1):
        self._layout = layout  # StepRowsBuilder.layout: key tuples -> cached Layout
        self._world = max(int(world_size), 1)
        self._buf: torch.Tensor | None = None  # (CAPACITY, 3) float64
        self._used = 0
        self._groups: dict[tuple[int, ...], list[tuple[float, list[int]]]] = {}
        self._meta: dict[tuple[str, ...], tuple[Layout, np.ndarray, np.ndarray]] = {}
        self._nan_loc: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._signal_index: dict[int, tuple[int | None, int | None]] = {}

    def grad_norm(self, params: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor | None:
        """0-d float64 device tensor: the global gradient norm now (weighted per rank, see module
        docstring; the plain norm in one process); None when no parameter has a gradient."""
        grads = [p for _, p in params if p.grad is not None]
        if not grads:
            return None
        key = tuple(id(p) for p in grads)
        groups = self._groups.get(key)
        if groups is None:  # weight of each parameter's squared norm, grouped (one group in one process)
            by_weight: dict[float, list[int]] = {}
            for i, p in enumerate(grads):
                kind, w = D.param_norm_reduction(p)
                by_weight.setdefault(w if kind == D.SQSUM else 1.0 / self._world, []).append(i)
            groups = self._groups[key] = list(by_weight.items())
        total = None
        for c, idx in groups:
            sq = S.norms_of([local_shard(grads[i].grad) for i in idx]).square().sum()  # () float64
            sq = sq if c == 1.0 else sq * c
            total = sq if total is None else total + sq.to(total.device)
        return total.sqrt()

    def rows(self, step: int, loss: Any, grad_norm: torch.Tensor | None, lr: float | None,
             device: torch.device) -> StepRows | None:
        """The ``train`` rows of one unrecorded step (those of ``loss``, ``grad_norm``, ``lr`` that are
        given), their values in a row of the device buffer; None when none is given."""
        present = [(s, v) for s, v in zip(SCALARS, (loss, grad_norm, lr)) if v is not None]
        if not present:
            return None
        if torch.is_tensor(grad_norm):
            device = grad_norm.device
        elif torch.is_tensor(loss):
            device = loss.device
        if self._buf is None or self._used == CAPACITY or self._buf.device != device:
            self._buf = torch.empty((CAPACITY, len(SCALARS)), dtype=torch.float64, device=device)
            self._used = 0
        row = self._buf[self._used, : len(present)]  # (k,) view: the buffered StepRows keep the buffer alive
        self._used += 1
        for j, (_, v) in enumerate(present):
            if torch.is_tensor(v):
                row[j].copy_(v.detach().reshape(()))  # device to device, or a cast: no sync
            else:
                row[j].fill_(float(v))  # a host float is written by a fill, not a host-to-device copy
        layout, weights, kinds = self._keys(tuple(s for s, _ in present))
        return StepRows(step, row, self._nan(len(present), device), layout, weights, kinds)

    def signals(self, rows: StepRows | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(loss, grad_norm) of a step's rows as 0-d device views (None when the step has no such row),
        for the spike detector; the same for recorded and unrecorded steps."""
        if rows is None:
            return None, None
        idx = self._signal_index.get(id(rows.layout))
        if idx is None:
            lay = rows.layout
            train = np.flatnonzero(lay.site == "train")
            found = {str(lay.stat[i]): int(i) for i in train}
            idx = self._signal_index[id(rows.layout)] = (found.get("loss"), found.get("grad_norm"))
        return tuple(None if i is None else rows.values[i] for i in idx)  # type: ignore[return-value]

    def _keys(self, stats: tuple[str, ...]) -> tuple[Layout, np.ndarray, np.ndarray]:
        meta = self._meta.get(stats)
        if meta is None:
            # grad_norm: sqsum of the ranks' weighted local norms (module docstring), not the registry's
            # "derived" (no parameter rows on an unrecorded step); loss and lr as in the registry.
            kinds = [D.SQSUM if s == "grad_norm" else S.stat("train", s).merge_code for s in stats]
            meta = self._meta[stats] = (self._layout(tuple(("train", -1, s) for s in stats)),
                                        np.ones(len(stats), dtype=np.float64), np.asarray(kinds, dtype=np.int8))
        return meta

    def _nan(self, k: int, device: torch.device) -> torch.Tensor:
        loc = self._nan_loc.get((k, device))
        if loc is None:  # (2, k): no token or channel; shared by every step (a flush concatenates copies)
            loc = self._nan_loc[(k, device)] = torch.full((2, k), float("nan"), dtype=torch.float64, device=device)
        return loc
