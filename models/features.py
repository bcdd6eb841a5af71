"""Learning-to-rank features of a (query, document) pair (no Ray here).

Each feature is a named float column; ``FEATURES`` fixes their order, so a ranker trained on one table scores
another the same way. The judge's expected grade is available as a feature but off by default: it leaks the
labeller into the ranker, so a ranker trained on judge labels with it is partly grading the judge.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

#: name -> what it is
FEATURE_DOCS = {
    "bm25": "BM25 score of the pair (bm25s, Lucene variant, k1 0.9, b 0.4, stemmed, stop words removed)",
    "bm25_rank": "log2 of the document's 1-based BM25 rank for the query: exact within the corpus' top "
    "rank_depth (1000) documents, rank_depth + 1 beyond (retrieval.bm25.rank_within_top)",
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


class PairFeaturizer:
    """The ``FEATURES`` of (query, document) pairs from a BM25 index and a dense encoder: one code path for the
    batch features stage and the served ranker, so a ranker is scored on the features it was trained on.

    Args:
        index: a ``retrieval.bm25.BM25Index`` over the corpus (``score_pairs`` by docid, ``score_texts`` by text).
        encoder: anything with ``encode_queries(texts)`` and ``encode_passages(texts) -> (n, dim)`` unit vectors
            (``models.encoder.BiEncoder``: queries and passages may take different prefixes and lengths).
        query_cache: queries whose embeddings are kept (a batch table repeats each query many times).
    """

    def __init__(self, index, encoder, query_cache: int = 4096):
        self.index, self.encoder, self.query_cache = index, encoder, query_cache
        # A server calls one featurizer from several threads (FastAPI runs sync routes in a thread pool): the
        # cache is read and trimmed under a lock, and the encoder runs under another, because a fast tokenizer
        # shared by two threads fails with "Already borrowed" (huggingface/tokenizers#537).
        self._query_vec: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._encode_lock = threading.Lock()

    def encode_queries(self, texts: Sequence[str | None]) -> np.ndarray:
        """The encoder's query vectors, one caller at a time."""
        with self._encode_lock:
            return self.encoder.encode_queries(texts)

    def encode_passages(self, texts: Sequence[str | None]) -> np.ndarray:
        """The encoder's passage vectors, one caller at a time."""
        with self._encode_lock:
            return self.encoder.encode_passages(texts)

    def _query_vectors(self, queries: Sequence[str]) -> np.ndarray:
        distinct = list(dict.fromkeys(queries))
        with self._cache_lock:
            batch = {q: self._query_vec[q] for q in distinct if q in self._query_vec}
            for q in batch:
                self._query_vec.move_to_end(q)
        new = [q for q in distinct if q not in batch]
        if new:
            batch.update(
                zip(new, self.encode_queries(new), strict=True)
            )  # outside the cache lock: encoding is slow
            with self._cache_lock:
                self._query_vec.update((q, batch[q]) for q in new)
                while len(self._query_vec) > self.query_cache:
                    self._query_vec.popitem(last=False)  # least recently used
        return np.stack([batch[q] for q in queries])

    def __call__(self, queries: Sequence[str], texts: Sequence[str | None], docids: Sequence[str] | None = None,
                 titles: Sequence[str | None] | None = None,
                 doc_vectors: np.ndarray | None = None) -> dict[str, np.ndarray]:  # fmt: skip
        """Feature name -> float32 array, one value per pair. With ``docids``, BM25 reads the indexed document
        of that id (the corpus' own text); without, it scores the given text with the corpus' statistics.
        ``doc_vectors``: the documents' embeddings when already known (an index stores them), else encoded."""
        n = len(queries)
        bm25, rank = np.zeros(n, np.float32), np.ones(n, np.int32)
        by_query: dict[str, list[int]] = {}
        for i, q in enumerate(queries):
            by_query.setdefault(q, []).append(i)
        for q, idx in by_query.items():
            if docids is not None:
                s, r = self.index.score_pairs(q, [docids[i] for i in idx])
            else:
                s, r = self.index.score_texts(q, [texts[i] for i in idx])
            bm25[idx], rank[idx] = s, r
        dvec = self.encode_passages(texts) if doc_vectors is None else np.asarray(doc_vectors, np.float32)
        qvec = self._query_vectors(queries) if n else dvec
        return {"bm25": bm25, "bm25_rank": np.log2(rank.astype(np.float32)),
                "dense_cos": (qvec * dvec).sum(1).astype(np.float32),
                **lexical_features(queries, texts, titles)}  # fmt: skip
