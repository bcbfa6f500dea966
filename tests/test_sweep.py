"""lnprobe sweep on a tiny grid: it trains, resumes (finished runs kept), writes summary.csv with its
columns, and a report whose sweep verdicts are computed over the runs; CLI flags and errors."""
from __future__ import annotations

import csv
import json

import pytest

from lnprobe import cli
from lnprobe.analysis import verdicts
from lnprobe.launch import ConfigError
from lnprobe.store import load_run, read_meta
from lnprobe.sweep import SUMMARY_COLUMNS, SweepSpec, grid, parse_list, run_sweep

TINY = dict(placements=("pre", "peri"), lrs=(1e-2, 3e-2), seeds=(0,), depths=(2,), widths=(32,), heads=2,
            seq_len=16, steps=8, batch_size=4, every=2, eval_every=4, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    lines: list[str] = []
    res = run_sweep(SweepSpec(**TINY), out, jobs=1, report=False, log=lines.append)
    return out, res, lines


def test_grid_names_and_configs():
    runs = grid(SweepSpec(**{**TINY, "seeds": (0, 1), "depths": (2, 3)}))
    assert len(runs) == 2 * 2 * 2 * 2
    names = [r.name for r in runs]
    assert len(set(names)) == len(names) and "pre_lr0.01_s1_L3_D32" in names
    r = next(r for r in runs if r.name == "peri_lr0.03_s0_L2_D32")
    assert (r.model_cfg.placement, r.model_cfg.n_layers, r.train_cfg.lr, r.train_cfg.threads) == ("peri", 2, 0.03, 1)


def test_sweep_trains_summarizes_and_computes_sweep_verdicts(swept):
    out, res, lines = swept
    assert len(res.trained) == 4 and not res.skipped
    assert sum(": finished" in line for line in lines) == 4            # one progress line per run
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == SUMMARY_COLUMNS and len(rows) == 4
    for row in rows:
        assert row["status"] == "finished" and row["diverged"] == "False" and row["diverged_step"] == ""
        assert float(row["final_loss"]) > 0 and float(row["val_loss"]) > 0 and float(row["m2_last"]) > 0
        assert float(row["max_absmax"]) > 0 and float(row["max_top1_over_median"]) >= 1
        assert (row["layers"], row["d_model"], row["steps"]) == ("2", "32", "8")
    assert {(r["placement"], float(r["lr"])) for r in rows} == {(p, lr) for p in ("pre", "peri") for lr in (1e-2, 3e-2)}
    records = verdicts.all_verdicts([load_run(p) for p in res.runs])
    by_id = {v.id: v.to_dict() for v in records}
    lr_v = by_id["sweep.lr_robustness"]
    assert lr_v["status"] in ("pass", "fail") and lr_v["n_runs"] == 4
    # measured/predicted are the spreads over lr of each placement's final (validation) loss
    loss = {(r["placement"], float(r["lr"])): float(r["val_loss"]) for r in rows}
    spread = {p: abs(loss[(p, 1e-2)] - loss[(p, 3e-2)]) for p in ("pre", "peri")}
    assert lr_v["measured"] == pytest.approx(spread["peri"], rel=1e-4)
    assert lr_v["predicted"] == pytest.approx(spread["pre"], rel=1e-4)
    div = by_id["sweep.divergence"]
    assert (div["measured"], div["predicted"], div["n_runs"]) == (0.0, 0.0, 4)
    paired = by_id["paired.peri_lower_loss"]
    assert paired["n_runs"] == 2                                     # one pre/peri pair per lr


@pytest.mark.slow
def test_sweep_report(swept):
    out, _, _ = swept
    res = run_sweep(SweepSpec(**TINY), out, jobs=1, log=lambda s: None)   # every run kept: the report only
    assert not res.trained
    doc = json.loads((out / "report" / "verdicts.json").read_text())
    assert len(doc["runs"]) == 4
    assert {v["id"] for v in doc["verdicts"]} >= {"sweep.lr_robustness", "sweep.divergence",
                                                  "paired.peri_lower_loss", "paired.pre_larger_variance"}
    figures = set(res.report.figures)
    assert {"loss_vs_lr", "variance_shared", "prop31_slope", "top1_ratio_over_steps"} <= figures, figures
    per_run = [f for f in figures if f.startswith("heatmaps_")]
    assert len(per_run) == 2                                         # one representative per placement
    md = (out / "report" / "report.md").read_text()
    assert "**sweep** (4 runs" in md and "not tested here" in md     # no run diverged: said in the report


def test_sweep_resumes_and_reruns_unfinished(swept):
    out, _, _ = swept
    from lnprobe.train import train

    point = next(p for p in grid(SweepSpec(**TINY)) if p.name == "peri_lr0.01_s0_L2_D32")
    victim = out / "runs" / point.name
    key = ["step", "site", "layer", "stat"]
    uninterrupted = load_run(victim).records.sort_values(key).reset_index(drop=True)
    train(point.model_cfg, point.train_cfg, victim, overwrite=True, stop_after=4)  # cut short after 4 steps
    assert read_meta(victim)["status"] != "finished"
    lines: list[str] = []
    res = run_sweep(SweepSpec(**TINY), out, jobs=1, report=False, log=lines.append)
    assert res.trained == [victim.name] and len(res.skipped) == 3
    assert sum("kept (finished earlier)" in line for line in lines) == 3
    assert read_meta(victim)["status"] == "finished"
    # continued from its checkpoint, not retrained: the records equal the uninterrupted run's
    assert read_meta(victim)["resumed_from"] == [4]
    resumed = load_run(victim).records.sort_values(key).reset_index(drop=True)
    assert resumed[key + ["value"]].equals(uninterrupted[key + ["value"]])
    # a different setting is a different run: refused, nothing touched, unless overwrite
    other = SweepSpec(**{**TINY, "placements": ("pre",), "lrs": (1e-2,), "weight_decay": 0.0})
    kept = out / "runs" / "pre_lr0.01_s0_L2_D32"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in kept.rglob("*") if p.is_file())
    with pytest.raises(ConfigError, match="other settings.*--overwrite"):
        run_sweep(other, out, jobs=1, report=False, log=lambda s: None)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in kept.rglob("*") if p.is_file()) == before
    res = run_sweep(other, out, jobs=1, report=False, log=lambda s: None, overwrite=True)
    assert res.trained == ["pre_lr0.01_s0_L2_D32"]
    assert read_meta(out / "runs" / "pre_lr0.01_s0_L2_D32")["config"]["train"]["weight_decay"] == 0.0


def test_parse_list_and_flag_errors(capsys):
    assert parse_list("1e-2, 3e-2", float, "--lrs") == [0.01, 0.03]
    assert parse_list(None, int, "--depths") is None
    for text in ("a,b", "", "1,1"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_list(text, int, "--seeds")
    with pytest.raises(SystemExit) as exc:
        cli.main(["sweep", "--lrs", "fast", "--out", "unused"])
    assert exc.value.code == 2 and "--lrs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--placements", "sideways", "--out", "unused"])
    assert "sideways" in capsys.readouterr().err


def test_optimizer_flags_reach_train_config():
    args = cli.build_parser().parse_args(["train", "--grad-clip", "0", "--warmup", "7", "--weight-decay", "0.05"])
    cfg = cli._train_config(args)
    assert (cfg.grad_clip, cfg.warmup_steps, cfg.weight_decay) == (0.0, 7, 0.05)
    args = cli.build_parser().parse_args(["sweep", "--grad-clip", "0.5", "--warmup", "3"])
    assert (args.grad_clip, args.warmup, args.weight_decay) == (0.5, 3, 0.1)
    demo = cli.build_parser().parse_args(["demo"])
    assert (demo.lr, demo.steps) == (cli.DEMO_LR, cli.DEMO_STEPS)
