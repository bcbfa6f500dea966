"""The hook bodies: what runs inside the probe's forward hooks and hidden-state gradient hooks.

This is the hot path (design page section 6): off schedule a hook returns after one Python call
(``is_on``); on schedule it reduces the hooked tensor to a small device partial
(``lnprobe.stats.reduce_activation`` / ``reduce_gradient``) and files it under every (site, layer)
that the hook point serves. No host synchronisation; the tensors read are never modified or kept.
Forwards re-run inside backward by activation checkpointing are not reduced again (the autograd
engine's current graph task tells a recompute apart from a forward), but they carry the gradient
hook when the first forward ran without grad (reentrant checkpointing). A hook point that raises is
disabled with one warning and a note; training goes on.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from . import stats as S
from .runtime import in_backward, no_compile

SiteKey = tuple[str, int]  # (site, layer)


class SiteObserver:
    """Makes the hook functions of one probe and files what they reduce in its accumulators."""

    def __init__(self, acc: dict, grad_keys: set, is_on: Callable[[], bool], notes: list[str], failed_points: set):
        self.acc = acc  # (site, layer) -> steprows.SiteAccumulator
        self.grad_keys = grad_keys  # (site, layer) whose hidden-state gradient is recorded
        self.is_on = is_on  # the probe records forwards now (schedule, open, training mode)
        self.notes = notes
        self.failed_points = failed_points
        self.plans: dict[Any, S.StatPlan] = {}  # hook point -> what its reduction computes

    def pre_hook(self, entries):
        """A forward pre-hook observing the block inputs of ``entries`` [(point, keys)]."""
        @no_compile
        def pre_hook(module, args, kwargs):
            if self.is_on():
                for point, keys in entries:
                    self.observe(point, point.fetch(args, kwargs), keys)
            return None

        return pre_hook

    def fwd_hook(self, entries):
        """A forward hook observing the module outputs of ``entries`` [(point, keys)]."""
        @no_compile
        def fwd_hook(module, args, kwargs, output):
            if self.is_on():
                for point, keys in entries:
                    self.observe(point, point.fetch(args, kwargs, output), keys)
            return None

        return fwd_hook

    def observe(self, point: Any, x: Any, keys: list[SiteKey]) -> None:
        """Reduce ``x`` into the open step's partials for ``keys``; arm its gradient hook if asked."""
        if point in self.failed_points or not torch.is_tensor(x) or not x.is_floating_point():
            return
        try:
            recompute = in_backward()
            if not recompute:
                plan = self.plans.get(point)
                if plan is None:
                    plan = self.plans[point] = S.StatPlan(tuple(sorted({s for k in keys for s in self.acc[k].stats})))
                part = S.reduce_activation(x, plan)
                n_tok = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
                for k in keys:
                    acc = self.acc[k]
                    acc.parts.append(part)
                    acc.n_elem += x.numel()
                    acc.n_tok += n_tok
            grad_keys = [k for k in keys if k in self.grad_keys]
            if not grad_keys:
                return
            if recompute:  # reentrant checkpointing: the first forward ran without grad
                grad_keys = [k for k in grad_keys if self.acc[k].pending_grad > 0]
                if grad_keys and x.requires_grad:
                    for k in grad_keys:
                        self.acc[k].pending_grad -= 1
                    x.register_hook(self.grad_hook(point, grad_keys))
            elif x.requires_grad and torch.is_grad_enabled():
                x.register_hook(self.grad_hook(point, grad_keys))
            else:
                for k in grad_keys:
                    self.acc[k].pending_grad += 1
        except Exception as exc:  # a probe never crashes training
            self.fail(point, exc)

    def grad_hook(self, point: Any, keys: list[SiteKey]):
        """A tensor hook reducing the hidden-state gradient at ``point`` (divided by the AMP loss scale)."""
        def grad_hook(g):
            if point in self.failed_points:
                return None
            try:
                part = S.reduce_gradient(g)
                for k in keys:
                    self.acc[k].grads.append(part)
                    self.acc[k].g_elem += g.numel()
            except Exception as exc:
                self.fail(point, exc)
            return None

        return grad_hook

    def fail(self, point: Any, exc: BaseException) -> None:
        """Disable ``point`` after ``exc`` with one warning and a note; training goes on."""
        self.failed_points.add(point)
        msg = f"lnprobe: disabled hook point {point} after {type(exc).__name__}: {exc}; training continues"
        self.notes.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
