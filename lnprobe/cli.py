"""Command line: ``lnprobe train | demo | sweep | report | compare | inspect | export | scan``
(also ``python -m lnprobe``).

Distributed training: ``torchrun --nproc-per-node N -m lnprobe train [--fsdp] ...`` (DDP by default,
FSDP2 with ``--fsdp``; ``--batch-size`` is the global batch). Only rank 0 prints.

This module parses arguments and prints; the work is done by :mod:`lnprobe.train`, :mod:`lnprobe.export`
and :mod:`lnprobe.analysis.report`. Bad input (unknown placement or preset, missing or short corpus,
unavailable device, a directory that is not a run directory, a bad option: a :class:`ConfigError`
or a configuration's ValueError) ends with ONE line on stderr, ``lnprobe: error: ...``, saying what
to do, and exit code 2. Errors raised while training runs are real bugs and keep their traceback.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from .launch import ConfigError
from .summary import summarize_run
from .testing import HF_TYPES

__all__ = ["main", "build_parser", "summarize_run", "DEMO_PLACEMENTS", "DEMO_STEPS", "DEMO_EVERY", "DEMO_LR"]

DEMO_PLACEMENTS = ("pre", "peri", "post")
# Demo defaults: the tiny preset (CPU), 400 steps, lr 3e-2. Candidates measured with the same preset and
# seed (last-layer m2 of resid at step 399, Pre-LN / Peri-LN; final val loss Pre / Peri): lr 3e-3: 5.5 / 23
# (2.322 / 2.320); 1e-2: 347 / 31 (2.41 / 2.25); 3e-2: 11163 / 68 (2.489 / 2.265); 1e-1: 1.25e6 / 281 (2.664 /
# 2.392). 3e-2 shows the paper's contrast (Pre-LN's stream two orders of magnitude above Peri-LN's, with a
# lower Peri-LN loss) without the extreme lr 1e-1; at none of them does Pre-LN's profile over depth grow
# super-linearly while Peri-LN's does not (README "What the default demo shows"). The three runs side by
# side on the 2-core machine: 75 s quiet, about 4 min at load 5-8.
DEMO_STEPS = 400
DEMO_EVERY = 20
DEMO_LR = 3e-2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse's default prints the whole usage first)."""

    def error(self, message: str):  # noqa: D401 (argparse API)
        _die(f"{message} (see '{self.prog} --help')")


def _die(message: Any) -> None:
    line = " ".join(str(message).split())  # one line, whatever the message held
    print(f"lnprobe: error: {line}", file=sys.stderr)
    raise SystemExit(2)


# ----------------------------------------------------------------------------- parser
# Argument groups shared by the subcommands: (flags, argparse keywords). A subcommand takes a group
# with its own defaults (``_add_group(..., steps=DEMO_STEPS)``); "%(default)s" in a help shows it.
MODEL_OPTIONS: tuple[tuple[str, dict], ...] = (
    ("--preset", dict(default="tiny", help="model shape preset: tiny, small, gpu, paper-400m, ... "
                                           "(default: %(default)s)")),
    ("--placement", dict(default="pre", help="pre, peri, post, output or lns (default: %(default)s)")),
    ("--d-model", dict(type=int, help="width")),
    ("--layers", dict(type=int, help="number of blocks")),
    ("--heads", dict(type=int, help="attention heads (must divide the width)")),
    ("--seq-len", dict(type=int, help="context length (model and training)")),
    ("--norm", dict(help="layernorm or rmsnorm")),
    ("--mlp", dict(help="gelu or swiglu")),
    ("--qk-norm", dict(action="store_true", default=None, help="QK-norm in every attention (theory §5 bound)")),
)
TRAIN_OPTIONS: tuple[tuple[str, dict], ...] = (
    ("--steps", dict(type=int, default=400, help="optimizer steps (default: %(default)s)")),
    ("--lr", dict(type=float, default=1e-2, help="peak learning rate (default: %(default)s)")),
    ("--batch-size", dict(type=int, default=16, help="sequences per step (default: %(default)s)")),
    ("--seed", dict(type=int, default=0, help="model init and data order (default: %(default)s)")),
    ("--device", dict(default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")),
    ("--dtype", dict(default="auto", help="auto, fp32, bf16 or fp16 (default: %(default)s)")),
    ("--every", dict(default="10", help="probe schedule: N, 'log' or 'log:K' (default: %(default)s)")),
    ("--eval-every", dict(type=int, default=50, help="validation period in steps, 0: only at the end")),
    ("--data", dict(default="stdlib", help="'stdlib', a text file or a .bin token file")),
    ("--no-progress", dict(action="store_true", help="no progress bar")),
)
# Optimizer options of train, demo and sweep (TrainConfig fields of the same names).
OPTIM_OPTIONS: tuple[tuple[str, dict], ...] = (
    ("--grad-clip", dict(type=float, default=1.0, help="clip the global gradient norm to this, 0: no clipping "
                                                         "(default: %(default)s)")),
    ("--warmup", dict(type=int, default=None, help="linear warmup steps (default: min(50, steps // 10))")),
    ("--weight-decay", dict(type=float, default=0.1, help="AdamW weight decay of matrices and embeddings "
                                                            "(default: %(default)s)")),
)


# Train only: how a run is saved and continued (see lnprobe.train for the guarantees).
RUN_OPTIONS: tuple[tuple[str, dict], ...] = (
    ("--ckpt-every", dict(type=int, default=100, help="checkpoint period in steps, records flushed first; 0: only "
                                                      "at the end (default: %(default)s)")),
    ("--flush-seconds", dict(type=float, default=60.0, help="also flush records when this many seconds passed "
                                                            "since the last flush (default: %(default)s)")),
    ("--resume", dict(action="store_true", help="continue the run in OUT from its last checkpoint (records past "
                                                "it are dropped and recomputed)")),
    ("--overwrite", dict(action="store_true", help="discard the run already in OUT (records and checkpoint)")),
    ("--force", dict(action="store_true", help="with --resume: accept changed settings (recorded in meta.json)")),
)


def _add_group(p: argparse.ArgumentParser, title: str, options: tuple[tuple[str, dict], ...],
               skip: tuple[str, ...] = (), helps: dict[str, str] | None = None, **defaults: Any) -> None:
    """Add ``options`` (less the flags in ``skip``) as one group; ``defaults`` and ``helps`` override by dest."""
    g = p.add_argument_group(title)
    for flag, kw in options:
        if flag in skip:
            continue
        dest = flag.lstrip("-").replace("-", "_")
        if dest in defaults:
            kw = {**kw, "default": defaults[dest]}
        if helps and dest in helps:
            kw = {**kw, "help": helps[dest]}
        g.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The one parser of the command line: a subcommand per command, built from the shared groups."""
    parser = _Parser(prog="lnprobe", description="Probe normalisation placement in Transformer training.")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{train,demo,sweep,report,compare,inspect,export,scan}")

    p = sub.add_parser("train", help="train a reference GPT with a probe attached")
    _add_group(p, "model (override the preset)", MODEL_OPTIONS)
    _add_group(p, "training", TRAIN_OPTIONS)
    _add_group(p, "optimizer", OPTIM_OPTIONS)
    p.add_argument("--out", help="run directory (default: runs/<placement>)")
    _add_group(p, "saving and resuming", RUN_OPTIONS)
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model with FSDP2 instead of DDP (no --resume)")
    p.add_argument("--tensorboard", metavar="DIR", help="write live TensorBoard event files to DIR at every flush")
    p.add_argument("--attn-logits", action="store_true", help="also record the output logits and the attention "
                   "logits (qk_absmax, entropy: an extra QKᵀ per layer on recorded steps)")
    p.add_argument("--burst", type=int, default=0, metavar="N",
                   help="after a loss or gradient-norm spike (7σ, docs/theory.md §5) or a NaN, record every step for "
                        "N steps (default 0: off; not under torchrun)")
    p.add_argument("--burst-history", type=int, default=16, metavar="H",
                   help="with --burst: also write the residual stream's m2 and absmax of the H steps before it")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="train pre, peri and post with the same seed and data, then build a report")
    _add_group(p, "model (override the preset)", MODEL_OPTIONS, skip=("--placement",), preset=None,
               helps={"preset": "model shape preset (default: gpu on CUDA, tiny elsewhere)"})
    _add_group(p, "training", TRAIN_OPTIONS, steps=DEMO_STEPS, every=str(DEMO_EVERY), lr=DEMO_LR)
    _add_group(p, "optimizer", OPTIM_OPTIONS)
    p.add_argument("--out", default="runs/demo", help="demo directory; its runs are replaced (default: %(default)s)")
    p.add_argument("--figures", default="figures",
                   help="where to copy the report's PNG figures (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs trained at once (default: all three in parallel, one CPU thread each, on CPU; "
                        "one at a time with every core on CUDA/MPS or with --jobs 1)")
    p.set_defaults(func=_cmd_demo, fsdp=False)

    _add_sweep_parser(sub)

    for name, help_ in (("report", "report on one or more run directories"),
                        ("compare", "compare two or more run directories")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
        p.add_argument("--out", default=name, help="report directory (default: %(default)s)")
        p.set_defaults(func=_cmd_report)

    p = sub.add_parser("inspect", help="print blocks, norms, detected placement and sites of a model")
    _add_group(p, "model (override the preset)", MODEL_OPTIONS)
    p.add_argument("--hf", metavar="MODEL_TYPE", help=f"a tiny Hugging Face model instead: {', '.join(HF_TYPES)}")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("export", help="export a run directory (TensorBoard event files)")
    p.add_argument("--tensorboard", metavar="RUN", required=True, help="run directory to export as TensorBoard events")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="directory for the event files (tensorboard --logdir DIR)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("scan", help="scan Hugging Face checkpoints (eval mode, no gradients) for massive "
                                    "activations")
    p.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint directories (model + tokenizer, image "
                                                            "processor or feature extractor; local files)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--text", metavar="FILE", help="UTF-8 text file to run (default: the built-in stdlib corpus)")
    text.add_argument("--prompt", metavar="STR", help="a text given on the command line")
    text.add_argument("--image", metavar="FILE", action="append",
                      help="an image file for an image model, one item each (repeatable; default: --sequences "
                           "generated images)")
    text.add_argument("--audio", metavar="FILE", action="append",
                      help="a WAV file for an audio model, one item each (repeatable; default: --sequences "
                           "generated waveforms)")
    p.add_argument("--sequences", type=int, default=8, help="sequences, images or waveforms (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, special tokens included "
                                                             "(default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="load the weights in this dtype")
    p.add_argument("--device", default="cpu", help="device (default: %(default)s)")
    p.add_argument("--out", metavar="DIR", required=True, help="run directory of the scan")
    p.set_defaults(func=_cmd_scan)
    return parser


def _add_sweep_parser(sub) -> None:
    from .sweep import DEFAULT_SWEEP as d

    def csv(values) -> str:
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)

    p = sub.add_parser("sweep", help="train placements × learning rates × seeds (× depths × widths), then a "
                                     "summary.csv and one report over all the runs")
    g = p.add_argument_group("grid (comma-separated lists)")
    g.add_argument("--placements", default=csv(d.placements), help="(default: %(default)s)")
    g.add_argument("--lrs", default=csv(d.lrs), help="peak learning rates (default: %(default)s)")
    g.add_argument("--seeds", default=csv(d.seeds), help="model init and data order (default: %(default)s)")
    g.add_argument("--depths", help="numbers of blocks (default: the preset's)")
    g.add_argument("--widths", help="model widths d_model (default: the preset's)")
    g = p.add_argument_group("shared by every run")
    g.add_argument("--preset", default=d.preset, help="model shape preset (default: %(default)s)")
    g.add_argument("--heads", type=int, help="attention heads (must divide every width)")
    g.add_argument("--seq-len", type=int, help="context length (model and training)")
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step (default: %(default)s)")
    g.add_argument("--every", default=str(d.every), help="probe schedule (default: %(default)s)")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="validation period (default: %(default)s)")
    g.add_argument("--data", default=d.data, help="'stdlib', a text file or a .bin token file")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    g.add_argument("--dtype", default=d.dtype, help="auto, fp32, bf16 or fp16 (default: %(default)s)")
    _add_group(p, "optimizer", OPTIM_OPTIONS, grad_clip=d.grad_clip, warmup=d.warmup, weight_decay=d.weight_decay)
    p.add_argument("--out", default="runs/sweep", help="sweep directory (default: %(default)s)")
    p.add_argument("--jobs", type=int, help="runs trained at once (default: one per CPU core, 1 thread each; "
                                            "one at a time on CUDA/MPS)")
    p.add_argument("--no-report", action="store_true", help="summary.csv only, no report")
    p.add_argument("--overwrite", action="store_true",
                   help="discard run directories under OUT/runs that hold other settings (refused otherwise)")
    p.set_defaults(func=_cmd_sweep)


# ----------------------------------------------------------------------------- configs
def _model_config(args: argparse.Namespace, placement: str, preset: str):
    from .models import config_from_preset

    overrides = {"placement": placement, "d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads,
                 "seq_len": args.seq_len, "norm": args.norm, "mlp": args.mlp, "qk_norm": getattr(args, "qk_norm", None)}
    try:
        return config_from_preset(preset, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:  # an unknown preset or field value: the model config's message
        _die(exc)


def _train_config(args: argparse.Namespace):
    from .train import TrainConfig

    every = int(args.every) if args.every.isdigit() else args.every
    if getattr(args, "ckpt_every", 0) < 0:
        _die(f"--ckpt-every must be ≥ 0 (0: only at the end), got {args.ckpt_every}")
    if getattr(args, "flush_seconds", 0) < 0:
        _die(f"--flush-seconds must be ≥ 0, got {args.flush_seconds}")
    return TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed, device=args.device,
                       dtype=args.dtype, every=every, eval_every=args.eval_every, data=args.data,
                       progress=not args.no_progress, fsdp=args.fsdp, tensorboard=getattr(args, "tensorboard", None),
                       ckpt_every=getattr(args, "ckpt_every", 100), flush_seconds=getattr(args, "flush_seconds", 60.0),
                       grad_clip=args.grad_clip, warmup=args.warmup, weight_decay=args.weight_decay,
                       attn_logits=getattr(args, "attn_logits", False),
                       burst=getattr(args, "burst", 0), burst_history=getattr(args, "burst_history", 16))


# ----------------------------------------------------------------------------- summaries
def _print_summary(name: str, run_dir: Path) -> None:
    print(f"{name} ({run_dir}):")
    for line in summarize_run(run_dir):
        print(f"  {line}")


# ----------------------------------------------------------------------------- commands
def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    model_cfg = _model_config(args, args.placement, args.preset)
    train_cfg = _train_config(args)
    out = Path(args.out or f"runs/{model_cfg.placement}")
    result = train(model_cfg, train_cfg, out, resume=args.resume, overwrite=args.overwrite, force=args.force)
    if result.rank != 0:  # under torchrun only rank 0 prints (and only it wrote the run directory)
        _exit_rank(_exit_code(result))
    if result.world_size > 1:
        print(f"trained on {result.world_size} processes ({'FSDP2' if train_cfg.fsdp else 'DDP'}), "
              f"global batch {train_cfg.batch_size}")
    print(f"run {out}: {result.status} after {result.steps} steps on {result.device} ({result.dtype}), "
          f"{result.tokens_per_s:.0f} tokens/s")
    _print_summary(model_cfg.placement, out)
    if result.status == "interrupted":
        print(f"lnprobe: interrupted; continue with: lnprobe train ... --out {out} --resume", file=sys.stderr)
    if result.world_size > 1:
        _exit_rank(_exit_code(result))
    return _exit_code(result)


def _exit_rank(code: int) -> None:
    """End a torchrun rank now, with ``code``, skipping interpreter finalisation.

    Why: after ``train`` returns, the run directory is complete (parts and meta.json fsynced, the
    checkpoint renamed into place) and the process group destroyed, yet native threads remain that
    the interpreter tears down in no defined order at exit: gloo's worker and TCP-loop threads under
    FSDP2 (its state keeps the backend alive after ``destroy_process_group``) and pyarrow's pool
    threads on rank 0 (started by the summary's read). A rank that aborts there
    (``terminate called without an active exception``) fails the whole launch after a good run.
    """
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_code(result) -> int:
    """0 finished or stopped; 1 diverged; 128 + signal number when a signal stopped it (130, 143)."""
    if result.status == "interrupted":
        return 128 + (result.signal or 2)
    return 1 if result.status == "diverged" else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .launch import resolve_device
    from .train import train

    device = resolve_device(args.device)
    preset = args.preset or ("gpu" if device.type == "cuda" else "tiny")
    configs = [_model_config(args, p, preset) for p in DEMO_PLACEMENTS]
    train_cfg = _train_config(args)
    if args.jobs is not None and args.jobs < 1:
        _die(f"--jobs must be ≥ 1, got {args.jobs}")
    jobs = args.jobs or (len(configs) if device.type == "cpu" else 1)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        _die(f"--out {out} is a file, not a directory; pass a directory for the demo runs")
    shape = f"{preset}: d_model {configs[0].d_model}, {configs[0].n_layers} layers, {train_cfg.steps} steps"
    if jobs > 1 and device.type == "cpu":
        runs = _train_parallel(configs, train_cfg, out, jobs, shape)
    else:
        runs = []
        for cfg in configs:
            run_dir = out / cfg.placement
            print(f"training {cfg.placement} ({shape}) -> {run_dir}", flush=True)
            result = train(cfg, train_cfg, run_dir, overwrite=True)
            print(f"  {result.status}, {result.tokens_per_s:.0f} tokens/s, {result.elapsed_s:.1f} s", flush=True)
            runs.append(run_dir)
    report_dir = out / "report"
    report = _build_report(runs, report_dir)
    figures = Path(args.figures)
    copied = _copy_figures(report, report_dir, figures)
    print(f"report: {_report_file(report_dir)}")
    print(f"figures: {len(copied)} PNG file(s) copied to {figures}")
    for run_dir in runs:
        _print_summary(run_dir.name, run_dir)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    """``lnprobe sweep``: :func:`lnprobe.sweep.run_sweep`; bad lists and values end as one-line errors."""
    from .sweep import SweepSpec, parse_list, run_sweep

    spec = SweepSpec(
        placements=parse_list(args.placements, str, "--placements"), lrs=parse_list(args.lrs, float, "--lrs"),
        seeds=parse_list(args.seeds, int, "--seeds"), depths=parse_list(args.depths, int, "--depths"),
        widths=parse_list(args.widths, int, "--widths"), preset=args.preset, heads=args.heads,
        seq_len=args.seq_len, steps=args.steps, batch_size=args.batch_size,
        every=int(args.every) if args.every.isdigit() else args.every, eval_every=args.eval_every,
        grad_clip=args.grad_clip, warmup=args.warmup, weight_decay=args.weight_decay, data=args.data,
        device=args.device, dtype=args.dtype)
    res = run_sweep(spec, args.out, jobs=args.jobs, report=not args.no_report, overwrite=args.overwrite)
    diverged = sum(bool(r["diverged"]) for r in res.rows)
    print(f"sweep {args.out}: {len(res.trained)} trained, {len(res.skipped)} kept, {diverged} diverged, "
          f"{res.elapsed_s:.0f} s")
    print(f"summary: {res.summary_csv}")
    if res.report is not None:
        print(f"report: {_report_file(res.report.out_dir)}")
    return 0


def _train_job(model_cfg, train_cfg, run_dir: str):
    """Worker-process entry of the parallel demo (module level so that it pickles)."""
    from .train import train

    return train(model_cfg, train_cfg, run_dir, overwrite=True)


def _train_parallel(configs: list, train_cfg, out: Path, jobs: int, shape: str) -> list[Path]:
    """Train the demo runs in ``jobs`` worker processes with one CPU thread each.

    A model this small does not speed up with a second intra-op thread (measured: 70 ms/step with 1
    thread, 75 ms with 2, and about 10 times slower with 2 when other processes compete for the
    cores), so the cores are better used by training the runs side by side. Each run is the same as
    a sequential one with ``threads=1`` (its own seed, data order and thread count). Workers are
    spawned, not forked: forking a process whose OpenMP pool has started can hang the child. A
    worker's ConfigError comes back pickled and ends the command like one raised here.
    """
    import dataclasses
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    cfg1 = dataclasses.replace(train_cfg, threads=1, progress=False)
    names = ", ".join(c.placement for c in configs)
    print(f"training {names} ({shape}) in {min(jobs, len(configs))} processes, 1 CPU thread each -> {out}",
          flush=True)
    with ProcessPoolExecutor(max_workers=min(jobs, len(configs)), mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_train_job, c, cfg1, str(out / c.placement)): c for c in configs}
        for fut in as_completed(futures):  # report each run as it ends
            result = fut.result()
            print(f"  {futures[fut].placement}: {result.status}, {result.tokens_per_s:.0f} tokens/s, "
                  f"{result.elapsed_s:.1f} s", flush=True)
    return [out / c.placement for c in configs]


def _check_run_dir(r: Path) -> None:
    if not (r / "meta.json").is_file():
        what = "does not exist" if not r.exists() else "is a file" if not r.is_dir() else "has no meta.json"
        _die(f"{r} is not an lnprobe run directory ({what}); pass directories written by "
             f"'lnprobe train --out DIR' or lnprobe.attach(model, DIR)")


def _check_out_dir(out: Path, flag: str = "--out") -> None:
    """``out`` must be a directory this process can create or write into (checked before any work)."""
    if out.exists() and not out.is_dir():
        _die(f"{flag} {out} is a file, expected a directory (it is created if missing); choose another path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _die(f"cannot create {flag} {out}: {exc.strerror or exc}; choose a writable directory")
    if not os.access(out, os.W_OK | os.X_OK):
        _die(f"{flag} {out} is not writable; choose a writable directory")


def _cmd_report(args: argparse.Namespace) -> int:
    runs = [Path(r) for r in args.runs]
    if args.command == "compare" and len(runs) < 2:
        _die(f"compare needs at least two run directories, got {len(runs)}; use 'lnprobe report RUN' for one")
    for r in runs:
        _check_run_dir(r)
    out = Path(args.out)
    _check_out_dir(out)
    _build_report(runs, out)
    print(f"report: {_report_file(out)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """``lnprobe export --tensorboard RUN --out DIR``: :func:`lnprobe.export.export_tensorboard`."""
    from .export import export_tensorboard

    _check_run_dir(Path(args.tensorboard))
    _check_out_dir(Path(args.out))
    try:
        out = export_tensorboard(args.tensorboard, args.out)
    except ImportError as exc:  # tensorboard is an optional dependency; the message says how to install it
        _die(exc)
    except (ValueError, OSError) as exc:  # e.g. unreadable records, an --out that is a file
        _die(f"cannot export {args.tensorboard}: {exc}")
    print(f"wrote TensorBoard events to {out}; view with: tensorboard --logdir {out}")
    return 0


def _cmd_scan(args: argparse.Namespace) -> int:
    """``lnprobe scan PATH ... --out DIR``: :func:`lnprobe.scan.scan`."""
    from .scan import scan

    for p in args.paths:
        if not (Path(p) / "config.json").is_file():
            _die(f"{p} is not a Hugging Face checkpoint directory (no config.json)")
    text = args.prompt
    if args.text:
        if not Path(args.text).is_file():
            _die(f"--text {args.text}: no such file")
        text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    for flag, files in (("--image", args.image), ("--audio", args.audio)):
        for f in files or []:
            if not Path(f).is_file():
                _die(f"{flag} {f}: no such file")
    try:
        result = scan(args.paths, args.out, text=text, images=args.image, audio=args.audio,
                      sequences=args.sequences, seq_len=args.seq_len, dtype=args.dtype, device=args.device)
    except (ValueError, OSError) as exc:  # short text, unreadable checkpoint, missing tokenizer files
        _die(f"cannot scan: {exc}")
    print(f"scan: {result.path} ({len(result.massive)} massive activations); "
          f"report: {result.path / 'report' / 'report.html'}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    import lnprobe

    if args.hf:
        model = _tiny_hf_model(args.hf)
    else:
        from .models import GPT

        model = GPT(_model_config(args, args.placement, args.preset))
    print(lnprobe.inspect(model))
    return 0


def _tiny_hf_model(model_type: str):
    """A randomly initialised Hugging Face model of ``model_type`` at toy size (no download)."""
    if model_type not in HF_TYPES:
        _die(f"unknown --hf model type {model_type!r}; use one of {', '.join(HF_TYPES)}")
    try:
        import transformers  # noqa: F401
    except ImportError:
        _die("--hf needs the transformers package; pip install transformers")
    from .testing import tiny_hf_model

    return tiny_hf_model(model_type)


# ----------------------------------------------------------------------------- report helpers
def _build_report(runs: list[Path], out: Path):
    try:
        from lnprobe.analysis.report import build_report
    except ImportError as exc:
        _die(f"the report builder is not available ({exc}); the runs are in "
             f"{', '.join(str(r) for r in runs)}: inspect them with lnprobe.load_run")
    try:
        return build_report([str(r) for r in runs], str(out))
    except (ValueError, FileNotFoundError) as exc:  # RunDirectoryError: a damaged meta.json, named in the message
        _die(exc)
    except OSError as exc:  # e.g. the disk filled up, or a file under --out is not writable
        _die(f"cannot write the report to {out}: {exc}")


def _report_file(report_dir: Path) -> Path:
    for name in ("report.html", "report.md"):
        if (report_dir / name).exists():
            return report_dir / name
    return report_dir


def _copy_figures(report, report_dir: Path, figures: Path) -> list[Path]:
    """Copy the PNGs of this report (not stale files of an older one) into ``figures``."""
    figures.mkdir(parents=True, exist_ok=True)
    made = getattr(report, "figures", None)
    pngs = [Path(f["png"]) for f in made.values() if "png" in f] if made else sorted(report_dir.rglob("*.png"))
    copied = []
    for png in pngs:
        dest = figures / png.name
        shutil.copyfile(png, dest)
        copied.append(dest)
    return copied


# ----------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (bad input raises ``SystemExit(2)``)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:  # raised before any training step, by the module that found the problem
        _die(exc)
    except KeyboardInterrupt as exc:  # a second SIGINT/SIGTERM (lnprobe.launch.Interrupted), or outside training
        print("lnprobe: interrupted; the run directory keeps what was flushed (status 'interrupted'); continue it "
              "with --resume", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)
    except BrokenPipeError:  # e.g. `lnprobe inspect | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
