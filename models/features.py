"""Learning-to-rank features of a (query, document) pair (no Ray here).

Each feature is a named float column; ``FEATURES`` fixes their order, so a ranker trained on one table scores
another the same way. The judge's expected grade is available as a feature but off by default: it leaks the
labeller into the ranker, so a ranker trained on judge labels with it is partly grading the judge.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

#: name -> what it is
FEATURE_DOCS = {
    "bm25": "BM25 score of the pair (bm25s, Lucene variant, k1 0.9, b 0.4, stemmed, stop words removed)",
    "bm25_rank": "log2 of the document's 1-based BM25 rank in the whole corpus for the query",
    "dense_cos": "cosine of the query and document MiniLM embeddings",
    "query_len": "query length in words",
    "doc_len": "log(1 + document length in words)",
    "overlap": "share of the query's distinct words found in the document (lower-cased)",
    "title_overlap": "share of the query's distinct words found in the title (0 without a title)",
    "judge_score": "the LLM judge's expected grade (leaks the labeller: off unless asked for)",
}
FEATURES = ("bm25", "bm25_rank", "dense_cos", "query_len", "doc_len", "overlap", "title_overlap")
JUDGE_FEATURE = "judge_score"

_WORD = re.compile(r"\w+")


def _words(text: str | None) -> list[str]:
    return _WORD.findall((text or "").lower())


def lexical_features(queries: Sequence[str], texts: Sequence[str | None],
                     titles: Sequence[str | None] | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """query_len, doc_len, overlap, title_overlap for parallel sequences of queries and documents."""
    n = len(queries)
    titles = titles if titles is not None else [None] * n
    out = {k: np.zeros(n, dtype=np.float32) for k in ("query_len", "doc_len", "overlap", "title_overlap")}
    for i, (q, d, t) in enumerate(zip(queries, texts, titles, strict=True)):
        qw, dw = _words(q), _words(d)
        qs = set(qw)
        out["query_len"][i] = len(qw)
        out["doc_len"][i] = np.log1p(len(dw))
        out["overlap"][i] = len(qs & set(dw)) / len(qs) if qs else 0.0
        out["title_overlap"][i] = len(qs & set(_words(t))) / len(qs) if qs and t else 0.0
    return out


def check_finite(matrix: np.ndarray, names: Sequence[str]) -> None:
    """Raise ValueError naming the first feature with a NaN or infinite value (LightGBM would treat NaN as missing)."""
    bad = ~np.isfinite(matrix)
    if bad.any():
        col = int(np.flatnonzero(bad.any(axis=0))[0])
        rows = int(bad[:, col].sum())
        raise ValueError(f"feature '{names[col]}' has {rows} NaN or infinite value(s) (first at row "
                         f"{int(np.flatnonzero(bad[:, col])[0])})")  # fmt: skip
