"""Every statistic against a numpy reference on random tensors."""
import numpy as np
import pytest
import torch

from lnprobe import stats as S

ALL = S.ACTIVATION_STATS


def numpy_reference(x: np.ndarray) -> dict:
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
