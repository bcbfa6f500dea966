"""Time analysis.load and analysis.report.build_report on a synthetic run of about 10^6 records.

    /work/venv/bin/python benchmarks/report_speed.py [--records 1000000] [--out bench_out/report_speed]

The synthetic run looks like a probed 12-block Peri-LN GPT (D 256): every activation site of the
design page with every statistic (16 per site and layer), parameter statistics on 4 weights and 4
norms per block, train scalars, written as 60 Parquet parts. Values follow the Peri-LN law (m2 grows
by 2 per block, more with training) with noise; a few massive activations are planted. Target:
build_report ≤ 20 s on the 2-core development machine. Prints the numbers; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ACT_STATS = ("m2", "var", "rms", "absmax", "top1", "top2", "top3", "median_abs", "kurtosis",
             "nonfinite", "over_fp16", "massive", "grad_rms", "grad_absmax")
BLOCK_SITES = ("resid_mid", "attn_out", "mlp_out", "attn_raw", "mlp_raw", "mlp_act")
WEIGHTS = (("attn.qkv.weight", "attn.qkv"), ("attn.out.weight", "attn.out"),
           ("mlp.fc_in.weight", "mlp.in"), ("mlp.fc_out.weight", "mlp.out"))
NORMS = (("norm_attn_in", "norm.pre_attn"), ("norm_attn_out", "norm.post_attn"),
         ("norm_mlp_in", "norm.pre_mlp"), ("norm_mlp_out", "norm.post_mlp"))


def rows_per_step(L: int) -> int:
    act = (L + 1 + len(BLOCK_SITES) * L + 1) * len(ACT_STATS)
    par = L * (len(WEIGHTS) * 2 + len(NORMS) * 4) + 3 * 2
    return act + par + 3


def synth_run(path: Path, n_records: int = 1_000_000, L: int = 12, D: int = 256, parts: int = 60,
              seed: int = 0) -> int:
    """Write a synthetic Peri-LN run directory of about ``n_records`` rows; returns the row count."""
    rng = np.random.default_rng(seed)
    n_steps = max(2, n_records // rows_per_step(L))
    steps = np.arange(n_steps, dtype=np.int64)
    frac = steps / max(n_steps - 1, 1)                                     # training progress 0..1

    # activation sites: (site, layer) list
    sl = [("resid", l) for l in range(L + 1)] + [(s, l) for s in BLOCK_SITES for l in range(L)] + [("final", L)]
    site = np.array([s for s, _ in sl], dtype=object)
    layer = np.array([l for _, l in sl], dtype=np.int64)
    depth = np.where(site == "resid", layer, np.where(site == "final", 0, layer + 0.5))
    base_m2 = np.where(np.isin(site, ("resid", "resid_mid")), 1.0 + 2.0 * depth, 1.0)   # (n_sites,)
    m2 = base_m2[None, :] * (1 + 0.5 * frac[:, None]) * np.exp(0.02 * rng.standard_normal((n_steps, len(sl))))
    rms = np.sqrt(m2)
    med = 0.674 * rms
    top1 = 4.5 * rms * (1 + 0.1 * rng.random((n_steps, len(sl))))
    top1[:, (site == "resid") & (layer >= 3)] *= 1 + 400 * frac[:, None]    # planted massive activations
    vals = {"m2": m2, "var": m2 * 0.98, "rms": rms, "absmax": top1, "top1": top1, "top2": top1 * 0.9,
            "top3": top1 * 0.8, "median_abs": med, "kurtosis": 3 + rng.random(m2.shape),
            "nonfinite": np.zeros_like(m2), "over_fp16": np.zeros_like(m2),
            "massive": ((top1 > 100) & (top1 > 1000 * med)).astype(float),
            "grad_rms": 1e-4 / rms, "grad_absmax": 1e-3 / rms}
    frames = []
    S, K = n_steps, len(sl)
    for stat in ACT_STATS:
        located = stat in ("absmax", "top1", "top2", "top3")
        tok = np.where(np.tile(layer, S) >= 3, 0, rng.integers(0, 128, S * K)) if located else np.full(S * K, np.nan)
        ch = np.where(np.tile(layer, S) >= 3, 7, rng.integers(0, D, S * K)) if located else np.full(S * K, np.nan)
        frames.append(pd.DataFrame({"step": np.repeat(steps, K), "site": np.tile(site, S),
                                    "layer": np.tile(layer, S), "stat": stat, "value": vals[stat].ravel(),
                                    "token": tok, "channel": ch}))
    # parameters
    params, roles = [], {}
    for l in range(L):
        for suffix, role in WEIGHTS:
            params.append((f"blocks.{l}.{suffix}", role, l, ("grad_norm", "param_norm")))
        for mod, role in NORMS:
            params.append((f"blocks.{l}.{mod}.weight", role, l, ("grad_norm", "param_norm", "gain_ms", "gain_absmax")))
    params += [("tok_emb.weight", "embed", -1, ("grad_norm", "param_norm")),
               ("emb_norm.weight", "norm.embed", -1, ("grad_norm", "param_norm")),
               ("final_norm.weight", "norm.final", -1, ("grad_norm", "param_norm"))]
    for name, role, l, stats in params:
        roles[name] = {"role": role, "layer": l}
        for stat in stats:
            v = {"grad_norm": 0.05 * np.exp(-2 * frac) * (1 + 0.05 * rng.standard_normal(S)),
                 "param_norm": 8 + frac, "gain_ms": 1 + 0.3 * frac, "gain_absmax": 1 + 2 * frac}[stat]
            frames.append(pd.DataFrame({"step": steps, "site": f"param:{name}", "layer": l, "stat": stat,
                                        "value": np.broadcast_to(v, (S,)), "token": np.nan, "channel": np.nan}))
    loss = 5.5 * np.exp(-3 * frac) + 1.5 + 0.02 * rng.standard_normal(S)
    for stat, v in (("loss", loss), ("grad_norm", 1 + rng.random(S)), ("lr", np.full(S, 1e-3))):
        frames.append(pd.DataFrame({"step": steps, "site": "train", "layer": -1, "stat": stat, "value": v,
                                    "token": np.nan, "channel": np.nan}))
    rec = pd.concat(frames, ignore_index=True).sort_values("step", kind="stable", ignore_index=True)
    rec["token"] = rec["token"].astype("Int64")
    rec["channel"] = rec["channel"].astype("Int64")
    out = path / "records"
    out.mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(np.array_split(np.arange(len(rec)), parts)):
        rec.iloc[chunk].to_parquet(out / f"part-{i:06d}.parquet", index=False)
    norms = [{"name": f"blocks.{l}.{mod}", "role": role, "layer": l, "kind": "layernorm", "gain_offset": 0.0,
              "weight": f"blocks.{l}.{mod}.weight", "bias": None} for l in range(L) for mod, role in NORMS]
    norms += [{"name": "emb_norm", "role": "norm.embed", "layer": -1, "kind": "layernorm", "gain_offset": 0.0,
               "weight": "emb_norm.weight", "bias": None},
              {"name": "final_norm", "role": "norm.final", "layer": -1, "kind": "layernorm", "gain_offset": 0.0,
               "weight": "final_norm.weight", "bias": None}]
    meta = {"run_name": "synthetic-peri", "status": "finished", "placement": "peri", "n_layers": L, "d_model": D,
            "norm_type": "layernorm", "norms": norms, "param_roles": roles,
            "config": {"model": {"d_model": D, "n_layers": L, "placement": "peri", "mlp": "gelu", "init_std": 0.02,
                                 "seq_len": 128, "embed_norm": True},
                       "train": {"batch_size": 16, "seq_len": 128, "steps": int(n_steps)}}}
    (path / "meta.json").write_text(json.dumps(meta, indent=1))
    return len(rec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--out", default="bench_out/report_speed")
    args = ap.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    n = synth_run(root / "run", args.records)
    t1 = time.perf_counter()
    print(f"synthesised {n:,} records in {t1 - t0:.2f} s")

    import lnprobe.analysis as analysis
    from lnprobe.analysis import verdicts
    from lnprobe.analysis.report import build_report

    t2 = time.perf_counter()
    run = analysis.load(root / "run")
    t3 = time.perf_counter()
    verdicts.all_verdicts([run])
    t4 = time.perf_counter()
    res = build_report([root / "run"], root / "report")
    t5 = time.perf_counter()
    print(f"load: {t3 - t2:.2f} s; verdicts on the loaded run: {t4 - t3:.2f} s")
    print(f"build_report (load + {len(res.figures)} figures as PNG+SVG + verdicts + md/html): {t5 - t4:.2f} s "
          f"(target ≤ 20 s)")
    print(f"figures not made: {res.missing or 'none'}; report: {res.report_md}")


if __name__ == "__main__":
    main()
