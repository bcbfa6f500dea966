"""The verdict record and its decision rules (analysis.verdicts builds the records).

A :class:`Verdict` has ``id`` (stable, e.g. ``peri.init_law``), ``claim`` (one sentence), ``tag``
(``paper``: stated by the Peri-LN paper; ``derived``: a law derived in docs/theory.md and checked by
simulation; ``related``: a neighbouring paper; ``instrument``: holds by construction, so it checks
the probe and the analysis, not the physics), ``measured``, ``predicted``, ``tolerance`` (numbers),
``rule`` (how the three are compared, below), ``status`` (pass / fail / n/a), ``n_runs`` (runs that
contributed a value), ``ci`` (95 % t-interval of the mean over runs, [low, high]; None for one run),
``predicted_range`` (interval rules), ``group``, ``runs``, ``unit``, ``note`` and ``detail`` (extra
numbers). ``verdicts.json`` holds these records; analysis.render turns them into tables.

Rules (h = half-width of ``ci``, 0 for one run):
    rel     |measured − predicted| ≤ tolerance·|predicted| + h
    in      low·(1 − tolerance) − h ≤ measured ≤ high·(1 + tolerance) + h, [low, high] = predicted_range
    le      measured ≤ predicted·(1 + tolerance)                        (bounds: worst run)
    ge      measured ≥ predicted − tolerance
    gt      measured > predicted + tolerance
    lt      measured < predicted − tolerance
    factor  |log10(measured / predicted)| ≤ log10(tolerance)          (orders of magnitude)
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from scipy import stats

PASS, FAIL, NA = "pass", "fail", "n/a"
TAGS = ("paper", "derived", "related", "instrument")
SCHEMA_VERSION = 1


@dataclass
class Verdict:
    """One checked claim: the numbers, the rule that decided it and its status (see the module docstring)."""

    id: str
    claim: str
    tag: str
    measured: float | None
    predicted: float | None
    tolerance: float | None
    status: str
    n_runs: int
    ci: list[float] | None = None
    rule: str = ""
    predicted_range: list[float] | None = None
    group: str = ""
    runs: list[str] = field(default_factory=list)
    unit: str = ""
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; NaN and infinities become None."""
        return _clean(asdict(self))


def _clean(x: Any) -> Any:
    """JSON-safe: numpy scalars to Python numbers, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    return x


# ---------------------------------------------------------------------------------------------
# statistics and the decision rule
# ---------------------------------------------------------------------------------------------
def t_interval(values: Iterable[float], level: float = 0.95) -> tuple[float, list[float] | None]:
    """Mean and two-sided t-interval of the mean ([low, high]; None for fewer than 2 values)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return float("nan"), None
    m = float(v.mean())
    if len(v) < 2:
        return m, None
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, [m - half, m + half]


def decide(rule: str, measured: float | None, predicted: float | None, tolerance: float,
           ci: list[float] | None = None, predicted_range: list[float] | None = None) -> str:
    """Status of a comparison under ``rule`` (module docstring); n/a when a number is missing."""
    if measured is None or not np.isfinite(measured):
        return NA
    h = 0.5 * (ci[1] - ci[0]) if ci else 0.0
    m, tol = float(measured), float(tolerance or 0.0)
    if rule == "in":
        if not predicted_range:
            return NA
        lo, hi = predicted_range
        return PASS if lo * (1 - tol) - h <= m <= hi * (1 + tol) + h else FAIL
    if predicted is None or not np.isfinite(predicted):
        return NA
    p = float(predicted)
    ok = {"rel": lambda: abs(m - p) <= tol * abs(p) + h,
          "le": lambda: m <= p * (1 + tol),
          "ge": lambda: m >= p - tol,
          "gt": lambda: m > p + tol,
          "lt": lambda: m < p - tol,
          "factor": lambda: m > 0 and p > 0 and abs(math.log10(m / p)) <= math.log10(tol)}
    if rule not in ok:
        raise ValueError(f"unknown verdict rule {rule!r}: expected one of {sorted(ok) + ['in']}")
    return PASS if ok[rule]() else FAIL


def make(id: str, claim: str, tag: str, rule: str, tolerance: float, values: list[tuple[str, float, float | None]],
         *, group: str = "", unit: str = "", note: str = "", why_na: str = "", aggregate: str = "mean",
         predicted_range: list[float] | None = None, detail: dict | None = None) -> Verdict:
    """A verdict from per-run (run name, measured, predicted) values: mean and t-interval over runs
    (``aggregate="max"``: the worst run, no interval — for bounds). No values: n/a with ``why_na``."""
    values = [(n, m, p) for n, m, p in values if m is not None and np.isfinite(m)]
    if not values:
        return Verdict(id, claim, tag, None, None, tolerance, NA, 0, rule=rule, group=group, unit=unit,
                       note=why_na or note, predicted_range=predicted_range, detail=detail or {})
    ms = [m for _, m, _ in values]
    ps = [p for _, _, p in values if p is not None and np.isfinite(p)]
    if aggregate == "max":
        measured, ci = float(np.max(ms)), None
    else:
        measured, ci = t_interval(ms)
    predicted = float(np.mean(ps)) if ps else None
    status = decide(rule, measured, predicted, tolerance, ci, predicted_range)
    return Verdict(id, claim, tag, measured, predicted, tolerance, status, len(values), ci, rule, predicted_range,
                   group, [n for n, _, _ in values], unit, note, detail or {})



def verdicts_frame(verdicts: list[Verdict]) -> pd.DataFrame:
    """The records as a DataFrame (one row per verdict, columns of :class:`Verdict`)."""
    return pd.DataFrame([v.to_dict() for v in verdicts], columns=list(Verdict.__dataclass_fields__))


def write_json(verdicts: list[Verdict], path: str | Path, runs: list | None = None) -> Path:
    """Write ``verdicts.json``: {"schema", "runs": [{name, placement, path}], "verdicts": [records]}."""
    path = Path(path)
    doc = {"schema": SCHEMA_VERSION,
           "runs": [{"name": r.name, "placement": r.placement, "path": str(r.path)} for r in runs or []],
           "verdicts": [v.to_dict() for v in verdicts]}
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False), encoding="utf-8")
    return path


def read_json(path: str | Path) -> list[dict[str, Any]]:
    """The verdict records of a ``verdicts.json``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))["verdicts"]
