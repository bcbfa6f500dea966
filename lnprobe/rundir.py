"""Claiming a run directory for writing: an existing run is never clobbered, and one writer at a time.

A directory *holds a run* when it has ``meta.json``, ``records.parquet`` or a ``records/part-*.parquet``.
A writer (``RunWriter``, hence ``lnprobe.attach``) refuses such a directory with
:class:`RunExistsError` unless it is told what to do with it: ``resume=True`` appends to it,
``overwrite=True`` replaces it (the writer deletes its meta.json and record parts first).

While a writer is open it holds ``RUN/.lock``, a JSON object ``{"pid", "host", "started", "token"}``
created with O_EXCL, so a second writer, in this process or another, gets :class:`RunLockedError`
naming the holder. The lock is removed at ``close()``, when the writer is garbage collected and at
interpreter exit. A lock left by a process that died (same host, pid not alive) is stale: the next
writer takes it over with a warning. A lock from another host cannot be checked and is never taken
over; delete it by hand when that process is known to be gone.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
import warnings
import weakref
from pathlib import Path

LOCK_NAME = ".lock"
# A lock file that is not valid JSON is being written right now, unless it is older than this.
_HALF_WRITTEN_S = 30.0


class RunExistsError(FileExistsError):
    """The directory already holds a run and neither ``resume`` nor ``overwrite`` was passed."""


class RunLockedError(RuntimeError):
    """Another writer (``pid`` on ``host``) holds the run directory's lock."""


def existing_run(path: str | Path) -> str | None:
    """What makes ``path`` a run ("meta.json and 3 record parts"), or None when it holds none."""
    path = Path(path)
    found = []
    if (path / "meta.json").exists():
        found.append("meta.json")
    records = path / "records"
    n = sum(1 for _ in records.glob("part-*.parquet")) if records.is_dir() else 0
    if n:
        found.append(f"{n} record part{'s' if n != 1 else ''} in records/")
    if (path / "records.parquet").exists():
        found.append("records.parquet")
    if (records / "manifest.json").exists():
        found.append("compacted records in records/")
    return " and ".join(found) or None


def check_claim(path: str | Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Raise, touching nothing, when a writer could not claim ``path``: ValueError for both flags,
    NotADirectoryError for a file, :class:`RunLockedError` while another writer holds it,
    :class:`RunExistsError` for an existing run without ``resume``/``overwrite``."""
    path = Path(path)
    if resume and overwrite:
        raise ValueError(f"{path}: pass resume=True (append to the run) or overwrite=True (replace it), not both")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, expected a run directory (or a path that does not exist yet); "
                                 "choose another output directory")
    holder = _live_holder(path / LOCK_NAME)
    if holder is not None:
        raise _locked(path, holder)
    found = existing_run(path)
    if found and not (resume or overwrite):
        raise RunExistsError(
            f"{path} already holds a run ({found}); pass resume=True to append to it, overwrite=True to replace it "
            "(its meta.json and record parts are deleted), or choose another directory "
            "(lnprobe train: --resume or --overwrite)")


class RunLock:
    """``RUN/.lock`` held by this process; :meth:`release` (idempotent) removes it. Raises
    :class:`RunLockedError` when another live writer holds it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.info = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "token": uuid.uuid4().hex}
        self._acquire()
        # at garbage collection or interpreter exit, whichever comes first (a probe never closed)
        self._finalizer = weakref.finalize(self, _remove_if_ours, self.path, self.info["token"], os.getpid())

    def _acquire(self) -> None:
        for _ in range(3):  # a stale lock taken over by someone else between our tries: look again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _live_holder(self.path)
                if holder is not None:
                    raise _locked(self.path.parent, holder) from None
                self._take_over(_read(self.path))
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
            return
        raise _locked(self.path.parent, _read(self.path) or {})

    def _take_over(self, stale: dict | None) -> None:
        # Rename, then check that what we moved is the stale lock and not a fresh one that another
        # process created after we read it; only one process wins the rename of a given file.
        moved = self.path.with_name(f"{LOCK_NAME}.stale-{self.info['token']}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return
        if stale is None or _read(moved) != stale:
            os.rename(moved, self.path)  # someone else's live lock: put it back (their O_EXCL holds it)
            return
        moved.unlink(missing_ok=True)
        who = (f"pid {stale.get('pid')} on {stale.get('host')}, started {stale.get('started')}" if stale
               else "an unreadable lock file")
        warnings.warn(f"{self.path}: took over a stale lock ({who}; that process is gone)", RuntimeWarning,
                      stacklevel=5)

    def release(self) -> None:
        """Remove the lock file if it is still this writer's (idempotent)."""
        self._finalizer()


def _remove_if_ours(path: Path, token: str, pid: int) -> None:
    # A forked child that runs atexit handlers must not remove its parent's lock.
    if os.getpid() == pid and (_read(path) or {}).get("token") == token:
        path.unlink(missing_ok=True)


def _read(path: Path) -> dict | None:
    """The lock's JSON, {} for a file that is not a lock object (half-written: see _live_holder), None
    when there is no file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _alive(holder: dict) -> bool:
    """Whether the lock's writer may still run: True unless it is on this host and its pid is gone
    (and for an unparsable lock younger than _HALF_WRITTEN_S, which is being written now)."""
    if not holder:
        return True
    if holder.get("host") != socket.gethostname():
        return True
    try:
        pid = int(holder.get("pid"))
        os.kill(pid, 0)
    except (TypeError, ValueError, ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _live_holder(lock: Path) -> dict | None:
    """The holder of ``lock`` when it is held by a live writer, else None (no lock, or a stale one)."""
    holder = _read(lock)
    if holder is None:
        return None
    if not holder:  # not JSON: being written right now, or garbage left behind long ago
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return None
        return {} if age < _HALF_WRITTEN_S else None
    return holder if _alive(holder) else None


def _locked(run_dir: Path, holder: dict) -> RunLockedError:
    who = (f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')})"
           if holder else "another process (its lock file is being written)")
    return RunLockedError(f"{run_dir} is being written by {who}: only one writer per run directory; wait for it "
                          f"to close, use another directory, or delete {run_dir / LOCK_NAME} if that process is gone")
