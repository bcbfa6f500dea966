"""Reference GPT: wiring of every placement against hand computations, init, config, presets, step-0 theory."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import erf

from lnprobe.data import TokenData
from lnprobe.models import GPT, PRESETS, Block, GPTConfig, config_from_preset

PLACEMENTS = ["pre", "post", "peri", "output", "lns"]


def tiny_config(**kw) -> GPTConfig:
    base = dict(vocab_size=50, seq_len=16, d_model=32, n_layers=3, n_heads=4)
    return GPTConfig(**{**base, **kw})


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (gains and biases included) a random value so wiring errors show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 else 0.0))


# ---------------------------------------------------------------------------------------- hand reference
def ref_linear(x, lin):
    y = x @ lin.weight.T
    return y if lin.bias is None else y + lin.bias


def ref_norm(x, norm, kind):
    if norm is None:
        return x
    if kind == "layernorm":
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + norm.eps) * norm.weight
        return y if norm.bias is None else y + norm.bias
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def ref_attn(x, attn, n_heads):
    B, T, D = x.shape
    q, k, v = ref_linear(x, attn.qkv).split(D, -1)
    q, k, v = (t.reshape(B, T, n_heads, D // n_heads).permute(0, 2, 1, 3) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // n_heads)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    w = torch.softmax(scores.masked_fill(mask, float("-inf")), -1)
    y = (w @ v).permute(0, 2, 1, 3).reshape(B, T, D)
    return ref_linear(y, attn.out)


def ref_mlp(x, mlp, kind):
    if kind == "gelu":
        u = ref_linear(x, mlp.fc_in)
        h = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
    else:
        g = ref_linear(x, mlp.fc_gate)
        h = g * torch.sigmoid(g) * ref_linear(x, mlp.fc_in)
    return ref_linear(h, mlp.fc_out)


def ref_block(x, blk: Block, cfg: GPTConfig, layer: int):
    def n(name, t):
        return ref_norm(t, getattr(blk, name), cfg.norm)

    A = lambda t: ref_attn(t, blk.attn, cfg.n_heads)  # noqa: E731
    M = lambda t: ref_mlp(t, blk.mlp, cfg.mlp)  # noqa: E731
    p = cfg.placement
    if p == "pre":
        x = x + A(n("norm_attn_in", x))
        return x + M(n("norm_mlp_in", x))
    if p == "post":
        x = n("norm_attn_out", x + A(x))
        return n("norm_mlp_out", x + M(x))
    if p == "peri":
        x = x + n("norm_attn_out", A(n("norm_attn_in", x)))
        return x + n("norm_mlp_out", M(n("norm_mlp_in", x)))
    if p == "output":
        x = x + n("norm_attn_out", A(x))
        return x + n("norm_mlp_out", M(x))
    s = 1.0 / math.sqrt(layer + 1)  # lns
    x = x + A(n("norm_attn_in", x) * s)
    return x + M(n("norm_mlp_in", x) * s)


# ---------------------------------------------------------------------------------------- wiring
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_forward_backward_every_parameter_used(placement, norm):
    cfg = tiny_config(placement=placement, norm=norm, mlp="swiglu" if norm == "rmsnorm" else "gelu")
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    targets = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, cfg.seq_len, cfg.vocab_size)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # Random init predicts ~uniformly: loss ≈ ln V (targets unrelated to the inputs: with a tied head the
    # logit of the input token itself is raised at init).
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1
    loss.backward()
    for name, p in model.named_parameters():
        # A module created but never called would have no gradient.
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model(idx)[1] is None


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_block_and_model_match_hand_computation(placement, norm, bias):
    cfg = tiny_config(placement=placement, norm=norm, bias=bias, mlp="gelu" if bias else "swiglu")
    torch.manual_seed(1)
    model = GPT(cfg).eval()
    randomize_(model, seed=2)
    x = torch.randn(2, cfg.seq_len, cfg.d_model) * 1.5
    with torch.no_grad():
        for layer, blk in enumerate(model.blocks):
            torch.testing.assert_close(blk(x), ref_block(x, blk, cfg, layer), rtol=1e-4, atol=1e-4)
        # Whole model: embeddings, optional embedding norm, blocks, optional final norm, tied head.
        idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
        h = model.tok_emb.weight[idx] + model.pos_emb.weight[: cfg.seq_len]
        h = ref_norm(h, model.emb_norm, norm)
        for layer, blk in enumerate(model.blocks):
            h = ref_block(h, blk, cfg, layer)
        h = ref_norm(h, model.final_norm, norm)
        ref_logits = h @ model.tok_emb.weight.T
        logits, loss = model(idx, idx)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    ref_loss = -torch.log_softmax(ref_logits, -1).gather(-1, idx[..., None]).mean()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)


NORMS_BY_PLACEMENT = {
    "pre": {"norm_attn_in", "norm_mlp_in"},
    "lns": {"norm_attn_in", "norm_mlp_in"},
    "post": {"norm_attn_out", "norm_mlp_out"},
    "output": {"norm_attn_out", "norm_mlp_out"},
    "peri": {"norm_attn_in", "norm_attn_out", "norm_mlp_in", "norm_mlp_out"},
}


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_norm_modules_created_only_where_used(placement):
    model = GPT(tiny_config(placement=placement))
    names = {n for n, _ in model.named_modules()}
    for i in range(3):
        block_norms = {n.split(".")[-1] for n in names if n.startswith(f"blocks.{i}.norm")}
        assert block_norms == NORMS_BY_PLACEMENT[placement]
    assert ("final_norm" in names) == (placement != "post")
    assert ("emb_norm" in names) == (placement == "peri")
    assert all(".fc_gate" not in n for n in names)  # GELU MLP has no gate


def test_post_has_no_final_norm():
    model = GPT(tiny_config(placement="post"))
    assert model.final_norm is None
    assert not any(n.startswith("final_norm") for n, _ in model.named_modules())


def test_embed_norm_default_and_override():
    for p in PLACEMENTS:
        assert GPTConfig(placement=p).embed_norm == (p == "peri")
    assert GPTConfig(placement="peri", embed_norm=False).embed_norm is False
    model = GPT(tiny_config(placement="pre", embed_norm=True, norm="rmsnorm"))
    assert isinstance(model.emb_norm, torch.nn.RMSNorm)


def test_tied_and_untied_head():
    tied = GPT(tiny_config())
    assert tied.head.weight is tied.tok_emb.weight
    assert tied.head.bias is None
    untied = GPT(tiny_config(tied_head=False))
    assert untied.head.weight is not untied.tok_emb.weight
    cfg = untied.config
    assert tied.num_params() + cfg.vocab_size * cfg.d_model == untied.num_params()


@pytest.mark.parametrize("scaled", [False, True])
def test_init_std(scaled):
    cfg = GPTConfig(d_model=256, n_layers=4, n_heads=4, placement="peri", scaled_init=scaled, bias=True)
    torch.manual_seed(0)
    model = GPT(cfg)
    out_std = 0.02 / math.sqrt(2 * cfg.n_layers) if scaled else 0.02
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            expect = out_std if name.endswith(("attn.out", "mlp.fc_out")) else 0.02
            w = mod.weight.detach()
            # Sample std of >= 32k N(0, s²) draws: relative error ~ 1/sqrt(2n) < 0.4 %.
            assert abs(w.std().item() / expect - 1) < 0.03, name
            assert abs(w.mean().item()) < 0.1 * expect, name
            if getattr(mod, "bias", None) is not None:
                assert torch.all(mod.bias == 0), name
        if isinstance(mod, torch.nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0), name


def test_swiglu_shapes_and_width():
    cfg = GPTConfig(d_model=96, n_heads=4, mlp="swiglu")
    assert cfg.d_ff == 256  # 8/3 · 96 = 256, already a multiple of 8
    assert GPTConfig(d_model=100, n_heads=4, mlp="swiglu").d_ff == 272  # 266.7 → 272
    assert GPTConfig(d_model=100, n_heads=4).d_ff == 400
    mlp = GPT(cfg).blocks[0].mlp
    assert mlp.fc_in.weight.shape == (256, 96)
    assert mlp.fc_gate.weight.shape == (256, 96)
    assert mlp.fc_out.weight.shape == (96, 256)
    assert GPTConfig(d_model=96, n_heads=4, mlp="swiglu", d_ff=100).d_ff == 100


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(placement="middle"), ["placement", "pre", "peri", "lns"]),
        (dict(norm="batchnorm"), ["norm", "layernorm", "rmsnorm"]),
        (dict(mlp="relu"), ["mlp", "gelu", "swiglu"]),
        (dict(pos="rope"), ["pos", "learned"]),
        (dict(d_model=100, n_heads=3), ["divisible", "100", "3"]),
        (dict(n_layers=0), ["n_layers", "positive"]),
        (dict(d_ff=-4), ["d_ff"]),
        (dict(init_std=0.0), ["init_std"]),
        (dict(dropout=1.0), ["dropout"]),
    ],
)
def test_config_validation(kwargs, words):
    with pytest.raises(ValueError) as err:
        GPTConfig(**kwargs)
    for w in words:
        assert w in str(err.value)


def test_config_dict_round_trip():
    cfg = GPTConfig(placement="peri", mlp="swiglu", norm="rmsnorm", d_model=64, n_heads=2)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert GPTConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        GPTConfig.from_dict({**d, "width": 3})


def test_presets_and_errors():
    with pytest.raises(ValueError) as err:
        config_from_preset("huge")
    assert all(name in str(err.value) for name in PRESETS)
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        config_from_preset("tiny", widht=3)
    cfg = config_from_preset("small", placement="peri")
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.seq_len, cfg.placement) == (256, 8, 8, 128, "peri")
    model = GPT.from_preset("tiny", placement="post")
    assert model.config == config_from_preset("tiny", placement="post")
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, model.config.seq_len + 1, dtype=torch.long))


def closed_form_params(c: GPTConfig) -> int:
    D, L, F_ = c.d_model, c.n_layers, c.d_ff
    norm_size = D * (2 if (c.norm == "layernorm" and c.bias) else 1)
    attn = 4 * D * D + (4 * D if c.bias else 0)
    mats = 3 if c.mlp == "swiglu" else 2
    mlp = mats * D * F_ + ((mats - 1) * F_ + D if c.bias else 0)
    norms_per_block = {"pre": 2, "lns": 2, "post": 2, "output": 2, "peri": 4}[c.placement]
    n = L * (attn + mlp + norms_per_block * norm_size)
    n += c.vocab_size * D + c.seq_len * D  # embeddings
    n += norm_size * (int(c.placement != "post") + int(c.embed_norm))
    n += 0 if c.tied_head else c.vocab_size * D
    return n


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_counts(name):
    counts = []
    for overrides in ({}, dict(placement="peri", mlp="swiglu", bias=True, tied_head=False)):
        cfg = config_from_preset(name, **overrides)
        with torch.device("meta"):  # no memory for the billion-parameter shapes
            model = GPT(cfg)
        counts.append(model.num_params())
        assert counts[-1] == closed_form_params(cfg)
    label = {"paper-400m": 400e6, "paper-1.5b": 1.5e9, "paper-3.2b": 3.2e9}.get(name)
    if label is not None:  # the preset's default (Pre-LN, GELU, tied head) shape carries the label
        assert abs(counts[0] / label - 1) < 0.30, (name, counts[0])


def test_dropout_only_in_training():
    cfg = tiny_config(dropout=0.5)
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    model.eval()
    a, b = model(idx)[0], model(idx)[0]
    torch.testing.assert_close(a, b)
    model.train()
    assert not torch.allclose(model(idx)[0], a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cfg = tiny_config(placement="peri")
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    cpu_logits, cpu_loss = model(idx, idx)
    gpu_logits, gpu_loss = model.cuda()(idx.cuda(), idx.cuda())
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- step-0 theory
D_THEORY, L_THEORY, T_THEORY, B_THEORY = 256, 8, 128, 8


@pytest.fixture(scope="module")
def text():
    return TokenData.load("stdlib")


def residual_stream(placement: str, seed: int, text: TokenData) -> list[torch.Tensor]:
    """The residual stream entering blocks 0..L-1 and leaving block L-1 (L + 1 float64 tensors (B, T, D))."""
    torch.manual_seed(seed)
    cfg = GPTConfig(d_model=D_THEORY, n_layers=L_THEORY, n_heads=8, seq_len=T_THEORY, placement=placement)
    model = GPT(cfg).eval()
    x, _ = text.batch("train", B_THEORY, T_THEORY, torch.Generator().manual_seed(1000 + seed))
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].double())) for b in model.blocks]
    hooks.append(model.blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out.double())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == L_THEORY + 1
    return seen


def stream_m2(placement: str, seed: int, text: TokenData) -> np.ndarray:
    """m2 = mean(x²) of the residual stream entering blocks 0..L-1 and leaving block L-1 (L + 1 values)."""
    return np.array([h.square().mean().item() for h in residual_stream(placement, seed, text)])


def test_step0_peri_linear_growth(text):
    # theory.md §2: with embedding norm and γ = 1, m2(x_l) = 1 + 2l on average over weight draws.
    # One draw on correlated text scatters by up to ~±10 % at l = 8; 12 seeds bring it to ~2 %.
    profiles = np.array([stream_m2("peri", s, text) for s in range(12)])
    expected = 1 + 2 * np.arange(L_THEORY + 1)
    rel = profiles.mean(0) / expected - 1
    assert np.all(np.abs(rel) < 0.05), rel


def test_step0_post_flat(text):
    # Every block output is a LayerNorm output with γ = 1, β = 0: m2 = s/(s + ε) ≈ 1.
    for seed in range(2):
        m2 = stream_m2("post", seed, text)
        assert np.all(np.abs(m2[1:] - 1) < 0.02), m2
        assert m2[0] < 0.01  # embeddings alone: m2 ≈ 2σ² = 8e-4 (no embedding norm)


def q_gelu(s2: float) -> float:
    """E[gelu(z)²] for z ~ N(0, s2), by 100-point Gauss–Hermite quadrature."""
    z, w = np.polynomial.hermite_e.hermegauss(100)
    u = math.sqrt(s2) * z
    return float(np.sum(w * (u * 0.5 * (1 + erf(u / math.sqrt(2)))) ** 2) / math.sqrt(2 * math.pi))


def test_q_gelu_limits():
    # Small s: gelu(z) ≈ z/2 + z²/sqrt(2π) → E ≈ s²/4 + 3s⁴/(2π); large s: → ReLU's s²/2.
    s2 = 1e-3
    assert abs(q_gelu(s2) / (s2 / 4 + 3 * s2**2 / (2 * math.pi)) - 1) < 1e-3
    assert abs(q_gelu(1e4) / (1e4 / 2) - 1) < 1e-3


def test_step0_pre_linear_increments(text):
    # theory.md §2: per-block increment of m2 = v_mlp + v_attn (+ a cross term that is zero on average),
    # v_mlp = d_ff σ² q_gelu(D σ²), v_attn = (Dσ²)² c with c in [mean_t 1/t, 1].
    sigma2 = 0.02**2
    D, T = D_THEORY, T_THEORY
    d_ff = GPTConfig(d_model=D, n_heads=8).d_ff
    v_mlp = d_ff * sigma2 * q_gelu(D * sigma2)
    assert abs(v_mlp - 0.0122) < 0.0001  # theory.md's worked example for D = 256
    v_attn_max = (D * sigma2) ** 2
    v_attn_min = v_attn_max * np.mean(1.0 / np.arange(1, T + 1))
    lo, hi = v_mlp + v_attn_min, v_mlp + v_attn_max
    increments, predicted = [], []
    for seed in range(8):
        stream = residual_stream("pre", seed, text)
        increments.append(np.diff([h.square().mean().item() for h in stream]))
        # Sharper: c_l = mean over (b, t) of |mean_{s<=t} x̃_s|² / D, x̃ = LayerNorm(x_l) (γ = 1): the power of
        # a uniform causal average of the attention's normalised inputs (attention is ~uniform at init).
        c = []
        for h in stream[:-1]:
            xn = F.layer_norm(h, (D,), eps=1e-5)  # (B, T, D)
            running_mean = xn.cumsum(1) / torch.arange(1, T + 1, dtype=xn.dtype)[None, :, None]  # (B, T, D)
            c.append(running_mean.square().sum(-1).mean().item() / D)
        predicted.append(v_mlp + v_attn_max * np.array(c))
    inc = np.mean(increments, axis=0)
    # Sampling tolerance: one draw's increment scatters by ~15 % (the stream/branch cross term on correlated
    # text); the 8-seed mean by ~5 %: allow 10 % outside the closed-form interval.
    assert np.all(inc > 0.9 * lo) and np.all(inc < 1.1 * hi), (inc, lo, hi)
    # Cumulative growth over all blocks against the prediction with measured c (measured: +4 %).
    total, total_pred = inc.sum(), np.mean(predicted, axis=0).sum()
    assert abs(total / total_pred - 1) < 0.10, (total, total_pred)
