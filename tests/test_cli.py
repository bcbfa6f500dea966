"""lnprobe.cli: train, demo, report/compare, inspect, export, and one-line errors (exit code 2) for bad input."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SMALL, one_line_error

import lnprobe
from lnprobe.cli import main, summarize_run
from lnprobe.testing import ENCODER_DECODERS, HF_PLACEMENTS


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    """One small run made through the CLI, shared by the tests that read a run directory."""
    out = tmp_path_factory.mktemp("runs") / "peri"
    code = main(["train", "--placement", "peri", "--steps", "5", "--every", "2", "--data", corpus,
                 "--out", str(out), *SMALL])
    assert code == 0
    return out


# ----------------------------------------------------------------------------- train
def test_train_command(trained, capsys):
    run = lnprobe.load_run(trained)
    assert run.meta["status"] == "finished" and run.meta["placement"] == "peri"
    cfg = run.meta["config"]
    assert cfg["model"]["d_model"] == 32 and cfg["model"]["n_layers"] == 2 and cfg["train"]["steps"] == 5
    assert sorted(run.records.loc[run.records["site"] == "resid", "step"].unique()) == [0, 2, 4]


def test_train_prints_summary(tmp_path, corpus, capsys):
    out = tmp_path / "pre"
    assert main(["train", "--steps", "3", "--data", corpus, "--out", str(out), *SMALL]) == 0
    text = capsys.readouterr().out
    assert f"run {out}: finished after 3 steps" in text
    assert "final loss" in text and "last-layer resid variance" in text and "max |x|" in text


def test_summary_matches_records(trained):
    lines = summarize_run(trained)
    assert len(lines) == 3
    r = lnprobe.load_run(trained).records
    last = r[(r["site"] == "resid") & (r["step"] == 4)]
    var = last[(last["stat"] == "var") & (last["layer"] == 2)]["value"].item()
    absmax = last[last["stat"] == "absmax"]["value"].max()
    assert f"{var:.4g}" in lines[1] and "layer 2, step 4" in lines[1]
    assert f"{absmax:.4g}" in lines[2]
    loss = r[(r["site"] == "train") & (r["stat"] == "loss") & (r["step"] == 4)]["value"].item()
    assert lines[0].startswith(f"final loss {loss:.4g} at step 4")


def test_train_resume_flag(tmp_path, corpus):
    out = tmp_path / "r"
    assert main(["train", "--steps", "3", "--data", corpus, "--out", str(out), *SMALL]) == 0
    # continue the finished 3-step run to 5 steps: a longer schedule is a changed setting, so --force
    assert main(["train", "--steps", "5", "--data", corpus, "--out", str(out), "--resume", "--force", *SMALL]) == 0
    run = lnprobe.load_run(out)
    assert run.meta["resumed_from"] == [3] and run.meta["status"] == "finished"
    assert run.meta["resumes"][0]["step"] == 3 and run.meta["resumes"][0]["changed"] == {"steps": [3, 5]}
    loss = run.records[(run.records["stat"] == "loss")]
    assert sorted(loss["step"]) == [0, 1, 2, 3, 4]  # a loss row at every step, none twice after resume
    resid = run.records[run.records["site"] == "resid"]
    assert sorted(resid["step"].unique()) == [0, 2, 4]  # every=10: step 0, the last of 3 steps, then the last of 5


def test_train_resume_and_overwrite_errors(tmp_path, corpus, capsys):
    out = tmp_path / "r"
    assert main(["train", "--steps", "3", "--data", corpus, "--out", str(out), *SMALL]) == 0
    capsys.readouterr()
    line = one_line_error(capsys, ["train", "--steps", "5", "--lr", "0.02", "--data", corpus, "--out", str(out),
                                   "--resume", *SMALL], "settings differ")
    assert "lr 0.01 -> 0.02" in line and "steps 3 -> 5" in line and "--force" in line
    line = one_line_error(capsys, ["train", "--steps", "3", "--data", corpus, "--out", str(out), *SMALL],
                          "already holds a run (status finished, last step 2)")
    assert "--resume" in line and "--overwrite to discard" in line and "without --resume" not in line
    one_line_error(capsys, ["train", "--steps", "3", "--data", corpus, "--out", str(out), "--resume", *SMALL],
                   "already did 3 of 3 steps")
    one_line_error(capsys, ["train", "--data", corpus, "--out", str(tmp_path / "empty"), "--resume", *SMALL],
                   "no checkpoint")
    assert main(["train", "--steps", "2", "--data", corpus, "--out", str(out), "--overwrite", *SMALL]) == 0
    assert lnprobe.load_run(out).meta["config"]["train"]["steps"] == 2
    one_line_error(capsys, ["train", "--ckpt-every", "-1", "--data", corpus, "--out", str(tmp_path / "x"), *SMALL],
                   "--ckpt-every must be ≥ 0")


def test_out_that_is_a_file_or_unwritable(tmp_path, corpus, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    one_line_error(capsys, ["train", "--data", corpus, "--out", str(afile), *SMALL], "is a file")
    one_line_error(capsys, ["demo", "--data", corpus, "--out", str(afile), *SMALL], "is a file")
    one_line_error(capsys, ["train", "--data", corpus, "--out", str(afile / "run"), *SMALL], "cannot write")
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        one_line_error(capsys, ["train", "--data", corpus, "--out", str(ro / "run"), *SMALL], "cannot write")


def test_batch_size_that_cannot_fit(tmp_path, corpus, capsys):
    big = [a if a != "4" else "100000000" for a in SMALL]  # --batch-size 100000000
    line = one_line_error(capsys, ["train", "--data", corpus, "--out", str(tmp_path / "big"), *big], "needs about")
    assert "batch_size 100000000" in line and "is available" in line and "--batch-size ≤" in line
    assert not (tmp_path / "big" / "meta.json").exists()


# ----------------------------------------------------------------------------- bad input
def test_unknown_placement(capsys, tmp_path):
    one_line_error(capsys, ["train", "--placement", "sandwich", "--out", str(tmp_path / "x")], "placement")


def test_unknown_preset(capsys, tmp_path):
    one_line_error(capsys, ["train", "--preset", "huge", "--out", str(tmp_path / "x")], "unknown preset 'huge'")


def test_missing_data_file(capsys, tmp_path):
    line = one_line_error(capsys, ["train", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x"), *SMALL],
                          "not found")
    assert "nope.txt" in line
    assert not (tmp_path / "x").exists()  # nothing written before the check


def test_corpus_shorter_than_a_window(capsys, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abc" * 5)
    one_line_error(capsys, ["train", "--data", str(short), "--out", str(tmp_path / "x"), *SMALL], "seq_len")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(capsys, tmp_path):
    one_line_error(capsys, ["train", "--device", "cuda", "--out", str(tmp_path / "x"), *SMALL], "CUDA is not available")
    one_line_error(capsys, ["demo", "--device", "cuda", "--out", str(tmp_path / "d")], "CUDA is not available")


def test_report_on_a_non_run_dir(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "rep")],
                   "not an lnprobe run directory")
    one_line_error(capsys, ["report", str(tmp_path / "missing"), "--out", str(tmp_path / "rep")],
                   "does not exist")


def test_other_bad_options(capsys, tmp_path, trained):
    one_line_error(capsys, ["train", "--steps", "many"], "invalid int value")
    one_line_error(capsys, ["train", "--every", "sometimes", "--out", str(tmp_path / "x"), *SMALL], "schedule")
    one_line_error(capsys, ["train", "--dtype", "fp8", "--out", str(tmp_path / "x"), *SMALL], "dtype")
    one_line_error(capsys, ["train", "--d-model", "30", "--heads", "4", "--out", str(tmp_path / "x")], "divisible")
    one_line_error(capsys, ["train", "--resume", "--out", str(tmp_path / "fresh"), *SMALL], "no checkpoint")
    one_line_error(capsys, ["compare", str(trained), "--out", str(tmp_path / "c")], "at least two")
    one_line_error(capsys, ["inspect", "--hf", "mamba"], "unknown --hf model type")
    one_line_error(capsys, ["demo", "--jobs", "0", "--out", str(tmp_path / "d")], "--jobs")
    one_line_error(capsys, ["frobnicate"], "invalid choice")
    one_line_error(capsys, [], "required")


def test_fsdp_needs_torchrun(capsys, tmp_path, corpus):
    one_line_error(capsys, ["train", "--fsdp", "--data", corpus, "--out", str(tmp_path / "x"), *SMALL], "torchrun")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- export
def test_export_tensorboard(trained, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert main(["export", "--tensorboard", str(trained), "--out", str(out)]) == 0
    assert f"wrote TensorBoard events to {out}" in capsys.readouterr().out
    acc = EventAccumulator(str(out), size_guidance={"scalars": 0})
    acc.Reload()
    r = lnprobe.load_run(trained).records
    loss = r[(r["site"] == "train") & (r["stat"] == "loss")].sort_values("step")
    ev = acc.Scalars("train/loss")
    assert [e.step for e in ev] == loss["step"].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose([e.value for e in ev], loss["value"], rtol=1e-6)  # events hold float32


def test_export_bad_input(capsys, tmp_path, trained, monkeypatch):
    one_line_error(capsys, ["export", "--tensorboard", str(tmp_path / "missing"), "--out", str(tmp_path / "tb")],
                   "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["export", "--tensorboard", str(tmp_path / "empty"), "--out", str(tmp_path / "tb")],
                   "not an lnprobe run directory")
    one_line_error(capsys, ["export", "--out", str(tmp_path / "tb")], "--tensorboard")
    one_line_error(capsys, ["export", "--tensorboard", str(trained)], "--out")
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    line = one_line_error(capsys, ["export", "--tensorboard", str(trained), "--out", str(tmp_path / "tb")],
                          "pip install")
    assert "lnprobe export:" not in line


# ----------------------------------------------------------------------------- report, demo, inspect
def test_report_on_a_run_dir(trained, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(trained), "--out", str(out)]) == 0
    assert (out / "report.md").exists() and (out / "report.html").exists()
    assert list(out.glob("*.png"))
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, corpus, capsys):
    """The default demo path: three runs trained side by side in worker processes, then the real report."""
    out, figures = tmp_path / "demo", tmp_path / "figs"
    code = main(["demo", "--steps", "6", "--every", "2", "--device", "cpu", "--data", corpus, "--out", str(out),
                 "--figures", str(figures), *SMALL])
    assert code == 0
    text = capsys.readouterr().out
    assert "in 3 processes, 1 CPU thread each" in text
    metas = {}
    for placement in ("pre", "peri", "post"):
        run = lnprobe.load_run(out / placement)
        metas[placement] = run.meta
        assert run.meta["status"] == "finished" and run.meta["placement"] == placement
        assert run.meta["config"]["train"]["threads"] == 1
        assert f"{placement} ({out / placement}):" in text
    # same seed and data order for all three
    assert len({m["config"]["train"]["seed"] for m in metas.values()}) == 1
    assert (out / "report" / "report.html").exists()
    pngs = sorted(p.name for p in figures.glob("*.png"))
    assert pngs and pngs == sorted(p.name for p in (out / "report").glob("*.png"))
    assert f"report: {out / 'report' / 'report.html'}" in text
    assert text.count("last-layer resid variance") == 3


def test_demo_sequential_matches_a_single_train(tmp_path, corpus, capsys, monkeypatch):
    """--jobs 1 trains in this process; each run equals `lnprobe train` with the same options.

    The report builder is replaced by a stub here (the test above runs the real one).
    """
    import lnprobe.cli as cli

    calls = []

    def fake_report(runs, out):
        out.mkdir(parents=True)
        (out / "fig.png").write_bytes(b"png")
        calls.append([p.name for p in runs])
        return None

    monkeypatch.setattr(cli, "_build_report", fake_report)
    out, figures = tmp_path / "demo", tmp_path / "figs"
    # the demo and train have different default learning rates (cli.DEMO_LR): pass one to both
    common = ["--steps", "4", "--every", "1", "--lr", "1e-2", "--data", corpus, *SMALL]
    assert main(["demo", "--jobs", "1", "--out", str(out), "--figures", str(figures), *common]) == 0
    assert calls == [["pre", "peri", "post"]]
    assert (figures / "fig.png").read_bytes() == b"png"
    assert main(["train", "--placement", "peri", "--out", str(tmp_path / "peri"), *common]) == 0
    a = lnprobe.load_run(out / "peri").records
    b = lnprobe.load_run(tmp_path / "peri").records
    la = a[a["stat"] == "loss"].sort_values("step")["value"].to_numpy()
    lb = b[b["stat"] == "loss"].sort_values("step")["value"].to_numpy()
    np.testing.assert_array_equal(la, lb)


def test_inspect_reference_gpt(capsys):
    assert main(["inspect", "--placement", "peri", "--d-model", "32", "--layers", "2", "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "placement=peri" in out and "n_layers=2" in out


@pytest.mark.parametrize("model_type, placement", HF_PLACEMENTS.items())
def test_inspect_hf(capsys, model_type, placement):
    pytest.importorskip("transformers")
    assert main(["inspect", "--hf", model_type]) == 0
    out = capsys.readouterr().out
    # an encoder–decoder maps both stacks of 2 blocks
    assert f"placement={placement}" in out and f"n_layers={4 if model_type in ENCODER_DECODERS else 2}" in out


def test_python_dash_m(tmp_path):
    """``python -m lnprobe`` is the same command line; errors exit 2 with one line."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "lnprobe", "train", "--preset", "huge"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("lnprobe: error: unknown preset")
