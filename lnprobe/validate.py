"""Schemas of the two files of a run directory that come from outside the analysis: ``meta.json`` and
the record parts. Both are checked when read, so that a damaged or hostile run directory fails with a
sentence naming the file, the field and what was expected, never with a bare parser error, and so that
no number in a file can make the reader allocate more than the records it holds. numpy / pandas /
pyarrow only (no torch).

meta.json: every field is optional (the HF callback and older runs write fewer); a field that is
present must have the type and range below (:data:`META_FIELDS`, :data:`MODEL_FIELDS`,
:data:`TRAIN_FIELDS`). Sizes are bounded by :data:`MAX_LAYERS` and the ``_MAX_*`` limits: a meta.json
saying ``n_layers: 300000000`` is rejected, not allocated.

A record part must be a Parquet file with the columns step, site, layer, stat, value (token and
channel optional): integer step/layer, numeric value, string site/stat, integer (nullable) token and
channel, and every layer in [-1, :data:`MAX_LAYERS`] (-1: parameters outside blocks and scalars).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

#: The largest layer index or number of blocks a run may claim (deepest published models: ~10²).
MAX_LAYERS = 100_000
_MAX_WIDTH = 10**7       # d_model, d_ff
_MAX_SEQ = 10**7         # seq_len (the theory tracks one value per position)
_MAX_STEPS = 10**15
_MAX_COUNT = 10**9       # batch size, heads, accumulation steps, world size
#: Placements meta.json may name: lnprobe.discovery's vocabulary, the reference GPT's "lns", "unknown".
PLACEMENTS = ("pre", "post", "peri", "output", "none", "mixed", "lns", "unknown")

REQUIRED_COLUMNS = ("step", "site", "layer", "stat", "value")
OPTIONAL_COLUMNS = ("token", "channel")


class RunDirectoryError(ValueError):
    """A run directory that cannot be read: the message is one line, path + problem + what to do."""


# ---------------------------------------------------------------------------------------------
# field checks: each returns None when the value is fine, else what was expected
# ---------------------------------------------------------------------------------------------
def _found(v: Any) -> str:
    text = json.dumps(v, default=str) if not isinstance(v, float) else repr(v)
    return f"{type(v).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"


def integer(lo: int, hi: int) -> Callable[[Any], str | None]:
    """An integer in [lo, hi]; an integral float (8.0) counts, booleans do not."""
    def check(v: Any) -> str | None:
        ok = (isinstance(v, int) and not isinstance(v, bool)) or (
            isinstance(v, float) and math.isfinite(v) and v.is_integer())
        if not ok or not lo <= v <= hi:
            return f"an integer in [{lo}, {hi}]"
        return None
    return check


def number(lo: float, hi: float) -> Callable[[Any], str | None]:
    """A finite number in [lo, hi] (not NaN, not ±inf, not a string)."""
    def check(v: Any) -> str | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or not lo <= v <= hi:
            return f"a finite number in [{lo:g}, {hi:g}]"
        return None
    return check


def text(max_len: int = 10_000) -> Callable[[Any], str | None]:
    """A string of at most ``max_len`` characters."""
    return lambda v: None if isinstance(v, str) and len(v) <= max_len else f"a string of at most {max_len} characters"


def one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    """One of ``choices``."""
    return lambda v: None if v in choices else f"one of {', '.join(choices)}"


def kind(*types: type) -> Callable[[Any], str | None]:
    """An instance of one of ``types`` (JSON object: dict, array: list)."""
    names = " or ".join({dict: "an object", list: "a list", bool: "true/false", str: "a string"}.get(t, t.__name__)
                        for t in types)
    return lambda v: None if isinstance(v, types) else names


def optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """``check``, or null."""
    return lambda v: None if v is None else check(v)


_STEP = optional(integer(-1, _MAX_STEPS))
#: Top-level meta.json fields the analysis reads.
META_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "run_name": optional(text(1000)), "placement": optional(one_of(PLACEMENTS)), "status": optional(text(200)),
    "n_layers": optional(integer(0, MAX_LAYERS)), "d_model": optional(integer(1, _MAX_WIDTH)),
    "first_step": _STEP, "last_step": _STEP, "steps": _STEP,
    "lr": optional(number(0, 1e6)), "norm_type": optional(text(200)),
    "config": optional(kind(dict)), "norms": optional(kind(list)), "param_roles": optional(kind(dict)),
    "notes": optional(kind(list)), "sites": optional(kind(list)), "divergence": optional(kind(dict)),
    "result": optional(kind(dict)), "resumed_from": optional(kind(list)), "map": optional(kind(dict)),
}
#: ``config.model`` (the reference GPT's GPTConfig).
MODEL_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "n_layers": optional(integer(0, MAX_LAYERS)), "d_model": optional(integer(1, _MAX_WIDTH)),
    "d_ff": optional(integer(1, _MAX_WIDTH)), "n_heads": optional(integer(1, _MAX_COUNT)),
    "seq_len": optional(integer(1, _MAX_SEQ)), "init_std": optional(number(0, 1e6)),
    "norm_eps": optional(number(0, 1e6)), "placement": optional(one_of(PLACEMENTS)),
    "mlp": optional(text(100)), "norm": optional(text(100)), "pos": optional(text(100)),
}
#: ``config.train`` (lnprobe train's TrainConfig) and ``config.trainer`` (the HF callback).
TRAIN_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "steps": optional(integer(0, _MAX_STEPS)), "lr": optional(number(0, 1e6)),
    "learning_rate": optional(number(0, 1e6)), "batch_size": optional(integer(1, _MAX_COUNT)),
    "seq_len": optional(integer(1, _MAX_SEQ)), "grad_accum": optional(integer(1, _MAX_COUNT)),
    "accum_steps": optional(integer(1, _MAX_COUNT)), "gradient_accumulation_steps": optional(integer(1, _MAX_COUNT)),
    "per_device_train_batch_size": optional(integer(1, _MAX_COUNT)), "max_steps": optional(integer(-1, _MAX_STEPS)),
}


def meta_problems(meta: Any) -> list[str]:
    """Every schema violation of a parsed meta.json, as "field 'x': expected ..., found ..." sentences."""
    if not isinstance(meta, dict):
        return [f"top level: expected an object, found {_found(meta)}"]
    out = _check_fields(meta, META_FIELDS, "")
    cfg = meta.get("config")
    if isinstance(cfg, dict):
        for section, fields in (("model", MODEL_FIELDS), ("train", TRAIN_FIELDS), ("trainer", TRAIN_FIELDS)):
            sec = cfg.get(section)
            if sec is None:
                continue
            if not isinstance(sec, dict):
                out.append(f"field 'config.{section}': expected an object, found {_found(sec)}")
            else:
                out += _check_fields(sec, fields, f"config.{section}.")
    for i, n in enumerate(meta.get("norms") or []):
        if not isinstance(n, dict):
            out.append(f"field 'norms[{i}]': expected an object, found {_found(n)}")
        elif (p := integer(-1, MAX_LAYERS)(n["layer"]) if n.get("layer") is not None else None):
            out.append(f"field 'norms[{i}].layer': expected {p}, found {_found(n['layer'])}")
    out += stack_problems(meta)
    roles = meta.get("param_roles")
    for name, info in (roles.items() if isinstance(roles, dict) else ()):
        if not isinstance(info, dict):
            out.append(f"field 'param_roles.{name}': expected an object, found {_found(info)}")
        elif (p := integer(-1, MAX_LAYERS)(info["layer"]) if info.get("layer") is not None else None):
            out.append(f"field 'param_roles.{name}.layer': expected {p}, found {_found(info['layer'])}")
        if len(out) > 20:  # a hostile file can hold millions; the first problems say enough
            break
    return out


_MAX_STACKS = 100


def stack_problems(meta: dict) -> list[str]:
    """Problems of ``map.stacks`` (models with several stacks, e.g. a T5 encoder and decoder): a list of
    at most 100 objects ``{"name": str, "first_layer": int >= 0, "n_layers": int >= 1}`` whose layer
    ranges [first_layer, first_layer + n_layers) do not overlap and stay within [0, MAX_LAYERS]."""
    m = meta.get("map")
    stacks = m.get("stacks") if isinstance(m, dict) else None
    if stacks is None:
        return []
    if not isinstance(stacks, list) or len(stacks) > _MAX_STACKS:
        return [f"field 'map.stacks': expected a list of at most {_MAX_STACKS} objects, found {_found(stacks)}"]
    out, spans = [], []
    for i, st in enumerate(stacks):
        where = f"map.stacks[{i}]"
        if not isinstance(st, dict):
            out.append(f"field '{where}': expected an object {{name, first_layer, n_layers}}, found {_found(st)}")
            continue
        for name, check in (("name", text(200)), ("first_layer", integer(0, MAX_LAYERS)),
                            ("n_layers", integer(1, MAX_LAYERS))):
            if (expected := check(st.get(name))):
                out.append(f"field '{where}.{name}': expected {expected}, found {_found(st.get(name))}")
        if not out:
            lo, hi = int(st["first_layer"]), int(st["first_layer"]) + int(st["n_layers"])
            if hi > MAX_LAYERS + 1:
                out.append(f"field '{where}': expected layers within [0, {MAX_LAYERS}], found {lo}..{hi - 1}")
            clash = next((j for j, (a, b) in enumerate(spans) if lo < b and a < hi), None)
            if clash is not None:
                out.append(f"field '{where}': expected layer ranges that do not overlap, found layers {lo}..{hi - 1} "
                           f"overlapping map.stacks[{clash}]")
            spans.append((lo, hi))
        if out:
            break
    return out


def _check_fields(obj: dict, fields: dict[str, Callable[[Any], str | None]], prefix: str) -> list[str]:
    out = []
    for name, check in fields.items():
        if name in obj and (expected := check(obj[name])):
            out.append(f"field '{prefix}{name}': expected {expected}, found {_found(obj[name])}")
    return out


def load_meta(path: str | Path) -> dict[str, Any]:
    """Parse and check ``path`` (a meta.json); :class:`RunDirectoryError` naming the file, the field and
    what was expected when it is not valid JSON, not an object, or breaks the schema."""
    path = Path(path)
    advice = "repair or restore the file, or delete it to analyse the records without metadata"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RunDirectoryError(f"{path}: cannot read meta.json ({exc.strerror or exc}); {advice}") from None
    if not raw.strip():
        raise RunDirectoryError(f"{path}: meta.json is empty (expected a JSON object); {advice}")
    try:
        # NaN/Infinity parse (Python's json module writes them); the checked fields reject them below
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise RunDirectoryError(f"{path}: meta.json is not valid JSON ({exc}); {advice}") from None
    problems = meta_problems(meta)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RunDirectoryError(f"{path}: meta.json does not match the run schema: {'; '.join(problems[:3])}{more}; "
                                f"fix or remove the field(s) (every field is optional), or {advice}")
    return meta


# ---------------------------------------------------------------------------------------------
# record parts
# ---------------------------------------------------------------------------------------------
def _type_ok(col: str, t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_null(t):
        return col in OPTIONAL_COLUMNS  # an all-missing token/channel column
    if col in ("site", "stat"):
        return pa.types.is_string(t) or pa.types.is_large_string(t)
    # integer columns written as floats by another tool (3.0) are castable; read_part checks the values
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def read_part(path: str | Path) -> tuple[pd.DataFrame | None, str | None]:
    """Read one record part and check it against the schema: (frame, None), or (None, why it was
    skipped) when it is unreadable, lacks a column, has a column of the wrong type or a layer outside
    [-1, MAX_LAYERS]. The frame holds the part's columns as read (``store`` casts them)."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except Exception as exc:  # truncated, not Parquet, unreadable: pyarrow raises several types
        return None, f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        return None, (f"wrong columns: missing {', '.join(missing)} (expected {', '.join(REQUIRED_COLUMNS)}, "
                      f"optional {', '.join(OPTIONAL_COLUMNS)}; found {', '.join(table.column_names[:12]) or 'none'})")
    bad = [f"{c} is {table.schema.field(c).type}" for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS
           if c in table.column_names and not _type_ok(c, table.schema.field(c).type)]
    if bad:
        return None, (f"wrong dtypes: {', '.join(bad)} (expected integer step/layer/token/channel, numeric value, "
                      "string site/stat)")
    frame = table.select([c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in table.column_names]).to_pandas()
    for col in ("step", "layer", "token", "channel"):
        v = frame[col].to_numpy(dtype=np.float64, na_value=np.nan) if col in frame else np.zeros(0)
        missing = np.isnan(v)
        if col in ("step", "layer") and missing.any():
            return None, f"wrong values: {int(missing.sum())} missing {col} value(s)"
        v = v[~missing]
        if len(v) and not (np.isfinite(v).all() and (v == np.round(v)).all() and np.abs(v).max() < 2.0**62):
            return None, f"wrong values: {col} holds non-integer numbers (expected integers)"
    if len(frame):
        lo, hi = int(np.min(frame["layer"])), int(np.max(frame["layer"]))
        if lo < -1 or hi > MAX_LAYERS:
            return None, f"wrong values: layer in [{lo}, {hi}], expected [-1, {MAX_LAYERS}]"
    return frame, None


def part_problem(path: str | Path) -> str | None:
    """Why :func:`read_part` would skip ``path``, or None when it would read it, from the file's footer
    alone when that settles it: integer step/layer/token/channel columns with row-group statistics
    (every file lnprobe writes) are checked by their null counts and min/max; any other part (float
    columns from another tool, no statistics) is read whole by :func:`read_part`."""
    path = Path(path)
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except Exception as exc:
        return f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    names = schema.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    int_cols = [c for c in ("step", "layer", "token", "channel") if c in names]
    if missing or not all(pa.types.is_integer(schema.field(c).type) for c in int_cols) or not all(
            _type_ok(c, schema.field(c).type) for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in names):
        return read_part(path)[1]  # the full check writes the sentence
    md = pf.metadata
    lo, hi, nulls = {}, {}, {}
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for j in range(rg.num_columns):
            col = rg.column(j)
            name = col.path_in_schema
            if name not in ("step", "layer"):
                continue
            st = col.statistics
            if rg.num_rows and (st is None or not st.has_min_max or st.null_count is None):
                return read_part(path)[1]
            if not rg.num_rows:
                continue
            nulls[name] = nulls.get(name, 0) + st.null_count
            lo[name] = min(lo.get(name, st.min), st.min)
            hi[name] = max(hi.get(name, st.max), st.max)
    for col in ("step", "layer"):
        if nulls.get(col):
            return f"wrong values: {nulls[col]} missing {col} value(s)"
    if "layer" in lo and (lo["layer"] < -1 or hi["layer"] > MAX_LAYERS):
        return f"wrong values: layer in [{lo['layer']}, {hi['layer']}], expected [-1, {MAX_LAYERS}]"
    return None


#: records/manifest.json of a compacted run (lnprobe.store): compacted files inside records/ and the
#: part files they replace.
_COMPACT_FILE = r"gen-\d{6,}/c-\d{3,}\.parquet"
_PART_FILE = r"part-\d+\.parquet"


def load_manifest(path: str | Path) -> dict[str, Any] | None:
    """Parse and check ``records/manifest.json``: None when there is none, else ``{"format": 1,
    "generation": int, "files": [...], "parts": [...], ...}`` whose file names all lie inside records/
    (``gen-G/c-K.parquet``, ``part-N.parquet``: no other path is ever opened). Raises
    :class:`RunDirectoryError` (one line) when it is damaged: without it the reader cannot tell which
    parts the compacted files already hold, so guessing could count records twice."""
    import re

    path = Path(path)
    if not path.exists():
        return None
    advice = ("restore it from a copy of the run; deleting it and the records/gen-* folders keeps only the parts "
              "written after the last compaction")
    try:
        m = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise RunDirectoryError(f"{path}: the compaction manifest is not readable JSON ({exc}); {advice}") from None
    problems = []
    if not isinstance(m, dict):
        problems.append(f"top level: expected an object, found {_found(m)}")
    else:
        if m.get("format") != 1:
            problems.append(f"field 'format': expected 1, found {_found(m.get('format'))}")
        if (p := integer(1, 10**9)(m.get("generation"))):
            problems.append(f"field 'generation': expected {p}, found {_found(m.get('generation'))}")
        for key, pattern, example in (("files", _COMPACT_FILE, "gen-000001/c-000.parquet"),
                                      ("parts", _PART_FILE, "part-000000.parquet")):
            v = m.get(key)
            if not isinstance(v, list) or len(v) > 10**7:
                problems.append(f"field '{key}': expected a list of file names, found {_found(v)}")
                continue
            bad = next((x for x in v if not (isinstance(x, str) and re.fullmatch(pattern, x))), None)
            if bad is not None:
                problems.append(f"field '{key}': expected file names like {example}, "
                                f"found {_found(bad)}")
    if problems:
        raise RunDirectoryError(f"{path}: the compaction manifest does not match its schema: "
                                f"{'; '.join(problems[:3])}; {advice}")
    return m


def conform(df: pd.DataFrame, schema: dict[str, str]) -> pd.DataFrame:
    """Cast records that passed :func:`read_part` to ``schema`` (``lnprobe.store.RECORD_SCHEMA``):
    columns in schema order, missing optional ones added as <NA>, integer/float dtypes fixed (a part
    written by another tool may use int32 or float). String columns keep the dtype pandas read."""
    n = len(df)
    out = {}
    for col, dtype in schema.items():
        if col not in df.columns:
            s = pd.Series([pd.NA if dtype == "Int64" else None] * n, dtype=object)
        else:
            s = df[col]
            if str(s.dtype) == dtype or (dtype == "str" and pd.api.types.is_string_dtype(s.dtype)):
                out[col] = s.reset_index(drop=True)
                continue
        if dtype == "int64":
            out[col] = pd.to_numeric(s, errors="coerce").fillna(-1).astype("int64").to_numpy()
        elif dtype == "float64":
            out[col] = pd.to_numeric(s, errors="coerce").astype("float64").to_numpy()
        elif dtype == "Int64":
            out[col] = pd.to_numeric(s, errors="coerce").astype("Int64").array
        else:
            out[col] = s.astype(str).to_numpy(dtype=object) if n else np.array([], dtype=object)
    return pd.DataFrame(out)
