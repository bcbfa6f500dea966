"""Figures and report.html of a checkpoint scan (`lnprobe scan`, `lnprobe.scan.scan_model`).

The figures are those of Sun et al. (2024), "Massive activations in large language models", on
the residual stream `resid` (layer l = input of block l; layer L = output of the last block), for
the last step (checkpoint) of the scan, plus the step dimension when there are several:

- `top_by_layer`: the top-1, top-2, top-3 |x| and the median |x| by layer (log scale);
- `map`: |x| over token × channel for the sequence and layer holding the largest |x|;
- `channels`: which channels hold the top-1/2/3 values at each layer;
- `variance_by_layer`: m2 (mean x²) by layer, one curve per checkpoint, against the theory of the
  detected placement (`theory_m2`: Post-LN's stream level from the norm gains, else the additive law
  of the measured branch powers).

An encoder–decoder's stacks (meta.json `map.stacks`) are drawn as separate curves, split at the
decoder's first layer (a dotted line): layer numbers are global, and the decoder's stream is not
the continuation of the encoder's.

Reads only the run directory (no torch): records, `massive.csv` and `maps/step-*.npz`.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .io import Run, load

__all__ = ["FIGURES", "build_scan_report", "figure_channels", "figure_map", "figure_top_by_layer",
           "figure_variance", "theory_m2"]

FIGURES = ("top_by_layer", "map", "channels", "variance_by_layer")
_TOP = ("top1", "top2", "top3")


def _resid(run: Run, step: int) -> pd.DataFrame:
    r = run.records
    return r[(r.site == "resid") & (r.step == step)]


def _stacks(run: Run) -> list[tuple[str, int, int]]:
    """(name, first layer, last resid layer) of each stack of meta.json's `map.stacks`, or one
    unnamed stack; the last stack also holds resid L, the last block's output."""
    entries = (run.meta.get("map") or {}).get("stacks") or []
    try:
        spans = [(str(e["name"]), int(e["first_layer"]), int(e["first_layer"]) + int(e["n_layers"]) - 1)
                 for e in entries]
    except (KeyError, TypeError, ValueError):
        spans = []
    if not spans:
        return [("", 0, 1 << 30)]
    name, first, last = spans[-1]
    return spans[:-1] + [(name, first, last + 1)]


def _by_stack(run: Run, df: pd.DataFrame):
    """(label suffix, rows of that stack) for each stack, rows sorted by layer."""
    for name, first, last in _stacks(run):
        part = df[(df.layer >= first) & (df.layer <= last)].sort_values("layer")
        yield (f" ({name})" if name else ""), part


def _mark_stacks(ax, run: Run) -> None:
    """A dotted line at each later stack's first layer, named at the top; integer layer ticks."""
    from matplotlib.ticker import MaxNLocator

    for name, first, _ in _stacks(run)[1:]:
        ax.axvline(first - 0.5, color="grey", ls=":", lw=1)
        ax.text(first - 0.4, 1.0, name, transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="grey")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def figure_top_by_layer(run: Run, step: int) -> Figure:
    """Top-1/2/3 and median |x| of `resid` by layer (Sun et al.'s Fig. 2 style)."""
    df = _resid(run, step)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for stat, style, color in zip((*_TOP, "median_abs"), ("o-", "s-", "^-", "--"), ("C0", "C1", "C2", "k")):
        for i, (_, s) in enumerate(_by_stack(run, df[df.stat == stat])):
            if len(s):
                ax.plot(s.layer, s.value, style, color=color, ms=4,
                        label=stat.replace("median_abs", "median") if i == 0 else None)
    _mark_stacks(ax, run)
    ax.set_yscale("log")
    ax.set_xlabel("layer (resid: input of block l)")
    ax.set_ylabel("|x|")
    ax.set_title(f"top |x| and median by layer, step {step}")
    ax.legend()
    return fig


def figure_map(path: Path, step: int) -> Figure | None:
    """|x| over positions × channels of the sequence and layer with the largest |x| of `step`."""
    f = path / "maps" / f"step-{step:06d}.npz"
    if not f.exists():
        return None
    z = np.load(f)
    amap, tokens = z["map"], list(z["tokens"])
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    im = ax.imshow(amap, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(im, ax=ax, label="|x|")
    # one element may hold the largest |x|: too small to see among T × D, so it is circled
    pos, ch = np.unravel_index(int(np.argmax(amap)), amap.shape)
    ax.scatter([ch], [pos], s=120, facecolors="none", edgecolors="red", linewidths=1.5)
    where = f"{tokens[pos]} (position {pos})" if pos < len(tokens) else f"position {pos}"
    ax.set_xlabel("channel")
    ax.set_ylabel("position (token)")
    if len(tokens) <= 40:
        ax.set_yticks(range(len(tokens)), [t[:12] for t in tokens], fontsize=6)
    ax.set_title(f"|x| at layer {int(z['layer'])}, sequence {int(z['sequence'])}, step {step}\n"
                 f"max {amap[pos, ch]:.3g} (circled) at {where}, channel {ch}", fontsize=10)
    return fig


def figure_channels(run: Run, step: int) -> Figure:
    """Channel (y) of the top-1/2/3 |x| at each layer (x); marker size by rank."""
    df = _resid(run, step)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for stat, size in zip(_TOP, (60, 35, 15)):
        s = df[df.stat == stat]
        if len(s):
            ax.scatter(s.layer, s.channel.astype(float), s=size, label=stat, alpha=0.8)
    _mark_stacks(ax, run)
    ax.set_xlabel("layer")
    ax.set_ylabel("channel")
    ax.set_title(f"channels of the top |x|, step {step}")
    ax.legend()
    return fig


def _stack_placements(run: Run) -> list[str]:
    """The placement of each stack of `_stacks` (meta.json `map.stacks`, else the run's)."""
    entries = (run.meta.get("map") or {}).get("stacks") or []
    found = [str(e.get("placement")) for e in entries if isinstance(e, dict)]
    return found if len(found) == len(_stacks(run)) else [str(run.meta.get("placement"))] * len(_stacks(run))


def theory_m2(run: Run, step: int) -> pd.DataFrame:
    """Predicted m2 of `resid` by layer for `step`, per stack, from the theory of its placement
    (docs/theory.md), with measured inputs — columns layer, m2, law:

    - `post`: the stream level mean(γ²) + mean(β²) of the norm that produced resid l (the previous
      block's last norm; `analysis.theory.post_level`), from the recorded gain_ms / bias_ms;
    - any other placement: the additive law m2(resid_first) + Σ m2(branch outputs) over the blocks
      before l (attn_out, xattn_out, mlp_out as recorded; cross terms taken as 0), the sum that
      `theory.peri_additive_m2` makes of the output gains in Peri-LN and that holds for Pre-LN with
      the measured branch powers."""
    from .theory import post_level

    r = run.records[run.records.step == step]
    m2 = r[r.stat == "m2"]
    rows = []
    norms = run.meta.get("norms") or []
    for (name, first, last), placement in zip(_stacks(run), _stack_placements(run)):
        resid = m2[(m2.site == "resid") & (m2.layer >= first) & (m2.layer <= last)].set_index("layer").value
        if resid.empty:
            continue
        if placement == "post":
            param = r.set_index(["site", "stat"]).value
            for n in norms:
                # resid l comes out of block l-1's last norm; resid 0 out of the embedding norm, which
                # belongs to a stack only when there is one
                if n.get("role") == "norm.post_mlp" and first <= int(n.get("layer", -1)) + 1 <= last:
                    layer = int(n["layer"]) + 1
                elif n.get("role") == "norm.embed" and not name:
                    layer = 0
                else:
                    continue
                g = param.get((f"param:{n.get('weight')}", "gain_ms"), np.nan)
                b = param.get((f"param:{n.get('bias')}", "bias_ms"), 0.0) if n.get("bias") else 0.0
                rows.append((layer, float(post_level(g, b)), "post: mean γ² + mean β²"))
            continue
        branch = m2[m2.site.isin(["attn_out", "xattn_out", "mlp_out"])].groupby("layer").value.sum()
        start = int(resid.index.min())
        total = float(resid.loc[start])
        rows.append((start, total, "additive: m2(resid) + Σ m2(branch)"))
        for layer in range(start, int(resid.index.max())):
            if layer not in branch.index:
                break
            total += float(branch.loc[layer])
            rows.append((layer + 1, total, "additive: m2(resid) + Σ m2(branch)"))
    return pd.DataFrame(rows, columns=["layer", "m2", "law"]).sort_values("layer", ignore_index=True)


def figure_variance(run: Run) -> Figure:
    """m2 (mean x², the variance about 0) of `resid` by layer, one curve per step (checkpoint), and
    for the last step the prediction of the detected placement's theory (`theory_m2`, dashed)."""
    r = run.records
    df = r[(r.site == "resid") & (r.stat == "m2")]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    names = run.meta.get("config", {}).get("checkpoints") or []
    for i, (step, rows) in enumerate(df.groupby("step")):
        label = Path(names[step]).name if step < len(names) else f"step {step}"
        for j, (_, s) in enumerate(_by_stack(run, rows)):
            ax.plot(s.layer, s.value, "o-", ms=3, color=f"C{i % 10}", label=label if j == 0 else None)
    if len(df):
        theory = theory_m2(run, int(df.step.max()))
        for law, part in theory.groupby("law"):
            for j, (_, s) in enumerate(_by_stack(run, part)):
                ax.plot(s.layer, s.m2, "k--", lw=1, label=f"theory ({law})" if j == 0 else None)
    _mark_stacks(ax, run)
    if len(df) and df.value.max() / max(df.value.min(), 1e-30) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("m2 = mean x² of resid")
    ax.set_title(f"second moment by layer, placement {run.meta.get('placement')}")
    ax.legend(fontsize=7)
    return fig


def _summary(run: Run, step: int, massive: pd.DataFrame) -> pd.DataFrame:
    df = _resid(run, step)
    top = df[df.stat == "top1"].set_index("layer")
    med = df[df.stat == "median_abs"].set_index("layer").value
    out = pd.DataFrame({"top1": top.value, "token": top.token, "channel": top.channel, "median": med})
    out["ratio"] = out.top1 / out["median"]
    if len(_stacks(run)) > 1:
        out.insert(0, "stack", [next(n for n, lo, hi in _stacks(run) if lo <= layer <= hi) for layer in out.index])
    m = massive[massive.step == step] if len(massive) else massive
    out["massive"] = m.groupby("layer").size().reindex(out.index).fillna(0).astype(int) if len(m) else 0
    return out.reset_index()


def build_scan_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the figures (PNG) and a self-contained report.html for the scan in `path` to `out`
    (default `path/report`); returns the path of report.html."""
    path = Path(path)
    out = Path(out) if out is not None else path / "report"
    out.mkdir(parents=True, exist_ok=True)
    run = load(path)
    step = int(run.records.step.max())
    mpath = path / "massive.csv"
    massive = pd.read_csv(mpath, keep_default_na=False) if mpath.exists() else pd.DataFrame()
    figs = {"top_by_layer": figure_top_by_layer(run, step), "map": figure_map(path, step),
            "channels": figure_channels(run, step), "variance_by_layer": figure_variance(run)}
    parts = []
    for name, fig in figs.items():
        if fig is None:
            continue
        png = out / f"{name}.png"
        fig.savefig(png, dpi=110)
        parts.append(f'<h2>{name}</h2><img src="data:image/png;base64,'
                     f'{base64.b64encode(png.read_bytes()).decode("ascii")}">')
    summary = _summary(run, step, massive)
    summary.to_csv(out / "summary.csv", index=False)
    names = run.meta.get("config", {}).get("checkpoints") or [run.name]
    head = (f"<h1>Scan: {html.escape(run.meta.get('model_class', ''))}</h1>"
            f"<p>placement <b>{html.escape(str(run.meta.get('placement')))}</b>, "
            f"{run.meta.get('n_layers')} layers, d_model {run.meta.get('d_model')}; checkpoints: "
            f"{html.escape(', '.join(map(str, names)))}. Massive activation (Sun et al. 2024): "
            f"|x| &gt; 100 and ≥ 1000 × the layer's median |x|; {len(massive)} rows in massive.csv.</p>")
    rows = massive.head(50).to_html(index=False) if len(massive) else "<p>none</p>"
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>lnprobe scan</title></head><body>"
           f"{head}<h2>By layer (last checkpoint, resid)</h2>{summary.to_html(index=False)}"
           f"<h2>Massive activations (first 50)</h2>{rows}{''.join(parts)}</body></html>")
    report = out / "report.html"
    report.write_text(doc, encoding="utf-8")
    return report
