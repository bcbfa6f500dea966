"""Figures of the instability signals over training: optimizer update ratios by layer and role, the
attention-logit maximum and entropy by layer, and the output-logit statistics (docs/theory.md §5).

Same conventions as :mod:`analysis.plots`: each function takes loaded runs, returns a
``matplotlib.figure.Figure``, writes nothing, and raises :class:`analysis.plots.MissingData` when no
run has what it needs (runs without it are named in a footnote and in ``notes``).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import compare
from .io import SUBLAYER_ROLES, Run
from .plots import RUN_COLORS, MissingData, _figure, _footnote, _label, _legend_outside, _log_if_span, _runs

_DEPTH = colormaps["viridis"]


def _layer_colorbar(fig: Figure, axes: Sequence, n_layers: int) -> None:
    sm = ScalarMappable(norm=Normalize(0, max(n_layers - 1, 1)), cmap=_DEPTH)
    cb = fig.colorbar(sm, ax=list(axes), label="layer index l", fraction=0.03, pad=0.02)
    cb.locator = MaxNLocator(integer=True)
    cb.update_ticks()


def _by_layer(ax, table, n_layers: int) -> np.ndarray:
    """One curve per layer (column) of a step × layer table, coloured by depth; returns the values."""
    for layer in table.columns:
        if layer < 0:
            continue
        ax.plot(table.index, table[layer].to_numpy(), "-", lw=1, color=_DEPTH(layer / max(n_layers - 1, 1)))
    return table.to_numpy()


def plot_update_ratio(runs: Run | Iterable[Run], roles: Sequence[str] = SUBLAYER_ROLES,
                      notes: list[str] | None = None) -> Figure:
    """‖Δp‖/‖p‖ of each optimizer step over training, one panel per parameter role (attn.qkv, attn.out,
    mlp.in, mlp.out) and run, one curve per layer (several parameters of a role in a layer: their mean)."""
    runs = _runs(runs)
    tables = {r.name: {role: r.role_table("update_ratio", role) for role in roles} for r in runs}
    have = [r for r in runs if any(not t.empty for t in tables[r.name].values())]
    if not have:
        raise MissingData("no run records 'update_ratio' (attach(updates=optimizer))")
    skipped = [f"{r.name}: no update_ratio" for r in runs if r not in have]
    fig, axes = _figure(len(have) * len(roles), ncols=len(roles), w=4.0, h=3.4, sharey=True)
    values = []
    for i, run in enumerate(have):
        for j, role in enumerate(roles):
            ax = axes[i * len(roles) + j]
            t = tables[run.name][role]
            if not t.empty:
                values.append(_by_layer(ax, t, run.n_layers))
            ax.set_title(f"{_label(run)}: {role}", fontsize=9)
            ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("update ratio ‖Δp‖/‖p‖")
    if values:
        _log_if_span(axes[0], np.concatenate([v.ravel() for v in values]), span=10.0)
    _layer_colorbar(fig, axes, max(r.n_layers for r in have))
    _footnote(fig, skipped, notes)
    return fig


def plot_attention_logits(runs: Run | Iterable[Run], notes: list[str] | None = None) -> Figure:
    """Per run: max |q·k|/sqrt(d_h) (left) and mean attention entropy (right) over training, one curve per
    layer; with QK-norm, theory §5's bound sqrt(d_h)·max|γ_q|·max|γ_k| (max over layers) dashed."""
    runs = _runs(runs)
    have = [r for r in runs if r.has("attn_logits", "qk_absmax")]
    if not have:
        raise MissingData("no run records 'qk_absmax' at site 'attn_logits' (attach(attn_logits=True))")
    skipped = [f"{r.name}: no attn_logits" for r in runs if r not in have]
    fig, axes = _figure(2 * len(have), ncols=2, w=5.0, h=3.6)
    for i, run in enumerate(have):
        ax_q, ax_e = axes[2 * i], axes[2 * i + 1]
        q = run.pivot("attn_logits", "qk_absmax")
        _log_if_span(ax_q, _by_layer(ax_q, q, run.n_layers), span=30.0)
        bound = compare.qk_bound_frame(run)
        if bound is not None:
            b = bound.groupby("step")["bound"].max()
            ax_q.plot(b.index, b.to_numpy(), "k--", lw=1, label="QK-norm bound (max over layers)")
            ax_q.legend(fontsize=7)
        ax_q.set_title(f"{_label(run)}: attention logit max", fontsize=9)
        ax_q.set_ylabel("max |q·k|/sqrt(d_h)")
        e = run.pivot("attn_logits", "entropy")
        if not e.empty:
            _by_layer(ax_e, e, run.n_layers)
        ax_e.set_title(f"{_label(run)}: mean attention entropy", fontsize=9)
        ax_e.set_ylabel("entropy (nats)")
        for ax in (ax_q, ax_e):
            ax.set_xlabel("step")
    _layer_colorbar(fig, axes, max(r.n_layers for r in have))
    _footnote(fig, skipped, notes)
    return fig


def plot_logit_stats(runs: Run | Iterable[Run], notes: list[str] | None = None) -> Figure:
    """The head's output logits over training: rms, max |z| and mean log Z (the z-loss quantity; a
    drift of log Z is the output-logit divergence of theory §5), one curve per run."""
    runs = _runs(runs)
    have = [r for r in runs if r.has("logits", "lse_mean")]
    if not have:
        raise MissingData("no run records 'lse_mean' at site 'logits' (attach(logits=True))")
    skipped = [f"{r.name}: no logits" for r in runs if r not in have]
    fig, axes = _figure(3, ncols=3, w=4.2, h=3.6)
    for ax, stat, label in zip(axes, ("logit_rms", "logit_absmax", "lse_mean"),
                               ("rms of the logits z", "max |z|", "mean log Z = log Σ exp z")):
        for i, run in enumerate(have):
            s = run.series(stat, "logits")
            ax.plot(s.index, s.to_numpy(), "-", lw=1.2, color=RUN_COLORS[i % len(RUN_COLORS)], label=_label(run))
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(f"output logits: {stat}", fontsize=9)
    _legend_outside(fig, axes[-1])
    _footnote(fig, skipped, notes)
    return fig
