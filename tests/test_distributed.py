"""Probe under torch.distributed: DDP and FSDP2 on 2 CPU processes (gloo) against one process.

One launch of two worker processes (this file run as a script) trains the same 3 steps with DDP,
then with a compiled DDP model, then with FSDP2, then with a layout that differs between ranks,
then with a rank that fails inside the flush. The tests compare their run directories with a single
process on the same global batch.
"""
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from helpers import exit_worker, launch_workers  # noqa: E402
from nanogpt import NanoGPT  # noqa: E402

import lnprobe  # noqa: E402

VOCAB, T, GLOBAL_B, STEPS, WORLD = 64, 16, 8, 3, 2
PROBE_KW = dict(sites="all", stats="all", grad_sites="all", flush_every=2)
SPARSE_KW = dict(PROBE_KW, every=2)  # step 1 unrecorded: its per-step train rows (loss, grad_norm, lr) are reduced


class ScaledGPT(NanoGPT):
    """NanoGPT with a 1-element parameter: under FSDP2 on 2 ranks one rank holds an empty shard."""

    def __init__(self):
        super().__init__(vocab=VOCAB, block_size=T)
        self.logit_scale = nn.Parameter(torch.ones(1))

    def forward(self, idx, targets=None):
        logits, _ = super().forward(idx)
        logits = logits * self.logit_scale  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def make_model():
    torch.manual_seed(0)
    return ScaledGPT()


def global_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, VOCAB, (GLOBAL_B, T), generator=g)
    return x, torch.roll(x, -1, 1)


def train(model, probe, rank=0, world=1, grad_log=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        x, y = global_batch(step)
        per = GLOBAL_B // world
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        _, loss = model(x, y)
        loss.backward()
        probe.step(loss=loss, lr=0.5)
        if grad_log is not None:
            grad_log.append([float(p.grad.norm()) for p in model.parameters()])
        opt.step()
        opt.zero_grad()


# ----------------------------------------------------------------------------- worker (a script)
def worker(out: Path) -> int:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lnprobe.distributed import ProbeDistributedError

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        # DDP: gradients averaged by DDP, parameters replicated.
        model = DDP(make_model())
        grads = []
        with lnprobe.attach(model, out / "ddp", **PROBE_KW) as probe:
            train(model, probe, rank, WORLD, grads)
        np.save(out / f"ddp_grad_norms_rank{rank}.npy", np.array(grads))

        # DDP under torch.compile: the traced hooks (lnprobe.traced) inside DDP's compiled graphs.
        model = torch.compile(DDP(make_model()), backend="aot_eager")
        with lnprobe.attach(model, out / "ddp_compiled", **PROBE_KW) as probe:
            train(model, probe, rank, WORLD)

        # FSDP2: every block and the root sharded; the 1-element logit_scale leaves rank 1 an empty shard.
        model = make_model()
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        with lnprobe.attach(model, out / "fsdp", **PROBE_KW) as probe:
            train(model, probe, rank, WORLD)

        # Per-step train scalars of an unrecorded step under DDP and FSDP2 (lnprobe.stepscalars).
        model = DDP(make_model())
        with lnprobe.attach(model, out / "ddp_sparse", **SPARSE_KW) as probe:
            train(model, probe, rank, WORLD)
        model = make_model()
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        with lnprobe.attach(model, out / "fsdp_sparse", **SPARSE_KW) as probe:
            train(model, probe, rank, WORLD)

        # Layouts differ: rank 1 stops recording one hook point, so its rows lack that site.
        model = DDP(make_model())
        with lnprobe.attach(model, out / "mismatch", **PROBE_KW) as probe:
            if rank == 1:
                point = probe.map.site_points()[("resid", 1)]
                probe._failed_points.add(point)
                lost = [[s, l] for (s, l), p in probe.map.site_points().items() if p == point]
                (out / "mismatch_lost.json").write_text(json.dumps(lost))
            train(model, probe, rank, WORLD)

        # Resume: a second probe continues after the first one's last step on every rank (rank 0 reads
        # meta.json and broadcasts the step).
        model = DDP(make_model())
        with lnprobe.attach(model, out / "resume", flush_every=2) as probe:
            train(model, probe, rank, WORLD)
        with lnprobe.attach(model, out / "resume", flush_every=2, resume=True) as probe:
            (out / f"resume_first_step_rank{rank}.txt").write_text(str(probe.current_step))
            train(model, probe, rank, WORLD)

        # A rank that raises inside the flush: every rank must raise, naming it, instead of hanging.
        model = DDP(make_model())
        try:
            with lnprobe.attach(model, out / "fail", **PROBE_KW) as probe:
                if rank == 1:
                    def boom(buf):
                        raise ValueError("injected failure in the flush")
                    probe._local_rows = boom
                train(model, probe, rank, WORLD)
        except ProbeDistributedError as exc:
            (out / f"fail_rank{rank}.txt").write_text(str(exc))
            return 3
        return 0
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    codes, outputs = launch_workers(__file__, "--worker", str(out), world=WORLD)
    return out, codes, outputs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    model = make_model()
    with lnprobe.attach(model, out / "single", **PROBE_KW) as probe:
        train(model, probe)
    return lnprobe.load_run(out / "single").records


KEY = ["step", "site", "layer", "stat"]
MOMENTS = ["m2", "var", "rms", "kurtosis", "grad_rms", "grad_norm", "param_norm", "gain_ms", "bias_ms", "loss", "lr"]
MAXIMA = ["absmax", "top1", "top2", "top3", "grad_absmax", "gain_absmax"]
COUNTS = ["nonfinite", "over_fp16", "massive", "nonfinite_loss"]


def compare(records, ref):
    m = ref.merge(records, on=KEY, suffixes=("_ref", "_run"), how="outer", indicator=True)
    assert (m._merge == "both").all(), m[m._merge != "both"][KEY].head()
    mom = m[m.stat.isin(MOMENTS)]
    np.testing.assert_allclose(mom.value_run, mom.value_ref, rtol=1e-5, atol=1e-9)
    mx = m[m.stat.isin(MAXIMA)]
    # Step 0 has the same weights: maxima are exact. Later steps follow weights updated with a gradient
    # that was averaged across ranks, equal to the one-process gradient up to float rounding.
    first = mx.step == 0
    assert (mx.value_run[first] == mx.value_ref[first]).all()
    np.testing.assert_allclose(mx.value_run, mx.value_ref, rtol=1e-6)
    loc = m[m.stat.isin(["absmax", "top1", "top2", "top3"])]
    assert loc.token_run.notna().all()
    assert (loc.token_run == loc.token_ref).all() and (loc.channel_run == loc.channel_ref).all()
    cnt = m[m.stat.isin(COUNTS)]
    assert (cnt.value_run == cnt.value_ref).all()
    med = m[m.stat == "median_abs"]  # mean of two half-sample medians: an estimate, within a few %
    np.testing.assert_allclose(med.value_run, med.value_ref, rtol=0.05)
    return m


def test_workers_finished(launched):
    out, codes, outputs = launched
    assert codes == [3, 3], "\n".join(outputs)  # 3: the injected flush failure was raised on both ranks


def test_ddp_records_equal_one_process_on_the_global_batch(launched, reference):
    out, _, _ = launched
    run = lnprobe.load_run(out / "ddp")
    assert run.meta["distributed"]["world_size"] == 2 and run.meta["status"] == "finished"
    m = compare(run.records, reference)
    # two flushes, written by rank 0 only and compacted at close (lnprobe.store.compact)
    assert set(m.step) == {0, 1, 2} and len(lnprobe.store.read_manifest(out / "ddp")["parts"]) == 2
    # Parameter norms under DDP: the averaged gradients are the same on both ranks.
    g0, g1 = (np.load(out / f"ddp_grad_norms_rank{r}.npy") for r in range(2))
    np.testing.assert_array_equal(g0, g1)


def test_compiled_ddp_records_equal_one_process_on_the_global_batch(launched, reference):
    out, _, _ = launched
    run = lnprobe.load_run(out / "ddp_compiled")
    assert run.meta["distributed"]["world_size"] == 2
    m = compare(run.records, reference)
    assert {"grad_rms", "absmax"} <= set(m.stat) and set(m.step) == {0, 1, 2}


def test_fsdp2_records_equal_one_process_on_the_global_batch(launched, reference):
    out, _, _ = launched
    run = lnprobe.load_run(out / "fsdp")
    m = compare(run.records, reference)
    scale = m[(m.site == "param:logit_scale") & (m.stat == "grad_norm")]
    assert len(scale) == 3 and (scale.value_run > 0).all()  # rank 1's shard of it is empty


@pytest.mark.parametrize("name", ["ddp_sparse", "fsdp_sparse"])
def test_unrecorded_steps_train_scalars_equal_one_process(launched, tmp_path, name):
    out, _, _ = launched
    model = make_model()
    with lnprobe.attach(model, tmp_path / "single", **SPARSE_KW) as probe:
        train(model, probe)
    ref = lnprobe.load_run(tmp_path / "single").records
    m = compare(lnprobe.load_run(out / name).records, ref)
    one = m[m.step == 1]
    assert set(one.site) == {"train"} and set(one.stat) == {"loss", "grad_norm", "lr"}


def test_ranks_with_different_rows_are_aligned_on_their_union(launched, reference):
    out, _, _ = launched
    r = lnprobe.load_run(out / "mismatch").records
    lost = {tuple(k) for k in json.loads((out / "mismatch_lost.json").read_text())}
    assert ("resid", 1) in lost
    hit = np.array([(s, l) in lost for s, l in zip(r.site, r.layer)])
    assert len(r) == len(reference) and hit.any()
    # Rows that both ranks recorded are the full reduction; the others come from rank 0 alone.
    ref_hit = np.array([(s, l) in lost for s, l in zip(reference.site, reference.layer)])
    compare(r[~hit], reference[~ref_hit])
    assert r[hit & r.stat.isin(MOMENTS)].value.notna().all()


def test_a_rank_failing_in_flush_fails_every_rank_naming_it(launched):
    out, _, _ = launched
    for rank in range(2):
        msg = (out / f"fail_rank{rank}.txt").read_text()
        assert "rank 1" in msg and "injected failure in the flush" in msg, msg
    meta = json.loads((out / "fail" / "meta.json").read_text())
    assert meta["status"] == "crashed"


def test_resume_continues_the_step_numbering_on_every_rank(launched):
    out, _, _ = launched
    assert [(out / f"resume_first_step_rank{r}.txt").read_text() for r in range(WORLD)] == [str(STEPS)] * WORLD
    assert sorted(lnprobe.load_run(out / "resume").records.step.unique()) == list(range(2 * STEPS))


def test_not_distributed_without_a_process_group(tmp_path):
    from lnprobe import distributed as D

    assert D.context() is None
    model = make_model()
    with lnprobe.attach(model, tmp_path / "r") as probe:
        assert probe._dist is None
    with pytest.raises(RuntimeError, match="init_process_group"):
        lnprobe.attach(model, tmp_path / "r2", distributed=True)


def test_empty_fsdp_shard_of_a_norm_carries_no_weight():
    from lnprobe import stats as S
    from lnprobe.paramstats import gain_values as _gain_values

    w, b = torch.randn(8), torch.randn(8)
    torch.testing.assert_close(_gain_values(w, 1.0, b), S.gain_stats(w, 1.0, b))
    empty = _gain_values(torch.zeros(0), 1.0, torch.zeros(0))  # this rank's shard of a small norm
    assert torch.isnan(empty[0]) and torch.isneginf(empty[1]) and torch.isnan(empty[2])


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    exit_worker(worker(Path(sys.argv[2])))
