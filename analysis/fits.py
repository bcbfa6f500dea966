"""Growth of a per-layer profile (theory.md §2 "Growth classification") and per-sublayer
attribution of the growth (κ_l, ρ_l).

Models fitted to values v_l over layers l (least squares, 2 parameters each):
    linear       a + b·l
    quadratic    a + b·l²
    exponential  a·r^l      fitted log-linearly (log v = log a + l·log r, needs v > 0)
All three are compared by AIC = n·ln(RSS/n) + 2k computed from residuals in the ORIGINAL space
(so the log-linear fit is not favoured by its own metric). A constant model (k = 1 + 1) competes
too: the profile is "flat" when the constant's AIC is within 2 of the best model's or when the
linear fit changes the value by less than ``flat_tol`` of its mean across the layer range.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

MODELS = ("linear", "quadratic", "exponential")
SUPER_LINEAR = ("quadratic", "exponential")


@dataclass
class GrowthFit:
    """Result of :func:`classify_growth`.

    best: "flat" | "linear" | "quadratic" | "exponential" | "insufficient" (fewer than 3 finite points);
    fit_best: the best of the three growth models by AIC even when the verdict is flat;
    params: model -> (a, b) for linear/quadratic, (a, r) for exponential; aic: model -> AIC
    (inf when a model cannot be fitted, e.g. exponential with v ≤ 0); ratios: r_l = v_{l+1}/v_l;
    slope: b of the linear fit; rel_change: |b|·(l_max − l_min)/|mean v|; delta_aic: AIC of the
    runner-up growth model minus the best's (< 2: the two are hard to tell apart).
    """

    best: str
    fit_best: str
    params: dict[str, tuple[float, float]] = field(default_factory=dict)
    aic: dict[str, float] = field(default_factory=dict)
    ratios: np.ndarray = field(default_factory=lambda: np.zeros(0))
    slope: float = float("nan")
    rel_change: float = float("nan")
    delta_aic: float = float("nan")

    @property
    def super_linear(self) -> bool:
        return self.best in SUPER_LINEAR

    @property
    def growth_rate(self) -> float:
        """r of the exponential fit (per layer)."""
        return self.params.get("exponential", (np.nan, np.nan))[1]


def _aic(rss: float, n: int, k: int) -> float:
    # floor keeps an exact fit finite; the ranking among equal-k models is unchanged
    return n * np.log(max(rss, 1e-300) / n) + 2 * k


def _lstsq(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    A = np.stack([np.ones_like(x), x], 1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    return float(coef[0]), float(coef[1])


def classify_growth(layers: Any, values: Any, flat_tol: float = 0.05) -> GrowthFit:
    """Classify a profile v(l) as flat / linear / quadratic / exponential (see module docstring).

    ``layers``, ``values``: same-length sequences; non-finite values are dropped.
    """
    l = np.asarray(layers, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if l.shape != v.shape:
        raise ValueError(f"layers and values must have the same length, got {l.shape} and {v.shape}")
    ok = np.isfinite(l) & np.isfinite(v)
    l, v = l[ok], v[ok]
    order = np.argsort(l)
    l, v = l[order], v[order]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = v[1:] / v[:-1]
    n = len(v)
    if n < 3:
        return GrowthFit(best="insufficient", fit_best="insufficient", ratios=ratios)
    params: dict[str, tuple[float, float]] = {}
    aic: dict[str, float] = {}
    a, b = _lstsq(l, v)
    params["linear"] = (a, b)
    aic["linear"] = _aic(float(np.sum((v - (a + b * l)) ** 2)), n, 3)
    a2, b2 = _lstsq(l ** 2, v)
    params["quadratic"] = (a2, b2)
    aic["quadratic"] = _aic(float(np.sum((v - (a2 + b2 * l ** 2)) ** 2)), n, 3)
    if np.all(v > 0):
        la, lr = _lstsq(l, np.log(v))
        ae, re = float(np.exp(la)), float(np.exp(lr))
        params["exponential"] = (ae, re)
        aic["exponential"] = _aic(float(np.sum((v - ae * re ** l) ** 2)), n, 3)
    else:
        params["exponential"] = (np.nan, np.nan)
        aic["exponential"] = np.inf
    ranked = sorted(MODELS, key=lambda m: aic[m])
    fit_best = ranked[0]
    delta = aic[ranked[1]] - aic[ranked[0]]
    aic_const = _aic(float(np.sum((v - v.mean()) ** 2)), n, 2)
    mean_abs = abs(float(v.mean()))
    rel_change = abs(b) * (l[-1] - l[0]) / mean_abs if mean_abs > 0 else np.inf
    flat = rel_change < flat_tol or aic_const <= aic[fit_best] + 2.0
    return GrowthFit(best="flat" if flat else fit_best, fit_best=fit_best, params=params, aic=aic,
                     ratios=ratios, slope=b, rel_change=float(rel_change), delta_aic=float(delta))


def _m2_tables(records: Any) -> dict[str, pd.DataFrame]:
    """step × layer m2 tables of resid, resid_mid, attn_out, mlp_out from a Run or a long frame."""
    sites = ("resid", "resid_mid", "attn_out", "mlp_out")
    if hasattr(records, "pivot") and hasattr(records, "records"):       # analysis.io.Run
        return {s: records.pivot(s, "m2") for s in sites}
    df = records[(records["stat"] == "m2") & records["site"].isin(sites)]
    out = {}
    for s in sites:
        part = df[df["site"] == s].drop_duplicates(["step", "layer"], keep="last")
        out[s] = part.pivot(index="step", columns="layer", values="value") if len(part) else pd.DataFrame()
    return out


def attribution(records: Any) -> pd.DataFrame:
    """Per-sublayer growth attribution [derived, theory.md §2, Pre-LN form]:

    κ = v / m2(x_in),  ρ = (m2(x_out) − m2(x_in) − v) / (2·sqrt(m2(x_in)·v))

    attention sublayer of block l: x_in = resid_l, v = m2(attn_out_l), x_out = resid_mid_l;
    MLP sublayer: x_in = resid_mid_l, v = m2(mlp_out_l), x_out = resid_{l+1}.
    κ is the branch power relative to the stream, ρ the cosine between stream and branch output
    (it follows from m2(x + a) = m2(x) + m2(a) + 2·mean(x·a)). Valid for any placement with an
    identity residual path (pre, peri, output, lns); meaningless for Post-LN.

    ``records``: an analysis.io.Run or a long-format frame (columns step, site, layer, stat, value)
    holding one or more steps. Returns columns step, layer, sublayer ("attn"/"mlp"), m2_in, v,
    m2_out, kappa, rho; empty when resid/resid_mid/attn_out/mlp_out m2 are not all recorded.
    """
    t = _m2_tables(records)
    cols = ["step", "layer", "sublayer", "m2_in", "v", "m2_out", "kappa", "rho"]
    if any(t[s].empty for s in t):
        return pd.DataFrame(columns=cols)
    resid, mid, attn, mlp = t["resid"], t["resid_mid"], t["attn_out"], t["mlp_out"]
    steps = resid.index.intersection(mid.index).intersection(attn.index).intersection(mlp.index)
    blocks = [c for c in mid.columns if c in attn.columns and c in mlp.columns and c in resid.columns
              and c + 1 in resid.columns]
    if not len(steps) or not blocks:
        return pd.DataFrame(columns=cols)
    r_in = resid.loc[steps, blocks].to_numpy()                               # (S, B)
    r_next = resid.loc[steps, [b + 1 for b in blocks]].to_numpy()
    m = mid.loc[steps, blocks].to_numpy()
    frames = []
    for name, x_in, v, x_out in (("attn", r_in, attn.loc[steps, blocks].to_numpy(), m),
                                 ("mlp", m, mlp.loc[steps, blocks].to_numpy(), r_next)):
        with np.errstate(divide="ignore", invalid="ignore"):
            kappa = v / x_in
            rho = (x_out - x_in - v) / (2.0 * np.sqrt(x_in * v))
        S, B = x_in.shape
        frames.append(pd.DataFrame({
            "step": np.repeat(steps.to_numpy(), B), "layer": np.tile(np.asarray(blocks), S),
            "sublayer": name, "m2_in": x_in.ravel(), "v": v.ravel(), "m2_out": x_out.ravel(),
            "kappa": kappa.ravel(), "rho": rho.ravel()}))
    return pd.concat(frames, ignore_index=True).sort_values(["step", "layer", "sublayer"], ignore_index=True)


def growth_over_steps(run: Any, site: str = "resid", stat: str = "m2", flat_tol: float = 0.05,
                      min_layer: int = 1) -> pd.DataFrame:
    """Fitted growth of one per-layer profile at every recorded step.

    ``run``: an analysis.io.Run (or a step × layer DataFrame). Layers below ``min_layer`` are left
    out: by default layer 0, the embedding output, whose scale is set by the embedding init and not
    by the blocks (without an embedding norm it is ~σ², far off every block law, and would dominate a
    log-linear fit). Returns columns step, best, fit_best,
    slope (linear b), rate (r of the exponential fit), ratio_deep (geometric mean of r_l over the
    deeper half of the layers), delta_aic, last (value at the last layer).
    """
    table = run if isinstance(run, pd.DataFrame) else run.pivot(site, stat)
    cols = ["step", "best", "fit_best", "slope", "rate", "ratio_deep", "delta_aic", "last"]
    if not table.empty:
        table = table[[c for c in table.columns if c >= min_layer]]
    if table.empty:
        return pd.DataFrame(columns=cols)
    layers = table.columns.to_numpy(dtype=np.float64)
    values = table.to_numpy(dtype=np.float64)                               # (S, L+1)
    rows = []
    for step, v in zip(table.index.to_numpy(), values):
        fit = classify_growth(layers, v, flat_tol)
        deep = fit.ratios[len(fit.ratios) // 2:]
        deep = deep[np.isfinite(deep) & (deep > 0)]
        finite = v[np.isfinite(v)]
        rows.append((int(step), fit.best, fit.fit_best, fit.slope, fit.growth_rate,
                     float(np.exp(np.mean(np.log(deep)))) if len(deep) else np.nan, fit.delta_aic,
                     float(finite[-1]) if len(finite) else np.nan))
    return pd.DataFrame(rows, columns=cols)
