"""Growth of a per-layer profile (docs/theory.md, "Growth classification") and per-sublayer
attribution of the growth (κ_l, ρ_l).

Models fitted to values v_l over layers l, all by least squares IN THE ORIGINAL SPACE:
    linear        a + b·l          (2 parameters)
    quadratic     a + b·l²         (2)
    sq_linear     (a + b·l)²       (2; what a stream whose RMS grows linearly gives)
    exponential   a + b·c^l        (3; the offset lets a linear start and a geometric tail coexist)
All are scored by AIC = n·ln(RSS/n) + 2(k + 1) on those same residuals — relative residuals
(v − f)/|v| by default, since the scatter of a variance profile grows with the variance — (k parameters plus the noise
variance), so no model is favoured by a transformed metric and the extra parameter of the
exponential is paid for. A constant model competes too: the profile is "flat" when the constant's
AIC is within 2 of the best model's or when the linear fit changes the value by less than
``flat_tol`` of its mean across the layer range. A fit is super-linear when the best model is
quadratic, sq_linear or exponential, it is convex and increasing over the fitted layers
(b > 0; c > 1 for the exponential) and visibly bent: its midpoint lies more than ``bend_tol`` of
the rise below the chord (otherwise the profile is labelled linear).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import least_squares, minimize_scalar

MODELS = ("linear", "quadratic", "sq_linear", "exponential")
SUPER_LINEAR = ("quadratic", "sq_linear", "exponential")
_N_PARAMS = {"linear": 2, "quadratic": 2, "sq_linear": 2, "exponential": 3}


@dataclass
class GrowthFit:
    """Result of :func:`classify_growth`.

    best: "flat" | one of MODELS | "sub_linear" (a curved winner that is concave or decreasing, e.g.
    a saturating exponential with c < 1) | "insufficient" (fewer than 4 finite points);
    fit_best: the best growth model by AIC even when the verdict is flat;
    params: linear/quadratic/sq_linear -> (a, b), exponential -> (a, b, c); aic: model -> AIC (inf
    when a model cannot be fitted); ratios: r_l = v_{l+1}/v_l; slope: b of the linear fit;
    rel_change: |b|·(l_max − l_min)/|mean v|; delta_aic: AIC of the runner-up growth model minus the
    best's (< 2: the two are hard to tell apart); super_linear: see the module docstring; bend: the
    best fit's midpoint below (< 0) or above its chord, relative to the rise over the range.
    """

    best: str
    fit_best: str
    params: dict[str, tuple[float, ...]] = field(default_factory=dict)
    aic: dict[str, float] = field(default_factory=dict)
    ratios: np.ndarray = field(default_factory=lambda: np.zeros(0))
    slope: float = float("nan")
    rel_change: float = float("nan")
    delta_aic: float = float("nan")
    super_linear: bool = False
    bend: float = float("nan")

    @property
    def growth_rate(self) -> float:
        """c of the exponential fit (per layer)."""
        return self.params.get("exponential", (np.nan, np.nan, np.nan))[2]


def _aic(rss: float, n: int, k: int) -> float:
    """AIC with k free parameters (the noise variance included). The floor keeps an exact fit finite."""
    return n * np.log(max(rss, 1e-300) / n) + 2 * k


def _lstsq(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> tuple[float, float]:
    """a + b·x by (weighted) least squares: minimises Σ (w·(y − a − b·x))²."""
    w = np.ones_like(y) if w is None else w
    A = np.stack([np.ones_like(x), x], 1) * w[:, None]
    coef, *_ = np.linalg.lstsq(A, y * w, rcond=None)
    return float(coef[0]), float(coef[1])


def _fit_exponential(l: np.ndarray, v: np.ndarray, w: np.ndarray) -> tuple[tuple[float, float, float], float]:
    """a + b·c^l: for fixed c the fit is linear in (a, b); profile the weighted RSS over log c on a
    grid (c from 0.05 to 20 per layer), then refine the best cell. Returns ((a, b, c), RSS)."""
    def rss_at(logc: float) -> tuple[float, float, float]:
        a, b = _lstsq(np.exp(logc * l), v, w)
        return float(np.sum((w * (v - a - b * np.exp(logc * l))) ** 2)), a, b

    grid = np.linspace(np.log(0.05), np.log(20.0), 121)
    grid = grid[np.abs(grid) > 1e-3]                                  # c = 1 is the constant, collinear
    vals = [rss_at(g)[0] for g in grid]
    i = int(np.argmin(vals))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best = minimize_scalar(lambda g: rss_at(g)[0], bounds=(lo, hi), method="bounded",
                           options={"xatol": 1e-10})
    logc = float(best.x) if best.fun <= vals[i] else float(grid[i])
    rss, a, b = rss_at(logc)
    return (a, b, float(np.exp(logc))), rss


def _fit_sq_linear(l: np.ndarray, v: np.ndarray, w: np.ndarray) -> tuple[tuple[float, float], float]:
    """(a + b·l)² by nonlinear (weighted) least squares, started from a linear fit of sqrt(v)."""
    a0, b0 = _lstsq(l, np.sqrt(np.maximum(v, 0.0)))
    res = least_squares(lambda p: w * ((p[0] + p[1] * l) ** 2 - v), x0=[a0, b0], method="lm")
    a, b = (float(x) for x in res.x)
    return (a, b), float(np.sum((w * ((a + b * l) ** 2 - v)) ** 2))


def classify_growth(layers: Any, values: Any, flat_tol: float = 0.05, relative: bool = True,
                    bend_tol: float = 0.05) -> GrowthFit:
    """Classify a profile v(l) as flat / linear / quadratic / sq_linear / exponential (module docstring).

    ``layers``, ``values``: same-length sequences; non-finite values are dropped; 4 points at least.
    ``relative``: residuals relative to the measured values, (v − f)/|v| (default; plain residuals
    when a value is 0 or ``relative`` is False) — the same residuals for fitting and scoring.
    ``bend_tol``: a curved AIC winner whose midpoint lies within ``bend_tol`` of the chord (relative
    to the rise over the range, see ``GrowthFit.bend``) is labelled linear — an offset exponential
    with c ≈ 1.01 fits the noise of a straight profile, not a different law.
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
    if n < 4:
        return GrowthFit(best="insufficient", fit_best="insufficient", ratios=ratios)
    # relative residuals when every value is non-zero (the scatter of an m2 profile grows with m2),
    # plain residuals otherwise; the same weights for every model
    w = 1.0 / np.abs(v) if relative and np.all(v != 0) else np.ones_like(v)
    params: dict[str, tuple[float, ...]] = {}
    rss: dict[str, float] = {}
    a, b = _lstsq(l, v, w)
    params["linear"], rss["linear"] = (a, b), float(np.sum((w * (v - (a + b * l))) ** 2))
    a2, b2 = _lstsq(l ** 2, v, w)
    params["quadratic"], rss["quadratic"] = (a2, b2), float(np.sum((w * (v - (a2 + b2 * l ** 2))) ** 2))
    params["sq_linear"], rss["sq_linear"] = _fit_sq_linear(l, v, w)
    params["exponential"], rss["exponential"] = _fit_exponential(l, v, w)
    aic = {m: _aic(rss[m], n, _N_PARAMS[m] + 1) for m in MODELS}
    ranked = sorted(MODELS, key=lambda m: aic[m])
    fit_best = ranked[0]
    delta = aic[ranked[1]] - aic[ranked[0]]
    c0 = float(np.sum(w ** 2 * v) / np.sum(w ** 2))                     # weighted constant fit
    aic_const = _aic(float(np.sum((w * (v - c0)) ** 2)), n, 2)
    mean_abs = abs(float(v.mean()))
    b_plain = _lstsq(l, v)[1]                   # the change across the range, unweighted
    rel_change = abs(b_plain) * (l[-1] - l[0]) / mean_abs if mean_abs > 0 else np.inf
    flat = rel_change < flat_tol or aic_const <= aic[fit_best] + 2.0
    p = params[fit_best]
    bend = _bend(fit_best, p, float(l[0]), float(l[-1]))
    if fit_best != "linear" and abs(bend) < bend_tol:
        label = "linear"                      # the AIC winner's curvature is immaterial over the range
    else:
        label = fit_best
    if fit_best == "quadratic":
        convex_up = p[1] > 0
    elif fit_best == "sq_linear":                   # increasing on the range: a + b·l keeps b's sign
        convex_up = p[1] != 0 and np.all(np.sign(p[0] + p[1] * l[[0, -1]]) * np.sign(p[1]) >= 0)
    elif fit_best == "exponential":
        convex_up = p[1] > 0 and p[2] > 1
    else:
        convex_up = False
    if label in SUPER_LINEAR and not convex_up:
        label = "sub_linear"                  # e.g. a saturating a + b·c^l with c < 1
    return GrowthFit(best="flat" if flat else label, fit_best=fit_best, params=params, aic=aic,
                     ratios=ratios, slope=b, rel_change=float(rel_change), delta_aic=float(delta),
                     super_linear=bool(convex_up and not flat and label != "linear"), bend=float(bend))


def _model_value(model: str, p: tuple[float, ...], l: float | np.ndarray) -> float | np.ndarray:
    if model == "linear":
        return p[0] + p[1] * l
    if model == "quadratic":
        return p[0] + p[1] * l ** 2
    if model == "sq_linear":
        return (p[0] + p[1] * l) ** 2
    return p[0] + p[1] * p[2] ** l


def _bend(model: str, p: tuple[float, ...], l0: float, l1: float) -> float:
    """(f(mid) − chord(mid)) / (f(l1) − f(l0)) at mid = (l0 + l1)/2: 0 for a straight line, −0.25 for
    b·l² from 0, → −0.5 for a steep exponential; positive for a concave profile."""
    f0, f1, fm = (float(_model_value(model, p, x)) for x in (l0, l1, 0.5 * (l0 + l1)))
    rise = f1 - f0
    return (fm - 0.5 * (f0 + f1)) / rise if rise != 0 else 0.0


def _m2_tables(records: Any) -> dict[str, pd.DataFrame]:
    """step × layer m2 tables of resid, resid_mid, attn_out, mlp_out and, for decoder blocks of an
    encoder–decoder, resid_xattn and xattn_out, from a Run or a long frame (empty where not recorded)."""
    sites = ("resid", "resid_mid", "attn_out", "mlp_out", "resid_xattn", "xattn_out")
    if hasattr(records, "pivot") and hasattr(records, "records"):       # analysis.io.Run
        return {s: records.pivot(s, "m2") for s in sites}
    df = records[(records["stat"] == "m2") & records["site"].isin(sites)]
    out = {}
    for s in sites:
        part = df[df["site"] == s].drop_duplicates(["step", "layer"], keep="last")
        out[s] = part.pivot(index="step", columns="layer", values="value") if len(part) else pd.DataFrame()
    return out


def attribution(records: Any, placement: str | None = None) -> pd.DataFrame:
    """Per-sublayer growth attribution [derived, docs/theory.md "Forward variance laws", Pre-LN form]:

    κ = v / m2(x_in),  ρ = (m2(x_out) − m2(x_in) − v) / (2·sqrt(m2(x_in)·v))

    attention sublayer of block l: x_in = resid_l, v = m2(attn_out_l), x_out = resid_mid_l;
    MLP sublayer: x_in = resid_mid_l, v = m2(mlp_out_l), x_out = resid_{l+1}. A decoder block of an
    encoder–decoder (three sublayers) adds the cross-attention sublayer ("xattn"): x_in = resid_mid_l,
    v = m2(xattn_out_l), x_out = resid_xattn_l; its MLP then reads x_in = resid_xattn_l.
    κ is the branch power relative to the stream, ρ the cosine between stream and branch output
    (it follows from m2(x + a) = m2(x) + m2(a) + 2·mean(x·a)). Valid for any placement with an
    identity residual path (pre, peri, output, lns); meaningless for Post-LN, whose residual path
    goes through a norm: ``placement="post"`` (or "none"/"mixed") gives NaN κ and ρ.

    ρ is a cosine, so it lies in [−1, 1] by Cauchy–Schwarz when the three m2 come from the same
    tokens; rounding of a tiny branch power (v ≪ m2_in), or statistics that do not belong together,
    can push the computed value outside. ``rho_raw`` keeps the computed value, ``rho`` is clipped to
    [−1, 1] and NaN where the raw value is off by more than 0.05 (then the inputs are not
    consistent and no cosine can be read from them).

    ``records``: an analysis.io.Run or a long-format frame (columns step, site, layer, stat, value)
    holding one or more steps. Returns columns step, layer, sublayer ("attn"/"xattn"/"mlp"), m2_in, v,
    m2_out, kappa, rho, rho_raw; empty when resid/resid_mid/attn_out/mlp_out m2 are not all recorded.
    """
    t = _m2_tables(records)
    cols = ["step", "layer", "sublayer", "m2_in", "v", "m2_out", "kappa", "rho", "rho_raw"]
    if any(t[s].empty for s in ("resid", "resid_mid", "attn_out", "mlp_out")):
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
    # decoder blocks: the stream after the cross-attention (NaN in blocks with two sublayers)
    x_mid = t["resid_xattn"].reindex(index=steps, columns=blocks).to_numpy(dtype=float)   # (S, B)
    x_v = t["xattn_out"].reindex(index=steps, columns=blocks).to_numpy(dtype=float)
    decoder = ~np.isnan(x_mid).all(axis=0)                                   # (B,) blocks with xattn
    mlp_in = np.where(decoder[None, :], x_mid, m)
    sublayers = [("attn", r_in, attn.loc[steps, blocks].to_numpy(), m, np.ones(len(blocks), bool)),
                 ("xattn", m, x_v, x_mid, decoder),
                 ("mlp", mlp_in, mlp.loc[steps, blocks].to_numpy(), r_next, np.ones(len(blocks), bool))]
    frames = []
    for name, x_in, v, x_out, keep in sublayers:
        if not keep.any():
            continue
        x_in, v, x_out = x_in[:, keep], v[:, keep], x_out[:, keep]
        with np.errstate(divide="ignore", invalid="ignore"):
            kappa = v / x_in
            rho_raw = (x_out - x_in - v) / (2.0 * np.sqrt(x_in * v))
        if placement in ("post", "none", "mixed"):
            kappa = np.full_like(x_in, np.nan)
            rho_raw = np.full_like(x_in, np.nan)
        rho = np.where(np.abs(rho_raw) <= 1.05, np.clip(rho_raw, -1.0, 1.0), np.nan)
        S, B = x_in.shape
        frames.append(pd.DataFrame({
            "step": np.repeat(steps.to_numpy(), B), "layer": np.tile(np.asarray(blocks)[keep], S),
            "sublayer": name, "m2_in": x_in.ravel(), "v": v.ravel(), "m2_out": x_out.ravel(),
            "kappa": kappa.ravel(), "rho": rho.ravel(), "rho_raw": rho_raw.ravel()}))
    return pd.concat(frames, ignore_index=True).sort_values(["step", "layer", "sublayer"], ignore_index=True)


#: At most this many steps are fitted by :func:`growth_over_steps` (evenly spaced, first and last
#: included): each fit costs a few milliseconds, so a 100k-step run would take minutes; the fraction
#: of super-linear steps that the verdicts read is then estimated within ±0.03 (one standard error).
MAX_GROWTH_STEPS = 256


def growth_over_steps(run: Any, site: str = "resid", stat: str = "m2", flat_tol: float = 0.05,
                      min_layer: int = 0, max_steps: int | None = MAX_GROWTH_STEPS) -> pd.DataFrame:
    """Fitted growth of one per-layer profile at every recorded step (at most ``max_steps`` of them,
    evenly spaced by index with the first and the last; None: all).

    ``run``: an analysis.io.Run (or a step × layer DataFrame). Layers below ``min_layer`` are left
    out; by default none — the step from the embedding (layer 0) to the first block output is part
    of the profile, and the offset models (a + b·c^l) absorb a small embedding scale. Pass 1 for
    Post-LN, whose layer 0 is not a norm output. Returns columns step, best, fit_best,
    super_linear, slope (linear b), rate (c of the exponential fit), ratio_deep (geometric mean of
    r_l over the deeper half of the layers), delta_aic, last (value at the last layer).
    """
    table = run if isinstance(run, pd.DataFrame) else run.pivot(site, stat)
    cols = ["step", "best", "fit_best", "super_linear", "slope", "rate", "ratio_deep", "delta_aic", "last"]
    if not table.empty:
        table = table[[c for c in table.columns if c >= min_layer]]
    if table.empty:
        return pd.DataFrame(columns=cols)
    if max_steps is not None and len(table) > max_steps:
        table = table.iloc[np.unique(np.linspace(0, len(table) - 1, max_steps).round().astype(int))]
    layers = table.columns.to_numpy(dtype=np.float64)
    values = table.to_numpy(dtype=np.float64)                               # (S, L+1)
    rows = []
    for step, v in zip(table.index.to_numpy(), values):
        fit = classify_growth(layers, v, flat_tol)
        deep = fit.ratios[len(fit.ratios) // 2:]
        deep = deep[np.isfinite(deep) & (deep > 0)]
        finite = v[np.isfinite(v)]
        rows.append((int(step), fit.best, fit.fit_best, fit.super_linear, fit.slope, fit.growth_rate,
                     float(np.exp(np.mean(np.log(deep)))) if len(deep) else np.nan, fit.delta_aic,
                     float(finite[-1]) if len(finite) else np.nan))
    return pd.DataFrame(rows, columns=cols)
