"""`distill report` / `make report`: one self-contained page about a run, `<run>/report.html`.

    distill report --run demo [--examples 5]

What a user sends to their team: the teacher and the students, the filter funnel, the loss
curves of every student per loss term, the accuracy table (teacher, base student, every
distilled student in both modes, tokens per answer) with its chart, the comparison and the
data-efficiency sweep when `make compare` / `make sweep` have run, a few traces the filter
kept and rejected, and a table of every rejected trace that filters by reason and sorts by
any column (a link ending in `#reason=wrong_answer` opens it filtered). Plots are PNGs
embedded in the page (no file beside it, no network); the page reads every file of the run
it needs and leaves out what a run does not have yet.
"""

from __future__ import annotations

import base64
import html
import time

from pipeline.costs import money
from pipeline.log import log
from pipeline.run_folder import RunFolder
from pipeline.figures import png, pyplot

_MAX_ROWS = 5000  # rejected traces listed in the table at most (the funnel counts them all)

_STYLE = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2433;
background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 8px;border-bottom:1px solid
#d9dde3;padding-bottom:4px}
.sub{color:#5b6475;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #d9dde3;border-radius:8px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:20px}
figure{background:#fff;border:1px solid #d9dde3;border-radius:8px;margin:12px 0;padding:8px;
text-align:center}
figure img{max-width:100%}figcaption{color:#5b6475;font-size:13px}
table{border-collapse:collapse;background:#fff;width:100%;font-size:14px}
th,td{border:1px solid #d9dde3;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef0f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer}
.trace{background:#fff;border:1px solid #d9dde3;border-radius:8px;padding:8px 12px;margin:8px 0}
.trace pre{white-space:pre-wrap;margin:4px 0;font-size:13px}
.tag{display:inline-block;border-radius:4px;padding:0 6px;font-size:12px;color:#fff}
.kept{background:#2ca02c}.rejected{background:#d62728}
.scroll{max-height:480px;overflow:auto}
.missing{color:#b00}
"""

_SCRIPT = """
function sortBy(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th);
const asc=th.dataset.dir!=='asc';th.dataset.dir=asc?'asc':'desc';
const rows=[...t.tBodies[0].rows];const num=rows.every(r=>!isNaN(parseFloat(r.cells[i].textContent))||r.cells[i].textContent==='');
rows.sort((a,b)=>{let x=a.cells[i].textContent,y=b.cells[i].textContent;
if(num){x=parseFloat(x)||0;y=parseFloat(y)||0;return asc?x-y:y-x}
return asc?x.localeCompare(y):y.localeCompare(x)});rows.forEach(r=>t.tBodies[0].appendChild(r))}
function filterReason(v){let n=0;for(const r of document.querySelectorAll('#rejected tbody tr')){
const show=!v||r.dataset.reason===v;r.style.display=show?'':'none';if(show)n++}
document.getElementById('shown').textContent=n}
window.addEventListener('load',()=>{
for(const img of document.querySelectorAll('img.plot')){const ok=img.complete&&img.naturalWidth>0;
img.dataset.rendered=ok?img.naturalWidth+'x'+img.naturalHeight:'failed';
if(!ok){const p=document.createElement('p');p.className='missing';p.textContent='this plot did not render';img.after(p)}}
document.querySelectorAll('table.sortable th').forEach(th=>th.addEventListener('click',()=>sortBy(th)));
const sel=document.getElementById('reason');if(sel){sel.addEventListener('change',()=>filterReason(sel.value));
const m=location.hash.match(/reason=([a-z_]+)/);if(m){sel.value=m[1];}filterReason(sel.value)}
document.body.dataset.ready='1'});
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _png(fig) -> str:
    return base64.b64encode(png(fig)).decode()


def _figure(png_b64: str, caption: str, name: str) -> str:
    return (f'<figure><img class="plot" data-plot="{_e(name)}" alt="{_e(caption)}" '
            f'src="data:image/png;base64,{png_b64}"><figcaption>{_e(caption)}</figcaption>'
            "</figure>")


def _plt():
    plt = pyplot()

    return plt


def _student_label(name: str) -> str:
    return name or "train (default)"


def loss_curves(logs: dict[str, list[dict]]) -> str | None:
    """One panel per loss term (`loss_<term>` in the logs), a line per student (PNG)."""
    terms = sorted({k for records in logs.values() for r in records for k in r
                    if k.startswith("loss_")})
    if not terms:
        return None
    plt = _plt()
    cols = min(3, len(terms))
    rows = (len(terms) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colors = {name: plt.cm.tab20(i % 20) for i, name in enumerate(logs)}  # one per student
    for ax, term in zip(axes.flat, terms):
        for name, records in logs.items():
            points = [(r["step"], r[term]) for r in records if term in r]
            if points:
                ax.plot(*zip(*points), label=_student_label(name), lw=1.2, color=colors[name])
        ax.set_title(term[len("loss_"):])
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(terms):]:
        ax.axis("off")
    legend: dict = {}  # every student once, whichever panels it has lines in
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels, handles = list(legend), list(legend.values())
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * ((len(labels) + 3) // 4), 1, 1))
    return _png(fig)


def sweep_plot(rows: list[dict], title: str) -> bytes:
    """Accuracy against the share of the kept traces, one line per method (PNG bytes)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        x = [100 * r["share"] for r in mine]
        y = [100 * r["mean"] for r in mine]
        ax.errorbar(x, y, yerr=[100 * r["sd"] for r in mine], marker="o", capsize=3,
                    label={"dss": "Distilling Step-by-Step (predict:)",
                           "answer-only": "answer-only SFT"}.get(method, method))
    ax.set_xscale("log", base=2)
    ax.set_xticks([100 * r["share"] for r in rows])
    ax.set_xticklabels([f"{100 * r['share']:g}%" for r in rows])
    ax.set_xlabel("share of the kept traces used for training")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return png(fig)


def loop_plot(loop: dict) -> str | None:
    """`distill iterate` per round: question coverage, and held-out accuracy of each round's
    student (predict:, explain:, maj@k), the teacher's as a dashed line."""
    rows = loop["rounds"]
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    x = [r["round"] for r in rows]
    left.plot(x, [100 * r["covered"] / max(1, r["questions"]) for r in rows], "o-",
              color="#2ca02c")
    left.set_ylabel("questions with a kept trace (%)")
    for name, key, color in (("predict:", "predict", "#1f77b4"),
                             ("explain:", "explain", "#ff7f0e"),
                             (f"maj@{loop.get('vote_samples')}", "explain_votes", "#9467bd")):
        points = [(r["round"], 100 * r[key]) for r in rows if r.get(key) is not None]
        if points:
            right.plot(*zip(*points), "o-", color=color, label=name)
    for r in loop.get("reference", []):
        if r["system"] == "teacher":
            right.axhline(100 * r["accuracy"], ls="--", color="#7f7f7f", label="teacher")
    right.set_ylabel("held-out accuracy (%)")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xlabel("round")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def result_label(r: dict) -> str:
    variant = r.get("variant")
    system, _, votes = r["system"].partition("@")
    vote = f", maj@{votes}" if votes else ""
    if system == "teacher":
        return f"teacher (few-shot CoT{vote})"
    if system == "base":
        return "base student (predict:)"
    return f"{_student_label(variant or '')} ({system}:{vote})"


def accuracy_chart(results: list[dict]) -> str | None:
    if not results:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(results) + 1.2))
    labels = [result_label(r) for r in results]
    values = [100 * r["accuracy"] for r in results]
    colors = ["#7f7f7f" if r["system"] in ("teacher", "base") else
              "#1f77b4" if r["system"] == "predict" else "#ff7f0e" if r["system"] == "explain"
              else "#2ca02c" for r in results]
    bars = ax.barh(range(len(results)), values, color=colors)
    ax.set_yticks(range(len(results)), labels, fontsize=8)
    ax.invert_yaxis()
    for bar, v in zip(bars, values):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.1f}%",
                va="center", fontsize=8)
    ax.set_xlim(0, 110)
    ax.set_xlabel("held-out accuracy (%)")
    fig.tight_layout()
    return _png(fig)


def _table(head: list[str], rows: list[list], numeric: set[int] = frozenset(),
           cls: str = "", tid: str = "", row_attrs: list[str] | None = None) -> str:
    out = [f'<table class="{cls}"' + (f' id="{tid}"' if tid else "") + "><thead><tr>"]
    out += [f"<th>{_e(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for i, row in enumerate(rows):
        attrs = row_attrs[i] if row_attrs else ""
        out.append(f"<tr{attrs}>" + "".join(
            f'<td class="num">{_e(v)}</td>' if j in numeric else f"<td>{_e(v)}</td>"
            for j, v in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _trace(row: dict, kept: bool) -> str:
    tag = ('<span class="tag kept">kept</span>' if kept else
           f'<span class="tag rejected">{_e(row.get("reason"))}</span>')
    detail = f" ({_e(row['detail'])})" if row.get("detail") else ""
    return (f'<div class="trace">{tag} <b>{_e(row["question"])}</b>'
            f"<pre>{_e(row['completion'])}</pre>gold: {_e(row.get('gold'))} · teacher's "
            f"answer: {_e(row.get('pred_answer'))}{detail}</div>")


def _read_logs(run: RunFolder) -> dict[str, list[dict]]:
    logs = {}
    for name in run.students():
        folder = run.student(name)
        if folder.exists("log.jsonl"):
            logs[name] = [r for r in folder.read_jsonl("log.jsonl") if "step" in r]
    return logs


def _optional_json(read, name: str):
    try:
        return read(name)
    except (FileNotFoundError, OSError, ValueError):
        return None


class _Parts(list):
    """The report's sections as they are written, and how many plots they hold."""

    def __init__(self):
        super().__init__()
        self.plots = 0

    def plot(self, b64: str | None, caption: str, name: str) -> None:
        if b64:
            self.append(_figure(b64, caption, name))
            self.plots += 1


def build_report(run: RunFolder, examples: int = 4) -> tuple[str, int]:
    """(the page's HTML, how many plots it holds)."""
    parts = _Parts()
    filt = run.stage("filter")
    funnel = _optional_json(filt.read_json, "funnel.json") if filt.manifest() else None
    students = [n for n in run.students() if run.student(n).manifest()]
    _summary(parts, run, funnel, students)
    for section in (_accuracy, _compared, _loop, _sweep):
        section(parts, run)
    _training(parts, run, students)
    _the_filter(parts, run, funnel, examples)
    title = f"Distillation report: {run.url.rstrip('/').rsplit('/', 1)[-1]}"
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}"
            f"</title><meta name=viewport content='width=device-width,initial-scale=1'>"
            f"<style>{_STYLE}</style></head><body><main><h1>{_e(title)}</h1>"
            f"<p class=sub>{_e(run.url)} · written {time.strftime('%Y-%m-%d %H:%M')}</p>"
            + "".join(parts) + f"</main><script>{_SCRIPT}</script></body></html>")
    return page, parts.plots


def _summary(parts: _Parts, run: RunFolder, funnel: dict | None, students: list[str]) -> None:
    """The cards at the top of the page."""
    gen = run.stage("generate").manifest() or {}
    facts = gen.get("facts", {})
    cards = [("teacher", facts.get("teacher", "?")),
             ("traces generated", gen.get("counters", {}).get("traces", "?")),
             ("top-k per token", facts.get("k", "?"))]
    if funnel:
        c = funnel["counters"]
        if "questions" in c:  # the headline: training questions with a kept trace
            cards.insert(0, ("questions covered", f"{c['covered']:,} of {c['questions']:,} "
                             f"({100 * c['covered'] / max(1, c['questions']):.0f}%)"))
            cards.append(("teacher tokens per covered question",
                          f"{c.get('teacher_tokens', 0) / max(1, c['covered']):,.0f}"))
        share = 100 * c.get("kept", 0) / max(1, c.get("traces_in", 0))
        cards.append(("kept by the filter", f"{c.get('kept', 0):,} ({share:.0f}%)"))
    cards.append(("students trained", len(students)))
    parts.append('<div class="cards">' + "".join(
        f'<div class="card">{_e(k)}<b>{_e(v)}</b></div>' for k, v in cards) + "</div>")


def _accuracy(parts: _Parts, run: RunFolder) -> None:
    plot = parts.plot
    report = _optional_json(run.stage("eval").read_json, "report.json")
    parts.append("<h2>Accuracy on the held-out split</h2>")
    if report:
        results = report["results"]
        parts.append(f"<p>What the last <code>make eval</code> scored (finished "
                     f"{_e(report.get('finished_at', '?'))}); <code>make eval</code> with "
                     f"<code>eval.systems</code> and <code>eval.variants</code> unset scores "
                     f"every system and every trained student.</p>")
        parts.append(_table(["system", "n", "accuracy", "tokens / answer"],
                            [[result_label(r), r["n"], f"{100 * r['accuracy']:.1f}%",
                              f"{r['mean_tokens']:.1f}"] for r in results], {1, 2, 3},
                            cls="sortable", tid="accuracy"))
        plot(accuracy_chart(results), "held-out accuracy of every system scored "
             "(grey: teacher and base student; blue: predict:, orange: explain:)", "accuracy")
    else:
        parts.append("<p>No eval yet: run <code>make eval</code>.</p>")


def _compared(parts: _Parts, run: RunFolder) -> None:
    compare = _optional_json(run.read_json, "compare.json")
    if compare:
        parts.append(f"<h2>Variants compared over seeds {_e(compare['seeds'])}</h2>")
        parts.append(_table(["student", "mode", "mean accuracy", "sd", "per seed", "tokens"],
                            [[r["variant"], r["mode"], f"{100 * r['mean']:.1f}%",
                              f"{100 * r['sd']:.1f}",
                              " ".join(f"{100 * a:.1f}" for a in r["accuracy"]),
                              f"{r['mean_tokens']:.1f}"] for r in compare["variants"]],
                            {2, 3, 5}, cls="sortable"))
        if compare.get("mode_agreement"):
            parts.append("<p>The same student's <code>predict:</code> and <code>explain:</code>"
                         " answers on the held-out rows, over the seeds:</p>")
            parts.append(_table(["student", "both right", "explain only", "predict only",
                                 "neither"],
                                [[r["variant"], r["both"], r["explain_only"],
                                  r["predict_only"], r["neither"]]
                                 for r in compare["mode_agreement"]], {1, 2, 3, 4}))


def _loop(parts: _Parts, run: RunFolder) -> None:
    plot = parts.plot
    loop = _optional_json(run.read_json, "iterate.json")
    if loop and loop.get("rounds"):
        parts.append("<h2>The loop (<code>distill iterate</code>)</h2>")
        parts.append(f"<p>Each round after the first, the student of the round before samples "
                     f"the questions still short of kept traces, the teacher scores its traces, "
                     f"and a new student trains from the base model on every round's kept "
                     f"traces. Stopped: {_e(loop.get('stopped', '?'))}.</p>")
        plot(loop_plot(loop), "per round: training questions with a kept trace, and the "
             "round's student on the held-out split (dashed: the teacher)", "loop")
        parts.append(_table(
            ["round", "questions sampled", "covered", "kept (by the student)",
             "teacher tokens", "student tokens", "predict:", "explain:",
             f"maj@{loop.get('vote_samples') or 'k'}", "explain: (validation)"],
            [[r["round"], r["sampled_questions"], f"{r['covered']} of {r['questions']}",
              f"{r['kept']} ({r['student_kept']})", f"{r['teacher_tokens']:,}",
              f"{r['student_tokens']:,}"] + [f"{100 * r[m]:.1f}%" if r.get(m) is not None
                                            else "-" for m in ("predict", "explain",
                                                               "explain_votes",
                                                               "validation_explain")]
             for r in loop["rounds"]], {0, 1, 4, 5, 6, 7, 8, 9}, tid="loop"))


def _sweep(parts: _Parts, run: RunFolder) -> None:
    plot = parts.plot
    sweep = _optional_json(run.read_json, "sweep.json")
    if sweep:
        parts.append("<h2>Data efficiency (answer-only SFT vs Distilling Step-by-Step)</h2>")
        rows = sweep["rows"]
        plot(base64.b64encode(sweep_plot(rows, "accuracy against the share of the data"))
             .decode(), f"predict: accuracy against the share of the kept traces, seeds "
             f"{sweep['seeds']}", "sweep")
        parts.append(_table(["method", "share", "traces", "mean accuracy", "sd", "per seed"],
                            [[r["method"], f"{100 * r['share']:g}%", r.get("traces"),
                              f"{100 * r['mean']:.1f}%", f"{100 * r['sd']:.1f}",
                              " ".join(f"{100 * a:.1f}" for a in r["accuracy"])]
                             for r in rows], {2, 3, 4}, cls="sortable"))


def _training(parts: _Parts, run: RunFolder, students: list[str]) -> None:
    plot = parts.plot
    parts.append("<h2>Training</h2>")
    logs = _read_logs(run)
    plot(loss_curves(logs), "the loss terms of every student (each term's mean between "
         "logging steps, before its weight)", "losses")
    rows = []
    for name in students:
        m = run.student(name).manifest()
        f, c = m.get("facts", {}), m.get("counters", {})
        rows.append([_student_label(name), f.get("student"), ", ".join(
            f"{k} x {v:g}" for k, v in (f.get("loss_terms") or {}).items()),
            f.get("explain_targets"), c.get("traces"), c.get("steps"), c.get("train_loss"),
            m.get("seconds")])
    if rows:
        parts.append(_table(["student", "model", "loss terms", "explain targets", "traces",
                             "steps", "final loss", "seconds"], rows, {4, 5, 6, 7},
                            cls="sortable"))


def _the_filter(parts: _Parts, run: RunFolder, funnel: dict | None, examples: int) -> None:
    from stages.filter.stage import draw_funnel

    plot = parts.plot
    filt = run.stage("filter")
    filt_manifest = filt.manifest()
    parts.append("<h2>The filter</h2>")
    if funnel:
        for line in funnel.get("coverage") or []:
            parts.append(f"<p>{_e(line)}</p>")
        rounds = (filt_manifest or {}).get("facts", {}).get("rounds")
        if rounds:
            parts.append(_table(["round", "folder", "hinted", "questions", "samples each",
                                 "traces", "tokens"],
                                [[r["round"], r["folder"], r["hinted"], r["questions"],
                                  r["samples"], r["traces"], r["tokens"]] for r in rounds],
                                {0, 3, 4, 5, 6}))
        book = funnel.get("ledger") or {}
        if any(r.get("prompt_tokens") or r.get("completion_tokens")
               for r in book.get("rounds") or []):
            parts.append("<h3>Teacher ledger</h3>")
            parts.append(_table(
                ["round", "requests sent", "from the cache", "prompt tokens",
                 "completion tokens", "batch tokens", "engine seconds", "cost"],
                [[r["round"], r.get("requests", 0), r.get("cached", 0), r["prompt_tokens"],
                  r["completion_tokens"], r.get("batch_tokens", 0),
                  f"{r.get('engine_s', 0):.0f}", money(r.get("cost", 0.0))]
                 for r in book["rounds"] + [{**book["total"], "round": "all"}]],
                {1, 2, 3, 4, 5, 6, 7}))
        plot(base64.b64encode(draw_funnel(funnel["counters"])).decode(),
             "what the filter kept and why it dropped the rest", "funnel")
    if filt_manifest:
        cols = ["id", "question", "gold", "completion", "pred_answer", "detail", "n_tokens"]
        shards = filt_manifest["shards"]
        kept = filt.read_tables([s["outputs"]["kept"] for s in shards[:2]],
                                columns=cols).to_pylist()[:examples]
        rejected = filt.read_tables([s["outputs"]["rejected"] for s in shards],
                                    columns=cols + ["reason"]).to_pylist()
        parts.append("<h3>Examples kept</h3>" + "".join(_trace(r, True) for r in kept))
        seen, picks = set(), []
        for r in rejected:  # one example per reason first
            if r["reason"] not in seen:
                seen.add(r["reason"])
                picks.append(r)
        parts.append("<h3>Examples rejected</h3>" + "".join(
            _trace(r, False) for r in picks[:max(examples, len(seen))]))
        reasons = sorted({r["reason"] for r in rejected})
        listed = rejected[:_MAX_ROWS]
        parts.append(
            f"<h3>Every rejected trace ({len(rejected):,}"
            + (f", the first {_MAX_ROWS:,} listed" if len(rejected) > _MAX_ROWS else "")
            + ')</h3><p>reason: <select id="reason"><option value="">all</option>'
            + "".join(f'<option value="{_e(x)}">{_e(x)}</option>' for x in reasons)
            + '</select> · showing <span id="shown"></span> · click a column to sort</p>'
            + '<div class="scroll">'
            + _table(["reason", "id", "question", "completion", "teacher's answer", "gold",
                      "detail", "tokens"],
                     [[r["reason"], r["id"], r["question"], r["completion"],
                       r["pred_answer"], r["gold"], r["detail"], r["n_tokens"]]
                      for r in listed], {7}, cls="sortable", tid="rejected",
                     row_attrs=[f' data-reason="{_e(r["reason"])}"' for r in listed])
            + "</div>")
    else:
        parts.append("<p>No filter yet: run <code>make filter</code>.</p>")


def write_report(run: RunFolder, examples: int = 4) -> str:
    if run.stage("generate").manifest() is None:
        raise FileNotFoundError(f"{run} has no finished generate stage yet: run `make "
                                "generate` (or `distill import`) first")
    page, n_plots = build_report(run, examples)
    run.write_text("report.html", page)
    where = run.where("report.html")
    log("report", f"{where}: {n_plots} plots, {len(page) / 1e6:.1f} MB")
    return where
