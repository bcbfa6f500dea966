"""Report builder: run directories -> figures (PNG + SVG), report.md and a self-contained report.html.

``build_report(run_dirs, out_dir)`` loads every run (analysis.io.load, no torch), makes every figure
of analysis.plots that the recorded statistics allow, computes the verdict table
(analysis.verdicts) and a summary in words with the measured numbers. A figure that cannot be made
is listed with the reason instead of failing the report. ``python -m analysis.report RUN... -o OUT``
does the same from a shell; ``run_report`` is the entry the lnprobe CLI calls.
"""
from __future__ import annotations

import argparse
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.figure import Figure

from . import compare, fits, massive, plots, plots_cross, plots_logits, render, stability, verdicts
from .io import Run, load

HONESTY = (
    "What a small run can and cannot show. The Peri-LN paper trains 400M–3.2B models on 30B tokens; "
    "runs analysed here are usually far smaller and shorter, so the init checks ([derived] laws that "
    "hold in expectation) are the sharp tests, while claims about training (Pre-LN super-linear growth, "
    "massive activations, FP16 overflow, loss spikes, gradient orderings marked 'paper, unconfirmed') "
    "may simply not be reached: a 'fail' there says the effect did not appear at this scale, not that "
    "the paper is wrong, and a 'pass' is one observation, not a confirmation. One weight draw on "
    "correlated text tokens scatters an init profile by about ±10 % (docs/theory.md, section 'Forward "
    "variance laws'); compare averages "
    "over seeds before reading much into a near-miss. Gradient-scale predictions from Xiong et al. are "
    "orders of magnitude only."
)


@dataclass
class ReportResult:
    """What :func:`build_report` wrote. ``figures``: name -> {"png": path, "svg": path};
    ``missing``: figure name -> why it could not be made; ``partial``: notes of figures drawn
    without some runs; ``verdicts``: the verdict records as a DataFrame (analysis.verdicts.Verdict
    columns); ``verdicts_json``: where they were written; ``summary``: one paragraph per run."""

    out_dir: Path
    report_md: Path
    report_html: Path
    verdicts_json: Path | None = None
    figures: dict[str, dict[str, Path]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    partial: dict[str, list[str]] = field(default_factory=dict)
    verdicts: pd.DataFrame = field(default_factory=pd.DataFrame)
    summary: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    stability: list[str] = field(default_factory=list)  # one paragraph per run (analysis.stability)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _unique_names(runs: list[Run]) -> None:
    """Give runs with the same name distinct names (suffix #2, #3) so figures and tables tell them apart."""
    seen: dict[str, int] = {}
    for r in runs:
        n = seen.get(r.name, 0)
        seen[r.name] = n + 1
        if n:
            r.name = f"{r.name}#{n + 1}"


def _representatives(runs: list[Run]) -> tuple[list[Run], list[Run]]:
    """Runs drawn in the per-run figures of a sweep: (the smallest seed of every placement × lr, one
    run per placement at its middle learning rate and smallest seed). A sweep of 27 runs would
    otherwise give 27 panels and 81 per-run figures that say the same thing."""
    def key(r: Run) -> tuple:
        s = compare.seed(r)
        return (s is None, s if isinstance(s, (int, float)) else 0)
    first: dict[tuple, Run] = {}
    for r in sorted(runs, key=key):
        first.setdefault((r.placement, compare.lr(r), compare.config_key(r, drop=("seed", "lr"))), r)
    multi = list(first.values())
    one = []
    for p in dict.fromkeys(r.placement for r in multi):
        rs = sorted((r for r in multi if r.placement == p), key=lambda r: compare.lr(r) or 0.0)
        one.append(rs[(len(rs) - 1) // 2])
    return multi, one


def _figure_specs(runs: list[Run], sweep: bool = False) -> list[tuple[str, str, Callable[[list[str]], Figure]]]:
    """(file name, caption, maker(notes) -> Figure) for every figure of the report. ``sweep``: the
    cross-run figures over all runs, the per-run figures for representatives (:func:`_representatives`)."""
    multi, single = _representatives(runs) if sweep else (runs, runs)
    lrs = {compare.lr(r) for r in runs} - {None}
    rep = " (smallest seed of each placement and lr)" if sweep else ""
    specs = [
        ("variance_shared", "(a) Mean x² of the residual stream against layer, every placement on one shared "
         "axis: last recorded step (solid, seeds averaged with a min–max band), step 0 (dotted).",
         lambda n: plots_cross.plot_variance_shared(runs, "m2", notes=n)),
        ("variance_m2_by_layer", "(a) Mean x² of the residual stream against layer, one curve per step (colour "
         "bar in steps and training tokens); theory at init as a grey band (paper Figure 1)." + rep,
         lambda n: plots.plot_variance_by_layer(multi, "m2", notes=n)),
        ("variance_var_by_layer", "(a') Per-token variance of the residual stream against layer." + rep,
         lambda n: plots.plot_variance_by_layer(multi, "var", notes=n)),
        ("absmax_over_steps", "(c) Largest |x| of the residual stream over training, with the FP16 maximum." + rep,
         lambda n: plots.plot_absmax_over_steps(multi, notes=n)),
        ("top1_ratio_over_steps", "(c') Sun et al.'s two thresholds over training: max over layers of "
         "top1/median |x| against 1000, and of top1 |x| against 100 (massive = above both).",
         lambda n: plots_cross.plot_top1_ratio_over_steps(runs, notes=n)),
        ("grad_norms_by_role", "(d) Weight-gradient norm per layer by parameter role, first and last step." + rep,
         lambda n: plots.plot_grad_norms_by_role(multi, notes=n)),
        ("grad_vanishing", "(d') mlp.out gradient norm per layer relative to the last block, at step 0 and at "
         "the end, per placement (Xiong et al.: Post-LN's early layers below 1 at init).",
         lambda n: plots_cross.plot_grad_vanishing(runs, notes=n)),
        ("hidden_grad_rms", "(e) RMS of the hidden-state gradient against layer." + rep,
         lambda n: plots.plot_hidden_grad_rms(multi, notes=n)),
        ("loss", "(g) Training and validation loss; red crosses mark loss spikes (7σ over the previous "
         "1000 steps)." + rep, lambda n: plots.plot_loss(multi, notes=n)),
        ("prop31", "(h) Proposition 3.1: mlp.out gradient norm against rms(h) and rms(h)/rms(a)." + rep,
         lambda n: plots.plot_prop31(multi, notes=n)),
        ("prop31_slope", "(h') Proposition 3.1 as a fitted slope of log ‖∇W2‖ against log rms(h) over the "
         "trained steps, per placement and per run.", lambda n: plots_cross.plot_prop31_slope(runs, notes=n)),
    ]
    if sweep or len(lrs) > 1:
        specs.append(("loss_vs_lr", "(j) Final validation loss against learning rate per placement, mean over "
                      "seeds with a min–max band; diverged runs counted at the top.",
                      lambda n: plots_cross.plot_loss_vs_lr(runs, notes=n)))
    specs += _signal_specs(multi, rep)
    for r in single:
        s = _slug(r.name)
        specs += [
            (f"top_activations_{s}", f"(b) {r.name}: top-1/2/3 and median |x| against layer at the last step, "
             "with both of Sun et al.'s thresholds (|x| = 100 and 1000 × median).",
             lambda n, r=r: plots.plot_top_activations(r)),
            (f"heatmaps_{s}", f"(f) {r.name}: layer × step heatmaps of mean x² and of the block gradient norm.",
             lambda n, r=r: plots.plot_heatmaps(r)),
            (f"topk_locations_{s}", f"(i) {r.name}: recorded top-3 (token, channel) locations at the step of "
             "the largest activation (a full surface needs a tensor dump).",
             lambda n, r=r: plots.plot_topk_locations(r)),
        ]
    return specs


def _signal_specs(runs: list[Run], rep: str) -> list[tuple[str, str, Callable[[list[str]], Figure]]]:
    """The instability-signal figures (analysis.plots_logits), for runs that recorded their statistics
    (opt-in: updates=, attn_logits=, logits=); none otherwise."""
    specs = []
    if any(r.params("update_ratio").shape[0] for r in runs):
        specs.append(("update_ratio", "(k) Optimizer update ratio ‖Δp‖/‖p‖ over training by parameter role, one "
                      "curve per layer." + rep, lambda n: plots_logits.plot_update_ratio(runs, notes=n)))
    if any(r.has("attn_logits", "qk_absmax") for r in runs):
        specs.append(("attention_logits", "(l) Attention-logit maximum max|q·k|/sqrt(d_h) and mean attention "
                      "entropy over training, one curve per layer; dashed: the QK-norm bound of theory §5." + rep,
                      lambda n: plots_logits.plot_attention_logits(runs, notes=n)))
    if any(r.has("logits", "lse_mean") for r in runs):
        specs.append(("logit_stats", "(m) Output logits over training: rms, max |z| and mean log Z (the z-loss "
                      "quantity)." + rep, lambda n: plots_logits.plot_logit_stats(runs, notes=n)))
    return specs


def scale_notes(runs: list[Run]) -> str:
    """What these runs did NOT reach, measured: divergence, Sun et al.'s massive activations, FP16."""
    notes = []
    n_div = sum(compare.diverged(r) for r in runs)
    if not n_div:
        notes.append(f"None of the {len(runs)} run(s) diverged, so the divergence claims are not tested here.")
    best_ratio, best_abs, n_massive = 0.0, 0.0, 0
    for r in runs:
        c = massive.massive_candidates(r)
        if len(c):
            best_ratio = max(best_ratio, float(np.nanmax(c["ratio"].to_numpy(dtype=np.float64), initial=0.0)))
            best_abs = max(best_abs, float(np.nanmax(c["value"].to_numpy(dtype=np.float64), initial=0.0)))
            n_massive += int(c["massive"].sum())
    if not n_massive and best_abs > 0:
        notes.append(f"No activation is massive by Sun et al.'s criterion (|x| > 100 and ≥ 1000 × median): the "
                     f"largest recorded |x| is {best_abs:.4g} and the largest top1/median {best_ratio:.4g}.")
    return " ".join(notes)


def sweep_summary(runs: list[Run]) -> str:
    """One paragraph over a sweep: final validation loss (mean over seeds) and divergences by
    placement and learning rate, and the last-layer m2 ratio Pre/Peri per learning rate."""
    f = compare.sweep_frame(runs)
    if not len(f) or f["lr"].isna().all():
        return ""
    parts = [f"**sweep** ({len(f)} runs: placements {', '.join(dict.fromkeys(f['placement']))}; learning rates "
             f"{', '.join(f'{x:g}' for x in sorted(f['lr'].dropna().unique()))}; seeds "
             f"{', '.join(str(x) for x in sorted(f['seed'].dropna().unique()))})"]
    for p, g in f.groupby("placement", sort=False):
        cells = []
        for lr_, h in g.groupby("lr"):
            div = int(h["diverged"].sum())
            loss = h["final_loss"].mean()
            cells.append(f"lr {lr_:g}: {loss:.3f}" + (f" ({div}/{len(h)} diverged)" if div else ""))
        parts.append(f"{p} final val loss (mean over seeds) " + ", ".join(cells))
    pre, peri = f[f["placement"] == "pre"], f[f["placement"] == "peri"]
    if len(pre) and len(peri):
        m2 = {p: g.groupby("lr")["m2_last"].mean() for p, g in (("pre", pre), ("peri", peri))}
        both = sorted(set(pre["lr"]) & set(peri["lr"]))
        ratio = [f"lr {lr_:g}: {m2['pre'][lr_] / m2['peri'][lr_]:.3g}" for lr_ in both]
        parts.append("last-layer m2 Pre/Peri (means over seeds) " + ", ".join(ratio))
    return "; ".join(parts) + ". Per-run numbers: summary.csv next to this report."


def _run_summary(run: Run) -> str:
    """One paragraph of measured numbers for a run."""
    parts = [f"**{run.name}** (placement {run.placement}, status {run.status}, L = {run.n_layers}, "
             f"D = {run.d_model if run.d_model is not None else '?'})"]
    m2 = run.pivot("resid", "m2")
    if not m2.empty:
        L = m2.columns.max()
        first, last = m2.index[0], m2.index[-1]
        parts.append(f"recorded steps {int(first)}–{int(last)} ({len(m2.index)} steps); last-layer mean x² "
                     f"{m2.loc[first, L]:.4g} at step {int(first)} and {m2.loc[last, L]:.4g} at step {int(last)}")
        lo = 1 if run.placement == "post" else 0
        g = fits.growth_over_steps(m2.loc[[last]], min_layer=lo).iloc[0]
        parts.append(f"growth over layers {lo}..L at the last step: {g['best']} (best fit {g['fit_best']}, "
                     f"exponential rate {g['rate']:.3g}/layer)")
        att = fits.attribution(run.select(["step", "site", "layer", "stat", "value"], stat="m2", step=int(last),
                                          site=["resid", "resid_mid", "attn_out", "mlp_out"]),
                               placement=run.placement)
        if len(att) and att["rho"].notna().any():
            parts.append(f"growth attribution at the last step: mean κ = v/m2(x) {att['kappa'].mean():.3g}, "
                         f"mean ρ (stream–branch cosine) {att['rho'].mean():.3g}")
    else:
        parts.append("no residual-stream m2 recorded")
    fp = massive.fp16_margin(run)
    if np.isfinite(fp["max_absmax"]):
        parts.append(f"max |x| {fp['max_absmax']:.4g} ({fp['site']}, layer {fp['layer']}, step {fp['step']}), "
                     f"{fp['log10_ratio']:+.2f} decades from the FP16 maximum")
    cand = massive.massive_candidates(run)
    tracked = massive.track_massive(cand, ("channel",)) if len(cand) else pd.DataFrame()
    if len(tracked):
        t0 = tracked.iloc[0]
        parts.append(f"{len(tracked)} channel(s) with massive activations (first: channel {int(t0['channel'])} "
                     f"at step {int(t0['first_step'])}, layer {int(t0['first_layer'])}, layer persistence "
                     f"{t0['persistence_layers']:.2f})")
    elif len(cand):
        parts.append("no massive activations (|x| > 100 and ≥ 1000× median) among the recorded top-3")
    loss = run.series("loss")
    if len(loss):
        sp = massive.spike_score(loss)
        parts.append(f"final train loss {loss.iloc[-1]:.4g} (step {int(loss.index[-1])}), "
                     f"{len(sp.spikes)} loss spike(s)")
    val = run.series("val_loss")
    if len(val):
        parts.append(f"final val loss {val.iloc[-1]:.4g} (step {int(val.index[-1])})")
    qk = run.frame("attn_logits", "qk_absmax")
    if len(qk):
        top = qk.loc[qk["value"].idxmax()]
        parts.append(f"largest attention logit |q·k|/sqrt(d_h) {top['value']:.4g} (layer {int(top['layer'])}, "
                     f"head {int(top['channel']) if pd.notna(top['channel']) else '?'}, step {int(top['step'])})")
    lse = run.series("lse_mean", "logits")
    if len(lse):
        parts.append(f"mean log Z of the output logits {lse.iloc[-1]:.4g} at step {int(lse.index[-1])}")
    div = run.meta.get("divergence")
    if isinstance(div, dict) and div:
        parts.append(f"diverged at step {div.get('step')} ({div.get('reason')})")
    return "; ".join(parts) + "."


def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path, formats: Sequence[str] = ("png", "svg"),
                 dpi: int = 110, sweep: bool = False) -> ReportResult:
    """Analyse ``run_dirs`` together and write the report into ``out_dir`` (created if needed).

    Writes ``<figure>.png`` and ``<figure>.svg`` for every figure that can be made, ``verdicts.json``
    (the verdict records, analysis.verdicts), and from them ``report.md`` (figures linked) and
    ``report.html`` (PNGs embedded as base64, no external files), rendered by analysis.render. Raises
    ValueError for an empty ``run_dirs``; FileNotFoundError for a path that is not a directory.
    ``sweep``: the runs are a grid (lnprobe.sweep): per-run figures for representatives only and a
    sweep paragraph first in the summary.
    """
    if not run_dirs:
        raise ValueError("build_report needs at least one run directory")
    if "png" not in formats:
        raise ValueError(f"formats must include 'png' (report.html embeds it), got {list(formats)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load(p) for p in run_dirs]
    _unique_names(runs)
    load_notes = [f"{r.name}: {w}" for r in runs for w in r.warnings]
    result = ReportResult(out_dir=out, report_md=out / "report.md", report_html=out / "report.html",
                          runs=[r.name for r in runs])
    captions = {}
    for name, caption, make in _figure_specs(runs, sweep):
        notes: list[str] = []
        try:
            fig = make(notes)
        except plots.MissingData as exc:
            result.missing[name] = str(exc)
            continue
        except Exception as exc:  # a figure must not take the whole report down; say what broke
            result.missing[name] = f"error while plotting: {type(exc).__name__}: {exc}"
            warnings.warn(f"report figure {name} failed: {type(exc).__name__}: {exc}", stacklevel=2)
            continue
        paths = {}
        # SVG text as <text> elements, not glyph paths: several times faster and smaller files
        with rc_context({"svg.fonttype": "none"}):
            for fmt in formats:
                paths[fmt] = out / f"{name}.{fmt}"
                fig.savefig(paths[fmt], dpi=dpi, format=fmt)
        result.figures[name] = paths
        captions[name] = caption
        if notes:
            result.partial[name] = notes
    records = verdicts.all_verdicts(runs)
    result.verdicts = verdicts.verdicts_frame(records)
    result.verdicts_json = verdicts.write_json(records, out / "verdicts.json", runs)
    result.summary = [_run_summary(r) for r in runs]
    swept = sweep_summary(runs) if sweep or len({compare.lr(r) for r in runs}) > 1 else ""
    if swept:
        result.summary.insert(0, swept)
    result.stability = [stability.summary_line(stability.stability(r)) for r in runs]
    # tables are rendered from the file just written, so the report shows exactly what it holds
    parts = dict(runs=[{"name": r.name, "placement": r.placement, "path": str(r.path)} for r in runs],
                 records=verdicts.read_json(result.verdicts_json), summary=result.summary,
                 honesty=" ".join(x for x in (HONESTY, scale_notes(runs)) if x),
                 figures=result.figures, captions=captions, partial=result.partial, missing=result.missing,
                 load_notes=load_notes, stability=result.stability)
    result.report_md.write_text(render.markdown_report(**parts), encoding="utf-8")
    result.report_html.write_text(render.html_report(**parts), encoding="utf-8")
    return result


def run_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Build the report (see :func:`build_report`) and return the path of report.md."""
    return build_report(run_dirs, out_dir).report_md


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analysis.report RUN [RUN ...] -o OUT``: write the report, print where it is."""
    ap = argparse.ArgumentParser(prog="python -m analysis.report",
                                 description="Analyse lnprobe run directories against the Peri-LN theory.")
    ap.add_argument("runs", nargs="+", help="run directories (each holding meta.json and records/)")
    ap.add_argument("-o", "--out", default="report", help="output folder (default: ./report)")
    args = ap.parse_args(argv)
    res = build_report(args.runs, args.out)
    counts = res.verdicts["status"].value_counts().to_dict() if len(res.verdicts) else {}
    print(f"wrote {res.report_md}, {res.report_html} and {res.verdicts_json}: {len(res.figures)} figures, "
          f"{len(res.missing)} not made; verdicts {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
