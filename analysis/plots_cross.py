"""Figures across runs: all placements on one shared axis, learning-rate sweeps, fitted slopes.

Like :mod:`analysis.plots` (whose helpers these use), every function returns a Figure, writes
nothing and raises :class:`analysis.plots.MissingData` when no run has what it needs. The numbers come
from analysis.compare frames (``sweep_frame``, ``prop31_slope``, ``grad_by_layer``), so a figure
shows what the verdicts compute. Runs of one placement are drawn in one colour; runs that differ
only in seed are averaged, with their spread as a band.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import compare
from . import massive as M
from .io import Run
from .plots import (
    MissingData,
    _figure,
    _footnote,
    _integer_ticks,
    _legend_outside,
    _log_if_span,
    _runs,
    _steps_text,
    set_log,
    tokens_axis,
)

PLACEMENT_COLORS = {"pre": "tab:blue", "peri": "tab:red", "post": "tab:green", "output": "tab:orange",
                    "lns": "tab:purple"}
_LR_STYLES = ("-", "--", ":", "-.")


def placement_color(placement: str) -> str:
    """The colour of a placement in every cross-run figure (grey for one without its own)."""
    return PLACEMENT_COLORS.get(placement, "tab:gray")


def _order(placements: Iterable[str]) -> list[str]:
    seen = set(placements)
    known = [p for p in PLACEMENT_COLORS if p in seen]
    return known + sorted(seen - set(known))


# ---------------------------------------------------------------------------------------------
# variance against layer, every placement on one axis
# ---------------------------------------------------------------------------------------------
def plot_variance_shared(runs: Run | Iterable[Run], stat: str = "m2", site: str = "resid",
                         notes: list[str] | None = None) -> Figure:
    """``stat`` (m2 or var) of ``site`` against layer at the last recorded step (solid) and at step 0
    (thin dashed), every run on ONE shared log axis: colour = placement, line style = learning rate,
    seeds of the same configuration averaged (band: their min–max)."""
    runs = _runs(runs)
    have = [r for r in runs if not r.pivot(site, stat).empty]
    if not have:
        raise MissingData(f"no run records {stat!r} at site {site!r}")
    skipped = [f"{r.name}: no {stat} at {site}" for r in runs if r not in have]
    groups: dict[tuple, list[Run]] = {}
    for r in have:
        groups.setdefault((r.placement, compare.lr(r), compare.config_key(r, drop=("seed", "lr"))), []).append(r)
    lrs = sorted({k[1] for k in groups if k[1] is not None})
    fig, (ax,) = _figure(1, w=7.0, h=4.6)
    allv, last_steps = [], set()
    for p in _order(k[0] for k in groups):
        for (pl, lr, _), rs in groups.items():
            if pl != p:
                continue
            style = _LR_STYLES[lrs.index(lr) % len(_LR_STYLES)] if lr in lrs else "-"
            ends = [r.pivot(site, stat).iloc[-1] for r in rs]
            last_steps |= {int(r.pivot(site, stat).index[-1]) for r in rs}
            end = pd.concat(ends, axis=1)                                  # layer × runs
            label = f"{p}" + (f", lr {lr:g}" if len(lrs) > 1 else "") + (f" ({len(rs)} seeds)" if len(rs) > 1 else "")
            ax.plot(end.index, end.mean(axis=1), style, marker="o", ms=3, color=placement_color(p), label=label)
            if len(rs) > 1:
                ax.fill_between(end.index, end.min(axis=1), end.max(axis=1), color=placement_color(p), alpha=0.15)
            starts = [r.pivot(site, stat) for r in rs]
            starts = [t.loc[0] for t in starts if 0 in t.index]
            if starts:
                init = pd.concat(starts, axis=1).mean(axis=1)
                ax.plot(init.index, init.to_numpy(), ":", lw=0.8, color=placement_color(p))
                allv.append(init.to_numpy())
            allv.append(end.to_numpy().ravel())
    _log_if_span(ax, np.concatenate(allv), span=30.0)
    ax.set_xlabel("layer index l")
    _integer_ticks(ax.xaxis)
    ax.set_ylabel(f"{'mean x²' if stat == 'm2' else 'per-token variance'} of {site} (a.u.)")
    ax.set_title(f"{stat} of {site} by layer, all placements: {_steps_text(sorted(last_steps))} "
                 f"(solid), step 0 (dotted)", fontsize=9)
    _legend_outside(fig, ax)
    _footnote(fig, skipped, notes)
    return fig


# ---------------------------------------------------------------------------------------------
# final loss against learning rate (sweeps)
# ---------------------------------------------------------------------------------------------
def plot_loss_vs_lr(runs: Run | Iterable[Run], notes: list[str] | None = None) -> Figure:
    """Final loss (compare.final_loss: last validation loss) against peak learning rate, one line per
    placement: mean over seeds, band = min–max over seeds; a diverged run is left out of the mean
    and counted at the top ("k/n div."). Needs a placement with ≥ 2 learning rates."""
    f = compare.sweep_frame(_runs(runs))
    f = f[f["lr"].notna()]
    sets = []
    for p in _order(f["placement"].unique()):
        g = f[f["placement"] == p]
        cfg = g["config"].value_counts().index[0] if len(g) else None    # the largest lr sweep of p
        g = g[g["config"] == cfg]
        if g["lr"].nunique() >= 2:
            sets.append((p, g))
    if not sets:
        raise MissingData("loss vs learning rate needs a placement with runs at ≥ 2 learning rates")
    skipped = [f"{p}: fewer than 2 learning rates" for p in f["placement"].unique() if p not in {s for s, _ in sets}]
    fig, (ax,) = _figure(1, w=7.0, h=4.4)
    allv = []
    for p, g in sets:
        c = placement_color(p)
        by = g.groupby("lr")
        stats = pd.DataFrame({"mean": by["final_loss"].mean(), "lo": by["final_loss"].min(),
                              "hi": by["final_loss"].max(), "n": by.size(), "div": by["diverged"].sum()})
        n_seeds = int(stats["n"].max())
        ax.plot(stats.index, stats["mean"], "-o", ms=4, color=c, label=f"{p} (mean of {n_seeds} seed(s))")
        if n_seeds > 1:
            ax.fill_between(stats.index, stats["lo"], stats["hi"], color=c, alpha=0.2)
        allv.append(g["final_loss"].dropna().to_numpy())
        for lr_, row in stats[stats["div"] > 0].iterrows():
            ax.annotate(f"{p}: {int(row['div'])}/{int(row['n'])} div.", (lr_, 1.0), xycoords=("data", "axes fraction"),
                        textcoords="offset points", xytext=(0, -12 - 10 * [s for s, _ in sets].index(p)),
                        ha="center", fontsize=7, color=c)
            ax.plot([lr_], [1.0], "x", color=c, ms=8, transform=ax.get_xaxis_transform(), clip_on=False)
    set_log(ax, "x", f["lr"].to_numpy(dtype=np.float64))
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("final loss against learning rate by placement (band: min–max over seeds)", fontsize=9)
    _legend_outside(fig, ax)
    _footnote(fig, skipped, notes)
    return fig


# ---------------------------------------------------------------------------------------------
# Proposition 3.1 as a fitted slope
# ---------------------------------------------------------------------------------------------
def prop31_slopes(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run with a fit (compare.prop31_slope): run, placement, lr, seed, slope, n."""
    rows = []
    for r in runs:
        s = compare.prop31_slope(r)
        if s is not None:
            rows.append({"run": r.name, "placement": r.placement, "lr": compare.lr(r), "seed": compare.seed(r),
                         "slope": s["slope"], "n": s["n"]})
    return pd.DataFrame(rows, columns=["run", "placement", "lr", "seed", "slope", "n"])


def plot_prop31_slope(runs: Run | Iterable[Run], notes: list[str] | None = None) -> Figure:
    """Proposition 3.1 as a slope: left, log ‖∇W2‖ (mlp.out) against log rms(h) (h = mlp_act) over
    the trained (step, layer) points of each placement's runs, with the least-squares line of each
    run; right, the fitted slope of every run by placement (dots; bar = mean). Post-LN runs are left
    out (the proposition compares Pre- and Peri-LN; Post-LN's vanishing gradients dominate). Pre-LN's
    gradient grows with h (slope near 1 when ‖g‖ is steady), Peri-LN's output norm cancels it
    (slope near 0)."""
    runs = [r for r in _runs(runs) if r.placement != "post"]  # the proposition is about Pre- and Peri-LN
    fits = {r.name: compare.prop31_slope(r) for r in runs}
    have = [r for r in runs if fits[r.name] is not None]
    if not have:
        raise MissingData("Proposition 3.1 slope needs mlp.out grad_norm and mlp_act rms at ≥ 3 trained points")
    skipped = [f"{r.name}: no Prop. 3.1 fit" for r in runs if r not in have]
    fig, axes = _figure(2, ncols=2, w=5.5, h=4.2)
    placements = _order(r.placement for r in have)
    table = prop31_slopes(have)
    for p in placements:
        rs = [r for r in have if r.placement == p]
        s = table[table["placement"] == p]["slope"].to_numpy()
        c = placement_color(p)
        for j, r in enumerate(rs):  # each run's own fit: runs at other lrs differ in level, not only in slope
            fr = fits[r.name]
            axes[0].scatter(np.exp(fr["x"]), np.exp(fr["y"]), s=6, color=c, alpha=0.3, rasterized=True)
            xx = np.linspace(fr["x"].min(), fr["x"].max(), 20)
            axes[0].plot(np.exp(xx), np.exp(fr["slope"] * xx + fr["intercept"]), "-", color=c, lw=1,
                         label=f"{p}: per-run slopes, mean {s.mean():.2f}" if j == 0 else None)
        i = placements.index(p)
        axes[1].scatter(np.full(len(s), i) + np.linspace(-0.12, 0.12, len(s)), s, color=c, s=14, zorder=3)
        axes[1].bar([i], [s.mean()], color=c, alpha=0.3, width=0.5)
    for ax in axes[:1]:
        set_log(ax, "x", np.exp(np.concatenate([fits[r.name]["x"] for r in have])))
        set_log(ax, "y", np.exp(np.concatenate([fits[r.name]["y"] for r in have])))
        ax.set_xlabel("rms of h = mlp_act (a.u.)")
        ax.set_ylabel("‖∇W2‖_F of mlp.out (loss units / weight unit)")
        ax.legend(fontsize=7)
    axes[0].set_title("Prop. 3.1: ‖∇W2‖ vs rms(h), trained steps, all layers, one fit per run", fontsize=9)
    axes[1].axhline(1.0, color="k", ls="--", lw=1, label="slope 1 (‖∇W2‖ ∝ ‖h‖)")
    axes[1].axhline(0.0, color="gray", ls=":", lw=1, label="slope 0 (self-regularised)")
    axes[1].set_xticks(range(len(placements)), placements)
    axes[1].set_ylabel("d log‖∇W2‖ / d log rms(h), per run")
    axes[1].set_title(f"fitted slope per run ({len(have)} runs)", fontsize=9)
    axes[1].legend(fontsize=7)
    _footnote(fig, skipped, notes)
    return fig


# ---------------------------------------------------------------------------------------------
# Post-LN gradient vanishing by layer
# ---------------------------------------------------------------------------------------------
def plot_grad_vanishing(runs: Run | Iterable[Run], role: str = "mlp.out", notes: list[str] | None = None) -> Figure:
    """‖∇W‖ of ``role`` per block relative to the last block (compare.grad_by_layer) at step 0 (left)
    and at the last recorded step (right), one line per placement (mean over its runs, band:
    min–max). Xiong et al.: at init Post-LN's early-layer gradients are smaller than the last
    layer's (below 1 on the left), Pre-LN's about equal across layers."""
    runs = _runs(runs)
    fig, axes = _figure(2, ncols=2, w=5.5, h=4.2, sharey=True)
    allv, drawn = [], set()
    for ax, which in zip(axes, ("init", "end")):
        for p in _order(r.placement for r in runs):
            rows = [s for s in (compare.grad_by_layer(r, role, which) for r in runs if r.placement == p)
                    if s is not None]
            if not rows:
                continue
            t = pd.concat(rows, axis=1)
            c = placement_color(p)
            ax.plot(t.index, t.mean(axis=1), "-o", ms=3, color=c, label=f"{p} ({len(rows)} run(s))")
            if len(rows) > 1:
                ax.fill_between(t.index, t.min(axis=1), t.max(axis=1), color=c, alpha=0.15)
            allv.append(t.to_numpy().ravel())
            drawn.add(p)
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.set_xlabel("layer index l")
        _integer_ticks(ax.xaxis)
        ax.set_title(f"‖∇W‖ of {role} / last block's, {'step 0' if which == 'init' else 'last step'}", fontsize=9)
        if ax.lines:
            ax.legend(fontsize=7)
    if not allv:
        raise MissingData(f"gradient profile needs {role} grad_norm at ≥ 2 blocks")
    _log_if_span(axes[0], np.concatenate(allv), span=10.0)
    axes[0].set_ylabel("relative gradient norm (1 = last block)")
    _footnote(fig, [f"{r.name}: no {role} grad_norm" for r in runs if r.placement not in drawn], notes)
    return fig


# ---------------------------------------------------------------------------------------------
# top1 / median over steps (Sun et al.'s ratio)
# ---------------------------------------------------------------------------------------------
def plot_top1_ratio_over_steps(runs: Run | Iterable[Run], site: str = "resid",
                               notes: list[str] | None = None) -> Figure:
    """Left: max over layers of top1/median(|x|) of ``site`` against step, with Sun et al.'s ratio
    threshold 1000; right: max over layers of top1 |x| with the absolute threshold 100. An
    activation is massive only when it is above BOTH lines at the same layer and step."""
    runs = _runs(runs)
    curves = {}
    for r in runs:
        c = M.massive_candidates(r, site, ranks=(1,))
        if len(c) and c["median_abs"].notna().any():
            curves[r.name] = (r, c.groupby("step")["ratio"].max(), c.groupby("step")["value"].max())
    if not curves:
        raise MissingData(f"no run records top1 and median_abs at site {site!r}")
    skipped = [f"{r.name}: no top1/median at {site}" for r in runs if r.name not in curves]
    fig, axes = _figure(2, ncols=2, w=5.5, h=4.2)
    styles = {}
    for name, (r, ratio, top) in curves.items():
        k = styles.setdefault(r.placement, 0)
        styles[r.placement] = k + 1
        kw = dict(color=placement_color(r.placement), lw=1, alpha=1.0 if k == 0 else 0.5,
                  label=name if len(curves) <= 10 or k == 0 else None)
        axes[0].plot(ratio.index, ratio.to_numpy(), **kw)
        axes[1].plot(top.index, top.to_numpy(), **kw)
    axes[0].axhline(M.MASSIVE_RATIO, color="red", ls=":", lw=1, label="1000 × median")
    axes[1].axhline(M.MASSIVE_ABS, color="red", ls=":", lw=1, label="|x| = 100")
    for ax, what, thr in ((axes[0], "max over layers of top1 / median |x|", M.MASSIVE_RATIO),
                          (axes[1], f"max over layers of top1 |x| of {site} (a.u.)", M.MASSIVE_ABS)):
        vals = np.concatenate([(v[1] if ax is axes[0] else v[2]).to_numpy() for v in curves.values()] + [[thr]])
        set_log(ax, "y", vals)
        ax.set_xlabel("training step")
        ax.set_ylabel(what)
        ax.legend(fontsize=6)
    steps = sorted({int(s) for v in curves.values() for s in v[1].index})
    axes[0].set_title(f"Sun et al. ratio top1/median over training, {_steps_text(steps)}", fontsize=9)
    axes[1].set_title("largest |x| over training", fontsize=9)
    for ax in axes:
        tokens_axis(ax, [v[0] for v in curves.values()])
    _footnote(fig, skipped, notes)
    return fig
