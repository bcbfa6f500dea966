"""Cost of the per-step train scalars (``step_scalars``) and of spike-triggered bursts (``burst=``).

    python benchmarks/burst_overhead.py [--steps 30] [--device cpu|cuda] [--preset small] [--batch 16]
                                        [--seq 128] [--every 1000] [--threads N]

Model: the reference GPT (``lnprobe.models``), preset ``small`` (d_model 256, 8 layers) with batch
16 × 128 in float32 by default. A training step is forward, backward, ``probe.step()``, AdamW step,
zero_grad. Every configuration trains its own copy (same seed, same batch); all are ALTERNATED step by
step in one process (the order rotates every round), so load drift on a shared machine hits all alike.

Configurations: no probe · a second unprobed copy (A/A control: the noise floor) · a probe recording
every ``--every`` steps without per-step scalars (``step_scalars=False``: what an unrecorded step cost
before) · the same with per-step scalars (the default) · plus ``burst=Burst()`` · plus
``burst=Burst(history=16)`` (residual-stream history hooks on every forward). Only unrecorded steps
are timed (the schedule's step 0, steps recorded by a burst and the warm-up are left out). The bursts'
threshold is 1e9 by default, so that the detector runs at every step but no burst starts (with 7, the
default, a burst may start early in training, where the gradient norm still trends; ``--threshold 7``
shows it; bursts that started are named after their row):
the cost that bursts and scalars add to every step. Three numbers per configuration: the median full
step, the median forward + backward (where the history hooks run), and the median time inside
``probe.step()`` alone, which is far less noisy than a difference of full steps. On CUDA each timed
region is closed by ``torch.cuda.synchronize()``. Prints a table and the load average; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lnprobe  # noqa: E402
from lnprobe.models import GPT  # noqa: E402

CONFIGS: dict[str, dict[str, Any] | None] = {
    "no probe": None,
    "no probe, 2nd copy (A/A)": None,
    "probe, step_scalars=False": dict(step_scalars=False),
    "probe, per-step scalars (default)": dict(),
    "  + burst=Burst()": dict(burst="plain"),
    "  + burst=Burst(history=16)": dict(burst="history"),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per configuration (default 30)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--every", type=int, default=1000, help="probe schedule (default 1000: only step 0 recorded)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--threshold", type=float, default=1e9,
                    help="the bursts' spike threshold (default 1e9: never fires; 7 is Burst's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="lnprobe-burst-bench-"))
    setups = []
    for i, (name, kw) in enumerate(CONFIGS.items()):
        torch.manual_seed(0)
        model = GPT.from_preset(args.preset).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        probe = None
        if kw is not None:
            kw = dict(kw)
            b = kw.pop("burst", None)
            if b is not None:
                # a threshold no step reaches: the detector runs at every step, no burst starts (a burst's
                # cost is that of recording every step, lnprobe's every=1 row of benchmarks/overhead.py)
                kw["burst"] = lnprobe.Burst(history=16 if b == "history" else 0, threshold=args.threshold)
            probe = lnprobe.attach(model, work / f"run{i}", every=args.every, flush_every=10**6,
                                   flush_seconds=None, **kw)
        setups.append({"name": name, "model": model, "opt": opt, "probe": probe, "full": [], "step": [], "fb": []})
    vocab = setups[0]["model"].config.vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
    y = torch.roll(x, -1, 1)
    warmup = 2
    t_start = time.perf_counter()
    for rnd in range(warmup + args.steps):
        order = setups[rnd % len(setups):] + setups[:rnd % len(setups)]
        for s in order:
            recorded = s["probe"] is not None and s["probe"].recording  # the schedule's or a burst's step
            _sync(device)
            t0 = time.perf_counter()
            _, loss = s["model"](x, y)
            loss.backward()
            _sync(device)
            t1 = t2 = time.perf_counter()
            if s["probe"] is not None:
                s["probe"].step(loss=loss, lr=1e-4)
                _sync(device)
                t2 = time.perf_counter()
            s["opt"].step()
            s["opt"].zero_grad(set_to_none=True)
            _sync(device)
            t3 = time.perf_counter()
            if rnd >= warmup and not recorded:
                s["full"].append((t3 - t0) * 1e3)
                s["step"].append((t2 - t1) * 1e3)
                s["fb"].append((t1 - t0) * 1e3)
    wall = time.perf_counter() - t_start
    for s in setups:
        if s["probe"] is not None:
            s["bursts"] = len(s["probe"]._burst.bursts) if s["probe"]._burst is not None else 0
            s["probe"].close()
    shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(setups[0]["full"])
    n_params = sum(p.numel() for p in setups[0]["model"].parameters())
    print(f"reference GPT preset {args.preset} ({n_params / 1e6:.2f} M parameters), batch {args.batch} × {args.seq}, "
          f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads; {args.steps} timed unrecorded "
          f"steps per configuration, alternated; {wall:.0f} s wall; load average {os.getloadavg()[0]:.2f}")
    print("| configuration | ms/step (median) | ratio | overhead | ms forward + backward (median) "
          "| ms in probe.step() (median) |")
    print("|---|---|---|---|---|---|")
    for s in setups:
        full = statistics.median(s["full"])
        inside = f"{statistics.median(s['step']):.3f}" if s["probe"] is not None else "–"
        print(f"| {s['name'].strip()} | {full:.1f} | {full / base:.3f} | {100 * (full / base - 1):+.1f} % "
              f"| {statistics.median(s['fb']):.1f} | {inside} |" + (f" {s['bursts']} burst(s)" if s.get("bursts") else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
