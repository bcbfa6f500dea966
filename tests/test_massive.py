"""analysis.massive on a run directory with planted massive activations, and the spike score on
planted spikes vs noise."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import lnprobe.analysis as analysis
from lnprobe.analysis.massive import (
    FP16_MAX,
    absmax_over_steps,
    fp16_margin,
    massive_candidates,
    spike_score,
    track_massive,
)

STEPS, LAYERS = range(10), range(7)


def _write(tmp_path, rows):
    df = pd.DataFrame(rows, columns=["step", "site", "layer", "stat", "value", "token", "channel"])
    df["token"] = df["token"].astype("Int64")
    df["channel"] = df["channel"].astype("Int64")
    (tmp_path / "records").mkdir()
    df.to_parquet(tmp_path / "records" / "part-000000.parquet", index=False)
    (tmp_path / "meta.json").write_text(json.dumps({"placement": "pre", "n_layers": 6, "d_model": 64}))
    return analysis.load(tmp_path)


def _planted_run(tmp_path):
    """Median |x| 0.5 everywhere. Channel 17 / token 0 is massive (2000) from step 4, layer 2 on,
    at every later layer and step. Channel 42 / token 3 is massive (800) at steps 6-8, layers 3-4
    only. Decoys: 150 (> 100 but only 300× the median) and 90 with a tiny median (not > 100)."""
    rng = np.random.default_rng(0)
    rows = []
    for s in STEPS:
        for l in LAYERS:
            med = 0.01 if (s, l) == (1, 1) else 0.5
            vals = sorted(rng.uniform(2, 5, 3), reverse=True)
            locs = [(int(rng.integers(5, 60)), int(rng.integers(50, 60))) for _ in range(3)]
            if s >= 4 and l >= 2:
                vals[0], locs[0] = 2000.0, (0, 17)
            if 6 <= s <= 8 and l in (3, 4):
                vals[1], locs[1] = 800.0, (3, 42)
            if (s, l) == (2, 5):
                vals[0], locs[0] = 150.0, (9, 9)
            if (s, l) == (1, 1):
                vals[0], locs[0] = 90.0, (8, 8)
            absmax = 70000.0 if (s, l) == (8, 5) else vals[0]
            for rank, (v, (tok, ch)) in enumerate(zip(vals, locs), 1):
                rows.append((s, "resid", l, f"top{rank}", v, tok, ch))
            rows.append((s, "resid", l, "absmax", absmax, locs[0][0], locs[0][1]))
            rows.append((s, "resid", l, "median_abs", med, None, None))
            n_massive = float((s >= 4 and l >= 2) + (6 <= s <= 8 and l in (3, 4)))
            rows.append((s, "resid", l, "massive", n_massive, None, None))
            rows.append((s, "resid", l, "over_fp16", float(absmax > FP16_MAX), None, None))
    return _write(tmp_path, rows)


def test_sun_criterion_on_recorded_top3(tmp_path):
    run = _planted_run(tmp_path)
    cand = massive_candidates(run)
    assert len(cand) == len(STEPS) * len(LAYERS) * 3
    found = cand[cand["massive"]]
    assert set(zip(found["channel"], found["token"])) == {(17, 0), (42, 3)}
    decoy = cand[(cand["step"] == 2) & (cand["layer"] == 5) & (cand["rank"] == 1)].iloc[0]
    assert decoy["value"] == 150 and decoy["ratio"] == pytest.approx(300) and not decoy["massive"]
    tiny = cand[(cand["step"] == 1) & (cand["layer"] == 1) & (cand["rank"] == 1)].iloc[0]
    assert tiny["ratio"] == pytest.approx(9000) and not tiny["massive"]
    # the probe's own count is carried along and agrees with what the top-3 shows here
    per = found.groupby(["step", "layer"]).size()
    counts = cand.drop_duplicates(["step", "layer"]).set_index(["step", "layer"])["count"]
    assert (counts.loc[per.index] == per).all()


def test_tracking_first_appearance_and_persistence(tmp_path):
    run = _planted_run(tmp_path)
    tr = track_massive(massive_candidates(run)).set_index(["channel", "token"])
    a = tr.loc[(17, 0)]
    assert (a["first_step"], a["first_layer"], a["n_steps"]) == (4, 2, 6)
    assert a["persistence_layers"] == pytest.approx(1.0) and a["persistence_steps"] == pytest.approx(1.0)
    b = tr.loc[(42, 3)]
    assert (b["first_step"], b["first_layer"]) == (6, 3)
    assert b["persistence_layers"] == pytest.approx(1 / 3)             # layer 4 of the later 4, 5, 6
    assert b["persistence_steps"] == pytest.approx(2 / 3)              # steps 7, 8 of 7, 8, 9
    assert list(tr.index) == [(17, 0), (42, 3)]                        # ordered by first appearance
    by_channel = track_massive(massive_candidates(run), key=("channel",))
    assert list(by_channel["channel"]) == [17, 42]


def test_fp16_margin_and_absmax_series(tmp_path):
    run = _planted_run(tmp_path)
    m = fp16_margin(run)
    assert (m["max_absmax"], m["site"], m["layer"], m["step"]) == (70000.0, "resid", 5, 8)
    assert m["log10_ratio"] == pytest.approx(np.log10(70000 / 65504))
    assert m["over_fp16"] == 1.0
    s = absmax_over_steps(run)
    assert s.loc[8] == 70000.0 and s.loc[0] < 5.0


def test_no_massive_in_a_quiet_run(tmp_path):
    rows = [(s, "resid", l, stat, v, 0 if stat.startswith("top") else None, 1 if stat.startswith("top") else None)
            for s in range(3) for l in range(4)
            for stat, v in (("top1", 3.0), ("top2", 2.0), ("top3", 1.0), ("median_abs", 0.6))]
    run = _write(tmp_path, rows)
    assert not massive_candidates(run)["massive"].any()
    assert track_massive(massive_candidates(run)).empty
    m = fp16_margin(run)                                               # no absmax recorded
    assert np.isnan(m["max_absmax"]) and m["site"] is None


def test_spike_score_finds_planted_spikes_not_noise():
    rng = np.random.default_rng(0)
    x = pd.Series(2.0 + 0.1 * rng.standard_normal(3000), index=np.arange(3000) * 10)
    quiet = spike_score(x)
    assert quiet.spikes == [] and quiet.score == 0.0 and quiet.n_evaluated == 3000 - 10
    x.iloc[1500] += 2.5                                                # 25σ
    x.iloc[2500] += 1.5                                                # 15σ
    x.iloc[2700] += 0.5                                                # 5σ: below 7σ
    res = spike_score(x)
    assert res.spikes == [15000, 25000]
    assert res.score == pytest.approx(2 / (3000 - 10))
    assert spike_score(x, threshold=4.0).spikes == [15000, 25000, 27000]
    # downward excursions are not spikes
    y = x.copy()
    y.iloc[1000] -= 5
    assert 10000 not in spike_score(y).spikes


def test_spike_score_uses_only_previous_window():
    # a level shift is a spike once; afterwards the window contains the new level
    v = np.r_[np.random.default_rng(1).normal(1, 0.01, 500), np.random.default_rng(2).normal(3, 0.01, 500)]
    res = spike_score(v, window=100)
    assert res.spikes[0] == 500
    assert all(s < 600 for s in res.spikes)
    # NaN values are counted apart, not flagged
    w = pd.Series(np.r_[np.ones(50) + 0.01 * np.arange(50) % 3, np.nan, np.ones(10)])
    r = spike_score(w)
    assert r.n_nonfinite == 1 and 50 not in r.spikes


def test_spike_statistics_exclude_the_current_value():
    # with the current value inside the window, the spike inflates its own σ and hides (z ≈ 2.6)
    v = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0, 5.0]
    res = spike_score(v, window=10, min_periods=5)
    assert res.spikes == [7]
    assert res.z.iloc[-1] == pytest.approx((5.0 - np.mean(v[:-1])) / np.std(v[:-1], ddof=1))
