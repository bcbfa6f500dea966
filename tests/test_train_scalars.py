"""Per-step training scalars (lnprobe.stepscalars): ``train`` rows loss, grad_norm (global, before
clipping) and lr at every optimizer step, from the device, without a host sync on non-flush steps."""
import numpy as np
import pytest
import torch
from helpers import seeded_nanogpt, token_batch
from test_sync import SyncCounter, assert_no_probe_syncs

import lnprobe
from lnprobe import probe as probe_mod
from lnprobe import stepscalars

VOCAB, T = 64, 16  # the defaults of helpers.token_batch and seeded_nanogpt


batch = token_batch  # (seed, b=4): ids (b, T) of VOCAB and their next-token targets
make = seeded_nanogpt  # (seed=0): the NanoGPT of these tests


def train(model, probe, steps, clip=None, lr_of=lambda s: 1e-3 * (s + 1)):
    """Train ``steps`` steps; returns the reference (loss, global grad norm before clipping, lr) per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref = []
    for step in range(steps):
        x, y = batch(step)
        _, loss = model(x, y)
        loss.backward()
        probe.step(loss=loss, lr=lr_of(step))
        norm = float(torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters() if p.grad is not None)))
        ref.append((loss.item(), norm, lr_of(step)))
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return ref


def train_rows(run, stat):
    r = run.records
    return r[(r.site == "train") & (r.stat == stat)].set_index("step")["value"].sort_index()


def test_every_step_has_loss_grad_norm_and_lr_equal_to_the_reference(tmp_path):
    model = make()
    with lnprobe.attach(model, tmp_path / "run", every=5) as probe:
        ref = train(model, probe, 12, clip=0.01)  # clipped hard after probe.step(): the rows are before clipping
    run = lnprobe.load_run(tmp_path / "run")
    assert sorted(run.records.loc[run.records.site == "resid", "step"].unique()) == [0, 5, 10]
    for i, stat in enumerate(("loss", "grad_norm", "lr")):
        got = train_rows(run, stat)
        assert list(got.index) == list(range(12)), stat  # one row per step, recorded or not
        np.testing.assert_allclose(got.to_numpy(), [r[i] for r in ref], rtol=1e-6, err_msg=stat)
    assert (train_rows(run, "grad_norm") > 0.05).all()  # the norms before the 0.01 clip
    assert not run.records.duplicated(["step", "site", "layer", "stat"]).any()
    assert run.meta["step_scalars"] is True


def test_step_scalars_false_keeps_train_rows_to_recorded_steps(tmp_path):
    model = make()
    with lnprobe.attach(model, tmp_path / "run", every=5, step_scalars=False) as probe:
        train(model, probe, 12)
    run = lnprobe.load_run(tmp_path / "run")
    assert list(train_rows(run, "loss").index) == [0, 5, 10]
    assert list(train_rows(run, "grad_norm").index) == [0, 5, 10]


def test_values_survive_device_buffer_replacement_and_forced_flushes(tmp_path, monkeypatch):
    """Steps beyond one device buffer (CAPACITY rows) keep their own values; unrecorded steps force a
    flush after MAX_UNFLUSHED_SCALAR_STEPS of them even when nothing else would flush."""
    monkeypatch.setattr(stepscalars, "CAPACITY", 3)
    monkeypatch.setattr(probe_mod, "MAX_UNFLUSHED_SCALAR_STEPS", 4)
    model = make()
    probe = lnprobe.attach(model, tmp_path / "run", every=100, flush_every=10**6, flush_seconds=None)
    ref = train(model, probe, 11)
    parts_before_close = len(list((tmp_path / "run" / "records").glob("part-*.parquet")))
    probe.close()
    assert parts_before_close == 2  # after 4 and after 8 unrecorded steps
    run = lnprobe.load_run(tmp_path / "run")
    np.testing.assert_allclose(train_rows(run, "loss").to_numpy(), [r[0] for r in ref], rtol=1e-6)
    np.testing.assert_allclose(train_rows(run, "grad_norm").to_numpy(), [r[1] for r in ref], rtol=1e-6)


def test_no_host_sync_on_non_flush_steps(tmp_path, monkeypatch):
    counter = SyncCounter(monkeypatch)
    counter.install()
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = lnprobe.attach(model, tmp_path / "run", every=3, flush_every=10**6, flush_seconds=None)
    with counter.counting():
        for step in range(7):
            x, y = batch(step)
            _, loss = model(x, y)
            loss.backward()
            probe.step(loss=loss, lr=1e-3)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()  # the loop's own sync: seen, not charged
    probe.close()
    assert_no_probe_syncs(counter)
    assert counter.other_calls >= 7
    assert list(train_rows(lnprobe.load_run(tmp_path / "run"), "grad_norm").index) == list(range(7))


def test_a_sync_in_the_step_scalars_is_caught(tmp_path, monkeypatch):
    """Counter-example for the test above: a .item() in the per-step norm is charged to the probe."""
    counter = SyncCounter(monkeypatch)
    counter.install()
    orig = stepscalars.StepScalars.grad_norm

    def syncing(self, params):
        out = orig(self, params)
        out.item()
        return out

    monkeypatch.setattr(stepscalars.StepScalars, "grad_norm", syncing)
    model = make()
    probe = lnprobe.attach(model, tmp_path / "run", every=3, flush_every=10**6)
    with counter.counting():
        for step in range(2):
            _, loss = model(*batch(step))
            loss.backward()
            probe.step(loss=loss)
    probe.close()
    with pytest.raises(AssertionError, match="host synchronisation"):
        assert_no_probe_syncs(counter)


def test_distributed_weighting_gives_the_global_norm():
    """Under DDP every rank holds the reduced gradient: each sends norm / sqrt(W), and the rows' sqsum
    merge (root of the sum of squares over W ranks) gives the norm one process computes."""
    p = torch.nn.Parameter(torch.ones(3, 4))
    p.grad = torch.full((3, 4), 2.0)
    one = stepscalars.StepScalars(lambda keys: None, world_size=1).grad_norm([("w", p)])
    ranks = [stepscalars.StepScalars(lambda keys: None, world_size=4).grad_norm([("w", p)]) for _ in range(4)]
    assert float(one) == pytest.approx(np.sqrt(12 * 4.0))
    assert float(torch.stack(ranks).square().sum().sqrt()) == pytest.approx(float(one))
    assert stepscalars.StepScalars(lambda keys: None).grad_norm([("w", torch.nn.Parameter(torch.ones(2)))]) is None


def test_trainer_writes_one_row_per_step(tmp_path, corpus):
    from lnprobe.models import GPTConfig
    from lnprobe.train import TrainConfig
    from lnprobe.train import train as run_train

    cfg = GPTConfig(vocab_size=256, seq_len=16, d_model=16, n_layers=2, n_heads=2, placement="pre")
    run_train(cfg, TrainConfig(steps=7, batch_size=2, every=3, eval_every=0, data=corpus, device="cpu",
                               ckpt_every=0, progress=False), tmp_path / "run")
    run = lnprobe.load_run(tmp_path / "run")
    assert not run.records.duplicated(["step", "site", "layer", "stat"]).any()
    for stat in ("loss", "grad_norm", "lr"):
        assert list(train_rows(run, stat).index) == list(range(7)), stat


def test_hf_trainer_unrecorded_steps_have_loss_and_pre_clip_grad_norm(tmp_path):
    """Hugging Face Trainer with clipping: on steps the schedule skips, grad_norm is still the norm
    before clipping (read at the end of backward) and equals the one the Trainer logs."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from helpers import tiny_llama

    from lnprobe.integrations.hf import ProbeCallback

    steps = 5
    torch.manual_seed(0)
    model = tiny_llama(VOCAB, T)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (steps * 4, T), generator=g)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_grad_norm=1e-3, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, callbacks=[ProbeCallback(every=3)],
                                   train_dataset=[{"input_ids": r, "labels": r.clone()} for r in ids])
    trainer.train()
    run = lnprobe.load_run(tmp_path / "lnprobe")
    assert sorted(run.records.loc[run.records.site == "resid", "step"].unique()) == [0, 3]
    logged = [h for h in trainer.state.log_history if "grad_norm" in h]
    gn, loss = train_rows(run, "grad_norm"), train_rows(run, "loss")
    assert list(gn.index) == list(range(steps)) and list(loss.index) == list(range(steps))
    np.testing.assert_allclose(gn.to_numpy(), [h["grad_norm"] for h in logged], rtol=1e-5)
    np.testing.assert_allclose(loss.to_numpy(), [h["loss"] for h in logged], atol=1e-4)
    assert (gn > 1e-2).all()  # far above max_grad_norm: before clipping
