"""Ranking metrics on ir_measures, per query, and paired significance between two runs (no Ray here).

Measures: NDCG@10 and NDCG@100 on the graded labels; MRR@10 and Recall@100 with relevance >= ``min_rel``
(default 2, TREC DL's rule for binary measures). Rule for queries: a query is scored only if the qrels give it at
least one document with relevance >= ``min_rel``: a query without a relevant document has no defined reciprocal rank or
recall, and counting it as 0 would blur the comparison between systems. A run's documents without a qrels
entry count as non-relevant (ir_measures' convention).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("augrel")


def measure_names(min_rel: int = 2) -> tuple[str, ...]:
    """The reported measures in ir_measures' syntax, binary ones counting grade >= ``min_rel`` relevant."""
    return ("nDCG@10", "nDCG@100", f"RR(rel={min_rel})@10", f"R(rel={min_rel})@100")


MEASURE_NAMES = measure_names(2)
_SHORT_STEM = {"nDCG": "ndcg", "RR": "mrr", "R": "recall"}


def short_name(measure: str) -> str:
    """``nDCG@10`` -> ``ndcg10``, ``RR(rel=1)@10`` -> ``mrr10``: the column names of metrics.json and tables."""
    stem, _, cutoff = str(measure).partition("@")
    return _SHORT_STEM.get(stem.split("(")[0], stem) + cutoff


Qrels = Mapping[str, Mapping[str, int]]  # qid -> docid -> grade
Run = Mapping[str, Mapping[str, float]]  # qid -> docid -> score


@dataclass
class RankingReport:
    per_query: dict[str, dict[str, float]]  # measure -> qid -> value
    mean: dict[str, float]
    n_queries: int
    excluded: dict[str, int] = field(default_factory=dict)

    def table(self) -> str:
        return (
            "  ".join(f"{short_name(m)} {v:.4f}" for m, v in self.mean.items())
            + f"  ({self.n_queries} queries)"
        )


def scored_queries(qrels: Qrels, min_rel: int = 2) -> set[str]:
    return {q for q, docs in qrels.items() if any(g >= min_rel for g in docs.values())}


def evaluate_run(
    run: Run, qrels: Qrels, measures: Sequence[str] | None = None, min_rel: int = 2
) -> RankingReport:
    """Per-query and mean values of ``measures`` (default ``measure_names(min_rel)``) over the queries that have
    a document of grade >= ``min_rel``."""
    import ir_measures

    parsed = [ir_measures.parse_measure(m) for m in (measures or measure_names(min_rel))]
    scored = scored_queries(qrels, min_rel)
    in_run = set(run)
    excluded = {"queries_without_relevant": len(set(qrels) - scored),
                "run_queries_not_in_qrels": len(in_run - set(qrels)),
                "scored_queries_missing_from_run": len(scored - in_run)}  # fmt: skip
    if excluded["run_queries_not_in_qrels"] or excluded["scored_queries_missing_from_run"]:
        log.warning("run and qrels disagree on queries: %d run queries have no qrels, %d judged queries are not "
                    "in the run (scored as 0)", excluded["run_queries_not_in_qrels"],
                    excluded["scored_queries_missing_from_run"])  # fmt: skip
    q = {qid: dict(docs) for qid, docs in qrels.items() if qid in scored}
    r = {qid: {d: float(s) for d, s in docs.items()} for qid, docs in run.items() if qid in scored}
    per_query: dict[str, dict[str, float]] = {str(m): {qid: 0.0 for qid in q} for m in parsed}
    for metric in ir_measures.iter_calc(parsed, q, r):
        per_query[str(metric.measure)][metric.query_id] = float(metric.value)
    mean = {m: float(np.mean(list(v.values()))) if v else float("nan") for m, v in per_query.items()}
    return RankingReport(per_query, mean, len(q), excluded)


@dataclass
class PairedComparison:
    measure: str
    mean_a: float
    mean_b: float
    diff: float  # mean of b - a over shared queries
    ci95: tuple[float, float]  # bootstrap over queries
    p_ttest: float
    n_queries: int


def paired_compare(a: Mapping[str, float], b: Mapping[str, float], measure: str = "", n_boot: int = 2000,
                   seed: int = 0) -> PairedComparison:  # fmt: skip
    """Paired t-test and a bootstrap 95% interval (over queries) of mean(b - a), on the queries both runs have."""
    from scipy.stats import ttest_rel

    shared = sorted(set(a) & set(b))
    if len(shared) < 2:
        raise ValueError(f"{measure}: need at least 2 shared queries, got {len(shared)}")
    va, vb = np.array([a[q] for q in shared]), np.array([b[q] for q in shared])
    d = vb - va
    boots = np.concatenate([d[i].mean(axis=1) for i in bootstrap_resamples(len(d), n_boot, seed)])
    p = float(ttest_rel(vb, va).pvalue) if np.any(d != 0) else 1.0
    return PairedComparison(measure, float(va.mean()), float(vb.mean()), float(d.mean()),
                            (float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))), p, len(shared))  # fmt: skip


#: resampled values held at once by a bootstrap (8 bytes each): 100k questions x 2,000 resamples drawn in one
#: array would be 1.6 GB of indices, so resamples are drawn in chunks; the same seed gives the same draws.
BOOTSTRAP_CHUNK_VALUES = 1 << 22


def bootstrap_resamples(n: int, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Row indices of ``n_boot`` resamples with replacement of ``n`` items, a (chunk, n) array at a time: memory
    stays bounded whatever ``n``, and the draws are those of one (n_boot, n) call with the same seed."""
    rng = np.random.default_rng(seed)
    step = max(1, BOOTSTRAP_CHUNK_VALUES // max(1, n))
    for start in range(0, n_boot, step):
        yield rng.integers(0, n, size=(min(step, n_boot - start), n))


def bootstrap_ci(values: Iterable[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    v = np.asarray(list(values), dtype=np.float64)
    if len(v) == 0:
        return (float("nan"), float("nan"))
    boots = np.concatenate([v[idx].mean(axis=1) for idx in bootstrap_resamples(len(v), n_boot, seed)])
    return float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def run_from_scores(
    qids: Sequence[str], docids: Sequence[str], scores: Sequence[float]
) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    for q, d, s in zip(qids, docids, scores, strict=True):
        run.setdefault(str(q), {})[str(d)] = float(s)
    return run


def qrels_from_labels(
    qids: Sequence[str], docids: Sequence[str], labels: Sequence[int]
) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for q, d, g in zip(qids, docids, labels, strict=True):
        if g is not None:
            qrels.setdefault(str(q), {})[str(d)] = int(g)
    return qrels
