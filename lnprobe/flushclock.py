"""The probe's time bound on flushes and the heartbeat it leaves in meta.json.

Besides every ``flush_every`` recorded steps, a probe flushes at the ``step()`` that finds at least
``flush_seconds`` passed since the last flush, so a killed process loses at most that much time of
records. Each flush writes a heartbeat (the last step closed and the wall time), so a reader can tell a
live run from one killed without a word.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Any

from . import distributed as D


class FlushClock:
    """When the time bound calls for a flush; one ``time.monotonic()`` per step, no device sync.

    Under torch.distributed a flush is a collective, so the ranks must agree although their clocks
    differ: rank 0's clock decides, asked (one tiny broadcast) 1, 2, 4, ..., 64 steps after a flush and
    then every 64 steps. A flush then comes at most as many steps late as passed since the previous
    check (≤ 64).
    """

    def __init__(self, seconds: float | None, dist: D.DistContext | None) -> None:
        if seconds is not None and not seconds >= 0:
            raise ValueError(f"flush_seconds must be ≥ 0 or None, found {seconds}")
        self.seconds = seconds
        self.dist = dist
        self.started = self.last = time.monotonic()
        self.since = 0  # steps closed since the last flush (recorded or not)

    def tick(self) -> bool:
        """Count one closed step; True when the time bound asks for a flush now."""
        self.since += 1
        if self.seconds is None:
            return False
        if self.dist is None:
            return time.monotonic() - self.last >= self.seconds
        n = self.since
        if not (n % 64 == 0 or (n & (n - 1)) == 0):
            return False
        return bool(D.broadcast_from_writer(self.dist, lambda: time.monotonic() - self.last >= self.seconds))

    def flushed(self) -> None:
        """A flush happened: the bound counts from now."""
        self.since = 0
        self.last = time.monotonic()

    def heartbeat(self, last_step: int) -> dict[str, Any]:
        """meta.json's ``heartbeat``: the last step closed, when (UTC and Unix time), seconds since
        attach, and the writing process (host, pid)."""
        now = time.time()
        return {"step": last_step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                "unix": round(now, 3), "elapsed_s": round(time.monotonic() - self.started, 3),
                "host": platform.node(), "pid": os.getpid()}
