"""lnprobe.train: run directory, schedule, data order, resume equality, divergence, precision, devices."""
from __future__ import annotations

import math
import os
import time

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import write_corpus

import lnprobe
from lnprobe import train as T
from lnprobe.data import TokenData
from lnprobe.launch import cpu_threads
from lnprobe.models import GPT, config_from_preset
from lnprobe.schedule import Schedule


def small_cfg(placement: str = "pre", **kw):
    """The tiny preset shrunk to 2 blocks of width 32 so that each test runs in seconds."""
    return config_from_preset("tiny", placement=placement, **{"d_model": 32, "n_layers": 2, "n_heads": 2,
                                                             "seq_len": 16, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A deterministic ~120 kB text corpus (no dependence on the machine's stdlib)."""
    return str(write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", seed=0, prefix="w", vocab=60,
                            n_words=30000))


def tcfg(corpus: str, **kw) -> T.TrainConfig:
    base = dict(steps=6, batch_size=4, every=1, eval_every=0, eval_batches=2, data=corpus, progress=False)
    return T.TrainConfig(**{**base, **kw})


def train_rows(run_dir, stat: str) -> pd.Series:
    r = lnprobe.load_run(run_dir).records
    sel = r[(r["site"] == "train") & (r["stat"] == stat)].sort_values("step")
    return pd.Series(sel["value"].to_numpy(), index=sel["step"].to_numpy())


# ----------------------------------------------------------------------------- a short run
def test_short_run_writes_run_dir(tmp_path, corpus):
    out = tmp_path / "run"
    res = T.train(small_cfg("peri"), tcfg(corpus, steps=7, every=3, eval_every=5), out)
    assert res.status == "finished" and res.steps == 7 and res.diverged_step is None
    assert res.run_dir == out and (out / T.CHECKPOINT_NAME).exists()
    assert math.isfinite(res.final_loss) and res.tokens_per_s > 0

    run = lnprobe.load_run(out)
    assert run.meta["status"] == "finished"
    assert run.meta["config"]["train"]["steps"] == 7
    assert run.meta["config"]["model"] == small_cfg("peri").to_dict()
    assert run.meta["placement"] == "peri"
    r = run.records
    # every=3 over 7 steps: 0, 3, 6 (step 0 recorded before the first update)
    assert sorted(r.loc[r["site"] == "resid", "step"].unique()) == [0, 3, 6]
    # the loss curve has every step: probed steps from the probe, the others from the trainer
    assert sorted(r.loc[r["stat"] == "loss", "step"]) == list(range(7))
    assert run.meta["schedule"] == {"every": 3}
    # one resid row per (step, layer) for layers 0..L
    var = r[(r["site"] == "resid") & (r["stat"] == "var")]
    assert sorted(var["layer"].unique()) == [0, 1, 2]
    # val loss every 5 steps before the update, plus the final parameters labelled `steps`
    val = train_rows(out, "val_loss")
    assert list(val.index) == [0, 5, 7]
    assert res.val_loss == pytest.approx(val.loc[7])
    # at init (std 0.02) the logits are ~0, so the loss is the uniform cross-entropy ln(256)
    loss = train_rows(out, "loss")
    assert loss.loc[0] == pytest.approx(math.log(256), abs=0.05)
    assert val.loc[0] == pytest.approx(math.log(256), abs=0.05)
    assert loss.loc[6] < loss.loc[0] - 0.5  # it learns
    # the recorded lr is the closed-form schedule
    lr = train_rows(out, "lr")
    cfg = tcfg(corpus, steps=7)
    assert [lr.loc[s] for s in (0, 3, 6)] == pytest.approx([T.lr_at(s, cfg) for s in (0, 3, 6)])


def test_last_step_always_recorded(tmp_path, corpus):
    res = T.train(small_cfg("pre"), tcfg(corpus, steps=6, every=4), tmp_path / "r")
    run = lnprobe.load_run(tmp_path / "r")
    assert sorted(run.records.loc[run.records["site"] == "resid", "step"].unique()) == [0, 4, 5]
    assert run.meta["schedule"] == {"every": 4, "plus_last": 5}
    assert train_rows(tmp_path / "r", "loss").loc[5] == pytest.approx(res.final_loss)
    log = T.probe_schedule(T.TrainConfig(steps=50, every="log:3"))
    assert [s for s in range(50) if log(s)][-1] == 49 and log(0) and log(1) and not log(48)


def test_schedule_with_last():
    every4 = Schedule.parse(4)
    plus = every4.with_last(5)
    assert [s for s in range(10) if plus(s)] == [0, 4, 5, 8]
    assert plus.to_meta() == {"every": 4, "plus_last": 5}
    assert every4.with_last(8) is every4  # already recorded: the schedule itself, meta unchanged
    assert Schedule.parse(plus) is plus  # accepted wherever a schedule is (attach(every=...))


def test_store_trim_drops_late_steps(tmp_path):
    from lnprobe.store import RunWriter, read_records, records_frame, trim

    writer = RunWriter(tmp_path / "run", {"run_name": "t"})
    for steps in ([0, 1], [2, 3], [4, 5]):
        n = len(steps)
        writer.append(records_frame(np.array(steps), np.array(["train"] * n), np.full(n, -1), np.array(["loss"] * n),
                                    np.arange(n, dtype=float), np.full(n, np.nan), np.full(n, np.nan)))
    assert trim(tmp_path / "run", 3) == 3  # step 3 of the second part, both rows of the third
    records, _ = read_records(tmp_path / "run")
    assert sorted(records["step"]) == [0, 1, 2]
    assert len(list((tmp_path / "run" / "records").glob("part-*.parquet"))) == 2  # the emptied part is gone
    assert not list((tmp_path / "run" / "records").glob(".*"))  # no temporary file left behind
    assert records["token"].dtype == "Int64"
    assert trim(tmp_path / "run", 3) == 0


def test_lr_schedule_closed_form():
    cfg = T.TrainConfig(steps=200, lr=1e-2, min_lr_ratio=0.1)
    assert cfg.warmup_steps == 20  # min(50, steps // 10)
    assert T.TrainConfig(steps=4000).warmup_steps == 50
    lrs = np.array([T.lr_at(s, cfg) for s in range(200)])
    assert lrs[0] == pytest.approx(1e-2 / 20)
    assert lrs[19] == pytest.approx(1e-2)  # end of warmup: the peak
    assert lrs[199] == pytest.approx(1e-3)  # last step: lr · min_lr_ratio
    assert lrs[109] == pytest.approx(0.5 * (1e-2 + 1e-3))  # cosine half-way (19 + 180 / 2): (peak + floor) / 2
    assert np.all(np.diff(lrs[:20]) > 0) and np.all(np.diff(lrs[19:]) < 0)
    no_warmup = T.TrainConfig(steps=11, warmup=0)
    assert T.lr_at(0, no_warmup) == pytest.approx(1e-2) and T.lr_at(10, no_warmup) == pytest.approx(1e-3)


def test_config_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        T.TrainConfig(dtype="fp8")
    with pytest.raises(ValueError, match="schedule"):
        T.TrainConfig(every="sometimes")
    with pytest.raises(ValueError, match="steps"):
        T.TrainConfig(steps=0)
    short = tmp_path / "short.txt"
    short.write_text("x" * 30)
    with pytest.raises(T.ConfigError, match="seq_len"):
        T.train(small_cfg(), tcfg(str(short)), tmp_path / "r1")
    with pytest.raises(T.ConfigError, match="not found"):
        T.train(small_cfg(), tcfg(str(tmp_path / "missing.txt")), tmp_path / "r2")
    with pytest.raises(T.ConfigError, match="seq_len"):
        T.train(small_cfg(), tcfg(corpus, seq_len=32), tmp_path / "r3")
    with pytest.raises(T.ConfigError, match="no checkpoint"):
        T.train(small_cfg(), tcfg(corpus), tmp_path / "r4", resume=True)


# ----------------------------------------------------------------------------- data order
def test_same_seed_same_batches_across_placements(tmp_path, corpus, monkeypatch):
    seen: dict[str, list[torch.Tensor]] = {}
    original = TokenData.batch

    def spy(self, split, batch_size, seq_len, generator=None, device="cpu"):
        x, y = original(self, split, batch_size, seq_len, generator, device)
        if split == "train":
            seen.setdefault(current, []).append(x.clone())
        return x, y

    monkeypatch.setattr(TokenData, "batch", spy)
    for current in ("pre", "peri", "post"):
        T.train(small_cfg(current), tcfg(corpus, steps=2, every=100), tmp_path / current)
    current = "seed1"
    T.train(small_cfg("pre"), tcfg(corpus, steps=2, every=100, seed=1), tmp_path / current)

    # independent reference: the windows that a generator seeded with `seed` picks from the train split
    data = TokenData.load(corpus)
    starts = torch.randint(0, len(data.train) - 16, (4,), generator=torch.Generator().manual_seed(0))
    expected = torch.from_numpy(np.stack([data.train[s: s + 16] for s in starts.tolist()]).astype(np.int64))
    for name in ("pre", "peri", "post"):
        assert len(seen[name]) == 2
        assert torch.equal(seen[name][0], expected)
        assert torch.equal(seen[name][1], seen["pre"][1])
    assert not torch.equal(seen["seed1"][0], expected)


# ----------------------------------------------------------------------------- resume
def test_resume_gives_identical_losses(tmp_path, corpus):
    # dropout > 0 makes the result depend on the restored torch RNG state, not only on the data order
    mcfg = small_cfg("pre", dropout=0.1)
    cfg = tcfg(corpus, steps=10, every=1, eval_every=4)
    T.train(mcfg, cfg, tmp_path / "full")
    part = T.train(mcfg, cfg, tmp_path / "split", stop_after=4)
    assert part.status == "stopped" and part.steps == 4
    assert lnprobe.load_run(tmp_path / "split").meta["status"] == "stopped"
    resumed = T.train(mcfg, cfg, tmp_path / "split", resume=True)
    assert resumed.status == "finished" and resumed.steps == 10

    a, b = train_rows(tmp_path / "full", "loss"), train_rows(tmp_path / "split", "loss")
    assert list(b.index) == list(range(10))  # each step once: no gap, no duplicate
    np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())  # bitwise on CPU
    va, vb = train_rows(tmp_path / "full", "val_loss"), train_rows(tmp_path / "split", "val_loss")
    assert list(vb.index) == [0, 4, 8, 10]
    np.testing.assert_array_equal(va.to_numpy(), vb.to_numpy())
    pa = torch.load(tmp_path / "full" / T.CHECKPOINT_NAME, weights_only=True)["model"]
    pb = torch.load(tmp_path / "split" / T.CHECKPOINT_NAME, weights_only=True)["model"]
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    meta = lnprobe.load_run(tmp_path / "split").meta
    assert meta["status"] == "finished" and meta["resumed_from"] == [4]


def test_resume_drops_records_after_the_checkpoint(tmp_path, corpus):
    """A run that crashed after its checkpoint wrote records past it: resuming rewrites them once."""
    mcfg, cfg = small_cfg("peri"), tcfg(corpus, steps=8, every=1, ckpt_every=3)
    T.train(mcfg, cfg, tmp_path / "full")
    T.train(mcfg, cfg, tmp_path / "crash", stop_after=5)  # checkpoint at 3 (ckpt_every) and at 5 (stop)
    ckpt = torch.load(tmp_path / "crash" / T.CHECKPOINT_NAME, weights_only=True)
    assert ckpt["step"] == 5
    # simulate the crash: put back the step-3 checkpoint; records of steps 3, 4 are on disk already
    T.train(mcfg, cfg, tmp_path / "ref3", stop_after=3)  # same seed and config: the same step-3 state
    (tmp_path / "ref3" / T.CHECKPOINT_NAME).replace(tmp_path / "crash" / T.CHECKPOINT_NAME)
    T.train(mcfg, cfg, tmp_path / "crash", resume=True)
    a, b = train_rows(tmp_path / "full", "loss"), train_rows(tmp_path / "crash", "loss")
    assert list(b.index) == list(range(8))
    np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())


def test_resume_refuses_changed_settings_unless_forced(tmp_path, corpus):
    out = tmp_path / "r"
    T.train(small_cfg("pre"), tcfg(corpus, steps=4), out, stop_after=2)
    with pytest.raises(T.CheckpointError, match=r"settings differ .*model.placement 'pre' -> 'peri'.*--force"):
        T.train(small_cfg("peri"), tcfg(corpus, steps=4), out, resume=True)
    with pytest.raises(T.CheckpointError, match="seed 0 -> 3"):
        T.train(small_cfg("pre"), tcfg(corpus, steps=4, seed=3), out, resume=True)
    with pytest.raises(T.CheckpointError, match="lr 0.01 -> 0.02"):
        T.train(small_cfg("pre"), tcfg(corpus, steps=4, lr=0.02), out, resume=True)
    with pytest.raises(T.CheckpointError, match="do not fit this model"):  # forced, but the weights cannot load
        T.train(small_cfg("pre", d_model=64), tcfg(corpus, steps=4), out, resume=True, force=True)
    # operational settings change freely
    T.train(small_cfg("pre"), tcfg(corpus, steps=4, ckpt_every=1, flush_seconds=None, threads=1), out, resume=True,
            stop_after=3)
    res = T.train(small_cfg("pre"), tcfg(corpus, steps=4, lr=0.02), out, resume=True, force=True)
    assert res.status == "finished"
    meta = lnprobe.load_run(out).meta
    assert [r["step"] for r in meta["resumes"]] == [2, 3] and meta["resumed_from"] == [2, 3]
    assert meta["resumes"][0]["changed"] == {} and meta["resumes"][1]["changed"] == {"lr": [0.01, 0.02]}
    assert meta["resumes"][1]["previous_status"] == "stopped" and meta["config"]["train"]["lr"] == 0.02
    assert list(train_rows(out, "loss").index) == [0, 1, 2, 3]


def test_existing_run_is_refused_without_overwrite(tmp_path, corpus):
    out = tmp_path / "r"
    T.train(small_cfg("pre"), tcfg(corpus, steps=2), out)
    with pytest.raises(T.ConfigError, match=r"already holds a run \(status finished, last step 1\).*--overwrite"):
        T.train(small_cfg("pre"), tcfg(corpus, steps=3), out)
    assert (out / T.CHECKPOINT_NAME).exists() and len(train_rows(out, "loss")) == 2  # untouched
    res = T.train(small_cfg("pre"), tcfg(corpus, steps=3), out, overwrite=True)
    assert res.status == "finished" and list(train_rows(out, "loss").index) == [0, 1, 2]


def test_resume_before_the_first_checkpoint_restarts_at_step_0(tmp_path, corpus):
    """A run killed before its first checkpoint: --resume starts it again (the records are dropped)."""
    mcfg, cfg = small_cfg("pre"), tcfg(corpus, steps=5)
    T.train(mcfg, cfg, tmp_path / "full")
    T.train(mcfg, cfg, tmp_path / "killed", stop_after=3)
    (tmp_path / "killed" / T.CHECKPOINT_NAME).unlink()  # as if killed before the checkpoint was written
    with pytest.raises(T.CheckpointError, match="lr 0.01 -> 0.5"):
        T.train(mcfg, tcfg(corpus, steps=5, lr=0.5), tmp_path / "killed", resume=True)
    T.train(mcfg, cfg, tmp_path / "killed", resume=True)
    a, b = train_rows(tmp_path / "full", "loss"), train_rows(tmp_path / "killed", "loss")
    assert list(b.index) == list(range(5))
    np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())
    assert lnprobe.load_run(tmp_path / "killed").meta["resumes"][0]["step"] == 0


def test_checkpoint_comes_after_its_records(tmp_path, corpus, monkeypatch):
    """At every checkpoint the records of all steps before it are on disk already."""
    from lnprobe import checkpoint as C
    from lnprobe.store import read_records

    seen = []
    original = C.save_checkpoint

    def spy(path, *, step, **kw):
        records, _ = read_records(path.parent)
        seen.append((step, sorted(set(records.loc[records["stat"] == "loss", "step"]))))
        return original(path, step=step, **kw)

    monkeypatch.setattr(C, "save_checkpoint", spy)
    T.train(small_cfg("pre"), tcfg(corpus, steps=7, every=2, ckpt_every=3, flush_seconds=None), tmp_path / "r")
    assert seen == [(3, [0, 1, 2]), (6, list(range(6))), (7, list(range(7)))]


def test_default_checkpoint_period():
    assert T.TrainConfig().ckpt_every == 100 and T.TrainConfig().flush_seconds == 60
    with pytest.raises(T.ConfigError, match="flush_seconds"):
        T.TrainConfig(flush_seconds=-1)


def test_out_and_memory_errors(tmp_path, corpus):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(T.ConfigError, match="is a file"):
        T.train(small_cfg(), tcfg(corpus), afile)
    with pytest.raises(T.ConfigError, match="cannot write"):
        T.train(small_cfg(), tcfg(corpus), afile / "sub")
    with pytest.raises(T.ConfigError, match=r"batch_size 100000000 × seq_len 16 needs about .* but .* is available"):
        T.train(small_cfg(), tcfg(corpus, batch_size=100_000_000), tmp_path / "big")
    assert not (tmp_path / "big" / "meta.json").exists()


def test_checkpoint_written_atomically_and_its_errors(tmp_path, corpus):
    from lnprobe.checkpoint import CheckpointError, load_checkpoint

    mcfg, cfg = small_cfg("pre"), tcfg(corpus, steps=4)
    T.train(mcfg, cfg, tmp_path / "r", stop_after=2)
    assert [p.name for p in (tmp_path / "r").iterdir() if p.name.startswith(".")] == []  # no temporary left
    ckpt, changed = load_checkpoint(tmp_path / "r" / T.CHECKPOINT_NAME, mcfg.to_dict(), cfg.to_dict())
    assert ckpt["step"] == 2 and ckpt["optimizer"] is not None and not ckpt["fsdp"] and changed == {}
    with pytest.raises(CheckpointError, match="steps 4 -> 2"):
        load_checkpoint(tmp_path / "r" / T.CHECKPOINT_NAME, mcfg.to_dict(), {**cfg.to_dict(), "steps": 2})
    with pytest.raises(CheckpointError, match="already did 2 of 2"):
        load_checkpoint(tmp_path / "r" / T.CHECKPOINT_NAME, mcfg.to_dict(), {**cfg.to_dict(), "steps": 2}, force=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        T.train(mcfg, cfg, tmp_path / "none", resume=True)
    assert issubclass(CheckpointError, T.ConfigError)


# ----------------------------------------------------------------------------- divergence
class _InfAt(GPT):
    """A GPT whose training loss turns into +inf from forward call ``AT`` on (an injected blow-up)."""

    AT = 3

    def __init__(self, config):
        super().__init__(config)
        self.calls = 0

    def forward(self, idx, targets=None):
        logits, loss = super().forward(idx, targets)
        if self.training:
            if self.calls >= self.AT:
                loss = loss * float("inf")
            self.calls += 1
        return logits, loss


@pytest.mark.parametrize("every", [1, 100])  # the diverging step scheduled, and not scheduled
def test_divergence_stops_cleanly(tmp_path, corpus, monkeypatch, every):
    out = tmp_path / "div"
    T.train(small_cfg("pre"), tcfg(corpus, steps=2), out)  # an older run in the same directory
    assert (out / T.CHECKPOINT_NAME).exists()
    monkeypatch.setattr(T, "GPT", _InfAt)
    res = T.train(small_cfg("pre"), tcfg(corpus, steps=8, every=every, eval_every=2), out, overwrite=True)
    assert res.status == "diverged" and res.diverged_step == 3 and res.steps == 3
    assert math.isinf(res.final_loss)
    run = lnprobe.load_run(out)
    assert run.meta["status"] == "diverged"
    assert run.meta["divergence"]["step"] == 3 and "inf" in run.meta["divergence"]["reason"]
    assert run.meta["last_step"] == 3
    loss = train_rows(out, "loss")
    assert math.isinf(loss.loc[3]) and loss.index.max() == 3
    assert train_rows(out, "nonfinite_loss").loc[3] == 1.0
    if every == 1:
        assert list(loss.index) == [0, 1, 2, 3] and np.isfinite(loss.loc[:2]).all()
    assert not (out / T.CHECKPOINT_NAME).exists()  # neither the old run's checkpoint nor one of a broken model


def test_huge_lr_diverges_cleanly(tmp_path, corpus):
    """lr = 1e6: the first update wrecks the weights, a later loss is NaN; train returns, the dir says so."""
    res = T.train(small_cfg("pre"), tcfg(corpus, steps=8, lr=1e6, warmup=0, every=2), tmp_path / "big")
    assert res.status == "diverged" and res.diverged_step >= 1 and not math.isfinite(res.final_loss)
    meta = lnprobe.load_run(tmp_path / "big").meta
    assert meta["status"] == "diverged" and meta["divergence"]["step"] == res.diverged_step
    loss = train_rows(tmp_path / "big", "loss")
    assert not math.isfinite(loss.loc[res.diverged_step]) and math.isfinite(loss.loc[0])


# ----------------------------------------------------------------------------- precision, devices
def _cpu_fp16_supported() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
        torch.amp.GradScaler("cpu")
        return y.dtype == torch.float16
    except (RuntimeError, TypeError, ValueError, AssertionError):
        return False


@pytest.mark.skipif(not _cpu_fp16_supported(), reason="fp16 autocast or GradScaler not supported on this CPU build")
def test_fp16_path_runs_on_cpu(tmp_path, corpus):
    res = T.train(small_cfg("peri"), tcfg(corpus, steps=4, dtype="fp16", device="cpu"), tmp_path / "fp16")
    assert res.status == "finished" and res.dtype == "fp16" and math.isfinite(res.final_loss)
    run = lnprobe.load_run(tmp_path / "fp16")
    assert run.meta["config"]["dtype"] == "fp16"
    assert "skipped" in set(run.records.loc[run.records["site"] == "train", "stat"])  # the scaler is seen
    assert train_rows(tmp_path / "fp16", "loss").loc[0] == pytest.approx(math.log(256), abs=0.05)


def test_bf16_autocast_on_cpu(tmp_path, corpus):
    res = T.train(small_cfg("pre"), tcfg(corpus, steps=3, dtype="bf16", device="cpu"), tmp_path / "bf16")
    assert res.status == "finished" and res.dtype == "bf16" and math.isfinite(res.final_loss)


def test_device_resolution():
    assert T.resolve_device("cpu") == torch.device("cpu")
    auto = T.resolve_device("auto")
    if torch.cuda.is_available():
        assert auto.type == "cuda"
    else:
        assert auto.type in ("mps", "cpu")
        with pytest.raises(T.ConfigError, match="CUDA is not available"):
            T.resolve_device("cuda")
        with pytest.raises(T.ConfigError, match="CUDA is not available"):
            T.resolve_device("cuda:1")
    with pytest.raises(T.ConfigError, match="device"):
        T.resolve_device("tpu")
    assert T.resolve_dtype("auto", torch.device("cuda")) == "bf16"
    assert T.resolve_dtype("auto", torch.device("cpu")) == "fp32"
    assert T.resolve_dtype("fp16", torch.device("cpu")) == "fp16"


def test_threads_do_not_exceed_the_cpus(tmp_path, corpus):
    T.train(small_cfg("pre"), tcfg(corpus, steps=1), tmp_path / "thr")
    assert 1 <= torch.get_num_threads() <= cpu_threads()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_first_loss(tmp_path, corpus):
    """On CUDA (bf16 autocast) the init loss matches the CPU one and the run finishes."""
    T.train(small_cfg("peri"), tcfg(corpus, steps=2, device="cpu"), tmp_path / "cpu")
    gpu = T.train(small_cfg("peri"), tcfg(corpus, steps=2, device="cuda"), tmp_path / "gpu")
    assert gpu.status == "finished" and gpu.dtype == "bf16"
    assert train_rows(tmp_path / "gpu", "loss").loc[0] == pytest.approx(train_rows(tmp_path / "cpu", "loss").loc[0],
                                                                         abs=0.02)


# ----------------------------------------------------------------------------- time-bound flush, heartbeat
def test_probe_flushes_on_a_time_bound_and_writes_a_heartbeat(tmp_path, monkeypatch):
    from lnprobe import flushclock as P

    clock = [1000.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: clock[0])
    torch.manual_seed(0)
    model = GPT(small_cfg("pre"))
    x = torch.randint(0, 256, (2, 16))

    def parts(out):  # flushes so far: live parts, and those close() compacted (lnprobe.store.compact)
        from lnprobe.store import read_manifest

        live = {p.name for p in (out / "records").glob("part-*.parquet")}
        return len(live | set((read_manifest(out) or {}).get("parts", [])))

    probe = lnprobe.attach(model, tmp_path / "a", every=1, flush_every=100, flush_seconds=60)
    for i in range(3):
        _, loss = model(x, x)
        loss.backward()
        clock[0] += 25.0  # steps 0, 1, 2 close at 25, 50, 75 s after attach
        probe.step(loss=loss)
        model.zero_grad()
        assert parts(tmp_path / "a") == (0 if i < 2 else 1), i  # the first flush at the step 60 s after attach
    meta = lnprobe.load_run(tmp_path / "a").meta
    assert meta["status"] == "running" and meta["last_step"] == 2
    beat = meta["heartbeat"]
    assert beat["step"] == 2 and beat["elapsed_s"] == 75.0 and beat["pid"] == os.getpid()
    assert abs(beat["unix"] - time.time()) < 60 and beat["time"].endswith("Z")
    probe.close()
    assert lnprobe.load_run(tmp_path / "a").meta["heartbeat"]["step"] == 2

    never = lnprobe.attach(model, tmp_path / "b", every=1, flush_every=100, flush_seconds=None)
    clock[0] += 1e6
    _, loss = model(x, x)
    loss.backward()
    never.step(loss=loss)
    assert parts(tmp_path / "b") == 0  # no time bound: only flush_every and close flush
    never.close()
    assert parts(tmp_path / "b") == 1
    with pytest.raises(ValueError, match="flush_seconds"):
        lnprobe.attach(model, tmp_path / "c", flush_seconds=-1)


def test_a_setting_added_later_is_unchanged_when_it_holds_its_default():
    # A checkpoint written before `qk_norm` (model) and `attn_logits` (train) existed lacks those keys.
    from lnprobe.checkpoint import changed_fields
    model, train = {"placement": "pre", "qk_norm": False}, {"lr": 0.01, "attn_logits": False}
    assert changed_fields({"placement": "pre"}, {"lr": 0.01}, model, train) == {}
    changed = changed_fields({"placement": "pre"}, {"lr": 0.01}, dict(model, qk_norm=True), train)
    assert changed == {"model.qk_norm": [False, True]}
