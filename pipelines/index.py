"""``augrel index build``: a docs table -> a retrieval index directory that ``augrel serve`` loads.

OUT/
  docs/part-00000.parquet   docid, text, title (the docs table other stages read)
  docstore/                 the same documents memory-mapped by docid (``retrieval.docstore.DocStore``): what
                            ``augrel serve`` replicas read, with no copy of the corpus in each process
  bm25/                     bm25s index (always: the ranker's bm25 features need the corpus' statistics)
  dense/                    FAISS index of MiniLM document vectors (``dense: true``; flat, ivf or hnsw) and
                            the vectors themselves (vectors.npy: served features encode only the query),
                            both in the docstore's row order (manifest ``dense_rows: docstore``)
  config.yaml, manifest.json

Document vectors are computed by a Ray Data actor pool (the encoder loaded once per actor, on its GPU when
``num_gpus_per_actor`` > 0) and streamed to the driver, which adds them to the FAISS index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipelines import tables as T
from pipelines.io import read_table, write_table
from pipelines.stage import StageConfig, StageResult, Timer, write_stage_files

log = logging.getLogger("augrel")


class IndexConfig(StageConfig):
    """``augrel index build``: docs -> BM25 (+ FAISS) index directory for retrieval and serving."""

    docs: str = Field(description="docs table (docid, text, title?)")
    out: str = Field(description="index directory")
    dense: bool = Field(True, description="also build a FAISS index of dense document vectors")
    kind: Literal["flat", "ivf", "hnsw"] = Field("flat", description="FAISS index type")
    encoder: str | None = Field(None, description="encoder dir or hub id; default: the packaged MiniLM")
    k1: float = Field(0.9, gt=0)
    b: float = Field(0.4, ge=0, le=1)
    batch_size: int = Field(256, gt=0, description="documents per encoder call")
    concurrency: int = Field(1, ge=1, description="encoder actors")
    num_cpus_per_actor: float = Field(1.0, gt=0)
    num_gpus_per_actor: float = Field(0, ge=0, description="> 0: each encoder actor runs on a GPU")


class EncodeActor:
    """Ray Data callable class: docs (docid, text) -> docid, vector (list<float32>), actor (the Ray actor id
    that encoded the row: the driver counts how many of the pool did work). Loads the encoder once."""

    def __init__(self, encoder: str | None, threads: int, device: str):
        import ray
        import torch

        from models.encoder import BiEncoder

        torch.set_num_threads(threads)
        self.encoder = BiEncoder(encoder, device=device)
        self.actor_id = ray.get_runtime_context().get_actor_id() or ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        vecs = self.encoder.encode_passages(batch.column("text").to_pylist())
        flat = pa.array(vecs.reshape(-1), pa.float32())
        return pa.table({"docid": batch.column("docid"),
                         "vector": pa.FixedSizeListArray.from_arrays(flat, vecs.shape[1]),
                         "actor": pa.array([self.actor_id] * batch.num_rows, pa.string())})  # fmt: skip


def pool_blocks(table: pa.Table, actors: int, max_rows: int) -> list[pa.Table]:
    """``table`` cut into zero-copy slices for an actor pool: at least 4 per actor when there are rows enough
    (one block per actor leaves the fast ones idle at the end) and none over ``max_rows`` (a block is the unit an
    actor holds in memory and the unit lost to a retry)."""
    n = table.num_rows
    if n == 0:
        return [table]
    rows = max(1, min(max_rows, n // (4 * max(1, actors))))
    return [table.slice(start, rows) for start in range(0, n, rows)]


@dataclass
class EncodedDocs:
    docids: list[str]
    vectors: np.ndarray
    actors: int  # distinct encoder actors that returned vectors


def encode_docs(cfg: IndexConfig, docs: pa.Table) -> EncodedDocs:
    import ray
    from tqdm.auto import tqdm

    from models.loading import device_for_gpus

    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts documents
    # Many blocks, not ray.data.from_arrow(docs): one block goes to one actor whatever the pool's size.
    blocks = pool_blocks(docs.select(["docid", "text"]), cfg.concurrency, max_rows=cfg.batch_size * 16)
    ds = ray.data.from_arrow(blocks).map_batches(
        EncodeActor, batch_size=cfg.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"encoder": cfg.encoder, "threads": max(1, round(cfg.num_cpus_per_actor)),
                               "device": device_for_gpus(cfg.num_gpus_per_actor)},
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor or None,
    )  # fmt: skip
    # No block is handed out before the whole pool is up: the first actor ready would otherwise queue blocks
    # the others could take (slow GPU model loads make this the common case on a cluster). Past the wait, Ray
    # Data fails naming the resources the pool lacks instead of running on part of it.
    ds.context.wait_for_min_actors_s = 900
    docids: list[str] = []
    parts: list[np.ndarray] = []
    actors: set[str] = set()
    with tqdm(total=docs.num_rows, desc="encode docs", unit="doc", mininterval=5) as bar:
        for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            docids += b.column("docid").to_pylist()
            actors.update(b.column("actor").unique().to_pylist())
            col = b.column("vector").combine_chunks()
            parts.append(col.values.to_numpy().reshape(len(col), -1))
            bar.update(b.num_rows)
    vectors = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
    return EncodedDocs(docids, vectors, len(actors))


def build(cfg: IndexConfig) -> StageResult:
    from retrieval.bm25 import BM25Index, BM25Params
    from retrieval.docstore import DocStore

    out = Path(cfg.out)
    with Timer() as timer:
        docs = T.conform(T.DOCS, read_table(cfg.docs), cfg.docs)
        good, rejected = T.split_rejected(T.DOCS, docs, source=cfg.docs)
        dup = len(good) - len(set(good.column("docid").to_pylist()))
        if dup:
            from pipelines.errors import DataError

            raise DataError(f"{cfg.docs}: {dup} duplicate docid(s); an index needs one text per docid")
        keep = [c for c in ("docid", "text", "title") if c in good.column_names]
        write_table(out / "docs", good.select(keep))
        store = DocStore.open(DocStore.write(out / "docstore", good.select(keep)))
        write_table(out / "rejected", rejected)
        BM25Index.build(good.column("docid").to_pylist(), good.column("text").to_pylist(),
                        BM25Params(k1=cfg.k1, b=cfg.b)).save(out / "bm25")  # fmt: skip
        extra = {"bm25": str(out / "bm25"), "docstore": str(out / "docstore")}
        if cfg.dense:
            from cluster.embedded import init_ray
            from retrieval.dense import DenseIndex, DenseParams, DocVectors

            init_ray()
            enc = encode_docs(cfg, good)
            # vectors come back in the order actors finished: put them (and the FAISS rows) in the document
            # store's row order, so a replica finds a document's vector by its store row, without a docid map
            vectors = np.empty_like(enc.vectors)
            vectors[store.rows(enc.docids)] = enc.vectors
            docids = store.docids().to_pylist()
            index = DenseIndex.build(docids, vectors, DenseParams(kind=cfg.kind, encoder=cfg.encoder))
            index.save(out / "dense")
            DocVectors.save(out / "dense", vectors)
            extra.update(dense=str(out / "dense"), dim=int(vectors.shape[1]), kind=cfg.kind,
                         dense_rows="docstore", encoder_actors=enc.actors)  # fmt: skip
    return write_stage_files(out, "index.build", cfg, {"docs": good.num_rows, "rejected": rejected.num_rows},
                             [cfg.docs], timer.seconds, extra)  # fmt: skip
