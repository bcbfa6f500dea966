"""The README's demo table comes from `lnprobe demo` with the committed defaults: this test trains the
demo (same defaults, CPU, one thread per run as the demo does) and compares every number of the
table "What the default demo shows" to the precision it is printed with. It fails when the code,
the defaults or the README drift apart."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from lnprobe import cli
from lnprobe.store import load_run

README = Path(__file__).resolve().parents[1] / "README.md"
NAMES = {"Pre-LN": "pre", "Peri-LN": "peri", "Post-LN": "post"}


def readme_table() -> dict[str, list[str]]:
    """placement -> the table's number cells (as printed) of the demo section of the README."""
    text = README.read_text(encoding="utf-8")
    section = text.split("### What the default demo shows", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in NAMES:
            rows[NAMES[cells[0]]] = cells[1:]
    return rows


def measured(run_dir: Path) -> list[float]:
    """The table's columns: last-layer var and m2 of resid, max |x| of resid (all layers), train loss,
    all at the last recorded step, and the final validation loss."""
    run = load_run(run_dir)
    last = int(run.pivot("resid", "var").index[-1])
    L = run.n_layers
    return [float(run.pivot("resid", "var").loc[last, L]), float(run.pivot("resid", "m2").loc[last, L]),
            float(run.pivot("resid", "absmax").loc[last].max()), float(run.series("loss").iloc[-1]),
            float(run.series("val_loss").iloc[-1])]


def matches(printed: str, value: float) -> bool:
    """``value`` rounds to ``printed`` at the printed number of decimals."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return math.isclose(round(value, decimals), float(printed), abs_tol=0.5 * 10 ** -decimals)


def test_readme_table_is_parsed():
    rows = readme_table()
    assert set(rows) == {"pre", "peri", "post"} and all(len(r) == 5 for r in rows.values()), rows
    mantissa, exponent = f"{cli.DEMO_LR:.0e}".split("e")                     # 0.03 -> "3e-2", as printed
    assert re.search(rf"lr {mantissa}e{int(exponent)}\b", README.read_text()), "README must state the demo's lr"
    assert f"{cli.DEMO_STEPS} steps" in README.read_text()


@pytest.mark.slow
def test_readme_demo_numbers_come_from_the_demo(tmp_path):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--device", "cpu", "--out", str(out), "--figures", str(tmp_path / "fig"),
                     "--no-progress"]) == 0
    rows = readme_table()
    for placement, cells in rows.items():
        got = measured(out / placement)
        for printed, value in zip(cells, got):
            assert matches(printed, value), (placement, cells, [f"{v:.6g}" for v in got])
