"""Hugging Face ``transformers.Trainer`` integration: ``ProbeCallback``.

    from lnprobe.integrations.hf import ProbeCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[ProbeCallback(every=10)])

Where the measurements come from (transformers 5.x ``Trainer._inner_training_loop``): per optimizer
step, ``on_step_begin`` fires before the first micro-batch, ``on_substep_end`` after every micro-batch
but the last, then — after the last micro-batch's backward — the Trainer clips
(``_clip_grad_norm``, which also unscales fp16 gradients), then fires ``on_pre_optimizer_step``,
steps the optimizer and zeroes the gradients. No callback fires between the last backward and the
clipping, so:

- activation and hidden-state-gradient statistics come from the probe's hooks during every
  micro-batch of the step (gradient accumulation merged, as in ``lnprobe.attach``);
- parameter gradient norms (and the global ``train/grad_norm``) are read BEFORE clipping, at the end
  of every backward of a recorded step: a tensor hook on the model's loss queues a callback on the
  autograd engine, which re-queues itself once so that it runs after every other end-of-backward
  callback queued during that backward (DDP's gradient all-reduce finaliser, FSDP2's post-backward).
  The last micro-batch's capture is the one used, i.e. the accumulated, averaged, not yet clipped
  gradients, divided by the fp16 loss scale when the Trainer's optimizer carries a GradScaler;
- the step is closed at ``on_pre_optimizer_step`` (one record per optimizer step) with the step's
  loss from the model outputs' ``loss``: the sum of the micro-batches' losses when the Trainer passed
  ``num_items_in_batch`` (each is then a share of the step loss), else their mean; and the
  learning rate of this step.

Log stream: at every probe flush the summary of the last flushed step (``lnprobe.sinks``: the keys
``lnprobe/loss``, ``lnprobe/absmax``, ``lnprobe/update_ratio_max``, ...; plus ``lnprobe/step``, the
step it describes) is kept, and the next ``on_log`` adds it to the Trainer's ``logs`` and to
``state.log_history``. The values are those of the flush, so no extra host sync is made; they lag
the Trainer's own logs by up to ``flush_every`` recorded steps. The reporting integrations
(``report_to``: TensorBoard, W&B, MLflow, ...) are callbacks placed before user callbacks; so that
they see these keys, ``on_train_begin`` moves this callback ahead of them in the Trainer's callback
list (found on the calling frame: ``CallbackHandler.call_event``; a note says so when it is not
found). ``log_summary=False`` turns this off; ``sinks=`` adds live sinks (rank 0 only).

The Trainer itself is not patched. The run directory defaults to ``args.output_dir/lnprobe``; it is
closed at ``on_train_end``. Callbacks see no exceptions: if ``train()`` raises, the probe is closed
as "crashed" by the next ``on_train_begin`` of this callback, else as "interrupted" at interpreter
exit (either way the steps flushed so far are kept).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("lnprobe.integrations.hf needs transformers: pip install transformers") from exc

from ..probe import Probe, attach
from ..runtime import loss_scale, no_compile


class ProbeCallback(TrainerCallback):
    """Attach an lnprobe probe to the Trainer's model and record once per optimizer step.

    ``every``: the probe schedule (int, "log", "log:K" or a list of optimizer steps). ``out``: the run
    directory (default ``args.output_dir/lnprobe``). Other keyword arguments go to
    ``lnprobe.attach`` (``sites``, ``stats``, ``grad_sites``, ``flush_every``, ``sinks``, ``updates``
    ...; ``updates=True``: the Trainer's optimizer). ``log_summary``: add the probe's summary scalars
    to the Trainer's logs (module docstring).
    The probe is available as ``callback.probe`` while training runs.
    """

    def __init__(self, every: Any = 1, out: str | Path | None = None, *, log_summary: bool = True,
                 **attach_kwargs: Any):
        self.every = every
        self.out = out
        self.log_summary = log_summary
        self.attach_kwargs = attach_kwargs
        self._summary: dict[str, float] | None = None  # the last flushed step's scalars, not yet logged
        self.probe: Probe | None = None
        self._handles: list[Any] = []
        self._scaler: Any = None
        self._loss_sum: torch.Tensor | None = None
        self._loss_n = 0
        self._warned_fallback = False
        self._warned_drift = False
        self._loss_is_share = False  # the model normalised by the step's token count (num_items_in_batch)

    # ----------------------------------------------------------------- Trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Attach a probe to the Trainer's model (resuming at its global step) and hook the model's output."""
        if self.probe is not None:  # a previous train() raised before on_train_end
            self._close(status="crashed", error="Trainer.train() ended without on_train_end")
        if model is None:
            raise ValueError("ProbeCallback.on_train_begin: the Trainer passed no model; expected the model being "
                             "trained (use this callback with transformers.Trainer)")
        out = Path(self.out) if self.out is not None else Path(args.output_dir) / "lnprobe"
        self._scaler = getattr(optimizer, "scaler", None)
        kw = dict(self.attach_kwargs)
        kw.setdefault("scaler", self._scaler)
        # Resumed from a checkpoint: keep the earlier parts and number steps from the Trainer's global step.
        kw.setdefault("resume", state.global_step if state.global_step > 0 else False)
        kw.setdefault("config", {"trainer": {
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "learning_rate": args.learning_rate, "max_grad_norm": args.max_grad_norm,
            "max_steps": state.max_steps, "fp16": args.fp16, "bf16": args.bf16,
            "grad_norms_measured": "before clipping (end of each backward)",
        }})
        if kw.get("updates") is True:  # the Trainer's optimizer (Accelerate's wrapper is unwrapped)
            kw["updates"] = optimizer if optimizer is not None else None
        note = None
        if state.is_world_process_zero:
            sinks = list(kw.pop("sinks", None) or [])
            if self.log_summary:
                sinks.append(self._keep_summary)
                note = self._log_before_reporters()
            kw["sinks"] = sinks or None
        else:
            kw.pop("sinks", None)  # sinks live on the writer rank
        self._summary = None
        self.probe = attach(model, out, self.every, **kw)
        if note:
            self.probe.add_note(note)
        self._handles.append(self.probe.model.register_forward_hook(self._make_root_hook(), with_kwargs=True))
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        """Note (once) a probe step that drifted from the Trainer's global step; reset the step's loss sum."""
        # The probe numbers steps by counting its step() calls (one per on_pre_optimizer_step), from
        # the global step it was attached at; it should never drift from the Trainer's count.
        if self.probe is not None and self.probe.current_step != state.global_step and not self._warned_drift:
            self._warned_drift = True
            self.probe.add_note(f"ProbeCallback: probe step {self.probe.current_step} != Trainer global_step "
                                f"{state.global_step}; records are numbered by the probe's own count")
        self._loss_sum, self._loss_n = None, 0
        return control

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        """End the probe's step with the step's loss and learning rate, before the optimizer updates."""
        if self.probe is None:
            return control
        if self.probe.recording and not self.probe.param_grads_captured and not self._warned_fallback:
            # The model's output never got a gradient (e.g. a custom compute_loss that ignores it).
            self._warned_fallback = True
            self.probe.add_note("ProbeCallback: no end-of-backward capture; parameter gradient norms read at "
                                "on_pre_optimizer_step, i.e. AFTER gradient clipping")
        loss = None
        if self._loss_n:
            loss = self._loss_sum if self._loss_is_share else self._loss_sum / self._loss_n
        self.probe.step(loss=loss, lr=_current_lr(optimizer, lr_scheduler))
        self._loss_sum, self._loss_n = None, 0
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the last flushed step's summary (once) to the Trainer's logs and log_history."""
        if self._summary is not None and logs is not None:
            summary, self._summary = self._summary, None
            logs.update(summary)
            last = state.log_history[-1] if state.log_history else None
            if last is not None and last.get("step") == state.global_step:
                last.update(summary)  # Trainer.log appended a copy of logs before calling on_log
        return control

    def on_train_end(self, args, state, control, **kwargs):
        """Remove the hooks and close the probe as finished."""
        self._close()
        return control

    # ----------------------------------------------------------------- internals
    def _keep_summary(self, step: int, scalars: dict[str, float]) -> None:
        self._summary = {**scalars, "lnprobe/step": float(step)}

    def _log_before_reporters(self) -> str | None:
        """Move this callback before the reporting integrations; return a note when that fails."""
        # We are called from CallbackHandler.call_event("on_train_begin", ...), which iterates the list;
        # moving this callback to an EARLIER index keeps that iteration exact (nothing skipped or repeated).
        handler = sys._getframe(2).f_locals.get("self")
        if not isinstance(handler, CallbackHandler) or self not in handler.callbacks:
            return ("ProbeCallback: Trainer callback list not found; report_to integrations placed before this "
                    "callback do not see the lnprobe/ summary keys")
        cbs = handler.callbacks
        cbs.remove(self)
        at = next((i + 1 for i, c in enumerate(cbs) if isinstance(c, DefaultFlowCallback)), 0)
        cbs.insert(at, self)
        return None

    def __repr__(self) -> str:
        return f"ProbeCallback(every={self.every!r})"
    def _close(self, status: str = "finished", error: str | None = None) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.probe is not None:
            probe, self.probe = self.probe, None
            probe.close(status=status, error=error)

    def _make_root_hook(self):
        engine = torch.autograd.Variable._execution_engine

        def capture() -> None:
            probe = self.probe
            if probe is not None:
                probe.capture_param_grads(loss_scale=loss_scale(self._scaler))

        def after_everything_queued_so_far() -> None:
            # Final callbacks run in queue order and may queue more: this runs after DDP's / FSDP's.
            engine.queue_callback(capture)

        def on_loss_grad(grad):
            engine.queue_callback(after_everything_queued_so_far)
            return None

        @no_compile
        def root_hook(module, args, kwargs, output):
            probe = self.probe
            if probe is None or not (probe.recording or probe.records_step_scalars) or not module.training \
                    or not torch.is_grad_enabled():
                return None
            loss = _loss_of(output)
            anchor = loss
            if loss is not None:
                # Given num_items_in_batch (tokens of the whole accumulated step), the model returns
                # its micro-batch's share of the step loss: the step loss is the sum, else the mean.
                self._loss_is_share = kwargs.get("num_items_in_batch") is not None
                d = loss.detach().float()
                self._loss_sum = d if self._loss_sum is None else self._loss_sum + d
                self._loss_n += 1
            else:
                anchor = _first_tensor(output)
            if anchor is not None and anchor.requires_grad:
                anchor.register_hook(on_loss_grad)
            return None

        return root_hook


def _loss_of(output: Any) -> torch.Tensor | None:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    return loss if torch.is_tensor(loss) and loss.numel() == 1 else None


def _first_tensor(output: Any) -> torch.Tensor | None:
    if torch.is_tensor(output):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((v for v in values if torch.is_tensor(v) and v.is_floating_point()), None)


def _current_lr(optimizer: Any, lr_scheduler: Any) -> float | None:
    try:
        if lr_scheduler is not None and hasattr(lr_scheduler, "get_last_lr"):
            return float(lr_scheduler.get_last_lr()[0])
        return float(optimizer.param_groups[0]["lr"])
    except Exception:  # an exotic scheduler or optimizer: the lr is optional
        return None
