"""Export a run directory to TensorBoard event files (optional dependency: the ``tensorboard`` extra).

    lnprobe export --tensorboard runs/pre --out tb/pre   # then: tensorboard --logdir tb --samples_per_plugin scalars=0
    lnprobe.export.export_tensorboard("runs/pre", "tb/pre")

Few tags, one chart per quantity: TensorBoard (and W&B) slow down with thousands of tags, so the layer
is not part of a tag. Each layer is a TensorBoard *run* (``OUT/layer_LL``) and every layer writes the
same tags, which TensorBoard draws as one multi-line chart per tag, one line per layer:
- ``{site}/{stat}`` for activation and gradient statistics (e.g. ``resid/m2``, its lines ``layer_00`` to
  ``layer_L``);
- ``param/{role}/{stat}`` for parameter statistics, grouped by role (e.g. ``param/mlp.out/grad_norm``):
  several parameters of one role in one block combine as :meth:`lnprobe.store.Run.role_table` does
  (root of the sum of squares for norms, the mean otherwise); parameters outside the blocks (layer −1)
  are in ``OUT`` itself;
- in ``OUT`` itself: ``train/{stat}`` (e.g. ``train/loss``), the per-layer profiles as histograms,
  ``profile/{site}/{stat}`` for resid m2, var and grad_rms (bucket l, right edge l + 0.5, holds the
  value at layer l), ``param/log10_grad_norm`` and ``param/log10_param_norm`` (histograms over all
  parameters of the log10 norms), and ``lnprobe/meta`` (meta.json as text).

So a 32-layer run has a few dozen tags instead of one per site × layer × statistic and per parameter.
TensorBoard keeps only 1,000 points per scalar tag by default (reservoir sampling): start it with
``--samples_per_plugin scalars=0`` to see every step. The run is read one (site, stat) at a time.
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


def scalar_tag(site: str, stat: str, role: str | None = None) -> str:
    """The TensorBoard tag of a (site, stat) — its layers are runs of the same tag — or, with ``role``,
    of a parameter statistic of that role."""
    if role is not None:
        return f"param/{role}/{stat}"
    return f"{site}/{stat}"


def layer_run(layer: int) -> str:
    """The TensorBoard run (a sub-directory of ``OUT``) of one layer: ``layer_LL``."""
    return f"layer_{int(layer):02d}"


def export_tensorboard(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the records of ``run_dir`` as TensorBoard events under ``out_dir``; return ``out_dir``."""
    from .store import PARAM_PREFIX

    run = load_run(run_dir)
    out = Path(out_dir)
    writers: dict[str, object] = {}

    def writer(layer: int):
        key = "." if layer < 0 else layer_run(layer)
        if key not in writers:
            writers[key] = _summary_writer(out if key == "." else out / key)
        return writers[key]

    root = writer(-1)
    try:
        meta_text = json.dumps(run.meta, indent=2, sort_keys=True, default=str)
        root.add_text("lnprobe/meta", "```\n" + meta_text + "\n```", 0)
        pairs = run.pairs
        for site, stat in pairs:
            if site.startswith(PARAM_PREFIX):
                continue
            f = run.frame(site, stat)
            tag = f"train/{stat}" if site == "train" else scalar_tag(site, stat)
            for layer, g in f.groupby("layer", sort=True):
                w = writer(int(layer))
                for step, value in zip(g["step"].to_numpy(), g["value"].to_numpy()):
                    w.add_scalar(tag, float(value), int(step))
        for stat in sorted({stat for site, stat in pairs if site.startswith(PARAM_PREFIX)}):
            p = run.params(stat)
            for role in sorted(set(p["role"])):
                for layer, col in run.role_table(stat, role).items():
                    w = writer(int(layer))
                    for step, value in col.dropna().items():
                        w.add_scalar(scalar_tag("", stat, role), float(value), int(step))
        for (site, stat) in PROFILE_STATS:
            rows = run.frame(site, stat)
            for step, g in rows.groupby("step"):
                _add_profile(root, f"profile/{site}/{stat}", g.layer.to_numpy(), g.value.to_numpy(), int(step))
        for stat in ("grad_norm", "param_norm"):
            for step, g in run.params(stat).groupby("step"):
                v = g.value.to_numpy(dtype=np.float64)
                v = v[np.isfinite(v) & (v > 0)]
                if v.size:
                    root.add_histogram(f"param/log10_{stat}", np.log10(v), int(step))
    finally:
        for w in writers.values():
            w.close()
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
