"""How well a set of selected passages matches gold positives, per question (no Ray here).

Paper 2 reports annotation quality as precision and recall of the annotator's positives against the human
positives, and positives per question. Here, for each question with at least one gold positive:

- micro precision / recall / F1 over all (question, passage) pairs: the paper's figures;
- the mean over questions of per-question F1 (a question whose selection is empty has precision 0 by
  convention here, so selecting nothing is never rewarded), with a 95% bootstrap interval over questions
  (pairs of one question are not independent);
- positives per question.

Only the candidates the gold labels know are counted: a selected passage without a gold label is not a false
positive of unknown truth, it is left out (and counted, ``unlabelled_selected``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from eval.ranking import bootstrap_resamples


@dataclass
class SelectionQuality:
    precision: float
    recall: float
    f1: float
    f1_per_question: float
    f1_ci: tuple[float, float]
    positives_per_question: float
    gold_per_question: float
    questions: int
    pairs: int
    unlabelled_selected: int

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def selection_quality(
    selected: Iterable[tuple[str, str, bool]],
    gold: Mapping[str, Mapping[str, bool]],
    n_boot: int = 1000,
    seed: int = 0,
) -> SelectionQuality:
    """``selected``: (qid, docid, is selected) rows; ``gold``: qid -> docid -> is a positive. Scored over the
    questions that have a gold positive and at least one labelled candidate in ``selected``."""
    per_q: dict[str, list[tuple[bool, bool]]] = {}
    unlabelled = 0
    for qid, docid, sel in selected:
        g = gold.get(qid, {})
        if docid not in g:
            unlabelled += int(bool(sel))
            continue
        per_q.setdefault(qid, []).append((bool(sel), bool(g[docid])))
    qids = sorted(q for q, rows in per_q.items() if any(gp for _, gp in rows))
    if not qids:
        nan = float("nan")
        return SelectionQuality(nan, nan, nan, nan, (nan, nan), nan, nan, 0, 0, unlabelled)
    tp = np.array([sum(s and g for s, g in per_q[q]) for q in qids], dtype=np.float64)
    sel = np.array([sum(s for s, _ in per_q[q]) for q in qids], dtype=np.float64)
    pos = np.array([sum(g for _, g in per_q[q]) for q in qids], dtype=np.float64)
    p_q = np.divide(tp, sel, out=np.zeros_like(tp), where=sel > 0)
    r_q = tp / pos
    f1_q = np.array([_f1(p, r) for p, r in zip(p_q, r_q, strict=True)])
    precision = float(tp.sum() / sel.sum()) if sel.sum() else 0.0
    recall = float(tp.sum() / pos.sum())
    boots = (np.concatenate([f1_q[i].mean(axis=1) for i in bootstrap_resamples(len(qids), n_boot, seed)])
             if len(qids) > 1 else f1_q)  # fmt: skip
    return SelectionQuality(
        precision=precision, recall=recall, f1=_f1(precision, recall), f1_per_question=float(f1_q.mean()),
        f1_ci=(float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))),
        positives_per_question=float(sel.mean()), gold_per_question=float(pos.mean()), questions=len(qids),
        pairs=sum(len(per_q[q]) for q in qids), unlabelled_selected=unlabelled,
    )  # fmt: skip


def top_k_selection(
    qids: Sequence[str], docids: Sequence[str], scores: Sequence[float], k: int
) -> list[tuple[str, str, bool]]:
    """(qid, docid, selected) with the ``k`` highest-scoring passages of each question selected (a baseline:
    cosine or BM25 top-k). Ties broken by input order."""
    order: dict[str, list[tuple[float, int]]] = {}
    for i, (q, s) in enumerate(zip(qids, scores, strict=True)):
        order.setdefault(q, []).append((-float(s), i))
    chosen = {i for rows in order.values() for _, i in sorted(rows)[:k]}
    return [(q, d, i in chosen) for i, (q, d) in enumerate(zip(qids, docids, strict=True))]
