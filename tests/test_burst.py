"""Spike-triggered bursts (lnprobe.burst): the online rule equals docs/theory.md §5's spike score, a
planted spike is followed by every step being recorded, the run-up history is written, no host sync."""
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import seeded_nanogpt, token_batch
from test_sync import SyncCounter, assert_no_probe_syncs

import lnprobe
from lnprobe import burst as B
from lnprobe.analysis import massive

VOCAB, T = 64, 16  # the defaults of helpers.token_batch and seeded_nanogpt


batch = token_batch  # (seed, b=4): ids (b, T) of VOCAB and their next-token targets
make = seeded_nanogpt  # (seed=0): the NanoGPT of these tests


def train(model, probe, steps, spikes=(), nan_at=(), lr=1e-3):
    """SGD-free loop (AdamW); at each step in ``spikes`` the loss is multiplied by 50 before backward
    (a real loss and gradient spike); at ``nan_at`` the loss passed to the probe is NaN."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        _, loss = model(*batch(step))
        if step in spikes:
            loss = loss * 50
        loss.backward()
        probe.step(loss=loss * float("nan") if step in nan_at else loss, lr=lr)
        opt.step()
        opt.zero_grad(set_to_none=True)


def full_steps(run, site="attn_out"):
    """Steps with the full activation statistics (a site the history does not write)."""
    r = run.records
    return sorted(int(s) for s in r.loc[r.site == site, "step"].unique())


# ----------------------------------------------------------------------------- the rule
def test_online_triggers_are_the_offline_spikes():
    """The device rule flags exactly the steps analysis.massive.spike_score flags, NaN values included."""
    rng = np.random.default_rng(3)
    x = 2.0 + 0.1 * rng.standard_normal(300)
    for k in (40, 41, 90, 150, 151, 152, 260):
        x[k] += rng.uniform(0.3, 2.0)
    x[[60, 61, 200]] = [np.nan, np.inf, np.nan]
    cfg = B.Burst(window=30, threshold=3.0, min_history=10, signals=("loss",), nonfinite=False)
    det = B.SpikeDetector(cfg, torch.device("cpu"))
    online = []
    for step, v in enumerate(x):
        det.observe(step, torch.tensor(v, dtype=torch.float64), None)
        online += [t.step for t in det.poll()]
    offline = massive.spike_score(x, window=30, threshold=3.0, min_periods=10).spikes
    assert len(offline) >= 5 and online == offline


def test_grad_norm_signal_and_nonfinite_codes():
    cfg = B.Burst(window=50, threshold=7.0, min_history=10)
    det = B.SpikeDetector(cfg, torch.device("cpu"))
    fired = {}
    for step in range(30):
        loss = torch.tensor(float("nan") if step == 25 else 1.0 + 0.01 * (step % 3), dtype=torch.float64)
        gn = torch.tensor(50.0 if step == 20 else 1.0 + 0.01 * (step % 5), dtype=torch.float64)
        det.observe(step, loss, gn)
        fired.update({t.step: t.fired() for t in det.poll()})
    assert fired == {20: [("grad_norm", "spike")], 25: [("loss", "nonfinite")]}


@pytest.mark.parametrize("kw", [dict(steps=0), dict(window=1), dict(history=-1), dict(threshold=0),
                                dict(threshold=float("nan")), dict(signals=("lr",)), dict(signals=()),
                                dict(min_history=20, window=10), dict(steps=2.5)])
def test_bad_settings_are_refused_in_one_line(kw):
    with pytest.raises(ValueError, match=r"lnprobe\.Burst"):
        B.Burst(**kw)


def test_attach_refuses_a_burst_that_is_not_a_burst(tmp_path):
    with pytest.raises(TypeError, match="expected an lnprobe.Burst"):
        lnprobe.attach(make(), tmp_path / "run", burst=50)
    assert not (tmp_path / "run" / "meta.json").exists()


# ----------------------------------------------------------------------------- a planted spike
def test_planted_spike_records_every_step_after_it_with_the_run_up(tmp_path):
    k, n, h = 25, 8, 5
    model = make()
    with lnprobe.attach(model, tmp_path / "run", every=10, burst=lnprobe.Burst(steps=n, history=h)) as probe:
        train(model, probe, 40, spikes={k})
    run = lnprobe.load_run(tmp_path / "run")
    steps = full_steps(run)
    assert set(range(k + 2, k + n + 1)) <= set(steps)  # the acceptance: k + 2 at the latest, through k + N
    assert steps == [0, 10, 20] + list(range(k + 1, k + n + 1))  # on CPU from k + 1 (step 30 inside)
    (b,) = run.meta["bursts"]
    assert b["trigger_step"] == k and b["first_step"] == k + 1 and b["last_step"] == k + n
    assert set(b["signals"]) == {"loss", "grad_norm"} and b["z"]["loss"] >= 7 and "std above" in b["reason"]
    assert b["history"] == [21, 22, 23, 24, 25]  # the last H unrecorded steps, the spike included
    r = run.records
    hist = r[(r.site == "resid") & r.step.isin(b["history"])]
    assert set(hist.stat) == {"m2", "absmax"} and set(hist.layer) == set(range(4))
    assert len(hist) == len(b["history"]) * 4 * 2 and hist.value.notna().all()
    assert not r.duplicated(["step", "site", "layer", "stat"]).any()
    assert run.meta["burst"]["steps"] == n and any("burst at steps" in note for note in run.meta["notes"])


def test_without_a_spike_or_a_burst_nothing_extra_is_recorded(tmp_path):
    """Counter-examples for the test above: no burst= with the same spike, and a burst= without one."""
    model = make()
    with lnprobe.attach(model, tmp_path / "plain", every=10) as probe:
        train(model, probe, 40, spikes={25})
    assert full_steps(lnprobe.load_run(tmp_path / "plain")) == [0, 10, 20, 30]
    model = make()
    with lnprobe.attach(model, tmp_path / "quiet", every=10, burst=lnprobe.Burst(steps=8, history=5)) as probe:
        train(model, probe, 40)
    run = lnprobe.load_run(tmp_path / "quiet")
    assert full_steps(run) == [0, 10, 20, 30] and run.meta["bursts"] == []
    assert sorted(run.records.loc[run.records.site == "resid", "step"].unique()) == [0, 10, 20, 30]


def test_history_values_equal_a_run_recording_every_step(tmp_path):
    """The history's m2 and absmax are the probe's own statistics of those steps (same seed, every=1)."""
    model = make()
    with lnprobe.attach(model, tmp_path / "burst", every=100, burst=lnprobe.Burst(steps=3, history=4)) as probe:
        train(model, probe, 20, spikes={15})
    model = make()
    with lnprobe.attach(model, tmp_path / "all", every=1) as probe:
        train(model, probe, 20, spikes={15})
    a, ref = (lnprobe.load_run(tmp_path / d).records for d in ("burst", "all"))
    key = ["step", "layer", "stat"]
    hist = a[(a.site == "resid") & a.step.isin([12, 13, 14, 15])].set_index(key)["value"].sort_index()
    want = ref[(ref.site == "resid") & ref.stat.isin(["m2", "absmax"])].set_index(key)["value"]
    assert len(hist) == 4 * 4 * 2
    np.testing.assert_allclose(hist.to_numpy(), want.loc[hist.index].to_numpy(), rtol=1e-6)


def test_a_nan_loss_starts_a_burst_and_a_spike_inside_extends_it(tmp_path):
    model = make()
    with lnprobe.attach(model, tmp_path / "run", every=100, burst=lnprobe.Burst(steps=4)) as probe:
        train(model, probe, 30, nan_at={15}, spikes={17})
    run = lnprobe.load_run(tmp_path / "run")
    (b,) = run.meta["bursts"]
    assert b["trigger_step"] == 15 and b["signals"] == ["loss"] and "nan" in b["reason"]
    assert b["extended"] == 1 and b["last_step"] == 17 + 4 and b["values"]["loss"] == "nan"
    assert full_steps(run) == [0] + list(range(16, 22))
    model = make()
    with lnprobe.attach(model, tmp_path / "off", every=100, burst=lnprobe.Burst(steps=4, nonfinite=False)) as probe:
        train(model, probe, 20, nan_at={15})
    assert lnprobe.load_run(tmp_path / "off").meta["bursts"] == []


def test_no_host_sync_with_bursts_and_history(tmp_path, monkeypatch):
    counter = SyncCounter(monkeypatch)
    counter.install()
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = lnprobe.attach(model, tmp_path / "run", every=10, flush_every=10**6, flush_seconds=None,
                           burst=lnprobe.Burst(steps=3, history=4))
    with counter.counting():
        for step in range(20):
            _, loss = model(*batch(step))
            (loss * 50 if step == 14 else loss).backward()
            probe.step(loss=loss * 50 if step == 14 else loss, lr=1e-3)
            opt.step()
            opt.zero_grad(set_to_none=True)
    probe.close()
    assert_no_probe_syncs(counter)
    assert lnprobe.load_run(tmp_path / "run").meta["bursts"][0]["trigger_step"] == 14


def test_a_sync_in_the_detector_is_caught(tmp_path, monkeypatch):
    """Counter-example for the test above: reading the decision with .item() is charged to the probe."""
    counter = SyncCounter(monkeypatch)
    counter.install()
    orig = B.SpikeDetector.observe

    def syncing(self, step, loss, grad_norm):
        orig(self, step, loss, grad_norm)
        self._ring.sum().item()

    monkeypatch.setattr(B.SpikeDetector, "observe", syncing)
    model = make()
    probe = lnprobe.attach(model, tmp_path / "run", every=10, flush_every=10**6, burst=lnprobe.Burst())
    with counter.counting():
        train(model, probe, 2)
    probe.close()
    with pytest.raises(AssertionError, match="host synchronisation"):
        assert_no_probe_syncs(counter)


def test_a_failing_detector_is_disabled_and_training_goes_on(tmp_path, monkeypatch):
    def broken(self, *a):
        raise RuntimeError("boom")

    monkeypatch.setattr(B.SpikeDetector, "observe", broken)
    model = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lnprobe.attach(model, tmp_path / "run", every=5, burst=lnprobe.Burst()) as probe:
            train(model, probe, 6)
    run = lnprobe.load_run(tmp_path / "run")
    assert any("bursts disabled" in str(w.message) for w in caught)
    assert any("bursts disabled" in n for n in run.meta["notes"]) and full_steps(run) == [0, 5]
    assert list(run.records.query("site == 'train' and stat == 'loss'").step) == list(range(6))
    assert all(math.isfinite(v) for v in run.records.query("site == 'train' and stat == 'loss'").value)


# ----------------------------------------------------------------------------- trainer, CLI, report
def test_train_cli_burst_flag(tmp_path, corpus, capsys):
    from helpers import SMALL, one_line_error

    from lnprobe.cli import main

    out = tmp_path / "run"
    assert main(["train", "--steps", "4", "--every", "10", "--burst", "3", "--burst-history", "2", "--data", corpus,
                 "--out", str(out), *SMALL]) == 0
    run = lnprobe.load_run(out)
    assert run.meta["burst"]["steps"] == 3 and run.meta["burst"]["history"] == 2 and run.meta["bursts"] == []
    assert run.meta["config"]["train"]["burst"] == 3
    one_line_error(capsys, ["train", "--steps", "4", "--burst", "-1", "--data", corpus, "--out",
                            str(tmp_path / "bad"), *SMALL], "burst")


def test_report_shows_spike_scores_bursts_and_first_nonfinite(tmp_path):
    from lnprobe.analysis import report

    model = make()
    k = 20  # a recorded step (every=10): first_nonfinite comes from recorded sites

    holder = {}

    def nan_at_k(module, args, output):  # a NaN in block 1's MLP output at step k only
        if "probe" in holder and holder["probe"].current_step == k:
            output = output.clone()
            output[0, 0, 0] = float("nan")
            return output
        return None

    model.transformer.h[1].mlp.register_forward_hook(nan_at_k)
    with lnprobe.attach(model, tmp_path / "run", every=10, burst=lnprobe.Burst(steps=3, history=2)) as probe:
        holder["probe"] = probe
        train(model, probe, 24, spikes={12})
    run = lnprobe.load_run(tmp_path / "run")
    first = run.meta["first_nonfinite"]
    assert first["step"] == k and first["layer"] == 1
    res = report.build_report([tmp_path / "run"], tmp_path / "report", formats=("png",))
    (line,) = res.stability
    assert "gradient-norm spike score" in line and "at step 12" in line
    assert f"first non-finite activation at step {k}: site {first['site']}, layer 1" in line
    assert "steps 13–15 after step 12" in line
    html = (tmp_path / "report" / "report.html").read_text()
    md = (tmp_path / "report" / "report.md").read_text()
    for text in (html, md):
        assert "Training stability" in text and "steps 13–15 after step 12" in text and f"step {k}: site" in text


def test_a_resumed_run_keeps_the_bursts_before_its_first_step(tmp_path):
    model = make()
    with lnprobe.attach(model, tmp_path / "run", every=100, burst=lnprobe.Burst(steps=3)) as probe:
        train(model, probe, 20, spikes={15})
    assert [b["trigger_step"] for b in lnprobe.load_run(tmp_path / "run").meta["bursts"]] == [15]
    with lnprobe.attach(model, tmp_path / "run", every=100, resume=True, burst=lnprobe.Burst(steps=3)) as probe:
        assert probe.current_step == 20
        train(model, probe, 2)
    assert [b["trigger_step"] for b in lnprobe.load_run(tmp_path / "run").meta["bursts"]] == [15]
    with lnprobe.attach(model, tmp_path / "run", every=100, resume=10, burst=lnprobe.Burst(steps=3)) as probe:
        train(model, probe, 1)  # restarted from a checkpoint before the burst: it is gone with its steps
    assert lnprobe.load_run(tmp_path / "run").meta["bursts"] == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_burst_without_a_sync_starts_by_k_plus_2(tmp_path):
    """On CUDA under the sync debug mode (any synchronising CUDA call raises): per-step scalars, the
    detector, its asynchronous copy and the history hooks; the burst starts by step k + 2."""
    k, n = 15, 6
    model = make().cuda()
    x, y = (t.cuda() for t in batch(0))
    model(x, y)[1].backward()  # warm-up outside the check (lazy CUDA initialisation)
    model.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = lnprobe.attach(model, tmp_path / "run", every=100, flush_every=10**6, flush_seconds=None,
                           burst=lnprobe.Burst(steps=n, history=4))
    for step in range(k + n + 2):
        x, y = (t.cuda() for t in batch(step))
        torch.cuda.set_sync_debug_mode("error")
        try:
            _, loss = model(x, y)
            loss = loss * 50 if step == k else loss
            loss.backward()
            probe.step(loss=loss, lr=1e-3)
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    probe.close()
    run = lnprobe.load_run(tmp_path / "run")
    (b,) = run.meta["bursts"]
    assert b["trigger_step"] == k and b["first_step"] <= k + 2 and b["last_step"] == k + n
    assert set(range(k + 2, k + n + 1)) <= set(full_steps(run)) and len(b["history"]) == 4
