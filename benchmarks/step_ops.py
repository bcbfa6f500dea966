"""Where the device operations of ``probe.step()`` come from, per reduction path.

    python benchmarks/step_ops.py [--layers 4] [--d-model 64] [--batch 4] [--seq 32] [--stats default|all]

One recorded training step of the reference GPT (``lnprobe.models``, pre-LN, float32 on CPU) with the
default probe: the device operations (``lnprobe.opcount.OpCounter``: kernels, not views or
allocations) that ``probe.step()`` dispatches, split by the function they come from, for each
reduction path (cpu, fused Triton kernel through Triton's interpreter, torch fallback; the
accelerator paths forced onto CPU tensors as ``LNPROBE_ACCELERATOR_PATH=1`` does). The second step
is counted: the first builds the cached finalize tables. Pieces nest: the indented rows are part of
the row above them; "train rows, assembly" is what ``StepRowsBuilder.build`` does itself (the train
scalars and the concatenation of the step's rows). Prints a table; asserts nothing (the budget is
``tests/test_hotpath.py``'s ``STEP_BUDGET``).
"""
from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lnprobe  # noqa: E402
from lnprobe import kernels  # noqa: E402
from lnprobe import stats as S  # noqa: E402
from lnprobe import steprows as SR  # noqa: E402
from lnprobe.models import GPT, GPTConfig  # noqa: E402
from lnprobe.opcount import OpCounter  # noqa: E402

# (owner, attribute, label): the functions whose operations are counted, nested by indentation
PIECES = [
    (S, "finalize_activations_packed", "activation finalize"),
    (S, "_sums", "  sums, counts"),
    (S, "_top3", "  top-3 values and locations"),
    (S, "_medians", "  medians"),
    (S, "finalize_gradients", "hidden-state gradients"),
    (SR.StepRowsBuilder, "_param_rows", "parameter norms"),
    (SR.StepRowsBuilder, "_gain_rows", "norm gains"),
]
PATHS = {"cpu": (True, True), "fused": (False, True), "torch": (False, False)}  # CPU_ROW_SKIPPING, FUSED_KERNEL


def _counted(fn, label: str, tally: Counter):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with OpCounter() as c:
            out = fn(*args, **kwargs)
        tally[label] += c.kernels
        return out
    return wrapper


def step_breakdown(path: str, layers: int, d_model: int, batch: int, seq: int, stats: str | None) -> Counter:
    """Operations of one recorded ``probe.step()`` per piece (and ``"step"``: all of them)."""
    tally: Counter = Counter()
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in PIECES]
    saved_path = S.CPU_ROW_SKIPPING, S.FUSED_KERNEL
    S.CPU_ROW_SKIPPING, S.FUSED_KERNEL = PATHS[path]
    try:
        for (owner, name, label), (_, _, fn) in zip(PIECES, saved):
            setattr(owner, name, _counted(fn, label, tally))
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, seq_len=seq, d_model=d_model, n_layers=layers, n_heads=4,
                              placement="pre"))
        x = torch.randint(0, 64, (batch, seq))
        y = torch.roll(x, -1, 1)
        with tempfile.TemporaryDirectory() as d:
            kw = {} if stats is None else {"stats": stats}
            probe = lnprobe.attach(model, Path(d) / "run", every=1, flush_every=10**6, **kw)
            for i in range(2):
                _, loss = model(x, y)
                loss.backward()
                if i:
                    tally.clear()
                    with OpCounter() as c:
                        probe.step(loss=loss)
                    tally["step"] = c.kernels
                else:
                    probe.step(loss=loss)
                model.zero_grad()
            probe.close()
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
        S.CPU_ROW_SKIPPING, S.FUSED_KERNEL = saved_path
    return tally


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--stats", choices=["default", "all"], default="default")
    a = p.parse_args(argv)
    paths = [q for q in PATHS if q != "fused" or kernels.available(torch.device("cpu"))]
    stats = None if a.stats == "default" else "all"
    cols = {q: step_breakdown(q, a.layers, a.d_model, a.batch, a.seq, stats) for q in paths}
    print(f"device operations of one recorded probe.step(): reference GPT, {a.layers} layers, d_model {a.d_model}, "
          f"{a.batch} x {a.seq} tokens, stats {a.stats}")
    print(f"{'piece':32s}" + "".join(f"{q:>8s}" for q in paths))
    top = [label for _, _, label in PIECES if not label.startswith(" ")]
    for _, _, label in PIECES:
        print(f"{label:32s}" + "".join(f"{cols[q][label]:8d}" for q in paths))
    rest = {q: cols[q]["step"] - sum(cols[q][label] for label in top) for q in paths}
    print(f"{'train rows, assembly':32s}" + "".join(f"{rest[q]:8d}" for q in paths))
    print(f"{'probe.step()':32s}" + "".join(f"{cols[q]['step']:8d}" for q in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
