"""Runs that never lose data: ``lnprobe train`` killed at several points and resumed each time ends
with the records and losses of an uninterrupted run.

One run directory goes through a chain of faults, each in its own process: SIGKILL between two
steps (before the first checkpoint, so the resume restarts at step 0), SIGTERM and SIGINT (the
trainer stops after the step, flushes and checkpoints), an exception raised at a step, SIGKILL
right after a records part is written (before meta.json says so), SIGKILL in the middle of a
checkpoint write, and SIGTERM sent twice (stop at once). Every process after the first is a
``--resume`` of the one before; the last one runs to the end. The steps come from a seeded RNG,
so the plan is the same on every run of the test.

To keep this to seconds, one helper process imports lnprobe once and forks a child per run (the
helper itself runs no torch operation, so no OpenMP pool exists at a fork). Records are flushed at
every step (``--flush-seconds 0``), so every kill leaves records past the last checkpoint that the
resume must drop.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from helpers import write_corpus

import lnprobe

ROOT = Path(__file__).resolve().parents[1]
SEED = 20261201
STEPS = 20
ARGS = ["--d-model", "32", "--layers", "2", "--heads", "2", "--seq-len", "16", "--batch-size", "4", "--no-progress",
        "--steps", str(STEPS), "--every", "2", "--eval-every", "5", "--device", "cpu", "--placement", "peri",
        "--ckpt-every", "3", "--flush-seconds", "0"]
COLUMNS = ["step", "site", "layer", "stat", "value", "token", "channel"]


def plan() -> list[tuple[str, int]]:
    """(fault, argument): a step for the signal/exception faults, a call count for the write faults."""
    rng = random.Random(SEED)
    return [("sigkill", rng.randint(1, 2)),      # before the first checkpoint (step 3)
            ("sigterm", rng.randint(4, 5)),
            ("raise", rng.randint(7, 8)),
            ("kill_after_part", rng.randint(2, 3)),  # the n-th records part of that process
            ("kill_in_checkpoint", 1),          # the first checkpoint write of that process
            ("sigint", rng.randint(14, 15)),
            ("sigterm_twice", rng.randint(17, 18)),
            ("none", 0)]


EXPECTED_CODE = {"sigkill": -9, "sigterm": 143, "raise": 1, "kill_after_part": -9, "kill_in_checkpoint": -9,
                 "sigint": 130, "sigterm_twice": 143, "none": 0}
EXPECTED_STATUS = {"sigkill": "running", "sigterm": "interrupted", "raise": "crashed", "kill_after_part": "running",
                   "kill_in_checkpoint": "running", "sigint": "interrupted", "sigterm_twice": "interrupted",
                   "none": "finished"}

HELPER = textwrap.dedent('''
    import json, os, signal, sys, traceback
    import torch
    import lnprobe.launch as L, lnprobe.store as store, lnprobe.train as T
    from lnprobe.cli import main

    # One CPU thread in every run: bitwise equality needs the same count, and on a loaded machine one
    # thread is several times faster than two competing ones.
    L.cpu_threads = lambda: 1

    def install(kind, arg):
        """Patch this (child) process so that the fault happens where the plan says."""
        if kind in ("sigkill", "sigterm", "sigint", "sigterm_twice", "raise"):
            lr_at = T.lr_at
            def at_step(step, cfg):  # called once per step, before its batch is drawn
                if step == arg:
                    if kind == "raise":
                        raise RuntimeError(f"injected fault at step {step}")
                    sig = {"sigkill": signal.SIGKILL, "sigint": signal.SIGINT}.get(kind, signal.SIGTERM)
                    os.kill(os.getpid(), sig)
                    if kind == "sigterm_twice":
                        os.kill(os.getpid(), sig)
                return lr_at(step, cfg)
            T.lr_at = at_step
        elif kind == "kill_after_part":
            append, calls = store.RunWriter.append, [0]
            def append_then_die(self, frame):
                path = append(self, frame)
                calls[0] += 1
                if calls[0] == arg:
                    os.kill(os.getpid(), signal.SIGKILL)  # the part is on disk, meta.json not yet updated
                return path
            store.RunWriter.append = append_then_die
        elif kind == "kill_in_checkpoint":
            save, calls = torch.save, [0]
            def save_then_die(obj, f, *a, **k):
                save(obj, f, *a, **k)
                calls[0] += 1
                if calls[0] == arg:
                    os.kill(os.getpid(), signal.SIGKILL)  # the temporary file is written, not yet renamed
            torch.save = save_then_die

    def child(kind, arg, argv):
        install(kind, arg)
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)

    runs, results = json.loads(sys.argv[1]), []
    for kind, arg, argv in runs:
        pid = os.fork()
        if pid == 0:
            child(kind, arg, argv)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out = argv[argv.index("--out") + 1]
        meta = json.load(open(os.path.join(out, "meta.json")))
        ckpt = os.path.join(out, "checkpoint.pt")
        step = torch.load(ckpt, weights_only=True)["step"] if os.path.exists(ckpt) else None
        results.append({"kind": kind, "arg": arg, "code": code, "status": meta.get("status"),
                        "heartbeat": meta.get("heartbeat"), "last_step": meta.get("last_step"), "ckpt": step})
    print("RESULTS " + json.dumps(results))
''')


def _records(run_dir: Path) -> pd.DataFrame:
    r = lnprobe.load_run(run_dir).records[COLUMNS]
    return r.sort_values(["step", "site", "layer", "stat"]).reset_index(drop=True)


# one fixture replays the whole chain of interrupted and resumed runs (~80 s on 2 CPU cores)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    corpus = write_corpus(tmp / "corpus.txt", seed=3, prefix="f")
    args = [*ARGS, "--data", str(corpus)]
    runs = [("none", 0, ["train", *args, "--out", str(tmp / "ref")])]
    for i, (kind, arg) in enumerate(plan()):
        runs.append((kind, arg, ["train", *args, "--out", str(tmp / "chain"), *(["--resume"] if i else [])]))
    script = tmp / "helper.py"
    script.write_text(HELPER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, str(script), json.dumps(runs)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULTS "):])
    return tmp, results[0], results[1:], p.stderr


def test_each_fault_ends_as_expected(chain):
    _, ref, results, stderr = chain
    assert ref["code"] == 0 and ref["status"] == "finished"
    assert [r["kind"] for r in results] == [k for k, _ in plan()]
    for r in results:
        assert r["code"] == EXPECTED_CODE[r["kind"]], (r, stderr[-3000:])
        assert r["status"] == EXPECTED_STATUS[r["kind"]], r
    first = results[0]  # SIGKILLed at step a before any checkpoint: still "running", the heartbeat says where
    assert first["ckpt"] is None and first["heartbeat"]["step"] == first["arg"] - 1
    assert {"time", "unix", "pid", "host"} <= set(first["heartbeat"])
    term = results[1]  # SIGTERM at step b: that step finishes, then records and the checkpoint of b + 1
    assert term["ckpt"] == term["arg"] + 1 and term["last_step"] == term["arg"]
    assert "SIGTERM received: stopping after this step" in stderr
    crash = results[2]  # an exception at step c: the last checkpoint before c (a multiple of 3)
    assert crash["ckpt"] == crash["arg"] // 3 * 3 and crash["last_step"] == crash["arg"] - 1
    assert results[-1]["ckpt"] == STEPS


def test_records_and_losses_equal_an_uninterrupted_run(chain):
    tmp, _, _, _ = chain
    ref, got = _records(tmp / "ref"), _records(tmp / "chain")
    key = ["step", "site", "layer", "stat"]
    assert not got.duplicated(key).any()
    loss = got[(got.site == "train") & (got.stat == "loss")]
    assert list(loss.step) == list(range(STEPS))  # contiguous, each step once
    pd.testing.assert_frame_equal(got, ref)  # every value bitwise (CPU, same thread count)
    assert not list((tmp / "chain").glob(".checkpoint.pt.tmp-*"))  # the cut-short checkpoint write is gone


def test_meta_records_every_resume(chain):
    tmp, _, results, _ = chain
    meta = lnprobe.load_run(tmp / "chain").meta
    assert meta["status"] == "finished"
    resumes = meta["resumes"]
    assert len(resumes) == len(results) - 1 and all(r["changed"] == {} for r in resumes)
    assert resumes[0]["step"] == 0 and resumes[0]["previous_status"] == "running"  # restarted: no checkpoint yet
    assert [r["step"] for r in resumes] == [r["ckpt"] or 0 for r in results[:-1]]
