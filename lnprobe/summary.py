"""The three-line run summary that ``lnprobe train`` and ``lnprobe demo`` print (no torch).

Read back from the run directory with ``store.load_run``, the reader the report uses, so the summary
and the report agree on a resumed run's steps.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["summarize_run"]


def _fmt(v: float | None, spec: str = ".4g") -> str:
    return "n/a" if v is None else format(v, spec)  # NaN/Inf print as such (a diverged run)


def summarize_run(run_dir: str | Path) -> list[str]:
    """Three lines read back from a run directory with ``store.load_run`` (the report's reader).

    1. final training loss (last recorded step) and final validation loss, and the run's status;
    2. per-token variance of the residual stream leaving the last block (site ``resid``, layer L)
       at the last recorded step of ``resid``;
    3. max |x| over the residual stream (all layers) at that step, with its layer, token and channel.
    """
    from .store import load_run as load

    run = load(run_dir)
    loss, val = run.series("loss"), run.series("val_loss")
    if len(loss):
        line1 = f"final loss {_fmt(float(loss.iloc[-1]))} at step {int(loss.index[-1])}"
    else:
        line1 = "final loss n/a (no step recorded)"
    if len(val):
        line1 += f", val loss {_fmt(float(val.iloc[-1]))} at step {int(val.index[-1])}"
    line1 += f" [{run.meta.get('status', '?')}]"
    resid = {stat: run.frame("resid", stat) for stat in ("m2", "var", "absmax")}
    recorded = [f for f in resid.values() if len(f)]
    if not recorded:
        return [line1, "last-layer resid variance n/a (site resid not recorded)", "max |x| n/a"]
    last = max(int(f["step"].max()) for f in recorded)
    top = max(int(f.loc[f["step"] == last, "layer"].max()) for f in recorded if (f["step"] == last).any())
    var = resid["var"][(resid["var"]["step"] == last) & (resid["var"]["layer"] == top)]["value"]
    line2 = f"last-layer resid variance {_fmt(float(var.iloc[0]) if len(var) else None)} (layer {top}, step {last})"
    absmax = resid["absmax"][resid["absmax"]["step"] == last]
    if len(absmax):
        row = absmax.loc[absmax["value"].idxmax()]
        # a row of mixed dtypes comes back as floats: the location is printed as the integer it is
        token, channel = (("n/a" if row[k] != row[k] else int(row[k])) for k in ("token", "channel"))
        line3 = (f"max |x| {_fmt(float(row['value']))} (resid layer {int(row['layer'])}, token {token}, "
                 f"channel {channel}, step {last})")
    else:
        line3 = "max |x| n/a (absmax not recorded)"
    return [line1, line2, line3]
