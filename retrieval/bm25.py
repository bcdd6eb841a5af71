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

    def __init__(self, retriever, docids: list[str], params: BM25Params, avgdl: float | None = None):
        self.retriever, self.docids, self.params = retriever, docids, params
        self.avgdl = avgdl  # mean indexed tokens per document: what scoring a text outside the corpus needs
        self._row = {d: i for i, d in enumerate(docids)}
        self._stemmer = _stemmer(params.stemmer)
        self._df: np.ndarray | None = None

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
        avgdl = float(np.mean([len(ids) for ids in tokens.ids])) if len(docids) else 0.0
        return cls(retriever, list(docids), params, avgdl)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.retriever.save(str(path))
        (path / "docids.json").write_text(json.dumps(self.docids))
        (path / "bm25.json").write_text(json.dumps({**asdict(self.params), "avgdl": self.avgdl}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> BM25Index:
        import bm25s

        path = Path(path)
        meta = json.loads((path / "bm25.json").read_text())
        avgdl = meta.pop("avgdl", None)
        return cls(bm25s.BM25.load(str(path)), json.loads((path / "docids.json").read_text()), BM25Params(**meta),
                   avgdl)  # fmt: skip

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

    def score_texts(self, query: str, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """BM25 score of ``query`` against texts that need not be in the corpus (the corpus' IDF and average
        length), and the 1-based rank each would take in the corpus. A corpus document's own text scores exactly
        as :meth:`score_pairs` scores its docid: a served ranker sees the features it was trained on.
        """
        if self.params.method != "lucene":
            raise ValueError(f"score_texts implements the lucene BM25 variant, not {self.params.method!r}")
        if self.avgdl is None:
            raise ValueError(
                "this BM25 index predates stored document lengths: rebuild it to score new texts"
            )
        if self._df is None:
            # the score matrix is stored token-major (CSC): a token's column holds one entry per document with it
            self._df = np.diff(np.asarray(self.retriever.scores["indptr"]))
        vocab, n = self.retriever.vocab_dict, len(self.docids)
        (q_tokens,) = self._tokens([query])
        q_ids = [vocab[t] for t in set(q_tokens) if t in vocab]
        df = self._df[q_ids].astype(np.float64)
        idf = np.log(1 + (n - df + 0.5) / (df + 0.5))
        k1, b = self.params.k1, self.params.b
        score = np.zeros(len(texts), dtype=np.float32)
        for i, d_tokens in enumerate(self._tokens([t or "" for t in texts])):
            if not q_ids:
                break
            counts: dict[int, int] = {}
            for t in d_tokens:
                if t in vocab:
                    counts[vocab[t]] = counts.get(vocab[t], 0) + 1
            tf = np.array([counts.get(q, 0) for q in q_ids], dtype=np.float64)
            norm = k1 * (1 - b + b * len(d_tokens) / max(self.avgdl, 1e-9))
            score[i] = float((idf * tf / (tf + norm)).sum())
        order = np.sort(self.scores(query))[::-1]
        rank = (1 + np.searchsorted(-order, -score, side="left")).astype(np.int32)
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
