"""Training-step cost of the opt-in ``logits`` and ``attn_logits`` sites (lnprobe.attnlogits).

    python benchmarks/attn_logits_overhead.py [--steps 20] [--device cpu|cuda] [--preset small]
                                              [--batch 16] [--threads N] [--csv PATH]

Model: the reference GPT (``lnprobe.models``) with QK-norm, preset ``small`` (d_model 256, 8 layers,
8 heads, seq 128) by default, batch 16 × 128, float32 (bf16 autocast on CUDA). A step is forward,
backward, AdamW step and zero_grad; every configuration trains its own copy (same seed and batch).

Configurations: no probe · a second unprobed copy (A/A control, the noise floor) · lnprobe every step
with the default sites · the same plus ``logits=True`` · plus ``logits=True, attn_logits=True`` · the
last every 10 steps. All are alternated step by step in one process (the order rotates every round),
so load drift hits them alike; each step is timed alone (between ``torch.cuda.synchronize()`` on
CUDA) with ``flush_every`` above the step count, so no Parquet write falls inside the window (the
flush cost is that of the default probe plus a few rows). Reported: the median ms/step of each
configuration, and for the every-10 row the long-run mean 0.1 × recorded + 0.9 × unrecorded median.
Separately: the reduction alone (``attention_partial`` of one layer's q, k and ``logit_partial`` of the
logits) against the model's own attention call. Prints the table and the load average; ``--csv``
writes it. Asserts nothing.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lnprobe  # noqa: E402
from lnprobe import attnlogits as A  # noqa: E402
from lnprobe.models import GPT, config_from_preset  # noqa: E402

CONFIGS = {
    "none": None,
    "none_control": None,
    "lnprobe_default": dict(every=1),
    "lnprobe_logits": dict(every=1, logits=True),
    "lnprobe_logits_attn": dict(every=1, logits=True, attn_logits=True),
    "lnprobe_logits_attn_every10": dict(every=10, logits=True, attn_logits=True),
}
LABELS = {
    "none": "no probe", "none_control": "no probe, 2nd copy (A/A noise control)",
    "lnprobe_default": "lnprobe every step (default sites)", "lnprobe_logits": "+ logits=True",
    "lnprobe_logits_attn": "+ logits=True, attn_logits=True",
    "lnprobe_logits_attn_every10": "logits + attn_logits, every 10 steps",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration (after 2 warm-up steps)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = config_from_preset(args.preset, qk_norm=True)
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else None
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, cfg.seq_len), generator=g).to(device)
    y = torch.roll(x, -1, 1)
    tmp = Path(tempfile.mkdtemp(prefix="attnlogits-bench-"))
    state = {}
    for name, kw in CONFIGS.items():
        torch.manual_seed(0)
        model = GPT(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        probe = None if kw is None else lnprobe.attach(model, tmp / name, flush_every=10 ** 6, flush_seconds=None,
                                                        **kw)
        state[name] = dict(model=model, opt=opt, probe=probe, rec=[], off=[])

    def step(s):
        if amp is not None:
            with amp:
                _, loss = s["model"](x, y)
        else:
            _, loss = s["model"](x, y)
        loss.backward()
        if s["probe"] is not None:
            s["probe"].step(loss=loss)
        s["opt"].step()
        s["opt"].zero_grad(set_to_none=True)

    names = list(CONFIGS)
    for _ in range(2):  # warm-up (allocator, first recorded step)
        for n in names:
            step(state[n])
    for r in range(args.steps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            s = state[n]
            recorded = s["probe"] is None or s["probe"].recording
            (s["rec"] if recorded else s["off"]).append(_timed(lambda: step(s), device))
    for s in state.values():
        if s["probe"] is not None:
            s["probe"].close()

    base = statistics.median(state["none"]["rec"])
    rows = []
    for n in names:
        s = state[n]
        every = (CONFIGS[n] or {}).get("every", 1)
        rec = statistics.median(s["rec"]) if s["rec"] else float("nan")
        off = statistics.median(s["off"]) if s["off"] else rec
        ms = rec / every + off * (1 - 1 / every)
        rows.append(dict(config=n, label=LABELS[n], ms_per_step=round(ms, 2), ratio=round(ms / base, 4),
                         overhead_pct=round(100 * (ms / base - 1), 2), recorded_ms=round(rec, 2),
                         unrecorded_ms=round(off, 2) if s["off"] else None, n_steps=len(s["rec"]) + len(s["off"])))

    # the reductions alone, against the model's own attention of one layer
    torch.manual_seed(0)
    B, H, T, Dh = args.batch, cfg.n_heads, cfg.seq_len, cfg.d_model // cfg.n_heads
    q, k, v = (torch.randn(B, H, T, Dh, device=device) for _ in range(3))
    z = torch.randn(B, T, cfg.vocab_size, device=device)
    reps = 10

    def per_call(fn) -> float:
        fn()
        return statistics.median(_timed(fn, device) for _ in range(reps))

    sdpa_ms = per_call(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    attn_ms = per_call(lambda: A.attention_partial(q, k, is_causal=True))
    logit_ms = per_call(lambda: A.logit_partial(z))

    print(f"reference GPT preset {args.preset} with QK-norm (d_model {cfg.d_model}, {cfg.n_layers} layers, "
          f"{cfg.n_heads} heads, seq {cfg.seq_len}), batch {args.batch}, device {device}, "
          f"{torch.get_num_threads()} threads, {args.steps} rounds; load average {os.getloadavg()}")
    print(f"{'configuration':<44} {'ms/step':>9} {'ratio':>7} {'overhead':>9} {'recorded':>9} {'unrec.':>8}")
    for r in rows:
        un = "" if r["unrecorded_ms"] is None else f"{r['unrecorded_ms']:.1f}"
        print(f"{r['label']:<44} {r['ms_per_step']:>9.1f} {r['ratio']:>7.3f} {r['overhead_pct']:>8.1f}% "
              f"{r['recorded_ms']:>9.1f} {un:>8}")
    print(f"one layer ({B}×{H}×{T}×{Dh}): the model's SDPA {sdpa_ms:.2f} ms, attention_partial {attn_ms:.2f} ms; "
          f"logit_partial of ({B}, {T}, {cfg.vocab_size}) {logit_ms:.2f} ms")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
