"""Standard models without overrides: the example input comes from the model's declared input
(`main_input_name`, `config.is_encoder_decoder`), both stacks of an encoder–decoder are recorded in one
run, and the recorded `resid` statistics equal those computed from the model's own hidden states (the
oracle of tests/test_oracle.py)."""
import pytest
import torch
from helpers import reference_stats

import lnprobe
from lnprobe.discovery import discover

transformers = pytest.importorskip("transformers")


def vit():
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=4)
    model = transformers.ViTModel(cfg)
    x = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}
    return model, x, _states("hidden_states"), "layers", "pre", None


def _states(*names):
    """The hidden states entering each block, in global layer order: those of each stack's output field
    `names` without its last entry (the stack's output, for some after its final norm)."""
    return lambda out: [h for n in names for h in getattr(out, n)[:-1]]


def enc_dec(placement):
    """The stacks an encoder–decoder of 3 encoder and 2 decoder blocks records, as meta.json's map.stacks."""
    return [{"name": "encoder", "first_layer": 0, "n_layers": 3, "placement": placement},
            {"name": "decoder", "first_layer": 3, "n_layers": 2, "placement": placement}]


def whisper():
    cfg = transformers.WhisperConfig(d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                     num_mel_bins=16, max_source_positions=16, max_target_positions=32,
                                     vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     decoder_start_token_id=1)
    model = transformers.WhisperModel(cfg)
    gen = torch.Generator().manual_seed(1)
    x = {"input_features": torch.randn(2, 16, 32, generator=gen),
         "decoder_input_ids": torch.randint(0, 100, (2, 5), generator=gen)}
    return model, x, _states("encoder_hidden_states", "decoder_hidden_states"), "encoder.layers, decoder.layers", \
        "pre", enc_dec("pre")


def t5():
    cfg = transformers.T5Config(d_model=32, d_ff=64, num_layers=3, num_decoder_layers=2, num_heads=4, d_kv=8,
                                vocab_size=100)
    model = transformers.T5Model(cfg)
    gen = torch.Generator().manual_seed(1)
    x = {"input_ids": torch.randint(0, 100, (2, 7), generator=gen),
         "decoder_input_ids": torch.randint(0, 100, (2, 5), generator=gen)}
    return model, x, _states("encoder_hidden_states", "decoder_hidden_states"), "encoder.block, decoder.block", \
        "pre", enc_dec("pre")


def bart():
    # Post-LN in both stacks: a decoder block is norm3(norm2(norm1(X + T1) + T2) + T3)
    cfg = transformers.BartConfig(vocab_size=100, d_model=32, encoder_layers=3, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                                  eos_token_id=2, decoder_start_token_id=2)
    model = transformers.BartModel(cfg)
    gen = torch.Generator().manual_seed(1)
    x = {"input_ids": torch.randint(3, 100, (2, 7), generator=gen),
         "decoder_input_ids": torch.randint(3, 100, (2, 5), generator=gen)}
    return model, x, _states("encoder_hidden_states", "decoder_hidden_states"), "encoder.layers, decoder.layers", \
        "post", enc_dec("post")


def modernbert():
    # layer 0 has nn.Identity as attention norm (its input comes out of the embedding norm)
    cfg = transformers.ModernBertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        cls_token_id=1, sep_token_id=2, attn_implementation="eager")
    model = transformers.ModernBertModel(cfg)
    x = {"input_ids": torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))}
    return model, x, _states("hidden_states"), "layers", "pre", None


def bloom():
    # the residual is added inside the attention and MLP modules (dropout_add)
    cfg = transformers.BloomConfig(vocab_size=100, hidden_size=32, n_layer=3, n_head=4)
    model = transformers.BloomModel(cfg)
    x = {"input_ids": torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))}
    return model, x, _states("hidden_states"), "h", "pre", None


ARCHS = {"vit": vit, "whisper": whisper, "t5": t5, "bart": bart, "modernbert": modernbert, "bloom": bloom}


@pytest.mark.parametrize("kind", list(ARCHS))
def test_discovered_without_overrides(kind):
    torch.manual_seed(0)
    model, _, _, blocks, placement, stacks = ARCHS[kind]()
    m = discover(model)
    n_layers = 5 if stacks else 3
    assert (m.blocks_path, m.placement, m.n_layers) == (blocks, placement, n_layers)
    assert all("attn_out" in b.points and "mlp_out" in b.points for b in m.blocks)
    assert m.to_meta().get("map", {}).get("stacks") == stacks
    # decoder blocks have a cross-attention sublayer, encoder blocks do not
    cross = [b.index for b in m.blocks if {"xattn_out", "xattn_raw", "resid_xattn"} <= set(b.points)]
    assert cross == ([3, 4] if stacks else [])
    if stacks:
        side = "pre" if placement == "pre" else "post"
        for b in m.blocks:
            kinds = ("attn", "xattn", "mlp") if b.index >= 3 else ("attn", "mlp")
            assert sorted(n.role for n in b.norms) == sorted(f"norm.{side}_{k}" for k in kinds), b.index
        out_proj = {n.rsplit(".", 1)[0] for n, v in m.param_roles.items() if v["role"] == "xattn.out"}
        assert out_proj == {b.xattn_out_proj for b in m.blocks[3:]} and len(out_proj) == 2


@pytest.mark.parametrize("kind", list(ARCHS))
def test_resid_records_equal_hidden_states(tmp_path, kind):
    torch.manual_seed(0)
    model, x, hidden, _, placement, stacks = ARCHS[kind]()
    model.eval()
    with lnprobe.attach(model, tmp_path / kind, record="all") as probe:
        with torch.no_grad():
            out = model(**x, output_hidden_states=True)
        probe.step()
    run = lnprobe.load_run(tmp_path / kind)
    assert run.meta["placement"] == placement
    assert run.meta.get("map", {}).get("stacks") == stacks
    r = run.records[run.records.site == "resid"]
    states = hidden(out)
    assert len(states) == (5 if stacks else 3)
    for layer, state in enumerate(states):
        ref = reference_stats(state.numpy())
        rows = r[r.layer == layer].set_index("stat")
        for stat in ("m2", "var", "absmax"):
            assert rows.loc[stat, "value"] == pytest.approx(ref[stat], rel=1e-5), (kind, layer, stat)
        assert (rows.loc["absmax", "token"], rows.loc["absmax", "channel"]) == (ref["token"], ref["channel"])


def test_bloom_attention_adding_the_residual_is_no_note():
    """BLOOM's attention module returns X + T1 (T1 is its dense's output): it still counts as the
    attention module of the first sublayer, so there is no "no attention module" note."""
    torch.manual_seed(0)
    model = bloom()[0]
    m = lnprobe.inspect(model)
    assert m.placement == "pre"
    assert not [n for n in m.notes if "no attention module" in n], m.notes
    assert m.blocks[0].attn_out_proj == "h.0.self_attention.dense"


def test_opt_flattened_mlp_records_sequence_positions(tmp_path):
    """OPT runs its MLP on (B·T, D): the located statistics there still name positions 0..T-1."""
    cfg = transformers.OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2,
                                 eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.OPTModel(cfg).eval()
    ids = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    seen = {}
    h = model.decoder.layers[0].fc2.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    with lnprobe.attach(model, tmp_path / "opt", record="all", sites="all") as probe:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        probe.step()
    h.remove()
    r = lnprobe.load_run(tmp_path / "opt").records
    located = r[r.stat.isin(["absmax", "top1", "top2", "top3"])]
    assert located.token.max() < 10
    for site, t in (("mlp_out", seen["y"]), ("mlp_act", seen["x"])):
        ref = reference_stats(t.reshape(3, 10, -1).numpy())
        row = r[(r.site == site) & (r.layer == 0) & (r.stat == "absmax")].iloc[0]
        assert (row.value, row.token, row.channel) == (pytest.approx(ref["absmax"], rel=1e-6), ref["token"],
                                                       ref["channel"])
    ref = reference_stats(out.hidden_states[1].numpy())
    row = r[(r.site == "resid") & (r.layer == 1) & (r.stat == "absmax")].iloc[0]
    assert (row.token, row.channel) == (ref["token"], ref["channel"])


MOE = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
       "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         shared_expert_intermediate_size=48)}


@pytest.mark.parametrize("kind", list(MOE))
def test_mixture_of_experts_roles(tmp_path, kind):
    cfg = transformers.AutoConfig.for_model(kind, vocab_size=100, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                            max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                            eos_token_id=2, attn_implementation="eager", **MOE[kind])
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(cfg).eval()
    m = discover(model)
    assert m.placement == "pre"
    roles = {n: v["role"] for n, v in m.param_roles.items() if n.startswith("layers.0.mlp")}
    assert roles["layers.0.mlp.gate.weight"] == "mlp.router"
    assert {r for n, r in roles.items() if ".experts." in n} == {"mlp.experts"}
    shared = {r for n, r in roles.items() if "shared" in n}
    assert shared == ({"mlp.shared"} if kind == "qwen2_moe" else set())
    assert "mlp_act" not in m.blocks[0].points and "mlp_out" in m.blocks[0].points
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with lnprobe.attach(model, tmp_path / kind, record="all") as probe:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        probe.step()
    r = lnprobe.load_run(tmp_path / kind).records
    for layer in range(2):
        ref = reference_stats(out.hidden_states[layer].numpy())
        row = r[(r.site == "resid") & (r.layer == layer) & (r.stat == "m2")].iloc[0]
        assert row.value == pytest.approx(ref["m2"], rel=1e-5)


@pytest.mark.parametrize("pre,sandwich,placement", [(True, False, "pre"), (True, True, "peri"), (False, False, "post")])
def test_x_transformers_sublayer_pairs_are_blocks(tmp_path, pre, sandwich, placement):
    """x-transformers loops over (norms, block, residual) sublayer entries: attention + feed-forward
    pairs are mapped as virtual blocks, and resid equals the hidden states x-transformers returns."""
    xt = pytest.importorskip("x_transformers")
    torch.manual_seed(0)
    model = xt.TransformerWrapper(num_tokens=100, max_seq_len=32, attn_layers=xt.Decoder(
        dim=64, depth=3, heads=4, pre_norm=pre, sandwich_norm=sandwich)).eval()
    m = discover(model)
    assert (m.blocks_path, m.placement, m.n_layers) == ("attn_layers.layers", placement, 3)
    assert all("attn_out" in b.points and "mlp_out" in b.points for b in m.blocks)
    # its LayerNorm is a gamma around a parameter-free nn.LayerNorm: the wrapper is the norm
    assert not [n for n, v in m.param_roles.items() if v["role"] == "other"]
    assert {n.kind for n in m.norms} == {"layernorm"} and all(n.weight for n in m.norms)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with lnprobe.attach(model, tmp_path / "xt", record="all") as probe:
        with torch.no_grad():
            _, inter = model(ids, return_intermediates=True)
        probe.step()
    r = lnprobe.load_run(tmp_path / "xt").records
    r = r[r.site == "resid"]
    assert len(inter.hiddens) == 3  # the stream entering each attention sublayer
    for layer in range(3):
        ref = reference_stats(inter.hiddens[layer].numpy())
        rows = r[r.layer == layer].set_index("stat")
        for stat in ("m2", "var", "absmax"):
            assert rows.loc[stat, "value"] == pytest.approx(ref[stat], rel=1e-5), (layer, stat)
        assert (rows.loc["absmax", "token"], rows.loc["absmax", "channel"]) == (ref["token"], ref["channel"])


@pytest.mark.parametrize("norm_first,placement", [(True, "pre"), (False, "post")])
def test_torch_transformer_stacks_from_the_dataflow(norm_first, placement):
    """nn.Transformer (no config, no names to go by): its decoder layers read the encoder's output (after
    the encoder's final norm) as memory, so both lists are stacks, decoder blocks with three sublayers."""
    torch.manual_seed(0)
    model = torch.nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=64,
                                 dropout=0.0, batch_first=True, norm_first=norm_first)
    gen = torch.Generator().manual_seed(1)
    m = discover(model, (torch.randn(2, 7, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)))
    assert (m.blocks_path, m.n_layers, m.placement) == ("encoder.layers, decoder.layers", 5, placement)
    assert [(s.name, s.first_layer, s.n_layers) for s in m.stacks] == [("encoder", 0, 2), ("decoder", 2, 3)]
    assert all("xattn_out" in b.points for b in m.blocks[2:]) and not any("xattn_out" in b.points for b in m.blocks[:2])
    assert {m.param_roles[f"decoder.layers.{i}.multihead_attn.out_proj.weight"]["role"] for i in range(3)} == {
        "xattn.out"}


def test_two_lists_on_one_stream_are_not_an_encoder_decoder():
    """Two lists of blocks run one after the other on the same stream: the second's input is the first's
    output, which is no cross-attention memory, so only one list is mapped (the larger) and no stacks."""
    class Sequential2(torch.nn.Module):
        def __init__(self):
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
            self.a = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.b = torch.nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    m = discover(Sequential2(), torch.randn(2, 7, 32))
    assert (m.blocks_path, m.n_layers, m.stacks) == ("b.layers", 3, [])
    assert "map" not in m.to_meta()
