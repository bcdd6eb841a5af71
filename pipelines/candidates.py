"""``augrel candidates``: BM25 and/or dense top-k for every query (labelled or not) -> a pairs table.

    queries --(shards of queries)--> CandidateActor pool (index + encoder loaded once per actor)
            --> OUT/part-*.parquet: qid, docid, query, text, title, label (human grade or null),
                cand_rank, cand_score, retrieved_by[, answers (the query's gold answers, when it has them)]

This is the pool the judge annotates: ``label`` is the human grade where one is known (``--qrels``), null
elsewhere. Queries are read on the driver (a queries table is small next to its candidates: 1M queries are
tens of MB), cut into shards of ``batch_size`` queries so every actor of the pool gets work, and the
candidates of 1M queries x 100 stream from the actors to parquet files written by Ray's tasks. Passage texts
come from the index's memory-mapped document store, so no process holds the corpus.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from pipelines import tables as T
from pipelines.errors import DataError
from pipelines.io import read_table, write_table
from pipelines.stage import StageConfig, StageResult, Timer, write_stage_files

log = logging.getLogger("augrel")

#: what the stage adds to a pairs table; downstream stages that conform to the pairs spec ignore them
CANDIDATE_COLUMNS = ("cand_rank", "cand_score", "retrieved_by")


class CandidatesConfig(StageConfig):
    """``augrel candidates``: which queries, which index, how many candidates, on what resources."""

    queries: str = Field(
        description="queries table (qid, query[, answers]): a directory, Parquet/JSONL file or glob"
    )
    index: str = Field(description="index directory from `augrel index build` (bm25/, dense/, docstore/)")
    out: str = Field(description="output directory: the candidate pairs table")
    k: int = Field(100, ge=1, le=10_000, description="candidates per query")
    retrievers: list[str] = Field(
        default_factory=lambda: ["bm25"],
        description="bm25, dense, or both (fused by reciprocal rank: a pair either ranks high is kept)",
    )
    depth: int = Field(0, ge=0, description="hits per retriever before fusion; 0: k, or 2k when fused")
    qrels: str | None = Field(
        None, description="human labels to attach (qrels or pairs table with label); null: every label null"
    )
    batch_size: int = Field(64, gt=0, description="queries per actor call (the shard size)")
    concurrency: tuple[int, int] = Field((1, 2), description="retriever actors (min, max)")
    num_cpus_per_actor: float = Field(1.0, gt=0)
    num_gpus_per_actor: float = Field(0, ge=0, description="> 0: the query encoder (and FAISS) on a GPU")

    @field_validator("retrievers")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from retrieval.candidates import RETRIEVERS

        bad = [r for r in v if r not in RETRIEVERS]
        if not v or bad:
            raise ValueError(f"must be a non-empty list of {list(RETRIEVERS)}, got {v}")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _pool(self) -> CandidatesConfig:
        lo, hi = self.concurrency
        if not 1 <= lo <= hi:
            raise ValueError(f"concurrency: expected 1 <= min <= max, got {list(self.concurrency)}")
        return self


class CandidateActor:
    """Ray Data callable class: a shard of queries -> their candidate pairs with texts and human labels."""

    def __init__(self, index_dir: str, params: dict[str, Any], labels: Any, threads: int, device: str):
        import ray
        import torch

        from retrieval.candidates import CandidateGenerator, CandidateParams, label_lookup
        from retrieval.docstore import DocStore

        torch.set_num_threads(threads)
        self.generate = CandidateGenerator(index_dir, CandidateParams(**params), device=device)
        self.docs = DocStore.open(Path(index_dir) / "docstore")
        if isinstance(labels, ray.ObjectRef):
            labels = ray.get(labels)
        self.labels = label_lookup(labels) if labels is not None else {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        from retrieval.candidates import attach_labels

        qids = batch.column("qid").to_pylist()
        queries = batch.column("query").to_pylist()
        cands = self.generate(qids, queries)
        query_of = dict(zip(qids, queries, strict=True))
        texts = self.docs.get(cands.column("docid").to_pylist())
        out = pa.table({
            "qid": cands.column("qid"),
            "docid": cands.column("docid"),
            "query": pa.array([query_of[q] for q in cands.column("qid").to_pylist()], pa.string()),
            "text": texts.column("text"),
            "title": texts.column("title"),
            "label": attach_labels(cands, self.labels),
            **{c: cands.column(c) for c in CANDIDATE_COLUMNS},
        })  # fmt: skip
        if "answers" in batch.column_names:  # the question's gold answers travel with each of its candidates
            row_of = {q: i for i, q in enumerate(qids)}
            rows = pa.array([row_of[q] for q in cands.column("qid").to_pylist()], pa.int64())
            out = out.append_column("answers", batch.column("answers").take(rows))
        return out


def candidates_dataset(cfg: CandidatesConfig, queries: pa.Table):
    """The lazy Ray Data transform: queries, sharded over the pool -> candidate pairs."""
    import ray

    from models.loading import device_for_gpus

    labels = None
    if cfg.qrels:
        labels = ray.put(read_labels(cfg.qrels))
    # Blocks of batch_size queries: a single block from from_arrow would feed one actor only.
    cols = [c for c in ("qid", "query", "answers") if c in queries.column_names]
    ds = ray.data.from_arrow(queries.select(cols)).repartition(target_num_rows_per_block=cfg.batch_size)
    params = {"k": cfg.k, "retrievers": tuple(cfg.retrievers), "depth": cfg.depth}
    return ds.map_batches(
        CandidateActor, batch_size=cfg.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"index_dir": cfg.index, "params": params, "labels": labels,
                               "threads": max(1, round(cfg.num_cpus_per_actor)),
                               "device": device_for_gpus(cfg.num_gpus_per_actor)},
        compute=ray.data.ActorPoolStrategy(min_size=cfg.concurrency[0], max_size=cfg.concurrency[1]),
        num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor or None,
    )  # fmt: skip


def read_labels(path: str) -> pa.Table:
    """Human labels (qid, docid, label) from a qrels or pairs table, ids as strings (JSONL ids may be numbers:
    unconverted, no candidate would match them and every label would silently be null), one grade per pair."""
    table = read_table(path)
    missing = [c for c in ("qid", "docid", "label") if c not in table.column_names]
    if missing:
        raise DataError(f"qrels {path}: no column(s) {missing} (a qrels or pairs table with labels)")
    table = table.select(["qid", "docid", "label"]).filter(pc.is_valid(table.column("label")))
    try:
        table = T.conform(T.QRELS, table, path)
    except T.SchemaError as e:
        raise DataError(f"qrels {path}: {e}") from None
    keys = table.group_by(["qid", "docid"]).aggregate([("label", "min"), ("label", "max")])
    conflict = keys.filter(pc.not_equal(keys.column("label_min"), keys.column("label_max")))
    if conflict.num_rows:
        first = conflict.slice(0, 1).to_pylist()[0]
        raise DataError(f"qrels {path}: {conflict.num_rows} (qid, docid) pair(s) have two grades, e.g. "
                        f"({first['qid']}, {first['docid']}): {first['label_min']} and {first['label_max']}")  # fmt: skip
    return keys.select(["qid", "docid", "label_min"]).rename_columns(["qid", "docid", "label"])


def _check_index(cfg: CandidatesConfig) -> None:
    index = Path(cfg.index)
    need = ["docstore"] + [{"bm25": "bm25", "dense": "dense"}[r] for r in cfg.retrievers]
    missing = [n for n in need if not (index / n).is_dir()]
    if missing:
        raise DataError(
            f"index {cfg.index}: no {', '.join(missing)} (build it with `augrel index build`"
            + (", dense: true" if "dense" in missing else "")
            + ")"
        )


def _count(out: Path) -> tuple[int, int]:
    """Queries with a candidate and pairs with a human label, read file by file (two columns at a time)."""
    import pyarrow.parquet as pq

    qids: set[str] = set()
    labelled = 0
    for f in sorted(out.glob("part-*.parquet")):
        t = pq.read_table(f, columns=["qid", "label"])
        qids.update(pc.unique(t.column("qid")).to_pylist())
        labelled += t.num_rows - t.column("label").null_count
    return len(qids), labelled


def run(cfg: CandidatesConfig) -> StageResult:
    from cluster.embedded import init_ray
    from pipelines.io import write_dataset

    out = Path(cfg.out)
    _check_index(cfg)
    with Timer() as timer:
        queries = T.conform(T.QUERIES, read_table(cfg.queries), cfg.queries)
        good, rejected = T.split_rejected(T.QUERIES, queries, source=cfg.queries)
        dup = T.duplicate_mask(good, ("qid",))
        if dup.any():
            raise DataError(f"{cfg.queries}: {int(dup.sum())} duplicate qid(s); one query text per qid")
        if good.num_rows == 0:
            raise DataError(f"{cfg.queries}: no usable queries ({rejected.num_rows} rejected)")
        init_ray()
        n = write_dataset(candidates_dataset(cfg, good), out)
        write_table(out / "rejected", rejected)
        with_cands, labelled = _count(out)
    counts = {"queries": good.num_rows, "queries_with_candidates": with_cands,
              "queries_without_candidates": good.num_rows - with_cands, "pairs": n,
              "pairs_with_human_label": labelled, "pairs_unlabelled": n - labelled,
              "rejected": rejected.num_rows}  # fmt: skip
    if counts["queries_without_candidates"]:
        log.warning("%d of %d queries have no candidate (no query term in the corpus)",
                    counts["queries_without_candidates"], good.num_rows)  # fmt: skip
    return write_stage_files(out, "candidates", cfg, counts, [cfg.queries, cfg.index] + ([cfg.qrels] if cfg.qrels else []),
                             timer.seconds, {"table": "pairs", "retrievers": cfg.retrievers, "k": cfg.k})  # fmt: skip
