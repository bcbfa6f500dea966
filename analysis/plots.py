"""Figures from loaded runs. Every function returns a ``matplotlib.figure.Figure`` and writes nothing.

Figures are built with the object-oriented API (``Figure`` without pyplot), so no GUI backend is
involved and nothing global is touched: saving renders through Agg (PNG) or the SVG backend.
A function raises :class:`MissingData` when none of the given runs has what it needs; runs that lack
the data while others have it are skipped and named in ``notes`` (a list the caller may pass) and in
a footnote of the figure.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from . import compare
from . import massive as M
from .io import FP16_MAX, SUBLAYER_ROLES, Run

RUN_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown",
              "tab:pink", "tab:gray", "tab:olive", "tab:cyan")


class MissingData(ValueError):
    """The statistics a figure needs are not in the run(s); the message names them."""


def _runs(runs: Run | Iterable[Run]) -> list[Run]:
    return [runs] if isinstance(runs, Run) else list(runs)


def _label(run: Run) -> str:
    """The run's name, with its placement in brackets only when the name does not already say it."""
    name, p = run.name, run.placement
    return name if name == p or name.startswith((f"{p}_", f"{p}-", f"{p}#")) else f"{name} ({p})"


def common_tokens_per_step(runs: Sequence[Run]) -> int | None:
    """Training tokens per optimizer step shared by all ``runs`` (compare.tokens_per_step); None when
    unknown for one of them or when they differ."""
    n = {compare.tokens_per_step(r) for r in runs}
    return n.pop() if len(n) == 1 and None not in n else None


def tokens_axis(ax: Any, runs: Sequence[Run], axis: str = "x") -> None:
    """A second step axis in training tokens (top, or right for ``axis="y"``), when all runs train
    the same number of tokens per step: token = step × batch × sequence length. Call it after the
    title is set (the title moves up above the token axis)."""
    n = common_tokens_per_step(runs)
    if not n:
        return
    fwd, inv = (lambda s: s * n), (lambda t: t / n)
    sec = ax.secondary_xaxis("top", functions=(fwd, inv)) if axis == "x" else \
        ax.secondary_yaxis("left", functions=(fwd, inv))
    sec.tick_params(labelsize=7)
    if axis == "x":  # room for the token axis between the plot and its title
        fig = ax.figure
        fig.subplots_adjust(top=min(fig.subplotpars.top, 1 - 1.0 / fig.get_figheight()))
        ax.set_title(ax.get_title(), fontsize=9, pad=30)
    sec.xaxis.set_major_formatter(_TOKENS) if axis == "x" else sec.yaxis.set_major_formatter(_TOKENS)
    (sec.set_xlabel if axis == "x" else sec.set_ylabel)(f"training tokens ({n} per step)", fontsize=7)


def _figure(n_panels: int, ncols: int = 3, w: float = 5.0, h: float = 3.8, **kw: Any) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n_panels))
    nrows = int(np.ceil(n_panels / ncols))
    # Fixed margins instead of a layout engine: constrained layout measures every text twice and
    # dominated the report's run time (see benchmarks/report_speed.py).
    fig = Figure(figsize=(w * ncols, h * nrows))
    fig.subplots_adjust(left=0.95 / (w * ncols), right=1 - 0.3 / (w * ncols), bottom=0.75 / (h * nrows),
                        top=1 - 0.45 / (h * nrows), wspace=0.45, hspace=0.55)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def set_log(ax: Any, axis: str = "y", values: Any = None) -> None:
    """Log scale with plain-text tick labels ("100", "1e+04"): matplotlib's default log labels are
    mathtext, whose parsing was a large part of the report's run time. Fewer than two decades in
    ``values``: ticks at 1, 2, 5 × 10^k so that labels exist."""
    a = ax.yaxis if axis == "y" else ax.xaxis
    v = np.asarray(values if values is not None else [], dtype=np.float64).ravel()
    v = v[np.isfinite(v) & (v > 0)]
    if len(v) and v.max() / v.min() < 10:
        return                                   # less than a decade: a linear axis reads better
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    few = len(v) > 0 and v.max() / v.min() < 100
    a.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0) if few else (1.0,)))
    a.set_major_formatter(_PLAIN)
    a.set_minor_formatter(NullFormatter())


_PLAIN = FuncFormatter(lambda x, _: f"{x:g}")
_TOKENS = FuncFormatter(lambda x, _: f"{x / 1e6:g}M" if abs(x) >= 1e6
                        else (f"{x / 1e3:g}k" if abs(x) >= 1e3 else f"{x:g}"))


def _integer_ticks(axis: Any) -> None:
    """Layer indices are integers: no 0.5 ticks."""
    axis.set_major_locator(MaxNLocator(integer=True))


def _log_if_span(ax: Any, values: Any, axis: str = "y", span: float = 100.0) -> None:
    """Log scale when positive values span more than ``span`` (two decades by default)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v) & (v > 0)]
    if len(v) and v.max() / v.min() > span:
        set_log(ax, axis, v)


def _legend_outside(fig: Figure, ax: Any) -> None:
    """Legend to the right of a single-panel figure, so that many runs do not hide the curves."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.set_size_inches(fig.get_figwidth() + 2.6, fig.get_figheight())
    w = fig.get_figwidth()
    fig.subplots_adjust(left=0.95 / w, right=1 - 2.9 / w)


def _footnote(fig: Figure, skipped: list[str], notes: list[str] | None) -> None:
    if skipped:
        fig.text(0.01, 0.002, "not shown: " + "; ".join(skipped), fontsize=7, ha="left", va="bottom",
                 color="dimgray", wrap=True)
        if notes is not None:
            notes.extend(skipped)


def _pick_steps(steps: np.ndarray, max_curves: int) -> np.ndarray:
    if len(steps) <= max_curves:
        return steps
    idx = np.unique(np.round(np.linspace(0, len(steps) - 1, max_curves)).astype(int))
    return steps[idx]


def _steps_text(steps: Sequence[int]) -> str:
    steps = list(steps)
    if not steps:
        return "no steps"
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}–{steps[-1]}"


# ---------------------------------------------------------------------------------------------
# (a) variance vs layer, one curve per step, theory overlay at init
# ---------------------------------------------------------------------------------------------
def plot_variance_by_layer(runs: Run | Iterable[Run], stat: str = "m2", site: str = "resid",
                           max_curves: int = 12, theory_overlay: bool = True,
                           notes: list[str] | None = None) -> Figure:
    """Hidden-state ``stat`` (m2 or var) of ``site`` against layer index, one curve per recorded step
    (coloured by step; at most ``max_curves`` evenly spaced steps, first and last included), one
    panel per run; the theory's init profile (analysis.compare.init_frame) overlaid as a band when
    ``stat`` is m2 — the paper's Figure 1."""
    runs = _runs(runs)
    have = [r for r in runs if not r.pivot(site, stat).empty]
    if not have:
        raise MissingData(f"no run records {stat!r} at site {site!r}")
    skipped = [f"{r.name}: no {stat} at {site}" for r in runs if r not in have]
    fig, axes = _figure(len(have), sharey=False)
    cmap = colormaps["viridis"]
    for ax, run in zip(axes, have):
        t = run.pivot(site, stat)
        steps = _pick_steps(t.index.to_numpy(), max_curves)
        norm = Normalize(vmin=float(t.index.min()), vmax=float(max(t.index.max(), t.index.min() + 1)))
        for s in steps:
            row = t.loc[s]
            ax.plot(row.index, row.to_numpy(), "-o", ms=2.5, lw=1.2, color=cmap(norm(s)),
                    label=f"step {s}" if s in (steps[0], steps[-1]) else None)
        if theory_overlay and stat == "m2" and site == "resid":
            pred = compare.init_frame(run)
            if pred is not None:
                ax.fill_between(pred["layer"], pred["low"], pred["high"], color="k", alpha=0.15,
                                label=f"theory at init {pred.attrs.get('source', '')}")
                ax.plot(pred["layer"], pred["predicted"], "k--", lw=1.2)
        _log_if_span(ax, t.to_numpy())
        ax.set_xlabel("layer index l")
        _integer_ticks(ax.xaxis)
        ax.set_ylabel(f"{'mean x²' if stat == 'm2' else 'per-token variance'} of {site} (a.u.)")
        ax.set_title(f"{_label(run)}: {stat} of {site}, {_steps_text(t.index)}", fontsize=9)
        ax.legend(fontsize=7)
        n_tok = common_tokens_per_step([run])
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax,
                     label=f"step (1 step = {n_tok} training tokens)" if n_tok else "step")
    _footnote(fig, skipped, notes)
    return fig


# ---------------------------------------------------------------------------------------------
# (b) top-1/2/3 and median |x| vs layer (Sun et al.)
# ---------------------------------------------------------------------------------------------
def plot_top_activations(run: Run, step: int | None = None, site: str = "resid") -> Figure:
    """Top-1/2/3 and median of |x| of ``site`` against layer at one step (default: the last), log y,
    with both massive-activation thresholds of Sun et al. — |x| = 100 and 1000 × median (per layer)
    — and massive values (above both) circled."""
    tops = M.top_frames(run, site)
    if not tops:
        raise MissingData(f"{run.name}: no top1/top2/top3 (or absmax) recorded at site {site!r}")
    step = int(max(f["step"].max() for _, f in tops)) if step is None else int(step)
    at = M.massive_candidates(run, site, step=step)
    if at.empty:
        raise MissingData(f"{run.name}: step {step} has no top-k records at {site!r}")
    fig, (ax,) = _figure(1, w=6.5, h=4.2)
    for rank, style in ((1, "-o"), (2, "-s"), (3, "-^")):
        r = at[at["rank"] == rank]
        if len(r):
            ax.plot(r["layer"], r["value"], style, ms=3, label=f"top-{rank} |x|")
    med = run.frame(site, "median_abs")
    med = med[med["step"] == step]
    if len(med):
        ax.plot(med["layer"], med["value"], "-", color="gray", label="median |x|")
        ax.plot(med["layer"], M.MASSIVE_RATIO * med["value"], "--", color="darkred", lw=1,
                label=f"{M.MASSIVE_RATIO:g} × median")
    mass = at[at["massive"]]
    if len(mass):
        ax.plot(mass["layer"], mass["value"], "o", mfc="none", mec="red", ms=10, label="massive (Sun et al.)")
    ax.axhline(M.MASSIVE_ABS, color="red", ls=":", lw=1, label="|x| = 100")
    set_log(ax, "y", np.r_[at["value"].to_numpy(dtype=np.float64), med["value"].to_numpy(),
                           M.MASSIVE_RATIO * med["value"].to_numpy(), M.MASSIVE_ABS])
    ax.set_xlabel("layer index l")
    _integer_ticks(ax.xaxis)
    ax.set_ylabel(f"|x| of {site} (a.u.)")
    ax.set_title(f"{_label(run)}: largest and median |x| of {site}, step {step}", fontsize=9)
    ax.legend(fontsize=7)
    return fig


# ---------------------------------------------------------------------------------------------
# (c) max |x| over steps with the FP16 line
# ---------------------------------------------------------------------------------------------
def plot_absmax_over_steps(runs: Run | Iterable[Run], site: str = "resid",
                           notes: list[str] | None = None) -> Figure:
    """Max over layers of |x| at ``site`` against step, one line per run, with the FP16 maximum."""
    runs = _runs(runs)
    series = {r.name: (r, M.absmax_over_steps(r, site)) for r in runs}
    have = {k: v for k, v in series.items() if len(v[1])}
    if not have:
        raise MissingData(f"no run records 'absmax' at site {site!r}")
    skipped = [f"{r.name}: no absmax at {site}" for r in runs if r.name not in have]
    fig, (ax,) = _figure(1, w=7.0, h=4.2)
    for i, (name, (run, s)) in enumerate(have.items()):
        ax.plot(s.index, s.to_numpy(), "-", color=RUN_COLORS[i % len(RUN_COLORS)], label=_label(run))
    ax.axhline(FP16_MAX, color="k", ls="--", lw=1, label="FP16 max 65504")
    set_log(ax, "y", np.r_[np.concatenate([s.to_numpy() for _, s in have.values()]), FP16_MAX])
    ax.set_xlabel("training step")
    ax.set_ylabel(f"max over layers of |x| at {site} (a.u.)")
    steps = sorted({int(x) for _, s in have.values() for x in s.index})
    ax.set_title(f"max |x| of {site} over training ({', '.join(have)}), {_steps_text(steps)}", fontsize=9)
    tokens_axis(ax, [v[0] for v in have.values()])
    _legend_outside(fig, ax)
    _footnote(fig, skipped, notes)
    return fig


# ---------------------------------------------------------------------------------------------
# (d) per-layer gradient norms by parameter role, first and last step
# ---------------------------------------------------------------------------------------------
def plot_grad_norms_by_role(runs: Run | Iterable[Run], roles: Sequence[str] = SUBLAYER_ROLES,
                            notes: list[str] | None = None) -> Figure:
    """Frobenius norm of the weight gradient per layer for each parameter role (attn.qkv, attn.out,
    mlp.in, mlp.out), at the first (dashed) and last (solid) recorded step; runs side by side with
    a shared y axis."""
    runs = _runs(runs)
    tables = {r.name: {role: r.role_table("grad_norm", role) for role in roles} for r in runs}
    have = [r for r in runs if any(not t.empty for t in tables[r.name].values())]
    if not have:
        raise MissingData("no run records parameter 'grad_norm' for roles " + ", ".join(roles))
    skipped = [f"{r.name}: no parameter grad_norm" for r in runs if r not in have]
    fig, axes = _figure(len(have), ncols=4, w=4.2, sharey=True)
    allv = []
    for ax, run in zip(axes, have):
        shown = []
        for j, role in enumerate(roles):
            t = tables[run.name][role]
            if t.empty:
                continue
            t = t[[c for c in t.columns if c >= 0]]
            color = RUN_COLORS[j % len(RUN_COLORS)]
            ax.plot(t.columns, t.iloc[0].to_numpy(), "--", color=color, lw=1, label=f"{role}, step {t.index[0]}")
            ax.plot(t.columns, t.iloc[-1].to_numpy(), "-o", ms=3, color=color, label=f"{role}, step {t.index[-1]}")
            allv.append(t.iloc[[0, -1]].to_numpy())
            shown.extend([t.index[0], t.index[-1]])
        ax.set_xlabel("layer index l")
        _integer_ticks(ax.xaxis)
        ax.set_ylabel("‖∇W‖_F (loss units / weight unit)")
        ax.set_title(f"{_label(run)}: gradient norm by role, {_steps_text(sorted(set(shown)))}", fontsize=9)
        ax.legend(fontsize=6)
    if allv:
        _log_if_span(axes[0], np.concatenate([a.ravel() for a in allv]), span=30.0)
    _footnote(fig, skipped, notes)
    return fig


# ---------------------------------------------------------------------------------------------
# (e) hidden-state gradient rms vs layer
# ---------------------------------------------------------------------------------------------
def plot_hidden_grad_rms(runs: Run | Iterable[Run], site: str = "resid",
                         notes: list[str] | None = None) -> Figure:
    """RMS of ∂L/∂x at ``site`` against layer, first (dashed) and last (solid) recorded step per run."""
    runs = _runs(runs)
    have = [r for r in runs if not r.pivot(site, "grad_rms").empty]
    if not have:
        raise MissingData(f"no run records 'grad_rms' at site {site!r}")
    skipped = [f"{r.name}: no grad_rms at {site}" for r in runs if r not in have]
    fig, (ax,) = _figure(1, w=7.0, h=4.2)
    allv, steps = [], []
    for i, run in enumerate(have):
        t = run.pivot(site, "grad_rms")
        c = RUN_COLORS[i % len(RUN_COLORS)]
        ax.plot(t.columns, t.iloc[0].to_numpy(), "--", color=c, lw=1, label=f"{_label(run)}, step {t.index[0]}")
        ax.plot(t.columns, t.iloc[-1].to_numpy(), "-o", ms=3, color=c, label=f"{_label(run)}, step {t.index[-1]}")
        allv.append(t.iloc[[0, -1]].to_numpy())
        steps += [int(t.index[0]), int(t.index[-1])]
    _log_if_span(ax, np.concatenate([a.ravel() for a in allv]), span=30.0)
    ax.set_xlabel("layer index l")
    _integer_ticks(ax.xaxis)
    ax.set_ylabel(f"rms of ∂L/∂x at {site} (loss units / a.u.)")
    ax.set_title(f"hidden-state gradient rms at {site}, first and last step ({_steps_text(sorted(set(steps)))})",
                 fontsize=9)
    _legend_outside(fig, ax)
    _footnote(fig, skipped, notes)
    return fig


# ---------------------------------------------------------------------------------------------
# (f) layer × step heatmaps
# ---------------------------------------------------------------------------------------------
def plot_heatmaps(run: Run, site: str = "resid", stat: str = "m2") -> Figure:
    """Layer × step heatmaps (log colour scale) of the hidden-state ``stat`` at ``site`` and of the
    per-block gradient norm sqrt(Σ‖∇W‖²) over the block's parameters. A panel whose data is missing
    says so; MissingData when both are."""
    var = run.pivot(site, stat)
    grad = run.layer_grad_norm()
    if var.empty and grad.empty:
        raise MissingData(f"{run.name}: neither {stat!r} at {site!r} nor parameter grad_norm recorded")
    fig, axes = _figure(2, ncols=2, w=5.5, h=4.0)
    for ax, t, what, unit in ((axes[0], var, f"{stat} of {site}", "a.u."),
                              (axes[1], grad, "block gradient norm", "loss units / weight unit")):
        if t.empty:
            ax.text(0.5, 0.5, f"{what}: not recorded", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"{_label(run)}: {what} (missing)", fontsize=9)
            ax.set_xlabel("training step")
            ax.set_ylabel("layer index l")
            continue
        z = t.to_numpy(dtype=np.float64).T                                  # (layers, steps)
        pos = z[np.isfinite(z) & (z > 0)]
        norm = LogNorm(vmin=pos.min(), vmax=max(pos.max(), pos.min() * 1.0001)) if len(pos) else None
        steps = t.index.to_numpy(dtype=np.float64)
        layers = t.columns.to_numpy(dtype=np.float64)
        mesh = ax.pcolormesh(_edges(steps), _edges(layers), np.ma.masked_invalid(np.where(z > 0, z, np.nan)),
                             norm=norm, cmap="magma", rasterized=True, shading="flat")
        cb = fig.colorbar(mesh, ax=ax, label=f"{what} ({unit})")
        if norm is not None:
            few = norm.vmax / norm.vmin < 100
            cb.ax.yaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0) if few else (1.0,)))
            cb.ax.yaxis.set_major_formatter(_PLAIN)
            cb.ax.yaxis.set_minor_formatter(NullFormatter())
        _integer_ticks(ax.yaxis)
        ax.set_xlabel("training step")
        ax.set_ylabel("layer index l")
        ax.set_title(f"{_label(run)}: {what}, {_steps_text([int(steps[0]), int(steps[-1])])}", fontsize=9)
    return fig


def _edges(centres: np.ndarray) -> np.ndarray:
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mid = 0.5 * (centres[1:] + centres[:-1])
    return np.concatenate([[centres[0] - (mid[0] - centres[0])], mid, [centres[-1] + (centres[-1] - mid[-1])]])


# ---------------------------------------------------------------------------------------------
# (g) loss curves with spikes
# ---------------------------------------------------------------------------------------------
def plot_loss(runs: Run | Iterable[Run], window: int = 1000, threshold: float = 7.0,
              notes: list[str] | None = None) -> Figure:
    """Training loss (line) and validation loss (dashed, markers) against step, one colour per run;
    loss spikes (analysis.massive.spike_score, ``threshold``·σ above the previous ``window`` steps)
    marked with red crosses; the end of a diverged run marked."""
    runs = _runs(runs)
    have = [r for r in runs if len(r.series("loss"))]
    if not have:
        raise MissingData("no run records the training loss (site 'train', stat 'loss')")
    skipped = [f"{r.name}: no train loss" for r in runs if r not in have]
    fig, (ax,) = _figure(1, w=7.0, h=4.2)
    allv, steps = [], []
    for i, run in enumerate(have):
        c = RUN_COLORS[i % len(RUN_COLORS)]
        loss = run.series("loss")
        ax.plot(loss.index, loss.to_numpy(), "-", color=c, lw=1, label=f"{_label(run)} train")
        val = run.series("val_loss")
        if len(val):
            ax.plot(val.index, val.to_numpy(), "--o", ms=3, color=c, lw=1, label=f"{_label(run)} val")
        sp = M.spike_score(loss, window=window, threshold=threshold)
        if sp.spikes:
            ax.plot(sp.spikes, loss.loc[sp.spikes].to_numpy(), "x", color="red", ms=8,
                    label=f"{run.name} spikes ({len(sp.spikes)})")
        div = run.meta.get("divergence") or {}
        if isinstance(div, dict) and div.get("step") is not None:
            ax.axvline(float(div["step"]), color=c, ls=":", lw=1, label=f"{run.name} diverged")
        allv.append(loss.to_numpy())
        steps += [int(loss.index.min()), int(loss.index.max())]
    _log_if_span(ax, np.concatenate(allv))
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(f"loss curves ({', '.join(r.name for r in have)}), {_steps_text([min(steps), max(steps)])}",
                 fontsize=9)
    tokens_axis(ax, have)
    _legend_outside(fig, ax)
    _footnote(fig, skipped, notes)
    return fig


# ---------------------------------------------------------------------------------------------
# (h) Proposition 3.1 scatter
# ---------------------------------------------------------------------------------------------
def prop31_frame(run: Run) -> pd.DataFrame:
    """The Proposition 3.1 inputs per (step, layer); see analysis.compare.prop31_frame."""
    return compare.prop31_frame(run)


def plot_prop31(runs: Run | Iterable[Run], notes: list[str] | None = None) -> Figure:
    """Proposition 3.1: gradient norm of the MLP's last projection (mlp.out) against rms(h) = rms of
    ``mlp_act`` (left; Pre-LN: ‖∇W2‖ = ‖h‖‖g‖ grows with h) and against rms(h)/rms(a) with a =
    ``mlp_raw`` (right; Peri-LN: ‖∇W2‖ ≤ max|γ|·sqrt(D)·‖h‖‖g‖/‖a‖). One point per (step, layer)."""
    runs = _runs(runs)
    frames = {r.name: compare.prop31_frame(r) for r in runs}
    have = [r for r in runs if len(frames[r.name])]
    if not have:
        raise MissingData("Proposition 3.1 needs mlp.out grad_norm and rms (or m2) of mlp_act; no run has both")
    skipped = [f"{r.name}: no mlp.out grad_norm or mlp_act rms" for r in runs if r not in have]
    fig, axes = _figure(2, ncols=2, w=5.5, h=4.2)
    allsteps = []
    for i, run in enumerate(have):
        f = frames[run.name]
        c = RUN_COLORS[i % len(RUN_COLORS)]
        axes[0].scatter(f["rms_h"], f["grad_norm"], s=8, color=c, alpha=0.6, label=_label(run), rasterized=True)
        ok = f["h_over_a"].notna()
        if ok.any():
            axes[1].scatter(f.loc[ok, "h_over_a"], f.loc[ok, "grad_norm"], s=8, color=c, alpha=0.6,
                            label=_label(run), rasterized=True)
        allsteps += [int(f["step"].min()), int(f["step"].max())]
    allf = pd.concat([frames[r.name] for r in have])
    for ax, xl, xcol in ((axes[0], "rms of h = mlp_act (a.u.)", "rms_h"),
                         (axes[1], "rms(h) / rms(a), a = mlp_raw (ratio)", "h_over_a")):
        set_log(ax, "x", allf[xcol].to_numpy(dtype=np.float64))
        set_log(ax, "y", allf["grad_norm"].to_numpy(dtype=np.float64))
        ax.set_xlabel(xl)
        ax.set_ylabel("‖∇W2‖_F of mlp.out (loss units / weight unit)")
        if ax.collections:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "mlp_raw not recorded", ha="center", va="center", transform=ax.transAxes)
    st = _steps_text([min(allsteps), max(allsteps)])
    axes[0].set_title(f"Prop. 3.1 Pre-LN view: ‖∇W2‖ vs rms(h), {st}", fontsize=9)
    axes[1].set_title(f"Prop. 3.1 Peri-LN view: ‖∇W2‖ vs rms(h)/rms(a), {st}", fontsize=9)
    _footnote(fig, skipped, notes)
    return fig


# ---------------------------------------------------------------------------------------------
# (i) token × channel view of the recorded top-k locations
# ---------------------------------------------------------------------------------------------
def plot_topk_locations(run: Run, step: int | None = None, site: str = "resid") -> Figure:
    """Token × channel view of the largest activations, drawn from what is RECORDED: the top-3
    (token, channel) locations of |x| per layer at one step (default: the step holding the run's
    largest |x|). Marker colour = layer, marker size grows with log |x|; the layer of the largest
    activation is outlined in red. A full token × channel surface of |x| for one layer (Sun et al.'s
    3-D plot) needs a tensor dump, which a run directory does not hold."""
    located = [f.dropna(subset=["token", "channel"]) for _, f in M.top_frames(run, site)]
    located = [f for f in located if len(f)]
    if not located:
        raise MissingData(f"{run.name}: no top-k (token, channel) locations recorded at site {site!r}")
    if step is None:  # the step of the largest located |x| (the first such row, as idxmax)
        every = pd.concat(located, ignore_index=True)
        step = int(every.loc[every["value"].idxmax(), "step"])
    at = M.massive_candidates(run, site, step=int(step)).dropna(subset=["token", "channel"])
    if at.empty:
        raise MissingData(f"{run.name}: no top-k locations recorded at step {step}")
    top_layer = int(at.loc[at["value"].idxmax(), "layer"])
    fig, (ax,) = _figure(1, w=6.5, h=4.6)
    v = at["value"].to_numpy(dtype=np.float64)
    lv = np.log10(np.maximum(v, 1e-12))
    size = 15 + 120 * (lv - lv.min()) / max(lv.max() - lv.min(), 1e-9)
    sc = ax.scatter(at["channel"].astype("float64"), at["token"].astype("float64"), s=size,
                    c=at["layer"].to_numpy(), cmap="viridis", alpha=0.75)
    big = at[at["layer"] == top_layer]
    ax.scatter(big["channel"].astype("float64"), big["token"].astype("float64"),
               s=size[at["layer"].to_numpy() == top_layer], facecolors="none", edgecolors="red", linewidths=1.5,
               label=f"layer {top_layer} (largest |x| = {v.max():.3g})")
    cb = fig.colorbar(sc, ax=ax, label="layer index l")
    _integer_ticks(cb.ax.yaxis)
    ax.set_xlabel("channel index")
    ax.set_ylabel("token position")
    ax.set_title(f"{_label(run)}: recorded top-3 |x| locations only, {site}, step {step}", fontsize=9)
    ax.legend(fontsize=7)
    return fig
