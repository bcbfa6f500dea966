"""Probe on torch.compile'd models: the site hooks are traced into the model's graph (lnprobe.traced).

Checked: ``fullgraph=True`` compiles (no graph break anywhere), Dynamo's graph-break counter stays
empty, exactly two graphs are compiled (recorded and unrecorded steps: the schedule flag is the only
guard the probe adds), none after warm-up, also with gradient accumulation, and the records (values,
tokens and channels, hidden-state gradients included) equal an eager run's. Compilation is counted
with a counting backend around ``aot_eager`` (fast on CPU): every new graph Dynamo produces (first
compile or recompile) calls the backend once. The HF model uses the plain ``eager`` backend to stay
fast on 2 CPU cores (Dynamo's tracing and guards are the same).
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


def run(model, out, forward, steps=4, counts=None, backend=None, micro=1, grad_sites="all"):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lnprobe.attach(model, out, every=SCHEDULE, sites="all", grad_sites=grad_sites) as probe:
        for step in range(steps):
            for m in range(micro):  # gradient accumulation: micro-batches of one optimizer step
                loss = forward(model, *batch(step * micro + m))
                (loss / micro).backward()
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


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def check_compiled_equals_eager(tmp_path, make, forward, backend_name, micro=1, fullgraph=True, grad_sites="all"):
    """Compile ``make()`` with a probe and compare with an eager twin; return the graphs compiled per step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # graph breaks of earlier tests do not count
    eager = make()
    compiled_inner = make()
    compiled_inner.load_state_dict(eager.state_dict())
    backend = CountingBackend(backend_name)
    compiled = torch.compile(compiled_inner, backend=backend, fullgraph=fullgraph)
    counts = []
    rc = run(compiled, tmp_path / "compiled", forward, counts=counts, backend=backend, micro=micro,
             grad_sites=grad_sites)
    re = run(eager, tmp_path / "eager", forward, micro=micro, grad_sites=grad_sites)
    same_records(re, rc)
    assert set(re.site) >= {"resid", "train"} and "grad_rms" in set(rc.stat)
    # Warm-up: step 0 (first scheduled) and step 1 (first unscheduled). Flat afterwards.
    assert counts[1][0] > 0, "nothing was compiled"
    assert counts[-1] == counts[1], f"recompiled after warm-up: (graphs, frames) per step {counts}"
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled_inner.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    return [graphs for graphs, _ in counts]


def check_no_graph_break(tmp_path, make, forward, backend_name, micro=1, grad_sites="all"):
    graphs = check_compiled_equals_eager(tmp_path, make, forward, backend_name, micro, grad_sites=grad_sites)
    assert _graph_breaks() == 0
    # one graph for recorded steps, one for unrecorded ones, whatever the number of micro-batches
    assert graphs == [1, 2, 2, 2], f"graphs compiled after each step: {graphs}"


def make_gpt():
    from lnprobe.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, seq_len=T, n_layers=3, n_heads=2, d_model=32))


@pytest.mark.parametrize("micro", [1, 3])
def test_compiled_reference_gpt_has_no_graph_break(tmp_path, micro):
    check_no_graph_break(tmp_path, make_gpt, lambda m, x, y: m(x, y)[1], "aot_eager", micro)


def test_without_the_traced_form_the_graph_breaks(tmp_path, monkeypatch):
    """Counter-example of the checks above: hooks that take their eager form inside traced code (the
    autograd-engine query, tensor hooks) cannot be compiled with ``fullgraph=True``."""
    import lnprobe.hooks as H

    monkeypatch.setattr(H, "compiling", lambda: False)
    with pytest.raises(Exception, match="(?i)graph break|unsupported|not supported|skip"):
        check_compiled_equals_eager(tmp_path, make_gpt, lambda m, x, y: m(x, y)[1], "aot_eager")


def test_failing_traced_delivery_disables_its_point_and_training_goes_on(tmp_path, monkeypatch):
    """A receiver that raises inside a compiled graph's run is a warning, never an error of training."""
    import lnprobe.hooks as H

    real = H.SiteObserver._file

    def file_or_fail(self, part, keys):
        if any(site == "attn_out" for site, _ in keys):
            raise RuntimeError("planted")
        real(self, part, keys)

    monkeypatch.setattr(H.SiteObserver, "_file", file_or_fail)
    torch._dynamo.reset()
    model = torch.compile(make_gpt(), backend="aot_eager", fullgraph=True)
    with pytest.warns(RuntimeWarning, match="disabled hook point .*planted"):
        records = run(model, tmp_path / "run", lambda m, x, y: m(x, y)[1])
    assert "attn_out" not in set(records.site) and {"resid", "mlp_out"} <= set(records.site)
    # closed probe: the compiled graph still calls the operator, which now does nothing
    x, y = batch(9)
    model(x, y)[1].backward()


def test_compiled_nanogpt_has_no_graph_break(tmp_path):
    def make():
        torch.manual_seed(0)
        return NanoGPT(vocab=VOCAB, block_size=T)

    check_no_graph_break(tmp_path, make, lambda m, x, y: m(x, y)[1], "aot_eager")


def test_compiled_hf_llama_has_no_graph_break(tmp_path):
    pytest.importorskip("transformers")

    def make():
        torch.manual_seed(0)
        return tiny_llama(VOCAB, T)

    # The default hidden-state gradients (resid: block inputs and outputs, through the gradient tap).
    # Gradients of sublayer inputs (grad_sites="all") use a traced tensor hook, which Dynamo 2.13
    # cannot combine with transformers' KV cache (docs/design.md §8): use_cache=False there.
    check_no_graph_break(tmp_path, make, lambda m, x, y: m(input_ids=x, labels=x).loss, "eager", micro=2,
                         grad_sites="resid")
    check_no_graph_break(tmp_path / "all", make, lambda m, x, y: m(input_ids=x, labels=x, use_cache=False).loss,
                         "eager")


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


def test_compiled_burst_history_and_logit_sites_have_no_graph_break(tmp_path):
    """The burst history hooks (unrecorded steps) and both logit sites are traced too: a spike at step
    15 records the same history and bursts as an eager run, with ``fullgraph=True`` and no recompilation
    after warm-up."""
    from torch._dynamo.utils import counters

    def train(model, out, backend=None):
        counts = []
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with lnprobe.attach(model, out, every=100, logits=True, attn_logits=True,
                            burst=lnprobe.Burst(steps=3, history=4)) as probe:
            for step in range(20):
                loss = model(*batch(step))[1]
                (loss * 50 if step == 15 else loss).backward()
                probe.step(loss=loss * 50 if step == 15 else loss)
                opt.step()
                opt.zero_grad()
                counts.append(backend.graphs if backend else 0)
        return lnprobe.load_run(out), counts

    torch._dynamo.reset()
    counters.clear()
    eager, inner = make_gpt(), make_gpt()
    inner.load_state_dict(eager.state_dict())
    backend = CountingBackend("aot_eager")
    got, counts = train(torch.compile(inner, backend=backend, fullgraph=True), tmp_path / "compiled", backend)
    want, _ = train(eager, tmp_path / "eager")
    assert got.meta["bursts"] == want.meta["bursts"] and want.meta["bursts"][0]["history"] == [12, 13, 14, 15]
    same = want.records.merge(got.records, on=["step", "site", "layer", "stat"], suffixes=("_e", "_c"),
                              how="outer", indicator=True)
    assert (same._merge == "both").all() and {12, 13, 14, 15, 16, 17, 18} <= set(same.step)
    assert {"logits", "attn_logits", "resid"} <= set(same.site)
    np.testing.assert_allclose(same.value_c, same.value_e, rtol=1e-5, atol=1e-8)
    assert _graph_breaks() == 0
    assert counts[-1] == counts[1], f"graphs compiled after each step: {counts}"


class _InPlaceModel(torch.nn.Module):
    """Pre-LN blocks whose outputs the model scales in place (valid in eager: nothing saved them)."""

    class Block(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            self.attn = torch.nn.Linear(d, d)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    def __init__(self, d=16, layers=2):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, d)
        self.blocks = torch.nn.ModuleList([self.Block(d) for _ in range(layers)])
        self.lnf, self.head = torch.nn.LayerNorm(d), torch.nn.Linear(d, VOCAB)

    def forward(self, idx, targets=None):
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
            x.mul_(1.5)  # in place on a block output, whose gradient the probe records
        logits = self.head(self.lnf(x))
        if targets is None:
            return logits, None
        return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_compiled_model_that_modifies_a_probed_output_in_place(tmp_path):
    """The traced gradient tap must not forbid what eager autograd allows (a view returned by a custom
    autograd.Function may not be modified in place; the tap returns a copy)."""
    def make():
        torch.manual_seed(0)
        return _InPlaceModel()

    check_no_graph_break(tmp_path, make, lambda m, x, y: m(x, y)[1], "aot_eager")
