"""Cross-rank reduction of probe records under torch.distributed (DDP, FSDP2), once per flush.

Every rank records its own micro-batches as in a single process; at each flush the buffered steps
are reduced across ranks so that rank 0 writes what one process would have recorded on the global
batch. Per row (one ``(step, site, layer, stat)``), by the row's *kind*:

Each statistic's kind is the ``merge`` column of its registry row (``lnprobe.stats.REGISTRY``),
its weight the ``weight`` column:

=========  =========================================================  ==============================
kind       rows                                                       reduction
=========  =========================================================  ==============================
MEAN       m2, var, kurtosis, median_abs, gain_ms, bias_ms,           Σ_r w_r·v_r / Σ_r w_r, with w the
           loss, lr, replicated parameter norms                       rank's elements (m2, median_abs),
                                                                      tokens (var, kurtosis), local
                                                                      numel (gain_ms, bias_ms) or 1
RMS        rms, grad_rms                                              sqrt(Σ_r w_r·v_r² / Σ_r w_r)
SUM        nonfinite, over_fp16, massive                              Σ_r v_r
SQSUM      grad_norm, param_norm of a sharded (DTensor) parameter     sqrt(Σ_r v_r² / replicas)
MAX        grad_absmax, gain_absmax, nonfinite_loss                   max_r v_r (NaN if any rank NaN)
LOC        absmax, top1, top2, top3                                   the 3 largest of all ranks'
                                                                      candidates, with their token
                                                                      and channel (all_gather)
DERIVED    train grad_norm, skipped                                   from the reduced parameter
                                                                      grad norms of the same step
=========  =========================================================  ==============================

Notes on the definitions:
- ``median_abs`` is the mean of the ranks' estimates weighted by their element counts (a median does
  not merge exactly; with equal batches per rank this is the plain mean of the ranks' medians).
- ``massive`` is the sum of the ranks' counts, each rank using its own median estimate.
- Parameter norms: with DDP the gradients are already averaged and the parameters replicated, so
  every rank holds the same values (taken as they are: the MEAN of equal values). With FSDP2 the
  parameters and gradients are DTensors; each rank contributes its local shard's sum of squares and
  the norms are the square roots of the sums — whole parameters are never gathered. A DTensor that is
  also replicated over some mesh dimensions (HSDP) is divided by its number of replicas.
- ``loss`` is the mean of the ranks' losses (DDP averages the ranks' gradients with equal weights, so
  this is the loss whose gradient the optimizer sees).
- Hidden-state gradients (``grad_rms``, ``grad_absmax``) are of that same mean loss: each rank's
  ∂L_r/∂x is divided by the world size W, as DDP/FSDP divide the parameter gradients. So the records
  equal those of one process on the global batch (this assumes the default gradient averaging).

Protocol of one flush (the same collectives in the same order on every rank, whatever a rank holds):
1. ``all_gather`` of ``[error flag, layout checksum, rows]`` (3 int64 per rank). A rank whose local
   preparation failed sets the flag; then every rank raises ``ProbeDistributedError`` naming it (after
   one ``all_gather_object`` of the messages). If the layouts differ (a step or a site missing on some
   rank), the ranks exchange their keys (``all_gather_object``) and align rows on their union.
2. ``all_reduce(SUM)`` of ``(2, R)`` float64: weighted contributions and weights.
3. ``all_reduce(MAX)`` of ``(R,)`` float64.
4. ``all_gather`` of the top-3 candidates ``(3, G, 3)``: value, token, channel for G located groups.
Rank 0 then finishes on the host and writes; ``agree`` (one ``all_reduce``) makes a failed write fail
every rank. With the NCCL backend the payloads travel on the current CUDA device, with gloo on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import stats as S

# Merge kinds as small ints (rows carry them in int8 arrays); each statistic's kind is its registry row's
# ``merge`` (``lnprobe.stats.REGISTRY``).
KIND_NAMES = S.MERGE_KINDS
MEAN, RMS, SUM, SQSUM, MAX, LOC, DERIVED = (KIND_NAMES.index(k) for k in
                                            ("mean", "rms", "sum", "sqsum", "max", "loc", "derived"))


class ProbeDistributedError(RuntimeError):
    """A probe flush failed on some rank; raised on every rank so that none waits forever."""


@dataclass
class DistContext:
    """The process group a probe reduces over."""

    group: Any
    rank: int
    world_size: int
    backend: str
    device: torch.device  # where collective payloads live

    def to_meta(self) -> dict:
        """The meta.json ``distributed`` entry."""
        return {"world_size": self.world_size, "backend": self.backend,
                "reduction": "once per flush; see lnprobe.distributed", "writer_rank": 0}


def context(process_group: Any = None) -> DistContext | None:
    """The distributed context, or None when torch.distributed is not initialised or has one rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(process_group)
    if world <= 1:
        return None
    backend = str(dist.get_backend(process_group))
    if "nccl" in backend.lower() and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistContext(process_group, dist.get_rank(process_group), world, backend, device)


def broadcast_from_writer(ctx: DistContext, compute) -> Any:
    """Collective: ``compute()`` on rank 0 of the group (the writer), its result on every rank.

    An exception on rank 0 is re-raised on every rank (as ``ProbeDistributedError`` elsewhere)."""
    import torch.distributed as dist

    box: list[Any] = [None]
    if ctx.rank == 0:
        try:
            box[0] = ("ok", compute())
        except Exception as exc:
            box[0] = ("error", f"{type(exc).__name__}: {exc}")
    src = dist.get_global_rank(ctx.group, 0) if ctx.group is not None else 0
    dist.broadcast_object_list(box, src=src, group=ctx.group)
    status, value = box[0]
    if status == "error":
        raise ProbeDistributedError(f"lnprobe: rank 0 could not read the run directory to resume: {value}")
    return value


def param_norm_reduction(p: torch.Tensor) -> tuple[int, float]:
    """(kind, weight) of a parameter's grad_norm/param_norm rows: SQSUM with weight 1/replicas for a
    sharded DTensor, MEAN with weight 1 for a replicated tensor (DDP)."""
    placements = getattr(p, "placements", None)
    if placements is None or not any(pl.is_shard() for pl in placements):
        return MEAN, 1.0
    mesh = p.device_mesh
    replicas = 1
    for dim, pl in enumerate(placements):
        if pl.is_replicate():
            replicas *= mesh.size(dim)
    return SQSUM, 1.0 / replicas


@dataclass
class Reduced:
    """The reduced rows (rank 0), ready to be written."""

    step: np.ndarray
    site: np.ndarray
    layer: np.ndarray
    stat: np.ndarray
    value: np.ndarray
    token: np.ndarray
    channel: np.ndarray

    def frame(self):
        """The reduced rows as a long-format records frame (store schema)."""
        from .store import records_frame

        return records_frame(self.step, self.site, self.layer, self.stat, self.value, self.token, self.channel)


def agree(ctx: DistContext, error: str | None, what: str) -> None:
    """Collective: raise ``ProbeDistributedError`` on every rank if ``error`` is set on any rank.

    The message names the failing rank(s) and, for each, its error. One tiny all_gather when all is
    well; one more all_gather_object on failure.
    """
    import torch.distributed as dist

    flag = torch.tensor([1 if error else 0], dtype=torch.int64, device=ctx.device)
    flags = [torch.empty_like(flag) for _ in range(ctx.world_size)]
    dist.all_gather(flags, flag, group=ctx.group)
    failed = [r for r, f in enumerate(torch.cat(flags).tolist()) if f]
    if failed:
        _raise_failed(ctx, failed, error, what)


def on_writer(ctx: DistContext | None, what: str, act) -> None:
    """Run ``act()`` on the writing rank (rank 0, or the only process) and let every rank learn of a
    failure (one tiny collective); the writer raises its own error, the others a ProbeDistributedError.

    Used for claiming a run directory: RunExistsError, RunLockedError or a file given as the directory.
    """
    error = None
    if ctx is None or ctx.rank == 0:
        try:
            act()
        except (OSError, ValueError, RuntimeError) as exc:
            if ctx is None:
                raise
            error = exc
    if ctx is not None:
        try:
            agree(ctx, f"{type(error).__name__}: {error}" if error else None, what)
        except ProbeDistributedError:
            if error is not None:
                raise error from None
            raise


def _raise_failed(ctx: DistContext, failed: list[int], error: str | None, what: str) -> None:
    import torch.distributed as dist

    msgs: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(msgs, error, group=ctx.group)
    detail = "; ".join(f"rank {r}: {msgs[r]}" for r in failed)
    ranks = ", ".join(str(r) for r in failed)
    raise ProbeDistributedError(
        f"lnprobe: could not {what}: failed on rank {ranks} ({detail}); raised on every rank (this is rank "
        f"{ctx.rank}) so that no rank waits in a collective. Fix the error on rank {ranks}; the steps since "
        "the last flush are not recorded")


def reduce_rows(ctx: DistContext, rows: Any, error: str | None = None) -> Reduced | None:
    """Collective: reduce every rank's rows (``lnprobe.steprows.Rows``); return the result on rank 0,
    None elsewhere.

    ``rows`` is None (and ``error`` set) on a rank whose local preparation failed: every rank then
    raises ``ProbeDistributedError`` naming it, after the same first collective.
    """
    import torch.distributed as dist

    dev, w_n = ctx.device, ctx.world_size
    n_local = rows.n if rows is not None else 0
    sig = rows.signature() if rows is not None else 0
    head = torch.tensor([1 if error else 0, sig, n_local], dtype=torch.int64, device=dev)
    heads = [torch.empty_like(head) for _ in range(w_n)]
    dist.all_gather(heads, head, group=ctx.group)
    table = torch.stack(heads).tolist()  # (W, 3) on the host: the one sync before the data collectives
    failed = [r for r, h in enumerate(table) if h[0]]
    if failed:
        _raise_failed(ctx, failed, error, "flush its records")
    if all(h[2] == 0 for h in table):
        return None

    # Align rows: positional when every rank holds the same keys, else on the union of the keys.
    if all(h[1:] == table[0][1:] for h in table):
        keys = rows.keys()
        index = torch.arange(n_local, device=dev)
        kinds, weights, r = rows.kinds, rows.weights, n_local
    else:
        mine = rows.keys()
        gathered: list[Any] = [None] * w_n
        dist.all_gather_object(gathered, (mine, rows.kinds.tolist()), group=ctx.group)
        pos: dict[tuple, int] = {}
        union_kinds: list[int] = []
        for rank_keys, rank_kinds in gathered:
            for k, kd in zip(rank_keys, rank_kinds):
                if k not in pos:
                    pos[k] = len(pos)
                    union_kinds.append(kd)
        keys = list(pos)
        r = len(keys)
        idx_np = np.array([pos[k] for k in mine], dtype=np.int64)
        index = torch.as_tensor(idx_np, device=dev)
        kinds = np.asarray(union_kinds, dtype=np.int8)
        weights = np.zeros(r)
        weights[idx_np] = rows.weights

    # This rank's values in union order; rows it lacks have weight 0 (and -inf for maxima).
    present = torch.zeros(r, dtype=torch.bool, device=dev)
    present[index] = True
    v = torch.full((r,), float("nan"), dtype=torch.float64, device=dev)
    v[index] = rows.values.to(dev, torch.float64)
    tok = torch.full((r,), float("nan"), dtype=torch.float64, device=dev)
    ch = torch.full((r,), float("nan"), dtype=torch.float64, device=dev)
    tok[index] = rows.token.to(dev, torch.float64)
    ch[index] = rows.channel.to(dev, torch.float64)

    kinds_t = torch.as_tensor(kinds.astype(np.int64), device=dev)
    w = torch.as_tensor(np.where(np.isin(kinds, (SUM, MAX)), 1.0, weights), dtype=torch.float64, device=dev)
    w = torch.where(present & (kinds_t != LOC) & (kinds_t != DERIVED), w, torch.zeros_like(w))
    squared = (kinds_t == RMS) | (kinds_t == SQSUM)
    f = torch.where(squared, v * v, v)
    contrib = torch.where(w > 0, f * w, torch.zeros_like(f))
    # Maxima: NaN must survive the MAX (its order is backend-defined), so it is counted in the sum.
    is_max = (kinds_t == MAX) & present
    contrib = torch.where(is_max, torch.isnan(v).double(), contrib)
    sums = torch.stack([contrib, w])  # (2, R)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
    maxima = torch.where(is_max, torch.nan_to_num(v, nan=float("inf")), torch.full_like(v, float("-inf")))  # (R,)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=ctx.group)

    # Located statistics: the 3 largest candidates of each (step, site, layer) group over all ranks.
    group_of, slot_of, n_groups = _loc_groups(keys, kinds)
    cand = torch.full((3, max(n_groups, 1), 3), float("nan"), dtype=torch.float64, device=dev)
    cand[0].fill_(float("-inf"))
    loc_rows = np.flatnonzero(group_of >= 0)
    if loc_rows.size:
        lr_t = torch.as_tensor(loc_rows, device=dev)
        g_t = torch.as_tensor(group_of[loc_rows], device=dev)
        s_t = torch.as_tensor(slot_of[loc_rows], device=dev)
        ok = present[lr_t]
        vv = v[lr_t]
        # A padded slot (fewer than 3 elements) has NaN value and NaN token: not a candidate.
        vv = torch.where(ok & ~(torch.isnan(vv) & torch.isnan(tok[lr_t])), vv, torch.full_like(vv, float("-inf")))
        # absmax and top1 share slot 0: they are the same element, so either write is right.
        cand[0, g_t, s_t] = vv
        cand[1, g_t, s_t] = tok[lr_t]
        cand[2, g_t, s_t] = ch[lr_t]
    gathered_c = [torch.empty_like(cand) for _ in range(w_n)]
    dist.all_gather(gathered_c, cand, group=ctx.group)

    if ctx.rank != 0:
        return None
    return _finish(keys, kinds, sums.cpu().numpy(), maxima.cpu().numpy(),
                   torch.stack(gathered_c).cpu().numpy(), group_of, slot_of, w_n)


def _loc_groups(keys: list[tuple], kinds: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """For each row: its located group (index, -1 if not located) and slot (0..2)."""
    group_of = np.full(len(keys), -1, dtype=np.int64)
    slot_of = np.zeros(len(keys), dtype=np.int64)
    groups: dict[tuple, int] = {}
    for i in np.flatnonzero(kinds == LOC):
        step, site, layer, stat = keys[i]
        group_of[i] = groups.setdefault((step, site, layer), len(groups))
        slot_of[i] = S.LOC_SLOT[stat]
    return group_of, slot_of, len(groups)


def _finish(keys, kinds, sums, maxima, cand, group_of, slot_of, world_size) -> Reduced:
    """Host-side end of the reduction on rank 0: divide sums, pick top-k, derive totals."""
    r = len(keys)
    value = np.full(r, np.nan)
    token = np.full(r, np.nan)
    channel = np.full(r, np.nan)
    c, w = sums
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(w > 0, c / np.where(w > 0, w, 1), np.nan)
        value = np.where(kinds == MEAN, mean, value)
        value = np.where(kinds == RMS, np.sqrt(mean), value)
    value = np.where(kinds == SUM, c, value)
    value = np.where(kinds == SQSUM, np.sqrt(c), value)
    mx = np.where(np.isneginf(maxima), np.nan, maxima)
    value = np.where(kinds == MAX, np.where(c > 0, np.nan, mx), value)

    loc_rows = np.flatnonzero(group_of >= 0)
    if loc_rows.size:
        w_n, _, n_groups, _ = cand.shape
        vals = cand[:, 0].transpose(1, 0, 2).reshape(n_groups, w_n * 3)  # (G, 3W)
        toks = cand[:, 1].transpose(1, 0, 2).reshape(n_groups, w_n * 3)
        chans = cand[:, 2].transpose(1, 0, 2).reshape(n_groups, w_n * 3)
        key = np.where(np.isnan(vals), np.inf, vals)  # NaN in the data ranks first, as in torch.topk
        order = np.argsort(-key, axis=1, kind="stable")[:, :3]  # (G, 3)
        top_v = np.take_along_axis(vals, order, 1)
        top_t = np.take_along_axis(toks, order, 1)
        top_c = np.take_along_axis(chans, order, 1)
        missing = np.isneginf(top_v)
        top_v[missing] = np.nan
        top_t[missing] = np.nan
        top_c[missing] = np.nan
        g, s = group_of[loc_rows], slot_of[loc_rows]
        value[loc_rows] = top_v[g, s]
        token[loc_rows] = top_t[g, s]
        channel[loc_rows] = top_c[g, s]

    step = np.array([k[0] for k in keys], dtype=np.int64)
    site = np.array([k[1] for k in keys], dtype=object)
    layer = np.array([k[2] for k in keys], dtype=np.int64)
    stat = np.array([k[3] for k in keys], dtype=object)

    # Hidden-state gradients: each rank differentiated its own loss L_r; the optimizer sees the gradient
    # of mean_r L_r (DDP and FSDP average gradients), whose derivative w.r.t. rank r's activations is
    # dL_r/dx / W.
    value = np.where(np.isin(stat, S.GRADIENT_STATS), value / world_size, value)

    # Derived train rows: the global gradient norm of a step from its reduced parameter norms.
    derived = np.flatnonzero(kinds == DERIVED)
    if derived.size:
        is_pg = np.array([s.startswith("param:") for s in site]) & (stat == "grad_norm")
        totals: dict[int, float] = {}
        for st in np.unique(step[derived]):
            sel = is_pg & (step == st)
            totals[int(st)] = float(np.sqrt(np.sum(value[sel] ** 2))) if sel.any() else np.nan
        for i in derived:
            total = totals[int(step[i])]
            value[i] = total if stat[i] == "grad_norm" else float(not np.isfinite(total))
    return Reduced(step, site, layer, stat, value, token, channel)
