"""Spike-triggered bursts: record every step for a while after a loss or gradient-norm spike.

    probe = lnprobe.attach(model, "runs/x", every=100, burst=lnprobe.Burst(steps=50, history=16))

**The rule.** At every ``probe.step()`` the step's ``loss`` and global ``grad_norm`` (before clipping,
``lnprobe.stepscalars``) are compared, on the device, with the previous values of the same signal:

- a *spike*: the value is at least ``threshold`` standard deviations (sample std) above the mean of the
  previous ``window`` finite values, with at least ``min_history`` of them — the spike rule of
  docs/theory.md §5 (``lnprobe.analysis.massive.spike_score``), evaluated online with the same
  defaults (window 1000, 7σ, 10 values), so the online triggers are the offline spikes;
- a *non-finite* value (NaN/Inf) triggers too (``nonfinite=True``) and, as in §5, is left out of the
  window.

A trigger at step k records every step from the first one the host learns of it to k + ``steps``
(a trigger inside a running burst extends it). A signal that rises steadily can trigger too: early in
training the gradient norm may sit many of its (small) standard deviations above the mean of its
first values; a ``min_history`` longer than that start evaluates no step before it.

The decision never synchronises the host: the device packs (trigger code, z of each signal, values)
into 5 float64 and copies them without blocking into pinned host memory; each ``probe.step()`` reads
the copies that have arrived (a CUDA event query). On CPU the copy of step k has arrived at the end of
its own ``step()``: the burst starts at k + 1. On an accelerator it has arrived by the next ``step()``
whenever the device keeps up with the host: the burst starts at k + 2 (later only if the host runs
more than that ahead; with ``SLOTS`` copies in flight the oldest is waited for).

**History.** ``history=H`` > 0 also keeps, on the device, the residual stream's ``m2`` and ``absmax``
at every layer for the last H unrecorded steps (forward hooks on the ``resid`` points: one fused
norm and one ``aminmax`` per layer per training forward). When a burst starts these steps are written
too (``resid`` rows ``m2`` and ``absmax``, without token and channel), so the run-up to the spike is in
the records.

meta.json ``bursts``: one entry per burst — ``trigger_step``, ``signals`` (which fired), ``reason``
(words), per signal its ``value`` and ``z``, ``first_step`` and ``last_step`` (the steps recorded),
``history`` (the run-up steps written), ``extended`` (triggers inside the burst). ``burst`` in
meta.json holds the settings. Not supported under torch.distributed yet (the ranks would have to agree
on every decision): ``attach`` refuses it there.
"""
from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from . import stats as S
from . import traced
from .runtime import compiling, in_backward
from .steprows import StepRows

SIGNALS = ("loss", "grad_norm")
SLOTS = 8  # trigger copies in flight at most (host slots of pinned memory)
# trigger code bits: 1 << (2 * signal) for a spike, 1 << (2 * signal + 1) for a non-finite value
_PACK = 5  # code, z_loss, z_grad_norm, loss, grad_norm


@dataclass(frozen=True)
class Burst:
    """Settings of spike-triggered bursts (module docstring: the rule).

    steps: N, the steps recorded after a trigger at step k (through k + N); window, threshold,
    min_history: the spike rule of docs/theory.md §5; signals: ``"loss"``, ``"grad_norm"`` or both;
    nonfinite: a NaN/Inf value triggers; history: H, the unrecorded steps before the trigger whose
    residual-stream m2 and absmax are written with the burst (0: none).
    """

    steps: int = 100
    window: int = 1000
    threshold: float = 7.0
    min_history: int = 10
    signals: tuple[str, ...] = SIGNALS
    nonfinite: bool = True
    history: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "signals", (self.signals,) if isinstance(self.signals, str) else tuple(self.signals))
        for name, lo in (("steps", 1), ("window", 2), ("min_history", 2), ("history", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"lnprobe.Burst({name}=...): expected an integer ≥ {lo}, found {v!r}")
        if self.min_history > self.window:
            raise ValueError(f"lnprobe.Burst: min_history ({self.min_history}) must be ≤ window ({self.window})")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"lnprobe.Burst(threshold=...): expected a finite number > 0, found {self.threshold!r}")
        bad = [s for s in self.signals if s not in SIGNALS]
        if bad or not self.signals:
            raise ValueError(f"lnprobe.Burst(signals=...): expected a non-empty subset of {list(SIGNALS)}, "
                             f"found {list(self.signals)}")

    def to_meta(self) -> dict:
        """The meta.json ``burst`` entry."""
        d = asdict(self)
        d["signals"] = list(self.signals)
        return d


@dataclass
class Trigger:
    """A trigger read back on the host: its step, which signals fired and why."""

    step: int
    code: int
    z: tuple[float, float]
    values: tuple[float, float]

    def fired(self) -> list[tuple[str, str]]:
        """(signal, "spike" | "nonfinite") for every condition that fired."""
        return [(s, kind) for i, s in enumerate(SIGNALS) for kind, bit in (("spike", 2 * i), ("nonfinite", 2 * i + 1))
                if self.code >> bit & 1]


class SpikeDetector:
    """The online spike rule on the device, with the asynchronous copy of each step's decision."""

    def __init__(self, cfg: Burst, device: torch.device):
        self.cfg = cfg
        self.device = device
        self._ring: torch.Tensor | None = None  # (window, 2) float64: previous finite values, NaN = empty
        self._pos: torch.Tensor | None = None  # (2,) int64: next slot of each signal's ring column
        self._enabled = [s in cfg.signals for s in SIGNALS]
        pin = device.type == "cuda"
        self._host = torch.empty((SLOTS, _PACK), dtype=torch.float64, pin_memory=pin)
        self._host_np = self._host.numpy()  # read through numpy: the copy has arrived when we look
        self._pending: deque[tuple[int, int, Any]] = deque()  # (step, slot, CUDA event or None)
        self._arrived: list[Trigger] = []
        self._masks: dict = {}
        self._count = 0

    def _start(self, device: torch.device) -> None:
        self.device = device
        self._ring = torch.full((self.cfg.window, 2), float("nan"), dtype=torch.float64, device=device)
        self._pos = torch.zeros(2, dtype=torch.long, device=device)
        bits = [float(1 << (2 * i)) * on for i, on in enumerate(self._enabled)]
        nbits = [float(1 << (2 * i + 1)) * (on and self.cfg.nonfinite) for i, on in enumerate(self._enabled)]
        host = torch.tensor([bits, nbits], dtype=torch.float64)
        self._bits = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host  # (2, 2)

    def observe(self, step: int, loss: Any, grad_norm: Any) -> None:
        """Evaluate the rule for ``step`` on the device and start the copy of its decision to the host."""
        dev = next((t.device for t in (grad_norm, loss) if torch.is_tensor(t)), self.device)
        if self._ring is None or self._ring.device != dev:
            self._start(dev)
        v = torch.stack([self._value(loss, dev), self._value(grad_norm, dev)])  # (2,) NaN when not given
        ring = self._ring  # (W, 2)
        in_window = torch.isfinite(ring)  # (W, 2)
        n = in_window.sum(0).double()  # (2,) values in each signal's window
        mean = torch.where(in_window, ring, 0.0).sum(0) / n.clamp(min=1)  # (2,)
        ss = torch.where(in_window, (ring - mean).square(), 0.0).sum(0)
        std = (ss / (n - 1).clamp(min=1)).sqrt()  # sample std, as pandas' rolling std
        excess = v - mean
        finite = torch.isfinite(v)
        spike = finite & (n >= self.cfg.min_history) & (excess > 0) & (excess >= self.cfg.threshold * std)
        given = [loss is not None, grad_norm is not None]
        code = (spike.double() * self._bits[0]).sum()
        if self.cfg.nonfinite and any(given):
            code = code + ((~finite).double() * self._bits[1] * self._mask(given, dev)).sum()
        z = excess / std  # inf or NaN where std is 0
        # a value enters its signal's window only when finite (spike_score drops non-finite values)
        slot = (self._pos % self.cfg.window).unsqueeze(0)  # (1, 2)
        ring.scatter_(0, slot, torch.where(finite.unsqueeze(0), v.unsqueeze(0), ring.gather(0, slot)))
        self._pos += finite.long()
        self._copy(step, torch.cat([code.reshape(1), z, v]))  # (5,)

    def _mask(self, given: list[bool], dev: torch.device) -> torch.Tensor:
        """(2,) float64 device constant: 1 for the signals given this step (cached: no copy per step)."""
        key = (tuple(given), dev)
        t = self._masks.get(key)
        if t is None:
            host = torch.tensor([float(g) for g in given], dtype=torch.float64)
            t = self._masks[key] = host.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else host
        return t

    @staticmethod
    def _value(x: Any, dev: torch.device) -> torch.Tensor:
        if x is None:
            return torch.full((), float("nan"), dtype=torch.float64, device=dev)
        if torch.is_tensor(x):
            return x.detach().reshape(()).to(dev, torch.float64)
        return torch.full((), float(x), dtype=torch.float64, device=dev)  # a fill, not a host-to-device copy

    def _copy(self, step: int, packed: torch.Tensor) -> None:
        if len(self._pending) == SLOTS:  # the device is SLOTS steps behind the host: wait for the oldest
            self._read_oldest(wait=True)
        slot = self._count % SLOTS  # free: the decision that used it has been read
        self._count += 1
        self._host[slot].copy_(packed, non_blocking=True)
        ev = None
        if packed.device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record()
        self._pending.append((step, slot, ev))

    def _read_oldest(self, wait: bool) -> bool:
        step, slot, ev = self._pending[0]
        if ev is not None and not ev.query():
            if not wait:
                return False
            ev.synchronize()
        self._pending.popleft()
        row = self._host_np[slot]
        code = int(row[0]) if math.isfinite(row[0]) else 0
        if code:
            self._arrived.append(Trigger(step, code, (float(row[1]), float(row[2])), (float(row[3]), float(row[4]))))
        return True

    def poll(self) -> list[Trigger]:
        """The triggers among the decisions whose copy has arrived, oldest first (never waits)."""
        while self._pending and self._read_oldest(wait=False):
            pass
        out, self._arrived = self._arrived, []
        return out


def _norm_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(Σx²) (float32 accumulation, no temporary of x's size) and max |x| of one tensor, 0-d each."""
    x = x.detach()
    lo, hi = torch.aminmax(x)  # () each, no |x| temporary
    return torch.linalg.vector_norm(x, dtype=torch.float32), torch.maximum(hi, -lo)


class ResidHistory:
    """The last H unrecorded steps' residual-stream m2 and absmax per layer, kept on the device."""

    def __init__(self, depth: int, points: dict, model: torch.nn.Module, is_on: Callable[[], bool],
                 notes: list[str], layout: Callable[[tuple], Any]):
        self.depth = depth
        self.is_on = is_on
        self.notes = notes
        self._layout = layout
        resid = sorted((layer, pt) for (site, layer), pt in points.items() if site == "resid")
        self.layers = [layer for layer, _ in resid]
        self._index = {layer: i for i, layer in enumerate(self.layers)}
        self._parts: list[tuple[int, torch.Tensor, torch.Tensor, int]] = []  # (layer index, ‖x‖, max|x|, numel)
        self._ring: torch.Tensor | None = None  # (H, L1, 2) float64: m2, absmax
        self._steps: list[int | None] = [None] * depth  # the step each ring slot holds (None: empty)
        self._elems: list[np.ndarray | None] = [None] * depth
        self._next = 0
        # per set of (layer, numel) of a step's forwards: device (layer index, 1 / layer elements), and the
        # host elements per layer (the rows' weights)
        self._weights: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._elem_cache: dict[tuple, np.ndarray] = {}
        self._failed = False
        self.handles: list[Any] = []
        self.key = traced.register(self.receive)  # traced hooks (torch.compile) deliver here
        modules = dict(model.named_modules())
        for layer, pt in resid:
            module = modules[pt.module]
            if pt.kind == "in":
                self.handles.append(module.register_forward_pre_hook(self._pre(layer, pt), with_kwargs=True))
            else:
                self.handles.append(module.register_forward_hook(self._post(layer, pt), with_kwargs=True))

    def _pre(self, layer: int, point: Any):
        def pre_hook(module, args, kwargs):
            if not self._failed and self.is_on():
                self._observe(layer, point.fetch(args, kwargs))
            return None

        return pre_hook

    def _post(self, layer: int, point: Any):
        def fwd_hook(module, args, kwargs, output):
            if not self._failed and self.is_on():
                self._observe(layer, point.fetch(args, kwargs, output))
            return None

        return fwd_hook

    def _observe(self, layer: int, x: Any) -> None:
        if not torch.is_tensor(x) or not x.is_floating_point() or not x.numel():
            return
        if compiling():  # traced into the model's graph: the reduction comes back through ``receive``
            norm, absmax = _norm_absmax(x)
            torch.ops.lnprobe.deliver(self.key, self._index[layer], "history", [norm, absmax], [x.numel()])
            return
        if in_backward():
            return
        try:
            self._parts.append((self._index[layer], *_norm_absmax(x), x.numel()))
        except Exception as exc:  # a probe never crashes training
            self._fail(exc)

    def receive(self, index: int, fields: str, tensors: list[torch.Tensor], sizes: list[int]) -> None:
        """Run time of a compiled graph: file what a traced hook reduced (``lnprobe.traced``)."""
        if not self._failed:
            self._parts.append((index, tensors[0], tensors[1], sizes[0]))

    def _fail(self, exc: BaseException) -> None:
        self._failed = True
        self._parts.clear()
        msg = f"lnprobe: burst history disabled after {type(exc).__name__}: {exc}; training continues"
        self.notes.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def close_step(self, step: int) -> None:
        """File the open step's reductions (if any) as ``step`` in the ring."""
        parts, self._parts = self._parts, []
        if not parts or self._failed:
            return
        try:
            idx_key = tuple((p[0], p[3]) for p in parts)
            w = self._weights.get(idx_key)
            if w is None:  # per forward: its layer, 1 / (elements of its layer this step); cached per shape set
                elems = np.zeros(len(self.layers))
                for i, _, _, n in parts:
                    elems[i] += n
                host_idx = torch.tensor([p[0] for p in parts], dtype=torch.long)
                host_w = torch.tensor([1.0 / elems[p[0]] for p in parts], dtype=torch.float64)
                dev = parts[0][1].device
                if dev.type == "cuda":
                    w = tuple(t.pin_memory().to(dev, non_blocking=True) for t in (host_idx, host_w))
                else:
                    w = (host_idx, host_w)
                self._weights[idx_key] = w
                self._elem_cache[idx_key] = elems
            idx, inv = w
            norms = torch.stack([p[1] for p in parts]).double()  # (F,)
            peaks = torch.stack([p[2] for p in parts]).double()  # (F,)
            l1 = len(self.layers)
            m2 = torch.zeros(l1, dtype=torch.float64, device=norms.device).index_add_(0, idx, norms.square() * inv)
            absmax = torch.full((l1,), float("-inf"), dtype=torch.float64, device=norms.device)
            absmax = absmax.scatter_reduce(0, idx, peaks, reduce="amax")
            if self._ring is None or self._ring.device != norms.device:
                self._ring = torch.empty((self.depth, l1, 2), dtype=torch.float64, device=norms.device)
                self._steps = [None] * self.depth
            slot = self._next
            self._next = (self._next + 1) % self.depth
            self._ring[slot, :, 0] = m2
            self._ring[slot, :, 1] = absmax
            self._steps[slot] = step
            self._elems[slot] = self._elem_cache[idx_key]
        except Exception as exc:
            self._fail(exc)

    def drain(self) -> list[StepRows]:
        """The ring's steps as ``resid`` rows (m2, absmax per layer), oldest first; the ring is emptied
        so that no step is written twice."""
        if self._ring is None or self._failed:
            return []
        order = sorted((s, i) for i, s in enumerate(self._steps) if s is not None)
        m2_row, abs_row = S.stat("activation", "m2"), S.stat("activation", "absmax")
        keys = tuple(k for layer in self.layers for k in (("resid", layer, "m2"), ("resid", layer, "absmax")))
        layout = self._layout(keys)
        kinds = np.tile(np.asarray([m2_row.merge_code, abs_row.merge_code], dtype=np.int8), len(self.layers))
        out = []
        for step, slot in order:
            values = self._ring[slot].reshape(-1).clone()  # (2 L1,) layer-major: m2, absmax
            elems = self._elems[slot]
            weights = np.stack([elems, np.ones(len(self.layers))], 1).reshape(-1)
            loc = torch.full((2, values.numel()), float("nan"), dtype=torch.float64, device=values.device)
            out.append(StepRows(step, values, loc, layout, weights, kinds))
            self._steps[slot] = None
        return out

    def remove(self) -> None:
        """Remove the history hooks and stop receiving from compiled graphs."""
        traced.unregister(self.key)
        for h in self.handles:
            h.remove()
        self.handles.clear()


class BurstMonitor:
    """The host side of bursts: triggers in, the steps to record and meta.json's ``bursts`` out."""

    def __init__(self, cfg: Burst, device: torch.device, history: ResidHistory | None):
        self.cfg = cfg
        self.detector = SpikeDetector(cfg, device)
        self.history = history
        self.until = -1  # the last step of the current burst
        self.bursts: list[dict] = []

    def covers(self, step: int) -> bool:
        """True when ``step`` is inside a burst."""
        return step <= self.until

    def after_step(self, closed: int, loss: Any, grad_norm: Any, recorded: bool) -> list[StepRows]:
        """At ``probe.step()`` closing step ``closed``: evaluate it, read the decisions that arrived and
        start or extend bursts. Returns the history rows to buffer (a burst that starts now)."""
        if self.history is not None:
            if recorded:
                self.history._parts.clear()
            else:
                self.history.close_step(closed)
        self.detector.observe(closed, loss, grad_norm)
        rows: list[StepRows] = []
        for trig in self.detector.poll():
            rows += self._trigger(trig, closed + 1)
        return rows

    def _trigger(self, trig: Trigger, open_step: int) -> list[StepRows]:
        end = trig.step + self.cfg.steps
        if self.covers(open_step) and self.bursts:
            self.until = max(self.until, end)
            b = self.bursts[-1]
            b["last_step"] = self.until
            b["extended"] = b.get("extended", 0) + 1
            return []
        self.until = end
        fired = trig.fired()
        reason = []
        for s, kind in fired:
            i = SIGNALS.index(s)
            if kind == "spike":
                reason.append(f"{s} {trig.values[i]:.4g} is {trig.z[i]:.3g} std above the mean of its previous "
                              f"values (threshold {self.cfg.threshold:g})")
            else:
                reason.append(f"{s} is {trig.values[i]}")
        rows = self.history.drain() if self.history is not None else []
        self.bursts.append({
            "trigger_step": trig.step, "signals": sorted({s for s, _ in fired}), "reason": "; ".join(reason),
            "values": {s: _json(trig.values[i]) for i, s in enumerate(SIGNALS)},
            "z": {s: _json(trig.z[i]) for i, s in enumerate(SIGNALS)},
            "first_step": open_step, "last_step": end, "history": [r.step for r in rows], "extended": 0,
        })
        return rows


def previous_bursts(out: Any, first_step: int) -> list[dict]:
    """meta.json ``bursts`` of the run in ``out`` that were triggered before ``first_step`` (a resume
    replaces meta.json; the bursts of the steps it keeps are carried over). [] when there are none."""
    from .store import read_meta

    try:
        old = read_meta(out).get("bursts")
    except Exception:  # no readable meta.json: nothing to carry over
        return []
    return [b for b in old if isinstance(b, dict) and isinstance(b.get("trigger_step"), int)
            and b["trigger_step"] < first_step] if isinstance(old, list) else []


def _json(x: float) -> float | str | None:
    """A float for meta.json (strict JSON): non-finite values as their text."""
    return float(x) if math.isfinite(x) else str(x)
