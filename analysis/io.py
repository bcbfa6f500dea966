"""Run directories for the analysis layer: the one reader of ``lnprobe.store`` (no torch).

A run directory (design page section 5) is ``RUN/meta.json`` plus ``RUN/records/part-*.parquet``
in long format: one row per (step, site, layer, stat) with ``value`` (float64) and the nullable
``token``/``channel`` of located statistics. The schema, the writer, the reader and the
:class:`Run` type live in :mod:`lnprobe.store`; ``load`` is ``lnprobe.load_run`` and ``Run`` is
``lnprobe.Run``, whose accessors (``frame``, ``pivot``, ``series``, ``params``, ``role_table``,
``select``, ...) read one (site, stat) at a time from the Parquet files with the filters pushed down
(``lnprobe.query``), so the analysis never holds a whole run and never loops over rows.
"""
from __future__ import annotations

from ..constants import FP16_MAX
from ..store import (
                     PARAM_PREFIX,
                     RECORD_COLUMNS,
                     RECORD_SCHEMA,
                     SUBLAYER_ROLES,
                     Run,
                     guess_role,
                     load_run,
                     model_config,
                     train_config,
)

load = load_run

__all__ = ["Run", "load", "load_run", "guess_role", "model_config", "train_config", "FP16_MAX", "PARAM_PREFIX",
           "RECORD_COLUMNS", "RECORD_SCHEMA", "SUBLAYER_ROLES"]
