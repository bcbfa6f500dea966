"""Memory a training run of the reference GPT needs, estimated before anything is allocated.

Definitions (bytes, per process; ``B`` the rows of the batch this process trains on, ``T`` the
sequence length, ``d`` the width, ``L`` the blocks, ``h`` the heads, ``V`` the vocabulary, ``P`` the
parameter count, ``e`` the bytes of an activation element: 2 under bf16/fp16 autocast, 4 in fp32):

- state: ``16·P`` — fp32 weights, gradients and AdamW's two moments;
- activations kept for backward: ``L·B·T·(34·d + 5·h·T)·e/2`` (Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", eq. 2, without recomputation), plus the
  logits, their softmax and gradient in fp32: ``3·4·B·T·V``;
- the batch itself: two int64 tensors, ``16·B·T``.

The estimate is an order of magnitude, meant to refuse a run that cannot fit (``--batch-size
100000000``) with one line instead of an out-of-memory kill; :func:`check_fits` refuses only when
the estimate exceeds what is available.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .launch import ConfigError

__all__ = ["estimate_bytes", "available_bytes", "check_fits", "human"]


def _param_count(model_cfg) -> int:
    """Parameters of the reference GPT, counted on the meta device (no memory allocated)."""
    from .models import GPT

    with torch.device("meta"):
        model = GPT(model_cfg)
    return sum(p.numel() for p in model.parameters())


def estimate_bytes(model_cfg, batch_rows: int, seq_len: int, dtype: str) -> dict[str, int]:
    """``{"state", "activations", "total"}`` in bytes for one process (see the module docstring)."""
    e = 2 if dtype in ("bf16", "fp16") else 4
    P = _param_count(model_cfg)
    B, T = int(batch_rows), int(seq_len)
    d, L, h, V = model_cfg.d_model, model_cfg.n_layers, model_cfg.n_heads, model_cfg.vocab_size
    state = 16 * P
    acts = L * B * T * (34 * d + 5 * h * T) * e // 2 + 12 * B * T * V + 16 * B * T
    return {"state": state, "activations": acts, "total": state + acts}


def _meminfo_available() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this run on ``device``: CUDA's free device memory; on the CPU the kernel's
    ``MemAvailable`` (Linux), else ``psutil`` when installed, else free pages (``os.sysconf``); None
    when none of these can be read (the check is then skipped)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    avail = _meminfo_available()
    if avail is not None:
        return avail
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def human(n: float) -> str:
    """Bytes as a short string with a binary unit (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_fits(model_cfg, batch_size: int, batch_rows: int, seq_len: int, dtype: str, device: torch.device,
               processes: int = 1) -> None:
    """Raise :class:`ConfigError` when the estimate for ``batch_rows`` rows (of the global
    ``batch_size``) exceeds the memory available on ``device``; ``processes`` ranks share that memory."""
    need = {k: v * processes for k, v in estimate_bytes(model_cfg, batch_rows, seq_len, dtype).items()}
    have = available_bytes(device)
    if have is None or need["total"] <= have:
        return
    fit = max(0, int((have - need["state"]) / max(1.0, need["activations"] / batch_rows)))
    hint = (f"pass --batch-size ≤ {fit * batch_size // batch_rows}" if fit else
            "the parameters and optimizer state alone do not fit; pick a smaller model (--preset, --d-model, --layers)")
    raise ConfigError(f"batch_size {batch_size} × seq_len {seq_len} needs about {human(need['total'])} of memory on "
                      f"{device} (parameters and AdamW state {human(need['state'])}, activations "
                      f"{human(need['activations'])}) but {human(have)} is available; {hint}")
