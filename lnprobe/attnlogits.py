"""Output and attention logits: the opt-in sites ``logits`` (the head's output) and ``attn_logits``
(each block's attention scores), recorded on scheduled steps.

    probe = lnprobe.attach(model, "runs/x", logits=True, attn_logits=True)

Definitions (registry kinds ``logits`` and ``attn_logits``, ``lnprobe.stats.REGISTRY``):

- ``logits`` (layer L), z the model's output logits flattened to ``(N, V)`` tokens × vocabulary:
  ``logit_rms`` = sqrt(mean z²) over all elements; ``logit_absmax`` = max |z| with its token
  (sequence position) and channel (vocabulary index); ``lse_mean`` = mean over tokens of
  log Σ_v exp(z_v), the log-partition log Z that z-loss penalises (theory §5).
- ``attn_logits`` (layer l = block index), per attention call s_ij = (q_i · k_j) · scale with q, k the
  per-head query and key vectors the model multiplies (after rotary embeddings and any QK-norm) and
  scale the model's own (1/sqrt(d_h) unless the model passes another): ``qk_absmax`` = max |s_ij|
  over the pairs the mask lets a query attend to, with the query's position in ``token`` and the
  (query) head in ``channel``; ``entropy`` = mean over queries and heads of −Σ_j p_ij log p_ij,
  p_i = softmax over j of (s_ij [soft-capped when the model soft-caps] + the additive mask). A query
  with no key to attend to is left out of the mean. Masks: a causal call without a mask tensor uses
  SDPA's top-left causal mask (j ≤ i); a boolean mask is True where attention is allowed; a float mask
  is added to the scores, and a pair is masked where it holds less than half the dtype's minimum.

Measurement points. ``logits``: a forward hook on the (unwrapped) model itself, reading its output
(a tensor, the first tensor of a tuple, or ``.logits`` of a Hugging Face ModelOutput).
``attn_logits``: for the reference GPT (``lnprobe.models``), a forward pre-hook on each block's
``attn.sdpa`` (:class:`lnprobe.models.DotProductAttention`), which receives q, k, v; for Hugging Face
models, their attention-function interface (``lnprobe.integrations.hf_attention``): the function the
model's ``config._attn_implementation`` names is wrapped while the probe is attached, so the hook
sees exactly the query and key states the model passes to its kernel (after rotary embeddings).
Grouped-query attention: key heads are repeated to the query heads, as the kernels do.

Cost. The fused attention kernels never form QKᵀ, so ``attn_logits`` computes it again, in float32:
an extra (B, H, T, S) matmul, softmax and a few element-wise passes per layer on recorded steps,
chunked over the batch so that a chunk holds at most ``CHUNK_ELEMENTS`` scores. That is why both
sites are opt-in. Off schedule a hook returns after one Python test (no extra matmul; checked by
tests/test_attn_logits.py). Forwards re-run inside backward (activation checkpointing) are skipped.
No host synchronisation: every value, location and count stays a device tensor until the flush.
Gradient accumulation: the forwards of one step merge (max of maxima, sums of sums).

QK-norm gains. With ``attn_logits`` the probe also writes ``gain_absmax`` (max |γ|, the registry's
``norm`` row) of every QK-norm gain (parameter role ``attn.qk_norm``) of a torch ``nn.LayerNorm`` /
``nn.RMSNorm``, whose effective gain is its weight, on ``param:<name>`` at recorded steps: the
numbers theory §5's bound sqrt(d_h)·max|γ_q|·max|γ_k| needs (checked in the report's verdicts).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import stats as S
from . import traced
from .runtime import compiling, in_backward

LOGIT_STATS: tuple[str, ...] = S.LOGIT_STATS  # ("logit_rms", "logit_absmax", "lse_mean")
ATTN_LOGIT_STATS: tuple[str, ...] = S.ATTN_LOGIT_STATS  # ("qk_absmax", "entropy")
#: The most scores (or logits) one chunk of the reduction holds in float32 (64 MiB each).
CHUNK_ELEMENTS = 1 << 24
# A partial is a float64 vector (5,): logits [Σz², Σ lse, absmax, token, channel];
# attention [qk_absmax, token, head, Σ entropy, queries counted].
_LOGIT_SUM_COLS, _ATTN_SUM_COLS = (0, 1), (3, 4)


# ----------------------------------------------------------------------------------- reductions
def logit_partial(z: torch.Tensor) -> torch.Tensor:
    """Σz², Σ_tokens log Σ_v exp(z), max |z| and its (token, channel) of logits ``z`` (..., T, V), as
    a float64 device vector (5,). Float32 arithmetic per chunk of rows, float64 sums."""
    T, V = (z.shape[-2] if z.dim() > 1 else 1), z.shape[-1]
    flat = z.detach().reshape(-1, V)  # (N, V)
    rows = max(1, CHUNK_ELEMENTS // max(V, 1))
    parts = []
    for r0 in range(0, flat.shape[0], rows):
        zc = flat[r0: r0 + rows].float()  # (n, V)
        sq = zc.square().sum(dtype=torch.float64)
        lse = torch.logsumexp(zc, -1).sum(dtype=torch.float64)
        mn, mx = torch.aminmax(zc, dim=-1)  # (n,) each
        row_abs = torch.maximum(mx, -mn)  # (n,) NaN-propagating
        r = row_abs.argmax().reshape(1)  # NaN ranks first, as in torch.topk
        chan = zc.index_select(0, r).abs().argmax(-1)  # (1,)
        tok = (r + r0) % T
        parts.append(torch.stack([sq, lse, row_abs.index_select(0, r)[0].double(), tok[0].double(),
                                  chan[0].double()]))
    return _merge(parts, _LOGIT_SUM_COLS, 2)


def attention_partial(q: torch.Tensor, k: torch.Tensor, scale: float | None = None, mask: torch.Tensor | None = None,
                      is_causal: bool = False, softcap: float | None = None) -> torch.Tensor:
    """qk_absmax with its (query token, head), Σ entropy and the number of queries counted, of one
    attention call, as a float64 device vector (5,) (definitions in the module docstring).

    ``q`` (B, H, T, Dh), ``k`` (B, Hk, S, Dh) with H a multiple of Hk; ``scale`` default 1/sqrt(Dh);
    ``mask`` broadcastable to (B, H, T, S) (bool: True = attend; float: additive); ``is_causal`` applies
    the top-left causal mask when ``mask`` is None and T > 1; ``softcap`` c maps s to c·tanh(s/c)
    before the softmax (qk_absmax is of s before the cap).
    """
    B, H, T, Dh = q.shape
    S_ = k.shape[-2]
    q, k = q.detach(), k.detach()
    if k.shape[1] != H:  # grouped-query attention: each key head serves H / Hk query heads
        k = k.repeat_interleave(H // k.shape[1], dim=1)  # (B, H, S, Dh)
    scale = 1.0 / math.sqrt(Dh) if scale is None else float(scale)
    allowed = bias = None
    if mask is not None:
        mask = mask.detach()[..., :S_]
        if mask.dtype == torch.bool:
            allowed = mask
        else:
            allowed = mask > torch.finfo(mask.dtype).min / 2
            bias = mask.float()
        while allowed.dim() < 4:
            allowed, bias = allowed.unsqueeze(0), (None if bias is None else bias.unsqueeze(0))
    elif is_causal and T > 1:
        allowed = torch.ones(T, S_, dtype=torch.bool, device=q.device).tril()[None, None]  # (1, 1, T, S)
    masked = None if allowed is None else ~allowed  # (·, ·, T, S), small
    per = max(1, CHUNK_ELEMENTS // max(H * T * S_, 1))  # batch rows per chunk
    parts = []
    for b0 in range(0, B, per):
        b1 = min(B, b0 + per)
        s = torch.matmul(q[b0:b1].float(), k[b0:b1].float().transpose(-1, -2)).mul_(scale)  # (b, H, T, S)
        mk = None if masked is None else _rows(masked, b0, b1)
        a = s.abs()  # (b, H, T, S)
        if mk is not None:
            a.masked_fill_(mk, 0.0)
        idx = a.reshape(-1).argmax().reshape(1)  # NaN ranks first
        top = a.reshape(-1).index_select(0, idx)[0].double()
        del a
        z = softcap * torch.tanh(s / softcap) if softcap else s
        if bias is not None:
            z = z + _rows(bias, b0, b1)
        if mk is not None:
            z = z.masked_fill_(mk, float("-inf"))
        p = torch.softmax(z, -1)  # (b, H, T, S)
        del s, z
        ent = torch.special.entr(p, out=p).sum(-1)  # (b, H, T): −Σ p log p, 0·log 0 = 0
        if mk is None:
            counted = torch.full((), float(ent.numel()), dtype=torch.float64, device=ent.device)
        else:  # a query with no key to attend to (softmax NaN) is left out
            valid = (~mk).any(-1).expand_as(ent)  # (b, H, T)
            ent = torch.where(valid, ent, torch.zeros((), device=ent.device))
            counted = valid.sum(dtype=torch.float64)
        head = (idx // (T * S_)) % H
        tok = (idx // S_) % T
        parts.append(torch.stack([top, tok[0].double(), head[0].double(), ent.sum(dtype=torch.float64), counted]))
    return _merge(parts, _ATTN_SUM_COLS, 0)


def _rows(t: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
    """Batch rows b0:b1 of a mask broadcast over the batch (a batch dimension of 1 stays whole)."""
    return t if t.shape[0] == 1 else t[b0:b1]


def _merge(parts: list[torch.Tensor], sum_cols: tuple[int, ...], max_col: int) -> torch.Tensor:
    """Merge partials (5,): the columns ``sum_cols`` add up; the others (the maximum and its location)
    are those of the partial with the largest ``max_col`` (NaN ranks first)."""
    if len(parts) == 1:
        return parts[0]
    p = torch.stack(parts)  # (M, 5)
    best = p[:, max_col].argmax()
    out = p.index_select(0, best.reshape(1))[0].clone()
    for c in sum_cols:
        out[c] = p[:, c].sum()
    return out


def finalize_logits(partial: torch.Tensor, n_elements: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values (3,) in ``LOGIT_STATS`` order and locations (2, 3) (token, channel; NaN where none)."""
    nan = torch.full((), float("nan"), dtype=torch.float64, device=partial.device)
    values = torch.stack([(partial[0] / max(n_elements, 1)).sqrt(), partial[2], partial[1] / max(n_tokens, 1)])
    loc = torch.stack([torch.stack([nan, partial[3], nan]), torch.stack([nan, partial[4], nan])])
    return values, loc


def finalize_attention(partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values (2,) in ``ATTN_LOGIT_STATS`` order and locations (2, 2) (token, head)."""
    nan = torch.full((), float("nan"), dtype=torch.float64, device=partial.device)
    values = torch.stack([partial[0], partial[3] / partial[4]])
    loc = torch.stack([torch.stack([partial[1], nan]), torch.stack([partial[2], nan])])
    return values, loc


# ----------------------------------------------------------------------------------- observer
def output_logits(output: Any) -> torch.Tensor | None:
    """The logits in a model's output: the tensor itself, ``output["logits"]`` of a mapping (HF
    ModelOutput), or the first tensor of a tuple/list; None when there is none."""
    if torch.is_tensor(output):
        return output
    if hasattr(output, "keys") and "logits" in output.keys():
        value = output["logits"]
        return value if torch.is_tensor(value) else None
    if isinstance(output, (tuple, list)):
        return next((v for v in output if torch.is_tensor(v)), None)
    return None


def _has_logits(z: torch.Tensor | None) -> bool:
    return z is not None and z.is_floating_point() and z.dim() >= 1 and z.numel() > 0


def _qk_norm_gains(model: nn.Module, param_roles: dict) -> list[tuple[str, int, nn.Module]]:
    """(weight name, layer, module) of the QK-norm torch norm modules (their gain is their weight)."""
    out = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        info = param_roles.get(f"{name}.weight", {})
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and w is not None and info.get("role") == "attn.qk_norm":
            out.append((f"{name}.weight", int(info.get("layer", -1)), m))
    return out


class _Handle:
    """A removable hook handle for a callable ``remove``."""

    def __init__(self, remove: Callable[[], None]):
        self._remove = remove

    def remove(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None


class LogitObserver:
    """The hooks of the ``logits`` and ``attn_logits`` sites of one probe and their open-step partials.

    ``handles`` are the registered hooks (the probe removes them at close); ``step_rows(step, layout)``
    returns the open step's rows as a ``lnprobe.steprows.StepRows`` (None when nothing was seen);
    ``clear()`` drops them for the next step; ``sites`` and ``stats`` go into meta.json.
    """

    def __init__(self, model: nn.Module, model_map: Any, is_on: Callable[[], bool], notes: list[str],
                 logits: bool = False, attn_logits: bool = False):
        self.is_on, self.notes = is_on, notes
        self.n_layers = model_map.n_layers
        self.handles: list[Any] = []
        self._logit_parts: list[torch.Tensor] = []
        self._logit_counts = [0, 0]  # elements, tokens
        self._attn_parts: dict[int, list[torch.Tensor]] = {}
        self._attn_rows: dict[int, int] = {}  # layer -> queries × heads seen (host, the cross-rank weight)
        self._failed: set[str] = set()
        self._qk_gains: list[tuple[str, int, nn.Module]] = []  # (weight name, layer, norm module)
        self.sites: list[str] = []
        # traced hooks (torch.compile) deliver their partials to ``receive`` (lnprobe.traced)
        self.key = traced.register(self.receive)
        key = self.key
        self.handles.append(_Handle(lambda: traced.unregister(key)))
        if logits:
            self.handles.append(model.register_forward_hook(self._logits_hook))
            self.sites.append("logits")
        if attn_logits:
            n = self._attach_attention(model, model_map)
            if n:
                self.sites.append("attn_logits")
                self._qk_gains = _qk_norm_gains(model, model_map.param_roles)
            else:
                notes.append("attn_logits not recorded: no lnprobe.models.DotProductAttention module and no Hugging "
                             "Face attention interface (config._attn_implementation) in the blocks")
        self.stats = {site: list(LOGIT_STATS if site == "logits" else ATTN_LOGIT_STATS) for site in self.sites}

    # -- hooks
    def _attach_attention(self, model: nn.Module, model_map: Any) -> int:
        from .models import DotProductAttention

        modules = dict(model.named_modules())
        layer_of: dict[int, int] = {}  # id(submodule of a block) -> block index
        found = 0
        for block in model_map.blocks:
            root = modules.get(block.name)
            if root is None:
                continue
            for m in root.modules():
                layer_of.setdefault(id(m), block.index)
                if isinstance(m, DotProductAttention):
                    self.handles.append(m.register_forward_pre_hook(self._sdpa_hook(block.index)))
                    found += 1
        if found:
            return found
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if getattr(model, "config", None) is None or not hasattr(model.config, "_attn_implementation"):
            return 0
        from .integrations import hf_attention

        handle = hf_attention.observe(impl, layer_of, self._hf_call)
        if handle is None:
            return 0
        self.handles.append(handle)
        return len(model_map.blocks)

    def _sdpa_hook(self, layer: int):
        def sdpa_pre_hook(module, args):
            if self.is_on() and len(args) >= 2:
                self._attention(layer, args[0], args[1], None, getattr(module, "scaling", None),
                                getattr(module, "is_causal", True), None)
            return None

        return sdpa_pre_hook

    def _hf_call(self, layer: int, module: nn.Module, query, key, mask, scaling, is_causal, softcap) -> None:
        if self.is_on():
            if scaling is None:
                scaling = getattr(module, "scaling", None)
            self._attention(layer, query, key, mask, scaling, is_causal, softcap)

    def _logits_hook(self, module, args, output):
        if not self.is_on() or "logits" in self._failed:
            return None
        if compiling():  # traced into the model's graph: the partial comes back through ``receive``
            z = output_logits(output)
            if _has_logits(z):
                torch.ops.lnprobe.deliver(self.key, -1, "logits", [logit_partial(z)],
                                          [z.numel(), z.numel() // z.shape[-1]])
            return None
        if in_backward():
            return None
        try:
            z = output_logits(output)
            if _has_logits(z):
                self._file_logits(logit_partial(z), z.numel(), z.numel() // z.shape[-1])
        except Exception as exc:
            self._fail("logits", exc)
        return None

    def _attention(self, layer, q, k, mask, scaling, is_causal, softcap) -> None:
        if "attn_logits" in self._failed or not (torch.is_tensor(q) and torch.is_tensor(k)) or q.dim() != 4:
            return
        rows = q.shape[0] * q.shape[1] * q.shape[2]
        mask = mask if torch.is_tensor(mask) else None
        if compiling():  # traced: a recompute of activation checkpointing is the compiler's own
            part = attention_partial(q, k, scaling, mask, bool(is_causal), softcap)
            torch.ops.lnprobe.deliver(self.key, layer, "attn_logits", [part], [rows])
        elif not in_backward():
            try:
                self._file_attention(layer, attention_partial(q, k, scaling, mask, bool(is_causal), softcap), rows)
            except Exception as exc:
                self._fail("attn_logits", exc)

    def receive(self, layer: int, site: str, tensors: list[torch.Tensor], sizes: list[int]) -> None:
        """Run time of a compiled graph: file a partial that a traced hook computed (``lnprobe.traced``)."""
        if site in self._failed:
            return
        try:
            if site == "logits":
                self._file_logits(tensors[0], sizes[0], sizes[1])
            else:
                self._file_attention(layer, tensors[0], sizes[0])
        except Exception as exc:  # raised inside the compiled graph's run: it must not reach training
            self._fail(site, exc)

    def _file_logits(self, part: torch.Tensor, n_elem: int, n_tok: int) -> None:
        self._logit_parts.append(part)
        self._logit_counts[0] += n_elem
        self._logit_counts[1] += n_tok

    def _file_attention(self, layer: int, part: torch.Tensor, rows: int) -> None:
        self._attn_parts.setdefault(layer, []).append(part)
        self._attn_rows[layer] = self._attn_rows.get(layer, 0) + rows

    def _fail(self, site: str, exc: Exception) -> None:
        self._failed.add(site)
        self.notes.append(f"{site} disabled after {type(exc).__name__}: {exc}")
        warnings.warn(f"lnprobe: {site} disabled after {type(exc).__name__}: {exc}; training continues",
                      RuntimeWarning, stacklevel=2)

    # -- rows
    def step_rows(self, step: int, layout: Callable[[tuple], Any]):
        """The open step's rows (``StepRows``), None when no forward was seen."""
        from .steprows import StepRows

        values, locs, keys, weights = [], [], [], []
        if self._logit_parts:
            v, loc = finalize_logits(_merge(self._logit_parts, _LOGIT_SUM_COLS, 2), *self._logit_counts)
            values.append(v)
            locs.append(loc)
            for name in LOGIT_STATS:
                row = S.stat("logits", name)
                keys.append(("logits", self.n_layers, name))
                weights.append({"elements": self._logit_counts[0], "tokens": self._logit_counts[1]}.get(row.weight, 1))
        for layer in sorted(self._attn_parts):
            v, loc = finalize_attention(_merge(self._attn_parts[layer], _ATTN_SUM_COLS, 0))
            values.append(v)
            locs.append(loc)
            for name in ATTN_LOGIT_STATS:
                row = S.stat("attn_logits", name)
                keys.append(("attn_logits", layer, name))
                weights.append(self._attn_rows[layer] if row.weight == "tokens" else 1)
        kinds = [S.stat("logits" if k[0] == "logits" else "attn_logits", k[2]).merge_code for k in keys]
        if self._qk_gains and values:
            from .runtime import local_shard

            # read afresh: FSDP2 swaps the parameter objects between sharded and unsharded states
            ws = [local_shard(m.weight.detach()) for _, _, m in self._qk_gains]
            values.append(torch.stack(torch._foreach_norm(ws, float("inf"))).double().to(values[0].device))  # (G,)
            locs.append(torch.full((2, len(ws)), float("nan"), dtype=torch.float64, device=values[0].device))
            row = S.stat("norm", "gain_absmax")
            keys += [(f"param:{name}", layer, "gain_absmax") for name, layer, _ in self._qk_gains]
            weights += [1] * len(ws)
            kinds += [row.merge_code] * len(ws)
        if not values:
            return None
        dev = values[0].device
        return StepRows(step, torch.cat([v.to(dev) for v in values]), torch.cat([lc.to(dev) for lc in locs], 1),
                        layout(tuple(keys)), np.asarray(weights, dtype=np.float64), np.asarray(kinds, dtype=np.int8))

    def clear(self) -> None:
        """Drop the open step's partials."""
        self._logit_parts.clear()
        self._logit_counts = [0, 0]
        self._attn_parts.clear()
        self._attn_rows.clear()

    @property
    def held(self) -> list[torch.Tensor]:
        """The partial tensors held now (for ``Probe.held_bytes``)."""
        return self._logit_parts + [t for parts in self._attn_parts.values() for t in parts]
