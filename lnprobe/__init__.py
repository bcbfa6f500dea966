"""lnprobe: see inside Transformer training — per-layer variance, massive activations, gradient flow.

    probe = lnprobe.attach(model, "runs/pre", every=10)
    ...  # loss.backward(); probe.step(loss=loss); opt.step()
    probe.close()
    run = lnprobe.load_run("runs/pre")
    runs = lnprobe.open("runs/*")        # many runs as one lazy relation (lnprobe.query)

Every name is imported on first use (PEP 562): ``import lnprobe`` imports neither torch nor pandas,
and ``lnprobe.load_run`` / ``lnprobe.analysis`` work on a machine without torch. ``attach``,
``Probe`` (``lnprobe.probe``), ``ALL_SITES`` (``lnprobe.sites``) and ``inspect`` need torch; ``Schedule`` does not.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["attach", "load_run", "open", "inspect", "Probe", "Run", "Schedule", "Burst", "ALL_SITES",
           "RunExistsError",
           "RunLockedError", "RunDirectoryError"]
__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY_NAMES = {
    "attach": "probe", "Probe": "probe", "ALL_SITES": "sites",
    "Schedule": "schedule", "Burst": "burst",
    "Run": "store", "load_run": "store", "open": "query",
    "RunExistsError": "rundir", "RunLockedError": "rundir", "RunDirectoryError": "validate",
}
# submodules reachable as attributes right after ``import lnprobe`` (lnprobe.integrations.hf, ...)
_SUBMODULES = ("analysis", "burst", "checkpoint", "cli", "compaction", "constants", "data", "discovery", "distributed",
               "export", "integrations", "launch", "models", "testing",
               "attnlogits", "probe", "query", "rundir", "scan", "scan_inputs", "schedule", "sinks", "sites", "stats",
               "stepscalars", "store", "train", "updates", "summary", "validate")

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time these load on first use
    from . import analysis, integrations  # noqa: F401
    from .burst import Burst  # noqa: F401
    from .probe import Probe, attach  # noqa: F401
    from .query import open  # noqa: F401
    from .rundir import RunExistsError, RunLockedError  # noqa: F401
    from .schedule import Schedule  # noqa: F401
    from .sites import ALL_SITES  # noqa: F401
    from .store import Run, load_run  # noqa: F401
    from .validate import RunDirectoryError  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


def inspect(model: Any, example_input: Any = None, *, blocks: str | None = None, placement: str | None = None):
    """Map a model without attaching: blocks, norms with roles, detected placement, sites.

    Returns a ``ModelMap``; ``print(lnprobe.inspect(model))`` shows it as a table.
    """
    from .discovery import discover, unwrap

    return discover(unwrap(model), example_input, blocks=blocks, placement=placement)
