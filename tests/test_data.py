"""Built-in stdlib corpus and TokenData: determinism, splits, batches, .bin round trip, error messages."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from lnprobe.data import STDLIB_MAX_BYTES, CorpusError, TokenData, stdlib_corpus, stdlib_files

EXCLUDED = {"site-packages", "dist-packages", "test", "tests", "idle_test"}


def independent_stdlib_listing() -> list[Path]:
    """The corpus rule re-implemented with Path.rglob (lnprobe walks with os.walk)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    keep = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        dirs = rel.parts[:-1]
        if any(d in EXCLUDED or d == "__pycache__" or d.startswith("config-") for d in dirs):
            continue
        if rel.name.startswith("_sysconfigdata") or not p.is_file():
            continue
        keep.append(rel)
    return sorted(keep, key=lambda r: r.as_posix())


def test_stdlib_corpus_is_deterministic_and_only_py_sources():
    corpus = stdlib_corpus()
    assert len(corpus) > 1_000_000
    assert stdlib_corpus() == corpus
    files = stdlib_files()
    assert files == sorted(files)
    assert all(f.endswith(".py") for f in files)
    assert not any(set(f.split("/")[:-1]) & EXCLUDED for f in files)
    root = Path(sysconfig.get_paths()["stdlib"])
    expected = independent_stdlib_listing()
    assert [r.as_posix() for r in expected[: len(files)]] == files
    joined = b"".join((root / r).read_bytes() for r in expected)
    assert corpus == joined[:STDLIB_MAX_BYTES]
    # Source text: decodes as UTF-8 (stdlib sources are UTF-8 by PEP 3120) and contains Python.
    corpus[: 100_000].decode("utf-8", errors="strict")
    assert b"def " in corpus and b"import " in corpus


def test_stdlib_corpus_cap_is_a_prefix():
    small = stdlib_corpus(5000)
    assert len(small) == 5000
    assert stdlib_corpus().startswith(small)
    assert stdlib_files(5000) == stdlib_files()[: len(stdlib_files(5000))]


def test_split_sizes():
    data = TokenData.from_bytes(bytes(range(256)) * 4)  # 1024 tokens
    assert data.vocab_size == 256
    assert len(data.val) == 51 and len(data.train) == 973  # floor(5 %) of 1024 → val
    assert np.array_equal(np.concatenate([data.train, data.val]), np.frombuffer(bytes(range(256)) * 4, np.uint8))
    stdlib = TokenData.load("stdlib")
    assert len(stdlib.train) + len(stdlib.val) == len(stdlib_corpus())
    assert len(stdlib.val) == len(stdlib_corpus()) // 20
    assert "stdlib" in stdlib.description


def identifiable(tmp_path: Path, n: int = 5000) -> TokenData:
    """A .bin whose token i is i, so every window reveals where it was cut from."""
    path = tmp_path / "ramp.bin"
    np.arange(n, dtype=np.uint16).tofile(path)
    return TokenData.from_bin(path, vocab_size=n)


def test_batch_windows_shapes_and_shift(tmp_path):
    data = identifiable(tmp_path)
    n_train = len(data.train)
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        x, y = data.batch(split, 6, 32, g, device="cpu")
        assert x.shape == y.shape == (6, 32)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:])
        # Each row is a contiguous window of the right split, and y is the next token of x.
        ramp = torch.arange(32)
        assert torch.equal(x - x[:, :1], ramp.expand(6, 32))
        assert torch.equal(y, x + 1)
        if split == "train":
            assert int(y.max()) < n_train
        else:
            assert int(x.min()) >= n_train and int(y.max()) < 5000


def test_batch_determinism(tmp_path):
    data = TokenData.load("stdlib")
    a = [data.batch("train", 4, 64, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(a[0][0], a[1][0]) and torch.equal(a[0][1], a[1][1])
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    seq1 = [data.batch("train", 4, 64, g1)[0] for _ in range(3)]
    seq2 = [data.batch("train", 4, 64, g2)[0] for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(seq1, seq2))
    assert not torch.equal(seq1[0], seq1[1])  # the generator advances between steps
    other = data.batch("train", 4, 64, torch.Generator().manual_seed(8))[0]
    assert not torch.equal(other, seq1[0])


def test_batch_covers_all_starts(tmp_path):
    data = identifiable(tmp_path, n=200)  # train 190 tokens
    x, _ = data.batch("train", 4000, 10, torch.Generator().manual_seed(0))
    starts = x[:, 0]
    assert int(starts.min()) == 0 and int(starts.max()) == 190 - 11  # last full window of 11 tokens
    # exactly one window: the only start is 0
    x, y = data.batch("train", 3, 189, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 0], torch.zeros(3, dtype=torch.long)) and int(y[0, -1]) == 189


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_from_bin_round_trip(tmp_path, dtype):
    tokens = np.random.default_rng(0).integers(0, 50257, size=3000).astype(dtype)
    path = tmp_path / "tok.bin"
    tokens.astype(np.dtype(dtype).newbyteorder("<")).tofile(path)
    data = TokenData.from_bin(path, vocab_size=50257, dtype=dtype)
    assert data.vocab_size == 50257
    assert np.array_equal(np.concatenate([data.train, data.val]), tokens)
    if dtype == "uint16":
        loaded = TokenData.load(path, vocab_size=50257)
        assert np.array_equal(np.asarray(loaded.tokens), tokens)


def test_load_text_file(tmp_path):
    path = tmp_path / "story.txt"
    text = "héllo wörld\n" * 100
    path.write_text(text, encoding="utf-8")
    data = TokenData.load(path)
    raw = text.encode("utf-8")
    assert data.vocab_size == 256 and len(data.tokens) == len(raw)
    assert bytes(np.asarray(data.tokens, dtype=np.uint8)) == raw
    assert TokenData.load(str(path), vocab_size=512).vocab_size == 512


def test_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        TokenData.load(missing)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        TokenData.from_bin(tmp_path / "nope.bin", vocab_size=10)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(CorpusError, match="empty"):
        TokenData.from_text_file(empty)
    with pytest.raises(CorpusError, match="empty"):
        TokenData.from_bin(empty, vocab_size=10)
    with pytest.raises(CorpusError, match="empty"):
        TokenData.from_bytes(b"")
    short = tmp_path / "short.txt"
    short.write_bytes(b"x" * 100)  # train 95, val 5 tokens
    data = TokenData.load(short)
    with pytest.raises(CorpusError, match=r"train split has 95 tokens .* 129 tokens"):
        data.batch("train", 2, 128, torch.Generator().manual_seed(0))
    with pytest.raises(CorpusError, match=r"val split has 5 tokens .* 9 tokens"):
        data.check_window(8)
    data.batch("val", 2, 4, torch.Generator().manual_seed(0))  # 5 tokens hold one window of 4 + 1
    oov = tmp_path / "oov.bin"
    np.array([1, 2, 300, 4], dtype=np.uint16).tofile(oov)
    with pytest.raises(CorpusError, match=r"token 300 at position 2 .*\[0, 256\)"):
        TokenData.from_bin(oov, vocab_size=256)
    with pytest.raises(CorpusError, match="vocab_size"):
        TokenData.load(oov)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(CorpusError, match="multiple of 2"):
        TokenData.from_bin(odd, vocab_size=256)
    with pytest.raises(ValueError, match="split"):
        data.batch("test", 1, 2, torch.Generator())
