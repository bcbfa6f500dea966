"""The fused token pass: one Triton kernel that reads a probed activation once and yields everything the
hook needs from it except the top-k rows and the median sample.

For ``x`` viewed as ``(N, D)`` tokens × channels, one program reduces ``BLOCK_M`` tokens and writes

- ``tok_max (N,)`` float32: max |x| of every token, NaN where the token holds a NaN (top-k candidates);
- ``blocks (nb, 6)`` float32, ``nb = ceil(N / BLOCK_M)``: over the block's tokens, the sums of per-token
  Σx², D·variance and kurtosis, and the counts of non-finite values, of |x| > 65504 and of massive
  values (|x| > 100 and |x| ≥ 1000·median, the median read from a 0-d device tensor).

Per-token sums accumulate in float32 from the activation's own dtype (a bf16/fp16 tensor is converted
in registers, never copied); block sums are added in float64 at finalize (``lnprobe.stats``). Variance
is Σx² − (Σx)²/D per token, or, when kurtosis is asked for, from a second pass over the token's
centred values (the row is re-read from cache), exactly the definitions of ``lnprobe.stats``.
Comparisons with NaN are false, so NaN never counts as over a threshold, and where a median is NaN no
value is massive.

Which device runs it: CUDA tensors when Triton is importable (PyTorch's CUDA wheels ship it), the
kernel compiled; CPU tensors when ``lnprobe.stats`` takes the accelerator path on them
(``LNPROBE_ACCELERATOR_PATH=1`` or ``stats.CPU_ROW_SKIPPING = False``, tests and benchmarks), the same
kernel run by Triton's interpreter (slow: numpy underneath). ``available(device)`` says whether it
can run; ``lnprobe.stats.reduction_path`` decides, and falls back to fixed-shape torch operations.
"""
from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Any

import torch

from . import opcount
from .constants import FP16_MAX, MASSIVE_ABS, MASSIVE_RATIO

# v · BELOW rounds to the float32 just below v (every normal positive v): "a ≥ v" as "a > v·BELOW"
BELOW = 1.0 - 2.0 ** -24

BLOCK_COLS = 6  # Σ Σx², Σ D·var, Σ kurtosis, #nonfinite, #>fp16, #massive
# registers per program on a GPU; the interpreter runs a program as numpy calls, so bigger tiles there
_TILE_GPU = 4096
_TILE_INTERPRETED = 1 << 16


triton: Any = None  # imported on first use (``_triton``)
tl: Any = None
_IMPORT_FAILED = False


def _triton() -> Any:
    """Triton, imported on first use; None when it is not installed or does not import."""
    global triton, tl, _IMPORT_FAILED
    if triton is None and not _IMPORT_FAILED:
        try:
            import triton as _t
            import triton.language as _tl
        except Exception:  # not installed, or a broken install: the torch fallback runs instead
            _IMPORT_FAILED = True
            return None
        triton, tl = _t, _tl
    return triton


# Reductions go through tl.reduce with the standard library's combine functions, not tl.sum / tl.max:
# those are jitted when Triton is imported (for its interpreter or for its compiler, whichever
# TRITON_INTERPRET said then), while this kernel is built for either on demand (``_kernel``); the
# interpreter runs a reduction with these combine functions as one numpy call.
def _token_pass(x_ptr, med_ptr, blocks_ptr, tok_max_ptr, n_tok, d, row_stride,
                HAS_MED: tl.constexpr, CENTRED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                OVER: tl.constexpr, BIG: tl.constexpr, RATIO: tl.constexpr, BELOW: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    row_ok = rows < n_tok
    base = x_ptr + rows.to(tl.int64)[:, None] * row_stride  # (BM, 1)
    s1 = tl.full([BLOCK_M], 0.0, tl.float32)
    s2 = tl.full([BLOCK_M], 0.0, tl.float32)
    amax = tl.full([BLOCK_M], 0.0, tl.float32)
    nans = tl.full([BLOCK_M], 0.0, tl.float32)
    over = tl.full([BLOCK_M], 0.0, tl.float32)
    big = tl.full([BLOCK_M], 0.0, tl.float32)
    thr = 0.0  # massive threshold; read only with HAS_MED
    if HAS_MED:
        # the float just below 1000·median (strict comparison = "≥ 1000·median"), in float32
        thr = tl.load(med_ptr).to(tl.float32) * RATIO * BELOW
    inf_count = tl.full([BLOCK_M], 0.0, tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)  # (BD,)
        ok = row_ok[:, None] & (cols < d)[None, :]  # (BM, BD)
        x = tl.load(base + cols[None, :], mask=ok, other=0.0).to(tl.float32)  # (BM, BD)
        a = tl.abs(x)
        isnan = x != x
        s1 += tl.reduce(x, 1, tl.standard._sum_combine)
        s2 += tl.reduce(x * x, 1, tl.standard._sum_combine)
        nans += tl.reduce(isnan.to(tl.float32), 1, tl.standard._sum_combine)
        inf_count += tl.reduce((a == float("inf")).to(tl.float32), 1, tl.standard._sum_combine)
        amax = tl.maximum(amax, tl.reduce(tl.where(isnan, 0.0, a), 1, tl.standard._elementwise_max))
        over += tl.reduce((a > OVER).to(tl.float32), 1, tl.standard._sum_combine)
        if HAS_MED:
            big += tl.reduce(((a > BIG) & (a > thr)).to(tl.float32), 1, tl.standard._sum_combine)
    dvar = s2 - s1 * s1 / d  # (BM,) D · variance
    dvar = tl.where(dvar < 0.0, 0.0, dvar)  # rounding below zero; NaN stays NaN
    kurt = s2 * 0.0
    if CENTRED:
        mean = s1 / d
        c2 = tl.full([BLOCK_M], 0.0, tl.float32)
        c4 = tl.full([BLOCK_M], 0.0, tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            ok = row_ok[:, None] & (cols < d)[None, :]
            x = tl.load(base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            c = tl.where(ok, x - mean[:, None], 0.0)
            cc = c * c
            c2 += tl.reduce(cc, 1, tl.standard._sum_combine)
            c4 += tl.reduce(cc * cc, 1, tl.standard._sum_combine)
        dvar = c2
        v = c2 / d
        den = v * v
        den = tl.where(den < 1e-30, 1e-30, den)
        kurt = (c4 / d) / den  # a token with zero variance: 0 / 1e-30 = 0
    tok_max = tl.where(nans > 0.0, float("nan"), amax)
    tl.store(tok_max_ptr + rows, tok_max, mask=row_ok)
    zero = s2 * 0.0
    out = blocks_ptr + pid * 6
    tl.store(out + 0, tl.reduce(tl.where(row_ok, s2, zero), 0, tl.standard._sum_combine))
    tl.store(out + 1, tl.reduce(tl.where(row_ok, dvar, zero), 0, tl.standard._sum_combine))
    tl.store(out + 2, tl.reduce(tl.where(row_ok, kurt, zero), 0, tl.standard._sum_combine))
    tl.store(out + 3, tl.reduce(tl.where(row_ok, nans + inf_count, zero), 0, tl.standard._sum_combine))
    tl.store(out + 4, tl.reduce(tl.where(row_ok, over, zero), 0, tl.standard._sum_combine))
    tl.store(out + 5, tl.reduce(tl.where(row_ok, big, zero), 0, tl.standard._sum_combine))


@lru_cache(maxsize=2)
def _kernel(interpreted: bool) -> Any:
    """The token pass, jitted for the compiler (CUDA) or for Triton's interpreter (CPU tensors): Triton
    makes that choice when a function is decorated, from TRITON_INTERPRET, which is set for the
    moment of the decoration only."""
    jit = _triton().jit
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpreted else "0"
    try:
        return jit(_token_pass)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def accelerator_path_on_cpu() -> bool:
    """The test switch: ``LNPROBE_ACCELERATOR_PATH=1`` runs the accelerator code path on CPU tensors."""
    return os.environ.get("LNPROBE_ACCELERATOR_PATH", "") == "1"


def available(device: torch.device) -> bool:
    """True when the fused kernel can run on ``device``: CUDA (compiled) or the CPU (Triton's
    interpreter), Triton importable. Whether it runs on CPU tensors is ``lnprobe.stats``' choice (the
    accelerator path)."""
    return device.type in ("cuda", "cpu") and _triton() is not None


def _blocks_for(d: int, interpreted: bool) -> tuple[int, int]:
    block_d = min(1 << max(0, math.ceil(math.log2(max(d, 1)))), 1024 if not interpreted else 1 << 14)
    tile = _TILE_INTERPRETED if interpreted else _TILE_GPU
    return max(1, min(256, tile // block_d)), block_d


def token_pass(x2d: torch.Tensor, median: torch.Tensor | None, centred: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the fused pass over ``x2d (N, D)`` (unit stride along D); returns ``blocks (nb, 6)`` and
    ``tok_max (N,)``, both float32 on x's device. ``median``: 0-d tensor for the massive count, or None
    (the count is then 0); ``centred``: variance and kurtosis from centred values."""
    n_tok, d = x2d.shape
    interpreted = x2d.device.type == "cpu"
    block_m, block_d = _blocks_for(d, interpreted)
    nb = -(-n_tok // block_m)
    out = torch.empty(nb * BLOCK_COLS + n_tok, dtype=torch.float32, device=x2d.device)  # one allocation
    blocks, tok_max = out[: nb * BLOCK_COLS].view(nb, BLOCK_COLS), out[nb * BLOCK_COLS:]
    med = median if median is not None else out  # any pointer: not read without HAS_MED
    counter = opcount.active()
    if counter is not None:
        counter.note_launch("lnprobe.token_pass")  # its output allocation was counted already
        with counter.muted():  # the interpreter's own tensor work is not device work
            _launch(interpreted, nb, x2d, med, blocks, tok_max, n_tok, d, median is not None, centred, block_m, block_d)
    else:
        _launch(interpreted, nb, x2d, med, blocks, tok_max, n_tok, d, median is not None, centred, block_m, block_d)
    return blocks, tok_max


def _launch(interpreted, nb, x2d, med, blocks, tok_max, n_tok, d, has_med, centred, block_m, block_d) -> None:
    _kernel(interpreted)[(nb,)](x2d, med, blocks, tok_max, n_tok, d, x2d.stride(0),
                                HAS_MED=has_med, CENTRED=centred, BLOCK_M=block_m, BLOCK_D=block_d,
                                OVER=FP16_MAX, BIG=MASSIVE_ABS, RATIO=MASSIVE_RATIO, BELOW=BELOW)
