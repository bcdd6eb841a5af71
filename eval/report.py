"""One self-contained HTML report per run (no Ray here): every figure is a PNG embedded as a data URI, so the
file can be mailed, attached to a ticket or opened offline.

Sections (each from the stage outputs of an ``augrel run`` directory; a stage that did not run is said so):
data summary, judge training and agreement (kappa, weighted kappa, Krippendorff's alpha, Kendall's tau with
95% intervals, confusion matrix, calibration), annotation counts and throughput, ranker metrics per label source
with intervals, serving check, and the configs used.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _img(png: bytes | Path, alt: str) -> str:
    data = png.read_bytes() if isinstance(png, Path) else png
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _figure(draw: Callable[[Any], None], size: tuple[float, float] = (5, 3)) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _table(rows: list[list[Any]], head: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        if isinstance(v, int):
            return f"{v:,}"
        return html.escape(str(v))

    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return (
        "<table><thead><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + f"</tr></thead><tbody>{body}</tbody></table>"
    )


def _ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _missing(what: str) -> str:
    return f'<p class="missing">{html.escape(what)} did not run in this pipeline.</p>'


# ------------------------------------------------------------------------------------------ sections


def data_section(run: Path) -> str:
    m = _json(run / "data" / "manifest.json")
    if m is None:
        return _missing("Data preparation")
    grades = {int(k): v for k, v in (m.get("grades") or {}).items()}
    out = [_table([[k, v] for k, v in m["counts"].items()], ["table", "rows"])]
    if grades:
        png = _figure(lambda ax: (ax.bar([str(g) for g in grades], list(grades.values()), color="#4C72B0"),
                                  ax.set_xlabel("human grade"), ax.set_ylabel("pairs"),
                                  ax.set_title("Human grades")))  # fmt: skip
        out.append(_img(png, "human grade distribution"))
    s = _json(run / "splits" / "manifest.json")
    if s:
        out.append(_table([[k, v] for k, v in s["counts"].items()], ["split", "queries"]))
    use = (_json(run / "pipeline.json") or {}).get("splits_use")
    if use:
        out.append("<p>How each split of queries is used: no test query trains or calibrates anything.</p>")
        out.append(_table([[k, v] for k, v in use.items()], ["split", "used for"]))
    c = _json(run / "candidates" / "manifest.json")
    pool = _json(run / "pool" / "manifest.json")
    if c:
        cfg = c.get("retrievers", []), c.get("k")
        out.append(f"<p>Candidates: top {cfg[1]} of {html.escape(' + '.join(cfg[0]))} for every query.</p>")
        out.append(_table([[k, v] for k, v in c["counts"].items()], ["candidates", "count"]))
    if pool:
        out.append(
            _table([[k, v] for k, v in pool["counts"].items()], ["pool (ranker training pairs)", "count"])
        )
    v = _json(run / "validation" / "report.json")
    if v is not None:
        out.append(f"<p>Validation: {'valid' if v.get('ok') else 'INVALID'}.</p>")
    return "".join(out)


def judge_section(run: Path) -> str:
    out = []
    card = _json(run / "judge" / "judge_card.json")
    if card:
        t, d = card.get("training", {}), card.get("data", {})
        out.append(f"<p>Base model <code>{html.escape(str(card['base_model']))}</code>, prompt "
                   f"<code>{html.escape(str(card['prompt_version']))}</code>, LoRA r={t.get('lora', {}).get('r')}, "
                   f"{t.get('num_workers')} Ray Train workers, DeepSpeed {t.get('deepspeed')}; "
                   f"{d.get('train_pairs')} training pairs ({d.get('sampling')}), {d.get('val_pairs')} validation.</p>")  # fmt: skip
        hist = t.get("history") or []
        if hist:
            steps = [h["step"] for h in hist]

            def draw(ax):
                ax.plot(steps, [h.get("val_kappa", float("nan")) for h in hist], "o-", label="val kappa")
                ax.plot(steps, [h.get("val_tau", float("nan")) for h in hist], "s-", label="val tau")
                ax.set_xlabel("optimizer step")
                ax.legend()
                ax.set_title("Judge validation during fine-tuning")

            out.append(_img(_figure(draw), "judge validation curve"))
        stack = card.get("metrics", {}).get("stack")
        if stack:
            kept = stack.get("signals") or []
            llm_note = (
                ""
                if {"llm_logp", "llm_score"} & set(kept)
                else " (the LLM's signals did not raise the held-out kappa and were left out)"
            )
            out.append(f"<p>Stacked judge (<code>{html.escape(str(card.get('combiner')))}</code>): a logistic regression "
                       f"over the signals kept by forward selection, <code>{html.escape(', '.join(kept))}</code>{llm_note}, "
                       f"fit on {stack['pairs']:,} pairs of {stack['queries']} validation queries in their natural "
                       f"grade mix.</p>")  # fmt: skip
            rows = [[name, m["cohen_kappa"], _ci(m.get("cohen_kappa_ci95")), m["weighted_kappa_quadratic"],
                     m["kendall_tau_b_pooled"]] for name, m in stack["agreement"].items()]  # fmt: skip
            out.append(
                _table(rows, ["on the calibration pairs", "kappa", "95% CI", "weighted kappa", "tau-b"])
            )
        if card.get("audit"):
            out.append(judge_audit(card["audit"]))
    else:
        out.append(_missing("Judge fine-tuning"))
    m = _json(run / "judge-eval" / "metrics.json")
    if m:
        names = {"cohen_kappa": "Cohen's kappa", "weighted_kappa_quadratic": "quadratic weighted kappa",
                 "krippendorff_alpha_ordinal": "Krippendorff's alpha (ordinal)", "accuracy": "accuracy",
                 "kendall_tau_b_pooled": "Kendall's tau-b (pooled)",
                 "kendall_tau_b_per_query_mean": "Kendall's tau-b (per-query mean)"}  # fmt: skip
        rows = [[names.get(k, k), v, _ci(m.get("ci95", {}).get(k))] for k, v in m["metrics"].items()]
        out.append(
            f"<p>{m['n_pairs']:,} held-out pairs over {m['n_queries']} queries, against human grades.</p>"
        )
        out.append(_table(rows, ["agreement", "value", "95% CI (bootstrap over queries)"]))
        for name, alt in (("confusion.png", "confusion matrix"), ("calibration.png", "calibration")):
            if (run / "judge-eval" / name).exists():
                out.append(_img(run / "judge-eval" / name, alt))
    else:
        out.append(_missing("Judge evaluation"))
    return "".join(out)


def judge_audit(audit: dict[str, Any]) -> str:
    """The judge card's audit: ``augrel judge diff`` against earlier judges (drift between versions) and the
    manipulation benchmark's figures, whichever keys are present."""

    def num(v: Any, fmt: str = ".3f") -> str:
        return format(v, fmt) if isinstance(v, int | float) and not isinstance(v, bool) else str(v or "")

    out = ["<h3>Judge audit</h3>"]
    diffs = audit.get("diffs") or []
    if diffs:
        out.append("<p>This judge against earlier ones (<code>augrel judge diff</code>; A: the judge named, B: this "
                   "one), on the same pairs.</p>")  # fmt: skip
        rows = []
        for d in diffs:
            shift = ", ".join(f"{g}: {100 * v:+.1f}" for g, v in (d.get("label_shift") or {}).items())
            h = d.get("human_kappa") or {}
            human = f"{num(h.get('diff'), '+.3f')} {_ci(h.get('diff_ci95'))}" if h else ""
            rows.append([d.get("against", ""), d.get("at", ""), d.get("pairs", ""), num(d.get("kappa_ab")),
                         _ci(d.get("kappa_ab_ci95")), num(d.get("changed"), ".1%"), shift,
                         num(d.get("mean_score_shift"), "+.3f"), human])  # fmt: skip
        out.append(_table(rows, ["against (A)", "when", "pairs", "kappa A-B", "95% CI", "labels changed",
                                 "grade share shift (pts)", "mean score shift", "kappa with humans B - A [CI]"]))  # fmt: skip
    manipulation = audit.get("manipulation")
    if isinstance(manipulation, dict) and manipulation:
        out.append("<p>Manipulation benchmark (injected relevance claims and instructions):</p>")
        scalars = [[k, num(v, ".4f")] for k, v in manipulation.items() if not isinstance(v, dict | list)]
        if scalars:
            out.append(_table(scalars, ["figure", "value"]))
        for k, v in manipulation.items():
            if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
                cols = list(dict.fromkeys(c for x in v.values() for c in x))
                out.append(_table([[name, *(num(x.get(c), ".4f") for c in cols)] for name, x in v.items()],
                                  [k, *cols]))  # fmt: skip
            elif isinstance(v, dict):
                out.append(_table([[name, num(x, ".4f")] for name, x in v.items()], [k, "value"]))
            elif isinstance(v, list):
                out.append(f"<p>{html.escape(k)}: {html.escape(', '.join(map(str, v)))}</p>")
    others = [k for k in audit if k not in ("diffs", "manipulation")]
    if others:
        rest = json.dumps({k: audit[k] for k in others}, indent=2, default=str)
        out.append(f"<pre>{html.escape(rest)}</pre>")
    return "".join(out)


def annotation_section(run: Path) -> str:
    out = []
    for name, what in (("judgments-pool", "The pool: candidate pairs nobody labelled, of non-test queries "
                        "(the rankers' judge labels)"),
                       ("judgments", "The test queries' labelled pairs (to measure the judge)")):  # fmt: skip
        body = _annotation_table(run / name)
        if body:
            out.append(f"<h3>{html.escape(what)}</h3>{body}")
    return "".join(out) or _missing("Annotation")


def _annotation_table(path: Path) -> str | None:
    m = _json(path / "manifest.json")
    if m is None:
        return None
    res = m.get("resources", {})
    rows = [[k, v] for k, v in m["counts"].items()]
    rows += [["work units", m.get("units")], ["pairs/s (whole run)", m.get("pairs_per_s")],
             ["pairs/s (steady state)", m.get("steady_pairs_per_s")], ["wall s", m.get("wall_s")],
             ["judge actors", f"{res.get('concurrency')} x {res.get('num_cpus')} CPU / {res.get('num_gpus')} GPU"]]  # fmt: skip
    out = [_table(rows, ["", "value"])]
    per = {k: v for k, v in (m.get("pairs_per_s_per_actor") or {}).items() if v}
    if per:
        png = _figure(lambda ax: (ax.barh(list(per), list(per.values()), color="#55A868"),
                                  ax.set_xlabel("pairs/s while busy"), ax.set_title("Judge actors")),
                      size=(5, 0.5 * len(per) + 1.2))  # fmt: skip
        out.append(_img(png, "throughput per judge actor"))
    return "".join(out)


def ranking_section(run: Path) -> str:
    out = []
    summary = _json(run / "rank-eval" / "summary.json")
    if summary:
        pool = (_json(run / "pool" / "manifest.json") or {}).get("counts", {})
        out.append(
            f"<p>LambdaMART rankers, one per label source, on the same features: human labels of the training and "
            f"validation queries ({pool.get('human_pairs', '?')} pairs) and the judge's labels of "
            f"{pool.get('unlabelled_pairs', '?')} candidate pairs nobody labelled (training, validation and "
            f"unlabelled queries). <b>human</b>: human labels only; <b>judge</b>: judge labels only; <b>mix</b>: "
            f"both; <b>curriculum</b>: judge labels, then more trees on human labels. Scored on "
            f"{summary['n_queries']} test queries against human labels; <b>bm25</b> and <b>dense</b> (MiniLM "
            "cosine) rank the same test pairs by one feature. 95% CIs are bootstrap intervals over queries.</p>"
        )
        rows = summary["rows"].values()
        out.append(_table([[r["name"], r.get("ndcg10"), _ci(r.get("ndcg10_ci95")), r.get("mrr10"), r.get("recall100"),
                            r.get("ndcg10_vs_bm25", ""), _ci(r.get("ndcg10_vs_bm25_ci95")), r.get("ndcg10_vs_bm25_p", "")]
                           for r in rows],
                          ["ranker", "NDCG@10", "95% CI", "MRR@10", "R@100", "vs BM25", "95% CI", "p (paired t)"]))  # fmt: skip
        if (run / "rank-eval" / "ndcg10.png").exists():
            out.append(_img(run / "rank-eval" / "ndcg10.png", "NDCG@10 per ranker with 95% CIs"))
        served = next(iter(sorted(run.glob("ranker-*/importances.png"))), None)
        for imp in sorted(run.glob("ranker-*/importances.png")):
            if imp.parent.name == "ranker-mix":
                served = imp
        if served:
            out.append(_img(served, f"feature importances ({served.parent.name})"))
    else:
        out.append(_missing("Ranker evaluation"))
    a = _json(run / "augment" / "results.json")
    if a:
        out.append("<h3>Label sources (the augmentation experiment)</h3>")
        table = run / "augment" / "table.md"
        if table.exists():
            out.append(f"<p>{html.escape(table.read_text().splitlines()[0])}</p>")
        out.append(_table([[r["name"], r["ndcg10"], _ci(r.get("ndcg10_ci95")), r["mrr10"], _ci(r.get("mrr10_ci95")),
                            r["ndcg100"], r.get("ndcg10_vs_h20_p", "")] for r in a.values()],
                          ["labels", "NDCG@10", "95% CI", "MRR@10", "95% CI", "NDCG@100", "p vs 20% human"]))  # fmt: skip
        if (run / "augment" / "augment.png").exists():
            out.append(_img(run / "augment" / "augment.png", "augmentation experiment"))
    else:
        out.append(_missing("The augmentation experiment"))
    return "".join(out)


def serving_section(run: Path) -> str:
    out = []
    idx = _json(run / "index" / "manifest.json")
    if idx:
        out.append(f"<p>Index: {idx['counts'].get('docs', 0):,} documents, BM25"
                   f"{' + FAISS ' + str(idx.get('kind')) + ' (' + str(idx.get('dim')) + '-d MiniLM)' if idx.get('dense') else ''}.</p>")  # fmt: skip
    out.append(retriever_section(run))
    check = _json(run / "serve" / "check.json")
    if check:
        out.append(f"<p>Ray Serve check: {html.escape(json.dumps(check))}</p>")
    return "".join(out) or _missing("Indexing and serving")


def retriever_section(run: Path) -> str:
    """The fine-tuned bi-encoder: what it trained on (its card) and full-corpus retrieval of the test queries."""
    card = _json(run / "retriever" / "retriever_card.json")
    summary = _json(run / "retriever-eval" / "summary.json")
    if not card and not summary:
        return ""
    out = ["<h3>Dense retriever</h3>"]
    if card:
        phases = ", ".join(f"{p['name']}: {p.get('queries_used', p.get('queries', '?'))} queries"
                           for p in card.get("data", {}).get("phases", []))  # fmt: skip
        out.append(f"<p>{html.escape(str(card.get('base_model')))} fine-tuned with {html.escape(str(card.get('loss')))} "
                   f"(temperature {card.get('temperature')}) on {html.escape(card.get('label_source') or '?')} labels "
                   f"({html.escape(phases)}); validation nDCG@10 {card.get('metrics', {}).get('val_ndcg10', float('nan')):.4f} "
                   f"on {len(card.get('data', {}).get('validation_queries', []))} val queries "
                   f"({html.escape(card.get('data', {}).get('validation', ''))}).</p>")  # fmt: skip
    if summary:
        table = run / "retriever-eval" / "table.md"
        if table.exists():
            out.append(f"<p>{html.escape(table.read_text().splitlines()[0])}</p>")
        out.append(_table([[r["name"], r.get("ndcg10"), _ci(r.get("ndcg10_ci95")), r.get("mrr10"), r.get("recall100"),
                            r.get("ndcg10_vs_bm25", ""), _ci(r.get("ndcg10_vs_bm25_ci95"))]
                           for r in summary["rows"].values()],
                          ["retriever", "NDCG@10", "95% CI", "MRR@10", "R@100", "vs BM25", "95% CI"]))  # fmt: skip
        if (run / "retriever-eval" / "ndcg10.png").exists():
            out.append(_img(run / "retriever-eval" / "ndcg10.png", "full-corpus NDCG@10 per retriever"))
    return "".join(out)


def configs_section(run: Path) -> str:
    p = _json(run / "pipeline.json")
    out = []
    if p:
        rows = [[n, s.get("status"), s.get("wall_s"), s.get("config_hash"), s.get("output_hash")]
                for n, s in p.get("stages", {}).items()]  # fmt: skip
        out.append(_table(rows, ["stage", "status", "wall s", "config hash", "output hash"]))
        out.append(f"<pre>{html.escape(yaml.safe_dump(p.get('config', {}), sort_keys=False))}</pre>")
    for cfg in sorted(run.glob("*/config.yaml")):
        out.append(f"<details><summary>{html.escape(str(cfg.relative_to(run)))}</summary>"
                   f"<pre>{html.escape(cfg.read_text())}</pre></details>")  # fmt: skip
    return "".join(out) or _missing("Configs")


STYLE = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%;margin:.4em 0;display:block}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:85%}.missing{color:#888}h2{border-bottom:1px solid #ddd}"""


def utility_section(run: Path) -> str:
    """Utility annotation (paper 2): each mode against the human positives of held-out questions, beside the
    relevance judge and top-k baselines, and how often the annotator's replies failed to parse."""
    summary = _json(run / "utility-eval" / "summary.json")
    if not summary:
        return _missing("utility annotation (pipeline section `utility`)")
    out = [f"<p>{html.escape(summary['caption'])}</p>"]
    out.append(_table([[r["what"], r["precision"], r["recall"], r["f1"], r["f1_per_question"], _ci(r["f1_ci"]),
                        r["positives_per_question"]] for r in summary["rows"].values()],
                      ["labels", "P", "R", "F1", "F1 per question", "95% CI", "positives / question"]))  # fmt: skip
    out.append(_table([[m, a.get("parse_fail_rate"), a.get("questions_per_s"), a.get("passages_per_s"),
                        html.escape(str(a.get("prompt_version")))] for m, a in summary["annotation"].items()],
                      ["mode", "parse failures (of windows)", "questions/s", "passages/s", "prompt"]))  # fmt: skip
    if (run / "utility-eval" / "f1.png").exists():
        out.append(_img(run / "utility-eval" / "f1.png", "F1 per question of each utility label source"))
    return "".join(out)


def rag_section(run: Path) -> str:
    """Paper 2's experiment: each retriever's top k given to a generator, answers scored on held-out questions,
    between the closed-book floor and the gold-passage ceiling."""
    summary = _json(run / "rag-eval" / "summary.json")
    if not summary:
        return _missing("RAG evaluation (pipeline section `rag`)")
    out = [f"<p>{html.escape(summary['caption'])}</p>"]
    out.append(_table([[r["name"], r["k"] if r["k"] is not None else "gold", r.get("supporting_recall"),
                        _ci(r.get("supporting_recall_ci95")), r.get("answer_in_context"),
                        _ci(r.get("answer_in_context_ci95")), r.get("em"), _ci(r.get("em_ci95")), r.get("f1"),
                        _ci(r.get("f1_ci95"))] for r in summary["rows"].values()],
                      ["retriever", "k", "supporting recall@k", "95% CI", "answer recall@k", "95% CI", "EM",
                       "95% CI", "F1", "95% CI"]))  # fmt: skip
    out += [f"<p>{html.escape(c)}</p>" for c in summary.get("comparisons", ())]
    out.append(
        f"<p>Generation with {html.escape(str(summary.get('generator')))}: {summary.get('answers_per_busy_s')} answers per "
        f"actor-second (steady), {summary.get('answers_per_s')} answers/s over the last run's wall time (start-up "
        "included).</p>"
    )
    if (run / "rag-eval" / "rag.png").exists():
        out.append(_img(run / "rag-eval" / "rag.png", "answer recall, EM and F1 per retriever"))
    return "".join(out)


SECTIONS = [("Data", data_section), ("Judge", judge_section), ("Annotation", annotation_section),
            ("Utility annotation", utility_section), ("Ranking", ranking_section),
            ("Retrieval and serving", serving_section), ("RAG", rag_section), ("Configs", configs_section)]  # fmt: skip

#: the pipeline stages behind each section: a section none of whose stages is in the pipeline is left out
SECTION_STAGES = {"Judge": ("judge", "annotate"), "Annotation": ("annotate", "annotate_pool"),
                  "Utility annotation": ("utility",), "Ranking": ("rankers",), "RAG": ("rag_eval",)}  # fmt: skip


def render(run: str | Path, title: str | None = None) -> str:
    run = Path(run)
    p = _json(run / "pipeline.json") or {}
    title = title or f"augrel report: {p.get('name', run.name)}"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
             f"<p>Run directory <code>{html.escape(str(run.resolve()))}</code>; written "
             f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}.</p>"]  # fmt: skip
    order = set(p.get("order", ()))
    for name, section in SECTIONS:
        if order and name in SECTION_STAGES and not order & set(SECTION_STAGES[name]):
            continue
        try:
            body = section(run)
        except Exception as e:  # a report with one broken section beats no report
            body = f'<p class="missing">could not render this section: {html.escape(repr(e))}</p>'
        parts.append(f"<h2>{name}</h2>{body}")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(run: str | Path, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    tmp = out / "index.html.tmp"
    tmp.write_text(render(run))
    tmp.replace(path)
    return path
