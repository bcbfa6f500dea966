"""lnprobe.analysis: run directories -> theory predictions, fits, verdicts, figures, reports.

Never imports torch (design page section 1): runs recorded on a GPU machine are analysed with
numpy / pandas / scipy / matplotlib anywhere. Installed as ``lnprobe.analysis`` (the folder
``analysis/`` at the repository top); ``lnprobe.store`` owns the run-directory format and the one
``Run`` type. Modules: ``io`` (load a run directory: ``lnprobe.load_run``), ``theory``
(theory.md predictions), ``fits`` (growth classification, attribution), ``massive`` (massive
activations, FP16 margin, spike score), ``plots`` (figures), ``plots_cross`` (figures across runs and
sweeps), ``verdicts`` (prediction checks),
``compare`` (measured-vs-predicted frames), ``verdict_schema`` (the verdict record and verdicts.json),
``render`` (Markdown and HTML tables), ``report`` (report.md / report.html), ``stability`` (spike scores,
bursts, first non-finite site for the report). ``plots``, ``verdicts``,
``render`` and ``report`` load on first use so
that ``import lnprobe.analysis`` does not pull in matplotlib.
"""
from __future__ import annotations

import importlib
from typing import Any

from . import fits, io, massive, theory
from .fits import GrowthFit, attribution, classify_growth, growth_over_steps
from .io import Run, load
from .massive import fp16_margin, massive_candidates, spike_score, track_massive
from .theory import predict_init_profile

__all__ = [
    "Run", "load", "GrowthFit", "classify_growth", "attribution", "growth_over_steps",
    "massive_candidates", "track_massive", "fp16_margin", "spike_score", "predict_init_profile",
    "build_report", "run_report", "fits", "io", "massive", "theory", "plots", "verdicts", "report",
    "compare", "render", "verdict_schema", "plots_cross", "stability",
]

_LAZY_MODULES = ("compare", "plots", "plots_cross", "verdicts", "verdict_schema", "render", "report", "stability")


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in ("build_report", "run_report", "ReportResult"):
        return getattr(importlib.import_module(".report", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
