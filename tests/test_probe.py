"""Probe behaviour on a nanoGPT-style model: gradients, bit-identity, hooks, checkpointing,
accumulation, schedules, crash safety."""
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from nanogpt import NanoGPT

import lnprobe
from lnprobe import stats as S

VOCAB, T = 64, 16


def batch(seed, b=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (b, T), generator=g)
    return x, torch.roll(x, -1, 1)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return NanoGPT(vocab=VOCAB, block_size=T, **kw)


def all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def pivot(run, site, stat):
    r = run.records
    return r[(r.site == site) & (r.stat == stat)].set_index(["step", "layer"])["value"].sort_index()


def test_records_have_the_schema_and_meta(tmp_path):
    model = make()
    x, y = batch(0)
    with lnprobe.attach(model, tmp_path / "run") as probe:
        _, loss = model(x, y)
        loss.backward()
        probe.step(loss=loss, lr=1e-3)
    run = lnprobe.load_run(tmp_path / "run")
    r = run.records
    assert list(r.columns) == ["step", "site", "layer", "stat", "value", "token", "channel", "stack"]  # stack: derived
    assert str(r.token.dtype) == "Int64" and str(r.step.dtype) == "int64"
    assert run.meta["placement"] == "pre" and run.meta["n_layers"] == 3 and run.meta["d_model"] == 32
    assert run.meta["status"] == "finished"
    assert set(pivot(run, "resid", "m2").index.get_level_values("layer")) == {0, 1, 2, 3}
    assert not r.duplicated(["step", "site", "layer", "stat"]).any()
    train = r[r.site == "train"].set_index("stat")["value"]
    assert train["loss"] == pytest.approx(loss.item()) and train["lr"] == 1e-3


def hook_block_inputs(model, store, detach):
    """Our own record of each block's input (registered after attach, so the discovery trace is not seen)."""
    keep = (lambda t: t.detach().clone()) if detach else (lambda t: t)
    return [b.register_forward_pre_hook(lambda m, a: store.append(keep(a[0]))) for b in model.transformer.h]


def test_resid_stats_equal_the_stream_seen_by_own_hooks(tmp_path):
    model = make()
    x, y = batch(1)
    seen = []
    with lnprobe.attach(model, tmp_path / "run") as probe:
        hs = hook_block_inputs(model, seen, detach=True)
        _, loss = model(x, y)
        loss.backward()
        probe.step(loss=loss)
    for h in hs:
        h.remove()
    run = lnprobe.load_run(tmp_path / "run")
    m2 = pivot(run, "resid", "m2")
    for layer, h in enumerate(seen):
        assert m2[(0, layer)] == pytest.approx(float(h.double().square().mean()), rel=1e-5)


def test_param_grad_norm_and_resid_grad_rms_match_autograd(tmp_path):
    model = make()
    x, y = batch(2)
    held = []
    with lnprobe.attach(model, tmp_path / "run") as probe:
        hs = hook_block_inputs(model, held, detach=False)
        _, loss = model(x, y)
        ref = torch.autograd.grad(loss, held, retain_graph=True)
        loss.backward()
        probe.step(loss=loss)
    for h in hs:
        h.remove()
    run = lnprobe.load_run(tmp_path / "run")
    gr = pivot(run, "resid", "grad_rms")
    gm = pivot(run, "resid", "grad_absmax")
    for layer, g in enumerate(ref):
        assert gr[(0, layer)] == pytest.approx(float(g.double().square().mean().sqrt()), rel=1e-5)
        assert gm[(0, layer)] == pytest.approx(float(g.abs().max()), rel=1e-6)
    r = run.records
    pg = r[(r.stat == "grad_norm") & r.site.str.startswith("param:")].set_index("site")["value"]
    named = dict(model.named_parameters())
    assert len(pg) == len(named)
    for name, p in named.items():
        assert pg[f"param:{name}"] == pytest.approx(float(p.grad.norm()), rel=1e-5)
    total = r[(r.site == "train") & (r.stat == "grad_norm")]["value"].item()
    assert total == pytest.approx(float(torch.stack([p.grad.norm() for p in named.values()]).norm()), rel=1e-5)
    roles = run.meta["param_roles"]
    assert roles["transformer.h.1.mlp.c_proj.weight"] == {"role": "mlp.out", "layer": 1}


def train(model, steps, probe=None, accum=1):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        for micro in range(accum):
            x, y = batch(100 * step + micro, b=8 // accum)
            _, loss = model(x, y)
            (loss / accum).backward()
        if probe is not None:
            probe.step(loss=loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_probed_training_is_bit_identical(tmp_path):
    plain = make(dropout=0.1)
    torch.manual_seed(123)
    l0 = train(plain, 5)
    probed = make(dropout=0.1)
    torch.manual_seed(123)
    with lnprobe.attach(probed, tmp_path / "run", sites="all", stats="all") as probe:
        l1 = train(probed, 5, probe)
    assert l0 == l1
    for (n, a), (_, b) in zip(plain.named_parameters(), probed.named_parameters()):
        assert torch.equal(a, b), n


def test_no_hook_remains_after_close_with_or_exception(tmp_path):
    model = make()
    base = all_hooks(model)
    probe = lnprobe.attach(model, tmp_path / "a")
    assert all_hooks(model) > base and probe.hook_count > 0
    probe.close()
    assert all_hooks(model) == base
    with lnprobe.attach(model, tmp_path / "b"):
        assert all_hooks(model) > base
    assert all_hooks(model) == base
    with pytest.raises(RuntimeError, match="boom"):
        with lnprobe.attach(model, tmp_path / "c") as probe:
            x, y = batch(0)
            model(x, y)[1].backward()
            probe.step()
            raise RuntimeError("boom")
    assert all_hooks(model) == base
    run = lnprobe.load_run(tmp_path / "c")
    assert run.meta["status"] == "crashed" and "boom" in run.meta["error"]
    assert (run.records.step == 0).any()  # what was recorded before the exception is kept


@pytest.mark.parametrize("mode", ["reentrant", "nonreentrant"])
def test_activation_checkpointing_records_each_forward_once(tmp_path, mode):
    ref_model, ck_model = make(), make(checkpointing=mode)
    ck_model.load_state_dict(ref_model.state_dict())
    for m, name in ((ref_model, "ref"), (ck_model, "ck")):
        with lnprobe.attach(m, tmp_path / name) as probe:
            train(m, 2, probe)
    a = lnprobe.load_run(tmp_path / "ref").records
    b = lnprobe.load_run(tmp_path / "ck").records
    key = ["step", "site", "layer", "stat"]
    merged = a.merge(b, on=key, suffixes=("_a", "_b"))
    assert len(merged) == len(a) == len(b)
    np.testing.assert_allclose(merged.value_a, merged.value_b, rtol=1e-5, atol=1e-12)
    assert (merged.token_a.fillna(-1) == merged.token_b.fillna(-1)).all()


def test_gradient_accumulation_merges_micro_batches(tmp_path):
    one, four = make(), make()
    four.load_state_dict(one.state_dict())
    x, y = batch(7, b=8)
    with lnprobe.attach(one, tmp_path / "one", sites="all", stats="all") as p1:
        one(x, y)[1].backward()
        p1.step()
    with lnprobe.attach(four, tmp_path / "four", sites="all", stats="all") as p4:
        for xs, ys in zip(x.chunk(4), y.chunk(4)):
            (four(xs, ys)[1] / 4).backward()
        p4.step()
    a = lnprobe.load_run(tmp_path / "one").records
    b = lnprobe.load_run(tmp_path / "four").records
    m = a.merge(b, on=["step", "site", "layer", "stat"], suffixes=("_a", "_b"))
    assert len(m) == len(a) == len(b)
    exact = m.stat.isin(["absmax", "top1", "top2", "top3", "nonfinite", "over_fp16", "grad_absmax"])
    moments = m.stat.isin(["m2", "var", "rms", "kurtosis", "grad_rms", "grad_norm", "param_norm"])
    np.testing.assert_allclose(m.value_a[exact], m.value_b[exact], rtol=1e-6)
    np.testing.assert_allclose(m.value_a[moments], m.value_b[moments], rtol=1e-5)
    loc = m[m.stat.isin(["top1", "top2", "top3"])]
    assert (loc.token_a == loc.token_b).all() and (loc.channel_a == loc.channel_b).all()


def test_schedules_and_eval_mode(tmp_path):
    model = make()
    with lnprobe.attach(model, tmp_path / "every3", every=3) as probe:
        train(model, 7, probe)
    assert sorted(lnprobe.load_run(tmp_path / "every3").records.query("site != 'train'").step.unique()) == [0, 3, 6]
    with lnprobe.attach(model, tmp_path / "list", every=[1, 4]) as probe:
        train(model, 6, probe)
    assert sorted(lnprobe.load_run(tmp_path / "list").records.query("site != 'train'").step.unique()) == [1, 4]
    assert ([s for s in range(40) if lnprobe.Schedule.parse("log")(s)][:14]
            == [0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32])
    model.eval()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with lnprobe.attach(model, tmp_path / "eval") as probe:
            model(*batch(0))
            probe.step()
    assert not (lnprobe.load_run(tmp_path / "eval").records.site == "resid").any()
    assert any("eval mode" in str(x.message) for x in w)
    with lnprobe.attach(model, tmp_path / "evalall", record="all") as probe:
        model(*batch(0))
        probe.step()
    assert (lnprobe.load_run(tmp_path / "evalall").records.site == "resid").any()


def test_bad_arguments_are_explained(tmp_path):
    model = make()
    with pytest.raises(ValueError, match="every must be"):
        lnprobe.attach(model, tmp_path / "x", every=0)
    with pytest.raises(ValueError, match="unknown site"):
        lnprobe.attach(model, tmp_path / "x", sites=["resid", "nope"])
    with pytest.raises(ValueError, match="unknown statistic"):
        lnprobe.attach(model, tmp_path / "x", stats=["m3"])


def test_failing_hook_warns_and_training_goes_on(tmp_path, monkeypatch):
    model = make()
    torch.manual_seed(0)
    ref = train(make(), 2)
    monkeypatch.setattr(S, "reduce_activation", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bad reduce")))
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="bad reduce"):
        with lnprobe.attach(model, tmp_path / "run") as probe:
            losses = train(model, 2, probe)
    assert losses == ref
    meta = lnprobe.load_run(tmp_path / "run").meta
    assert any("bad reduce" in n for n in meta["notes"])


class FakeScaler:
    def __init__(self, scale):
        self._scale = torch.tensor(float(scale))

    def is_enabled(self):
        return True


def test_hidden_state_gradients_are_unscaled(tmp_path):
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    x, y = batch(3)
    with lnprobe.attach(a, tmp_path / "a") as pa:
        a(x, y)[1].backward()
        pa.step()
    with lnprobe.attach(b, tmp_path / "b", scaler=FakeScaler(1024.0)) as pb:
        (b(x, y)[1] * 1024.0).backward()
        for p in b.parameters():  # what scaler.unscale_(opt) does before probe.step()
            p.grad /= 1024.0
        pb.step()
    ga = pivot(lnprobe.load_run(tmp_path / "a"), "resid", "grad_rms")
    gb = pivot(lnprobe.load_run(tmp_path / "b"), "resid", "grad_rms")
    np.testing.assert_allclose(ga.values, gb.values, rtol=1e-5)


def run_probed_script(run_dir, flush_every: int, steps: int, ending: str) -> subprocess.CompletedProcess:
    """Train NanoGPT under a probe for ``steps`` steps in a fresh interpreter, then run ``ending``."""
    script = textwrap.dedent(f"""
        import os, sys, signal, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
        import lnprobe
        from nanogpt import NanoGPT
        torch.manual_seed(0)
        model = NanoGPT(vocab=64, block_size=16)
        probe = lnprobe.attach(model, {str(run_dir)!r}, flush_every={flush_every})
        x = torch.randint(0, 64, (2, 16))
        for step in range({steps}):
            model(x, x)[1].backward()
            probe.step()
    """) + ending + "\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)


def test_killed_process_keeps_flushed_steps(tmp_path):
    proc = run_probed_script(tmp_path / "run", 2, 7, "os.kill(os.getpid(), signal.SIGKILL)")
    assert proc.returncode == -9, proc.stderr.decode()
    run = lnprobe.load_run(tmp_path / "run")
    assert sorted(run.records.step.unique()) == [0, 1, 2, 3, 4, 5]  # step 6 was not flushed yet
    assert run.meta["status"] == "running"


def test_unclosed_probe_flushes_large_buffer_at_interpreter_exit(tmp_path):
    # An uncaught exception ends the script without close(): the atexit handler must still write
    # every buffered step. Several thousand rows make pyarrow convert columns on a thread pool by
    # default, which refuses work during interpreter shutdown.
    proc = run_probed_script(tmp_path / "run", 1000, 12, 'raise SystemExit("training loop died")')
    assert proc.returncode == 1, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr, proc.stderr.decode()
    run = lnprobe.load_run(tmp_path / "run")
    assert len(run.records) > 2000  # well above pyarrow's threading threshold
    assert sorted(run.records.step.unique()) == list(range(12))
    assert run.meta["status"] == "interrupted"


def test_corrupt_part_is_reported_and_skipped(tmp_path):
    model = make()
    with lnprobe.attach(model, tmp_path / "run", flush_every=1) as probe:
        train(model, 2, probe)
    bad = tmp_path / "run" / "records" / "part-000005.parquet"
    bad.write_bytes(b"PAR1 half a file")
    with pytest.warns(UserWarning, match="part-000005"):
        run = lnprobe.load_run(tmp_path / "run")
    assert sorted(run.records.step.unique()) == [0, 1]
    assert run.skipped_parts == [str(bad)]


def test_held_bytes_is_partials_then_buffer_and_never_an_activation(tmp_path):
    model = make()
    x, y = batch(0, b=8)
    probe = lnprobe.attach(model, tmp_path / "run", flush_every=100)
    _, loss = model(x, y)
    loss.backward()
    held = probe.held_bytes
    # Bound from the partial layout: per forward call 3 sums + 3 counts (float64), at most 3 candidate
    # rows of D float32 with their int64 token indices, a median sample of at most min(numel, 8192)
    # float32; per hidden-state gradient 3 float32.
    bound = 0
    for acc in probe._acc.values():
        for p in acc.parts:
            bound += 48 + 3 * (4 * p.d + 8) + 4 * min(p.n_elem, S.MEDIAN_SAMPLE)
        bound += 12 * len(acc.grads)
    assert 0 < held <= bound
    assert held < 4 * x.numel() * 32 * len(probe._acc)  # far below one (B, T, 32) activation per site
    probe.step(loss=loss)
    step_bytes = probe.held_bytes  # the finalized step waiting for the next flush: values and locations
    assert 0 < step_bytes < held
    probe.flush()
    assert probe.held_bytes == 0
    probe.close()


def test_steps_are_counted_and_resume_continues_after_the_last_step(tmp_path):
    model = make()
    out = tmp_path / "run"
    with lnprobe.attach(model, out, every=2) as probe:
        assert probe.current_step == 0 and probe.recording
        train(model, 5, probe)  # steps 0..4, recorded 0, 2, 4
        assert probe.current_step == 5 and not probe.recording
    assert lnprobe.load_run(out).meta["last_step"] == 4
    with lnprobe.attach(model, out, every=2, resume=True) as probe:
        assert probe.current_step == 5
        probe.add_note("resumed by the test")
        train(model, 2, probe)  # steps 5, 6
    run = lnprobe.load_run(out)
    assert sorted(run.records.query("site != 'train'").step.unique()) == [0, 2, 4, 6]
    assert "resumed by the test" in run.meta["notes"] and run.meta["last_step"] == 6
    with lnprobe.attach(model, out, resume=3) as probe:  # e.g. restarted from a checkpoint of step 3
        train(model, 1, probe)
    assert sorted(lnprobe.load_run(out).records.query("site != 'train'").step.unique()) == [0, 2, 3, 4, 6]
    with lnprobe.attach(model, out, overwrite=True) as probe:  # a new run replaces the old parts
        train(model, 1, probe)
    assert sorted(lnprobe.load_run(out).records.step.unique()) == [0]
    assert not probe.recording  # closed


def test_resume_after_a_kill_continues_after_the_last_flushed_step(tmp_path):
    proc = run_probed_script(tmp_path / "run", 2, 7, "os.kill(os.getpid(), signal.SIGKILL)")
    assert proc.returncode == -9, proc.stderr.decode()
    assert lnprobe.load_run(tmp_path / "run").meta["last_step"] == 5  # flushed after step 5
    model = make()
    with lnprobe.attach(model, tmp_path / "run", resume=True) as probe:
        assert probe.current_step == 6
        train(model, 1, probe)
    assert sorted(lnprobe.load_run(tmp_path / "run").records.step.unique()) == list(range(7))


def test_deprecated_start_step_and_append_still_resume(tmp_path):
    model = make()
    with lnprobe.attach(model, tmp_path / "run") as probe:
        train(model, 2, probe)
    with pytest.warns(DeprecationWarning, match="resume"):
        probe = lnprobe.attach(model, tmp_path / "run", start_step=2, append=True)
    with probe:
        assert probe.current_step == 2
        train(model, 1, probe)
    assert sorted(lnprobe.load_run(tmp_path / "run").records.step.unique()) == [0, 1, 2]
    with pytest.raises(ValueError, match="resume"):
        lnprobe.attach(model, tmp_path / "x", resume=-1)
