"""The lineage report: one self-contained HTML page drawn from an outcome's trace.

The trace is :meth:`Outcome.to_dict` (or :meth:`Outcome.to_json`'s text read
back): the page shows the candidates as a tree, parent to child, the
winner's path highlighted, a timeline of which candidates ran at the same
time, and each candidate's diff on click. Everything is inline (CSS, JS,
SVG): the file opens anywhere, with no network.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["children_of", "load_trace", "render_report", "state_of", "verdict_of", "winner_path"]

_COLORS = {
    "ok": "#2e7d32", "committed": "#1b5e20", "failed": "#c62828", "error": "#ad1457",
    "timeout": "#6a1b9a", "cancelled": "#757575",
}


def load_trace(text: str, *, source: str = "the trace") -> dict[str, Any]:
    """The outcome dict in ``text`` (``Outcome.to_json()``, the CLI's ``--json``).

    Raises :class:`ValueError` naming what is wrong and what to give instead.
    """
    hint = ("give the JSON an outcome writes: `branchagent tree ... --json > TRACE.json` "
            "or Outcome.to_json()")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not JSON ({exc}); {hint}") from exc
    # ValueError, not TypeError: the file's content is wrong, not an argument's type.
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise ValueError(  # noqa: TRY004
            f"{source} is JSON but not an outcome (no \"results\" list); {hint}")
    for i, r in enumerate(doc["results"]):
        if not isinstance(r, dict) or not isinstance(r.get("index"), int):
            raise ValueError(  # noqa: TRY004
                f"{source}: result {i} has no integer \"index\"; {hint}")
    return doc


def state_of(success: bool, error: str | None) -> str:
    """The display state of a finished candidate: ok, failed, error, timeout, cancelled."""
    if success:
        return "ok"
    if error is None:
        return "failed"
    if error.startswith("Cancelled"):
        return "cancelled"
    if error.startswith("TimeoutError"):
        return "timeout"
    return "error"


def _exit_text(info: Mapping[str, Any]) -> str | None:
    killed = info.get("killed")
    if killed:
        return f"killed: {killed}"
    rc = info.get("returncode")
    if isinstance(rc, int) and not isinstance(rc, bool) and rc != 0:
        return f"exit {rc}"
    return None


def verdict_of(result: Mapping[str, Any]) -> str:
    """What became of one result, in words: what failed, not only that it did."""
    error = result.get("error")
    if isinstance(error, str) and error:
        return error.splitlines()[0][:160]
    info = result.get("info") or {}
    if not isinstance(info, Mapping):
        info = {}
    evaluation = info.get("evaluate")
    if result.get("success"):
        return "verified" if isinstance(evaluation, Mapping) else "succeeded"
    candidate_ok = info.get("candidate_success")
    if isinstance(evaluation, Mapping) and not evaluation.get("success"):
        why = _exit_text(evaluation)
        return "evaluation failed" + (f" ({why})" if why else "")
    why = _exit_text(info)
    if why is not None:
        return f"candidate {why}"
    if candidate_ok is True:
        return "not verified"
    if "returncode" in info:
        return "candidate reported failure"
    return "candidate returned failure"


def children_of(results: Sequence[Mapping[str, Any]]) -> dict[int | None, list[int]]:
    """Indices by parent index (``None``: the roots), each list in index order.

    A result whose parent is not in ``results`` (or would make a cycle) is a root.
    """
    known = {r["index"] for r in results}
    parent_of: dict[int, int | None] = {}
    for r in results:
        p = r.get("parent")
        parent_of[r["index"]] = p if isinstance(p, int) and p in known and p != r["index"] else None
    for start in list(parent_of):  # break cycles: a node that reaches itself becomes a root
        seen = {start}
        p = parent_of[start]
        while p is not None:
            if p in seen:
                parent_of[start] = None
                break
            seen.add(p)
            p = parent_of[p]
    out: dict[int | None, list[int]] = {}
    for index in sorted(parent_of):
        out.setdefault(parent_of[index], []).append(index)
    return out


def winner_path(doc: Mapping[str, Any]) -> list[int]:
    """The committed winner's index and its ancestors', root first (empty: no winner)."""
    winner = doc.get("winner")
    if not isinstance(winner, Mapping) or not isinstance(winner.get("index"), int):
        return []
    by_index = {r["index"]: r for r in doc.get("results", [])}
    path = [winner["index"]]
    while True:
        p = by_index.get(path[-1], {}).get("parent")
        if not isinstance(p, int) or p in path or p not in by_index:
            break
        path.append(p)
    path.reverse()
    return path


def _label(r: Mapping[str, Any]) -> str:
    info = r.get("info") or {}
    argv = info.get("argv") if isinstance(info, Mapping) else None
    if isinstance(argv, list) and argv:
        if len(argv) == 3 and argv[:2] == ["sh", "-c"]:
            return str(argv[2])
        return " ".join(str(a) for a in argv)
    return str(r.get("branch") or "")


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt_score(value: object) -> str:
    n = _num(value)
    return "-" if n is None else f"{n:.4g}"


def _node_html(r: Mapping[str, Any], state: str, on_path: bool, merged: bool) -> str:
    e = html.escape
    classes = ["node", f"s-{state}"] + (["path"] if on_path else []) + (
        ["merged"] if merged else [])
    duration = _num(r.get("duration")) or 0.0
    return (
        f'<div class="{" ".join(classes)}" data-index="{r["index"]}" tabindex="0" '
        f'role="button" title="{e(str(r.get("branch") or ""))}">'
        f'<span class="idx">#{r["index"]}</span>'
        f'<span class="state">{e(state)}</span>'
        f'<span class="score">score {e(_fmt_score(r.get("score")))}</span>'
        f'<span class="dur">{duration:.2f}s</span>'
        f'<span class="verdict">{e(verdict_of(r))}</span>'
        f'<span class="label">{e(_label(r))}</span></div>'
    )


def _tree_html(doc: Mapping[str, Any], states: Mapping[int, str], path: set[int]) -> str:
    results = doc["results"]
    by_index = {r["index"]: r for r in results}
    kids = children_of(results)
    merged = {m for m in doc.get("merged", []) if isinstance(m, int)}

    def branch(parent: int | None) -> str:
        items = []
        for i in kids.get(parent, []):
            sub = branch(i) if i in kids else ""
            items.append(f"<li>{_node_html(by_index[i], states[i], i in path, i in merged)}"
                         f"{sub}</li>")
        return f'<ul class="tree">{"".join(items)}</ul>'

    return branch(None) if results else '<p class="empty">no candidates ran</p>'


def _timeline_svg(doc: Mapping[str, Any], states: Mapping[int, str]) -> str:
    timed = [r for r in doc["results"]
             if _num(r.get("start")) is not None and _num(r.get("end")) is not None]
    if not timed:
        return '<p class="empty">this trace has no start and end times</p>'
    span = max([_num(r["end"]) or 0.0 for r in timed] + [_num(doc.get("duration")) or 0.0])
    span = span or 1.0
    left, width, row_h = 52, 760, 18
    height = row_h * len(timed) + 28
    parts = [f'<svg id="timeline" xmlns="http://www.w3.org/2000/svg" '
             f'viewBox="0 0 {left + width + 10} {height}" width="100%" role="img" '
             f'aria-label="when each candidate ran">']
    for k in range(5):
        x = left + width * k / 4
        anchor = "end" if k == 4 else "middle" if k else "start"
        parts.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height - 16}" class="grid"/>'
                     f'<text x="{x:.1f}" y="{height - 3}" class="tick" text-anchor="{anchor}">'
                     f'{span * k / 4:.2f}s</text>')
    for row, r in enumerate(sorted(timed, key=lambda r: r["index"])):
        start, end = _num(r["start"]) or 0.0, _num(r["end"]) or 0.0
        x = left + width * start / span
        w = max(2.0, width * (end - start) / span)
        y = row * row_h + 2
        color = _COLORS.get(states[r["index"]], "#546e7a")
        parts.append(
            f'<g class="bar" data-index="{r["index"]}"><text x="4" y="{y + 12}" class="tick">'
            f'#{r["index"]}</text><rect x="{x:.1f}" y="{y}" width="{w:.1f}" '
            f'height="{row_h - 4}" rx="3" fill="{color}"><title>#{r["index"]} '
            f'{start:.2f}s to {end:.2f}s</title></rect></g>')
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#263238;color:#fff;padding:12px 20px}
header h1{font-size:18px;margin:0 0 4px}
main{display:grid;grid-template-columns:minmax(0,3fr) minmax(0,2fr);gap:16px;padding:16px 20px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px}
h2{font-size:15px;margin:4px 0 8px}
ul.tree{list-style:none;margin:0;padding-left:18px;border-left:1px dashed #bbb}
main>section>ul.tree{padding-left:0;border-left:none}
li{margin:3px 0}
.node{display:flex;gap:8px;align-items:baseline;padding:3px 6px;border-radius:4px;
cursor:pointer;border:1px solid transparent;white-space:nowrap;overflow:hidden}
.node:hover,.node:focus{border-color:#90a4ae;outline:none}
.node.selected{background:#e3f2fd;border-color:#1e88e5}
.node.path{background:#e8f5e9;border-color:#43a047;font-weight:600}
.node.merged{border-style:dashed;border-color:#43a047}
.idx{color:#555;min-width:2.5em}
.state{min-width:6em;font-weight:600}
.s-ok .state{color:#2e7d32}.s-committed .state{color:#1b5e20}
.s-failed .state{color:#c62828}.s-error .state{color:#ad1457}
.s-timeout .state{color:#6a1b9a}.s-cancelled .state{color:#757575}
.score,.dur{color:#333;min-width:6em}
.node>.verdict{color:#555;min-width:13em;max-width:22em;overflow:hidden;
text-overflow:ellipsis}
.node>span{flex:none}
.node>.label{flex:1 1 auto;min-width:0;font-family:ui-monospace,monospace;color:#37474f;
overflow:hidden;text-overflow:ellipsis}
#diff{font:12px/1.35 ui-monospace,monospace;white-space:pre;overflow:auto;max-height:70vh;
margin:0;background:#f5f5f5;padding:8px;border-radius:4px}
#diff .add{color:#1b5e20;background:#e8f5e9;display:block}
#diff .del{color:#b71c1c;background:#ffebee;display:block}
#diff .hunk{color:#0d47a1;display:block}
.wide{grid-column:1/-1}
svg .grid{stroke:#e0e0e0}svg .tick{font:11px system-ui,sans-serif;fill:#555}
.empty{color:#777}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 10px;margin:0}
dt{color:#555}dd{margin:0;font-family:ui-monospace,monospace;white-space:pre-wrap}
"""

_JS = """
(function(){
var trace=JSON.parse(document.getElementById('trace').textContent);
var byIndex={};trace.results.forEach(function(r){byIndex[r.index]=r;});
var pre=document.getElementById('diff'),head=document.getElementById('diff-head'),
meta=document.getElementById('meta');
function line(text){var s=document.createElement('span');
if(/^(\\+\\+\\+|---)/.test(text)){s.className='file';}
else if(text[0]==='+'){s.className='add';}else if(text[0]==='-'){s.className='del';}
else if(text.slice(0,2)==='@@'){s.className='hunk';}
s.textContent=text+'\\n';return s;}
function show(i){var r=byIndex[i];if(!r){return;}
document.querySelectorAll('.node.selected').forEach(function(n){n.classList.remove('selected');});
var node=document.querySelector('.node[data-index="'+i+'"]');
if(node){node.classList.add('selected');}
head.textContent='#'+i+' '+(r.branch||'');
meta.innerHTML='';
var inf=r.info||{};var ver=inf.verify||{};var ap=inf.apply||{};
var rows=[['changes',(r.changes||[]).join('\\n')||'none'],['error',r.error||''],
['applied',(ap.paths||[]).join('\\n')],
['stdout',inf.stdout_tail||ver.stdout_tail||''],['stderr',inf.stderr_tail||ver.stderr_tail||''],
['completion',typeof inf.text==='string'?inf.text:'']];
rows.forEach(function(kv){if(!kv[1]){return;}var dt=document.createElement('dt');
dt.textContent=kv[0];var dd=document.createElement('dd');dd.textContent=kv[1];
meta.appendChild(dt);meta.appendChild(dd);});
pre.innerHTML='';
if(r.diff===null||r.diff===undefined){pre.textContent='(no diff recorded for this candidate)';}
else if(r.diff===''){pre.textContent='(no changes)';}
else{r.diff.replace(/\\n$/,'').split('\\n').forEach(function(t){pre.appendChild(line(t));});}
pre.setAttribute('data-index',String(i));}
document.querySelectorAll('.node,.bar').forEach(function(n){
n.addEventListener('click',function(){show(Number(n.getAttribute('data-index')));});
n.addEventListener('keydown',function(e){
if(e.key==='Enter'){show(Number(n.getAttribute('data-index')));}});});
var first=document.querySelector('.node');
var w=trace.winner;
if(w){show(w.index);}else if(first){show(Number(first.getAttribute('data-index')));}
})();
"""


def _script_json(doc: Mapping[str, Any]) -> str:
    text = json.dumps(doc, allow_nan=False, default=str)
    # Inside <script>: no "</" may close the element early; U+2028/9 are fine in JSON.
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


def render_report(doc: Mapping[str, Any], *, title: str | None = None) -> str:
    """The HTML page for one outcome dict (see :func:`load_trace`)."""
    e = html.escape
    results = doc.get("results", [])
    path = winner_path(doc)
    on_path = set(path)
    states: dict[int, str] = {}
    for r in results:
        error = r.get("error")
        state = state_of(bool(r.get("success")), error if isinstance(error, str) else None)
        states[r["index"]] = "committed" if r["index"] in on_path else state
    strategy = str(doc.get("strategy") or "strategy")
    winner = doc.get("winner")
    if isinstance(winner, Mapping):
        verdict = (f"committed candidate #{winner.get('index')} (score "
                   f"{_fmt_score(winner.get('score'))}); path "
                   + " → ".join(f"#{i}" for i in path))
    elif doc.get("timed_out"):
        verdict = "nothing committed: the timeout expired"
    else:
        verdict = "nothing committed: no candidate succeeded"
    counts: dict[str, int] = {}
    for s in states.values():
        counts[s] = counts.get(s, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    duration = _num(doc.get("duration")) or 0.0
    page_title = title or f"branchagent report: {strategy}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(page_title)}</title><style>{_CSS}</style></head>
<body>
<header><h1>{e(page_title)}</h1>
<div id="verdict">{e(verdict)}</div>
<div>{len(results)} candidates ({e(summary or "none")}) in {duration:.2f} s</div></header>
<main>
<section id="tree-section"><h2>Branches, parent to child</h2>{_tree_html(doc, states, on_path)}
</section>
<section id="diff-section"><h2>Diff of <span id="diff-head">(click a node)</span></h2>
<dl id="meta"></dl><pre id="diff"></pre></section>
<section class="wide"><h2>Timeline: which candidates ran at the same time</h2>
{_timeline_svg(doc, states)}</section>
</main>
<script type="application/json" id="trace">{_script_json(doc)}</script>
<script>{_JS}</script>
</body></html>
"""
