"""BM25 over a docs table with bm25s (English stop words, Snowball stemming): first-stage candidates and the
BM25 score of any (query, doc) pair, for ranking features and the BM25 baseline.

The index is a directory (``bm25s`` arrays + ``docids.json`` + ``bm25.json`` with its parameters), built once per
corpus and loaded by every feature actor.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class BM25Params:
    k1: float = 0.9  # Anserini's MS MARCO passage defaults
    b: float = 0.4
    method: str = "lucene"
    stemmer: str | None = "english"
    stopwords: str | None = "en"


class BM25Index:
    """A bm25s index with its docids, searchable by query text."""

    def __init__(self, retriever, docids: list[str], params: BM25Params):
        self.retriever, self.docids, self.params = retriever, docids, params
        self._row = {d: i for i, d in enumerate(docids)}
        self._stemmer = _stemmer(params.stemmer)

    @classmethod
    def build(
        cls, docids: Sequence[str], texts: Sequence[str], params: BM25Params = BM25Params()
    ) -> BM25Index:
        import bm25s

        if len(docids) != len(texts):
            raise ValueError(f"{len(docids)} docids but {len(texts)} texts")
        if len(set(docids)) != len(docids):
            raise ValueError("docids are not unique")
        tokens = bm25s.tokenize([t or "" for t in texts], stopwords=params.stopwords,
                                stemmer=_stemmer(params.stemmer), show_progress=False)  # fmt: skip
        retriever = bm25s.BM25(k1=params.k1, b=params.b, method=params.method)
        retriever.index(tokens, show_progress=False)
        return cls(retriever, list(docids), params)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.retriever.save(str(path))
        (path / "docids.json").write_text(json.dumps(self.docids))
        (path / "bm25.json").write_text(json.dumps(asdict(self.params)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> BM25Index:
        import bm25s

        path = Path(path)
        params = BM25Params(**json.loads((path / "bm25.json").read_text()))
        return cls(bm25s.BM25.load(str(path)), json.loads((path / "docids.json").read_text()), params)

    def _tokens(self, queries: Sequence[str]):
        import bm25s

        return bm25s.tokenize(list(queries), stopwords=self.params.stopwords, stemmer=self._stemmer,
                              show_progress=False, return_ids=False)  # fmt: skip

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of ``query`` against every document, in docid order (0 where no term matches)."""
        (tokens,) = self._tokens([query])
        return np.asarray(self.retriever.get_scores(tokens), dtype=np.float32)

    def score_pairs(self, query: str, docids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """BM25 score and 1-based rank in the whole corpus of each docid for ``query`` (unknown docids: 0, n+1)."""
        all_scores = self.scores(query)
        # rank = 1 + number of documents scoring strictly higher (ties share the better rank)
        order = np.sort(all_scores)[::-1]
        rows = np.array([self._row.get(d, -1) for d in docids])
        score = np.where(rows >= 0, all_scores[np.maximum(rows, 0)], 0.0).astype(np.float32)
        rank = 1 + np.searchsorted(-order, -score, side="left")
        rank = np.where(rows >= 0, rank, len(self.docids) + 1).astype(np.int32)
        return score, rank

    def search(self, queries: Sequence[str], k: int = 100) -> list[list[tuple[str, float]]]:
        """Top-``k`` (docid, score) per query, best first; documents matching no query term are left out."""
        k = min(k, len(self.docids))
        out = []
        for q in queries:
            s = self.scores(q)
            top = np.argpartition(-s, k - 1)[:k] if k < len(s) else np.arange(len(s))
            top = top[np.argsort(-s[top], kind="stable")]
            out.append([(self.docids[i], float(s[i])) for i in top if s[i] > 0])
        return out


def _stemmer(language: str | None):
    if not language:
        return None
    import Stemmer

    return Stemmer.Stemmer(language).stemWords
