"""`lnprobe train` under torchrun: 2 CPU processes (gloo), DDP and FSDP2, against one process.

Two launches of ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m lnprobe train``
(DDP, then ``--fsdp``; started side by side) train a tiny GPT for 3 steps on a global batch of 4.
The reference is ``lnprobe train`` in this process with the same options: the records must agree
(the gradient all-reduce changes only float rounding), and so must the checkpoints' weights.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_corpus

import lnprobe
from lnprobe import train as T
from lnprobe.cli import main
from lnprobe.launch import Launch, mean_across_ranks, rank_device

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
ARGS = ["--d-model", "32", "--layers", "2", "--heads", "2", "--seq-len", "16", "--batch-size", "4", "--no-progress",
        "--steps", "3", "--every", "1", "--eval-every", "2", "--device", "cpu", "--placement", "peri"]
KEY = ["step", "site", "layer", "stat"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """This module's own corpus (40 words, not conftest's 50): the checkpoint tolerance below was set on it."""
    return str(write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", seed=2, prefix="d", vocab=40))


def _torchrun(out: Path, corpus: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a launch of its own, whatever this process runs under
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           "-m", "lnprobe", "train", *ARGS, "--data", corpus, "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """{'ddp', 'fsdp', 'single'}: (run dir, exit code, output). The launches run while the reference trains."""
    out = tmp_path_factory.mktemp("train_dist")
    procs = {"ddp": _torchrun(out / "ddp", corpus), "fsdp": _torchrun(out / "fsdp", corpus, "--fsdp")}
    code = main(["train", *ARGS, "--data", corpus, "--out", str(out / "single")])
    result = {"single": (out / "single", code, "")}
    for name, p in procs.items():
        try:
            o, _ = p.communicate(timeout=240)  # a hang fails the tests instead of blocking CI
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            pytest.fail(f"torchrun ({name}) did not finish within 240 s")
        result[name] = (out / name, p.returncode, o.decode(errors="replace"))
    return result


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_launch_finished_and_only_rank0_printed(runs, kind):
    run_dir, code, output = runs[kind]
    assert code == 0, output
    assert output.count(f"run {run_dir}: finished after 3 steps") == 1, output  # rank 1 prints nothing
    assert f"trained on 2 processes ({'FSDP2' if kind == 'fsdp' else 'DDP'}), global batch 4" in output
    meta = lnprobe.load_run(run_dir).meta
    assert meta["status"] == "finished" and meta["distributed"]["world_size"] == 2
    assert meta["config"]["world_size"] == 2 and meta["config"]["parallel"] == ("fsdp2" if kind == "fsdp" else "ddp")
    assert meta["config"]["train"]["batch_size"] == 4  # the global batch


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_records_equal_one_process_on_the_global_batch(runs, kind):
    ref = lnprobe.load_run(runs["single"][0]).records
    run = lnprobe.load_run(runs[kind][0]).records
    m = ref.merge(run, on=KEY, suffixes=("_ref", "_run"), how="outer", indicator=True)
    assert (m._merge == "both").all(), m[m._merge != "both"][KEY].head()  # the same rows, none twice
    assert len(run) == len(ref)

    def pair(mask):
        sel = m[mask].sort_values(KEY)
        assert len(sel), "no rows selected"
        return sel.value_run.to_numpy(), sel.value_ref.to_numpy()

    train = m.site == "train"
    loss, loss_ref = pair(train & (m.stat == "loss"))
    assert len(loss) == 3
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)  # mean of the ranks' losses = global-batch loss
    val, val_ref = pair(train & (m.stat == "val_loss"))
    assert len(val) == 3  # steps 0, 2 and the final parameters (3)
    np.testing.assert_allclose(val, val_ref, rtol=1e-5)
    np.testing.assert_allclose(*pair(train & (m.stat == "lr")), rtol=1e-12)
    m2, m2_ref = pair((m.site == "resid") & (m.stat == "m2"))
    assert len(m2) == 3 * 3  # 3 steps × layers 0..2
    np.testing.assert_allclose(m2, m2_ref, rtol=1e-5)
    gn, gn_ref = pair(m.site.str.startswith("param:") & (m.stat == "grad_norm"))
    assert len(gn) >= 3 * 10 and (gn_ref > 0).all()
    np.testing.assert_allclose(gn, gn_ref, rtol=1e-5)
    np.testing.assert_allclose(*pair(train & (m.stat == "grad_norm")), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_rank0_checkpoint_holds_the_unwrapped_full_model(runs, kind):
    ref = torch.load(runs["single"][0] / T.CHECKPOINT_NAME, weights_only=True)
    ckpt = torch.load(runs[kind][0] / T.CHECKPOINT_NAME, weights_only=True)
    assert ckpt["step"] == 3 and set(ckpt["model"]) == set(ref["model"])  # no "module." prefix, no shards
    for k, v in ref["model"].items():
        assert ckpt["model"][k].shape == v.shape, k
        # atol 1e-6 (weights have std 0.02): AdamW's update g/sqrt(v) turns the all-reduce's rounding of
        # a near-zero gradient element into a difference of up to ~1e-7 in that weight.
        torch.testing.assert_close(ckpt["model"][k], v, rtol=1e-5, atol=1e-6)
    assert (ckpt["optimizer"] is None) == (kind == "fsdp")


@pytest.mark.slow
def test_ddp_checkpoint_resumes_in_one_process(runs, corpus, tmp_path):
    """A DDP checkpoint is a plain one: a single process continues it (here to 4 steps)."""
    import shutil

    run_dir = tmp_path / "ddp"
    shutil.copytree(runs["ddp"][0], run_dir)
    args = [a if a != "3" else "4" for a in ARGS]  # --steps 4 (the only "3" among the options)
    assert main(["train", *args, "--data", corpus, "--out", str(run_dir), "--resume", "--force"]) == 0
    run = lnprobe.load_run(run_dir)
    assert run.meta["resumed_from"] == [3] and run.meta["status"] == "finished"
    assert run.meta["resumes"][0]["changed"] == {"steps": [3, 4]}
    loss = run.records[(run.records.site == "train") & (run.records.stat == "loss")].sort_values("step")
    assert list(loss.step) == [0, 1, 2, 3] and np.isfinite(loss.value).all()


@pytest.mark.slow
def test_fsdp_checkpoint_refuses_resume(runs, corpus, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "fsdp"
    shutil.copytree(runs["fsdp"][0], run_dir)
    args = [a if a != "3" else "4" for a in ARGS]
    with pytest.raises(SystemExit) as exc:
        main(["train", *args, "--data", corpus, "--out", str(run_dir), "--resume"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "written by an --fsdp run" in err


# ----------------------------------------------------------------------------- checks before any launch
def test_distributed_config_errors():
    cpu = torch.device("cpu")
    two = Launch(rank=0, world=2, local_rank=0, local_world=2)
    with pytest.raises(T.ConfigError, match="divisible"):
        rank_device(two, cpu, batch_size=5)
    with pytest.raises(T.ConfigError, match="--resume with --fsdp"):
        rank_device(two, cpu, batch_size=4, fsdp=True, resume=True)
    with pytest.raises(T.ConfigError, match="fp16"):
        rank_device(two, cpu, batch_size=4, fsdp=True, dtype="fp16")
    with pytest.raises(T.ConfigError, match="single process"):
        rank_device(Launch(), cpu, batch_size=16, fsdp=True)
    assert rank_device(two, cpu, batch_size=4) == cpu
    assert rank_device(Launch(), cpu, batch_size=5, resume=True) == cpu  # one process


def test_mean_across_ranks_is_the_value_in_one_process():
    v = mean_across_ranks(torch.tensor(2.5, dtype=torch.float32), Launch())
    assert v.dtype == torch.float64 and v.item() == 2.5


@pytest.mark.slow
def test_sigterm_stops_every_rank_after_the_same_step(corpus, tmp_path):
    """SIGTERM to torchrun (as Slurm or kill sends it): the agent passes it to the ranks, which agree
    on one last step (lnprobe.launch.loss_and_stop), flush, checkpoint and end 'interrupted'."""
    import json
    import signal
    import time

    out = tmp_path / "term"
    args = [a if a != "3" else "100000" for a in ARGS]  # --steps 100000: only the signal ends it
    p = _torchrun(out, corpus, *args[args.index("--steps"):args.index("--steps") + 2], "--flush-seconds", "0")
    meta_path, deadline = out / "meta.json", time.monotonic() + 180
    try:
        while time.monotonic() < deadline:  # wait until a few steps are on disk (a heartbeat at every flush)
            try:
                if json.loads(meta_path.read_text()).get("heartbeat", {}).get("step", -1) >= 3:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        output, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    output = output.decode(errors="replace")
    assert p.returncode != 0
    run = lnprobe.load_run(out)
    assert run.meta["status"] == "interrupted", output[-3000:]
    last = run.meta["last_step"]
    ckpt = torch.load(out / T.CHECKPOINT_NAME, weights_only=True)
    assert ckpt["step"] == last + 1 and ckpt["optimizer"] is not None
    loss = run.records[(run.records.site == "train") & (run.records.stat == "loss")]
    assert sorted(loss.step) == list(range(last + 1))
    assert "SIGTERM received: stopping after this step" in output
