"""Token corpora for the reference runs: a built-in byte-level corpus and nanoGPT-style loaders.

The built-in corpus (:func:`stdlib_corpus`) is the Python standard library's own source code, read
from the running interpreter's installation, so the demo and the tests need no download. Text is
tokenised as raw bytes (vocabulary 256). :class:`TokenData` holds a 1-D token array split into
train (first 95 %) and validation (last 5 %) and draws random training windows with a caller's
``torch.Generator``, so runs seeded alike see identical batches.
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

__all__ = ["STDLIB_MAX_BYTES", "CorpusError", "stdlib_files", "stdlib_corpus", "TokenData"]

STDLIB_MAX_BYTES = 8 * 2**20
# Directory names never entered: installed third-party packages and the standard library's test suites.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class CorpusError(ValueError):
    """A corpus that cannot be used: empty, not a regular file, the wrong dtype or vocabulary, too short.

    A missing file raises ``FileNotFoundError`` instead. The message names the corpus and says what
    to pass instead.
    """


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_corpus_file(rel: str) -> bool:
    parts = rel.split("/")
    if not parts[-1].endswith(".py"):
        return False
    if any(p in _EXCLUDED_DIRS or p.startswith("config-") for p in parts[:-1]):
        return False  # config-*: build-specific makefiles and scripts
    # _sysconfigdata*.py records this build's paths and flags: it differs between installations.
    return not parts[-1].startswith("_sysconfigdata")


@functools.lru_cache(maxsize=4)
def _stdlib_listing(max_bytes: int) -> tuple[tuple[str, ...], bytes]:
    root = _stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"Python standard library not found at {root} (sysconfig 'stdlib' path)")
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]  # prune early, walk order is irrelevant
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if _is_corpus_file(rel):
                rels.append(rel)
    rels.sort()
    chunks, used, total = [], [], 0
    for rel in rels:
        if total >= max_bytes:
            break
        data = (root / rel).read_bytes()
        chunks.append(data)
        used.append(rel)
        total += len(data)
    return tuple(used), b"".join(chunks)[:max_bytes]


def stdlib_files(max_bytes: int = STDLIB_MAX_BYTES) -> list[str]:
    """Relative posix paths (under the ``stdlib`` path) of the files that :func:`stdlib_corpus` concatenates."""
    return list(_stdlib_listing(int(max_bytes))[0])


def stdlib_corpus(max_bytes: int = STDLIB_MAX_BYTES) -> bytes:
    """The first ``max_bytes`` bytes (default 8 MiB) of the standard library's ``.py`` sources.

    Files are the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``, concatenated as raw
    bytes in sorted order of their relative posix paths, excluding ``site-packages`` /
    ``dist-packages``, every ``test``/``tests``/``idle_test`` directory (``test/``, ``lib2to3/tests/``,
    ``idlelib/idle_test/`` ...), the build's ``config-*`` directory and the build-specific
    ``_sysconfigdata*.py``. The last file is cut at the cap. The result depends only on the Python
    version's sources, so it is identical on machines with the same Python version (unless a
    distribution patches the standard library). Cached per process.
    """
    return _stdlib_listing(int(max_bytes))[1]


class TokenData:
    """A 1-D token array split into train (first part) and validation (last ``val_fraction``).

    ``tokens`` is a 1-D numpy integer array (or memmap) with values in ``[0, vocab_size)``.
    The validation split is the last ``floor(len · val_fraction)`` tokens, the rest is train.
    """

    def __init__(self, tokens: np.ndarray, vocab_size: int, description: str = "", val_fraction: float = 0.05):
        if tokens.ndim != 1:
            raise CorpusError(f"TokenData expects a 1-D token array, got shape {tokens.shape}")
        if len(tokens) == 0:
            raise CorpusError(f"TokenData: no tokens in {description or 'the given array'}; pass a non-empty corpus")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"TokenData: val_fraction must be in [0, 1), got {val_fraction}")
        self.tokens = tokens
        self.vocab_size = int(vocab_size)
        self.description = description
        n_val = int(len(tokens) * val_fraction)
        self.train = tokens[: len(tokens) - n_val]
        self.val = tokens[len(tokens) - n_val :]

    def __repr__(self) -> str:
        return (
            f"TokenData({self.description!r}, vocab_size={self.vocab_size}, "
            f"train={len(self.train)}, val={len(self.val)})"
        )

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_bytes(cls, data: bytes, description: str = "bytes") -> "TokenData":
        """Byte-level tokens (vocabulary 256) of ``data``."""
        if len(data) == 0:
            raise CorpusError(f"TokenData.from_bytes: {description} is empty; pass a non-empty corpus")
        tokens = np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
        return cls(tokens, 256, f"{description}: {len(data)} bytes, byte-level (vocab 256)")

    @classmethod
    def from_text_file(cls, path: str | os.PathLike) -> "TokenData":
        """Byte-level tokens (vocabulary 256) of a text file's raw bytes (UTF-8 text stays multi-byte)."""
        path = Path(path)
        _require_file(path)
        return cls.from_bytes(path.read_bytes(), description=str(path))

    @classmethod
    def from_bin(cls, path: str | os.PathLike, vocab_size: int, dtype: str = "uint16") -> "TokenData":
        """nanoGPT ``.bin``: raw little-endian ``dtype`` tokens, memory-mapped; all must be < ``vocab_size``."""
        path = Path(path)
        _require_file(path)
        dt = np.dtype(dtype)
        if dt.kind not in "ui":
            raise CorpusError(f"TokenData.from_bin: dtype must be an integer type such as 'uint16', got {dtype!r}")
        if not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool) or vocab_size < 1:
            raise CorpusError(f"TokenData.from_bin: vocab_size must be a positive int, got {vocab_size!r}")
        vocab_size = int(vocab_size)
        size = path.stat().st_size
        if size == 0:
            raise CorpusError(f"{path} is empty: expected raw {dt.name} tokens")
        if size % dt.itemsize:
            raise CorpusError(
                f"{path} has {size} bytes, not a multiple of {dt.itemsize} ({dt.name}); "
                f"pass the dtype it was written with"
            )
        tokens = np.memmap(path, dtype=dt.newbyteorder("<"), mode="r")
        hi, lo = int(tokens.max()), int(tokens.min())
        if hi >= vocab_size or lo < 0:
            bad = hi if hi >= vocab_size else lo
            pos = int(np.argmax(tokens == bad))
            raise CorpusError(
                f"{path}: token {bad} at position {pos} is outside the vocabulary [0, {vocab_size}); "
                f"pass the tokenizer's vocab_size (or the right dtype)"
            )
        return cls(tokens, vocab_size, f"{path}: {len(tokens)} {dt.name} tokens (vocab {vocab_size})")

    @classmethod
    def load(cls, spec: str | os.PathLike = "stdlib", vocab_size: int | None = None) -> "TokenData":
        """``"stdlib"`` (built-in corpus), a path ending ``.bin`` (needs ``vocab_size``), or a text file's path."""
        if str(spec) == "stdlib":
            data = cls.from_bytes(
                stdlib_corpus(), description=f"Python {sys.version_info.major}.{sys.version_info.minor} stdlib sources"
            )
        elif str(spec).endswith(".bin"):
            if vocab_size is None:
                raise CorpusError(
                    f"loading {spec}: a .bin token file needs vocab_size (the tokenizer's vocabulary size)"
                )
            return cls.from_bin(spec, vocab_size)
        else:
            data = cls.from_text_file(spec)
        if vocab_size is not None:
            if vocab_size < 256:
                raise CorpusError(f"loading {spec}: byte-level text needs vocab_size >= 256, got {vocab_size}")
            data.vocab_size = int(vocab_size)
        return data

    # ----------------------------------------------------------------- batches
    def check_window(self, seq_len: int) -> None:
        """Raise :class:`CorpusError` unless both splits hold at least one window of ``seq_len + 1`` tokens."""
        for split in ("train", "val"):
            self._split(split, seq_len)

    def _split(self, split: str, seq_len: int) -> np.ndarray:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        tokens = self.train if split == "train" else self.val
        if len(tokens) < seq_len + 1:
            raise CorpusError(
                f"{self.description}: the {split} split has {len(tokens)} tokens but one window of "
                f"seq_len + 1 = {seq_len + 1} tokens is needed; use a longer corpus or a shorter seq_len"
            )
        return tokens

    def batch(
        self,
        split: str,
        batch_size: int,
        seq_len: int,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows: inputs ``x`` and next-token targets ``y = x`` shifted by one.

        Window starts are uniform over the split, drawn with ``generator`` (a CPU ``torch.Generator``;
        the same seed and call sequence give the same batches). Returns int64 tensors (B, T) on ``device``.
        """
        tokens = self._split(split, seq_len)
        starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)  # (B,)
        index = starts.numpy()[:, None] + np.arange(seq_len + 1)  # (B, T+1)
        window = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))  # (B, T+1)
        x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (B, T) each
        return x.to(device), y.to(device)


def _require_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"corpus file not found: {path}; pass 'stdlib' or the path of an existing file")
    if not path.is_file():
        raise CorpusError(f"{path} is not a regular file; pass the path of a text or .bin token file")
    if path.stat().st_size == 0:
        raise CorpusError(f"{path} is empty; pass a non-empty corpus file")
