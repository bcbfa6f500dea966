"""No host synchronisation from lnprobe on non-flush steps (design page section 6).

On CPU a sync costs nothing and cannot be timed, so every Python-level way of moving tensor data to
the host is patched instead: ``Tensor.item``, ``.cpu``, ``.tolist``, ``.numpy``, ``__bool__``,
``__float__``, ``__int__``, ``__index__``, ``__array__``, ``__repr__``, ``__format__``, and ``.to`` with
a host target from another device. A call is charged to lnprobe when a frame of lnprobe's probing
modules (everything but models, data, train, cli) is on the Python stack, i.e. inside a hook or
``probe.step``; the training loop's own calls (``loss.item()`` below) are seen but not charged.

Not visible from here: syncs inside C++ ops (``torch.nonzero`` on CUDA, a pageable host-to-device
copy). ``stats.CPU_ROW_SKIPPING`` uses data-dependent shapes on CPU tensors only, where they are not
syncs; every scenario also runs with it off, i.e. the code path that accelerators take. On CUDA,
``benchmarks/gpu_check.py`` and the ``gpu`` test below run under ``torch.cuda.set_sync_debug_mode``.
"""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from nanogpt import NanoGPT

import lnprobe
from lnprobe import stats as S
from lnprobe.models import GPT, GPTConfig

PROBE_DIR = Path(lnprobe.__file__).resolve().parent
# model and loop code, not probe code
NOT_PROBE = {"models.py", "data.py", "train.py", "launch.py", "checkpoint.py", "cli.py", "__main__.py"}
HOST_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__",
                "__array__", "__repr__", "__format__")
VOCAB, T = 64, 16


def _probe_frame(depth: int = 2) -> str | None:
    """``file:line in function`` of the innermost lnprobe probing frame on the stack, else None."""
    f = sys._getframe(depth)
    while f is not None:
        path = Path(f.f_code.co_filename)
        if path.parent == PROBE_DIR or PROBE_DIR in path.parents:
            if path.name not in NOT_PROBE:
                return f"{path.name}:{f.f_lineno} in {f.f_code.co_name}"
        f = f.f_back
    return None


class SyncCounter:
    """Patches the host-transfer methods of torch.Tensor; sorts calls into probe and non-probe."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.monkeypatch = monkeypatch
        self.active = False
        self.probe_calls: list[str] = []
        self.other_calls = 0

    def _seen(self, what: str) -> None:
        if not self.active:
            return
        where = _probe_frame(3)
        if where is None:
            self.other_calls += 1
        else:
            self.probe_calls.append(f"Tensor.{what} from {where}")

    def install(self) -> None:
        counter = self
        for name in HOST_METHODS:
            def wrapper(self_t, *a, _orig=getattr(torch.Tensor, name), _name=name, **k):
                counter._seen(_name)
                return _orig(self_t, *a, **k)

            self.monkeypatch.setattr(torch.Tensor, name, wrapper)
        orig_to = torch.Tensor.to

        def to(self_t, *a, **k):
            dev = torch._C._nn._parse_to(*a, **{n: v for n, v in k.items() if n != "copy"})[0]
            if dev is not None and dev.type == "cpu" and self_t.device.type != "cpu":
                counter._seen(f"to({dev})")
            return orig_to(self_t, *a, **k)

        self.monkeypatch.setattr(torch.Tensor, "to", to)

    @contextmanager
    def counting(self):
        self.active = True
        try:
            yield self
        finally:
            self.active = False


def assert_no_probe_syncs(counter: SyncCounter) -> None:
    assert not counter.probe_calls, (
        f"lnprobe made {len(counter.probe_calls)} host synchronisation(s) on non-flush steps, expected none: "
        + "; ".join(sorted(set(counter.probe_calls))[:10])
    )


@pytest.fixture(params=[True, False], ids=["cpu-path", "accelerator-path"])
def row_skipping(request, monkeypatch):
    monkeypatch.setattr(S, "CPU_ROW_SKIPPING", request.param)
    return request.param


@pytest.fixture
def counter(monkeypatch):
    c = SyncCounter(monkeypatch)
    c.install()
    return c


def _batch(seed: int, b: int = 4, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (b, T), generator=g)
    return x.to(device), torch.roll(x, -1, 1).to(device)


def _reference_gpt(placement: str) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, seq_len=T, d_model=32, n_layers=2, n_heads=4, placement=placement))


def _nanogpt(checkpointing: str | None = None) -> NanoGPT:
    torch.manual_seed(0)
    return NanoGPT(vocab=VOCAB, block_size=T, checkpointing=checkpointing)


def run_probed(model, out: Path, counter: SyncCounter, *, steps: int = 3, accum: int = 1,
               device: str = "cpu", **probe_kw) -> lnprobe.Run:
    """Train ``steps`` optimizer steps with a probe that never flushes before close; count syncs."""
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = lnprobe.attach(model, out, every=1, flush_every=10**6, sites="all", stats="all",
                           grad_sites=lnprobe.ALL_SITES, **probe_kw)
    losses = []
    with counter.counting():
        for step in range(steps):
            for micro in range(accum):
                x, y = _batch(10 * step + micro, device=device)
                _, loss = model(x, y)
                (loss / accum).backward()
            probe.step(loss=loss, lr=1e-3)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())  # the training loop's own sync: seen, not charged to lnprobe
    probe.close()  # the flush: outside the counted steps
    return lnprobe.load_run(out)


def _check_recorded(run: lnprobe.Run, steps: int, sites: set[str]) -> None:
    r = run.records
    assert sorted(r.step.unique()) == list(range(steps))
    assert sites <= set(r.site.unique())
    assert (r.stat == "grad_rms").any() and (r.stat == "kurtosis").any() and (r.stat == "massive").any()


@pytest.mark.parametrize("placement", ["pre", "peri"])
def test_reference_gpt_all_sites_all_stats_no_sync(tmp_path, counter, row_skipping, placement):
    run = run_probed(_reference_gpt(placement), tmp_path / "run", counter)
    assert_no_probe_syncs(counter)
    assert counter.other_calls >= 3  # the loop's loss.item() was seen, and not charged to the probe
    _check_recorded(run, 3, {"resid", "resid_mid", "attn_out", "mlp_out", "mlp_act", "final"})


@pytest.mark.parametrize("checkpointing", [None, "reentrant"])
def test_nanogpt_grad_accumulation_no_sync(tmp_path, counter, row_skipping, checkpointing):
    run = run_probed(_nanogpt(checkpointing), tmp_path / "run", counter, accum=2)
    assert_no_probe_syncs(counter)
    _check_recorded(run, 3, {"resid", "resid_mid", "attn_out", "mlp_out", "mlp_act", "final"})


SYNCS = {
    "item": lambda x: x.sum().item(),
    "cpu": lambda x: x.cpu(),
    "tolist": lambda x: x.reshape(-1)[:2].tolist(),
    "numpy": lambda x: x.detach().numpy(),
    "bool": lambda x: bool(x.sum() > 0),
    "float": lambda x: float(x.detach().sum()),
    "int": lambda x: int(x.detach().sum()),
    "index": lambda x: [0, 1][x.new_zeros((), dtype=torch.long)],
    "repr": lambda x: repr(x.sum()),
    # on CPU every tensor is already on the host: a meta tensor stands in for a device tensor (the copy
    # then fails, the probe disables that hook point with a warning; the call was counted first)
    "to-cpu": lambda x: torch.empty(1, device="meta").to("cpu"),
}


@pytest.mark.parametrize("sync, where", [(s, "reduce_activation") for s in SYNCS]
                         + [("item", "reduce_gradient"), ("bool", "reduce_gradient"), ("item", "norms_of"),
                            ("to-cpu", "norms_of")])
def test_a_syncing_reduction_is_caught(tmp_path, counter, monkeypatch, sync, where):
    """A deliberately broken reduction (a sync inside a forward hook, a gradient hook or probe.step)
    makes the no-sync check fail."""
    orig = getattr(S, where)

    def broken(t, *a, **k):
        SYNCS[sync](t[0] if isinstance(t, list) else t)
        return orig(t, *a, **k)

    monkeypatch.setattr(S, where, broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the meta copy disables a hook point
        run_probed(_nanogpt(), tmp_path / "run", counter, steps=2)
    assert counter.probe_calls, f"a {sync} in {where} was not seen"
    with pytest.raises(AssertionError, match="host synchronisation"):
        assert_no_probe_syncs(counter)


def test_calls_outside_the_probe_are_not_charged(counter):
    x = torch.randn(3)
    with counter.counting():
        x.sum().item()
        bool(x.sum() > 0)
        x.tolist()
    assert counter.probe_calls == [] and counter.other_calls == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_sync_under_sync_debug_mode(tmp_path, counter):
    """On CUDA: no Python-level host transfer from lnprobe, and no C++-level sync either (the sync
    debug mode raises on any synchronising CUDA call made between the two mode switches)."""
    model = _reference_gpt("peri").cuda()
    x, y = _batch(0, device="cuda")
    model(x, y)[1].backward()  # warm-up outside the check (lazy CUDA initialisation)
    model.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = lnprobe.attach(model, tmp_path / "run", every=1, flush_every=10**6, sites="all", stats="all")
    with counter.counting():
        for step in range(3):
            x, y = _batch(step, device="cuda")
            torch.cuda.set_sync_debug_mode("error")
            try:
                _, loss = model(x, y)
                loss.backward()
                probe.step(loss=loss)
                opt.step()
                opt.zero_grad(set_to_none=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    probe.close()
    assert_no_probe_syncs(counter)
    _check_recorded(lnprobe.load_run(tmp_path / "run"), 3, {"resid", "final"})
