"""The probe's lifecycle: permanent hooks on a live model, the open step, buffers, flushes, close.

Measurement points (design page section 3): forward pre-hooks and forward hooks on the modules that
``lnprobe.discovery.discover`` found, tensor hooks on the forward outputs for hidden-state gradients, and
the parameters' ``.grad`` at ``probe.step()``. The rows of a finished step are built by
``lnprobe.steprows`` from the reductions of ``lnprobe.stats``.

Steps are numbered by the probe: the n-th ``probe.step()`` call closes step n (0-based), step k + n
when it resumes at step k (``resume=``); the schedule (``every``) is a set of those numbers.

Hot-path rules (design page section 6):
- hooks stay registered for the whole run and return at once off schedule (one Python bool test);
- inside hooks only device reductions run: no ``.item()``/``.cpu()``/``bool(tensor)``; the reduced
  values stay on the device until a flush moves them to the host in one transfer;
- forwards re-run inside backward by activation checkpointing are not recorded twice (the autograd
  engine's current graph task tells a recompute apart from a forward);
- all forwards between two ``probe.step()`` calls (gradient accumulation) merge into one record;
- hidden-state gradients are divided by the AMP loss scale of that backward;
- under torch.distributed (DDP, FSDP2) statistics are reduced across ranks once per flush and only
  rank 0 writes (``lnprobe.distributed``); ``flush()`` and ``close()`` are then collective calls;
- under ``torch.compile`` the site hooks are traced into the model's graph and deliver their
  reductions through a custom operator (``lnprobe.traced``): no graph break, two compiled variants
  (recorded and unrecorded steps), no recompilation after them.

A probe observes only: every eager hook returns ``None`` and never touches the tensors it reads (a
traced hook may return the call's values with an identical copy of one tensor, the gradient tap of
``lnprobe.hooks``: same values, same gradients). If a hook
raises, the probe warns once, stops using that hook point and training goes on.
"""
from __future__ import annotations

import atexit
import platform
import warnings
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import torch
from torch import nn

from . import distributed as D
from . import stats as S
from .attnlogits import LogitObserver
from .burst import Burst, BurstMonitor, ResidHistory, previous_bursts
from .flushclock import FlushClock
from .flushworker import FlushWorker
from .hooks import SiteObserver
from .options import first_step, legacy_resume, parse_sites, parse_stats, select_sites
from .paramstats import norm_param_entries
from .rundir import check_claim
from .runtime import close_at_exit, is_fsdp2, local_shard, loss_scale, scaler_enabled, version
from .schedule import Schedule
from .sinks import SinkSet, first_nonfinite
from .sites import ALL_SITES, SiteKey
from .steprows import Rows, StepRows, StepRowsBuilder, scalar_frame
from .stepscalars import StepScalars
from .store import RunWriter
from .updates import UpdateTracker

DEFAULT_SITES = ALL_SITES
DEFAULT_GRAD_SITES: tuple[str, ...] = S.default_sites("gradient")  # ("resid",), from the registry
#: unrecorded steps whose train rows (step_scalars) may wait for a flush: bounds their memory when the
#: schedule is sparse and flush_seconds is None (counted in steps, the same on every rank)
MAX_UNFLUSHED_SCALAR_STEPS = 4096


class Probe:
    """Records per-layer statistics of a Transformer during training. Create it with ``lnprobe.attach``.

    Public state: ``current_step`` (the number of the step the next ``step()`` closes), ``recording``
    (that step is on the schedule and the probe is open), ``param_grads_captured``, ``hook_count``,
    ``held_bytes``, ``write_in_background`` (settable, default False: see ``flush``); ``model`` (the
    unwrapped model), ``map`` (what discovery found), ``schedule``, ``path`` (the run directory).
    """

    def __init__(
        self,
        model: nn.Module,
        out: str | Path,
        every: int | str | Iterable[int] | Schedule = 1,
        *,
        sites: Iterable[str] | str | None = None,
        stats: Iterable[str] | str | dict[str, Iterable[str]] | None = None,
        grad_sites: Iterable[str] | str | None = DEFAULT_GRAD_SITES,
        blocks: str | None = None,
        placement: str | None = None,
        example_input: Any = None,
        record: str = "train",
        flush_every: int = 20,
        flush_seconds: float | None = 60.0,
        scaler: Any = None,
        config: dict | None = None,
        run_name: str | None = None,
        resume: bool | int = False,
        distributed: bool | None = None,
        process_group: Any = None,
        start_step: int | None = None,
        append: bool | None = None,
        overwrite: bool = False,
        sinks: Any = None,
        updates: Any = None,
        logits: bool = False,
        attn_logits: bool = False,
        step_scalars: bool = True,
        burst: Burst | None = None,
    ):
        """Discover the model's blocks and sites, register the hooks and write meta.json.

        The arguments are those of :func:`attach`, documented there.
        """
        from .discovery import discover, unwrap

        if record not in ("train", "all"):
            raise ValueError(f"record must be 'train' (forwards in training mode) or 'all'; found {record!r}")
        if flush_every < 1:
            raise ValueError(f"flush_every must be ≥ 1, found {flush_every}")
        resume = legacy_resume(resume, start_step, append)
        self.schedule = Schedule.parse(every)
        self._dist = D.context(process_group) if distributed in (None, True) else None
        if distributed and self._dist is None:
            raise RuntimeError("lnprobe.attach(distributed=True): torch.distributed is not initialised with more "
                               "than one rank; call torch.distributed.init_process_group first (e.g. under torchrun)")
        if burst is not None and not isinstance(burst, Burst):
            raise TypeError(f"lnprobe.attach(burst=...): expected an lnprobe.Burst(...), found {type(burst).__name__}")
        if burst is not None and self._dist is not None:
            raise ValueError("lnprobe.attach(burst=...) is not supported under torch.distributed yet (the ranks would "
                             "have to agree on every burst decision); attach without burst=, or with distributed=False "
                             "and a run directory per rank")
        # Refuse an existing or locked run directory before a hook is registered or a file touched.
        D.on_writer(self._dist, f"claim the run directory {out}",
                    lambda: check_claim(out, resume=resume is not False, overwrite=overwrite))
        self.model = unwrap(model)
        self.map = discover(self.model, example_input, blocks=blocks, placement=placement)
        # FSDP2 swaps parameter objects between sharded and unsharded states: reshard what the discovery
        # forward left unsharded, and read the parameters afresh at every step (see _current_params).
        self._fsdp = [m for m in self.model.modules() if is_fsdp2(m)]
        for m in self._fsdp:
            m.reshard()
        self.record_all = record == "all"
        self.flush_every = flush_every
        self._clock = FlushClock(flush_seconds, self._dist)
        self._worker = FlushWorker()  # the host side of step()'s flushes (single process)
        # Opt-in: step()'s flushes write on a background thread, joined at the next step() (design page
        # section 6). Off by default: a flush's part is then on disk when the step() that made it returns.
        self.write_in_background = False
        self.scaler = scaler
        self._closed = False
        self._handles: list[Any] = []
        self._buffer: list[StepRows] = []
        self._rows = StepRowsBuilder(self._param_layer)
        self._failed_points: set = set()
        self._scalars: list[tuple[int, str, float]] = []
        self._warned_eval = False
        self._notes: list[str] = list(self.map.notes)
        self._pending_steps = 0  # recorded steps since the last flush (the same count on every rank)
        self._captured: tuple[list[str], torch.Tensor] | None = None  # see capture_param_grads
        self._step = first_step(out, resume, self._dist)
        self._active = self.schedule(self._step)

        sites_wanted = parse_sites(sites, ALL_SITES)
        grad_wanted = set(parse_sites(grad_sites, ALL_SITES)) if grad_sites else set()
        self._site_stats = parse_stats(stats, ALL_SITES)

        self._acc, self._grad_keys, by_point = select_sites(self.map.site_points(), sites_wanted, grad_wanted,
                                                            self._site_stats)
        missing = sorted(set(sites_wanted) - {k[0] for k in self._acc})
        if missing:
            self._notes.append(f"sites not found in this model and not recorded: {missing}")
        self._observer = SiteObserver(self._acc, self._grad_keys, self._records_forward, self._notes,
                                      self._failed_points, frozenset(b.name for b in self.map.blocks))
        self._register(by_point)

        self._params = [(n, p) for n, p in self.model.named_parameters()]
        self._gain_entries = norm_param_entries(self.map.norms, dict(self._params))
        self._sinks = SinkSet(sinks, self._notes)
        self._update_step: int | None = None  # the step the next optimizer.step() belongs to, if recorded
        self._flush_deferred, self._step_calls = False, 0
        self._updates = None if updates is None else UpdateTracker(
            updates, self._params, self._update_steps, self._emit_updates, self._notes)
        self._logits = LogitObserver(self.model, self.map, self._records_forward, self._notes, logits=logits,
                                     attn_logits=attn_logits) if (logits or attn_logits) else None
        self._handles += self._logits.handles if self._logits is not None else []
        # Per-step train rows of unrecorded steps (lnprobe.stepscalars) and spike-triggered bursts (lnprobe.burst).
        self._stepscalars = StepScalars(self._rows.layout, self._dist.world_size if self._dist else 1)
        self._record_scalars = bool(step_scalars)
        self._scalar_steps = 0  # unrecorded steps with train rows since the last forced flush
        self._captured_gn: torch.Tensor | None = None  # capture_param_grads on an unrecorded step
        first = next(iter(self.model.parameters()), None)
        self._device = first.device if first is not None else torch.device("cpu")
        self._burst: BurstMonitor | None = None
        if burst is not None:
            history = None
            if burst.history:
                history = ResidHistory(burst.history, self.map.site_points(), self.model, self._records_history,
                                       self._notes, self._rows.layout)
                self._handles += history.handles
            self._burst = BurstMonitor(burst, self._device, history)
            if resume is not False:  # a resumed run keeps the bursts of the steps before its first one
                self._burst.bursts += previous_bursts(out, self._step)

        meta = self.map.to_meta()
        meta.update(
            run_name=run_name or Path(out).name,
            status="running",
            schedule=self.schedule.to_meta(),
            sites=sorted({k[0] for k in self._acc}, key=ALL_SITES.index) + (self._logits.sites if self._logits else []),
            grad_sites=sorted({k[0] for k in self._grad_keys}, key=ALL_SITES.index),
            stats={s: list(v) for s, v in self._site_stats.items() if s in sites_wanted}
            | (self._logits.stats if self._logits is not None else {}),
            config=config or {},
            notes=self._notes,
            first_step=self._step,
            last_step=self._step - 1,
            step_scalars=self._record_scalars,
            versions={"lnprobe": version(), "torch": torch.__version__, "python": platform.python_version()},
        )
        if self._dist is not None:
            meta["distributed"] = self._dist.to_meta()
        if burst is not None:
            meta.update(burst=burst.to_meta(), bursts=self._burst.bursts)  # the list grows in place (rank 0)
        # Only rank 0 writes; the other ranks keep no writer but take part in every reduction.
        self.writer = None
        try:
            D.on_writer(self._dist, f"claim the run directory {out}",
                        lambda: setattr(self, "writer", RunWriter(out, meta, resume=resume is not False,
                                                                  overwrite=overwrite)))
        except BaseException:  # claimed by another writer since the check above: leave the model as it was
            for h in self._handles:
                h.remove()
            self._handles.clear()
            raise
        self.path = Path(out)
        self._atexit = close_at_exit(self, _close_interrupted)

    # ----------------------------------------------------------------- configuration
    # ----------------------------------------------------------------- hooks
    def _register(self, by_point: dict[Any, list[SiteKey]]) -> None:
        modules = dict(self.model.named_modules())
        grouped: dict[tuple[str, str], list[tuple[Any, list[SiteKey]]]] = defaultdict(list)
        for point, keys in by_point.items():
            grouped[(point.module, point.kind)].append((point, keys))
        for (mod_name, kind), entries in grouped.items():
            module = modules[mod_name]
            if kind == "in":
                h = module.register_forward_pre_hook(self._observer.pre_hook(entries), with_kwargs=True)
            else:
                h = module.register_forward_hook(self._observer.fwd_hook(entries), with_kwargs=True)
            self._handles.append(h)

    def _records_forward(self) -> bool:
        return self._active and not self._closed and (self.record_all or self.model.training)

    def _records_history(self) -> bool:
        # burst history: the residual stream of forwards the schedule does not record
        return not self._active and not self._closed and (self.record_all or self.model.training)

    # ----------------------------------------------------------------- steps
    @property
    def current_step(self) -> int:
        """The number of the step now open: the one the next ``step()`` closes."""
        return self._step

    @property
    def recording(self) -> bool:
        """True when the step now open is on the schedule (its forwards, gradients and ``step()`` are
        recorded) and the probe is not closed."""
        return self._active and not self._closed

    @property
    def records_step_scalars(self) -> bool:
        """True when every step, recorded or not, gets ``train`` rows (``step_scalars``) or feeds the
        burst detector (``burst``): integrations then pass the loss and gradients of every step."""
        return not self._closed and (self._record_scalars or self._burst is not None)

    @property
    def param_grads_captured(self) -> bool:
        """True when ``capture_param_grads`` has read the gradients of the step now open."""
        return self._captured is not None

    def step(self, loss: Any = None, *, lr: float | None = None, scaler: Any = None) -> None:
        """Close the step now open (``current_step``) and open the next one.

        Call once per optimizer step, after backward (and ``scaler.unscale_(opt)`` under AMP) and
        before gradient clipping, ``opt.step()`` and ``zero_grad()``. ``loss`` may be a tensor or a
        float; ``lr`` a host float; ``scaler`` overrides the probe's GradScaler for this step.
        Unrecorded steps get ``train`` rows ``loss``, ``grad_norm`` (global, before clipping) and ``lr``
        (``step_scalars``); with ``burst=`` the step's loss and grad_norm go to the spike detector, and a
        burst records every step after a spike (``lnprobe.burst``). No host synchronisation.
        Under torch.distributed every rank must call it the same number of times (it may flush,
        and a flush is a collective call).
        """
        if self._closed:
            raise RuntimeError("probe.step() after probe.close(): attach a new probe to keep recording")
        if self._flush_deferred:  # the optimizer step of the last flushed step never came (e.g. an AMP skip)
            self._flush(wait=False)
        rows = None
        if self._active:
            self._pending_steps += 1
            try:
                rows = self._finish_step(loss, lr, scaler if scaler is not None else self.scaler)
            except Exception as exc:
                self._notes.append(f"step {self._step}: statistics dropped after {type(exc).__name__}: {exc}")
                warnings.warn(f"lnprobe: step {self._step} not recorded: {exc}", RuntimeWarning, stacklevel=2)
        elif self._record_scalars or self._burst is not None:
            rows = self._unrecorded_step(loss, lr)
        if self._burst is not None:
            self._burst_step(rows, loss)
        for acc in self._acc.values():
            acc.clear()
        if self._logits is not None:
            self._logits.clear()
        self._captured, self._captured_gn = None, None
        self._update_step = self._step if self._active else None
        self._step += 1
        self._step_calls += 1
        self._active = self.schedule(self._step) or (self._burst is not None and self._burst.covers(self._step))
        # The step is closed. The previous flush's background write is on disk before step() returns
        # (a failed write is raised here, on the training thread, as the flush itself raised before).
        self._worker.join()
        time_due = self._clock.tick()
        scalars_due = self._scalar_steps >= MAX_UNFLUSHED_SCALAR_STEPS
        if scalars_due:
            self._scalar_steps = 0
        # Counted in steps, not buffer entries: a step dropped on one rank must not shift that rank's
        # flushes (and so its collectives) against the other ranks'.
        if self._pending_steps >= self.flush_every or time_due or scalars_due:
            if self._updates is not None and self._update_step is not None:
                # after this step's update rows (optimizer post-hook) or at the next step()
                self._flush_deferred = True
            else:
                self._flush(wait=False)

    def capture_param_grads(self, loss_scale: "torch.Tensor | float | None" = None) -> None:
        """Read the parameter gradient norms now, for the step that the next ``step()`` closes.

        For training loops that cannot call ``step()`` between backward and clipping (the Hugging Face
        Trainer): call this where the gradients are complete but not yet clipped; ``step()`` then uses
        these norms instead of reading ``.grad`` again. ``loss_scale`` divides the norms when the
        gradients are still multiplied by an AMP loss scale (``lnprobe.runtime.loss_scale(scaler)``).
        A later call replaces an earlier one. No host synchronisation. On steps that are not recorded
        it reads only the global gradient norm of the per-step train rows (``records_step_scalars``).
        """
        if not self.recording:
            if self.records_step_scalars:
                gn = self._stepscalars.grad_norm(self._current_params())
                if gn is not None and loss_scale is not None:
                    gn = gn / (loss_scale.to(gn.device, torch.float64) if torch.is_tensor(loss_scale)
                               else float(loss_scale))
                self._captured_gn = gn
            return
        with_grad = [(n, p) for n, p in self._current_params() if p.grad is not None]
        if not with_grad:
            self._captured = ([], torch.zeros(0, dtype=torch.float64))
            return
        gn = S.norms_of([local_shard(p.grad) for _, p in with_grad])  # (P,) float64
        if loss_scale is not None:
            gn = gn / (loss_scale.to(gn.device, torch.float64) if torch.is_tensor(loss_scale) else float(loss_scale))
        self._captured = ([n for n, _ in with_grad], gn)

    def add_note(self, text: str) -> None:
        """Add a line to meta.json's ``notes`` (written at the next flush and at close)."""
        self._notes.append(str(text))

    def _finish_step(self, loss: Any, lr: float | None, scaler: Any) -> StepRows | None:
        sites = list(self._acc.items())
        if self._acc and not self.model.training and not self.record_all and not self._warned_eval \
                and not any(acc.parts for acc in self._acc.values()):
            self._warned_eval = True
            warnings.warn(f"lnprobe: step {self._step} recorded no activations: the model ran in eval mode and "
                          "attach(record='train') records training-mode forwards only (parameter and gain rows are "
                          "still written); pass record='all' to record eval-mode forwards, or use "
                          "lnprobe.scan.scan_model / 'lnprobe scan' for a pretrained checkpoint", RuntimeWarning,
                          stacklevel=3)
        rows = self._rows.build(self._step, sites, self._current_params(), self._captured, self._gain_entries,
                                loss=loss, lr=lr, loss_scale=loss_scale(scaler), scaler_enabled=scaler_enabled(scaler))
        if rows is not None:
            self._buffer.append(rows)
        extra = self._logits.step_rows(self._step, self._rows.layout) if self._logits is not None else None
        if extra is not None:
            self._buffer.append(extra)
        return rows

    def _unrecorded_step(self, loss: Any, lr: float | None) -> StepRows | None:
        """The train rows (loss, grad_norm before clipping, lr) of a step the schedule does not record,
        buffered when ``step_scalars`` (lnprobe.stepscalars); also the burst detector's input."""
        try:
            gn = self._captured_gn if self._captured_gn is not None else \
                self._stepscalars.grad_norm(self._current_params())
            rows = self._stepscalars.rows(self._step, loss, gn, lr, self._device)
        except Exception as exc:  # a probe never crashes training
            self._record_scalars = False
            self._notes.append(f"per-step train scalars disabled at step {self._step} after "
                               f"{type(exc).__name__}: {exc}")
            warnings.warn(f"lnprobe: per-step train scalars disabled: {exc}; training continues", RuntimeWarning,
                          stacklevel=3)
            return None
        if rows is not None and self._record_scalars:
            self._buffer.append(rows)
            self._scalar_steps += 1
        return rows

    def _burst_step(self, rows: StepRows | None, loss: Any) -> None:
        """Feed the closed step's loss and grad_norm to the burst detector; buffer the history rows of a
        burst that starts now and write meta.json's ``bursts`` (lnprobe.burst)."""
        try:
            lt, gt = self._stepscalars.signals(rows)
            n_bursts = len(self._burst.bursts)
            self._buffer += self._burst.after_step(self._step, loss if lt is None else lt, gt,
                                                   recorded=self._active)
            if len(self._burst.bursts) > n_bursts:
                b = self._burst.bursts[-1]
                self._notes.append(f"burst at steps {b['first_step']}..{b['last_step']}, triggered at step "
                                   f"{b['trigger_step']}: {b['reason']}")
                if self.writer is not None:  # written now: a burst start is rare, and worth keeping after a kill
                    self.writer.update_meta(bursts=self._burst.bursts, notes=self._notes)
        except Exception as exc:  # a probe never crashes training
            self._burst = None
            self._notes.append(f"bursts disabled at step {self._step} after {type(exc).__name__}: {exc}")
            warnings.warn(f"lnprobe: bursts disabled: {exc}; training continues", RuntimeWarning, stacklevel=3)

    def _update_steps(self) -> tuple[int, int | None, int | None]:
        # for lnprobe.updates: step() calls so far, the last closed step and the open one (None: not recorded)
        return self._step_calls, self._update_step, self._step if self.recording else None

    def _emit_updates(self, step: int, names: list[str], values: torch.Tensor, kinds, weights) -> None:
        # update rows arrive after step() closed their step: buffered as an extra StepRows of that step
        if not self._closed:
            keys = tuple((f"param:{n}", self._param_layer(n), s) for n in names for s in S.UPDATE_STATS)
            loc = torch.full((2, values.numel()), float("nan"), dtype=torch.float64, device=values.device)
            self._buffer.append(StepRows(step, values, loc, self._rows.layout(keys), weights, kinds))
            if self._flush_deferred:
                self._flush(wait=False)

    def _current_params(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.model.named_parameters()) if self._fsdp else self._params

    def _param_layer(self, name: str) -> int:
        info = self.map.param_roles.get(name)
        return int(info["layer"]) if info else -1

    # ----------------------------------------------------------------- output
    def flush(self) -> Path | None:
        """Move buffered steps to the host in one transfer and append one Parquet part.

        Under torch.distributed this is a collective call (every rank must make it): the steps are
        reduced across ranks (``lnprobe.distributed.reduce_rows``) and rank 0 writes the part.
        meta.json's ``last_step`` (the last step closed, where ``resume=True`` continues) and
        ``heartbeat`` (that step and the wall time, see ``lnprobe.flushclock``) are updated at every flush.
        A call of ``flush()`` returns when its part is written. With ``probe.write_in_background = True``
        the flushes that ``step()`` makes by itself write on a background thread (``lnprobe.flushworker``,
        design page section 6), unless the probe has live sinks (they are called on the training thread).
        """
        return self._flush(wait=True)

    def _flush(self, wait: bool) -> Path | None:
        """The flush; ``wait=False`` hands the host side of a single-process flush to the background
        writer (the device-to-host copy starts here, non-blocking into pinned memory on CUDA)."""
        self._worker.join()  # the previous background write first: its failure is raised here
        self._pending_steps, self._flush_deferred = 0, False
        self._clock.flushed()
        scalars, self._scalars = self._scalars, []
        buf, self._buffer = self._buffer, []
        if self._dist is None:
            rows = self._local_rows(buf) if buf else None
            host = rows.start_host_copy() if rows is not None else None
            job = partial(self._write_local, rows, host, scalars, self._step - 1)
            if wait or not self.write_in_background or self._sinks:  # sinks: user code, on the training thread
                return job()
            self._worker.submit(job)
            return None
        # Distributed: every collective on the training thread, in order, on every rank. Everything that
        # can fail on one rank alone runs before the first collective; the failure is then agreed on by
        # all ranks (one tiny all_gather) and raised everywhere, naming the rank.
        rows, error = None, None
        try:
            rows = self._local_rows(buf)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        reduced = D.reduce_rows(self._dist, rows, error)
        frames = [reduced.frame()] if reduced is not None else []
        path, write_error = None, None
        if self.writer is not None:
            try:
                path = self._write(frames, scalars, self._step - 1)
            except Exception as exc:
                write_error = f"{type(exc).__name__}: {exc}"
        # Rank 0 alone writes: if that fails the other ranks must fail too, not run on into a hang.
        D.agree(self._dist, write_error, "write the run directory")
        return path

    def _write_local(self, rows: Rows | None, host: Any, scalars: list, last_step: int) -> Path | None:
        # the host side of a single-process flush (the training thread or the background writer)
        frames = [rows.frame(host)] if rows is not None else []
        return self._write(frames, scalars, last_step) if self.writer is not None else None

    def _write(self, frames: list[pd.DataFrame], scalars: list, last_step: int) -> Path | None:
        """Append the frames (and the host scalars) as one part; update meta.json's last step and heartbeat."""
        path = None
        if scalars:
            frames.append(scalar_frame(scalars))
        frames = [f for f in frames if not f.empty]
        if frames:
            frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
            path = self.writer.append(frame)
            self._after_write(frame)
        # Also without new rows: the heartbeat says the process was alive at this step.
        self.writer.update_meta(last_step=last_step, notes=self._notes, heartbeat=self._clock.heartbeat(last_step))
        return path

    def _after_write(self, frame: pd.DataFrame) -> None:
        """Host-side work on a written part (its values are on the host: no sync): the first
        non-finite site into meta.json, then the live sinks."""
        if "first_nonfinite" not in self.writer.meta:
            first = first_nonfinite(frame)
            if first is not None:
                self.writer.meta["first_nonfinite"] = first
                self._notes.append(f"first non-finite value at step {first['step']}: {first['site']} layer "
                                   f"{first['layer']} ({first['count']:g} NaN/Inf)")
        self._sinks.send(frame)

    def _local_rows(self, buf: list[StepRows]) -> Rows:
        """This rank's buffered steps as one flat set of rows (device values, host keys)."""
        return Rows.from_steps(buf)

    def log_scalars(self, values: dict[str, float], step: int | None = None) -> None:
        """Record extra per-step scalars as ``train`` rows (e.g. ``val_loss``), written at the next flush.

        ``step`` defaults to the step now open (the one the next ``probe.step()`` closes).
        Values are host floats, so this is for things the caller already has on the host.
        """
        at = self._step if step is None else int(step)
        for name, v in values.items():
            self._scalars.append((at, str(name), float(v)))

    def update_meta(self, **fields: Any) -> None:
        """Add or replace keys of meta.json (e.g. the trainer's divergence record); rank 0 only writes."""
        self._worker.join()  # meta.json has one writer at a time
        if self.writer is not None:
            self.writer.update_meta(**fields)

    def close(self, status: str = "finished", error: str | None = None) -> None:
        """Flush, write the final status to meta.json and remove every hook. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._observer.close()
        if self._updates is not None:
            self._updates.remove()
        try:
            self._worker.join()  # a background write still running; its failure ends the close as a crash
            if self._dist is not None and status != "finished":
                # Ending on an error: the other ranks may be anywhere (in a DDP all-reduce, or dead), so a
                # reduction could hang. Drop the unflushed steps instead.
                if self._buffer:
                    self._notes.append(f"{len(self._buffer)} recorded step(s) after the last flush dropped: the "
                                       f"distributed run ended with status {status!r}")
                self._buffer.clear()
                self._scalars.clear()
            else:
                self.flush()
        except BaseException as exc:  # the last flush failed (e.g. on another rank): say so in meta.json
            status, error = "crashed", error or f"{type(exc).__name__}: {exc}"
            raise
        finally:
            try:
                self._worker.join()  # nothing may write meta.json beside the final update below
            except BaseException:
                pass  # already raised above
            fields: dict[str, Any] = {"status": status, "notes": self._notes, "last_step": self._step - 1,
                                      "heartbeat": self._clock.heartbeat(self._step - 1)}
            if error:
                fields["error"] = error
            if self.writer is not None:
                try:
                    self.writer.update_meta(**fields)
                finally:
                    self.writer.close()  # releases RUN/.lock
            self._sinks.close()
            if self._atexit is not None:
                atexit.unregister(self._atexit)
                self._atexit = None

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.close(status="crashed", error=f"{exc_type.__name__}: {exc}")

    @property
    def hook_count(self) -> int:
        """Hooks registered now (0 after ``close()``)."""
        return len(self._handles)

    @property
    def held_bytes(self) -> int:
        """Bytes of tensor storage the probe holds right now: the partial reductions of the open step
        (between its forwards and ``step()``) and the buffered steps not yet flushed. Read it after
        backward, before ``step()``, for the most the probe keeps. Activations are never held."""
        tensors = [t for acc in self._acc.values() for p in acc.parts
                   for t in (p.sums, p.counts, p.cand, p.cand_tok, p.sample, p.blocks) if t is not None]
        tensors += [g.packed for acc in self._acc.values() for g in acc.grads]
        tensors += [t for e in self._buffer for t in (e.values, e.loc)]
        if self._captured is not None:
            tensors.append(self._captured[1])
        tensors += self._logits.held if self._logits is not None else []
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


def _close_interrupted(probe: Probe) -> None:
    if not probe._closed:
        probe.close(status="interrupted")  # distributed: no collective at exit (see close)


def attach(
    model: nn.Module,
    out: str | Path,
    every: int | str | Iterable[int] | Schedule = 1,
    *,
    sites: Iterable[str] | str | None = None,
    stats: Iterable[str] | str | dict[str, Iterable[str]] | None = None,
    grad_sites: Iterable[str] | str | None = DEFAULT_GRAD_SITES,
    blocks: str | None = None,
    placement: str | None = None,
    example_input: Any = None,
    record: str = "train",
    flush_every: int = 20,
    flush_seconds: float | None = 60.0,
    scaler: Any = None,
    config: dict | None = None,
    run_name: str | None = None,
    resume: bool | int = False,
    distributed: bool | None = None,
    process_group: Any = None,
    start_step: int | None = None,
    append: bool | None = None,
    overwrite: bool = False,
    sinks: Any = None,
    updates: Any = None,
    logits: bool = False,
    attn_logits: bool = False,
    step_scalars: bool = True,
    burst: Burst | None = None,
) -> Probe:
    """Attach a probe to ``model`` that writes the run directory ``out``; also a context manager.

    Steps are numbered by the probe: the n-th ``probe.step()`` closes step n (from 0, or from the
    resume point), and ``every`` selects among those numbers.

    Args:
        model: the model; a bare module, a DDP/FSDP2 wrapper or a ``torch.compile``d module.
        out: the run directory (meta.json and records/); under torch.distributed rank 0 writes it.
        every: which steps to record: N (every N-th), ``"log"``/``"log:K"``, a list of steps, a Schedule.
        sites: site names, ``"all"`` or None (every site of the design page that the model has).
        stats: activation statistics: None (full at ``resid``/``final``, moments and absmax elsewhere;
            the registry's ``default`` column), ``"all"``, a list, or a dict site -> list.
        grad_sites: sites whose hidden-state gradients are recorded (default ``("resid",)``).
        blocks: override: dotted name of the module list that holds the Transformer blocks.
        placement: override: ``pre``, ``post``, ``peri``, ``output`` or ``none``.
        example_input: input of the discovery forward (default: a small batch of token ids).
        record: ``"train"`` records forwards made in training mode only; ``"all"`` every forward.
        flush_every: recorded steps per flush (one Parquet part each).
        flush_seconds: also flush at the ``step()`` that finds at least this many seconds passed since the
            last flush (0: every step; None: no time bound), so a killed process loses at most that.
        scaler: a ``torch.amp.GradScaler``: hidden-state gradients are divided by its scale.
        config: a dict stored under ``config`` in meta.json.
        run_name: the run's name in meta.json (default: the directory's name).
        resume: False: a new run; ``out`` must not hold one (meta.json or record parts), else
            ``lnprobe.RunExistsError``. True: append to ``out`` and continue after the last step recorded in
            its meta.json; an int k: append, the first step is k (a training loop restarted from a checkpoint
            taken before step k).
        distributed: None: reduce across ranks when torch.distributed has more than one rank (only rank 0
            writes ``out``); False: every rank records alone (give each its own ``out``); True: require it.
        process_group: the group to reduce over (default: the world).
        start_step: deprecated, use ``resume``: with ``append=True`` the same as ``resume=start_step``.
        append: deprecated, use ``resume``.
        overwrite: replace a run already in ``out``: its meta.json and record parts are deleted (other files
            such as a checkpoint are kept). Not together with ``resume``.
        sinks: live sinks (``lnprobe.sinks``): ``TensorBoard(logdir)``, ``WandB(run)``, ``MLflow(...)`` or any
            callable ``sink(step, scalars)``; each gets a summary of every recorded step at each flush (the
            values are on the host then: no extra sync). A sink that raises is disabled with a warning.
        updates: an optimizer or a list of them: ``update_rms`` and ``update_ratio`` of every parameter on
            recorded steps, from optimizer step hooks (``lnprobe.updates``). Call ``probe.step()`` before
            ``opt.step()``.
        logits: record the ``logits`` site (the model output's ``logit_rms``, ``logit_absmax``, ``lse_mean``).
        attn_logits: record the ``attn_logits`` site per block (``qk_absmax`` with its head, ``entropy``), exact
            for the reference GPT and Hugging Face models (their attention-function interface); costs an extra
            QKᵀ per layer on recorded steps (``lnprobe.attnlogits``).
        step_scalars: True (default): ``train`` rows ``loss``, ``grad_norm`` (global, before clipping) and
            ``lr`` at every step, recorded or not, kept on the device until a flush (``lnprobe.stepscalars``);
            False: on recorded steps only.
        burst: an ``lnprobe.Burst(...)``: after a loss or grad-norm spike (docs/theory.md §5, decided on the
            device) or a NaN/Inf at step k, record every step through k + ``steps`` (from k + 1 on CPU, k + 2
            on an accelerator that keeps up); ``history=H`` also writes the residual stream's m2 and absmax
            of the H unrecorded steps before; meta.json ``bursts`` says when and why (``lnprobe.burst``).
            Not under torch.distributed.

    Raises (before a hook is registered or a file touched): ``lnprobe.RunExistsError`` (a FileExistsError)
    when ``out`` holds a run and neither ``resume`` nor ``overwrite`` is passed; ``lnprobe.RunLockedError``
    while another writer (this or another process, named by pid and host in the message) holds
    ``out/.lock``. The probe holds that lock until ``close()`` (or interpreter exit); a lock left by a dead
    process on this host is taken over with a warning.
    """
    return Probe(model, out, every, sites=sites, stats=stats, grad_sites=grad_sites, blocks=blocks,
                 placement=placement, example_input=example_input, record=record, flush_every=flush_every,
                 flush_seconds=flush_seconds, scaler=scaler, config=config, run_name=run_name, resume=resume,
                 distributed=distributed, process_group=process_group, start_step=start_step, append=append,
                 overwrite=overwrite, sinks=sinks, updates=updates, logits=logits, attn_logits=attn_logits,
                 step_scalars=step_scalars, burst=burst)
