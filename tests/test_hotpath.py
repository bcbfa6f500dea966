"""Budgets of the accelerator hot path, counted in dispatched device operations (lnprobe.opcount).

On a GPU the cost of the probe is kernel launches and passes over memory, which a CPU test cannot
time but can count: ``OpCounter`` (a TorchDispatchMode) sees every aten operation, the fused Triton
kernel reports its own launch. The accelerator path runs here on CPU tensors (``CPU_ROW_SKIPPING``
off, as ``LNPROBE_ACCELERATOR_PATH=1`` sets it), the Triton kernel through Triton's interpreter.
Budgets (design page section 6): per probed tensor in the hooks at most 5 operations at residual
stream sites (top-k, median, counts), 3 at branch sites, no temporary of the activation's size and no
float32 copy of a bf16 activation; probe.step() of a recorded step a fixed number of operations,
whatever the number of sites, at most ``STEP_BUDGET`` on every reduction path.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import lnprobe
from lnprobe import stats as S
from lnprobe.models import GPT, GPTConfig
from lnprobe.opcount import OpCounter

pytest.importorskip("triton")

STREAM_BUDGET, BRANCH_BUDGET = 5, 3  # device operations per probed tensor in a hook
STEP_BUDGET = 49  # device operations of probe.step() on a recorded step (finalize, norms, rows), every path


@pytest.fixture
def accelerator_path(monkeypatch):
    monkeypatch.setattr(S, "CPU_ROW_SKIPPING", False)


def _ops(x: torch.Tensor, stats) -> OpCounter:
    plan = S.StatPlan(tuple(stats))
    S.reduce_activation(x, plan)  # first call builds the kernel
    with OpCounter() as c:
        S.reduce_activation(x, plan)
    return c


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_per_probed_tensor_within_budget(accelerator_path, dtype):
    x = (torch.randn(8, 64, 128) * 3).to(dtype)  # (B, T, D)
    act_bytes = x.numel() * x.element_size()
    for stats, budget in ((S.DEFAULT_ACTIVATION_STATS, STREAM_BUDGET), (S.default_stats("attn_out"), BRANCH_BUDGET),
                          (S.ACTIVATION_STATS, STREAM_BUDGET)):
        c = _ops(x, stats)
        assert c.names["lnprobe.token_pass"] == 1, dict(c.names)
        assert c.kernels <= budget, f"{c.kernels} device operations for {len(stats)} statistics: {dict(c.names)}"
        assert "_to_copy" not in c.names, "a dtype copy of the activation"
        assert c.largest < act_bytes / 8, f"a temporary of {c.largest} bytes for a {act_bytes}-byte activation"


def test_the_budget_check_fails_on_the_unfused_path(accelerator_path, monkeypatch):
    """Counter-example: the fixed-shape torch fallback (today's accelerator path before the kernel)
    dispatches several times the budget and makes activation-sized temporaries; the checks see it."""
    monkeypatch.setattr(S, "FUSED_KERNEL", False)
    x = torch.randn(8, 64, 128).bfloat16()
    c = _ops(x, S.DEFAULT_ACTIVATION_STATS)
    assert S.reduction_path(x) == "torch"
    assert c.kernels > 4 * STREAM_BUDGET and "_to_copy" in c.names
    assert c.largest >= x.numel() * 4  # the float32 copy


def _values(x, path_fused: bool, monkeypatch):
    monkeypatch.setattr(S, "CPU_ROW_SKIPPING", not path_fused)
    plan = S.StatPlan(S.ACTIVATION_STATS)
    parts = [S.reduce_activation(c, plan) for c in x.chunk(2, 0)]  # two micro-batches
    return S.finalize_activation(parts, S.ACTIVATION_STATS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_path_records_what_the_cpu_path_records(monkeypatch, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, 48, generator=g) * 2 + 0.3
    x[1, 3, 7] = 900.0  # above 100 but below 1000 × median (≈ 1.4): not massive
    x[2, 5, 1] = 5000.0  # massive
    x[0, 9, 2] = float("nan")  # in the first micro-batch's median sample: no massive count there
    x[3, 1, 4] = float("-inf")
    x = x.to(dtype)
    vf, lf = _values(x, True, monkeypatch)
    vc, lc = _values(x, False, monkeypatch)
    np.testing.assert_allclose(vf.numpy(), vc.numpy(), rtol=2e-6, equal_nan=True)
    np.testing.assert_array_equal(lf.numpy(), lc.numpy())
    named = dict(zip(S.ACTIVATION_STATS, vf.tolist()))
    assert named["nonfinite"] == 2 and named["massive"] == 2  # 5000 and -inf (second micro-batch)


def test_fused_kurtosis_and_zero_variance_tokens(monkeypatch):
    x = torch.randn(2, 8, 33)
    x[0, 2] = 1.5  # a token of constant value: variance 0, kurtosis contribution 0
    vf, _ = _values(x, True, monkeypatch)
    vc, _ = _values(x, False, monkeypatch)
    np.testing.assert_allclose(vf.numpy(), vc.numpy(), rtol=2e-6, equal_nan=True)


def _gpt(layers: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, seq_len=32, d_model=64, n_layers=layers, n_heads=4, placement="pre"))


def _step_ops(layers: int, tmp_path, stats=None) -> tuple[float, int, int]:
    """(hook operations per probed tensor, operations of probe.step(), probed tensors) of one recorded
    training step of the reference GPT with the default probe (``stats``: attach's, default if None)."""
    model = _gpt(layers)
    x = torch.randint(0, 64, (4, 32))
    y = torch.roll(x, -1, 1)

    def forward_backward():
        _, loss = model(x, y)
        loss.backward()
        return loss

    forward_backward()
    model.zero_grad()
    with OpCounter() as bare:
        forward_backward()
    model.zero_grad()
    kw = {} if stats is None else {"stats": stats}
    probe = lnprobe.attach(model, tmp_path / f"run{layers}{stats or ''}", every=1, flush_every=10**6, **kw)
    forward_backward()
    probe.step()
    model.zero_grad()
    with OpCounter() as probed:
        loss = forward_backward()
    tensors = len({id(p) for acc in probe._acc.values() for p in acc.parts})
    tensors += sum(len(acc.grads) for acc in probe._acc.values())
    with OpCounter() as step:
        probe.step(loss=loss)
    probe.close()
    return (probed.kernels - bare.kernels) / tensors, step.kernels, tensors


def test_training_step_budget_and_finalize_independent_of_sites(accelerator_path, tmp_path):
    per_tensor2, step2, n2 = _step_ops(2, tmp_path)
    per_tensor4, step4, n4 = _step_ops(4, tmp_path)
    assert n4 > n2
    assert per_tensor2 <= 4 and per_tensor4 <= 4, (per_tensor2, per_tensor4)
    assert step2 == step4, f"probe.step() grows with the number of sites: {step2} -> {step4} operations"
    assert step4 <= STEP_BUDGET, step4


PATHS = {"fused": (False, True), "torch": (False, False), "cpu": (True, True)}  # CPU_ROW_SKIPPING, FUSED_KERNEL


@pytest.mark.parametrize("path, stats", [("fused", "all"), ("torch", None), ("cpu", None), ("cpu", "all")])
def test_step_budget_on_every_reduction_path(monkeypatch, tmp_path, path, stats):
    monkeypatch.setattr(S, "CPU_ROW_SKIPPING", PATHS[path][0])
    monkeypatch.setattr(S, "FUSED_KERNEL", PATHS[path][1])
    _, step2, _ = _step_ops(2, tmp_path, stats)
    _, step4, _ = _step_ops(4, tmp_path, stats)
    assert step2 == step4, f"probe.step() grows with the number of sites on the {path} path: {step2} -> {step4}"
    assert step4 <= STEP_BUDGET, step4


def test_the_step_budget_check_fails_on_a_per_site_operation(accelerator_path, monkeypatch, tmp_path):
    """Counter-example: one more operation per site in the finalize (the old per-site conversion of the
    medians) makes probe.step() grow with the layers and exceed the budget; the checks see it."""
    packed = S.finalize_activations_packed

    def per_site(groups):
        for g in groups:
            for p in g:
                if p.sample is not None:
                    p.sample.double()  # one small kernel per site
        return packed(groups)

    monkeypatch.setattr(S, "finalize_activations_packed", per_site)
    _, step2, _ = _step_ops(2, tmp_path)
    _, step4, _ = _step_ops(4, tmp_path)
    assert step4 > step2 and step4 > STEP_BUDGET


def _site_parts(x: torch.Tensor, stats, micro_batches: int = 1) -> list:
    plan = S.StatPlan(tuple(stats))
    return [S.reduce_activation(c, plan) for c in x.chunk(micro_batches, 0)]


def _unique(shape, dtype, seed: int) -> torch.Tensor:
    """Values k/8 (k a permutation, shifted): exact in bf16 and fp16, no ties among the largest |x|."""
    n = int(np.prod(shape))
    k = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).float() - n // 3
    return (k / 8).reshape(shape).to(dtype)


def _finalize_ops(groups) -> int:
    S.finalize_activations_packed(groups)  # the first call of a layout builds its tables
    with OpCounter() as c:
        S.finalize_activations_packed(groups)
    return c.kernels


def test_finalize_operations_do_not_grow_with_sites_micro_batches_or_dtypes(accelerator_path):
    def groups(n_sites, micro_batches, dtypes):
        return [_site_parts(_unique((2, 8, 16 * (1 + i % 2)), dtypes[i % len(dtypes)], i),
                            S.ACTIVATION_STATS if i % 3 == 0 else S.DEFAULT_ACTIVATION_STATS, micro_batches)
                for i in range(n_sites)]

    one = _finalize_ops(groups(3, 1, [torch.float32]))
    assert _finalize_ops(groups(9, 2, [torch.float32])) == one
    two = _finalize_ops(groups(4, 1, [torch.bfloat16, torch.float32]))  # autocast: bf16 branches, fp32 stream
    assert _finalize_ops(groups(10, 2, [torch.bfloat16, torch.float32])) == two
    # candidates and median samples: per extra dtype one more concatenation and one conversion, and one
    # concatenation that puts the sites' rows in order
    assert two == one + 2 * 3, (one, two)


@pytest.mark.parametrize("fused", [True, False])
def test_batched_finalize_of_mixed_dtypes_equals_one_site_at_a_time(monkeypatch, fused):
    monkeypatch.setattr(S, "CPU_ROW_SKIPPING", not fused)  # fused: candidates and samples in x's dtype
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16]
    shapes = [(2, 8, 16), (3, 4, 32), (1, 1, 2), (2, 5, 24)]
    groups = [_site_parts(_unique(shape, dt, i), S.ACTIVATION_STATS, 2 if i == 1 else 1)
              for i, (dt, shape) in enumerate(zip(dtypes, shapes))]
    values, loc = S.finalize_activations(groups)
    for i, parts in enumerate(groups):
        v, l = S.finalize_activation(parts, S.ACTIVATION_STATS)
        np.testing.assert_array_equal(values[i].numpy(), v.numpy())
        np.testing.assert_array_equal(loc[:, i].numpy(), l.numpy())
    assert np.isnan(values[2, S.ACTIVATION_STATS.index("top3")].item())  # 2 elements: no third


def test_a_site_with_parts_of_two_widths_and_two_reduction_paths(monkeypatch):
    """Parts of one site that differ in channels (narrow candidate rows padded within the site's row)
    and in reduction path (float32 block rows and float64 sums in one concatenation)."""
    wide = _unique((2, 4, 16), torch.float32, 1)  # |x| ≤ 10.5
    narrow = _unique((1, 3, 8), torch.float32, 2)
    narrow[0, 2, 5] = -40.0  # the largest |x| of the site: token 2, channel 5 of the narrow part
    monkeypatch.setattr(S, "CPU_ROW_SKIPPING", False)
    parts = _site_parts(wide, S.ACTIVATION_STATS)
    assert parts[0].blocks is not None  # the fused path
    monkeypatch.setattr(S, "CPU_ROW_SKIPPING", True)
    parts += _site_parts(narrow, S.ACTIVATION_STATS)
    assert parts[1].sums is not None
    v, l = S.finalize_activation(parts, S.ACTIVATION_STATS)
    named = dict(zip(S.ACTIVATION_STATS, v.tolist()))
    pooled = np.concatenate([wide.numpy().ravel(), narrow.numpy().ravel()]).astype(np.float64)
    assert named["m2"] == pytest.approx((pooled ** 2).mean(), rel=1e-6)  # float32 per-token sums
    assert named["median_abs"] == np.sort(np.abs(pooled))[(pooled.size - 1) // 2]  # exact: small tensors
    top = np.sort(np.abs(wide.numpy().ravel()))[::-1]
    assert [named["top1"], named["top2"], named["top3"]] == [40.0, top[0], top[1]]
    a = np.abs(wide.numpy())
    second = np.unravel_index(np.argmax(a), a.shape)
    assert l[:, S.ACTIVATION_STATS.index("top1")].tolist() == [2.0, 5.0]
    assert l[:, S.ACTIVATION_STATS.index("top2")].tolist() == [float(second[1]), float(second[2])]


def test_environment_switch_runs_the_accelerator_path_on_cpu():
    code = ("import torch; from lnprobe import stats as S; "
            "print(S.CPU_ROW_SKIPPING, S.reduction_path(torch.ones(2, 3)))")
    env = {**os.environ, "LNPROBE_ACCELERATOR_PATH": "1"}
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    env.pop("LNPROBE_ACCELERATOR_PATH")
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert on.stdout.split() == ["False", "fused"], on.stderr
    assert off.stdout.split() == ["True", "cpu"], off.stderr


def _train(probe, model, steps):
    x = torch.randint(0, 64, (2, 32))
    for _ in range(steps):
        model(x, torch.roll(x, -1, 1))[1].backward()
        probe.step()
        model.zero_grad()


def test_step_flushes_write_on_the_background_thread_and_are_on_disk_at_the_next_step(tmp_path):
    import threading

    model = _gpt(1)
    probe = lnprobe.attach(model, tmp_path / "run", flush_every=1)
    probe.write_in_background = True
    writers = []
    append = probe.writer.append

    def recording_append(frame):
        writers.append(threading.current_thread().name)
        return append(frame)

    probe.writer.append = recording_append
    _train(probe, model, 3)
    assert writers[:2] == ["lnprobe-flush", "lnprobe-flush"]  # step()'s flushes: off the training thread
    # every step() joins the previous write: steps 0 and 1 are on disk, step 2's write may be running
    probe._worker.join()
    assert sorted(lnprobe.load_run(tmp_path / "run").records.step.unique()) == [0, 1, 2]
    probe.flush()  # an explicit flush writes on the calling thread (nothing new: meta only)
    probe.close()
    assert all(name == "lnprobe-flush" for name in writers[:3])
    assert lnprobe.load_run(tmp_path / "run").meta["status"] == "finished"


def test_a_failed_background_write_is_raised_at_the_next_step(tmp_path):
    model = _gpt(1)
    probe = lnprobe.attach(model, tmp_path / "run", flush_every=1)
    probe.write_in_background = True

    def full_disk(frame):
        raise OSError("No space left on device")

    probe.writer.append = full_disk
    _train(probe, model, 1)  # the flush of step 0 fails on the background thread
    with pytest.raises(OSError, match="No space left"):
        _train(probe, model, 1)
    with pytest.raises(OSError, match="No space left"):  # close flushes step 1 synchronously: fails again
        probe.close()
    assert lnprobe.load_run(tmp_path / "run").meta["status"] == "crashed"


def test_step_flushes_write_on_the_training_thread_by_default(tmp_path):
    """Counter-example of the background test: without the opt-in the part is on disk when step() returns."""
    import threading

    model = _gpt(1)
    probe = lnprobe.attach(model, tmp_path / "run", flush_every=1)
    writers = []
    append = probe.writer.append
    probe.writer.append = lambda frame: (writers.append(threading.current_thread().name), append(frame))[1]
    _train(probe, model, 2)
    assert writers == [threading.current_thread().name] * 2
    assert sorted(lnprobe.load_run(tmp_path / "run").records.step.unique()) == [0, 1]
    probe.close()
