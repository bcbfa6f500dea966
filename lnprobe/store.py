"""Run directory: the record schema, ``meta.json``, the writer (``RunWriter``), the reader (``load_run``
returning :class:`Run`). Imports numpy / pandas / pyarrow only, never torch, so ``lnprobe.load_run``
and ``lnprobe.analysis`` work on a machine without torch.

Layout (design page section 5)::

    RUN/meta.json                  placement, sizes, sites, param roles, config, versions, status
    RUN/records/part-000000.parquet  long-format records, one file per flush

Every file is written to a temporary name in the same directory and renamed into place, so a crash
leaves either the whole part or nothing; a reader never sees half a file under a final name. A part
that is unreadable anyway (disk full, copied half-way) is reported by name and skipped by ``load_run``.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa  # imported with the writer, so the first flush of a run does not pay for it
import pyarrow.parquet as pq

from .compaction import (  # the layout's own helpers, shared with the writer
    _GEN_RE,
    MANIFEST_NAME,
    _part_number,
    _remove,
    compact,
    compact_quietly,
    read_manifest,
    record_files,
)
from .rundir import RunExistsError, RunLock, RunLockedError, check_claim
from .validate import MAX_LAYERS, RunDirectoryError, load_meta

__all__ = ["RECORD_SCHEMA", "RECORD_COLUMNS", "RUN_COLUMNS", "Run", "RunWriter", "load_run", "read_meta",
           "write_meta", "read_records", "records_frame", "trim", "compact", "record_files", "read_manifest",
           "last_recorded_step", "stacks_of", "MANIFEST_NAME", "RunDirectoryError", "RunExistsError",
           "RunLockedError"]

#: The record schema: column -> dtype, one row per (step, site, layer, stat). ``token`` (sequence
#: position) and ``channel`` locate a value (absmax, top1..top3) and are <NA> elsewhere.
RECORD_SCHEMA: dict[str, str] = {
    "step": "int64", "site": "str", "layer": "int64", "stat": "str", "value": "float64",
    "token": "Int64", "channel": "Int64",
}
RECORD_COLUMNS = tuple(RECORD_SCHEMA)
#: Columns of ``Run.records``: the schema's plus ``stack``, derived on read from ``meta.map.stacks``
#: (the name of the stack holding the row's layer, e.g. "encoder"; null for a model with one stack).
RUN_COLUMNS = (*RECORD_COLUMNS, "stack")
#: Site of a parameter statistic: ``param:<full parameter name>``.
PARAM_PREFIX = "param:"
#: Roles of the four sublayer weights (``param_roles`` in meta.json).
SUBLAYER_ROLES = ("attn.qkv", "attn.out", "mlp.in", "mlp.out")


# ---------------------------------------------------------------------------------------------
# meta.json
# ---------------------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_meta(run_dir: str | Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` atomically (sorted keys, JSON-safe values)."""
    path = Path(run_dir) / "meta.json"
    _atomic_write_bytes(path, json.dumps(meta, indent=2, sort_keys=True, default=str).encode())


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    """``meta.json`` of ``run_dir``, checked against the schema (:mod:`lnprobe.validate`):
    FileNotFoundError when there is none, :class:`RunDirectoryError` (one line: the file, the field,
    what was expected, what to do) when it is not valid JSON, not an object or breaks the schema."""
    path = Path(run_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{run_dir} is not an lnprobe run directory: expected {path}; "
            "pass the directory given to lnprobe.attach(...) or `lnprobe train --out`"
        )
    return load_meta(path)


def config_section(meta: dict[str, Any], section: str) -> dict[str, Any]:
    """``meta["config"][section]`` as a dict ({} when absent): the one parser of the configuration
    ``lnprobe train`` writes (sections ``model``: the reference GPT's ``GPTConfig``, ``train``:
    ``TrainConfig``; the HF callback writes ``trainer``)."""
    cfg = meta.get("config")
    sec = cfg.get(section) if isinstance(cfg, dict) else None
    return dict(sec) if isinstance(sec, dict) else {}


def model_config(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta.config.model`` (reference GPT only) or {}."""
    return config_section(meta, "model")


def train_config(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta.config.train`` (``lnprobe train`` only) or {}."""
    return config_section(meta, "train")


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------
def records_frame(
    step: np.ndarray, site: np.ndarray, layer: np.ndarray, stat: np.ndarray,
    value: np.ndarray, token: np.ndarray, channel: np.ndarray,
) -> pd.DataFrame:
    """Build a records DataFrame with the schema's dtypes; NaN token/channel become <NA>."""
    return pd.DataFrame({
        "step": np.asarray(step, dtype=np.int64),
        "site": pd.array(site, dtype=object),
        "layer": np.asarray(layer, dtype=np.int64),
        "stat": pd.array(stat, dtype=object),
        "value": np.asarray(value, dtype=np.float64),
        "token": _nullable_int(token),
        "channel": _nullable_int(channel),
    })


def _nullable_int(values: np.ndarray) -> pd.arrays.IntegerArray:
    """float array with NaN for missing -> pandas Int64 with <NA>."""
    values = np.asarray(values, dtype=np.float64)
    missing = np.isnan(values)
    return pd.arrays.IntegerArray(np.where(missing, 0, values).astype(np.int64), missing)


def read_records(run_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Every record of a run in reading order (the compacted files, then the parts written after the
    last compaction, by number; ``records.parquet`` of an old run when there are neither); return
    (records in the schema, paths of skipped parts). A part that is unreadable or breaks the part
    schema (:func:`lnprobe.validate.part_problem`) is skipped with a ``UserWarning`` naming the file
    and the problem."""
    files, skipped = record_files(Path(run_dir))
    from .query import select_records

    return select_records(files), [p for p, _ in skipped]


class RunWriter:
    """Owns one run directory: claims it, writes meta.json and numbered record parts.

    A directory that already holds a run (meta.json or record parts) is refused with
    :class:`RunExistsError` unless ``resume=True`` (append: part numbers continue after the last part
    on disk) or ``overwrite=True`` (its meta.json and record parts are deleted when the writer starts;
    other files, e.g. a checkpoint, are kept). The writer holds ``RUN/.lock`` until :meth:`close`
    (also removed at garbage collection and interpreter exit), so a second writer gets
    :class:`RunLockedError`; see :mod:`lnprobe.rundir`. Nothing is created or removed before those
    checks pass. ``meta``: written at once when given, else by the first :meth:`start`.
    """

    def __init__(self, run_dir: str | Path, meta: dict[str, Any] | None = None, *, overwrite: bool = False,
                 resume: bool = False):
        self.path = Path(run_dir)
        self.records_dir = self.path / "records"
        check_claim(self.path, resume=resume, overwrite=overwrite)
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.path)
        self._overwrite = overwrite
        self._resume = resume
        self._closed = False
        self._next = 0
        self.meta: dict[str, Any] = {}
        if meta is not None:
            self.start(meta)

    def start(self, meta: dict[str, Any]) -> None:
        """Remove the old run (``overwrite=True``) or compact it (``resume=True``: appending starts from
        a compacted run, :func:`compact`), create records/ and write ``meta``."""
        if self._overwrite:
            self._overwrite = False
            old = [self.path / "records.parquet", self.path / "meta.json"]
            if self.records_dir.is_dir():
                old += [p for p in self.records_dir.iterdir() if _part_number(p.name) is not None
                        or _GEN_RE.match(p.name) or p.name == MANIFEST_NAME]
            for p in old:
                _remove(p)
        elif self._resume:
            compact_quietly(self.path)
        self.records_dir.mkdir(parents=True, exist_ok=True)
        # Appending (resume): continue the numbering after the last part on disk or in the manifest,
        # so a new part never takes the name of one the manifest lists as compacted.
        try:
            listed = (read_manifest(self.path) or {}).get("parts", [])
        except RunDirectoryError:
            listed = []
        self._next = 1 + max((n for name in [*listed, *(p.name for p in self.records_dir.glob("part-*.parquet"))]
                              if (n := _part_number(name)) is not None), default=-1)
        self.meta = dict(meta)
        write_meta(self.path, self.meta)

    def close(self, *, compact: bool = True) -> None:
        """Compact the parts (:func:`compact`; a failure is a warning and leaves them as they are), then
        release the lock (idempotent); the files stay. A run whose meta.json says ``crashed`` is not
        compacted: an error path does the least work, and its parts are read as they are (a resume
        compacts them)."""
        if (compact and self.records_dir.is_dir() and not self._closed
                and self.meta.get("status") != "crashed"):
            compact_quietly(self.path)
        self._closed = True
        self.lock.release()

    def update_meta(self, **fields: Any) -> None:
        """Add or replace keys of meta.json (rewritten atomically)."""
        self.meta.update(fields)
        write_meta(self.path, self.meta)

    def append(self, frame: pd.DataFrame) -> Path | None:
        """Write one part atomically; returns its path (None for an empty frame)."""
        if frame.empty:
            return None
        path = self.records_dir / f"part-{self._next:06d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        # nthreads=1: for large frames pyarrow otherwise converts columns on a Python thread pool,
        # which refuses work during interpreter shutdown, where the atexit flush of an unclosed
        # probe runs; the buffered steps would be lost.
        table = pa.Table.from_pandas(frame[list(RECORD_COLUMNS)], preserve_index=False, nthreads=1)
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._next += 1
        return path


# ---------------------------------------------------------------------------------------------
# parameter roles (fallback when meta.json has none)
# ---------------------------------------------------------------------------------------------
# The reference GPT's and common HF module names.
_ROLE_PATTERNS = (
    (re.compile(r"(^|\.)(norm_attn_in|input_layernorm|ln_1|attention_norm)\."), "norm.pre_attn"),
    (re.compile(r"(^|\.)(norm_attn_out|post_attention_norm)\."), "norm.post_attn"),
    (re.compile(r"(^|\.)(norm_mlp_in|pre_feedforward_layernorm|ln_2|ffn_norm)\."), "norm.pre_mlp"),
    (re.compile(r"(^|\.)(norm_mlp_out|post_feedforward_layernorm)\."), "norm.post_mlp"),
    (re.compile(r"(^|\.)(emb_norm|embed_norm)\."), "norm.embed"),
    (re.compile(r"(^|\.)(final_norm|ln_f|norm)\.(weight|bias)$"), "norm.final"),
    (re.compile(r"(qkv|q_proj|k_proj|v_proj|c_attn|query|key|value)\.(weight|bias)$"), "attn.qkv"),
    (re.compile(r"attn.*\.(out|o_proj|c_proj|dense)\.(weight|bias)$"), "attn.out"),
    (re.compile(r"(fc_out|down_proj|mlp\.c_proj|fc2|w2)\.(weight|bias)$"), "mlp.out"),
    (re.compile(r"(fc_in|fc_gate|up_proj|gate_proj|c_fc|fc1|w1|w3)\.(weight|bias)$"), "mlp.in"),
    (re.compile(r"(tok_emb|pos_emb|wte|wpe|embed_tokens)\."), "embed"),
    (re.compile(r"(^|\.)(head|lm_head)\."), "head"),
)


def guess_role(param: str) -> str:
    """Role of a parameter from its name, used only when meta.json has no ``param_roles``."""
    for pattern, role in _ROLE_PATTERNS:
        if pattern.search(param):
            return role
    return "other"


# ---------------------------------------------------------------------------------------------
# the loaded run
# ---------------------------------------------------------------------------------------------
#: Bytes of frames and tables a :class:`Run` keeps for reuse; beyond it the least recently used are
#: dropped (and read again when asked for), so the analysis of a 50 M-row run stays within memory.
CACHE_BYTES = 400 * 2**20


class _FrameCache(OrderedDict):
    """A dict that keeps at most :data:`CACHE_BYTES` of DataFrames, dropping the least recently used
    (the newest entry always stays); other values (numbers, small dicts) are kept and not counted."""

    def __init__(self, budget: int = CACHE_BYTES):
        super().__init__()
        self.budget, self.bytes = budget, 0

    @staticmethod
    def _size(v: Any) -> int:
        return int(v.memory_usage(index=True, deep=False).sum()) if isinstance(v, pd.DataFrame) else 0

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def __setitem__(self, key, value) -> None:
        if key in self:
            self.bytes -= self._size(super().__getitem__(key))
        super().__setitem__(key, value)
        self.bytes += self._size(value)
        for old in list(self.keys())[:-1]:
            if self.bytes <= self.budget:
                break
            size = self._size(super().__getitem__(old))
            if size:
                self.bytes -= size
                super().__delitem__(old)

    def clear(self) -> None:
        super().clear()
        self.bytes = 0


class Run:
    """One run directory (``lnprobe.load_run``; ``lnprobe.analysis`` uses the same type).

    ``path``; ``meta``: meta.json as a dict ({} when missing or unreadable); ``records``: every row
    of every readable part that the run's filters keep (``load_run(..., site=, stat=, layer=, step=,
    columns=)``), in the schema (``RECORD_SCHEMA``) plus the derived ``stack`` column (the stack of
    ``meta.map.stacks`` holding the layer; null without stacks), duplicates of a resumed run
    included, read from disk on first use; ``skipped_parts``: paths of unreadable parts;
    ``warnings``: what could not be read, as sentences; ``name``: meta run_name or the directory name.

    The accessors below (``frame``, ``pivot``, ``series``, ``params``, ...) read only the rows they
    need, one (site, stat) at a time with the filters pushed down to the Parquet scan
    (:mod:`lnprobe.query`), unless ``records`` is already in memory; a (step, site, layer, stat) written
    twice (a resumed run) resolves to the later part's value.
    """

    def __init__(self, path: str | Path, meta: dict[str, Any], records: pd.DataFrame | None = None,
                 skipped_parts: list[str] | None = None, warnings: list[str] | None = None, *,
                 files: list[Path] | None = None, filters: dict[str, Any] | None = None,
                 columns: list[str] | None = None):
        self.path = Path(path)
        self.meta = meta
        self.skipped_parts = list(skipped_parts or [])
        self._records = records
        self._files = files if files is not None or records is not None else []  # None: records in memory
        self._filters = dict(filters or {})
        self._columns = list(columns) if columns is not None else None
        self._cache = _FrameCache()
        # only compacted files (one row per key, lnprobe.compaction.compact): no duplicates to resolve
        self._unique = bool(files) and all(_GEN_RE.match(Path(f).parent.name) for f in files)
        self.warnings = list(warnings or [])
        if not self.warnings:
            notes = [f"skipping unreadable record part {p}" for p in self.skipped_parts]
            if not self.meta:
                notes.append(f"{self.path / 'meta.json'}: missing or unreadable; using empty metadata")
            if records is not None and not len(records) and not self.skipped_parts:
                notes.append(f"{self.path / 'records'}: no record parts found")
            self.warnings = notes

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, name={self.name!r}, files={len(self._files or [])})"

    @property
    def records(self) -> pd.DataFrame:
        """Every record the run's filters keep (the whole run without filters: prefer the accessors or
        :meth:`select` for large runs), with the derived ``stack`` column; read once, then cached."""
        if self._records is None:
            self._records = self.select(self._columns)
        return self._records

    @records.setter
    def records(self, frame: pd.DataFrame) -> None:
        self._records = frame
        self._cache.clear()

    def select(self, columns: list[str] | None = None, **filters: Any) -> pd.DataFrame:
        """Records of this run matching ``filters`` (``site``, ``stat``, ``layer``, ``step``: a value, a
        list of values or, for layer and step, a ``range``), in reading order, ``columns`` only
        (default: the schema's and ``stack``). Pushed down to the Parquet scan; the run's own filters
        apply too."""
        from .query import check_columns, check_filters, filter_frame, merge_filters, select_records

        want = check_filters(filters)
        check_columns(columns)
        if self._files is None:  # a Run built from a frame in memory
            out = filter_frame(self._records, want)
            return out[list(columns)] if columns is not None else out
        return select_records(self._files or [], columns, merge_filters(self._filters, want),
                              stacks=stacks_of(self.meta), ordered=not self._unique)

    def _pairs(self) -> set[tuple[str, str]]:
        if "pairs" not in self._cache:
            if self._files is None:
                r = self.records
                self._cache["pairs"] = set(r.groupby(["site", "stat"], sort=False).indices) if len(r) else set()
            else:
                from .query import distinct_pairs

                self._cache["pairs"] = distinct_pairs(self._files or [], self._filters)
        return self._cache["pairs"]

    @property
    def name(self) -> str:
        """meta ``run_name``, else the directory's name."""
        return str(self.meta.get("run_name") or self.path.name)

    # -- configuration -------------------------------------------------------------------------
    @property
    def model_config(self) -> dict[str, Any]:
        """``meta.config.model`` (reference GPT only) or {}."""
        return model_config(self.meta)

    @property
    def train_config(self) -> dict[str, Any]:
        """``meta.config.train`` (``lnprobe train`` only) or {}."""
        return train_config(self.meta)

    @property
    def placement(self) -> str:
        """config.model.placement when present (it knows "lns"), else meta placement, else "unknown"."""
        return str(self.model_config.get("placement") or self.meta.get("placement") or "unknown")

    @property
    def n_layers(self) -> int:
        """L from meta, else config, else the largest recorded ``resid`` layer. A meta value beyond
        what the records show (``resid`` reaches layer L, other block sites L − 1) is replaced by the
        records' bound, with a note in ``warnings``: no number in meta.json alone sizes the analysis."""
        if "n_layers" not in self._cache:
            self._cache["n_layers"] = self._n_layers()
        return self._cache["n_layers"]

    def _n_layers(self) -> int:
        if self._files is None:
            r = self.records
            block = r["layer"].to_numpy() >= 0
            not_resid = (r["site"] != "resid").to_numpy()
            bound = int((r["layer"].to_numpy() + not_resid)[block].max()) if block.any() else None
        else:
            from .query import layer_bound

            bound = layer_bound(self._files or [], self._filters)
        for where, v in (("n_layers", self.meta.get("n_layers")), ("config.model.n_layers",
                                                                    self.model_config.get("n_layers"))):
            if v is None:
                continue
            v = min(int(v), MAX_LAYERS)  # already checked by the schema when read from disk
            if bound is not None and v > bound:
                self.warnings.append(f"{self.path / 'meta.json'}: {where} = {v} but the records stop at layer "
                                     f"{bound}; using {bound}")
                return bound
            return v
        rec = self.frame("resid", "m2")
        return int(rec["layer"].max()) if len(rec) else 0

    @property
    def d_model(self) -> int | None:
        """D from meta, else config.model; None when neither says."""
        v = self.meta.get("d_model") or self.model_config.get("d_model")
        return int(v) if v is not None else None

    @property
    def status(self) -> str:
        """meta ``status`` (running, finished, crashed, interrupted, ...), else "unknown"."""
        return str(self.meta.get("status") or "unknown")

    # -- record access -------------------------------------------------------------------------
    def has(self, site: str, stat: str) -> bool:
        """Whether any row of (site, stat) was recorded."""
        return (site, stat) in self._pairs()

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """Recorded (site, stat) pairs, sorted."""
        return sorted(self._pairs())

    @property
    def sites(self) -> list[str]:
        """Recorded site names, sorted (``param:*`` included)."""
        return sorted({s for s, _ in self._pairs()})

    def frame(self, site: str, stat: str) -> pd.DataFrame:
        """Rows of one (site, stat): columns step, layer, value, token, channel (duplicates: last)."""
        key = ("frame", site, stat)
        if key not in self._cache:
            if not self.has(site, stat):
                out = pd.DataFrame({c: pd.Series(dtype=RECORD_SCHEMA[c])
                                    for c in ("step", "layer", "value", "token", "channel")})
            else:
                out = self.select(["step", "layer", "value", "token", "channel"], site=site, stat=stat)
                # A resumed run may repeat a step: the later part wins (a compacted file has one row per key).
                if not self._unique:
                    out = out.drop_duplicates(["step", "layer"], keep="last")
                out = out.sort_values(["step", "layer"]).reset_index(drop=True)
            self._cache[key] = out
        return self._cache[key]

    def pivot(self, site: str, stat: str) -> pd.DataFrame:
        """step × layer table of one (site, stat); empty DataFrame when not recorded."""
        key = ("pivot", site, stat)
        if key not in self._cache:
            f = self.frame(site, stat)
            self._cache[key] = f.pivot(index="step", columns="layer", values="value") if len(f) else pd.DataFrame()
        return self._cache[key]

    def stat(self, site: str, stat: str) -> pd.DataFrame:
        """step × layer table of one (site, stat): the same as :meth:`pivot`."""
        return self.pivot(site, stat)

    def rms_table(self, site: str) -> pd.DataFrame:
        """step × layer RMS of an activation site: recorded ``rms``, else sqrt(``m2``)."""
        t = self.pivot(site, "rms")
        if t.empty:
            m2 = self.pivot(site, "m2")
            t = np.sqrt(m2) if not m2.empty else t
        return t

    def series(self, stat: str, site: str = "train") -> pd.Series:
        """One scalar per step (e.g. train loss), indexed by step; empty when not recorded."""
        f = self.frame(site, stat)
        if not len(f):
            return pd.Series(dtype="float64", name=stat)
        return pd.Series(f["value"].to_numpy(), index=f["step"].to_numpy(), name=stat)

    @property
    def steps(self) -> np.ndarray:
        """Sorted recorded steps of activation statistics (resid m2), else of any record."""
        f = self.frame("resid", "m2")
        if len(f) or self._files is None:
            return np.unique((f["step"] if len(f) else self.records["step"]).to_numpy())
        from .query import distinct_steps

        return distinct_steps(self._files, self._filters)

    def param_roles(self) -> dict[str, dict]:
        """param name -> {"role", "layer"}: meta param_roles, else guessed from recorded names."""
        if "param_roles" not in self._cache:
            roles = {}
            meta_roles = self.meta.get("param_roles") or {}
            for site in self.sites:
                if not site.startswith(PARAM_PREFIX):
                    continue
                name = site[len(PARAM_PREFIX):]
                info = meta_roles.get(name)
                if isinstance(info, dict) and info.get("role"):
                    roles[name] = {"role": str(info["role"]), "layer": int(info.get("layer", -1))}
                else:
                    roles[name] = {"role": guess_role(name), "layer": None}
            self._cache["param_roles"] = roles
        return self._cache["param_roles"]

    def params(self, stat: str) -> pd.DataFrame:
        """Rows of one parameter statistic over all ``param:*`` sites.

        Columns: step, param, role, layer, value. The layer is the recorded one (block index or -1).
        """
        key = ("params", stat)
        if key not in self._cache:
            roles = self.param_roles()
            cols = ["step", "param", "role", "layer", "value"]
            sites = [f"{PARAM_PREFIX}{n}" for n in roles if self.has(f"{PARAM_PREFIX}{n}", stat)]
            if not sites:
                self._cache[key] = pd.DataFrame(columns=cols)
                return self._cache[key]
            # one selection over all param:* sites, in reading order (the later duplicate wins)
            sel = self.select(["step", "site", "layer", "value"], site=sites, stat=stat)
            if not self._unique:
                sel = sel.drop_duplicates(["step", "site", "layer"], keep="last")
            # categorical names and roles: a 100k-step run has millions of rows but ~100 parameters
            site = sel["site"].astype("category")
            names = [c[len(PARAM_PREFIX):] for c in site.cat.categories]
            role_names = sorted({roles.get(n, {}).get("role") or "other" for n in names})
            role_code = np.array([role_names.index(roles.get(n, {}).get("role") or "other") for n in names],
                                 dtype=np.int64)
            codes = site.cat.codes.to_numpy()
            self._cache[key] = pd.DataFrame({
                "step": sel["step"].to_numpy(), "param": pd.Categorical.from_codes(codes, categories=names),
                "role": pd.Categorical.from_codes(role_code[codes], categories=role_names),
                "layer": sel["layer"].to_numpy(), "value": sel["value"].to_numpy(),
            }).sort_values(["step", "param"], ignore_index=True)
        return self._cache[key]

    def role_table(self, stat: str, role: str) -> pd.DataFrame:
        """step × layer table of a parameter stat for one role; several parameters of the same
        role in one layer (separate q, k, v) combine as the root of the sum of squares (a norm)
        for ``grad_norm``/``param_norm`` and as the mean otherwise."""
        p = self.params(stat)
        p = p[p["role"] == role] if len(p) else p
        if not len(p):
            return pd.DataFrame()
        if stat in ("grad_norm", "param_norm"):
            t = p.assign(sq=p["value"] ** 2).pivot_table(index="step", columns="layer", values="sq", aggfunc="sum")
            return np.sqrt(t)
        return p.pivot_table(index="step", columns="layer", values="value", aggfunc="mean")

    def layer_grad_norm(self, roles: tuple[str, ...] | None = None) -> pd.DataFrame:
        """step × layer gradient norm of a block, sqrt(Σ grad_norm²) over its parameters (only
        those with a role in ``roles`` when given); parameters outside blocks (layer −1) left out."""
        p = self.params("grad_norm")
        if len(p):
            p = p[(p["layer"] >= 0) & (p["role"].isin(roles) if roles is not None else True)]
        if not len(p):
            return pd.DataFrame()
        sq = p.assign(sq=p["value"] ** 2).pivot_table(index="step", columns="layer", values="sq", aggfunc="sum")
        return np.sqrt(sq)

    def norms(self) -> list[dict]:
        """Norm descriptions from meta ``norms`` (name, role, layer, kind, weight, bias), else built
        from parameter roles (norm.* parameters; weight/bias told apart by the name's suffix)."""
        if isinstance(self.meta.get("norms"), list) and self.meta["norms"]:
            return [dict(n) for n in self.meta["norms"] if isinstance(n, dict)]
        out: dict[tuple, dict] = {}
        for name, info in self.param_roles().items():
            if not info["role"].startswith("norm."):
                continue
            mod, _, leaf = name.rpartition(".")
            d = out.setdefault((mod, info["role"]), {"name": mod, "role": info["role"],
                                                   "layer": info["layer"], "weight": None, "bias": None})
            d["bias" if leaf == "bias" else "weight"] = name
        return list(out.values())


def _meta_or_empty(run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """(meta.json, notes); ({}, a note) with a warning when it is missing but record parts exist (a run
    still being written, a copied records folder): analyse what exists. A meta.json that is present
    but damaged raises :class:`RunDirectoryError`, since its numbers would be guesses."""
    path = run_dir / "meta.json"
    if not path.exists():
        note = f"{path}: no meta.json next to the records; using empty metadata"
        warnings.warn(note, stacklevel=3)
        return {}, [note]
    return read_meta(run_dir), []


def load_run(run_dir: str | Path, columns: list[str] | None = None, *, site: Any = None, stat: Any = None,
             layer: Any = None, step: Any = None) -> Run:
    """Open a run directory written by lnprobe (works without torch): :class:`Run`.

    Checks ``meta.json`` against the schema of :mod:`lnprobe.validate` and lists the record files
    (compacted files, then later parts: :func:`record_files`); records are read when first used, and
    only those the filters keep: ``site``, ``stat`` (a name or a list), ``layer``, ``step`` (a number,
    a list or a ``range``), pushed down to the Parquet scan; ``columns`` limits ``run.records``. A part
    that is unreadable or breaks the part schema is skipped with a ``UserWarning`` naming the file and
    the problem, and listed in ``run.skipped_parts`` and ``run.warnings``; a missing meta.json next to
    record parts gives a warning and empty metadata. Raises FileNotFoundError when ``run_dir`` does
    not exist or holds neither meta.json nor records, :class:`RunDirectoryError` (a ValueError, one
    line: path, problem, what to do) when meta.json or the compaction manifest is damaged, ValueError
    for a filter or column that does not exist.
    """
    from .query import check_columns, check_filters, count_rows

    filters = check_filters({"site": site, "stat": stat, "layer": layer, "step": step})
    check_columns(columns)
    path = Path(run_dir)
    if not path.is_dir() or not ((path / "meta.json").exists() or (path / "records").is_dir()
                                 or (path / "records.parquet").exists()):
        what = ("it does not exist" if not path.exists() else "it is a file" if not path.is_dir()
                else "it holds no meta.json and no records/")
        raise FileNotFoundError(
            f"{run_dir} is not an lnprobe run directory ({what}): expected a folder holding meta.json and "
            "records/part-*.parquet; pass the directory given to lnprobe.attach(...) or `lnprobe train --out`")
    meta, notes = _meta_or_empty(path)
    files, skipped = record_files(path)
    notes = [f"skipped record part {p}: {why}" for p, why in skipped] + notes
    if not files and not skipped:
        notes.append(f"{path / 'records'}: no record parts found")
    run = Run(path, meta, None, [p for p, _ in skipped], notes, files=files, filters=filters, columns=columns)
    if files and not filters and not count_rows(files):
        notes.append(f"{path / 'records'}: no record parts found")
    run.n_layers  # noqa: B018 (checks meta's L against the records now, so the note is in run.warnings)
    return run


def stacks_of(meta: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(name, first layer, last layer) of each stack in ``meta.map.stacks`` (checked by
    :func:`lnprobe.validate.stack_problems` when meta.json was read); [] for a model with one stack."""
    m = meta.get("map") if isinstance(meta, dict) else None
    stacks = m.get("stacks") if isinstance(m, dict) else None
    return [(str(s["name"]), int(s["first_layer"]), int(s["first_layer"]) + int(s["n_layers"]) - 1)
            for s in stacks or []]


def last_recorded_step(run_dir: str | Path) -> int:
    """The largest step in the run's records (-1 when there is none); unreadable parts are skipped."""
    from .query import max_step

    files, _ = record_files(run_dir, warn=False)
    return max_step(files)


def trim(run_dir: str | Path, from_step: int) -> int:
    """Drop the records of steps ≥ ``from_step``; return the number of rows removed.

    For a run resumed from a checkpoint of step ``from_step``: an interrupted run may have flushed
    records past its last checkpoint, which the resumed run writes again. Each affected live part is
    rewritten atomically (a temporary file, then a rename) or deleted when no row of it remains; the
    compacted files, when they hold such steps, are replaced by a new generation (:func:`compact`).
    """
    from .query import count_rows

    dropped = 0
    records_dir = Path(run_dir) / "records"
    manifest = read_manifest(run_dir) if records_dir.is_dir() else None
    covered = set(manifest["parts"]) if manifest else set()
    for part in sorted(records_dir.glob("part-*.parquet")):
        if part.name in covered:
            continue
        frame = pd.read_parquet(part)
        keep = frame["step"] < from_step
        if keep.all():
            continue
        dropped += int((~keep).sum())
        if not keep.any():
            part.unlink()
            continue
        tmp = part.with_name(f".{part.name}.tmp-{os.getpid()}")
        frame[keep].to_parquet(tmp, index=False)
        os.replace(tmp, part)
    if manifest:
        compacted = [records_dir / f for f in manifest["files"] if (records_dir / f).exists()]
        late = count_rows(compacted, {"step": [("ge", int(from_step))]})
        if late:
            compact(run_dir, drop_from_step=from_step)
            dropped += late
    return dropped
