"""Probe on torch.compile'd models: same records as eager, no recompilation after warm-up.

The hook bodies are ``torch.compiler.disable``d (lnprobe.runtime.no_compile): the schedule flag is read
outside traced code, so flipping it between scheduled and unscheduled steps never touches Dynamo's
guards. Compilation is counted with a counting backend around ``aot_eager`` (fast on CPU): every new
graph Dynamo produces (first compile or recompile) calls the backend once. The HF model uses the
plain ``eager`` backend to stay fast on 2 CPU cores (Dynamo's tracing and guards are the same).
"""
import numpy as np
import pytest
import torch
from helpers import tiny_llama
from nanogpt import NanoGPT

import lnprobe

VOCAB, T = 64, 16
SCHEDULE = [0, 2]  # steps 1 and 3 unscheduled


class CountingBackend:
    def __init__(self, inner: str):
        from torch._dynamo.backends.registry import lookup_backend

        self.inner = lookup_backend(inner)
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


def batch(step, b=4):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, VOCAB, (b, T), generator=g)
    return x, torch.roll(x, -1, 1)


def run(model, out, forward, steps=4, counts=None, backend=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lnprobe.attach(model, out, every=SCHEDULE, sites="all") as probe:
        for step in range(steps):
            loss = forward(model, *batch(step))
            loss.backward()
            probe.step(loss=loss)
            opt.step()
            opt.zero_grad()
            if counts is not None:
                counts.append((backend.graphs, _frames()))
    return lnprobe.load_run(out).records


def _frames():
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def same_records(a, b):
    key = ["step", "site", "layer", "stat"]
    m = a.merge(b, on=key, suffixes=("_e", "_c"), how="outer", indicator=True)
    assert (m._merge == "both").all() and len(m) > 0
    assert sorted(m[m.site != "train"].step.unique()) == SCHEDULE  # train rows: every step
    np.testing.assert_allclose(m.value_c, m.value_e, rtol=1e-5, atol=1e-8)
    loc = m[m.stat.isin(["absmax", "top1"])]
    assert (loc.token_c == loc.token_e).all() and (loc.channel_c == loc.channel_e).all()


def check_compiled_equals_eager(tmp_path, make, forward, backend_name):
    torch._dynamo.reset()
    eager = make()
    compiled_inner = make()
    compiled_inner.load_state_dict(eager.state_dict())
    backend = CountingBackend(backend_name)
    compiled = torch.compile(compiled_inner, backend=backend)
    counts = []
    rc = run(compiled, tmp_path / "compiled", forward, counts=counts, backend=backend)
    re = run(eager, tmp_path / "eager", forward)
    same_records(re, rc)
    # Warm-up: step 0 (first scheduled) and step 1 (first unscheduled). Flat afterwards.
    assert counts[1][0] > 0, "nothing was compiled"
    assert counts[-1] == counts[1], f"recompiled after warm-up: (graphs, frames) per step {counts}"
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled_inner.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_compiled_nanogpt_records_equal_eager_without_recompiles(tmp_path):
    def make():
        torch.manual_seed(0)
        return NanoGPT(vocab=VOCAB, block_size=T)

    check_compiled_equals_eager(tmp_path, make, lambda m, x, y: m(x, y)[1], "aot_eager")


def test_compiled_hf_llama_records_equal_eager_without_recompiles(tmp_path):
    pytest.importorskip("transformers")

    def make():
        torch.manual_seed(0)
        return tiny_llama(VOCAB, T)

    check_compiled_equals_eager(tmp_path, make, lambda m, x, y: m(input_ids=x, labels=x).loss, "eager")


def test_schedule_flag_stays_out_of_traced_code():
    from lnprobe.runtime import no_compile as _no_compile

    calls = []

    @_no_compile
    def hook():
        calls.append(torch.compiler.is_compiling())

    hook()
    fn = torch.compile(lambda x: (hook(), x * 2)[1], backend="eager")
    fn(torch.ones(2))
    assert calls == [False, False]  # the hook body ran eagerly, also when called from compiled code
