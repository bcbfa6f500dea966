"""The probe: permanent hooks on a live model, per-step reduction, device buffers, flushes.

Measurement points (design page section 3): forward pre-hooks and forward hooks on the modules that
``lnprobe.sites.discover`` found, tensor hooks on the forward outputs for hidden-state gradients, and
the parameters' ``.grad`` at ``probe.step()``.

Hot-path rules (design page section 6):
- hooks stay registered for the whole run and return at once off schedule (one Python bool test);
- inside hooks only device reductions run: no ``.item()``/``.cpu()``/``bool(tensor)``; the reduced
  values stay on the device until a flush moves them to the host in one transfer;
- forwards re-run inside backward by activation checkpointing are not recorded twice (the autograd
  engine's current graph task tells a recompute apart from a forward);
- all forwards between two ``probe.step()`` calls (gradient accumulation) merge into one record;
- hidden-state gradients are divided by the AMP loss scale of that backward;
- under torch.distributed (DDP, FSDP2) statistics are reduced across ranks once per flush and only
  rank 0 writes (``lnprobe.distributed``); ``flush()`` and ``close()`` are then collective calls;
- under ``torch.compile`` the hook bodies are ``torch.compiler.disable``d: the schedule flag is read
  outside the traced code, so it never enters Dynamo's guards and flipping it never recompiles. The
  price is a graph break at every hooked module call (see ``_no_compile``).

A probe observes only: every hook returns ``None`` and never touches the tensors it reads. If a hook
raises, the probe warns once, stops using that hook point and training goes on.
"""
from __future__ import annotations

import atexit
import platform
import warnings
import weakref
import zlib
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import distributed as D
from . import stats as S
from .schedule import Schedule
from .store import RunWriter, records_frame

ALL_SITES: tuple[str, ...] = ("resid", "resid_mid", "attn_out", "mlp_out", "attn_raw", "mlp_raw", "mlp_act", "final")
DEFAULT_SITES = ALL_SITES
# Full statistics on the residual stream (variance laws, massive activations); cheaper moments
# elsewhere. ``stats="all"`` gives every statistic at every site.
_BRANCH_STATS = ("m2", "var", "rms", "absmax", "nonfinite")
DEFAULT_GRAD_SITES: tuple[str, ...] = ("resid",)

SiteKey = tuple[str, int]  # (site, layer)


def _in_backward() -> bool:
    """True while the autograd engine runs (e.g. a checkpointed forward being recomputed)."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class _SiteAccumulator:
    stats: tuple[str, ...]
    parts: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    pending_grad: int = 0  # forwards seen without grad (reentrant checkpointing): hook on recompute
    # Element and token counts of this step (host ints): the weights of a cross-rank mean.
    n_elem: int = 0
    n_tok: int = 0
    g_elem: int = 0

    def clear(self) -> None:
        self.parts.clear()
        self.grads.clear()
        self.pending_grad = 0
        self.n_elem = self.n_tok = self.g_elem = 0


@dataclass
class _StepEntry:
    step: int
    values: torch.Tensor  # (K,) float64
    loc: torch.Tensor  # (2, K) float64: token, channel (NaN when not located)
    layout: "_Layout"
    weights: np.ndarray | None = None  # (K,) host: cross-rank weights (distributed runs only)
    kinds: np.ndarray | None = None  # (K,) host int8: cross-rank reduction of each row (D.MEAN, ...)


@dataclass
class _Layout:
    site: np.ndarray
    layer: np.ndarray
    stat: np.ndarray
    crc: int = 0  # stable checksum of the keys: ranks compare layouts without sending them


class Probe:
    """Records per-layer statistics of a Transformer during training. Create it with ``lnprobe.attach``."""

    def __init__(
        self,
        model: nn.Module,
        out: str | Path,
        every: "int | str | Iterable[int] | Schedule" = 1,
        *,
        sites: Iterable[str] | str | None = None,
        stats: "Iterable[str] | str | dict[str, Iterable[str]] | None" = None,
        grad_sites: Iterable[str] | None = DEFAULT_GRAD_SITES,
        blocks: str | None = None,
        placement: str | None = None,
        example_input: Any = None,
        record: str = "train",
        flush_every: int = 20,
        scaler: Any = None,
        config: dict | None = None,
        run_name: str | None = None,
        start_step: int = 0,
        append: bool = False,
        distributed: bool | None = None,
        process_group: Any = None,
    ):
        from .discovery import discover, unwrap

        if record not in ("train", "all"):
            raise ValueError(f"record must be 'train' (forwards in training mode) or 'all'; found {record!r}")
        if flush_every < 1:
            raise ValueError(f"flush_every must be ≥ 1, found {flush_every}")
        self.schedule = Schedule.parse(every)
        self.model = unwrap(model)
        with _full_norm_params_for_discovery():
            self.map = discover(self.model, example_input, blocks=blocks, placement=placement)
        # FSDP2 swaps parameter objects between sharded and unsharded states: reshard what the discovery
        # forward left unsharded, and read the parameters afresh at every step (see _current_params).
        self._fsdp = [m for m in self.model.modules() if _is_fsdp2(m)]
        for m in self._fsdp:
            m.reshard()
        self.record_all = record == "all"
        self.flush_every = flush_every
        self.scaler = scaler
        self.current_step = int(start_step)
        self._active = self.schedule(self.current_step)
        self._closed = False
        self._handles: list[Any] = []
        self._buffer: list[_StepEntry] = []
        self._layouts: dict[tuple, _Layout] = {}
        self._act_index: dict[tuple, torch.Tensor] = {}  # see _act_select
        self._param_keys: dict[tuple[str, ...], list[tuple[str, int, str]]] = {}  # see _param_row_keys
        self._failed_points: set = set()
        self._plans: dict[Any, S.StatPlan] = {}
        self._scalars: list[tuple[int, str, float]] = []
        self._warned_eval = False
        self._notes: list[str] = list(self.map.notes)
        self._pending_steps = 0  # recorded steps since the last flush (the same count on every rank)
        self._captured: tuple[list[str], torch.Tensor] | None = None  # see capture_param_grads
        self._dist = D.context(process_group) if distributed in (None, True) else None
        if distributed and self._dist is None:
            raise RuntimeError("lnprobe.attach(distributed=True): torch.distributed is not initialised with more "
                               "than one rank; call torch.distributed.init_process_group first (e.g. under torchrun)")

        sites_wanted = self._parse_sites(sites)
        grad_wanted = set(self._parse_sites(grad_sites)) if grad_sites else set()
        self._site_stats = self._parse_stats(stats, sites_wanted)

        # (site, layer) -> accumulator, grouped by the hook point that produces the tensor.
        points = self.map.site_points()
        self._acc: dict[SiteKey, _SiteAccumulator] = {}
        self._grad_keys: set[SiteKey] = set()
        by_point: dict[Any, list[SiteKey]] = defaultdict(list)
        for key, point in sorted(points.items(), key=lambda kv: (ALL_SITES.index(kv[0][0]), kv[0][1])):
            if key[0] not in sites_wanted:
                continue
            self._acc[key] = _SiteAccumulator(self._site_stats[key[0]])
            if key[0] in grad_wanted:
                self._grad_keys.add(key)
            by_point[point].append(key)
        missing = sorted(set(sites_wanted) - {k[0] for k in self._acc})
        if missing:
            self._notes.append(f"sites not found in this model and not recorded: {missing}")
        self._register(by_point)

        self._params = [(n, p) for n, p in self.model.named_parameters()]
        self._gain_entries = self._norm_param_entries()

        meta = self.map.to_meta()
        meta.update(
            run_name=run_name or Path(out).name,
            status="running",
            schedule=self.schedule.to_meta(),
            sites=sorted({k[0] for k in self._acc}, key=ALL_SITES.index),
            grad_sites=sorted({k[0] for k in self._grad_keys}, key=ALL_SITES.index),
            stats={s: list(v) for s, v in self._site_stats.items() if s in sites_wanted},
            config=config or {},
            notes=self._notes,
            versions={"lnprobe": _version(), "torch": torch.__version__, "python": platform.python_version()},
        )
        if self._dist is not None:
            meta["distributed"] = self._dist.to_meta()
        # Only rank 0 writes; the other ranks keep no writer but take part in every reduction.
        self.writer = RunWriter(out, meta, overwrite=not append) if self._dist is None or self._dist.rank == 0 else None
        self.path = Path(out)
        self._atexit = _register_atexit(self)

    # ----------------------------------------------------------------- configuration
    @staticmethod
    def _parse_sites(sites: Iterable[str] | str | None) -> tuple[str, ...]:
        if sites is None:
            return DEFAULT_SITES
        if isinstance(sites, str):
            sites = ALL_SITES if sites == "all" else [sites]
        sites = tuple(sites)
        unknown = [s for s in sites if s not in ALL_SITES]
        if unknown:
            raise ValueError(f"unknown site(s) {unknown}: expected names from {list(ALL_SITES)} or 'all'")
        return sites

    @staticmethod
    def _parse_stats(stats: Any, sites: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
        if stats is None:
            return {s: (S.DEFAULT_ACTIVATION_STATS if s in ("resid", "final") else _BRANCH_STATS) for s in ALL_SITES}
        if isinstance(stats, str):
            stats = S.ACTIVATION_STATS if stats == "all" else [stats]
        if isinstance(stats, dict):
            out = {s: S.check_stats(list(v)) for s, v in stats.items()}
            return {s: out.get(s, _BRANCH_STATS) for s in ALL_SITES}
        chosen = S.check_stats(list(stats))
        return {s: chosen for s in ALL_SITES}

    def _norm_param_entries(self) -> list[tuple[str, str | None, str | None, float]]:
        """(weight name, bias name, gain offset) of every norm with parameters."""
        names = dict(self._params)
        out = []
        for norm in self.map.norms:
            w = norm.weight if norm.weight in names else None
            b = norm.bias if norm.bias in names else None
            if w is not None or b is not None:
                out.append((norm.name, w, b, float(norm.gain_offset)))
        return out

    # ----------------------------------------------------------------- hooks
    def _register(self, by_point: dict[Any, list[SiteKey]]) -> None:
        modules = dict(self.model.named_modules())
        grouped: dict[tuple[str, str], list[tuple[Any, list[SiteKey]]]] = defaultdict(list)
        for point, keys in by_point.items():
            grouped[(point.module, point.kind)].append((point, keys))
        for (mod_name, kind), entries in grouped.items():
            module = modules[mod_name]
            if kind == "in":
                h = module.register_forward_pre_hook(self._make_pre_hook(entries), with_kwargs=True)
            else:
                h = module.register_forward_hook(self._make_fwd_hook(entries), with_kwargs=True)
            self._handles.append(h)

    def _recording(self) -> bool:
        return self._active and not self._closed and (self.record_all or self.model.training)

    def _make_pre_hook(self, entries):
        @_no_compile
        def pre_hook(module, args, kwargs):
            if self._recording():
                for point, keys in entries:
                    self._observe(point, point.fetch(args, kwargs), keys)
            return None

        return pre_hook

    def _make_fwd_hook(self, entries):
        @_no_compile
        def fwd_hook(module, args, kwargs, output):
            if self._recording():
                for point, keys in entries:
                    self._observe(point, point.fetch(args, kwargs, output), keys)
            return None

        return fwd_hook

    def _observe(self, point: Any, x: Any, keys: list[SiteKey]) -> None:
        if point in self._failed_points or not torch.is_tensor(x) or not x.is_floating_point():
            return
        try:
            recompute = _in_backward()
            if not recompute:
                plan = self._plans.get(point)
                if plan is None:
                    plan = self._plans[point] = S.StatPlan(tuple(sorted({s for k in keys for s in self._acc[k].stats})))
                part = S.reduce_activation(x, plan)
                n_tok = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
                for k in keys:
                    acc = self._acc[k]
                    acc.parts.append(part)
                    acc.n_elem += x.numel()
                    acc.n_tok += n_tok
            grad_keys = [k for k in keys if k in self._grad_keys]
            if not grad_keys:
                return
            if recompute:  # reentrant checkpointing: the first forward ran without grad
                grad_keys = [k for k in grad_keys if self._acc[k].pending_grad > 0]
                if grad_keys and x.requires_grad:
                    for k in grad_keys:
                        self._acc[k].pending_grad -= 1
                    x.register_hook(self._make_grad_hook(point, grad_keys))
            elif x.requires_grad and torch.is_grad_enabled():
                x.register_hook(self._make_grad_hook(point, grad_keys))
            else:
                for k in grad_keys:
                    self._acc[k].pending_grad += 1
        except Exception as exc:  # a probe never crashes training
            self._fail(point, exc)

    def _make_grad_hook(self, point: Any, keys: list[SiteKey]):
        def grad_hook(g):
            if point in self._failed_points:
                return None
            try:
                part = S.reduce_gradient(g)
                for k in keys:
                    self._acc[k].grads.append(part)
                    self._acc[k].g_elem += g.numel()
            except Exception as exc:
                self._fail(point, exc)
            return None

        return grad_hook

    def _fail(self, point: Any, exc: BaseException) -> None:
        self._failed_points.add(point)
        msg = f"lnprobe: disabled hook point {point} after {type(exc).__name__}: {exc}; training continues"
        self._notes.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    # ----------------------------------------------------------------- steps
    def step(self, loss: Any = None, *, lr: float | None = None, scaler: Any = None, step: int | None = None) -> None:
        """Close the current optimizer step.

        Call once per optimizer step, after backward (and ``scaler.unscale_(opt)`` under AMP) and
        before gradient clipping, ``opt.step()`` and ``zero_grad()``. ``step`` relabels the step that
        is being closed (e.g. the trainer's global step); ``loss`` may be a tensor or a float.
        Under torch.distributed every rank must call it the same number of times (it may flush,
        and a flush is a collective call).
        """
        if self._closed:
            raise RuntimeError("probe.step() after probe.close(): attach a new probe to keep recording")
        if step is not None:
            self.current_step = int(step)
            self._active = self.schedule(self.current_step)
        if self._active:
            self._pending_steps += 1
            try:
                self._finalize_step(loss, lr, scaler if scaler is not None else self.scaler)
            except Exception as exc:
                self._notes.append(f"step {self.current_step}: statistics dropped after {type(exc).__name__}: {exc}")
                warnings.warn(f"lnprobe: step {self.current_step} not recorded: {exc}", RuntimeWarning, stacklevel=2)
        for acc in self._acc.values():
            acc.clear()
        self._captured = None
        self.current_step += 1
        self._active = self.schedule(self.current_step)
        # Counted in steps, not buffer entries: a step dropped on one rank must not shift that rank's
        # flushes (and so its collectives) against the other ranks'.
        if self._pending_steps >= self.flush_every:
            self.flush()

    def set_step(self, step: int) -> None:
        """Number the step now open (before its forwards), e.g. from a trainer's global step after a
        resume. Forwards already seen for the open step are kept."""
        self.current_step = int(step)
        self._active = self.schedule(self.current_step)

    def capture_param_grads(self, loss_scale: "torch.Tensor | float | None" = None) -> None:
        """Read the parameter gradient norms now, for the step that the next ``step()`` closes.

        For training loops that cannot call ``step()`` between backward and clipping (the Hugging Face
        Trainer): call this where the gradients are complete but not yet clipped; ``step()`` then uses
        these norms instead of reading ``.grad`` again. ``loss_scale`` divides the norms when the
        gradients are still multiplied by an AMP loss scale. A later call replaces an earlier one.
        No host synchronisation. Does nothing on steps that are not recorded.
        """
        if not self._active or self._closed:
            return
        with_grad = [(n, p) for n, p in self._current_params() if p.grad is not None]
        if not with_grad:
            self._captured = ([], torch.zeros(0, dtype=torch.float64))
            return
        gn = S.norms_of([_local(p.grad) for _, p in with_grad])  # (P,) float64
        if loss_scale is not None:
            gn = gn / (loss_scale.to(gn.device, torch.float64) if torch.is_tensor(loss_scale) else float(loss_scale))
        self._captured = ([n for n, _ in with_grad], gn)

    def _finalize_step(self, loss: Any, lr: float | None, scaler: Any) -> None:
        values: list[torch.Tensor] = []
        locs: list[torch.Tensor] = []
        keys: list[tuple[str, int, str]] = []
        dist_on = self._dist is not None
        weights: list[float] = []  # distributed runs only: one weight and one kind per key
        kinds: list[int] = []
        device = None
        scale = _loss_scale(scaler)
        n_recorded = 0
        # All sites in one batched finalize (a fixed handful of kernels instead of dozens per site:
        # tiny kernel launches dominate the step cost on a GPU). Activation rows first, then gradients.
        act = [(key, acc) for key, acc in self._acc.items() if acc.parts]
        if act:
            full, full_loc = S.finalize_activations([acc.parts for _, acc in act])  # (G, 12), (2, G, 12)
            sel = self._act_select(tuple(acc.stats for _, acc in act), full.device)  # (K_act,)
            values.append(full.reshape(-1).index_select(0, sel))
            locs.append(full_loc.reshape(2, -1).index_select(1, sel))
            for (site, layer), acc in act:
                keys.extend((site, layer, s) for s in acc.stats)
                if dist_on:
                    for s in acc.stats:
                        kinds.append(D.ACTIVATION_KIND[s])
                        weights.append(acc.n_tok if s in D.PER_TOKEN_STATS else acc.n_elem)
            device = full.device
            n_recorded = len(act)
        grads = [(key, acc) for key, acc in self._acc.items() if acc.grads]
        if grads:
            g = S.finalize_gradients([acc.grads for _, acc in grads], scale)  # (G2, 2)
            values.append(g.reshape(-1))
            locs.append(torch.full((2, g.numel()), float("nan"), dtype=torch.float64, device=g.device))
            for (site, layer), acc in grads:
                keys.extend((site, layer, s) for s in S.GRADIENT_STATS)
                if dist_on:
                    kinds.extend(D.GRADIENT_KIND[s] for s in S.GRADIENT_STATS)
                    weights.extend(acc.g_elem for _ in S.GRADIENT_STATS)
            device = device or g.device
        if n_recorded == 0 and self._acc and not self.model.training and not self.record_all and not self._warned_eval:
            self._warned_eval = True
            warnings.warn("lnprobe: no forward recorded at this step because the model is in eval mode; "
                          "pass record='all' to lnprobe.attach to record eval-mode forwards", RuntimeWarning, stacklevel=3)

        # Parameters: gradient and value norms in one fused multi-tensor reduction.
        params = self._current_params()
        named = dict(params)
        if self._captured is not None:
            names, gn = self._captured
            with_grad = [(n, named[n]) for n in names]
            pn = S.norms_of([_local(p) for _, p in with_grad]) if with_grad else None
        else:
            with_grad = [(n, p) for n, p in params if p.grad is not None]
            gn = pn = None
            if with_grad:  # gradients and values in one fused reduction
                both = S.norms_of([_local(p.grad) for _, p in with_grad] + [_local(p) for _, p in with_grad])
                gn, pn = both[: len(with_grad)], both[len(with_grad):]
        if with_grad:
            device = device or gn.device
            values.append(torch.stack([gn, pn.to(gn.device)], 1).reshape(-1))  # (2P,) interleaved
            keys.extend(self._param_row_keys(tuple(n for n, _ in with_grad)))
            if dist_on:
                for _, p in with_grad:
                    kind, w = D.param_norm_reduction(p)
                    kinds += [kind, kind]
                    weights += [w, w]
        else:
            gn = None
        entries = [(w, b, off, _local(named[w]) if w else None, _local(named[b]) if b else None)
                   for _, w, b, off in self._gain_entries]
        batched = None
        if entries and all((wl is None or wl.numel()) and (bl is None or bl.numel()) for *_, wl, bl in entries) \
                and len({t.device for *_, wl, bl in entries for t in (wl, bl) if t is not None}) == 1:
            # every norm in one fused reduction (no empty FSDP2 shard, one device)
            batched = S.gain_stats_many([e[3] for e in entries], [e[2] for e in entries], [e[4] for e in entries])
        for i, (w, b, off, wl, bl) in enumerate(entries):
            gs = batched[i] if batched is not None else _gain_values(wl, off, bl)
            if w is not None:
                values.append(gs[:2])
                keys.extend([(f"param:{w}", self._param_layer(w), "gain_ms"), (f"param:{w}", self._param_layer(w), "gain_absmax")])
                if dist_on:
                    kinds += [D.MEAN, D.MAX]
                    weights += [wl.numel(), 1]
            if b is not None:
                values.append(gs[2:])
                keys.append((f"param:{b}", self._param_layer(b), "bias_ms"))
                if dist_on:
                    kinds.append(D.MEAN)
                    weights.append(bl.numel())
            device = device or gs.device

        train_vals, train_keys = [], []
        if device is None:
            device = loss.device if torch.is_tensor(loss) else torch.device("cpu")
        if loss is not None:
            # a host float becomes a device tensor by a fill, not by a host-to-device copy (a sync)
            lt = loss.detach().double().reshape(()) if torch.is_tensor(loss) else \
                torch.full((), float(loss), dtype=torch.float64, device=device)
            train_vals += [lt, (~torch.isfinite(lt)).double()]
            train_keys += ["loss", "nonfinite_loss"]
        if gn is not None:
            total = gn.square().sum().sqrt()
            train_vals.append(total)
            train_keys.append("grad_norm")
            if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
                train_vals.append((~torch.isfinite(total)).double())
                train_keys.append("skipped")
        if lr is not None:
            train_vals.append(torch.full((), float(lr), dtype=torch.float64, device=device))
            train_keys.append("lr")
        if train_vals:
            values.append(torch.stack([t.to(device) for t in train_vals]))
            keys.extend(("train", -1, s) for s in train_keys)
            if dist_on:
                kinds.extend(D.TRAIN_KIND[s] for s in train_keys)
                weights.extend(1.0 for _ in train_keys)
        if not values:
            return
        values = [v.to(device) for v in values]
        flat = torch.cat(values)  # (K,)
        loc = torch.full((2, flat.numel()), float("nan"), dtype=torch.float64, device=device)
        if locs:
            act = torch.cat([l.to(device) for l in locs], 1)  # (2, K_act), activation rows come first
            loc[:, : act.shape[1]] = act
        entry = _StepEntry(self.current_step, flat, loc, self._layout(tuple(keys)))
        if dist_on:
            entry.weights = np.asarray(weights, dtype=np.float64)
            entry.kinds = np.asarray(kinds, dtype=np.int8)
        self._buffer.append(entry)

    def _act_select(self, stats: tuple[tuple[str, ...], ...], device: torch.device) -> torch.Tensor:
        """Flat indices of the requested statistics in the ``(G, 12)`` matrix of
        ``S.finalize_activations``; built once per layout and device, then cached.

        On CUDA the index goes up from pinned memory without blocking (no sync even the first time).
        """
        key = (stats, device)
        idx = self._act_index.get(key)
        if idx is None:
            n = len(S.ACTIVATION_STATS)
            host = torch.tensor([g * n + S.ACTIVATION_STATS.index(s) for g, st in enumerate(stats) for s in st],
                                dtype=torch.long)
            if device.type == "cuda":
                idx = host.pin_memory().to(device, non_blocking=True)
            else:
                idx = host.to(device)
            self._act_index[key] = idx
        return idx

    def _param_row_keys(self, names: tuple[str, ...]) -> list[tuple[str, int, str]]:
        """Row keys of the parameter norms of ``names`` (grad_norm, param_norm each), cached."""
        keys = self._param_keys.get(names)
        if keys is None:
            keys = [(f"param:{n}", self._param_layer(n), s) for n in names for s in S.PARAM_STATS]
            self._param_keys[names] = keys
        return keys

    def _current_params(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.model.named_parameters()) if self._fsdp else self._params

    def _param_layer(self, name: str) -> int:
        info = self.map.param_roles.get(name)
        return int(info["layer"]) if info else -1

    def _layout(self, keys: tuple) -> _Layout:
        lay = self._layouts.get(keys)
        if lay is None:
            lay = _Layout(np.array([k[0] for k in keys], dtype=object),
                          np.array([k[1] for k in keys], dtype=np.int64),
                          np.array([k[2] for k in keys], dtype=object),
                          zlib.crc32("\x1f".join(f"{a}\x1e{b}\x1e{c}" for a, b, c in keys).encode()))
            self._layouts[keys] = lay
        return lay

    # ----------------------------------------------------------------- output
    def flush(self) -> Path | None:
        """Move buffered steps to the host in one transfer and append one Parquet part.

        Under torch.distributed this is a collective call (every rank must make it): the steps are
        reduced across ranks (``lnprobe.distributed.reduce_rows``) and rank 0 writes the part.
        """
        self._pending_steps = 0
        if self._dist is not None:
            return self._flush_distributed()
        scalars, self._scalars = self._scalars, []
        if not self._buffer:
            return self.writer.append(_scalar_frame(scalars)) if scalars else None
        buf, self._buffer = self._buffer, []
        sizes = [e.values.numel() for e in buf]
        dev = buf[0].values.device
        packed = torch.cat([torch.cat([e.values.to(dev), e.loc.to(dev).reshape(-1)]) for e in buf])
        host = packed.cpu().numpy()  # the one host transfer of this flush
        steps, site, layer, stat, value, token, channel = [], [], [], [], [], [], []
        pos = 0
        for e, k in zip(buf, sizes):
            chunk = host[pos: pos + 3 * k]
            pos += 3 * k
            steps.append(np.full(k, e.step, dtype=np.int64))
            site.append(e.layout.site)
            layer.append(e.layout.layer)
            stat.append(e.layout.stat)
            value.append(chunk[:k])
            token.append(chunk[k: 2 * k])
            channel.append(chunk[2 * k:])
        frame = records_frame(*(np.concatenate(a) for a in (steps, site, layer, stat, value, token, channel)))
        if scalars:
            frame = pd.concat([frame, _scalar_frame(scalars)], ignore_index=True)
        return self.writer.append(frame)

    def _local_rows(self, buf: list[_StepEntry]) -> D.LocalRows:
        """This rank's buffered steps as one flat set of rows (device values, host keys)."""
        return D.LocalRows.from_entries(
            [(e.step, e.layout) for e in buf], [e.values for e in buf], [e.loc for e in buf],
            [e.weights for e in buf], [e.kinds for e in buf])

    def _flush_distributed(self) -> Path | None:
        # Everything that can fail on one rank alone runs before the first collective; the failure is
        # then agreed on by all ranks (one tiny all_gather) and raised everywhere, naming the rank.
        scalars, self._scalars = self._scalars, []
        buf, self._buffer = self._buffer, []
        rows, error = None, None
        try:
            rows = self._local_rows(buf)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        reduced = D.reduce_rows(self._dist, rows, error)
        path, write_error = None, None
        if self._dist.rank == 0:
            try:
                frames = [reduced.frame()] if reduced is not None else []
                if scalars:
                    frames.append(_scalar_frame(scalars))
                frames = [f for f in frames if not f.empty]
                if frames:
                    path = self.writer.append(pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0])
            except Exception as exc:
                write_error = f"{type(exc).__name__}: {exc}"
        # Rank 0 alone writes: if that fails the other ranks must fail too, not run on into a hang.
        D.agree(self._dist, write_error, "write the run directory")
        return path

    def log_scalars(self, values: dict[str, float], step: int | None = None) -> None:
        """Record extra per-step scalars as ``train`` rows (e.g. ``val_loss``), written at the next flush.

        ``step`` defaults to the step currently open (the one the next ``probe.step()`` closes).
        Values are host floats, so this is for things the caller already has on the host.
        """
        at = self.current_step if step is None else int(step)
        for name, v in values.items():
            self._scalars.append((at, str(name), float(v)))

    def update_meta(self, **fields: Any) -> None:
        """Add or replace keys of meta.json (e.g. the trainer's divergence record); rank 0 only writes."""
        if self.writer is not None:
            self.writer.update_meta(**fields)

    def close(self, status: str = "finished", error: str | None = None) -> None:
        """Flush, write the final status to meta.json and remove every hook. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            h.remove()
        self._handles.clear()
        try:
            if self._dist is not None and status != "finished":
                # Ending on an error: the other ranks may be anywhere (in a DDP all-reduce, or dead), so a
                # reduction could hang. Drop the unflushed steps instead.
                if self._buffer:
                    self._notes.append(f"{len(self._buffer)} recorded step(s) after the last flush dropped: the "
                                       f"distributed run ended with status {status!r}")
                self._buffer.clear()
                self._scalars.clear()
            else:
                self.flush()
        except BaseException as exc:  # the last flush failed (e.g. on another rank): say so in meta.json
            status, error = "crashed", error or f"{type(exc).__name__}: {exc}"
            raise
        finally:
            fields: dict[str, Any] = {"status": status, "notes": self._notes, "last_step": self.current_step - 1}
            if error:
                fields["error"] = error
            if self.writer is not None:
                self.writer.update_meta(**fields)
            if self._atexit is not None:
                atexit.unregister(self._atexit)
                self._atexit = None

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.close(status="crashed", error=f"{exc_type.__name__}: {exc}")

    @property
    def hook_count(self) -> int:
        return len(self._handles)

    @property
    def held_bytes(self) -> int:
        """Bytes of tensor storage the probe holds right now: the partial reductions of the open step
        (between its forwards and ``step()``) and the buffered steps not yet flushed. Read it after
        backward, before ``step()``, for the most the probe keeps. Activations are never held."""
        tensors = [t for acc in self._acc.values() for p in acc.parts
                   for t in (p.sums, p.counts, p.cand, p.cand_tok, p.sample) if t is not None]
        tensors += [g.packed for acc in self._acc.values() for g in acc.grads]
        tensors += [t for e in self._buffer for t in (e.values, e.loc)]
        if self._captured is not None:
            tensors.append(self._captured[1])
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


def _scalar_frame(scalars: list[tuple[int, str, float]]) -> pd.DataFrame:
    n = len(scalars)
    return records_frame(
        np.array([s[0] for s in scalars], dtype=np.int64), np.array(["train"] * n, dtype=object),
        np.full(n, -1, dtype=np.int64), np.array([s[1] for s in scalars], dtype=object),
        np.array([s[2] for s in scalars], dtype=np.float64), np.full(n, np.nan), np.full(n, np.nan),
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def _gain_values(weight: torch.Tensor | None, offset: float, bias: torch.Tensor | None) -> torch.Tensor:
    """``S.gain_stats``, also for an empty local shard (FSDP2 with fewer rows than ranks): there the
    means are NaN and the max is -inf; they carry weight 0 in the cross-rank reduction."""
    if (weight is None or weight.numel()) and (bias is None or bias.numel()):
        return S.gain_stats(weight, offset, bias)
    dev = (weight if weight is not None else bias).device
    nan = torch.full((), float("nan"), dtype=torch.float64, device=dev)
    w = S.gain_stats(weight, offset, None)[:2] if weight is not None and weight.numel() else \
        torch.stack([nan, torch.full_like(nan, float("-inf"))])
    b = S.gain_stats(None, offset, bias)[2:] if bias is not None and bias.numel() else nan.reshape(1)
    return torch.cat([w.to(dev), b.to(dev)])  # (3,)


def _is_fsdp2(m: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(m, FSDPModule)


@contextmanager
def _full_norm_params_for_discovery():
    """During discovery, let ``sites._fit_norm`` see FSDP2-sharded norm parameters as whole tensors.

    Discovery fits each norm's formula from its traced input and output with its gain and bias; under
    FSDP2 those are DTensor shards, which cannot be mixed with plain tensors. For each fit the norm's own
    parameters (D elements each) are all-gathered (``full_tensor``: every rank runs the same discovery,
    so the collectives match) and swapped in, then restored at once. Nothing else is gathered.
    TODO(lead): this belongs in ``sites._fit_norm`` (read ``p.full_tensor()`` for a DTensor there).
    """
    from .discovery import norms as sites

    orig = sites._fit_norm

    def fit(x, y, m, low):
        saved = {k: p for k, p in m.named_parameters(recurse=False) if hasattr(p, "full_tensor")}
        if not saved:
            return orig(x, y, m, low)
        try:
            for k, p in saved.items():
                m._parameters[k] = nn.Parameter(p.detach().full_tensor(), requires_grad=False)
            return orig(x, y, m, low)
        finally:
            for k, p in saved.items():
                m._parameters[k] = p

    sites._fit_norm = fit
    try:
        yield
    finally:
        sites._fit_norm = orig


def _no_compile(fn):
    """Keep ``fn`` (a hook body) out of torch.compile's tracing.

    Why: a hook traced by Dynamo puts the schedule flag into the guards (flipping it recompiles), and
    its tensor hooks / autograd-engine queries cannot be traced anyway. Disabled, the hook runs eagerly
    on every call, reads the flag itself, and the compiled code around it never changes. Dynamo breaks
    the graph at each hooked module call; when the model calls its blocks in a Python loop, Dynamo runs
    that loop eagerly and compiles each block's forward as its own graph.
    """
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


def _loss_scale(scaler: Any) -> torch.Tensor | None:
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return None
    scale = getattr(scaler, "_scale", None)
    return scale if torch.is_tensor(scale) else None


def _register_atexit(probe: Probe):
    ref = weakref.ref(probe)

    def _close_at_exit() -> None:
        p = ref()
        if p is not None and not p._closed:
            p.close(status="interrupted")  # distributed: no collective at exit (see close)

    atexit.register(_close_at_exit)
    return _close_at_exit


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lnprobe")
    except Exception:
        return "0+unknown"


def attach(model: nn.Module, out: str | Path, every: "int | str | Iterable[int] | Schedule" = 1, **kwargs: Any) -> Probe:
    """Attach a probe to ``model`` that writes the run directory ``out``.

    ``every``: 1 (every step), N, ``"log"``/``"log:K"`` or a list of steps. Keyword arguments: ``sites``
    (default: all sites of the design page that the model has, or ``"all"``), ``stats`` (default: full
    statistics at ``resid``/``final``, moments and absmax elsewhere; ``"all"``; a list; or a dict
    site → list), ``grad_sites`` (default ``("resid",)``), ``blocks``/``placement`` overrides,
    ``example_input`` for the discovery trace, ``record`` ("train": forwards in training mode; "all"),
    ``flush_every`` (recorded steps per Parquet part), ``scaler`` (a ``torch.amp.GradScaler``),
    ``config`` (stored in meta.json), ``run_name``, ``start_step``, ``append`` (resume into ``out``),
    ``distributed`` (default: on when torch.distributed is initialised with more than one rank; then
    statistics are reduced across the ranks of ``process_group`` once per flush and only rank 0
    writes ``out``; False: every rank records and writes alone, so give each its own ``out``).
    """
    return Probe(model, out, every, **kwargs)
