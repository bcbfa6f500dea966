"""Massive activations (Sun et al. 2024, docs/theory.md "Massive activations"), the FP16 margin and
spike scores (docs/theory.md "Training-instability signals").

The run directory records, per (step, site, layer), the three largest |x| with their token
(sequence position) and channel (``top1..top3``), the median of |x| (``median_abs``, estimated by the
probe) and the probe's own ``massive`` count. An activation is massive when
|x| > 100 and |x| ≥ 1000 × median(|x|) of that hidden state. Only the top three values per layer
and step are known here, so at most three massive activations per layer are located; the probe's
``massive`` count says how many there were in all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..constants import FP16_MAX, MASSIVE_ABS, MASSIVE_RATIO

_NON_ACTIVATION = ("train",)


def top_frames(run: Any, site: str = "resid", ranks: Sequence[int] = (1, 2, 3)) -> list[tuple[int, pd.DataFrame]]:
    """(rank, rows of ``top{rank}``) for each recorded rank; ``absmax`` stands in for top1 when only
    absmax was recorded (absmax = top1)."""
    out = []
    for rank in ranks:
        f = run.frame(site, f"top{rank}")
        if not len(f) and rank == 1:
            f = run.frame(site, "absmax")
        if len(f):
            out.append((rank, f))
    return out


def massive_candidates(run: Any, site: str = "resid", *, step: int | None = None,
                       ranks: Sequence[int] = (1, 2, 3)) -> pd.DataFrame:
    """Sun et al. criterion on the recorded top-3 of one site.

    Returns one row per recorded (step, layer, rank) with columns step, layer, rank (1..3), value,
    token, channel, median_abs, ratio (= value / median_abs), massive (bool: value > 100 and
    ratio ≥ 1000; False when the median is not recorded), count (the probe's ``massive`` count for
    that step/layer, NaN when not recorded). Empty frame when no top-k is recorded. ``step``: that
    step only; ``ranks``: those ranks only (a long run has millions of rows per rank).
    """
    def at(f: pd.DataFrame) -> pd.DataFrame:
        return f[f["step"] == step] if step is not None else f

    frames = [at(f).assign(rank=rank) for rank, f in top_frames(run, site, ranks)]
    frames = [f for f in frames if len(f)]
    cols = ["step", "layer", "rank", "value", "token", "channel", "median_abs", "ratio", "massive", "count"]
    if not frames:
        return pd.DataFrame(columns=cols)
    top = pd.concat(frames, ignore_index=True)
    med = at(run.frame(site, "median_abs"))[["step", "layer", "value"]].rename(columns={"value": "median_abs"})
    cnt = at(run.frame(site, "massive"))[["step", "layer", "value"]].rename(columns={"value": "count"})
    top = top.merge(med, on=["step", "layer"], how="left").merge(cnt, on=["step", "layer"], how="left")
    with np.errstate(divide="ignore", invalid="ignore"):
        top["ratio"] = top["value"].to_numpy() / top["median_abs"].to_numpy(dtype=np.float64)
    top["massive"] = (top["value"] > MASSIVE_ABS) & (top["ratio"].fillna(0.0) >= MASSIVE_RATIO)
    return top[cols].sort_values(["step", "layer", "rank"], ignore_index=True)


def track_massive(candidates: pd.DataFrame, key: Sequence[str] = ("channel", "token")) -> pd.DataFrame:
    """Follow massive activations across layers and steps, grouped by ``key`` (default (channel, token);
    pass ("channel",) to follow a channel whatever its token).

    ``candidates``: output of :func:`massive_candidates` (all recorded rows, so the recorded layers and
    steps are known). One row per key with: first_step, first_layer (lowest layer at first_step),
    n_steps (steps at which it is massive somewhere), max_value,
    persistence_layers = mean over those steps of (number of layers AFTER the first massive layer of
    that step where it is massive) / (number of recorded layers after it) — NaN when it first appears
    at the last layer; persistence_steps = (steps after first_step where it is massive at some layer) /
    (recorded steps after first_step) — NaN when there is no later step. Sorted by first_step,
    first_layer.
    """
    key = list(key)
    cols = key + ["first_step", "first_layer", "n_steps", "max_value", "persistence_layers", "persistence_steps"]
    if candidates.empty or not candidates["massive"].any():
        return pd.DataFrame(columns=cols)
    layers_all = np.unique(candidates["layer"].to_numpy())
    steps_all = np.unique(candidates["step"].to_numpy())
    ev = candidates.loc[candidates["massive"], ["step", "layer", "value"] + key].copy()
    for k in key:
        ev[k] = ev[k].astype("float64")             # nullable ints -> float so groupby keeps NaN keys out
    ev = ev.dropna(subset=key)
    if ev.empty:
        return pd.DataFrame(columns=cols)
    per_step = ev.groupby(key + ["step"]).agg(first=("layer", "min"), n=("layer", "nunique"),
                                              vmax=("value", "max")).reset_index()
    later_layers = len(layers_all) - np.searchsorted(layers_all, per_step["first"].to_numpy(), side="right")
    with np.errstate(divide="ignore", invalid="ignore"):
        per_step["frac"] = np.where(later_layers > 0, (per_step["n"] - 1) / np.maximum(later_layers, 1), np.nan)
    g = per_step.sort_values("step").groupby(key)
    out = g.agg(first_step=("step", "min"), n_steps=("step", "nunique"), max_value=("vmax", "max"),
                persistence_layers=("frac", "mean"), first_layer=("first", "first")).reset_index()
    later_steps = len(steps_all) - np.searchsorted(steps_all, out["first_step"].to_numpy(), side="right")
    out["persistence_steps"] = np.where(later_steps > 0, (out["n_steps"] - 1) / np.maximum(later_steps, 1), np.nan)
    for k in key:
        out[k] = out[k].astype("int64")
    out["first_step"] = out["first_step"].astype("int64")
    out["first_layer"] = out["first_layer"].astype("int64")
    return out[cols].sort_values(["first_step", "first_layer"], ignore_index=True)


def activation_sites(run: Any) -> list[str]:
    """Recorded activation sites (everything but ``train`` and ``param:*``)."""
    return [s for s in run.sites if s not in _NON_ACTIVATION and not s.startswith("param:")]


def fp16_margin(run: Any, sites: Sequence[str] | None = None) -> dict[str, Any]:
    """Distance of the largest recorded |x| from the FP16 maximum 65504 (docs/theory.md, "Massive activations").

    Over ``sites`` (default: every activation site) and all steps and layers. Returns a dict:
    max_absmax, site, layer, step (where it occurred), ratio = max_absmax / 65504,
    log10_ratio (< 0: below the FP16 maximum, e.g. −2 is 100× below; > 0: overflow),
    over_fp16 (sum of the probe's ``over_fp16`` counts, NaN when not recorded),
    nonfinite (sum of ``nonfinite`` counts, NaN when not recorded). max_absmax is NaN when no
    absmax is recorded.
    """
    sites = list(sites) if sites is not None else activation_sites(run)
    best = dict(max_absmax=np.nan, site=None, layer=None, step=None)
    top = -np.inf
    over, nonfinite = [], []
    for s in sites:
        f = run.frame(s, "absmax")
        if len(f):
            v = f["value"].to_numpy()
            v = np.where(np.isnan(v), -np.inf, v)      # an Inf absmax is an overflow: keep it
            i = int(np.argmax(v))
            if v[i] > top:
                top = v[i]
                best = dict(max_absmax=float(v[i]), site=s, layer=int(f["layer"].iloc[i]), step=int(f["step"].iloc[i]))
        for stat, acc in (("over_fp16", over), ("nonfinite", nonfinite)):
            g = run.frame(s, stat)
            if len(g):
                acc.append(float(np.nansum(g["value"].to_numpy())))
    ratio = best["max_absmax"] / FP16_MAX
    return dict(best, ratio=ratio, log10_ratio=float(np.log10(ratio)) if ratio > 0 else np.nan,
                over_fp16=float(sum(over)) if over else np.nan,
                nonfinite=float(sum(nonfinite)) if nonfinite else np.nan)


def absmax_over_steps(run: Any, site: str = "resid") -> pd.Series:
    """max over layers of the recorded absmax at ``site``, per step (empty when not recorded)."""
    t = run.pivot(site, "absmax")
    return t.max(axis=1) if not t.empty else pd.Series(dtype="float64")


@dataclass
class SpikeResult:
    """Result of :func:`spike_score`: score = spikes / evaluated steps; spikes = their steps;
    z = (value − rolling mean) / rolling std per step (NaN before ``min_periods`` values)."""

    score: float
    spikes: list[int] = field(default_factory=list)
    n_evaluated: int = 0
    n_nonfinite: int = 0
    z: pd.Series = field(default_factory=lambda: pd.Series(dtype="float64"))


def spike_score(series: pd.Series | Sequence[float], window: int = 1000, threshold: float = 7.0,
                min_periods: int = 10) -> SpikeResult:
    """Spike score in the style of OLMo 2 (docs/theory.md, "Training-instability signals").

    A step is a spike when its value is at least ``threshold`` standard deviations above the mean of
    the PREVIOUS ``window`` values (fewer at the start; no verdict before ``min_periods`` previous
    values). score = number of spikes / number of evaluated steps. ``series``: values indexed by step
    (a plain sequence is indexed 0..n−1). Non-finite values (a NaN loss) are counted in
    ``n_nonfinite`` and left out of the statistics.
    """
    s = series if isinstance(series, pd.Series) else pd.Series(np.asarray(series, dtype=np.float64))
    s = s.astype("float64").sort_index()
    finite = np.isfinite(s.to_numpy())
    n_nonfinite = int((~finite).sum())
    s = s[finite]
    if len(s) == 0:
        return SpikeResult(score=float("nan"), n_nonfinite=n_nonfinite)
    roll = s.rolling(window, min_periods=min_periods)
    mean = roll.mean().shift(1)
    std = roll.std().shift(1)
    excess = s - mean
    with np.errstate(divide="ignore", invalid="ignore"):
        z = excess / std
    evaluated = mean.notna()
    spike = evaluated & (excess > 0) & (excess >= threshold * std)
    n_eval = int(evaluated.sum())
    return SpikeResult(score=float(spike.sum() / n_eval) if n_eval else float("nan"),
                       spikes=[int(i) for i in s.index[spike.to_numpy()]], n_evaluated=n_eval,
                       n_nonfinite=n_nonfinite, z=z)
