"""Small adapters to the torch runtime that the probe and its integrations share: whether Dynamo is
tracing, torch.compile exclusion of hook bodies, the AMP loss scale, the autograd engine's state,
FSDP2 shards, and closing unclosed probes at interpreter exit."""
from __future__ import annotations

import atexit
import weakref
from typing import Any, Callable

import torch
from torch import nn


def no_compile(fn):
    """Keep ``fn`` (a hook body) out of torch.compile's tracing: it then runs eagerly on every call,
    with a graph break around it. For hooks whose Python state cannot be traced (the Hugging Face
    callback's root hook sums micro-batch losses on the host); the probe's own hooks are traced
    instead (``lnprobe.traced``).
    """
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


def compiling() -> bool:
    """True while Dynamo traces the calling code (``torch.compiler.is_compiling``): hooks then take
    their traced form (``lnprobe.traced``)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def loss_scale(scaler: Any) -> torch.Tensor | None:
    """The current loss scale of an enabled ``torch.amp.GradScaler`` as its 0-d device tensor (no host
    sync), None when there is no scaler or it is disabled."""
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return None
    scale = getattr(scaler, "_scale", None)  # GradScaler keeps the scale on the device: read it there
    return scale if torch.is_tensor(scale) else None


def scaler_enabled(scaler: Any) -> bool:
    """True for a GradScaler that is enabled (its loss scale multiplies the gradients)."""
    return scaler is not None and bool(getattr(scaler, "is_enabled", lambda: False)())


def in_backward() -> bool:
    """True while the autograd engine runs (e.g. a checkpointed forward being recomputed)."""
    return torch._C._current_graph_task_id() != -1


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def is_fsdp2(m: nn.Module) -> bool:
    """True for a module wrapped by FSDP2 (``fully_shard``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(m, FSDPModule)


def close_at_exit(obj: Any, close: Callable[[Any], None]) -> Callable[[], None]:
    """Register ``close(obj)`` to run at interpreter exit unless ``obj`` is gone by then; returns the
    handler (pass it to ``atexit.unregister`` once ``obj`` is closed). Holds only a weak reference."""
    ref = weakref.ref(obj)

    def _close_at_exit() -> None:
        o = ref()
        if o is not None:
            close(o)

    atexit.register(_close_at_exit)
    return _close_at_exit


def version() -> str:
    """The installed lnprobe version, ``0+unknown`` when run from an uninstalled checkout."""
    try:
        from importlib.metadata import version as _v

        return _v("lnprobe")
    except Exception:
        return "0+unknown"


def to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """A small float64 tensor from host numbers without a host sync (pinned, non-blocking on CUDA)."""
    return host_to_device(torch.tensor(values, dtype=torch.float64), device)


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device`` without a host sync: pinned and non-blocking on CUDA."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


_FILLS: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}


def fill_view(value: float, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(n,)`` filled with ``value``: a view of a constant kept per value, dtype and device (grown when a
    longer one is asked for), so a pad or a missing entry costs no device operation after the first.
    Read-only: never write into it."""
    key = (repr(float(value)), dtype, device)  # repr: NaN is a usable key
    t = _FILLS.get(key)
    if t is None or t.numel() < n:
        t = _FILLS[key] = torch.full((max(n, 2 * t.numel() if t is not None else 64),), value, dtype=dtype,
                                     device=device)
    return t[:n]


class LayoutCache:
    """What finalize code derives from the shapes of a step's partials only (index tables, divisors,
    pads), built once per distinct key and kept on the device; at most ``limit`` keys (a model whose
    shapes change every step, e.g. varying sequence lengths, rebuilds them: correct, just slower)."""

    def __init__(self, limit: int = 16):
        self._limit = limit
        self._items: dict[Any, Any] = {}

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        """The item of ``key``, built by ``build()`` the first time."""
        item = self._items.get(key)
        if item is None:
            if len(self._items) >= self._limit:
                self._items.clear()
            item = self._items[key] = build()
        return item
