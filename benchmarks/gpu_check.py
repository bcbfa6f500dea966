"""GPU check in one go: no host sync from lnprobe on non-flush steps, then the overhead table on CUDA.

    python benchmarks/gpu_check.py [--steps 30] [--quick] [--skip-table] [--csv PATH]

1. Sync check. The reference GPT (preset ``gpu``: d_model 512, 12 layers; batch 32 × 256; bf16
   autocast) trains under ``torch.cuda.set_sync_debug_mode("error")``, which raises on every
   synchronising CUDA call (``.item()``, a device-to-host copy, ``nonzero``, a pageable
   host-to-device copy, ...) made from Python or C++. The bare training loop is checked first, so
   that a failure can be attributed; then each probe case runs 3 steps with the mode on and
   ``flush_every`` large enough that no flush happens inside them (a flush is the one place where
   lnprobe syncs on purpose; it runs afterwards with the mode off). The probe turns an exception in
   a hook into a warning and keeps training, so any lnprobe warning during the checked steps counts
   as a failure too. Cases: default sites/stats every step; ``sites="all", stats="all"`` every step
   with gradients at every site; every 10 steps (off-schedule steps); gradient accumulation (2
   micro-batches); and ``probe.step(loss=<float>, lr=<float>)`` (host floats must not be copied to
   the device synchronously).
2. The fused kernel: a bf16 CUDA activation takes the ``fused`` path, its records equal the torch
   fallback's, and the device operations per probed tensor (``benchmarks/overhead.py --ops``).
3. Compiled model: ``torch.compile`` (inductor) of the reference GPT with a probe, recorded and
   unrecorded steps: graphs, graph breaks and recompiles counted; then ``mode="reduce-overhead"``
   (CUDA graphs) with a probe: trains and records, or the failure is reported.
4. The overhead table of ``benchmarks/overhead.py`` on CUDA (its functions, alternated configurations,
   the compiled rows, ``torch.cuda.max_memory_allocated`` per configuration in a subprocess).

Without CUDA the CPU-safe parts run (operation counts on CPU with the kernel in Triton's
interpreter, the compiled-model counts with the ``eager`` backend) and the script exits 2 saying so.
Exit status 1, with a banner, when any sync happened or a check failed. Budget: about 3-6 minutes on one
H200 (most of it the memory subprocesses; ``--quick`` for a smoke run).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import overhead as O  # noqa: E402  benchmarks/overhead.py

import lnprobe  # noqa: E402

CASES = {
    "default": dict(),
    "all_sites_all_stats": dict(sites="all", stats="all", grad_sites=lnprobe.ALL_SITES),
    "every10_off_schedule": dict(every=10),
    "grad_accumulation_x2": dict(accum=2),
    "host_float_loss_and_lr": dict(float_scalars=True),
}


def _step(model, opt, bench: O.Bench, x, y, probe=None, accum: int = 1, float_scalars: bool = False) -> None:
    for xs, ys in zip(x.chunk(accum), y.chunk(accum)):
        with torch.autocast(bench.device.type, dtype=bench.amp_dtype or torch.float32, enabled=bench.amp_dtype is not None):
            _, loss = model(xs, ys)
        (loss / accum).backward()
    if probe is not None:
        if float_scalars:
            probe.step(loss=1.2345, lr=3e-4)  # what a loop passes after its own logging
        else:
            probe.step(loss=loss)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _checked(fn, what: str) -> str | None:
    """Run ``fn`` with sync debug mode "error"; the failure text, or None."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        except Exception:
            return f"{what}: exception\n{traceback.format_exc()}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    probe_warnings = [str(w.message) for w in caught if str(w.message).startswith("lnprobe")]
    if probe_warnings:
        return f"{what}: lnprobe warned (a hook or step failed, e.g. on a sync):\n  " + "\n  ".join(probe_warnings)
    return None


def sync_check(steps: int = 3) -> list[str]:
    """The failures (empty when no sync happened)."""
    bench = O.default_bench("cuda")
    x, y = bench.batch_tensors()
    failures: list[str] = []

    model, opt = O._make_model(bench)
    for _ in range(2):  # warm-up: lazy CUDA/cuBLAS initialisation, AdamW state
        _step(model, opt, bench, x, y)
    err = _checked(lambda: _step(model, opt, bench, x, y), "bare training loop (no probe)")
    if err:
        print(err)
        return [f"the bare training loop syncs, so probe syncs cannot be attributed: fix the loop first\n{err}"]
    print("bare training loop: no sync")

    for name, kw in CASES.items():
        kw = dict(kw)
        every, accum, float_scalars = kw.pop("every", 1), kw.pop("accum", 1), kw.pop("float_scalars", False)
        model, opt = O._make_model(bench)
        _step(model, opt, bench, x, y)
        with tempfile.TemporaryDirectory() as tmp:
            probe = lnprobe.attach(model, Path(tmp) / name, every=every, flush_every=10**6, **kw)
            n = max(steps, 2 * every if every > 1 else steps)  # off-schedule case: cover a recorded step too
            t0 = time.perf_counter()
            err = _checked(lambda: [_step(model, opt, bench, x, y, probe, accum, float_scalars) for _ in range(n)],
                           f"probe case {name}")
            dt = time.perf_counter() - t0
            probe.close()  # the flush, outside the check
            r = lnprobe.load_run(Path(tmp) / name).records
            recorded = r["step"].nunique()
            expect = len(range(0, n, every))
            if err:
                failures.append(err)
            elif recorded != expect or r.empty:
                failures.append(f"probe case {name}: expected {expect} recorded steps, found {recorded}")
            print(f"probe case {name:24s}: {'SYNC' if err else 'no sync'} · {n} steps in {dt:.1f} s · "
                  f"{len(r)} rows over {recorded} recorded steps")
    return failures


def fused_check() -> list[str]:
    """The fused path on a CUDA bf16 tensor: chosen, and equal to the torch fallback."""
    from lnprobe import stats as S

    x = (torch.randn(32, 256, 512, device="cuda") * 2).bfloat16()
    x[3, 7, 11] = 3000.0
    path = S.reduction_path(x)
    plan = S.StatPlan(S.ACTIVATION_STATS)
    fused = S.finalize_activation([S.reduce_activation(x, plan)], S.ACTIVATION_STATS)[0].cpu()
    S.FUSED_KERNEL = False
    try:
        ref = S.finalize_activation([S.reduce_activation(x, plan)], S.ACTIVATION_STATS)[0].cpu()
    finally:
        S.FUSED_KERNEL = True
    ok = torch.allclose(fused, ref, rtol=1e-5, equal_nan=True)
    print(f"fused kernel: path {path} · equal to the torch fallback: {ok}")
    if path != "fused":
        return [f"fused check: a CUDA bf16 tensor took the {path!r} path (is triton importable?)"]
    return [] if ok else [f"fused check: fused {fused.tolist()} != fallback {ref.tolist()}"]


def _train_probed(model, out: Path, steps: int, device: str, after_step=None) -> None:
    """Train ``model`` (the vocabulary-64 GPT of compiled_check) for ``steps`` with a probe recording
    steps 0 and 2 into ``out``; ``after_step()`` runs after each step."""
    probe = lnprobe.attach(model, out, every=[0, 2])
    for _ in range(steps):
        x = torch.randint(0, 64, (4, 32), device=device)
        _, loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
        probe.step(loss=loss)
        if after_step is not None:
            after_step()
    probe.close()


def compiled_check(device: str, backend: str, steps: int = 4) -> list[str]:
    """A compiled reference GPT (``fullgraph=True``) with a probe recording steps 0 and 2: graphs, graph
    breaks, recompiles. Expected: no graph break, two graphs (recorded and unrecorded steps), none after."""
    from torch._dynamo.utils import counters

    from lnprobe.models import GPT, GPTConfig

    failures = []
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, seq_len=32, d_model=64, n_layers=4, n_heads=4)).to(device)
    graphs = [0]

    def counting(gm, example_inputs):
        graphs[0] += 1
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(backend)(gm, example_inputs)

    compiled = torch.compile(model, backend=counting, fullgraph=True)
    per_step = []
    with tempfile.TemporaryDirectory() as tmp:
        _train_probed(compiled, Path(tmp) / "run", steps, device,
                      after_step=lambda: per_step.append((graphs[0], sum(counters["graph_break"].values()))))
    print(f"compiled ({backend}, {device}): (graphs, graph breaks) after each step: {per_step}")
    if per_step[-1][0] != per_step[1][0]:
        failures.append(f"compiled check: recompiled after warm-up: {per_step}")
    if per_step[-1][1] or per_step[-1][0] > 2:
        failures.append(f"compiled check: graph breaks or more than two graphs: {per_step}")
    if device == "cuda":
        torch._dynamo.reset()
        try:
            cg = torch.compile(model, mode="reduce-overhead")
            with tempfile.TemporaryDirectory() as tmp:
                _train_probed(cg, Path(tmp) / "run", steps, device)
                rows = len(lnprobe.load_run(Path(tmp) / "run").records)
            print(f"CUDA graphs (reduce-overhead) with a probe: trained {steps} steps, {rows} rows")
        except Exception as exc:
            failures.append(f"CUDA graphs check: {type(exc).__name__}: {exc}")
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 30, quick 10)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-table", action="store_true", help="only the sync check")
    p.add_argument("--csv", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine; running the CPU-safe parts only")
        O.print_op_counts("cpu")
        cpu_failures = compiled_check("cpu", "eager")
        for f in cpu_failures:
            print(f)
        print("gpu_check: CUDA is not available: the sync check, the fused CUDA kernel, CUDA graphs and the "
              "CUDA overhead table did not run; run it on a GPU machine")
        return 2
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · CUDA {torch.version.cuda}")
    t0 = time.perf_counter()
    failures = sync_check()
    print(f"sync check: {time.perf_counter() - t0:.0f} s")
    failures += fused_check()
    O.print_op_counts("cuda")
    failures += compiled_check("cuda", "inductor")
    if not a.skip_table:
        steps = a.steps if a.steps is not None else (10 if a.quick else 30)
        O.run_benchmark(list(O.CONFIGS), "cuda", steps, mem_steps=3 if a.quick else O.DEFAULT_FLUSH_EVERY + 2,
                        threads=None, csv_path=a.csv, memory=True, mem_repeats=1)
    if failures:
        bar = "!" * 78
        print(f"\n{bar}\nCHECK FAILED (a sync on a non-flush step, or a fused/compiled check)\n{bar}")
        for f in failures:
            print(f)
        return 1
    print("\nsync check passed: no host synchronisation from lnprobe on non-flush steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
