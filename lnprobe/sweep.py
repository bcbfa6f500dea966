"""Sweeps: placements × learning rates × seeds (× depths × widths) of the reference GPT, one run each.

A sweep directory ``DIR`` holds one run directory per grid point, ``DIR/runs/<name>`` (``name`` =
``<placement>_lr<lr>_s<seed>_L<layers>_D<d_model>``), ``DIR/summary.csv`` (one row per run, columns
:data:`SUMMARY_COLUMNS`) and ``DIR/report/`` (figures, report.md/html and verdicts.json over all the
runs, through :func:`lnprobe.analysis.report.build_report` with the sweep figures added).

Runs train in worker processes (spawned, one torch thread each: a model this small does not speed up
with a second intra-op thread, so the cores are better spent on runs side by side), at most ``jobs``
at a time. A sweep is resumable: a run whose ``meta.json`` says ``status: finished`` or ``diverged``
(both are final outcomes of the same configuration) and whose recorded configuration equals the
requested one is kept and skipped; an unfinished run of that configuration (crashed, interrupted,
stopped, killed) continues from its last checkpoint, with the records past it trimmed; a directory
holding other settings is refused unless ``overwrite`` (nothing recorded is discarded unasked). Each
run prints one progress line when it ends.

Definitions of the summary columns (all read back from the run directory):
- ``final_loss``: training loss of the last step run; ``val_loss``: the last validation loss (the
  final parameters for a finished run);
- ``m2_last``: mean x² of the residual stream leaving the last block (``resid``, layer L) at the
  last recorded step; ``max_absmax``: the largest |x| of ``resid`` over all recorded layers and
  steps; ``max_top1_over_median``: the largest top1/median_abs of ``resid`` over layers and steps
  (Sun et al.'s ratio; massive needs ≥ 1000 together with |x| > 100);
- ``diverged`` / ``diverged_step``: the run stopped at a non-finite loss, and at which step;
- ``loss_spikes`` / ``grad_spikes``: spike counts (docs/theory.md §5: ≥ 7σ above the mean of the
  previous values) of the training loss and of the global gradient norm (probed steps only).
"""
from __future__ import annotations

import csv
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .launch import ConfigError, cpu_threads

__all__ = ["SweepSpec", "SweepRun", "SweepResult", "SUMMARY_COLUMNS", "grid", "run_sweep", "summarize",
           "write_summary", "read_summary", "parse_list", "DEFAULT_SWEEP"]

SUMMARY_COLUMNS = ("name", "placement", "lr", "seed", "layers", "d_model", "steps", "status", "final_loss",
                   "val_loss", "m2_last", "max_absmax", "max_top1_over_median", "diverged", "diverged_step",
                   "loss_spikes", "grad_spikes", "elapsed_s")
_FINAL = ("finished", "diverged")


@dataclass
class SweepSpec:
    """The grid and the settings shared by its runs.

    ``depths``/``widths``: numbers of blocks and model widths (None: the preset's); every other field
    is the :class:`lnprobe.train.TrainConfig` / preset field of the same meaning, shared by all runs.
    """

    placements: Sequence[str] = ("pre", "peri", "post")
    lrs: Sequence[float] = (1e-2, 3e-2, 1e-1)
    seeds: Sequence[int] = (0, 1, 2)
    depths: Sequence[int] | None = None
    widths: Sequence[int] | None = None
    preset: str = "tiny"
    heads: int | None = None
    steps: int = 300
    batch_size: int = 16
    seq_len: int | None = None
    every: Any = 20
    eval_every: int = 100
    grad_clip: float = 1.0
    warmup: int | None = None
    weight_decay: float = 0.1
    data: str = "stdlib"
    device: str = "auto"
    dtype: str = "auto"


# The default grid of `lnprobe sweep` (README "Sweeps"; measured wall time there).
DEFAULT_SWEEP = SweepSpec()


@dataclass
class SweepRun:
    """One grid point: its name, model and training configurations."""

    name: str
    placement: str
    lr: float
    seed: int
    model_cfg: Any
    train_cfg: Any


@dataclass
class SweepResult:
    """What :func:`run_sweep` did: ``trained``/``skipped`` run names, the summary rows, where it wrote."""

    out_dir: Path
    runs: list[Path]
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    summary_csv: Path | None = None
    report: Any = None
    elapsed_s: float = 0.0


def parse_list(text: str | None, kind: Callable[[str], Any], flag: str) -> list | None:
    """``"1e-2,3e-2"`` -> ``[0.01, 0.03]``; None for None; ConfigError naming ``flag`` for a bad item."""
    if text is None:
        return None
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{flag} needs at least one value, got {text!r}")
    try:
        out = [kind(t) for t in items]
    except ValueError:
        raise ConfigError(f"{flag}: cannot read {text!r} as a comma-separated list of "
                          f"{'numbers' if kind is float else 'integers'}") from None
    if len(set(out)) != len(out):
        raise ConfigError(f"{flag} lists a value twice: {text!r}")
    return out


def _lr_text(lr: float) -> str:
    return f"{lr:g}"


def grid(spec: SweepSpec) -> list[SweepRun]:
    """Every grid point, placements outermost, then depth, width, lr, seed. ConfigError for a bad value."""
    from .models import config_from_preset
    from .train import TrainConfig

    if not spec.placements or not spec.lrs or not spec.seeds:
        raise ConfigError("a sweep needs at least one placement, one learning rate and one seed")
    runs = []
    for placement in spec.placements:
        for depth in spec.depths or [None]:
            for width in spec.widths or [None]:
                over = {"placement": placement, "n_layers": depth, "d_model": width, "n_heads": spec.heads,
                        "seq_len": spec.seq_len}
                try:
                    model_cfg = config_from_preset(spec.preset, **{k: v for k, v in over.items() if v is not None})
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
                for lr in spec.lrs:
                    for seed in spec.seeds:
                        train_cfg = TrainConfig(
                            steps=spec.steps, lr=float(lr), seed=int(seed), batch_size=spec.batch_size,
                            seq_len=spec.seq_len, every=spec.every, eval_every=spec.eval_every,
                            grad_clip=spec.grad_clip, warmup=spec.warmup, weight_decay=spec.weight_decay,
                            data=spec.data, device=spec.device, dtype=spec.dtype, threads=1, progress=False)
                        name = (f"{placement}_lr{_lr_text(lr)}_s{seed}_L{model_cfg.n_layers}"
                                f"_D{model_cfg.d_model}")
                        runs.append(SweepRun(name, placement, float(lr), int(seed), model_cfg, train_cfg))
    return runs


# ----------------------------------------------------------------------------- resuming
def run_state(run: SweepRun, run_dir: Path) -> str:
    """What the run directory holds for ``run``: ``"new"`` (nothing), ``"done"`` (a final outcome,
    finished or diverged, of exactly this configuration), ``"resume"`` (this configuration, not
    finished: killed, interrupted or crashed) or ``"other"`` (another configuration, or unreadable)."""
    from .checkpoint import changed_fields
    from .rundir import existing_run
    from .store import read_meta

    if not run_dir.is_dir() or existing_run(run_dir) is None:
        return "new"
    try:
        meta = read_meta(run_dir)
    except Exception:  # an unreadable meta.json: not ours to discard without being asked
        return "other"
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    model, train = (cfg.get(k) if isinstance(cfg.get(k), dict) else {} for k in ("model", "train"))
    # the same rule as a resume's (checkpoint.changed_fields), so "resume" here is one the trainer accepts
    if changed_fields(model, train, run.model_cfg.to_dict(), run.train_cfg.to_dict()):
        return "other"
    return "done" if meta.get("status") in _FINAL else "resume"


def _train_one(model_cfg, train_cfg, run_dir: str, resume: bool = False,
               overwrite: bool = False) -> tuple[str, float]:
    """Worker entry (module level so that it pickles): train one run, return (status, seconds).
    The trainer sets torch's thread count; it is put back, for a sweep run inside a caller's process."""
    import torch

    from .train import train

    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        result = train(model_cfg, train_cfg, run_dir, resume=resume, overwrite=overwrite)
    finally:
        torch.set_num_threads(threads)
    return result.status, time.perf_counter() - t0


# ----------------------------------------------------------------------------- summary
def summarize(run_dir: str | Path) -> dict:
    """One summary row (:data:`SUMMARY_COLUMNS`, module docstring) read back from a run directory."""
    import numpy as np

    from .analysis import massive
    from .store import load_run

    run = load_run(run_dir)
    tr, res = run.train_config, run.meta.get("result") or {}
    loss, val, gnorm = run.series("loss"), run.series("val_loss"), run.series("grad_norm")
    m2 = run.pivot("resid", "m2")
    L = run.n_layers
    absmax = run.frame("resid", "absmax")
    top, med = run.pivot("resid", "top1"), run.pivot("resid", "median_abs")
    ratio = float("nan")
    if not top.empty and not med.empty:
        with np.errstate(divide="ignore", invalid="ignore"):
            r = (top / med.reindex_like(top)).to_numpy(dtype=np.float64)
        r = r[np.isfinite(r)]
        ratio = float(r.max()) if len(r) else ratio
    div = run.meta.get("divergence") if isinstance(run.meta.get("divergence"), dict) else {}
    finite = loss[np.isfinite(loss.to_numpy())] if len(loss) else loss
    return {
        "name": run.path.name, "placement": run.placement, "lr": tr.get("lr"), "seed": tr.get("seed"),
        "layers": L, "d_model": run.d_model, "steps": tr.get("steps"), "status": run.status,
        "final_loss": float(loss.iloc[-1]) if len(loss) else None,
        "val_loss": float(val.iloc[-1]) if len(val) else None,
        "m2_last": float(m2.iloc[-1][L]) if not m2.empty and L in m2.columns else None,
        "max_absmax": float(np.nanmax(absmax["value"].to_numpy())) if len(absmax) else None,
        "max_top1_over_median": ratio if math.isfinite(ratio) else None,
        "diverged": bool(div) or res.get("diverged_step") is not None,
        "diverged_step": div.get("step", res.get("diverged_step")),
        "loss_spikes": len(massive.spike_score(finite).spikes) if len(finite) >= 2 else 0,
        "grad_spikes": len(massive.spike_score(gnorm).spikes) if len(gnorm) >= 2 else 0,
        "elapsed_s": _elapsed(run.meta),
    }


def _elapsed(meta: dict) -> float | None:
    res = meta.get("result") or {}
    tps, steps = res.get("tokens_per_s"), res.get("steps")
    tr = (meta.get("config") or {}).get("train") or {}
    T = tr.get("seq_len") or ((meta.get("config") or {}).get("model") or {}).get("seq_len")
    if not tps or not steps or not T or not tr.get("batch_size"):
        return None
    return float(steps) * int(tr["batch_size"]) * int(T) / float(tps)


def write_summary(rows: list[dict], path: str | Path) -> Path:
    """Write ``summary.csv`` (header :data:`SUMMARY_COLUMNS`; empty cells for missing values)."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float)
                                                          else row[k])) for k in SUMMARY_COLUMNS})
    return path


def read_summary(path: str | Path):
    """``summary.csv`` as a pandas DataFrame."""
    import pandas as pd

    return pd.read_csv(path)


# ----------------------------------------------------------------------------- the sweep
def run_sweep(spec: SweepSpec, out_dir: str | Path, jobs: int | None = None, report: bool = True,
              log: Callable[[str], None] = print, overwrite: bool = False) -> SweepResult:
    """Train every grid point of ``spec`` not already done under ``out_dir``, then write the summary
    and (``report``) the report. ``jobs``: runs at once (default: every CPU core this process may
    use; on CUDA/MPS one at a time). A finished run of the same configuration is kept, an unfinished
    one continues from its checkpoint; a run directory holding other settings is refused
    (ConfigError, nothing touched) unless ``overwrite``. ConfigError for a bad grid, before anything
    is trained."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from .launch import resolve_device

    t0 = time.perf_counter()
    out = Path(out_dir)
    points = grid(spec)
    device = resolve_device(spec.device)
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs must be ≥ 1, got {jobs}")
    jobs = jobs or (cpu_threads() if device.type == "cpu" else 1)
    dirs = {p.name: out / "runs" / p.name for p in points}
    state = {p.name: run_state(p, dirs[p.name]) for p in points}
    other = [p.name for p in points if state[p.name] == "other"]
    if other and not overwrite:  # never discard a recorded run without being asked
        raise ConfigError(f"{out / 'runs'} holds {len(other)} run(s) with other settings than this sweep "
                          f"({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}); pass --overwrite to "
                          f"discard them, or choose another --out")
    todo = [p for p in points if state[p.name] != "done"]
    # an unfinished run of the same configuration continues from its checkpoint (the trainer trims the
    # records past it); one with other settings is replaced only under overwrite
    how = {p.name: dict(resume=state[p.name] == "resume", overwrite=state[p.name] == "other") for p in todo}
    result = SweepResult(out_dir=out, runs=list(dirs.values()))
    n = len(points)
    index = {p.name: i + 1 for i, p in enumerate(points)}
    for p in points:
        if p not in todo:
            result.skipped.append(p.name)
            log(f"[{index[p.name]}/{n}] {p.name}: kept (finished earlier)")
    log(f"sweep: {n} runs, {len(result.skipped)} kept, {len(todo)} to train in {min(jobs, max(1, len(todo)))} "
        f"process(es), 1 CPU thread each -> {out}")

    def done(p: SweepRun, status: str, seconds: float) -> None:
        result.trained.append(p.name)
        row = summarize(dirs[p.name])
        loss = "n/a" if row["final_loss"] is None else f"{row['final_loss']:.3f}"
        m2 = "n/a" if row["m2_last"] is None else f"{row['m2_last']:.4g}"
        extra = f" at step {row['diverged_step']}" if status == "diverged" else ""
        log(f"[{index[p.name]}/{n}] {p.name}: {status}{extra} in {seconds:.1f} s, loss {loss}, last-layer m2 {m2}")

    if todo and jobs > 1 and device.type == "cpu":
        ctx = mp.get_context("spawn")  # forking a process whose OpenMP pool has started can hang the child
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx) as pool:
            futures = {pool.submit(_train_one, p.model_cfg, p.train_cfg, str(dirs[p.name]), **how[p.name]): p
                       for p in todo}
            for fut in as_completed(futures):
                done(futures[fut], *fut.result())
    else:
        for p in todo:
            cfg = p.train_cfg if device.type == "cpu" else dataclasses.replace(p.train_cfg, threads=None)
            done(p, *_train_one(p.model_cfg, cfg, str(dirs[p.name]), **how[p.name]))
    result.rows = [summarize(d) for d in dirs.values()]
    out.mkdir(parents=True, exist_ok=True)
    result.summary_csv = write_summary(result.rows, out / "summary.csv")
    if report:
        from .analysis.report import build_report

        result.report = build_report([str(d) for d in dirs.values()], str(out / "report"), sweep=True)
    result.elapsed_s = time.perf_counter() - t0
    return result
