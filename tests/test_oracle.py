"""Oracle: recorded `resid` statistics equal those computed from the model's own output_hidden_states."""
import numpy as np
import pytest
import torch

import lnprobe

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=96, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96)


def tiny(kind):
    t = transformers
    if kind == "gpt2":
        cfg = t.GPT2Config(vocab_size=96, n_embd=48, n_layer=3, n_head=4, n_positions=64,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return t.GPT2LMHeadModel(cfg), "pre"
    if kind == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**COMMON, num_key_value_heads=2)), "pre"
    if kind == "gemma2":
        cfg = t.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=12, sliding_window=16)
        return t.Gemma2ForCausalLM(cfg), "peri"
    if kind == "olmo2":
        return t.Olmo2ForCausalLM(t.Olmo2Config(**COMMON, num_key_value_heads=2)), "output"
    if kind == "bert":
        cfg = t.BertConfig(**COMMON, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return t.BertModel(cfg), "post"
    raise KeyError(kind)


def reference_stats(h: np.ndarray) -> dict:
    d = h.shape[-1]
    flat = h.reshape(-1, d).astype(np.float64)
    a = np.abs(flat).reshape(-1)
    i = int(np.argmax(a))
    return {"m2": (flat ** 2).mean(), "var": flat.var(-1).mean(), "absmax": a[i],
            "token": (i // d) % h.shape[-2], "channel": i % d}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma2", "olmo2", "bert"])
def test_resid_records_equal_output_hidden_states(tmp_path, kind):
    torch.manual_seed(0)
    model, placement = tiny(kind)
    model.eval()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with lnprobe.attach(model, tmp_path / kind, record="all") as probe:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        probe.step()
    run = lnprobe.load_run(tmp_path / kind)
    assert run.meta["placement"] == placement
    L = run.meta["n_layers"]
    assert L == 3
    r = run.records[run.records.site == "resid"]
    for layer in range(L):
        ref = reference_stats(out.hidden_states[layer].numpy())
        rows = r[r.layer == layer].set_index("stat")
        for stat in ("m2", "var", "absmax"):
            assert rows.loc[stat, "value"] == pytest.approx(ref[stat], rel=1e-5), (kind, layer, stat)
        assert (rows.loc["absmax", "token"], rows.loc["absmax", "channel"]) == (ref["token"], ref["channel"])
