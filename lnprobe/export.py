"""Export a run directory to TensorBoard event files (optional dependency: the ``tensorboard`` extra).

    lnprobe export --tensorboard runs/pre --out tb/pre      # then: tensorboard --logdir tb
    lnprobe.export.export_tensorboard("runs/pre", "tb/pre")

What is written, at each recorded step:
- one scalar per record row: ``{site}/{stat}/layer_{LL}`` for activation sites (e.g.
  ``resid/m2/layer_03``), ``train/{stat}`` (e.g. ``train/loss``), ``param/{stat}/{parameter name}``
  (e.g. ``param/grad_norm/transformer.h.0.attn.c_attn.weight``);
- per-layer profiles as histograms, ``profile/{site}/{stat}`` for resid m2, var and grad_rms: bucket l
  (right edge l + 0.5) holds the value at layer l, so TensorBoard's histogram view shows the profile
  over depth and its evolution over steps;
- ``param/log10_grad_norm`` and ``param/log10_param_norm``: histograms over all parameters of the
  log10 norms;
- ``lnprobe/meta``: meta.json as text.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from .store import load_run

PROFILE_STATS: tuple[tuple[str, str], ...] = (("resid", "m2"), ("resid", "var"), ("resid", "grad_rms"))
_MISSING = ("TensorBoard export needs the tensorboard package, which is not installed: "
            "pip install 'lnprobe[tensorboard]' (or: pip install tensorboard)")


def _summary_writer(out_dir: Path):
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError(_MISSING) from exc
    return SummaryWriter(log_dir=str(out_dir))


def scalar_tag(site: str, layer: int, stat: str) -> str:
    """The TensorBoard tag of one record row."""
    if site == "train":
        return f"train/{stat}"
    if site.startswith("param:"):
        return f"param/{stat}/{site[len('param:'):]}"
    return f"{site}/{stat}/layer_{int(layer):02d}"


def export_tensorboard(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the records of ``run_dir`` as TensorBoard events under ``out_dir``; return ``out_dir``."""
    run = load_run(run_dir)
    out = Path(out_dir)
    writer = _summary_writer(out)
    try:
        meta_text = json.dumps(run.meta, indent=2, sort_keys=True, default=str)
        writer.add_text("lnprobe/meta", "```\n" + meta_text + "\n```", 0)
        r = run.records.sort_values(["step", "site", "layer", "stat"], kind="stable")
        for step, site, layer, stat, value in zip(r.step.to_numpy(), r.site.to_numpy(), r.layer.to_numpy(),
                                                  r.stat.to_numpy(), r.value.to_numpy()):
            writer.add_scalar(scalar_tag(site, layer, stat), float(value), int(step))
        for (site, stat) in PROFILE_STATS:
            rows = r[(r.site == site) & (r.stat == stat)]
            for step, g in rows.groupby("step"):
                _add_profile(writer, f"profile/{site}/{stat}", g.layer.to_numpy(), g.value.to_numpy(), int(step))
        params = r[r.site.str.startswith("param:")]
        for stat in ("grad_norm", "param_norm"):
            for step, g in params[params.stat == stat].groupby("step"):
                v = g.value.to_numpy()
                v = v[np.isfinite(v) & (v > 0)]
                if v.size:
                    writer.add_histogram(f"param/log10_{stat}", np.log10(v), int(step))
    finally:
        writer.close()
    return out


def _add_profile(writer, tag: str, layers: np.ndarray, values: np.ndarray, step: int) -> None:
    """A per-layer profile as a histogram: bucket (l - 0.5, l + 0.5] has count = value at layer l."""
    order = np.argsort(layers)
    layers, values = layers[order].astype(np.float64), values[order].astype(np.float64)
    ok = np.isfinite(values) & (values >= 0)
    if not ok.any():
        return
    counts = np.where(ok, values, 0.0)
    total = float(counts.sum())
    if total <= 0 or not math.isfinite(total):
        return
    writer.add_histogram_raw(
        tag, min=float(layers[0]), max=float(layers[-1]), num=total,
        sum=float((layers * counts).sum()), sum_squares=float((layers * layers * counts).sum()),
        bucket_limits=(layers + 0.5).tolist(), bucket_counts=counts.tolist(), global_step=step)


def main(argv: list[str] | None = None) -> int:
    """``lnprobe export --tensorboard RUN --out DIR``."""
    ap = argparse.ArgumentParser(prog="lnprobe export", description="Export a run directory.")
    ap.add_argument("--tensorboard", metavar="RUN", required=True, help="run directory to export as TensorBoard events")
    ap.add_argument("--out", metavar="DIR", required=True,
                    help="directory for the event files (tensorboard --logdir DIR)")
    a = ap.parse_args(argv)
    try:
        out = export_tensorboard(a.tensorboard, a.out)
    except (ImportError, FileNotFoundError) as exc:
        print(f"lnprobe export: {exc}")
        return 2
    print(f"wrote TensorBoard events to {out}; view with: tensorboard --logdir {out}")
    return 0
