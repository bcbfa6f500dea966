"""Helpers shared by several test files (plain functions; the fixtures are in conftest.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# `lnprobe train` options for a GPT small enough that a CLI run takes about a second
SMALL = ["--d-model", "32", "--layers", "2", "--heads", "2", "--seq-len", "16", "--batch-size", "4", "--no-progress"]


def write_corpus(path: Path, *, seed: int, prefix: str, vocab: int = 50, n_words: int = 20000) -> Path:
    """Write a deterministic text corpus: `n_words` words ``{prefix}{i}``, i drawn uniformly from
    ``range(vocab)`` with ``numpy.random.default_rng(seed)`` (no dependence on the machine's stdlib)."""
    rng = np.random.default_rng(seed)
    path.write_text(" ".join(f"{prefix}{i}" for i in rng.integers(0, vocab, n_words)))
    return path


def reference_stats(h: np.ndarray) -> dict:
    """m2, var, absmax and the absmax's token and channel of hidden states ``(..., T, D)``, in numpy."""
    d = h.shape[-1]
    flat = h.reshape(-1, d).astype(np.float64)
    a = np.abs(flat).reshape(-1)
    i = int(np.argmax(a))
    return {"m2": (flat ** 2).mean(), "var": flat.var(-1).mean(), "absmax": a[i],
            "token": (i // d) % h.shape[-2], "channel": i % d}


def one_line_error(capsys, argv: list[str], match: str) -> str:
    """Run the CLI on `argv`, expect exit code 2 and one ``lnprobe: error:`` line containing `match`."""
    from lnprobe.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lnprobe: error: ") and "Traceback" not in err
    assert match in lines[0], lines[0]
    return lines[0]


def tiny_llama(vocab: int, seq_len: int, *, seed: int = 0):
    """A random 2-layer Llama causal LM of width 32 (4 heads, 2 key/value heads, MLP 64, no padding id,
    the default attention), built by ``lnprobe.testing.tiny_hf_model`` after ``torch.manual_seed(seed)``."""
    from lnprobe.testing import tiny_hf_model

    return tiny_hf_model("llama", seed=seed, vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len,
                         pad_token_id=None, attn_implementation=None)


def launch_workers(script: str | Path, *args: str, world: int = 2, timeout: float = 240) -> tuple[list[int], list[str]]:
    """Run ``python script *args`` as `world` gloo ranks on this machine (RANK, WORLD_SIZE, MASTER_* set)
    and return (exit codes, outputs) in rank order. Outputs go to files, not pipes, so a rank that prints a
    lot never blocks on a full pipe while another rank is being waited for. A hang kills every rank and
    fails the test (with what the ranks printed) instead of blocking CI."""
    import os
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = [tempfile.TemporaryFile() for _ in range(world)]
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env,
                                      stdout=logs[rank], stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    hung = False
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung = True
            break

    def printed(log) -> str:
        log.seek(0)
        return log.read().decode(errors="replace")

    if hung:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail(f"distributed workers hung (no result within {timeout:.0f} s); they printed:\n"
                    + "\n---\n".join(printed(log)[-3000:] for log in logs))
    return [p.returncode for p in procs], [printed(log) for log in logs]


def exit_worker(code: int) -> None:
    """End a worker process of :func:`launch_workers` with `code`, skipping C++ static destructors.

    After every Python frame has returned and the process group is destroyed, torch's teardown sometimes
    aborts a rank ("terminate called without an active exception", SIGABRT, no Python frame; about 1 run
    in 8 on 2 CPU cores after a failed flush). The results are on disk and the exit code is set by then,
    so leaving with ``os._exit`` makes the tests judge lnprobe, not that teardown."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def token_batch(seed: int, b: int = 4, vocab: int = 64, t: int = 16):
    """A deterministic (b, t) batch of token ids and its next-token targets (the ids rolled by one)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (b, t), generator=g)  # (B, T)
    return x, torch.roll(x, -1, 1)


def seeded_nanogpt(seed: int = 0, vocab: int = 64, block_size: int = 16):
    """tests/nanogpt.py's NanoGPT with weights drawn after ``torch.manual_seed(seed)``."""
    import torch
    from nanogpt import NanoGPT

    torch.manual_seed(seed)
    return NanoGPT(vocab=vocab, block_size=block_size)
