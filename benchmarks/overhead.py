"""Training-step overhead of lnprobe against no probe and against what users would otherwise use.

    /work/venv/bin/python benchmarks/overhead.py [--steps 30] [--device cpu|cuda] [--quick]
                                                 [--threads N] [--csv PATH] [--configs a,b,...]

Model: the reference GPT (``lnprobe.models``), preset ``small`` (d_model 256, 8 layers, seq 128),
batch 16 × 128 on CPU; preset ``gpu`` (d_model 512, 12 layers, seq 256), batch 32 × 256 in bf16
autocast on CUDA. A full training step is forward, backward, AdamW step and zero_grad; every
configuration trains its own copy of the model (same seed, same batch).

Configurations (``CONFIGS``): no probe · a second unprobed copy (A/A control: its ratio is the
noise floor of the run) · lnprobe every step (default sites/stats) · lnprobe every 10
steps · lnprobe every step with ``sites="all", stats="all"`` · a naive hook logger (forward hooks on
every block, norm and Linear logging mean, std and max through ``.item()``) · a hand-written ``.item()``
logger with lnprobe's default coverage (same sites and statistics, computed the obvious way: exact
median, ``topk`` over the flattened tensor) · ``wandb.watch(model,
log="all", log_freq=1)`` offline (skipped when wandb is not installed) · capturing every block
output (``output_hidden_states``-style clones) and reducing them after the step.

Method. All configurations live in one process and are ALTERNATED step by step (the order rotates
every round), so load drift on a shared machine hits all of them alike. Steps are timed one by one
(on CUDA between two ``torch.cuda.synchronize()``). A probed run has steps of different kinds:
unrecorded, recorded, and now and then a Parquet flush inside a recorded step, which is timed on its
own (between device syncs) and taken out of that step's time. ms/step is Σ_kind frequency × median
of that kind, with the long-run frequencies of the schedule (1/every recorded, 1/(every·flush_every)
flushes): a robust estimate of the mean cost per step, where the median of a handful of
recorded+flush step times is not. The one-off cost of a process's first flush (lazy imports) is
paid before timing; a flush never seen in the timed window borrows its cost from the configuration
with the same sites and statistics. Peak
memory is measured in fresh subprocesses, one configuration each (median of 3; 1 with --quick):
the process RSS high-water mark (VmHWM) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
Every child imports lnprobe (and the wandb child wandb), so import footprints are in the numbers;
wandb's separate service process is not. The process peak moves by about 2 % between identical
runs on CPU, so the children also report ``held KB``: the bytes of tensor storage that the
instrumentation itself keeps after backward (``Probe.held_bytes`` for lnprobe), which is exact.
Prints the table and the load average; ``--csv`` writes it. Asserts nothing.

Compiled rows (asked for by name, ``--compile-backend``, default inductor): ``torch.compile(model)``
without a probe, and with lnprobe every step and every 10 steps; compare them with each other (the
ratio column is to the eager 'no probe'). The probes here write their flushes on the training thread
(the default); with ``probe.write_in_background`` the 'flush' kind would be the part of a flush left
on the training thread, and waiting for the write at the next ``step()`` would be in that step's time.

Device operations (``--ops``, also printed after the table unless ``--no-ops``): for one recorded
step of the benchmark model and each reduction path (cpu, fused Triton kernel, torch fallback), the
device operations per probed tensor in the hooks, those of ``probe.step()`` and the KB that the
hooks create per probed tensor (``lnprobe.opcount``; the model's own operations subtracted).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lnprobe  # noqa: E402
from lnprobe import stats as S  # noqa: E402
from lnprobe.models import GPT, config_from_preset  # noqa: E402

CONFIGS: tuple[str, ...] = (
    "none", "none_control", "lnprobe_every1", "lnprobe_every10", "lnprobe_all", "lnprobe_sinks", "lnprobe_updates",
    "naive_item", "naive_same", "wandb_watch",
    "hidden_states", "compiled_none", "compiled_lnprobe_every1", "compiled_lnprobe_every10",
)
LABELS = {
    "none": "no probe",
    "none_control": "no probe, 2nd copy (A/A noise control)",
    "lnprobe_every1": "lnprobe, every step (default sites/stats)",
    "lnprobe_every10": "lnprobe, every 10 steps",
    "lnprobe_all": "lnprobe, every step, sites=all stats=all",
    "lnprobe_sinks": "lnprobe, every step, live TensorBoard sink",
    "lnprobe_updates": "lnprobe, every step, optimizer updates",
    "naive_item": "naive hooks, .item() per statistic",
    "naive_same": "naive hooks, .item(), lnprobe's coverage",
    "wandb_watch": "wandb.watch(log='all', log_freq=1), offline",
    "hidden_states": "clone block outputs, reduce after step",
    "compiled_none": "torch.compile(model), no probe",
    "compiled_lnprobe_every1": "torch.compile(model), lnprobe every step",
    "compiled_lnprobe_every10": "torch.compile(model), lnprobe every 10 steps",
}
COVERAGE = {
    "none": "-",
    "none_control": "- (its ratio to 'no probe' is the noise floor of this run)",
    "lnprobe_every1": "activation stats at resid/final (12) and branch sites (5), with location; resid grads; "
                      "param grad/value norms; norm gains",
    "lnprobe_every10": "as above, on 1 step in 10",
    "lnprobe_all": "every site with all 12 stats (kurtosis, median, counts, top-3 with location)",
    "lnprobe_sinks": "as lnprobe every step, and its summary scalars and profiles sent to a live TensorBoard "
                     "SummaryWriter at every flush",
    "lnprobe_updates": "as lnprobe every step, and update_rms / update_ratio of every parameter (optimizer hooks)",
    "naive_item": "mean/std/max of each block, norm and Linear OUTPUT; no grads, no locations, no counts",
    "naive_same": "lnprobe's default sites and statistics (exact median, flat top-3 index), resid grads, "
                  "param grad/value norms, norm gains",
    "wandb_watch": "64-bin histograms of every PARAMETER and parameter GRADIENT; no activations at all",
    "hidden_states": "resid (block outputs) only, lnprobe's resid stats; no branch sites, no grads",
    "compiled_none": "- (the baseline of the compiled rows)",
    "compiled_lnprobe_every1": "as lnprobe every step, on the compiled model",
    "compiled_lnprobe_every10": "as lnprobe every 10 steps, on the compiled model",
}
COMPILE_BACKEND = "inductor"  # --compile-backend
# the compiled rows compile the model once per configuration (minutes on 2 CPU cores): asked for by name
DEFAULT_CONFIGS = tuple(c for c in CONFIGS if not c.startswith("compiled_"))
DEFAULT_FLUSH_EVERY = 20  # lnprobe.attach's default; the probes below use it


@dataclass
class Bench:
    """What every configuration trains on."""

    device: torch.device
    preset: str
    batch: int
    seq: int
    amp_dtype: torch.dtype | None
    seed: int = 0

    def batch_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        vocab = config_from_preset(self.preset).vocab_size
        x = torch.randint(0, vocab, (self.batch, self.seq), generator=g)
        return x.to(self.device), torch.roll(x, -1, 1).to(self.device)


def default_bench(device: str) -> Bench:
    """CPU: preset small, batch 16 × 128, float32; CUDA: preset gpu, batch 32 × 256, bf16 autocast."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return Bench(dev, "gpu", 32, 256, torch.bfloat16)
    return Bench(dev, "small", 16, 128, None)


@dataclass
class Setup:
    """One configuration's live state: its model copy, optimizer and hooks."""

    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    after_backward: Callable[[torch.Tensor], None] = lambda loss: None
    close: Callable[[], None] = lambda: None
    probe: Any = None
    every: int = 1
    flush_ms: list = field(default_factory=list)  # durations of the flushes of the current step
    values_per_step: float | None = None
    held: Callable[[], int] | None = None  # bytes of tensors the instrumentation holds after backward
    note: str = ""
    step_index: int = 0


def _make_model(bench: Bench) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(bench.seed)
    model = GPT.from_preset(bench.preset).to(bench.device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def _attach_probe(s: Setup, bench: Bench, out: Path, every: int, **kw: Any) -> None:
    s.probe = lnprobe.attach(s.model, out, every=every, **kw)
    s.every = every
    # step()'s own flushes call _flush (their Parquet write then runs on a background thread, joined at
    # the next step(): what that costs the training thread lands in the step times)
    flush = s.probe._flush

    def timed_flush(*a: Any, **k: Any):  # tells the timer which steps flushed and what the flush cost
        _sync(bench)  # on CUDA: the step's queued work is not the flush's
        t0 = time.perf_counter()
        try:
            return flush(*a, **k)
        finally:
            _sync(bench)
            s.flush_ms.append((time.perf_counter() - t0) * 1e3)

    s.probe._flush = timed_flush
    s.after_backward = lambda loss: s.probe.step(loss=loss)
    s.held = lambda: s.probe.held_bytes

    def close() -> None:
        s.probe.close()
        run = lnprobe.load_run(out)
        r = run.records
        steps = r["step"].nunique()
        s.values_per_step = len(r) / steps if steps else None

    s.close = close


def _naive_logger(s: Setup) -> None:
    """The common pattern: forward hooks on every block, norm and Linear, three .item() each."""
    log: dict[str, tuple[float, float, float]] = {}
    handles = []
    blocks = set(map(id, s.model.blocks))
    for name, m in s.model.named_modules():
        if id(m) in blocks or isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.Linear)):
            def hook(mod, args, output, name=name):
                o = output[0] if isinstance(output, tuple) else output
                o = o.detach().float()
                log[name] = (o.mean().item(), o.std().item(), o.abs().max().item())
            handles.append(m.register_forward_hook(hook))
    s.after_backward = lambda loss: log.clear()  # a logger would ship them here
    s.close = lambda: [h.remove() for h in handles]
    s.values_per_step = 3 * len(handles)


def _naive_stats(x: torch.Tensor, full: bool) -> list[float]:
    """What a hand-written logger computes per site, one ``.item()``/``.tolist()`` per statistic.

    ``full``: lnprobe's residual-stream set (m2, var, rms, top-3 with flat location, exact median of
    |x|, nonfinite, over_fp16, massive); otherwise its branch set (m2, var, rms, absmax with
    location, nonfinite)."""
    x = x.detach().float()
    a = x.abs()
    m2 = x.pow(2).mean().item()
    out = [m2, x.var(-1, unbiased=False).mean().item(), math.sqrt(m2)]
    if full:
        vals, idx = a.flatten().topk(3)
        med = a.median().item()
        out += vals.tolist() + idx.tolist() + [med, (~torch.isfinite(x)).sum().item(), (a > 65504).sum().item(),
                                               ((a > 100) & (a >= 1000 * med)).sum().item()]
    else:
        out += [a.max().item(), a.argmax().item(), (~torch.isfinite(x)).sum().item()]
    return out


def _naive_same_coverage(s: Setup) -> None:
    """A hand-written .item() logger recording what lnprobe records by default on the reference GPT
    (Pre-LN): the residual stream (block inputs, last block output, head input) with the full set,
    branch outputs (attention, MLP), the MLP's hidden activation and the mid-block residual with
    the branch set, gradient rms and max at the block inputs, and every parameter's gradient and
    value norm and the norm gains."""
    model = s.model
    log: list[float] = []
    handles = []

    def record(x: torch.Tensor, full: bool) -> None:
        log.extend(_naive_stats(x, full))
        if full and x.requires_grad:  # residual stream: its gradient too
            x.register_hook(lambda g: log.extend([g.pow(2).mean().sqrt().item(), g.abs().max().item()]))

    def pre(full: bool):
        return lambda mod, args: record(args[0], full)

    def post(mod, args, output):
        record(output, False)

    for block in model.blocks:
        handles.append(block.register_forward_pre_hook(pre(True)))  # resid l
        handles.append(block.mlp.fc_out.register_forward_pre_hook(pre(False)))  # mlp_act
        if block.norm_mlp_in is not None:
            handles.append(block.norm_mlp_in.register_forward_pre_hook(pre(False)))  # resid_mid
        handles.append(block.attn.register_forward_hook(post))  # attn_out (= attn_raw for Pre-LN)
        handles.append(block.mlp.register_forward_hook(post))  # mlp_out
    handles.append(model.blocks[-1].register_forward_hook(lambda m, a, o: record(o, True)))  # resid L
    handles.append(model.head.register_forward_pre_hook(pre(True)))  # final
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.weight is not None]

    def after_backward(loss: torch.Tensor) -> None:
        for p in model.parameters():
            if p.grad is not None:
                log.extend([p.grad.norm().item(), p.detach().norm().item()])
        for m in norms:
            log.extend([m.weight.detach().pow(2).mean().item(), m.weight.detach().abs().max().item()])
        s.values_per_step = len(log)
        log.clear()  # a logger would ship them here

    s.after_backward = after_backward
    s.close = lambda: [h.remove() for h in handles]


def _hidden_states(s: Setup) -> None:
    """output_hidden_states-style: clone every block output, reduce after backward."""
    captured: list[torch.Tensor] = []
    plan = S.StatPlan(S.DEFAULT_ACTIVATION_STATS)
    handles = [b.register_forward_hook(lambda m, a, out: captured.append(out.detach().clone()))
               for b in s.model.blocks]
    results: list = []

    def reduce(loss: torch.Tensor) -> None:
        results.clear()
        for h in captured:  # (B, T, D) each
            results.append(S.finalize_activation([S.reduce_activation(h, plan)], S.DEFAULT_ACTIVATION_STATS))
        captured.clear()

    s.after_backward = reduce
    s.close = lambda: [h.remove() for h in handles]
    s.values_per_step = len(handles) * len(S.DEFAULT_ACTIVATION_STATS)
    s.held = lambda: sum(h.untyped_storage().nbytes() for h in captured)


def _wandb(s: Setup, workdir: Path) -> None:
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["WANDB_DIR"] = str(workdir)
    import wandb  # noqa: F401  (ImportError is handled by the caller)

    run = wandb.init(project="lnprobe-overhead", dir=str(workdir), mode="offline")
    run.watch(s.model, log="all", log_freq=1)
    # wandb.watch only commits its histograms with a log call, which training loops make every step.
    s.after_backward = lambda loss: run.log({"loss": loss.item()})

    def close() -> None:
        run.unwatch(s.model)
        run.finish()

    s.close = close
    n_params = sum(1 for p in s.model.parameters() if p.requires_grad)
    s.values_per_step = 2 * n_params * 64


def make_setup(name: str, bench: Bench, workdir: Path) -> Setup | str:
    """Build configuration ``name``; a string says why it is skipped."""
    model, opt = _make_model(bench)
    s = Setup(name, model, opt)
    if name in ("none", "none_control"):
        s.values_per_step = 0
    elif name == "lnprobe_every1":
        _attach_probe(s, bench, workdir / name, 1)
    elif name == "lnprobe_every10":
        _attach_probe(s, bench, workdir / name, 10)
    elif name == "lnprobe_all":
        _attach_probe(s, bench, workdir / name, 1, sites="all", stats="all")
    elif name == "lnprobe_sinks":
        try:
            from lnprobe.sinks import TensorBoard
            sink = TensorBoard(workdir / f"{name}_tb")
        except ImportError:
            return "skipped: tensorboard not installed"
        _attach_probe(s, bench, workdir / name, 1, sinks=[sink])
    elif name == "lnprobe_updates":
        _attach_probe(s, bench, workdir / name, 1, updates=s.opt)
    elif name == "naive_item":
        _naive_logger(s)
    elif name == "naive_same":
        _naive_same_coverage(s)
    elif name == "hidden_states":
        _hidden_states(s)
    elif name.startswith("compiled_"):
        s.model = torch.compile(model, backend=COMPILE_BACKEND)
        if name != "compiled_none":
            _attach_probe(s, bench, workdir / name, 1 if name.endswith("every1") else 10)
        else:
            s.values_per_step = 0
    elif name == "wandb_watch":
        try:
            _wandb(s, workdir / name)
        except ImportError:
            return "skipped: wandb not installed"
    else:
        raise ValueError(f"unknown configuration {name!r}; expected one of {', '.join(CONFIGS)}")
    return s


def train_step(s: Setup, bench: Bench, x: torch.Tensor, y: torch.Tensor) -> tuple[str, float]:
    """One full training step; returns its kind ('plain' or 'record') and the ms spent in a flush."""
    kind = "plain"
    s.flush_ms.clear()
    if s.probe is not None:
        kind = "record" if s.step_index % s.every == 0 else "plain"
    with torch.autocast(bench.device.type, dtype=bench.amp_dtype or torch.float32, enabled=bench.amp_dtype is not None):
        _, loss = s.model(x, y)
    loss.backward()
    s.after_backward(loss)
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    s.step_index += 1
    return kind, sum(s.flush_ms)


def _sync(bench: Bench) -> None:
    if bench.device.type == "cuda":
        torch.cuda.synchronize(bench.device)


def time_configs(setups: list[Setup], bench: Bench, steps: int, warmup: int = 2) -> dict[str, dict[str, list[float]]]:
    """Alternate the configurations step by step; return name -> kind -> times in ms.

    Kinds: 'plain' and 'record' steps (a flush's own duration taken out), and 'flush' durations."""
    x, y = bench.batch_tensors()
    for s in setups:
        for _ in range(warmup):
            train_step(s, bench, x, y)
        if s.probe is not None:
            # The first flush of a process pays one-off costs (pyarrow/pandas lazy imports, the first
            # Parquet write: seconds on a loaded machine). A training run pays them once, so they stay
            # out of the timed window.
            s.probe.flush()
    _sync(bench)
    times: dict[str, dict[str, list[float]]] = {s.name: {} for s in setups}
    for r in range(steps):
        k = r % len(setups)
        for s in setups[k:] + setups[:k]:  # rotate the order every round
            _sync(bench)
            t0 = time.perf_counter()
            kind, flush_ms = train_step(s, bench, x, y)
            _sync(bench)
            times[s.name].setdefault(kind, []).append((time.perf_counter() - t0) * 1e3 - flush_ms)
            if flush_ms:
                times[s.name].setdefault("flush", []).append(flush_ms)
    return times


def ms_per_step(name: str, kinds: dict[str, list[float]], every: int, flush_borrowed: float | None) -> tuple[float, str]:
    """Σ_kind long-run frequency × median; returns (ms, note)."""
    med = {k: statistics.median(v) for k, v in kinds.items()}
    if name not in ("lnprobe_every1", "lnprobe_every10", "lnprobe_all", "lnprobe_sinks", "lnprobe_updates",
                    "compiled_lnprobe_every1", "compiled_lnprobe_every10"):
        return med["plain"], ""
    f_rec = 1.0 / every
    f_flush = f_rec / DEFAULT_FLUSH_EVERY
    note = ""
    if "flush" in med:
        flush = med["flush"]
    elif flush_borrowed is not None:
        flush, note = flush_borrowed, "flush cost borrowed"
    else:
        flush, note = 0.0, "flush not observed: excluded"
    if "record" not in med:
        return med["plain"], "no recorded step timed: underestimate"
    plain = med.get("plain", med["record"])
    return (1 - f_rec) * plain + f_rec * med["record"] + f_flush * flush, note


# ----------------------------------------------------------------------------- memory (subprocess)
def rss_high_water_mb() -> float:
    """This process's RSS high-water mark in MiB.

    Linux: VmHWM of /proc/self/status, which belongs to the current address space. ``ru_maxrss`` is
    not used there because Linux carries it across fork + exec, so a child started by a large parent
    would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(name: str, device: str, steps: int) -> dict:
    """Run configuration ``name`` alone for ``steps`` steps; return its peak memory."""
    bench = default_bench(device)
    work = Path(tempfile.mkdtemp(prefix="lnprobe-mem-"))
    try:
        s = make_setup(name, bench, work)
        if isinstance(s, str):
            return {"skipped": s}
        x, y = bench.batch_tensors()
        train_step(s, bench, x, y)
        if bench.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        held = [0]
        if s.held is not None:  # what the instrumentation holds at its fullest: after backward
            after_backward = s.after_backward

            def measured(loss: torch.Tensor) -> None:
                held[0] = max(held[0], s.held())
                after_backward(loss)

            s.after_backward = measured
        for _ in range(steps):
            train_step(s, bench, x, y)
        out = {"rss_peak_mb": rss_high_water_mb(), "held_kb": held[0] / 1024}
        if bench.device.type == "cuda":
            torch.cuda.synchronize()
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        s.close()
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_memory(names: list[str], device: str, steps: int, threads: int | None, repeats: int = 1) -> dict[str, dict]:
    """Peak memory of each configuration: the median over ``repeats`` fresh subprocesses (run in turn)."""
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(repeats):
        for name in names:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", name, "--device", device,
                   "--steps", str(steps)] + (["--threads", str(threads)] if threads else [])
            res = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in res.stdout.splitlines() if l.startswith("{")]
            runs[name].append(json.loads(lines[-1]) if res.returncode == 0 and lines else {"error": res.stderr[-500:]})
    out = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r and "skipped" not in r]
        if not ok:
            out[name] = rs[-1]
            continue
        out[name] = {k: statistics.median(r[k] for r in ok) for k in ok[0]}
        out[name]["all"] = ok
    return out


# ----------------------------------------------------------------------------- report
@dataclass
class Row:
    config: str
    label: str
    ms_per_step: float | None
    kinds: dict[str, float]  # kind -> median step time in ms
    ratio: float | None
    overhead_pct: float | None
    peak_mb: float | None
    mem_overhead_pct: float | None
    held_kb: float | None  # tensors the instrumentation holds after backward (its fullest point)
    values_per_step: float | None
    n_steps: int
    note: str


def build_rows(names: list[str], setups: dict[str, Setup | str], times: dict, memory: dict, mem_key: str) -> list[Row]:
    flushes = times.get("lnprobe_every1", {}).get("flush")  # same sites and statistics as every 10
    borrow = {"lnprobe_every10": statistics.median(flushes) if flushes else None}
    ms: dict[str, tuple[float, str]] = {}
    for n in names:
        s = setups[n]
        if isinstance(s, Setup):
            ms[n] = ms_per_step(n, times[n], s.every, borrow.get(n))
    base = ms.get("none", (None, ""))[0]
    base_mem = memory.get("none", {}).get(mem_key)
    rows = []
    for n in names:
        s = setups[n]
        mem = memory.get(n, {}).get(mem_key)
        if isinstance(s, str):
            rows.append(Row(n, LABELS[n], None, {}, None, None, None, None, None, 0, s))
            continue
        t, note = ms[n]
        ratio = t / base if base else None
        kinds = {k: statistics.median(v) for k, v in times[n].items()}
        if len(kinds) > 1:
            detail = " / ".join(f"{k} {kinds[k]:.0f} ms ×{len(times[n][k])}" for k in ("plain", "record", "flush")
                                if k in kinds)
            note = f"{detail}{'; ' + note if note else ''}"
        rows.append(Row(
            n, LABELS[n], t, kinds, ratio, (ratio - 1) * 100 if ratio else None, mem,
            (mem / base_mem - 1) * 100 if mem and base_mem else None, memory.get(n, {}).get("held_kb") if s.held else None,
            s.values_per_step, sum(len(v) for k, v in times[n].items() if k != "flush"), note,
        ))
    return rows


def _f(v: float | None, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        width = fmt.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 1)
    return format(v, fmt)


def format_table(rows: list[Row], mem_label: str) -> str:
    head = (f"{'configuration':44s} {'ms/step':>9s} {'ratio':>6s} {'over %':>7s} {mem_label:>14s} {'mem %':>6s} "
            f"{'held KB':>9s} {'values/step':>11s}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.label:44s} {_f(r.ms_per_step, '9.1f')} {_f(r.ratio, '6.3f')} {_f(r.overhead_pct, '7.1f')} "
                     f"{_f(r.peak_mb, '14.1f')} {_f(r.mem_overhead_pct, '6.2f')} {_f(r.held_kb, '9.1f')} "
                     f"{_f(r.values_per_step, '11.0f')}  {r.note}")
    return "\n".join(lines)


def coverage_notes(names: list[str]) -> str:
    lines = ["Coverage is not comparable across rows; what each one records:"]
    lines += [f"  {LABELS[n]}: {COVERAGE[n]}" for n in names]
    return "\n".join(lines)


def write_csv(rows: list[Row], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "label", "ms_per_step", "ratio", "overhead_pct", "peak_mb", "mem_overhead_pct",
                    "held_kb", "values_per_step", "timed_steps", "median_plain_ms", "median_record_ms", "median_flush_ms",
                    "note"])
        for r in rows:
            w.writerow([r.config, r.label, r.ms_per_step, r.ratio, r.overhead_pct, r.peak_mb, r.mem_overhead_pct,
                        r.held_kb, r.values_per_step, r.n_steps, r.kinds.get("plain"), r.kinds.get("record"),
                        r.kinds.get("flush"), r.note])


def run_benchmark(names: list[str], device: str, steps: int, mem_steps: int, threads: int | None,
                  csv_path: str | None = None, memory: bool = True, mem_repeats: int = 3) -> list[Row]:
    """Time ``names`` alternated, measure their peak memory in subprocesses, print and return the table."""
    bench = default_bench(device)
    load0 = os.getloadavg()
    print(f"device {bench.device} · preset {bench.preset} · batch {bench.batch}×{bench.seq} · "
          f"{'bf16 autocast' if bench.amp_dtype else 'float32'} · torch {torch.__version__} · "
          f"{torch.get_num_threads()} threads · {steps} timed steps per configuration, alternated")
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} ({os.cpu_count()} CPUs)")
    work = Path(tempfile.mkdtemp(prefix="lnprobe-overhead-"))
    try:
        setups = {n: make_setup(n, bench, work) for n in names}
        live = [s for s in setups.values() if isinstance(s, Setup)]
        t0 = time.perf_counter()
        times = time_configs(live, bench, steps)
        wall = time.perf_counter() - t0
        for s in live:
            s.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mem_key = "cuda_peak_mb" if bench.device.type == "cuda" else "rss_peak_mb"
    mem_names = [n for n in names if n != "none_control"]
    mem = measure_memory(mem_names, device, mem_steps, threads, mem_repeats) if memory else {}
    rows = build_rows(names, setups, times, mem, mem_key)
    load1 = os.getloadavg()
    mem_label = "peak CUDA MB" if bench.device.type == "cuda" else "peak RSS MB"
    print(format_table(rows, mem_label))
    print(f"ms/step: Σ_kind frequency × median per kind (unrecorded step / recorded step / flush); "
          f"ratio to '{LABELS['none']}'.")
    if memory:
        print(f"memory: {'torch.cuda.max_memory_allocated' if bench.device.type == 'cuda' else 'process RSS high-water mark (VmHWM)'}"
              f", median of {mem_repeats} fresh subprocesses per configuration, {mem_steps} steps each; "
              "every child imports lnprobe. held KB: tensor storage the instrumentation holds after backward "
              "(lnprobe: Probe.held_bytes, partials of the open step plus unflushed steps; clone row: its clones), "
              "the most it keeps; exact, unlike the process peak.")
    print(coverage_notes(names))
    print(f"timing wall {wall:.0f} s; load average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    for r in rows:
        if r.config in mem and "error" in mem[r.config]:
            print(f"memory child {r.config} failed: {mem[r.config]['error']}")
    if csv_path:
        write_csv(rows, csv_path)
        print(f"wrote {csv_path}")
    return rows


def op_counts(device: str) -> list[tuple[str, float, int, float, float]]:
    """Device operations of the probe on one recorded step of the benchmark model, per reduction path:
    (path, hook operations per probed tensor, operations of probe.step(), KB created per probed tensor,
    largest temporary in KB). Counted by lnprobe.opcount.OpCounter; the accelerator paths run on this
    device's tensors (on CPU the fused kernel runs in Triton's interpreter: counted, not timed)."""
    from lnprobe import kernels
    from lnprobe.opcount import OpCounter

    bench = default_bench(device)
    x, y = bench.batch_tensors()
    out = []
    paths = [("cpu", True, True), ("torch", False, False)]
    if kernels.available(bench.device):
        paths.insert(1, ("fused", False, True))
    if bench.device.type == "cuda":
        paths = [p for p in paths if p[0] != "cpu"]
    saved = S.CPU_ROW_SKIPPING, S.FUSED_KERNEL
    for path, skipping, fused in paths:
        S.CPU_ROW_SKIPPING, S.FUSED_KERNEL = skipping, fused
        try:
            model, _ = _make_model(bench)

            def fb():
                with torch.autocast(bench.device.type, dtype=bench.amp_dtype or torch.float32,
                                    enabled=bench.amp_dtype is not None):
                    _, loss = model(x, y)
                loss.backward()
                return loss

            fb()
            model.zero_grad(set_to_none=True)
            with OpCounter() as bare:
                fb()
            model.zero_grad(set_to_none=True)
            with tempfile.TemporaryDirectory() as d:
                probe = lnprobe.attach(model, Path(d) / "run", every=1, flush_every=10**6)
                fb()
                probe.step()
                model.zero_grad(set_to_none=True)
                with OpCounter() as probed:
                    loss = fb()
                n = len({id(p) for acc in probe._acc.values() for p in acc.parts})
                n += sum(len(acc.grads) for acc in probe._acc.values())
                with OpCounter() as step:
                    probe.step(loss=loss)
                probe.close()
            extra_kb = (probed.new_bytes - bare.new_bytes) / n / 1024
            out.append((path, (probed.kernels - bare.kernels) / n, step.kernels, extra_kb, probed.largest / 1024))
        finally:
            S.CPU_ROW_SKIPPING, S.FUSED_KERNEL = saved
    return out


def print_op_counts(device: str) -> None:
    rows = op_counts(device)
    print("device operations per recorded step (lnprobe.opcount; default probe; model ops subtracted):")
    print(f"{'path':8s} {'ops/probed tensor':>18s} {'ops in step()':>14s} {'KB created/tensor':>18s} {'largest KB (step)':>18s}")
    for path, per, step, kb, largest in rows:
        print(f"{path:8s} {per:18.1f} {step:14d} {kb:18.1f} {largest:18.1f}")
    print("largest KB is the largest tensor created during the probed forward+backward, the model's own included.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 30, quick 10)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="few steps, short memory runs: a smoke test")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--csv", default=None, help="write the table as CSV to this path")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated subset of {','.join(CONFIGS)} (default: all but the compiled rows)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-control", action="store_true", help="leave out the A/A control (a 2nd unprobed copy)")
    p.add_argument("--ops", action="store_true", help="only count device operations per probed tensor and exit")
    p.add_argument("--no-ops", action="store_true", help="skip the device-operation counts")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled rows")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    steps = a.steps if a.steps is not None else (10 if a.quick else 30)
    globals()["COMPILE_BACKEND"] = a.compile_backend
    if a.ops:
        print_op_counts(a.device)
        return 0
    if a.memory_child:
        print(json.dumps(memory_child(a.memory_child, a.device, steps)))
        return 0
    names = [n.strip() for n in a.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; expected names from {','.join(CONFIGS)}")
    if "none" not in names:
        names.insert(0, "none")
    if a.no_control and "none_control" in names:
        names.remove("none_control")
    mem_steps = 3 if a.quick else DEFAULT_FLUSH_EVERY + 2
    run_benchmark(names, a.device, steps, mem_steps, a.threads, a.csv, memory=not a.no_memory,
                  mem_repeats=1 if a.quick else 3)
    if not a.no_ops:
        print_op_counts(a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
