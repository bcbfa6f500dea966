"""Train the reference GPT on a token corpus with a probe attached: the runs that lnprobe analyses.

One optimizer step ``k`` (0-based) is: draw batch ``k`` -> forward -> backward -> (AMP unscale) ->
``probe.step(loss, lr)`` (records step ``k`` when scheduled) -> gradient clipping -> ``opt.step()``.
So step 0 is recorded before the first update, and the statistics of step ``k`` describe the
parameters ``θ_k`` after ``k`` updates. The probe records the steps of ``every`` plus the last step
``steps - 1`` (meta ``schedule`` then has ``plus_last``).

Definitions:
- learning rate at step ``k``: linear warmup ``lr·(k+1)/warmup`` for ``k < warmup`` (so ``lr`` is
  reached at step ``warmup - 1``), then cosine decay to ``lr·min_lr_ratio`` at the last step ``steps - 1``;
- AdamW with weight decay on every parameter of two or more dimensions (matrices, embeddings);
  norm gains and biases are not decayed;
- ``val_loss`` at step ``k`` (a ``train`` row): mean cross-entropy of ``θ_k`` over ``eval_batches``
  validation batches, computed before the training forward of step ``k`` every ``eval_every`` steps,
  and once more at the end, labelled ``steps`` (the final parameters). The validation batches are
  the same at every evaluation (their own generator, seeded from ``seed``), under ``model.eval()``
  and ``torch.no_grad()``, so the probe does not record them;
- data order: one CPU ``torch.Generator`` seeded with ``seed`` draws every training batch, so runs
  with the same seed see identical batches whatever the placement, model size or device.

Checkpoints (``OUT/checkpoint.pt``, :mod:`lnprobe.checkpoint`, written atomically) hold the model,
optimizer, step, GradScaler, data-generator state and torch RNG states. One is written every
``ckpt_every`` steps (default 100) and at the end, each time right AFTER the probe has flushed the
records of every step before it, so on disk the records always reach at least the checkpoint.
Between checkpoints the probe also flushes every ``flush_seconds`` (default 60 s). What a kill
loses, then: SIGKILL (or a power cut) loses the records of at most the last ``flush_seconds``, and
``resume=True`` recomputes everything after the last checkpoint; an exception is recorded with status
``crashed`` after a last flush. SIGTERM and SIGINT (:class:`lnprobe.launch.StopSignals`) stop
the run after the current step: records flushed, checkpoint written, status ``interrupted`` (a
second signal stops at once, as an exception would). ``resume=True`` continues from the last
checkpoint (from step 0 when the run had none yet), drops the records past it
(:func:`lnprobe.store.trim`), so every step is recorded exactly once, and gives the same losses
and records as an uninterrupted run (bitwise on CPU with the same thread count). It refuses changed
settings (:func:`lnprobe.checkpoint.changed_fields`) unless ``force=True``, which records them in
meta.json's ``resumes`` (``[{step, changed: {key: [old, new]}, time, previous_status, ...}]``).
A directory that holds a run is never discarded without ``overwrite=True``.
A non-finite loss stops the run cleanly: the step is recorded, ``meta.json`` gets
``status="diverged"`` and a ``divergence`` entry, and no checkpoint of the broken model is written.

Distributed (``torchrun --nproc-per-node N``, i.e. ``WORLD_SIZE > 1`` in the environment; the launch
itself is :mod:`lnprobe.launch`): the process group is initialised for the run (nccl on CUDA with
device ``cuda:LOCAL_RANK``, gloo on CPU) unless the caller did so, and destroyed at the end (also on
errors) when it was initialised for it. The model is wrapped in DDP, or with ``fsdp=True`` sharded
with FSDP2 (``fully_shard`` on each block, then on the model); the probe is attached after wrapping
and reduces its statistics across ranks.
``batch_size`` is the GLOBAL batch: every rank draws the same global batch from the shared-seed
generator and keeps its own ``batch_size / N`` rows, so N ranks together see exactly the batches of
one process. The loss that is logged and checked for divergence is the mean of the ranks' losses
(one all-reduce per step, so every rank takes the same decision); validation batches are split the
same way and their losses averaged across ranks. Only rank 0 shows progress and writes files.
Checkpoints under DDP hold the unwrapped model and resume like a single process. Under FSDP2 the
checkpoint holds the full (gathered) model weights only and ``--resume`` is refused: resuming a
sharded optimizer would need ``torch.distributed.checkpoint``, which this trainer does not use.
Dropout masks are drawn per rank, so with ``dropout > 0`` a distributed run is not bitwise the
single-process run (with dropout 0 it equals it up to float rounding of the gradient all-reduce).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, launch, store
from .burst import Burst
from .checkpoint import CHECKPOINT_NAME, CheckpointError
from .data import CorpusError, TokenData
from .launch import DTYPES, ConfigError, Launch, autocast, resolve_device, resolve_dtype
from .memory import check_fits
from .models import GPT, GPTConfig
from .probe import attach
from .schedule import Schedule
from .sinks import TensorBoard

# ConfigError, CheckpointError, resolve_device, resolve_dtype and CHECKPOINT_NAME live in launch and
# checkpoint; they are named here too because they are part of what a caller of train() handles.
__all__ = ["TrainConfig", "TrainResult", "ConfigError", "CheckpointError", "resolve_device", "resolve_dtype",
           "lr_at", "probe_schedule", "evaluate", "train", "CHECKPOINT_NAME"]

# Offset that separates the validation generator's seed from the training one.
_VAL_SEED_OFFSET = 1_000_003


@dataclass
class TrainConfig:
    """How to train. ``seq_len=None`` takes the model's; ``warmup=None`` means ``min(50, steps // 10)``.

    ``device``: "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:N" or "mps".
    ``dtype``: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "fp32", "bf16" (autocast) or "fp16"
    (autocast + ``torch.amp.GradScaler``). ``every``: the probe schedule (N, "log", "log:K" or a list
    of steps). ``eval_every``: validation period in steps (0: only at the end). ``ckpt_every``:
    checkpoint period in steps (0: only at the end; records are flushed first, so a checkpoint and the
    records up to it are on disk together). ``flush_seconds``: the probe also flushes at the first step
    that many seconds after its last flush (None: no time bound), so a kill loses at most that.
    ``data``: "stdlib", a text file or a ``.bin``.
    ``threads``: torch CPU threads (None: every core this process may use; never more than that).
    A resumed run reproduces the uninterrupted one bitwise on CPU when the thread count is the same.
    ``fsdp``: under torchrun, shard the model with FSDP2 instead of wrapping it in DDP.
    ``tensorboard``: a directory for live TensorBoard event files (``lnprobe.sinks.TensorBoard``; rank 0).
    ``attn_logits``: also record the ``logits`` and ``attn_logits`` sites (``lnprobe.attnlogits``).
    ``burst``: N > 0 records every step for N steps after a loss or gradient-norm spike (``lnprobe.Burst``),
    with the residual stream of the ``burst_history`` unrecorded steps before it; 0: off (one process only).
    An invalid field raises :class:`ConfigError` (a ValueError) saying what is accepted.
    """

    steps: int = 400
    lr: float = 1e-2
    min_lr_ratio: float = 0.1
    warmup: int | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    batch_size: int = 16
    seq_len: int | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    every: Any = 10
    eval_every: int = 50
    eval_batches: int = 4
    ckpt_every: int = 100
    flush_seconds: float | None = 60.0
    data: str = "stdlib"
    progress: bool = True
    threads: int | None = None
    fsdp: bool = False
    tensorboard: str | None = None
    attn_logits: bool = False
    burst: int = 0
    burst_history: int = 16

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        for name in ("eval_every", "ckpt_every", "seed", "burst", "burst_history"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"TrainConfig.{name} must be an int ≥ 0, got {v!r}")
        if self.flush_seconds is not None and not (isinstance(self.flush_seconds, (int, float))
                                                   and self.flush_seconds >= 0):
            raise ConfigError(f"TrainConfig.flush_seconds must be a number ≥ 0 or None, got {self.flush_seconds!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"TrainConfig.threads must be a positive int or None, got {self.threads!r}")
        if not isinstance(self.eval_batches, int) or self.eval_batches < 1:
            raise ConfigError(f"TrainConfig.eval_batches must be a positive int, got {self.eval_batches!r}")
        if self.warmup is not None and (not isinstance(self.warmup, int) or self.warmup < 0):
            raise ConfigError(f"TrainConfig.warmup must be an int ≥ 0 or None, got {self.warmup!r}")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len < 1):
            raise ConfigError(f"TrainConfig.seq_len must be a positive int or None, got {self.seq_len!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"TrainConfig.lr must be a positive finite number, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError(f"TrainConfig.grad_clip and weight_decay must be ≥ 0 (0 disables clipping), "
                             f"got {self.grad_clip!r} and {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"TrainConfig.dtype={self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        try:
            Schedule.parse(self.every)
        except ValueError as exc:  # the schedule's message lists the accepted forms
            raise ConfigError(str(exc)) from None

    @property
    def warmup_steps(self) -> int:
        """The warmup length in steps (``warmup`` resolved)."""
        return min(50, self.steps // 10) if self.warmup is None else self.warmup

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (``warmup`` resolved; a schedule list kept as a list)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["warmup"] = self.warmup_steps
        if not isinstance(self.every, (int, str)):
            d["every"] = [int(s) for s in self.every]
        if not self.burst:  # bursts off: the dict of a run made before bursts existed (resume compares them)
            del d["burst"], d["burst_history"]
        return d


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    ``steps``: optimizer steps done in total (including those before a resume); ``final_loss``: the
    training loss of the last step run (NaN/Inf when diverged); ``val_loss``: the last validation loss
    computed (None when none was); ``tokens_per_s``: training tokens per wall-clock second of this
    call's loop (evaluation and checkpoint time included); ``status``: "finished", "stopped" (by
    ``stop_after``), "interrupted" (by SIGINT/SIGTERM: ``signal`` is its number; the checkpoint of
    ``steps`` is written) or "diverged"; ``diverged_step``: the step whose loss was not finite.
    ``rank``/``world_size``: this process in a distributed run (0 and 1 otherwise); only rank 0 wrote.
    """

    run_dir: Path
    status: str
    steps: int
    final_loss: float | None
    val_loss: float | None
    tokens_per_s: float
    elapsed_s: float
    diverged_step: int | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    val_history: list[tuple[int, float]] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    signal: int | None = None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step``: linear warmup, then cosine to ``lr · min_lr_ratio``."""
    warmup = cfg.warmup_steps
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    floor = cfg.lr * cfg.min_lr_ratio
    peak = max(warmup - 1, 0)  # the step at which lr is reached (the last warmup step, or step 0)
    progress = min(1.0, (step - peak) / max(1, cfg.steps - 1 - peak))  # 0 at the peak, 1 at the last step
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def probe_schedule(cfg: TrainConfig) -> Schedule:
    """The steps the probe records: ``cfg.every`` (N, "log", "log:K" or a list) plus the last step."""
    return Schedule.parse(cfg.every).with_last(cfg.steps - 1)


# ----------------------------------------------------------------------------- setup
@dataclass
class _Setup:
    device: torch.device
    dtype: str
    seq_len: int
    data: TokenData


def _prepare(model_cfg: GPTConfig, cfg: TrainConfig) -> _Setup:
    """Resolve device and precision, load the corpus and check it holds a window; ConfigError otherwise."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"dtype bf16 requested but {torch.cuda.get_device_name(device)} does not support it; "
                          f"use --dtype fp16 or fp32")
    seq_len = model_cfg.seq_len if cfg.seq_len is None else cfg.seq_len
    if seq_len > model_cfg.seq_len:
        raise ConfigError(f"seq_len {seq_len} exceeds the model's seq_len {model_cfg.seq_len} (its position "
                          f"table); pass a seq_len ≤ {model_cfg.seq_len} or build the model with a larger one")
    try:
        data = TokenData.load(cfg.data, vocab_size=model_cfg.vocab_size)
        data.check_window(seq_len)
    except (FileNotFoundError, CorpusError) as exc:  # the corpus's own message says what to pass instead
        raise ConfigError(str(exc)) from exc
    if data.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"corpus {cfg.data!r} has vocabulary {data.vocab_size} but the model has "
                          f"vocab_size {model_cfg.vocab_size}; build the model with vocab_size ≥ {data.vocab_size}")
    return _Setup(device, dtype, seq_len, data)


def _optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused AdamW: one kernel per step on CUDA, and on CPU ~4 ms less per step of the tiny preset
    # (measured: 1.4 ms against 5.1 ms); the default implementation where fusing is not supported.
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


@torch.no_grad()
def evaluate(model: GPT, data: TokenData, cfg: TrainConfig, seq_len: int, device: torch.device, dtype: str,
             shard: tuple[int, int] = (0, 1)) -> float:
    """Mean validation loss over ``cfg.eval_batches`` fixed batches, in eval mode (not recorded by the probe).

    ``shard=(rank, world)``: evaluate only this rank's ``batch_size / world`` rows of each batch (the
    batches themselves are the same on every rank); the mean over ranks is then the global mean.
    """
    rank, world = shard
    per = cfg.batch_size // world
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + _VAL_SEED_OFFSET)
    total = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for _ in range(cfg.eval_batches):
            x, y = data.batch("val", cfg.batch_size, seq_len, gen, device)  # (B, T) each
            x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]  # (B / world, T) each
            with autocast(device, dtype):
                _, loss = model(x, y)
            total += loss.double()
    finally:
        model.train(was_training)
    return float(total.item()) / cfg.eval_batches


# ----------------------------------------------------------------------------- training
def train(model_cfg: GPTConfig, train_cfg: TrainConfig, out_dir: str | Path, resume: bool = False,
          stop_after: int | None = None, overwrite: bool = False, force: bool = False) -> TrainResult:
    """Train a reference GPT with a probe attached, writing the run directory ``out_dir``.

    ``resume``: continue the run in ``out_dir`` from its checkpoint (from step 0 when it was stopped
    before its first one), dropping its records past that step and appending; a changed setting
    (:func:`lnprobe.checkpoint.changed_fields`) is refused unless ``force``, and then recorded in
    meta.json's ``resumes``. Without ``resume`` a directory that already holds a run is refused
    unless ``overwrite`` (which discards its records and checkpoint). ``stop_after``: stop once that
    many optimizer steps are done in total (checkpoint written, status "stopped"), e.g. to test
    resuming. Raises :class:`ConfigError` (:class:`CheckpointError` for a checkpoint that cannot be
    resumed) before training when the configuration, corpus, device, memory, output directory or
    checkpoint is unusable. Under ``torchrun`` (``WORLD_SIZE > 1``) every rank calls this; see the
    module docstring for what differs.
    """
    out_dir = Path(out_dir)
    cfg = train_cfg
    ctx = Launch.from_env()
    launch.check_out_dir(out_dir)
    setup = _prepare(model_cfg, cfg)
    setup.device = launch.rank_device(ctx, setup.device, batch_size=cfg.batch_size, dtype=cfg.dtype,
                                      fsdp=cfg.fsdp, resume=resume)
    if stop_after is not None and stop_after < 0:
        raise ConfigError(f"stop_after must be ≥ 0, got {stop_after}")
    check_fits(model_cfg, cfg.batch_size, cfg.batch_size // ctx.world, setup.seq_len, setup.dtype, setup.device,
               processes=ctx.local_world if setup.device.type == "cpu" else 1)
    held = (out_dir / "meta.json").exists() or (out_dir / CHECKPOINT_NAME).exists()
    if resume:
        res = checkpoint.resume_point(out_dir, model_cfg.to_dict(), cfg.to_dict(), force)
    elif held and not overwrite:
        raise ConfigError(f"{out_dir} already holds a run ({checkpoint.run_state(out_dir)}); pass --resume to "
                          f"continue it, or --overwrite to discard its records and checkpoint")
    else:
        res = None
    with launch.process_group(ctx, setup.device):
        return _train(model_cfg, cfg, out_dir, setup, ctx, res, stop_after, overwrite and held)


def _train(model_cfg: GPTConfig, cfg: TrainConfig, out_dir: Path, setup: _Setup, ctx: Launch,
           res: checkpoint.ResumePoint | None, stop_after: int | None, overwrite: bool) -> TrainResult:
    device, dtype, seq_len, data = setup.device, setup.dtype, setup.seq_len, setup.data
    if cfg.burst and ctx.on:
        raise ConfigError("--burst is not supported under torchrun yet (the ranks would have to agree on every "
                          "burst decision); run without --burst")
    ckpt_path = out_dir / CHECKPOINT_NAME
    ckpt = res.ckpt if res is not None else None
    if res is None and ctx.main and ckpt_path.exists():
        ckpt_path.unlink()  # --overwrite: never resume later from the discarded run's state
    if device.type == "cpu":
        # Ranks on one machine share its cores (torchrun's OMP_NUM_THREADS=1 would be overridden here).
        cores = max(1, launch.cpu_threads() // ctx.local_world)
        torch.set_num_threads(cores if cfg.threads is None else min(cfg.threads, cores))

    torch.manual_seed(cfg.seed)  # model initialisation (on the CPU, so identical on every device)
    base = GPT(model_cfg)
    gen = torch.Generator().manual_seed(cfg.seed)  # the one source of the training data order
    start = 0
    val_history: list[tuple[int, float]] = []
    if ckpt is not None:
        try:
            base.load_state_dict(ckpt["model"])
        except RuntimeError as exc:  # --force over a changed model shape
            raise CheckpointError(f"cannot resume from {ckpt_path}: its weights do not fit this model "
                                  f"({str(exc).splitlines()[0]}); pass the original model options") from None
    base.to(device)
    base.train()
    model = launch.wrap(base, ctx, device, fsdp=cfg.fsdp)  # DDP wrapper, FSDP2-sharded `base` itself, or `base`
    # DDP's forward is for training (it prepares the gradient all-reduce); evaluate the module under it.
    eval_model = model if cfg.fsdp else base
    opt = _optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    resume_meta: dict[str, Any] = {}
    if res is not None:
        if ckpt is not None:
            start = checkpoint.restore(ckpt, opt=opt, scaler=scaler, gen=gen)
            val_history = [(int(s), float(v)) for s, v in ckpt["val_history"]]
        if ctx.main:
            store.trim(out_dir, start)
            for tmp in out_dir.glob(f".{CHECKPOINT_NAME}.tmp-*"):  # a checkpoint write the kill cut short
                tmp.unlink(missing_ok=True)
        entry = {"step": start, "changed": res.changed,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "previous_status": res.meta.get("status"), "previous_last_step": res.meta.get("last_step")}
        resume_meta = {"resumed_from": list(res.meta.get("resumed_from", [])) + [start],
                       "resumes": list(res.meta.get("resumes", [])) + [entry]}

    schedule = probe_schedule(cfg)
    probe = attach(  # after wrapping: under DDP/FSDP2 it reduces across ranks and only rank 0 writes
        model, out_dir, every=schedule, scaler=scaler if dtype == "fp16" else None,
        config={"model": model_cfg.to_dict(), "train": cfg.to_dict(), "data": data.description,
                "device": str(device), "dtype": dtype, "world_size": ctx.world,
                "parallel": ("fsdp2" if cfg.fsdp else "ddp") if ctx.on else "none"},
        run_name=out_dir.name, resume=start if res is not None else False, flush_every=20,
        flush_seconds=cfg.flush_seconds,
        # ∂L/∂a at the MLP output before its output norm feeds the Proposition 3.1 check of the report
        grad_sites=("resid", "mlp_raw"), overwrite=overwrite,
        sinks=[TensorBoard(cfg.tensorboard)] if cfg.tensorboard and ctx.main else None,
        logits=cfg.attn_logits, attn_logits=cfg.attn_logits,
        burst=Burst(steps=cfg.burst, history=cfg.burst_history) if cfg.burst else None,
    )
    if resume_meta:
        probe.update_meta(**resume_meta)

    def save(step: int) -> None:
        # Records first: a checkpoint on disk always has the records of every step before it on disk.
        probe.flush()
        checkpoint.save_checkpoint(ckpt_path, step=step, model=base, opt=opt, scaler=scaler, gen=gen,
                                   model_config=model_cfg.to_dict(), train_config=cfg.to_dict(),
                                   val_history=val_history, rank=ctx.rank, fsdp=cfg.fsdp)

    def validate(step: int) -> None:
        local = evaluate(eval_model, data, cfg, seq_len, device, dtype, shard=(ctx.rank, ctx.world))
        v = float(launch.mean_across_ranks(torch.tensor(local, device=device), ctx).item())
        val_history.append((step, v))
        probe.log_scalars({"val_loss": v}, step=step)

    per = cfg.batch_size // ctx.world  # this rank's rows of the global batch
    tokens_per_step = cfg.batch_size * seq_len
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    status, diverged_step, last_loss = "finished", None, None
    t0 = time.perf_counter()
    bar = _progress(cfg, start, end) if ctx.main else None
    step = done = start
    signals = launch.StopSignals(announce=ctx.main)
    try:
        with signals:
            for step in range(start, end):
                if cfg.eval_every and step % cfg.eval_every == 0:
                    validate(step)
                lr = lr_at(step, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                x, y = data.batch("train", cfg.batch_size, seq_len, gen, device)  # (B, T) each: the global batch
                x, y = x[ctx.rank * per:(ctx.rank + 1) * per], y[ctx.rank * per:(ctx.rank + 1) * per]  # (B / N, T)
                with autocast(device, dtype):
                    _, loss = model(x, y)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)  # a no-op when the scaler is disabled
                probe.step(loss=loss, lr=lr)  # records step `step` (if scheduled), before clipping and the update
                # The ranks' losses differ (their rows differ): decide on their mean, the same on every rank;
                # a stop signal on any rank stops every rank after this step.
                last_loss, stop = launch.loss_and_stop(loss, signals.signum is not None, ctx)
                # The probe writes loss, grad_norm and lr rows at every step (per-step train scalars);
                # the diverging step also gets its nonfinite_loss row when the schedule skipped it.
                if not math.isfinite(last_loss):
                    status, diverged_step = "diverged", step
                    if not schedule(step):
                        probe.log_scalars({"nonfinite_loss": 1.0}, step=step)
                    reason = f"loss is {last_loss} at step {step}"
                    probe.update_meta(divergence={"step": step, "reason": reason, "loss": str(last_loss), "lr": lr})
                    break
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                done = step + 1
                if stop:
                    status = "interrupted"
                    break
                if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < end:
                    save(done)
                if bar is not None:
                    bar.update(1)
                    if step % 5 == 0 or done == end:
                        elapsed = time.perf_counter() - t0
                        bar.set_postfix(loss=f"{last_loss:.3f}",
                                        tok_s=f"{(done - start) * tokens_per_step / elapsed:.0f}")
            else:
                if end < cfg.steps:
                    status = "stopped"
                else:
                    validate(end)
            if status != "diverged":
                save(done)  # never a checkpoint of a diverged model
    except BaseException as exc:
        kind = "interrupted" if isinstance(exc, KeyboardInterrupt) else "crashed"
        probe.close(status=kind, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    steps_run = (step + 1 - start) if status == "diverged" else (done - start)
    result = TrainResult(
        run_dir=out_dir, status=status, steps=start + steps_run if status != "diverged" else step,
        final_loss=last_loss, val_loss=val_history[-1][1] if val_history else None,
        tokens_per_s=steps_run * tokens_per_step / elapsed if elapsed > 0 else float("nan"),
        elapsed_s=elapsed, diverged_step=diverged_step, device=str(device), dtype=dtype,
        val_history=list(val_history), rank=ctx.rank, world_size=ctx.world,
        signal=signals.signum if status == "interrupted" else None,
    )
    probe.update_meta(result={"status": status, "steps": result.steps, "final_loss": _json_float(last_loss),
                              "val_loss": result.val_loss, "tokens_per_s": result.tokens_per_s,
                              "diverged_step": diverged_step})
    fields = {"error": f"stopped by {launch._signal_name(signals.signum)} after step {done - 1}"} \
        if status == "interrupted" else {}
    probe.close(status=status, **fields)
    return result


def _json_float(v: float | None) -> float | str | None:
    return v if v is None or math.isfinite(v) else str(v)


def _progress(cfg: TrainConfig, start: int, end: int):
    if not cfg.progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=end, initial=start, unit="step", dynamic_ncols=True, leave=False)
