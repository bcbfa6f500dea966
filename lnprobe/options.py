"""The options of ``lnprobe.attach`` that need more than a check: sites, statistics per site, and the
step a probe starts at (``resume``)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable

from . import distributed as D
from . import stats as S
from .store import read_meta

BRANCH = "attn_out"  # a site with the branch defaults (statistics whose default is every site)


def parse_sites(sites: Iterable[str] | str | None, all_sites: tuple[str, ...]) -> tuple[str, ...]:
    """The sites asked for: None or ``"all"`` is every site, else names checked against ``all_sites``."""
    if sites is None:
        return all_sites
    if isinstance(sites, str):
        sites = all_sites if sites == "all" else [sites]
    sites = tuple(sites)
    unknown = [s for s in sites if s not in all_sites]
    if unknown:
        raise ValueError(f"unknown site(s) {unknown}: expected names from {list(all_sites)} or 'all'")
    return sites


def parse_stats(stats: Any, all_sites: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Activation statistics per site: the registry's defaults, or what ``stats`` asks for."""
    if stats is None:
        return {s: S.default_stats(s) for s in all_sites}
    if isinstance(stats, str):
        stats = S.ACTIVATION_STATS if stats == "all" else [stats]
    if isinstance(stats, dict):
        out = {s: S.check_stats(list(v)) for s, v in stats.items()}
        return {s: out.get(s, S.default_stats(BRANCH)) for s in all_sites}
    chosen = S.check_stats(list(stats))
    return {s: chosen for s in all_sites}


def legacy_resume(resume: bool | int, start_step: int | None, append: bool | None) -> bool | int:
    """``resume`` from the deprecated ``start_step``/``append`` pair (kept so that older callers run)."""
    if start_step is None and append is None:
        return resume
    if resume is not False:
        raise ValueError("lnprobe.attach: pass resume= alone; start_step= and append= are its deprecated form")
    warnings.warn("lnprobe.attach(start_step=, append=) is deprecated: use resume=True (continue after the last "
                  "step in meta.json) or resume=k (append, first step k)", DeprecationWarning, stacklevel=4)
    if append:
        return int(start_step or 0)
    if start_step:
        raise ValueError(f"lnprobe.attach(start_step={start_step}) without append=True: a new run starts at step 0; "
                         f"to continue a run at step {start_step} pass resume={start_step}")
    return False


def first_step(out: str | Path, resume: bool | int, ctx: "D.DistContext | None") -> int:
    """The number of the first step this probe closes (see ``resume`` in ``Probe.__init__``)."""
    if resume is False:
        return 0
    if resume is not True:
        if not isinstance(resume, int) or resume < 0:
            raise ValueError(f"resume must be False, True or a step number ≥ 0; found {resume!r}")
        return int(resume)
    if ctx is not None:  # rank 0 (the writer) reads the run directory, every rank gets its answer
        return D.broadcast_from_writer(ctx, lambda: _last_step_on_disk(out) + 1)
    return _last_step_on_disk(out) + 1


def _last_step_on_disk(out: str | Path) -> int:
    """The last step closed by the run in ``out``: meta.json's ``last_step`` (updated at every flush),
    or the last step in its records when that is later (a process killed between writing a part and
    meta.json, or a run written without ``last_step``); -1 for an empty or missing run. Reads only the
    ``step`` column; unreadable parts are skipped, as ``load_run`` does."""
    from .store import last_recorded_step

    if not (Path(out) / "meta.json").exists():
        return -1
    last = read_meta(out).get("last_step")
    on_disk = last_recorded_step(out)  # compacted files and live parts (lnprobe.store.record_files)
    return max(on_disk, int(last) if last is not None else -1)


def select_sites(points: dict, sites_wanted, grad_wanted: set, site_stats: dict):
    """The probe's accumulators from discovery's ``{(site, layer): hook point}``.

    Returns ``(acc, grad_keys, by_point)``: ``acc`` maps each wanted (site, layer) to its accumulator
    in forward order (site order of ``ALL_SITES``, then layer), ``grad_keys`` the (site, layer) whose
    hidden-state gradient is recorded, ``by_point`` the keys each hook point produces.
    """
    from collections import defaultdict

    from .sites import ALL_SITES
    from .steprows import SiteAccumulator

    acc, grad_keys, by_point = {}, set(), defaultdict(list)
    for key, point in sorted(points.items(), key=lambda kv: (ALL_SITES.index(kv[0][0]), kv[0][1])):
        if key[0] not in sites_wanted:
            continue
        acc[key] = SiteAccumulator(site_stats[key[0]])
        if key[0] in grad_wanted:
            grad_keys.add(key)
        by_point[point].append(key)
    return acc, grad_keys, by_point
