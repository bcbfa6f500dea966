"""Optimizer update statistics (lnprobe.updates): update_rms and update_ratio against a reference copy
of the parameters taken around each optimizer step, for AdamW, Adam and SGD with momentum; rows on
recorded steps only; no host sync."""
import numpy as np
import pytest
import torch
from nanogpt import NanoGPT

import lnprobe
from lnprobe import stats as S

VOCAB, T, STEPS = 64, 16, 6

OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.01),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
}


def run(tmp_path, make_opt, every=1, **kw):
    torch.manual_seed(0)
    model = NanoGPT(vocab=VOCAB, block_size=T)
    opt = make_opt(model.parameters())
    probe = lnprobe.attach(model, tmp_path / "run", every=every, flush_every=2, updates=opt, **kw)
    ref = {}
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x = torch.randint(0, VOCAB, (4, T), generator=g)
        _, loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
        probe.step(loss=loss)
        before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        ref[step] = {}
        for n, p in model.named_parameters():
            d = (p.detach().double() - before[n]).norm().item()
            pn = before[n].norm().item()  # 0 for a zero-initialised bias at step 0: the ratio is inf
            ref[step][n] = (d / np.sqrt(p.numel()), d / pn if pn else float("inf"))
    probe.close()
    return lnprobe.load_run(tmp_path / "run"), ref


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_update_stats_equal_a_reference_copy(tmp_path, name):
    run, ref = run_(tmp_path, name)
    r = run.records
    for step in range(STEPS):
        rs = r[(r.step == step) & r.stat.isin(S.UPDATE_STATS)]
        rms = rs[rs.stat == "update_rms"].set_index("site")["value"]
        ratio = rs[rs.stat == "update_ratio"].set_index("site")["value"]
        assert set(rms.index) == {f"param:{n}" for n in ref[step]}
        for n, (want_rms, want_ratio) in ref[step].items():
            assert rms[f"param:{n}"] == pytest.approx(want_rms, rel=1e-5, abs=1e-12), (step, n)
            assert ratio[f"param:{n}"] == pytest.approx(want_ratio, rel=1e-5, abs=1e-12), (step, n)
    assert (r[r.stat == "update_ratio"].value > 0).all()


def run_(tmp_path, name, **kw):
    return run(tmp_path, OPTIMIZERS[name], **kw)


def test_rows_on_recorded_steps_only_and_layers(tmp_path):
    run, _ = run_(tmp_path, "adamw", every=2)
    r = run.records
    upd = r[r.stat.isin(S.UPDATE_STATS)]
    assert sorted(upd.step.unique()) == [0, 2, 4]
    assert not r.duplicated(["step", "site", "layer", "stat"]).any()
    # the rows of a step come with that step's other rows (one part holds the whole step)
    layer_of = {k: v["layer"] for k, v in run.meta["param_roles"].items()}
    for site, layer in zip(upd.site, upd.layer):
        assert layer == layer_of.get(site[len("param:"):], -1)


def test_no_update_rows_without_optimizer_step_and_hooks_removed(tmp_path):
    torch.manual_seed(0)
    model = NanoGPT(vocab=VOCAB, block_size=T)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = lnprobe.attach(model, tmp_path / "run", updates=[opt])
    x = torch.randint(0, VOCAB, (2, T))
    _, loss = model(x, x)
    loss.backward()
    probe.step(loss=loss)  # no opt.step(): nothing to record
    probe.close()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    opt.step()  # after close: no rows, no error
    r = lnprobe.load_run(tmp_path / "run").records
    assert not r.stat.isin(S.UPDATE_STATS).any()


def test_registry_rows():
    assert S.UPDATE_STATS == ("update_rms", "update_ratio")
    for name in S.UPDATE_STATS:
        row = S.stat("update", name)
        assert row.kind == "update" and row.merge == "mean"


def test_update_hooks_make_no_host_sync(tmp_path, monkeypatch):
    from test_sync import SyncCounter, assert_no_probe_syncs

    counter = SyncCounter(monkeypatch)
    counter.install()
    torch.manual_seed(0)
    model = NanoGPT(vocab=VOCAB, block_size=T)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = lnprobe.attach(model, tmp_path / "run", flush_every=10**6, updates=opt,
                           sinks=[lambda step, scalars: None])
    with counter.counting():
        for step in range(3):
            x = torch.randint(0, VOCAB, (2, T))
            _, loss = model(x, torch.roll(x, -1, 1))
            loss.backward()
            probe.step(loss=loss)
            opt.step()
            opt.zero_grad()
    assert_no_probe_syncs(counter)
    probe.close()
    assert lnprobe.load_run(tmp_path / "run").records.stat.isin(S.UPDATE_STATS).any()
