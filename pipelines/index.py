"""``augrel index build``: a docs table -> a retrieval index directory that ``augrel serve`` loads;
``augrel index search``: a queries table -> a run table (qid, docid, score, rank) from that index.

OUT/
  docs/part-00000.parquet   docid, text, title (the docs table other stages read)
  docstore/                 the same documents memory-mapped by docid (``retrieval.docstore.DocStore``): what
                            ``augrel serve`` replicas read, with no copy of the corpus in each process
  bm25/                     bm25s index (always: the ranker's bm25 features need the corpus' statistics)
  dense/                    FAISS index of the encoder's document vectors (``dense: true``; flat, ivf, hnsw or
                            ivfpq) and the vectors themselves (vectors.npy: served features encode only the
                            query; IVF-PQ re-ranks from it), both in the docstore's row order (manifest
                            ``dense_rows: docstore``)
  config.yaml, manifest.json

Document vectors are computed by a Ray Data actor pool (the encoder loaded once per actor, on its GPU when
``num_gpus_per_actor`` > 0) and streamed to the driver, which writes each batch into the memory-mapped
vectors.npy at its docstore rows (``retrieval.dense.DenseIndexBuilder``): the driver holds a batch and the
quantizer's training sample, never the corpus' vectors. The index is built in ``dense.partial/`` and renamed to
``dense/`` when complete, so a failed build leaves no index that mixes two corpora.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipelines import tables as T
from pipelines.errors import ConfigError, DataError
from pipelines.io import read_table, write_table
from pipelines.stage import StageConfig, StageResult, Timer, write_stage_files

log = logging.getLogger("augrel")


class IndexConfig(StageConfig):
    """``augrel index build``: docs -> BM25 (+ FAISS) index directory for retrieval and serving."""

    docs: str = Field(description="docs table (docid, text, title?)")
    out: str = Field(description="index directory")
    dense: bool = Field(True, description="also build a FAISS index of dense document vectors")
    kind: Literal["flat", "ivf", "hnsw", "ivfpq"] = Field("flat", description="FAISS index type")
    encoder: str | None = Field(None, description="encoder dir or hub id; default: the packaged MiniLM")
    nlist: int = Field(0, ge=0, description="ivf / ivfpq cells; 0: about 4 sqrt(docs)")
    nprobe: int = Field(16, ge=1, description="ivf / ivfpq cells visited per query")
    hnsw_m: int = Field(32, ge=2, description="hnsw neighbours per node")
    ef_search: int = Field(128, ge=1, description="hnsw candidate list per query")
    ef_construction: int = Field(40, ge=1, description="hnsw candidate list while adding")
    pq_m: int = Field(
        0, ge=0, description="ivfpq sub-quantizers (bytes a code); must divide dim; 0: dim/8 or less"
    )
    pq_nbits: int = Field(8, ge=1, le=16, description="ivfpq bits per sub-quantizer code")
    refine: float = Field(
        4.0, ge=0, description="ivfpq: re-rank k*refine candidates from vectors.npy; <=1: off"
    )
    train_size: int = Field(
        0, ge=0, description="ivf / ivfpq training vectors (a seeded sample); 0: automatic"
    )
    faiss_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="where ivf / ivfpq k-means trains: every GPU faiss-gpu sees (auto, cuda) or the CPU",
    )
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


def encode_docs(cfg: IndexConfig, docs: pa.Table, sink: Callable[[list[str], np.ndarray], None]) -> int:
    """Encode the docs on the actor pool, handing each batch of (docids, vectors) to ``sink`` as it arrives
    (in the order actors finish); returns how many distinct actors returned vectors."""
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
    actors: set[str] = set()
    with tqdm(total=docs.num_rows, desc="encode docs", unit="doc", mininterval=5) as bar:
        for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            actors.update(b.column("actor").unique().to_pylist())
            col = b.column("vector").combine_chunks()
            sink(b.column("docid").to_pylist(), col.values.to_numpy().reshape(len(col), -1))
            bar.update(b.num_rows)
    return len(actors)


def dense_params(cfg: IndexConfig):
    from retrieval.dense import DenseParams

    return DenseParams(kind=cfg.kind, nlist=cfg.nlist, nprobe=cfg.nprobe, hnsw_m=cfg.hnsw_m,
                       ef_search=cfg.ef_search, ef_construction=cfg.ef_construction, pq_m=cfg.pq_m,
                       pq_nbits=cfg.pq_nbits, refine=cfg.refine, encoder=cfg.encoder)  # fmt: skip


def build_dense(cfg: IndexConfig, docs: pa.Table, store, out: Path) -> dict:
    """Encode ``docs`` and build OUT/dense in the document store's row order; returns the manifest's fields."""
    import shutil

    from cluster.embedded import init_ray
    from retrieval.dense import DenseIndexBuilder

    try:
        params = dense_params(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.kind == "ivfpq" and docs.num_rows < 2**cfg.pq_nbits:
        raise ConfigError(f"pq_nbits: {cfg.pq_nbits} bits train {2**cfg.pq_nbits} centroids per sub-quantizer, "
                          f"more than the corpus' {docs.num_rows} documents: lower pq_nbits or use kind flat")  # fmt: skip
    partial = out / "dense.partial"
    shutil.rmtree(partial, ignore_errors=True)
    builder = DenseIndexBuilder(partial, store.docids().to_pylist(), params, train_size=cfg.train_size,
                                device=cfg.faiss_device)  # fmt: skip

    def sink(docids: list[str], vectors: np.ndarray) -> None:
        # vectors arrive in the order actors finished: each goes to its document's store row, so a replica
        # finds a document's vector (and FAISS its id) by store row, without a docid map
        rows = store.rows(docids)
        if (rows < 0).any():
            raise RuntimeError(f"the encoder pool returned docid {docids[int(np.argmax(rows < 0))]!r}, "
                               "which is not in the document store")  # fmt: skip
        if builder.dim is None and cfg.kind == "ivfpq":
            try:  # pq_m must divide the encoder's dim, known from the first batch on
                params.resolved_pq_m(vectors.shape[1])
            except ValueError as e:
                raise ConfigError(str(e)) from None
        builder.add(rows, vectors)

    init_ray()
    actors = encode_docs(cfg, docs, sink)
    with Timer() as faiss_timer:
        index = builder.finish()
    shutil.rmtree(out / "dense", ignore_errors=True)
    partial.rename(out / "dense")
    log.info("FAISS %s index of %d vectors built in %.1fs", cfg.kind, len(index.docids), faiss_timer.seconds)
    return {"dense": str(out / "dense"), "dim": int(index.dim), "kind": cfg.kind, "dense_rows": "docstore",
            "encoder_actors": actors, "faiss_build_s": round(faiss_timer.seconds, 3)}  # fmt: skip


def build(cfg: IndexConfig) -> StageResult:
    from retrieval.bm25 import BM25Index, BM25Params
    from retrieval.docstore import DocStore

    out = Path(cfg.out)
    with Timer() as timer:
        docs = T.conform(T.DOCS, read_table(cfg.docs), cfg.docs)
        good, rejected = T.split_rejected(T.DOCS, docs, source=cfg.docs)
        dup = len(good) - len(set(good.column("docid").to_pylist()))
        if dup:
            raise DataError(f"{cfg.docs}: {dup} duplicate docid(s); an index needs one text per docid")
        if good.num_rows == 0:
            raise DataError(f"{cfg.docs}: no usable documents ({rejected.num_rows} rejected): an index needs a "
                            "corpus of at least one document with a docid")  # fmt: skip
        keep = [c for c in ("docid", "text", "title") if c in good.column_names]
        write_table(out / "docs", good.select(keep))
        store = DocStore.open(DocStore.write(out / "docstore", good.select(keep)))
        write_table(out / "rejected", rejected)
        BM25Index.build(good.column("docid").to_pylist(), good.column("text").to_pylist(),
                        BM25Params(k1=cfg.k1, b=cfg.b)).save(out / "bm25")  # fmt: skip
        extra = {"bm25": str(out / "bm25"), "docstore": str(out / "docstore")}
        if cfg.dense:
            extra.update(build_dense(cfg, good, store, out))
    return write_stage_files(out, "index.build", cfg, {"docs": good.num_rows, "rejected": rejected.num_rows},
                             [cfg.docs], timer.seconds, extra)  # fmt: skip


class IndexSearchConfig(StageConfig):
    """``augrel index search``: queries -> a run table (qid, docid, score, rank) from an index directory."""

    index: str = Field(description="index directory from `augrel index build`")
    queries: str = Field(description="queries table (qid, query): a directory, Parquet/JSONL file or glob")
    out: str = Field(description="output directory: the run table")
    k: int = Field(100, ge=1, le=10_000, description="documents per query")
    retriever: Literal["bm25", "dense"] | None = Field(
        None, description="bm25 or dense (the index's encoder embeds the queries); default: dense when the "
        "index has one, else bm25",
    )  # fmt: skip
    batch_size: int = Field(256, gt=0, description="queries per actor call (the shard size)")
    concurrency: tuple[int, int] = Field((1, 1), description="search actors (min, max)")
    num_cpus_per_actor: float = Field(1.0, gt=0)
    num_gpus_per_actor: float = Field(0, ge=0, description="> 0: the query encoder and FAISS on GPUs")


class SearchActor:
    """Ray Data callable class: a shard of queries -> their run rows. The index (and, for dense, the encoder it
    was built with) is loaded once per actor by ``retrieval.candidates.CandidateGenerator``."""

    def __init__(self, index_dir: str, retriever: str, k: int, threads: int, device: str):
        import faiss
        import torch

        from retrieval.candidates import CandidateGenerator, CandidateParams

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        self.generate = CandidateGenerator(
            index_dir, CandidateParams(k=k, retrievers=(retriever,)), device=device
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        cands = self.generate(batch.column("qid").to_pylist(), batch.column("query").to_pylist())
        return pa.table([cands.column("qid"), cands.column("docid"), cands.column("cand_score"),
                         cands.column("cand_rank")], schema=T.RUN.schema())  # fmt: skip


def search_dataset(cfg: IndexSearchConfig, queries: pa.Table, retriever: str):
    """The lazy Ray Data transform: queries, sharded over the search actors -> run rows."""
    import ray

    from models.loading import device_for_gpus

    ds = ray.data.from_arrow(queries.select(["qid", "query"])).repartition(
        target_num_rows_per_block=cfg.batch_size
    )
    return ds.map_batches(
        SearchActor, batch_size=cfg.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"index_dir": cfg.index, "retriever": retriever, "k": cfg.k,
                               "threads": max(1, round(cfg.num_cpus_per_actor)),
                               "device": device_for_gpus(cfg.num_gpus_per_actor)},
        compute=ray.data.ActorPoolStrategy(min_size=cfg.concurrency[0], max_size=cfg.concurrency[1]),
        num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor or None,
    )  # fmt: skip


def _encoder_dim(encoder: str | None, device: str) -> int:
    from models.encoder import BiEncoder

    return BiEncoder(encoder, device=device).dim


def check_dense_encoder(cfg: IndexSearchConfig) -> None:
    """DataError naming both when the encoder the index names makes vectors of another size than the index's
    (an encoder directory replaced since the build). The encoder is loaded by a Ray task, on a worker like the
    search actors, not on the driver: its path need only exist where they run."""
    import json

    import ray

    from models.loading import device_for_gpus
    from retrieval.dense import check_encoder_dim

    meta = json.loads((Path(cfg.index) / "dense" / "dense.json").read_text())
    task = ray.remote(_encoder_dim).options(num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor)
    dim = ray.get(task.remote(meta.get("encoder"), device_for_gpus(cfg.num_gpus_per_actor)))
    try:
        check_encoder_dim(dim, meta["dim"], meta.get("encoder"), Path(cfg.index) / "dense")
    except ValueError as e:
        raise DataError(str(e)) from None


def search(cfg: IndexSearchConfig) -> StageResult:
    from cluster.embedded import init_ray
    from pipelines.io import write_dataset

    index, out = Path(cfg.index), Path(cfg.out)
    retriever = cfg.retriever or ("dense" if (index / "dense").is_dir() else "bm25")
    if not (index / retriever).is_dir():
        raise DataError(f"index {cfg.index}: no {retriever}/ (build it with `augrel index build`"
                        + (", dense: true)" if retriever == "dense" else ")"))  # fmt: skip
    with Timer() as timer:
        queries = T.conform(T.QUERIES, read_table(cfg.queries), cfg.queries)
        good, rejected = T.split_rejected(T.QUERIES, queries, source=cfg.queries)
        dup = T.duplicate_mask(good, ("qid",))
        if dup.any():
            raise DataError(f"{cfg.queries}: {int(dup.sum())} duplicate qid(s); one query text per qid")
        if good.num_rows == 0:
            raise DataError(f"{cfg.queries}: no usable queries ({rejected.num_rows} rejected)")
        init_ray()
        if retriever == "dense":
            check_dense_encoder(cfg)
        n = write_dataset(search_dataset(cfg, good, retriever), out)
        write_table(out / "rejected", rejected)
    counts = {"queries": good.num_rows, "rows": n, "rejected": rejected.num_rows}
    return write_stage_files(out, "index.search", cfg, counts, [cfg.queries, cfg.index], timer.seconds,
                             {"table": "run", "retriever": retriever, "k": cfg.k})  # fmt: skip
