"""lnprobe.store owns the run directory: one schema, one writer, one reader, one Run type, which
``lnprobe.load_run`` returns and ``lnprobe.analysis`` uses; ``import lnprobe`` is lazy, and reading a
run and building a report work with torch unimportable."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lnprobe
import lnprobe.analysis as analysis
from lnprobe import compaction, constants, store

REPO = Path(__file__).resolve().parents[1]
L, D = 3, 16
NA = np.nan


def _frame(steps=(0, 1, 2)) -> pd.DataFrame:
    """Records of a small Pre-LN run in the schema: resid/attn_out/mlp_out/resid_mid m2, resid top1
    with its location, parameter gradient norms, train loss."""
    cols = {c: [] for c in store.RECORD_COLUMNS}

    def row(step, site, layer, stat, value, token=NA, channel=NA):
        for c, v in zip(store.RECORD_COLUMNS, (step, site, layer, stat, value, token, channel)):
            cols[c].append(v)

    for s in steps:
        for l in range(L + 1):
            row(s, "resid", l, "m2", (1.0 + l) * (1 + 0.1 * s))
            row(s, "resid", l, "top1", 5.0 + l + s, token=l, channel=2 * l)
        for l in range(L):
            row(s, "resid_mid", l, "m2", 1.5 + l)
            row(s, "attn_out", l, "m2", 0.4)
            row(s, "mlp_out", l, "m2", 0.5)
            row(s, f"param:blocks.{l}.attn.qkv.weight", l, "grad_norm", 0.1 * (l + 1))
            row(s, f"param:blocks.{l}.mlp.fc_out.weight", l, "grad_norm", 0.2 * (l + 1))
        row(s, "train", -1, "loss", 5.0 - s)
    return store.records_frame(*(np.asarray(cols[c], dtype=object if c in ("site", "stat") else float)
                                 for c in store.RECORD_COLUMNS))


def _meta(name="synthetic") -> dict:
    return {"run_name": name, "status": "finished", "placement": "pre", "n_layers": L, "d_model": D,
            "param_roles": {f"blocks.{l}.{p}.weight": {"role": r, "layer": l} for l in range(L)
                            for p, r in (("attn.qkv", "attn.qkv"), ("mlp.fc_out", "mlp.out"))},
            "config": {"model": {"d_model": D, "n_layers": L, "placement": "pre", "mlp": "gelu", "init_std": 0.02,
                                 "seq_len": 8, "scaled_init": False},
                       "train": {"batch_size": 2, "seq_len": 8, "steps": 3}}}


def write_run(path: Path, frame: pd.DataFrame | None = None, meta: dict | None = None, parts: int = 2) -> Path:
    """A run directory written with the store's writer, ``parts`` record parts."""
    frame = _frame() if frame is None else frame
    w = store.RunWriter(path, meta or _meta(path.name))
    for chunk in np.array_split(np.arange(len(frame)), parts):
        w.append(frame.iloc[chunk])
    return path


# ----------------------------------------------------------------------------- the schema
def test_round_trip_keeps_rows_and_schema(tmp_path):
    frame = _frame()
    run = lnprobe.load_run(write_run(tmp_path / "r", frame, parts=3))
    assert sorted(p.name for p in (tmp_path / "r" / "records").iterdir()) == [f"part-{i:06d}.parquet" for i in range(3)]
    assert tuple(run.records.columns) == store.RUN_COLUMNS == (*store.RECORD_SCHEMA, "stack")
    for col, dtype in store.RECORD_SCHEMA.items():
        got = run.records[col].dtype
        assert (pd.api.types.is_string_dtype(got) if dtype == "str" else str(got) == dtype), (col, got)
    assert run.records["stack"].isna().all()  # no map.stacks in meta.json
    pd.testing.assert_frame_equal(run.records[list(store.RECORD_COLUMNS)].astype({"site": object, "stat": object}),
                                  frame.astype({"site": object, "stat": object}))
    assert run.meta == json.loads(json.dumps(_meta("r"))) and run.name == "r"
    assert run.skipped_parts == [] and run.warnings == []
    top = run.frame("resid", "top1")
    assert top["token"].tolist() == [0, 1, 2, 3] * 3 and top["channel"].isna().sum() == 0
    assert run.frame("resid", "m2")["token"].isna().all() and len(run.frame("resid", "m2")) == 3 * (L + 1)


def test_writer_appends_after_existing_parts_and_reader_prefers_the_later_duplicate(tmp_path):
    write_run(tmp_path / "r", _frame(steps=(0, 1)), parts=1)
    w = store.RunWriter(tmp_path / "r", _meta("r"), resume=True)
    assert w.append(_frame(steps=(1, 2))).name == "part-000001.parquet"
    run = lnprobe.load_run(tmp_path / "r")
    assert len(run.records) == len(_frame(steps=(0, 1))) + len(_frame(steps=(1, 2)))  # rows kept as written
    assert run.series("loss").to_dict() == {0: 5.0, 1: 4.0, 2: 3.0}
    assert run.pivot("resid", "m2").shape == (3, L + 1)


def test_empty_frame_writes_no_part_and_empty_run_has_the_schema(tmp_path):
    w = store.RunWriter(tmp_path / "r", {"run_name": "e"})
    assert w.append(_frame().iloc[:0]) is None
    run = lnprobe.load_run(tmp_path / "r")
    assert tuple(run.records.columns) == store.RUN_COLUMNS and len(run.records) == 0
    assert run.pivot("resid", "m2").empty and run.n_layers == 0 and any("no record parts" in w for w in run.warnings)


def test_reader_errors_and_lenience(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an lnprobe run directory.*does not exist"):
        lnprobe.load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not an lnprobe run directory"):
        lnprobe.load_run(tmp_path / "empty")
    d = write_run(tmp_path / "nometa")
    (d / "meta.json").unlink()
    with pytest.warns(UserWarning, match="meta.json"):
        run = lnprobe.load_run(d)
    assert run.meta == {} and run.name == "nometa" and run.placement == "unknown" and run.n_layers == L
    store.write_meta(d, _meta("nometa"))
    bad = d / "records" / "part-000007.parquet"
    bad.write_bytes(b"PAR1 half a file")
    with pytest.warns(UserWarning, match="part-000007"):
        run = lnprobe.load_run(d)
    assert run.skipped_parts == [str(bad)] and any("part-000007" in w for w in run.warnings)


def test_config_is_parsed_in_one_place(tmp_path):
    run = lnprobe.load_run(write_run(tmp_path / "r"))
    meta = _meta()
    assert run.model_config == store.model_config(meta) == meta["config"]["model"]
    assert run.train_config == store.train_config(meta) == meta["config"]["train"]
    assert store.model_config({}) == {} and store.model_config({"config": "junk"}) == {}
    assert store.config_section({"config": {"trainer": {"x": 1}}}, "trainer") == {"x": 1}
    assert (run.placement, run.n_layers, run.d_model, run.status) == ("pre", L, D, "finished")


# ----------------------------------------------------------------------------- one Run
def test_one_run_type_and_one_reader():
    assert lnprobe.Run is store.Run is analysis.Run is analysis.io.Run
    assert lnprobe.load_run is store.load_run is analysis.load is analysis.io.load
    assert analysis.io.RECORD_COLUMNS is store.RECORD_COLUMNS
    assert analysis.io.FP16_MAX is analysis.massive.FP16_MAX is constants.FP16_MAX
    assert ((analysis.massive.MASSIVE_ABS, analysis.massive.MASSIVE_RATIO)
            == (constants.MASSIVE_ABS, constants.MASSIVE_RATIO))
    # no second definition of the schema or of a run type in the sources
    sources = {p: p.read_text() for d in ("lnprobe", "analysis") for p in (REPO / d).rglob("*.py")}
    assert [p.name for p, s in sources.items() if re.search(r"\nclass Run\b", s)] == ["store.py"]
    assert [p.name for p, s in sources.items() if "\nRECORD_COLUMNS = " in s] == ["store.py"]


def test_analysis_accessors_on_the_one_run(tmp_path):
    run = lnprobe.load_run(write_run(tmp_path / "r"))
    assert run.has("resid", "m2") and not run.has("resid", "kurtosis")
    assert run.sites[:1] == ["attn_out"] and "train" in run.sites
    assert run.steps.tolist() == [0, 1, 2]
    assert run.stat("resid", "m2").equals(run.pivot("resid", "m2"))
    np.testing.assert_allclose(run.rms_table("resid").loc[0].to_numpy(), np.sqrt(1.0 + np.arange(L + 1)))
    p = run.params("grad_norm")
    assert list(p.columns) == ["step", "param", "role", "layer", "value"] and len(p) == 3 * 2 * L
    assert set(p["role"]) == {"attn.qkv", "mlp.out"}
    np.testing.assert_allclose(run.layer_grad_norm().loc[0].to_numpy(),
                               np.sqrt(0.01 + 0.04) * (1 + np.arange(L)))
    assert run.role_table("grad_norm", "mlp.out").loc[2].tolist() == pytest.approx([0.2, 0.4, 0.6])
    assert store.guess_role("h.0.attn.c_attn.weight") == "attn.qkv"
    att = analysis.attribution(run)
    assert len(att) == 3 * L * 2


# ----------------------------------------------------------------------------- no torch
def _python(code: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


BLOCK = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'transformers'):\n"
    "            raise ImportError(f'{name} is blocked in this test')\n"
    "sys.meta_path.insert(0, Block())\n"
)


def test_load_run_and_report_with_torch_unimportable(tmp_path):
    run_dir = write_run(tmp_path / "pre")
    code = BLOCK + (
        "import lnprobe\n"
        "assert 'pandas' not in sys.modules, 'import lnprobe imported pandas'\n"
        f"run = lnprobe.load_run({str(run_dir)!r})\n"
        "assert type(run) is lnprobe.Run and run.n_layers == 3 and run.pivot('resid', 'm2').shape == (3, 4)\n"
        "import lnprobe.analysis\n"
        f"res = lnprobe.analysis.build_report([{str(run_dir)!r}], {str(tmp_path / 'out')!r})\n"
        "assert lnprobe.Schedule is not None and lnprobe.integrations.__name__ == 'lnprobe.integrations'\n"
        "try:\n"
        "    lnprobe.attach\n"
        "except ImportError as exc:\n"
        "    assert 'blocked' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('attach imported without torch')\n"
        "assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules)\n"
        "print(res.report_html.exists(), len(res.figures), sorted(set(res.verdicts['status'])))\n"
    )
    p = _python(code)
    assert p.returncode == 0, p.stderr
    ok, n, _ = p.stdout.split(maxsplit=2)
    assert ok == "True" and int(n) >= 3


def test_import_lnprobe_is_lazy_and_names_still_resolve():
    code = (
        "import sys, lnprobe\n"
        "assert not {'torch', 'pandas', 'transformers'} & set(sys.modules), sorted(sys.modules)\n"
        "import lnprobe.probe, lnprobe.schedule, lnprobe.store\n"
        "assert lnprobe.attach is lnprobe.probe.attach and lnprobe.Probe is lnprobe.probe.Probe\n"
        "assert lnprobe.Schedule is lnprobe.schedule.Schedule and lnprobe.ALL_SITES is lnprobe.probe.ALL_SITES\n"
        "assert lnprobe.Run is lnprobe.store.Run and lnprobe.load_run is lnprobe.store.load_run\n"
        "assert callable(lnprobe.inspect) and set(lnprobe.__all__) <= set(dir(lnprobe))\n"
        "try:\n"
        "    lnprobe.nonexistent\n"
        "except AttributeError as exc:\n"
        "    assert 'nonexistent' in str(exc)\n"
        "print('ok')\n"
    )
    p = _python(code)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_integrations_resolve_after_import_lnprobe():
    pytest.importorskip("transformers")
    code = (
        "import sys, lnprobe\n"
        "integ = lnprobe.integrations\n"
        "assert 'transformers' not in sys.modules, 'lnprobe.integrations imported transformers'\n"
        "cb = lnprobe.integrations.hf.ProbeCallback\n"
        "from lnprobe.integrations.hf import ProbeCallback\n"
        "assert cb is ProbeCallback\n"
        "print('ok')\n"
    )
    p = _python(code)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_analysis_is_installed_only_as_lnprobe_analysis(tmp_path):
    # from outside the repository (the repository root on sys.path would find the folder itself)
    code = (
        "import importlib.util, lnprobe.analysis\n"
        "assert importlib.util.find_spec('analysis') is None, importlib.util.find_spec('analysis')\n"
        "print(lnprobe.analysis.__name__)\n"
    )
    p = _python(code, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == "lnprobe.analysis", p.stderr


# ----------------------------------------------------------------------------- compaction
def _resolved(run) -> pd.DataFrame:
    """The records as every accessor sees them: one row per key (the later duplicate), sorted."""
    r = run.records[list(store.RECORD_COLUMNS)].astype({"site": object, "stat": object})
    key = ["site", "stat", "layer", "step"]
    return r.drop_duplicates(["step", "site", "layer", "stat"], keep="last").sort_values(key, ignore_index=True)


def _shuffled_run(path: Path, seed: int = 0) -> tuple[Path, pd.DataFrame]:
    """Parts written in a random order, one key written twice (the second value must win)."""
    frame = _frame(steps=(0, 1, 2, 3))
    chunks = np.array_split(np.random.default_rng(seed).permutation(len(frame)), 5)
    w = store.RunWriter(path, _meta(path.name))
    for c in chunks:
        w.append(frame.iloc[np.sort(c)])
    again = frame[(frame.site == "train") & (frame.step == 2)].assign(value=99.0)
    w.append(again)  # a scalar logged twice: readers keep the last row
    w.lock.release()  # a writer that died without close(): live parts only
    expected = lnprobe.load_run(path)
    assert expected.series("loss")[2] == 99.0 and len(expected.records) == len(frame) + 1
    return path, _resolved(expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_compaction_keeps_every_record_in_any_part_order(tmp_path, seed):
    run_dir, before = _shuffled_run(tmp_path / "r", seed)
    manifest = store.compact(run_dir)
    assert manifest["parts"] == [f"part-{i:06d}.parquet" for i in range(6)] and manifest["rows"] == len(before)
    assert sorted(p.name for p in (run_dir / "records").iterdir()) == ["gen-000001", "manifest.json"]
    after = lnprobe.load_run(run_dir)
    pd.testing.assert_frame_equal(_resolved(after), before)
    assert len(after.records) == len(before)  # the shadowed duplicate is gone, nothing else
    assert after.series("loss").to_dict() == {0: 5.0, 1: 4.0, 2: 99.0, 3: 2.0}
    # the file: sorted by (site, stat, layer, step), zstd, dictionary-encoded site and stat
    import pyarrow.parquet as pq

    f = run_dir / "records" / manifest["files"][0]
    t = pq.read_table(f).to_pandas()
    key = ["site", "stat", "layer", "step"]
    pd.testing.assert_frame_equal(t[key], t[key].sort_values(key, ignore_index=True), check_dtype=False)
    col = {c.path_in_schema: c for c in (pq.ParquetFile(f).metadata.row_group(0).column(j) for j in range(7))}
    assert all(c.compression == "ZSTD" for c in col.values())
    assert all(any("DICTIONARY" in e for e in col[c].encodings) for c in ("site", "stat"))
    assert store.compact(run_dir) is None  # nothing new: the compacted file is not rewritten


class _Killed(BaseException):
    """A simulated SIGKILL: not an Exception, so nothing in the store catches it."""


def _kill_after(monkeypatch, n: int) -> list[str]:
    """Let the first ``n`` changes of the run directory happen, then kill the compaction."""
    done: list[str] = []

    def wrap(name):
        real = getattr(compaction, name)

        def op(*args, **kw):
            if len(done) == n:
                if name == "_write_compacted":  # killed half-way through writing the new file
                    args[1].write_bytes(b"PAR1 half a compacted file")
                raise _Killed(name)
            done.append(name)
            return real(*args, **kw)
        monkeypatch.setattr(compaction, name, op)
    for name in ("_write_compacted", "_replace", "_remove"):
        wrap(name)
    return done


def test_a_kill_at_any_point_of_compaction_loses_and_doubles_nothing(tmp_path, monkeypatch):
    import shutil

    pristine, before = _shuffled_run(tmp_path / "pristine")
    raw = lnprobe.load_run(pristine).records
    with monkeypatch.context() as m:
        ops = _kill_after(m, 10**6)
        store.compact(shutil.copytree(pristine, tmp_path / "full"))
    assert ops[:2] == ["_write_compacted", "_replace"] and ops[2:] == ["_remove"] * 6  # file, switch, 6 parts
    for n in range(len(ops)):
        run_dir = shutil.copytree(pristine, tmp_path / f"kill{n}")
        with monkeypatch.context() as m:
            _kill_after(m, n)
            with pytest.raises(_Killed):
                store.compact(run_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a half-written compacted file is never even looked at
            seen = lnprobe.load_run(run_dir)
        if n <= 1:  # the manifest was not switched: the reader sees exactly the old parts
            assert not (run_dir / "records" / "manifest.json").exists()
            assert len(seen.records) == len(raw)
        else:  # switched: the compacted file, and no listed part a second time
            assert len(seen.records) == len(before)
        pd.testing.assert_frame_equal(_resolved(seen), before)
        # the next compaction (close, or resume) finishes the job and removes every leftover
        store.compact(run_dir)
        left = sorted(p.name for p in (run_dir / "records").iterdir())
        assert left == [f"gen-{2 if n <= 1 else 1:06d}", "manifest.json"], (n, left)  # gen-1 half-written: new gen
        pd.testing.assert_frame_equal(_resolved(lnprobe.load_run(run_dir)), before)


def test_compaction_failure_is_a_warning_and_keeps_the_parts(tmp_path, monkeypatch):
    run_dir, before = _shuffled_run(tmp_path / "r")

    def broken(*a, **k):
        raise OSError("No space left on device")
    monkeypatch.setattr(compaction, "_write_compacted", broken)
    with pytest.warns(RuntimeWarning, match="compaction of the record parts failed.*No space left"):
        assert store.compact_quietly(run_dir) is None
    assert not (run_dir / "records" / "manifest.json").exists()
    pd.testing.assert_frame_equal(_resolved(lnprobe.load_run(run_dir)), before)


def test_resume_and_trim_on_a_compacted_run(tmp_path):
    run_dir = write_run(tmp_path / "r", _frame(steps=(0, 1, 2)), parts=3)
    store.compact(run_dir)
    assert store.last_recorded_step(run_dir) == 2
    w = store.RunWriter(run_dir, _meta("r"), resume=True)
    # the numbering continues after the compacted parts: part-000000 would be taken for compacted
    assert w.append(_frame(steps=(3,))).name == "part-000003.parquet"
    run = lnprobe.load_run(run_dir)
    assert run.steps.tolist() == [0, 1, 2, 3] and store.last_recorded_step(run_dir) == 3
    n_late = len(_frame(steps=(2, 3))) // 2 * 2
    assert store.trim(run_dir, 2) == n_late  # step 2 from the compacted file, step 3 from the part
    assert lnprobe.load_run(run_dir).steps.tolist() == [0, 1]
    assert store.trim(run_dir, 2) == 0
    w.close()  # compacts the rest
    run = lnprobe.load_run(run_dir)
    assert run.steps.tolist() == [0, 1] and len(run.records) == len(_frame(steps=(0, 1)))
    assert not list((run_dir / "records").glob("part-*")) and not list((run_dir / "records").glob(".*"))


def test_a_damaged_part_is_left_out_of_compaction_and_stays(tmp_path):
    run_dir = write_run(tmp_path / "r", parts=2)
    bad = run_dir / "records" / "part-000002.parquet"
    bad.write_bytes(b"PAR1 half a file")
    with pytest.warns(UserWarning, match="part-000002"):
        before = _resolved(lnprobe.load_run(run_dir))
    manifest = store.compact(run_dir)
    assert manifest["parts"] == ["part-000000.parquet", "part-000001.parquet"] and bad.exists()
    with pytest.warns(UserWarning, match="part-000002"):
        run = lnprobe.load_run(run_dir)
    assert run.skipped_parts == [str(bad)]
    pd.testing.assert_frame_equal(_resolved(run), before)


@pytest.mark.parametrize("text, match", [
    ("{not json", "not readable JSON"),
    ('{"format": 1, "generation": 1, "files": ["../../../etc/passwd"], "parts": []}', "files.*gen-000001/c-000"),
    ('{"format": 1, "generation": 1, "files": [], "parts": ["/abs/part-000000.parquet"]}', "parts"),
    ('{"format": 2, "generation": 1, "files": [], "parts": []}', "format"),
    ('[]', "expected an object"),
])
def test_a_damaged_manifest_is_one_line(tmp_path, text, match):
    run_dir = write_run(tmp_path / "r")
    (run_dir / "records" / "manifest.json").write_text(text)
    with pytest.raises(lnprobe.RunDirectoryError, match=match) as exc:
        lnprobe.load_run(run_dir)
    assert "\n" not in str(exc.value) and "manifest" in str(exc.value)


def test_a_missing_compacted_file_is_skipped_by_name(tmp_path):
    run_dir = write_run(tmp_path / "r")
    m = store.compact(run_dir)
    (run_dir / "records" / m["files"][0]).unlink()
    with pytest.warns(UserWarning, match="missing.*manifest"):
        run = lnprobe.load_run(run_dir)
    assert len(run.records) == 0 and run.skipped_parts == [str(run_dir / "records" / m["files"][0])]
    with pytest.raises(lnprobe.RunDirectoryError, match="missing or unreadable; not compacting"):
        store.compact(run_dir)  # rewriting would drop the manifest's record of it
    assert store.read_manifest(run_dir) == m


# ----------------------------------------------------------------------------- filters, stacks
def test_load_run_filters_and_columns_are_pushed_down(tmp_path):
    run_dir = write_run(tmp_path / "r", parts=3)
    full = lnprobe.load_run(run_dir).records
    for compacted in (False, True):
        if compacted:
            store.compact(run_dir)
        run = lnprobe.load_run(run_dir, ["step", "layer", "value"], site="resid", stat=["m2", "top1"],
                               layer=range(1, 3), step=[0, 2])
        want = full[(full.site == "resid") & full.stat.isin(["m2", "top1"]) & full.layer.between(1, 2)
                    & full.step.isin([0, 2])]
        got = run.records
        assert list(got.columns) == ["step", "layer", "value"]
        assert sorted(zip(got.step, got.layer, got.value)) == sorted(zip(want.step, want.layer, want.value))
        assert run.pivot("resid", "m2").shape == (2, 2) and not run.has("train", "loss")
        assert run.select(layer=1, stat="m2")["value"].tolist() == want[(want.layer == 1)
                                                                        & (want.stat == "m2")].value.tolist()
    for kw, match in ((dict(layer="3"), "filter 'layer': expected an integer"), (dict(site=3), "filter 'site'"),
                      (dict(columns=["nope"]), "unknown record column 'nope'")):
        with pytest.raises(ValueError, match=match):
            lnprobe.load_run(run_dir, **kw)


STACKS = [{"name": "encoder", "first_layer": 0, "n_layers": 2}, {"name": "decoder", "first_layer": 2, "n_layers": 2}]


def test_stack_column_from_meta_map_stacks(tmp_path):
    meta = {**_meta("t5"), "map": {"stacks": STACKS}}
    run = lnprobe.load_run(write_run(tmp_path / "t5", meta=meta))
    r = run.records
    by_layer = dict(zip(r.layer, r["stack"].fillna("-")))
    assert by_layer == {0: "encoder", 1: "encoder", 2: "decoder", 3: "decoder", -1: "-"}
    store.compact(tmp_path / "t5")
    assert lnprobe.load_run(tmp_path / "t5").records["stack"].tolist() == r.sort_values(
        ["site", "stat", "layer", "step"], kind="stable")["stack"].tolist()


@pytest.mark.parametrize("stacks, match", [
    ("encoder", "map.stacks': expected a list"),
    ([{"name": "encoder", "first_layer": 0}], r"map.stacks\[0\].n_layers"),
    ([{"name": 7, "first_layer": 0, "n_layers": 2}], r"map.stacks\[0\].name"),
    ([{"name": "e", "first_layer": -1, "n_layers": 2}], "first_layer"),
    ([{"name": "e", "first_layer": 0, "n_layers": 3}, {"name": "d", "first_layer": 2, "n_layers": 2}], "overlap"),
    (["x"] * 101, "at most 100"),
])
def test_garbled_stacks_are_one_line_errors(tmp_path, stacks, match):
    meta = {**_meta("t5"), "map": {"stacks": stacks}}
    with pytest.raises(lnprobe.RunDirectoryError, match=match) as exc:
        lnprobe.load_run(write_run(tmp_path / "t5", meta=meta))
    assert "\n" not in str(exc.value)
