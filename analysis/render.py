"""Rendering of the report: verdict records (analysis.verdicts) and report parts to Markdown and HTML.

Only formatting lives here: numbers come in as numbers (the records of ``verdicts.json``) and leave
as table cells. The HTML page is a Jinja2 template with autoescaping; figures are embedded as
base64 PNGs so that the page is self-contained. Physics claims (theory, placements, checks) that verdicts
come from are in ``docs/theory.md`` (sections "Forward variance laws", "Gradients", "Massive
activations").
"""
from __future__ import annotations

import base64
import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import jinja2

COLUMNS = ("id", "claim", "tag", "group", "n", "measured", "predicted", "tolerance", "status", "note")
STATUS_COLOUR = {"pass": "#c8f7c5", "fail": "#f7c5c5", "n/a": "#e8e8e8"}


def fmt(x: Any, digits: int = 4) -> str:
    """A number for a table cell: "—" for None/NaN, integers as integers, else ``digits`` significant."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    return f"{float(x):.{digits}g}"


def tolerance_text(v: dict[str, Any]) -> str:
    """The comparison rule of a record in words (see analysis.verdicts for the rules)."""
    tol, rule = v.get("tolerance"), v.get("rule")
    t = fmt(tol, 3)
    pct = f"{tol:.0%}" if isinstance(tol, (int, float)) and tol is not None and tol >= 0.01 else t
    return {"rel": f"|m − p| ≤ {pct}·p" + (" + CI" if v.get("ci") else ""),
            "in": f"inside range ±{pct}",
            "le": f"m ≤ p·(1 + {t})" if tol else "m ≤ p",
            "ge": f"m ≥ p − {t}" if tol else "m ≥ p",
            "gt": f"m > p + {t}" if tol else "m > p",
            "lt": f"m < p − {t}" if tol else "m < p",
            "factor": f"within ×{t}"}.get(rule or "", t)


def verdict_cells(v: dict[str, Any]) -> dict[str, str]:
    """One verdict record as table cells (measured with its 95 % CI, predicted or predicted range)."""
    measured = fmt(v.get("measured"))
    if v.get("ci"):
        lo, hi = v["ci"]
        measured += f" [{fmt(lo, 3)}, {fmt(hi, 3)}]"
    rng = v.get("predicted_range")
    predicted = f"[{fmt(rng[0])}, {fmt(rng[1])}]" if rng else fmt(v.get("predicted"))
    unit = v.get("unit") or ""
    return {"id": v["id"], "claim": v.get("claim", ""), "tag": v.get("tag", ""), "group": v.get("group", ""),
            "n": str(v.get("n_runs", 0)), "measured": measured, "predicted": predicted,
            "tolerance": tolerance_text(v), "status": v.get("status", ""),
            "note": "; ".join(x for x in (unit, v.get("note") or "") if x)}


def split_instrument(records: Iterable[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(theory verdicts, instrument checks)."""
    records = list(records)
    return ([r for r in records if r.get("tag") != "instrument"], [r for r in records if r.get("tag") == "instrument"])


def counts(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Number of records per status (pass, fail, n/a, and any other status found)."""
    out = {"pass": 0, "fail": 0, "n/a": 0}
    for r in records:
        out[r.get("status", "n/a")] = out.get(r.get("status", "n/a"), 0) + 1
    return out


_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]|<>#!"})
_MD_SPECIAL.update({ord("&"): "&amp;", ord("<"): "&lt;", ord(">"): "&gt;", ord("\n"): " ", ord("\r"): " "})


def md_text(x: object) -> str:
    """Text quoted into Markdown as text: HTML (``<script>``) becomes entities, Markdown markup
    (backticks, emphasis, links, table pipes) is backslash-escaped, line breaks become spaces, so a
    run name or a message from a damaged file can neither inject HTML nor break a table."""
    return str(x).translate(_MD_SPECIAL)


def md_code(x: object) -> str:
    """``x`` as a Markdown code span (shown literally, HTML not interpreted): the fence is one backtick
    longer than the longest run of backticks inside; pipes are escaped for tables, lines joined."""
    text = " ".join(str(x).splitlines()).replace("|", "\\|")
    longest = max((len(m) for m in re.findall("`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def markdown_table(records: Sequence[dict[str, Any]]) -> list[str]:
    """The verdict table as Markdown lines, one row per record, every cell escaped (:func:`md_text`)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for v in records:
        c = {k: md_text(x) for k, x in verdict_cells(v).items()}
        c["status"] = f"**{md_text(verdict_cells(v)['status'].upper())}**"
        c["id"] = md_code(v["id"])
        lines.append("| " + " | ".join(c[k] for k in COLUMNS) + " |")
    return lines


def verdict_sections_md(records: Sequence[dict[str, Any]]) -> list[str]:
    """"## Verdicts" (paper, derived, related) and "## Instrument checks" (hold by construction)."""
    theory_v, instr = split_instrument(records)
    c = counts(theory_v)
    lines = ["## Verdicts", "", "m = measured (mean over runs, 95 % t-interval in brackets when n ≥ 2), "
             "p = predicted. Tags: paper (the Peri-LN paper's claim), derived (docs/theory.md law), related "
             "(a neighbouring paper). Every number is in `verdicts.json`.", ""]
    lines += markdown_table(theory_v)
    lines += ["", f"{c['pass']} pass, {c['fail']} fail, {c['n/a']} not applicable.", ""]
    if instr:
        ci = counts(instr)
        lines += ["## Instrument checks", "", "These hold by construction (a norm output has m2 = 1, a "
                  "Cauchy–Schwarz bound, the bound that keeps Peri-LN below FP16): a fail means a probe or "
                  "analysis bug, or a placement other than the one recorded — not a finding about the paper.", ""]
        lines += markdown_table(instr)
        lines += ["", f"{ci['pass']} pass, {ci['fail']} fail, {ci['n/a']} not applicable.", ""]
    return lines


def markdown_report(*, runs: Sequence[dict[str, str]], records: Sequence[dict[str, Any]], summary: Sequence[str],
                    honesty: str, figures: dict[str, dict[str, Path]], captions: dict[str, str],
                    partial: dict[str, list[str]], missing: dict[str, str], load_notes: Sequence[str],
                    stability: Sequence[str] = ()) -> str:
    """report.md. Everything quoted from the runs (names, paths, notes, messages) goes through
    :func:`md_text` (code spans only hold names made here: verdict ids, figure names); what could not
    be read is listed first."""
    lines = ["# lnprobe report", "", "Runs: " + ", ".join(f"**{md_text(r['name'])}** ({md_text(r['placement'])}, "
                                                          f"{md_text(r['path'])})" for r in runs), ""]
    if load_notes:
        lines += ["## Loading notes", "", "Some input could not be read; the report below is built from the rest.",
                  ""] + [f"- {md_text(n)}" for n in load_notes] + [""]
    lines += verdict_sections_md(records)
    lines += ["## Summary", ""] + [f"- {_md_summary(s, runs)}" for s in summary] + [""]
    if stability:
        lines += ["## Training stability", "", md_text(STABILITY_INTRO), ""]
        lines += [f"- {_md_summary(s, runs)}" for s in stability] + [""]
    lines += ["## Honest limits", "", md_text(honesty), ""]
    lines += ["## Figures", ""]
    for name, paths in figures.items():
        img = f"![{md_text(name)}]({paths['png'].name})"
        lines += [f"### {md_text(name)}", "", md_text(captions.get(name, "")), "",
                  img + (f" ([SVG]({paths['svg'].name}))" if "svg" in paths else ""), ""]
        if name in partial:
            lines += [f"Not shown in this figure: {md_text('; '.join(partial[name]))}.", ""]
    if missing:
        lines += ["## Figures that could not be made", ""] + [f"- {md_code(k)}: {md_text(v)}"
                                                              for k, v in missing.items()] + [""]
    return "\n".join(lines)


def _md_summary(s: str, runs: Sequence[dict[str, str]]) -> str:
    """A summary paragraph (report._run_summary: "**name** ...", report.sweep_summary: "**sweep** ...")
    with its bold head kept and everything quoted from the runs escaped."""
    if s.startswith("**sweep** "):  # a label lnprobe writes itself, not a run name
        return "**sweep**" + md_text(s[len("**sweep**"):])
    for r in runs:
        head = f"**{r['name']}**"
        if s.startswith(head):
            return f"**{md_text(r['name'])}**{md_text(s[len(head):])}"
    return md_text(s)


STABILITY_INTRO = ("Spike scores after OLMo 2 (docs/theory.md §5): a step is a spike when its value is at least "
                   "7 standard deviations above the mean of the previous 1000 values; score = spikes / evaluated "
                   "steps. Gradient norm: global, before clipping. Bursts: steps recorded after a spike "
                   "(meta.json bursts); first non-finite: meta.json first_nonfinite.")

_HTML = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string("""\
<!DOCTYPE html><html><head><meta charset='utf-8'><title>lnprobe report</title><style>
body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #aaa;padding:3px 6px;vertical-align:top}
th{background:#eee}img{max-width:100%}
</style></head><body><h1>lnprobe report</h1>
<p>Runs: {% for r in runs %}<code>{{ r.name }}</code> ({{ r.placement }}, {{ r.path }})
{%- if not loop.last %}, {% endif %}{% endfor %}</p>
{% if load_notes %}
<h2>Loading notes</h2><p>Some input could not be read; the report below is built from the rest.</p>
<ul>{% for n in load_notes %}<li>{{ n }}</li>{% endfor %}</ul>
{% endif %}
{% for title, intro, rows, c in sections %}
<h2>{{ title }}</h2><p>{{ intro }}</p>
<table><tr>{% for col in columns %}<th>{{ col }}</th>{% endfor %}</tr>
{% for row in rows %}<tr>{% for col in columns %}
{%- if col == 'status' %}<td style='background:{{ colour.get(row.status, "#fff") }}'><b>{{ row.status }}</b></td>
{%- elif col == 'id' %}<td><code>{{ row.id }}</code></td>
{%- else %}<td>{{ row[col] }}</td>{% endif %}{% endfor %}</tr>
{% endfor %}</table>
<p>{{ c['pass'] }} pass, {{ c['fail'] }} fail, {{ c['n/a'] }} not applicable.</p>
{% endfor %}
<h2>Summary</h2><ul>{% for s in summary %}<li>{{ s.replace('**', '') }}</li>{% endfor %}</ul>
{% if stability %}
<h2>Training stability</h2><p>{{ stability_intro }}</p>
<ul>{% for s in stability %}<li>{{ s.replace('**', '') }}</li>{% endfor %}</ul>
{% endif %}
<h2>Honest limits</h2><p>{{ honesty }}</p>
<h2>Figures</h2>
{% for f in figures %}
<h3>{{ f.name }}</h3><p>{{ f.caption }}</p><img alt='{{ f.name }}' src='data:image/png;base64,{{ f.data }}'>
{% if f.partial %}<p><i>Not shown in this figure: {{ f.partial }}.</i></p>{% endif %}
{% endfor %}
{% if missing %}
<h2>Figures that could not be made</h2>
<ul>{% for k, v in missing.items() %}<li><code>{{ k }}</code>: {{ v }}</li>{% endfor %}</ul>
{% endif %}
</body></html>
""")


def html_report(*, runs: Sequence[dict[str, str]], records: Sequence[dict[str, Any]], summary: Sequence[str],
                honesty: str, figures: dict[str, dict[str, Path]], captions: dict[str, str],
                partial: dict[str, list[str]], missing: dict[str, str], load_notes: Sequence[str],
                stability: Sequence[str] = ()) -> str:
    """report.html: one self-contained page (PNGs inline), every quoted value HTML-escaped by Jinja2."""
    theory_v, instr = split_instrument(records)
    sections = [("Verdicts", "m = measured (mean over runs, 95 % t-interval in brackets when n ≥ 2), p = predicted; "
                 "every number is in verdicts.json.", [verdict_cells(v) for v in theory_v], counts(theory_v))]
    if instr:
        sections.append(("Instrument checks", "These hold by construction: a fail means a probe or analysis bug, "
                         "or a different placement — not a finding about the paper.",
                         [verdict_cells(v) for v in instr], counts(instr)))
    figs = [{"name": name, "caption": captions.get(name, ""), "partial": "; ".join(partial.get(name, [])),
             "data": base64.b64encode(paths["png"].read_bytes()).decode("ascii")} for name, paths in figures.items()]
    return _HTML.render(runs=runs, sections=sections, columns=COLUMNS, colour=STATUS_COLOUR, summary=summary,
                        honesty=honesty, figures=figs, missing=missing, load_notes=load_notes,
                        stability=stability, stability_intro=STABILITY_INTRO)
