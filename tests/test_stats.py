"""Every statistic against a numpy reference on random tensors."""
import numpy as np
import pytest
import torch

from lnprobe import stats as S

ALL = S.ACTIVATION_STATS
BRANCH = ("m2", "var", "rms", "absmax", "nonfinite")


@pytest.fixture(autouse=True, params=[True, False], ids=["cpu-path", "accelerator-path"])
def row_skipping(request, monkeypatch):
    """Run every test on both count paths: CPU row skipping and the fixed-shape accelerator path."""
    monkeypatch.setattr(S, "CPU_ROW_SKIPPING", request.param)
    return request.param


def numpy_reference(x: np.ndarray) -> dict:
    with np.errstate(invalid="ignore"):  # NaN/Inf inputs: the moments are NaN, the counts still defined
        return _numpy_reference(x)


def _numpy_reference(x: np.ndarray) -> dict:
    d = x.shape[-1]
    t = x.shape[-2]
    flat = x.reshape(-1, d).astype(np.float64)
    a = np.abs(flat)
    mu = flat.mean(-1, keepdims=True)
    c = flat - mu
    var_tok = (c ** 2).mean(-1)
    kurt_tok = (c ** 4).mean(-1) / var_tok ** 2
    order = np.argsort(-a.reshape(-1), kind="stable")[:3]
    med = np.median(a)
    return {
        "m2": (flat ** 2).mean(),
        "rms": np.sqrt((flat ** 2).mean()),
        "var": var_tok.mean(),
        "kurtosis": kurt_tok.mean(),
        "top": [(a.reshape(-1)[i], (i // d) % t, i % d) for i in order],
        "median_abs": med,
        "nonfinite": int((~np.isfinite(flat)).sum()),
        "over_fp16": int((a > 65504).sum()),
        "massive": int(((a > 100) & (a >= 1000 * med)).sum()),
    }


def run_stats(x: torch.Tensor, parts: int = 1):
    plan = S.StatPlan(ALL)
    chunks = x.chunk(parts, 0)
    partials = [S.reduce_activation(c, plan) for c in chunks]
    vals, loc = S.finalize_activation(partials, ALL)
    return dict(zip(ALL, vals.tolist())), dict(zip(ALL, loc[0].tolist())), dict(zip(ALL, loc[1].tolist()))


@pytest.mark.parametrize("shape", [(4, 16, 32), (2, 7, 10), (1, 3, 5)])
def test_activation_stats_match_numpy(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 0.5
    v, tok, ch = run_stats(x)
    ref = numpy_reference(x.numpy())
    for s in ("m2", "rms", "var", "kurtosis"):
        assert v[s] == pytest.approx(ref[s], rel=1e-5), s
    for i, s in enumerate(("top1", "top2", "top3")):
        val, t, c = ref["top"][i]
        assert v[s] == pytest.approx(val, rel=1e-6)
        assert (tok[s], ch[s]) == (t, c), s
    assert v["absmax"] == v["top1"] and tok["absmax"] == tok["top1"]
    # tensors this small are below MEDIAN_SAMPLE: the median is exact
    # (torch.median takes the lower of the two middle values for an even count)
    lower_median = np.sort(np.abs(x.numpy()).reshape(-1))[(x.numel() - 1) // 2]
    assert v["median_abs"] == pytest.approx(lower_median, rel=1e-6)
    assert v["nonfinite"] == 0 and v["over_fp16"] == 0 and v["massive"] == 0


def test_median_estimate_on_large_tensor_within_stated_error():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 128, 256, generator=g)
    v, _, _ = run_stats(x)
    exact = np.median(np.abs(x.numpy()))
    assert abs(v["median_abs"] / exact - 1) < 0.05  # docstring: ≈1.2 % standard error


def test_planted_massive_activation_found_at_token_and_channel():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 32, 64, generator=g) * 0.01  # median |x| ≈ 0.0067
    x[1, 5, 17] = -2500.0   # massive: > 100 and ≥ 1000 × median
    x[0, 9, 3] = 150.0      # massive too
    x[0, 2, 40] = 5.0       # large but not massive
    v, tok, ch = run_stats(x)
    assert v["massive"] == 2
    assert v["top1"] == 2500.0 and (tok["top1"], ch["top1"]) == (5, 17)
    assert v["top2"] == 150.0 and (tok["top2"], ch["top2"]) == (9, 3)
    assert v["top3"] == 5.0 and (tok["top3"], ch["top3"]) == (2, 40)


def test_nonfinite_and_fp16_counts():
    x = torch.randn(2, 4, 8)
    x[0, 0, 0] = float("nan")
    x[0, 1, 1] = float("inf")
    x[1, 2, 3] = 70000.0
    x[1, 3, 3] = -1e6
    v, _, _ = run_stats(x)
    assert v["nonfinite"] == 2
    assert v["over_fp16"] == 3  # inf, 7e4 and 1e6 (NaN compares false)


@pytest.mark.parametrize("parts", [2, 4])
def test_micro_batches_merge_to_the_whole_batch(parts):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, 32, generator=g)
    x[5, 3, 7] = 40.0
    whole, wt, wc = run_stats(x, 1)
    merged, mt, mc = run_stats(x, parts)
    for s in ("m2", "rms", "var", "kurtosis"):
        assert merged[s] == pytest.approx(whole[s], rel=1e-6)
    for s in ("top1", "top2", "top3", "nonfinite", "over_fp16"):
        assert merged[s] == whole[s]
        assert (mt[s], mc[s]) == (wt[s], wc[s]) or np.isnan(mt[s])


def test_bfloat16_input_reduced_in_float32():
    x = torch.randn(2, 8, 16).bfloat16()
    v, _, _ = run_stats(x)
    assert v["m2"] == pytest.approx(float(x.float().square().mean()), rel=1e-6)


def test_gradient_stats_and_loss_scale():
    g = torch.randn(3, 5, 7)
    parts = [S.reduce_gradient(c * 1024) for c in g.chunk(3, 0)]
    out = S.finalize_gradient(parts, torch.tensor(1024.0))
    assert out[0].item() == pytest.approx(float(g.square().mean().sqrt()), rel=1e-6)
    assert out[1].item() == pytest.approx(float(g.abs().max()), rel=1e-6)


def test_norms_and_gains():
    ts = [torch.randn(3, 4), torch.randn(5)]
    n = S.norms_of(ts)
    assert n.tolist() == pytest.approx([float(t.norm()) for t in ts], rel=1e-6)
    w = torch.randn(8) * 0.1
    b = torch.randn(8)
    gs = S.gain_stats(w, 1.0, b)
    assert gs[0].item() == pytest.approx(float(((1 + w) ** 2).mean()), rel=1e-6)
    assert gs[1].item() == pytest.approx(float((1 + w).abs().max()), rel=1e-6)
    assert gs[2].item() == pytest.approx(float((b ** 2).mean()), rel=1e-6)


def test_unknown_stat_rejected_with_the_allowed_list():
    with pytest.raises(ValueError, match="expected a subset"):
        S.check_stats(["m2", "bogus"])


def test_massive_threshold_boundaries_match_numpy():
    g = torch.Generator().manual_seed(4)
    sign = torch.randint(0, 2, (2, 8, 16), generator=g) * 2 - 1
    x = sign * 0.5  # median |x| = 0.5, so 1000 × median = 500
    below = float(np.nextafter(np.float32(500), np.float32(0)))
    x[0, 1, 2] = 500.0       # massive: |x| ≥ 1000 × median (equality counts)
    x[0, 3, 4] = -below      # the float32 just below: not massive
    x[1, 5, 6] = 120.0       # > 100 but < 1000 × median: not massive
    x[1, 7, 8] = -7e4        # massive and over fp16
    x[1, 0, 0] = 65504.0     # fp16 max: not over
    x[1, 0, 1] = float(np.nextafter(np.float32(65504), np.float32(1e9)))  # just over
    v, _, _ = run_stats(x)
    ref = numpy_reference(x.numpy())
    assert ref["median_abs"] == 0.5
    assert v["massive"] == ref["massive"] == 4  # 500, 7e4, 65504, 65504⁺
    assert v["over_fp16"] == ref["over_fp16"] == 2


def test_massive_with_a_small_median_uses_the_absolute_floor():
    x = torch.full((1, 4, 8), 0.01)  # 1000 × median = 10 < 100: the 100 floor decides
    x[0, 0, 0] = 100.0  # not > 100
    x[0, 1, 1] = 100.5
    v, _, _ = run_stats(x)
    assert v["massive"] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_over_fp16_counted_exactly_in_half_precision(dtype):
    x = torch.zeros(2, 4, 8, dtype=dtype)
    x[0, 0, 0] = float(torch.finfo(dtype).max)  # fp16: 65504 (not over); bf16: 3.4e38 (over)
    x[0, 1, 0] = -float("inf")
    x[1, 2, 3] = float("nan")
    x[1, 3, 3] = 60000.0 if dtype == torch.float16 else 65536.0  # bf16 has no 65504: 65536 is over
    v, _, _ = run_stats(x)
    ref = numpy_reference(x.float().numpy())
    assert v["over_fp16"] == ref["over_fp16"] == (1 if dtype == torch.float16 else 3)
    assert v["nonfinite"] == 2


def test_fewer_than_three_elements_pad_with_nan():
    x = torch.tensor([[3.0, -5.0]])  # (T=1, D=2)
    v, tok, ch = run_stats(x)
    assert v["top1"] == 5.0 and (tok["top1"], ch["top1"]) == (0, 1)
    assert v["top2"] == 3.0 and (tok["top2"], ch["top2"]) == (0, 0)
    assert np.isnan(v["top3"]) and np.isnan(tok["top3"]) and np.isnan(ch["top3"])


def _groups(seed: int):
    """Sites with different plans, micro-batch counts and sizes (one tiny)."""
    g = torch.Generator().manual_seed(seed)
    plans = [S.StatPlan(ALL), S.StatPlan(S.DEFAULT_ACTIVATION_STATS), S.StatPlan(BRANCH), S.StatPlan(ALL)]
    shapes = [(2, 8, 16), (2, 8, 32), (3, 5, 7), (1, 1, 2)]
    n_parts = [1, 3, 2, 1]
    groups = []
    for plan, shape, n in zip(plans, shapes, n_parts):
        parts = []
        for _ in range(n):
            x = torch.randn(shape, generator=g) * 2
            x.view(-1)[0] = 300.0  # something to count as massive
            parts.append(S.reduce_activation(x, plan))
        groups.append((parts, plan.stats))
    return groups


def test_batched_finalize_equals_one_site_at_a_time():
    groups = _groups(5)
    values, loc = S.finalize_activations([p for p, _ in groups])
    assert values.shape == (4, len(ALL)) and loc.shape == (2, 4, len(ALL))
    for i, (parts, stats) in enumerate(groups):
        v, l = S.finalize_activation(parts, stats)
        cols = [ALL.index(s) for s in stats]
        np.testing.assert_allclose(values[i, cols].numpy(), v.numpy(), rtol=1e-12, equal_nan=True)
        np.testing.assert_array_equal(loc[:, i, cols].numpy(), l.numpy())


def test_batched_gradients_equal_numpy():
    g = torch.Generator().manual_seed(6)
    tensors = [[torch.randn(3, 4, generator=g) for _ in range(k)] for k in (1, 3, 2)]
    groups = [[S.reduce_gradient(t * 8) for t in ts] for ts in tensors]
    out = S.finalize_gradients(groups, torch.tensor(8.0))
    for i, ts in enumerate(tensors):
        a = np.concatenate([t.numpy().ravel() for t in ts]).astype(np.float64)
        assert out[i, 0].item() == pytest.approx(np.sqrt((a ** 2).mean()), rel=1e-6)
        assert out[i, 1].item() == pytest.approx(np.abs(a).max(), rel=1e-6)
        assert torch.equal(out[i], S.finalize_gradient(groups[i], torch.tensor(8.0)))


def test_gain_stats_many_equals_gain_stats():
    g = torch.Generator().manual_seed(7)
    w = [torch.randn(8, generator=g) * 0.1, None, torch.randn(4, generator=g), torch.randn(6, generator=g)]
    b = [torch.randn(8, generator=g), torch.randn(5, generator=g), None, None]
    off = [1.0, 0.0, 0.0, 1.0]
    many = S.gain_stats_many(w, off, b)
    for i in range(4):
        np.testing.assert_allclose(many[i].numpy(), S.gain_stats(w[i], off[i], b[i]).numpy(), rtol=1e-6, equal_nan=True)


def test_partials_hold_no_view_of_the_activation():
    """A partial lives until probe.step(): it must not keep the activation or a temporary alive."""
    x = torch.randn(16, 128, 1024)
    p = S.reduce_activation(x, S.StatPlan(ALL))
    held = [t for t in (p.sums, p.counts, p.cand, p.cand_tok, p.sample) if t is not None]
    assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for t in held)
    # three candidate rows, the median sample and a few scalars: nothing of the activation's size
    assert sum(t.untyped_storage().nbytes() for t in held) < 4 * (3 * 1024 + S.MEDIAN_SAMPLE) + 1024
    assert p.sample.numel() <= S.MEDIAN_SAMPLE


def test_counts_in_a_token_that_also_holds_a_nan():
    """A NaN hides its token's max |x|: the counts must still look inside that token."""
    x = torch.randn(2, 4, 8)
    x[1, 2, 0] = float("nan")
    x[1, 2, 5] = -7e4
    x[1, 2, 6] = float("inf")
    v, _, _ = run_stats(x)
    assert v["nonfinite"] == 2 and v["over_fp16"] == 2


def test_registry_is_the_one_source_of_the_statistic_lists():
    from lnprobe import distributed as D

    assert S.ACTIVATION_STATS == ("m2", "var", "rms", "absmax", "top1", "top2", "top3", "median_abs",
                                  "kurtosis", "nonfinite", "over_fp16", "massive")
    assert S.LOCATED_STATS == {"absmax", "top1", "top2", "top3", "logit_absmax", "qk_absmax"}
    assert S.PER_TOKEN_STATS == {"var", "kurtosis", "lse_mean", "entropy"}
    assert S.default_stats("attn_out") == BRANCH
    assert S.DEFAULT_ACTIVATION_STATS == tuple(s for s in ALL if s != "kurtosis")
    assert S.default_sites("gradient") == ("resid",)
    for kind in ("activation", "gradient", "parameter", "norm", "logits", "attn_logits"):
        cols = [s.column for s in S.REGISTRY if s.kind == kind]
        assert sorted(cols) == list(range(len(cols))), kind  # positional kernels: columns 0..n-1
    for row in S.REGISTRY:
        assert row.merge in D.KIND_NAMES and row.weight in ("elements", "tokens", "numel", "one")
        assert (row.merge == "loc") == (row.slot is not None), row.name
    assert D.KIND_NAMES[D.MEAN] == "mean" and D.KIND_NAMES[D.DERIVED] == "derived"
    # every activation statistic asks for some partial work, so a plan of it alone computes it
    assert all(S.stat("activation", s).needs for s in ALL)
