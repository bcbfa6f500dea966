"""Optimizer update statistics: per parameter ``update_rms`` and ``update_ratio`` of the step just taken.

    probe = lnprobe.attach(model, "runs/x", updates=opt)      # or a list of optimizers
    ...; loss.backward(); probe.step(loss=loss); opt.step(); opt.zero_grad()

Definitions (registry kind ``update``, sites ``param:<name>``), with Δp = p_after − p_before of one
``optimizer.step()``:

- ``update_rms`` = ‖Δp‖ / sqrt(numel), the RMS of the change;
- ``update_ratio`` = ‖Δp‖ / ‖p_before‖ (inf when p_before = 0 and Δp ≠ 0, NaN when both are 0).

Measurement point: ``register_step_pre_hook`` / ``register_step_post_hook`` on each optimizer. Which
probe step an update belongs to: when ``probe.step()`` ran since this optimizer's last step (the
documented order ``probe.step()`` then ``opt.step()``; the HF Trainer), the step it closed; otherwise
the step now open, which ``probe.step()`` closes inside the optimizer step (``opt.step(closure)``
runs backward and ``on_before_optimizer_step`` after the pre-hook: PyTorch Lightning). Rows are
written only when that step is on the schedule. An optimizer step skipped by a GradScaler (inf/NaN
gradients) calls no hook and gives no rows. Wrapped optimizers (Accelerate's ``AcceleratedOptimizer``,
Lightning's ``LightningOptimizer``) are unwrapped to the torch optimizer they hold.

Memory: a copy of the parameters is taken in the pre-hook of recorded steps only and freed in the
post-hook, so off-schedule steps hold and compute nothing, and no copy lives between steps. The
copy (of the parameters that have a gradient, the ones a step can change) makes the statistics
exact for any optimizer (AdamW, Adam, SGD with momentum, Adafactor, ...), where reconstructing Δp
from the optimizer state would need a formula per optimizer and per option (amsgrad, nesterov,
foreach/fused, maximize). Its price is one transient parameter-sized allocation on recorded steps;
``every=10`` makes that one step in ten. No host synchronisation: copies and norms are device ops
(one fused ``_foreach`` copy, subtraction and norm each).

Distributed: under DDP the parameters are replicated and the rows are taken as they are; parameters
that are sharded DTensors (FSDP2) are left out (a note says so): the ratio of two sharded norms needs
a cross-rank reduction of both that the flush does not make yet.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy as np
import torch

from . import distributed as D
from . import stats as S

UPDATE_STATS: tuple[str, ...] = S.UPDATE_STATS  # ("update_rms", "update_ratio"), registry order


class UpdateTracker:
    """Hooks on one or more optimizers that file ``update_rms``/``update_ratio`` rows with a probe.

    ``steps()`` returns ``(calls, closed, open)``: how many times ``probe.step()`` ran, the step it
    closed last and the step now open, each None when not recorded. ``emit(step, names, values,
    kinds, weights)`` files the rows (the probe buffers them, so they go out with the next flush).
    """

    def __init__(self, optimizers: Any, named_params: Iterable[tuple[str, torch.Tensor]],
                 steps: Callable[[], tuple[int, int | None, int | None]], emit: Callable[..., None], notes: list[str]):
        if not isinstance(optimizers, (list, tuple)):
            optimizers = [optimizers]
        self.optimizers = [_unwrap(o) for o in optimizers]
        for opt in self.optimizers:
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"lnprobe: updates= takes torch.optim.Optimizer objects; found {type(opt).__name__}")
        self.names = {id(p): n for n, p in named_params}
        self.steps, self.emit, self.notes = steps, emit, notes
        self._calls: dict[int, int] = {}  # optimizer -> probe.step() calls seen at its last step
        self._before: dict[int, tuple[int, list[str], list[torch.Tensor], list[torch.Tensor]]] = {}
        self._done: dict[int, int] = {}  # optimizer -> last step it produced rows for
        self._handles = []
        self._sharded_noted = False
        for opt in self.optimizers:
            self._handles.append(opt.register_step_pre_hook(self._pre))
            self._handles.append(opt.register_step_post_hook(self._post))

    def _params(self, opt: torch.optim.Optimizer) -> tuple[list[str], list[torch.Tensor]]:
        names, params = [], []
        for group in opt.param_groups:
            for p in group["params"]:
                n = self.names.get(id(p))
                if n is None or p.grad is None:
                    continue
                if D.param_norm_reduction(p)[0] != D.MEAN:  # a sharded DTensor (FSDP2)
                    if not self._sharded_noted:
                        self._sharded_noted = True
                        self.notes.append("update_rms/update_ratio not recorded for sharded (FSDP2) parameters")
                    continue
                names.append(n)
                params.append(p)
        return names, params

    def _pre(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        calls, closed, open_ = self.steps()
        step = closed if calls != self._calls.get(id(opt), 0) else open_
        self._calls[id(opt)] = calls
        if step is None or self._done.get(id(opt)) == step:
            return
        names, params = self._params(opt)
        if params:
            with torch.no_grad():
                before = [t.detach().clone() for t in params]  # the transient copy (recorded steps only)
            self._before[id(opt)] = (step, names, params, before)

    def _post(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._calls[id(opt)] = self.steps()[0]
        entry = self._before.pop(id(opt), None)
        if entry is None:
            return
        step, names, params, before = entry
        with torch.no_grad():
            dev = before[0].device
            if len({t.device for t in before}) == 1:
                delta = torch._foreach_sub([p.detach() for p in params], before)
                norms = torch._foreach_norm([d.float() for d in delta])
                dn = torch.stack(norms).double()  # (P,)
                # dividing by a Scalar list needs no tensor built from host numbers (a copy to the device)
                rms = torch.stack(torch._foreach_div(norms, [math.sqrt(p.numel()) for p in params])).double()
                pn = torch.stack(torch._foreach_norm([b.float() for b in before])).double()  # (P,)
                del delta
            else:  # a model spread over devices: per parameter, gathered on the first device
                dn = torch.stack([(p.detach() - b).float().norm().double().to(dev) for p, b in zip(params, before)])
                pn = torch.stack([b.float().norm().double().to(dev) for b in before])
                rms = torch.stack([d / math.sqrt(p.numel()) for d, p in zip(dn.unbind(0), params)])
            del before
            values = torch.stack([rms, dn / pn], 1).reshape(-1)  # (2P,) interleaved: update_rms, update_ratio
        kinds, weights = [], []
        for p in params:
            kind, w = D.param_norm_reduction(p)  # MEAN, 1 for a replicated parameter
            kinds += [kind, kind]
            weights += [w, w]
        self._done[id(opt)] = step
        self.emit(step, names, values, np.asarray(kinds, dtype=np.int8), np.asarray(weights, dtype=np.float64))

    def remove(self) -> None:
        """Remove the optimizer hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._before.clear()


def _unwrap(opt: Any) -> Any:
    """The torch optimizer inside a wrapper (``.optimizer`` of Accelerate's and Lightning's)."""
    while not isinstance(opt, torch.optim.Optimizer) or type(opt).__name__ in ("AcceleratedOptimizer",):
        inner = getattr(opt, "optimizer", None) or getattr(opt, "_optimizer", None)
        if inner is None or inner is opt:
            break
        opt = inner
    return opt
