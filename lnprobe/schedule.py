"""Which optimizer steps a probe records."""
from __future__ import annotations

from collections.abc import Iterable


class Schedule:
    """A set of step indices (0-based optimizer steps), decided without touching tensors.

    Accepted forms (``Schedule.parse``):
    - ``int`` N ≥ 1: every N-th step (0, N, 2N, ...);
    - ``"log"`` or ``"log:K"``: 0 and round(10^(i/K)), i = 0, 1, ... (K per decade, default 10):
      0 1 2 3 4 5 6 8 10 13 16 20 25 32 40 50 63 79 100 ...;
    - an iterable of ints: exactly those steps;
    - a ``Schedule``: itself.
    """

    def __init__(self, every: int | None = None, steps: Iterable[int] | None = None, per_decade: int | None = None):
        self.every = every
        self.steps = frozenset(int(s) for s in steps) if steps is not None else None
        self.per_decade = per_decade
        self._log_cache: set[int] = set()
        self._log_upto = -1

    @classmethod
    def parse(cls, spec: "int | str | Iterable[int] | Schedule") -> "Schedule":
        """A Schedule from an int N, ``"log"``/``"log:K"``, a list of steps or a Schedule (returned as is)."""
        if isinstance(spec, Schedule):
            return spec
        if isinstance(spec, bool):
            raise ValueError(f"probe schedule: expected an int ≥ 1, 'log', 'log:K' or a list of steps; found {spec!r}")
        if isinstance(spec, int):
            if spec < 1:
                raise ValueError(f"probe schedule: every must be ≥ 1, found {spec}; use every=1 to record every step")
            return cls(every=spec)
        if isinstance(spec, str):
            head, _, tail = spec.partition(":")
            if head == "log":
                k = int(tail) if tail else 10
                if k < 1:
                    raise ValueError(f"probe schedule: 'log:K' needs K ≥ 1, found {spec!r}")
                return cls(per_decade=k)
            if spec.isdigit():
                return cls.parse(int(spec))
            raise ValueError(f"probe schedule: expected an int ≥ 1, 'log', 'log:K' or a list of steps; found {spec!r}")
        try:
            steps = [int(s) for s in spec]
        except TypeError:
            raise ValueError(
                f"probe schedule: expected an int ≥ 1, 'log', 'log:K' or a list of steps; found {type(spec).__name__}"
            ) from None
        if any(s < 0 for s in steps):
            raise ValueError(f"probe schedule: steps must be ≥ 0, found {min(steps)}")
        return cls(steps=steps)

    def _log_steps_upto(self, step: int) -> None:
        # 0, then round(10 ** (i / K)) for i = 0, 1, 2, ...: 0 1 2 3 4 5 6 8 10 13 16 20 25 ... for K = 10
        self._log_cache.add(0)
        while self._log_upto <= step:
            self._log_i = getattr(self, "_log_i", -1) + 1
            self._log_upto = int(round(10 ** (self._log_i / self.per_decade)))
            self._log_cache.add(self._log_upto)

    def __call__(self, step: int) -> bool:
        """True when ``step`` is recorded."""
        if self.every is not None:
            return step % self.every == 0
        if self.steps is not None:
            return step in self.steps
        if step >= self._log_upto:
            self._log_steps_upto(step)
        return step in self._log_cache

    def to_meta(self) -> dict:
        """The meta.json ``schedule`` entry."""
        if self.every is not None:
            return {"every": self.every}
        if self.steps is not None:
            return {"steps": sorted(self.steps)}
        return {"log_per_decade": self.per_decade}

    def with_last(self, last: int) -> "Schedule":
        """This schedule plus step ``last`` (a run's last step, so the end of training is always recorded).

        Returns ``self`` when it already records ``last``; otherwise a schedule that records the
        steps of this one and ``last``, whose ``to_meta()`` is this one's plus ``{"plus_last": last}``.
        """
        return self if self(int(last)) else _PlusLast(self, int(last))


class _PlusLast(Schedule):
    """``base`` plus one step; see :meth:`Schedule.with_last`."""

    def __init__(self, base: Schedule, last: int) -> None:
        super().__init__()
        self.base, self.last = base, last

    def __call__(self, step: int) -> bool:
        return step == self.last or self.base(step)

    def to_meta(self) -> dict:
        return {**self.base.to_meta(), "plus_last": self.last}
