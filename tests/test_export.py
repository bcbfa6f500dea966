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
    run = lnprobe.load_run(run_dir)
    r = run.records
    acc = read_events(tmp_path / "tb")
    root_tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm"} <= root_tags
    layers = sorted(p.name for p in (tmp_path / "tb").iterdir() if p.is_dir())
    assert layers == [f"layer_{l:02d}" for l in range(run.n_layers + 1)]
    per_layer = {name: read_events(tmp_path / "tb" / name) for name in layers}
    tags = root_tags.union(*(set(a.Tags()["scalars"]) for a in per_layer.values()))
    # one tag per (site, stat) and per (role, stat), the layer is the TensorBoard run: far fewer tags
    # than one per site x layer x stat and per parameter
    n_old = len(r.groupby(["site", "layer", "stat"]))
    assert len(tags) < n_old / 3, (len(tags), n_old)
    assert {"resid/m2", "attn_out/absmax", "param/attn.qkv/grad_norm", "param/mlp.out/param_norm"} <= tags
    assert not any("layer_" in t or "transformer.h." in t for t in tags)
    for tag, site, layer, stat in [("resid/m2", "resid", 2, "m2"), ("train/loss", "train", -1, "loss"),
                                   ("attn_out/absmax", "attn_out", 1, "absmax")]:
        ev = (acc if layer < 0 else per_layer[f"layer_{layer:02d}"]).Scalars(tag)
        ref = r[(r.site == site) & (r.layer == layer) & (r.stat == stat)].sort_values("step")
        # recorded steps 0, 2, 4; train rows at every step (per-step train scalars)
        assert [e.step for e in ev] == ref.step.tolist() == ([0, 1, 2, 3, 4] if site == "train" else [0, 2, 4])
        np.testing.assert_allclose([e.value for e in ev], ref.value, rtol=1e-6)  # events hold float32
    # parameters by role x layer: the role_table value (root of the sum of squares of the role's norms)
    ev = per_layer["layer_01"].Scalars("param/attn.qkv/grad_norm")
    np.testing.assert_allclose([e.value for e in ev], run.role_table("grad_norm", "attn.qkv")[1].to_numpy(),
                               rtol=1e-6)
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
