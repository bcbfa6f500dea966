"""Integrations with training frameworks; each loads on first use, so ``lnprobe.integrations``
imports nothing (not transformers): ``lnprobe.integrations.hf.ProbeCallback`` (Hugging Face Trainer),
``lnprobe.integrations.hf_attention`` (observing Hugging Face attention for ``attach(attn_logits=True)``)."""
from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("hf", "hf_attention")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))
