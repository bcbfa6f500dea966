"""Model discovery: find the blocks, sublayers, norms, placement and hook points of any Transformer.

`discover(model)` runs ONE traced forward (eval mode, a tiny example input) with hooks on every
submodule, records every floating tensor seen by a pre-hook (inputs) or a forward hook (outputs) in
execution order, and then works out the residual structure numerically, from the DATAFLOW, not
from module names:

- per block, with X = block input and Y = block output (both from the block's own hooks):
  Post-LN when Y is the output of a norm inside the block (`Norm(Norm(X + T1) + T2)`); otherwise
  two module outputs T1 (attention branch, earlier) and T2 (MLP branch, later) with
  `X + T1 + T2 == Y`. Norms are then labelled by what they see: input == X -> pre-attention,
  input == X + T1 -> pre-MLP, output == T1 / T2 -> output norm of that sublayer.
- outside the blocks: a norm whose output is the block-0 input is the embedding norm; a norm after
  the last block whose input is the last block output is the final norm.
- norm kind (LayerNorm vs RMSNorm) and gain offset (`w` vs Gemma's `1 + w`) are fitted from the
  traced input/output of each norm.

Hook points name a (module, pre-hook argument or forward-hook output) pair relative to the
unwrapped root, so a probe can register hooks that fetch exactly the tensor of a site. Site names
and their meaning are those of the design page (resid, resid_mid, attn_out, mlp_out, attn_raw,
mlp_raw, mlp_act, final).
"""
from __future__ import annotations

import inspect
import itertools
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

__all__ = [
    "BLOCK_SITES",
    "NORM_ROLES",
    "PLACEMENTS",
    "DiscoveryError",
    "HookPoint",
    "NormInfo",
    "BlockInfo",
    "ModelMap",
    "discover",
    "unwrap",
]

PLACEMENTS = ("pre", "post", "peri", "output", "none", "mixed")
NORM_ROLES = (
    "norm.pre_attn", "norm.post_attn", "norm.pre_mlp", "norm.post_mlp", "norm.embed", "norm.final",
)
BLOCK_SITES = ("resid", "resid_mid", "attn_out", "mlp_out", "attn_raw", "mlp_raw", "mlp_act")
_WRAPPER_CLASSES = {
    "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine",
}
_TOKEN_EMBED_NAMES = {
    "wte", "embed_tokens", "word_embeddings", "tok_embeddings", "embed_in", "token_embedding",
    "tok_emb", "token_embeddings", "embedding",
}


class DiscoveryError(ValueError):
    """The model could not be mapped; the message lists what was found and which override to pass."""


# ----------------------------------------------------------------------------- public data


@dataclass(frozen=True)
class HookPoint:
    """Where a tensor is seen by hooks: `module` (dotted path from the unwrapped root, "" = root),
    `kind` "in" (an argument of a forward pre-hook registered with `with_kwargs=True`) or "out"
    (the output seen by a forward hook), and `arg`: positional index (int) or keyword (str) for
    "in"; for "out" None (bare tensor output), an index into a tuple/list output, or a key of a
    dict-like output (HF ModelOutput)."""

    module: str
    kind: str
    arg: int | str | None

    def fetch(self, args: tuple, kwargs: dict | None, output: Any = None) -> torch.Tensor | None:
        """Pull this point's tensor out of a hook call: `args, kwargs` of the pre-hook (kind "in")
        or `args, kwargs, output` of the forward hook (kind "out"). None if absent."""
        if self.kind == "in":
            if isinstance(self.arg, int):
                value = args[self.arg] if self.arg < len(args) else None
            else:
                value = (kwargs or {}).get(self.arg)
        elif self.arg is None:
            value = output
        elif isinstance(output, Mapping):
            value = output.get(self.arg)
        elif isinstance(output, (tuple, list)) and isinstance(self.arg, int):
            value = output[self.arg] if self.arg < len(output) else None
        else:
            value = None
        return value if isinstance(value, torch.Tensor) else None

    def __str__(self) -> str:
        where = self.module or "<root>"
        return f"{where}:{self.kind}" + ("" if self.arg is None else f"[{self.arg}]")


@dataclass
class NormInfo:
    """A norm on the residual path. `kind` and `gain_offset` are fitted numerically from the traced
    input/output: output = normalise(input) * (gain_offset + weight) + bias, where normalise
    centres and divides by the per-token std ("layernorm") or divides by the per-token RMS
    ("rmsnorm") over the last dim."""

    name: str
    role: str
    layer: int
    kind: str
    gain_offset: float
    weight: str | None
    bias: str | None


@dataclass
class BlockInfo:
    """One block: its placement and the hook points of its sites (keys present only if found)."""

    index: int
    name: str
    placement: str
    points: dict[str, HookPoint]
    norms: list[NormInfo]
    attn_out_proj: str | None
    mlp_out_proj: str | None


@dataclass
class ModelMap:
    """Everything `discover` found; see the module docstring for how."""

    model_class: str
    d_model: int
    n_layers: int
    blocks_path: str
    blocks: list[BlockInfo]
    placement: str
    resid_out: HookPoint
    final: HookPoint | None
    embed: str | None
    norms: list[NormInfo]
    param_roles: dict[str, dict]
    notes: list[str] = field(default_factory=list)

    def site_points(self) -> dict[tuple[str, int], HookPoint]:
        """(site, layer) -> hook point for every site found: resid 0..L (L = output of the last
        block), resid_mid/attn_out/mlp_out/attn_raw/mlp_raw/mlp_act 0..L-1, final at L."""
        points: dict[tuple[str, int], HookPoint] = {}
        for block in self.blocks:
            for site in BLOCK_SITES:
                if site in block.points:
                    points[(site, block.index)] = block.points[site]
        points[("resid", self.n_layers)] = self.resid_out
        if self.final is not None:
            points[("final", self.n_layers)] = self.final
        return points

    def norm_type(self) -> str | None:
        """"layernorm" / "rmsnorm" when all residual norms of known kind agree, "mixed", or None."""
        kinds = {n.kind for n in self.norms if n.kind != "unknown"}
        if not kinds:
            return None
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def __str__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        """Human-readable table: blocks, norms with roles, placement per block, sites, notes."""
        wb = max([len("block")] + [len(b.name) for b in self.blocks])
        wa = max([len("attn_out_proj")] + [len(str(b.attn_out_proj)) for b in self.blocks])
        lines = [
            f"{self.model_class}: d_model={self.d_model} n_layers={self.n_layers} "
            f"blocks='{self.blocks_path}' placement={self.placement} norm_type={self.norm_type()}",
            f"embed: {self.embed}    resid_out: {self.resid_out}    final: {self.final}",
            "",
            f"{'layer':>5}  {'block':<{wb}}  {'placement':<9}  {'attn_out_proj':<{wa}}  mlp_out_proj",
        ]
        for b in self.blocks:
            lines.append(f"{b.index:>5}  {b.name:<{wb}}  {b.placement:<9}  "
                         f"{str(b.attn_out_proj):<{wa}}  {b.mlp_out_proj}")
        lines += ["", f"{'layer':>5}  {'role':<15} {'kind':<10} {'gain':<5} name"]
        for n in self.norms:
            gain = "1+w" if n.gain_offset else ("w" if n.weight else "-")
            lines.append(f"{n.layer:>5}  {n.role:<15} {n.kind:<10} {gain:<5} {n.name}")
        lines += ["", "sites:"]
        by_site: dict[str, list[int]] = {}
        for site, layer in self.site_points():
            by_site.setdefault(site, []).append(layer)
        for site, layers in by_site.items():
            lines.append(f"  {site:<10} layers {_ranges(sorted(layers))}")
        if self.blocks:
            lines.append("  block 0 hook points: " + ", ".join(
                f"{k}={v}" for k, v in self.blocks[0].points.items()))
        if self.notes:
            lines += ["", "notes:"] + [f"  - {n}" for n in self.notes]
        return "\n".join(lines)

    def to_meta(self) -> dict:
        """JSON-serialisable summary for run.meta."""
        return {
            "model_class": self.model_class,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "blocks_path": self.blocks_path,
            "placement": self.placement,
            "block_placements": [b.placement for b in self.blocks],
            "norm_type": self.norm_type(),
            "norms": [asdict(n) for n in self.norms],
            "param_roles": {k: dict(v) for k, v in self.param_roles.items()},
            "sites": sorted({site for site, _ in self.site_points()}),
            "notes": list(self.notes),
        }


# ----------------------------------------------------------------------------- unwrapping


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


def _is_linear(m: nn.Module) -> bool:
    """nn.Linear (and subclasses), HF GPT-2's Conv1D, or a class named *Linear (LoRA, quantised)."""
    name = type(m).__name__
    return isinstance(m, nn.Linear) or name == "Conv1D" or name.endswith("Linear")


def _is_norm(m: nn.Module) -> bool:
    """A normalisation module: class name containing "Norm" (LayerNorm, RMSNorm, LlamaRMSNorm,
    Gemma2RMSNorm, ...) that is not a container of other norms."""
    if "norm" not in type(m).__name__.lower():
        return False
    return not any(_is_norm(c) for c in m.children())


def _is_attention(m: nn.Module) -> bool:
    name = type(m).__name__.lower()
    return isinstance(m, nn.MultiheadAttention) or "attention" in name or "attn" in name


def _norm_eps(m: nn.Module) -> float | None:
    for attr in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(m, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _norm_params(m: nn.Module) -> tuple[nn.Parameter | None, nn.Parameter | None]:
    params = dict(m.named_parameters(recurse=False))
    weight = next((params[k] for k in ("weight", "scale", "gamma", "g") if k in params), None)
    bias = next((params[k] for k in ("bias", "beta", "b") if k in params), None)
    return weight, bias


# ----------------------------------------------------------------------------- tracing


@dataclass
class _Pt:
    """A traced tensor: its hook point, a float32 copy of its value, its execution-order position
    (`seq`: the call's start for "in", its end for "out") and the call that saw it."""

    point: HookPoint
    t: torch.Tensor
    seq: int
    call: "_Call"


@dataclass
class _Call:
    name: str
    module: nn.Module
    start: int
    end: int | None = None
    ins: list[tuple[int | str, torch.Tensor]] = field(default_factory=list)
    outs: list[tuple[int | str | None, torch.Tensor]] = field(default_factory=list)
    dtype: torch.dtype | None = None   # dtype of the first floating input (for tolerances)

    def in_points(self) -> list[_Pt]:
        return [_Pt(HookPoint(self.name, "in", k), t, self.start, self) for k, t in self.ins]

    def out_points(self) -> list[_Pt]:
        return [_Pt(HookPoint(self.name, "out", k), t, self.end, self) for k, t in self.outs]

    def io(self) -> tuple[_Pt, _Pt] | None:
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


class _Trace:
    """All finished module calls of one forward, in start order, and how often each module ran."""

    def __init__(self, calls: list[_Call]):
        self.calls = sorted((c for c in calls if c.end is not None), key=lambda c: c.start)
        self.count: dict[str, int] = {}
        for c in self.calls:
            self.count[c.name] = self.count.get(c.name, 0) + 1
        self.by_name: dict[str, list[_Call]] = {}
        for c in self.calls:
            self.by_name.setdefault(c.name, []).append(c)

    def within(self, lo: int, hi: int) -> list[_Call]:
        """Calls that start after `lo` and end before `hi`."""
        return [c for c in self.calls if lo < c.start and c.end < hi]


def _run_trace(root: nn.Module, args: tuple, kwargs: dict) -> _Trace:
    """One forward in eval mode with grad enabled (so nn.TransformerEncoderLayer's fused fast path
    is not taken) recording every floating input/output of every module; restores training flags,
    the RNG state and buffers, and removes every hook, also on exceptions."""
    calls: list[_Call] = []
    open_calls: dict[str, list[_Call]] = {}
    counter = itertools.count()
    handles = []

    def make_hooks(name: str):
        def pre(module, a, kw):
            c = _Call(name, module, next(counter), ins=_copy(_floats_in(a, kw)))
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
    device = _model_device(root)
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
    return _Trace(calls)


# ----------------------------------------------------------------------------- inputs


def _model_device(root: nn.Module) -> torch.device:
    for t in itertools.chain(root.parameters(), root.buffers()):
        return t.device
    return torch.device("cpu")


def _model_dtype(root: nn.Module) -> torch.dtype:
    return next((p.dtype for p in root.parameters() if p.is_floating_point()), torch.float32)


def _to_device(x: Any, device: torch.device) -> Any:
    # a copy: an inference-mode tensor cannot enter a forward that records autograd
    return x.detach().to(device).clone() if isinstance(x, torch.Tensor) else x


def _example_inputs(root: nn.Module, example_input: Any) -> tuple[tuple, dict]:
    """(args, kwargs) for the trace, on the model's device. Token ids for models with a vocabulary,
    a float (1, 8, d) sequence for embedding-free stacks such as nn.TransformerEncoder."""
    device = _model_device(root)
    if example_input is not None:
        if isinstance(example_input, Mapping):
            return (), {k: _to_device(v, device) for k, v in example_input.items()}
        if isinstance(example_input, (tuple, list)):
            return tuple(_to_device(v, device) for v in example_input), {}
        return (_to_device(example_input, device),), {}

    gen = torch.Generator().manual_seed(0)  # private generator: the global RNG is not touched
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
    x = torch.randn(shape, generator=gen).to(device=device, dtype=_model_dtype(root))
    return (x,), {}


def _first_width(root: nn.Module) -> int | None:
    for m in root.modules():
        if isinstance(m, nn.MultiheadAttention):
            return m.embed_dim
        if isinstance(m, nn.Linear):
            return m.in_features
        if _is_norm(m):
            weight, _ = _norm_params(m)
            shape = getattr(m, "normalized_shape", None)
            if weight is not None:
                return weight.shape[-1]
            if shape:
                return int(shape[-1])
    return None


# ----------------------------------------------------------------------------- blocks


def _module_lists(root: nn.Module) -> list[tuple[str, nn.Module, bool, int]]:
    """(path, container, is a list of identical non-leaf blocks, parameter count) for every
    ModuleList / Sequential."""
    found = []
    for name, m in root.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        kids = list(m.children())
        if not kids:
            continue
        same = len({type(k) for k in kids}) == 1 and any(True for _ in kids[0].children())
        found.append((name, m, same, sum(p.numel() for p in m.parameters())))
    return found


def _describe_lists(root: nn.Module) -> str:
    items = []
    for name, m, same, n in _module_lists(root):
        classes = sorted({type(k).__name__ for k in m.children()})
        items.append(f"'{name}' ({type(m).__name__} of {len(list(m.children()))}: "
                     f"{'/'.join(classes)}, {n} params{'' if same else ', not identical blocks'})")
    return "; ".join(items) or "none"


def _describe_norms(root: nn.Module) -> str:
    names = [f"'{n}' ({type(m).__name__})" for n, m in root.named_modules() if _is_norm(m)]
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    return shown or "none"


def _find_blocks(root: nn.Module, blocks: str | None) -> tuple[str, list[tuple[str, nn.Module]]]:
    if blocks is not None:
        try:
            container = root.get_submodule(blocks)
        except AttributeError:
            raise DiscoveryError(
                f"blocks='{blocks}' is not a submodule of {type(root).__name__}; module lists "
                f"found: {_describe_lists(root)}") from None
        kids = list(container.named_children())
        if not kids:
            raise DiscoveryError(f"blocks='{blocks}' has no children; expected a list of blocks")
    else:
        cands = [c for c in _module_lists(root) if c[2]]
        if not cands:
            raise DiscoveryError(
                f"no Transformer blocks found in {type(root).__name__}: looked for a "
                f"ModuleList/Sequential of identical blocks; module lists found: "
                f"{_describe_lists(root)}; norms found: {_describe_norms(root)}. "
                f"Pass blocks='...' (e.g. blocks='encoder.layers').")
        blocks, container, _, _ = max(cands, key=lambda c: (c[3], len(list(c[1].children()))))
        kids = list(container.named_children())
    prefix = f"{blocks}." if blocks else ""
    return blocks, [(prefix + n, m) for n, m in kids]


# ----------------------------------------------------------------------------- numerics


def _tol(dtype: torch.dtype | None) -> float:
    """Relative tolerance of a residual-sum identity: float32 sums agree to a few ulp."""
    return 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5


def _amax(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= atol


def _fit_norm(x: torch.Tensor, y: torch.Tensor, m: nn.Module, low_precision: bool
              ) -> tuple[str, float]:
    """(kind, gain_offset) of a norm from its traced input x and output y, both (..., D).

    Tries output = z / sqrt(s + eps) * (offset + w) + b with z = x - mean(x) (LayerNorm) or x
    (RMSNorm), s = mean(z²) per token, offset 0 or 1, and eps the module's own or, if it has
    none, the per-token median implied by the data. The best fit within tolerance wins; a tie
    between kinds (input already centred) goes to the class name ("RMS")."""
    weight, bias = _norm_params(m)
    x64 = x.reshape(-1, x.shape[-1]).double()                          # (N, D)
    y64 = y.reshape(-1, y.shape[-1]).double()                          # (N, D)
    if weight is not None and weight.shape != x64.shape[-1:]:
        return "unknown", 0.0
    w = None if weight is None else weight.detach().double().to(x64.device)
    b = 0.0 if bias is None else bias.detach().double().to(x64.device)
    target = y64 - b                                                   # (N, D)
    scale = max(_amax(y64), 1e-30)
    tol = 3e-2 if low_precision else 1e-3
    fits = []
    for kind in ("layernorm", "rmsnorm"):
        z = x64 - x64.mean(-1, keepdim=True) if kind == "layernorm" else x64  # (N, D)
        s = z.square().mean(-1, keepdim=True)                          # (N, 1)
        for offset in ((0.0, 1.0) if w is not None else (0.0,)):
            g = 1.0 if w is None else w + offset                       # (D,)
            u = z * g                                                  # (N, D)
            eps_list = []
            if _norm_eps(m) is not None:
                eps_list.append(_norm_eps(m))
            uu = u.square().sum(-1, keepdim=True)
            if bool((uu > 0).all()):
                r = (target * u).sum(-1, keepdim=True) / uu            # (N, 1) = 1/sqrt(s+eps)
                if bool((r > 0).all()):
                    eps_list.append(max(float((1 / r.square() - s).median()), 0.0))
            for eps in eps_list:
                pred = z / torch.sqrt(s + eps) * g + b                 # (N, D)
                err = float((pred - y64).abs().max()) / scale
                fits.append((err, kind, offset))
    good = [f for f in fits if f[0] <= tol]
    if not good:
        return "unknown", 0.0
    kinds = {f[1] for f in good}
    if len(kinds) > 1:  # centred input: both fit; trust the class name
        hint = "rmsnorm" if "rms" in type(m).__name__.lower() else "layernorm"
        good = [f for f in good if f[1] == hint]
    err, kind, offset = min(good)
    return kind, offset


# ----------------------------------------------------------------------------- per block


@dataclass
class _BlockResult:
    info: BlockInfo
    mapped: bool
    why: str = ""
    x: _Pt | None = None
    y: _Pt | None = None
    norm_calls: dict[str, _Call] = field(default_factory=dict)      # role -> call
    module_roles: dict[str, str] = field(default_factory=dict)      # module path -> param role
    mha: list[str] = field(default_factory=list)


def _block_io(call: _Call) -> tuple[_Pt, _Pt] | None:
    """(X, Y): the first floating input of the block whose shape matches a floating output."""
    outs = call.out_points()
    for inp in call.in_points():
        if inp.t.dim() < 2:
            continue
        out = next((o for o in outs if o.t.shape == inp.t.shape), None)
        if out is not None:
            return inp, out
    return None


def _shaped(points: list[_Pt], shape: torch.Size) -> list[_Pt]:
    """The points whose tensor has the residual `shape`, or is a reshape of it with the same last
    dim (OPT flattens (B, T, D) to (B*T, D) around its MLP), viewed as `shape`."""
    found = []
    for p in points:
        if p.t.shape == shape:
            found.append(p)
        elif p.t.dim() >= 2 and p.t.shape[-1] == shape[-1] and p.t.numel() == shape.numel():
            found.append(replace(p, t=p.t.reshape(shape)))
    return found


def _norm_io(c: _Call, shape: torch.Size) -> tuple[_Pt, _Pt] | None:
    """(input, output) of a norm call acting on the residual stream (of `shape`), else None."""
    io = c.io()
    if io is None:
        return None
    io = _shaped(list(io), shape)
    return (io[0], io[1]) if len(io) == 2 else None


def _outermost_linears(calls: list[_Call]) -> list[_Call]:
    lin = [c for c in calls if _is_linear(c.module)]
    return [c for c in lin
            if not any(o is not c and o.start < c.start and c.end < o.end for o in lin)]


@dataclass
class _Block:
    """What ran inside one block call: X, Y and the candidate points and norms, all viewed with
    the residual shape; `tol` is relative to the largest magnitude involved."""

    index: int
    call: _Call
    x: _Pt
    y: _Pt
    inner: list[_Call]
    outs: list[_Pt]
    ins: list[_Pt]
    norms: list[_Call]
    dnorms: list[tuple[_Call, tuple[_Pt, _Pt]]]
    tol: float

    def atol(self, *ts: torch.Tensor) -> float:
        return self.tol * max([_amax(self.x.t), _amax(self.y.t)] + [_amax(t) for t in ts])


def _map_block(index: int, name: str, tr: _Trace, notes: list[str]) -> _BlockResult:
    """Map one block: Post-LN if its output is a norm output, else the residual sum X + T1 + T2."""
    info = BlockInfo(index, name, "none", {}, [], None, None)
    calls = tr.by_name.get(name, [])
    if len(calls) != 1:
        return _BlockResult(info, False, f"block '{name}' ran {len(calls)} times in the traced "
                                         f"forward (expected once)")
    io = _block_io(calls[0])
    if io is None:
        return _BlockResult(info, False, f"block '{name}' has no floating input with an output of "
                                         f"the same shape")
    xp, yp = io
    info.points["resid"] = xp.point
    res = _BlockResult(info, False, x=xp, y=yp)
    inner = tr.within(calls[0].start, calls[0].end)
    if not inner:
        res.why = (f"block '{name}': no submodule ran inside it (a fused fast path such as "
                   f"nn.TransformerEncoderLayer's?)")
        return res
    once = [c for c in inner if tr.count[c.name] == 1]  # a hook on a shared module fires twice
    shape = xp.t.shape
    norms = [c for c in inner if _is_norm(c.module)]
    dnorms = [(c, _norm_io(c, shape)) for c in norms if tr.count[c.name] == 1]
    blk = _Block(index, calls[0], xp, yp, inner,
                 outs=_shaped([p for c in once for p in c.out_points()], shape),
                 ins=_shaped([p for c in once for p in c.in_points()], shape),
                 norms=norms, dnorms=[(c, io) for c, io in dnorms if io is not None],
                 tol=_tol(calls[0].dtype))

    found = _match_post(blk)
    if found is not None:
        n1, nl, t1, t2 = found
        info.placement = "post"
        res.norm_calls = {"norm.post_attn": n1, "norm.post_mlp": nl}
        mid = next(io for c, io in blk.dnorms if c is n1)[1]
        ranges = (blk.call.start, t1.seq), (n1.end, t2.seq)
        info.points.update(resid_mid=mid.point, attn_out=t1.point, attn_raw=t1.point,
                           mlp_out=t2.point, mlp_raw=t2.point)
    else:
        pair = _match_sum(blk)
        if pair is None:
            res.why = (f"block '{name}': its output is neither a norm output (Post-LN) nor X + T1 + T2 "
                       f"for two module outputs T1, T2 inside it (norms in block: "
                       f"{', '.join(c.name for c in norms) or 'none'})")
            return res
        t1, t2 = pair
        ranges = (blk.call.start, t1.seq), (t1.seq, t2.seq)
        _label_sum_block(blk, t1, t2, ranges, res, notes)
    _label_sublayers(blk, ranges, res, tr, notes)
    if len(once) < len(inner):
        shared = sorted({c.name for c in inner if tr.count[c.name] > 1})
        notes.append(f"block {index}: modules that ran more than once were not used as hook "
                     f"points: {', '.join(shared)}")
    res.mapped = True
    return res


def _label_sum_block(blk: _Block, t1: _Pt, t2: _Pt, ranges, res: _BlockResult,
                     notes: list[str]) -> None:
    """Norm roles, placement and the remaining points of a block with Y = X + T1 + T2: output norms
    produce T1 / T2 (their inputs are *_raw), a pre-attention norm reads X, a pre-MLP norm reads
    X + T1 (= resid_mid), or X in a parallel block."""
    info, index = res.info, blk.index
    attn_range, mlp_range = ranges
    X = blk.x.t
    xt1 = X + t1.t                                                     # (B, T, D)
    atol, atol1 = blk.atol(), blk.atol(t1.t, xt1)
    roles: dict[str, tuple[_Call, tuple[_Pt, _Pt]]] = {}
    for c, (ni, no) in blk.dnorms:  # later matches win: the outermost norm
        if _in_range(c, attn_range) and _close(no.t, t1.t, atol1):
            roles["norm.post_attn"] = (c, (ni, no))
        elif _in_range(c, mlp_range) and _close(no.t, t2.t, blk.tol * max(_amax(t2.t), 1e-30)):
            roles["norm.post_mlp"] = (c, (ni, no))
    for c, (ni, no) in blk.dnorms:
        if any(c is r[0] for r in roles.values()):
            continue
        if _in_range(c, attn_range) and _close(ni.t, X, atol) and "norm.pre_attn" not in roles:
            roles["norm.pre_attn"] = (c, (ni, no))
        elif _in_range(c, mlp_range) and _close(ni.t, xt1, atol1) and "norm.pre_mlp" not in roles:
            roles["norm.pre_mlp"] = (c, (ni, no))
        elif _close(ni.t, X, atol) and "norm.pre_mlp" not in roles and "norm.pre_attn" in roles:
            roles["norm.pre_mlp"] = (c, (ni, no))
            notes.append(f"block {index}: parallel attention/MLP block; the pre-MLP norm "
                         f"'{c.name}' reads the block input; resid_mid does not exist")
    res.norm_calls = {r: v[0] for r, v in roles.items()}

    present = set(roles)
    mlp_ins = [p for p in blk.ins if mlp_range[0] < p.seq <= mlp_range[1]]
    if ("norm.pre_attn" in roles and "norm.pre_mlp" not in roles
            and not any(_close(p.t, xt1, atol1) for p in mlp_ins)
            and any(_close(p.t, roles["norm.pre_attn"][1][1].t, atol) for p in mlp_ins)):
        present.add("norm.pre_mlp")  # parallel block: the one pre-norm feeds both sublayers
        notes.append(f"block {index}: parallel attention/MLP block; the pre-attention norm "
                     f"'{roles['norm.pre_attn'][0].name}' also feeds the MLP; resid_mid does not exist")
    info.placement = _placement(present)
    info.points.update(attn_out=t1.point, mlp_out=t2.point)
    # *_raw: the output norm's input; without an output norm the branch output itself
    out_attn, out_mlp = roles.get("norm.post_attn"), roles.get("norm.post_mlp")
    info.points["attn_raw"] = t1.point if out_attn is None else out_attn[1][0].point
    info.points["mlp_raw"] = t2.point if out_mlp is None else out_mlp[1][0].point

    pre_mlp = roles.get("norm.pre_mlp")
    if pre_mlp is not None and _close(pre_mlp[1][0].t, xt1, atol1):
        info.points["resid_mid"] = pre_mlp[1][0].point
        return
    # no pre-MLP norm (Output-LN): the first module input after the attention that carries X + T1
    mid = next((p for p in sorted(blk.ins, key=lambda p: p.seq)
                if p.seq > t1.seq and _close(p.t, xt1, atol1)), None)
    if mid is not None:
        info.points["resid_mid"] = mid.point
    elif not any(n.startswith(f"block {index}: parallel") for n in notes):
        notes.append(f"block {index}: no hook point carries X + attn_out (resid_mid not found)")


def _label_sublayers(blk: _Block, ranges, res: _BlockResult, tr: _Trace, notes: list[str]) -> None:
    """Projections, mlp_act and parameter roles from the modules that ran inside each sublayer:
    the last Linear-like module writing back to width D is the out projection, the others are
    qkv / in; norms in the attention sublayer without a residual role are QK-norms."""
    info, index, width = res.info, blk.index, blk.x.t.shape[-1]
    attn_range, mlp_range = ranges
    for rng, kind in ((attn_range, "attn"), (mlp_range, "mlp")):
        calls = [c for c in blk.inner if _in_range(c, rng)]
        lins = sorted(_outermost_linears(calls), key=lambda c: c.end)
        # the last projection writes back to the residual width (a MoE router does not)
        last = next((c for c in reversed(lins) if c.outs and c.outs[0][1].shape[-1] == width), None)
        for c in lins:
            other = "qkv" if kind == "attn" else "in"
            res.module_roles[c.name] = f"{kind}.{'out' if c is last else other}"
        if kind == "attn":
            info.attn_out_proj = None if last is None else last.name
            res.mha = [c.name for c in calls if isinstance(c.module, nn.MultiheadAttention)]
            if not any(_is_attention(c.module) for c in calls):
                notes.append(f"block {index}: no attention module (class named *Attention*/*attn* "
                             f"or nn.MultiheadAttention) ran in the first sublayer")
            continue
        info.mlp_out_proj = None if last is None else last.name
        if last is not None and tr.count[last.name] == 1 and last.in_points():
            info.points["mlp_act"] = last.in_points()[0].point
        else:
            notes.append(f"block {index}: mlp_act not found: no Linear-like projection back to "
                         f"width {width} ran (once) in the MLP sublayer")
    assigned = {c.name for c in res.norm_calls.values()}
    for c in blk.norms:
        if c.name in assigned:
            continue
        if _in_range(c, attn_range):
            res.module_roles[c.name] = "attn.qk_norm"
        else:
            notes.append(f"block {index}: norm '{c.name}' has no residual-stream role")
    if info.placement == "none":
        notes.append(f"block {index}: no norm module on the residual path (functional norms such as "
                     f"F.layer_norm are invisible to hooks); pass placement= if this is wrong")


def _in_range(c: _Call, rng: tuple[int, int]) -> bool:
    return rng[0] < c.start and c.end <= rng[1]


def _placement(roles: set[str]) -> str:
    pre = {"norm.pre_attn", "norm.pre_mlp"}
    out = {"norm.post_attn", "norm.post_mlp"}
    if not roles:
        return "none"
    if roles == pre:
        return "pre"
    if roles == out:
        return "output"
    if roles == pre | out:
        return "peri"
    return "mixed"


def _match_sum(blk: _Block) -> tuple[_Pt, _Pt] | None:
    """(T1, T2) with X + T1 + T2 == Y, T1's module finished before T2's started. Among equal-valued
    candidates the one that finishes LAST wins: the outermost module, after dropout, which is the
    tensor actually added to the stream in training mode."""
    X, Y = blk.x.t, blk.y.t                                            # (B, T, D)
    for t2 in sorted(blk.outs, key=lambda p: p.seq, reverse=True):
        rest = Y - X - t2.t                                            # (B, T, D)
        atol = blk.atol(t2.t)
        for t1 in sorted((p for p in blk.outs if p.seq < t2.call.start), key=lambda p: p.seq,
                         reverse=True):
            if _close(t1.t, rest, atol):
                return t1, t2
    return None


def _match_post(blk: _Block) -> tuple[_Call, _Call, _Pt, _Pt] | None:
    """(norm1, norm_last, T1, T2) of a Post-LN block: Y = norm_last(norm1(X + T1) + T2)."""
    X, Y = blk.x.t, blk.y.t                                            # (B, T, D)
    last = [(c, io) for c, io in blk.dnorms if _close(io[1].t, Y, blk.tol * max(_amax(Y), 1e-30))]
    if not last:
        return None
    nl, (nl_in, _) = max(last, key=lambda v: v[0].end)
    for n1, (n1_in, n1_out) in sorted(blk.dnorms, key=lambda v: v[0].start):
        if n1.end >= nl.start:
            break
        for t1 in sorted((p for p in blk.outs if p.seq < n1.start), key=lambda p: p.seq,
                         reverse=True):
            if not _close(n1_in.t, X + t1.t, blk.atol(t1.t, n1_in.t)):
                continue
            for t2 in sorted((p for p in blk.outs if n1.end < p.seq < nl.start),
                             key=lambda p: p.seq, reverse=True):
                if _close(nl_in.t, n1_out.t + t2.t, blk.atol(n1_out.t, t2.t, nl_in.t)):
                    return n1, nl, t1, t2
    return None


# ----------------------------------------------------------------------------- discover


def discover(model: nn.Module, example_input: Any = None, *, blocks: str | None = None,
             placement: str | None = None) -> ModelMap:
    """Map `model` (bare, DDP/FSDP-wrapped or torch.compile'd) from one traced forward.

    example_input: a tensor, a tuple of positional args or a dict of kwargs; by default token ids
    (1, 8) for models with a vocabulary or a float (1, 8, d) sequence for embedding-free stacks.
    blocks: dotted path of the module list holding the blocks (default: the ModuleList/Sequential
    of identical blocks with the most parameters). placement: force this label on every block
    (what can be mapped still is). Raises DiscoveryError when the model cannot be mapped.
    The trace leaves parameters, buffers, training flags and the RNG state unchanged."""
    if placement is not None and placement not in PLACEMENTS:
        raise DiscoveryError(f"placement='{placement}' is not one of {', '.join(PLACEMENTS)}")
    root = unwrap(model)
    blocks_path, block_list = _find_blocks(root, blocks)
    # the trace needs a forward that records autograd like training does: leave inference mode
    with torch.inference_mode(False):
        args, kwargs = _example_inputs(root, example_input)
        try:
            tr = _run_trace(root, args, kwargs)
        except Exception as err:
            if example_input is not None:
                raise
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            raise DiscoveryError(
                f"the traced forward of {type(root).__name__} failed on the automatic example input "
                f"{shapes} {sorted(kwargs)}: {type(err).__name__}: {err}. Pass example_input= (a "
                f"tensor, a tuple of args or a dict of kwargs that its forward accepts).") from err

    notes: list[str] = []
    results = [_map_block(i, n, tr, notes) for i, (n, _) in enumerate(block_list)]
    failed = [r for r in results if not r.mapped]
    if failed and (placement is None or all(r.x is None for r in results)):
        raise DiscoveryError(
            f"cannot map the residual structure of {type(root).__name__} (blocks='{blocks_path}', "
            f"{len(block_list)} x {type(block_list[0][1]).__name__}): {failed[0].why}. "
            f"Module lists found: {_describe_lists(root)}; norms found: {_describe_norms(root)}. "
            f"Pass blocks='...' if these are not the Transformer blocks, or placement='pre'|'post'|"
            f"'peri'|'output'|'none' to label the blocks and map only what can be mapped.")
    for r in failed:
        notes.append(f"{r.why}; only resid mapped")
    x0, y_last = results[0].x, results[-1].y
    if x0 is None or y_last is None:
        raise DiscoveryError(f"cannot find the input of block 0 or the output of the last block of "
                             f"{type(root).__name__}; pass example_input= matching its forward")
    d_model = x0.t.shape[-1]

    first_call, last_call = tr.by_name[block_list[0][0]][0], tr.by_name[block_list[-1][0]][0]
    after = [c for c in tr.calls if c.start > last_call.end and tr.count[c.name] == 1]
    outside = _outside_norms(tr, first_call, last_call, x0, y_last)
    norm_infos = _norm_infos(root, results, outside, first_call.dtype, notes)
    embed, head = _embed_and_head(root, block_list, after, outside.get("norm.final"))
    param_roles = _param_roles(root, block_list, results, norm_infos, embed, head)

    block_infos = [r.info for r in results]
    if placement is not None:
        for b in block_infos:
            b.placement = placement
        notes.append(f"placement forced to '{placement}' by the caller")
    common = {b.placement for b in block_infos}
    final = outside["norm.final"][1].point if "norm.final" in outside else None
    if final is None:
        notes.append("no final norm found after the last block (site final not mapped)")
    return ModelMap(
        model_class=type(root).__name__, d_model=int(d_model), n_layers=len(block_infos),
        blocks_path=blocks_path, blocks=block_infos,
        placement=common.pop() if len(common) == 1 else "mixed",
        resid_out=y_last.point, final=final,
        embed=embed[0] if embed else None, norms=norm_infos, param_roles=param_roles, notes=notes,
    )


def _outside_norms(tr: _Trace, first_call: _Call, last_call: _Call, x0: _Pt, y_last: _Pt
                   ) -> dict[str, tuple[_Call, _Pt]]:
    """{"norm.embed": (call, output), "norm.final": (call, output)} for those found: the last norm
    before block 0 whose output is block 0's input; the first norm after the last block whose
    input is its output."""
    tol = _tol(first_call.dtype)
    found: dict[str, tuple[_Call, _Pt]] = {}
    for c in tr.calls:
        if tr.count[c.name] != 1 or not _is_norm(c.module):
            continue
        if c.end < first_call.start:
            io = _norm_io(c, x0.t.shape)
            if io and _close(io[1].t, x0.t, tol * max(_amax(x0.t), 1e-30)):
                found["norm.embed"] = (c, io[1])
        elif c.start > last_call.end and "norm.final" not in found:
            io = _norm_io(c, y_last.t.shape)
            if io and _close(io[0].t, y_last.t, tol * max(_amax(y_last.t), 1e-30)):
                found["norm.final"] = (c, io[1])
    return found


def _norm_infos(root: nn.Module, results: list[_BlockResult], outside: dict,
                dtype: torch.dtype | None, notes: list[str]) -> list[NormInfo]:
    """NormInfo of every residual norm in execution order (embed, blocks, final), with kind and
    gain offset fitted from its traced input/output; block norms also go to their BlockInfo."""
    low = dtype in (torch.float16, torch.bfloat16)
    pname = {id(p): n for n, p in root.named_parameters()}
    role_calls = [(-1, "norm.embed", outside["norm.embed"][0])] if "norm.embed" in outside else []
    for r in results:
        role_calls += sorted(((r.info.index, role, c) for role, c in r.norm_calls.items()),
                             key=lambda v: v[2].start)
    if "norm.final" in outside:
        role_calls.append((-1, "norm.final", outside["norm.final"][0]))
    infos = []
    for layer, role, c in role_calls:
        ni, no = c.io()
        kind, offset = _fit_norm(ni.t, no.t, c.module, low)
        weight, bias = _norm_params(c.module)
        assert role in NORM_ROLES, role
        info = NormInfo(c.name, role, layer, kind, offset,
                        None if weight is None else pname.get(id(weight)),
                        None if bias is None else pname.get(id(bias)))
        infos.append(info)
        if layer >= 0:
            results[layer].info.norms.append(info)
        if kind == "unknown":
            notes.append(f"norm '{c.name}': output fits neither LayerNorm nor RMSNorm of its input")
    return infos


def _embed_and_head(root: nn.Module, block_list, after: list[_Call], final
                    ) -> tuple[list[str], list[str]]:
    """(embedding modules outside the blocks, token embedding first; lm-head modules)."""
    prefixes = tuple(n + "." for n, _ in block_list)
    embs = [(n, m) for n, m in root.named_modules()
            if isinstance(m, nn.Embedding) and not n.startswith(prefixes)]
    token = next((n for n, m in embs if n.rsplit(".", 1)[-1] in _TOKEN_EMBED_NAMES), None)
    if token is None and embs:
        token = max(embs, key=lambda v: v[1].weight.numel())[0]
    embed = ([token] if token else []) + [n for n, _ in embs if n != token]
    vocab = getattr(getattr(root, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) and token is not None:
        vocab = root.get_submodule(token).num_embeddings
    head = []
    if isinstance(vocab, int):
        start = final[0].end if final is not None else -1
        for c in _outermost_linears(after):
            outs = c.out_points()
            if c.start > start and outs and outs[0].t.shape[-1] == vocab:
                head.append(c.name)
    return embed, head


def _param_roles(root: nn.Module, block_list, results: list[_BlockResult],
                 norm_infos: list[NormInfo], embed: list[str], head: list[str]) -> dict[str, dict]:
    """Full parameter name (as root.named_parameters() gives it; tied weights once) ->
    {"role", "layer"}."""
    names = {id(p): n for n, p in root.named_parameters()}
    layer_of = {}
    for i, (bname, bmod) in enumerate(block_list):
        for p in bmod.parameters():
            layer_of.setdefault(id(p), i)
    roles = {n: {"role": "other", "layer": layer_of.get(id(p), -1)}
             for n, p in root.named_parameters()}

    def assign(module_path: str, role: str, overwrite: bool = True) -> None:
        for p in root.get_submodule(module_path).parameters():
            n = names.get(id(p))
            if n is not None and (overwrite or roles[n]["role"] == "other"):
                roles[n]["role"] = role

    for r in results:
        for path, role in r.module_roles.items():
            assign(path, role)
        for path in r.mha:
            mha = root.get_submodule(path)
            for pn, p in mha.named_parameters():
                n = names.get(id(p))
                if n is not None:
                    roles[n]["role"] = "attn.out" if pn.startswith("out_proj.") else "attn.qkv"
    for info in norm_infos:
        assign(info.name, info.role)
    for path in embed:
        assign(path, "embed")
    for path in head:
        assign(path, "head", overwrite=False)  # a head tied to the embedding keeps "embed"
    return roles


def _ranges(values: list[int]) -> str:
    if not values:
        return "-"
    if values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}" if len(values) > 1 else str(values[0])
    return ",".join(map(str, values))
