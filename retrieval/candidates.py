"""First-stage candidates for a batch of queries: BM25 and/or dense top-k from an index directory (what
``augrel index build`` writes), fused by reciprocal rank when both are asked for. No Ray here: the
``augrel candidates`` stage maps a :class:`CandidateGenerator` over shards of the queries.

Reciprocal rank fusion (Cormack et al., SIGIR 2009): ``score(d) = sum over retrievers of 1 / (rrf_k + rank(d))``.
It needs no score calibration between BM25 and cosine, which is why it is the usual way to pool candidates for
annotation: a pair either retriever ranks high gets judged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

RETRIEVERS = ("bm25", "dense")

#: Columns of the candidates a generator returns, before the stage adds query text, passage text and labels.
CANDIDATE_SCHEMA = pa.schema(
    [
        pa.field("qid", pa.string(), nullable=False),
        pa.field("docid", pa.string(), nullable=False),
        pa.field("cand_rank", pa.int32(), nullable=False),  # 1-based, in the fused order
        pa.field("cand_score", pa.float32(), nullable=False),  # RRF score (one retriever: its own score)
        pa.field("retrieved_by", pa.string(), nullable=False),  # "bm25", "dense" or "bm25+dense"
    ]
)


@dataclass(frozen=True)
class CandidateParams:
    k: int = 100
    retrievers: tuple[str, ...] = ("bm25",)
    depth: int = 0  # per retriever before fusion; 0: k (one retriever) or 2k (fused)
    rrf_k: int = 60  # the constant of reciprocal rank fusion (the paper's 60)

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        unknown = [r for r in self.retrievers if r not in RETRIEVERS]
        if not self.retrievers or unknown:
            raise ValueError(
                f"retrievers must be a non-empty subset of {RETRIEVERS}, got {list(self.retrievers)}"
            )

    @property
    def per_retriever(self) -> int:
        return self.depth or (self.k if len(self.retrievers) == 1 else 2 * self.k)


def fuse(
    runs: dict[str, list[list[tuple[str, float]]]], k: int, rrf_k: int = 60
) -> list[list[tuple[str, float, str]]]:
    """Per query, the top ``k`` (docid, score, retrieved_by) of one or more ranked lists, best first.

    One list: its own scores and order. Several: reciprocal rank fusion; ties are broken by docid so the result
    does not depend on which retriever was listed first.
    """
    names = list(runs)
    if len(names) == 1:
        return [[(d, s, names[0]) for d, s in hits[:k]] for hits in runs[names[0]]]
    n_queries = {len(v) for v in runs.values()}
    if len(n_queries) != 1:
        raise ValueError(f"retrievers returned different numbers of queries: {n_queries}")
    out = []
    for q in range(n_queries.pop()):
        score: dict[str, float] = {}
        found: dict[str, list[str]] = {}
        for name in names:
            for rank, (docid, _) in enumerate(runs[name][q], 1):
                score[docid] = score.get(docid, 0.0) + 1.0 / (rrf_k + rank)
                found.setdefault(docid, []).append(name)
        best = sorted(score, key=lambda d: (-score[d], d))[:k]
        out.append([(d, score[d], "+".join(found[d])) for d in best])
    return out


class CandidateGenerator:
    """Top-k candidates per query from an index directory (``bm25/`` and, for dense, ``dense/``).

    The dense side encodes queries with the encoder named in the index's ``dense.json`` (the one that made the
    document vectors), resolved on the machine this runs on.
    """

    def __init__(
        self,
        index_dir: str | Path,
        params: CandidateParams = CandidateParams(),
        device: str = "cpu",
        index_device: str | None = None,
    ):
        """``device``: where the query encoder runs; ``index_device``: where FAISS searches (default: the GPUs
        when ``device`` is one, else the CPU; "cpu" keeps the index off a GPU another model needs)."""
        index_dir = Path(index_dir)
        self.params = params
        self.bm25 = self.dense = self.encoder = None
        if "bm25" in params.retrievers:
            from retrieval.bm25 import BM25Index

            if not (index_dir / "bm25").is_dir():
                raise FileNotFoundError(f"{index_dir}/bm25: no BM25 index (run `augrel index build`)")
            self.bm25 = BM25Index.load(index_dir / "bm25")
        if "dense" in params.retrievers:
            from models.encoder import BiEncoder
            from retrieval.dense import DenseIndex

            if not (index_dir / "dense").is_dir():
                raise FileNotFoundError(
                    f"{index_dir}/dense: no dense index (build the index with dense: true, or use retrievers: [bm25])"
                )
            where = index_device or ("cpu" if device == "cpu" else "auto")
            self.dense = DenseIndex.load(index_dir / "dense", device=where)
            self.encoder = BiEncoder(self.dense.params.encoder, device=device)
            if self.encoder.dim != self.dense.dim:
                raise ValueError(
                    f"encoder {self.dense.params.encoder or 'MiniLM'} makes {self.encoder.dim}-d vectors, "
                    f"the index at {index_dir}/dense holds {self.dense.dim}-d ones"
                )

    def __call__(self, qids: Sequence[str], queries: Sequence[str]) -> pa.Table:
        """The candidates of these queries as a table with :data:`CANDIDATE_SCHEMA`, query by query."""
        if len(qids) != len(queries):
            raise ValueError(f"{len(qids)} qids but {len(queries)} queries")
        depth = self.params.per_retriever
        runs: dict[str, list[list[tuple[str, float]]]] = {}
        if self.bm25 is not None:
            runs["bm25"] = self.bm25.search(list(queries), k=depth)
        if self.dense is not None:
            runs["dense"] = self.dense.search(self.encoder.encode_queries(list(queries)), k=depth)
        fused = fuse(runs, self.params.k, self.params.rrf_k)
        cols: dict[str, list] = {name: [] for name in CANDIDATE_SCHEMA.names}
        for qid, hits in zip(qids, fused, strict=True):
            for rank, (docid, score, by) in enumerate(hits, 1):
                cols["qid"].append(qid)
                cols["docid"].append(docid)
                cols["cand_rank"].append(rank)
                cols["cand_score"].append(score)
                cols["retrieved_by"].append(by)
        return pa.table({n: pa.array(cols[n], CANDIDATE_SCHEMA.field(n).type) for n in CANDIDATE_SCHEMA.names},
                        schema=CANDIDATE_SCHEMA)  # fmt: skip


def attach_labels(candidates: pa.Table, labels: dict[tuple[str, str], int]) -> pa.Array:
    """The human grade of each candidate (qid, docid) where one is known, else null (int8)."""
    qids = candidates.column("qid").to_pylist()
    docids = candidates.column("docid").to_pylist()
    values = [labels.get(key) for key in zip(qids, docids, strict=True)]
    return pa.array(values, pa.int8())


def label_lookup(qrels: pa.Table) -> dict[tuple[str, str], int]:
    """(qid, docid) -> grade from a qrels or pairs table (rows without a label are left out)."""
    qrels = qrels.filter(pc.is_valid(qrels.column("label")))
    grades = np.asarray(qrels.column("label").to_numpy(zero_copy_only=False), dtype=np.int64)
    return dict(zip(zip(qrels.column("qid").to_pylist(), qrels.column("docid").to_pylist(), strict=True),
                    grades.tolist(), strict=True))  # fmt: skip
