"""Tiny Hugging Face models for checks and demos: random initialisation from small configs, nothing
downloaded, and the placement that discovery must find for each architecture.

`HF_PLACEMENTS` is the one table of architectures lnprobe is checked on (by `lnprobe inspect --hf`,
the tests and the docs): GPT-2 and Llama put a norm before each sublayer (Pre-LN), Gemma 2 before
and after each sublayer (Peri-LN), OLMo 2 on each sublayer's output only, BERT after each
residual addition (Post-LN), and T5, an encoder–decoder, before each sublayer of both stacks
(Pre-LN; its decoder blocks have a cross-attention sublayer).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ENCODER_DECODERS", "HF_PLACEMENTS", "HF_TYPES", "tiny_hf_config", "tiny_hf_model"]

# model_type -> placement that discovery must report
HF_PLACEMENTS: dict[str, str] = {
    "gpt2": "pre", "llama": "pre", "gemma2": "peri", "olmo2": "output", "bert": "post", "t5": "pre",
}
HF_TYPES: tuple[str, ...] = tuple(HF_PLACEMENTS)

_BARE = {"bert", "t5"}  # built without a language-model head (a bare encoder; T5's encoder and decoder)
ENCODER_DECODERS = frozenset({"t5"})  # forward needs decoder_input_ids; both stacks are mapped


def tiny_hf_config(model_type: str, *, vocab_size: int = 256, hidden_size: int = 64,
                   num_hidden_layers: int = 2, num_attention_heads: int = 4, **overrides: Any):
    """A transformers config of `model_type` at toy size: MLP width 2 × hidden (GPT-2 keeps its
    own 4 ×), as many key/value heads as heads, head_dim = hidden / heads, 128 positions, special
    token ids inside the toy vocabulary (T5: decoder start id 0, as many decoder as encoder
    blocks), eager attention. `overrides` are passed to the config as
    they are (any attribute of it, e.g. ``num_key_value_heads=2``). Needs transformers."""
    import transformers

    kw: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager",
    )
    if model_type != "gpt2":
        kw["intermediate_size"] = 2 * hidden_size
    if model_type in ("llama", "gemma2", "olmo2"):
        kw["num_key_value_heads"] = num_attention_heads
    if model_type == "gemma2":
        kw["head_dim"] = hidden_size // num_attention_heads
    if model_type == "t5":
        kw.update(d_ff=kw.pop("intermediate_size"), d_kv=hidden_size // num_attention_heads,
                  decoder_start_token_id=0, num_decoder_layers=num_hidden_layers)
        kw.pop("max_position_embeddings")  # relative position buckets instead
    kw.update(overrides)
    return transformers.AutoConfig.for_model(model_type, **kw)


def tiny_hf_model(model_type: str, *, seed: int = 0, **config: Any) -> nn.Module:
    """A randomly initialised Hugging Face model of `model_type` (no download): a causal LM, the
    bare encoder for BERT, the bare encoder–decoder for T5. `config` goes to `tiny_hf_config`; the
    weights are drawn after ``torch.manual_seed(seed)``. Returned as transformers builds it (training mode)."""
    import transformers

    cfg = tiny_hf_config(model_type, **config)
    torch.manual_seed(seed)
    if model_type in _BARE:
        return transformers.AutoModel.from_config(cfg)
    return transformers.AutoModelForCausalLM.from_config(cfg)
