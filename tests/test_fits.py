"""analysis.fits: growth classification on synthetic profiles with noise, κ/ρ attribution against
values computed by hand from a simulated stream, growth over steps."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lnprobe.analysis.fits import attribution, classify_growth, growth_over_steps

LAYERS = np.arange(13)


def _noisy(v, seed, rel=0.02):
    rng = np.random.default_rng(seed)
    return v * (1 + rel * rng.standard_normal(v.shape))


@pytest.mark.parametrize("seed", range(5))
def test_classifies_linear_quadratic_exponential_and_flat(seed):
    cases = {
        "linear": 1 + 2 * LAYERS,                      # Peri-LN at init
        "quadratic": 1 + 0.5 * LAYERS ** 2.0,
        "exponential": 0.5 * 1.6 ** LAYERS,            # Pre-LN after training
        "flat": np.ones(13),                           # Post-LN
    }
    for want, v in cases.items():
        fit = classify_growth(LAYERS, _noisy(v, seed))
        assert fit.best == want, (want, fit.best, fit.aic)


def test_fit_parameters_and_ratios():
    v = 0.5 * 1.6 ** LAYERS
    fit = classify_growth(LAYERS, v)
    # exponential with offset a + b·c^l (changed from the offset-free (a, r)): exact data, a = 0
    assert fit.params["exponential"] == pytest.approx((0.0, 0.5, 1.6), abs=1e-6)
    assert fit.growth_rate == pytest.approx(1.6)
    np.testing.assert_allclose(fit.ratios, 1.6)
    assert fit.super_linear
    lin = classify_growth(LAYERS, 1 + 2 * LAYERS)
    assert lin.params["linear"] == pytest.approx((1.0, 2.0))
    assert lin.slope == pytest.approx(2.0)
    np.testing.assert_allclose(lin.ratios, (3 + 2 * LAYERS[:-1]) / (1 + 2 * LAYERS[:-1]))
    assert not lin.super_linear
    # AIC uses residuals in the ORIGINAL space: exact exponential data gives exponential the
    # smallest residual, and the log-linear fit is not rewarded on linear data
    assert lin.aic["linear"] < lin.aic["exponential"]


def test_flat_when_relative_change_is_small_and_insufficient_points():
    fit = classify_growth(LAYERS, 100 + 0.2 * LAYERS)        # 2.4 % change over 12 layers
    assert fit.best == "flat" and fit.fit_best == "linear"
    assert classify_growth([0, 1], [1, 2]).best == "insufficient"
    # non-finite values are dropped, non-positive ones disable only the exponential model
    v = 1 + 2 * LAYERS.astype(float)
    v[3] = np.nan
    assert classify_growth(LAYERS, v).best == "linear"
    # the offset exponential fits profiles that cross zero too (the old log-linear one could not)
    neg = classify_growth(LAYERS, -1 + 2 * LAYERS)
    assert neg.best == "linear" and not neg.super_linear
    with pytest.raises(ValueError, match="same length"):
        classify_growth([0, 1, 2], [1, 2])


def _records(step, resid, mid, attn, mlp):
    rows = []
    for site, vals in (("resid", resid), ("resid_mid", mid), ("attn_out", attn), ("mlp_out", mlp)):
        rows += [(step, site, l, "m2", float(v)) for l, v in enumerate(vals)]
    return pd.DataFrame(rows, columns=["step", "site", "layer", "stat", "value"])


def test_attribution_matches_hand_computed_kappa_and_rho():
    # a stream where each branch output a = c·x + noise, so ρ is known by construction
    rng = np.random.default_rng(0)
    N, D, L = 512, 64, 3
    x = rng.standard_normal((N, D))
    resid, mid, attn, mlp, rho_true = [np.mean(x ** 2)], [], [], [], []
    for l in range(L):
        for name in ("attn", "mlp"):
            a = (0.3 + 0.1 * l) * x + 0.5 * rng.standard_normal((N, D))
            rho_true.append(np.mean(x * a) / np.sqrt(np.mean(x ** 2) * np.mean(a ** 2)))
            (attn if name == "attn" else mlp).append(np.mean(a ** 2))
            kappa_in = np.mean(x ** 2)
            x = x + a
            (mid if name == "attn" else resid).append(np.mean(x ** 2))
    att = attribution(_records(7, resid, mid, attn, mlp))
    assert list(att["sublayer"][:2]) == ["attn", "mlp"] and (att["step"] == 7).all()
    np.testing.assert_allclose(att["rho"], rho_true, rtol=1e-10)
    np.testing.assert_allclose(att["v"], np.ravel(np.column_stack([attn, mlp])))
    np.testing.assert_allclose(att["kappa"], att["v"] / att["m2_in"])
    # the mlp sublayer of block 0 starts from resid_mid 0
    assert att.loc[1, "m2_in"] == pytest.approx(mid[0])
    assert kappa_in > 0
    # missing sites -> empty frame with the documented columns
    empty = attribution(_records(0, resid, mid, attn, mlp).query("site != 'resid_mid'"))
    assert empty.empty and "rho" in empty.columns


def test_attribution_of_a_decoder_block_has_a_cross_attention_sublayer():
    # encoder block 0 (two sublayers), decoder block 1 (self-attention, cross-attention, MLP), built so
    # that each branch a = c·x + noise and ρ of every sublayer is known
    rng = np.random.default_rng(1)
    N, D = 512, 64
    x = rng.standard_normal((N, D))
    m2 = lambda t: float(np.mean(t ** 2))  # noqa: E731
    rows, rho_true = [(0, "resid", 0, "m2", m2(x))], []
    for layer, subs in ((0, ("attn", "mlp")), (1, ("attn", "xattn", "mlp"))):
        for name in subs:
            a = 0.4 * x + 0.5 * rng.standard_normal((N, D))
            rho_true.append((layer, name, np.mean(x * a) / np.sqrt(m2(x) * m2(a))))
            rows.append((0, f"{name}_out", layer, "m2", m2(a)))
            x = x + a
            after = {"attn": "resid_mid", "xattn": "resid_xattn", "mlp": "resid"}[name]
            rows.append((0, after, layer + (name == "mlp"), "m2", m2(x)))
    att = attribution(pd.DataFrame(rows, columns=["step", "site", "layer", "stat", "value"]))
    got = {(int(r.layer), r.sublayer): r.rho for r in att.itertuples()}
    assert set(got) == {(l, n) for l, n, _ in rho_true}  # no xattn row for the encoder block
    for layer, name, rho in rho_true:
        assert got[(layer, name)] == pytest.approx(rho, rel=1e-10), (layer, name)
    mlp1 = att[(att.layer == 1) & (att.sublayer == "mlp")].iloc[0]
    xmid = [r[4] for r in rows if r[1] == "resid_xattn"][0]
    assert mlp1.m2_in == pytest.approx(xmid)  # the decoder MLP reads the stream after the cross-attention


def test_growth_over_steps_tracks_a_change_of_class():
    table = pd.DataFrame([1 + 2 * LAYERS, 1 + 0.5 * LAYERS ** 2.0, 0.5 * 1.6 ** LAYERS],
                         index=[0, 100, 200], columns=LAYERS)
    g = growth_over_steps(table)
    assert list(g["step"]) == [0, 100, 200]
    assert list(g["best"]) == ["linear", "quadratic", "exponential"]
    assert g["rate"].iloc[-1] == pytest.approx(1.6)
    assert g["ratio_deep"].iloc[-1] == pytest.approx(1.6)
    assert g["last"].tolist() == pytest.approx([25.0, 73.0, 0.5 * 1.6 ** 12])


def test_aic_is_computed_from_original_space_residuals():
    # changed: the exponential is a + b·c^l fitted in the original space (no log-linear fit), and
    # every model is fitted and scored on the same relative residuals (v − f)/v, k + 1 parameters
    rng = np.random.default_rng(3)
    v = (1 + 2 * LAYERS) * (1 + 0.05 * rng.standard_normal(13))
    fit = classify_growth(LAYERS, v)
    n = len(v)
    a, b, c = fit.params["exponential"]
    rss = np.sum(((v - a - b * c ** LAYERS) / v) ** 2)
    assert fit.aic["exponential"] == pytest.approx(n * np.log(rss / n) + 8)
    b1, a1 = np.polyfit(LAYERS, v, 1, w=1 / v)                       # independent weighted fit
    assert fit.aic["linear"] == pytest.approx(n * np.log(np.sum(((v - a1 - b1 * LAYERS) / v) ** 2) / n) + 6)
    # plain residuals on request
    plain = classify_growth(LAYERS, v, relative=False)
    b1, a1 = np.polyfit(LAYERS, v, 1)
    assert plain.aic["linear"] == pytest.approx(n * np.log(np.sum((v - a1 - b1 * LAYERS) ** 2) / n) + 6)


def test_offset_exponential_and_squared_linear_models():
    # a linear start with a geometric tail: only the offset model fits it
    v = 3.0 + 0.1 * 1.5 ** LAYERS
    fit = classify_growth(LAYERS, v)
    assert fit.best == "exponential" and fit.super_linear
    assert fit.params["exponential"] == pytest.approx((3.0, 0.1, 1.5), rel=1e-5)
    sq = classify_growth(LAYERS, (1 + 0.5 * LAYERS) ** 2)
    assert sq.best == "sq_linear" and sq.super_linear
    assert sq.params["sq_linear"] == pytest.approx((1.0, 0.5), rel=1e-6)


@pytest.mark.parametrize("seed", range(20))
def test_noisy_straight_profile_is_never_super_linear(seed):
    # an offset exponential with c ≈ 1 can win AIC on the noise of a straight line: it must not
    # make the profile super-linear
    fit = classify_growth(LAYERS, _noisy(1 + 2 * LAYERS, seed))
    assert fit.best == "linear" and not fit.super_linear, (fit.fit_best, fit.params, fit.bend)


def test_growth_over_steps_includes_layer_zero_and_flags_super_linear():
    table = pd.DataFrame([1 + 2 * LAYERS, 0.05 * 2.0 ** LAYERS], index=[0, 10], columns=LAYERS)
    g = growth_over_steps(table)
    assert g["super_linear"].tolist() == [False, True]
    assert growth_over_steps(table, min_layer=1)["last"].tolist() == g["last"].tolist()


def test_rho_is_a_bounded_cosine():
    # inconsistent statistics (stream m2 dropping by more than the branch power allows) gave ρ = −2.39
    # before: the computed value is kept in rho_raw, rho is clipped to [−1, 1] or NaN when far outside
    resid, mid, attn, mlp = [1.0, 1.0], [1.0 + 1e-4], [1e-4], [1.0]
    att = attribution(_records(0, resid, mid, attn, mlp))
    assert att["rho_raw"].notna().all()
    assert ((att["rho"].dropna() >= -1) & (att["rho"].dropna() <= 1)).all()
    bad = attribution(_records(0, [4.0, 4.0], [0.5], [0.3], [0.2]))      # resid_mid far below resid − v
    assert bad["rho_raw"].iloc[0] < -1.05 and np.isnan(bad["rho"].iloc[0])
    just_off = attribution(_records(0, [1.0, 1.0], [0.806], [1e-2], [1e-3]))   # ρ_raw = −1.02: rounding
    assert just_off["rho_raw"].iloc[0] == pytest.approx(-1.02) and just_off["rho"].iloc[0] == -1.0
    # Post-LN has no identity residual path: no attribution
    post = attribution(_records(0, resid, mid, attn, mlp), placement="post")
    assert post["rho"].isna().all() and post["kappa"].isna().all()
