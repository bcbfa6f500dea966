"""Statistic registry and the pure tensor reductions of one activation, one gradient or one parameter.

``REGISTRY`` is the one table of statistics: per row its name, kind (activation, gradient,
parameter, norm, train), column in the finalize output, cross-rank merge kind, merge weight,
top-3 slot (located statistics), default sites and the partial work it needs. Every other list
(``ACTIVATION_STATS``, ``LOCATED_STATS``, the probe's defaults, ``check_stats``, the kinds, slots and
weights of ``lnprobe.distributed``) is derived from it. Adding a statistic is one row, one reduction
(a column of the kind's finalize function) and one reference test (``tests/test_stats.py``).

Everything here runs on the tensor's own device and returns small device tensors: no host
synchronisation (no ``.item()``, ``.cpu()``, ``bool(tensor)``, no tensors built from Python lists,
which would be a host-to-device copy), so these functions can run inside forward hooks during GPU
training. Reductions accumulate in float32 (per token) and float64 (over tokens) whatever the
input dtype.

Two stages:

1. ``reduce_activation(x)`` / ``reduce_gradient(g)`` turn one forward call's tensor into a *partial*:
   only what needs the tensor itself — sums over tokens, the candidate rows for top-k, counts and a
   subsample for the median — in as few operations as possible (each one is a dispatch of several
   microseconds on CPU and a kernel launch on a GPU, and hooks run dozens of times per step).
   Partials of several micro-batches (gradient accumulation) merge exactly: sums add, maxima take
   the max of maxima.
2. ``finalize_activations(groups)`` / ``finalize_gradients(groups)`` merge the partials of one
   optimizer step for MANY sites at once: top-k values and locations, medians and ratios for all
   sites in a fixed number of operations, whatever the number of sites and micro-batches.
   ``finalize_activation`` / ``finalize_gradient`` are the one-site forms. They live in
   ``lnprobe.actfinalize`` and ``lnprobe.gradstats`` and are re-exported here.

Definitions (x flattened to ``(N, D)`` tokens × channels; ``token`` is the sequence position, the
second-to-last dimension of x, so batch rows are folded together):

- ``m2``: mean of x² over all elements; ``rms`` = sqrt(m2).
- ``var``: per-token variance over channels (divide by D), averaged over tokens — what LayerNorm sees.
  Computed as E[x²] − E[x]² per token (float32), or from the centred tensor when kurtosis is asked for.
- ``kurtosis``: per-token non-excess kurtosis over channels (3 for a Gaussian), averaged over tokens;
  a token with zero variance contributes 0.
- ``absmax``/``top1..top3``: the three largest |x| with their token and channel (exact, see below).
- ``median_abs``: median of |x|, ESTIMATED from a strided subsample of at most ``MEDIAN_SAMPLE``
  elements (stride coprime with D, so every channel and every token is visited evenly). For n samples
  the standard error of a sample median is about 1.25·σ_|x|/sqrt(n), i.e. ≈1.2 % of the median of
  |x| for Gaussian data at n = 8192. n = ceil(numel / stride) with the stride the smallest integer
  ≥ numel / 8192 coprime with D: n ≈ 8192 for large tensors, fewer when raising the stride to the
  next coprime matters (tensors only a few times larger than 8192 elements). Exact (the lower
  median) when the tensor has at most ``MEDIAN_SAMPLE`` elements. NaN when the sample holds a NaN.
- ``nonfinite``: count of NaN/Inf; ``over_fp16``: count of |x| > 65504 (Inf included, NaN not).
- ``massive``: count of elements with |x| > 100 and |x| ≥ 1000 × median_abs (Sun et al. 2024), the
  median being the estimate of the same forward call (0 when that median is NaN).

Cost (design page section 6): moments come from per-token Σx² (``vector_norm``: no temporary) and
Σx, top-k from per-token max and min, the median from a strided subsample. The counts are almost
always 0 and every counted element sits in a token whose max |x| is large or NaN: on CPU tensors
only those tokens are read again (``CPU_ROW_SKIPPING``: data-dependent shapes are free where host
and device are one); on accelerators, where that would be a sync, each count is a fixed-shape
float pass ``2^17·|x| − 2^17·t``, a clamp and a sum (no bool tensors; |x| is computed once).
Temporaries of the activation's size: none on CPU for float32 input (a float32 copy for other
dtypes), at most two on accelerators (|x| and a scratch buffer), one more for kurtosis; all are
freed before the hook returns. A partial keeps at most 3 rows of the activation (top-k candidates),
the median sample and a few scalars until the step is finalized.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch

from . import kernels as _kernels
from .constants import FP16_MAX, MASSIVE_ABS, MASSIVE_RATIO
from .runtime import compiling

MEDIAN_SAMPLE = 8192
TOPK = 3

# ------------------------------------------------------------------------------------ registry
#: Cross-rank merge kinds (``lnprobe.distributed`` reduces each row by its statistic's kind):
#: mean Σw·v/Σw; rms sqrt(Σw·v²/Σw); sum Σv; sqsum sqrt(Σw·v²) (sharded parameters); max; loc (the
#: top 3 of all ranks' candidates, with location); derived (from other reduced rows of the step).
MERGE_KINDS: tuple[str, ...] = ("mean", "rms", "sum", "sqsum", "max", "loc", "derived")
#: Sites where a statistic is recorded by default: ``EVERY_SITE`` or a tuple of site names.
EVERY_SITE = "*"
STREAM = ("resid", "final")


@dataclass(frozen=True)
class Stat:
    """One row of the statistic registry (``REGISTRY``)."""

    name: str
    kind: str  # what is reduced: activation (a hooked forward tensor), gradient (its ∂L/∂x), parameter
    #   (a parameter and its .grad), norm (a norm's γ and β), update (a parameter's change in one
    #   optimizer step), train (per-step scalars)
    column: int | None  # column in the kind's finalize output: finalize_activations (G, 12),
    #   finalize_gradients (G, 2), parameter norms (P, 2), gain_stats (3,); None for train rows
    merge: str  # cross-rank merge kind, one of MERGE_KINDS
    weight: str  # weight of a rank's value in a mean: its elements or tokens of the step, numel (of the
    #   local shard) or one
    default: "str | tuple[str, ...]"  # sites recorded unless stats= says otherwise: EVERY_SITE, a tuple, () none
    definition: str
    needs: frozenset = frozenset()  # activation statistics: the partial work they need (StatPlan)
    slot: int | None = None  # located statistics (value, token, channel): rank in the top 3 (absmax = top1)

    @cached_property
    def merge_code(self) -> int:
        """The merge kind's small int, as lnprobe.distributed numbers them (MEAN, RMS, ...)."""
        return MERGE_KINDS.index(self.merge)


def _row(name, kind, column, merge, weight, default, definition, needs=(), slot=None) -> Stat:
    return Stat(name, kind, column, merge, weight, default, definition, frozenset(needs), slot)


_ALL = EVERY_SITE
REGISTRY: tuple[Stat, ...] = (
    # name           kind          col merge      weight      default  definition                          needs / slot
    _row("m2",         "activation", 0, "mean",    "elements", _ALL,    "mean of x² over all elements", {"moments"}),
    _row("var",        "activation", 1, "mean",    "tokens",   _ALL,
         "per-token variance over channels, mean over tokens", {"var"}),
    _row("rms",        "activation", 2, "rms",     "elements", _ALL,    "sqrt(m2)", {"moments"}),
    _row("absmax",     "activation", 3, "loc",     "one",      _ALL,    "max |x|, with token and channel",
         {"topk"}, slot=0),
    _row("top1",       "activation", 4, "loc",     "one",      STREAM,  "largest |x|, with token and channel",
         {"topk"}, slot=0),
    _row("top2",       "activation", 5, "loc",     "one",      STREAM,  "2nd largest |x|", {"topk", "top3"}, slot=1),
    _row("top3",       "activation", 6, "loc",     "one",      STREAM,  "3rd largest |x|", {"topk", "top3"}, slot=2),
    _row("median_abs", "activation", 7, "mean",    "elements", STREAM,  "median |x| (estimated, see above)",
         {"median"}),
    _row("kurtosis",   "activation", 8, "mean",    "tokens",   (),
         "per-token kurtosis over channels (3: Gaussian)", {"kurtosis"}),
    _row("nonfinite",  "activation", 9, "sum",     "one",      _ALL,    "count of NaN/Inf", {"nonfinite"}),
    _row("over_fp16",  "activation", 10, "sum",    "one",      STREAM,  f"count of |x| > {FP16_MAX:g}", {"over_fp16"}),
    _row("massive",    "activation", 11, "sum",    "one",      STREAM,
         f"count of |x| > {MASSIVE_ABS:g} and ≥ {MASSIVE_RATIO:g}·median_abs",
         {"median", "massive"}),
    _row("grad_rms",    "gradient",  0, "rms",     "elements", ("resid",),
         "rms of ∂L/∂x, divided by the AMP loss scale"),
    _row("grad_absmax", "gradient",  1, "max",     "one",      ("resid",),
         "max |∂L/∂x|, divided by the AMP loss scale"),
    # sqsum for a sharded (DTensor) parameter; a replicated one (DDP) has the same value on every rank
    _row("grad_norm",  "parameter",  0, "sqsum",   "one",      _ALL,    "Frobenius norm of the parameter's gradient"),
    _row("param_norm", "parameter",  1, "sqsum",   "one",      _ALL,    "Frobenius norm of the parameter"),
    _row("gain_ms",    "norm",       0, "mean",    "numel",    _ALL,    "mean γ² of the effective gain"),
    _row("gain_absmax", "norm",      1, "max",     "one",      _ALL,    "max |γ|"),
    _row("bias_ms",    "norm",       2, "mean",    "numel",    _ALL,    "mean β²"),
    # optimizer updates (lnprobe.updates), recorded with attach(updates=optimizer); replicated parameters
    _row("update_rms",   "update",   0, "mean",    "one",      _ALL,
         "‖Δp‖/sqrt(numel) of the optimizer step just taken"),
    _row("update_ratio", "update",   1, "mean",    "one",      _ALL,    "‖Δp‖/‖p‖ of that step, p before the step"),
    _row("loss",       "train",   None, "mean",    "one",      _ALL,    "the step's loss (mean over ranks)"),
    _row("nonfinite_loss", "train", None, "max",   "one",      _ALL,    "1 if the loss is NaN/Inf"),
    _row("grad_norm",  "train",   None, "derived", "one",      _ALL,
         "global gradient norm (from the parameters' grad_norm)"),
    _row("skipped",    "train",   None, "derived", "one",      _ALL,
         "1 if an enabled GradScaler skips the step (non-finite grad_norm)"),
    _row("lr",         "train",   None, "mean",    "one",      _ALL,    "learning rate passed to probe.step()"),
    # output and attention logits (lnprobe.attnlogits), recorded with attach(logits=True / attn_logits=True)
    _row("logit_rms",    "logits",   0, "rms",     "elements", ("logits",), "rms of the head's output logits z"),
    _row("logit_absmax", "logits",   1, "loc",     "one",      ("logits",),
         "max |z|, with token and channel (vocabulary index)", slot=0),
    _row("lse_mean",     "logits",   2, "mean",    "tokens",   ("logits",),
         "mean over tokens of log Σ_v exp(z_v) (log Z, the z-loss quantity)"),
    _row("qk_absmax",    "attn_logits", 0, "loc",  "one",      ("attn_logits",),
         "max |q·k|·scale (scale 1/sqrt(d_h)) over attended pairs, with query token and head (channel)", slot=0),
    _row("entropy",      "attn_logits", 1, "mean", "tokens",   ("attn_logits",),
         "attention entropy −Σ_j p_j log p_j, mean over queries and heads"),
)
_BY_KEY = {(s.kind, s.name): s for s in REGISTRY}


def stat(kind: str, name: str) -> Stat:
    """The registry row of statistic ``name`` of ``kind``."""
    return _BY_KEY[(kind, name)]


def _names(kind: str) -> tuple[str, ...]:
    return tuple(s.name for s in sorted((s for s in REGISTRY if s.kind == kind), key=lambda s: s.column or 0))


ACTIVATION_STATS: tuple[str, ...] = _names("activation")  # in finalize_activations column order
GRADIENT_STATS: tuple[str, ...] = _names("gradient")
PARAM_STATS: tuple[str, ...] = _names("parameter")
NORM_STATS: tuple[str, ...] = _names("norm")
TRAIN_STATS: tuple[str, ...] = _names("train")
UPDATE_STATS: tuple[str, ...] = _names("update")
LOGIT_STATS: tuple[str, ...] = _names("logits")
ATTN_LOGIT_STATS: tuple[str, ...] = _names("attn_logits")
LOCATED_STATS = frozenset(s.name for s in REGISTRY if s.slot is not None)
LOC_SLOT: dict[str, int] = {s.name: s.slot for s in REGISTRY if s.slot is not None}
PER_TOKEN_STATS = frozenset(s.name for s in REGISTRY if s.weight == "tokens")


def default_stats(site: str, kind: str = "activation") -> tuple[str, ...]:
    """The statistics of ``kind`` recorded at ``site`` by default, in registry order."""
    return tuple(s.name for s in REGISTRY if s.kind == kind and (s.default == EVERY_SITE or site in s.default))


def default_sites(kind: str) -> tuple[str, ...]:
    """The sites named in the defaults of ``kind`` (e.g. gradients: ``("resid",)``)."""
    out: list[str] = []
    for s in REGISTRY:
        if s.kind == kind and s.default != EVERY_SITE:
            out += [site for site in s.default if site not in out]
    return tuple(out)


# Every statistic but per-token kurtosis (it needs a centred copy of the tensor).
DEFAULT_ACTIVATION_STATS: tuple[str, ...] = default_stats("resid")

# Counting |x| > t with float arithmetic: for float32 a = |x| and a threshold t ≥ 64, a > t implies
# a − t ≥ ulp(t) ≥ 2^-17, so clamp(2^17·a − 2^17·t, 0, 1) is exactly 1 where a > t and 0 elsewhere
# (NaN stays NaN and is skipped by nansum; Inf gives 1). Scaling by a power of two is exact.
_COUNT_SCALE = 2.0 ** 17
# v · (1 − 2^-24) rounds to the float32 just below v for every normal positive float32 v, so that
# "a ≥ v" becomes "a > v·_BELOW" and every count is one strict comparison (the fused kernel too).
_BELOW = _kernels.BELOW
# On CPU tensors the counts look only at the tokens that can contain a counted element (see
# reduce_activation). False runs the accelerator path on CPU tensors: the test switch
# LNPROBE_ACCELERATOR_PATH=1 sets it so at import, tests also set it directly.
CPU_ROW_SKIPPING = not _kernels.accelerator_path_on_cpu()
# The accelerator path runs the fused Triton kernel (lnprobe.kernels) where Triton is importable;
# False forces the fixed-shape torch fallback (tests of the fallback, devices without Triton).
FUSED_KERNEL = True


def reduction_path(x: torch.Tensor) -> str:
    """Which code reduces ``x``: ``"cpu"`` (row skipping, CPU tensors), ``"fused"`` (the Triton token
    pass) or ``"torch"`` (fixed-shape torch operations: no Triton, another device, or traced by
    torch.compile, where inductor fuses them into the model's own kernels)."""
    if compiling():  # traced hooks (lnprobe.traced): data-dependent shapes and Triton calls stay out
        return "torch"
    if x.device.type == "cpu" and CPU_ROW_SKIPPING:
        return "cpu"
    if FUSED_KERNEL and _kernels.available(x.device):
        return "fused"
    return "torch"


def check_stats(stats: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate requested activation statistics; raise ValueError naming the unknown ones."""
    unknown = [s for s in stats if s not in ACTIVATION_STATS]
    if unknown:
        raise ValueError(
            f"unknown statistic(s) {unknown}: expected a subset of {list(ACTIVATION_STATS)}; "
            "pass stats='all' for every statistic or leave it out for the default set"
        )
    return tuple(s for s in ACTIVATION_STATS if s in stats)  # canonical order


@dataclass
class ActivationPartial:
    """Mergeable reduction of one forward call. All tensors live on the activation's device and none
    is a view of the activation: a partial lives until ``probe.step()``.

    Only what needs the activation itself is computed in the hook; turning the top-k candidate rows
    into values and locations, and the medians, happens in ``finalize_activations`` for all sites of
    a step at once (a fixed number of kernels instead of a dozen per site).
    """

    n_elem: int
    n_tok: int
    d: int  # channels: the last dimension
    t: int  # sequence length: the second-to-last dimension (token positions are taken modulo t)
    sums: torch.Tensor | None = None  # (3,) float64: Σ_tok Σx², Σ_tok D·var, Σ_tok kurtosis; entries of
    #   statistics that the plan left out repeat Σx² and are never read
    counts: torch.Tensor | None = None  # (3,) float64: #nonfinite, #>fp16, #massive; None means all zero
    cand: torch.Tensor | None = None  # (k, D) float32: the k rows (tokens) with the largest max |x|, signed
    cand_tok: torch.Tensor | None = None  # (k,) int64: flat token index of each row (0..N-1)
    sample: torch.Tensor | None = None  # (n,) float32, n ≤ MEDIAN_SAMPLE: subsample of |x| for the median
    #   (x's own dtype on the fused path: |x| of a bf16 value is exact in bf16)
    blocks: torch.Tensor | None = None  # (nb, 6) float32, fused path only: block sums of the token pass
    #   (lnprobe.kernels), turned into ``sums`` and ``counts`` at finalize for all sites at once


@dataclass
class StatPlan:
    """Which groups of work a set of statistics needs (decided once, off the hot path)."""

    stats: tuple[str, ...]
    moments: bool = field(init=False)
    var: bool = field(init=False)
    kurtosis: bool = field(init=False)
    topk: bool = field(init=False)
    rows: int = field(init=False)  # candidate rows for top-k: 3 when top2/top3 are asked for, else 1
    median: bool = field(init=False)
    counts: bool = field(init=False)
    nonfinite: bool = field(init=False)
    over_fp16: bool = field(init=False)
    massive: bool = field(init=False)

    def __post_init__(self) -> None:
        needs = set().union(*(stat("activation", s).needs for s in self.stats))
        self.moments, self.var, self.kurtosis = "moments" in needs, "var" in needs, "kurtosis" in needs
        self.topk, self.median = "topk" in needs, "median" in needs
        self.rows = TOPK if "top3" in needs else 1
        self.nonfinite, self.over_fp16, self.massive = "nonfinite" in needs, "over_fp16" in needs, "massive" in needs
        self.counts = self.nonfinite or self.over_fp16 or self.massive


def _median_stride(numel: int, d: int) -> int:
    """Smallest stride ≥ numel / MEDIAN_SAMPLE that is coprime with d (visits all channels)."""
    stride = max(1, -(-numel // MEDIAN_SAMPLE))
    while math.gcd(stride, d) != 1:
        stride += 1
    return stride


def _count_above(a: torch.Tensor, threshold: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Count of a > threshold as a 0-d float64 tensor; ``threshold`` is a 0-d float32 tensor ≥ 64.

    ``buf`` is scratch of a's shape. Three passes and no bool tensor (see ``_COUNT_SCALE``).
    """
    torch.add(threshold * -_COUNT_SCALE, a, alpha=_COUNT_SCALE, out=buf)  # (N, D) 2^17·(a − t)
    buf.clamp_(0.0, 1.0)  # 1 where a > t, 0 where a ≤ t, NaN where a is NaN
    return torch.nansum(buf, dtype=torch.float64)


def _count_rows(xf: torch.Tensor, tok_max: torch.Tensor, sample: torch.Tensor | None,
                plan: StatPlan) -> torch.Tensor | None:
    """CPU only: the counts ``(3,)``, reading only the tokens that can hold a counted element.

    Every counted element has |x| > 100 (massive), > 65504 (over_fp16) or is not finite, so it lies
    in a token whose max |x| exceeds the smallest of the thresholds asked for, or is NaN. Usually
    there is no such token: the counts then cost one comparison of the (N,) token maxima and are
    None (all zero).
    """
    floor = MASSIVE_ABS if plan.massive else FP16_MAX if plan.over_fp16 else torch.finfo(torch.float32).max
    idx = (tok_max <= floor).logical_not_().nonzero().squeeze(1)  # (B,) NaN compares False: NaN tokens are kept
    if not idx.numel():  # a data-dependent size: free on CPU, a host sync on an accelerator
        return None
    sub = xf.index_select(0, idx)  # (B, D)
    a = sub.abs()
    counts = torch.zeros(3, dtype=torch.float64)
    if plan.nonfinite:
        counts[0] = (~torch.isfinite(sub)).sum()
    if plan.over_fp16:
        counts[1] = (a > FP16_MAX).sum()
    if plan.massive:
        thr = sample.median() * MASSIVE_RATIO
        counts[2] = ((a > MASSIVE_ABS) & (a >= thr)).sum()
    return counts


def reduce_activation(x: torch.Tensor, plan: StatPlan) -> ActivationPartial:
    """Reduce one activation tensor ``(..., T, D)`` to a mergeable partial without host syncs."""
    d = x.shape[-1] if x.dim() else 1
    t = x.shape[-2] if x.dim() >= 2 else 1
    xd = x.detach().reshape(-1, d)  # (N, D), N = tokens of all batch rows
    n_tok, n_elem = xd.shape[0], xd.numel()
    part = ActivationPartial(n_elem, n_tok, d, t)
    if n_elem == 0:
        return part
    path = reduction_path(xd)
    if path == "fused":
        return _reduce_fused(xd, plan, part)
    own = xd.dtype != torch.float32
    xf = xd.float() if own else xd  # (N, D) float32; a copy (ours to overwrite) only for other dtypes

    # Per-token sums, then one float64 sum over tokens.
    if plan.moments or plan.var or plan.kurtosis:
        sq = torch.linalg.vector_norm(xf, dim=-1).square_()  # (N,) Σx² per token, no (N, D) temporary
        dvar = kurt = sq
        if plan.kurtosis:
            c = xf - xf.mean(-1, keepdim=True)  # (N, D) centred per token
            c.square_()
            dvar = c.sum(-1)  # (N,) D · per-token variance
            m4 = torch.linalg.vector_norm(c, dim=-1).square_().div_(d)  # (N,) mean of the 4th power
            del c
            # a token with zero variance also has m4 = 0, so it contributes 0 / 1e-30 = 0
            kurt = m4.div_((dvar / d).square_().clamp_min_(1e-30))
        elif plan.var:
            s1 = xf.sum(-1)  # (N,)
            # Σx² − (Σx)²/D = D · per-token variance; the clamp guards rounding below zero
            dvar = torch.addcmul(sq, s1, s1, value=-1.0 / d, out=s1).clamp_min_(0.0)
        part.sums = torch.stack([sq, dvar, kurt]).sum(1, dtype=torch.float64)  # (3,)

    # Counts are almost always 0, and every counted element lies in a token whose max |x| (or NaN)
    # says so. On CPU, host and device are one, so the counts look only at those tokens
    # (data-dependent shapes cost nothing there). Elsewhere that would be a host sync: every count
    # is then a fixed-shape float pass over |x| (computed once, shared with top-k and the median).
    skip_rows = path == "cpu"
    a = None
    if not skip_rows and (plan.over_fp16 or plan.massive):
        a = xf.abs_() if own else xf.abs()  # (N, D); x's sign is no longer needed below
    tok_max = None
    if plan.topk or (skip_rows and plan.counts):
        if a is not None:
            tok_max = a.amax(-1)  # (N,)
        else:
            tok_max = torch.maximum(xf.amax(-1), xf.amin(-1).neg_())  # (N,) max |x|, NaN-propagating

    if plan.topk:
        # Exact top-k from one pass: the k largest elements lie in the k tokens with the largest
        # per-token maximum, so only those rows are kept (finalize_activations picks the elements).
        _, part.cand_tok = tok_max.topk(min(plan.rows, n_tok))  # (k,)
        part.cand = (a if a is not None else xf).index_select(0, part.cand_tok)  # (k, D) a copy

    if plan.median:
        strided = (a if a is not None else xf).reshape(-1)[:: _median_stride(n_elem, d)]
        # a copy, never a view: a view would keep the whole temporary alive until the step ends
        part.sample = strided.contiguous() if a is not None else strided.abs()  # (≤MEDIAN_SAMPLE,)

    if plan.counts and skip_rows:
        part.counts = _count_rows(xf, tok_max, part.sample, plan)
    elif plan.counts:
        buf = torch.empty_like(xf)  # (N, D) scratch
        zero = torch.zeros((), dtype=torch.float64, device=xf.device)
        counts = [zero, zero, zero]
        if plan.nonfinite:
            src = a if a is not None else xf
            torch.sub(src, src, out=buf).nan_to_num_(1.0)  # x − x is NaN exactly at NaN and ±Inf
            counts[0] = buf.sum(dtype=torch.float64)
        if plan.over_fp16:
            counts[1] = _count_above(a, a.new_full((), FP16_MAX), buf)
        if plan.massive:
            # |x| > 100 and |x| ≥ 1000·median  ⇔  |x| > max(100, the float below 1000·median)
            thr = (part.sample.median() * MASSIVE_RATIO).mul_(_BELOW).clamp_min_(MASSIVE_ABS)
            counts[2] = _count_above(a, thr, buf)
        del buf
        part.counts = torch.stack(counts)  # (3,)
    return part


def _reduce_fused(xd: torch.Tensor, plan: StatPlan, part: ActivationPartial) -> ActivationPartial:
    """The accelerator path with the fused kernel: at most 5 device operations, no temporary of the
    activation's size, no float32 copy of a bf16/fp16 activation.

    1. |x| at the median's strided positions (x's dtype; |x| is exact in any float format);
    2. its median, only for ``massive`` (the kernel reads it from the device, no sync);
    3. the token pass (``lnprobe.kernels.token_pass``): block sums and counts, per-token max |x|;
    4. and 5. ``topk`` of the token maxima and the gather of those rows (top-k statistics only).
    """
    n_tok, d = xd.shape
    if xd.stride(1) != 1:  # the kernel reads rows with unit stride; hooked tensors almost always are
        xd = xd.contiguous()
    median = None
    if plan.median:
        part.sample = xd.reshape(-1)[:: _median_stride(part.n_elem, d)].abs()  # (≤MEDIAN_SAMPLE,) a copy
        if plan.massive:
            median = part.sample.median()  # 0-d, on the device
    part.blocks, tok_max = _kernels.token_pass(xd, median, centred=plan.kurtosis)  # (nb, 6), (N,)
    if plan.topk:
        _, part.cand_tok = tok_max.topk(min(plan.rows, n_tok))  # (k,) NaN tokens first, as on the other paths
        part.cand = xd.index_select(0, part.cand_tok)  # (k, D) a copy, x's dtype
    return part


# The batched finalize of activation partials, the hidden-state gradient, parameter and norm
# reductions live in their own modules; re-exported so that ``stats`` offers every reduction.
from .actfinalize import finalize_activation, finalize_activations, finalize_activations_packed, nan_view  # noqa: E402,F401
from .gradstats import GradientPartial, finalize_gradient, finalize_gradients, reduce_gradient  # noqa: E402,F401
from .paramstats import gain_stats, gain_stats_many, gain_values, norms_of  # noqa: E402,F401
