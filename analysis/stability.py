"""Training-instability signals of one run for the report (docs/theory.md §5): the loss and gradient
spike scores, the spike-triggered bursts and the first non-finite activation.

- spike scores: ``analysis.massive.spike_score`` (≥ 7σ above the mean of the previous 1000 values, no
  verdict before 10) over the ``train`` rows ``loss`` and ``grad_norm`` (the global gradient norm before
  clipping). Runs recorded with per-step train scalars (meta.json ``step_scalars``, the default) have
  them at every optimizer step; older runs only at recorded steps, which the report says, since the
  window is then counted in recorded steps;
- bursts: meta.json ``bursts`` (``lnprobe.burst``): trigger step, signals, the steps recorded, the
  run-up history;
- first non-finite: meta.json ``first_nonfinite`` (step, site, layer, count), set by the probe.

No torch: reads a loaded run only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import massive
from .io import Run


@dataclass
class Stability:
    """The signals of one run. ``loss``/``grad``: spike results (None without such rows); ``every_step``:
    the train rows cover every step from the first to the last; ``bursts`` and ``first_nonfinite`` as
    in meta.json."""

    name: str
    loss: massive.SpikeResult | None
    grad: massive.SpikeResult | None
    n_steps: int
    every_step: bool
    bursts: list[dict] = field(default_factory=list)
    first_nonfinite: dict | None = None


def stability(run: Run) -> Stability:
    """The instability signals of ``run`` (module docstring)."""
    series = {s: run.series(s) for s in ("loss", "grad_norm")}
    steps = np.unique(np.concatenate([v.index.to_numpy() for v in series.values()] + [np.zeros(0, dtype=np.int64)]))
    every = bool(len(steps)) and int(steps[-1] - steps[0] + 1) == len(steps)
    res = {s: massive.spike_score(v) if len(v) else None for s, v in series.items()}
    bursts = run.meta.get("bursts")
    first = run.meta.get("first_nonfinite")
    return Stability(run.name, res["loss"], res["grad_norm"], len(steps), every,
                     [b for b in bursts if isinstance(b, dict)] if isinstance(bursts, list) else [],
                     first if isinstance(first, dict) else None)


def _score(what: str, sp: massive.SpikeResult | None) -> str:
    if sp is None:
        return f"{what}: not recorded"
    if not sp.n_evaluated:
        return f"{what}: too few steps for a spike score (fewer than 11 finite values)"
    at = ", ".join(str(s) for s in sp.spikes[:8]) + (" …" if len(sp.spikes) > 8 else "")
    text = (f"{what} spike score {sp.score:.3g} ({len(sp.spikes)} spike(s) in {sp.n_evaluated} evaluated steps"
            + (f", at step {at}" if sp.spikes else "") + ")")
    return text + (f", {sp.n_nonfinite} non-finite value(s) left out" if sp.n_nonfinite else "")


def _burst(b: dict) -> str:
    hist = b.get("history") or []
    run_up = f"; run-up steps {hist[0]}–{hist[-1]} written" if hist else ""
    ext = f"; extended {b['extended']} time(s)" if b.get("extended") else ""
    return (f"steps {b.get('first_step')}–{b.get('last_step')} after step {b.get('trigger_step')} "
            f"({b.get('reason', '?')}){run_up}{ext}")


def summary_line(st: Stability) -> str:
    """One paragraph in words with the numbers, headed by the run's name in bold."""
    parts = [f"**{st.name}**: " + _score("gradient-norm", st.grad), _score("loss", st.loss)]
    if st.n_steps and not st.every_step:
        parts.append(f"train rows at {st.n_steps} steps only (recorded before per-step scalars: the spike "
                     "window counts recorded steps, not optimizer steps)")
    if st.bursts:
        parts.append(f"{len(st.bursts)} burst(s): " + "; ".join(_burst(b) for b in st.bursts))
    else:
        parts.append("no bursts")
    f = st.first_nonfinite
    if f:
        parts.append(f"first non-finite activation at step {f.get('step')}: site {f.get('site')}, layer "
                     f"{f.get('layer')} ({f.get('count')} NaN/Inf)")
    else:
        parts.append("no non-finite activation recorded")
    return "; ".join(parts) + "."
