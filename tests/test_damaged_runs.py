"""Runs that never lose data: existing run directories are never clobbered, one writer at a time, and
damaged or hostile run directories fail with one sentence (or are read around, part by part), never
with a traceback or an allocation sized by a number in meta.json."""
import json
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import one_line_error
from test_store import _frame, _meta, write_run

import lnprobe
from lnprobe import store

REPO = Path(__file__).resolve().parents[1]
LOCK_NAME = ".lock"  # lnprobe.rundir.LOCK_NAME, spelled out: the file name is part of the format


def _model():
    import torch
    from nanogpt import NanoGPT

    torch.manual_seed(0)
    return NanoGPT(vocab=64, block_size=16)


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _train(model, probe, steps=1):
    import torch

    x = torch.randint(0, 64, (2, 16))
    for _ in range(steps):
        model(x, x)[1].backward()
        probe.step()


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- never clobbered
def test_writer_refuses_an_existing_run_and_touches_nothing(tmp_path):
    d = write_run(tmp_path / "r")
    before = _snapshot(d)
    with pytest.raises(lnprobe.RunExistsError, match=r"already holds a run \(meta.json and 2 record parts") as exc:
        store.RunWriter(d, _meta("other"))
    assert isinstance(exc.value, FileExistsError)
    assert "resume=True" in str(exc.value) and "overwrite=True" in str(exc.value)
    assert _snapshot(d) == before
    only_parts = write_run(tmp_path / "parts")
    (only_parts / "meta.json").unlink()
    with pytest.raises(lnprobe.RunExistsError, match="2 record parts"):
        store.RunWriter(only_parts, _meta())
    with pytest.raises(ValueError, match="not both"):
        store.RunWriter(d, _meta(), resume=True, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        store.RunWriter(tmp_path / "file", _meta())
    store.RunWriter(tmp_path / "fresh", _meta()).close()  # a new or empty directory is fine
    (tmp_path / "empty").mkdir()
    store.RunWriter(tmp_path / "empty", _meta()).close()


def test_attach_refuses_an_existing_run_before_registering_a_hook(tmp_path):
    model = _model()
    with lnprobe.attach(model, tmp_path / "run") as probe:
        _train(model, probe, 2)
    before, hooks = _snapshot(tmp_path / "run"), _hooks(model)
    with pytest.raises(lnprobe.RunExistsError, match="resume=True.*overwrite=True"):
        lnprobe.attach(model, tmp_path / "run")
    assert _snapshot(tmp_path / "run") == before and _hooks(model) == hooks
    assert sorted(lnprobe.load_run(tmp_path / "run").records.step.unique()) == [0, 1]


def test_overwrite_replaces_the_old_run_and_resume_appends(tmp_path):
    model = _model()
    out = tmp_path / "run"
    with lnprobe.attach(model, out) as probe:
        _train(model, probe, 3)
    (out / "checkpoint.pt").write_bytes(b"kept")
    with lnprobe.attach(model, out, resume=True) as probe:
        _train(model, probe, 1)
    assert sorted(lnprobe.load_run(out).records.step.unique()) == [0, 1, 2, 3]
    with lnprobe.attach(model, out, overwrite=True, run_name="again") as probe:
        _train(model, probe, 1)
    run = lnprobe.load_run(out)
    assert sorted(run.records.step.unique()) == [0] and run.meta["run_name"] == "again"
    # close() compacted the new run's one part; nothing of the old run is left
    assert sorted(p.name for p in (out / "records").iterdir()) == ["gen-000001", "manifest.json"]
    assert store.read_manifest(out)["parts"] == ["part-000000.parquet"]
    assert (out / "checkpoint.pt").read_bytes() == b"kept" and not (out / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- one writer
def test_a_second_writer_is_locked_out_until_the_first_closes(tmp_path):
    model = _model()
    out = tmp_path / "run"
    first = lnprobe.attach(model, out)
    lock = json.loads((out / LOCK_NAME).read_text())
    assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname() and lock["started"]
    hooks = _hooks(model)
    for kw in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(lnprobe.RunLockedError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            lnprobe.attach(model, out, **kw)
    with pytest.raises(lnprobe.RunLockedError, match="only one writer"):
        store.RunWriter(out, _meta(), resume=True)
    assert _hooks(model) == hooks
    _train(model, first, 2)
    first.close()
    assert not (out / LOCK_NAME).exists()
    with lnprobe.attach(model, out, resume=True) as second:
        assert second.current_step == 2
        _train(model, second, 1)
    assert sorted(lnprobe.load_run(out).records.step.unique()) == [0, 1, 2]


def test_a_lock_of_another_process_is_seen_across_processes(tmp_path):
    out = tmp_path / "run"
    script = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from lnprobe import store; "
              f"w = store.RunWriter({str(out)!r}, {{'run_name': 'x'}}); print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(lnprobe.RunLockedError, match=f"pid {proc.pid} on host"):
            store.RunWriter(out, _meta(), resume=True)
    finally:
        proc.kill()
        proc.wait()
    with pytest.warns(RuntimeWarning, match=f"stale lock.*pid {proc.pid}"):  # killed: its lock is stale now
        store.RunWriter(out, _meta(), resume=True).close()


def test_a_stale_lock_is_taken_over_and_a_foreign_host_lock_is_not(tmp_path):
    d = write_run(tmp_path / "r")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (d / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then",
                                           "token": "old"}))
    with pytest.warns(RuntimeWarning, match=f"took over a stale lock \\(pid {dead.pid}"):
        w = store.RunWriter(d, _meta(), resume=True)
    assert json.loads((d / LOCK_NAME).read_text())["pid"] == os.getpid()
    w.close()
    assert not (d / LOCK_NAME).exists()
    (d / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "now", "token": "t"}))
    with pytest.raises(lnprobe.RunLockedError, match="pid 1 on host elsewhere.example"):
        store.RunWriter(d, _meta(), resume=True)


# ----------------------------------------------------------------------------- meta.json
BAD_META = {
    "corrupt": ('{"n_layers": 8,', "not valid JSON"),
    "empty": ("", "meta.json is empty"),
    "list": ("[1, 2, 3]", "top level: expected an object, found list"),
    "eight": ('{"n_layers": "eight"}', "field 'n_layers': expected an integer in [0, 100000], found str \"eight\""),
    "1e308": ('{"n_layers": 1e308}', "field 'n_layers': expected an integer in [0, 100000], found float 1e+308"),
    "nan": ('{"config": {"train": {"lr": NaN}}}', "field 'config.train.lr': expected a finite number in [0, 1e+06], "
            "found float nan"),
    "inf": ('{"last_step": Infinity}', "field 'last_step': expected an integer in [-1, "),
    "nan_model": ('{"d_model": 64.5}', "field 'd_model': expected an integer"),
    "placement": ('{"placement": "sideways"}', "field 'placement': expected one of pre, post, peri"),
    "huge": ('{"n_layers": 300000000}', "found int 300000000"),
}


@pytest.mark.parametrize("case", sorted(BAD_META))
def test_damaged_meta_is_one_line_naming_file_and_field(tmp_path, case, capsys):
    text, match = BAD_META[case]
    d = write_run(tmp_path / case)
    (d / "meta.json").write_text(text)
    with pytest.raises(lnprobe.RunDirectoryError) as exc:
        lnprobe.load_run(d)
    msg = str(exc.value)
    assert isinstance(exc.value, ValueError) and "\n" not in msg
    assert msg.startswith(f"{d / 'meta.json'}: ") and match in msg and "delete it" in msg, msg
    one_line_error(capsys, ["report", str(d), "--out", str(tmp_path / "out")], str(d / "meta.json"))
    assert not (tmp_path / "out" / "report.md").exists()
    one_line_error(capsys, ["compare", str(d), str(write_run(tmp_path / "ok")), "--out", str(tmp_path / "out")],
                   str(d / "meta.json"))
    one_line_error(capsys, ["export", "--tensorboard", str(d), "--out", str(tmp_path / "tb")], str(d / "meta.json"))


def test_huge_n_layers_fails_fast_with_bounded_memory(tmp_path):
    d = write_run(tmp_path / "r")
    (d / "meta.json").write_text(json.dumps({**_meta(), "n_layers": 300_000_000}))
    script = (f"import resource, sys; sys.path.insert(0, {str(REPO)!r}); from lnprobe.cli import main\n"
              f"try:\n    main(['report', {str(d)!r}, '--out', {str(tmp_path / 'out')!r}])\n"
              f"except SystemExit as e:\n    print('exit', e.code)\n"
              f"print('rss_mb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "exit 2" in proc.stdout and "n_layers" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert int(proc.stdout.split("rss_mb")[1]) < 1500, proc.stdout  # 24 GB before the schema


def test_meta_sizes_beyond_the_records_are_capped_by_the_records(tmp_path):
    d = write_run(tmp_path / "r", meta={**_meta("r"), "n_layers": 100_000})  # allowed, but 3 layers recorded
    run = lnprobe.load_run(d)
    assert run.n_layers == 3 and any("n_layers = 100000 but the records stop at layer 3" in w for w in run.warnings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = lnprobe.analysis.build_report([d], tmp_path / "out")
    md = res.report_md.read_text()
    assert md.index("## Loading notes") < md.index("## Verdicts") and "records stop at layer 3" in md


# ----------------------------------------------------------------------------- record parts
def _bad_part(d: Path, name: str, frame: pd.DataFrame | None = None, raw: bytes | None = None) -> Path:
    p = d / "records" / name
    if raw is not None:
        p.write_bytes(raw)
    else:
        frame.to_parquet(p, index=False)
    return p


BAD_PARTS = {
    "columns": (lambda: pd.DataFrame({"a": [1], "b": ["x"]}), "wrong columns: missing step, site, layer, stat, value"),
    "dtypes": (lambda: _frame().astype({"value": str}).assign(value="abc"), "wrong dtypes: value is"),
    "layer": (lambda: _frame().assign(layer=10**9),
              "wrong values: layer in [1000000000, 1000000000], expected [-1, 100000]"),
    "steps": (lambda: _frame().assign(step=0.5), "wrong values: step holds non-integer numbers"),
    "unreadable": (None, "unreadable (ArrowInvalid"),
}


@pytest.mark.parametrize("case", sorted(BAD_PARTS))
def test_damaged_part_is_skipped_by_name_and_listed_at_the_top_of_the_report(tmp_path, case):
    make, why = BAD_PARTS[case]
    d = write_run(tmp_path / "r")
    bad = _bad_part(d, "part-000005.parquet", make() if make else None, None if make else b"PAR1 half a file")
    with pytest.warns(UserWarning, match=f"part-000005.parquet: {re.escape(why)}"):
        run = lnprobe.load_run(d)
    assert run.skipped_parts == [str(bad)] and len(run.records) == len(_frame())  # the other parts are kept
    assert any(str(bad) in w and why in w for w in run.warnings), run.warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = lnprobe.analysis.build_report([d], tmp_path / "out")
    md, html = res.report_md.read_text(), res.report_html.read_text()
    assert md.index("## Loading notes") < md.index("## Verdicts") and "part-000005.parquet" in md
    assert html.index("Loading notes") < html.index("<h2>Verdicts") and "part-000005.parquet" in html


def test_castable_part_dtypes_are_accepted(tmp_path):
    d = write_run(tmp_path / "r", parts=1)
    f = _frame(steps=(3,))
    _bad_part(d, "part-000001.parquet", f.astype({"step": "int32", "layer": "float64", "value": "float32"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = lnprobe.load_run(d)
    assert run.skipped_parts == [] and 3 in run.steps and run.records["layer"].dtype == np.int64


# ----------------------------------------------------------------------------- hostile text
def test_markup_in_a_run_name_is_escaped_in_report_md_and_html(tmp_path):
    name = "<script>alert(1)</script> a|b `tick` **bold** [x](http://e)"
    d = write_run(tmp_path / "r", meta={**_meta(), "run_name": name})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = lnprobe.analysis.build_report([d], tmp_path / "out")
    md, html = res.report_md.read_text(), res.report_html.read_text()
    assert "<script" not in md and "&lt;script&gt;" in md and "a\\|b" in md and "\\`tick\\`" in md
    assert "<script" not in html and "&lt;script&gt;" in html
    assert "[x](http" not in md and "\\[x\\](http" in md  # no link made from a run name


# ----------------------------------------------------------------------------- CLI output paths
def test_report_compare_export_out_that_is_a_file_or_unwritable(tmp_path, capsys):
    d = write_run(tmp_path / "r")
    e = write_run(tmp_path / "e")
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(capsys, ["report", str(d), "--out", str(f)], "is a file")
    one_line_error(capsys, ["compare", str(d), str(e), "--out", str(f)], "is a file")
    one_line_error(capsys, ["export", "--tensorboard", str(d), "--out", str(f)], "is a file")
    one_line_error(capsys, ["report", str(d), "--out", str(f / "sub")], "cannot create --out")
    one_line_error(capsys, ["report", str(f)], "is a file")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            one_line_error(capsys, ["report", str(d), "--out", str(ro)], "not writable")
        finally:
            ro.chmod(0o700)
