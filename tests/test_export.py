"""TensorBoard export: scalars and profile histograms read back with TensorBoard's own reader."""
import sys

import numpy as np
import pytest
import torch
from nanogpt import NanoGPT

import lnprobe
from lnprobe import export


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    torch.manual_seed(0)
    model = NanoGPT(vocab=64, block_size=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lnprobe.attach(model, out, every=2) as probe:
        for step in range(5):
            x = torch.randint(0, 64, (4, 16))
            loss = model(x, torch.roll(x, -1, 1))[1]
            loss.backward()
            probe.step(loss=loss, lr=0.1)
            opt.step()
            opt.zero_grad()
    return out


def read_events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scalars_and_histograms_round_trip(run_dir, tmp_path):
    pytest.importorskip("tensorboard")
    assert export.main(["--tensorboard", str(run_dir), "--out", str(tmp_path / "tb")]) == 0
    acc = read_events(tmp_path / "tb")
    tags = set(acc.Tags()["scalars"])
    r = lnprobe.load_run(run_dir).records
    assert len(tags) == len(r.groupby(["site", "layer", "stat"]))
    assert {"resid/m2/layer_00", "resid/m2/layer_03", "train/loss", "train/grad_norm",
            "param/grad_norm/transformer.h.0.attn.c_attn.weight"} <= tags
    for tag, site, layer, stat in [("resid/m2/layer_02", "resid", 2, "m2"), ("train/loss", "train", -1, "loss"),
                                   ("attn_out/absmax/layer_01", "attn_out", 1, "absmax")]:
        ev = acc.Scalars(tag)
        ref = r[(r.site == site) & (r.layer == layer) & (r.stat == stat)].sort_values("step")
        # recorded steps 0, 2, 4; train rows at every step (per-step train scalars)
        assert [e.step for e in ev] == ref.step.tolist() == ([0, 1, 2, 3, 4] if site == "train" else [0, 2, 4])
        np.testing.assert_allclose([e.value for e in ev], ref.value, rtol=1e-6)  # events hold float32
    # The resid m2 profile: bucket l holds the value at layer l.
    hist = acc.Histograms("profile/resid/m2")
    assert [h.step for h in hist] == [0, 2, 4]
    m2 = r[(r.site == "resid") & (r.stat == "m2") & (r.step == 2)].sort_values("layer")
    h = hist[1].histogram_value
    np.testing.assert_allclose(h.bucket, m2.value, rtol=1e-6)
    np.testing.assert_allclose(h.bucket_limit, m2.layer + 0.5)
    assert len(acc.Histograms("param/log10_grad_norm")) == 3


def test_missing_tensorboard_names_the_extra(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    with pytest.raises(ImportError, match=r"lnprobe\[tensorboard\]"):
        export.export_tensorboard(run_dir, tmp_path / "tb")
    assert export.main(["--tensorboard", str(run_dir), "--out", str(tmp_path / "tb")]) == 2
    assert "pip install" in capsys.readouterr().out
