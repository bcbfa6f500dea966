"""Live sinks: a few scalars and per-layer profiles of every recorded step, sent at each flush.

    probe = lnprobe.attach(model, "runs/x", sinks=[lnprobe.sinks.TensorBoard("tb/x")])
    probe = lnprobe.attach(model, "runs/x", sinks=[lambda step, scalars: print(step, scalars)])

Sinks run inside ``Probe.flush()`` after the buffered values have reached the host for the Parquet
part, so they add no device synchronisation; what they see is what was just written (under
torch.distributed the reduced values, on the writer rank only). Their latency is therefore the
flush period (``flush_every`` recorded steps).

``summarize(frame)`` turns the records of one flush into, per step, a flat dict of scalars and a
dict of per-layer profiles. Keys (all prefixed ``lnprobe/``, so they never collide with a
framework's own ``loss``):

- ``lnprobe/<stat>`` for every ``train`` row: ``loss``, ``grad_norm``, ``lr``, ``nonfinite_loss``,
  ``skipped``, host scalars from ``log_scalars`` (``val_loss``, ...);
- ``lnprobe/resid_m2_last``: m2 of the residual stream after the last block (layer L);
- ``lnprobe/absmax``, ``lnprobe/absmax_layer``: the largest ``absmax`` over all activation sites and
  layers, and its layer (``Summary.absmax_site`` names the site);
- ``lnprobe/nonfinite``: NaN/Inf count summed over every activation site; ``lnprobe/massive``: the
  massive-activation count summed over sites; ``lnprobe/nonfinite_grads``: parameters whose
  gradient norm is NaN/Inf;
- ``lnprobe/update_ratio_max``, ``lnprobe/update_ratio_max_layer``: the largest ‖Δp‖/‖p‖ over the
  parameters (``updates=`` of ``attach``), and its layer;
- ``lnprobe/qk_absmax``, ``lnprobe/qk_absmax_layer``: the largest attention logit |q·k|/sqrt(d_h) over
  the layers and its layer (``attn_logits=True``); ``lnprobe/lse_mean``, ``lnprobe/logit_absmax``: the
  output logits' mean log Z and largest |logit| (``logits=True``).

Profiles (one tag per site and statistic, never one per parameter): ``lnprobe/profile/<site>/<stat>``
for ``PROFILES`` (a value per layer), and ``lnprobe/profile/param/<stat>`` for parameter statistics
aggregated per layer (root of the summed squares of ``grad_norm``; the max of ``update_ratio``).

A sink is any callable ``sink(step, scalars)`` or a ``Sink`` (which also gets the profiles). A sink
that raises is disabled with a warning and a note in meta.json; training goes on.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

PREFIX = "lnprobe/"
#: (site, stat) activation and gradient statistics sent as per-layer profiles.
PROFILES: tuple[tuple[str, str], ...] = (
    ("resid", "m2"), ("resid", "var"), ("resid", "absmax"), ("resid", "grad_rms"), ("mlp_act", "absmax"),
    ("attn_logits", "qk_absmax"), ("attn_logits", "entropy"),
)
#: parameter statistics aggregated per layer: (stat, how)
PARAM_PROFILES: tuple[tuple[str, str], ...] = (("grad_norm", "rss"), ("update_ratio", "max"))
#: the order in which a block's sites are computed (for "first in forward order"): at layer l the
#: stream entering block l, the attention branch, the stream after it, the cross-attention branch and
#: the stream after it (decoder blocks of an encoder–decoder), the MLP branch; ``final`` follows
#: ``resid`` at layer L. Every site of ``lnprobe.sites.ALL_SITES`` (tests/test_sinks.py checks it).
FORWARD_ORDER: tuple[str, ...] = (
    "resid", "attn_raw", "attn_out", "resid_mid", "xattn_raw", "xattn_out", "resid_xattn", "mlp_act", "mlp_raw",
    "mlp_out", "final")


@dataclass
class Summary:
    """What a sink receives for one recorded step."""

    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    profiles: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # tag -> (layers, values)
    absmax_site: str | None = None


def summarize(frame: pd.DataFrame) -> list[Summary]:
    """Per step of a records frame (one flush): the scalars and profiles of the module docstring."""
    if frame is None or frame.empty:
        return []
    out = []
    for step, g in frame.groupby("step", sort=True):
        out.append(_summary(int(step), g))
    return out


def _summary(step: int, g: pd.DataFrame) -> Summary:
    s = Summary(step)
    sc = s.scalars
    site, stat, layer, value = g.site.to_numpy(), g.stat.to_numpy(), g.layer.to_numpy(), g.value.to_numpy(np.float64)
    is_train = site == "train"
    for st, v in zip(stat[is_train], value[is_train]):
        sc[PREFIX + str(st)] = float(v)
    is_param = np.fromiter((str(x).startswith("param:") for x in site), bool, len(site))
    act = ~is_train & ~is_param
    last = act & (site == "resid") & (stat == "m2")
    if last.any():
        i = np.flatnonzero(last)[np.argmax(layer[last])]
        sc[PREFIX + "resid_m2_last"] = float(value[i])
    am = act & (stat == "absmax") & np.isfinite(value)
    if am.any():
        i = np.flatnonzero(am)[np.argmax(value[am])]
        sc[PREFIX + "absmax"], sc[PREFIX + "absmax_layer"] = float(value[i]), float(layer[i])
        s.absmax_site = str(site[i])
    for name in ("nonfinite", "massive"):
        sel = act & (stat == name)
        if sel.any():
            sc[PREFIX + name] = float(np.nansum(value[sel]))
    gn = is_param & (stat == "grad_norm")
    if gn.any():
        sc[PREFIX + "nonfinite_grads"] = float((~np.isfinite(value[gn])).sum())
    ur = is_param & (stat == "update_ratio") & np.isfinite(value)
    if ur.any():
        i = np.flatnonzero(ur)[np.argmax(value[ur])]
        sc[PREFIX + "update_ratio_max"], sc[PREFIX + "update_ratio_max_layer"] = float(value[i]), float(layer[i])
    qk = (site == "attn_logits") & (stat == "qk_absmax") & np.isfinite(value)
    if qk.any():
        i = np.flatnonzero(qk)[np.argmax(value[qk])]
        sc[PREFIX + "qk_absmax"], sc[PREFIX + "qk_absmax_layer"] = float(value[i]), float(layer[i])
    for name in ("lse_mean", "logit_absmax"):
        sel = (site == "logits") & (stat == name)
        if sel.any():
            sc[PREFIX + name] = float(value[sel][-1])
    for ps, pst in PROFILES:
        sel = (site == ps) & (stat == pst)
        if sel.any():
            order = np.argsort(layer[sel], kind="stable")
            s.profiles[f"{PREFIX}profile/{ps}/{pst}"] = (layer[sel][order].astype(np.int64), value[sel][order])
    for pst, how in PARAM_PROFILES:
        sel = is_param & (stat == pst) & (layer >= 0)
        if sel.any():
            df = pd.DataFrame({"layer": layer[sel], "v": value[sel]})
            agg = df.groupby("layer").v
            red = agg.apply(lambda v: float(np.sqrt(np.sum(np.square(v))))) if how == "rss" else agg.max()
            s.profiles[f"{PREFIX}profile/param/{pst}"] = (red.index.to_numpy(np.int64), red.to_numpy(np.float64))
    return s


def first_nonfinite(frame: pd.DataFrame) -> dict[str, Any] | None:
    """The first (step, site, layer) of a records frame whose ``nonfinite`` count is > 0: the earliest
    step, then the site computed first in the forward (``FORWARD_ORDER`` within a layer, layers in
    order). None when there is none. Returns ``{"step", "site", "layer", "count"}``."""
    if frame is None or frame.empty:
        return None
    nf = frame[(frame.stat == "nonfinite") & (frame.value > 0)]
    nf = nf[nf.site.isin(FORWARD_ORDER)]
    if nf.empty:
        return None
    step = int(nf.step.min())
    at = nf[nf.step == step]
    key = [(int(layer), FORWARD_ORDER.index(site)) for site, layer in zip(at.site, at.layer)]
    i = min(range(len(key)), key=key.__getitem__)
    row = at.iloc[i]
    return {"step": step, "site": str(row.site), "layer": int(row.layer), "count": float(row.value)}


# ----------------------------------------------------------------------------- sink types
class Sink:
    """Base class of the built-in sinks: ``write`` gets every step's summary, ``flush`` once per probe
    flush, ``close`` at ``probe.close()``."""

    def write(self, summary: Summary) -> None:  # pragma: no cover - interface
        """Send one step's scalars and profiles."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make what was written visible (called after every probe flush)."""

    def close(self) -> None:
        """Release what the sink opened."""


class CallableSink(Sink):
    """``fn(step, scalars)`` as a sink (scalars only)."""

    def __init__(self, fn: Callable[[int, dict[str, float]], Any]):
        self.fn = fn

    def write(self, summary: Summary) -> None:
        """Call ``fn(step, scalars)``."""
        self.fn(summary.step, dict(summary.scalars))

    def __repr__(self) -> str:
        return f"CallableSink({getattr(self.fn, '__qualname__', self.fn)!r})"


class TensorBoard(Sink):
    """A live ``torch.utils.tensorboard.SummaryWriter`` on ``logdir``: scalars by their keys, profiles
    as histograms whose bucket l holds the value at layer l (as ``lnprobe.export``). Event files are
    flushed at every probe flush, so TensorBoard shows the run while it trains."""

    def __init__(self, logdir: str | Path, writer: Any = None):
        if writer is None:
            from .export import _summary_writer

            writer = _summary_writer(Path(logdir))
        self.logdir, self.writer = Path(logdir), writer

    def write(self, summary: Summary) -> None:
        """Scalars as ``add_scalar``, profiles as raw histograms."""
        from .export import _add_profile

        for k, v in summary.scalars.items():
            self.writer.add_scalar(k, v, summary.step)
        for tag, (layers, values) in summary.profiles.items():
            _add_profile(self.writer, tag, layers, values, summary.step)

    def flush(self) -> None:
        """Write the event file to disk."""
        self.writer.flush()

    def close(self) -> None:
        """Close the SummaryWriter."""
        self.writer.close()


class WandB(Sink):
    """A Weights & Biases run (``wandb.init(...)``; offline mode works). Scalars are logged against
    their own step metric ``lnprobe/step`` (``define_metric``), so they never clash with the steps of
    other ``run.log`` calls; profiles as ``wandb.Histogram`` (bucket l = layer l). The run is finished
    at close only when ``finish=True``."""

    def __init__(self, run: Any = None, finish: bool = False, profiles: bool = True):
        import wandb

        self.wandb = wandb
        self.run = run if run is not None else wandb.run
        if self.run is None:
            raise ValueError("lnprobe.sinks.WandB: no run; pass the run of wandb.init(...) or call wandb.init first")
        self.finish, self.profiles = finish, profiles
        self.run.define_metric(PREFIX + "step")
        self.run.define_metric(PREFIX + "*", step_metric=PREFIX + "step")

    def write(self, summary: Summary) -> None:
        """One ``run.log`` per step."""
        data: dict[str, Any] = {PREFIX + "step": summary.step, **summary.scalars}
        if self.profiles:
            for tag, (layers, values) in summary.profiles.items():
                ok = np.isfinite(values) & (values >= 0)
                if ok.any():
                    edges = np.append(layers - 0.5, layers[-1] + 0.5).astype(np.float64)
                    data[tag] = self.wandb.Histogram(np_histogram=(np.where(ok, values, 0.0), edges))
        self.run.log(data)

    def close(self) -> None:
        """Finish the run if this sink was asked to."""
        if self.finish:
            self.run.finish()


class MLflow(Sink):
    """An MLflow run: scalars as metrics at their step; profiles as metrics
    ``lnprobe/profile/<site>/<stat>/layer_LL`` (one per layer, grouped by site and statistic) unless
    ``profiles=False``.

    ``run_id``: log into that run; else the active run; else a new run (``experiment``,
    ``run_name``), ended at close. ``tracking_uri`` (e.g. ``"file:./mlruns"``) sets where the client
    writes.
    """

    def __init__(self, run_id: str | None = None, *, tracking_uri: str | None = None, experiment: str | None = None,
                 run_name: str | None = None, profiles: bool = True):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._own = False
        if run_id is None:
            active = mlflow.active_run()
            if active is not None and tracking_uri is None:
                run_id = active.info.run_id
            else:
                exp_id = "0"
                if experiment is not None:
                    e = self.client.get_experiment_by_name(experiment)
                    exp_id = e.experiment_id if e is not None else self.client.create_experiment(experiment)
                run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
                self._own = True
        self.run_id, self.profiles = run_id, profiles

    def write(self, summary: Summary) -> None:
        """One ``log_batch`` per step."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = [Metric(k, float(v), ts, summary.step) for k, v in summary.scalars.items()]
        if self.profiles:
            for tag, (layers, values) in summary.profiles.items():
                metrics += [Metric(f"{tag}/layer_{int(l):02d}", float(v), ts, summary.step)
                            for l, v in zip(layers, values)]
        for i in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[i: i + 1000])

    def close(self) -> None:
        """End the run if this sink created it."""
        if self._own:
            self.client.set_terminated(self.run_id)


# ----------------------------------------------------------------------------- the probe's side
class SinkSet:
    """The probe's sinks: sends summaries, disables a sink that raises (warning and note)."""

    def __init__(self, sinks: Iterable[Any] | Any | None, notes: list[str]):
        if sinks is None:
            sinks = []
        elif isinstance(sinks, Sink) or callable(sinks) and not isinstance(sinks, (list, tuple)):
            sinks = [sinks]
        self.sinks: list[Sink] = []
        for s in sinks:
            if isinstance(s, Sink):
                self.sinks.append(s)
            elif callable(s):
                self.sinks.append(CallableSink(s))
            else:
                raise TypeError(f"lnprobe: a sink must be a callable sink(step, scalars) or an lnprobe.sinks.Sink; "
                                f"found {type(s).__name__}")
        self.notes = notes
        self.last: Summary | None = None

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def send(self, frame: pd.DataFrame) -> list[Summary]:
        """Summarise one flush's records and send every step to every live sink."""
        if not self.sinks:
            return []
        summaries = summarize(frame)
        for sink in list(self.sinks):
            try:
                for s in summaries:
                    sink.write(s)
                sink.flush()
            except Exception as exc:  # a sink never stops training
                self._disable(sink, exc)
        if summaries:
            self.last = summaries[-1]
        return summaries

    def close(self) -> None:
        """Close every sink (errors become warnings)."""
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                self._warn(sink, exc, "close")
        self.sinks.clear()

    def _disable(self, sink: Sink, exc: Exception) -> None:
        self.sinks.remove(sink)
        self._warn(sink, exc, "disabled")
        try:
            sink.close()
        except Exception:
            pass

    def _warn(self, sink: Sink, exc: Exception, what: str) -> None:
        msg = f"lnprobe: sink {sink!r} {what} after {type(exc).__name__}: {exc}; training continues"
        self.notes.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
