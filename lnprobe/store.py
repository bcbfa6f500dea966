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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa  # imported with the writer, so the first flush of a run does not pay for it
import pyarrow.parquet as pq

from .rundir import RunExistsError, RunLock, RunLockedError, check_claim
from .validate import MAX_LAYERS, RunDirectoryError, conform, load_meta, read_part

__all__ = ["RECORD_SCHEMA", "RECORD_COLUMNS", "Run", "RunWriter", "load_run", "read_meta", "write_meta",
           "read_records", "records_frame", "trim", "RunDirectoryError", "RunExistsError", "RunLockedError"]

#: The record schema: column -> dtype, one row per (step, site, layer, stat). ``token`` (sequence
#: position) and ``channel`` locate a value (absmax, top1..top3) and are <NA> elsewhere.
RECORD_SCHEMA: dict[str, str] = {
    "step": "int64", "site": "str", "layer": "int64", "stat": "str", "value": "float64",
    "token": "Int64", "channel": "Int64",
}
RECORD_COLUMNS = tuple(RECORD_SCHEMA)
#: Site of a parameter statistic: ``param:<full parameter name>``.
PARAM_PREFIX = "param:"
#: Roles of the four sublayer weights (``param_roles`` in meta.json).
SUBLAYER_ROLES = ("attn.qkv", "attn.out", "mlp.in", "mlp.out")
_PART_RE = re.compile(r"^part-(\d+)\.parquet$")


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
    """Concatenate every valid part in name order (``records.parquet`` of an old run when there are
    no parts); return (records in the schema, paths of skipped parts). A part that is unreadable or
    breaks the part schema (:func:`lnprobe.validate.read_part`) is skipped with a ``UserWarning``
    naming the file and the problem."""
    records, skipped = _read_parts(Path(run_dir))
    return records, [p for p, _ in skipped]


def _read_parts(run_dir: Path) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """(records, [(path of a skipped part, why)])."""
    records_dir = run_dir / "records"
    parts = sorted(records_dir.glob("part-*.parquet")) if records_dir.is_dir() else []
    if not parts and (run_dir / "records.parquet").exists():
        parts = [run_dir / "records.parquet"]
    frames, skipped = [], []
    for p in parts:
        frame, problem = read_part(p)
        if problem is not None:  # damaged or foreign part: report it by name and keep the rest
            warnings.warn(f"skipping record part {p}: {problem}", stacklevel=4)
            skipped.append((str(p), problem))
        else:
            frames.append(frame)
    if not frames:
        return records_frame(*(np.array([]) for _ in range(7))), skipped
    return conform(pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0], RECORD_SCHEMA), skipped


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
        self._next = 0
        self.meta: dict[str, Any] = {}
        if meta is not None:
            self.start(meta)

    def start(self, meta: dict[str, Any]) -> None:
        """Remove the old run (``overwrite=True``), create records/ and write ``meta``."""
        if self._overwrite:
            self._overwrite = False
            for p in [*self.records_dir.glob("part-*.parquet"), self.path / "records.parquet", self.path / "meta.json"]:
                p.unlink(missing_ok=True)
        self.records_dir.mkdir(parents=True, exist_ok=True)
        # Appending (resume): continue the numbering after the last part on disk.
        self._next = 1 + max((int(m.group(1)) for p in self.records_dir.glob("part-*.parquet")
                              if (m := _PART_RE.match(p.name))), default=-1)
        self.meta = dict(meta)
        write_meta(self.path, self.meta)

    def close(self) -> None:
        """Release the lock (idempotent); the files stay."""
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
@dataclass
class Run:
    """One loaded run directory (``lnprobe.load_run``; ``lnprobe.analysis`` uses the same type).

    ``path``; ``meta``: meta.json as a dict ({} when missing or unreadable); ``records``: every
    row of every readable part, in the schema (``RECORD_SCHEMA``), duplicates of a resumed run
    included; ``skipped_parts``: paths of unreadable parts; ``warnings``: what could not be read, as
    sentences; ``name``: meta run_name or the directory name. The accessors below select one
    (site, stat) at a time through an index built once, and resolve a (step, site, layer, stat)
    written twice (a resumed run) to the later part's value.
    """

    path: Path
    meta: dict[str, Any]
    records: pd.DataFrame
    skipped_parts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    _index: dict | None = field(default=None, repr=False, compare=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.warnings:
            notes = [f"skipping unreadable record part {p}" for p in self.skipped_parts]
            if not self.meta:
                notes.append(f"{self.path / 'meta.json'}: missing or unreadable; using empty metadata")
            if not len(self.records) and not self.skipped_parts:
                notes.append(f"{self.path / 'records'}: no record parts found")
            self.warnings = notes

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
        r = self.records
        block = r["layer"].to_numpy() >= 0
        not_resid = (r["site"] != "resid").to_numpy()
        bound = int((r["layer"].to_numpy() + not_resid)[block].max()) if block.any() else None
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
    def _groups(self) -> dict:
        if self._index is None:
            r = self.records
            self._index = r.groupby(["site", "stat"], sort=False).indices if len(r) else {}
        return self._index

    def has(self, site: str, stat: str) -> bool:
        """Whether any row of (site, stat) was recorded."""
        return (site, stat) in self._groups()

    @property
    def sites(self) -> list[str]:
        """Recorded site names, sorted (``param:*`` included)."""
        return sorted({s for s, _ in self._groups()})

    def frame(self, site: str, stat: str) -> pd.DataFrame:
        """Rows of one (site, stat): columns step, layer, value, token, channel (duplicates: last)."""
        key = ("frame", site, stat)
        if key not in self._cache:
            idx = self._groups().get((site, stat))
            if idx is None:
                out = pd.DataFrame({c: pd.Series(dtype=RECORD_SCHEMA[c])
                                    for c in ("step", "layer", "value", "token", "channel")})
            else:
                out = self.records.iloc[idx][["step", "layer", "value", "token", "channel"]]
                # A resumed run may repeat a step: the later part wins.
                out = out.drop_duplicates(["step", "layer"], keep="last").sort_values(["step", "layer"])
                out = out.reset_index(drop=True)
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
        s = f["step"] if len(f) else self.records["step"]
        return np.unique(s.to_numpy())

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
            groups = self._groups()
            idx = [groups[(f"{PARAM_PREFIX}{n}", stat)] for n in roles if (f"{PARAM_PREFIX}{n}", stat) in groups]
            if not idx:
                self._cache[key] = pd.DataFrame(columns=cols)
                return self._cache[key]
            # one selection over all param:* sites, in row order (the later duplicate wins)
            sel = self.records.iloc[np.sort(np.concatenate(idx))][["step", "site", "layer", "value"]]
            sel = sel.drop_duplicates(["step", "site", "layer"], keep="last")
            names = sel["site"].astype(str).str.slice(len(PARAM_PREFIX))
            role_of = {n: info["role"] for n, info in roles.items()}
            self._cache[key] = pd.DataFrame({
                "step": sel["step"].to_numpy(), "param": names.to_numpy(dtype=object),
                "role": names.map(role_of).fillna("other").to_numpy(dtype=object),
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


def load_run(run_dir: str | Path) -> Run:
    """Load a run directory written by lnprobe (works without torch): :class:`Run`.

    Reads ``meta.json`` (checked against the schema of :mod:`lnprobe.validate`) and every
    ``records/part-*.parquet`` in name order. A part that is unreadable or breaks the part schema
    is skipped with a ``UserWarning`` naming the file and the problem, and listed in
    ``run.skipped_parts`` and ``run.warnings``; a missing meta.json next to record parts gives a
    warning and empty metadata. Raises FileNotFoundError when ``run_dir`` does not exist or holds
    neither meta.json nor records, :class:`RunDirectoryError` (a ValueError, one line: path, problem,
    what to do) when meta.json is empty, not valid JSON, not an object or breaks the schema.
    """
    path = Path(run_dir)
    if not path.is_dir() or not ((path / "meta.json").exists() or (path / "records").is_dir()
                                 or (path / "records.parquet").exists()):
        what = ("it does not exist" if not path.exists() else "it is a file" if not path.is_dir()
                else "it holds no meta.json and no records/")
        raise FileNotFoundError(
            f"{run_dir} is not an lnprobe run directory ({what}): expected a folder holding meta.json and "
            "records/part-*.parquet; pass the directory given to lnprobe.attach(...) or `lnprobe train --out`")
    meta, notes = _meta_or_empty(path)
    records, skipped = _read_parts(path)
    notes = [f"skipped record part {p}: {why}" for p, why in skipped] + notes
    if not len(records) and not skipped:
        notes.append(f"{path / 'records'}: no record parts found")
    run = Run(path, meta, records, [p for p, _ in skipped], notes)
    run.n_layers  # noqa: B018 (checks meta's L against the records now, so the note is in run.warnings)
    return run


def trim(run_dir: str | Path, from_step: int) -> int:
    """Drop the records of steps ≥ ``from_step``; return the number of rows removed.

    For a run resumed from a checkpoint of step ``from_step``: an interrupted run may have flushed
    records past its last checkpoint, which the resumed run writes again. Each affected part is
    rewritten atomically (a temporary file, then a rename) or deleted when no row of it remains.
    """
    dropped = 0
    for part in sorted((Path(run_dir) / "records").glob("part-*.parquet")):
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
    return dropped
