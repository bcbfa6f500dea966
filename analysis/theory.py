"""Predictions of docs/theory.md (sections "Forward variance laws" and "Gradients") as pure numpy
functions of configuration numbers and measured parameters (γ, β). No torch, and no metadata:
every number is an argument (analysis.compare reads them from a run's meta.json).

Notation as in docs/theory.md: ``D`` = d_model, ``L`` = blocks (2L sublayers, ordered attn_0, mlp_0,
attn_1, mlp_1, ...), ``x_l`` = residual stream entering block l (``x_L`` = last block's output),
``m2(x)`` = mean of x² over tokens and channels. Profiles are arrays over l = 0..L (length L+1).
Source tags: [paper] Peri-LN paper (Kim et al. 2025), [rel] a related paper, [derived] derived in
docs/theory.md and checked by simulation in tests/test_theory.py.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from numpy.polynomial.hermite_e import hermegauss
from scipy.special import expit, ndtr

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "identity")
_GH_X, _GH_W = hermegauss(96)          # probabilists' Gauss–Hermite: weight exp(-x²/2)
_GH_W = _GH_W / math.sqrt(2.0 * math.pi)  # so that sum(w·f(x)) = E[f(Z)], Z ~ N(0, 1)


def _phi(z: np.ndarray, act: str) -> np.ndarray:
    if act == "relu":
        return np.maximum(z, 0.0)
    if act == "gelu":
        return z * ndtr(z)
    if act == "gelu_tanh":
        return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))
    if act == "silu":
        return z * expit(z)
    if act == "identity":
        return z
    raise ValueError(f"unknown activation {act!r}: expected one of {ACTIVATIONS}")


def q_phi(s2: float | np.ndarray, act: str = "gelu") -> float | np.ndarray:
    """q_φ(s²) = E_{z~N(0,s²)}[φ(z)²] [derived, docs/theory.md "Forward variance laws" Pre-LN].

    Computed by Gauss–Hermite quadrature (96 nodes) of the SYMMETRISED integrand
    ½(φ(z)² + φ(−z)²), which has the same expectation because z is symmetric. For ReLU it is z²/2,
    a polynomial, so q_relu(s²) = s²/2 exactly; for GELU it is z²(Φ(z)² + Φ(−z)²)/2 and for SiLU
    z²(σ(z)² + σ(−z)²)/2, both analytic, so the quadrature converges fast (the plain integrand has a
    kink-like shoulder at 0 that Gauss–Hermite handles poorly). Checked against adaptive quadrature:
    relative error < 1e-10 for s² ≤ 4, about 2e-4 for GELU at s² = 25.
    ``act="swiglu"``: h = silu(u)·w with u, w independent N(0, s²) pre-activations (gate and up
    projections of the same normalised input with independent weights): E[h²] = q_silu(s²)·s².
    ``gelu_tanh`` is the tanh approximation of GELU.
    """
    s2_arr = np.asarray(s2, dtype=np.float64)
    if np.any(s2_arr < 0):
        raise ValueError(f"q_phi needs a variance s2 >= 0, got {s2}")
    if act == "swiglu":
        out = np.asarray(q_phi(s2_arr, "silu")) * s2_arr
    else:
        z = np.sqrt(s2_arr)[..., None] * _GH_X                           # (..., n) nodes scaled by s
        sym = 0.5 * (_phi(z, act) ** 2 + _phi(-z, act) ** 2)
        out = sym @ _GH_W
    return float(out) if np.ndim(out) == 0 else out


# ---------------------------------------------------------------------------------------------
# Peri-LN
# ---------------------------------------------------------------------------------------------
def peri_additive_m2(m2_0: float | np.ndarray, gain_ms: np.ndarray,
                     bias_ms: np.ndarray | float | None = None) -> np.ndarray:
    """Additive part of the Peri-LN variance law from measured output-norm parameters [derived].

    m2(x_l) = m2(x_0) + Σ_{sublayers s < 2l} (mean γ_out,s² + mean β_out,s²)

    ``gain_ms``/``bias_ms``: shape (..., 2L), sublayers in order attn_0, mlp_0, attn_1, ... (leading
    dimensions, e.g. steps, broadcast with ``m2_0``). Returns (..., L+1). Assumes the cross term
    (2/D)·E<x_l, ã_l> is zero (true in expectation at init) and ε ≪ branch power; during training
    ``measured − additive`` estimates the cross term.
    """
    g = np.asarray(gain_ms, dtype=np.float64)
    if g.shape[-1] % 2:
        raise ValueError(f"gain_ms must have 2L entries on its last axis (attn, mlp per block), got {g.shape}")
    b = np.zeros_like(g) if bias_ms is None else np.broadcast_to(np.asarray(bias_ms, np.float64), g.shape)
    per_block = (g + b).reshape(*g.shape[:-1], -1, 2).sum(-1)        # (..., L)
    zeros = np.zeros(g.shape[:-1] + (1,))
    return np.asarray(m2_0, dtype=np.float64)[..., None] + np.concatenate([zeros, np.cumsum(per_block, -1)], -1)


def peri_init_m2(L: int, gains_out_ms: float | np.ndarray = 1.0, embed_norm: bool = True,
                 m2_0: float | None = None, bias_out_ms: float | np.ndarray = 0.0,
                 branch_power: float | np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
    """Peri-LN residual-stream profile at init [paper: linear growth; derived: exact form].

    m2(x_l) = m2(x_0) + Σ_{s < 2l} (mean(γ_out,s²)·f_s + mean(β_out,s²)),  f_s = p_s/(p_s + ε)

    → 1 + 2l with an embedding norm, γ = 1 and branch powers p_s ≫ ε, whatever D, init std,
    activation or norm type. ``gains_out_ms``: scalar or (2L,) per sublayer. ``m2_0``: m2 of the
    stream entering block 0; default 1.0 with ``embed_norm``; without an embedding norm it must be
    given (e.g. the measured value). ``branch_power`` (scalar, (2L,) or (2L, T) per position): the
    power the output norm sees — var of the raw branch output for LayerNorm, m2 for RMSNorm — and
    ``eps`` that norm's ε; see :func:`peri_eps_m2`.
    """
    if m2_0 is None:
        if not embed_norm:
            raise ValueError("peri_init_m2 without an embedding norm needs m2_0 (m2 of the embedding "
                             "output, e.g. the measured resid m2 at layer 0)")
        m2_0 = 1.0
    gains = np.broadcast_to(np.asarray(gains_out_ms, np.float64), (2 * L,))
    bias = np.broadcast_to(np.asarray(bias_out_ms, np.float64), (2 * L,))
    if branch_power is None or eps == 0.0:
        return peri_additive_m2(m2_0, gains, bias)
    return peri_eps_m2(m2_0, gains, branch_power, eps, bias)


def peri_eps_m2(m2_0: float | np.ndarray, gain_ms: np.ndarray, branch_power: float | np.ndarray, eps: float,
                bias_ms: np.ndarray | float | None = None, per_block: int = 2) -> np.ndarray:
    """Peri-LN variance law with the output norm's ε.

    [derived, docs/theory.md "Forward variance laws", finite-size effect (1)]

    Per token, a norm with gain γ turns a vector of power p (var for LayerNorm, m2 for RMSNorm) into
    one of m2 = mean(γ²)·p/(p + ε) (+ mean β²). Branch outputs of a small-init model are tiny
    (~1e-4 to 1e-5 for σ = 0.02, D = 64), so the ε-free 1 + 2l law overestimates. Sublayer s adds
    mean(γ_s²)·mean_t f(p_{s,t}) + mean(β_s²), f(p) = p/(p + ε); the cross term is zero at init.

    ``gain_ms``, ``bias_ms``: (..., S) with S = per_block·L sublayers (attn_0, mlp_0, ...);
    ``branch_power``: broadcastable to (..., S) or (..., S, T) — the last axis then holds per-token
    (or per-position) powers averaged after the ε factor (f is concave: averaging first would
    overestimate). Returns (..., L+1).
    """
    g = np.asarray(gain_ms, dtype=np.float64)
    p = np.asarray(branch_power, dtype=np.float64)
    f = norm_eps_factor(p, eps)
    f = np.asarray(f, np.float64)
    if f.ndim == g.ndim + 1:
        f = f.mean(-1)
    f = np.broadcast_to(f, g.shape)
    b = np.zeros_like(g) if bias_ms is None else np.broadcast_to(np.asarray(bias_ms, np.float64), g.shape)
    if g.shape[-1] % per_block:
        raise ValueError(f"expected {per_block}·L sublayer entries on the last axis, got shape {g.shape}")
    per = (g * f + b).reshape(*g.shape[:-1], -1, per_block).sum(-1)        # (..., L)
    zeros = np.zeros(g.shape[:-1] + (1,))
    return np.asarray(m2_0, dtype=np.float64)[..., None] + np.concatenate([zeros, np.cumsum(per, -1)], -1)


def peri_hard_bound_rms(rms_0: float | np.ndarray, gain_absmax: np.ndarray,
                        bias_ms: np.ndarray | float | None = None) -> np.ndarray:
    """Peri-LN hard bound on the stream RMS at any step [derived, docs/theory.md "Forward variance laws"].

    RMS(x_l) ≤ RMS(x_0) + Σ_{s < 2l} (max|γ_s| + RMS(β_s)),  RMS(β) = sqrt(mean β²) = sqrt(bias_ms).

    Holds per token because a normalised vector has RMS ≤ 1 (exactly 1 as ε → 0, less with ε > 0,
    LayerNorm or RMSNorm) and the triangle inequality; over all tokens by Minkowski. Inputs:
    ``gain_absmax``, ``bias_ms`` of the OUTPUT norms, shape (..., 2L). Returns (..., L+1).
    Dropout after the output norm (scaling by 1/(1−p)) is not covered.
    """
    g = np.asarray(gain_absmax, dtype=np.float64)
    b = np.zeros_like(g) if bias_ms is None else np.sqrt(np.broadcast_to(np.asarray(bias_ms, np.float64), g.shape))
    return _cumulative_bound(rms_0, np.abs(g) + b)


def peri_hard_bound_absmax(absmax_0: float | np.ndarray, gain_absmax: np.ndarray, D: int,
                           bias_ms: np.ndarray | float | None = None) -> np.ndarray:
    """Per-coordinate Peri-LN bound in the form the recorded statistics allow [derived].

    |x_{l,i}| ≤ |x_{0,i}| + Σ_s (|γ_{s,i}|·sqrt(D) + |β_{s,i}|) (see :func:`peri_hard_bound_coord`),
    maximised over coordinates with max|β_i| ≤ sqrt(D·mean β²):
    max|x_l| ≤ max|x_0| + Σ_{s < 2l} sqrt(D)·(max|γ_s| + sqrt(bias_ms_s)). Returns (..., L+1).
    """
    g = np.asarray(gain_absmax, dtype=np.float64)
    b = np.zeros_like(g) if bias_ms is None else np.sqrt(np.broadcast_to(np.asarray(bias_ms, np.float64), g.shape))
    return _cumulative_bound(absmax_0, math.sqrt(D) * (np.abs(g) + b))


def peri_hard_bound_coord(x0_abs: np.ndarray, gain_abs: np.ndarray,
                          bias_abs: np.ndarray | None = None) -> np.ndarray:
    """Per-coordinate Peri-LN bound [derived]: |x_{l,i}| ≤ |x_{0,i}| + Σ_{s<2l}(|γ_{s,i}|·sqrt(D) + |β_{s,i}|).

    A normalised vector of D coordinates has Σ â_i² ≤ D, so each |â_i| ≤ sqrt(D).
    ``x0_abs``: (D,) (or (..., D)); ``gain_abs``/``bias_abs``: (2L, D). Returns (L+1, D) (leading dims kept).
    """
    g = np.abs(np.asarray(gain_abs, np.float64))
    D = g.shape[-1]
    b = np.zeros_like(g) if bias_abs is None else np.abs(np.asarray(bias_abs, np.float64))
    per_block = (g * math.sqrt(D) + b).reshape(-1, 2, D).sum(1)       # (L, D)
    steps = np.concatenate([np.zeros((1, D)), np.cumsum(per_block, 0)], 0)  # (L+1, D)
    return np.asarray(x0_abs, np.float64)[..., None, :] + steps


def _cumulative_bound(start: float | np.ndarray, per_sublayer: np.ndarray) -> np.ndarray:
    if per_sublayer.shape[-1] % 2:
        raise ValueError(f"expected 2L sublayer entries on the last axis, got shape {per_sublayer.shape}")
    per_block = per_sublayer.reshape(*per_sublayer.shape[:-1], -1, 2).sum(-1)
    zeros = np.zeros(per_sublayer.shape[:-1] + (1,))
    return np.asarray(start, np.float64)[..., None] + np.concatenate([zeros, np.cumsum(per_block, -1)], -1)


# ---------------------------------------------------------------------------------------------
# Post-LN, norm ε
# ---------------------------------------------------------------------------------------------
def post_level(gain_ms: float | np.ndarray, bias_ms: float | np.ndarray = 0.0) -> float | np.ndarray:
    """Post-LN stream level [paper: constant in depth; derived]: m2 ≈ mean(γ²) + mean(β²) of the
    norm that produced the block output; exactly 1 at init (γ = 1, β = 0, ε ≪ var).

    During training this assumes the normalised coordinates' second moments are uncorrelated with
    γ² across channels and mean(γ·β·ẑ) ≈ 0 (an approximation; it fails when a few channels carry
    most of the power).
    """
    out = np.asarray(gain_ms, np.float64) + np.asarray(bias_ms, np.float64)
    return float(out) if out.ndim == 0 else out


def norm_eps_factor(s: float | np.ndarray, eps: float) -> float | np.ndarray:
    """Per token, m2(Norm(a)) = mean(γ²)·s/(s + ε) with s = var(a) (LayerNorm) or m2(a) (RMSNorm)
    [derived, docs/theory.md "Forward variance laws" finite-size effect (1)]. Returns the factor s/(s + ε)."""
    s = np.asarray(s, np.float64)
    out = s / (s + eps)
    return float(out) if out.ndim == 0 else out


# ---------------------------------------------------------------------------------------------
# Pre-LN and variants at init: branch powers
# ---------------------------------------------------------------------------------------------
def mlp_branch_power(D: int, d_ff: int, sigma_in: float, sigma_out: float, act: str = "gelu",
                     input_m2: float | np.ndarray = 1.0) -> float | np.ndarray:
    """m2 of an MLP output at init [derived]: v = d_ff·σ_out²·q_φ(D·σ_in²·m2(input)).

    Each pre-activation is a sum of D inputs times N(0, σ_in²) weights → N(0, D·σ_in²·m2(input));
    each output a sum of d_ff hidden units times N(0, σ_out²) weights. Biases zero. A normalised
    input (LayerNorm/RMSNorm with γ = 1) has m2 = 1.
    """
    return d_ff * sigma_out ** 2 * q_phi(D * sigma_in ** 2 * np.asarray(input_m2, np.float64), act)


def attn_branch_power(D: int, sigma_v: float, sigma_o: float, T: int,
                      input_m2: float | np.ndarray = 1.0) -> tuple[Any, Any]:
    """Interval of the attention output m2 at init [derived]: v_attn(t) = (D σ_V² m2)(D σ_O²)·c_t.

    c_t = Σ_s A_ts² × (correlation of the attended values) lies between mean_t(1/t) (uniform causal
    attention — what near-zero logits at small init give — over uncorrelated inputs) and 1
    (identical inputs, or all weight on one token). Returns (low, high), averaged over positions
    t = 1..T.
    """
    base = (D * sigma_v ** 2 * np.asarray(input_m2, np.float64)) * (D * sigma_o ** 2)
    mean_inv_t = float(np.mean(1.0 / np.arange(1, T + 1)))
    return base * mean_inv_t, base


def pre_init_increment_interval(D: int, d_ff: int, init_std: float, T: int, act: str = "gelu",
                                scaled_init: bool = False, L: int | None = None) -> tuple[float, float, float]:
    """Pre-LN per-block increment of m2 at init: (v_mlp, v_attn_min, v_attn_max).

    [derived, docs/theory.md "Forward variance laws"]

    m2(x_{l+1}) − m2(x_l) = v_attn + v_mlp at init (ρ = 0 in expectation; the normalised input makes
    v independent of x), with v_mlp = d_ff·σ2²·q_φ(D·σ1²) and
    v_attn ∈ [(Dσ_V²)(Dσ_O²)·mean_t(1/t), (Dσ_V²)(Dσ_O²)].
    All weights N(0, init_std²); ``scaled_init`` (GPT-2 style) divides the std of the two output
    projections (attention out, MLP out) by sqrt(2L), so their terms by 2L. ``act``: relu | gelu |
    gelu_tanh | silu | swiglu. Example σ 0.02, d_ff 4D, GELU: D 256 → v_mlp 0.0122.
    """
    if scaled_init and not L:
        raise ValueError("pre_init_increment_interval(scaled_init=True) needs L (number of blocks): "
                         "the output projections use std init_std/sqrt(2L)")
    s_out = init_std / math.sqrt(2 * L) if scaled_init else init_std
    v_mlp = float(mlp_branch_power(D, d_ff, init_std, s_out, act))
    lo, hi = attn_branch_power(D, init_std, s_out, T)
    return v_mlp, float(lo), float(hi)


def pre_init_profile(L: int, m2_0: float, v_mlp: float, v_attn_min: float,
                     v_attn_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Pre-LN m2 profile interval at init [derived]: m2(x_l) ∈ m2_0 + l·[v_mlp + v_attn_min, v_mlp + v_attn_max].
    Returns (low, high), each (L+1,)."""
    l = np.arange(L + 1, dtype=np.float64)
    return m2_0 + l * (v_mlp + v_attn_min), m2_0 + l * (v_mlp + v_attn_max)


def lns_init_profile(L: int, m2_0: float, s1: float) -> np.ndarray:
    """LN-scaled Pre-LN harmonic law at init [derived]: m2(x_l) = m2_0 + s_1·H_l, H_l = Σ_{k=1..l} 1/k.

    Block k (1-based) feeds Norm(x)/sqrt(k) to its branches, so a branch whose output power is
    linear in its input power (attention, a ReLU or linear MLP) adds s_1/k, s_1 being the per-block
    increment of an unscaled block. For GELU/SiLU the law is approximate (q_φ is not linear); use
    :func:`lns_init_interval` for the exact per-block terms.
    """
    H = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, L + 1))])
    return m2_0 + s1 * H


def lns_init_interval(L: int, m2_0: float, D: int, d_ff: int, init_std: float, T: int,
                      act: str = "gelu", scaled_init: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """LN-scaled Pre-LN m2 profile interval at init with the exact per-block branch powers [derived]:
    block k (1-based) adds v_mlp(input m2 = 1/k) + v_attn(input m2 = 1/k). Returns (low, high)."""
    s_out = init_std / math.sqrt(2 * L) if scaled_init else init_std
    k = np.arange(1, L + 1, dtype=np.float64)
    v_mlp = mlp_branch_power(D, d_ff, init_std, s_out, act, input_m2=1.0 / k)
    lo, hi = attn_branch_power(D, init_std, s_out, T, input_m2=1.0 / k)
    zero = np.zeros(1)
    return (m2_0 + np.concatenate([zero, np.cumsum(v_mlp + lo)]),
            m2_0 + np.concatenate([zero, np.cumsum(v_mlp + hi)]))


def output_init_interval(L: int, m2_0: float, D: int, d_ff: int, init_std: float, T: int,
                         act: str = "gelu", eps: float = 1e-5, scaled_init: bool = False
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Output-LN-only (x = x + Norm(F(x))) m2 profile at init with the norm's ε [derived, approximate].

    The branch sees the UNnormalised stream, so its raw output power scales with the stream:
    v_mlp = d_ff σ2² q_φ(D σ1² m2(x_t)) per token, and with uniform causal attention at position t
    v_attn(t) = (D σ_V²)(D σ_O²)·(1/t²)·Σ_{s≤t} m2(x_s) for uncorrelated tokens (low) or
    (D σ_V²)(D σ_O²)·mean_{s≤t} m2(x_s) for identical ones (high). The output norm (γ = 1) turns a
    raw power p into p/(p + ε) (:func:`norm_eps_factor`), so with small init and no input norm the
    first sublayers add far less than 1 (docs/theory.md "Forward variance laws" effect (1)); once the stream
    is O(1) each
    sublayer adds ≈ 1. The stream power is tracked per position t = 1..T (the early positions get
    most of the first attention output) and averaged at the end. Approximation: tokens at one
    position share one power; RMSNorm and LayerNorm alike (zero-mean branch outputs).
    Returns (low, high), each (L+1,).
    """
    s_out = init_std / math.sqrt(2 * L) if scaled_init else init_std
    t = np.arange(1, T + 1, dtype=np.float64)
    base = (D * init_std ** 2) * (D * s_out ** 2)
    out = []
    for correlated in (False, True):
        x = np.full(T, float(m2_0))                                          # (T,) m2 per position
        prof = [float(m2_0)]
        for _ in range(L):
            csum = np.cumsum(x)
            p_attn = base * (csum / t if correlated else csum / t ** 2)      # (T,) raw power
            x = x + norm_eps_factor(p_attn, eps)
            x = x + norm_eps_factor(mlp_branch_power(D, d_ff, init_std, s_out, act, input_m2=x), eps)
            prof.append(float(x.mean()))
        out.append(np.asarray(prof))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------
def prop31_pre_identity(h_norm: float | np.ndarray, g_norm: float | np.ndarray) -> float | np.ndarray:
    """Proposition 3.1, Pre-LN [paper; derived exact form]: per token, ‖∂L/∂W2‖_F = ‖h‖·‖g‖.

    MLP a = h W2 (+ b2), o = x + a, g = ∂L/∂o = ∂L/∂a; ∂L/∂W2 = hᵀg is rank one. For several tokens
    the gradient is Σ_t h_tᵀ g_t and ‖h‖·‖g‖ summed over tokens is an upper bound (triangle
    inequality), see :func:`prop31_batched_bound`.
    """
    return np.asarray(h_norm, np.float64) * np.asarray(g_norm, np.float64)


def prop31_peri_bound(h_norm: float | np.ndarray, g_norm: float | np.ndarray, a_norm: float | np.ndarray,
                      gamma_absmax: float | np.ndarray, D: int) -> float | np.ndarray:
    """Proposition 3.1, Peri-LN [paper, constants unconfirmed; derived]: per token
    ‖∂L/∂W2‖_F ≤ max|γ_out|·sqrt(D)·‖h‖·‖g‖/‖a‖.

    o = x + Norm(a): the RMSNorm Jacobian is diag(γ)·sqrt(D)/‖a‖·(I − â âᵀ), norm ≤ max|γ|·sqrt(D)/‖a‖
    (ε > 0 only shrinks it). For LayerNorm pass ‖a − mean(a)‖ as ``a_norm``. The paper's looser
    form is :func:`prop31_paper_bound`.
    """
    return (np.asarray(gamma_absmax, np.float64) * math.sqrt(D) * np.asarray(h_norm, np.float64)
            * np.asarray(g_norm, np.float64) / np.asarray(a_norm, np.float64))


def prop31_paper_bound(h_norm: float | np.ndarray, a_norm: float | np.ndarray, gamma: float | np.ndarray,
                       D: int) -> float | np.ndarray:
    """The paper's form of the Peri-LN bound [paper, second-hand]: ≤ 4γ·sqrt(D)·‖h‖/‖a‖ (the
    gradient ‖g‖ at the output is taken as bounded)."""
    gamma, h_norm, a_norm = (np.asarray(v, np.float64) for v in (gamma, h_norm, a_norm))
    return 4.0 * gamma * math.sqrt(D) * h_norm / a_norm


def prop31_batched_bound(n_tokens: int, d_ff: int, D: int, rms_h: float | np.ndarray,
                         grad_rms_a: float | np.ndarray) -> float | np.ndarray:
    """Batched form of the Pre-LN identity from recorded statistics [derived]:

    ‖Σ_t h_tᵀ g_t‖_F ≤ Σ_t ‖h_t‖‖g_t‖ ≤ sqrt(Σ‖h_t‖²)·sqrt(Σ‖g_t‖²) = N·sqrt(d_ff·D)·rms(h)·rms(g),

    N tokens in the optimizer step, h = ``mlp_act`` (d_ff wide), g = ∂L/∂a at ``mlp_raw`` (= ``mlp_out``
    for Pre-LN), D wide. Exact inequality for any placement; equality needs all h_t, g_t aligned.
    """
    return n_tokens * math.sqrt(d_ff * D) * np.asarray(rms_h, np.float64) * np.asarray(grad_rms_a, np.float64)


def xiong_grad_profile(placement: str, L: int, D: int, m2_final: float = 1.0) -> np.ndarray:
    """Per-layer scale of the W2 gradient norm at init [rel: Xiong et al. 2020] — RELATIVE profiles,
    orders of magnitude only (constants unknown), shape (L,).

    Pre-LN: D·sqrt(ln D)/sqrt(m2(x_L)) at every layer (flat; the final norm divides every gradient
    by the stream RMS it sees — Xiong's 1/sqrt(L) is this factor at their init, where m2(x_L) ∝ L).
    Post-LN: D·sqrt(ln D) at the LAST layer, independent of L, and growing with layer index below it;
    the shape of that growth is not given, so layers < L−1
    are NaN. Other placements: NaN (no such result).
    """
    out = np.full(L, np.nan)
    if placement in ("pre", "lns"):
        out[:] = D * math.sqrt(math.log(D)) / math.sqrt(m2_final)
    elif placement == "post":
        out[-1] = D * math.sqrt(math.log(D))
    return out


def post_over_pre_grad(m2_final_pre: float) -> float:
    """Predicted ratio ‖∇W2‖_Post / ‖∇W2‖_Pre of the last layer at init [rel: Xiong et al. 2020; derived]:
    sqrt(m2_Pre(x_L)).

    Xiong's Pre-LN scale D·sqrt(ln D / L) carries 1/sqrt(L) only because at their init (weights
    N(0, 1/D)) m2(x_L) grows ∝ L: the factor IS the final norm's 1/sqrt(m2(x_L)). The general form
    is ‖∇W‖_Pre ≈ D·sqrt(ln D)/sqrt(m2_Pre(x_L)) against ‖∇W‖_Post ≈ D·sqrt(ln D), so the ratio is
    sqrt(m2_Pre(x_L)) — L must not be multiplied in again. Above 1 (the paper's Post > Pre) only
    when m2_Pre(x_L) > 1; small init (σ = 0.02) gives m2(x_L) < 1 and flips the ordering.
    """
    if not m2_final_pre > 0:
        raise ValueError(f"post_over_pre_grad needs m2(x_L) > 0 of the Pre-LN run, got {m2_final_pre}")
    return math.sqrt(m2_final_pre)


# ---------------------------------------------------------------------------------------------
# Init profile by placement (numbers given by the caller)
# ---------------------------------------------------------------------------------------------
def qk_logit_bound(d_head: int, gain_q_absmax: float | np.ndarray,
                   gain_k_absmax: float | np.ndarray) -> float | np.ndarray:
    """The attention-logit bound under QK-norm, sqrt(d_h)·max|γ_q|·max|γ_k| [related: Wortsman et al.
    2023; docs/theory.md §5].

    A bias-free RMSNorm or LayerNorm over the d_h channels of a head gives q̂ = γ_q ⊙ u with
    ‖u‖₂ ≤ sqrt(d_h) (equality without ε), so |q̂·k̂|/sqrt(d_h) ≤ ‖q̂‖‖k̂‖/sqrt(d_h) ≤ sqrt(d_h)·max|γ_q|·max|γ_k|
    (Cauchy–Schwarz). The recorded ``qk_absmax`` of such a model cannot exceed it.
    """
    if d_head < 1:
        raise ValueError(f"qk_logit_bound needs d_head >= 1, got {d_head}")
    return math.sqrt(d_head) * np.abs(gain_q_absmax) * np.abs(gain_k_absmax)


def default_d_ff(d_model: int, mlp: str = "gelu") -> int:
    """Reference GPT default MLP width: 4·D for GELU; SwiGLU 8/3·D rounded up to a multiple of 8."""
    if mlp == "swiglu":
        return int(8 * math.ceil(8 * d_model / 3 / 8))
    return 4 * d_model


def embedding_m2(init_std: float, learned_pos: bool = True) -> float:
    """m2 of token (+ learned position) embeddings drawn N(0, σ²): σ² per table."""
    return (2.0 if learned_pos else 1.0) * init_std ** 2


def predict_init_profile(placement: str, L: int, *, numbers: dict[str, Any] | None = None,
                         m2_0: float | None = None, embed_norm: bool | None = None) -> pd.DataFrame | None:
    """Predicted m2(x_l) of ``resid`` at init: DataFrame(layer, low, mid, high), l = 0..L.

    Every input is an argument (the caller reads them from the run's metadata, see
    ``analysis.compare.model_numbers``). ``numbers``: D, d_ff, init_std, T, act, scaled_init, eps,
    pos ("learned" or not) — needed by pre/lns/output, and by peri/post only to compute m2_0.
    peri → the additive law m2_0 + 2l (m2_0 = 1 with ``embed_norm``; ε ignored here — the ε law
    needs measured or predicted branch powers, :func:`peri_eps_m2`); post → m2_0 at layer 0, 1 at
    layers 1..L; pre/lns → interval from the branch powers; output → the ε-effect interval.
    ``m2_0`` (measured m2 of resid at layer 0) replaces the computed embedding m2 when given.
    Returns None for placements without a theory (none, mixed, unknown) or without the numbers;
    ``attrs`` holds "placement", "source" and "note".
    """
    if placement in ("none", "mixed", "unknown") or L is None:
        return None
    L = int(L)
    num = numbers
    start = m2_0 if m2_0 is not None else (embedding_m2(num["init_std"], num.get("pos", "learned") == "learned")
                                           if num else None)
    note, source = "", "[derived]"
    if placement == "peri":
        if embed_norm is None or embed_norm:
            mid = peri_init_m2(L, 1.0, embed_norm=True)
            note = "1 + 2l (embedding norm, γ = 1)"
        else:
            if start is None:
                return None
            mid = peri_init_m2(L, 1.0, embed_norm=False, m2_0=start)
            note = "m2_0 + 2l (no embedding norm)"
        low = high = mid
        source = "[paper]/[derived]"
    elif placement == "post":
        mid = np.r_[start if start is not None else np.nan, np.ones(L)]
        low = high = mid
        note = "flat 1 after every block (γ = 1, β = 0)"
        source = "[paper]/[derived]"
    elif placement in ("pre", "lns", "output"):
        if num is None:
            return None
        if placement == "pre":
            v_mlp, lo, hi = pre_init_increment_interval(num["D"], num["d_ff"], num["init_std"], num["T"],
                                                        num["act"], num["scaled_init"], L)
            low, high = pre_init_profile(L, start, v_mlp, lo, hi)
            note = f"m2_0 + l·[{v_mlp + lo:.4g}, {v_mlp + hi:.4g}] (v_mlp {v_mlp:.4g})"
        elif placement == "lns":
            low, high = lns_init_interval(L, start, num["D"], num["d_ff"], num["init_std"], num["T"],
                                          num["act"], num["scaled_init"])
            note = "harmonic law: block k adds (v_mlp + v_attn)(1/k)"
        else:
            low, high = output_init_interval(L, start, num["D"], num["d_ff"], num["init_std"], num["T"],
                                             num["act"], num["eps"], num["scaled_init"])
            note = "ε-effect model (approximate): raw branch power s → s/(s+ε) after the output norm"
            source = "[derived, approximate]"
        mid = 0.5 * (low + high)
    else:
        return None
    out = pd.DataFrame({"layer": np.arange(L + 1), "low": np.asarray(low, float), "mid": np.asarray(mid, float),
                        "high": np.asarray(high, float)})
    out.attrs.update(placement=placement, source=source, note=note)
    return out
