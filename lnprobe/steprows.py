"""The rows of a finished optimizer step: values on the device, keys, merge kinds and weights on the host.

``StepRowsBuilder.build`` turns what the probe's hooks collected during one step (the per-site
partials of ``lnprobe.stats``), the parameters and the step's scalars into one ``StepRows``: a flat
``(K,)`` float64 device tensor of values, ``(2, K)`` token and channel (NaN when not located), and
per row its key ``(site, layer, stat)``, its cross-rank merge kind and its weight, both read from the
statistic's registry row (``lnprobe.stats.REGISTRY``). Every step carries kinds and weights, so a
local flush and a distributed one take the same rows (``Rows``): locally they are written as they
are, under torch.distributed ``lnprobe.distributed.reduce_rows`` merges them first.

Row order within a step: activation statistics (sites in the probe's order, statistics in registry
order), hidden-state gradients, parameter norms (grad_norm, param_norm per parameter), norm gains,
then the ``train`` scalars. No host synchronisation: values stay on the device until the flush.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import distributed as D
from . import stats as S
from .runtime import local_shard

RowKey = tuple[str, int, str]  # (site, layer, stat)


@dataclass
class SiteAccumulator:
    """What the hooks collected for one (site, layer) during the open step."""

    stats: tuple[str, ...]
    parts: list = field(default_factory=list)  # S.ActivationPartial per forward call
    grads: list = field(default_factory=list)  # S.GradientPartial per backward
    pending_grad: int = 0  # forwards seen without grad (reentrant checkpointing): hook on recompute
    # Element and token counts of this step (host ints): the weights of a cross-rank mean.
    n_elem: int = 0
    n_tok: int = 0
    g_elem: int = 0

    def clear(self) -> None:
        """Drop the step's partials and pending gradient count, and zero its counts, for the next step."""
        self.parts.clear()
        self.grads.clear()
        self.pending_grad = 0
        self.n_elem = self.n_tok = self.g_elem = 0


@dataclass
class Layout:
    """The keys of one step's rows (host arrays), shared by every step with the same keys."""

    site: np.ndarray
    layer: np.ndarray
    stat: np.ndarray
    crc: int = 0  # stable checksum of the keys: ranks compare layouts without sending them


@dataclass
class StepRows:
    """One finished step."""

    step: int
    values: torch.Tensor  # (K,) float64
    loc: torch.Tensor  # (2, K) float64: token, channel (NaN when not located)
    layout: Layout
    weights: np.ndarray  # (K,) float64: weight of the row in a cross-rank mean
    kinds: np.ndarray  # (K,) int8: merge kind of the row (lnprobe.distributed.MEAN, ...)


@dataclass
class Rows:
    """Buffered steps flattened: keys on the host, values on the device. What a flush writes (or,
    under torch.distributed, reduces first)."""

    steps: list[int]
    layouts: list[Layout]
    values: torch.Tensor  # (K,) float64
    token: torch.Tensor  # (K,) float64, NaN when not located
    channel: torch.Tensor  # (K,) float64
    weights: np.ndarray  # (K,) float64
    kinds: np.ndarray  # (K,) int8

    @classmethod
    def from_steps(cls, buf: Sequence[StepRows]) -> "Rows":
        """The buffered steps concatenated into one Rows (values on the first step's device); empty if none."""
        if buf:
            dev = buf[0].values.device
            flat = torch.cat([e.values.to(dev) for e in buf])  # (K,)
            loc = torch.cat([e.loc.to(dev) for e in buf], 1)  # (2, K)
            w = np.concatenate([e.weights for e in buf])
            kd = np.concatenate([e.kinds for e in buf])
        else:
            flat = torch.zeros(0, dtype=torch.float64)
            loc = torch.zeros((2, 0), dtype=torch.float64)
            w, kd = np.zeros(0), np.zeros(0, dtype=np.int8)
        if not (flat.numel() == loc.shape[1] == len(w) == len(kd)):
            raise ValueError(f"inconsistent step rows: {flat.numel()} values, {loc.shape[1]} locations, "
                             f"{len(w)} weights, {len(kd)} kinds")
        return cls([e.step for e in buf], [e.layout for e in buf], flat, loc[0], loc[1], w, kd)

    @property
    def n(self) -> int:
        """The number of rows K."""
        return int(self.values.numel())

    def signature(self) -> int:
        """A checksum of the row keys (steps and layouts), equal on ranks that hold the same rows."""
        sig = 0x9E3779B1
        for step, lay in zip(self.steps, self.layouts):
            sig = (sig * 1000003 ^ (int(step) * 2654435761 + int(lay.crc))) & 0x7FFFFFFFFFFF
        return sig

    def keys(self) -> list[tuple[int, str, int, str]]:
        """(step, site, layer, stat) of every row, in row order."""
        out = []
        for step, lay in zip(self.steps, self.layouts):
            out.extend((int(step), str(a), int(b), str(c)) for a, b, c in zip(lay.site, lay.layer, lay.stat))
        return out

    def start_host_copy(self) -> "tuple[torch.Tensor, Any]":
        """Start the one device-to-host transfer of values, tokens and channels: ``(host, event)``.

        On CUDA the copy goes non-blocking into pinned memory and ``event`` (a CUDA event recorded
        after it) tells when it is done, so the training thread does not wait; elsewhere the
        concatenated tensor is already on the host (event None)."""
        flat = torch.cat([self.values, self.token, self.channel])  # (3K,)
        if flat.device.type != "cuda":
            return flat.cpu(), None
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, (event, flat)  # flat is kept until the copy is done

    def frame(self, host_copy: "tuple[torch.Tensor, Any] | None" = None):
        """The rows as a records DataFrame, as they are (one process): one device-to-host transfer
        (``host_copy``: one started by ``start_host_copy``, waited for here)."""
        from .store import records_frame

        host_t, pending = host_copy if host_copy is not None else self.start_host_copy()
        if pending is not None:
            pending[0].synchronize()  # the copy is done (waits on this thread only)
        host = host_t.numpy()
        k = self.n
        lens = [len(lay.site) for lay in self.layouts]
        cat = (lambda arrays: np.concatenate(arrays)) if self.layouts else (lambda arrays: np.array([]))
        return records_frame(
            np.repeat(np.asarray(self.steps, dtype=np.int64), lens), cat([lay.site for lay in self.layouts]),
            cat([lay.layer for lay in self.layouts]), cat([lay.stat for lay in self.layouts]),
            host[:k], host[k: 2 * k], host[2 * k:])


def _nonfinite(t: torch.Tensor) -> torch.Tensor:
    """1.0 where the float64 ``t`` is NaN or ±Inf, else 0.0: t − t is NaN exactly there (two operations)."""
    return (t - t).nan_to_num_(1.0)


def _weight(row: S.Stat, elements: float, tokens: float, numel: float = 1.0) -> float:
    """A row's weight in a cross-rank mean, by its registry ``weight``."""
    w = row.weight
    return elements if w == "elements" else tokens if w == "tokens" else numel if w == "numel" else 1.0


class StepRowsBuilder:
    """Builds the ``StepRows`` of finished steps; caches what depends only on the keys."""

    def __init__(self, param_layer: Callable[[str], int]):
        self.param_layer = param_layer
        self._layouts: dict[tuple, Layout] = {}
        self._act_index: dict[tuple, torch.Tensor] = {}
        self._param_keys: dict[tuple[str, ...], list[RowKey]] = {}

    def build(
        self,
        step: int,
        sites: Sequence[tuple[tuple[str, int], SiteAccumulator]],
        params: Sequence[tuple[str, torch.Tensor]],
        captured: "tuple[list[str], torch.Tensor] | None",
        gain_entries: Sequence[tuple[str, str | None, str | None, float]],
        loss: Any = None,
        lr: float | None = None,
        loss_scale: torch.Tensor | None = None,
        scaler_enabled: bool = False,
    ) -> StepRows | None:
        """The rows of one finished step, or None when there is nothing to record.

        ``sites``: (site, layer) and accumulator of every probed site; ``params``: the model's named
        parameters now; ``captured``: names and gradient norms from ``Probe.capture_param_grads``
        (used instead of ``.grad``); ``gain_entries``: (norm, weight name, bias name, gain offset);
        ``loss_scale``: divides the hidden-state gradients (AMP); ``scaler_enabled`` adds ``skipped``.
        """
        values: list[torch.Tensor] = []  # 1-D float64 pieces, in row order
        keys: list[RowKey] = []
        weights: list[float] = []
        kinds: list[int] = []
        device = None

        def add(key: RowKey, row: S.Stat, weight: float) -> None:
            keys.append(key)
            kinds.append(row.merge_code)
            weights.append(weight)

        # All sites in one batched finalize (a fixed number of operations whatever the number of sites:
        # tiny kernel launches dominate the step cost on a GPU). Activation rows first, then gradients.
        act_loc = None
        act = [(key, acc) for key, acc in sites if acc.parts]
        if act:
            packed = S.finalize_activations_packed([acc.parts for _, acc in act])  # (3, G, 12)
            sel = self._act_select(tuple(acc.stats for _, acc in act), packed.device)  # (K_act,)
            rows = packed.view(3, -1).index_select(1, sel)  # (3, K_act): values, token, channel
            values.append(rows[0])
            act_loc = rows[1:]
            for (site, layer), acc in act:
                for s in acc.stats:
                    row = S.stat("activation", s)
                    add((site, layer, s), row, _weight(row, acc.n_elem, acc.n_tok))
            device = packed.device
        grads = [(key, acc) for key, acc in sites if acc.grads]
        if grads:
            g = S.finalize_gradients([acc.grads for _, acc in grads], loss_scale)  # (G2, 2)
            values.append(g.view(-1))
            for (site, layer), acc in grads:
                for s in S.GRADIENT_STATS:
                    row = S.stat("gradient", s)
                    add((site, layer, s), row, _weight(row, acc.g_elem, acc.g_elem))
            device = device or g.device

        gn = self._param_rows(params, captured, values, keys, weights, kinds)
        if gn is not None:
            device = device or gn.device
        device = self._gain_rows(dict(params), gain_entries, values, add) or device

        if device is None:
            device = loss.device if torch.is_tensor(loss) else torch.device("cpu")
        train: list[torch.Tensor] = []  # 0-d float64
        if loss is not None:
            # a host float becomes a device tensor by a fill, not by a host-to-device copy (a sync)
            lt = loss.detach().reshape(()).double() if torch.is_tensor(loss) else \
                torch.full((), float(loss), dtype=torch.float64, device=device)
            train += [lt, _nonfinite(lt)]
            add(("train", -1, "loss"), S.stat("train", "loss"), 1.0)
            add(("train", -1, "nonfinite_loss"), S.stat("train", "nonfinite_loss"), 1.0)
        if gn is not None:
            total = gn.square().sum().sqrt()  # () sqrt(Σ_p ‖∇p‖²), summed as the unrecorded steps do
            train.append(total)
            add(("train", -1, "grad_norm"), S.stat("train", "grad_norm"), 1.0)
            if scaler_enabled:
                train.append(_nonfinite(total))
                add(("train", -1, "skipped"), S.stat("train", "skipped"), 1.0)
        if lr is not None:
            train.append(torch.full((), float(lr), dtype=torch.float64, device=device))
            add(("train", -1, "lr"), S.stat("train", "lr"), 1.0)
        values += [t.to(device).reshape(1) for t in train]
        if not values:
            return None
        # One concatenation of values and one of locations (activation rows first, NaN for the rest).
        flat = torch.cat([v.to(device) for v in values])  # (K,)
        rest = flat.numel() - (act_loc.shape[1] if act_loc is not None else 0)
        loc = torch.cat(([act_loc.to(device)] if act_loc is not None else [])
                        + [S.nan_view((2, rest), device)], 1)  # (2, K)
        return StepRows(step, flat, loc, self.layout(tuple(keys)),
                        np.asarray(weights, dtype=np.float64), np.asarray(kinds, dtype=np.int8))

    def _param_rows(self, params, captured, values, keys, weights, kinds) -> torch.Tensor | None:
        """Gradient and value norms of every parameter with a gradient; returns the gradient norms."""
        if captured is not None:
            names, gn = captured
            named = dict(params)
            with_grad = [(n, named[n]) for n in names]
            if not with_grad:
                return None
            pn = S.norms_of([local_shard(p) for _, p in with_grad])
            both = torch.stack([gn, pn.to(gn.device)], 1).reshape(-1)  # (2P,) interleaved
        else:
            with_grad = [(n, p) for n, p in params if p.grad is not None]
            if not with_grad:
                return None
            # gradients and values in one fused multi-tensor reduction, stacked interleaved
            n = len(with_grad)
            both = S.norms_of([local_shard(p.grad) for _, p in with_grad] + [local_shard(p) for _, p in with_grad],
                              order=[j for i in range(n) for j in (i, n + i)])  # (2P,) grad, value per parameter
        values.append(both)
        keys.extend(self._param_row_keys(tuple(n for n, _ in with_grad)))
        for _, p in with_grad:
            # registry merge "sqsum" for a sharded parameter; a replicated one holds equal values (mean)
            kind, w = D.param_norm_reduction(p)
            kinds += [kind, kind]
            weights += [w, w]
        return both[0::2]  # (P,) gradient norms, a view

    def _gain_rows(self, named, gain_entries, values, add) -> torch.device | None:
        entries = [(w, b, off, local_shard(named[w]) if w else None, local_shard(named[b]) if b else None)
                   for _, w, b, off in gain_entries]
        batched, device = None, None
        if entries and all((wl is None or wl.numel()) and (bl is None or bl.numel()) for *_, wl, bl in entries) \
                and len({t.device for *_, wl, bl in entries for t in (wl, bl) if t is not None}) == 1:
            # every norm in one fused reduction (no empty FSDP2 shard, one device)
            batched = S.gain_stats_many([e[3] for e in entries], [e[2] for e in entries], [e[4] for e in entries])
        gain_ms, gain_absmax, bias_ms = (S.stat("norm", s) for s in S.NORM_STATS)
        for i, (w, b, off, wl, bl) in enumerate(entries):
            gs = batched[i] if batched is not None else S.gain_values(wl, off, bl)  # (3,)
            if w is not None:
                values.append(gs[:2])
                add((f"param:{w}", self.param_layer(w), "gain_ms"), gain_ms, wl.numel())
                add((f"param:{w}", self.param_layer(w), "gain_absmax"), gain_absmax, 1.0)
            if b is not None:
                values.append(gs[2:])
                add((f"param:{b}", self.param_layer(b), "bias_ms"), bias_ms, bl.numel())
            device = device or gs.device
        return device

    def _act_select(self, stats: tuple[tuple[str, ...], ...], device: torch.device) -> torch.Tensor:
        """Flat indices of the requested statistics in the ``(G, 12)`` matrix of
        ``S.finalize_activations``; built once per layout and device, then cached.

        On CUDA the index goes up from pinned memory without blocking (no sync even the first time).
        """
        key = (stats, device)
        idx = self._act_index.get(key)
        if idx is None:
            n = len(S.ACTIVATION_STATS)
            host = torch.tensor([g * n + S.stat("activation", s).column for g, st in enumerate(stats) for s in st],
                                dtype=torch.long)
            idx = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
            self._act_index[key] = idx
        return idx

    def _param_row_keys(self, names: tuple[str, ...]) -> list[RowKey]:
        """Row keys of the parameter norms of ``names`` (grad_norm, param_norm each), cached."""
        keys = self._param_keys.get(names)
        if keys is None:
            keys = [(f"param:{n}", self.param_layer(n), s) for n in names for s in S.PARAM_STATS]
            self._param_keys[names] = keys
        return keys

    def layout(self, keys: tuple) -> Layout:
        """The Layout (host key arrays and their crc) of these row keys, built once and cached."""
        lay = self._layouts.get(keys)
        if lay is None:
            lay = Layout(np.array([k[0] for k in keys], dtype=object),
                         np.array([k[1] for k in keys], dtype=np.int64),
                         np.array([k[2] for k in keys], dtype=object),
                         zlib.crc32("\x1f".join(f"{a}\x1e{b}\x1e{c}" for a, b, c in keys).encode()))
            self._layouts[keys] = lay
        return lay


def scalar_frame(scalars: list[tuple[int, str, float]]):
    """Host scalars (step, stat, value) as ``train`` rows of a records frame."""
    from .store import records_frame

    n = len(scalars)
    return records_frame(
        np.array([s[0] for s in scalars], dtype=np.int64), np.array(["train"] * n, dtype=object),
        np.full(n, -1, dtype=np.int64), np.array([s[1] for s in scalars], dtype=object),
        np.array([s[2] for s in scalars], dtype=np.float64), np.full(n, np.nan), np.full(n, np.nan),
    )
