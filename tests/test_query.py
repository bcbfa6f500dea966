"""lnprobe.open: one lazy relation over many run directories, with meta.json's identity as columns and
filters pushed down; per run it returns what lnprobe.load_run returns."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from test_store import _frame, _meta, write_run

import lnprobe
from lnprobe import query, store

KEY = ["step", "site", "layer", "stat"]


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    cols = [*store.RECORD_COLUMNS, "stack"]
    return (df[cols].astype({"site": object, "stat": object, "stack": object})
            .sort_values([*KEY, "value"], ignore_index=True))


@pytest.fixture
def runs_dir(tmp_path):
    """Three runs: one compacted, one live with a step written twice, one with encoder/decoder stacks;
    and a folder that is not a run."""
    root = tmp_path / "runs"
    for i, (name, placement, lr) in enumerate((("pre_a", "pre", 1e-2), ("peri_b", "peri", 3e-2),
                                                ("t5_c", "post", 1e-2))):
        meta = _meta(name)
        meta.update(placement=placement, lr=lr)
        meta["config"]["train"]["seed"] = i
        meta["config"]["model"]["placement"] = placement
        if name == "t5_c":
            meta["map"] = {"stacks": [{"name": "encoder", "first_layer": 0, "n_layers": 2},
                                      {"name": "decoder", "first_layer": 2, "n_layers": 1}]}
        frame = _frame(steps=(0, 1, 2))
        frame["value"] = frame["value"] * (i + 1)
        write_run(root / name, frame, meta=meta, parts=3)
    store.compact(root / "pre_a")
    w = store.RunWriter(root / "peri_b", store.read_meta(root / "peri_b"), resume=True)
    w.append(_frame(steps=(2,)))  # step 2 again: a duplicate, kept as load_run keeps it
    (root / "report").mkdir()
    (root / "summary.csv").write_text("name\n")
    return root


def test_open_returns_load_run_records_per_run(runs_dir):
    runs = lnprobe.open(str(runs_dir / "*"))
    assert sorted(runs.runs["run"]) == ["peri_b", "pre_a", "t5_c"] and len(runs) == 3
    assert any("report: not a run directory" in w for w in runs.warnings)
    assert any("summary.csv: not a run directory" in w for w in runs.warnings)
    ident = runs.runs.set_index("run")
    assert ident.loc["peri_b", "placement"] == "peri" and ident.loc["peri_b", "lr"] == 3e-2
    assert ident.loc["t5_c", "seed"] == 2 and ident.loc["pre_a", "layers"] == 3 and ident.loc["pre_a", "d_model"] == 16
    assert ident.loc["pre_a", "status"] == "finished"
    df = runs.df()
    assert list(df.columns) == runs.columns == [*query.IDENTITY_COLUMNS, *store.RECORD_COLUMNS, "stack"]
    assert str(df["token"].dtype) == "Int64" and str(df["step"].dtype) == "int64"
    for name in ("pre_a", "peri_b", "t5_c"):
        mine = df[df["run"] == name]
        ref = lnprobe.load_run(runs_dir / name).records
        pd.testing.assert_frame_equal(_sorted(mine), _sorted(ref))
        assert (mine["placement"] == ident.loc[name, "placement"]).all()
    assert len(df[df.run == "peri_b"]) == len(_frame(steps=(0, 1, 2))) + len(_frame(steps=(2,)))
    t5 = df[df.run == "t5_c"]
    assert set(zip(t5.layer, t5["stack"].fillna("-"))) == {(0, "encoder"), (1, "encoder"), (2, "decoder"),
                                                            (3, "-"), (-1, "-")}
    assert df.loc[df.run != "t5_c", "stack"].isna().all()


def test_filters_match_pandas_and_choose_runs_first(runs_dir):
    runs = lnprobe.open([runs_dir / "pre_a", runs_dir / "peri_b", runs_dir / "t5_c"])
    full = runs.df()
    got = runs.filter(site="resid", stat="m2", layer=range(1, 4), step=[0, 2], placement=["pre", "post"]).df()
    want = full[(full.site == "resid") & (full.stat == "m2") & full.layer.between(1, 3) & full.step.isin([0, 2])
                & full.placement.isin(["pre", "post"])]
    assert len(got) == len(want) > 0 and set(got.run) == {"pre_a", "t5_c"}
    assert sorted(zip(got.run, got.step, got.layer, got.value)) == sorted(zip(want.run, want.step, want.layer,
                                                                             want.value))
    # a run filter selects files before anything is read: the other runs' files may even be gone
    one = runs.filter(run="t5_c")
    for p in (runs_dir / "pre_a" / "records").rglob("*.parquet"):
        p.unlink()
    assert set(one.df(["run", "value"])["run"]) == {"t5_c"}
    assert one.filter(stat="loss").relation.aggregate("count(*)").fetchall() == [(3,)]
    assert len(runs.filter(run="nobody").df()) == 0


def test_bad_patterns_filters_and_damaged_runs_are_one_line(runs_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no run directory matches") as exc:
        lnprobe.open(str(tmp_path / "nothing" / "*"))
    assert "\n" not in str(exc.value)
    runs = lnprobe.open(str(runs_dir / "*"))
    for kw, match in ((dict(colour="red"), "unknown filter 'colour'"), (dict(layer="x"), "filter 'layer'"),
                      (dict(stat=["m2", 3]), "filter 'stat'")):
        with pytest.raises(ValueError, match=match):
            runs.filter(**kw)
    with pytest.raises(ValueError, match="unknown column"):
        runs.df(["value", "colour"])
    (runs_dir / "t5_c" / "meta.json").write_text(json.dumps({"n_layers": "many"}))
    with pytest.raises(lnprobe.RunDirectoryError, match="t5_c.*n_layers") as exc:
        lnprobe.open(str(runs_dir / "*"))
    assert "\n" not in str(exc.value)
