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
    # the Post-LN theory line: resid l's m2 is mean γ² + mean β² of the norm that made it (block l-1's last,
    # the embedding norm for l = 0). Measured / theory on these 4 × 64 tokens: 0.66, 0.95, 0.96, 0.92, 0.87, 0.65,
    # 0.21 at layers 0-6: the law's assumption (power not concentrated in a few channels) fails at the ends
    from lnprobe.analysis.scan_report import theory_m2

    theory = theory_m2(run, 0).set_index("layer").m2
    params = run.records[run.records.stat.isin(["gain_ms", "bias_ms"])].set_index("site").value
    for layer in range(7):
        norm = "embeddings.LayerNorm" if layer == 0 else f"encoder.layer.{layer - 1}.output.LayerNorm"
        assert theory.loc[layer] == pytest.approx(params[f"param:{norm}.weight"] + params[f"param:{norm}.bias"])
    m2 = run.records[(run.records.site == "resid") & (run.records.stat == "m2")].set_index("layer").value
    assert all(m2.loc[layer] == pytest.approx(theory.loc[layer], rel=0.12) for layer in (1, 2, 3)), m2 / theory
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


def tiny_vit_checkpoint(path):
    """A random ViT (32 × 32 images, 8 × 8 patches: [CLS] + 16 patches) and its image processor, saved."""
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = transformers.ViTModel(cfg, add_pooling_layer=False)
    model.save_pretrained(path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return model


def test_vit_checkpoint_scan_patches(tmp_path):
    """A ViT checkpoint scanned from its directory on generated images: positions are [CLS] and patches,
    resid equals the model's own hidden states, and a planted value names its patch in massive.csv."""
    from lnprobe.scan_inputs import synthetic_images

    model = tiny_vit_checkpoint(tmp_path / "vit")
    with torch.no_grad():  # patch 4 (position 5, after [CLS]), channel 7: a massive value from the embeddings
        model.embeddings.position_embeddings[0, 5, 7] = 5000.0
    model.save_pretrained(tmp_path / "vit")
    out = tmp_path / "scan"
    assert main(["scan", str(tmp_path / "vit"), "--sequences", "3", "--out", str(out)]) == 0
    run = lnprobe.load_run(out)
    assert run.meta["placement"] == "pre" and run.meta["config"]["scan"]["input"] == "image"
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert len(tokens) == 3 * 17 and (tokens.token_id == -1).all() and tokens["stack"].isna().all()
    assert list(tokens.token[:3]) == ["[CLS]", "patch 0", "patch 1"] and tokens.token.iloc[16] == "patch 15"
    m = pd.read_csv(out / "massive.csv")
    at0 = m[m.layer == 0]
    assert set(zip(at0.sequence, at0.position, at0.token, at0.channel)) == {(s, 5, "patch 4", 7) for s in range(3)}
    # the oracle: the same generated images through the saved processor and the model's own hidden states
    proc = transformers.ViTImageProcessor.from_pretrained(tmp_path / "vit")
    pixels = proc(images=synthetic_images(3), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        states = model.eval()(pixel_values=pixels, output_hidden_states=True).hidden_states
    r = run.records[(run.records.site == "resid") & (run.records.stat == "m2")].set_index("layer").value
    for layer in range(2):
        assert r.loc[layer] == pytest.approx(float(states[layer].double().square().mean()), rel=1e-5)


def test_vit_scan_of_image_files(tmp_path):
    from PIL import Image

    tiny_vit_checkpoint(tmp_path / "vit")
    files = []
    for k in range(2):
        f = tmp_path / f"img{k}.png"
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(f)
        files += ["--image", str(f)]
    out = tmp_path / "scan"
    assert main(["scan", str(tmp_path / "vit"), *files, "--out", str(out)]) == 0
    run = lnprobe.load_run(out)
    assert run.meta["config"]["scan"]["images"] == [str(tmp_path / "img0.png"), str(tmp_path / "img1.png")]
    assert len(pd.read_parquet(out / "tokens.parquet")) == 2 * 17


@pytest.mark.parametrize("argv,match", [
    (["--prompt", "a b c"], "text given, but ViTModel declares the input 'pixel_values'"),
    (["--audio", "none.wav"], "--audio none.wav: no such file"),
])
def test_scan_input_that_the_model_does_not_read(tmp_path, capsys, monkeypatch, argv, match):
    tiny_vit_checkpoint(tmp_path / "vit")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["scan", str(tmp_path / "vit"), *argv, "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    # the last line (transformers may print its loading progress before it)
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("lnprobe: error: ") and match in err, err


def tiny_whisper_checkpoint(path):
    """A random Whisper (16 mel bins, 100 feature frames -> 50 encoder positions) and its feature extractor
    (1 s chunks at 16 kHz), saved without a tokenizer."""
    cfg = transformers.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                     num_mel_bins=16, max_source_positions=50, max_target_positions=32,
                                     vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     decoder_start_token_id=3)
    torch.manual_seed(0)
    model = transformers.WhisperModel(cfg)
    model.save_pretrained(path)
    transformers.WhisperFeatureExtractor(feature_size=16, chunk_length=1).save_pretrained(path)
    return model


def test_whisper_checkpoint_scan_frames_and_both_stacks(tmp_path):
    """A Whisper checkpoint scanned on generated audio: encoder positions are frames, the decoder holds
    its start token, both stacks are recorded, and resid equals the model's own hidden states."""
    from lnprobe.scan_inputs import synthetic_waveforms

    model = tiny_whisper_checkpoint(tmp_path / "whisper")
    out = tmp_path / "scan"
    assert main(["scan", str(tmp_path / "whisper"), "--sequences", "3", "--out", str(out)]) == 0
    run = lnprobe.load_run(out)
    assert [s["name"] for s in run.meta["map"]["stacks"]] == ["encoder", "decoder"]
    tokens = pd.read_parquet(out / "tokens.parquet")
    enc, dec = tokens[tokens["stack"] == "encoder"], tokens[tokens["stack"] == "decoder"]
    assert len(enc) == 3 * 50 and list(enc.token[:2]) == ["frame 0", "frame 1"] and (enc.token_id == -1).all()
    assert len(dec) == 3 and set(dec.token_id) == {3} and set(dec.token) == {"3"}
    summary = pd.read_csv(out / "report" / "summary.csv")
    assert list(summary["stack"]) == ["encoder"] * 2 + ["decoder"] * 3  # resid 0..4: 2 encoder blocks, 2 decoder + out
    # the figures draw each stack as its own curve: one line per statistic and stack, none across the boundary
    from lnprobe.analysis.scan_report import figure_top_by_layer

    ax = figure_top_by_layer(run, 0).axes[0]
    curves = [ln for ln in ax.lines if len(ln.get_xdata()) > 1 or ln.get_xdata()[0] not in (1.5,)]
    assert sorted(tuple(ln.get_xdata()) for ln in curves if len(ln.get_xdata()) > 2) == [(2, 3, 4)] * 4
    extractor = transformers.WhisperFeatureExtractor.from_pretrained(tmp_path / "whisper")
    feats = extractor(synthetic_waveforms(3, 16000), sampling_rate=16000, return_tensors="pt")["input_features"]
    with torch.no_grad():
        o = model.eval()(input_features=feats, decoder_input_ids=torch.full((3, 1), 3), output_hidden_states=True)
    # the Pre-LN theory line, per stack: m2 of the stack's first resid plus the recorded branch m2 of each block
    from lnprobe.analysis.scan_report import theory_m2

    theory = theory_m2(run, 0).set_index("layer").m2
    rec = run.records[run.records.stat == "m2"].set_index(["site", "layer"]).value
    sites = ("attn_out", "xattn_out", "mlp_out")
    branch = {layer: sum(rec.get((site, layer), 0.0) for site in sites) for layer in range(4)}
    assert sorted(theory.index) == [0, 1, 2, 3, 4]
    assert theory.loc[1] == pytest.approx(rec[("resid", 0)] + branch[0])
    assert theory.loc[2] == pytest.approx(rec[("resid", 2)])  # the decoder starts from its own stream
    assert theory.loc[4] == pytest.approx(rec[("resid", 2)] + branch[2] + branch[3])
    states = list(o.encoder_hidden_states[:-1]) + list(o.decoder_hidden_states[:-1])
    r = run.records[(run.records.site == "resid") & (run.records.stat == "m2")].set_index("layer").value
    for layer, h in enumerate(states):
        assert r.loc[layer] == pytest.approx(float(h.double().square().mean()), rel=1e-5), layer


def test_whisper_scan_of_a_wav_file(tmp_path):
    from scipy.io import wavfile

    tiny_whisper_checkpoint(tmp_path / "whisper")
    t = np.arange(8000) / 8000  # 1 s at 8 kHz, resampled to the extractor's 16 kHz
    wavfile.write(tmp_path / "a.wav", 8000, (np.sin(2 * np.pi * 440 * t) * 20000).astype(np.int16))
    out = tmp_path / "scan"
    assert main(["scan", str(tmp_path / "whisper"), "--audio", str(tmp_path / "a.wav"), "--out", str(out)]) == 0
    run = lnprobe.load_run(out)
    assert run.meta["config"]["scan"]["audio"] == [str(tmp_path / "a.wav")]
    assert len(pd.read_parquet(out / "tokens.parquet")) == 50 + 1


def test_t5_checkpoint_scan_both_stacks_see_the_text(tmp_path):
    """An encoder–decoder given text: the decoder gets the same ids, tokens.parquet names both stacks' tokens."""
    words = [f"w{i}" for i in range(60)]
    tok = word_tokenizer(words)
    model = tiny_hf_model("t5", vocab_size=64, hidden_size=32, num_hidden_layers=2)
    model.save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    out = tmp_path / "scan"
    text = " ".join(words * 2)
    assert main(["scan", str(tmp_path / "t5"), "--prompt", text, "--sequences", "2", "--seq-len", "10",
                 "--out", str(out)]) == 0
    run = lnprobe.load_run(out)
    assert [(s["name"], s["first_layer"], s["n_layers"]) for s in run.meta["map"]["stacks"]] == [
        ("encoder", 0, 2), ("decoder", 2, 2)]
    assert sorted(run.records[run.records.site == "resid"].layer.unique()) == [0, 1, 2, 3, 4]
    tokens = pd.read_parquet(out / "tokens.parquet")
    enc, dec = (tokens[tokens["stack"] == s].reset_index(drop=True) for s in ("encoder", "decoder"))
    assert len(enc) == len(dec) == 2 * 10 and enc.token.equals(dec.token) and enc.token[0] == "<s>"
