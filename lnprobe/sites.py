"""The vocabulary of lnprobe: site names, parameter and norm roles, placements, and the data types
that model discovery (`lnprobe.discovery.discover`) returns.

Site names and their meaning are those of the design page: at layer l, `resid` is the residual
stream entering block l (resid L = output of the last block), `resid_mid` the stream between the
attention and the next sublayer (X + attn_out), `attn_out` / `mlp_out` what each sublayer adds to
the stream, `attn_raw` / `mlp_raw` the sublayer output before its output norm (equal to *_out when
there is none), `mlp_act` the input of the MLP's last projection, and `final` the output of the
final norm (layer L).

A decoder block of an encoder–decoder has a third sublayer between the two, the cross-attention
(`SUBLAYERS`): `xattn_out` / `xattn_raw` are its branch output as above, and `resid_xattn` is the
stream after it, entering the MLP (X + attn_out + xattn_out); `resid_mid` stays X + attn_out. The
stacks of such a model (`StackInfo`) are numbered globally in forward order: encoder blocks
0..Le-1, decoder blocks Le..Le+Ld-1.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = [
    "ALL_SITES",
    "BLOCK_SITES",
    "LOGIT_SITES",
    "NORM_ROLES",
    "PARAM_ROLES",
    "PLACEMENTS",
    "BlockInfo",
    "DiscoveryError",
    "HookPoint",
    "ModelMap",
    "NormInfo",
    "SUBLAYERS",
    "SiteKey",
    "StackInfo",
]

ALL_SITES: tuple[str, ...] = ("resid", "resid_mid", "attn_out", "mlp_out", "attn_raw", "mlp_raw", "mlp_act",
                              "resid_xattn", "xattn_out", "xattn_raw", "final")
# the sites inside a block (layers 0..L-1); `final` is at layer L only
BLOCK_SITES = tuple(s for s in ALL_SITES if s != "final")
SiteKey = tuple[str, int]  # (site, layer)
# the sublayers of a block in forward order, by their number: a Transformer block has two, a decoder
# block of an encoder–decoder three (self-attention, cross-attention reading the encoder, MLP); each
# kind names its sites (`<kind>_out`, `<kind>_raw`), norm roles and projection roles
SUBLAYERS: dict[int, tuple[str, ...]] = {2: ("attn", "mlp"), 3: ("attn", "xattn", "mlp")}
# opt-in sites read by lnprobe.attnlogits, not hook points of ALL_SITES: `logits` the head's output (layer
# L), `attn_logits` each block's attention scores q·kᵀ·scale (layer 0..L-1)
LOGIT_SITES: tuple[str, ...] = ("logits", "attn_logits")

PLACEMENTS = ("pre", "post", "peri", "output", "none", "mixed")
NORM_ROLES = (
    "norm.pre_attn", "norm.post_attn", "norm.pre_xattn", "norm.post_xattn", "norm.pre_mlp", "norm.post_mlp",
    "norm.embed", "norm.final",
)
# role of every parameter in ModelMap.param_roles: sublayer projections (xattn: a decoder's
# cross-attention), QK-norms, residual norms,
# embeddings, the lm head (a head tied to the embedding keeps "embed"), mixture-of-experts parts
# (router, experts, shared expert; lnprobe.discovery.moe), and "other"
PARAM_ROLES = (
    "embed", "attn.qkv", "attn.out", "attn.qk_norm", "xattn.qkv", "xattn.out",
    "mlp.in", "mlp.out", "mlp.router", "mlp.experts", "mlp.shared",
    *NORM_ROLES, "head", "other",
)


# (B, T) of the last 3-D tensor fetched by a hook point, per thread (see HookPoint.fetch)
_LAST = threading.local()


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
    flat: bool = False  # the tensor is (B·T, D) where the stream is (B, T, D) (OPT's MLP)

    def fetch(self, args: tuple, kwargs: dict | None, output: Any = None) -> torch.Tensor | None:
        """Pull this point's tensor out of a hook call: `args, kwargs` of the pre-hook (kind "in")
        or `args, kwargs, output` of the forward hook (kind "out"). None if absent.

        A `flat` point's (B·T, D) tensor is returned as a (B, T, D) view, B and T being those of
        the last 3-D tensor fetched on this thread (the block input, fetched before the sublayers
        of its block), so that token indices are sequence positions; it stays (B·T, D) when no
        such shape is known or it does not fit."""
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
        if not isinstance(value, torch.Tensor):
            return None
        if value.dim() == 3:
            _LAST.bt = (value.shape[0], value.shape[1])
        elif self.flat and value.dim() == 2:
            bt = getattr(_LAST, "bt", None)
            if bt is not None and bt[0] * bt[1] == value.shape[0]:
                value = value.view(bt[0], bt[1], value.shape[-1])
        return value

    def replace(self, args: tuple, kwargs: dict | None, output: Any, new: torch.Tensor) -> Any:
        """The hook call's values with this point's tensor replaced by ``new`` (for a traced
        hook's gradient tap, an identity of the tensor): ``(args, kwargs)`` for kind "in", the
        output for kind "out" — what a forward pre-hook / forward hook returns to substitute them.
        Not for ``flat`` points, whose fetched tensor is a reshaped view."""
        if self.kind == "in":
            if isinstance(self.arg, int):
                return args[: self.arg] + (new,) + args[self.arg + 1:], kwargs
            return args, {**(kwargs or {}), self.arg: new}
        if self.arg is None:
            return new
        if isinstance(output, Mapping):
            output[self.arg] = new  # the module's own fresh output object (a dict or HF ModelOutput)
            return output
        if isinstance(output, list):
            return output[: self.arg] + [new] + output[self.arg + 1:]
        if hasattr(output, "_fields"):  # a namedtuple keeps its type
            return output._replace(**{output._fields[self.arg]: new})
        return output[: self.arg] + (new,) + output[self.arg + 1:]

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
    xattn_out_proj: str | None = None  # decoder blocks of an encoder–decoder only


@dataclass
class StackInfo:
    """One stack of blocks of a model with several (an encoder–decoder): its name ("encoder",
    "decoder"), the dotted path of its block list, its first global layer and block count, and the
    placement of its blocks (their common one, else "mixed")."""

    name: str
    blocks_path: str
    first_layer: int
    n_layers: int
    placement: str

    def to_meta(self) -> dict:
        """The entry of meta.json's `map.stacks`: name, first_layer, n_layers, placement."""
        return {"name": self.name, "first_layer": self.first_layer, "n_layers": self.n_layers,
                "placement": self.placement}


@dataclass
class ModelMap:
    """Everything `discover` found; see `lnprobe.discovery` for how."""

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
    # several stacks (encoder, decoder), in forward order; empty for a model with one stack
    stacks: list[StackInfo] = field(default_factory=list)

    def site_points(self) -> dict[SiteKey, HookPoint]:
        """(site, layer) -> hook point for every site found: resid 0..L (L = output of the last
        block), the block sites 0..L-1 (the cross-attention's in decoder blocks only), final at L."""
        points: dict[SiteKey, HookPoint] = {}
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
        ]
        lines += [f"stack {s.name}: '{s.blocks_path}' layers "
                  f"{_ranges(list(range(s.first_layer, s.first_layer + s.n_layers)))} placement={s.placement}"
                  for s in self.stacks]
        lines += [
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
            lines.append(f"  {site:<11} layers {_ranges(sorted(layers))}")
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
            # meta.json `map.stacks` (absent for one stack): which global layers each stack holds
            **({"map": {"stacks": [s.to_meta() for s in self.stacks]}} if len(self.stacks) > 1 else {}),
        }


def _ranges(values: list[int]) -> str:
    if not values:
        return "-"
    if values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}" if len(values) > 1 else str(values[0])
    return ",".join(map(str, values))
