"""Fixtures shared by the test files; plain helper functions are in tests/helpers.py."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from helpers import write_corpus  # noqa: E402  (tests/ is on sys.path: pytest's rootdir-relative import)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """A deterministic ~130 kB text corpus of 20000 words over a 50-word vocabulary (read-only)."""
    return str(write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", seed=1, prefix="t"))
