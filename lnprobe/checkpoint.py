"""Training checkpoints: model, optimizer, GradScaler, RNG and data-order state in one file.

A checkpoint (``RUN/checkpoint.pt``) is a dict written with ``torch.save``:

- ``step``: optimizer steps done, i.e. the next step to run;
- ``model``: the unwrapped model's state dict (never DDP's ``module.`` names, never FSDP2 shards);
- ``optimizer``: its state dict, or None for an FSDP2 run (``fsdp`` True: weights only, not resumable);
- ``scaler``: the GradScaler's state; ``data_generator``: the training-batch generator's state (the
  data order); the learning-rate schedule has no state of its own: it is ``lr_at(step)``;
- ``rng``: the torch CPU (and CUDA, when initialised) RNG states;
- ``model_config``, ``train_config``: the dicts the run was configured with;
- ``val_history``: ``[step, val_loss]`` pairs computed so far.

It is written atomically (a temporary file in the same directory, then ``os.replace``), so a crash
leaves the previous checkpoint or the new one, never half of one. Restoring it all gives the same
losses as an uninterrupted run (bitwise on CPU with the same thread count).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import store
from .launch import ConfigError

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "rng_state", "set_rng_state", "save_checkpoint",
           "load_checkpoint", "restore", "changed_fields", "refuse_changes", "describe", "OPERATIONAL",
           "ResumePoint", "resume_point", "run_state"]

CHECKPOINT_NAME = "checkpoint.pt"
#: Train-config fields a resume may change without ``force``: where and how visibly the run executes,
#: and how often it saves; none of them changes a loss or a record.
OPERATIONAL = ("progress", "threads", "device", "ckpt_every", "flush_seconds")


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
    with open(tmp, "rb") as f:  # on disk before it replaces the previous checkpoint (a power cut keeps one)
        os.fsync(f.fileno())
    os.replace(tmp, path)


def changed_fields(old_model: dict, old_train: dict, model_config: dict, train_config: dict) -> dict[str, list]:
    """``{key: [old, new]}`` for every setting a resume would change: model fields (``model.<key>``) and
    train fields except :data:`OPERATIONAL` (those may change freely: they do not touch the training).

    A field the old run's config lacks (a setting added in a later version of lnprobe) held its default
    then, since the setting did not exist: it counts as changed only when the new value differs from that
    default, so runs written before the field existed resume without ``--force``."""
    from .models import GPTConfig
    from .train import TrainConfig  # here, not at the top: train imports this module

    changed = {}
    for prefix, old, new, skip, cls in (("model.", old_model, model_config, (), GPTConfig),
                                        ("", old_train, train_config, OPERATIONAL, TrainConfig)):
        defaults = _field_defaults(cls)
        for key in sorted(set(old) | set(new)):
            was = old.get(key, defaults.get(key))
            if key not in skip and was != new.get(key):
                changed[prefix + key] = [was, new.get(key)]
    return changed


def _field_defaults(cls) -> dict[str, Any]:
    """The default of every field of dataclass ``cls`` that has a plain (non-factory) default."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def describe(changed: dict[str, list]) -> str:
    """``lr 0.01 -> 0.02, batch_size 16 -> 32`` (for one-line messages)."""
    return ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changed.items())


def load_checkpoint(path: str | Path, model_config: dict, train_config: dict,
                    force: bool = False) -> tuple[dict, dict[str, list]]:
    """Read a checkpoint to resume a run configured with ``model_config`` and ``train_config`` (dicts).

    Returns ``(checkpoint, changed)``, ``changed`` as :func:`changed_fields`. Raises
    :class:`CheckpointError` when there is none, when it was written by an FSDP2 run, when the run
    already did ``train_config["steps"]`` steps, and, unless ``force``, when any setting changed
    (the message lists them).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"cannot resume: no checkpoint at {path} and no run to restart there; drop --resume "
                              f"to start a new run")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("fsdp"):
        raise CheckpointError(f"cannot resume from {path}: it was written by an --fsdp run and holds the model "
                              f"weights only (no optimizer state); train with DDP (without --fsdp) to resume, or "
                              f"pass --overwrite to discard the run and start again")
    changed = changed_fields(ckpt["model_config"], ckpt["train_config"], model_config, train_config)
    refuse_changes(path, changed, force)
    if ckpt["step"] >= train_config["steps"]:
        raise CheckpointError(f"cannot resume from {path}: the run already did {ckpt['step']} of "
                              f"{train_config['steps']} steps; pass a larger --steps with --force to train further")
    return ckpt, changed


def refuse_changes(where: str | Path, changed: dict[str, list], force: bool) -> None:
    """Raise :class:`CheckpointError` naming the changed settings, unless there are none or ``force``."""
    if changed and not force:
        raise CheckpointError(f"cannot resume {where}: settings differ from the original run ({describe(changed)}); "
                              f"pass the original ones, or --force to resume anyway (the change and its step are "
                              f"recorded in meta.json under 'resumes')")


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


# ----------------------------------------------------------------------------- where a resume continues
@dataclass
class ResumePoint:
    """Where a resumed run continues: its checkpoint (None: restart at step 0, none was written yet),
    the step, the settings it changes (``{key: [old, new]}``) and the old run's meta.json."""

    ckpt: dict | None
    step: int
    changed: dict
    meta: dict


def resume_point(out_dir: str | Path, model_config: dict, train_config: dict, force: bool = False) -> ResumePoint:
    """Where ``--resume`` continues the run in ``out_dir``; CheckpointError when it cannot.

    With a checkpoint: from its step. Without one but with a meta.json (a run killed before its first
    checkpoint): from step 0, after the same check of changed settings against meta.json's config.
    """
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    has_meta = (out_dir / "meta.json").exists()
    if ckpt_path.exists():
        ckpt, changed = load_checkpoint(ckpt_path, model_config, train_config, force=force)
        if not has_meta:
            raise CheckpointError(f"cannot resume: {out_dir} has a checkpoint but no meta.json; pass --overwrite "
                                  f"to discard the checkpoint and start a new run there")
        return ResumePoint(ckpt, int(ckpt["step"]), changed, store.read_meta(out_dir))
    if not has_meta:
        load_checkpoint(ckpt_path, model_config, train_config)  # raises: nothing to resume
    meta = store.read_meta(out_dir)
    changed = changed_fields(store.model_config(meta), store.train_config(meta), model_config, train_config)
    refuse_changes(out_dir, changed, force)
    return ResumePoint(None, 0, changed, meta)


def run_state(out_dir: str | Path) -> str:
    """``status running, last step 57`` for messages about an existing run directory."""
    try:
        meta = store.read_meta(out_dir)
    except (FileNotFoundError, ValueError, OSError):
        return "a checkpoint, no meta.json"
    return f"status {meta.get('status', '?')}, last step {meta.get('last_step', '?')}"
