"""The hook bodies: what runs inside the probe's forward hooks and hidden-state gradient hooks.

This is the hot path (design page section 6): off schedule a hook returns after one Python call
(``is_on``); on schedule it reduces the hooked tensor to a small device partial
(``lnprobe.stats.reduce_activation`` / ``reduce_gradient``) and files it under every (site, layer)
that the hook point serves. No host synchronisation; the tensors read are never modified or kept.
Forwards re-run inside backward by activation checkpointing are not reduced again (the autograd
engine's current graph task tells a recompute apart from a forward), but they carry the gradient
hook when the first forward ran without grad (reentrant checkpointing). A hook point that raises is
disabled with one warning and a note; training goes on.

Under ``torch.compile`` the same hooks are traced into the model's graph (``lnprobe.traced``): the
reduction runs inside the compiled code and its result comes back through the ``lnprobe::deliver``
operator to ``receive``, which files it as an eager hook would. No graph break; the schedule flag is the
only guard the hooks add. A recompute of activation checkpointing inside a compiled region is the
compiler's business (it does not re-run the hooks), so the traced path does not ask the autograd engine.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from . import stats as S
from . import traced
from .runtime import compiling, in_backward

SiteKey = tuple[str, int]  # (site, layer)
# The fields of an ActivationPartial that a traced hook may deliver (those that are not None).
_PARTIAL_FIELDS = ("sums", "counts", "cand", "cand_tok", "sample", "blocks")
_GRADIENT = "gradient"  # the ``fields`` of a delivered hidden-state gradient partial


class SiteObserver:
    """Makes the hook functions of one probe and files what they reduce in its accumulators."""

    def __init__(self, acc: dict, grad_keys: set, is_on: Callable[[], bool], notes: list[str], failed_points: set,
                 block_modules: frozenset[str] = frozenset()):
        self.acc = acc  # (site, layer) -> steprows.SiteAccumulator
        # Module names of the blocks: a block's input is read by that block alone, so substituting it
        # in the block's pre-hook reaches every use of it (see observe_traced).
        self.block_modules = block_modules
        self.grad_keys = grad_keys  # (site, layer) whose hidden-state gradient is recorded
        self.is_on = is_on  # the probe records forwards now (schedule, open, training mode)
        self.notes = notes
        self.failed_points = failed_points
        self.plans: dict[Any, S.StatPlan] = {}  # hook point -> what its reduction computes
        # Traced hooks name their point by its index here (an int constant in the compiled graph).
        self.points: list[tuple[Any, list[SiteKey], list[SiteKey]]] = []  # (point, keys, gradient keys)
        self.key = traced.register(self.receive)

    def close(self) -> None:
        """Stop receiving from compiled graphs (they keep calling ``deliver``, which then does nothing)."""
        traced.unregister(self.key)

    def _prepare(self, entries) -> list[tuple[int, Any, list[SiteKey], S.StatPlan]]:
        """(index, point, keys, plan) of each entry, decided before any call: traced code then reads
        nothing that changes while the probe runs."""
        out = []
        for point, keys in entries:
            plan = self.plans.get(point)
            if plan is None:
                plan = self.plans[point] = S.StatPlan(tuple(sorted({s for k in keys for s in self.acc[k].stats})))
            self.points.append((point, keys, [k for k in keys if k in self.grad_keys]))
            out.append((len(self.points) - 1, point, keys, plan))
        return out

    def pre_hook(self, entries):
        """A forward pre-hook observing the block inputs of ``entries`` [(point, keys)]."""
        prepared = self._prepare(entries)

        def pre_hook(module, args, kwargs):
            if not self.is_on():
                return None
            if compiling():
                return self.observe_traced(prepared, args, kwargs)
            for _, point, keys, plan in prepared:
                self.observe(point, point.fetch(args, kwargs), keys, plan)
            return None

        return pre_hook

    def fwd_hook(self, entries):
        """A forward hook observing the module outputs of ``entries`` [(point, keys)]."""
        prepared = self._prepare(entries)

        def fwd_hook(module, args, kwargs, output):
            if not self.is_on():
                return None
            if compiling():
                return self.observe_traced(prepared, args, kwargs, output, forward=True)
            for _, point, keys, plan in prepared:
                self.observe(point, point.fetch(args, kwargs, output), keys, plan)
            return None

        return fwd_hook

    def observe(self, point: Any, x: torch.Tensor, keys: list[SiteKey], plan: S.StatPlan) -> None:
        """Reduce ``x`` into the open step's partials for ``keys``; arm its gradient hook if asked."""
        if not _observable(point, x, self.failed_points):
            return
        try:
            recompute = in_backward()
            if not recompute:
                self._file(S.reduce_activation(x, plan), keys)
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

    def observe_traced(self, prepared, args: tuple, kwargs: dict | None, output: Any = None,
                       forward: bool = False) -> Any:
        """The traced form of a hook call (Dynamo is tracing it into the model's graph).

        Each point's reduction becomes part of the compiled graph and ``deliver`` hands its tensors
        to ``receive`` at run time. A module output or a block input whose hidden-state gradient is
        recorded is passed on through ``_GradientTap``, an identity (a copy) whose backward reduces
        the gradient and delivers it the same way; the hook then returns the call's values with the
        tapped tensor in its place (what a forward hook or pre-hook returns to substitute them), else
        None. Why not ``Tensor.register_hook`` as in eager mode: Dynamo traces a hook on an
        intermediate tensor speculatively and, in PyTorch 2.13, loses attribute writes that the
        model's own Python objects make after it (a transformers KV cache then fails and the frame
        falls back to eager). Other inputs (a sublayer's norm input, read by the residual add too)
        keep the traced tensor hook: a substitute would see only the gradient through that module.
        """
        replaced = None
        for idx, point, _, plan in prepared:
            x = point.fetch(args, kwargs, output)
            if not _observable(point, x, self.failed_points):
                continue
            part = S.reduce_activation(x, plan)
            fields = [f for f in _PARTIAL_FIELDS if getattr(part, f) is not None]
            torch.ops.lnprobe.deliver(self.key, idx, ",".join(fields), [getattr(part, f) for f in fields],
                                      [part.n_elem, part.n_tok, part.d, part.t])
            if not (self.points[idx][2] and x.requires_grad and torch.is_grad_enabled()):
                continue
            if point.flat or not (forward or point.module in self.block_modules):
                # another module may read this tensor too (e.g. a norm's input is also the residual
                # stream): only a hook on the tensor itself sees its whole gradient
                x.register_hook(self.traced_grad_hook(idx))
                continue
            tapped = _GradientTap.apply(x, self.key, idx)
            if forward:
                output = replaced = point.replace(args, kwargs, output, tapped)
            else:
                args, kwargs = replaced = point.replace(args, kwargs, output, tapped)
        return replaced

    def traced_grad_hook(self, idx: int):
        """A tensor hook traced into the backward graph: reduce and deliver the gradient at ``self.points[idx]``."""
        key = self.key

        def grad_hook(g):
            part = S.reduce_gradient(g)
            torch.ops.lnprobe.deliver(key, idx, _GRADIENT, [part.packed], [part.n_elem])
            return None

        return grad_hook

    def receive(self, idx: int, fields: str, tensors: list[torch.Tensor], sizes: list[int]) -> None:
        """Run time of a compiled graph: file what a traced hook reduced at ``self.points[idx]``."""
        point, keys, grad_keys = self.points[idx]
        if point in self.failed_points:
            return
        try:
            if fields == _GRADIENT:
                self._file_gradient(S.GradientPartial(tensors[0], sizes[0]), grad_keys)
            else:
                names = fields.split(",") if fields else []
                self._file(S.ActivationPartial(*sizes, **dict(zip(names, tensors))), keys)
        except Exception as exc:  # raised inside the compiled graph's run: it must not reach training
            self.fail(point, exc)

    def _file(self, part: S.ActivationPartial, keys: list[SiteKey]) -> None:
        """Add one forward call's partial to the open step of every (site, layer) in ``keys``."""
        for k in keys:
            acc = self.acc[k]
            acc.parts.append(part)
            acc.n_elem += part.n_elem
            acc.n_tok += part.n_tok

    def _file_gradient(self, part: S.GradientPartial, keys: list[SiteKey]) -> None:
        for k in keys:
            self.acc[k].grads.append(part)
            self.acc[k].g_elem += part.n_elem

    def grad_hook(self, point: Any, keys: list[SiteKey]):
        """A tensor hook reducing the hidden-state gradient at ``point`` (divided by the AMP loss scale)."""
        def grad_hook(g):
            if point in self.failed_points:
                return None
            try:
                self._file_gradient(S.reduce_gradient(g), keys)
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


def _observable(point: Any, x: Any, failed_points: set) -> bool:
    """A floating-point tensor at a hook point that has not failed."""
    return point not in failed_points and torch.is_tensor(x) and x.is_floating_point()


class _GradientTap(torch.autograd.Function):
    """Identity in the forward; in the backward it reduces the hidden-state gradient at hook point
    ``idx`` (``lnprobe.stats.reduce_gradient``), delivers it to receiver ``key`` and passes the
    gradient on unchanged. Traced hooks use it in place of a tensor hook.

    The forward returns a copy, not a view: autograd forbids modifying a custom Function's view
    output in place, and a model may do that to a block's output (``x.mul_(...)``). Inductor fuses
    the copy into its consumers where it can; it exists on recorded steps only.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, key: int, idx: int) -> torch.Tensor:
        ctx.key, ctx.idx = key, idx
        return x.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        part = S.reduce_gradient(g)
        torch.ops.lnprobe.deliver(ctx.key, ctx.idx, _GRADIENT, [part.packed], [part.n_elem])
        return g, None, None
