"""BM25 over a docs table with bm25s (English stop words, Snowball stemming): first-stage candidates and the
BM25 score of any (query, doc) pair, for ranking features and the BM25 baseline.

The index is a directory (``bm25s`` arrays, the docid lookup of ``retrieval.docstore.DocidIndex`` and
``bm25.json`` with its parameters), built once per corpus and loaded, memory-mapped, by every feature actor and
serving replica. Nothing here scores the whole corpus into a sorted list per query: retrieval is bm25s' top-k, a
pair's score is read from the index' token columns, and a document's rank is exact within the query's top
``rank_depth`` documents and ``rank_depth + 1`` beyond (``rank_within_top``: the one rule the features stage and
the served ranker share).
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from retrieval.docstore import DocidIndex


@dataclass(frozen=True)
class BM25Params:
    k1: float = 0.9  # Anserini's MS MARCO passage defaults
    b: float = 0.4
    method: str = "lucene"
    stemmer: str | None = "english"
    stopwords: str | None = "en"
    # bm25_rank is exact for the top rank_depth documents of a query, rank_depth + 1 beyond: a deeper rank
    # would need every document's score per query, and a ranker learns little from rank 5,000 vs 50,000
    rank_depth: int = 1000


def rank_within_top(scores: np.ndarray, top_scores: np.ndarray) -> np.ndarray:
    """1-based rank of documents scoring ``scores`` among a query's top documents ``top_scores`` (best first):
    1 + the number of top documents scoring strictly higher (ties share the better rank). Every document scoring
    more than a given one is in the top if that one scores at least the last top score, so the rank is the
    corpus rank there; below it, the rank is ``len(top_scores) + 1``."""
    desc = -np.asarray(top_scores, np.float32)
    return (1 + np.searchsorted(desc, -np.asarray(scores, np.float32), side="left")).astype(np.int32)


class BM25Index:
    """A bm25s index with its docids, searchable by query text."""

    def __init__(self, retriever, docids: Sequence[str] | DocidIndex, params: BM25Params,
                 avgdl: float | None = None, top_cache: int = 1024):  # fmt: skip
        self.retriever, self.params = retriever, params
        self.ids = docids if isinstance(docids, DocidIndex) else DocidIndex.build(docids)
        self.avgdl = avgdl  # mean indexed tokens per document: what scoring a text outside the corpus needs
        self._stemmer = _stemmer(params.stemmer)
        self._df: np.ndarray | None = None
        # a query's top documents, shared by retrieval and the rank feature of the same request (lru_cache
        # keeps its own state consistent across the threads a server runs requests on)
        self._top = functools.lru_cache(maxsize=top_cache)(self._top_uncached)

    @property
    def docids(self) -> list[str]:
        """Row -> docid, materialized (a list of the whole corpus: for tests and small corpora)."""
        return self.ids.docids.to_pylist()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def depth(self) -> int:
        """How many top documents per query ``bm25_rank`` sees exactly."""
        return min(self.params.rank_depth, len(self))

    @classmethod
    def build(
        cls, docids: Sequence[str], texts: Sequence[str], params: BM25Params = BM25Params()
    ) -> BM25Index:
        import bm25s

        if len(docids) != len(texts):
            raise ValueError(f"{len(docids)} docids but {len(texts)} texts")
        ids = DocidIndex.build(docids)  # refuses a duplicate, naming it
        tokens = bm25s.tokenize([t or "" for t in texts], stopwords=params.stopwords,
                                stemmer=_stemmer(params.stemmer), show_progress=False)  # fmt: skip
        retriever = bm25s.BM25(k1=params.k1, b=params.b, method=params.method)
        retriever.index(tokens, show_progress=False)
        avgdl = float(np.mean([len(ids) for ids in tokens.ids])) if len(docids) else 0.0
        return cls(retriever, ids, params, avgdl)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.retriever.save(str(path))
        self.ids.save(path)
        (path / "bm25.json").write_text(json.dumps({**asdict(self.params), "avgdl": self.avgdl}))
        return path

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> BM25Index:
        """``mmap``: the score arrays and docids stay on disk, shared by every process on the node."""
        import bm25s

        path = Path(path)
        meta = json.loads((path / "bm25.json").read_text())
        avgdl = meta.pop("avgdl", None)
        if DocidIndex.exists(path):
            ids = DocidIndex.load(path)
        else:  # an index written before the docid lookup existed
            ids = DocidIndex.build(json.loads((path / "docids.json").read_text()))
        return cls(bm25s.BM25.load(str(path), mmap=mmap, show_progress=False), ids, BM25Params(**meta), avgdl)

    def _tokens(self, queries: Sequence[str]):
        import bm25s

        return bm25s.tokenize(list(queries), stopwords=self.params.stopwords, stemmer=self._stemmer,
                              show_progress=False, return_ids=False)  # fmt: skip

    def _query_tokens(self, query: str) -> list[str]:
        """The query's indexed terms, repeats kept: none for a query of stop words, punctuation, one-character
        words or words no document has (such a query scores 0 against every document, whatever bm25s does with
        an empty token list)."""
        tokenized = self._tokens([query])
        vocab = self.retriever.vocab_dict
        return [t for t in (tokenized[0] if len(tokenized) else []) if t in vocab]

    def _query_ids(self, query: str) -> list[int]:
        """The query's token ids in the vocabulary, repeats kept (bm25s sums a repeated term once per repeat)."""
        tokens = self._query_tokens(query)
        return self.retriever.get_tokens_ids(tokens) if tokens else []

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of ``query`` against every document, in row order (0 where no term matches). O(corpus):
        for tests and offline analysis, never per served query."""
        tokens = self._query_tokens(query)
        if not tokens:
            return np.zeros(len(self), np.float32)
        return np.asarray(self.retriever.get_scores(tokens), dtype=np.float32)

    def _top_uncached(self, query: str, depth: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = self._query_tokens(query)
        if depth == 0 or not tokens:  # no indexed term: no document above another, so no top
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        rows, scores = self.retriever.retrieve([tokens], k=depth, show_progress=False, n_threads=0)
        rows, scores = np.asarray(rows[0], np.int64), np.asarray(scores[0], np.float32)
        order = np.lexsort((rows, -scores))  # ties in row order, so the same query retrieves the same list
        rows, scores = rows[order], scores[order]
        rows.setflags(write=False)
        scores.setflags(write=False)
        return rows, scores

    def top(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and scores of the ``k`` best documents for ``query`` (bm25s top-k), best first."""
        k = min(k, len(self))
        if k <= self.depth:
            rows, scores = self._top(query, self.depth)
            return rows[:k], scores[:k]
        return self._top_uncached(query, k)

    def score_rows(self, query: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """BM25 score of ``query`` for the documents at ``rows``, read from the index' token columns (row ids
        sorted per token): the same float32 sum, term by term, that bm25s forms for a whole-corpus score."""
        rows = np.asarray(rows, np.int64)
        out = np.zeros(len(rows), np.float32)
        if not len(rows):
            return out
        m = self.retriever.scores
        data, indices, indptr = m["data"], m["indices"], m["indptr"]
        for t in self._query_ids(query):
            start, end = int(indptr[t]), int(indptr[t + 1])
            col = indices[start:end]
            pos = np.searchsorted(col, rows)
            found = pos < len(col)
            found[found] = col[pos[found]] == rows[found]
            out[found] += data[start:end][pos[found]]
        return out

    def score_pairs(self, query: str, docids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """BM25 score and 1-based rank (``rank_within_top`` the query's top ``rank_depth``) of each docid for
        ``query``; an unknown docid scores 0 and ranks past the top (``depth + 1``)."""
        rows = self.ids.rows(docids)
        known = rows >= 0
        score = np.zeros(len(rows), np.float32)
        score[known] = self.score_rows(query, rows[known])
        rank = rank_within_top(score, self._top(query, self.depth)[1])
        rank[~known] = self.depth + 1
        return score, rank

    def score_texts(self, query: str, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """BM25 score of ``query`` against texts that need not be in the corpus (the corpus' IDF and average
        length), and the rank each would take in the corpus (``rank_within_top``). A corpus document's own text
        scores as :meth:`score_pairs` scores its docid: a served ranker sees the features it was trained on.
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
        n = len(self)
        q_ids = self._query_ids(query)  # a repeated query term counts once per repeat, as in score_rows
        # bm25s' own arithmetic, step for step: a float32 idf, a float64 term-frequency part, each product
        # rounded to float32, then float32 sums in query-term order; so a corpus text's score and rank are
        # exactly those of its docid (a rounding difference would split the ties a short-text corpus is full of)
        dfs = self._df[q_ids].tolist()
        idf = [float(np.float32(math.log(1 + (n - df + 0.5) / (df + 0.5)))) for df in dfs]
        k1, b, avgdl = self.params.k1, self.params.b, self.avgdl
        vocab = self.retriever.vocab_dict
        score = np.zeros(len(texts), dtype=np.float32)
        for i, d_tokens in enumerate(self._tokens([t or "" for t in texts]) if q_ids else []):
            counts = Counter(vocab[t] for t in d_tokens if t in vocab)
            length_norm = k1 * ((1 - b) + b * len(d_tokens) / avgdl) if avgdl else k1
            total = np.float32(0)
            for q, q_idf in zip(q_ids, idf, strict=True):
                tf = counts.get(q, 0)
                if tf:
                    total = np.float32(total + np.float32(q_idf * (tf / (length_norm + tf))))
            score[i] = total
        return score, rank_within_top(score, self._top(query, self.depth)[1])

    def search(self, queries: Sequence[str], k: int = 100) -> list[list[tuple[str, float]]]:
        """Top-``k`` (docid, score) per query, best first (ties in index order); documents matching no query term
        are left out."""
        out = []
        for q in queries:
            rows, scores = self.top(q, k)
            keep = scores > 0
            out.append(list(zip(self.ids.docid(rows[keep]), scores[keep].tolist(), strict=True)))
        return out


def _stemmer(language: str | None):
    if not language:
        return None
    import Stemmer

    return Stemmer.Stemmer(language).stemWords
