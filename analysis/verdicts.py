"""Checks of the theory's predictions against loaded runs; each returns a verdict record of numbers
(:class:`analysis.verdict_schema.Verdict`: id, claim, tag, measured, predicted, tolerance, rule,
status, n_runs, ci, ...). Nothing here formats text for a table: analysis.render does.

Runs are grouped by placement and configuration (seed aside): per-placement verdicts average the
per-run values of a group (mean, t-interval, n_runs). Cross-placement verdicts pool the runs of a
placement; paired verdicts match Pre-LN and Peri-LN runs with the same seed, data and training
configuration; sweep verdicts need several runs per placement differing in seed or lr.
"""
from __future__ import annotations

import json
import math
from typing import Callable, Iterable

import numpy as np

from . import compare, massive, theory
from .io import Run
from .verdict_schema import (  # noqa: F401
    FAIL,
    NA,
    PASS,
    SCHEMA_VERSION,
    TAGS,
    Verdict,
    decide,
    make,
    read_json,
    t_interval,
    verdicts_frame,
    write_json,
)

THEORY_PLACEMENTS = ("pre", "post", "peri", "lns", "output")


# ---------------------------------------------------------------------------------------------
# per-group checks (one placement, one configuration, any number of seeds)
# ---------------------------------------------------------------------------------------------
def check_peri_init(runs: list[Run], group: str = "peri", tol: float = 0.10) -> Verdict:
    """peri.init_law: last-layer resid m2 at init against m2_0 + Σ mean γ²·p/(p + ε) + mean β²."""
    vals, why, notes = [], "", set()
    for r in runs:
        f = compare.init_frame(r)
        if f is None:
            why = compare.init_row(r)[1] or "no Peri-LN prediction (no m2_0 without an embedding norm)"
            continue
        vals.append((r.name, float(f["measured"].iloc[-1]), float(f["predicted"].iloc[-1])))
        notes.add(f"{f.attrs.get('gains', '')}; branch power: {f.attrs.get('branch_power', '')}")
    dev = [m / p - 1 for _, m, p in vals]
    return make("peri.init_law", "Peri-LN m2 at init grows by mean γ_out²·p/(p+ε) per sublayer (1 + 2l for "
                "γ = 1, p ≫ ε)", "derived", "rel", tol, vals, group=group, unit="m2 at layer L",
                note="; ".join(sorted(notes)) + ". One weight draw on text tokens scatters ±10 %: average seeds",
                why_na=why, detail={"mean_rel_dev": float(np.mean(dev)) if dev else None})


def check_post_init(runs: list[Run], group: str = "post", tol: float = 0.02) -> Verdict:
    """post.init_level: mean over layers 1..L of resid m2 at init = 1 (γ = 1, β = 0)."""
    vals, why = [], ""
    for r in runs:
        row, why_r = compare.init_row(r)
        if row is None:
            why = why_r
            continue
        vals.append((r.name, float(row[row.index >= 1].mean()), 1.0))
    return make("post.init_level", "Post-LN block outputs at init have m2 = 1 (a norm output, γ = 1, β = 0)",
                "instrument", "rel", tol, vals, group=group, unit="mean m2 over layers 1..L", why_na=why)


def check_post_flat(runs: list[Run], group: str = "post", tol: float = 0.10) -> Verdict:
    """post.flat: at the last step, resid m2 of block outputs / (mean γ² + mean β² of the block's last
    norm), averaged over layers = 1."""
    vals, why = [], "needs resid m2 and gain_ms of the post-sublayer norms"
    for r in runs:
        t = r.pivot("resid", "m2")
        gains = compare.sublayer_param_table(r, "gain_ms")
        if t.empty or gains is None or int(t.index[-1]) not in gains.index:
            continue
        step = int(t.index[-1])
        bias = compare.sublayer_param_table(r, "bias_ms")
        b = bias.loc[step].to_numpy()[1::2] if bias is not None and step in bias.index else 0.0
        level = theory.post_level(gains.loc[step].to_numpy()[1::2], b)
        meas = t.loc[step].reindex(np.arange(1, r.n_layers + 1)).to_numpy()
        vals.append((r.name, float(np.nanmean(meas / level)), 1.0))
    return make("post.flat", "Post-LN block outputs stay at mean γ² + mean β² of their last norm during training",
                "instrument", "rel", tol, vals, group=group, unit="measured/level, mean over layers, last step",
                note="assumes γ² uncorrelated with the per-channel power of the normalised stream", why_na=why)


def check_pre_init(runs: list[Run], group: str = "pre", widen: float = 0.10) -> Verdict:
    """pre.init_slope: (m2_L − m2_0)/L at init inside [v_mlp + v_attn_min, v_mlp + v_attn_max]."""
    vals, rng, why, note = [], None, "", ""
    for r in runs:
        f = compare.init_frame(r)
        if f is None:
            why = compare.init_row(r)[1] or "needs meta config.model (d_model, d_ff, init_std, seq_len, mlp)"
            continue
        L = r.n_layers
        lo = (f["low"].iloc[-1] - f["low"].iloc[0]) / L
        hi = (f["high"].iloc[-1] - f["high"].iloc[0]) / L
        rng = [float(lo), float(hi)]
        vals.append((r.name, float((f["measured"].iloc[-1] - f["measured"].iloc[0]) / L), 0.5 * (lo + hi)))
        note = f.attrs.get("note", "")
    return make("pre.init_slope", "Pre-LN m2 grows linearly at init, by v_mlp + v_attn per block", "derived", "in",
                widen, vals, group=group, unit="m2 per block", note=note, why_na=why, predicted_range=rng)


def check_interval_init(runs: list[Run], placement: str, widen: float = 0.10) -> Verdict:
    """lns.init_interval / output.init_interval: fraction of layers 1..L inside the predicted interval = 1."""
    vals, why, rng = [], "", None
    for r in runs:
        f = compare.init_frame(r)
        if f is None:
            why = compare.init_row(r)[1] or "needs meta config.model"
            continue
        g = f[f["layer"] >= 1]
        inside = (g["measured"] >= g["low"] * (1 - widen)) & (g["measured"] <= g["high"] * (1 + widen))
        vals.append((r.name, float(inside.mean()), 1.0))
        rng = [float(f["low"].iloc[-1]), float(f["high"].iloc[-1])]
    claim = {"lns": "LN-scaled Pre-LN m2 at init follows the harmonic law (inside its interval)",
             "output": "Output-LN-only m2 at init inside the ε-effect interval"}[placement]
    return make(f"{placement}.init_interval", claim, "derived", "ge", 0.0, vals, group=group_label(placement),
                unit="fraction of layers inside interval ±10 %", why_na=why,
                detail={"layer_L_interval": rng})


def _worst_ratios(runs: list[Run], ratio) -> tuple[list[tuple[str, float, float]], dict[str, str]]:
    """For a hard bound: ``(name, worst measured/bound, 1.0)`` per run where ``ratio(run)`` gives
    ``(worst, where)`` (runs where it gives None are left out), and ``{name: where}``."""
    vals, where = [], {}
    for r in runs:
        got = ratio(r)
        if got is not None:
            vals.append((r.name, got[0], 1.0))
            where[r.name] = got[1]
    return vals, where


def check_peri_bound(runs: list[Run], group: str = "peri", rtol: float = 1e-6) -> Verdict:
    """peri.hard_bound: max over steps and layers of measured/bound, RMS and max|x| forms, ≤ 1."""
    vals, where = _worst_ratios(runs, _peri_bound_ratio)
    return make("peri.hard_bound", "Peri-LN stream RMS and max|x| never exceed RMS(x_0) + Σ(max|γ| + RMS(β)) "
                "(and the sqrt(D) per-coordinate form)", "derived", "le", rtol, vals, group=group,
                unit="max measured/bound", aggregate="max", detail={"worst": where},
                note="a violation means a wrong placement or a bug (dropout after the output norm is not covered)",
                why_na="needs gain_absmax (and bias_ms) of the output norms and resid rms/absmax")


def _peri_bound_ratio(run: Run) -> tuple[float, str] | None:
    gmax = compare.sublayer_param_table(run, "gain_absmax")
    bias = compare.sublayer_param_table(run, "bias_ms")
    has_bias = any(n.get("bias") for n in run.norms() if n.get("role") in compare.OUTPUT_NORM_ROLES)
    if gmax is None or (has_bias and bias is None):
        return None
    L, D = run.n_layers, run.d_model
    worst, where = -np.inf, ""
    for kind, t in (("rms", run.rms_table("resid")), ("absmax", run.pivot("resid", "absmax"))):
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
        ratio = (t.loc[steps].reindex(columns=range(L + 1)).to_numpy() / bound)[:, 1:]
        ratio = np.where(np.isfinite(ratio), ratio, -np.inf)
        if ratio.size and ratio.max() > worst:
            i, j = np.unravel_index(np.argmax(ratio), ratio.shape)
            worst, where = float(ratio[i, j]), f"{kind} at step {int(steps[i])}, layer {j + 1}"
    return (worst, where) if np.isfinite(worst) else None


def check_qk_norm_bound(runs: list[Run], group: str = "", rtol: float = 1e-6) -> Verdict:
    """attn.qk_norm_bound: max over steps and layers of qk_absmax / (sqrt(d_h)·max|γ_q|·max|γ_k|) ≤ 1 (§5)."""
    vals, where = _worst_ratios(runs, qk_bound_ratio)
    return make("attn.qk_norm_bound", "with QK-norm the attention logit max|q·k|/sqrt(d_h) never exceeds "
                "sqrt(d_h)·max|γ_q|·max|γ_k|", "related", "le", rtol, vals, group=group,
                unit="max qk_absmax/bound", aggregate="max", detail={"worst": where},
                note="theory.md §5 (Wortsman et al. 2023); a violation means a bias in the QK-norm or a bug",
                why_na="needs attn_logits qk_absmax, the QK-norm gains' gain_absmax and d_h (config.model)")


def qk_bound_ratio(run: Run) -> tuple[float, str] | None:
    """(max over (step, layer) of qk_absmax / bound, where) from :func:`compare.qk_bound_frame`; None
    when the run has no QK-norm bound to check."""
    f = compare.qk_bound_frame(run)
    if f is None:
        return None
    ratio = (f["qk_absmax"] / f["bound"]).to_numpy()
    i = int(np.nanargmax(ratio))
    return float(ratio[i]), f"step {int(f['step'].iloc[i])}, layer {int(f['layer'].iloc[i])}"


def check_growth(runs: list[Run], placement: str, group: str = "") -> Verdict:
    """pre.growth_superlinear / peri.growth_linear: fraction of the recorded training steps (step > 0)
    whose resid m2 profile over layers 0..L is super-linear (fits.classify_growth)."""
    vals, peaks, last = [], {}, {}
    for r in runs:
        g = compare.growth_frame(r)
        g = g[(g["step"] > 0) & (g["best"] != "insufficient")] if len(g) else g
        if not len(g):
            continue
        vals.append((r.name, float(g["super_linear"].mean()), 1.0 if placement == "pre" else 0.0))
        peaks[r.name] = int(g.loc[g["last"].idxmax(), "step"])
        last[r.name] = str(g["best"].iloc[-1])
    common = dict(group=group or placement, unit="fraction of trained steps super-linear",
                  why_na="needs resid m2 at ≥ 4 layers and at least one step after init",
                  detail={"peak_step": peaks, "last_class": last})
    if placement == "pre":
        return make("pre.growth_superlinear", "Pre-LN hidden-state variance grows super-linearly with depth during "
                    "training (exponentially, the paper's Figure 1)", "paper", "ge", 0.5,
                    vals, note="pass: at least half the trained steps super-linear; a short or small run may not "
                    "reach that regime", **common)
    return make("peri.growth_linear", "Peri-LN hidden-state variance grows (at most) linearly with depth during "
                "training", "paper", "le", 0.0, [(n, m, 0.5) for n, m, _ in vals],
                note="pass: at most half the trained steps super-linear", **common)


def check_fp16(runs: list[Run], group: str = "peri") -> Verdict:
    """peri.fp16_margin: log10(max|x| / 65504) over all sites, layers and steps < 0, no over_fp16 count."""
    vals = []
    for r in runs:
        m = massive.fp16_margin(r)
        if not np.isfinite(m["max_absmax"]):
            continue
        over = m["over_fp16"] if np.isfinite(m["over_fp16"]) else 0.0
        vals.append((r.name, float(m["log10_ratio"]) if not over else max(float(m["log10_ratio"]), 0.0), 0.0))
    return make("peri.fp16_margin", "Peri-LN activations stay below the FP16 maximum 65504 (implied by the hard "
                "bound)", "instrument", "lt", 0.0, vals, group=group, unit="log10(max|x| / 65504), worst run",
                aggregate="max", why_na="no absmax recorded")


def check_prop31_bound(runs: list[Run], group: str, rtol: float = 1e-6) -> Verdict:
    """prop31.batched_bound: max over steps and layers of ‖∇W2‖ / (N·sqrt(d_ff·D)·rms(h)·rms(g)) ≤ 1."""
    vals = []
    for r in runs:
        f = compare.prop31_frame(r)
        ratio = f["bound_ratio"].to_numpy(dtype=np.float64) if len(f) else np.zeros(0)
        ratio = ratio[np.isfinite(ratio)]
        if len(ratio):
            vals.append((r.name, float(ratio.max()), 1.0))
    return make("prop31.batched_bound", "‖∇W2‖_F ≤ N·sqrt(d_ff·D)·rms(h)·rms(∂L/∂a) (Cauchy–Schwarz form of "
                "Proposition 3.1)", "instrument", "le", rtol, vals, group=group, aggregate="max",
                unit="max ‖∇W2‖/bound", why_na="needs mlp.out grad_norm, mlp_act rms, grad_rms at mlp_raw, "
                "tokens per step and d_ff")


def check_prop31_identity(runs: list[Run], group: str = "pre", tol: float = 0.25) -> Verdict:
    """prop31.pre_identity: slope of log‖∇W2‖ against log(rms(h)·rms(g)) over (step, layer) = 1."""
    vals = []
    for r in runs:
        f = compare.prop31_frame(r)
        if not len(f):
            continue
        x = np.log(f["rms_h"].to_numpy(dtype=np.float64) * f["grad_rms_a"].to_numpy(dtype=np.float64))
        y = np.log(f["grad_norm"].to_numpy(dtype=np.float64))
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() >= 3 and np.ptp(x[ok]) > 0:
            vals.append((r.name, float(np.polyfit(x[ok], y[ok], 1)[0]), 1.0))
    return make("prop31.pre_identity", "Pre-LN ‖∇W2‖ = ‖h‖·‖g‖ per token: the weight gradient scales with the "
                "MLP activation h (log-log slope 1 over steps and layers)", "paper", "rel", tol, vals,
                group=group, unit="d log‖∇W2‖ / d log(rms h · rms g)",
                why_na="needs mlp.out grad_norm, mlp_act rms and grad_rms at mlp_raw/mlp_out at ≥ 3 points")


def check_post_grad_vanishing(runs: list[Run], group: str = "post", tol: float = 0.1) -> Verdict:
    """post.grad_vanishing: Post-LN ‖∇W2‖ (mlp.out) at init, first block / last block < 1 − tol."""
    vals = []
    for r in runs:
        t = r.role_table("grad_norm", "mlp.out")
        if t.empty or int(t.index[0]) != 0:
            continue
        row = t.iloc[0]
        row = row[row.index >= 0].dropna()
        if len(row) >= 2 and row.iloc[-1] > 0:
            vals.append((r.name, float(row.iloc[0] / row.iloc[-1]), 1.0))
    return make("post.grad_vanishing", "Post-LN weight gradients at init grow with layer index (Xiong et al.): "
                "early-layer ‖∇W2‖ below the last layer's", "related", "lt", tol, vals, group=group,
                unit="‖∇W2‖ first block / last block at step 0", why_na="needs mlp.out grad_norm at step 0")


# ---------------------------------------------------------------------------------------------
# cross-placement, paired and sweep checks
# ---------------------------------------------------------------------------------------------
def _by_placement(runs: Iterable[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(r.placement, []).append(r)
    return out


def _last_w2_init(run: Run) -> float | None:
    t = run.role_table("grad_norm", "mlp.out")
    if t.empty or int(t.index[0]) != 0:
        return None
    row = t.iloc[0].dropna()
    row = row[row.index >= 0]
    return float(row.iloc[-1]) if len(row) else None


def check_xiong_ratio(groups: dict[str, list[Run]], tol: float = 3.0) -> Verdict:
    """xiong.post_over_pre: last-layer ‖∇W2‖_Post/‖∇W2‖_Pre at init against sqrt(m2_Pre(x_L)), within a factor 3."""
    post = [v for v in (_last_w2_init(r) for r in groups.get("post", [])) if v]
    pre = [(v, compare.last_layer_m2(r, "init")) for r in groups.get("pre", []) for v in [_last_w2_init(r)] if v]
    pre = [(v, m) for v, m in pre if m]
    vals = []
    if post and pre:
        pred = theory.post_over_pre_grad(float(np.mean([m for _, m in pre])))
        vals = [("post/pre", float(np.mean(post)) / float(np.mean([v for v, _ in pre])), pred)]
    runs = [r.name for p in ("post", "pre") for r in groups.get(p, [])]
    v = make("xiong.post_over_pre", "At init, last-layer ‖∇W2‖ Post-LN / Pre-LN ≈ sqrt(m2_Pre(x_L)) (Xiong et al.'s "
             "1/sqrt(L) is the final-norm factor)", "related", "factor", tol, vals, group="post vs pre",
             unit="ratio of last-layer ‖∇W2‖ at step 0",
             note="orders of magnitude: within a factor 3; > 1 (Post > Pre) only when m2_Pre(x_L) > 1",
             why_na="needs Post-LN and Pre-LN runs with mlp.out grad_norm and resid m2 at step 0")
    v.runs, v.n_runs = (runs, len(post) + len(pre)) if vals else (v.runs, 0)
    return v


def check_grad_ordering(groups: dict[str, list[Run]], which: str, side: str) -> Verdict:
    """grad.ordering_<which>_<side>: ‖∇W‖ Post > Pre > Peri, mean over layers of the per-block norm of
    the input-side (attn.qkv, mlp.in) or output-side (attn.out, mlp.out) weights; measured = the
    smallest log10 ratio between consecutive placements (> 0 when the ordering holds)."""
    roles = compare.INPUT_SIDE if side == "input" else compare.OUTPUT_SIDE
    means = {}
    for p in ("post", "pre", "peri"):
        got = [float(row.mean()) for row in (compare.grad_profile(r, roles, which) for r in groups.get(p, []))
               if row is not None]
        if got:
            means[p] = float(np.mean(got))
    order = [p for p in ("post", "pre", "peri") if p in means]
    vals = []
    if len(order) >= 2 and all(means[p] > 0 for p in order):
        margin = min(math.log10(means[a] / means[b]) for a, b in zip(order, order[1:]))
        vals = [(" > ".join(order), margin, 0.0)]
    v = make(f"grad.ordering_{which}_{side}", f"‖∇W‖ Post-LN > Pre-LN > Peri-LN ({side}-side weights, "
             f"{'at init' if which == 'init' else 'at the end'})", "paper", "gt", 0.0, vals,
             group="post/pre/peri", unit="min log10 ratio of consecutive placements", detail={"mean_grad": means},
             note="[paper, unconfirmed]; with small init the Post/Pre order follows sqrt(m2_Pre(x_L))",
             why_na="needs ≥ 2 of post/pre/peri with parameter grad_norm" + (" at step 0" if which == "init" else ""))
    v.n_runs = sum(len(groups.get(p, [])) for p in order) if vals else 0
    return v


def check_peri_flattest(groups: dict[str, list[Run]]) -> Verdict:
    """grad.peri_flattest: sd over layers of log per-block ‖∇W‖ (all sublayer weights) at the last
    step, Peri-LN < the smallest of the other placements'."""
    spread = {}
    for p in ("post", "pre", "peri"):
        got = []
        for r in groups.get(p, []):
            row = compare.grad_profile(r, compare.INPUT_SIDE + compare.OUTPUT_SIDE, "end")
            if row is not None and np.all(row.to_numpy() > 0):
                got.append(float(np.std(np.log(row.to_numpy()))))
        if got:
            spread[p] = float(np.mean(got))
    others = {p: v for p, v in spread.items() if p != "peri"}
    vals = ([("peri vs " + "/".join(others), spread["peri"], min(others.values()))]
            if "peri" in spread and others else [])
    v = make("grad.peri_flattest", "Peri-LN has the flattest per-layer gradient profile at the end of training",
             "paper", "lt", 0.0, vals, group="post/pre/peri", unit="sd over layers of log‖∇W‖; predicted = "
             "the flattest other placement's", detail={"spread": spread}, note="[paper, unconfirmed]",
             why_na="needs a Peri-LN run and another placement with parameter grad_norm")
    v.n_runs = sum(len(groups.get(p, [])) for p in spread) if vals else 0
    return v


def check_peri_damping(groups: dict[str, list[Run]]) -> Verdict:
    """prop31.peri_damping: max ‖∇W2‖ over layers in the 2nd half of training, Peri-LN / Pre-LN < 1."""
    def late_max(r: Run) -> float | None:
        t = r.role_table("grad_norm", "mlp.out")
        if t.empty:
            return None
        steps = t.index.to_numpy()
        return float(np.nanmax(t.loc[steps >= steps[len(steps) // 2]].to_numpy()))
    peri = [v for v in map(late_max, groups.get("peri", [])) if v is not None]
    pre = [v for v in map(late_max, groups.get("pre", [])) if v is not None]
    vals = [("peri/pre", float(np.mean(peri)) / float(np.mean(pre)), 1.0)] if peri and pre and np.mean(pre) > 0 else []
    v = make("prop31.peri_damping", "The output norm damps the MLP weight gradient: max ‖∇W2‖ in the 2nd half of "
             "training smaller for Peri-LN than for Pre-LN (Proposition 3.1)", "paper", "lt", 0.0, vals,
             group="peri vs pre", unit="ratio of late max ‖∇W2‖", note="pass: ratio < 1",
             why_na="needs Pre-LN and Peri-LN runs with mlp.out grad_norm")
    v.n_runs = len(peri) + len(pre) if vals else 0
    return v


def _pairs(groups: dict[str, list[Run]]) -> list[tuple[Run, Run]]:
    """(pre, peri) runs with the same recorded seed and the same training configuration and data."""
    def key(r: Run) -> str | None:
        s = compare.seed(r)
        if s is None:
            return None
        k = json.loads(compare.config_key(r, drop=()))
        return json.dumps({"train": k["train"], "data": k["data"]}, sort_keys=True)
    peri = {key(r): r for r in groups.get("peri", []) if key(r) is not None}
    return [(r, peri[key(r)]) for r in groups.get("pre", []) if key(r) is not None and key(r) in peri]


def check_paired(groups: dict[str, list[Run]], what: str) -> Verdict:
    """paired.peri_lower_loss: mean over pairs of final loss Pre − Peri > 0;
    paired.pre_larger_variance: mean over pairs of m2_L(Pre)/m2_L(Peri) at the last step > 1."""
    pairs = _pairs(groups)
    vals = []
    for pre, peri in pairs:
        if what == "loss":
            a, b = compare.final_loss(pre), compare.final_loss(peri)
            if a is not None and b is not None:
                vals.append((f"{pre.name}|{peri.name}", a - b, 0.0))
        else:
            a, b = compare.last_layer_m2(pre), compare.last_layer_m2(peri)
            if a and b:
                vals.append((f"{pre.name}|{peri.name}", a / b, 1.0))
    why = "needs Pre-LN and Peri-LN runs with the same seed, data and training configuration (meta config)"
    if what == "loss":
        return make("paired.peri_lower_loss", "Same seed and data order: Peri-LN ends with a lower loss than Pre-LN",
                    "paper", "gt", 0.0, vals, group="pre vs peri, paired", unit="final loss Pre − Peri (nats)",
                    note="val loss when recorded, else the mean train loss of the last 10 % of steps", why_na=why)
    return make("paired.pre_larger_variance", "Same seed and data order: Pre-LN ends with a larger last-layer "
                "hidden-state variance than Peri-LN", "paper", "gt", 0.0, vals, group="pre vs peri, paired",
                unit="m2_L Pre / Peri at the last step", why_na=why)


def _sweep(groups: dict[str, list[Run]], placement: str) -> list[Run]:
    """Runs of one placement that differ only in seed or lr (the largest such set)."""
    sets: dict[str, list[Run]] = {}
    for r in groups.get(placement, []):
        sets.setdefault(compare.config_key(r, drop=("seed", "lr")), []).append(r)
    best = max(sets.values(), key=len) if sets else []
    return best if len(best) >= 2 else []


def check_lr_robustness(groups: dict[str, list[Run]]) -> Verdict:
    """sweep.lr_robustness: spread (max − min) over lr of the final loss (mean over seeds per lr),
    Peri-LN < Pre-LN."""
    def spread(runs: list[Run]) -> tuple[float | None, dict]:
        per_lr: dict[float, list[float]] = {}
        for r in runs:
            loss = compare.final_loss(r)
            if compare.lr(r) is not None:
                per_lr.setdefault(compare.lr(r), []).append(loss if loss is not None and np.isfinite(loss)
                                                            and not compare.diverged(r) else np.inf)
        means = {k: float(np.mean(v)) for k, v in per_lr.items()}
        return (max(means.values()) - min(means.values()) if len(means) >= 2 else None), means
    sp, detail = {}, {}
    for p in ("peri", "pre"):
        sp[p], detail[p] = spread(_sweep(groups, p))
    vals = [("peri vs pre", sp["peri"], sp["pre"])] if sp["peri"] is not None and sp["pre"] is not None else []
    v = make("sweep.lr_robustness", "Peri-LN's final loss varies less across learning rates than Pre-LN's",
             "paper", "lt", 0.0, vals, group="lr sweep", unit="max − min over lr of final loss (nats); "
             "predicted = Pre-LN's spread", detail={"final_loss_by_lr": detail},
             note="a diverged run counts as infinite loss",
             why_na="needs ≥ 2 learning rates for both Pre-LN and Peri-LN")
    if vals:
        v.n_runs = len(_sweep(groups, "peri")) + len(_sweep(groups, "pre"))
    return v


def check_divergence(groups: dict[str, list[Run]]) -> Verdict:
    """sweep.divergence: fraction of diverged Peri-LN runs ≤ that of Pre-LN (multi-seed / multi-lr set)."""
    peri, pre = _sweep(groups, "peri"), _sweep(groups, "pre")
    vals = []
    if peri and pre:
        fp = float(np.mean([compare.diverged(r) for r in peri]))
        fq = float(np.mean([compare.diverged(r) for r in pre]))
        vals = [("peri vs pre", fp, fq)]
    untested = bool(vals) and vals[0][1] == 0 and vals[0][2] == 0
    v = make("sweep.divergence", "Peri-LN diverges no more often than Pre-LN over seeds / learning rates (the "
             "paper: Pre-LN diverged on some seeds, Peri-LN on none)", "paper", "le", 0.0, vals, group="sweep",
             unit="fraction of runs diverged; predicted = Pre-LN's fraction",
             why_na="needs ≥ 2 runs per placement (Pre-LN and Peri-LN) differing in seed or lr",
             note="no run of either placement diverged: the set does not probe the unstable regime" if untested else "")
    if vals:
        v.n_runs = len(peri) + len(pre)
    return v


# ---------------------------------------------------------------------------------------------
# all verdicts
# ---------------------------------------------------------------------------------------------
def group_label(placement: str, n_groups: int = 1, i: int = 0) -> str:
    """The placement's name, numbered ``placement #i+1`` when it has more than one configuration group."""
    return placement if n_groups == 1 else f"{placement} #{i + 1}"


def config_groups(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """(label, runs) per placement and configuration (seed aside), in order of first appearance."""
    keyed: dict[str, list[Run]] = {}
    for r in runs:
        keyed.setdefault(compare.config_key(r), []).append(r)
    by_p: dict[str, list[list[Run]]] = {}
    for g in keyed.values():
        by_p.setdefault(g[0].placement, []).append(g)
    out = []
    for p, gs in by_p.items():
        for i, g in enumerate(gs):
            lrs = {compare.lr(r) for r in g}
            label = group_label(p, len(gs), i)
            if len(gs) > 1 and len(lrs) == 1 and None not in lrs:
                label = f"{p} lr={lrs.pop():g}"
            out.append((label, g))
    return out


_PER_GROUP: dict[str, list[Callable[[list[Run], str], Verdict]]] = {
    "peri": [check_peri_init, check_peri_bound, lambda rs, g: check_growth(rs, "peri", g), check_fp16,
             check_prop31_bound],
    "post": [check_post_init, check_post_flat, check_post_grad_vanishing],
    "pre": [check_pre_init, lambda rs, g: check_growth(rs, "pre", g), check_prop31_identity, check_prop31_bound],
    "lns": [lambda rs, g: check_interval_init(rs, "lns"), check_prop31_bound],
    "output": [lambda rs, g: check_interval_init(rs, "output")],
}


def all_verdicts(runs: list[Run]) -> list[Verdict]:
    """Every verdict that applies to ``runs``: per configuration group, then across placements,
    paired and sweep checks (always listed, n/a when the runs do not allow them)."""
    out: list[Verdict] = []
    for label, group in config_groups(runs):
        p = group[0].placement
        if p not in THEORY_PLACEMENTS:
            out.append(Verdict(f"{p}.theory", "no theory for this placement", "derived", None, None, None, NA,
                               0, group=label, runs=[r.name for r in group],
                               note=f"placement {p!r} has no theory (only pre, post, peri, lns, output)"))
            continue
        for check in _PER_GROUP[p] + ([check_qk_norm_bound] if any(qk_bound_ratio(r) for r in group) else []):
            v = check(group, label)
            v.group = label
            out.append(v)
    placements = _by_placement(runs)
    if len([p for p in ("pre", "post", "peri") if p in placements]) >= 2:
        out.append(check_xiong_ratio(placements))
        out += [check_grad_ordering(placements, w, s) for w in ("init", "end") for s in ("input", "output")]
        out += [check_peri_flattest(placements), check_peri_damping(placements)]
    if "pre" in placements and "peri" in placements:
        out += [check_paired(placements, "loss"), check_paired(placements, "variance"),
                check_lr_robustness(placements), check_divergence(placements)]
    return out
