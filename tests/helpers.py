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
