"""The ``logits`` and ``attn_logits`` sites (lnprobe.attnlogits) against explicit computations.

References are computed apart from the probe's hooks: q and k are rebuilt from the attention module's
input with the model's own projections (and, for Llama, its rotary embedding), then softmax(QKᵀ)
with an explicit mask, in float64.
"""
from __future__ import annotations

import math
from datetime import timedelta

import numpy as np
import pytest
import torch
from helpers import launch_workers
from torch.utils._python_dispatch import TorchDispatchMode

import lnprobe
from lnprobe import attnlogits as A
from lnprobe.models import GPT, GPTConfig

VOCAB, T = 40, 12


def _gpt(qk_norm: bool = False, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, seq_len=T, d_model=32, n_layers=2, n_heads=4, qk_norm=qk_norm)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def _batch(seed: int, b: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, T), generator=torch.Generator().manual_seed(seed))


def _explicit(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, scale: float) -> dict:
    """qk_absmax (with token, head) and mean entropy of softmax(q·kᵀ·scale) over ``allowed`` (float64)."""
    q, k = q.detach().double(), k.detach().double()
    s = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, S)
    a = torch.where(allowed, s.abs(), torch.zeros_like(s))
    flat = int(a.reshape(-1).argmax())
    B, H, Tq, S = s.shape
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    logp = torch.where(allowed, torch.log(p), torch.zeros_like(p))
    ent = -(p * logp).sum(-1)  # (B, H, T)
    return {"qk_absmax": float(a.max()), "token": flat // S % Tq, "head": flat // (Tq * S) % H,
            "entropy": float(ent.mean())}


def _records(path) -> "object":
    r = lnprobe.load_run(path).records
    return r[r.site.isin(["logits", "attn_logits"])]


def _gpt_reference_qk(model: GPT, x: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer the q, k (B, H, T, Dh) rebuilt from the attention input with the block's own weights."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [b.attn.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach()))
             for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out = {}
    for i, block in enumerate(model.blocks):
        att, h = block.attn, seen[i]
        B, Tn, D = h.shape
        q, k, _ = att.qkv(h).split(D, -1)
        q, k = (t.view(B, Tn, att.n_heads, D // att.n_heads).transpose(1, 2) for t in (q, k))
        if att.q_norm is not None:
            q, k = att.q_norm(q), att.k_norm(k)
        out[i] = (q, k)
    return out


@pytest.mark.parametrize("qk_norm", [False, True])
def test_reference_gpt_equals_explicit_softmax(tmp_path, qk_norm):
    model = _gpt(qk_norm)
    model.train()
    x = _batch(1)
    ref = _gpt_reference_qk(model, x)
    probe = lnprobe.attach(model, tmp_path / "run", logits=True, attn_logits=True)
    logits, loss = model(x, x)
    loss.backward()
    probe.step(loss=loss)
    probe.close()
    rec = _records(tmp_path / "run")
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer, (q, k) in ref.items():
        want = _explicit(q, k, causal, 1 / math.sqrt(q.shape[-1]))
        got = rec[(rec.site == "attn_logits") & (rec.layer == layer)].set_index("stat")
        assert got.loc["qk_absmax", "value"] == pytest.approx(want["qk_absmax"], rel=1e-5)
        assert int(got.loc["qk_absmax", "token"]) == want["token"]
        assert int(got.loc["qk_absmax", "channel"]) == want["head"]
        assert got.loc["entropy", "value"] == pytest.approx(want["entropy"], rel=1e-5)
    z = logits.detach().double().reshape(-1, VOCAB).numpy()
    got = rec[rec.site == "logits"].set_index("stat")
    assert (rec[rec.site == "logits"].layer == model.config.n_layers).all()
    assert got.loc["logit_rms", "value"] == pytest.approx(np.sqrt(np.mean(z ** 2)), rel=1e-6)
    r, c = np.unravel_index(np.abs(z).argmax(), z.shape)
    assert got.loc["logit_absmax", "value"] == pytest.approx(np.abs(z).max(), rel=1e-6)
    assert (int(got.loc["logit_absmax", "token"]), int(got.loc["logit_absmax", "channel"])) == (r % T, c)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    assert got.loc["lse_mean", "value"] == pytest.approx(lse.mean(), rel=1e-6)


def test_causal_mask_is_respected():
    """The largest |q·k| sits at a masked pair (query 0, key 3): it must not count, and the entropy
    is that of the causal softmax."""
    q = torch.ones(1, 1, 4, 2)
    k = torch.ones(1, 1, 4, 2)
    q[0, 0, 0] = torch.tensor([100.0, 0.0])
    k[0, 0, 3] = torch.tensor([100.0, 0.0])
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    want = _explicit(q, k, causal, 0.5)
    got = A.finalize_attention(A.attention_partial(q, k, 0.5, is_causal=True))[0]
    assert float(got[0]) == pytest.approx(want["qk_absmax"]) == 50.0  # not 5000: (0, 3) is masked
    assert float(got[1]) == pytest.approx(want["entropy"], rel=1e-6)
    unmasked = A.finalize_attention(A.attention_partial(q, k, 0.5, is_causal=False))[0]
    assert float(unmasked[0]) == pytest.approx(5000.0)  # the counter-example: without the mask it counts
    # the same mask as a boolean and as an additive float tensor (Hugging Face's forms)
    for mask in (causal[None, None], torch.zeros(4, 4).masked_fill(~causal, torch.finfo(torch.float32).min)):
        got_m = A.finalize_attention(A.attention_partial(q, k, 0.5, mask=mask))[0]
        assert torch.allclose(got_m, got, rtol=1e-6)
    # a query that may attend to no key is left out of the entropy mean (not NaN, not 0)
    none_for_0 = causal.clone()
    none_for_0[0] = False
    rows = _explicit(q[:, :, 1:], k, none_for_0[1:], 0.5)
    got_n = A.finalize_attention(A.attention_partial(q, k, 0.5, mask=none_for_0))[0]
    assert float(got_n[1]) == pytest.approx(rows["entropy"], rel=1e-6)


def test_chunked_reduction_equals_one_chunk(monkeypatch):
    torch.manual_seed(0)
    q, k = torch.randn(5, 2, 6, 4), torch.randn(5, 1, 6, 4)  # grouped-query: one key head for two
    z = torch.randn(5, 6, 30)
    whole = A.attention_partial(q, k, is_causal=True), A.logit_partial(z)
    monkeypatch.setattr(A, "CHUNK_ELEMENTS", 50)  # several batch rows / logit rows per chunk
    parts = A.attention_partial(q, k, is_causal=True), A.logit_partial(z)
    for a, b in zip(whole, parts):
        assert torch.allclose(a, b, rtol=1e-12)


def _llama_reference_qk(model, x, attention_mask=None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """q and k after rotary embeddings, rebuilt from each attention module's inputs, key heads repeated."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    seen = {}
    layers = model.model.layers
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda m, a, kw, i=i: seen.__setitem__(i, (kw.get("hidden_states", a[0] if a else None),
                                                   kw["position_embeddings"])), with_kwargs=True)
        for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=x, attention_mask=attention_mask)
    for h in hooks:
        h.remove()
    out = {}
    for i, layer in enumerate(layers):
        att = layer.self_attn
        h, (cos, sin) = seen[i]
        shape = (*h.shape[:-1], -1, att.head_dim)
        q = att.q_proj(h).view(shape).transpose(1, 2)
        k = att.k_proj(h).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out[i] = (q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1))
    return out


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [False, True])
def test_tiny_llama_rotary_equals_explicit_softmax(tmp_path, impl, padded):
    pytest.importorskip("transformers")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from lnprobe.testing import tiny_hf_model

    model = tiny_hf_model("llama", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=T, attn_implementation=impl)
    model.train()
    x = _batch(2, b=2)
    mask = None
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None]  # (1, 1, T, T)
    if padded:  # right padding of the second sequence: its last 4 keys are masked for every query
        mask = torch.ones(2, T, dtype=torch.long)
        mask[1, -4:] = 0
        allowed = allowed & mask.bool()[:, None, None, :]
    ref = _llama_reference_qk(model, x, mask)
    before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    probe = lnprobe.attach(model, tmp_path / "run", attn_logits=True, logits=True)
    out = model(input_ids=x, attention_mask=mask, labels=x)
    out.loss.backward()
    probe.step(loss=out.loss)
    probe.close()
    assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == before  # the interface is restored at close
    rec = _records(tmp_path / "run")
    assert set(rec[rec.site == "attn_logits"].layer) == {0, 1}
    for layer, (q, k) in ref.items():
        want = _explicit(q, k, allowed, model.model.layers[layer].self_attn.scaling)
        got = rec[(rec.site == "attn_logits") & (rec.layer == layer)].set_index("stat")
        assert got.loc["qk_absmax", "value"] == pytest.approx(want["qk_absmax"], rel=1e-5)
        assert int(got.loc["qk_absmax", "channel"]) == want["head"]
        assert int(got.loc["qk_absmax", "token"]) == want["token"]
        assert got.loc["entropy", "value"] == pytest.approx(want["entropy"], rel=1e-5)
    z = out.logits.detach().double().reshape(-1, VOCAB).numpy()
    got = rec[rec.site == "logits"].set_index("stat")
    assert got.loc["logit_absmax", "value"] == pytest.approx(np.abs(z).max(), rel=1e-6)


class _MatmulCounter(TorchDispatchMode):
    """Counts the matrix-multiply and attention kernels dispatched."""

    OPS = ("mm", "bmm", "addmm", "baddbmm", "matmul", "_scaled_dot_product", "scaled_dot_product")

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if any(name.startswith(op) for op in self.OPS):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _count_matmuls(model, x) -> int:
    with _MatmulCounter() as c:
        _, loss = model(x, x)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return c.n


def test_unrecorded_steps_run_no_extra_matmul(tmp_path):
    model = _gpt(qk_norm=True)
    x = _batch(3)
    bare = _count_matmuls(model, x)
    probe = lnprobe.attach(model, tmp_path / "run", every=[0], attn_logits=True, logits=True)
    recorded = _count_matmuls(model, x)  # step 0: on the schedule
    probe.step()
    off = _count_matmuls(model, x)  # step 1: off the schedule
    probe.step()
    probe.close()
    assert off == bare
    assert recorded == bare + model.config.n_layers  # the counter-example: one extra QKᵀ per layer


def test_qk_norm_bound_of_theory_section_5(tmp_path):
    """theory.md §5: with QK-norm, qk_absmax ≤ sqrt(d_h)·max|γ_q|·max|γ_k| — also after training has moved
    the gains; without QK-norm nothing bounds it (large weights exceed sqrt(d_h)·1·1)."""
    from lnprobe.analysis.theory import qk_logit_bound

    model = _gpt(qk_norm=True, init_std=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    probe = lnprobe.attach(model, tmp_path / "run", every=1, attn_logits=True)
    bounds = []
    for step in range(6):
        x = _batch(10 + step)
        _, loss = model(x, x)
        loss.backward()
        probe.step(loss=loss)
        bounds.append([qk_logit_bound(8, float(b.attn.q_norm.weight.detach().abs().max()),
                                      float(b.attn.k_norm.weight.detach().abs().max())) for b in model.blocks])
        opt.step()
        opt.zero_grad()
    probe.close()
    rec = _records(tmp_path / "run")
    qk = rec[rec.stat == "qk_absmax"]
    assert len(qk) == 6 * 2
    for row in qk.itertuples():
        assert row.value <= bounds[row.step][row.layer] * (1 + 1e-6)
    assert max(max(b) for b in bounds) > math.sqrt(8) * 1.01  # training moved the gains above 1
    assert qk.value.max() > 0.5 * math.sqrt(8)  # and the bound is not vacuous here

    free = _gpt(qk_norm=False, init_std=0.5)
    probe = lnprobe.attach(free, tmp_path / "free", attn_logits=True)
    x = _batch(1)
    _, loss = free(x, x)
    loss.backward()
    probe.step()
    probe.close()
    qk_free = _records(tmp_path / "free").query("stat == 'qk_absmax'").value
    assert qk_free.max() > qk_logit_bound(8, 1.0, 1.0)  # the counter-example


def test_gradient_accumulation_merges_micro_batches(tmp_path):
    model = _gpt()
    xs = [_batch(20), _batch(21)]
    singles = []
    for i, x in enumerate(xs):
        probe = lnprobe.attach(model, tmp_path / f"single{i}", attn_logits=True, logits=True)
        _, loss = model(x, x)
        probe.step()
        probe.close()
        singles.append(_records(tmp_path / f"single{i}").set_index(["site", "layer", "stat"]).value)
    probe = lnprobe.attach(model, tmp_path / "accum", attn_logits=True, logits=True)
    for x in xs:
        model(x, x)
    probe.step()
    probe.close()
    both = _records(tmp_path / "accum").set_index(["site", "layer", "stat"]).value
    for key, v in both.items():
        a, b = singles[0][key], singles[1][key]
        want = max(a, b) if key[2].endswith("absmax") else (a + b) / 2  # equal batch sizes: the mean of means
        if key[2] == "logit_rms":
            want = math.sqrt((a * a + b * b) / 2)
        assert v == pytest.approx(want, rel=1e-9), key


def test_no_host_sync_with_logit_sites(tmp_path, monkeypatch):
    from test_sync import SyncCounter, assert_no_probe_syncs, run_probed

    counter = SyncCounter(monkeypatch)
    counter.install()
    run = run_probed(_gpt(qk_norm=True, vocab_size=64, seq_len=16), tmp_path / "run", counter, accum=2,
                     logits=True, attn_logits=True)
    assert_no_probe_syncs(counter)
    assert {"logits", "attn_logits"} <= set(run.records.site)


def test_a_failing_reduction_warns_and_training_goes_on(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(A, "attention_partial", broken)
    model = _gpt()
    probe = lnprobe.attach(model, tmp_path / "run", attn_logits=True, logits=True)
    x = _batch(4)
    with pytest.warns(RuntimeWarning, match="attn_logits disabled"):
        _, loss = model(x, x)
    loss.backward()
    probe.step(loss=loss)
    probe.close()
    run = lnprobe.load_run(tmp_path / "run")
    assert "attn_logits" not in set(run.records.site) and "logits" in set(run.records.site)
    assert any("attn_logits disabled" in n for n in run.meta["notes"])


def test_models_without_an_attention_point_get_a_note(tmp_path):
    from nanogpt import NanoGPT

    torch.manual_seed(0)
    model = NanoGPT(vocab=VOCAB, block_size=T)
    probe = lnprobe.attach(model, tmp_path / "run", attn_logits=True)
    probe.close()
    assert any("attn_logits not recorded" in n for n in lnprobe.load_run(tmp_path / "run").meta["notes"])


def _trained_qk_run(path, steps: int = 4):
    model = _gpt(qk_norm=True, init_std=0.3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    probe = lnprobe.attach(model, path, updates=opt, logits=True, attn_logits=True,
                           config={"model": model.config.to_dict()})
    for step in range(steps):
        x = _batch(30 + step)
        _, loss = model(x, x)
        loss.backward()
        probe.step(loss=loss)
        opt.step()
        opt.zero_grad()
    probe.close()


def test_report_checks_the_qk_norm_bound_and_draws_the_signal_figures(tmp_path):
    import pandas as pd

    from lnprobe.analysis import verdicts as V
    from lnprobe.analysis.report import build_report

    _trained_qk_run(tmp_path / "qk")
    res = build_report([tmp_path / "qk"], tmp_path / "report")
    assert {"update_ratio", "attention_logits", "logit_stats"} <= set(res.figures), res.missing
    v = res.verdicts.set_index("id").loc["attn.qk_norm_bound"]
    assert v["status"] == "pass" and 0 < v["measured"] <= 1
    assert "largest attention logit" in res.summary[0]
    # the counter-example: a record above the bound (e.g. a QK-norm with a bias) fails the verdict
    from lnprobe.store import record_files

    part = record_files(tmp_path / "qk")[0][0]  # the compacted file: close() rewrote the parts into it
    df = pd.read_parquet(part)
    df.loc[(df.stat == "qk_absmax") & (df.layer == 1), "value"] *= 10
    df.to_parquet(part)
    bad = V.check_qk_norm_bound([lnprobe.load_run(tmp_path / "qk")])
    assert bad.status == "fail" and bad.measured > 1


def test_no_signal_figures_or_qk_verdict_without_the_records(tmp_path):
    from lnprobe.analysis.report import build_report

    model = _gpt()
    probe = lnprobe.attach(model, tmp_path / "plain", config={"model": model.config.to_dict()})
    x = _batch(5)
    _, loss = model(x, x)
    loss.backward()
    probe.step(loss=loss)
    probe.close()
    res = build_report([tmp_path / "plain"], tmp_path / "report")
    assert not {"update_ratio", "attention_logits", "logit_stats"} & (set(res.figures) | set(res.missing))
    assert "attn.qk_norm_bound" not in set(res.verdicts["id"])


def _compile_run(model, out, forward, counts=None, backend=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lnprobe.attach(model, out, every=[0, 2], logits=True, attn_logits=True) as probe:
        for step in range(4):
            x = _batch(50 + step, b=2)
            loss = forward(model, x)
            loss.backward()
            probe.step(loss=loss)
            opt.step()
            opt.zero_grad()
            if counts is not None:
                counts.append(backend.graphs)
    return _records(out)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_compiled_model_has_no_graph_break_and_records_equal_eager(tmp_path, arch):
    """Both logit sites traced (lnprobe.traced): ``fullgraph=True``, no graph break, no recompilation
    after warm-up, the eager run's values."""
    from torch._dynamo.utils import counters

    if arch == "llama":
        pytest.importorskip("transformers")
        from lnprobe.testing import tiny_hf_model

        def make():
            return tiny_hf_model("llama", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=T, attn_implementation="sdpa")

        def forward(m, x):
            return m(input_ids=x, labels=x).loss
    else:
        def make():
            return _gpt(qk_norm=True)

        def forward(m, x):
            return m(x, x)[1]

    class Counting:
        graphs = 0

        def __call__(self, gm, example_inputs):
            Counting.graphs += 1
            return gm.forward

    torch._dynamo.reset()
    counters.clear()
    eager, inner = make(), make()
    inner.load_state_dict(eager.state_dict())
    backend, counts = Counting(), []
    got = _compile_run(torch.compile(inner, backend=backend, fullgraph=True), tmp_path / "compiled", forward, counts,
                       backend)
    want = _compile_run(eager, tmp_path / "eager", forward)
    m = want.merge(got, on=["step", "site", "layer", "stat"], suffixes=("_e", "_c"), how="outer", indicator=True)
    assert (m._merge == "both").all() and set(m.site) == {"logits", "attn_logits"}
    np.testing.assert_allclose(m.value_c, m.value_e, rtol=1e-5)
    # The model's forward: one graph for recorded and one for unrecorded steps. The output-logit hook
    # sits on the root module, whose hooks torch.compile(model) runs around the compiled forward: Dynamo
    # compiles that hook as a frame of its own (recorded steps only; unrecorded it makes no graph).
    assert counts == [2, 3, 3, 3], f"graphs compiled after each step: {counts}"
    assert sum(counters["graph_break"].values()) == 0

# ----------------------------------------------------------------------------- torch.distributed (gloo)
def _dist_train(model, probe, rank: int = 0, world: int = 1) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        x = _batch(40 + step, b=4)
        per = 4 // world
        x = x[rank * per:(rank + 1) * per]
        _, loss = model(x, x)
        loss.backward()
        probe.step(loss=loss)
        opt.step()
        opt.zero_grad()


def _dist_worker(out: str) -> int:
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a lost rank fails, not hangs
    try:
        model = DDP(_gpt(qk_norm=True))
        with lnprobe.attach(model, f"{out}/ddp", logits=True, attn_logits=True) as probe:
            _dist_train(model, probe, rank, 2)
    finally:
        dist.destroy_process_group()
    return 0


@pytest.mark.slow
def test_ddp_merges_logit_sites_like_one_process(tmp_path):
    """2 gloo ranks with half the batch each: maxima with their (token, head) and the weighted means equal
    one process on the whole batch."""
    codes, outs = launch_workers(__file__, "--worker", str(tmp_path), timeout=300)
    assert codes == [0, 0], outs
    model = _gpt(qk_norm=True)
    with lnprobe.attach(model, tmp_path / "single", logits=True, attn_logits=True) as probe:
        _dist_train(model, probe)
    key = ["step", "site", "layer", "stat"]
    ref, got = _records(tmp_path / "single"), _records(tmp_path / "ddp")
    m = ref.merge(got, on=key, suffixes=("_ref", "_run"), how="outer", indicator=True)
    assert (m._merge == "both").all() and len(m) == 3 * (3 + 2 * 2)
    np.testing.assert_allclose(m.value_run, m.value_ref, rtol=1e-5)
    loc = m[m.stat.isin(["qk_absmax", "logit_absmax"])]
    assert (loc.token_run == loc.token_ref).all() and (loc.channel_run == loc.channel_ref).all()


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--worker"]:
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
        from helpers import exit_worker

        exit_worker(_dist_worker(sys.argv[2]))
