"""Runs at scale: a synthetic run of 100k steps × 500 values written through the real writer, then
load_run, a one-(site, stat, layer) query, a cross-run query over 20 runs and ``lnprobe report``.

    python benchmarks/big_run.py                          # the full size: 50 M rows, 20 × 1 M rows
    python benchmarks/big_run.py --steps 10000 --cross-steps 200 --out bench_out/big_small   # scaled down
    python benchmarks/big_run.py --skip big,report --reuse --engines   # the cross-run queries again

Each measured phase runs in a fresh Python process, which reports its wall time and its own peak RSS
(``ru_maxrss``), so one phase's memory never hides in another's. The run looks like a probed 12-block
Peri-LN GPT: ``resid`` (13 layers) and ``final`` with the 12 default statistics (top1..top3 and absmax
with token and channel), ``resid_mid``, ``attn_out``, ``mlp_out`` with the 5 branch statistics,
gradient and value norms of 4 weights per block and of the embedding and head, the gains of 2 norms
per block, 4 train scalars: 500 rows per step. Values follow smooth trends with 2 % noise (float64),
written in flushes of ``--flush-every`` steps (one Parquet part each) and compacted by ``close()``.

Targets (issue 16): the 50 M-row run ≤ 8 B/row on disk after compaction, ``lnprobe report`` ≤ 60 s and
≤ 2 GB peak RSS, one site/stat/layer over all steps ≤ 1 s; 20 runs of 1 M rows: one cross-run query of
one statistic ≤ 2 s. Prints the numbers; asserts nothing. ``--engines`` also times the cross-run query
with pyarrow.dataset for the engine comparison of docs/design.md §5.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

L, D = 12, 256
ACT12 = ("m2", "var", "rms", "absmax", "top1", "top2", "top3", "median_abs", "nonfinite", "over_fp16", "massive",
         "grad_rms")
BRANCH5 = ("m2", "var", "rms", "absmax", "nonfinite")
WEIGHTS = (("attn.qkv.weight", "attn.qkv"), ("attn.out.weight", "attn.out"), ("mlp.fc_in.weight", "mlp.in"),
           ("mlp.fc_out.weight", "mlp.out"))
NORMS = (("norm_attn_in", "norm.pre_attn"), ("norm_attn_out", "norm.post_attn"))
TRAIN = ("loss", "lr", "grad_norm", "nonfinite_loss")


def layout() -> tuple[np.ndarray, ...]:
    """(site, layer, stat, located, base) of the 500 rows of one step."""
    rows = []
    for layer in range(L + 1):
        rows += [("resid", layer, s) for s in ACT12]
    rows += [("final", L, s) for s in ACT12]
    for site in ("resid_mid", "attn_out", "mlp_out"):
        rows += [(site, layer, s) for layer in range(L) for s in BRANCH5]
    for layer in range(L):
        rows += [(f"param:blocks.{layer}.{w}", layer, s) for w, _ in WEIGHTS for s in ("grad_norm", "param_norm")]
        rows += [(f"param:blocks.{layer}.{n}.weight", layer, s) for n, _ in NORMS for s in ("gain_ms", "gain_absmax")]
    rows += [(f"param:{p}", -1, s) for p in ("tok_emb.weight", "head.weight") for s in ("grad_norm", "param_norm")]
    rows += [("train", -1, s) for s in TRAIN]
    site, layer, stat = (np.array(c, dtype=object) for c in zip(*rows))
    layer = layer.astype(np.int64)
    located = np.isin(stat, ("absmax", "top1", "top2", "top3"))
    depth = np.where(layer >= 0, layer, 0) + 1.0
    base = np.where(np.isin(stat, ("m2", "var")), 2.0 * depth, np.where(np.isin(stat, ("nonfinite", "over_fp16",
                    "massive", "nonfinite_loss")), 0.0, np.sqrt(2.0 * depth)))
    base = np.where(located, 4.5 * np.sqrt(2 * depth), base)
    return site, layer, stat, located, base


def meta(name: str, steps: int) -> dict:
    roles = {f"blocks.{layer}.{w}": {"role": r, "layer": layer} for layer in range(L) for w, r in WEIGHTS}
    roles.update({f"blocks.{layer}.{n}.weight": {"role": r, "layer": layer} for layer in range(L) for n, r in NORMS})
    roles.update({"tok_emb.weight": {"role": "embed", "layer": -1}, "head.weight": {"role": "head", "layer": -1}})
    norms = [{"name": f"blocks.{layer}.{n}", "role": r, "layer": layer, "kind": "layernorm", "gain_offset": 0.0,
              "weight": f"blocks.{layer}.{n}.weight", "bias": None} for layer in range(L) for n, r in NORMS]
    return {"run_name": name, "status": "running", "placement": "peri", "n_layers": L, "d_model": D,
            "norm_type": "layernorm", "norms": norms, "param_roles": roles,
            "config": {"model": {"d_model": D, "n_layers": L, "placement": "peri", "mlp": "gelu", "init_std": 0.02,
                                 "seq_len": 128},
                       "train": {"batch_size": 16, "seq_len": 128, "steps": int(steps), "lr": 1e-3, "seed": 0}}}


def write_run(path: Path, steps: int, flush_every: int, seed: int = 0) -> dict:
    """Write the synthetic run through lnprobe.store.RunWriter, flush by flush, then close (compaction)."""
    from lnprobe.store import RunWriter, records_frame

    site, layer, stat, located, base = layout()
    n = len(site)
    rng = np.random.default_rng(seed)
    shutil.rmtree(path, ignore_errors=True)
    w = RunWriter(path, meta(path.name, steps))
    t0 = time.perf_counter()
    for start in range(0, steps, flush_every):
        s = np.arange(start, min(start + flush_every, steps))
        k = len(s)
        frac = (s / max(steps - 1, 1))[:, None]                                          # (k, 1)
        value = base[None, :] * (1 + 0.5 * frac) * (1 + 0.02 * rng.standard_normal((k, n)))  # (k, n)
        token = np.where(located[None, :], rng.integers(0, 128, (k, n)), np.nan)
        channel = np.where(located[None, :], rng.integers(0, D, (k, n)), np.nan)
        w.append(records_frame(np.repeat(s, n), np.tile(site, k), np.tile(layer, k), np.tile(stat, k),
                               value.ravel(), token.ravel(), channel.ravel()))
    t1 = time.perf_counter()
    parts_bytes = sum(p.stat().st_size for p in (path / "records").glob("part-*.parquet"))
    w.update_meta(status="finished", last_step=steps - 1)
    w.close()  # compacts
    t2 = time.perf_counter()
    disk = sum(p.stat().st_size for p in (path / "records").rglob("*.parquet"))
    rows = steps * n
    return {"rows": rows, "write_s": t1 - t0, "compact_s": t2 - t1, "parts_bytes": parts_bytes,
            "parts_B_per_row": parts_bytes / rows, "compacted_bytes": disk, "compacted_B_per_row": disk / rows}


def phase_load(path: Path) -> dict:
    import lnprobe

    t0 = time.perf_counter()
    run = lnprobe.load_run(path)
    t1 = time.perf_counter()
    one = lnprobe.load_run(path, site="resid", stat="m2", layer=L // 2).records
    t2 = time.perf_counter()
    pivot = run.pivot("resid", "m2")
    t3 = time.perf_counter()
    return {"load_run_s": t1 - t0, "one_site_stat_layer_s": t2 - t1, "one_rows": len(one),
            "pivot_resid_m2_s": t3 - t2, "pivot_shape": list(pivot.shape)}


def phase_cross(root: Path, engine: str) -> dict:
    """One statistic (resid m2 at the last layer) across every run, with the run identity as columns."""
    import lnprobe  # imports (pandas, pyarrow, duckdb) are not part of the query
    import lnprobe.query  # noqa: F401

    t0 = time.perf_counter()
    if engine == "duckdb":
        runs = lnprobe.open(str(root / "*"))
        t1 = time.perf_counter()
        df = runs.filter(site="resid", stat="m2", layer=L).df(["run", "placement", "lr", "step", "value"])
    else:  # pyarrow.dataset: the same files (the store's own listing), identity joined in pandas
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        runs = [lnprobe.load_run(p) for p in sorted(root.iterdir())]
        t1 = time.perf_counter()
        tables = []
        for r in runs:
            t = ds.dataset([str(f) for f in r._files], format="parquet").to_table(
                columns=["step", "value"], filter=(pc.field("site") == "resid") & (pc.field("stat") == "m2")
                & (pc.field("layer") == L))
            tables.append(t.append_column("run", pa.array([r.name] * t.num_rows)))
        df = pa.concat_tables(tables).to_pandas()
    t2 = time.perf_counter()
    return {"engine": engine, "open_s": t1 - t0, "query_s": t2 - t1, "rows": len(df)}


def phase_report(path: Path, out: Path) -> dict:
    from lnprobe.cli import main

    t0 = time.perf_counter()
    code = main(["report", str(path), "--out", str(out)])
    return {"report_s": time.perf_counter() - t0, "exit": code}


def child(argv: list[str]) -> dict:
    """Run one phase in a fresh interpreter; its result plus its own peak RSS."""
    p = subprocess.run([sys.executable, __file__, "--phase", *argv], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"phase {argv} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_phase(a: argparse.Namespace) -> None:
    name, *rest = a.phase
    if name == "write":
        res = write_run(Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]))
    elif name == "load":
        res = phase_load(Path(rest[0]))
    elif name == "cross":
        res = phase_cross(Path(rest[0]), rest[1])
    else:
        res = phase_report(Path(rest[0]), Path(rest[1]))
    res["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100_000, help="steps of the big run (500 rows each)")
    ap.add_argument("--cross-runs", type=int, default=20)
    ap.add_argument("--cross-steps", type=int, default=2_000, help="steps of each cross-run run (2000: 1 M rows)")
    ap.add_argument("--flush-every", type=int, default=20, help="steps per part (the probe's default)")
    ap.add_argument("--out", default="bench_out/big_run")
    ap.add_argument("--engines", action="store_true", help="also time the cross-run query with pyarrow.dataset")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: big, cross, report")
    ap.add_argument("--reuse", action="store_true", help="query the cross-run runs already in OUT/cross")
    ap.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.phase:
        return run_phase(a)
    root = Path(a.out)
    skip = set(filter(None, a.skip.split(",")))
    big = root / "big"
    if "big" not in skip:
        w = child(["write", str(big), str(a.steps), str(a.flush_every), "0"])
        print(f"big run: {w['rows']:,} rows in {a.steps // a.flush_every} parts written in {w['write_s']:.1f} s "
              f"({w['parts_B_per_row']:.2f} B/row as parts); close() compacted them in {w['compact_s']:.1f} s to "
              f"{w['compacted_bytes'] / 1e6:.1f} MB = {w['compacted_B_per_row']:.2f} B/row; "
              f"writer process peak RSS {w['peak_rss_MB']:.0f} MB")
        ld = child(["load", str(big)])
        print(f"load_run {ld['load_run_s']:.2f} s; one site/stat/layer over all steps ({ld['one_rows']:,} rows) "
              f"{ld['one_site_stat_layer_s']:.2f} s; pivot resid m2 {ld['pivot_shape']} {ld['pivot_resid_m2_s']:.2f} s; "
              f"peak RSS {ld['peak_rss_MB']:.0f} MB")
    if "report" not in skip:
        rp = child(["report", str(big), str(root / "report")])
        print(f"lnprobe report: {rp['report_s']:.1f} s, exit {rp['exit']}, peak RSS {rp['peak_rss_MB']:.0f} MB")
    if "cross" not in skip:
        cross = root / "cross"
        if not (a.reuse and cross.is_dir()):
            t0 = time.perf_counter()
            for i in range(a.cross_runs):
                child(["write", str(cross / f"run{i:02d}"), str(a.cross_steps), str(a.flush_every), str(i + 1)])
            print(f"cross: {a.cross_runs} runs × {a.cross_steps * len(layout()[0]):,} rows written and compacted "
                  f"in {time.perf_counter() - t0:.1f} s")
        for engine in ("duckdb", "pyarrow") if a.engines else ("duckdb",):
            c = child(["cross", str(cross), engine])
            print(f"cross-run query of one statistic ({engine}): open {c['open_s']:.2f} s, query {c['query_s']:.2f} s, "
                  f"{c['rows']:,} rows, peak RSS {c['peak_rss_MB']:.0f} MB")


if __name__ == "__main__":
    main()
