"""analysis.theory against independent simulations (numpy Transformer stacks, torch autograd) and
closed forms. The simulator below is written from theory.md section 1's update rules, not from
analysis.theory."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.special import erf

from lnprobe.analysis import compare, theory


# ---------------------------------------------------------------------------------------------
# numpy simulator of residual streams at init
# ---------------------------------------------------------------------------------------------
def _norm(x, kind="rms", eps=1e-5, gamma=None, beta=None):
    if kind == "layer":
        x = x - x.mean(-1, keepdims=True)
        y = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)
    else:
        y = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y


def _act(z, act):
    if act == "relu":
        return np.maximum(z, 0)
    return 0.5 * z * (1 + erf(z / math.sqrt(2)))                         # exact GELU


def _attn(x, wqkv, wo, n_heads):
    B, T, D = x.shape
    q, k, v = np.split((x.reshape(B * T, D) @ wqkv).reshape(B, T, 3 * D), 3, axis=-1)  # (B, T, D) each
    dh = D // n_heads
    q, k, v = (a.reshape(B, T, n_heads, dh).transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, H, T, dh)
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)                  # (B, H, T, T)
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = (p @ v).transpose(0, 2, 1, 3).reshape(B * T, D)                 # (B·T, D)
    return (out @ wo).reshape(B, T, D)


def simulate(placement, L=8, D=128, T=64, B=4, sigma=0.02, seed=0, act="gelu", d_ff=None,
             embed_norm=None, norm="rms", mlp_only=False, x0_std=None, gamma_std=0.0, beta_std=0.0,
             branch_scale=1.0):
    """m2 of the stream entering each block (L+1 values) plus the mid-block values, one weight draw.

    Random independent Gaussian tokens stand in for embeddings (std ``x0_std``, default the sum of
    a token and a position embedding of std σ). ``gamma_std``/``beta_std`` perturb every norm's
    gain/bias (trained-like norms); ``branch_scale`` multiplies the output projections.
    """
    rng = np.random.default_rng(seed)
    d_ff = d_ff or 4 * D
    f32 = np.float32                                                      # float32: the machine is slow
    embed_norm = (placement == "peri") if embed_norm is None else embed_norm
    x = rng.standard_normal((B, T, D)) * (x0_std if x0_std is not None else sigma * math.sqrt(2))
    x = x.astype(f32)

    def norm_params():
        g = (1 + gamma_std * rng.standard_normal(D)).astype(f32)
        b = (beta_std * rng.standard_normal(D)).astype(f32) if beta_std else None
        return g, b

    def nrm(a, params=None):
        g, b = params if params is not None else (None, None)
        return _norm(a, "layer" if norm == "layer" else "rms", gamma=g, beta=b)

    if embed_norm:
        x = nrm(x)
    resid, mid, out_params = [float((x.astype(np.float64) ** 2).mean())], [], []
    for l in range(L):
        scale = 1 / math.sqrt(l + 1) if placement == "lns" else 1.0
        wqkv = (rng.standard_normal((D, 3 * D), dtype=f32) * sigma)
        wo = (rng.standard_normal((D, D), dtype=f32) * sigma * branch_scale).astype(f32)
        w1 = (rng.standard_normal((D, d_ff), dtype=f32) * sigma)
        w2 = (rng.standard_normal((d_ff, D), dtype=f32) * sigma * branch_scale).astype(f32)
        def attn(a):
            return _attn(a, wqkv, wo, 4)
        def mlp(a):
            return (_act(a.reshape(-1, D) @ w1, act) @ w2).reshape(a.shape)
        subs = [mlp] if mlp_only else [attn, mlp]
        for f in subs:
            if placement in ("pre", "lns"):
                x = x + f(nrm(x) * scale)
            elif placement == "peri":
                p_out = norm_params()
                out_params.append(p_out)
                x = x + nrm(f(nrm(x, norm_params())), p_out)
            elif placement == "post":
                x = nrm(x + f(x))
            elif placement == "output":
                x = x + nrm(f(x))
            if f is attn:
                mid.append(float((x.astype(np.float64) ** 2).mean()))
        resid.append(float((x.astype(np.float64) ** 2).mean()))
    return np.array(resid), np.array(mid), x, out_params


# ---------------------------------------------------------------------------------------------
# q_phi
# ---------------------------------------------------------------------------------------------
def test_q_phi_relu_is_exactly_half_the_variance():
    for s2 in (1e-4, 0.1024, 1.0, 7.3, 100.0):
        assert theory.q_phi(s2, "relu") == pytest.approx(s2 / 2, rel=1e-12, abs=0)


@pytest.mark.parametrize("act,phi", [
    ("gelu", lambda z: 0.5 * z * (1 + erf(z / math.sqrt(2)))),
    ("silu", lambda z: z * 0.5 * (1 + np.tanh(z / 2))),
])
def test_q_phi_smooth_activations_match_adaptive_quadrature(act, phi):
    for s2 in (0.01, 0.1024, 1.0, 4.0):
        ref = quad(lambda z: phi(z) ** 2 * np.exp(-z * z / (2 * s2)) / math.sqrt(2 * math.pi * s2),
                   -np.inf, np.inf, epsabs=1e-15, epsrel=1e-12)[0]
        assert theory.q_phi(s2, act) == pytest.approx(ref, rel=1e-8)


def test_q_phi_swiglu_is_silu_times_linear_and_vectorised():
    s2 = np.array([0.1, 1.0])
    rng = np.random.default_rng(0)
    u, w = rng.standard_normal((2, 400_000))
    mc = np.mean((np.sqrt(s2[1]) * u / (1 + np.exp(-np.sqrt(s2[1]) * u)) * np.sqrt(s2[1]) * w) ** 2)
    q = theory.q_phi(s2, "swiglu")
    assert q.shape == (2,)
    assert q[1] == pytest.approx(mc, rel=0.02)
    with pytest.raises(ValueError, match="unknown activation"):
        theory.q_phi(1.0, "tanhh")


def test_theory_doc_examples_of_v_mlp():
    # theory.md: σ 0.02, d_ff 4D, GELU: D=256 -> 0.0122; 512 -> 0.0542; 768 -> 0.131; 1024 -> 0.245
    for D, want in ((256, 0.0122), (512, 0.0542), (768, 0.131), (1024, 0.245)):
        v, _, _ = theory.pre_init_increment_interval(D, 4 * D, 0.02, 128, "gelu")
        assert v == pytest.approx(want, rel=0.005)


# ---------------------------------------------------------------------------------------------
# forward variance laws vs simulation
# ---------------------------------------------------------------------------------------------
def test_peri_init_profile_is_one_plus_two_l_in_simulation():
    L = 12
    sims = np.mean([simulate("peri", L=L, D=256, T=64, B=2, seed=s)[0] for s in range(3)], axis=0)
    pred = theory.peri_init_m2(L)
    np.testing.assert_allclose(pred, 1 + 2 * np.arange(L + 1))
    rel = sims[1:] / pred[1:] - 1
    assert abs(rel.mean()) < 0.03, rel
    assert np.abs(rel).max() < 0.06, rel


def test_peri_additive_law_with_measured_gains_and_no_embed_norm():
    # non-unit output gains: the law adds mean γ² per sublayer
    L, D = 6, 256
    resid, _, _, params = simulate("peri", L=L, D=D, gamma_std=0.5, embed_norm=False, seed=3)
    gain_ms = np.array([np.mean(g ** 2) for g, _ in params])              # (2L,)
    pred = theory.peri_additive_m2(resid[0], gain_ms)
    assert pred[0] == resid[0]
    rel = resid[1:] / pred[1:] - 1
    assert np.abs(rel).max() < 0.08, rel
    # steps dimension broadcasts
    two = theory.peri_additive_m2(np.array([resid[0], 0.0]), np.stack([gain_ms, gain_ms]))
    assert two.shape == (2, L + 1)
    np.testing.assert_allclose(two[1, 1:] - two[0, 1:], -resid[0])


def test_peri_hard_bound_holds_with_trained_like_norms_and_large_branches():
    L, D = 6, 64
    for seed in range(3):
        resid, _, x, params = simulate("peri", L=L, D=D, norm="layer", gamma_std=2.0, beta_std=0.5,
                                       branch_scale=50.0, seed=seed, embed_norm=False, x0_std=0.3)
        g_absmax = np.array([np.abs(g).max() for g, _ in params])
        b_ms = np.array([np.mean(b ** 2) for _, b in params])
        rms_bound = theory.peri_hard_bound_rms(math.sqrt(resid[0]), g_absmax, b_ms)
        assert np.all(np.sqrt(resid) <= rms_bound + 1e-12)
        # per coordinate, last layer, every token
        gam = np.stack([np.abs(g) for g, _ in params])                      # (2L, D)
        bet = np.stack([np.abs(b) for _, b in params])
        x0 = simulate("peri", L=0, D=D, seed=seed, embed_norm=False, x0_std=0.3)[2]  # same first draw
        coord = theory.peri_hard_bound_coord(np.abs(x0), gam, bet)          # (B, T, L+1, D)
        assert np.all(np.abs(x) <= coord[..., -1, :] + 1e-9)
        ab = theory.peri_hard_bound_absmax(np.abs(x0).max(), g_absmax, D, b_ms)
        assert np.abs(x).max() <= ab[-1]
        # the RMS bound is not vacuous: a Pre-style stack with the same branches breaks it
        pre = simulate("pre", L=L, D=D, branch_scale=1000.0, seed=seed, x0_std=0.3)[0]
        assert np.sqrt(pre[-1]) > theory.peri_hard_bound_rms(math.sqrt(pre[0]), np.ones(2 * L))[-1]


def test_post_ln_is_flat_at_one():
    resid, _, _, _ = simulate("post", L=8, D=128, norm="layer", seed=0)
    assert abs(resid[0] - 2 * 0.02 ** 2) < 2e-4                            # embedding, not normalised
    np.testing.assert_allclose(resid[1:], theory.post_level(1.0, 0.0), rtol=0.01)
    assert theory.post_level(np.array([1.5, 2.0]), np.array([0.1, 0.0])).tolist() == [1.6, 2.0]


@pytest.mark.parametrize("D", [128, 256])
def test_pre_ln_init_increments_inside_closed_form_interval(D):
    L, T = 8, 64
    v_mlp, lo, hi = theory.pre_init_increment_interval(D, 4 * D, 0.02, T, "gelu")
    attn_inc, mlp_inc = [], []
    for seed in range(3):
        resid, mid, _, _ = simulate("pre", L=L, D=D, T=T, seed=seed)
        attn_inc.append(mid - resid[:-1])
        mlp_inc.append(resid[1:] - mid)
    attn_inc, mlp_inc = np.mean(attn_inc, 0), np.mean(mlp_inc, 0)
    assert mlp_inc.mean() == pytest.approx(v_mlp, rel=0.08)
    assert lo * 0.9 <= attn_inc.min() and attn_inc.max() <= hi * 1.1, (attn_inc, lo, hi)
    block = attn_inc + mlp_inc
    assert (v_mlp + lo) * 0.9 <= block.mean() <= (v_mlp + hi) * 1.1
    low, high = theory.pre_init_profile(L, 0.0, v_mlp, lo, hi)
    np.testing.assert_allclose(high - low, np.arange(L + 1) * (hi - lo))


def test_pre_ln_scaled_init_divides_output_terms_by_2L():
    v, lo, hi = theory.pre_init_increment_interval(256, 1024, 0.02, 64, "relu")
    vs, los, his = theory.pre_init_increment_interval(256, 1024, 0.02, 64, "relu", scaled_init=True, L=6)
    assert (vs * 12, los * 12, his * 12) == pytest.approx((v, lo, hi))
    # closed form with ReLU: d_ff σ² (D σ² / 2)
    assert v == pytest.approx(1024 * 0.02 ** 2 * 256 * 0.02 ** 2 / 2)
    with pytest.raises(ValueError, match="needs L"):
        theory.pre_init_increment_interval(256, 1024, 0.02, 64, scaled_init=True)


def test_ln_scaled_harmonic_law():
    # MLP-only ReLU blocks: block k adds v_mlp/k exactly in expectation, v_mlp in closed form.
    # One weight draw scatters a deep increment by ~25 % (a token-independent ReLU-mean component),
    # so average 12 draws (profile within ~2-4 % then at D 128).
    L, D = 8, 128
    sims = np.mean([simulate("lns", L=L, D=D, act="relu", mlp_only=True, seed=s, B=2, T=32)[0]
                    for s in range(12)], 0)
    s1 = 4 * D * 0.02 ** 2 * (D * 0.02 ** 2) / 2
    pred = theory.lns_init_profile(L, sims[0], s1)
    np.testing.assert_allclose(pred[1:] - pred[:-1], s1 / np.arange(1, L + 1))
    np.testing.assert_allclose(sims, pred, rtol=0.06)
    # an unscaled stack would be linear: 1/k matters
    assert np.all(np.abs(sims[3:] / (sims[0] + s1 * np.arange(3, L + 1)) - 1) > 0.2)
    # full blocks (attention + GELU MLP): inside the exact interval
    full = np.mean([simulate("lns", L=L, D=D, seed=s, B=2)[0] for s in range(3)], 0)
    low, high = theory.lns_init_interval(L, full[0], D, 4 * D, 0.02, 64, "gelu")
    assert np.all(full[1:] >= low[1:] * 0.95) and np.all(full[1:] <= high[1:] * 1.05), (full, low, high)
    # and clearly below the unscaled Pre-LN growth
    v, lo, hi = theory.pre_init_increment_interval(D, 4 * D, 0.02, 64, "gelu")
    assert high[-1] < full[0] + L * (v + lo)


def test_output_ln_epsilon_model_brackets_simulation():
    # small init, no input norm: the output norm's ε eats most of the first sublayers' output
    L, D = 6, 128
    sims = np.mean([simulate("output", L=L, D=D, T=64, seed=s)[0] for s in range(3)], 0)
    low, high = theory.output_init_interval(L, sims[0], D, 4 * D, 0.02, 64, "gelu", eps=1e-5)
    assert sims[1] < 1.5                                                   # far below the ε-free 2
    assert np.all(sims[1:] >= low[1:] * 0.9) and np.all(sims[1:] <= high[1:] * 1.1), (sims, low, high)


def test_norm_eps_factor():
    assert theory.norm_eps_factor(1e-5, 1e-5) == pytest.approx(0.5)
    assert theory.norm_eps_factor(1.0, 0.0) == 1.0


# ---------------------------------------------------------------------------------------------
# Proposition 3.1 and scale invariance on real torch modules
# ---------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")


def _mlp_grads(placement, seed, D=64, d_ff=256, norm="rms"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, D, generator=g)
    w1 = torch.nn.Linear(D, d_ff, bias=False)
    w2 = torch.nn.Linear(d_ff, D, bias=False)
    for w in (w1, w2):
        w.weight.data = torch.randn(w.weight.shape, generator=g) * 0.3
    out_norm = torch.nn.RMSNorm(D, eps=0.0) if norm == "rms" else torch.nn.LayerNorm(D, eps=0.0, bias=False)
    out_norm.weight.data = 1 + 0.5 * torch.randn(D, generator=g)
    c = torch.randn(1, D, generator=g)
    h = torch.nn.functional.gelu(w1(x))                                   # (1, d_ff)
    h.retain_grad()
    a = w2(h)                                                             # (1, D)
    o = x + (a if placement == "pre" else out_norm(a))
    o.retain_grad()
    (o * c).sum().backward()
    a_norm = (a - a.mean()).norm() if norm == "layer" else a.norm()
    return (w2.weight.grad.norm().item(), h.norm().item(), o.grad.norm().item(), a_norm.item(),
            out_norm.weight.abs().max().item(), w2.weight)


def test_prop31_pre_ln_identity_on_torch_mlp():
    for seed in range(5):
        gw, h, g, *_ = _mlp_grads("pre", seed)
        assert gw / theory.prop31_pre_identity(h, g) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_prop31_peri_ln_bound_on_torch_mlp(norm):
    ratios = []
    for seed in range(8):
        gw, h, g, a, gmax, _ = _mlp_grads("peri", seed, norm=norm)
        ratios.append(gw / theory.prop31_peri_bound(h, g, a, gmax, 64))
    assert max(ratios) <= 1.0 + 1e-6
    assert min(ratios) > 0.01                                             # a bound, but not a vacuous one


def test_prop31_batched_bound_on_torch_mlp():
    torch.manual_seed(0)
    N, D, d_ff = 32, 16, 64
    h = torch.randn(N, d_ff)
    w2 = torch.nn.Linear(d_ff, D, bias=False)
    a = w2(h)
    a.retain_grad()
    (a * torch.randn(N, D)).mean().backward()
    rms_h = h.pow(2).mean().sqrt().item()
    rms_g = a.grad.pow(2).mean().sqrt().item()
    ratio = w2.weight.grad.norm().item() / theory.prop31_batched_bound(N, d_ff, D, rms_h, rms_g)
    assert 0.0 < ratio <= 1.0
    # equality when every token carries the same h and g
    h1 = torch.randn(1, d_ff).repeat(N, 1)
    w2.weight.grad = None
    a = w2(h1)
    a.retain_grad()
    (a * torch.randn(1, D).repeat(N, 1)).mean().backward()
    ratio = w2.weight.grad.norm().item() / theory.prop31_batched_bound(
        N, d_ff, D, h1.pow(2).mean().sqrt().item(), a.grad.pow(2).mean().sqrt().item())
    assert ratio == pytest.approx(1.0, rel=1e-5)


def _cos_grad_weight(placement, seed, norm="rms"):
    torch.manual_seed(seed)
    D = 64
    block_norm = torch.nn.RMSNorm(D) if norm == "rms" else torch.nn.LayerNorm(D)
    w1 = torch.nn.Linear(D, 4 * D, bias=False)
    w2 = torch.nn.Linear(4 * D, D, bias=False)
    out_norm = torch.nn.RMSNorm(D) if norm == "rms" else torch.nn.LayerNorm(D)
    x = torch.randn(8, 16, D)
    a = w2(torch.nn.functional.gelu(w1(block_norm(x))))                   # (8, 16, D)
    o = x + (out_norm(a) if placement == "peri" else a)
    (o.pow(3).mean() + o.sum(-1).pow(2).mean()).backward()
    gw, w = w2.weight.grad, w2.weight
    return (gw * w).sum().abs().item() / (gw.norm() * w.norm()).item()


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_scale_invariance_peri_vs_pre(norm):
    peri = [_cos_grad_weight("peri", s, norm) for s in range(3)]
    pre = [_cos_grad_weight("pre", s, norm) for s in range(3)]
    assert max(peri) < 1e-4, peri
    assert min(pre) > 1e-3, pre                                          # 10^4 × the Peri-LN values


# ---------------------------------------------------------------------------------------------
# gradient-scale profile and dispatch on meta
# ---------------------------------------------------------------------------------------------
def test_xiong_profiles_are_relative_shapes():
    # changed with the Xiong fix: the Pre-LN scale is D·sqrt(ln D)/sqrt(m2(x_L)) (no extra 1/sqrt(L):
    # Xiong's 1/sqrt(L) IS the final-norm factor at their init), and the ratio is sqrt(m2_Pre(x_L))
    pre = theory.xiong_grad_profile("pre", 8, 256, m2_final=4.0)
    assert np.allclose(pre, pre[0]) and pre[0] == pytest.approx(256 * math.sqrt(math.log(256)) / 2)
    post = theory.xiong_grad_profile("post", 8, 256)
    assert np.isnan(post[:-1]).all() and post[-1] == pytest.approx(256 * math.sqrt(math.log(256)))
    assert np.isnan(theory.xiong_grad_profile("peri", 8, 256)).all()
    # Post > Pre only when m2(x_L) of the Pre-LN run exceeds 1 (the old threshold 1/L was the error)
    assert theory.post_over_pre_grad(4.0) == pytest.approx(2.0)
    assert theory.post_over_pre_grad(1.5) > 1 > theory.post_over_pre_grad(0.5)
    assert post[-1] / theory.xiong_grad_profile("pre", 8, 256, m2_final=0.5)[-1] == pytest.approx(
        theory.post_over_pre_grad(0.5))
    with pytest.raises(ValueError, match="m2"):
        theory.post_over_pre_grad(0.0)
    # Xiong's own init: m2(x_L) ∝ L recovers their sqrt(L) ratio
    assert theory.post_over_pre_grad(8 * 1.0) / theory.post_over_pre_grad(2 * 1.0) == pytest.approx(2.0)


def _last_w2_grad(placement, seed, L=8, D=64, sigma=0.02):
    """‖∇W2‖ of the last block of an MLP-only stack at init, torch autograd, float64. Pre-LN:
    x + W2 φ(W1 Norm x) with a final norm; Post-LN: Norm(x + W2 φ(W1 x)), no final norm. Same
    weights, inputs and loss (a fixed random linear read-out of the normalised output)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    x = torch.randn(16, D, generator=g, dtype=f64) * sigma * math.sqrt(2)
    ws = [(torch.randn(D, 4 * D, generator=g, dtype=f64) * sigma, torch.randn(4 * D, D, generator=g, dtype=f64) * sigma)
          for _ in range(L)]
    c = torch.randn(16, D, generator=g, dtype=f64)
    w2_last = ws[-1][1].clone().requires_grad_(True)
    def norm(a):
        return torch.nn.functional.layer_norm(a, (D,), eps=1e-5)
    for i, (w1, w2) in enumerate(ws):
        w2 = w2_last if i == L - 1 else w2
        if placement == "pre":
            x = x + torch.nn.functional.gelu(norm(x) @ w1) @ w2
        else:
            x = norm(x + torch.nn.functional.gelu(x @ w1) @ w2)
    m2_L = float((x.detach() ** 2).mean())
    y = norm(x) if placement == "pre" else x
    (y * c).sum().backward()
    return float(w2_last.grad.norm()), m2_L


def test_xiong_ratio_matches_a_small_simulation():
    ratios, preds = [], []
    for seed in range(4):
        post, _ = _last_w2_grad("post", seed)
        pre, m2_L = _last_w2_grad("pre", seed)
        ratios.append(post / pre)
        preds.append(theory.post_over_pre_grad(m2_L))
    ratio, pred = float(np.mean(ratios)), float(np.mean(preds))
    assert pred < 0.2                                   # small init: m2_Pre(x_L) ≪ 1, so Pre > Post
    assert ratio == pytest.approx(pred, rel=0.25), (ratios, preds)
    # the former formula sqrt(L·m2) is off by sqrt(L) = 2.8
    assert abs(ratio / (pred * math.sqrt(8)) - 1) > 0.5


def test_peri_eps_law_matches_simulation_at_small_branch_outputs():
    # MLP-only Peri-LN blocks with raw branch power ≈ ε: each output norm adds p/(p + ε) ≈ 1/2, not 1
    L, D, eps = 6, 256, 1e-5
    v_unit = float(theory.mlp_branch_power(D, 4 * D, 0.02, 0.02, "gelu"))
    scale = math.sqrt(eps / v_unit)                     # output projection std 0.02·scale -> p = ε
    p = float(theory.mlp_branch_power(D, 4 * D, 0.02, 0.02 * scale, "gelu"))
    assert p == pytest.approx(eps)
    sims = np.mean([simulate("peri", L=L, D=D, T=32, B=2, seed=s, mlp_only=True, branch_scale=scale)[0]
                    for s in range(3)], axis=0)
    law = theory.peri_eps_m2(sims[0], np.ones(L), p, eps, per_block=1)
    np.testing.assert_allclose(law[1:] - law[:-1], 0.5)
    np.testing.assert_allclose(sims, law, rtol=0.03)
    assert sims[-1] < 0.7 * (sims[0] + L)                                 # the ε-free law adds 1 per sublayer
    # per-token powers are averaged after the ε factor (concave): a spread lowers the sum
    spread = theory.peri_eps_m2(0.0, np.ones(2), np.array([[0.1 * eps, 1.9 * eps]] * 2), eps)
    assert spread[-1] < theory.peri_eps_m2(0.0, np.ones(2), eps, eps)[-1]
    # large branch outputs: the ε law reduces to the additive law
    big = theory.peri_init_m2(L, 1.0, branch_power=1.0, eps=eps)
    np.testing.assert_allclose(big, theory.peri_init_m2(L), rtol=1e-4)


def _meta(placement, **model):
    cfg = dict(d_model=128, n_layers=4, placement=placement, mlp="gelu", init_std=0.02, seq_len=64,
               scaled_init=False)
    cfg.update(model)
    return {"placement": placement, "n_layers": cfg["n_layers"], "d_model": cfg["d_model"],
            "config": {"model": cfg, "train": {}}}


def _predict(meta, m2_0=None):
    # theory takes numbers, not metadata (changed: predict_init_profile no longer parses meta.json);
    # the run-side reading lives in analysis.compare
    cfg = (meta.get("config") or {}).get("model") or {}
    placement = cfg.get("placement") or meta.get("placement")
    roles = [n.get("role") for n in meta.get("norms") or []]
    embed = cfg.get("embed_norm", ("norm.embed" in roles) if roles else None)
    return theory.predict_init_profile(placement, meta.get("n_layers"), numbers=compare.model_numbers(meta),
                                       m2_0=m2_0, embed_norm=embed)


def test_predict_init_profile_dispatch():
    peri = _predict(_meta("peri"))
    assert list(peri.columns) == ["layer", "low", "mid", "high"]
    np.testing.assert_allclose(peri["mid"], 1 + 2 * np.arange(5))
    post = _predict(_meta("post"), m2_0=8e-4)
    np.testing.assert_allclose(post["mid"], [8e-4, 1, 1, 1, 1])
    pre = _predict(_meta("pre"), m2_0=8e-4)
    v, lo, hi = theory.pre_init_increment_interval(128, 512, 0.02, 64, "gelu")
    np.testing.assert_allclose(pre["low"], 8e-4 + np.arange(5) * (v + lo))
    np.testing.assert_allclose(pre["high"], 8e-4 + np.arange(5) * (v + hi))
    lns = _predict(_meta("lns"))
    assert lns["high"].iloc[-1] < pre["high"].iloc[-1]
    assert _predict(_meta("output")) is not None
    # placement from config wins over the detected one ("lns" is detected as "pre")
    m = _meta("lns")
    m["placement"] = "pre"
    assert _predict(m).attrs["placement"] == "lns"
    for p in ("none", "mixed"):
        assert _predict(_meta(p)) is None
    # Pre-LN without the reference GPT config (e.g. a HF model): no numbers, no prediction
    assert _predict({"placement": "pre", "n_layers": 4, "d_model": 64}) is None
    # Peri-LN of a HF model: law from the norms list
    hf = {"placement": "peri", "n_layers": 2, "d_model": 64, "norms": [{"role": "norm.embed"}]}
    np.testing.assert_allclose(_predict(hf)["mid"], [1, 3, 5])
    assert theory.default_d_ff(96, "swiglu") % 8 == 0 and theory.default_d_ff(96, "gelu") == 384
    # the norm's ε comes from the config, else the norms list
    assert compare.model_numbers(_meta("pre", norm_eps=1e-6))["eps"] == 1e-6
    assert compare.norm_eps({"norms": [{"eps": 1e-6}]}) == 1e-6 and compare.norm_eps({}) == 1e-5
