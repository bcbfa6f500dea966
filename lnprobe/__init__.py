"""lnprobe: see inside Transformer training — per-layer variance, massive activations, gradient flow.

    probe = lnprobe.attach(model, "runs/pre", every=10)
    ...  # loss.backward(); probe.step(loss=loss); opt.step()
    probe.close()
    run = lnprobe.load_run("runs/pre")
"""
from __future__ import annotations

from typing import Any

from .probe import ALL_SITES, Probe, attach
from .schedule import Schedule
from .store import Run, load_run

__all__ = ["attach", "load_run", "inspect", "Probe", "Run", "Schedule", "ALL_SITES"]
__version__ = "0.1.0"


def inspect(model: Any, example_input: Any = None, *, blocks: str | None = None, placement: str | None = None):
    """Map a model without attaching: blocks, norms with roles, detected placement, sites.

    Returns a ``ModelMap``; ``print(lnprobe.inspect(model))`` shows it as a table.
    """
    from .discovery import discover, unwrap

    return discover(unwrap(model), example_input, blocks=blocks, placement=placement)
