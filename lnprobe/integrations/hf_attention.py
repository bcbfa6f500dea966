"""Observing Hugging Face attention through its attention-function interface (transformers ≥ 4.48).

Hugging Face attention modules compute q and k (with rotary embeddings applied), then call
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)(module,
query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)``. While at least one probe
observes an implementation, its entry in ``ALL_ATTENTION_FUNCTIONS`` (the instance's local mapping,
so the class-wide registry is untouched) is a wrapper that calls the original function unchanged
and returns its result, then hands ``(module, query, key, attention_mask, scaling, is_causal,
softcap)`` to the observer of that attention module, if any (looked up by ``id(module)``: other
models in the process pass straight through). ``"eager"`` has no registry entry (each model passes its
own ``eager_attention_forward`` as the default); its wrapper calls the ``eager_attention_forward`` of
the attention module's own modeling file. The last observer to leave restores the entry as it was.

The model, its config and its outputs are not changed: the wrapper returns what the original returns.
"""
from __future__ import annotations

import sys
import threading
from typing import Any, Callable

_LOCK = threading.Lock()
_MISSING = object()
# implementation name -> (previous local entry or _MISSING, {id(attention submodule): (layer, callback)})
_INSTALLED: dict[str, tuple[Any, dict[int, tuple[int, Callable]]]] = {}


def _interface():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS


def _eager_of(module: Any) -> Callable:
    """The ``eager_attention_forward`` of the module's modeling file (the default its model passes)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def _wrapper(impl: str, original: Any) -> Callable:
    observers = _INSTALLED[impl][1]

    def lnprobe_attention(module, query, key, value, attention_mask, *args, **kwargs):
        fn = original if original is not None else _eager_of(module)
        out = fn(module, query, key, value, attention_mask, *args, **kwargs)
        entry = observers.get(id(module))
        if entry is not None:
            layer, callback = entry
            # eager's signature is (..., attention_mask, scaling, dropout); every model passes them by name
            scaling = kwargs.get("scaling", args[0] if args else None)
            is_causal = kwargs.get("is_causal")
            if is_causal is None:
                is_causal = getattr(module, "is_causal", True)
            callback(layer, module, query, key, attention_mask, scaling, is_causal, kwargs.get("softcap"))
        return out

    return lnprobe_attention


def observe(impl: str | None, layer_of: dict[int, int], callback: Callable) -> Any:
    """Route the attention calls of the modules in ``layer_of`` (id(module) -> layer) to ``callback(layer,
    module, query, key, attention_mask, scaling, is_causal, softcap)`` while the returned handle is not
    removed. ``impl``: the model's ``config._attn_implementation`` (None means eager). Returns None when
    transformers' attention interface is not available."""
    impl = impl or "eager"
    if not isinstance(impl, str):
        return None
    try:
        interface = _interface()
    except ImportError:
        return None
    ids = dict(layer_of)
    with _LOCK:
        if impl not in _INSTALLED:
            previous = interface._local_mapping.get(impl, _MISSING)
            original = None if impl == "eager" and impl not in interface else interface[impl]
            _INSTALLED[impl] = (previous, {})
            interface._local_mapping[impl] = _wrapper(impl, original)
        observers = _INSTALLED[impl][1]
        for mid, layer in ids.items():
            observers[mid] = (layer, callback)

    def remove() -> None:
        with _LOCK:
            entry = _INSTALLED.get(impl)
            if entry is None:
                return
            previous, obs = entry
            for mid in ids:
                if obs.get(mid, (None, None))[1] is callback:
                    del obs[mid]
            if not obs:
                del _INSTALLED[impl]
                if previous is _MISSING:
                    interface._local_mapping.pop(impl, None)
                else:
                    interface._local_mapping[impl] = previous

    from ..attnlogits import _Handle

    return _Handle(remove)
