"""ProbeCallback in a real transformers.Trainer: a tiny Llama (from a config, no download), 5 optimizer
steps of 2 accumulated micro-batches, clipping active (max_grad_norm tiny).

The Trainer fires no callback between the last backward and clipping; the callback reads parameter
gradient norms at the end of each backward instead. A reference callback of our own reads them at
``on_pre_optimizer_step``, i.e. after clipping: the probe's norms times the clip coefficient
min(1, max_norm / (total + 1e-6)) must equal them, and the probe's total must equal the pre-clip norm
that the Trainer itself logs.
"""
import numpy as np
import pytest
import torch
from helpers import tiny_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import lnprobe  # noqa: E402
from lnprobe.integrations.hf import ProbeCallback  # noqa: E402

VOCAB, T, STEPS, ACCUM, BATCH, MAX_NORM = 64, 16, 5, 2, 2, 1e-3


class GradNormsAtPreOptimizerStep(transformers.TrainerCallback):
    def __init__(self):
        self.norms = {}  # step -> {name: norm}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.norms[state.global_step] = {n: float(p.grad.double().norm()) for n, p in model.named_parameters()
                                         if p.grad is not None}


def dataset(n):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = tiny_llama(VOCAB, T)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM, max_grad_norm=MAX_NORM, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True)
    ref = GradNormsAtPreOptimizerStep()
    probe_cb = ProbeCallback(every=1, flush_every=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(STEPS * ACCUM * BATCH),
                                   callbacks=[probe_cb, ref])
    trainer.train()
    return out, ref, trainer, probe_cb


def test_one_record_per_optimizer_step_in_output_dir(trained):
    out, _, trainer, cb = trained
    run = lnprobe.load_run(out / "lnprobe")
    assert run.meta["status"] == "finished" and cb.probe is None
    r = run.records
    assert sorted(r.step.unique()) == list(range(STEPS))
    assert not r.duplicated(["step", "site", "layer", "stat"]).any()
    assert (r[r.site == "resid"].groupby("step").size() > 0).all()
    assert run.meta["config"]["trainer"]["gradient_accumulation_steps"] == ACCUM
    lr = r[(r.site == "train") & (r.stat == "lr")].sort_values("step")["value"].to_numpy()
    logged_lr = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    np.testing.assert_allclose(lr, logged_lr[:STEPS], rtol=1e-6)
    loss = r[(r.site == "train") & (r.stat == "loss")].sort_values("step")["value"].to_numpy()
    logged_loss = [h["loss"] for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
    np.testing.assert_allclose(loss, logged_loss, atol=1e-4)  # the Trainer rounds logs to 4 digits
    assert loss[0] == pytest.approx(np.log(VOCAB), rel=0.05)  # random init: about ln V


def test_param_grad_norms_are_read_before_clipping(trained):
    out, ref, trainer, _ = trained
    r = lnprobe.load_run(out / "lnprobe").records
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(logged) == STEPS and len(ref.norms) == STEPS
    for step in range(STEPS):
        rs = r[r.step == step]
        total = rs[(rs.site == "train") & (rs.stat == "grad_norm")]["value"].item()
        # The Trainer logs the pre-clip norm returned by clip_grad_norm_.
        assert total == pytest.approx(float(logged[step]), rel=1e-5)
        coef = min(1.0, MAX_NORM / (total + 1e-6))
        assert coef < 1e-2  # clipping really changed the gradients
        pg = rs[(rs.stat == "grad_norm") & rs.site.str.startswith("param:")].set_index("site")["value"]
        after = ref.norms[step]
        assert set(pg.index) == {f"param:{n}" for n in after}
        for name, norm in after.items():
            assert pg[f"param:{name}"] * coef == pytest.approx(norm, rel=1e-4, abs=1e-12), name
