"""analysis.verdicts: for every verdict id, synthetic run directories where the claim holds (status
"pass") and where it is false ("fail"); the record schema, the decision rules and verdicts.json."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lnprobe.analysis as analysis
from lnprobe.analysis import compare, render, theory
from lnprobe.analysis import verdicts as V

L, D, DFF, SIGMA, T, B = 4, 64, 256, 0.02, 32, 4
STEPS = (0, 50, 100)
LAY = np.arange(L + 1)
ROLES = {"attn.qkv": "attn.qkv", "attn.out": "attn.out", "mlp.fc_in": "mlp.in", "mlp.fc_out": "mlp.out"}
NORMS = {"pre": [("norm_attn_in", "norm.pre_attn"), ("norm_mlp_in", "norm.pre_mlp")],
         "peri": [("norm_attn_in", "norm.pre_attn"), ("norm_mlp_in", "norm.pre_mlp"),
                  ("norm_attn_out", "norm.post_attn"), ("norm_mlp_out", "norm.post_mlp")],
         "post": [("norm_attn_out", "norm.post_attn"), ("norm_mlp_out", "norm.post_mlp")],
         "lns": [("norm_attn_in", "norm.pre_attn"), ("norm_mlp_in", "norm.pre_mlp")],
         "output": [("norm_attn_out", "norm.post_attn"), ("norm_mlp_out", "norm.post_mlp")]}


def _meta(name, placement, seed=0, lr=0.01):
    norms = [{"name": f"blocks.{l}.{m}", "role": r, "layer": l, "kind": "layernorm", "weight": f"blocks.{l}.{m}.weight",
              "bias": None} for l in range(L) for m, r in NORMS.get(placement, [])]
    roles = {f"blocks.{l}.{p}.weight": {"role": r, "layer": l} for l in range(L) for p, r in ROLES.items()}
    roles.update({n["weight"]: {"role": n["role"], "layer": n["layer"]} for n in norms})
    model = {"d_model": D, "n_layers": L, "placement": placement, "mlp": "gelu", "d_ff": DFF, "init_std": SIGMA,
             "seq_len": T, "scaled_init": False, "embed_norm": placement == "peri", "norm": "layernorm",
             "norm_eps": 1e-5, "pos": "learned"}
    return {"run_name": name, "status": "finished", "placement": placement, "n_layers": L, "d_model": D,
            "param_roles": roles, "norms": norms,
            "config": {"model": model, "data": "synthetic",
                       "train": {"batch_size": B, "seq_len": T, "steps": STEPS[-1] + 1, "seed": seed, "lr": lr}}}


def make_run(root: Path, name: str, placement: str, *, m2=None, grad=None, gains=(1.0, 1.0), absmax=None,
             rms_h=None, g_a=None, loss=None, raw_var=None, seed=0, lr=0.01, diverged=False) -> analysis.Run:
    """A run directory with planted statistics; every argument is a function of the step.

    m2(s) -> (L+1,) resid m2; grad(s, role) -> (L,) parameter grad norms (default: 1 everywhere);
    gains(s) or a constant -> (gain_ms, gain_absmax) of every norm; absmax(s) -> (L+1,) resid max|x|;
    rms_h(s) -> (L,), g_a(s) -> (L,) rms of mlp_act and grad_rms at mlp_raw/mlp_out (then mlp.out's
    grad norm defaults to half the batched bound); loss(s) -> train loss; raw_var(s) -> (2L,) var of
    attn_raw, mlp_raw (attn_0, mlp_0, ...)."""
    rows = []
    for s in STEPS:
        v = np.asarray(m2(s) if m2 else 1 + 2 * LAY, float)
        ab = np.asarray(absmax(s), float) if absmax else 3 * np.sqrt(v)
        for l in LAY:
            rows += [(s, "resid", l, "m2", v[l]), (s, "resid", l, "rms", math.sqrt(v[l])),
                     (s, "resid", l, "absmax", ab[l])]
        if raw_var:
            rv = raw_var(s)
            for l in range(L):
                rows += [(s, "attn_raw", l, "var", rv[2 * l]), (s, "mlp_raw", l, "var", rv[2 * l + 1])]
        h = np.asarray(rms_h(s), float) if rms_h else None
        ga = np.asarray(g_a(s), float) if g_a else None
        for l in range(L):
            if h is not None:
                rows += [(s, "mlp_act", l, "rms", h[l]), (s, "mlp_raw", l, "grad_rms", ga[l]),
                         (s, "mlp_out", l, "grad_rms", ga[l])]
            for p, role in ROLES.items():
                if grad:
                    gn = float(np.asarray(grad(s, role))[l])
                elif role == "mlp.out" and h is not None:
                    gn = 0.5 * B * T * math.sqrt(DFF * D) * h[l] * ga[l]
                else:
                    gn = 1.0
                rows.append((s, f"param:blocks.{l}.{p}.weight", l, "grad_norm", gn))
            g_ms, g_max = gains(s) if callable(gains) else gains
            for m, _ in NORMS.get(placement, []):
                rows += [(s, f"param:blocks.{l}.{m}.weight", l, "gain_ms", g_ms),
                         (s, f"param:blocks.{l}.{m}.weight", l, "gain_absmax", g_max)]
        lv = loss(s) if loss else 5.0 - s / 50
        rows.append((s, "train", -1, "loss", lv))
    df = pd.DataFrame(rows, columns=["step", "site", "layer", "stat", "value"])
    df["token"] = pd.array([None] * len(df), dtype="Int64")
    df["channel"] = pd.array([None] * len(df), dtype="Int64")
    path = root / name
    (path / "records").mkdir(parents=True)
    df.to_parquet(path / "records" / "part-000000.parquet", index=False)
    meta = _meta(name, placement, seed, lr)
    if diverged:
        meta["result"] = {"diverged_step": 60}
    (path / "meta.json").write_text(json.dumps(meta))
    return analysis.load(path)


def _one(vs, id_):
    hit = [v for v in vs if v.id == id_]
    assert len(hit) == 1, (id_, [v.id for v in vs])
    return hit[0]


def status(runs, id_):
    v = _one(V.all_verdicts(runs), id_)
    assert v.status in ("pass", "fail", "n/a") and v.tag in V.TAGS
    return v.status


def _pre_init_mid():
    v, lo, hi = theory.pre_init_increment_interval(D, DFF, SIGMA, T, "gelu")
    return 2 * SIGMA ** 2 + LAY * (v + 0.5 * (lo + hi))


# ---------------------------------------------------------------------------------------------
# per-placement verdicts
# ---------------------------------------------------------------------------------------------
def test_peri_init_law(tmp_path):
    assert status([make_run(tmp_path, "a", "peri")], "peri.init_law") == "pass"        # 1 + 2l, ε ≪ p
    assert status([make_run(tmp_path, "b", "peri", m2=lambda s: 1 + LAY)], "peri.init_law") == "fail"


def test_peri_init_law_uses_the_norm_eps(tmp_path):
    # branch outputs of power ε: each sublayer adds 1/2, so 1 + l is RIGHT and 1 + 2l is wrong
    def tiny(s):
        return np.full(2 * L, 1e-5)
    assert status([make_run(tmp_path, "a", "peri", m2=lambda s: 1 + LAY, raw_var=tiny)], "peri.init_law") == "pass"
    assert status([make_run(tmp_path, "b", "peri", raw_var=tiny)], "peri.init_law") == "fail"


def test_post_init_level(tmp_path):
    def ok(s):
        return np.r_[8e-4, np.ones(L)]
    assert status([make_run(tmp_path, "a", "post", m2=ok)], "post.init_level") == "pass"
    assert status([make_run(tmp_path, "b", "post", m2=lambda s: np.r_[8e-4, 1.3 * np.ones(L)])],
                  "post.init_level") == "fail"


def test_post_flat(tmp_path):
    assert status([make_run(tmp_path, "a", "post", m2=lambda s: np.r_[8e-4, 1.2 * np.ones(L)],
                            gains=(1.2, 1.5))], "post.flat") == "pass"
    assert status([make_run(tmp_path, "b", "post", m2=lambda s: np.r_[8e-4, 1.0 + LAY[1:]],
                            gains=(1.2, 1.5))], "post.flat") == "fail"


def test_pre_init_slope(tmp_path):
    assert status([make_run(tmp_path, "a", "pre", m2=lambda s: _pre_init_mid())], "pre.init_slope") == "pass"
    assert status([make_run(tmp_path, "b", "pre", m2=lambda s: 3 * _pre_init_mid())], "pre.init_slope") == "fail"


@pytest.mark.parametrize("placement", ["lns", "output"])
def test_init_interval(tmp_path, placement):
    pred = compare.predict_init(make_run(tmp_path, "probe", placement), m2_0=2 * SIGMA ** 2)
    mid = pred["mid"].to_numpy()
    assert status([make_run(tmp_path, "a", placement, m2=lambda s: mid)], f"{placement}.init_interval") == "pass"
    assert status([make_run(tmp_path, "b", placement, m2=lambda s: np.r_[mid[0], 3 * mid[1:]])],
                  f"{placement}.init_interval") == "fail"


def test_peri_hard_bound(tmp_path):
    assert status([make_run(tmp_path, "a", "peri")], "peri.hard_bound") == "pass"
    def big(s):
        return 1 + 2 * LAY if s == 0 else 0.5 * 3.0 ** LAY * 10       # RMS 14 at layer 4 > bound 9
    assert status([make_run(tmp_path, "b", "peri", m2=big)], "peri.hard_bound") == "fail"


def test_pre_growth_superlinear(tmp_path):
    def expo(s):
        return _pre_init_mid() if s == 0 else 0.05 * 2.2 ** LAY
    assert status([make_run(tmp_path, "a", "pre", m2=expo)], "pre.growth_superlinear") == "pass"
    def lin(s):
        return _pre_init_mid() if s == 0 else 1 + 3 * LAY
    assert status([make_run(tmp_path, "b", "pre", m2=lin)], "pre.growth_superlinear") == "fail"


def test_peri_growth_linear(tmp_path):
    assert status([make_run(tmp_path, "a", "peri", m2=lambda s: 1 + 2.4 * LAY)], "peri.growth_linear") == "pass"
    def sq(s):
        return 1 + 2 * LAY if s == 0 else (1 + 1.5 * LAY) ** 2         # RMS growing linearly: m2 quadratic
    assert status([make_run(tmp_path, "b", "peri", m2=sq)], "peri.growth_linear") == "fail"


def test_peri_fp16_margin(tmp_path):
    assert status([make_run(tmp_path, "a", "peri")], "peri.fp16_margin") == "pass"
    def over(s):
        return np.r_[np.ones(L) * 3, 7e4 if s == 100 else 3]
    assert status([make_run(tmp_path, "b", "peri", absmax=over)], "peri.fp16_margin") == "fail"


def test_prop31_batched_bound(tmp_path):
    def h(s):
        return np.full(L, 0.2 * (1 + s / 100))
    def g(s):
        return np.full(L, 1e-4)
    assert status([make_run(tmp_path, "a", "pre", rms_h=h, g_a=g)], "prop31.batched_bound") == "pass"
    def bound(s, role):
        return 2.0 * B * T * math.sqrt(DFF * D) * h(s) * g(s) if role == "mlp.out" else np.ones(L)
    assert status([make_run(tmp_path, "b", "pre", rms_h=h, g_a=g, grad=bound)], "prop31.batched_bound") == "fail"


def test_prop31_pre_identity(tmp_path):
    def h(s):
        return 0.2 * (1 + s / 25) * np.linspace(1, 3, L)
    def g(s):
        return np.full(L, 1e-4)
    assert status([make_run(tmp_path, "a", "pre", rms_h=h, g_a=g)], "prop31.pre_identity") == "pass"
    def flat(s, role):
        return np.full(L, 0.3)                                 # gradient blind to h
    assert status([make_run(tmp_path, "b", "pre", rms_h=h, g_a=g, grad=flat)], "prop31.pre_identity") == "fail"


def test_post_grad_vanishing(tmp_path):
    def grows(s, role):
        return np.array([0.4, 0.6, 0.8, 1.0])
    assert status([make_run(tmp_path, "a", "post", grad=grows)], "post.grad_vanishing") == "pass"
    def shrinks(s, role):
        return np.array([1.0, 0.8, 0.6, 0.4])
    assert status([make_run(tmp_path, "b", "post", grad=shrinks)], "post.grad_vanishing") == "fail"


# ---------------------------------------------------------------------------------------------
# cross-placement verdicts
# ---------------------------------------------------------------------------------------------
def test_xiong_post_over_pre(tmp_path):
    def m2_pre(s):
        return np.r_[0.01, 0.5, 1.0, 2.0, 4.0]                     # sqrt(m2_L) = 2
    pre = make_run(tmp_path, "pre", "pre", m2=m2_pre, grad=lambda s, r: np.full(L, 0.5))
    ok = make_run(tmp_path, "post_ok", "post", grad=lambda s, r: np.full(L, 1.0))      # ratio 2
    bad = make_run(tmp_path, "post_bad", "post", grad=lambda s, r: np.full(L, 0.5 * 2 * 10))  # ×10 off
    assert status([pre, ok], "xiong.post_over_pre") == "pass"
    assert status([pre, bad], "xiong.post_over_pre") == "fail"
    # the old formula sqrt(L·m2) = 4 would have been off by ×2 here; the record holds the new one
    assert _one(V.all_verdicts([pre, ok]), "xiong.post_over_pre").predicted == pytest.approx(2.0)


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("which", ["init", "end"])
def test_grad_ordering(tmp_path, side, which):
    roles = compare.INPUT_SIDE if side == "input" else compare.OUTPUT_SIDE
    def runs(scales, tag):
        return [make_run(tmp_path, f"{p}{tag}", p, grad=lambda s, r, k=k: np.full(L, k if r in roles else 1.0))
                for p, k in scales.items()]
    assert status(runs({"post": 1.0, "pre": 0.1, "peri": 0.01}, "a"), f"grad.ordering_{which}_{side}") == "pass"
    # the other side's weights do not decide this verdict
    assert status(runs({"post": 0.01, "pre": 0.1, "peri": 1.0}, "b"), f"grad.ordering_{which}_{side}") == "fail"


def test_grad_peri_flattest(tmp_path):
    flat, steep = (lambda s, r: np.ones(L)), (lambda s, r: np.array([1.0, 3.0, 9.0, 27.0]))
    a = [make_run(tmp_path, "peri_a", "peri", grad=flat), make_run(tmp_path, "pre_a", "pre", grad=steep)]
    b = [make_run(tmp_path, "peri_b", "peri", grad=steep), make_run(tmp_path, "pre_b", "pre", grad=flat)]
    assert status(a, "grad.peri_flattest") == "pass"
    assert status(b, "grad.peri_flattest") == "fail"


def test_prop31_peri_damping(tmp_path):
    small, large = (lambda s, r: np.full(L, 0.1)), (lambda s, r: np.full(L, 1.0))
    a = [make_run(tmp_path, "peri_a", "peri", grad=small), make_run(tmp_path, "pre_a", "pre", grad=large)]
    b = [make_run(tmp_path, "peri_b", "peri", grad=large), make_run(tmp_path, "pre_b", "pre", grad=small)]
    assert status(a, "prop31.peri_damping") == "pass"
    assert status(b, "prop31.peri_damping") == "fail"


def test_paired_verdicts(tmp_path):
    low, high = (lambda s: 3.0 - s / 100), (lambda s: 3.5 - s / 100)
    big, small = (lambda s: 1 + 10 * LAY), (lambda s: 1 + 2 * LAY)
    runs = [make_run(tmp_path, f"pre{k}", "pre", seed=k, loss=high, m2=big) for k in (0, 1)]
    runs += [make_run(tmp_path, f"peri{k}", "peri", seed=k, loss=low, m2=small) for k in (0, 1)]
    v = _one(V.all_verdicts(runs), "paired.peri_lower_loss")
    assert v.status == "pass" and v.n_runs == 2 and v.measured == pytest.approx(0.5)
    assert status(runs, "paired.pre_larger_variance") == "pass"
    bad = [make_run(tmp_path, "pre_x", "pre", seed=3, loss=low, m2=small),
           make_run(tmp_path, "peri_x", "peri", seed=3, loss=high, m2=big)]
    assert status(bad, "paired.peri_lower_loss") == "fail"
    assert status(bad, "paired.pre_larger_variance") == "fail"
    # different seeds: no pair, not applicable
    unpaired = [make_run(tmp_path, "pre_u", "pre", seed=5), make_run(tmp_path, "peri_u", "peri", seed=6)]
    assert status(unpaired, "paired.peri_lower_loss") == "n/a"


def _lr_sweep(tmp_path, tag, peri_loss, pre_loss, peri_div=(), pre_div=()):
    runs = []
    for p, fn, div in (("peri", peri_loss, peri_div), ("pre", pre_loss, pre_div)):
        for lr in (1e-3, 1e-2):
            runs.append(make_run(tmp_path, f"{p}{tag}{lr:g}", p, lr=lr, loss=lambda s, lr=lr, fn=fn: fn(lr),
                                 diverged=lr in div))
    return runs


def test_sweep_lr_robustness(tmp_path):
    robust, fragile = (lambda lr: 2.0), (lambda lr: 2.0 + 100 * lr)
    assert status(_lr_sweep(tmp_path, "a", robust, fragile), "sweep.lr_robustness") == "pass"
    assert status(_lr_sweep(tmp_path, "b", fragile, robust), "sweep.lr_robustness") == "fail"
    one = [make_run(tmp_path, "peri1", "peri"), make_run(tmp_path, "pre1", "pre")]
    assert status(one, "sweep.lr_robustness") == "n/a"


def test_sweep_divergence(tmp_path):
    def same(lr):
        return 2.0
    assert status(_lr_sweep(tmp_path, "a", same, same, pre_div=(1e-2,)), "sweep.divergence") == "pass"
    assert status(_lr_sweep(tmp_path, "b", same, same, peri_div=(1e-2,)), "sweep.divergence") == "fail"


# ---------------------------------------------------------------------------------------------
# schema, aggregation, rules, json, rendering
# ---------------------------------------------------------------------------------------------
def test_seed_aggregation_mean_and_t_interval(tmp_path):
    runs = [make_run(tmp_path, f"peri{k}", "peri", seed=k, m2=lambda s, k=k: (1 + 2 * LAY) * (1 + 0.02 * (k - 1)))
            for k in range(3)]
    v = _one(V.all_verdicts(runs), "peri.init_law")
    assert v.n_runs == 3 and sorted(v.runs) == ["peri0", "peri1", "peri2"]
    meas = [9 * (1 + 0.02 * (k - 1)) for k in range(3)]
    m, ci = V.t_interval(meas)
    assert v.measured == pytest.approx(np.mean(meas)) and v.ci == pytest.approx(ci)
    from scipy import stats
    half = stats.t.ppf(0.975, 2) * np.std(meas, ddof=1) / math.sqrt(3)
    assert ci[1] - m == pytest.approx(half)
    assert isinstance(v.measured, float) and isinstance(v.predicted, float)


def test_decide_rules():
    assert V.decide("rel", 1.05, 1.0, 0.1) == "pass" and V.decide("rel", 1.2, 1.0, 0.1) == "fail"
    assert V.decide("rel", 1.2, 1.0, 0.1, ci=[1.0, 1.4]) == "pass"                # within the CI
    assert V.decide("in", 5.0, None, 0.1, predicted_range=[4, 6]) == "pass"
    assert V.decide("in", 7.0, None, 0.1, predicted_range=[4, 6]) == "fail"
    assert V.decide("le", 1.0, 1.0, 0.0) == "pass" and V.decide("le", 1.01, 1.0, 0.0) == "fail"
    assert V.decide("gt", 0.1, 0.0, 0.0) == "pass" and V.decide("lt", 0.1, 0.0, 0.0) == "fail"
    assert V.decide("factor", 2.0, 1.0, 3.0) == "pass" and V.decide("factor", 4.0, 1.0, 3.0) == "fail"
    assert V.decide("rel", None, 1.0, 0.1) == "n/a" and V.decide("rel", float("nan"), 1.0, 0.1) == "n/a"
    with pytest.raises(ValueError, match="unknown verdict rule"):
        V.decide("approx", 1.0, 1.0, 0.1)


def test_json_schema_and_rendering(tmp_path):
    runs = [make_run(tmp_path, "peri", "peri"),
            make_run(tmp_path, "post", "post", m2=lambda s: np.r_[8e-4, np.ones(L)])]
    vs = V.all_verdicts(runs)
    path = V.write_json(vs, tmp_path / "verdicts.json", runs)
    doc = json.loads(path.read_text())
    assert doc["schema"] == 1 and [r["name"] for r in doc["runs"]] == ["peri", "post"]
    for rec in doc["verdicts"]:
        for key in ("id", "claim", "tag", "measured", "predicted", "tolerance", "status", "n_runs", "ci"):
            assert key in rec, key
        assert rec["tag"] in V.TAGS and rec["status"] in ("pass", "fail", "n/a")
        assert rec["measured"] is None or isinstance(rec["measured"], (int, float))
    md = "\n".join(render.verdict_sections_md(doc["verdicts"]))
    theory_part, instr_part = md.split("## Instrument checks")
    assert "`post.init_level`" in instr_part and "`post.init_level`" not in theory_part
    assert "`peri.init_law`" in theory_part and "`peri.fp16_margin`" in instr_part
