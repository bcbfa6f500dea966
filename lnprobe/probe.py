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
- hidden-state gradients are divided by the AMP loss scale of that backward.

A probe observes only: every hook returns ``None`` and never touches the tensors it reads. If a hook
raises, the probe warns once, stops using that hook point and training goes on.
"""
from __future__ import annotations

import atexit
import platform
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

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

    def clear(self) -> None:
        self.parts.clear()
        self.grads.clear()
        self.pending_grad = 0


@dataclass
class _StepEntry:
    step: int
    values: torch.Tensor  # (K,) float64
    loc: torch.Tensor  # (2, K) float64: token, channel (NaN when not located)
    layout: "_Layout"


@dataclass
class _Layout:
    site: np.ndarray
    layer: np.ndarray
    stat: np.ndarray


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
    ):
        from .sites import discover, unwrap

        if record not in ("train", "all"):
            raise ValueError(f"record must be 'train' (forwards in training mode) or 'all'; found {record!r}")
        if flush_every < 1:
            raise ValueError(f"flush_every must be ≥ 1, found {flush_every}")
        self.schedule = Schedule.parse(every)
        self.model = unwrap(model)
        self.map = discover(self.model, example_input, blocks=blocks, placement=placement)
        self.record_all = record == "all"
        self.flush_every = flush_every
        self.scaler = scaler
        self.current_step = int(start_step)
        self._active = self.schedule(self.current_step)
        self._closed = False
        self._handles: list[Any] = []
        self._buffer: list[_StepEntry] = []
        self._layouts: dict[tuple, _Layout] = {}
        self._failed_points: set = set()
        self._plans: dict[Any, S.StatPlan] = {}
        self._scalars: list[tuple[int, str, float]] = []
        self._warned_eval = False
        self._notes: list[str] = list(self.map.notes)

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
        self.writer = RunWriter(out, meta, overwrite=not append)
        self.path = self.writer.path
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
        def pre_hook(module, args, kwargs):
            if self._recording():
                for point, keys in entries:
                    self._observe(point, point.fetch(args, kwargs), keys)
            return None

        return pre_hook

    def _make_fwd_hook(self, entries):
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
                for k in keys:
                    self._acc[k].parts.append(part)
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
        """
        if self._closed:
            raise RuntimeError("probe.step() after probe.close(): attach a new probe to keep recording")
        if step is not None:
            self.current_step = int(step)
            self._active = self.schedule(self.current_step)
        if self._active:
            try:
                self._finalize_step(loss, lr, scaler if scaler is not None else self.scaler)
            except Exception as exc:
                self._notes.append(f"step {self.current_step}: statistics dropped after {type(exc).__name__}: {exc}")
                warnings.warn(f"lnprobe: step {self.current_step} not recorded: {exc}", RuntimeWarning, stacklevel=2)
        for acc in self._acc.values():
            acc.clear()
        self.current_step += 1
        self._active = self.schedule(self.current_step)
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def _finalize_step(self, loss: Any, lr: float | None, scaler: Any) -> None:
        values: list[torch.Tensor] = []
        locs: list[torch.Tensor] = []
        keys: list[tuple[str, int, str]] = []
        device = None
        scale = _loss_scale(scaler)
        n_recorded = 0
        for (site, layer), acc in self._acc.items():
            if acc.parts:
                v, loc = S.finalize_activation(acc.parts, acc.stats)
                values.append(v)
                locs.append(loc)
                keys.extend((site, layer, s) for s in acc.stats)
                device = device or v.device
                n_recorded += 1
            if acc.grads:
                g = S.finalize_gradient(acc.grads, scale)
                values.append(g)
                locs.append(torch.full((2, 2), float("nan"), dtype=torch.float64, device=g.device))
                keys.extend((site, layer, s) for s in S.GRADIENT_STATS)
        if n_recorded == 0 and self._acc and not self.model.training and not self.record_all and not self._warned_eval:
            self._warned_eval = True
            warnings.warn("lnprobe: no forward recorded at this step because the model is in eval mode; "
                          "pass record='all' to lnprobe.attach to record eval-mode forwards", RuntimeWarning, stacklevel=3)

        # Parameters: gradient and value norms, one fused reduction each.
        with_grad = [(n, p) for n, p in self._params if p.grad is not None]
        if with_grad:
            gn = S.norms_of([_local(p.grad) for _, p in with_grad])
            pn = S.norms_of([_local(p) for _, p in with_grad])
            device = device or gn.device
            values.append(torch.stack([gn, pn.to(gn.device)], 1).reshape(-1))  # (2P,) interleaved
            keys.extend((f"param:{n}", self._param_layer(n), s) for n, _ in with_grad for s in S.PARAM_STATS)
        else:
            gn = None
        named = dict(self._params)
        for _, w, b, off in self._gain_entries:
            gs = S.gain_stats(_local(named[w]) if w else None, off, _local(named[b]) if b else None)
            if w is not None:
                values.append(gs[:2])
                keys.extend([(f"param:{w}", self._param_layer(w), "gain_ms"), (f"param:{w}", self._param_layer(w), "gain_absmax")])
            if b is not None:
                values.append(gs[2:])
                keys.append((f"param:{b}", self._param_layer(b), "bias_ms"))
            device = device or gs.device

        train_vals, train_keys = [], []
        if loss is not None:
            lt = loss.detach().double().reshape(()) if torch.is_tensor(loss) else torch.tensor(float(loss), dtype=torch.float64)
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
            train_vals.append(torch.tensor(float(lr), dtype=torch.float64))
            train_keys.append("lr")
        if device is None:
            device = train_vals[0].device if train_vals else torch.device("cpu")
        if train_vals:
            values.append(torch.stack([t.to(device) for t in train_vals]))
            keys.extend(("train", -1, s) for s in train_keys)
        if not values:
            return
        values = [v.to(device) for v in values]
        flat = torch.cat(values)  # (K,)
        loc = torch.full((2, flat.numel()), float("nan"), dtype=torch.float64, device=device)
        if locs:
            act = torch.cat([l.to(device) for l in locs], 1)  # (2, K_act), activation rows come first
            loc[:, : act.shape[1]] = act
        self._buffer.append(_StepEntry(self.current_step, flat, loc, self._layout(tuple(keys))))

    def _param_layer(self, name: str) -> int:
        info = self.map.param_roles.get(name)
        return int(info["layer"]) if info else -1

    def _layout(self, keys: tuple) -> _Layout:
        lay = self._layouts.get(keys)
        if lay is None:
            lay = _Layout(np.array([k[0] for k in keys], dtype=object),
                          np.array([k[1] for k in keys], dtype=np.int64),
                          np.array([k[2] for k in keys], dtype=object))
            self._layouts[keys] = lay
        return lay

    # ----------------------------------------------------------------- output
    def flush(self) -> Path | None:
        """Move buffered steps to the host in one transfer and append one Parquet part."""
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

    def log_scalars(self, values: dict[str, float], step: int | None = None) -> None:
        """Record extra per-step scalars as ``train`` rows (e.g. ``val_loss``), written at the next flush.

        ``step`` defaults to the step currently open (the one the next ``probe.step()`` closes).
        Values are host floats, so this is for things the caller already has on the host.
        """
        at = self.current_step if step is None else int(step)
        for name, v in values.items():
            self._scalars.append((at, str(name), float(v)))

    def update_meta(self, **fields: Any) -> None:
        """Add or replace keys of meta.json (e.g. the trainer's divergence record)."""
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
            self.flush()
        finally:
            fields: dict[str, Any] = {"status": status, "notes": self._notes, "last_step": self.current_step - 1}
            if error:
                fields["error"] = error
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
            p.close(status="interrupted")

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
    ``config`` (stored in meta.json), ``run_name``, ``start_step``, ``append`` (resume into ``out``).
    """
    return Probe(model, out, every, **kwargs)
