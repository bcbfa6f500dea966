"""Which files hold a run's records, and their compaction (design page section 5).

A live run writes ``records/part-N.parquet``, one per flush. Compaction rewrites them into one sorted,
zstd-compressed file per generation, ``records/gen-G/c-000.parquet``, and the atomically replaced
``records/manifest.json`` says which compacted files hold the run's records and which parts they
replace. :func:`record_files` is the one place that turns that layout into a reading order; every
reader (``lnprobe.store``, ``lnprobe.query``) goes through it. No torch.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from .validate import RunDirectoryError, load_manifest, part_problem

__all__ = ["MANIFEST_NAME", "read_manifest", "record_files", "compact", "compact_quietly"]

_PART_RE = re.compile(r"^part-(\d+)\.parquet$")
#: ``records/manifest.json``: which compacted files hold the run's records and which parts they replace.
MANIFEST_NAME = "manifest.json"
_GEN_RE = re.compile(r"^gen-(\d+)$")


def _part_number(name: str) -> int | None:
    m = _PART_RE.match(name)
    return int(m.group(1)) if m else None


def read_manifest(run_dir: str | Path) -> dict[str, Any] | None:
    """``records/manifest.json`` of a compacted run (checked), or None for a run never compacted."""
    return load_manifest(Path(run_dir) / "records" / MANIFEST_NAME)


def record_files(run_dir: str | Path, *, warn: bool = True) -> tuple[list[Path], list[tuple[str, str]]]:
    """The record files of a run in reading order, and the skipped ones as (path, why).

    Reading order: the compacted files the manifest names (already one row per key), then every
    ``part-N.parquet`` the manifest does not list, by part number (so a later duplicate comes later).
    Files in ``gen-*`` folders that the manifest does not name are the output of a compaction that did
    not finish and are never read; parts the manifest lists are already in its compacted files (a
    compaction stopped before it deleted them) and are never read twice. A missing compacted file or a
    part that breaks the part schema is skipped with a ``UserWarning`` naming it."""
    records_dir = Path(run_dir) / "records"
    manifest = load_manifest(records_dir / MANIFEST_NAME) if records_dir.is_dir() else None
    covered = set(manifest["parts"]) if manifest else set()
    compacted = [records_dir / f for f in manifest["files"]] if manifest else []
    parts = sorted((p for p in records_dir.glob("part-*.parquet") if p.name not in covered
                    and _part_number(p.name) is not None), key=lambda p: _part_number(p.name)) \
        if records_dir.is_dir() else []
    if not parts and not compacted and (Path(run_dir) / "records.parquet").exists():
        parts = [Path(run_dir) / "records.parquet"]
    files, skipped = [], []
    for p in compacted + parts:
        problem = "missing (listed in the compaction manifest)" if not p.exists() else part_problem(p)
        if problem is not None:  # damaged or foreign part: report it by name and keep the rest
            if warn:
                warnings.warn(f"skipping record part {p}: {problem}", stacklevel=3)
            skipped.append((str(p), problem))
        else:
            files.append(p)
    return files, skipped


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The three operations of a compaction that change the run directory; a test replaces them one at a
# time with a simulated kill (tests/test_store.py) to show that no point of the sequence loses a record.
def _write_compacted(files: list[Path], out: Path, drop_from_step: int | None) -> int:
    from .query import write_compacted

    return write_compacted(files, out, drop_from_step=drop_from_step)


def _replace(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def compact(run_dir: str | Path, *, drop_from_step: int | None = None) -> dict[str, Any] | None:
    """Rewrite the run's records into one compacted file sorted by (site, stat, layer, step), zstd,
    dictionary-encoded site and stat; return the new manifest (None when there was nothing to do).

    Reads the current compacted files and every readable part after them (damaged parts are left where
    they are, unlisted, and reported by the reader as before), keeps one row per (step, site, layer,
    stat) — the last written, the one every reader returns — and, for ``drop_from_step=k``, only steps
    < k. The sequence makes a kill at any point harmless: (1) the new file is written into a fresh
    ``records/gen-G/`` and synced (a reader ignores folders the manifest does not name); (2) the new
    ``manifest.json`` naming it and every part it holds is written to a temporary name, synced and
    renamed into place — the one atomic switch; (3) only then are the old generation and the listed
    parts deleted (a reader skips listed parts, so a kill half-way through deleting reads each record
    once). Leftovers of an earlier, interrupted compaction are removed at (3). The caller holds the
    run's writer lock (``RunWriter.close``, the resume path) or knows that no writer is live.
    """
    records_dir = Path(run_dir) / "records"
    if not records_dir.is_dir():
        return None
    old = load_manifest(records_dir / MANIFEST_NAME)
    files, skipped = record_files(run_dir, warn=False)
    damaged = [p for p, _ in skipped if Path(p).parent != records_dir]
    if damaged:  # a compacted file is missing or unreadable: rewriting would delete what is left of it
        raise RunDirectoryError(f"{damaged[0]}: a compacted file of this run is missing or unreadable; not "
                                "compacting (the parts stay as they are); restore it from a copy of the run")
    skipped_names = {Path(p).name for p, _ in skipped}
    new_parts = [p for p in files if p.parent == records_dir and _part_number(p.name) is not None]
    if not files or (old is not None and not new_parts and drop_from_step is None):
        if old is not None:  # nothing new; finish the clean-up of a compaction killed after its switch
            _remove_superseded(records_dir, old)
        return None
    gens = [int(m.group(1)) for d in records_dir.iterdir() if (m := _GEN_RE.match(d.name))]
    generation = max([old["generation"] if old else 0, *gens]) + 1
    gen_dir = records_dir / f"gen-{generation:06d}"
    gen_dir.mkdir()
    out = gen_dir / "c-000.parquet"
    rows = _write_compacted(files, out, drop_from_step)                                    # (1)
    _fsync_path(out)
    _fsync_path(gen_dir)
    covered = sorted({*(old["parts"] if old else ()), *(p.name for p in new_parts)} - skipped_names,
                     key=_part_number)
    manifest = {"format": 1, "generation": generation, "files": [f"{gen_dir.name}/{out.name}"], "parts": covered,
                "rows": rows, "compacted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = records_dir / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    _replace(tmp, records_dir / MANIFEST_NAME)                                                   # (2)
    _fsync_path(records_dir)
    _remove_superseded(records_dir, manifest)                                                    # (3)
    return manifest


def _remove_superseded(records_dir: Path, manifest: dict[str, Any]) -> None:
    """Delete what ``manifest`` makes unreachable: parts it lists, generations it does not name, and
    temporary files of interrupted writes."""
    keep = {f.split("/")[0] for f in manifest["files"]}
    listed = set(manifest["parts"])
    for p in sorted(records_dir.iterdir()):
        if (p.name in listed or (_GEN_RE.match(p.name) and p.name not in keep)
                or (p.name.startswith(".") and ".tmp-" in p.name)):
            _remove(p)


def compact_quietly(run_dir: str | Path, *, drop_from_step: int | None = None) -> dict[str, Any] | None:
    """:func:`compact`, turning a failure into a warning: the live parts stay as they were and every
    reader reads them, so a failed compaction never costs a record or stops a training run."""
    try:
        return compact(run_dir, drop_from_step=drop_from_step)
    except Exception as exc:  # disk full, an unreadable file, an engine error: keep the parts
        warnings.warn(f"{run_dir}: compaction of the record parts failed ({type(exc).__name__}: "
                      f"{' '.join(str(exc).split())[:300]}); the parts are kept and read as they are", RuntimeWarning,
                      stacklevel=2)
        return None
