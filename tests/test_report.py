"""analysis.report end to end on run directories written here (parquet + meta.json) with planted
physics: files exist, the verdict table says pass/fail/n-a where it should, a run without theory or
with missing statistics does not break the report, and analysis works with torch unimportable."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.integrate import quad
from scipy.special import erf

import lnprobe.analysis as analysis
from lnprobe.analysis.report import build_report, run_report

REPO = Path(__file__).resolve().parents[1]
L, D, DFF, SIGMA, T, B = 4, 64, 256, 0.02, 32, 4
STEPS = (0, 50, 100)


def _v_mlp_gelu() -> float:
    """d_ff σ² E[GELU(z)²], z ~ N(0, D σ²): independent numerical reference (adaptive quadrature)."""
    s2 = D * SIGMA ** 2
    q = quad(lambda z: (0.5 * z * (1 + erf(z / math.sqrt(2)))) ** 2 * math.exp(-z * z / (2 * s2))
             / math.sqrt(2 * math.pi * s2), -np.inf, np.inf)[0]
    return DFF * SIGMA ** 2 * q


def _meta(name, placement, norms=True):
    post = placement in ("peri", "post")
    roles = ([("norm_attn_in", "norm.pre_attn"), ("norm_mlp_in", "norm.pre_mlp")]
             if placement in ("pre", "peri") else [])
    roles += [("norm_attn_out", "norm.post_attn"), ("norm_mlp_out", "norm.post_mlp")] if post else []
    norm_list = [{"name": f"blocks.{l}.{m}", "role": r, "layer": l, "kind": "layernorm", "gain_offset": 0.0,
                  "weight": f"blocks.{l}.{m}.weight", "bias": None} for l in range(L) for m, r in roles]
    param_roles = {f"blocks.{l}.{p}.weight": {"role": r, "layer": l} for l in range(L)
                   for p, r in (("attn.qkv", "attn.qkv"), ("attn.out", "attn.out"), ("mlp.fc_in", "mlp.in"),
                                ("mlp.fc_out", "mlp.out"))}
    param_roles.update({n["weight"]: {"role": n["role"], "layer": n["layer"]} for n in norm_list})
    meta = {"run_name": name, "status": "finished", "placement": placement, "n_layers": L, "d_model": D,
            "norm_type": "layernorm", "param_roles": param_roles,
            "config": {"model": {"d_model": D, "n_layers": L, "placement": placement, "mlp": "gelu", "d_ff": DFF,
                                 "init_std": SIGMA, "seq_len": T, "scaled_init": False,
                                 "embed_norm": placement == "peri"},
                       "train": {"batch_size": B, "seq_len": T, "steps": STEPS[-1] + 1}}}
    if norms:
        meta["norms"] = norm_list
    return meta


def _write(path: Path, meta: dict, rows: list, parts: int = 2) -> Path:
    df = pd.DataFrame(rows, columns=["step", "site", "layer", "stat", "value", "token", "channel"])
    df["token"] = df["token"].astype("Int64")
    df["channel"] = df["channel"].astype("Int64")
    (path / "records").mkdir(parents=True)
    for i, chunk in enumerate(np.array_split(np.arange(len(df)), parts)):
        df.iloc[chunk].to_parquet(path / "records" / f"part-{i:06d}.parquet", index=False)
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def _rows(placement, m2_profile, *, grad_scale, grad_shape, gains, top1, full=True, prop31_factor=0.5):
    """Records of one synthetic run. m2_profile(step) -> (L+1,) resid m2; gains(step) -> (gain_ms,
    gain_absmax) of every norm; top1(step, layer) -> (value, token, channel); grad_shape: (L,)
    relative per-layer gradient profile."""
    rows = []
    for s in STEPS:
        m2 = m2_profile(s)
        for l in range(L + 1):
            rms = math.sqrt(m2[l])
            rows += [(s, "resid", l, "m2", m2[l], None, None), (s, "resid", l, "rms", rms, None, None)]
            if not full:
                continue
            v, tok, ch = top1(s, l)
            rows += [(s, "resid", l, "var", 0.99 * m2[l], None, None),
                     (s, "resid", l, "absmax", v, tok, ch), (s, "resid", l, "top1", v, tok, ch),
                     (s, "resid", l, "top2", 3.5 * rms, 5, 3), (s, "resid", l, "top3", 3.2 * rms, 6, 4),
                     (s, "resid", l, "median_abs", 0.67 * rms, None, None),
                     (s, "resid", l, "over_fp16", float(v > 65504), None, None),
                     (s, "resid", l, "grad_rms", 1e-4 / rms, None, None)]
        if full:
            for l in range(L):
                rms_h = 0.2 * (1 + s / 100)
                g_a = 1e-4
                bound = B * T * math.sqrt(DFF * D) * rms_h * g_a
                rows += [(s, "mlp_act", l, "rms", rms_h, None, None), (s, "mlp_raw", l, "rms", 0.1, None, None),
                         (s, "mlp_raw", l, "grad_rms", g_a, None, None),
                         (s, "mlp_out", l, "grad_rms", g_a, None, None)]
                for p, scale in (("attn.qkv", 1.0), ("attn.out", 0.7), ("mlp.fc_in", 1.2), ("mlp.fc_out", 0.9)):
                    gn = grad_scale * scale * grad_shape[l]
                    if p == "mlp.fc_out":
                        gn = prop31_factor * bound * grad_scale * grad_shape[l]
                    rows += [(s, f"param:blocks.{l}.{p}.weight", l, "grad_norm", gn, None, None),
                             (s, f"param:blocks.{l}.{p}.weight", l, "param_norm", 3.0, None, None)]
                g_ms, g_max = gains(s)
                for n in ("norm_attn_in", "norm_mlp_in", "norm_attn_out", "norm_mlp_out"):
                    rows += [(s, f"param:blocks.{l}.{n}.weight", l, "gain_ms", g_ms, None, None),
                             (s, f"param:blocks.{l}.{n}.weight", l, "gain_absmax", g_max, None, None)]
        loss = 5.0 - 2.0 * s / 100
        rows.append((s, "train", -1, "loss", loss, None, None))
        if s:
            rows.append((s, "train", -1, "val_loss", loss + 0.1, None, None))
    return rows


def _quiet_top1(s, l):
    return 4.0, 1, 2


def make_runs(root: Path) -> dict[str, Path]:
    lo_attn = (D * SIGMA ** 2) ** 2 * np.mean(1 / np.arange(1, T + 1))
    hi_attn = (D * SIGMA ** 2) ** 2
    inc = _v_mlp_gelu() + 0.5 * (lo_attn + hi_attn)
    lay = np.arange(L + 1)
    m2_0 = 2 * SIGMA ** 2
    runs = {}
    runs["peri"] = _write(root / "peri", _meta("peri", "peri"), _rows(
        "peri", lambda s: (1 + 2 * lay) * (1 + 0.004 * s / 100) if s == 0 else 1 + 2.4 * lay,
        grad_scale=0.01, grad_shape=np.ones(L), gains=lambda s: (1.0 + s / 500, 1.0 + s / 200),
        top1=lambda s, l: (4 * math.sqrt(1 + 2.4 * l), 2, 7)))
    runs["pre"] = _write(root / "pre", _meta("pre", "pre"), _rows(
        "pre", lambda s: m2_0 + inc * lay if s == 0 else 0.05 * 2.2 ** lay,
        grad_scale=0.1, grad_shape=np.array([1.0, 0.6, 0.4, 0.3]), gains=lambda s: (1.0, 1.0),
        top1=lambda s, l: (3000.0, 0, 11) if s == 100 and l >= 2 else (1.0, 1, 2)))
    runs["post"] = _write(root / "post", _meta("post", "post"), _rows(
        "post", lambda s: np.r_[m2_0, np.ones(L) * (1.0 if s == 0 else 1.21)],
        grad_scale=1.0, grad_shape=np.array([0.5, 0.7, 0.9, 1.0]), gains=lambda s: (1.0 if s == 0 else 1.2, 1.5),
        top1=_quiet_top1))
    runs["none"] = _write(root / "none", _meta("plain", "none"), _rows(
        "none", lambda s: 0.1 * (1 + lay), grad_scale=0.5, grad_shape=np.ones(L), gains=lambda s: (1.0, 1.0),
        top1=_quiet_top1))
    runs["sparse"] = _write(root / "sparse", _meta("sparse", "peri", norms=False), _rows(
        "peri", lambda s: 1 + 2 * lay, grad_scale=0, grad_shape=np.ones(L), gains=None, top1=None, full=False))
    return runs


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = make_runs(root)
    out = root / "report"
    res = build_report([runs[k] for k in ("peri", "pre", "post", "none", "sparse")], out)
    return res, runs


def _status(res, id_, group=None):
    v = res.verdicts
    hit = v[(v["id"] == id_) & ((v["group"] == group) if group is not None else True)]
    assert len(hit) == 1, (id_, group, v[["id", "group"]])
    return hit["status"].iloc[0]


def test_report_files_exist(report):
    res, _ = report
    assert res.report_md.exists() and res.report_html.exists()
    for name, paths in res.figures.items():
        assert paths["png"].stat().st_size > 1000 and paths["svg"].stat().st_size > 1000, name
        assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    expected = {"variance_m2_by_layer", "variance_var_by_layer", "absmax_over_steps", "grad_norms_by_role",
                "hidden_grad_rms", "loss", "prop31", "top_activations_pre", "heatmaps_pre", "topk_locations_pre",
                "heatmaps_sparse"}
    assert expected <= set(res.figures), set(res.figures)
    html = res.report_html.read_text()
    assert html.count("data:image/png;base64,") == len(res.figures)
    assert "src='http" not in html and "<img src=\"" not in html              # self-contained
    md = res.report_md.read_text()
    assert "| id | claim |" in md and "## Summary" in md and "## Instrument checks" in md
    for name in res.figures:
        assert f"({name}.png)" in md
    # the tables are rendered from verdicts.json, written next to report.md
    doc = json.loads((res.out_dir / "verdicts.json").read_text())
    assert res.verdicts_json == res.out_dir / "verdicts.json"
    assert [v["id"] for v in doc["verdicts"]] == res.verdicts["id"].tolist()
    for v in doc["verdicts"]:
        assert f"`{v['id']}`" in md and v["id"] in html


def test_verdicts_per_placement(report):
    # changed with the verdict records: one record per (id, configuration group) instead of one row per
    # run and check name; the "peri" and "sparse" runs share a configuration and form one Peri-LN
    # group. Expected statuses are those of the former per-run rows.
    res, _ = report
    expect = {
        ("peri.init_law", "peri"): "pass", ("peri.hard_bound", "peri"): "pass",
        ("peri.growth_linear", "peri"): "pass", ("peri.fp16_margin", "peri"): "pass",
        ("prop31.batched_bound", "peri"): "pass",
        ("pre.init_slope", "pre"): "pass", ("pre.growth_superlinear", "pre"): "pass",
        ("prop31.batched_bound", "pre"): "pass", ("prop31.pre_identity", "pre"): "pass",
        ("post.init_level", "post"): "pass", ("post.flat", "post"): "pass",
        ("post.grad_vanishing", "post"): "pass",
        ("none.theory", "none"): "n/a",
    }
    for (id_, group), want in expect.items():
        assert _status(res, id_, group) == want, (id_, group, res.verdicts.query("group == @group").to_string())
    v = res.verdicts.set_index(["id", "group"])
    assert v.loc[("peri.init_law", "peri"), "n_runs"] == 2                 # peri and sparse
    assert v.loc[("peri.hard_bound", "peri"), "n_runs"] == 1               # sparse has no gains
    for side in ("input", "output"):
        assert _status(res, f"grad.ordering_init_{side}") == "pass"
        assert _status(res, f"grad.ordering_end_{side}") == "pass"
    assert _status(res, "grad.peri_flattest") == "pass"
    assert _status(res, "prop31.peri_damping") == "pass"
    assert _status(res, "paired.peri_lower_loss") == "n/a"                # no seed in these metas
    assert set(res.verdicts["status"]) <= {"pass", "fail", "n/a"}
    assert set(res.verdicts["tag"]) <= {"paper", "derived", "related", "instrument"}


def test_sparse_run_alone_is_not_applicable_where_stats_are_missing(tmp_path):
    runs = make_runs(tmp_path)
    res = build_report([runs["sparse"]], tmp_path / "out")
    for id_ in ("peri.hard_bound", "peri.fp16_margin", "prop31.batched_bound"):
        assert _status(res, id_) == "n/a", id_
    assert _status(res, "peri.init_law") == "pass" and _status(res, "peri.growth_linear") == "pass"


def test_missing_stats_listed_not_fatal(report):
    res, _ = report
    assert "top_activations_sparse" in res.missing and "topk_locations_sparse" in res.missing
    assert "top1" in res.missing["top_activations_sparse"]
    assert any("sparse" in n for n in res.partial.get("grad_norms_by_role", []))
    md = res.report_md.read_text()
    assert "## Figures that could not be made" in md and "top_activations_sparse" in md
    assert "not made" not in res.missing                                  # only real figure names


def test_summary_has_measured_numbers(report):
    res, _ = report
    pre = next(s for s in res.summary if s.startswith("**pre**"))
    assert "max |x| 3000" in pre and "channel 11" in pre and "final train loss 3" in pre
    assert "exponential" in pre
    peri = next(s for s in res.summary if s.startswith("**peri**"))
    assert "final val loss 3.1" in peri


def test_failures_are_reported_as_fail(tmp_path):
    lay = np.arange(L + 1)
    bad = _write(tmp_path / "bad", _meta("bad", "peri"), _rows(
        "peri", lambda s: 1 + lay if s == 0 else 0.5 * 3.0 ** lay,     # 1 + l at init, exponential later
        grad_scale=1.0, grad_shape=np.ones(L), gains=lambda s: (1.0, 1.0),
        top1=lambda s, l: (1e5, 0, 3) if s == 100 and l == L else (5.0, 1, 1), prop31_factor=2.0))
    res = build_report([bad], tmp_path / "out")
    for id_ in ("peri.init_law", "peri.hard_bound", "peri.growth_linear", "peri.fp16_margin", "prop31.batched_bound"):
        assert _status(res, id_) == "fail", id_
    assert "| **FAIL** |" in res.report_md.read_text()


def test_unreadable_part_is_skipped_with_warning(tmp_path):
    runs = make_runs(tmp_path)
    (runs["post"] / "records" / "part-000009.parquet").write_bytes(b"not parquet")
    with pytest.warns(UserWarning, match="part-000009.parquet"):
        run = analysis.load(runs["post"])
    assert len(run.records) and any("part-000009" in w for w in run.warnings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = run_report([runs["post"]], tmp_path / "out")
    assert md.name == "report.md" and "part-000009" in md.read_text()
    with pytest.raises(ValueError, match="at least one"):
        build_report([], tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="run directory"):
        build_report([tmp_path / "missing"], tmp_path / "none")


def test_analysis_works_with_torch_unimportable(tmp_path):
    runs = make_runs(tmp_path)
    code = (
        "import sys\n"
        "import lnprobe.analysis as analysis, lnprobe.analysis.report, lnprobe.analysis.plots, "
        "lnprobe.analysis.verdicts\n"
        "assert 'torch' not in sys.modules, 'importing analysis pulled in torch'\n"
        "sys.modules['torch'] = None  # any later 'import torch' raises ImportError\n"
        f"res = analysis.build_report([{str(runs['pre'])!r}], {str(tmp_path / 'out')!r})\n"
        "assert sys.modules['torch'] is None\n"
        "print(len(res.figures), res.report_html.exists(), len(res.verdicts))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    n, ok, nv = p.stdout.split()
    assert int(n) >= 8 and ok == "True" and int(nv) >= 3


def test_load_keeps_the_later_duplicate_and_survives_missing_meta(tmp_path):
    rows0 = [(0, "resid", l, "m2", 1.0 + l, None, None) for l in range(3)] + [(0, "train", -1, "loss", 5.0, None, None)]
    rows1 = [(0, "resid", 2, "m2", 9.0, None, None), (1, "resid", 0, "m2", 2.0, None, None),
             (1, "resid", 1, "top1", 7.0, 3, 4)]
    d = tmp_path / "r"
    (d / "records").mkdir(parents=True)
    for i, rows in enumerate((rows0, rows1)):
        df = pd.DataFrame(rows, columns=["step", "site", "layer", "stat", "value", "token", "channel"])
        df.astype({"token": "Int64", "channel": "Int64"}).to_parquet(d / "records" / f"part-{i:06d}.parquet")
    with pytest.warns(UserWarning, match="meta.json"):
        run = analysis.load(d)
    assert run.meta == {} and run.name == "r" and run.placement == "unknown"
    assert run.pivot("resid", "m2").loc[0].tolist() == [1.0, 2.0, 9.0]   # part 1 replaced part 0's value
    assert run.n_layers == 2
    top = run.frame("resid", "top1").iloc[0]
    assert (top["token"], top["channel"]) == (3, 4)
    assert run.records["token"].dtype == "Int64" and run.series("loss").to_dict() == {0: 5.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = build_report([d], tmp_path / "out")
    assert res.verdicts["status"].tolist() == ["n/a"]
    assert "variance_m2_by_layer" in res.figures and "loss" in res.figures


# ---------------------------------------------------------------------------------------------
# figures a reviewer expects
# ---------------------------------------------------------------------------------------------
def test_cross_run_figures_in_report(report):
    res, _ = report
    for name in ("variance_shared", "top1_ratio_over_steps", "grad_vanishing", "prop31_slope"):
        assert name in res.figures, (name, res.missing.get(name))
    assert "loss_vs_lr" not in res.figures and "loss_vs_lr" not in res.missing     # one lr: not a sweep figure


def test_titles_do_not_repeat_the_placement(report):
    from lnprobe.analysis import plots

    _, runs = report
    pre, plain = analysis.load(runs["pre"]), analysis.load(runs["none"])
    assert plots._label(pre) == "pre" and plots._label(plain) == "plain (none)"
    fig = plots.plot_variance_by_layer([pre])
    assert "pre (pre)" not in fig.axes[0].get_title()


def test_top_activations_draw_both_thresholds(report):
    from lnprobe.analysis import plots

    _, runs = report
    ax = plots.plot_top_activations(analysis.load(runs["pre"])).axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert "|x| = 100" in labels and "1000 × median" in labels
    med = next(line for line in ax.get_lines() if line.get_label() == "median |x|").get_ydata()
    thr = next(line for line in ax.get_lines() if line.get_label() == "1000 × median").get_ydata()
    np.testing.assert_allclose(thr, 1000 * np.asarray(med))


def test_token_axis_uses_tokens_per_step(report):
    from lnprobe.analysis import plots

    _, runs = report
    fig = plots.plot_loss([analysis.load(runs["pre"])])
    tops = [a for a in fig.axes[0].child_axes if a.get_xlabel().startswith("training tokens")]
    assert tops and f"({B * T} per step)" in tops[0].get_xlabel()


def _with_train(path: Path, root: Path, name: str, lr: float, seed: int, loss_shift: float) -> Path:
    """A copy of a synthetic run with lr, seed and a shifted loss (for sweep figures)."""
    import shutil

    dest = root / name
    shutil.copytree(path, dest)
    meta = json.loads((dest / "meta.json").read_text())
    meta["run_name"] = name
    meta["config"]["train"].update(lr=lr, seed=seed)
    (dest / "meta.json").write_text(json.dumps(meta))
    part = dest / "records" / "part-000099.parquet"
    rows = [(s, "train", -1, "val_loss", 3.0 + loss_shift, None, None) for s in (STEPS[-1] + 1,)]
    df = pd.DataFrame(rows, columns=["step", "site", "layer", "stat", "value", "token", "channel"])
    df.astype({"token": "Int64", "channel": "Int64"}).to_parquet(part, index=False)
    return dest


def test_sweep_figures_and_slopes(tmp_path):
    from lnprobe.analysis import compare, plots, plots_cross

    runs = make_runs(tmp_path / "base")
    made = [_with_train(runs[p], tmp_path, f"{p}_lr{lr:g}_s{s}", lr, s, shift)
            for p, base in (("pre", 0.5), ("peri", 0.0)) for lr in (1e-2, 1e-1) for s in (0, 1)
            for shift in [base + (0.3 if lr == 1e-1 and p == "pre" else 0.0) + 0.01 * s]]
    loaded = [analysis.load(d) for d in made]
    f = compare.sweep_frame(loaded)
    assert len(f) == 8 and f.groupby(["placement", "lr"]).size().eq(2).all()
    assert f.loc[f["run"] == "pre_lr0.1_s1", "final_loss"].iloc[0] == pytest.approx(3.81)
    ax = plots_cross.plot_loss_vs_lr(loaded).axes[0]
    pre_line = next(line for line in ax.get_lines() if line.get_label().startswith("pre"))
    np.testing.assert_allclose(pre_line.get_ydata(), [3.505, 3.805])                 # means over seeds
    with pytest.raises(plots.MissingData, match="2 learning rates"):
        plots_cross.plot_loss_vs_lr([loaded[0], loaded[4]])
    # Prop. 3.1 slope over trained steps: the synthetic ‖∇W2‖ is 0.5·bound ∝ rms(h), so slope 1
    s = compare.prop31_slope(loaded[0])
    assert s is not None and s["slope"] == pytest.approx(1.0, abs=1e-6)
    assert set(plots_cross.prop31_slopes(loaded)["placement"]) == {"pre", "peri"}
    res = build_report(made, tmp_path / "out", sweep=True)
    assert "loss_vs_lr" in res.figures and res.summary[0].startswith("**sweep** (8 runs")
    assert len([n for n in res.figures if n.startswith("heatmaps_")]) == 2            # one run per placement
