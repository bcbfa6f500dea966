"""Measured-vs-predicted frames: the one place where a run's records meet analysis.theory.

Each function takes a loaded run (analysis.io.Run), reads the configuration numbers the theory
needs from ``run.meta`` / ``run.model_config`` (theory itself never parses metadata), and returns a
tidy frame of measured values next to predictions. Plots and verdicts both draw from here, so each
comparison (the init profile, the Proposition 3.1 inputs, growth over steps, gradient profiles) is
assembled once.
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from . import fits, theory
from .io import PARAM_PREFIX, Run

INPUT_SIDE = ("attn.qkv", "mlp.in")        # weights that read the (normalised) stream
OUTPUT_SIDE = ("attn.out", "mlp.out")      # weights that write into the residual stream
OUTPUT_NORM_ROLES = ("norm.post_attn", "norm.post_mlp")
DEFAULT_EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# configuration numbers
# ---------------------------------------------------------------------------------------------
def model_numbers(meta: dict[str, Any]) -> dict[str, Any] | None:
    """Numbers the init formulas need (D, L, d_ff, init_std, T, act, scaled_init, eps, pos), from
    meta ``config.model`` (reference GPT runs); None when that config is absent."""
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    cfg = cfg.get("model") or {} if isinstance(cfg, dict) else {}
    D = cfg.get("d_model") or meta.get("d_model")
    L = cfg.get("n_layers") or meta.get("n_layers")
    if not cfg or D is None or L is None:
        return None
    act = str(cfg.get("mlp") or "gelu")
    return dict(D=int(D), L=int(L), d_ff=int(cfg.get("d_ff") or theory.default_d_ff(int(D), act)),
                init_std=float(cfg.get("init_std", 0.02)), T=int(cfg.get("seq_len") or 128), act=act,
                scaled_init=bool(cfg.get("scaled_init", False)), eps=norm_eps(meta),
                pos=str(cfg.get("pos", "learned")))


def norm_eps(meta: dict[str, Any]) -> float:
    """The norms' ε: config.model.norm_eps, else the first ``eps`` in meta norms, else 1e-5."""
    cfg = (meta.get("config") or {}).get("model") or {} if isinstance(meta.get("config"), dict) else {}
    if cfg.get("norm_eps") is not None:
        return float(cfg["norm_eps"])
    for n in meta.get("norms") or []:
        if isinstance(n, dict) and n.get("eps") is not None:
            return float(n["eps"])
    return DEFAULT_EPS


def norm_kind(run: Run) -> str:
    """"layernorm" or "rmsnorm" (what the output norm divides by: var or m2)."""
    kind = str(run.model_config.get("norm") or run.meta.get("norm_type") or "")
    if not kind:
        kinds = {str(n.get("kind")) for n in run.norms() if n.get("kind")}
        kind = kinds.pop() if len(kinds) == 1 else "layernorm"
    return "rmsnorm" if "rms" in kind.lower() else "layernorm"


def has_embed_norm(run: Run) -> bool | None:
    """config.model.embed_norm, else whether meta norms list a norm.embed, else None (unknown)."""
    e = run.model_config.get("embed_norm")
    if e is not None:
        return bool(e)
    roles = [n.get("role") for n in run.norms()]
    return ("norm.embed" in roles) if roles else None


def predict_init(run: Run, m2_0: float | None = None) -> pd.DataFrame | None:
    """theory.predict_init_profile with this run's placement, L and configuration numbers."""
    return theory.predict_init_profile(run.placement, run.n_layers, numbers=model_numbers(run.meta),
                                       m2_0=m2_0, embed_norm=has_embed_norm(run))


def d_ff(run: Run) -> int | None:
    """The run's MLP width: the configured d_ff, else the model's default for its d_model; None when unknown."""
    cfg, D = run.model_config, run.d_model
    if cfg.get("d_ff"):
        return int(cfg["d_ff"])
    return theory.default_d_ff(D, cfg.get("mlp", "gelu")) if cfg and D else None


def tokens_per_step(run: Run) -> int | None:
    """batch × sequence length × accumulation steps from the train config; None when unknown."""
    tr = run.train_config
    b, T = tr.get("batch_size"), tr.get("seq_len") or run.model_config.get("seq_len")
    if not b or not T:
        return None
    acc = tr.get("grad_accum") or tr.get("accum_steps") or tr.get("gradient_accumulation_steps") or 1
    return int(b) * int(T) * int(acc)


# ---------------------------------------------------------------------------------------------
# norm parameters per sublayer
# ---------------------------------------------------------------------------------------------
def sublayer_param_table(run: Run, stat: str, roles: tuple[str, str] = OUTPUT_NORM_ROLES) -> pd.DataFrame | None:
    """step × sublayer table (columns 0..2L−1: attn_0, mlp_0, attn_1, ...) of a norm-parameter stat
    (gain_ms, gain_absmax on the weight; bias_ms on the bias) for the norms with ``roles``
    (attention role, MLP role). A norm without the parameter contributes the neutral value (gain 1,
    bias 0). None when a needed statistic is not recorded or a sublayer's norm is not found."""
    is_bias = stat == "bias_ms"
    by_key = {(n.get("role"), n.get("layer")): n for n in run.norms()}
    cols = []
    for layer in range(run.n_layers):
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
    return pd.DataFrame({i: (c.reindex(steps) if c is not None else pd.Series(neutral, index=steps))
                         for i, c in enumerate(cols)}, index=steps)


def init_row(run: Run) -> tuple[pd.Series | None, str]:
    """resid m2 at step 0 (index: layer), or None and the reason."""
    t = run.pivot("resid", "m2")
    if t.empty:
        return None, "resid m2 not recorded"
    if int(t.index[0]) != 0:
        return None, f"init (step 0) not recorded: first recorded step is {int(t.index[0])}"
    return t.iloc[0], ""


def _branch_power_at_init(run: Run) -> tuple[np.ndarray | None, str]:
    """(2L,) power each output norm sees at step 0 — var (LayerNorm) or m2 (RMSNorm) of attn_raw /
    mlp_raw — measured when recorded, else the Pre-LN-form prediction (normalised branch input)."""
    stat = "var" if norm_kind(run) == "layernorm" else "m2"
    L = run.n_layers
    tabs = [run.pivot(s, stat) for s in ("attn_raw", "mlp_raw")]
    if all(not t.empty and 0 in t.index and set(range(L)) <= set(t.columns) for t in tabs):
        a, m = (t.loc[0].reindex(range(L)).to_numpy(dtype=np.float64) for t in tabs)
        return np.column_stack([a, m]).ravel(), f"measured {stat} of attn_raw/mlp_raw at step 0"
    num = model_numbers(run.meta)
    if num is None:
        return None, ""
    v_mlp, lo, hi = theory.pre_init_increment_interval(num["D"], num["d_ff"], num["init_std"], num["T"],
                                                       num["act"], num["scaled_init"], L)
    return np.tile([0.5 * (lo + hi), v_mlp], L), "predicted branch powers (v_attn mid, v_mlp)"


def init_frame(run: Run) -> pd.DataFrame | None:
    """Measured vs predicted resid m2 at init, columns layer, measured, predicted, low, high.

    Peri-LN: the additive law with the measured output-norm gains/biases at step 0 (γ = 1 when not
    recorded), the measured m2 at layer 0, and the norm's ε applied to the branch powers (measured at
    attn_raw/mlp_raw when recorded); attrs "predicted_no_eps" holds the ε-free law. Other placements:
    theory.predict_init_profile. None when step 0 or the numbers are missing (:func:`init_row`
    gives the reason for a missing step 0).
    """
    row, _ = init_row(run)
    if row is None:
        return None
    m2_0 = float(row[0]) if 0 in row.index else None
    pred = predict_init(run, m2_0=m2_0)
    if pred is None:
        return None
    L = run.n_layers
    out = pd.DataFrame({"layer": np.arange(L + 1)})
    out["measured"] = row.reindex(range(L + 1)).to_numpy(dtype=np.float64)
    out["low"], out["high"] = pred["low"].to_numpy(), pred["high"].to_numpy()
    out["predicted"] = pred["mid"].to_numpy()
    out.attrs.update(pred.attrs)
    if run.placement == "peri":
        start = m2_0 if m2_0 is not None else 1.0
        gains = sublayer_param_table(run, "gain_ms")
        bias = sublayer_param_table(run, "bias_ms")
        g = gains.loc[0].to_numpy() if gains is not None and 0 in gains.index else np.ones(2 * L)
        b = bias.loc[0].to_numpy() if bias is not None and 0 in bias.index else np.zeros(2 * L)
        power, how = _branch_power_at_init(run)
        eps = norm_eps(run.meta)
        plain = theory.peri_additive_m2(start, g, b)
        law = theory.peri_eps_m2(start, g, power, eps, b) if power is not None else plain
        out["predicted"] = out["low"] = out["high"] = law
        out.attrs.update(predicted_no_eps=plain, eps=eps, branch_power=how or "not available (ε ignored)",
                         gains="measured at step 0" if gains is not None and 0 in gains.index else "γ = 1 assumed",
                         note=f"m2_0 + Σ mean γ²·p/(p + ε) + mean β², ε = {eps:g}")
    return out


# ---------------------------------------------------------------------------------------------
# Proposition 3.1 inputs
# ---------------------------------------------------------------------------------------------
PROP31_COLUMNS = ["step", "layer", "grad_norm", "rms_h", "rms_a", "grad_rms_a", "h_over_a", "bound", "bound_ratio"]


def prop31_frame(run: Run) -> pd.DataFrame:
    """Per (step, layer): ‖∇W2‖_F of mlp.out, rms of h = mlp_act, rms of a = mlp_raw, rms of
    g = ∂L/∂a (grad_rms at mlp_raw; mlp_out for Pre-LN where the two coincide), h/a, and the
    batched Cauchy–Schwarz bound N·sqrt(d_ff·D)·rms(h)·rms(g) with ‖∇W2‖/bound (NaN when a factor
    is missing). Empty when mlp.out grad_norm or mlp_act is not recorded."""
    g = run.role_table("grad_norm", "mlp.out")
    h = run.rms_table("mlp_act")
    if g.empty or h.empty:
        return pd.DataFrame(columns=PROP31_COLUMNS)
    out = g.stack().rename("grad_norm").to_frame().join(h.stack().rename("rms_h"), how="inner")
    for name, t in (("rms_a", run.rms_table("mlp_raw")), ("grad_rms_a", _grad_at_branch(run))):
        out = out.join(t.stack().rename(name), how="left") if not t.empty else out.assign(**{name: np.nan})
    out = out.reset_index()
    out.columns = ["step", "layer"] + list(out.columns[2:])
    N, D, dff = tokens_per_step(run), run.d_model, d_ff(run)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["h_over_a"] = out["rms_h"] / out["rms_a"]
        out["bound"] = (theory.prop31_batched_bound(N, dff, D, out["rms_h"].to_numpy(), out["grad_rms_a"].to_numpy())
                        if N and D and dff else np.nan)
        out["bound_ratio"] = out["grad_norm"] / out["bound"]
    return out[PROP31_COLUMNS]


def _grad_at_branch(run: Run) -> pd.DataFrame:
    t = run.pivot("mlp_raw", "grad_rms")
    if t.empty and run.placement in ("pre", "lns"):
        t = run.pivot("mlp_out", "grad_rms")
    return t


# ---------------------------------------------------------------------------------------------
# growth, gradients, losses
# ---------------------------------------------------------------------------------------------
def growth_frame(run: Run) -> pd.DataFrame:
    """fits.growth_over_steps of resid m2 at every recorded step (layers 0..L; 1..L for Post-LN,
    whose layer 0 is the raw embedding, not a norm output)."""
    return fits.growth_over_steps(run, min_layer=1 if run.placement == "post" else 0)


def grad_profile(run: Run, roles: tuple[str, ...], which: str = "init") -> pd.Series | None:
    """Per-block gradient norm sqrt(Σ‖∇W‖²) over the parameters with ``roles`` at step 0
    (``which="init"``; None when step 0 is not recorded) or at the last recorded step ("end")."""
    t = run.layer_grad_norm(roles)
    if t.empty or (which == "init" and int(t.index[0]) != 0):
        return None
    row = t.iloc[0 if which == "init" else -1].dropna()
    return row if len(row) else None


def final_loss(run: Run) -> float | None:
    """Last validation loss when recorded, else the mean train loss over the last 10 % of the
    recorded steps (at least one); None when neither is recorded."""
    val = run.series("val_loss")
    if len(val):
        return float(val.iloc[-1])
    loss = run.series("loss")
    if not len(loss):
        return None
    k = max(1, len(loss) // 10)
    return float(np.nanmean(loss.to_numpy()[-k:]))


def diverged(run: Run) -> bool:
    """Whether the run diverged: meta divergence / result.diverged_step / status, or a non-finite loss."""
    res = run.meta.get("result") if isinstance(run.meta.get("result"), dict) else {}
    if run.meta.get("divergence") or res.get("diverged_step") is not None or "diverg" in run.status:
        return True
    loss = run.series("loss")
    return bool(len(loss) and not np.all(np.isfinite(loss.to_numpy())))


def seed(run: Run) -> Any:
    """The run's training seed from the train config (None when not recorded)."""
    return run.train_config.get("seed")


def lr(run: Run) -> float | None:
    """The run's learning rate from the train config as a float; None when not recorded."""
    v = run.train_config.get("lr")
    return float(v) if v is not None else None


def config_key(run: Run, drop: tuple[str, ...] = ("seed",)) -> str:
    """Identity of a run's configuration without the train keys in ``drop`` (and bookkeeping such as
    device, threads, progress): runs with equal keys differ only in those keys."""
    cfg = run.meta.get("config") if isinstance(run.meta.get("config"), dict) else {}
    model = dict(cfg.get("model") or {})
    train = {k: v for k, v in (cfg.get("train") or {}).items()
             if k not in drop and k not in ("device", "threads", "progress", "out", "resume")}
    return json.dumps({"placement": run.placement, "model": model, "train": train,
                       "data": cfg.get("data")}, sort_keys=True, default=str)


def last_layer_m2(run: Run, which: str = "end") -> float | None:
    """resid m2 at layer L at step 0 ("init") or at the last recorded step ("end")."""
    t = run.pivot("resid", "m2")
    L = run.n_layers
    if t.empty or L not in t.columns or (which == "init" and int(t.index[0]) != 0):
        return None
    v = float(t.iloc[0 if which == "init" else -1][L])
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------
# across runs: sweeps, slopes, gradient profiles
# ---------------------------------------------------------------------------------------------
SWEEP_COLUMNS = ["run", "placement", "lr", "seed", "final_loss", "diverged", "m2_last", "config"]


def sweep_frame(runs: list[Run]) -> pd.DataFrame:
    """One row per run: run name, placement, lr, seed, final_loss (:func:`final_loss`; NaN when
    diverged or missing), diverged, last-layer resid m2 at the last step, and ``config`` (the
    configuration key without seed and lr, so rows with equal ``config`` form one lr sweep)."""
    rows = []
    for r in runs:
        loss, div = final_loss(r), diverged(r)
        m2 = last_layer_m2(r)
        rows.append({"run": r.name, "placement": r.placement, "lr": lr(r), "seed": seed(r),
                     "final_loss": np.nan if div or loss is None or not math.isfinite(loss) else loss,
                     "diverged": div, "m2_last": np.nan if m2 is None else m2,
                     "config": config_key(r, drop=("seed", "lr"))})
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS)


def prop31_slope(run: Run, min_step: int = 1) -> dict[str, Any] | None:
    """Least-squares slope of log ‖∇W2‖ (mlp.out) against log rms(h) (h = mlp_act) over the
    (step, layer) points with step ≥ ``min_step`` (training, not init — Proposition 3.1 is about
    the trained regime): {"slope", "intercept", "n", "x", "y"}; None with fewer than 3 points or
    no spread in rms(h). Pre-LN: ‖∇W2‖ = ‖h‖·‖g‖, so slope ≈ 1 when ‖g‖ does not fall as h grows;
    Peri-LN: the output norm divides by ‖a‖ ∝ ‖h‖, so the slope is expected near 0."""
    f = prop31_frame(run)
    if not len(f):
        return None
    f = f[f["step"] >= min_step]
    with np.errstate(divide="ignore", invalid="ignore"):  # a vanished (0) gradient is left out, not a warning
        x = np.log(f["rms_h"].to_numpy(dtype=np.float64))
        y = np.log(f["grad_norm"].to_numpy(dtype=np.float64))
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) <= 0:
        return None
    slope, intercept = np.polyfit(x[ok], y[ok], 1)
    return {"slope": float(slope), "intercept": float(intercept), "n": int(ok.sum()), "x": x[ok], "y": y[ok]}


def grad_by_layer(run: Run, role: str = "mlp.out", which: str = "init") -> pd.Series | None:
    """‖∇W‖ of one parameter role per block at step 0 ("init") or the last recorded step ("end"),
    divided by the last block's (so 1 at layer L−1; below 1 in early layers = vanishing towards the
    input, Xiong et al.'s Post-LN profile). None when not recorded (or step 0 missing for "init")."""
    t = run.role_table("grad_norm", role)
    if t.empty or (which == "init" and int(t.index[0]) != 0):
        return None
    row = t.iloc[0 if which == "init" else -1]
    row = row[row.index >= 0].dropna()
    if len(row) < 2 or not row.iloc[-1] > 0:
        return None
    return row / row.iloc[-1]


def qk_bound_frame(run: Run) -> pd.DataFrame | None:
    """Recorded ``qk_absmax`` next to theory.md §5's QK-norm bound sqrt(d_h)·max|γ_q|·max|γ_k|, per (step,
    layer): columns step, layer, qk_absmax, bound. The gains are the ``gain_absmax`` rows of the layer's two
    ``attn.qk_norm`` parameters (written with attn_logits); d_h = d_model / n_heads of ``config.model``.
    None when the run has no QK-norm (config.model.qk_norm), no qk_absmax or no such gains."""
    cfg = (run.meta.get("config") or {}).get("model") or {}
    if not cfg.get("qk_norm") or not cfg.get("n_heads") or not cfg.get("d_model"):
        return None
    qk = run.frame("attn_logits", "qk_absmax")
    g = run.params("gain_absmax")
    g = g[g["role"] == "attn.qk_norm"] if len(g) else g
    if not len(qk) or not len(g):
        return None
    per = g.groupby(["step", "layer"])["value"].agg(["prod", "count"])
    per = per[per["count"] == 2]  # q and k gain of the layer
    m = qk.set_index(["step", "layer"])[["value"]].join(per, how="inner")
    if not len(m):
        return None
    d_head = int(cfg["d_model"]) // int(cfg["n_heads"])
    bound = theory.qk_logit_bound(d_head, m["prod"].to_numpy(), 1.0)
    return pd.DataFrame({"step": m.index.get_level_values(0), "layer": m.index.get_level_values(1),
                         "qk_absmax": m["value"].to_numpy(), "bound": bound})
