"""Training checkpoints: model, optimizer, GradScaler, RNG and data-order state in one file.

A checkpoint (``RUN/checkpoint.pt``) is a dict written with ``torch.save``:

- ``step``: optimizer steps done, i.e. the next step to run;
- ``model``: the unwrapped model's state dict (never DDP's ``module.`` names, never FSDP2 shards);
- ``optimizer``: its state dict, or None for an FSDP2 run (``fsdp`` True: weights only, not resumable);
- ``scaler``: the GradScaler's state; ``data_generator``: the training-batch generator's state;
- ``rng``: the torch CPU (and CUDA, when initialised) RNG states;
- ``model_config``, ``train_config``: the dicts the run was configured with;
- ``val_history``: ``[step, val_loss]`` pairs computed so far.

It is written atomically (a temporary file in the same directory, then ``os.replace``), so a crash
leaves the previous checkpoint or the new one, never half of one. Restoring it all gives the same
losses as an uninterrupted run (bitwise on CPU with the same thread count).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .launch import ConfigError

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "rng_state", "set_rng_state", "save_checkpoint",
           "load_checkpoint", "restore"]

CHECKPOINT_NAME = "checkpoint.pt"
# Train-config fields that fix the data order: a resumed run must keep them.
_DATA_ORDER_KEYS = ("seed", "batch_size", "data")


class CheckpointError(ConfigError):
    """A run cannot resume from its checkpoint (missing, written by FSDP2, or for another configuration)."""


def rng_state() -> dict:
    """The torch RNG states: ``{"torch": CPU state}`` plus ``"cuda"`` (every device) once CUDA is initialised."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (the CUDA part only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, *, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    scaler: Any, gen: torch.Generator, model_config: dict, train_config: dict,
                    val_history: list, rank: int = 0, fsdp: bool = False) -> None:
    """Write the checkpoint of ``step`` on rank 0. ``model`` is the unwrapped model (never the DDP wrapper).

    With ``fsdp`` (an FSDP2-sharded model) this is a collective call: every rank gathers the full
    weights (one all-gather per sharded tensor, in the same order everywhere) and rank 0 writes them,
    without the optimizer state (such a checkpoint holds the final weights; it cannot be resumed).
    """
    path = Path(path)
    fsdp = fsdp and any(hasattr(v, "full_tensor") for v in model.state_dict().values())
    if fsdp:
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
                 for k, v in model.state_dict().items()}
    if rank != 0:
        return
    ckpt = {
        "step": step,
        "model": state if fsdp else model.state_dict(),
        "optimizer": None if fsdp else opt.state_dict(),
        "fsdp": fsdp,
        "scaler": scaler.state_dict(),
        "data_generator": gen.get_state(),
        "rng": rng_state(),
        "model_config": model_config,
        "train_config": train_config,
        "val_history": [list(v) for v in val_history],
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, model_config: dict, train_config: dict) -> dict:
    """Read a checkpoint to resume a run configured with ``model_config`` and ``train_config`` (dicts).

    Raises :class:`CheckpointError` when there is none, when it was written by an FSDP2 run, when the
    model configuration differs, when the data order would differ (seed, batch size, corpus) or when
    the run already did ``train_config["steps"]`` steps.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"cannot resume: no checkpoint at {path}; run without --resume to start a new "
                              f"run there")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("fsdp"):
        raise CheckpointError(f"cannot resume from {path}: it was written by an --fsdp run and holds the model "
                              f"weights only (no optimizer state); start a new run, or train with DDP (without "
                              f"--fsdp) to resume")
    if ckpt["model_config"] != model_config:
        diff = sorted(k for k in set(ckpt["model_config"]) | set(model_config)
                      if ckpt["model_config"].get(k) != model_config.get(k))
        raise CheckpointError(f"cannot resume from {path}: it was written for a different model (fields {diff} "
                              f"differ); pass the same preset and overrides as the original run")
    old = ckpt["train_config"]
    for key in _DATA_ORDER_KEYS:
        if old.get(key) != train_config.get(key):
            raise CheckpointError(f"cannot resume from {path}: {key} was {old.get(key)!r}, now "
                                  f"{train_config.get(key)!r}; pass the original {key} so the data order continues")
    if ckpt["step"] >= train_config["steps"]:
        raise CheckpointError(f"cannot resume from {path}: the run already did {ckpt['step']} of "
                              f"{train_config['steps']} steps; pass a larger --steps to train further")
    return ckpt


def restore(ckpt: dict, *, opt: torch.optim.Optimizer, scaler: Any, gen: torch.Generator) -> int:
    """Load the optimizer, scaler, data-generator and RNG states of ``ckpt``; return its step.

    The model's weights are loaded separately (``model.load_state_dict(ckpt["model"])``), before
    the model is moved to its device and wrapped.
    """
    opt.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    gen.set_state(ckpt["data_generator"])
    set_rng_state(ckpt["rng"])
    return int(ckpt["step"])
