"""The one traced forward of discovery and its example input.

`run_trace` runs the model once (eval mode, grad enabled) with a forward pre-hook and a forward hook
on every submodule and keeps a float32 copy of every floating tensor they see, in execution order:
a `Call` per module call, whose inputs and outputs are `Pt`s (a hook point, the tensor, its
position). The numerics that compare traced tensors (tolerances, closeness) live here too.
"""
from __future__ import annotations

import inspect
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..sites import DiscoveryError, HookPoint
from .modules import is_linear, is_norm, model_device, model_dtype, norm_params


@dataclass
class Pt:
    """A traced tensor: its hook point, a float32 copy of its value, its execution-order position
    (`seq`: the call's start for "in", its end for "out") and the call that saw it."""

    point: HookPoint
    t: torch.Tensor
    seq: int
    call: Call


@dataclass
class Call:
    """One forward call of a module during the trace: its span in the event order, inputs and outputs."""

    name: str
    module: nn.Module
    start: int
    end: int | None = None
    ins: list[tuple[int | str, torch.Tensor]] = field(default_factory=list)
    outs: list[tuple[int | str | None, torch.Tensor]] = field(default_factory=list)
    dtype: torch.dtype | None = None   # dtype of the first floating input (for tolerances)

    def in_points(self) -> list[Pt]:
        """The call's floating inputs as points, placed at the call's start."""
        return [Pt(HookPoint(self.name, "in", k), t, self.start, self) for k, t in self.ins]

    def out_points(self) -> list[Pt]:
        """The call's floating outputs as points, placed at the call's end."""
        return [Pt(HookPoint(self.name, "out", k), t, self.end, self) for k, t in self.outs]

    def io(self) -> tuple[Pt, Pt] | None:
        """(input, output) of a shape-preserving call such as a norm; None if there is none."""
        outs = self.out_points()
        if not outs:
            return None
        out = outs[0]
        inp = next((p for p in self.in_points() if p.t.shape == out.t.shape), None)
        return None if inp is None else (inp, out)


def _floats_in(args: tuple, kwargs: dict) -> list[tuple[int | str, torch.Tensor]]:
    found: list[tuple[int | str, torch.Tensor]] = [
        (i, a) for i, a in enumerate(args) if _is_float(a)
    ]
    found += [(k, v) for k, v in kwargs.items() if _is_float(v)]
    return found


def _floats_out(output: Any) -> list[tuple[int | str | None, torch.Tensor]]:
    if _is_float(output):
        return [(None, output)]
    if isinstance(output, Mapping):
        return [(k, v) for k, v in output.items() if isinstance(k, str) and _is_float(v)]
    if isinstance(output, (tuple, list)):
        return [(i, v) for i, v in enumerate(output) if _is_float(v)]
    return []


def _is_float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and not x.is_nested


def _copy(pairs: list) -> list:
    # float32 copies: values as they are at hook time (later in-place ops cannot change them)
    return [(k, t.detach().to(torch.float32, copy=True)) for k, t in pairs]


class Trace:
    """All finished module calls of one forward, in start order, and how often each module ran."""

    def __init__(self, calls: list[Call]):
        self.calls = sorted((c for c in calls if c.end is not None), key=lambda c: c.start)
        self.count: dict[str, int] = {}
        for c in self.calls:
            self.count[c.name] = self.count.get(c.name, 0) + 1
        self.by_name: dict[str, list[Call]] = {}
        for c in self.calls:
            self.by_name.setdefault(c.name, []).append(c)

    def within(self, lo: int, hi: int) -> list[Call]:
        """Calls that start after `lo` and end before `hi`."""
        return [c for c in self.calls if lo < c.start and c.end < hi]


def run_trace(root: nn.Module, args: tuple, kwargs: dict) -> Trace:
    """One forward in eval mode with grad enabled (so nn.TransformerEncoderLayer's fused fast path
    is not taken) recording every floating input/output of every module; restores training flags,
    the RNG state and buffers, and removes every hook, also on exceptions."""
    calls: list[Call] = []
    open_calls: dict[str, list[Call]] = {}
    counter = itertools.count()
    handles = []

    def make_hooks(name: str):
        def pre(module, a, kw):
            c = Call(name, module, next(counter), ins=_copy(_floats_in(a, kw)))
            first = next((t for t in list(a) + list(kw.values()) if _is_float(t)), None)
            c.dtype = None if first is None else first.dtype
            calls.append(c)
            open_calls.setdefault(name, []).append(c)

        def post(module, a, kw, output):
            stack = open_calls.get(name)
            if stack:
                c = stack.pop()
                c.end = next(counter)
                c.outs = _copy(_floats_out(output))

        return pre, post

    flags = {m: m.training for m in root.modules()}
    # buffers a forward mutates in place (caches, counters) are put back; inference tensors
    # have no version counter and cannot be mutated here anyway
    versions = {n: b._version for n, b in root.named_buffers() if not b.is_inference()}
    buffers = {n: b.detach().clone() for n, b in root.named_buffers() if n in versions}
    device = model_device(root)
    # the CPU generator is always forked; an accelerator's only when the model lives on one
    fork = (dict(devices=[]) if device.type in ("cpu", "meta")
            else dict(devices=[device.index or 0], device_type=device.type))
    try:
        with torch.random.fork_rng(**fork), torch.enable_grad():
            root.eval()
            for name, module in root.named_modules():
                pre, post = make_hooks(name)
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(module.register_forward_hook(post, with_kwargs=True))
            root(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
        with torch.no_grad():
            for n, b in root.named_buffers():
                if n in buffers and b._version != versions[n] and b.shape == buffers[n].shape:
                    b.copy_(buffers[n])
    return Trace(calls)


# ----------------------------------------------------------------------------- inputs


def _to_device(x: Any, device: torch.device) -> Any:
    # a copy: an inference-mode tensor cannot enter a forward that records autograd
    return x.detach().to(device).clone() if isinstance(x, torch.Tensor) else x


def example_inputs(root: nn.Module, example_input: Any) -> tuple[tuple, dict]:
    """(args, kwargs) for the trace, on the model's device: the model's declared input when it
    declares one (`_declared_inputs`), else token ids for models with a vocabulary, or a float
    (1, 8, d) sequence for embedding-free stacks such as nn.TransformerEncoder."""
    device = model_device(root)
    if example_input is not None:
        if isinstance(example_input, Mapping):
            return (), {k: _to_device(v, device) for k, v in example_input.items()}
        if isinstance(example_input, (tuple, list)):
            return tuple(_to_device(v, device) for v in example_input), {}
        return (_to_device(example_input, device),), {}

    gen = torch.Generator().manual_seed(0)  # private generator: the global RNG is not touched
    declared = _declared_inputs(root, gen, device)
    if declared is not None:
        return (), declared
    vocab = getattr(getattr(root, "config", None), "vocab_size", None)
    leaves = [m for m in root.modules() if not any(True for _ in m.children())]
    if not isinstance(vocab, int) and leaves and isinstance(leaves[0], nn.Embedding):
        vocab = leaves[0].num_embeddings
    if isinstance(vocab, int) and vocab > 0:
        ids = torch.randint(vocab, (1, 8), generator=gen).to(device)  # (B, T)
        kwargs: dict[str, Any] = {}
        if "use_cache" in inspect.signature(root.forward).parameters:
            kwargs["use_cache"] = False
        return (ids,), kwargs

    has_embedding = any(isinstance(m, nn.Embedding) for m in root.modules())
    width = None if has_embedding else _first_width(root)
    if width is None:
        raise DiscoveryError(
            f"cannot build an example input for {type(root).__name__}: expected a model with a "
            f"vocabulary (config.vocab_size or a leading nn.Embedding) or an embedding-free stack "
            f"whose width can be read from its first norm/Linear; found neither. Pass "
            f"example_input= (a tensor, a tuple of args or a dict of kwargs).")
    seq_first = any(isinstance(m, nn.MultiheadAttention) and not m.batch_first for m in root.modules())
    shape = (8, 1, width) if seq_first else (1, 8, width)  # (T, B, D) or (B, T, D)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=model_dtype(root))
    return (x,), {}


def _declared_inputs(root: nn.Module, gen: torch.Generator, device: torch.device) -> dict | None:
    """Keyword inputs built from what a Hugging Face model declares: `main_input_name` (input_ids,
    pixel_values of (1, channels, image_size, image_size), input_features of (1, mel bins, the fixed
    length 2 × max_source_positions that Whisper's encoder requires), input_values of (1, 4096)),
    plus decoder_input_ids (1, 8) for an encoder–decoder (`config.is_encoder_decoder`). None for
    models that declare nothing (then the input is guessed from a vocabulary or a width)."""
    cfg = getattr(root, "config", None)
    name = getattr(root, "main_input_name", None)
    if cfg is None or not isinstance(name, str):
        return None
    params = inspect.signature(root.forward).parameters
    dtype = model_dtype(root)
    vocab = getattr(cfg, "vocab_size", None)

    def ids() -> torch.Tensor:
        return torch.randint(int(vocab), (1, 8), generator=gen).to(device)  # (B, T)

    kwargs: dict[str, Any] = {}
    if name == "input_ids" and isinstance(vocab, int) and vocab > 0:
        kwargs[name] = ids()
    elif name == "pixel_values":
        size = getattr(cfg, "image_size", 224)
        size = size if isinstance(size, int) else int(size[0])
        shape = (1, int(getattr(cfg, "num_channels", 3)), size, size)
        kwargs[name] = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    elif name == "input_features" and hasattr(cfg, "num_mel_bins"):
        length = 2 * int(getattr(cfg, "max_source_positions", 1500))  # two stride-1/2 convolutions
        shape = (1, int(cfg.num_mel_bins), length)
        kwargs[name] = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    elif name == "input_values":
        kwargs[name] = torch.randn((1, 4096), generator=gen).to(device=device, dtype=dtype)
    else:
        return None
    if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params and isinstance(vocab, int):
        kwargs["decoder_input_ids"] = ids()
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs


def _first_width(root: nn.Module) -> int | None:
    for m in root.modules():
        if isinstance(m, nn.MultiheadAttention):
            return m.embed_dim
        if isinstance(m, nn.Linear):
            return m.in_features
        if is_norm(m):
            weight, _ = norm_params(m)
            shape = getattr(m, "normalized_shape", None)
            if weight is not None:
                return weight.shape[-1]
            if shape:
                return int(shape[-1])
    return None


# ----------------------------------------------------------------------------- numerics


def rel_tol(dtype: torch.dtype | None) -> float:
    """Relative tolerance of a residual-sum identity: float32 sums agree to a few ulp."""
    return 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5


def amax(t: torch.Tensor) -> float:
    """Largest |value| of `t`; 0.0 for an empty tensor."""
    return float(t.abs().max()) if t.numel() else 0.0


def close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    """True when `a` and `b` have the same shape and differ by at most `atol` everywhere."""
    return a.shape == b.shape and float((a - b).abs().max()) <= atol


# ----------------------------------------------------------------------------- residual-shaped views


def shaped(points: list[Pt], shape: torch.Size) -> list[Pt]:
    """The points whose tensor has the residual `shape`, or is a reshape of it with the same last
    dim (OPT flattens (B, T, D) to (B*T, D) around its MLP), viewed as `shape`."""
    found = []
    for p in points:
        if p.t.shape == shape:
            found.append(p)
        elif p.t.dim() >= 2 and p.t.shape[-1] == shape[-1] and p.t.numel() == shape.numel():
            found.append(replace(p, t=p.t.reshape(shape), point=replace(p.point, flat=True)))
    return found


def norm_io(c: Call, shape: torch.Size) -> tuple[Pt, Pt] | None:
    """(input, output) of a norm call acting on the residual stream (of `shape`), else None."""
    io = c.io()
    if io is None:
        return None
    io = shaped(list(io), shape)
    return (io[0], io[1]) if len(io) == 2 else None


def outermost_norms(calls: list[Call]) -> list[Call]:
    """The norm calls among `calls` that do not run inside another norm call (a gain wrapper's
    parameter-free core runs inside it and is not a norm of its own)."""
    nrm = [c for c in calls if is_norm(c.module)]
    return [c for c in nrm
            if not any(o is not c and o.start < c.start and c.end < o.end for o in nrm)]


def outermost_linears(calls: list[Call]) -> list[Call]:
    """The linear-layer calls among `calls` that do not run inside another linear call."""
    lin = [c for c in calls if is_linear(c.module)]
    return [c for c in lin
            if not any(o is not c and o.start < c.start and c.end < o.end for o in lin)]


