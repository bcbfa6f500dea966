"""Live sinks (lnprobe.sinks) and the first non-finite site (meta.json ``first_nonfinite``).

TensorBoard: the live sink's event files are read with tensorboard's EventAccumulator while the run
is still open. W&B (offline mode, the run's .wandb file read back) and MLflow (file store) hold the
same scalars as a callable sink. Each library's test skips when it is not installed.
"""
import glob
import json
import struct
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import SMALL, tiny_llama, write_corpus
from nanogpt import NanoGPT

import lnprobe
from lnprobe import sinks as K

VOCAB, T = 64, 16


def train(probe, model, steps, opt=None, seed=1, after_backward=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (2, T), generator=g)
        _, loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
        probe.step(loss=loss, lr=1e-3)
        if opt is not None:
            opt.step()
            opt.zero_grad()
        else:
            model.zero_grad()


def model_and_opt():
    torch.manual_seed(0)
    model = NanoGPT(vocab=VOCAB, block_size=T)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


class Recorder:
    def __init__(self):
        self.seen = {}

    def __call__(self, step, scalars):
        self.seen[step] = scalars


def test_callable_sink_gets_every_recorded_step_at_flush(tmp_path):
    model, opt = model_and_opt()
    rec = Recorder()
    probe = lnprobe.attach(model, tmp_path / "run", every=2, flush_every=2, sinks=[rec], updates=opt)
    train(probe, model, 3, opt)
    # the first flush (2 recorded steps) came after step 2; step 1 is there with its per-step train scalars
    assert sorted(rec.seen) == [0, 1, 2] and "lnprobe/loss" in rec.seen[1] and "lnprobe/absmax" not in rec.seen[1]
    train(probe, model, 3, opt)
    probe.close()
    assert sorted(rec.seen) == [0, 1, 2, 3, 4, 5]
    r = lnprobe.load_run(tmp_path / "run").records
    for step, sc in rec.seen.items():
        rs = r[r.step == step]
        tr = rs[rs.site == "train"].set_index("stat")["value"]
        assert sc["lnprobe/loss"] == pytest.approx(tr["loss"])
        assert sc["lnprobe/grad_norm"] == pytest.approx(tr["grad_norm"])
        if step % 2:  # an unrecorded step: its train scalars only
            continue
        resid = rs[(rs.site == "resid") & (rs.stat == "m2")]
        assert sc["lnprobe/resid_m2_last"] == pytest.approx(resid.loc[resid.layer.idxmax(), "value"])
        act = rs[(rs.stat == "absmax") & ~rs.site.str.startswith("param:")]
        top = act.loc[act.value.idxmax()]
        assert sc["lnprobe/absmax"] == pytest.approx(top.value) and sc["lnprobe/absmax_layer"] == top.layer
        ratio = rs[rs.stat == "update_ratio"].value
        assert sc["lnprobe/update_ratio_max"] == pytest.approx(ratio[np.isfinite(ratio)].max())
        assert sc["lnprobe/nonfinite"] == 0 and sc["lnprobe/nonfinite_grads"] == 0


def test_summary_profiles_have_few_tags(tmp_path):
    model, opt = model_and_opt()
    got = []

    class Keep(K.Sink):
        def write(self, summary):
            got.append(summary)

    probe = lnprobe.attach(model, tmp_path / "run", sinks=Keep(), updates=opt)
    train(probe, model, 2, opt)
    probe.close()
    s = got[-1]
    assert set(s.profiles) == {"lnprobe/profile/resid/m2", "lnprobe/profile/resid/var", "lnprobe/profile/resid/absmax",
                               "lnprobe/profile/resid/grad_rms", "lnprobe/profile/mlp_act/absmax",
                               "lnprobe/profile/param/grad_norm", "lnprobe/profile/param/update_ratio"}
    layers, values = s.profiles["lnprobe/profile/resid/m2"]
    assert list(layers) == [0, 1, 2, 3] and np.isfinite(values).all()
    assert len(s.scalars) < 20


def test_a_raising_sink_is_disabled_and_training_goes_on(tmp_path):
    model, _ = model_and_opt()
    calls, rec = [], Recorder()

    def bad(step, scalars):
        calls.append(step)
        raise RuntimeError("sink down")

    probe = lnprobe.attach(model, tmp_path / "run", flush_every=1, sinks=[bad, rec])
    with pytest.warns(RuntimeWarning, match="sink down"):
        train(probe, model, 3)
    probe.close()
    assert calls == [0] and sorted(rec.seen) == [0, 1, 2]
    meta = lnprobe.load_run(tmp_path / "run").meta
    assert any("disabled" in n and "sink down" in n for n in meta["notes"])


def test_tensorboard_sink_is_readable_while_training(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, opt = model_and_opt()
    probe = lnprobe.attach(model, tmp_path / "run", flush_every=2, sinks=[K.TensorBoard(tmp_path / "tb")], updates=opt)
    train(probe, model, 4, opt)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()  # the run is still open: nothing was closed yet
    tags = acc.Tags()
    assert "lnprobe/loss" in tags["scalars"] and "lnprobe/profile/resid/m2" in tags["histograms"]
    assert [e.step for e in acc.Scalars("lnprobe/loss")] == [0, 1, 2, 3]
    r = lnprobe.load_run(tmp_path / "run").records
    loss = r[(r.site == "train") & (r.stat == "loss")].sort_values("step").value.to_numpy()
    np.testing.assert_allclose([e.value for e in acc.Scalars("lnprobe/loss")], loss, rtol=1e-6)
    h = acc.Histograms("lnprobe/profile/resid/m2")[-1].histogram_value
    m2 = r[(r.step == 3) & (r.site == "resid") & (r.stat == "m2")].sort_values("layer").value.to_numpy()
    np.testing.assert_allclose(h.bucket, m2, rtol=1e-6)
    probe.close()


def _wandb_history(run_dir):
    """History rows of an offline W&B run, read from its .wandb file (LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2

    path = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))[-1]
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, buf, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos: pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7: pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST fragment
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item})
    return rows


def _scalars_only(seen):
    return {step: {k: v for k, v in sc.items() if np.isfinite(v)} for step, sc in seen.items()}


def test_wandb_offline_and_mlflow_file_store_hold_the_same_scalars(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    from mlflow.tracking import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    wrun = wandb.init(project="lnprobe-test", dir=str(tmp_path), mode="offline")
    model, opt = model_and_opt()
    rec = Recorder()
    ml = K.MLflow(tracking_uri=uri, experiment="lnprobe-test")
    probe = lnprobe.attach(model, tmp_path / "run", flush_every=2,
                           sinks=[rec, K.WandB(wrun, finish=True), ml], updates=opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no sink may be disabled
        train(probe, model, 3, opt)
        probe.close()
    want = _scalars_only(rec.seen)
    assert sorted(want) == [0, 1, 2]

    hist = [h for h in _wandb_history(tmp_path) if "lnprobe/step" in h]
    got_wb = {h["lnprobe/step"]: {k: v for k, v in h.items() if k in want[h["lnprobe/step"]]} for h in hist}
    assert got_wb.keys() == want.keys()
    for step in want:
        assert got_wb[step] == pytest.approx(want[step], rel=1e-12), step
    assert any("lnprobe/profile/resid/m2/values" in h for h in hist)

    client = MlflowClient(tracking_uri=uri)
    keys = set().union(*(w.keys() for w in want.values()))
    got_ml = {}
    for key in keys:
        for m in client.get_metric_history(ml.run_id, key):
            got_ml.setdefault(m.step, {})[key] = m.value
    assert got_ml.keys() == want.keys()
    for step in want:
        assert got_ml[step] == pytest.approx(want[step], rel=1e-12), step
    assert client.get_metric_history(ml.run_id, "lnprobe/profile/resid/m2/layer_00")
    assert client.get_run(ml.run_id).info.status == "FINISHED"


def test_first_nonfinite_names_the_planted_layer(tmp_path):
    torch.manual_seed(0)
    model = NanoGPT(vocab=VOCAB, block_size=T)
    rec = Recorder()
    probe = lnprobe.attach(model, tmp_path / "run", flush_every=2, sinks=[rec])
    train(probe, model, 3)
    # plant a NaN in block 1's MLP output projection: from step 3 on, mlp_out of layer 1 is the first
    # site that holds a NaN; everything after it in the forward (resid 2, ..., final) too
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[0, 0] = float("nan")
    train(probe, model, 2)
    probe.close()
    meta = lnprobe.load_run(tmp_path / "run").meta
    first = meta["first_nonfinite"]
    assert (first["step"], first["layer"]) == (3, 1) and first["count"] > 0
    assert first["site"] in ("mlp_out", "mlp_raw")
    assert rec.seen[3]["lnprobe/nonfinite"] > 0 and rec.seen[2]["lnprobe/nonfinite"] == 0
    assert any("first non-finite" in n for n in meta["notes"])


def test_first_nonfinite_forward_order_within_a_step():
    import pandas as pd

    frame = pd.DataFrame({
        "step": [5, 5, 5, 5, 6], "site": ["resid", "mlp_out", "attn_out", "final", "resid"],
        "layer": [3, 2, 2, 4, 0], "stat": ["nonfinite"] * 5, "value": [4.0, 2.0, 1.0, 9.0, 1.0],
    })
    assert K.first_nonfinite(frame) == {"step": 5, "site": "attn_out", "layer": 2, "count": 1.0}
    assert K.first_nonfinite(frame.assign(value=0.0)) is None


def test_train_command_tensorboard_flag(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lnprobe.cli import main

    corpus = write_corpus(tmp_path / "corpus.txt", seed=1, prefix="t", n_words=5000)
    small = SMALL
    assert main(["train", "--steps", "3", "--every", "1", "--data", str(corpus), "--out", str(tmp_path / "run"),
                 "--tensorboard", str(tmp_path / "tb"), *small]) == 0
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("lnprobe/loss")] == [0, 1, 2]
    assert lnprobe.load_run(tmp_path / "run").meta["config"]["train"]["tensorboard"] == str(tmp_path / "tb")


def test_hf_callback_forwards_the_summary_into_the_trainer_logs(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lnprobe.integrations.hf import ProbeCallback

    torch.manual_seed(0)
    model = tiny_llama(VOCAB, T)
    ids = torch.randint(0, VOCAB, (8, T), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row.clone()} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to=["tensorboard"], use_cpu=True, seed=0, disable_tqdm=True)
    cb = ProbeCallback(every=1, flush_every=1, updates=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "lnprobe/loss" in h]
    assert [h["lnprobe/step"] for h in logged] == [0, 1, 2, 3]
    r = lnprobe.load_run(tmp_path / "lnprobe").records
    loss = r[(r.site == "train") & (r.stat == "loss")].sort_values("step").value.to_numpy()
    np.testing.assert_allclose([h["lnprobe/loss"] for h in logged], loss, rtol=1e-6)
    assert all("lnprobe/absmax" in h and "lnprobe/resid_m2_last" in h and "lnprobe/update_ratio_max" in h
               for h in logged)
    assert sorted(r[r.stat == "update_ratio"].step.unique()) == [0, 1, 2, 3]
    # the Trainer's own TensorBoard integration (report_to) saw the keys: this callback was moved before it
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("ProbeCallback") < names.index("TensorBoardCallback")
    acc = EventAccumulator(str(next(tmp_path.glob("runs/*"))))
    acc.Reload()
    assert "train/lnprobe/loss" in acc.Tags()["scalars"]


def test_forward_order_covers_every_site():
    from lnprobe.sites import ALL_SITES

    assert sorted(K.FORWARD_ORDER) == sorted(ALL_SITES)
    # a decoder block: the cross-attention branch comes before the MLP of the same layer
    frame = pd.DataFrame({"step": [1, 1], "site": ["mlp_out", "xattn_out"], "layer": [3, 3],
                          "stat": ["nonfinite"] * 2, "value": [1.0, 2.0]})
    assert K.first_nonfinite(frame)["site"] == "xattn_out"


def test_summary_carries_the_attention_and_output_logit_scalars():
    frame = pd.DataFrame({
        "step": [2] * 6, "site": ["attn_logits"] * 4 + ["logits"] * 2, "layer": [0, 1, 0, 1, 2, 2],
        "stat": ["qk_absmax", "qk_absmax", "entropy", "entropy", "lse_mean", "logit_absmax"],
        "value": [3.0, 7.5, 1.2, 0.8, 4.4, 9.0]})
    (s,) = K.summarize(frame)
    assert s.scalars["lnprobe/qk_absmax"] == 7.5 and s.scalars["lnprobe/qk_absmax_layer"] == 1
    assert s.scalars["lnprobe/lse_mean"] == 4.4 and s.scalars["lnprobe/logit_absmax"] == 9.0
    layers, values = s.profiles["lnprobe/profile/attn_logits/entropy"]
    assert list(layers) == [0, 1] and list(values) == [1.2, 0.8]
    assert "lnprobe/absmax" not in s.scalars  # attention logits are not activations
