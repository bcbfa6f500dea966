"""ProbeCallback in a real PyTorch Lightning Trainer: a nanoGPT-style model in a LightningModule, 5
optimizer steps of 2 accumulated micro-batches, clipping active (gradient_clip_val tiny).

A reference callback reads the parameter gradient norms at ``on_before_optimizer_step`` (after
backward and AMP unscale, before clipping): the probe's norms must equal them, and the reference's
norms after clipping (``on_before_zero_grad``) must be visibly smaller. Skips without lightning.
"""
import numpy as np
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from nanogpt import NanoGPT  # noqa: E402

import lnprobe  # noqa: E402
from lnprobe import stats as S  # noqa: E402
from lnprobe.integrations.lightning import ProbeCallback  # noqa: E402

VOCAB, T, STEPS, ACCUM, BATCH, CLIP = 64, 16, 5, 2, 2, 1e-3


class LitGPT(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = NanoGPT(vocab=VOCAB, block_size=T)

    def forward(self, idx):
        return self.net(idx)[0]

    def training_step(self, batch, _):
        _, loss = self.net(batch, torch.roll(batch, -1, 1))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class Reference(pl.Callback):
    def __init__(self):
        self.before_clip, self.after_clip, self.losses, self._loss = {}, {}, {}, []

    def on_before_backward(self, trainer, pl_module, loss):
        self._loss.append(float(loss.detach()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before_clip[trainer.global_step] = {n: float(p.grad.double().norm())
                                                 for n, p in pl_module.named_parameters() if p.grad is not None}
        self.losses[trainer.global_step], self._loss = sum(self._loss), []

    def on_before_zero_grad(self, trainer, pl_module, optimizer):
        self.after_clip[trainer.global_step] = {n: float(p.grad.double().norm())
                                                for n, p in pl_module.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    data = torch.randint(0, VOCAB, (STEPS * ACCUM * BATCH, T), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    seen = {}
    cb = ProbeCallback(every=1, flush_every=2, updates=True, sinks=[lambda step, sc: seen.__setitem__(step, sc)])
    ref = Reference()
    trainer = pl.Trainer(max_steps=STEPS, accumulate_grad_batches=ACCUM, gradient_clip_val=CLIP, accelerator="cpu",
                         devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(out), callbacks=[cb, ref])
    trainer.fit(LitGPT(), loader)
    return out, ref, cb, seen


def test_one_record_per_optimizer_step(trained):
    out, ref, cb, seen = trained
    run = lnprobe.load_run(out / "lnprobe")
    assert run.meta["status"] == "finished" and cb.probe is None
    r = run.records
    assert sorted(r.step.unique()) == list(range(STEPS)) and sorted(seen) == list(range(STEPS))
    assert not r.duplicated(["step", "site", "layer", "stat"]).any()
    assert run.meta["config"]["lightning"]["accumulate_grad_batches"] == ACCUM
    loss = r[(r.site == "train") & (r.stat == "loss")].sort_values("step").value.to_numpy()
    np.testing.assert_allclose(loss, [ref.losses[s] for s in range(STEPS)], rtol=1e-6)
    # every micro-batch is recorded: tokens of the resid stream = ACCUM · BATCH · T per step
    assert (r[(r.site == "resid") & (r.stat == "m2")].groupby("step").size() > 0).all()


def test_param_grad_norms_equal_the_reference_at_on_before_optimizer_step(trained):
    out, ref, _, _ = trained
    r = lnprobe.load_run(out / "lnprobe").records
    for step in range(STEPS):
        rs = r[(r.step == step) & (r.stat == "grad_norm") & r.site.str.startswith("param:")].set_index("site")["value"]
        want = ref.before_clip[step]
        assert set(rs.index) == {f"param:{n}" for n in want}
        for name, norm in want.items():
            assert rs[f"param:{name}"] == pytest.approx(norm, rel=1e-6, abs=1e-12), (step, name)
        total = np.sqrt(sum(v * v for v in want.values()))
        after = np.sqrt(sum(v * v for v in ref.after_clip[step].values()))
        assert after < 0.01 * total  # clipping really changed the gradients after the probe read them


def test_update_rows_belong_to_their_step(trained):
    out, _, _, seen = trained
    r = lnprobe.load_run(out / "lnprobe").records
    upd = r[r.stat.isin(S.UPDATE_STATS)]
    assert sorted(upd.step.unique()) == list(range(STEPS))
    # the closure order (optimizer.step(closure) runs backward inside the step) is attributed right:
    # every step's summary, sent at flush, already has its update ratio
    assert all("lnprobe/update_ratio_max" in seen[s] for s in range(STEPS))
