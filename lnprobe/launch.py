"""Where a training run executes: device and precision, the ``torchrun`` launch, DDP / FSDP2 wrapping.

Device selection: ``"auto"`` is cuda if available, then mps, then cpu; an explicit device must exist.
Precision: ``"auto"`` is bf16 autocast on CUDA and fp32 elsewhere; ``"fp16"`` is autocast with a
``torch.amp.GradScaler`` (the trainer's); ``"bf16"`` autocast without one.

Distributed (``torchrun --nproc-per-node N``, i.e. ``WORLD_SIZE > 1`` in the environment): each rank
reads its place from torchrun's environment (:meth:`Launch.from_env`), runs on ``cuda:LOCAL_RANK`` (or
the CPU), and :func:`process_group` initialises the process group (nccl on CUDA, gloo on CPU) unless
the caller did so, destroying it on exit (also on errors) only when it was initialised there.
:func:`wrap` puts the model in DDP, or with ``fsdp=True`` shards it with FSDP2 (``fully_shard`` on
each block, then on the model).

Stopping: :class:`StopSignals` turns the first SIGINT or SIGTERM into a request that every rank
honours after the same step (:func:`loss_and_stop` folds it into the step's one all-reduce).
"""
from __future__ import annotations

import gc
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = ["ConfigError", "DTYPES", "Launch", "resolve_device", "resolve_dtype", "autocast", "cpu_threads",
           "check_out_dir", "rank_device", "process_group", "wrap", "mean_across_ranks", "loss_and_stop",
           "Interrupted", "StopSignals"]

DTYPES = ("auto", "fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A run cannot start as configured (bad option, missing or short corpus, no such device, no checkpoint).

    The message says what was expected, what was found and what to do; the CLI prints it as one line.
    """


# ----------------------------------------------------------------------------- devices and dtypes
def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: cuda if available, then mps, then cpu; an explicit device must be available.

    Raises :class:`ConfigError` (a ValueError) for an unavailable or unknown device.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {device!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available on this machine "
                              f"(torch {torch.__version__}); use --device cpu or --device auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) "
                              f"exist; use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not _mps_available():
            raise ConfigError(f"device {device!r} requested but MPS is not available; use --device cpu or auto")
    elif dev.type != "cpu":
        raise ConfigError(f"unsupported device {device!r}: expected auto, cpu, cuda, cuda:N or mps")
    return dev


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """The concrete precision: "auto" is "bf16" on CUDA and "fp32" elsewhere."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return dtype


def autocast(device: torch.device, dtype: str):
    """The forward's autocast context for a concrete precision (a no-op context for fp32)."""
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def cpu_threads() -> int:
    """CPU cores this process may use (its affinity mask on Linux, else every core)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_out_dir(out_dir) -> None:
    """ConfigError unless ``out_dir`` is a directory this process may write in, or can be made one.

    Creates nothing: a run refused later (a bad option, a missing corpus) leaves no directory behind.
    """
    from pathlib import Path

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a directory; pass a directory for the run")
    base = out_dir.absolute()
    while not base.exists() and base != base.parent:  # the nearest existing ancestor is where mkdir writes
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"cannot write the run directory {out_dir}: {base} is a file; pass an --out where you "
                          f"may write")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the run directory {out_dir}: permission denied on {base}; pass an --out "
                          f"where you may write")


# ----------------------------------------------------------------------------- the launch
@dataclass
class Launch:
    """This process in a ``torchrun`` launch (``rank=0, world=1`` for a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    owns_group: bool = False  # initialised by process_group(), so destroyed there

    @property
    def on(self) -> bool:
        """True in a distributed run (more than one process)."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """True on rank 0, the only rank that shows progress and writes files."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Launch":
        """Rank and world size from torchrun's environment (or an already initialised process group)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
        else:
            world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        return cls(rank, world, local_rank, max(1, local_world))


def rank_device(launch: Launch, device: torch.device, *, batch_size: int, dtype: str = "auto",
                fsdp: bool = False, resume: bool = False) -> torch.device:
    """The device of this rank for a run asked on ``device``; ConfigError for an unsupported setup.

    ``batch_size`` is the global batch (it must split evenly over the ranks); ``dtype`` the asked
    precision (FSDP2 refuses fp16); ``resume``: whether the run continues a checkpoint (FSDP2 cannot).
    """
    if fsdp and not launch.on:
        raise ConfigError("--fsdp shards the model over processes but this is a single process (WORLD_SIZE is "
                          "not > 1); launch with 'torchrun --nproc-per-node N -m lnprobe train ...' (N ≥ 2) or "
                          "drop --fsdp")
    if not launch.on:
        return device
    if batch_size % launch.world:
        raise ConfigError(f"batch_size {batch_size} is the global batch and must be divisible by the "
                          f"{launch.world} processes; pass a multiple of {launch.world}")
    if fsdp and resume:
        raise ConfigError("--resume with --fsdp is not supported: FSDP2 checkpoints hold the model weights only, "
                          "not the sharded optimizer state; start a new run, or use DDP (drop --fsdp) to resume")
    if fsdp and resolve_dtype(dtype, device) == "fp16":
        raise ConfigError("--fsdp with --dtype fp16 is not supported (the GradScaler does not handle sharded "
                          "gradients); use --dtype bf16 or fp32")
    if device.type == "cuda":
        if launch.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {launch.local_rank} has no GPU: only {torch.cuda.device_count()} CUDA "
                              f"device(s); pass --nproc-per-node ≤ {torch.cuda.device_count()}")
        return torch.device("cuda", launch.local_rank)  # each rank its own GPU, whatever index was asked
    if device.type != "cpu":
        raise ConfigError(f"distributed training runs on CUDA (nccl) or CPU (gloo), not on {device.type}; "
                          f"pass --device cuda or --device cpu")
    return device


@contextmanager
def process_group(launch: Launch, device: torch.device) -> Iterator[Launch]:
    """Initialise the process group of a distributed launch for the body; destroy it after if made here.

    A single process (``launch.on`` false) gets no process group. On CUDA the rank's device becomes
    the current device first (nccl needs it).
    """
    if not launch.on:
        yield launch
        return
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        launch.owns_group = True
    ok = False
    try:
        yield launch
        ok = True
    finally:
        if launch.owns_group:
            launch.owns_group = False
            if ok:
                # No rank tears its connections down while a peer is still in the last collective
                # (on an error the peers may be dead or elsewhere, and a barrier could hang).
                dist.barrier()
            # The DDP reducer / FSDP2 state in reference cycles hold the group: free them here, so its
            # worker threads are joined now rather than during interpreter finalisation.
            gc.collect()
            dist.destroy_process_group()


def wrap(model: torch.nn.Module, launch: Launch, device: torch.device, fsdp: bool = False) -> torch.nn.Module:
    """DDP (default) or FSDP2 (``fully_shard`` on each of ``model.blocks``, then on the model).

    A single process gets the model itself. FSDP2 shards in place and returns ``model``; DDP returns
    the wrapper (its ``.module`` is ``model``).
    """
    if not launch.on:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)  # in place: the embeddings, final norm and head form the root group
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean_across_ranks(value: torch.Tensor, launch: Launch) -> torch.Tensor:
    """Mean of a scalar over the ranks as a (1,) float64 tensor (the value itself for one process).

    A NaN/Inf on any rank survives, so every rank takes the same decision on it.
    """
    v = value.detach().double().reshape(1)  # (1,)
    if not launch.on:
        return v
    import torch.distributed as dist

    v = v.clone()
    dist.all_reduce(v)  # SUM: gloo has no AVG
    return v / launch.world


def loss_and_stop(loss: torch.Tensor, stop: bool, launch: Launch) -> tuple[float, bool]:
    """The mean of the ranks' losses and whether any rank was asked to stop, from ONE all-reduce.

    Every rank gets the same answers, so every rank stops after the same step (a rank that stopped
    alone would leave the others hanging in the next collective). One host sync, as for the loss alone.
    """
    v = torch.cat([loss.detach().double().reshape(1),
                   torch.tensor([1.0 if stop else 0.0], dtype=torch.float64).to(loss.device)])  # (2,)
    if launch.on:
        import torch.distributed as dist

        dist.all_reduce(v)  # SUM: gloo has no AVG
    total, stops = v.tolist()
    return total / launch.world, stops > 0


# ----------------------------------------------------------------------------- stop signals
class Interrupted(KeyboardInterrupt):
    """A second SIGINT or SIGTERM: stop at once (``signum`` says which; the exit code is 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum} ({_signal_name(signum)}) received twice")
        self.signum = signum


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


class StopSignals:
    """SIGINT and SIGTERM (Slurm's preemption, ``kill``) as a request to stop after the current step.

    Inside ``with StopSignals() as stop``: the first signal sets ``stop.signum`` (the trainer then
    flushes, checkpoints and ends with status ``interrupted`` after the step it is in); a second one
    raises :class:`Interrupted` at once. Installed only in the main thread (Python delivers signals
    there); the previous handlers are restored on exit.
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        import sys

        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        if self.announce:
            print(f"lnprobe: {_signal_name(signum)} received: stopping after this step (records flushed, checkpoint "
                  f"written); send it again to stop now", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                num = getattr(signal, name, None)
                if num is not None:
                    self._old[num] = signal.signal(num, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for num, old in self._old.items():
            signal.signal(num, old)
        self._old.clear()
