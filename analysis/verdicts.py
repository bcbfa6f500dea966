"""Checks of theory.md's predictions against loaded runs: one :class:`Verdict` per prediction.

Status is "pass", "fail" or "n/a" (the prediction does not apply to the run, or the statistics it
needs are not recorded; the note says which). Tolerances are part of each verdict. Per-run checks
depend on the placement; cross-run checks compare placements (several runs of one placement are
averaged).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd

from . import fits, massive, theory
from .io import FP16_MAX, PARAM_PREFIX, SUBLAYER_ROLES, Run

PASS, FAIL, NA = "pass", "fail", "n/a"
THEORY_PLACEMENTS = ("pre", "post", "peri", "lns", "output")


@dataclass
class Verdict:
    run: str
    check: str
    source: str
    measured: str
    predicted: str
    tolerance: str
    status: str
    note: str = ""


def _fmt(x: Any, digits: int = 4) -> str:
    """Number for a table cell: "—" for None/NaN."""
    if x is None or (isinstance(x, (float, np.floating)) and np.isnan(x)):
        return "—"
    return str(int(x)) if isinstance(x, (int, np.integer)) else f"{float(x):.{digits}g}"


def _status(ok: bool) -> str:
    return PASS if ok else FAIL


# ---------------------------------------------------------------------------------------------
# helpers: init step, output-norm parameters per sublayer
# ---------------------------------------------------------------------------------------------
def _init_row(run: Run) -> tuple[pd.Series | None, str]:
    """resid m2 at step 0, or None and the reason."""
    t = run.pivot("resid", "m2")
    if t.empty:
        return None, "resid m2 not recorded"
    if int(t.index[0]) != 0:
        return None, f"init (step 0) not recorded: first recorded step is {int(t.index[0])}"
    return t.iloc[0], ""


def sublayer_param_table(run: Run, stat: str, roles: tuple[str, str]) -> pd.DataFrame | None:
    """step × sublayer table (columns 0..2L−1: attn_0, mlp_0, attn_1, ...) of a norm-parameter stat
    (gain_ms, gain_absmax on the weight; bias_ms on the bias) for the norms with ``roles``
    (attention role, MLP role). A norm without the parameter contributes the neutral value (gain 1,
    bias 0). None when a needed statistic is not recorded or a sublayer's norm is not found."""
    L = run.n_layers
    is_bias = stat == "bias_ms"
    by_key = {(n.get("role"), n.get("layer")): n for n in run.norms()}
    cols = []
    for layer in range(L):
        for role in roles:
            norm = by_key.get((role, layer))
            if norm is None:
                return None
            pname = norm.get("bias" if is_bias else "weight")
            if pname is None:
                cols.append(None)
                continue
            f = run.frame(PARAM_PREFIX + pname, stat)
            if not len(f):
                return None
            cols.append(pd.Series(f["value"].to_numpy(), index=f["step"].to_numpy()))
    steps = sorted({int(s) for c in cols if c is not None for s in c.index}) or [int(s) for s in run.steps]
    neutral = 0.0 if is_bias else 1.0
    table = pd.DataFrame({i: (c.reindex(steps) if c is not None else pd.Series(neutral, index=steps))
                          for i, c in enumerate(cols)}, index=steps)
    return table


# ---------------------------------------------------------------------------------------------
# per-run checks
# ---------------------------------------------------------------------------------------------
def check_peri_init(run: Run, tol: float = 0.05) -> Verdict:
    """Peri-LN m2 at init = m2_0 + Σ mean γ_out² (1 + 2l with an embedding norm and γ = 1): the mean
    over layers 1..L of measured/predicted − 1 within ``tol``. Uses the measured output-norm gains at
    step 0 when recorded, else γ = 1."""
    name = "Peri-LN init m2 = 1 + 2l (additive law)"
    src = "[paper] linear growth; [derived] exact form"
    row, why = _init_row(run)
    if row is None:
        return Verdict(run.name, name, src, "—", "—", f"±{tol:.0%}", NA, why)
    L = run.n_layers
    pred = theory.predict_init_profile(run.meta, m2_0=float(row.get(0, np.nan)))
    gains = sublayer_param_table(run, "gain_ms", ("norm.post_attn", "norm.post_mlp"))
    bias = sublayer_param_table(run, "bias_ms", ("norm.post_attn", "norm.post_mlp"))
    note = ""
    if pred is None:
        return Verdict(run.name, name, src, "—", "—", f"±{tol:.0%}", NA, "no m2_0 for a Peri-LN run without embedding norm")
    start = float(pred["mid"].iloc[0])
    if gains is not None and 0 in gains.index:
        b = bias.loc[0].to_numpy() if bias is not None and 0 in bias.index else None
        mid = theory.peri_additive_m2(start, gains.loc[0].to_numpy(), b)
        note = "measured output-norm gains at step 0"
    else:
        mid = pred["mid"].to_numpy()
        note = "γ = 1 assumed (gain_ms of the output norms not recorded)"
    layers = [l for l in range(1, L + 1) if l in row.index]
    meas = row.loc[layers].to_numpy()
    rel = float(np.mean(meas / mid[layers] - 1.0))
    note += f"; last layer {meas[-1]:.4g} vs {mid[L]:.4g}. One weight draw on text tokens scatters ±10 % (theory.md)"
    return Verdict(run.name, name, src, f"mean rel. dev. {rel:+.2%}", f"m2_L = {mid[L]:.4g}", f"|dev| ≤ {tol:.0%}",
                   _status(abs(rel) <= tol), note)


def check_post_init(run: Run, tol: float = 0.02) -> Verdict:
    """Post-LN m2 at init ≈ 1 (γ = 1, β = 0) at every layer 1..L: mean relative deviation ≤ ``tol``."""
    name = "Post-LN init m2 flat ≈ 1"
    src = "[paper] constant; [derived] = mean γ² + mean β²"
    row, why = _init_row(run)
    if row is None:
        return Verdict(run.name, name, src, "—", "1", f"±{tol:.0%}", NA, why)
    layers = [l for l in row.index if l >= 1]
    meas = row.loc[layers].to_numpy()
    rel = float(np.mean(meas) - 1.0)
    return Verdict(run.name, name, src, f"mean {np.mean(meas):.4g} (range {meas.min():.4g}–{meas.max():.4g})", "1",
                   f"|mean − 1| ≤ {tol:.0%}", _status(abs(rel) <= tol))


def check_post_trained(run: Run, tol: float = 0.10) -> Verdict:
    """Post-LN at the last step: m2 of block l's output ≈ mean γ² + mean β² of the block's last norm
    (norm.post_mlp); mean relative deviation over layers ≤ ``tol``. Approximate (theory.post_level)."""
    name = "Post-LN trained level = mean γ² + mean β²"
    src = "[paper] tracks γ, β; [derived, approximate]"
    t = run.pivot("resid", "m2")
    gains = sublayer_param_table(run, "gain_ms", ("norm.post_attn", "norm.post_mlp"))
    if t.empty or gains is None:
        return Verdict(run.name, name, src, "—", "—", f"±{tol:.0%}", NA,
                       "needs resid m2 and gain_ms of the post-sublayer norms")
    bias = sublayer_param_table(run, "bias_ms", ("norm.post_attn", "norm.post_mlp"))
    step = int(t.index[-1])
    if step not in gains.index:
        return Verdict(run.name, name, src, "—", "—", f"±{tol:.0%}", NA, f"no gain_ms at step {step}")
    g = gains.loc[step].to_numpy()[1::2]                                   # last norm of each block
    b = bias.loc[step].to_numpy()[1::2] if bias is not None and step in bias.index else 0.0
    level = theory.post_level(g, b)
    layers = np.arange(1, run.n_layers + 1)
    meas = t.loc[step].reindex(layers).to_numpy()
    rel = float(np.nanmean(meas / level - 1.0))
    return Verdict(run.name, name, src, f"mean rel. dev. {rel:+.2%} at step {step}",
                   f"level {np.mean(level):.4g} (mean over layers)", f"|dev| ≤ {tol:.0%}", _status(abs(rel) <= tol),
                   "assumes γ² uncorrelated with the per-channel power of the normalised stream")


def check_interval_init(run: Run, widen: float = 0.10) -> Verdict:
    """Pre-LN (also LN-scaled and Output-LN) m2 at init inside the predicted interval.

    pre: the mean per-block increment (m2_L − m2_0)/L inside [v_mlp + v_attn_min, v_mlp + v_attn_max];
    lns, output: m2 at every layer inside [low, high] of theory.predict_init_profile. The interval is
    widened by ``widen`` on both sides for finite-size scatter of one weight draw."""
    placement = run.placement
    name = {"pre": "Pre-LN init increment per block in interval",
            "lns": "LN-scaled init profile (harmonic law) in interval",
            "output": "Output-LN init profile in ε-effect interval"}[placement]
    src = "[derived]" if placement != "output" else "[derived, approximate]"
    row, why = _init_row(run)
    tol = f"interval ±{widen:.0%}"
    if row is None:
        return Verdict(run.name, name, src, "—", "—", tol, NA, why)
    pred = theory.predict_init_profile(run.meta, m2_0=float(row.get(0, np.nan)))
    if pred is None:
        return Verdict(run.name, name, src, "—", "—", tol, NA,
                       "needs meta config.model (d_model, d_ff, init_std, seq_len, mlp) — reference GPT runs only")
    L = run.n_layers
    if placement == "pre":
        if L not in row.index or 0 not in row.index:
            return Verdict(run.name, name, src, "—", "—", tol, NA, "resid m2 at layers 0 and L needed")
        inc = (float(row[L]) - float(row[0])) / L
        lo = (pred["low"].iloc[-1] - pred["low"].iloc[0]) / L
        hi = (pred["high"].iloc[-1] - pred["high"].iloc[0]) / L
        ok = lo * (1 - widen) <= inc <= hi * (1 + widen)
        return Verdict(run.name, name, src, f"{inc:.4g} per block", f"[{lo:.4g}, {hi:.4g}]", tol, _status(ok),
                       pred.attrs.get("note", ""))
    layers = [l for l in range(1, L + 1) if l in row.index]
    meas = row.loc[layers].to_numpy()
    lo = pred["low"].to_numpy()[layers]
    hi = pred["high"].to_numpy()[layers]
    inside = (meas >= lo * (1 - widen)) & (meas <= hi * (1 + widen))
    return Verdict(run.name, name, src, f"m2_L = {meas[-1]:.4g}; {int(inside.sum())}/{len(meas)} layers inside",
                   f"m2_L ∈ [{lo[-1]:.4g}, {hi[-1]:.4g}]", tol, _status(bool(inside.all())), pred.attrs.get("note", ""))


def check_peri_bound(run: Run, rtol: float = 1e-6) -> Verdict:
    """Peri-LN hard bound at every recorded step and layer: RMS(x_l) ≤ RMS(x_0) + Σ(max|γ| + RMS(β))
    and max|x_l| ≤ max|x_0| + Σ sqrt(D)(max|γ| + RMS(β)) over the output norms (theory.md §2)."""
    name = "Peri-LN hard bound never violated (all steps)"
    src = "[derived]"
    gmax = sublayer_param_table(run, "gain_absmax", ("norm.post_attn", "norm.post_mlp"))
    bias = sublayer_param_table(run, "bias_ms", ("norm.post_attn", "norm.post_mlp"))
    norms = run.norms()
    has_bias = any(n.get("bias") for n in norms if n.get("role") in ("norm.post_attn", "norm.post_mlp"))
    rms = run.rms_table("resid")
    absmax = run.pivot("resid", "absmax")
    if gmax is None or (has_bias and bias is None) or (rms.empty and absmax.empty):
        return Verdict(run.name, name, src, "—", "ratio ≤ 1", "0 violations", NA,
                       "needs gain_absmax (and bias_ms) of the output norms and resid rms/absmax")
    L, D = run.n_layers, run.d_model
    worst, n_viol, n_checked, where = 0.0, 0, 0, ""
    for kind, t in (("rms", rms), ("absmax", absmax)):
        if t.empty or 0 not in t.columns or (kind == "absmax" and D is None):
            continue
        steps = t.index.intersection(gmax.index)
        if not len(steps):
            continue
        g = gmax.loc[steps].to_numpy()
        b = bias.reindex(steps).to_numpy() if bias is not None else None
        start = t.loc[steps, 0].to_numpy()
        bound = (theory.peri_hard_bound_rms(start, g, b) if kind == "rms"
                 else theory.peri_hard_bound_absmax(start, g, D, b))              # (S, L+1)
        meas = t.loc[steps].reindex(columns=range(L + 1)).to_numpy()
        ratio = (meas / bound)[:, 1:]                    # layer 0 is the bound's starting point
        ok = np.isfinite(ratio)
        n_checked += int(ok.sum())
        bad = ok & (ratio > 1 + rtol)
        n_viol += int(bad.sum())
        if ok.any() and np.nanmax(ratio[ok]) > worst:
            i, j = np.unravel_index(np.nanargmax(np.where(ok, ratio, -np.inf)), ratio.shape)
            worst, where = float(ratio[i, j]), f"{kind} at step {int(steps[i])}, layer {j + 1}"
    if not n_checked:
        return Verdict(run.name, name, src, "—", "ratio ≤ 1", "0 violations", NA, "no step with both stream and gain stats")
    return Verdict(run.name, name, src, f"max measured/bound {worst:.3g} ({where}); {n_viol} violations in {n_checked}",
                   "measured/bound ≤ 1", "0 violations", _status(n_viol == 0),
                   "a violation means a wrong placement or a bug (dropout after the output norm is not covered)")


def check_growth_last(run: Run) -> Verdict:
    """Growth class of resid m2 over layers 1..L (fits.growth_over_steps) at the last recorded step:
    Pre-LN super-linear (quadratic/exponential) [paper]; Peri-LN linear (or flat: not super-linear);
    Post-LN flat."""
    placement = run.placement
    expected = {"pre": ("super-linear (quadratic/exponential)", fits.SUPER_LINEAR),
                "peri": ("linear (not super-linear)", ("linear", "flat")),
                "post": ("flat", ("flat",))}
    name = f"growth class at last step ({placement})"
    src = "[paper]" if placement != "post" else "[paper]/[derived]"
    t = run.pivot("resid", "m2")
    if placement not in expected:
        return Verdict(run.name, name, src, "—", "—", "AIC", NA, f"no growth prediction for placement {placement!r}")
    want, ok_classes = expected[placement]
    if t.empty or len(t.index) < 2:
        return Verdict(run.name, name, src, "—", want, "best AIC", NA, "needs resid m2 at ≥ 2 steps (init and trained)")
    g = fits.growth_over_steps(t.iloc[[-1]]).iloc[0]
    if g["best"] == "insufficient":
        return Verdict(run.name, name, src, "—", want, "best AIC", NA, "needs ≥ 3 layers (1..L) to tell growth laws apart")
    measured = (f"{g['best']} at step {int(g['step'])} over layers 1..L (best fit {g['fit_best']}, "
                f"ΔAIC {g['delta_aic']:.3g}, r = {g['rate']:.3g}/layer)")
    note = "a short or small run may not reach the super-linear regime" if placement == "pre" else ""
    return Verdict(run.name, name, src, measured, want, "best AIC", _status(g["best"] in ok_classes), note)


def check_fp16(run: Run) -> Verdict:
    """Peri-LN: no activation above the FP16 maximum 65504 at any step/site [paper]."""
    name = "no FP16 overflow (max |x| < 65504)"
    m = massive.fp16_margin(run)
    if not np.isfinite(m["max_absmax"]) and not np.isfinite(m["over_fp16"]):
        return Verdict(run.name, name, "[paper]", "—", "< 65504", "strict", NA, "no absmax/over_fp16 recorded")
    over = m["over_fp16"] if np.isfinite(m["over_fp16"]) else 0.0
    ok = (not np.isfinite(m["max_absmax"]) or m["max_absmax"] < FP16_MAX) and over == 0
    where = f" ({m['site']}, layer {m['layer']}, step {m['step']})" if m["site"] else ""
    return Verdict(run.name, name, "[paper]", f"max |x| {_fmt(m['max_absmax'])}{where}; log10(max/65504) = "
                   f"{_fmt(m['log10_ratio'], 3)}; over_fp16 count {_fmt(m['over_fp16'])}", "< 65504", "strict",
                   _status(ok))


def _n_tokens(run: Run) -> int | None:
    tr = run.train_config
    b, T = tr.get("batch_size"), tr.get("seq_len") or run.model_config.get("seq_len")
    if not b or not T:
        return None
    acc = tr.get("grad_accum") or tr.get("accum_steps") or tr.get("gradient_accumulation_steps") or 1
    return int(b) * int(T) * int(acc)


def check_prop31_bound(run: Run, rtol: float = 1e-6) -> Verdict:
    """Batched Proposition 3.1 bound at every step and layer (theory.prop31_batched_bound):
    ‖∇W2‖_F ≤ N·sqrt(d_ff·D)·rms(h)·rms(∂L/∂a), h = mlp_act, a = mlp_raw (mlp_out for Pre-LN)."""
    name = "Prop. 3.1 batched bound ‖∇W2‖ ≤ N·sqrt(d_ff·D)·rms(h)·rms(g)"
    src = "[paper] Prop. 3.1; [derived] batched form"
    g = run.role_table("grad_norm", "mlp.out")
    h = run.rms_table("mlp_act")
    ga = run.pivot("mlp_raw", "grad_rms")
    if ga.empty and run.placement in ("pre", "lns"):
        ga = run.pivot("mlp_out", "grad_rms")
    N, D = _n_tokens(run), run.d_model
    d_ff = run.model_config.get("d_ff") or (theory.default_d_ff(D, run.model_config.get("mlp", "gelu"))
                                            if run.model_config and D else None)
    if g.empty or h.empty or ga.empty or not N or not D or not d_ff:
        return Verdict(run.name, name, src, "—", "ratio ≤ 1", "0 violations", NA,
                       "needs mlp.out grad_norm, mlp_act rms, grad_rms at mlp_raw, tokens per step and d_ff")
    steps = g.index.intersection(h.index).intersection(ga.index)
    layers = [c for c in g.columns if c in h.columns and c in ga.columns]
    if not len(steps) or not layers:
        return Verdict(run.name, name, src, "—", "ratio ≤ 1", "0 violations", NA, "no common step/layer")
    bound = theory.prop31_batched_bound(N, int(d_ff), D, h.loc[steps, layers].to_numpy(), ga.loc[steps, layers].to_numpy())
    ratio = g.loc[steps, layers].to_numpy() / bound
    ok = np.isfinite(ratio)
    n_viol = int((ratio[ok] > 1 + rtol).sum())
    return Verdict(run.name, name, src, f"max ratio {np.nanmax(ratio):.3g}, median {np.nanmedian(ratio):.3g}; "
                   f"{n_viol} violations in {int(ok.sum())}", "ratio ≤ 1", "0 violations", _status(n_viol == 0),
                   f"N = {N} tokens/step; a ratio near 1 means h and g aligned across tokens")


def run_verdicts(run: Run) -> list[Verdict]:
    """Every per-run check that applies to the run's placement; a run without a theory gets one n/a row."""
    p = run.placement
    if p not in THEORY_PLACEMENTS:
        return [Verdict(run.name, "theory checks", "—", "—", "—", "—", NA,
                        f"placement {p!r} has no theory (only pre, post, peri, lns, output)")]
    out: list[Verdict] = []
    if p == "peri":
        out += [check_peri_init(run), check_peri_bound(run), check_growth_last(run), check_fp16(run)]
    elif p == "post":
        out += [check_post_init(run), check_post_trained(run), check_growth_last(run)]
    elif p in ("pre", "lns", "output"):
        out.append(check_interval_init(run))
        if p == "pre":
            out.append(check_growth_last(run))
    if p in ("pre", "lns", "peri"):
        out.append(check_prop31_bound(run))
    return out


# ---------------------------------------------------------------------------------------------
# cross-run checks
# ---------------------------------------------------------------------------------------------
def _by_placement(runs: Iterable[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(r.placement, []).append(r)
    return out


def _mean_layer_grad(run: Run, which: str) -> tuple[float, float, int] | None:
    """(mean over layers, CV over layers of log, step) of the per-block sublayer-weight gradient norm."""
    t = run.layer_grad_norm(SUBLAYER_ROLES)
    if t.empty:
        return None
    row = t.iloc[0 if which == "init" else -1].dropna()
    if not len(row) or (which == "init" and int(t.index[0]) != 0):
        return None
    v = row.to_numpy()
    spread = float(np.std(np.log(v)) if np.all(v > 0) else np.nan)
    return float(np.mean(v)), spread, int(t.index[0 if which == "init" else -1])


def check_grad_ordering(runs: list[Run], which: str) -> Verdict:
    """‖∇W‖_Post > ‖∇W‖_Pre > ‖∇W‖_Peri [paper, unconfirmed] at init or at the end, as measured:
    mean over layers of the per-block norm of the attn/MLP weight gradients, averaged over runs
    of one placement."""
    name = f"gradient ordering Post > Pre > Peri ({which})"
    src = "[paper, unconfirmed]"
    groups = _by_placement(runs)
    vals = {}
    for p in ("post", "pre", "peri"):
        got = [x for x in (_mean_layer_grad(r, which) for r in groups.get(p, [])) if x is not None]
        if got:
            vals[p] = float(np.mean([x[0] for x in got]))
    label = ", ".join(r.name for r in runs)
    if len(vals) < 2:
        return Verdict(label, name, src, "—", "Post > Pre > Peri", "ordering", NA,
                       "needs ≥ 2 of the placements post/pre/peri with parameter grad_norm" +
                       (" at step 0" if which == "init" else ""))
    order = [p for p in ("post", "pre", "peri") if p in vals]
    ok = all(vals[a] > vals[b] for a, b in zip(order, order[1:]))
    measured = " > ".join(f"{p} {vals[p]:.3g}" for p in sorted(vals, key=vals.get, reverse=True))
    note = ""
    if which == "init" and "post" in vals and "pre" in vals:
        pre = groups["pre"][0]
        t = pre.pivot("resid", "m2")
        if not t.empty and pre.n_layers in t.columns:
            m2L = float(t.iloc[0][pre.n_layers])
            note = (f"Xiong et al.: Post/Pre ≈ sqrt(L·m2(x_L)) = {theory.post_over_pre_grad(pre.n_layers, m2L):.3g} "
                    f"with the Pre-LN run's m2(x_L) = {m2L:.3g} (orders of magnitude)")
    return Verdict(label, name, src, measured, "Post > Pre > Peri", "ordering", _status(ok), note)


def check_peri_flattest(runs: list[Run]) -> Verdict:
    """Peri-LN has the flattest per-layer gradient profile at the end [paper, unconfirmed]: smallest
    standard deviation over layers of log per-block gradient norm."""
    name = "Peri-LN gradient profile flattest across layers (end)"
    groups = _by_placement(runs)
    spread = {}
    for p in ("post", "pre", "peri"):
        got = [x for x in (_mean_layer_grad(r, "end") for r in groups.get(p, [])) if x is not None]
        if got:
            spread[p] = float(np.mean([x[1] for x in got]))
    label = ", ".join(r.name for r in runs)
    if "peri" not in spread or len(spread) < 2:
        return Verdict(label, name, "[paper, unconfirmed]", "—", "peri smallest", "ordering", NA,
                       "needs a Peri-LN run and another placement with parameter grad_norm")
    ok = spread["peri"] <= min(spread.values())
    return Verdict(label, name, "[paper, unconfirmed]",
                   "; ".join(f"{p} sd(log‖∇W‖) {v:.3g}" for p, v in spread.items()), "peri smallest", "ordering",
                   _status(ok))


def _late_max(table: pd.DataFrame) -> float:
    """Max over layers and over the second half of the recorded steps (init transients left out)."""
    steps = table.index.to_numpy()
    late = table.loc[steps >= steps[len(steps) // 2]]
    return float(np.nanmax(late.to_numpy()))


def check_prop31_ordering(runs: list[Run]) -> Verdict:
    """Proposition 3.1 consequence: during training the largest mlp.out gradient norm is larger for
    Pre-LN (grows with ‖h‖, so massive h gives spikes) than for Peri-LN (damped by 1/‖a‖). Max over
    layers and over the second half of the recorded steps: at init Peri-LN's tiny ‖a‖ makes its
    gradients large, which is not what the proposition is about."""
    name = "Prop. 3.1 ordering: max ‖∇W2‖ Pre-LN > Peri-LN (2nd half of training)"
    groups = _by_placement(runs)
    vals = {}
    for p in ("pre", "peri"):
        got = [_late_max(t) for t in (r.role_table("grad_norm", "mlp.out") for r in groups.get(p, [])) if not t.empty]
        if got:
            vals[p] = float(np.mean(got))
    label = ", ".join(r.name for r in runs)
    if len(vals) < 2:
        return Verdict(label, name, "[paper]", "—", "pre > peri", "ordering", NA,
                       "needs a Pre-LN and a Peri-LN run with mlp.out grad_norm")
    return Verdict(label, name, "[paper]", f"pre {vals['pre']:.3g}, peri {vals['peri']:.3g}", "pre > peri", "ordering",
                   _status(vals["pre"] > vals["peri"]))


def all_verdicts(runs: list[Run]) -> pd.DataFrame:
    """Per-run and cross-run verdicts as a DataFrame (columns of :class:`Verdict`)."""
    rows = [v for r in runs for v in run_verdicts(r)]
    if len(runs) > 1:
        rows += [check_grad_ordering(runs, "init"), check_grad_ordering(runs, "end"),
                 check_peri_flattest(runs), check_prop31_ordering(runs)]
    return pd.DataFrame([asdict(v) for v in rows], columns=list(Verdict.__dataclass_fields__))
