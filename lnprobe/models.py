"""Reference GPT with a switchable normalisation placement.

One decoder-only Transformer whose blocks can be wired as Pre-LN, Post-LN, Peri-LN, Output-LN only
(OLMo 2 style) or LN-scaled Pre-LN ("Curse of Depth"), so that the probe can compare placements on
otherwise identical models. Per block (``F`` = attention or MLP, applied in that order):

=========  ===================================================  =================================
placement  sublayer update                                      norms created per block
=========  ===================================================  =================================
pre        ``x = x + F(norm_in(x))``                            norm_attn_in, norm_mlp_in
post       ``x = norm_out(x + F(x))``                           norm_attn_out, norm_mlp_out
peri       ``x = x + norm_out(F(norm_in(x)))``                  all four
output     ``x = x + norm_out(F(x))``                           norm_attn_out, norm_mlp_out
lns        ``x = x + F(norm_in(x) / sqrt(l))``, l = 1-based     norm_attn_in, norm_mlp_in
=========  ===================================================  =================================

Every placement except ``post`` ends with ``final_norm`` before the head; ``post`` has none (its
last block already ends in a norm). ``emb_norm`` (norm of token + position embeddings) exists
only when ``config.embed_norm`` is true, which is the default for ``peri`` only. Modules that a
placement does not call are not created: the corresponding attributes are ``None``.

Attention: ``qkv`` → per-head q, k, v → optional QK-norm (``qk_norm``: a bias-free norm of the
configured kind over each head's d_h channels, one gain for q and one for k, applied before the dot
product, as in OLMo 2 / Wortsman et al. 2023) → ``attn.sdpa`` (:class:`DotProductAttention`, causal
softmax(q·kᵀ/sqrt(d_h))·v) → ``out``. ``attn.sdpa`` is a parameter-free submodule so that a forward
pre-hook sees the exact q and k the scores are made of (``lnprobe.attnlogits``); it leaves the
state dict unchanged.

Embeddings are learned absolute positions added to token embeddings. Initialisation: every
Linear and Embedding weight ~ N(0, init_std²), every bias 0, norm gains 1 and biases 0; with
``scaled_init`` the output projections ``attn.out`` and ``mlp.fc_out`` use
``init_std / sqrt(2 · n_layers)`` (GPT-2). With ``tied_head`` the head's weight *is* the token
embedding tensor.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "PRESETS", "config_from_preset", "GPT", "Block", "CausalSelfAttention", "DotProductAttention",
           "MLP"]

PLACEMENTS = ("pre", "post", "peri", "output", "lns")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned",)


def _swiglu_width(d_model: int) -> int:
    """8/3 · d_model rounded up to a multiple of 8 (keeps SwiGLU's parameter count ≈ a 4·d GELU MLP)."""
    return 8 * math.ceil(8 * d_model / 3 / 8)


@dataclass
class GPTConfig:
    """Shape and wiring of a :class:`GPT`.

    ``d_ff=None`` resolves in ``__post_init__`` to ``4 · d_model`` for ``mlp="gelu"`` and to
    ``8/3 · d_model`` rounded up to a multiple of 8 for ``mlp="swiglu"``; ``embed_norm=None``
    resolves to ``placement == "peri"``. Both are stored resolved, so ``to_dict()`` records the
    actual sizes. When deriving a config with ``dataclasses.replace`` and a different ``d_model``
    or ``mlp``, pass ``d_ff=None`` (and ``embed_norm=None``) again to re-resolve them.
    Invalid values raise ``ValueError``.
    """

    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int | None = None
    placement: str = "pre"
    norm: str = "layernorm"
    embed_norm: bool | None = None
    mlp: str = "gelu"
    init_std: float = 0.02
    scaled_init: bool = False
    tied_head: bool = True
    bias: bool = False
    dropout: float = 0.0
    norm_eps: float = 1e-5
    pos: str = "learned"
    qk_norm: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("placement", PLACEMENTS), ("norm", NORMS), ("mlp", MLPS), ("pos", POSITIONS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"GPTConfig.{name}={value!r} is not supported; use one of {', '.join(allowed)}")
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"GPTConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                f"pick n_heads among the divisors of d_model"
            )
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else _swiglu_width(self.d_model)
        if not isinstance(self.d_ff, int) or isinstance(self.d_ff, bool) or self.d_ff < 1:
            raise ValueError(f"GPTConfig.d_ff must be a positive int or None, got {self.d_ff!r}")
        if self.embed_norm is None:
            self.embed_norm = self.placement == "peri"
        for name in ("init_std", "norm_eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"GPTConfig.{name} must be a positive finite number, got {value!r}")
        if not isinstance(self.qk_norm, bool):
            raise ValueError(f"GPTConfig.qk_norm must be True or False, got {self.qk_norm!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        """Plain dict of every field (resolved values), JSON-serialisable."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        _check_keys(d, "GPTConfig.from_dict")
        return cls(**d)


def _check_keys(d: dict, where: str) -> None:
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown GPTConfig field(s) {unknown}; known fields: {', '.join(sorted(known))}")


# Presets fix the shape; the placement (and anything else) is passed as an override.
# The paper-* shapes are OUR ASSUMPTION of GPT-style models of the Peri-LN paper's sizes
# (400M, 1.5B, 3.2B); the paper's exact widths, depths and vocabulary are not reproduced here.
# Counted with the tied head (vocab 50304, seq 2048): paper-400m ≈ 0.36B, paper-1.5b ≈ 1.32B,
# paper-3.2b ≈ 2.65B parameters (checked within ±30 % of the label by tests/test_models.py).
PRESETS: dict[str, dict] = {
    # CPU demo scale: ~0.4M parameters, ~65 ms per training step at batch 16 on 2 cores. theory.md: at
    # d 64, 8 layers, lr 1e-2, 400 steps, Pre-LN's last-layer variance grows to ~440, Peri-LN's stays ~15.
    # Measured with this preset (stdlib bytes, batch 16, AdamW lr 1e-2, no warmup, seed 0): at step 400 the
    # last-layer per-token variance was ~1060 (Pre-LN) vs ~28 (Peri-LN) vs ~0.4 (Post-LN).
    "tiny": dict(d_model=64, n_layers=8, n_heads=4, seq_len=64),
    # The benchmark model (GPT-2-shaped, byte-level).
    "small": dict(d_model=256, n_layers=8, n_heads=8, seq_len=128),
    # A larger default for CUDA runs.
    "gpu": dict(d_model=512, n_layers=12, n_heads=8, seq_len=256),
    "paper-400m": dict(vocab_size=50304, seq_len=2048, d_model=1024, n_layers=24, n_heads=16),
    "paper-1.5b": dict(vocab_size=50304, seq_len=2048, d_model=2048, n_layers=24, n_heads=16),
    "paper-3.2b": dict(vocab_size=50304, seq_len=2048, d_model=2560, n_layers=32, n_heads=20),
}


def config_from_preset(name: str, **overrides) -> GPTConfig:
    """``GPTConfig`` of preset ``name`` with ``overrides`` applied (e.g. ``placement="peri"``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    fields = {**PRESETS[name], **overrides}
    _check_keys(fields, f"config_from_preset({name!r})")
    return GPTConfig(**fields)


def _make_norm(config: GPTConfig) -> nn.Module:
    """``nn.LayerNorm`` (bias only when ``config.bias``) or ``nn.RMSNorm`` (needs torch >= 2.4)."""
    if config.norm == "layernorm":
        return nn.LayerNorm(config.d_model, eps=config.norm_eps, elementwise_affine=True, bias=config.bias)
    return nn.RMSNorm(config.d_model, eps=config.norm_eps)


def _make_head_norm(config: GPTConfig) -> nn.Module:
    """QK-norm over a head's d_h channels, without bias (a bias would void theory §5's logit bound)."""
    d_head = config.d_model // config.n_heads
    if config.norm == "layernorm":
        return nn.LayerNorm(d_head, eps=config.norm_eps, elementwise_affine=True, bias=False)
    return nn.RMSNorm(d_head, eps=config.norm_eps)


class DotProductAttention(nn.Module):
    """Causal scaled dot-product attention of per-head q, k, v: (B, H, T, Dh) × 3 -> (B, H, T, Dh).

    softmax(q·kᵀ · ``scaling`` + causal mask)·v with ``scaling`` = 1/sqrt(d_h); ``is_causal`` is True
    (query i attends to keys j ≤ i). Its own module so that hooks see q and k (after any QK-norm).
    """

    is_causal = True
    scaling = None  # None: 1/sqrt(d_h), SDPA's default

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q·kᵀ/sqrt(d_h) + causal mask)·v: (B, H, T, Dh) -> (B, H, T, Dh)."""
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, H, T, Dh)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``qkv`` Linear (D → 3D), optional QK-norm (``q_norm``,
    ``k_norm``), ``sdpa`` (:class:`DotProductAttention`), ``out`` Linear (D → D)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.q_norm = _make_head_norm(config) if config.qk_norm else None
        self.k_norm = _make_head_norm(config) if config.qk_norm else None
        self.sdpa = DotProductAttention(config.dropout)
        self.out = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Causal multi-head self-attention: (B, T, D) -> (B, T, D)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)  # 3 × (B, T, D)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # (B, H, T, Dh)
        y = self.sdpa(q, k, v)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        p = self.dropout if self.training else 0.0
        return F.dropout(self.out(y), p, self.training)  # (B, T, D)


class MLP(nn.Module):
    """GELU MLP ``fc_out(gelu(fc_in(x)))`` or SwiGLU ``fc_out(silu(fc_gate(x)) * fc_in(x))``.

    The input of ``fc_out`` is the ``h`` of Proposition 3.1 (site ``mlp_act``).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        self.dropout = config.dropout
        self.fc_in = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.fc_gate = nn.Linear(config.d_model, config.d_ff, bias=config.bias) if config.mlp == "swiglu" else None
        self.act = nn.GELU() if config.mlp == "gelu" else nn.SiLU()
        self.fc_out = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """GELU or SwiGLU MLP: (B, T, D) -> (B, T, D)."""
        if self.fc_gate is None:
            h = self.act(self.fc_in(x))  # (B, T, d_ff)
        else:
            h = self.act(self.fc_gate(x)) * self.fc_in(x)  # (B, T, d_ff)
        return F.dropout(self.fc_out(h), self.dropout, self.training)  # (B, T, D)


class Block(nn.Module):
    """One Transformer block; ``layer`` is its 0-based index (lns scales by ``1/sqrt(layer + 1)``)."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.placement = config.placement
        self.layer = layer
        has_in = config.placement in ("pre", "peri", "lns")
        has_out = config.placement in ("post", "peri", "output")
        self.norm_attn_in = _make_norm(config) if has_in else None
        self.attn = CausalSelfAttention(config)
        self.norm_attn_out = _make_norm(config) if has_out else None
        self.norm_mlp_in = _make_norm(config) if has_in else None
        self.mlp = MLP(config)
        self.norm_mlp_out = _make_norm(config) if has_out else None
        self.in_scale = 1.0 / math.sqrt(layer + 1) if config.placement == "lns" else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        """One block with the configured norm placement (see the module docstring)."""
        p = self.placement
        if p == "pre":
            x = x + self.attn(self.norm_attn_in(x))
            x = x + self.mlp(self.norm_mlp_in(x))
        elif p == "post":
            x = self.norm_attn_out(x + self.attn(x))
            x = self.norm_mlp_out(x + self.mlp(x))
        elif p == "peri":
            x = x + self.norm_attn_out(self.attn(self.norm_attn_in(x)))
            x = x + self.norm_mlp_out(self.mlp(self.norm_mlp_in(x)))
        elif p == "output":
            x = x + self.norm_attn_out(self.attn(x))
            x = x + self.norm_mlp_out(self.mlp(x))
        else:  # lns
            x = x + self.attn(self.norm_attn_in(x) * self.in_scale)
            x = x + self.mlp(self.norm_mlp_in(x) * self.in_scale)
        return x


class GPT(nn.Module):
    """Decoder-only Transformer: ``tok_emb + pos_emb`` → [emb_norm] → ``blocks`` → [final_norm] → ``head``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.seq_len, config.d_model)
        self.emb_norm = _make_norm(config) if config.embed_norm else None
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = _make_norm(config) if config.placement != "post" else None
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights()
        if config.tied_head:
            self.head.weight = self.tok_emb.weight

    def _init_weights(self) -> None:
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers) if self.config.scaled_init else std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            nn.init.normal_(block.attn.out.weight, mean=0.0, std=out_std)
            nn.init.normal_(block.mlp.fc_out.weight, mean=0.0, std=out_std)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT":
        """Build a model from :data:`PRESETS` (see :func:`config_from_preset`)."""
        return cls(config_from_preset(name, **overrides))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied head counts once); optionally without tok/pos embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
            if not self.config.tied_head:
                n -= self.head.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and the mean cross-entropy against ``targets`` (None without targets)."""
        B, T = idx.shape
        if T > self.config.seq_len:
            raise ValueError(
                f"sequence length {T} exceeds the model's seq_len={self.config.seq_len}; "
                f"crop the input or build the model with a larger seq_len"
            )
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, D)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = F.dropout(x, self.config.dropout, self.training)
        for block in self.blocks:
            x = block(x)  # (B, T, D)
        if self.final_norm is not None:
            x = self.final_norm(x)
        logits = self.head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T))
        return logits, loss
