"""Queries over run directories, one or many, on DuckDB: the lazy relation of ``lnprobe.open``, the
filtered reads behind ``lnprobe.load_run`` and the :class:`~lnprobe.store.Run` accessors, and the
sorted rewrite of :func:`lnprobe.compaction.compact`. No torch.

    runs = lnprobe.open("runs/sweep/runs/*")            # every run directory the pattern matches
    runs.runs                                           # one row per run: run, path, placement, lr, ...
    m2 = runs.filter(site="resid", stat="m2", layer=8, placement="peri").df()
    runs.relation                                       # the DuckDB relation, for SQL of your own

Why DuckDB (docs/design.md §5, measured by ``benchmarks/big_run.py``): it scans many Parquet files as
one table, pushes filters on site, stat, layer and step into the scan (row groups whose min/max
statistics exclude a value are not read, which the (site, stat, layer, step) order of compacted files
makes effective), joins the run identity from meta.json without copying records, sorts larger-than-
memory data under a memory limit for compaction, and hands results to pandas through Arrow.

Filters: ``site``, ``stat`` (a name or a list of names), ``layer``, ``step`` (an integer, a list of
integers or a ``range``); ``open`` also filters runs by ``run`` (the name), ``path`` and the identity
columns (a value or a list), which selects the files before anything is read.
"""
from __future__ import annotations

import functools
import glob as _glob
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

__all__ = ["open", "Runs", "IDENTITY_COLUMNS", "RECORD_FILTERS"]

#: Record columns a filter may name, and the type of their values.
RECORD_FILTERS = {"site": str, "stat": str, "layer": int, "step": int}
#: Columns that identify a run in ``lnprobe.open``: the name, the directory and meta.json's identity.
IDENTITY_COLUMNS = ("run", "path", "placement", "lr", "seed", "layers", "d_model", "status")
#: Derived record column: the stack (``meta.map.stacks``) that holds the layer; null without stacks.
STACK_COLUMN = "stack"
#: DuckDB's memory for a compaction sort; beyond it the sort spills to a temporary folder in records/.
COMPACT_MEMORY = "1GB"
_RECORD_COLUMNS = ("step", "site", "layer", "stat", "value", "token", "channel")
_CAST = {"step": "BIGINT", "site": "VARCHAR", "layer": "BIGINT", "stat": "VARCHAR", "value": "DOUBLE",
         "token": "BIGINT", "channel": "BIGINT"}


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _base():
    import duckdb

    return duckdb.connect(":memory:")


def _cursor():
    """A connection of its own (DuckDB connections are not shared between threads)."""
    return _base().cursor()


def _arrow(rel) -> pa.Table:
    fetch = getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table
    return fetch()


def _lit(v: Any) -> str:
    """A SQL literal of a checked filter value (strings quoted, numbers as numbers)."""
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    if isinstance(v, (bool, np.bool_)):
        return "TRUE" if v else "FALSE"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)) and math.isfinite(v):
        return repr(float(v))
    raise ValueError(f"cannot use {v!r} in a filter")


def _scan(files: list[Path]) -> str:
    names = ", ".join(_lit(str(Path(f).resolve())) for f in files)
    return f"read_parquet([{names}], filename = true, file_row_number = true, union_by_name = true)"


def _file_table(con, files: list[Path], run_idx: list[int] | None = None, name: str = "lnprobe_files") -> None:
    con.register(name, pa.table({"filename": [str(Path(f).resolve()) for f in files],
                                 "ord": np.arange(len(files), dtype=np.int64),
                                 "run_idx": np.asarray(run_idx if run_idx is not None else [0] * len(files),
                                                       dtype=np.int64)}))


@functools.lru_cache(maxsize=512)
def _columns_of(files: tuple[str, ...]) -> frozenset[str]:
    con = _cursor()
    return frozenset(r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {_scan(list(files))}").fetchall())


def _exprs(files: list[Path], columns: Iterable[str], stacks_sql: str) -> list[str]:
    present = _columns_of(tuple(str(Path(f).resolve()) for f in files))
    out = []
    for c in columns:
        if c == STACK_COLUMN:
            out.append(f"{stacks_sql} AS {STACK_COLUMN}")
        elif c in present:
            out.append(f"CAST(r.{c} AS {_CAST[c]}) AS {c}")
        else:  # an optional column (token, channel) that no file has
            out.append(f"CAST(NULL AS {_CAST[c]}) AS {c}")
    return out


def _stack_case(stacks_by_run: dict[int, list[tuple[str, int, int]]], run_col: str | None) -> str:
    """SQL of the derived ``stack`` column: the name of the stack whose layer range holds ``layer``."""
    whens = [f"WHEN {f'{run_col} = {i} AND ' if run_col else ''}r.layer BETWEEN {lo} AND {hi} THEN {_lit(name)}"
             for i, stacks in stacks_by_run.items() for name, lo, hi in stacks]
    return f"CASE {' '.join(whens)} END" if whens else "CAST(NULL AS VARCHAR)"


# ---------------------------------------------------------------------------------------------
# filters
# ---------------------------------------------------------------------------------------------
def _found(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"


def check_filters(filters: dict[str, Any]) -> dict[str, list[tuple]]:
    """Record filters as conditions: column -> [("in", values) | ("range", lo, hi) | ("ge", v)].
    None means no filter. ValueError (one line) for an unknown column or a value of the wrong type."""
    out: dict[str, list[tuple]] = {}
    for col, v in filters.items():
        if v is None:
            continue
        if col not in RECORD_FILTERS:
            raise ValueError(f"unknown record filter {col!r}: expected one of {', '.join(RECORD_FILTERS)}")
        kind = RECORD_FILTERS[col]
        want = ("a name or a list of names" if kind is str
                else "an integer, a list of integers or a range of step 1")
        if isinstance(v, tuple) and v and v[0] in ("in", "range", "ge"):  # already a condition
            out.setdefault(col, []).append(v)
            continue
        if kind is int and isinstance(v, range):
            cond = ("range", v.start, v.stop - 1) if v.step == 1 else ("in", tuple(v))
        else:
            values = (v,) if isinstance(v, (str, int, np.integer)) else v
            try:
                values = tuple(values)
            except TypeError:
                raise ValueError(f"filter {col!r}: expected {want}, found {_found(v)}") from None
            ok = all(isinstance(x, str) for x in values) if kind is str else all(
                isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in values)
            if not ok:
                raise ValueError(f"filter {col!r}: expected {want}, found {_found(v)}")
            cond = ("in", tuple(int(x) for x in values) if kind is int else values)
        out.setdefault(col, []).append(cond)
    return out


def merge_filters(a: dict[str, list[tuple]], b: dict[str, list[tuple]]) -> dict[str, list[tuple]]:
    """Both sets of conditions (AND)."""
    out = {k: list(v) for k, v in a.items()}
    for k, v in b.items():
        out.setdefault(k, []).extend(v)
    return out


def check_columns(columns: Iterable[str] | None) -> None:
    """ValueError (one line) for a column that ``run.records`` does not have."""
    allowed = (*_RECORD_COLUMNS, STACK_COLUMN)
    for c in columns or ():
        if c not in allowed:
            raise ValueError(f"unknown record column {c!r}: expected some of {', '.join(allowed)}")


def _where(filters: dict[str, list[tuple]], prefix: str = "r.") -> str:
    parts = []
    for col, conds in filters.items():
        for cond in conds:
            if cond[0] == "in":
                parts.append(f"{prefix}{col} IN ({', '.join(_lit(x) for x in cond[1])})" if cond[1] else "FALSE")
            elif cond[0] == "range":
                parts.append(f"{prefix}{col} BETWEEN {_lit(cond[1])} AND {_lit(cond[2])}")
            else:
                parts.append(f"{prefix}{col} >= {_lit(cond[1])}")
    return " AND ".join(parts) or "TRUE"


def filter_frame(frame: pd.DataFrame, filters: dict[str, list[tuple]]) -> pd.DataFrame:
    """The rows of an in-memory records frame that ``filters`` keep (the same rule as the SQL)."""
    keep = np.ones(len(frame), dtype=bool)
    for col, conds in filters.items():
        v = frame[col]
        for cond in conds:
            if cond[0] == "in":
                keep &= v.isin(cond[1]).to_numpy()
            elif cond[0] == "range":
                keep &= ((v >= cond[1]) & (v <= cond[2])).to_numpy()
            else:
                keep &= (v >= cond[1]).to_numpy()
    return frame[keep].reset_index(drop=True) if not keep.all() else frame


# ---------------------------------------------------------------------------------------------
# reading one run's files
# ---------------------------------------------------------------------------------------------
def to_frame(table: pa.Table) -> pd.DataFrame:
    """An Arrow result as a records frame with the schema's dtypes (token/channel: nullable Int64)."""
    out = {}
    nullable = {pa.int64(): pd.Int64Dtype()}.get
    for c in table.column_names:
        col = table.column(c)
        if c in ("token", "channel"):
            out[c] = col.cast(pa.int64()).to_pandas(types_mapper=nullable).array
        elif c in ("step", "layer"):
            out[c] = np.asarray(col.to_numpy(), dtype=np.int64)
        elif c == "value":
            out[c] = np.asarray(col.to_numpy(), dtype=np.float64)
        else:  # site, stat, stack: pandas' string dtype (missing: NaN)
            out[c] = col.cast(pa.string()).to_pandas().astype("str")
    return pd.DataFrame(out, index=pd.RangeIndex(table.num_rows))


def _empty(columns: Iterable[str]) -> pd.DataFrame:
    from .store import RECORD_SCHEMA

    return pd.DataFrame({c: pd.Series(dtype=RECORD_SCHEMA.get(c, "str")) for c in columns})


def select_records(files: list[Path], columns: Iterable[str] | None = None,
                   filters: dict[str, list[tuple]] | None = None,
                   stacks: list[tuple[str, int, int]] | None = None, *, ordered: bool = True) -> pd.DataFrame:
    """Rows of one run's record files that ``filters`` keep, in reading order (file order, then row
    order: a later duplicate stays later), ``columns`` (default the schema's and ``stack``).
    ``ordered=False`` (files with one row per key: compacted) leaves the order to the engine."""
    columns = list(columns) if columns is not None else [*_RECORD_COLUMNS, STACK_COLUMN]
    if not files:
        return _empty(columns)
    con = _cursor()
    exprs = ", ".join(_exprs(files, columns, _stack_case({0: stacks or []}, None)))
    if ordered:
        _file_table(con, files)
        sql = (f"SELECT {exprs} FROM {_scan(files)} r JOIN lnprobe_files f USING (filename) "
               f"WHERE {_where(filters or {})} ORDER BY f.ord, r.file_row_number")
    else:
        sql = f"SELECT {exprs} FROM {_scan(files)} r WHERE {_where(filters or {})}"
    return to_frame(_arrow(con.sql(sql)))


def _scalar(files: list[Path], expr: str, filters: dict | None = None) -> Any:
    if not files:
        return None
    return _cursor().execute(f"SELECT {expr} FROM {_scan(files)} r WHERE {_where(filters or {})}").fetchone()[0]


def distinct_pairs(files: list[Path], filters: dict | None = None) -> set[tuple[str, str]]:
    """The (site, stat) pairs present."""
    if not files:
        return set()
    rows = _cursor().execute(f"SELECT DISTINCT CAST(r.site AS VARCHAR), CAST(r.stat AS VARCHAR) FROM {_scan(files)} r "
                         f"WHERE {_where(filters or {})}").fetchall()
    return set(rows)


def distinct_steps(files: list[Path], filters: dict | None = None) -> np.ndarray:
    """The sorted distinct steps."""
    if not files:
        return np.zeros(0, dtype=np.int64)
    rows = _cursor().execute(f"SELECT DISTINCT CAST(r.step AS BIGINT) FROM {_scan(files)} r "
                             f"WHERE {_where(filters or {})}").fetchall()
    return np.sort(np.array([r[0] for r in rows], dtype=np.int64))


def layer_bound(files: list[Path], filters: dict | None = None) -> int | None:
    """max(layer + (site != resid)) over block rows (layer >= 0): the L the records show."""
    v = _scalar(files, "max(CAST(r.layer AS BIGINT) + CASE WHEN r.site = 'resid' THEN 0 ELSE 1 END)",
                merge_filters(filters or {}, {"layer": [("ge", 0)]}))
    return None if v is None else int(v)


def count_rows(files: list[Path], filters: dict | None = None) -> int:
    """Number of rows that ``filters`` keep."""
    return int(_scalar(files, "count(*)", filters) or 0)


def max_step(files: list[Path]) -> int:
    """The largest step, -1 when there is none."""
    v = _scalar(files, "max(CAST(r.step AS BIGINT))")
    return -1 if v is None else int(v)


def write_compacted(files: list[Path], out: Path, *, drop_from_step: int | None = None) -> int:
    """Write the records of ``files`` (in reading order) to ``out``: one row per (step, site, layer,
    stat), the last one read; steps < ``drop_from_step`` only, when given; sorted by (site, stat, layer,
    step), zstd, Parquet's dictionary encoding for site and stat. Returns the number of rows written.
    The sort runs within :data:`COMPACT_MEMORY` and spills to a temporary folder next to ``out``."""
    import shutil

    import duckdb

    con = duckdb.connect(":memory:")  # its own database: the settings below must not reach the readers
    tmp = out.parent.parent / f".duckdb.tmp-{out.parent.name}"
    con.execute(f"SET memory_limit = '{COMPACT_MEMORY}'")
    con.execute(f"SET temp_directory = {_lit(str(tmp))}")
    con.execute("SET preserve_insertion_order = false")
    _file_table(con, files)
    keep = f" AND step < {int(drop_from_step)}" if drop_from_step is not None else ""
    cols = ", ".join(_RECORD_COLUMNS)
    sql = (f"COPY (SELECT {cols} FROM (SELECT {', '.join(_exprs(files, _RECORD_COLUMNS, ''))}, "
           "row_number() OVER (PARTITION BY r.step, r.site, r.layer, r.stat "
           "ORDER BY f.ord DESC, r.file_row_number DESC) AS newest "
           f"FROM {_scan(files)} r JOIN lnprobe_files f USING (filename)) WHERE newest = 1{keep} "
           f"ORDER BY site, stat, layer, step) TO {_lit(str(out))} "
           "(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 100000)")
    try:
        rows = con.execute(sql).fetchone()
    finally:
        con.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return int(rows[0]) if rows else 0


# ---------------------------------------------------------------------------------------------
# many runs
# ---------------------------------------------------------------------------------------------
def run_identity(run) -> dict[str, Any]:
    """The identity columns of a loaded :class:`~lnprobe.store.Run` (meta.json, then its config)."""
    from .store import config_section

    train = {**config_section(run.meta, "trainer"), **run.train_config}
    lr = run.meta.get("lr", train.get("lr", train.get("learning_rate")))
    seed = train.get("seed")
    layers = run.meta.get("n_layers", run.model_config.get("n_layers"))
    return {"run": run.name, "path": str(run.path), "placement": run.placement,
            "lr": float(lr) if isinstance(lr, (int, float)) else None,
            "seed": int(seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else None,
            "layers": int(layers) if layers is not None else None, "d_model": run.d_model, "status": run.status}


def _expand(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: list[Path] = []
    for item in items:
        text = str(item)
        matches = sorted(_glob.glob(text)) if any(ch in text for ch in "*?[") else [text]
        out += [Path(m) for m in matches]
    return list(dict.fromkeys(out))


def _is_run(path: Path) -> bool:
    return path.is_dir() and ((path / "meta.json").exists() or (path / "records").is_dir()
                              or (path / "records.parquet").exists())


def open(paths: str | Path | Iterable[str | Path], **filters: Any) -> "Runs":  # noqa: A001 (lnprobe.open)
    """Every run directory that ``paths`` (a glob pattern, a path, or a list of them) names, as one
    lazy relation (:class:`Runs`); ``filters`` as in :meth:`Runs.filter`.

    Matches that are not run directories (a report folder, summary.csv) are left out and listed in
    ``runs.warnings``. Raises FileNotFoundError (one line) when no run matches, and the one-line
    :class:`~lnprobe.validate.RunDirectoryError` of :func:`lnprobe.load_run` for a damaged run."""
    import warnings

    from .store import load_run

    candidates = _expand(paths)
    dirs = [p for p in candidates if _is_run(p)]
    notes = [f"{p}: not a run directory (no meta.json, no records/); left out" for p in candidates if not _is_run(p)]
    if not dirs:
        raise FileNotFoundError(f"lnprobe.open({paths!r}): no run directory matches (expected folders holding "
                                "meta.json and records/); check the pattern, e.g. 'runs/sweep/runs/*'")
    runs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for d in dirs:
            runs.append(load_run(d))
    notes += [str(w.message) for w in caught]
    return Runs(runs, notes).filter(**filters)


class Runs:
    """A lazy relation over the records of several runs: one row per record with the columns ``run``,
    ``path``, ``placement``, ``lr``, ``seed``, ``layers``, ``d_model``, ``status`` (meta.json's
    identity, :data:`IDENTITY_COLUMNS`), the record schema and ``stack``. Nothing is read until
    :meth:`df`, :meth:`arrow` or a query on :attr:`relation`; each yields, per run, the rows of
    ``lnprobe.load_run(path).records`` (duplicates of a resumed run included) that the filters keep."""

    def __init__(self, runs: list, warnings: list[str] | None = None,
                 filters: dict[str, list[tuple]] | None = None):
        self._runs = list(runs)
        self.warnings = list(warnings or [])
        self._filters = dict(filters or {})
        self.runs = pd.DataFrame([run_identity(r) for r in self._runs], columns=list(IDENTITY_COLUMNS))
        self._con = None

    def __len__(self) -> int:
        return len(self._runs)

    def __repr__(self) -> str:
        return f"Runs({len(self._runs)} runs, filters={self._filters})"

    def filter(self, **filters: Any) -> "Runs":
        """A narrower relation: record filters (``site``, ``stat``, ``layer``, ``step``) go to the scan,
        identity filters (``run``, ``path``, ``placement``, ``lr``, ``seed``, ``layers``, ``d_model``,
        ``status``: a value or a list) choose the runs before any file is read."""
        record = {k: v for k, v in filters.items() if k in RECORD_FILTERS}
        ident = {k: v for k, v in filters.items() if k not in RECORD_FILTERS}
        bad = [k for k in ident if k not in IDENTITY_COLUMNS]
        if bad:
            raise ValueError(f"unknown filter {bad[0]!r}: expected one of "
                             f"{', '.join((*RECORD_FILTERS, *IDENTITY_COLUMNS))}")
        keep = np.ones(len(self._runs), dtype=bool)
        for k, v in ident.items():
            if v is None:
                continue
            values = list(v) if isinstance(v, (list, tuple, set, range)) else [v]
            keep &= self.runs[k].isin(values).to_numpy()
        runs = [r for r, k in zip(self._runs, keep) if k]
        return Runs(runs, self.warnings, merge_filters(self._filters, check_filters(record)))

    def _sql(self, columns: list[str]) -> str | None:
        files, run_idx = [], []
        for i, r in enumerate(self._runs):
            files += r._files or []
            run_idx += [i] * len(r._files or [])
        if not files:
            return None
        con = self._connection()
        _file_table(con, files, run_idx)
        ident = pa.Table.from_pandas(self.runs.assign(run_idx=np.arange(len(self.runs))), preserve_index=False)
        con.register("lnprobe_runs", ident)
        from .store import stacks_of

        stack = _stack_case({i: stacks_of(r.meta) for i, r in enumerate(self._runs)}, "f.run_idx")
        rec = [c for c in columns if c not in IDENTITY_COLUMNS]
        exprs = [f"i.{c}" for c in columns if c in IDENTITY_COLUMNS] + _exprs(files, rec, stack)
        return (f"SELECT {', '.join(exprs)} FROM {_scan(files)} r JOIN lnprobe_files f USING (filename) "
                f"JOIN lnprobe_runs i ON i.run_idx = f.run_idx WHERE {_where(self._filters)}")

    def _connection(self):
        if self._con is None:
            self._con = _cursor()
        return self._con

    @property
    def columns(self) -> list[str]:
        """The relation's columns: identity, record schema, ``stack``."""
        return [*IDENTITY_COLUMNS, *_RECORD_COLUMNS, STACK_COLUMN]

    @property
    def relation(self):
        """The DuckDB relation (lazy; ``.filter("value > 1")``, ``.aggregate(...)``, SQL on it)."""
        sql = self._sql(self.columns)
        if sql is None:
            sql = "SELECT " + ", ".join(f"CAST(NULL AS VARCHAR) AS {c}" for c in self.columns) + " WHERE FALSE"
        return self._connection().sql(sql)

    def arrow(self, columns: list[str] | None = None) -> pa.Table:
        """The rows as an Arrow table."""
        cols = list(columns) if columns is not None else self.columns
        bad = [c for c in cols if c not in self.columns]
        if bad:
            raise ValueError(f"unknown column {bad[0]!r}: expected some of {', '.join(self.columns)}")
        sql = self._sql(cols)
        if sql is None:
            return pa.Table.from_pandas(self._empty(cols), preserve_index=False)
        return _arrow(self._connection().sql(sql))

    def df(self, columns: list[str] | None = None) -> pd.DataFrame:
        """The rows as a pandas DataFrame (record columns in the store's dtypes)."""
        table = self.arrow(columns)
        ident = [c for c in table.column_names if c in IDENTITY_COLUMNS]
        rec = to_frame(table.drop_columns(ident)) if table.num_columns > len(ident) else pd.DataFrame()
        front = table.select(ident).to_pandas() if ident else pd.DataFrame(index=range(table.num_rows))
        return pd.concat([front.reset_index(drop=True), rec.reset_index(drop=True)], axis=1)[table.column_names]

    def _empty(self, columns: list[str]) -> pd.DataFrame:
        rec = _empty([c for c in columns if c not in IDENTITY_COLUMNS])
        for c in columns:
            if c in IDENTITY_COLUMNS:
                rec[c] = self.runs[c].iloc[:0]
        return rec[columns]
