"""Model discovery (lnprobe.discovery) on tiny models: placement, norm roles, and that every hook point
fetches the tensor it claims, checked against independent references (HF output_hidden_states,
layer-by-layer reruns, explicit norm formulas, explicit linear maps)."""
import json
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lnprobe
from lnprobe.discovery import discover, unwrap
from lnprobe.sites import DiscoveryError, HookPoint, ModelMap
from lnprobe.testing import tiny_hf_model

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", message=".*(enable_nested_tensor|bos_token_id|eos_token_id).*")

V, D, T = 64, 32, 8


# ----------------------------------------------------------------------------- helpers


def capture(model: nn.Module, points: dict, *args, **kwargs):
    """Run `model` with one hook per point and return ({key: fetched tensor}, output)."""
    root = unwrap(model)
    got, handles = {}, []
    for key, hp in points.items():
        mod = root.get_submodule(hp.module)
        if hp.kind == "in":
            def pre(m, a, kw, hp=hp, key=key):
                got[key] = hp.fetch(a, kw).detach().clone()
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(m, a, kw, out, hp=hp, key=key):
                got[key] = hp.fetch(a, kw, out).detach().clone()
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return got, out


def ids(seed=1, b=2):
    return torch.randint(V, (b, T), generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=1e-5):
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-12)
    return a.shape == b.shape and (a - b).abs().max().item() <= tol * scale


def ref_layernorm(x, w=None, b=None, eps=1e-5):
    z = x - x.mean(-1, keepdim=True)
    y = z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + eps)
    return y * (1 if w is None else w) + (0 if b is None else b)


def ref_rmsnorm(x, g, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g


def roles_of(mm: ModelMap, layer: int) -> dict[str, str]:
    """norm module name (relative to the block) -> role, for one block."""
    prefix = mm.blocks[layer].name + "."
    return {n.name[len(prefix):]: n.role for n in mm.blocks[layer].norms}


def check_residual_identities(mm: ModelMap, got: dict, post: bool = False, norm=None):
    """Non-post: X + attn_out == resid_mid and resid_mid + mlp_out == next resid.
    Post: norm1(X + attn_out) == resid_mid and norm2(resid_mid + mlp_out) == next resid."""
    for l in range(mm.n_layers):
        x, mid, nxt = got[("resid", l)], got[("resid_mid", l)], got[("resid", l + 1)]
        a, m = got[("attn_out", l)], got[("mlp_out", l)]
        if post:
            n1, n2 = norm(l)
            assert close(n1(x + a), mid, 1e-4)
            assert close(n2(mid + m), nxt, 1e-4)
        else:
            assert close(x + a, mid)
            assert close(mid + m, nxt)


def randomize_norms(model: nn.Module, seed=0):
    """Non-trivial gains and biases, so that w vs 1+w and bias handling are really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or ".ln" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.0 if name.endswith("bias") else 0.7))


def hf(model_type, **kw):
    return tiny_hf_model(model_type, vocab_size=V, hidden_size=D, **kw).eval()


def all_points(mm: ModelMap) -> dict:
    return mm.site_points()


# ----------------------------------------------------------------------------- HF decoder models


def check_hf_decoder(model, mm: ModelMap, final_norm):
    """resid 0..L-1 == HF hidden_states[l]; HF's last entry is after the final norm, so resid L is
    checked as final_norm(resid L) == final == hidden_states[L]; mlp_act maps to mlp_raw through the
    MLP's last projection."""
    L = mm.n_layers
    got, out = capture(model, all_points(mm), ids(), output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == L + 1
    for l in range(L):
        assert torch.equal(got[("resid", l)], hs[l])
    assert torch.equal(got[("final", L)], hs[L])
    assert close(final_norm(got[("resid", L)]), got[("final", L)], 1e-5)
    assert not close(got[("resid", L)], hs[L], 1e-2)
    check_residual_identities(mm, got)
    root = unwrap(model)
    for l in range(L):
        proj = root.get_submodule(mm.blocks[l].mlp_out_proj)
        assert close(proj(got[("mlp_act", l)]), got[("mlp_raw", l)])
    return got


def test_gpt2_pre():
    model = hf("gpt2", max_position_embeddings=T)
    randomize_norms(model)
    mm = discover(model)
    assert (mm.placement, mm.blocks_path, mm.n_layers, mm.d_model) == ("pre", "transformer.h", 2, D)
    assert roles_of(mm, 0) == {"ln_1": "norm.pre_attn", "ln_2": "norm.pre_mlp"}
    assert [(n.name, n.role, n.kind, n.gain_offset) for n in mm.norms if n.layer == -1] == [
        ("transformer.ln_f", "norm.final", "layernorm", 0.0)]
    assert all(n.kind == "layernorm" and n.gain_offset == 0.0 for n in mm.norms)
    assert mm.embed == "transformer.wte"
    b0 = mm.blocks[0]
    assert b0.points["attn_out"] == HookPoint("transformer.h.0.attn", "out", 0)
    assert b0.points["mlp_act"] == HookPoint("transformer.h.0.mlp.c_proj", "in", 0)
    assert (b0.attn_out_proj, b0.mlp_out_proj) == ("transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj")
    roles = {k: v["role"] for k, v in mm.param_roles.items()}
    assert roles["transformer.h.1.attn.c_attn.weight"] == "attn.qkv"
    assert roles["transformer.h.1.attn.c_proj.bias"] == "attn.out"
    assert roles["transformer.h.1.mlp.c_fc.weight"] == "mlp.in"
    assert roles["transformer.h.1.mlp.c_proj.weight"] == "mlp.out"
    assert roles["transformer.h.1.ln_2.bias"] == "norm.pre_mlp"
    assert roles["transformer.wte.weight"] == roles["transformer.wpe.weight"] == "embed"
    assert "lm_head.weight" not in roles  # tied to wte: appears once, under wte
    assert mm.param_roles["transformer.h.1.ln_1.weight"]["layer"] == 1
    ln_f = model.transformer.ln_f
    got = check_hf_decoder(model, mm, lambda x: ref_layernorm(x, ln_f.weight, ln_f.bias))
    assert got[("mlp_act", 0)].shape[-1] == 4 * D


def test_llama_pre_and_post_attention_layernorm_is_pre_mlp():
    model = hf("llama", num_key_value_heads=2, tie_word_embeddings=False)
    randomize_norms(model)
    mm = discover(model)
    assert mm.placement == "pre" and mm.blocks_path == "model.layers"
    assert roles_of(mm, 1) == {"input_layernorm": "norm.pre_attn", "post_attention_layernorm": "norm.pre_mlp"}
    assert all(n.kind == "rmsnorm" and n.gain_offset == 0.0 for n in mm.norms)
    assert mm.norms[-1].role == "norm.final" and mm.norms[-1].weight == "model.norm.weight"
    roles = {k: v["role"] for k, v in mm.param_roles.items()}
    assert ([roles[f"model.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up", "down")]
            == ["mlp.in", "mlp.in", "mlp.out"])
    assert [roles[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkvo"] == ["attn.qkv"] * 3 + ["attn.out"]
    assert roles["lm_head.weight"] == "head" and roles["model.embed_tokens.weight"] == "embed"
    norm = model.model.norm
    check_hf_decoder(model, mm, lambda x: ref_rmsnorm(x, norm.weight, norm.variance_epsilon))


def test_qwen2_pre():
    model = hf("qwen2", num_key_value_heads=2)
    mm = discover(model)
    assert mm.placement == "pre"
    assert roles_of(mm, 0) == {"input_layernorm": "norm.pre_attn", "post_attention_layernorm": "norm.pre_mlp"}
    assert mm.param_roles["model.layers.0.self_attn.q_proj.bias"]["role"] == "attn.qkv"
    norm = model.model.norm
    check_hf_decoder(model, mm, lambda x: ref_rmsnorm(x, norm.weight, norm.variance_epsilon))


def test_gemma2_peri_with_one_plus_w_gain():
    model = hf("gemma2", num_key_value_heads=2, head_dim=8)
    randomize_norms(model)  # w != 0, so only 1 + w fits
    mm = discover(model)
    assert mm.placement == "peri"
    assert roles_of(mm, 0) == {
        "input_layernorm": "norm.pre_attn", "post_attention_layernorm": "norm.post_attn",
        "pre_feedforward_layernorm": "norm.pre_mlp", "post_feedforward_layernorm": "norm.post_mlp"}
    assert all(n.kind == "rmsnorm" and n.gain_offset == 1.0 for n in mm.norms)
    b0 = mm.blocks[0]
    assert b0.points["attn_raw"] == HookPoint("model.layers.0.post_attention_layernorm", "in", 0)
    assert b0.points["attn_out"] == HookPoint("model.layers.0.post_attention_layernorm", "out", None)
    norm = model.model.norm
    got = check_hf_decoder(model, mm, lambda x: ref_rmsnorm(x, 1 + norm.weight, norm.eps))
    for l, layer in enumerate(model.model.layers):
        pa, pf = layer.post_attention_layernorm, layer.post_feedforward_layernorm
        assert close(ref_rmsnorm(got[("attn_raw", l)], 1 + pa.weight, pa.eps), got[("attn_out", l)])
        assert close(ref_rmsnorm(got[("mlp_raw", l)], 1 + pf.weight, pf.eps), got[("mlp_out", l)])


def test_olmo2_output_norms_and_qk_norms():
    model = hf("olmo2", num_key_value_heads=4)
    randomize_norms(model)
    mm = discover(model)
    assert mm.placement == "output"
    assert roles_of(mm, 0) == {"post_attention_layernorm": "norm.post_attn",
                               "post_feedforward_layernorm": "norm.post_mlp"}
    # q_norm/k_norm here have width D too: they are told apart by dataflow, not width
    roles = {k: v["role"] for k, v in mm.param_roles.items()}
    assert roles["model.layers.1.self_attn.q_norm.weight"] == "attn.qk_norm"
    assert roles["model.layers.1.self_attn.k_norm.weight"] == "attn.qk_norm"
    assert mm.blocks[0].points["resid_mid"] == HookPoint("model.layers.0.mlp", "in", 0)
    norm = model.model.norm
    got = check_hf_decoder(model, mm, lambda x: ref_rmsnorm(x, norm.weight, norm.variance_epsilon))
    pa = model.model.layers[0].post_attention_layernorm
    assert close(ref_rmsnorm(got[("attn_raw", 0)], pa.weight, pa.variance_epsilon), got[("attn_out", 0)])


def test_bert_post_with_embedding_norm():
    model = hf("bert")
    randomize_norms(model)
    mm = discover(model)
    assert mm.placement == "post" and mm.blocks_path == "encoder.layer"
    assert roles_of(mm, 0) == {"attention.output.LayerNorm": "norm.post_attn", "output.LayerNorm": "norm.post_mlp"}
    assert [(n.name, n.role) for n in mm.norms if n.layer == -1] == [("embeddings.LayerNorm", "norm.embed")]
    assert mm.final is None
    assert mm.param_roles["encoder.layer.0.attention.output.dense.weight"]["role"] == "attn.out"
    assert mm.param_roles["encoder.layer.0.intermediate.dense.weight"]["role"] == "mlp.in"
    assert mm.param_roles["encoder.layer.0.output.dense.weight"]["role"] == "mlp.out"
    got, out = capture(model, all_points(mm), ids(), output_hidden_states=True)
    for l in range(mm.n_layers + 1):  # no final norm: HF's last entry is resid L
        assert torch.equal(got[("resid", l)], out.hidden_states[l])

    def norms(l):
        layer = model.encoder.layer[l]
        n1, n2 = layer.attention.output.LayerNorm, layer.output.LayerNorm
        return (lambda x: ref_layernorm(x, n1.weight, n1.bias, n1.eps),
                lambda x: ref_layernorm(x, n2.weight, n2.bias, n2.eps))
    check_residual_identities(mm, got, post=True, norm=norms)


# ----------------------------------------------------------------------------- nn.TransformerEncoder


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("final_norm", [True, False])
def test_torch_transformer_encoder(norm_first, final_norm):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 4, 2 * D, dropout=0.1, batch_first=True, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D) if final_norm else None,
                                  enable_nested_tensor=False)
    randomize_norms(model)
    mm = discover(model)
    assert mm.placement == ("pre" if norm_first else "post")
    expected = {"norm1": "norm.pre_attn", "norm2": "norm.pre_mlp"} if norm_first else \
        {"norm1": "norm.post_attn", "norm2": "norm.post_mlp"}
    assert roles_of(mm, 1) == expected
    assert (mm.final is not None) == final_norm
    assert mm.blocks[0].attn_out_proj is None  # nn.MultiheadAttention calls out_proj functionally
    assert mm.param_roles["layers.0.self_attn.in_proj_weight"]["role"] == "attn.qkv"
    assert mm.param_roles["layers.0.self_attn.out_proj.weight"]["role"] == "attn.out"
    assert mm.param_roles["layers.0.linear2.weight"]["role"] == "mlp.out"
    assert mm.embed is None

    model.eval()
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(3))
    got, out = capture(model, all_points(mm), x)
    ref = [x]  # independent reference: run the layers one by one
    for lyr in model.layers:
        ref.append(lyr(ref[-1]))
    for l in range(3):
        assert close(got[("resid", l)], ref[l])
    if final_norm:
        assert close(got[("final", 2)], out)
    else:
        assert close(got[("resid", 2)], out)
    if norm_first:
        check_residual_identities(mm, got)
    else:
        check_residual_identities(mm, got, post=True, norm=lambda l: tuple(
            (lambda z, n=n: ref_layernorm(z, n.weight, n.bias, n.eps))
            for n in (model.layers[l].norm1, model.layers[l].norm2)))
    for l, lyr in enumerate(model.layers):
        assert close(lyr.linear2(got[("mlp_act", l)]), got[("mlp_out", l)])


# ----------------------------------------------------------------------------- hand-written models


class CausalSelfAttention(nn.Module):
    def __init__(self, d, n_head=4, dropout=0.0):
        super().__init__()
        self.c_attn, self.c_proj, self.n_head = nn.Linear(d, 3 * d), nn.Linear(d, d), n_head
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)                                   # (B, T, D)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)                 # (B, H, T, Dh)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, d)))


class MLP(nn.Module):
    def __init__(self, d, dropout=0.0):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class NanoBlock(nn.Module):
    def __init__(self, d, dropout):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d), CausalSelfAttention(d, dropout=dropout)
        self.ln_2, self.mlp = nn.LayerNorm(d), MLP(d, dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class NanoGPT(nn.Module):
    def __init__(self, n_layer=3, dropout=0.0):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, D), wpe=nn.Embedding(T, D), drop=nn.Dropout(dropout),
            h=nn.ModuleList([NanoBlock(D, dropout) for _ in range(n_layer)]), ln_f=nn.LayerNorm(D)))
        self.lm_head = nn.Linear(D, V, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.register_buffer("pos", torch.arange(T))

    def forward(self, idx):
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(self.pos[: idx.shape[1]]))
        for block in self.transformer.h:
            x = block(x)                                                            # (B, T, D)
        return self.lm_head(self.transformer.ln_f(x))                               # (B, T, V)


def test_nanogpt_pre():
    torch.manual_seed(0)
    model = NanoGPT().eval()
    mm = discover(model)
    assert mm.placement == "pre" and mm.blocks_path == "transformer.h" and mm.n_layers == 3
    assert roles_of(mm, 2) == {"ln_1": "norm.pre_attn", "ln_2": "norm.pre_mlp"}
    assert mm.final == HookPoint("transformer.ln_f", "out", None)
    # the outermost module output, after dropout, is the tensor added to the stream
    assert mm.blocks[0].points["attn_out"] == HookPoint("transformer.h.0.attn", "out", None)
    roles = {k: v["role"] for k, v in mm.param_roles.items()}
    # the head is tied to wte: it appears once, under the name named_parameters() gives, as embed
    assert "lm_head.weight" not in roles and roles["transformer.wte.weight"] == "embed"
    got, logits = capture(model, all_points(mm), ids())
    x = model.transformer.wte(ids()) + model.transformer.wpe(model.pos)
    for l, blk in enumerate(model.transformer.h):
        assert close(got[("resid", l)], x)
        x = blk(x)
    assert close(got[("resid", 3)], x)
    assert close(model.lm_head(got[("final", 3)]), logits)
    check_residual_identities(mm, got)


class ScaledRMSNorm(nn.Module):
    """Gemma-style RMSNorm: gain 1 + w, w stored around 0."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.zeros(d)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


class TinyBlock(nn.Module):
    """One block of a configurable placement: pre, peri, output, post or none."""

    def __init__(self, d, placement, norm):
        super().__init__()
        self.placement = placement
        self.attn, self.mlp = CausalSelfAttention(d), MLP(d)
        wanted = {"pre": ("attn_in", "mlp_in"), "peri": ("attn_in", "attn_out", "mlp_in", "mlp_out"),
                  "output": ("attn_out", "mlp_out"), "post": ("attn_out", "mlp_out"), "none": (),
                  "parallel": ("attn_in",), "flat": ("attn_in", "mlp_in")}[placement]
        self.norms = nn.ModuleDict({k: norm(d) for k in wanted})

    def n(self, key, x):
        return self.norms[key](x) if key in self.norms else x

    def forward(self, x):
        if self.placement == "post":
            x = self.norms["attn_out"](x + self.attn(x))
            return self.norms["mlp_out"](x + self.mlp(x))
        if self.placement == "parallel":  # GPT-J / Phi: one pre-norm feeds both branches
            h = self.norms["attn_in"](x)
            return x + self.attn(h) + self.mlp(h)
        if self.placement == "flat":  # OPT: the MLP runs on the stream flattened to (B*T, D)
            x = x + self.attn(self.norms["attn_in"](x))
            shape, x = x.shape, x.reshape(-1, x.shape[-1])                          # (B*T, D)
            return (x + self.mlp(self.norms["mlp_in"](x))).view(shape)              # (B, T, D)
        x = x + self.n("attn_out", self.attn(self.n("attn_in", x)))
        return x + self.n("mlp_out", self.mlp(self.n("mlp_in", x)))


class TinyLM(nn.Module):
    def __init__(self, placements, norm=nn.LayerNorm, embed_norm=False):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.embed_norm = norm(D) if embed_norm else nn.Identity()
        self.blocks = nn.ModuleList([TinyBlock(D, p, norm) for p in placements])
        self.final_norm = norm(D)
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        x = self.embed_norm(self.embed(idx))                                        # (B, T, D)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.final_norm(x))                                        # (B, T, V)


def ref_stream(model, idx):
    x = model.embed_norm(model.embed(idx))
    out = [x]
    for blk in model.blocks:
        out.append(blk(out[-1]))
    return out


def capture_and_check_stream(model, mm: ModelMap) -> dict:
    """Capture every site of a TinyLM; check resid against a hand-run forward and the residual identities."""
    got, _ = capture(model, all_points(mm), ids())
    ref = ref_stream(model, ids())
    for l in range(3):
        assert close(got[("resid", l)], ref[l])
    check_residual_identities(mm, got)
    return got


@pytest.mark.parametrize("norm,kind,offset", [
    (nn.RMSNorm, "rmsnorm", 0.0), (nn.LayerNorm, "layernorm", 0.0), (ScaledRMSNorm, "rmsnorm", 1.0)])
def test_handwritten_peri_ln(norm, kind, offset):
    torch.manual_seed(0)
    model = TinyLM(["peri"] * 2, norm=norm, embed_norm=True).eval()
    randomize_norms(model)
    mm = discover(model)
    assert mm.placement == "peri"
    assert roles_of(mm, 0) == {"norms.attn_in": "norm.pre_attn", "norms.attn_out": "norm.post_attn",
                               "norms.mlp_in": "norm.pre_mlp", "norms.mlp_out": "norm.post_mlp"}
    assert [n.role for n in mm.norms if n.layer == -1] == ["norm.embed", "norm.final"]
    assert all(n.kind == kind and n.gain_offset == offset for n in mm.norms)
    assert mm.param_roles["head.weight"]["role"] == "head"
    assert mm.param_roles["blocks.1.norms.mlp_out.weight"] == {"role": "norm.post_mlp", "layer": 1}
    got = capture_and_check_stream(model, mm)
    for l, blk in enumerate(model.blocks):
        assert close(blk.norms["attn_out"](got[("attn_raw", l)]), got[("attn_out", l)])
        assert close(blk.attn(blk.norms["attn_in"](got[("resid", l)])), got[("attn_raw", l)])


def test_handwritten_output_ln():
    torch.manual_seed(0)
    model = TinyLM(["output"] * 2, norm=nn.RMSNorm).eval()
    randomize_norms(model)
    mm = discover(model)
    assert mm.placement == "output"
    assert roles_of(mm, 1) == {"norms.attn_out": "norm.post_attn", "norms.mlp_out": "norm.post_mlp"}
    assert mm.blocks[0].points["resid_mid"] == HookPoint("blocks.0.mlp", "in", 0)
    got = capture_and_check_stream(model, mm)
    for l, blk in enumerate(model.blocks):
        assert close(blk.mlp(got[("resid_mid", l)]), got[("mlp_raw", l)])


def test_handwritten_none_mixed_and_placement_override():
    torch.manual_seed(0)
    mm = discover(TinyLM(["none", "pre", "peri"]).eval())
    assert [b.placement for b in mm.blocks] == ["none", "pre", "peri"]
    assert mm.placement == "mixed"
    assert mm.to_meta()["block_placements"] == ["none", "pre", "peri"]
    assert any("block 0" in n and "no norm" in n for n in mm.notes)
    forced = discover(TinyLM(["pre", "pre"]).eval(), placement="peri")
    assert forced.placement == "peri" and all(b.placement == "peri" for b in forced.blocks)
    assert "resid_mid" in forced.blocks[0].points  # still mapped
    with pytest.raises(DiscoveryError, match="placement"):
        discover(TinyLM(["pre"]), placement="sandwich")


def test_parallel_block_with_one_shared_norm():
    torch.manual_seed(0)
    model = TinyLM(["parallel"] * 2).eval()
    mm = discover(model)
    assert mm.placement == "pre" and roles_of(mm, 0) == {"norms.attn_in": "norm.pre_attn"}
    assert "resid_mid" not in mm.blocks[0].points and any("parallel" in n for n in mm.notes)
    got, _ = capture(model, all_points(mm), ids())
    for l in range(2):
        assert close(got[("resid", l)] + got[("attn_out", l)] + got[("mlp_out", l)], got[("resid", l + 1)])


def test_block_that_flattens_the_stream_around_its_mlp():
    torch.manual_seed(0)
    model = TinyLM(["flat"] * 2).eval()
    mm = discover(model)
    assert mm.placement == "pre"
    assert roles_of(mm, 0) == {"norms.attn_in": "norm.pre_attn", "norms.mlp_in": "norm.pre_mlp"}
    got, _ = capture(model, all_points(mm), ids())
    # the model has (B·T, D); a flat hook point hands it out as (B, T, D), so tokens are positions
    assert mm.blocks[0].points["mlp_out"].flat
    assert got[("mlp_out", 0)].shape == (2, T, D)
    for l in range(2):
        mid = got[("resid_mid", l)].reshape(2, T, D)
        assert close(got[("resid", l)] + got[("attn_out", l)], mid)
        assert close(mid + got[("mlp_out", l)].reshape(2, T, D), got[("resid", l + 1)])


def test_inference_mode_and_frozen_encoder_still_traced():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 4, 2 * D, batch_first=True, norm_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    with torch.inference_mode():
        assert discover(model).placement == "pre"
    model.requires_grad_(False)  # no parameter needs grad: only the hooks keep the fused path off
    assert discover(model).placement == "pre"
    assert discover(model, torch.randn(1, T, D)).placement == "pre"


# ----------------------------------------------------------------------------- errors and overrides


def test_plain_mlp_is_a_discovery_error():
    model = nn.Sequential(nn.Linear(D, 64), nn.ReLU(), nn.Linear(64, D))
    with pytest.raises(DiscoveryError) as err:
        discover(model, torch.randn(2, D))
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "no Transformer blocks found in Sequential" in msg and "blocks='" in msg
    assert "not identical blocks" in msg  # it lists what it found


class NoResidual(nn.Module):
    """Identical blocks without a residual stream: blocks are found, structure is not."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(2)])

    def forward(self, x):
        for lyr in self.layers:
            x = lyr(x)
        return x


def test_no_residual_structure_error_and_override():
    with pytest.raises(DiscoveryError) as err:
        discover(NoResidual(), torch.randn(1, T, D))
    msg = str(err.value)
    assert "cannot map the residual structure" in msg and "placement=" in msg and "'layers'" in msg
    mm = discover(NoResidual(), torch.randn(1, T, D), placement="none")  # maps what it can: resid
    assert set(mm.site_points()) == {("resid", 0), ("resid", 1), ("resid", 2)}
    with pytest.raises(DiscoveryError, match="not a submodule"):
        discover(NanoGPT(), blocks="transformer.blocks")


def suggested(msg: str) -> dict:
    """The first override of each kind the error message suggests (after its "Pass"), as attach() keywords."""
    found = {}
    for key, value in re.findall(r"\b(blocks|placement)='([^'.][^']*)'", msg[msg.rfind("Pass "):]):
        found.setdefault(key, value)
    return found


class TwoKinds(TinyLM):
    """Blocks of two classes in one list: no list of identical blocks exists."""

    def __init__(self):
        super().__init__(["pre", "pre"])
        self.blocks[1] = type("OtherBlock", (TinyBlock,), {})(D, "pre", nn.LayerNorm)


class BigAdapters(TwoKinds):
    """The only list of identical modules holds non-blocks (no residual) that run before the blocks."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleList([nn.Sequential(nn.Linear(D, 4 * D), nn.Tanh(), nn.Linear(4 * D, D))
                                       for _ in range(2)])

    def forward(self, idx):
        x = self.embed(idx)
        for a in self.adapters:
            x = a(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.final_norm(x))


@pytest.mark.parametrize("build,example,expect", [
    (TwoKinds, None, {"blocks": "blocks"}),
    (BigAdapters, None, {"blocks": "blocks"}),
    (NoResidual, torch.randn(1, T, D), {"placement": "none"}),
])
def test_suggested_override_makes_attach_succeed(tmp_path, build, example, expect):
    """Each override a DiscoveryError suggests, passed as it is written there, lets attach map the model."""
    torch.manual_seed(0)
    model = build()
    with pytest.raises(DiscoveryError) as err:
        lnprobe.attach(model, tmp_path / "fail", example_input=example)
    msg = str(err.value)
    assert "found" in msg  # what was found is listed
    override = suggested(msg)
    assert expect.items() <= override.items(), msg
    for key, value in expect.items():
        with lnprobe.attach(model, tmp_path / key, example_input=example, **{key: value}) as probe:
            with torch.no_grad():
                model(ids() if example is None else example)
            probe.step()
        assert probe.map.n_layers == 2
        if key == "placement":
            assert probe.map.placement == value


def test_blocks_override_and_example_input_forms():
    torch.manual_seed(0)
    model = hf("llama", num_key_value_heads=2)
    auto = discover(model)
    for example in (ids(), (ids(),), {"input_ids": ids(), "use_cache": False}):
        mm = discover(model, example, blocks="model.layers")
        assert mm.site_points() == auto.site_points()
        assert mm.to_meta() == auto.to_meta()


def test_no_vocab_no_width_asks_for_example_input():
    class First(nn.Module):  # an embedding, but not its first module, and no config.vocab_size
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(D, D)
            self.emb = nn.Embedding(10, D)
            self.layers = nn.ModuleList([TinyBlock(D, "pre", nn.LayerNorm) for _ in range(2)])

    with pytest.raises(DiscoveryError, match="example_input="):
        discover(First())


# ----------------------------------------------------------------------------- side effects, wrappers


def test_discovery_has_no_side_effects():
    torch.manual_seed(0)
    model = NanoGPT(dropout=0.2)
    model.train()
    model.transformer.h[1].eval()  # mixed flags must come back exactly
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    grads_before = [p.grad for p in model.parameters()]
    discover(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: m.training for n, m in model.named_modules()} == flags
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert [p.grad for p in model.parameters()] == grads_before
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


def test_buffers_mutated_by_the_forward_are_restored():
    class Counting(TinyLM):
        def __init__(self):
            super().__init__(["pre", "pre"])
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, idx):
            self.calls += 1  # in place, like a KV cache or a step counter
            return super().forward(idx)

    model = Counting()
    discover(model)
    assert model.calls.item() == 0


def test_hooks_removed_when_the_forward_raises():
    class Broken(TinyLM):
        def forward(self, idx):
            super().forward(idx)
            raise RuntimeError("boom")

    model = Broken(["pre", "pre"])
    model.train()
    rng = torch.get_rng_state()
    with pytest.raises(DiscoveryError, match="boom.*example_input="):  # automatic input: explained
        discover(model)
    with pytest.raises(RuntimeError, match="boom"):  # the caller's input: their error, untouched
        discover(model, ids())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


class DDPLike(nn.Module):
    """Shaped like DistributedDataParallel: the real model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *a, **kw):
        return self.module(*a, **kw)


def test_unwrap_compile_and_ddp_like_wrappers():
    torch.manual_seed(0)
    model = NanoGPT(n_layer=2)
    compiled = torch.compile(model)  # never run: only the wrapper object is needed
    assert unwrap(compiled) is model
    assert unwrap(DDPLike(model)) is model
    assert unwrap(DDPLike(compiled)) is model
    assert unwrap(model) is model
    mm = discover(DDPLike(compiled))
    assert mm.blocks_path == "transformer.h" and mm.model_class == "NanoGPT"
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in mm.param_roles)


def test_site_points_meta_and_describe():
    torch.manual_seed(0)
    mm = discover(TinyLM(["peri"] * 2, norm=nn.RMSNorm, embed_norm=True).eval())
    pts = mm.site_points()
    expected = {(s, l) for s in ("resid_mid", "attn_out", "mlp_out", "attn_raw", "mlp_raw", "mlp_act")
                for l in range(2)} | {("resid", l) for l in range(3)} | {("final", 2)}
    assert set(pts) == expected
    assert pts[("resid", 2)] == mm.resid_out == HookPoint("blocks.1", "out", None)
    meta = json.loads(json.dumps(mm.to_meta()))
    assert meta["placement"] == "peri" and meta["norm_type"] == "rmsnorm" and meta["n_layers"] == 2
    assert meta["sites"] == sorted({s for s, _ in expected})
    assert {n["role"] for n in meta["norms"]} == {
        "norm.embed", "norm.pre_attn", "norm.post_attn", "norm.pre_mlp", "norm.post_mlp", "norm.final"}
    text = mm.describe()
    assert str(mm) == text
    for word in ("TinyLM", "peri", "norm.post_attn", "blocks.1.norms.mlp_out", "resid_mid", "layers 0..1"):
        assert word in text


def test_hookpoint_fetch():
    x, y = torch.ones(2), torch.zeros(2)
    assert HookPoint("m", "in", 1).fetch((y, x), {}) is x
    assert HookPoint("m", "in", "h").fetch((), {"h": x}) is x
    assert HookPoint("m", "in", 3).fetch((x,), {}) is None
    assert HookPoint("m", "out", None).fetch((), {}, x) is x
    assert HookPoint("m", "out", 0).fetch((), {}, (x, None)) is x
    assert HookPoint("m", "out", "last_hidden_state").fetch((), {}, {"last_hidden_state": x}) is x
    assert HookPoint("m", "out", None).fetch((), {}, (x,)) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_llama():
    model = hf("llama", num_key_value_heads=2)
    model = model.to("cuda", torch.bfloat16)
    cuda_rng = torch.cuda.get_rng_state()
    mm = discover(model)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    assert mm.placement == "pre" and all(n.kind == "rmsnorm" for n in mm.norms)
    got, out = capture(model, all_points(mm), ids().cuda(), output_hidden_states=True)
    for l in range(mm.n_layers):
        assert torch.equal(got[("resid", l)], out.hidden_states[l])
    for l in range(mm.n_layers):
        assert close(got[("resid", l)].float() + got[("attn_out", l)].float(),
                     got[("resid_mid", l)].float(), 1e-2)


def test_hook_point_replace_keeps_the_call_structure():
    """What a traced hook returns to substitute a tensor (lnprobe.traced's gradient tap)."""
    from collections import namedtuple

    from lnprobe.sites import HookPoint

    a, b, new = torch.zeros(1), torch.ones(1), torch.full((1,), 7.0)
    assert HookPoint("m", "in", 0).replace((a, b), {"k": 1}, None, new) == ((new, b), {"k": 1})
    args, kwargs = HookPoint("m", "in", "h").replace((a,), {"h": b, "k": 1}, None, new)
    assert args == (a,) and kwargs["h"] is new and kwargs["k"] == 1
    assert HookPoint("m", "out", None).replace((), {}, a, new) is new
    out = HookPoint("m", "out", 1).replace((), {}, (a, b, a), new)
    assert type(out) is tuple and out[1] is new and out[0] is a and len(out) == 3
    assert HookPoint("m", "out", 0).replace((), {}, [a, b], new) == [new, b]
    Pair = namedtuple("Pair", "hidden extra")
    out = HookPoint("m", "out", 0).replace((), {}, Pair(a, b), new)
    assert isinstance(out, Pair) and out.hidden is new and out.extra is b
    d = {"hidden": a}
    assert HookPoint("m", "out", "hidden").replace((), {}, d, new) is d and d["hidden"] is new
