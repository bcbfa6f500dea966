"""Load a run directory with pandas only (no torch, no lnprobe import).

A run directory (design page section 5) is ``RUN/meta.json`` plus ``RUN/records/part-*.parquet``
in long format: one row per (step, site, layer, stat) with ``value`` (float64) and the nullable
``token``/``channel`` of located statistics. ``load`` concatenates every readable part, skipping an
unreadable one with a warning that names the file, and returns a :class:`Run` whose accessors
select one (site, stat) at a time through an index built once, so analysis never loops over rows.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RECORD_COLUMNS = ("step", "site", "layer", "stat", "value", "token", "channel")
FP16_MAX = 65504.0
PARAM_PREFIX = "param:"
SUBLAYER_ROLES = ("attn.qkv", "attn.out", "mlp.in", "mlp.out")

# Fallback when meta.json has no param_roles: the reference GPT's and common HF module names.
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


@dataclass
class Run:
    """One loaded run directory.

    ``records``: long-format DataFrame (``site`` and ``stat`` categorical); ``meta``: meta.json as a
    dict ({} when missing); ``name``: meta run_name or the directory name; ``path``; ``warnings``:
    what could not be read.
    """

    path: Path
    name: str
    meta: dict[str, Any]
    records: pd.DataFrame
    warnings: list[str] = field(default_factory=list)
    _index: dict | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    # -- configuration -------------------------------------------------------------------------
    @property
    def model_config(self) -> dict[str, Any]:
        """``meta.config.model`` (reference GPT only) or {}."""
        cfg = self.meta.get("config") or {}
        return dict(cfg.get("model") or {}) if isinstance(cfg, dict) else {}

    @property
    def train_config(self) -> dict[str, Any]:
        cfg = self.meta.get("config") or {}
        return dict(cfg.get("train") or {}) if isinstance(cfg, dict) else {}

    @property
    def placement(self) -> str:
        """config.model.placement when present (it knows "lns"), else meta placement, else "unknown"."""
        return str(self.model_config.get("placement") or self.meta.get("placement") or "unknown")

    @property
    def n_layers(self) -> int:
        """L from meta, else config, else the largest recorded ``resid`` layer."""
        for v in (self.meta.get("n_layers"), self.model_config.get("n_layers")):
            if v is not None:
                return int(v)
        r = self.frame("resid", "m2")
        return int(r["layer"].max()) if len(r) else 0

    @property
    def d_model(self) -> int | None:
        v = self.meta.get("d_model") or self.model_config.get("d_model")
        return int(v) if v is not None else None

    @property
    def status(self) -> str:
        return str(self.meta.get("status") or "unknown")

    # -- record access -------------------------------------------------------------------------
    def _groups(self) -> dict:
        if self._index is None:
            r = self.records
            self._index = r.groupby(["site", "stat"], observed=True, sort=False).indices if len(r) else {}
        return self._index

    def has(self, site: str, stat: str) -> bool:
        return (site, stat) in self._groups()

    @property
    def sites(self) -> list[str]:
        return sorted({s for s, _ in self._groups()})

    def frame(self, site: str, stat: str) -> pd.DataFrame:
        """Rows of one (site, stat): columns step, layer, value, token, channel (duplicates: last)."""
        key = ("frame", site, stat)
        if key not in self._cache:
            idx = self._groups().get((site, stat))
            if idx is None:
                out = pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                                    (("step", "int64"), ("layer", "int64"), ("value", "float64"),
                                     ("token", "Int64"), ("channel", "Int64"))})
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
            r = self.records
            if not roles or not len(r):
                self._cache[key] = pd.DataFrame(columns=cols)
                return self._cache[key]
            # one vectorised selection over all param:* sites (not one lookup per parameter)
            site_cats = r["site"].cat.categories
            is_param = np.asarray(site_cats.str.startswith(PARAM_PREFIX), dtype=bool)
            mask = (r["stat"] == stat).to_numpy() & is_param[r["site"].cat.codes.to_numpy()]
            sel = r.loc[mask, ["step", "site", "layer", "value"]]
            sel = sel.drop_duplicates(["step", "site", "layer"], keep="last")
            names = sel["site"].astype(str).str.slice(len(PARAM_PREFIX))
            role_of = {n: info["role"] for n, info in roles.items()}
            self._cache[key] = pd.DataFrame({
                "step": sel["step"].to_numpy(), "param": names.to_numpy(),
                "role": names.map(role_of).fillna("other").to_numpy(), "layer": sel["layer"].to_numpy(),
                "value": sel["value"].to_numpy()}).sort_values(["step", "param"], ignore_index=True)
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


def load(path: str | Path) -> Run:
    """Load ``path`` (a run directory) without torch.

    Reads ``meta.json`` (missing or unreadable: warning, empty meta) and every
    ``records/part-*.parquet`` in name order with ``pandas.read_parquet``; an unreadable part is
    skipped with a ``UserWarning`` naming the file. Token/channel become nullable Int64, site/stat
    categorical. Raises FileNotFoundError when ``path`` is not a directory.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} not found: expected a folder holding meta.json "
                                "and records/part-*.parquet (the --out of a probed run)")
    notes: list[str] = []
    meta: dict[str, Any] = {}
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"top level is {type(meta).__name__}, expected an object")
    except Exception as exc:  # a run still being written may have no meta yet: analyse what exists
        msg = f"{meta_path}: unreadable meta.json ({type(exc).__name__}: {exc}); using empty metadata"
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
        meta = {}
    parts = sorted((path / "records").glob("part-*.parquet"))
    if not parts and (path / "records.parquet").exists():
        parts = [path / "records.parquet"]
    frames = []
    for p in parts:
        try:
            frames.append(pd.read_parquet(p))
        except Exception as exc:  # half-copied or corrupt part: keep the others
            msg = f"skipping unreadable records part {p}: {type(exc).__name__}: {exc}"
            warnings.warn(msg, stacklevel=2)
            notes.append(msg)
    records = _normalise(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame())
    if not parts:
        notes.append(f"{path / 'records'}: no record parts found")
    name = str(meta.get("run_name") or path.name)
    return Run(path=path, name=name, meta=meta, records=records, warnings=notes)


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Coerce to the record schema: missing columns added, dtypes fixed, site/stat categorical."""
    out = {}
    n = len(df)
    for col in RECORD_COLUMNS:
        s = df[col] if col in df.columns else pd.Series([pd.NA] * n if col in ("token", "channel") else [None] * n)
        if col in ("step", "layer"):
            out[col] = pd.to_numeric(s, errors="coerce").fillna(-1).astype("int64").to_numpy()
        elif col == "value":
            out[col] = pd.to_numeric(s, errors="coerce").astype("float64").to_numpy()
        elif col in ("token", "channel"):
            out[col] = pd.to_numeric(s, errors="coerce").astype("Int64").array
        else:
            out[col] = s.astype("category").array
    return pd.DataFrame(out)
