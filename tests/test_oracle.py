"""Oracle: recorded `resid` statistics equal those computed from the model's own output_hidden_states
(for T5, an encoder–decoder, both stacks: the encoder's block inputs, then the decoder's)."""
import pytest
import torch
from helpers import reference_stats

import lnprobe
from lnprobe.testing import ENCODER_DECODERS, HF_PLACEMENTS, tiny_hf_model

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=96, hidden_size=48, num_hidden_layers=3)


def tiny(kind):
    return tiny_hf_model(kind, **SIZES), HF_PLACEMENTS[kind]


@pytest.mark.parametrize("kind", list(HF_PLACEMENTS))
def test_resid_records_equal_output_hidden_states(tmp_path, kind):
    torch.manual_seed(0)
    model, placement = tiny(kind)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 10), generator=gen)
    kwargs = {"decoder_input_ids": torch.randint(0, 96, (2, 6), generator=gen)} if kind in ENCODER_DECODERS else {}
    with lnprobe.attach(model, tmp_path / kind, record="all") as probe:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, **kwargs)
        probe.step()
    run = lnprobe.load_run(tmp_path / kind)
    assert run.meta["placement"] == placement
    L = run.meta["n_layers"]
    if kind in ENCODER_DECODERS:  # each stack's states end with its output (after its final norm): left out
        states = out.encoder_hidden_states[:-1] + out.decoder_hidden_states[:-1]
        assert [(s["name"], s["first_layer"], s["n_layers"]) for s in run.meta["map"]["stacks"]] == [
            ("encoder", 0, 3), ("decoder", 3, 3)]
    else:
        states = out.hidden_states[:L]
    assert L == len(states) == (6 if kind in ENCODER_DECODERS else 3)
    r = run.records[run.records.site == "resid"]
    for layer in range(L):
        ref = reference_stats(states[layer].numpy())
        rows = r[r.layer == layer].set_index("stat")
        for stat in ("m2", "var", "absmax"):
            assert rows.loc[stat, "value"] == pytest.approx(ref[stat], rel=1e-5), (kind, layer, stat)
        assert (rows.loc["absmax", "token"], rows.loc["absmax", "channel"]) == (ref["token"], ref["channel"])
