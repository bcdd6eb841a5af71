"""Two judges on the same pairs (before and after a retrain, two prompts, two base models): how far apart they
are, where, and which one humans side with (no Ray).

``align`` matches two judgments tables on (qid, docid); ``diff_judges`` takes the aligned arrays and returns one
JSON-ready dict: agreement between A and B (Cohen's kappa, quadratic weighted kappa, with 95% bootstrap
intervals over queries), the share of labels changed, each judge's label distribution and the shift, the grade
transition matrix, per-query changes, the pairs that moved most and, where the pairs carry human grades, each
judge's kappa with the humans and the paired difference B - A (same query resamples for both, so "is B better"
has an interval). ``render_html`` turns that dict into one self-contained page in the report's style.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np

from eval.agreement import _kappa, agreement, query_resamples
from eval.report import STYLE, _ci, _table


def align(
    keys_a: Sequence[tuple[str, str]], keys_b: Sequence[tuple[str, str]]
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Row indices of the (qid, docid) keys both sides judged, in A's order, and what was left out.

    A key judged twice on one side keeps its first judgment; the other copies are counted, not used.
    """
    first_b: dict[tuple[str, str], int] = {}
    dup_b = 0
    for i, k in enumerate(keys_b):
        if k in first_b:
            dup_b += 1
        else:
            first_b[k] = i
    seen: set[tuple[str, str]] = set()
    ia, ib = [], []
    dup_a = only_a = 0
    for i, k in enumerate(keys_a):
        if k in seen:
            dup_a += 1
            continue
        seen.add(k)
        j = first_b.get(k)
        if j is None:
            only_a += 1
        else:
            ia.append(i)
            ib.append(j)
    dropped = {
        "only_in_a": only_a,
        "only_in_b": len(first_b) - len(ia),
        "duplicates_in_a": dup_a,
        "duplicates_in_b": dup_b,
    }
    return np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64), dropped


def _weights(g: int, weighting: str | None) -> np.ndarray:
    i, j = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    if weighting == "quadratic":
        return (i - j) ** 2 / max((g - 1) ** 2, 1)
    return (i != j).astype(float)


def _kappa_cm(cm: np.ndarray, w: np.ndarray) -> float:
    """Cohen's kappa from a confusion matrix with disagreement weights ``w`` (sklearn's formula). The bootstrap
    evaluates thousands of these: a bincount matrix is ~100x faster than cohen_kappa_score on each resample."""
    n = cm.sum()
    if n == 0:
        return float("nan")
    expected = np.outer(cm.sum(1), cm.sum(0)) / n
    denom = float((w * expected).sum())
    return 1.0 - float((w * cm).sum()) / denom if denom > 0 else float("nan")


def _confusion(x_idx: np.ndarray, y_idx: np.ndarray, g: int) -> np.ndarray:
    return np.bincount(x_idx * g + y_idx, minlength=g * g).reshape(g, g).astype(float)


def _interval(values: list[float]) -> list[float] | None:
    v = [x for x in values if not np.isnan(x)]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None


def _grade_index(label: np.ndarray, grades: list[int], name: str) -> np.ndarray:
    unknown = sorted(set(np.unique(label).tolist()) - set(grades))
    if unknown:
        raise ValueError(f"{name}: grades {unknown} are not among grades {grades}")
    lookup = {g: i for i, g in enumerate(grades)}
    return np.asarray([lookup[int(x)] for x in label], dtype=np.int64)


def _fmt_opt(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else v


def diff_judges(
    qid: Sequence[str],
    docid: Sequence[str],
    label_a: Sequence[int],
    score_a: Sequence[float],
    label_b: Sequence[int],
    score_b: Sequence[float],
    grades: Sequence[int] = (0, 1, 2, 3),
    human: Sequence[float | None] | None = None,
    query: Sequence[str | None] | None = None,
    text: Sequence[str | None] | None = None,
    top: int = 20,
    n_boot: int = 1000,
    seed: int = 0,
    dropped: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Every figure of ``augrel judge diff`` over aligned pairs (``align`` gives the rows).

    Args:
        human: the human grade per pair, None/NaN where there is none (then that pair is left out of the
            human comparison only).
        query, text: shown beside the pairs that moved most (optional).
        top: how many of the most-moved pairs to list.
        n_boot: bootstrap resamples over queries for every 95% interval (0: none).
        dropped: what ``align`` left out, carried into the result.
    """
    q = np.asarray(qid).astype(str)
    d = np.asarray(docid).astype(str)
    la, lb = np.asarray(label_a, dtype=np.int64), np.asarray(label_b, dtype=np.int64)
    sa, sb = np.asarray(score_a, dtype=float), np.asarray(score_b, dtype=float)
    n = len(q)
    if not (len(d) == len(la) == len(sa) == len(lb) == len(sb) == n):
        raise ValueError("qid, docid, label_a, score_a, label_b and score_b must have the same length")
    if n == 0:
        raise ValueError("no pairs that both judges judged")
    grades = sorted(int(g) for g in grades)
    g = len(grades)
    ia, ib = _grade_index(la, grades, "label_a"), _grade_index(lb, grades, "label_b")
    changed = la != lb
    shift = sb - sa
    w_plain, w_quad = _weights(g, None), _weights(g, "quadratic")

    # A as the reference: the confusion matrix is the transition matrix (rows A grade, columns B grade).
    ab = agreement(la, lb, sb, q, grades, n_boot=0)
    point = {
        "cohen_kappa": _kappa(la, lb, grades),
        "weighted_kappa_quadratic": _kappa(la, lb, grades, "quadratic"),
        "krippendorff_alpha_ordinal": ab.metrics["krippendorff_alpha_ordinal"],
        "changed": float(changed.mean()),
        "mean_score_shift": float(shift.mean()),
        "mean_label_shift": float((lb - la).mean()),
    }
    boot: dict[str, list[float]] = {k: [] for k in ("cohen_kappa", "weighted_kappa_quadratic", "changed",
                                                     "mean_score_shift", "mean_label_shift")}  # fmt: skip
    for idx in query_resamples(q, n_boot, seed):
        cm = _confusion(ia[idx], ib[idx], g)
        boot["cohen_kappa"].append(_kappa_cm(cm, w_plain))
        boot["weighted_kappa_quadratic"].append(_kappa_cm(cm, w_quad))
        boot["changed"].append(float(changed[idx].mean()))
        boot["mean_score_shift"].append(float(shift[idx].mean()))
        boot["mean_label_shift"].append(float((lb[idx] - la[idx]).mean()))
    ci = {k: c for k, v in boot.items() if (c := _interval(v))}
    point = {k: _fmt_opt(v) for k, v in point.items()}  # JSON null, not NaN, where a kappa is undefined

    count_a = np.bincount(ia, minlength=g)
    count_b = np.bincount(ib, minlength=g)
    distribution = {
        str(gr): {
            "a": int(count_a[i]),
            "b": int(count_b[i]),
            "a_share": float(count_a[i] / n),
            "b_share": float(count_b[i] / n),
            "shift": float((count_b[i] - count_a[i]) / n),
        }
        for i, gr in enumerate(grades)
    }

    queries = np.asarray(query, dtype=object) if query is not None else None
    per_query = []
    for u in np.unique(q):
        m = q == u
        per_query.append({
            "qid": str(u),
            "query": _fmt_opt(queries[m][0]) if queries is not None else None,
            "pairs": int(m.sum()),
            "changed": int(changed[m].sum()),
            "up": int((lb[m] > la[m]).sum()),
            "down": int((lb[m] < la[m]).sum()),
            "mean_score_shift": float(shift[m].mean()),
            "mean_label_shift": float((lb[m] - la[m]).mean()),
        })  # fmt: skip
    per_query.sort(key=lambda r: (-abs(r["mean_score_shift"]), -r["changed"], r["qid"]))

    # most moved first: |score shift|, then |label change|, then ids. Shifts are rounded (scores are float32)
    # so equal moves tie instead of being ordered by rounding noise.
    order = np.lexsort((d, q, -np.abs(lb - la), -np.round(np.abs(shift), 5)))[: max(top, 0)]
    texts = np.asarray(text, dtype=object) if text is not None else None
    moved = [
        {
            "qid": str(q[i]),
            "docid": str(d[i]),
            "label_a": int(la[i]),
            "label_b": int(lb[i]),
            "score_a": float(sa[i]),
            "score_b": float(sb[i]),
            "score_shift": float(shift[i]),
            "query": _fmt_opt(queries[i]) if queries is not None else None,
            "text": _fmt_opt(texts[i]) if texts is not None else None,
        }
        for i in order
    ]

    out: dict[str, Any] = {
        "pairs": n,
        "queries": len(np.unique(q)),
        "dropped": dict(dropped or {}),
        "grades": grades,
        "agreement": point,
        "ci95": ci,
        "changed": {"pairs": int(changed.sum()), "up": int((lb > la).sum()), "down": int((lb < la).sum())},
        "distribution": distribution,
        "mean_label": {"a": float(la.mean()), "b": float(lb.mean())},
        "mean_score": {"a": float(sa.mean()), "b": float(sb.mean())},
        "transitions": ab.confusion,
        "per_query": per_query,
        "top_moved": moved,
        "bootstrap": n_boot,
        "human": _human_comparison(q, ia, ib, human, grades, n_boot, seed) if human is not None else None,
    }
    return out


def _human_comparison(
    q: np.ndarray,
    ia: np.ndarray,
    ib: np.ndarray,
    human: Sequence[float | None],
    grades: list[int],
    n_boot: int,
    seed: int,
) -> dict[str, Any] | None:
    """Each judge's kappa with the human grades, and B - A on the same query resamples (paired)."""
    h = np.asarray([np.nan if v is None else v for v in human], dtype=float)
    has = ~np.isnan(h)
    if not has.any():
        return None
    g = len(grades)
    hq, hi = q[has], _grade_index(h[has].astype(np.int64), grades, "human")
    a, b = ia[has], ib[has]
    figures: dict[str, Any] = {"pairs": int(has.sum()), "queries": len(np.unique(hq))}
    for name, weighting in (("cohen_kappa", None), ("weighted_kappa_quadratic", "quadratic")):
        w = _weights(g, weighting)
        ka, kb = _kappa_cm(_confusion(hi, a, g), w), _kappa_cm(_confusion(hi, b, g), w)
        samples: dict[str, list[float]] = {"a": [], "b": [], "diff": []}
        for idx in query_resamples(hq, n_boot, seed):
            xa, xb = (
                _kappa_cm(_confusion(hi[idx], a[idx], g), w),
                _kappa_cm(_confusion(hi[idx], b[idx], g), w),
            )
            samples["a"].append(xa)
            samples["b"].append(xb)
            samples["diff"].append(xb - xa)
        diff_ci = _interval(samples["diff"])
        if diff_ci is None:
            verdict = "no interval (fewer than two queries with human grades)"
        elif diff_ci[0] > 0:
            verdict = "B agrees better with the humans"
        elif diff_ci[1] < 0:
            verdict = "A agrees better with the humans"
        else:
            verdict = "no clear difference (the interval includes 0)"
        figures[name] = {
            "a": _fmt_opt(ka),
            "a_ci95": _interval(samples["a"]),
            "b": _fmt_opt(kb),
            "b_ci95": _interval(samples["b"]),
            "diff": _fmt_opt(kb - ka),
            "diff_ci95": diff_ci,
            "verdict": verdict,
        }
    return figures


def audit_entry(diff: dict[str, Any], against: str, at: str) -> dict[str, Any]:
    """The summary a judge card keeps of one diff (``JudgeCard.audit["diffs"]``)."""
    entry = {
        "against": against,
        "pairs": diff["pairs"],
        "kappa_ab": _fmt_opt(diff["agreement"]["cohen_kappa"]),
        "kappa_ab_ci95": diff["ci95"].get("cohen_kappa"),
        "weighted_kappa_ab": _fmt_opt(diff["agreement"]["weighted_kappa_quadratic"]),
        "changed": diff["agreement"]["changed"],
        "label_shift": {k: v["shift"] for k, v in diff["distribution"].items()},
        "mean_score_shift": diff["agreement"]["mean_score_shift"],
        "at": at,
    }
    if diff.get("human"):
        k = diff["human"]["cohen_kappa"]
        entry["human_kappa"] = {"a": k["a"], "b": k["b"], "diff": k["diff"], "diff_ci95": k["diff_ci95"]}
    return entry


# ------------------------------------------------------------------------------------------------ HTML

PAGE_STYLE = (
    STYLE
    + """
td.heat{text-align:center;min-width:4em}.bar{height:.8em;display:inline-block;vertical-align:middle}
.bar.a{background:#4C72B0}.bar.b{background:#DD8452}td.text{text-align:left;max-width:34em;font-size:90%}
.up{color:#2a7a2a}.down{color:#b03030}.note{color:#555}"""
)


def _num(v: Any, fmt: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    return format(v, fmt)


def _html_table(rows: list[list[str]], head: list[str]) -> str:
    """Like the report's table, for cells that are already HTML (bars, coloured cells)."""
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in r) + "</tr>"
                   for r in rows)  # fmt: skip
    return (
        "<table><thead><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + f"</tr></thead><tbody>{body}</tbody></table>"
    )


def _signed(v: float, fmt: str = "+.3f") -> str:
    cls = "up" if v > 0 else "down" if v < 0 else ""
    return f'<span class="{cls}">{format(v, fmt)}</span>'


def render_html(diff: dict[str, Any], name_a: str, name_b: str, title: str | None = None) -> str:
    """One self-contained page (inline CSS, no scripts, no images) of a ``diff_judges`` result."""
    e = html.escape
    title = title or f"judge diff: {name_a} vs {name_b}"
    agr, ci = diff["agreement"], diff["ci95"]
    dropped = {k: v for k, v in (diff.get("dropped") or {}).items() if v}
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<style>{PAGE_STYLE}</style></head><body><h1>{e(title)}</h1>",
        f"<p><b>A</b> <code>{e(name_a)}</code><br><b>B</b> <code>{e(name_b)}</code></p>",
        f"<p>{diff['pairs']:,} pairs of {diff['queries']:,} queries judged by both"
        + (
            "; left out: " + ", ".join(f"{e(k.replace('_', ' '))} {v:,}" for k, v in dropped.items())
            if dropped
            else ""
        )
        + f". 95% intervals: bootstrap over queries ({diff['bootstrap']} resamples)"
        + (f"; with {diff['queries']} queries they are rough" if diff["queries"] < 10 else "")
        + ".</p>",
        "<h2>Agreement between A and B</h2>",
        _table(
            [
                ["Cohen's kappa", _num(agr["cohen_kappa"], ".4f"), _ci(ci.get("cohen_kappa"))],
                [
                    "quadratic weighted kappa",
                    _num(agr["weighted_kappa_quadratic"], ".4f"),
                    _ci(ci.get("weighted_kappa_quadratic")),
                ],
                ["Krippendorff's alpha (ordinal)", _num(agr["krippendorff_alpha_ordinal"], ".4f"), ""],
                ["labels changed (share)", _num(agr["changed"], ".4f"), _ci(ci.get("changed"))],
                [
                    "mean label shift (B - A)",
                    _num(agr["mean_label_shift"], ".4f"),
                    _ci(ci.get("mean_label_shift")),
                ],
                [
                    "mean expected-grade shift (B - A)",
                    _num(agr["mean_score_shift"], ".4f"),
                    _ci(ci.get("mean_score_shift")),
                ],
            ],
            ["A vs B", "value", "95% CI"],
        ),
        f"<p>{diff['changed']['pairs']:,} labels changed: {diff['changed']['up']:,} up, "
        f"{diff['changed']['down']:,} down.</p>",
    ]
    h = diff.get("human")
    if h:
        parts.append("<h2>Against the human grades</h2>")
        parts.append(f"<p>{h['pairs']:,} of the pairs ({h['queries']} queries) carry a human grade. B - A is "
                     "paired: both kappas on the same query resamples.</p>")  # fmt: skip
        rows = []
        for key, label in (("cohen_kappa", "Cohen's kappa"), ("weighted_kappa_quadratic", "weighted kappa")):
            k = h[key]
            rows.append([e(label), _num(k["a"]), _ci(k["a_ci95"]), _num(k["b"]), _ci(k["b_ci95"]),
                         _signed(k["diff"]) if k["diff"] is not None else "n/a", _ci(k["diff_ci95"]),
                         e(k["verdict"])])  # fmt: skip
        parts.append(_html_table(rows, ["with humans", "A", "95% CI", "B", "95% CI", "B - A", "95% CI",
                                        "reading"]))  # fmt: skip

    parts.append("<h2>Label distribution</h2>")
    peak = max(max(v["a_share"], v["b_share"]) for v in diff["distribution"].values()) or 1.0
    rows = []
    for grade, v in diff["distribution"].items():
        bars = (f'<span class="bar a" style="width:{8 * v["a_share"] / peak:.2f}em"></span> A<br>'
                f'<span class="bar b" style="width:{8 * v["b_share"] / peak:.2f}em"></span> B')  # fmt: skip
        rows.append([e(grade), f"{v['a']:,}", f"{v['a_share']:.1%}", f"{v['b']:,}", f"{v['b_share']:.1%}",
                     _signed(100 * v["shift"], "+.1f") + " pts", f'<td style="text-align:left">{bars}</td>'])  # fmt: skip
    parts.append(_html_table(rows, ["grade", "A pairs", "A share", "B pairs", "B share", "shift", ""]))

    parts.append("<h2>Grade transitions</h2><p>Rows: A's grade; columns: B's grade; each cell the pairs and "
                 "their share of the row (colour).</p>")  # fmt: skip
    grades = diff["grades"]
    rows = []
    for i, row in enumerate(diff["transitions"]):
        total = sum(row) or 1
        cells = [f"A {grades[i]}"]
        for j, c in enumerate(row):
            share = c / total
            style = f"background:rgba(76,114,176,{0.08 + 0.8 * share:.2f})" if c else ""
            style += ";font-weight:bold" if i == j else ""
            colour = ";color:white" if share > 0.6 else ""
            cells.append(f'<td class="heat" style="{style}{colour}">{c:,}<br><small>{share:.0%}</small></td>')
        cells.append(f"{sum(row):,}")
        rows.append(cells)
    parts.append(_html_table(rows, ["", *[f"B {g}" for g in grades], "pairs"]))

    parts.append("<h2>Per query</h2><p>Sorted by the size of the mean expected-grade shift.</p>")
    parts.append(_html_table(
        [[e(r["qid"]), f'<td class="text">{e(r["query"] or "")}</td>', f"{r['pairs']:,}", f"{r['changed']:,}",
          f"{r['up']:,}", f"{r['down']:,}", _signed(r["mean_score_shift"]), _signed(r["mean_label_shift"])]
         for r in diff["per_query"]],
        ["qid", "query", "pairs", "changed", "up", "down", "mean score shift", "mean label shift"]))  # fmt: skip

    parts.append(f"<h2>The {len(diff['top_moved'])} pairs that moved most</h2>"
                 "<p>By the size of the expected-grade shift, then of the label change.</p>")  # fmt: skip
    rows = []
    for r in diff["top_moved"]:
        passage = r["text"] or ""
        short = passage if len(passage) <= 400 else passage[:400] + " ..."
        rows.append([e(r["qid"]), e(r["docid"]), f'<td class="text">{e(r["query"] or "")}</td>',
                     f'<td class="text">{e(short)}</td>', f"{r['label_a']} &rarr; {r['label_b']}",
                     f"{r['score_a']:.2f} &rarr; {r['score_b']:.2f}", _signed(r["score_shift"], "+.2f")])  # fmt: skip
    parts.append(
        _html_table(rows, ["qid", "docid", "query", "passage", "label A → B", "score A → B", "shift"])
    )
    parts.append("</body></html>")
    return "".join(parts)
