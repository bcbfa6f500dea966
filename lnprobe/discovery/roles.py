"""Parameter roles: embedding and lm-head modules outside the blocks, and the role of every
parameter of the model (one of `lnprobe.sites.PARAM_ROLES`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..sites import PARAM_ROLES, NormInfo
from .trace import outermost_linears

if TYPE_CHECKING:
    from .blocks import BlockResult
    from .trace import Call

_TOKEN_EMBED_NAMES = {
    "wte", "embed_tokens", "word_embeddings", "tok_embeddings", "embed_in", "token_embedding",
    "tok_emb", "token_embeddings", "embedding",
}


def embed_and_head(root: nn.Module, block_list, after: list[Call], final
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
        for c in outermost_linears(after):
            outs = c.out_points()
            if c.start > start and outs and outs[0].t.shape[-1] == vocab:
                head.append(c.name)
    return embed, head


def parameter_roles(root: nn.Module, block_list, results: list[BlockResult],
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
        assert role in PARAM_ROLES, role
        for p in root.get_submodule(module_path).parameters():
            n = names.get(id(p))
            if n is not None and (overwrite or roles[n]["role"] == "other"):
                roles[n]["role"] = role

    for r in results:
        for path, role in r.module_roles.items():
            assign(path, role)
        for path, kind in r.mha.items():
            mha = root.get_submodule(path)
            for pn, p in mha.named_parameters():
                n = names.get(id(p))
                if n is not None:
                    roles[n]["role"] = f"{kind}.out" if pn.startswith("out_proj.") else f"{kind}.qkv"
    for info in norm_infos:
        assign(info.name, info.role)
    for path in embed:
        assign(path, "embed")
    for path in head:
        assign(path, "head", overwrite=False)  # a head tied to the embedding keeps "embed"
    return roles


