"""PyTorch Lightning integration: ``ProbeCallback``.

    from lnprobe.integrations.lightning import ProbeCallback
    trainer = lightning.Trainer(callbacks=[ProbeCallback(every=10)], accumulate_grad_batches=2, ...)

Where the measurements come from (Lightning 2.x, automatic optimization): for every micro-batch
Lightning runs ``training_step`` and backward (``on_before_backward`` sees the loss, already divided
by ``accumulate_grad_batches``); after the last micro-batch of an optimizer step, and after AMP
unscaling (``MixedPrecision`` unscales before the hook), it calls ``on_before_optimizer_step``, then
clips the gradients, then steps the optimizer. So:

- activation and hidden-state-gradient statistics come from the probe's hooks during every
  micro-batch of the step (gradient accumulation merged, as in ``lnprobe.attach``);
- the step is closed at ``on_before_optimizer_step``: parameter gradient norms are the accumulated,
  unscaled gradients BEFORE clipping; the loss is the sum of the micro-batches' normalised losses
  (the mean loss of the step); the learning rate is the optimizer's first group's;
- ``updates=True`` adds ``update_rms``/``update_ratio`` of the optimizer step just taken
  (``lnprobe.updates``; the closure order of ``optimizer.step(closure)`` is handled there).

Distributed (DDP): every rank records its micro-batches and the probe reduces them at each flush;
rank 0 writes the run directory and alone holds sinks. The run directory defaults to
``trainer.default_root_dir/lnprobe``. ``log=True`` also sends the probe's summary scalars
(``lnprobe/loss``, ``lnprobe/absmax``, ...) to ``trainer.loggers`` at each flush. The probe is
closed at ``on_fit_end``, or as ``crashed`` by ``on_exception``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as pl
    except ImportError as exc:
        raise ImportError("lnprobe.integrations.lightning needs PyTorch Lightning: pip install lightning") from exc

from ..probe import Probe, attach

__all__ = ["ProbeCallback"]


class ProbeCallback(pl.Callback):
    """Attach an lnprobe probe to the LightningModule and record once per optimizer step.

    ``every``: the probe schedule (int, "log", "log:K" or a list of optimizer steps). ``out``: the run
    directory (default ``trainer.default_root_dir/lnprobe``). ``updates``: also record optimizer
    update statistics. ``log``: forward the summary scalars to ``trainer.loggers``. ``sinks``: more
    live sinks (``lnprobe.sinks``), created by the caller; used on rank 0 only. Other keyword
    arguments go to ``lnprobe.attach``. The probe is ``callback.probe`` while training runs.
    """

    def __init__(self, every: Any = 1, out: str | Path | None = None, *, updates: bool = False, log: bool = False,
                 sinks: list | None = None, **attach_kwargs: Any):
        super().__init__()
        self.every, self.out, self.updates, self.log = every, out, updates, log
        self.sinks = list(sinks or [])
        self.attach_kwargs = attach_kwargs
        self.probe: Probe | None = None
        self._loss: torch.Tensor | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Attach the probe (the strategy has moved and wrapped the model by now)."""
        if self.probe is not None:
            self._close("crashed", "Trainer.fit() ended without on_fit_end")
        out = Path(self.out) if self.out is not None else Path(trainer.default_root_dir) / "lnprobe"
        kw = dict(self.attach_kwargs)
        kw.setdefault("scaler", getattr(trainer.precision_plugin, "scaler", None))
        kw.setdefault("resume", trainer.global_step if trainer.global_step > 0 else False)
        kw.setdefault("config", {"lightning": {
            "accumulate_grad_batches": trainer.accumulate_grad_batches, "precision": str(trainer.precision),
            "gradient_clip_val": trainer.gradient_clip_val, "max_steps": trainer.max_steps,
            "world_size": trainer.world_size,
            "grad_norms_measured": "on_before_optimizer_step (after AMP unscale, before clipping)"}})
        if self.updates:
            kw.setdefault("updates", list(trainer.optimizers))
        if trainer.is_global_zero:
            sinks = list(self.sinks)
            if self.log and trainer.loggers:
                sinks.append(_LoggerSink(trainer))
            kw.setdefault("sinks", sinks or None)
        self.probe = attach(pl_module, out, self.every, **kw)
        self._loss = None

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        """Add the micro-batch's (normalised) loss to the step's loss; no host sync."""
        if self.probe is not None and (self.probe.recording or self.probe.records_step_scalars) \
                and torch.is_tensor(loss):
            d = loss.detach().float()
            self._loss = d if self._loss is None else self._loss + d

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Close the probe step: gradients are complete, unscaled and not yet clipped."""
        if self.probe is None:
            return
        lr = None
        try:
            lr = float(optimizer.param_groups[0]["lr"])
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            pass  # the learning rate is optional
        loss, self._loss = self._loss, None
        self.probe.step(loss=loss, lr=lr)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Flush and close the probe."""
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Close the probe as crashed; the steps flushed so far are kept."""
        self._close("crashed", f"{type(exception).__name__}: {exception}")

    def _close(self, status: str = "finished", error: str | None = None) -> None:
        if self.probe is not None:
            probe, self.probe = self.probe, None
            probe.close(status=status, error=error)


class _LoggerSink:
    """Sends summary scalars to the trainer's loggers (a callable sink; rank 0 only)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def __call__(self, step: int, scalars: dict[str, float]) -> None:
        for logger in self.trainer.loggers:
            logger.log_metrics(scalars, step=step)

    def __repr__(self) -> str:
        return "lightning trainer.loggers"
