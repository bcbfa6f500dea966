"""What kind of module a module is (Linear-like, norm, attention), a norm's own eps and parameters,
where a model lives, and unwrapping DDP / FSDP1 / torch.compile wrappers."""
from __future__ import annotations

import itertools

import torch
from torch import nn

_WRAPPER_CLASSES = {
    "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine",
}


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / DataParallel / FSDP1 (`.module`) and `torch.compile`
    (`OptimizedModule._orig_mod`) wrappers, nested in any order. FSDP2's `fully_shard` modifies the
    model in place: nothing to unwrap. A module whose only child is called `module` is treated as
    such a wrapper too."""
    for _ in range(16):  # wrappers never nest deeper; guards against cycles
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        children = [name for name, _ in model.named_children()]
        if isinstance(inner, nn.Module) and (
            type(model).__name__ in _WRAPPER_CLASSES or children == ["module"]
        ):
            model = inner
            continue
        break
    return model


# ----------------------------------------------------------------------------- module kinds


def is_linear(m: nn.Module) -> bool:
    """nn.Linear (and subclasses), HF GPT-2's Conv1D, or a class named *Linear (LoRA, quantised)."""
    name = type(m).__name__
    return isinstance(m, nn.Linear) or name == "Conv1D" or name.endswith("Linear")


def is_norm(m: nn.Module) -> bool:
    """A normalisation module: class name containing "Norm" (LayerNorm, RMSNorm, LlamaRMSNorm,
    Gemma2RMSNorm, ...) that is not a container of other norms, except a wrapper that holds the
    gain of a parameter-free core norm (x-transformers' LayerNorm: nn.LayerNorm without affine,
    times its own gamma): the wrapper is the norm, its core runs inside it (`outermost_norms`)."""
    if "norm" not in type(m).__name__.lower():
        return False
    inner = [c for c in m.children() if is_norm(c)]
    if not inner:
        return True
    return (not any(True for c in inner for _ in c.parameters())
            and any(True for _ in m.parameters(recurse=False)))


def is_attention(m: nn.Module) -> bool:
    """True for nn.MultiheadAttention or a module whose class name contains "attention" or "attn"."""
    name = type(m).__name__.lower()
    return isinstance(m, nn.MultiheadAttention) or "attention" in name or "attn" in name


def norm_eps(m: nn.Module) -> float | None:
    """The norm's epsilon (attribute eps, variance_epsilon or epsilon), else its core norm's (a gain
    wrapper, see `is_norm`); None when it has none."""
    for attr in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(m, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    core = next((c for c in m.children() if "norm" in type(c).__name__.lower()), None)
    return None if core is None else norm_eps(core)


def norm_params(m: nn.Module) -> tuple[nn.Parameter | None, nn.Parameter | None]:
    """(gain, bias): the norm's own parameters by their usual names, None for each it lacks."""
    params = dict(m.named_parameters(recurse=False))
    weight = next((params[k] for k in ("weight", "scale", "gamma", "g") if k in params), None)
    bias = next((params[k] for k in ("bias", "beta", "b") if k in params), None)
    return weight, bias


def model_device(root: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer; CPU when it has none."""
    for t in itertools.chain(root.parameters(), root.buffers()):
        return t.device
    return torch.device("cpu")


def model_dtype(root: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter; float32 when it has none."""
    return next((p.dtype for p in root.parameters() if p.is_floating_point()), torch.float32)


