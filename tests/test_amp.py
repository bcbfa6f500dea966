"""Mixed precision on CPU: bf16 autocast, fp16 autocast with torch.amp.GradScaler("cpu").

Statistics are computed in float32 whatever the activation dtype; hidden-state gradients are divided
by the loss scale of their backward; a step that the scaler skips (inf/NaN gradients) is flagged as
train/skipped = 1, the same decision as the scaler's own.
"""
import numpy as np
import pytest
import torch
from nanogpt import NanoGPT

import lnprobe

VOCAB, T = 64, 16


def make():
    torch.manual_seed(0)
    return NanoGPT(vocab=VOCAB, block_size=T)


def batch(step, b=4):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, VOCAB, (b, T), generator=g)
    return x, torch.roll(x, -1, 1)


def pivot(records, site, stat):
    r = records[(records.site == site) & (records.stat == stat)]
    return r.set_index(["step", "layer"])["value"].sort_index()


def test_bf16_autocast_statistics_are_float32_reductions_of_the_bf16_stream(tmp_path):
    model = make()
    x, y = batch(0)
    seen = []
    with lnprobe.attach(model, tmp_path / "bf16") as probe:
        hooks = [b.attn.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
                 for b in model.transformer.h]  # after attach: its discovery runs a forward too
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        probe.step(loss=loss)
    for h in hooks:
        h.remove()
    assert seen[0].dtype == torch.bfloat16  # the attention branch really is bf16
    r = lnprobe.load_run(tmp_path / "bf16").records
    m2 = pivot(r, "attn_out", "m2")
    absmax = pivot(r, "attn_out", "absmax")
    for layer, h in enumerate(seen):
        # float64 reference of the bf16 values; a bf16 accumulation would be off by ~1e-2.
        assert m2[(0, layer)] == pytest.approx(float(h.double().square().mean()), rel=1e-5)
        assert absmax[(0, layer)] == float(h.double().abs().max())
    assert np.isfinite(pivot(r, "resid", "grad_rms").values).all()


def amp_run(out, fp16, inject_inf_at=(), steps=4):
    """Train ``steps`` steps; with fp16: autocast + GradScaler, optionally an inf gradient injected."""
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=fp16)
    skipped = []
    with lnprobe.attach(model, out, scaler=scaler) as probe:
        for step in range(steps):
            x, y = batch(step)
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                _, loss = model(x, y)
            scaler.scale(loss).backward()
            if step in inject_inf_at:
                model.lm_head.weight.grad[0, 0] = float("inf")
            scaler.unscale_(opt)
            probe.step(loss=loss)
            found = sum(v.item() for v in scaler._found_inf_per_device(opt).values()) if fp16 else 0.0
            scale_before = scaler.get_scale() if fp16 else 1.0
            scaler.step(opt)
            scaler.update()
            # The scaler's own decision: it skipped opt.step() and lowered the scale.
            skipped.append(float(found > 0))
            if fp16:
                assert (scaler.get_scale() < scale_before) == (found > 0)
            opt.zero_grad()
    return lnprobe.load_run(out).records, skipped


def test_fp16_hidden_state_gradients_are_unscaled(tmp_path):
    r32, _ = amp_run(tmp_path / "fp32", fp16=False, steps=1)
    r16, _ = amp_run(tmp_path / "fp16", fp16=True, steps=1)
    g32 = pivot(r32, "resid", "grad_rms")
    g16 = pivot(r16, "resid", "grad_rms")
    # fp16 forward/backward: agreement to fp16 precision, 4096× away from a scaled value.
    np.testing.assert_allclose(g16.values, g32.values, rtol=2e-2)
    p32 = r32[(r32.stat == "grad_norm") & r32.site.str.startswith("param:")].set_index("site")["value"]
    p16 = r16[(r16.stat == "grad_norm") & r16.site.str.startswith("param:")].set_index("site")["value"]
    np.testing.assert_allclose(p16[p32.index].values, p32.values, rtol=3e-2, atol=1e-6)


def test_skipped_steps_match_the_scalers_decision(tmp_path):
    records, skipped = amp_run(tmp_path / "inf", fp16=True, inject_inf_at=(1, 2))
    assert skipped == [0.0, 1.0, 1.0, 0.0]
    flag = records[(records.site == "train") & (records.stat == "skipped")].set_index("step")["value"]
    assert flag.sort_index().tolist() == skipped
    # Activation statistics of a skipped step are still recorded (its forward happened).
    assert (records[(records.step == 1) & (records.site == "resid")].value.notna()).all()
