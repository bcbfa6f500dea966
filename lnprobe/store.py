"""Run directory: ``meta.json`` plus Parquet record parts, appended atomically; ``load_run``.

Layout (design page section 5)::

    RUN/meta.json                  placement, sizes, sites, param roles, config, versions, status
    RUN/records/part-000000.parquet  long-format records, one file per flush

Every file is written to a temporary name in the same directory and renamed into place, so a crash
leaves either the whole part or nothing; a reader never sees half a file under a final name. A part
that is unreadable anyway (disk full, copied half-way) is reported by name and skipped by ``load_run``.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa  # imported with the writer, so the first flush of a run does not pay for it
import pyarrow.parquet as pq

RECORD_COLUMNS = ("step", "site", "layer", "stat", "value", "token", "channel")
_PART_RE = re.compile(r"^part-(\d+)\.parquet$")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_meta(run_dir: str | Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` atomically (sorted keys, JSON-safe values)."""
    path = Path(run_dir) / "meta.json"
    _atomic_write_bytes(path, json.dumps(meta, indent=2, sort_keys=True, default=str).encode())


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{run_dir} is not an lnprobe run directory: expected {path}; "
            "pass the directory given to lnprobe.attach(...) or `lnprobe train --out`"
        )
    return json.loads(path.read_text())


def records_frame(
    step: np.ndarray, site: np.ndarray, layer: np.ndarray, stat: np.ndarray,
    value: np.ndarray, token: np.ndarray, channel: np.ndarray,
) -> pd.DataFrame:
    """Build a records DataFrame with the schema's dtypes; NaN token/channel become <NA>."""
    return pd.DataFrame({
        "step": np.asarray(step, dtype=np.int64),
        "site": pd.array(site, dtype=object),
        "layer": np.asarray(layer, dtype=np.int64),
        "stat": pd.array(stat, dtype=object),
        "value": np.asarray(value, dtype=np.float64),
        "token": _nullable_int(token),
        "channel": _nullable_int(channel),
    })


def _nullable_int(values: np.ndarray) -> pd.arrays.IntegerArray:
    """float array with NaN for missing -> pandas Int64 with <NA>."""
    values = np.asarray(values, dtype=np.float64)
    missing = np.isnan(values)
    return pd.arrays.IntegerArray(np.where(missing, 0, values).astype(np.int64), missing)


class RunWriter:
    """Owns one run directory: writes meta.json and numbered record parts."""

    def __init__(self, run_dir: str | Path, meta: dict[str, Any], overwrite: bool = True):
        self.path = Path(run_dir)
        self.records_dir = self.path / "records"
        self.records_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.records_dir.glob("part-*.parquet"))
        if existing and overwrite:
            for p in existing:
                p.unlink()
            existing = []
        # Appending (resume): continue the numbering after the last part on disk.
        self._next = 1 + max((int(_PART_RE.match(p.name).group(1)) for p in existing
                              if _PART_RE.match(p.name)), default=-1)
        self.meta = dict(meta)
        write_meta(self.path, self.meta)

    def update_meta(self, **fields: Any) -> None:
        self.meta.update(fields)
        write_meta(self.path, self.meta)

    def append(self, frame: pd.DataFrame) -> Path | None:
        """Write one part atomically; returns its path (None for an empty frame)."""
        if frame.empty:
            return None
        path = self.records_dir / f"part-{self._next:06d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        # nthreads=1: for large frames pyarrow otherwise converts columns on a Python thread pool,
        # which refuses work during interpreter shutdown, where the atexit flush of an unclosed
        # probe runs; the buffered steps would be lost.
        table = pa.Table.from_pandas(frame[list(RECORD_COLUMNS)], preserve_index=False, nthreads=1)
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._next += 1
        return path


@dataclass
class Run:
    """A loaded run directory: ``records`` (long-format DataFrame) and ``meta`` (dict)."""

    path: Path
    meta: dict[str, Any]
    records: pd.DataFrame
    skipped_parts: list[str]

    @property
    def name(self) -> str:
        return str(self.meta.get("run_name") or self.path.name)

    def stat(self, site: str, stat: str) -> pd.DataFrame:
        """Rows of one (site, stat) as a step × layer table of values."""
        r = self.records
        sel = r[(r["site"] == site) & (r["stat"] == stat)]
        return sel.pivot_table(index="step", columns="layer", values="value", aggfunc="first")


def read_records(run_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Concatenate every readable part; return (records, names of skipped parts)."""
    records_dir = Path(run_dir) / "records"
    parts = sorted(p for p in records_dir.glob("part-*.parquet")) if records_dir.exists() else []
    frames, skipped = [], []
    for p in parts:
        try:
            frames.append(pd.read_parquet(p))
        except Exception as exc:  # corrupt or half-copied part: report and keep the rest
            warnings.warn(f"skipping unreadable record part {p}: {type(exc).__name__}: {exc}", stacklevel=2)
            skipped.append(str(p))
    if not frames:
        empty = records_frame(*(np.array([]) for _ in range(7)))
        return empty, skipped
    records = pd.concat(frames, ignore_index=True)
    return records, skipped


def load_run(run_dir: str | Path) -> Run:
    """Load a run directory written by lnprobe (works without torch)."""
    meta = read_meta(run_dir)
    records, skipped = read_records(run_dir)
    return Run(Path(run_dir), meta, records, skipped)


def trim(run_dir: str | Path, from_step: int) -> int:
    """Drop the records of steps ≥ ``from_step``; return the number of rows removed.

    For a run resumed from a checkpoint of step ``from_step``: an interrupted run may have flushed
    records past its last checkpoint, which the resumed run writes again. Each affected part is
    rewritten atomically (a temporary file, then a rename) or deleted when no row of it remains.
    """
    dropped = 0
    for part in sorted((Path(run_dir) / "records").glob("part-*.parquet")):
        frame = pd.read_parquet(part)
        keep = frame["step"] < from_step
        if keep.all():
            continue
        dropped += int((~keep).sum())
        if not keep.any():
            part.unlink()
            continue
        tmp = part.with_name(f".{part.name}.tmp-{os.getpid()}")
        frame[keep].to_parquet(tmp, index=False)
        os.replace(tmp, part)
    return dropped
