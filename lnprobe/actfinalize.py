"""The batched finalize of one step's activation partials (``lnprobe.stats.ActivationPartial``).

Definitions of the statistics are in ``lnprobe.stats`` (its registry); this module merges the partials
of all sites of a step into their values and locations in a fixed number of device operations
(design page section 6).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .runtime import LayoutCache as _LayoutCache
from .runtime import fill_view as _fill_view
from .runtime import host_to_device as _host_to_device
from .stats import ACTIVATION_STATS, TOPK, ActivationPartial, stat

# ------------------------------------------------------------------------------------ finalize
# The finalize of a step is a fixed number of device operations whatever the number of sites (design
# page §6). Each kind of partial tensor of every site (sum rows, candidate rows, candidate tokens,
# median samples) goes into ONE concatenation with one row per site, padded with views of cached
# constants (``fill_view``: no operation), and each statistic is then one operation over all rows.
# What depends only on the shapes (divisors, pad signs, sequence lengths) is built on the host once
# per layout and cached on the device (``_LAYOUTS``). Concatenated pieces share a dtype wherever the
# partials do, because a CUDA ``cat`` of mixed dtypes copies input by input.
_LAYOUTS = _LayoutCache()
_F64 = torch.float64


def _concat(pieces: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``torch.cat`` of 1-D pieces. Pieces of mixed dtypes (rare: partials of two reduction paths in
    one step) are converted one by one to the promoted dtype first."""
    if not pieces:
        return torch.empty(0, dtype=_F64, device=device)
    dtypes = list(dict.fromkeys(p.dtype for p in pieces))
    if len(dtypes) > 1:
        common = _promoted(tuple(dtypes))
        pieces = [p if p.dtype == common else p.to(common) for p in pieces]
    return torch.cat(pieces)


@functools.lru_cache(maxsize=None)
def _promoted(dtypes: tuple[torch.dtype, ...]) -> torch.dtype:
    # cached: torch.promote_types is a dispatched call, host work that an OpCounter would count
    return functools.reduce(torch.promote_types, dtypes)


def _site_rows(data: list[list[torch.Tensor]], pads: list[list[tuple[float, int]]], width: int,
               device: torch.device) -> torch.Tensor:
    """``(G, width)``: row g is ``data[g]`` (1-D pieces) followed by ``pads[g]`` ((value, count): views of
    constants in the row's dtype). One concatenation when every row has one dtype (a row's dtype is
    that of its first piece; an empty row takes the first dtype seen); otherwise, e.g. under autocast
    with bf16 branches and a float32 residual stream, one per dtype, each converted to the promoted
    dtype, and one more that puts the rows in site order: 3 more operations for two dtypes, never
    more per site."""
    first = next((p.dtype for row in data for p in row), _F64)
    row_dtype = [row[0].dtype if row else first for row in data]
    dtypes = list(dict.fromkeys(row_dtype))

    def pieces(g: int) -> list[torch.Tensor]:
        dt = row_dtype[g]
        out = [p if p.dtype == dt else p.to(dt) for p in data[g]]  # a site mixing dtypes: rare
        return out + [_fill_view(v, n, dt, device) for v, n in pads[g] if n]

    if len(dtypes) == 1:
        return torch.cat([p for g in range(len(data)) for p in pieces(g)]).view(len(data), width)
    common = _promoted(tuple(dtypes))
    by_dtype: dict[torch.dtype, tuple[list[int], torch.Tensor]] = {}
    for dt in dtypes:
        sites = [g for g in range(len(data)) if row_dtype[g] == dt]
        rows = torch.cat([p for g in sites for p in pieces(g)]).view(len(sites), width).to(common)
        by_dtype[dt] = (sites, rows)
    site_row = {g: rows[j] for sites, rows in by_dtype.values() for j, g in enumerate(sites)}
    return torch.cat([site_row[g] for g in range(len(data))]).view(len(data), width)


@dataclass
class _ActLayout:
    """Shape-only tables of one step's activation partials (``_act_layout``), on the device."""

    sum_rows: int  # 6-wide sum rows per site: the most of any site, the others padded with zeros
    divisor: torch.Tensor  # (G, 6) float64: n_elem, n_elem, n_tok, 1, 1, 1 (sums -> m2, var, kurtosis, counts)
    width: int  # candidate elements per site row (≥ TOPK), 0 when no site has candidates
    row_len: list[int]  # per site: elements per candidate row (its largest D; narrower rows are padded)
    stride: torch.Tensor | None  # (G, 1) int64: row_len on the device
    sign: torch.Tensor | None  # (G, width) float32: +1 at candidate values, -1 at pads
    tok_width: int  # candidate-token entries per site row: covers every position // row_len
    seq_len: torch.Tensor | None  # (G, tok_width) int64: sequence length t of each candidate row (1 at pads)
    sample_width: int  # median samples per site row, 0 when no site has samples


def _sum_rows(p: ActivationPartial) -> int:
    return p.blocks.shape[0] if p.blocks is not None else 1 if p.sums is not None else 0


def _part_key(p: ActivationPartial) -> tuple:
    return (p.n_elem, p.n_tok, p.t, p.blocks.shape[0] if p.blocks is not None else -1, p.sums is not None,
            tuple(p.cand.shape) if p.cand is not None else None, p.sample.numel() if p.sample is not None else -1)


def _act_layout(groups: Sequence[Sequence[ActivationPartial]], device: torch.device) -> _ActLayout:
    """The cached ``_ActLayout`` of these partials (built on the host at the first step of a layout)."""
    key = ("activation", device, tuple(tuple(_part_key(p) for p in g) for g in groups))
    return _LAYOUTS.get(key, lambda: _build_act_layout(groups, device))


def _build_act_layout(groups: Sequence[Sequence[ActivationPartial]], device: torch.device) -> _ActLayout:
    n_groups = len(groups)
    divisor = torch.ones((n_groups, 6), dtype=_F64)
    row_len, rows = [], []  # rows[g]: (sequence length t, channels D) of each candidate row of site g
    for g, parts in enumerate(groups):
        n_elem, n_tok = float(sum(p.n_elem for p in parts)), float(sum(p.n_tok for p in parts))
        divisor[g, :3] = torch.tensor([n_elem, n_elem, n_tok], dtype=_F64)
        cands = [p for p in parts if p.cand is not None]
        row_len.append(max((p.cand.shape[1] for p in cands), default=1))
        rows.append([(p.t, p.cand.shape[1]) for p in cands for _ in range(p.cand.shape[0])])
    width = max(len(r) * s for r, s in zip(rows, row_len))
    lay = _ActLayout(
        sum_rows=max(sum(_sum_rows(p) for p in parts) for parts in groups),
        divisor=_host_to_device(divisor, device), width=max(width, TOPK) if width else 0, row_len=row_len,
        stride=None, sign=None, tok_width=0, seq_len=None,
        sample_width=max(sum(p.sample.numel() for p in parts if p.sample is not None) for parts in groups))
    if lay.width:
        lay.tok_width = max(-(-lay.width // s) for s in row_len)
        sign = torch.full((n_groups, lay.width), -1.0)
        seq_len = torch.ones((n_groups, lay.tok_width), dtype=torch.long)
        for g, (site_rows, s) in enumerate(zip(rows, row_len)):
            for r, (t, d) in enumerate(site_rows):
                sign[g, r * s: r * s + d] = 1.0
                seq_len[g, r] = t
        lay.stride = _host_to_device(torch.tensor(row_len, dtype=torch.long).view(-1, 1), device)
        lay.sign = _host_to_device(sign, device)
        lay.seq_len = _host_to_device(seq_len, device)
    return lay


def _sums(groups: Sequence[Sequence[ActivationPartial]], lay: _ActLayout, device: torch.device) -> torch.Tensor:
    """``(G, 6)`` float64 over all parts of each site: Σ_tok Σx², Σ_tok D·var, Σ_tok kurtosis and the
    three counts. Fused-path parts bring their block rows (float32), the others one row of ``sums``
    and ``counts`` (float64, counts None = zeros); each site is padded with zero rows to
    ``lay.sum_rows``, so one concatenation and one float64 sum cover every site."""
    fused = [p.blocks is not None for g in groups for p in g if _sum_rows(p)]
    pad_dtype = next(p.blocks.dtype for g in groups for p in g if p.blocks is not None) if all(fused) and fused \
        else _F64  # the pads take the dtype of the rows, so that the concatenation is of one dtype
    pieces = []
    for parts in groups:
        for p in parts:
            if p.blocks is not None:
                pieces.append(p.blocks.reshape(-1))
            elif p.sums is not None:
                pieces += [p.sums, p.counts if p.counts is not None else _fill_view(0.0, 3, _F64, device)]
        pad = lay.sum_rows - sum(_sum_rows(p) for p in parts)
        if pad:
            pieces.append(_fill_view(0.0, 6 * pad, pad_dtype, device))
    rows = _concat(pieces, device).view(len(groups), lay.sum_rows, 6)  # (G, R, 6)
    return rows.sum(1, dtype=_F64)  # (G, 6)


def _top3(groups: Sequence[Sequence[ActivationPartial]], lay: _ActLayout,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, 3)`` values and ``(2, G, 3)`` tokens and channels (float64) of the 3 largest |x| of each
    site over all its parts' candidate rows, NaN where the site has fewer than 3 elements or none.

    Site g's row of the candidate buffer holds its candidate rows one after the other, ``row_len[g]``
    elements each (narrower rows padded), then pads to ``lay.width``; ``copysign`` with the cached sign
    table makes it |x| at candidates and -inf at pads, one ``topk`` picks every site's top 3, and the
    position gives the row (→ its token, modulo that row's sequence length) and the channel."""
    n_groups = len(groups)
    if not lay.width:
        return nan_view((n_groups, TOPK), device), nan_view((2, n_groups, TOPK), device)
    data, pads, toks, tok_pads = [], [], [], []
    for parts, s in zip(groups, lay.row_len):
        row: list[torch.Tensor] = []
        tok_row: list[torch.Tensor] = []
        used = n_rows = 0
        for p in parts:
            if p.cand is None:
                continue
            k, d = p.cand.shape
            if d == s:
                row.append(p.cand.reshape(-1))
            else:  # a narrower part of the same site (rare): pad each of its rows to the site's row length
                pad = _fill_view(-math.inf, s - d, p.cand.dtype, device)
                row += [piece for j in range(k) for piece in (p.cand[j], pad)]
            tok_row.append(p.cand_tok)
            used, n_rows = used + k * s, n_rows + k
        data.append(row)
        pads.append([(-math.inf, lay.width - used)])
        toks.append(tok_row)
        tok_pads.append([(0, lay.tok_width - n_rows)])
    cand = _site_rows(data, pads, lay.width, device)  # (G, W) signed, pads -inf
    mag = torch.copysign(cand, lay.sign)  # (G, W) |x| at candidates, -inf at pads
    vals, pos = mag.topk(TOPK, dim=1)  # (G, 3) NaN first, as on every reduction path
    row_of = torch.div(pos, lay.stride, rounding_mode="floor")  # (G, 3) candidate row within the site
    chan = pos.remainder(lay.stride)  # (G, 3)
    flat_tok = _site_rows(toks, tok_pads, lay.tok_width, device)  # (G, TW) int64 flat token indices
    tok = flat_tok.remainder(lay.seq_len).gather(1, row_of)  # (G, 3) position in the sequence
    pad = vals.isneginf()  # (G, 3): fewer than 3 elements
    nan = _fill_view(math.nan, 1, _F64, device)  # (1,): dimensioned, so that where() gives float64
    return torch.where(pad, nan, vals), torch.where(pad, nan.view(1, 1, 1), torch.stack([tok, chan]))


def _medians(groups: Sequence[Sequence[ActivationPartial]], lay: _ActLayout, device: torch.device) -> torch.Tensor:
    """``(G, 1)`` float64: the lower median of each site's pooled samples, NaN where it has none or a
    sample holds a NaN. The row of each site with samples holds its n samples between -inf and +inf
    pads, as many of each that the row's lower median (position (W-1)//2) is the samples' lower
    median (position (n-1)//2): one concatenation and one ``median`` over those sites, one
    concatenation that puts NaN for the others (a ``median`` over rows of NaN would cost as much)."""
    width = lay.sample_width
    if not width:
        return nan_view((len(groups), 1), device)
    data, pads, has = [], [], []
    for parts in groups:
        samples = [p.sample for p in parts if p.sample is not None]
        n = sum(t.numel() for t in samples)
        has.append(n > 0)
        if n:
            below = (width - 1) // 2 - (n - 1) // 2
            data.append(samples)
            pads.append([(-math.inf, below), (math.inf, width - n - below)])
    med = _site_rows(data, pads, width, device).median(1, keepdim=True).values.double()  # (G_s, 1)
    if all(has):
        return med
    rows = iter(range(len(data)))
    nan = nan_view((1, 1), device)
    return torch.cat([med[next(rows)].view(1, 1) if h else nan for h in has])  # (G, 1)


def nan_view(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A float64 NaN tensor of ``shape``: an expanded view of a constant (read-only)."""
    return _fill_view(math.nan, 1, _F64, device).view((1,) * len(shape)).expand(shape)


# Positional columns of finalize_activations, from the registry; the assembly below relies on this order.
_COL = {s: stat("activation", s).column for s in ACTIVATION_STATS}
_TOP = slice(_COL["top1"], _COL["top3"] + 1)
assert [_COL[s] for s in ("m2", "var", "rms", "absmax", "top1", "top2", "top3", "median_abs", "kurtosis",
                          "nonfinite", "over_fp16", "massive")] == list(range(len(ACTIVATION_STATS)))


def finalize_activations_packed(groups: Sequence[Sequence[ActivationPartial]]) -> torch.Tensor:
    """``(3, G, 12)`` float64: ``finalize_activations``' values, tokens and channels in one tensor, so
    that ``lnprobe.steprows`` selects a step's rows with one operation.

    22 device operations whatever G when the partials share a dtype (design page §6): sums and counts
    (a concatenation, a float64 sum, a division, a square root), top 3 (``_top3``: 12), medians
    (``_medians``: 4) and two concatenations that write the columns.
    """
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("finalize_activations: expected a non-empty list of non-empty groups of partials")
    dev = next((t.device for g in groups for p in g for t in (p.sums, p.blocks, p.cand, p.sample, p.counts)
                if t is not None), torch.device("cpu"))
    n_groups = len(groups)
    lay = _act_layout(groups, dev)
    per = _sums(groups, lay, dev).div_(lay.divisor)  # (G, 6): m2, var, kurtosis, nonfinite, over_fp16, massive
    rms = per[:, :1].sqrt()  # (G, 1)
    top, loc = _top3(groups, lay, dev)  # (G, 3), (2, G, 3)
    out = torch.empty((3, n_groups, len(ACTIVATION_STATS)), dtype=_F64, device=dev)
    # columns m2 var | rms | absmax | top1..3 | median_abs | kurtosis nonfinite over_fp16 massive
    torch.cat([per[:, :2], rms, top[:, :1], top, _medians(groups, lay, dev), per[:, 2:]], 1, out=out[0])
    torch.cat([nan_view((2, n_groups, _COL["absmax"]), dev), loc[:, :, :1], loc,
               nan_view((2, n_groups, len(ACTIVATION_STATS) - _TOP.stop), dev)], 2, out=out[1:])
    return out


def finalize_activations(groups: Sequence[Sequence[ActivationPartial]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the partials of one step for G sites at once.

    ``groups[g]`` holds the partials (one per forward call) of site g. Returns ``values (G, 12)``
    float64 and ``loc (2, G, 12)`` float64, columns in ``ACTIVATION_STATS`` order; ``loc[0]`` is the
    token, ``loc[1]`` the channel of located statistics, NaN elsewhere. Entries of statistics that a
    site's ``StatPlan`` did not include are meaningless: select the requested columns (on the host
    at flush time, or with ``finalize_activation``). A fixed number of device operations whatever G
    (``finalize_activations_packed``).
    """
    out = finalize_activations_packed(groups)
    return out[0], out[1:]


def finalize_activation(parts: list[ActivationPartial], stats: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the partials of one step; return ``values (S,)`` float64 and ``loc (2, S)`` float64.

    ``loc[0]`` is the token, ``loc[1]`` the channel of located statistics, NaN elsewhere. The order of
    the S entries is the order of ``stats``.
    """
    values, loc = finalize_activations([parts])
    idx = [ACTIVATION_STATS.index(s) for s in stats]
    # stacking views avoids an index tensor built from a Python list (a host-to-device copy)
    return torch.stack([values[0, i] for i in idx]), torch.stack([loc[:, 0, i] for i in idx], 1)
