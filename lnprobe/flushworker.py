"""The probe's background writer: the host side of a flush (waiting for the device-to-host copy,
building the records frame, Parquet write and fsync, live sinks, meta.json) runs on one daemon
thread while training goes on.

Order and guarantees: jobs run one at a time in submission order. ``join()`` waits for every job
submitted so far and re-raises, on the calling (training) thread, the first exception a job raised,
so a failed write is never lost: it surfaces at the probe's next ``step()``, ``flush()`` or ``close()``
as it would have at the flush itself. The probe joins in every ``step()`` once the step is closed, so a
flush's part is on disk before the next ``step()`` returns; a process killed in between loses that
part too.
The thread is a daemon (an idle non-daemon thread would block interpreter exit before the atexit
close could run) and is started again in a forked child, which inherits the object but not the thread.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable


class FlushWorker:
    """One background thread running submitted jobs in order; ``join`` re-raises their first error."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pid = -1
        self._error: BaseException | None = None
        self._results: list[Any] = []

    def submit(self, job: Callable[[], Any]) -> None:
        """Run ``job()`` on the background thread after the jobs submitted before it."""
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._queue = queue.Queue()  # a forked child's copy may hold its parent's unfinished jobs
            self._thread = threading.Thread(target=self._run, args=(self._queue,), name="lnprobe-flush",
                                            daemon=True)
            self._pid = os.getpid()
            self._thread.start()
        self._queue.put(job)

    def _run(self, jobs: queue.Queue) -> None:
        while True:
            job = jobs.get()
            try:
                if self._error is None:  # after a failure the later jobs are dropped: join raises the first
                    self._results.append(job())
            except BaseException as exc:  # handed to the training thread by join()
                self._error = exc
            finally:
                jobs.task_done()

    @property
    def busy(self) -> bool:
        """True while a submitted job has not finished."""
        return self._thread is not None and self._pid == os.getpid() and self._queue.unfinished_tasks > 0

    def join(self) -> list[Any]:
        """Wait for every submitted job; return their results in order, or raise the first error."""
        if self._thread is not None and self._pid == os.getpid():
            self._queue.join()
        results, self._results = self._results, []
        error, self._error = self._error, None
        if error is not None:
            raise error
        return results
