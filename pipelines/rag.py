"""``augrel rag eval``: retrieve the top k passages of each question, generate a short answer from them, score it.

    questions --(partitions of questions, one block each)--> RagActor pool (index, encoder and generator loaded
    once per actor: retrieve -> generate -> score) --> write tasks --> OUT/rows/part-<system>-<n>.parquet
    OUT/metrics.json (per system: EM, F1, answer recall@k, supporting recall@k, 95% CIs over questions),
    OUT/table.md, OUT/config.yaml, OUT/manifest.json

Systems, each a set of partitions of the same questions:

- ``retrieved``: the top ``k`` passages from the index (BM25, or dense with the encoder the index was built
  with; the same :class:`retrieval.candidates.CandidateGenerator` that ``candidates`` and ``index search`` use);
- ``closed_book``: no passage (k = 0), the floor: what the generator knows without retrieval;
- ``oracle``: the gold supporting passages (``supporting`` in the questions table, or ``--qrels``), the ceiling
  of this generator with perfect retrieval. Skipped, and said, when no question has one;
- one more per entry of ``retrievers`` (name -> index, retriever): several retrievers compared in one pass, each
  actor loading the generator once (a 9B model takes minutes to load; ``augrel run`` compares five this way).

A partition is written whole, atomically, named after its system and position, and ``--resume`` runs only the
partitions without a file: a killed actor or job costs the partitions it held, never a duplicate row. A
question without a gold answer is generated and kept (its EM / F1 are null, it is counted); a generator that
returns nothing scores EM 0 and is counted; ``k`` larger than the corpus is capped and the cap recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.loading import DEFAULT_JUDGE
from pipelines.errors import ConfigError, DataError
from pipelines.io import read_table
from pipelines.stage import StageConfig, StageResult, Timer, write_stage_files

log = logging.getLogger("augrel")

SYSTEMS = ("retrieved", "closed_book", "oracle")
PLAN = "_plan.json"
PIECES = "_pieces"
IO_TASK_CPUS = 0.1
METRICS = ("em", "f1", "answer_in_context", "supporting_recall")

#: the per-question rows, one per (system, question)
ROW_SCHEMA = pa.schema([
    pa.field("qid", pa.string(), nullable=False),
    pa.field("system", pa.string(), nullable=False),
    pa.field("question", pa.string()),
    pa.field("answers", pa.list_(pa.string())),
    pa.field("docids", pa.list_(pa.string())),  # the passages the generator was given, best first
    pa.field("answer", pa.string()),
    pa.field("raw", pa.string()),  # the generation before answer extraction
    pa.field("em", pa.float64()),  # null: no gold answer
    pa.field("f1", pa.float64()),
    pa.field("answer_in_context", pa.bool_()),  # null: no gold answer, or no passage (closed book)
    pa.field("supporting_recall", pa.float64()),  # null: no gold supporting passage known, or closed book
    pa.field("finished", pa.bool_()),  # the generation ended within max_new_tokens
    pa.field("prompt_tokens", pa.int32()),
    pa.field("truncated_passages", pa.int32()),
    pa.field("dropped_passages", pa.int32()),  # left out: the prompt would not fit the generator's context
])  # fmt: skip

_TAGS = pa.schema([("_part", pa.string()), ("_pos", pa.int64()), ("_expect", pa.int64())])


class Retrieval(BaseModel):
    """One retrieved system: an index directory and how to search it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: str = Field(description="index directory (augrel index build)")
    retriever: str = Field(
        "bm25", description="bm25, dense, or the encoder directory the index was built with"
    )


class RagEvalConfig(StageConfig):
    """``augrel rag eval``: which questions, which retrieval, which generator, which systems, on what resources."""

    questions: str = Field(
        description="questions table (qid, question, answers[, supporting]) or queries table (qid, query, answers)"
    )
    index: str | None = Field(
        None, description="index directory (augrel index build): passages and retrieval; needed unless only "
        "closed_book runs",
    )  # fmt: skip
    retriever: str = Field(
        "bm25", description="bm25; dense (the encoder the index was built with); or an encoder directory, which "
        "must be the one the index's dense vectors were made with",
    )  # fmt: skip
    k: int = Field(5, ge=0, le=1000, description="passages given to the generator (0: closed book only)")
    generator: str = Field(
        DEFAULT_JUDGE, description="causal LM hub id or path (default: the packaged Gemma 3 270M)"
    )
    retrievers: dict[str, Retrieval] = Field(
        default_factory=dict, description="more retrieved systems answered in the same pass: name -> {index, "
        "retriever} (the generator is loaded once per actor for all of them)",
    )  # fmt: skip
    qrels: str | None = Field(
        None, description="gold supporting passages (qrels or pairs table, label >= min_grade), when the "
        "questions table has no supporting column",
    )  # fmt: skip
    min_grade: int = Field(1, ge=0, description="a qrels label at least this is a supporting passage")
    systems: list[Literal["retrieved", "closed_book", "oracle"]] = Field(
        default_factory=lambda: list(SYSTEMS),
        description="retrieved (top k), closed_book (no passage), oracle (gold supporting passages)",
    )
    passage_tokens: int = Field(300, gt=0, description="each passage cut to this many generator tokens")
    max_new_tokens: int = Field(32, gt=0, description="bound on each answer's generated tokens")
    limit: int | None = Field(None, gt=0, description="the first N questions by qid (null: all)")
    partition_questions: int = Field(32, gt=0, description="questions per partition (the exactly-once unit)")
    batch_size: int = Field(8, gt=0, description="prompts per generation batch")
    concurrency: tuple[int, int] = Field((1, 1), description="RAG actors (min, max)")
    num_cpus_per_actor: float = Field(1.0, gt=0)
    num_gpus_per_actor: float = Field(0, ge=0, description="> 0: the generator (and encoder, FAISS) on a GPU")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="generator weights: auto (bf16 where the hardware computes it), bf16, fp16, fp32"
    )
    max_batch_tokens: int | None = Field(
        None, gt=0, description="bound on prompt + answer tokens per generation batch (a GPU's KV cache)"
    )
    search_on_gpu: bool = Field(
        False, description="dense search (FAISS) on the actor's GPU too; default: on the CPU, leaving the GPU "
        "to the generator (each retriever's index would otherwise sit beside it)",
    )  # fmt: skip
    autoscaling_cluster: bool = Field(
        False, description="the cluster adds nodes on demand: do not check that the actors fit what is up now"
    )
    bootstrap: int = Field(1000, ge=100, description="bootstrap resamples of questions for the 95% CIs")
    seed: int = 0
    out: str = Field(description="output directory")
    resume: bool = Field(
        False, description="finish an interrupted run in OUT: only partitions without a file"
    )
    overwrite: bool = Field(False, description="delete OUT's rows and start again")

    @field_validator("systems")
    @classmethod
    def _systems(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"run at least one of {list(SYSTEMS)}")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _consistent(self) -> RagEvalConfig:
        lo, hi = self.concurrency
        if not 1 <= lo <= hi:
            raise ValueError(f"concurrency: expected 1 <= min <= max, got {list(self.concurrency)}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite: pick one")
        clash = sorted(set(self.retrievers) & set(SYSTEMS))
        if clash:
            raise ValueError(f"retrievers.{clash[0]}: a name of a built-in system; choose another")
        bad = [n for n in self.retrievers if not n or "-" in n or "/" in n]
        if bad:
            raise ValueError(
                f"retrievers.{bad[0]!r}: a name without '-' or '/' (it names the partition files)"
            )
        need = [s for s in self.run_systems if s in ("retrieved", "oracle")]
        if self.index is None and need:
            raise ValueError(f"index: required for the systems {need}")
        return self

    @property
    def run_systems(self) -> list[str]:
        """The systems run: with k = 0, retrieval is the closed book."""
        if self.k == 0:
            return list(dict.fromkeys("closed_book" if s == "retrieved" else s for s in self.systems))
        return [*self.systems, *self.retrievers]

    def retrievals(self) -> dict[str, Retrieval]:
        """Every retrieved system run: ``retrieved`` (index, retriever) and the named ``retrievers``."""
        runs = self.run_systems
        main = (
            {"retrieved": Retrieval(index=self.index, retriever=self.retriever)}
            if "retrieved" in runs
            else {}
        )
        return {**main, **{n: r for n, r in self.retrievers.items() if n in runs}}


# ------------------------------------------------------------------------------------------- inputs


def read_questions(cfg: RagEvalConfig) -> tuple[pa.Table, pa.Table]:
    """(questions: qid, question, answers, supporting; rejected rows) sorted by qid. A queries table's ``query``
    column is read as the question. Missing columns are an error naming them; bad rows are rejected."""
    from pipelines import tables as T

    table = read_table(cfg.questions)
    if "question" not in table.column_names and "query" in table.column_names:
        table = table.rename_columns(["question" if c == "query" else c for c in table.column_names])
    missing = [c for c in ("qid", "question", "answers") if c not in table.column_names]
    if missing:
        raise DataError(f"questions {cfg.questions}: no column(s) {missing} (a questions table: qid, question, "
                        f"answers[, supporting]; it has {table.column_names})")  # fmt: skip
    try:
        table = T.conform(T.QUESTIONS, table, cfg.questions)
    except T.SchemaError as e:
        raise DataError(f"questions {cfg.questions}: {e}") from None
    good, rejected = T.split_rejected(T.QUESTIONS, table, source=cfg.questions)
    dup = T.duplicate_mask(good, ("qid",))
    if dup.any():
        raise DataError(f"questions {cfg.questions}: {int(dup.sum())} duplicate qid(s); one question per qid")
    if "supporting" not in good.column_names:
        good = good.append_column("supporting", pa.nulls(good.num_rows, pa.list_(pa.string())))
    if cfg.qrels:
        good = good.set_column(good.schema.get_field_index("supporting"), "supporting",
                               _supporting_from_qrels(cfg, good.column("qid").to_pylist()))  # fmt: skip
    good = good.select(["qid", "question", "answers", "supporting"]).sort_by("qid")
    if cfg.limit:
        good = good.slice(0, cfg.limit)
    if good.num_rows == 0:
        raise DataError(f"questions {cfg.questions}: no usable question ({rejected.num_rows} rejected)")
    return good, rejected


def _supporting_from_qrels(cfg: RagEvalConfig, qids: list[str]) -> pa.Array:
    from pipelines.candidates import read_labels

    labels = read_labels(cfg.qrels)
    labels = labels.filter(pc.greater_equal(labels.column("label"), cfg.min_grade))
    gold: dict[str, list[str]] = defaultdict(list)
    for q, d in zip(labels.column("qid").to_pylist(), labels.column("docid").to_pylist(), strict=True):
        gold[q].append(d)
    return pa.array([sorted(gold[q]) if q in gold else None for q in qids], pa.list_(pa.string()))


def _corpus_size(index: str) -> int:
    from retrieval.docstore import DocStore

    if not (Path(index) / "docstore").is_dir():
        raise DataError(f"index {index}: no docstore/ (build it with `augrel index build`)")
    n = len(DocStore.open(Path(index) / "docstore"))
    if n == 0:
        raise DataError(f"index {index}: the corpus is empty: nothing to retrieve")
    return n


def check_indexes(cfg: RagEvalConfig) -> dict[str, dict[str, Any]]:
    """Per retrieved system: its index, the retriever kind the actors use, the corpus size and k capped at it.
    Errors name what is missing; an encoder directory must be the one the index's vectors were made with."""
    if cfg.index is not None:
        _corpus_size(cfg.index)  # the oracle's passages come from it
    out = {}
    for name, r in cfg.retrievals().items():
        field = "retriever" if name == "retrieved" else f"retrievers.{name}.retriever"
        n_docs = _corpus_size(r.index)
        kind = "bm25" if r.retriever == "bm25" else "dense"
        if not (Path(r.index) / kind).is_dir():
            raise DataError(f"index {r.index}: no {kind}/ (build it with `augrel index build`"
                            + (", dense: true" if kind == "dense" else "") + ")")  # fmt: skip
        if r.retriever not in ("bm25", "dense"):
            built = json.loads((Path(r.index) / "dense" / "dense.json").read_text()).get("encoder")
            if built is None or not _same_path(built, r.retriever):
                raise ConfigError(f"{field}: {r.retriever} is not the encoder the index's vectors were made with "
                                  f"({built or 'the packaged MiniLM'}): build an index with "
                                  f"`augrel index build --set encoder={r.retriever}` and pass that")  # fmt: skip
        k = min(cfg.k, n_docs)
        if k < cfg.k:
            log.warning(
                "%s: k=%d is larger than the corpus (%d passages): capped at %d", name, cfg.k, n_docs, k
            )
        out[name] = {"index": r.index, "kind": kind, "corpus": n_docs, "k": k}
    return out


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b


# ------------------------------------------------------------------------------------------- actors


class RagActor:
    """Ray Data callable class: questions (tagged with their system) -> one scored row each.

    The index (BM25 or FAISS with its query encoder), the memory-mapped document store and the generator are
    loaded once per actor; every question of a call is generated in one batched pass.
    """

    def __init__(self, index: str | None, retrievals: dict[str, dict[str, Any]], generator: str,
                 prompt: dict[str, Any], dtype: str, batch_size: int, threads: int, device: str,
                 max_batch_tokens: int | None = None, search_on_gpu: bool = False):  # fmt: skip
        import torch

        from models.generator import RagPrompt, load_generator

        torch.set_num_threads(threads)
        self.threads, self.device, self.search_on_gpu = threads, device, search_on_gpu
        self.index, self.retrievals = index, retrievals
        self.searchers: dict[
            str, Any
        ] = {}  # loaded on first use: an actor may never see a system's partitions
        self.stores: dict[str, Any] = {}
        self.gen = load_generator(generator, prompt=RagPrompt(**prompt), dtype=dtype, device=device,
                                  batch_size=batch_size, max_batch_tokens=max_batch_tokens)  # fmt: skip
        self.actor = f"{os.uname().nodename}:{os.getpid()}"

    def _store(self, index: str):
        from retrieval.docstore import DocStore

        if index not in self.stores:
            self.stores[index] = DocStore.open(Path(index) / "docstore")
        return self.stores[index]

    def _searcher(self, name: str):
        if name not in self.searchers:
            import faiss

            from retrieval.candidates import CandidateGenerator, CandidateParams

            faiss.omp_set_num_threads(self.threads)
            r = self.retrievals[name]
            self.searchers[name] = CandidateGenerator(r["index"], CandidateParams(k=r["k"], retrievers=(r["kind"],)),
                                                      device=self.device,
                                                      index_device=None if self.search_on_gpu else "cpu")  # fmt: skip
        return self.searchers[name]

    def _passages(self, index: str, docids: list[str]):
        from models.generator import Passage

        store = self._store(index)
        known = [d for d in docids if d in store]
        got = store.get(known).to_pylist() if known else []
        return [Passage(r["docid"], r["text"] or "", r["title"]) for r in got], len(docids) - len(known)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from eval.rag import answer_in_context, exact_match, supporting_recall, token_f1

        t0 = time.perf_counter()
        rows = batch.to_pylist()
        contexts, missing = [], 0
        retrieved: dict[int, list[str]] = {}
        for name in dict.fromkeys(r["_system"] for r in rows if r["_system"] in self.retrievals):
            todo = [i for i, r in enumerate(rows) if r["_system"] == name]
            cands = self._searcher(name)([rows[i]["qid"] for i in todo], [rows[i]["question"] for i in todo])
            by_qid: dict[str, list[str]] = defaultdict(list)
            for q, d in zip(cands.column("qid").to_pylist(), cands.column("docid").to_pylist(), strict=True):
                by_qid[q].append(d)
            retrieved.update({i: by_qid.get(rows[i]["qid"], []) for i in todo})
        for i, r in enumerate(rows):
            if i in retrieved:
                docids, index = retrieved[i], self.retrievals[r["_system"]]["index"]
            elif r["_system"] == "oracle":
                docids, index = list(r["supporting"] or []), self.index
            else:
                docids, index = [], None
            passages, lost = self._passages(index, docids) if docids else ([], 0)
            missing += lost
            contexts.append(passages)
        answers = self.gen.generate([r["question"] for r in rows], contexts)
        out: dict[str, list] = defaultdict(list)
        for r, ctx, a in zip(rows, contexts, answers, strict=True):
            golds = [g for g in (r["answers"] or []) if g and g.strip()]
            gold_docs = set(r["supporting"] or [])
            docids = [p.docid for p in ctx]
            out["qid"].append(r["qid"])
            out["system"].append(r["_system"])
            out["question"].append(r["question"])
            out["answers"].append(r["answers"])
            out["docids"].append(docids)
            out["answer"].append(a.answer)
            out["raw"].append(a.raw)
            # an oracle row without gold passages was answered closed book: it scores nothing as the oracle
            scored = bool(golds) and not (r["_system"] == "oracle" and not gold_docs)
            out["em"].append(exact_match(a.answer, golds) if scored else None)
            out["f1"].append(token_f1(a.answer, golds) if scored else None)
            out["answer_in_context"].append(
                answer_in_context(golds, [p.text for p in ctx]) if scored and ctx else None
            )
            out["supporting_recall"].append(
                supporting_recall(docids, gold_docs) if gold_docs and r["_system"] != "closed_book" else None
            )
            out["finished"].append(a.finished)
            out["prompt_tokens"].append(a.prompt_tokens)
            out["truncated_passages"].append(a.truncated_passages)
            out["dropped_passages"].append(a.dropped_passages)
        table = pa.table({f.name: pa.array(out[f.name], f.type) for f in ROW_SCHEMA}, schema=ROW_SCHEMA)
        busy, n = time.perf_counter() - t0, table.num_rows
        for c in _TAGS.names:
            table = table.append_column(c, batch.column(c))
        return (table.append_column("_actor", pa.array([self.actor] * n, pa.string()))
                .append_column("_busy_s", pa.array([busy / max(1, n)] * n, pa.float64()))
                .append_column("_missing", pa.array([missing] + [0] * (n - 1), pa.int64())))  # fmt: skip


# ----------------------------------------------------------------------------------- partitions, io


def _write_atomic(table: pa.Table, path: Path, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.replace_schema_metadata({b"augrel": json.dumps(meta).encode()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)  # a partition is whole or absent


def write_parts(batch: pa.Table, out: str) -> pa.Table:
    """Ray Data map_batches fn (tasks): scored rows -> partitions. A partition whose rows are all here is written
    whole; part of one (a block Ray Data cut) is written as a fragment named after its rows, and the driver joins
    the fragments once they cover the partition (a retried task rewrites the same fragment)."""
    parts, summary = batch.column("_part").to_pylist(), defaultdict(list)
    for name in dict.fromkeys(parts):
        rows = batch.filter(pc.equal(batch.column("_part"), name)).sort_by("_pos")
        expect = rows.column("_expect")[0].as_py()
        scored = rows.select(ROW_SCHEMA.names)
        busy = float(pc.sum(rows.column("_busy_s")).as_py())
        if rows.num_rows == expect:
            _write_atomic(scored, Path(out) / "rows" / f"{name}.parquet",
                          {"part": name, "questions": expect, "busy_s": busy})  # fmt: skip
            fragment = ""
        else:
            first = int(rows.column("_pos")[0].as_py())
            fragment = f"{PIECES}/{name}/{first:08d}-{rows.num_rows:08d}.parquet"
            _write_atomic(
                scored.append_column("_pos", rows.column("_pos")),
                Path(out) / fragment,
                {"part": name, "busy_s": busy},
            )
        summary["part"].append(name)
        summary["questions"].append(rows.num_rows)
        summary["expect"].append(expect)
        summary["fragment"].append(fragment)
        summary["actor"].append(rows.column("_actor")[0].as_py())
        summary["busy_s"].append(busy)
        summary["missing"].append(int(pc.sum(rows.column("_missing")).as_py()))
    return pa.table(dict(summary))


def _meta(path: Path) -> dict[str, Any]:
    return json.loads((pq.read_schema(path).metadata or {}).get(b"augrel", b"{}"))


def _join_fragments(out: Path, name: str, expect: int) -> bool:
    """Write partition ``name`` from its fragments when they cover it (each position once); else leave them."""
    files = sorted((out / PIECES / name).glob("*.parquet"))
    if not files:
        return False
    busy = sum(_meta(f).get("busy_s", 0.0) for f in files)
    rows = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("_pos")
    pos = rows.column("_pos").to_numpy()
    keep = np.concatenate([[True], pos[1:] != pos[:-1]]) if len(pos) else np.zeros(0, bool)
    rows = rows.filter(pa.array(keep))
    if rows.num_rows != expect:
        return False
    _write_atomic(
        rows.drop_columns(["_pos"]),
        out / "rows" / f"{name}.parquet",
        {"part": name, "questions": expect, "busy_s": busy},
    )
    shutil.rmtree(out / PIECES / name, ignore_errors=True)
    return True


def plan_partitions(questions: pa.Table, systems: list[str], size: int) -> list[tuple[str, pa.Table]]:
    """(name, questions) of every partition: per system, ``size`` questions in qid order."""
    out = []
    for system in systems:
        for i, start in enumerate(range(0, questions.num_rows, size)):
            out.append((f"part-{system}-{i:05d}", questions.slice(start, size)))
    return out


def _tag(name: str, system: str, q: pa.Table) -> pa.Table:
    n = q.num_rows
    return (q.append_column("_system", pa.array([system] * n, pa.string()))
            .append_column("_part", pa.array([name] * n, pa.string()))
            .append_column("_pos", pa.array(np.arange(n), pa.int64()))
            .append_column("_expect", pa.array([n] * n, pa.int64())))  # fmt: skip


def transform(blocks: list[pa.Table], cfg: RagEvalConfig, retrievals: dict[str, dict[str, Any]]):
    """Lazy Ray Data pipeline: one block per partition -> RAG actors -> write tasks -> a summary per partition."""
    import ray.data

    from models.loading import device_for_gpus

    ds = ray.data.from_arrow(blocks)
    prompt = {"passage_tokens": cfg.passage_tokens, "max_new_tokens": cfg.max_new_tokens}
    ds = ds.map_batches(
        RagActor, batch_size=None, batch_format="pyarrow",
        fn_constructor_kwargs={"index": cfg.index, "retrievals": retrievals, "generator": cfg.generator,
                               "prompt": prompt, "dtype": cfg.dtype, "batch_size": cfg.batch_size,
                               "threads": max(1, round(cfg.num_cpus_per_actor)),
                               "device": device_for_gpus(cfg.num_gpus_per_actor),
                               "max_batch_tokens": cfg.max_batch_tokens, "search_on_gpu": cfg.search_on_gpu},
        compute=ray.data.ActorPoolStrategy(min_size=cfg.concurrency[0], max_size=cfg.concurrency[1]),
        num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor or None,
    )  # fmt: skip
    return ds.map_batches(write_parts, batch_size=None, batch_format="pyarrow", num_cpus=IO_TASK_CPUS,
                          compute=ray.data.TaskPoolStrategy(size=min(2, len(blocks))), fn_kwargs={"out": str(Path(cfg.out).resolve())})  # fmt: skip


def index_identity(index: str | None) -> dict[str, list] | None:
    """What identifies an index's content for --resume: every file of its docstore, bm25 and dense parts by
    name, size and modification time (an index rebuilt in place at the same path differs)."""
    if index is None:
        return None
    root = Path(index)
    files = sorted(
        f for part in ("docstore", "bm25", "dense") for f in (root / part).glob("*") if f.is_file()
    )
    return {str(f.relative_to(root)): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def generator_identity(generator: str) -> dict[str, Any]:
    """A local generator directory by its config and weight files (size, mtime); a hub id by name."""
    path = Path(generator)
    if not path.is_dir():
        return {"generator": generator}
    files = sorted(f for f in path.iterdir() if f.is_file() and (f.suffix in (".safetensors", ".bin", ".gguf")
                                                                    or f.name == "config.json"))  # fmt: skip
    return {
        "generator": str(path.resolve()),
        "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files},
    }


def _fingerprint(table: pa.Table) -> str:
    h = hashlib.sha256()
    for batch in table.to_batches():
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as w:
            w.write_batch(batch)
        h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()[:16]


def _prepare_out(cfg: RagEvalConfig, plan: dict[str, Any]) -> set[str]:
    """The partitions already written (resume), after checking OUT holds this run and no other."""
    out = Path(cfg.out)
    plan_path = out / PLAN
    done = {p.stem for p in (out / "rows").glob("part-*.parquet")}
    if plan_path.exists() and not cfg.overwrite:
        old = json.loads(plan_path.read_text())
        if not cfg.resume:
            raise ConfigError(f"out: {out} holds a rag eval run ({len(done)} of {len(old['parts'])} partitions "
                              "done): pass --resume to finish it, or --overwrite to start again")  # fmt: skip
        for key in (
            "questions",
            "index",
            "retrievals",
            "indexes",
            "generator",
            "generator_identity",
            "dtype",
            "prompt",
            "partition_questions",
        ):
            if old.get(key) != plan.get(key):
                raise ConfigError(f"--resume: '{key}' changed since the run in {out} began (was {old.get(key)!r}, "
                                  f"now {plan.get(key)!r}); use --overwrite")  # fmt: skip
        for tmp in out.rglob(".part-*.tmp"):
            tmp.unlink()
        shutil.rmtree(out / PIECES, ignore_errors=True)
    else:
        if cfg.overwrite:
            shutil.rmtree(out / "rows", ignore_errors=True)
            shutil.rmtree(out / "rejected", ignore_errors=True)
            shutil.rmtree(out / PIECES, ignore_errors=True)
            done = set()
        elif done:
            raise ConfigError(f"out: {out} already holds rows from something else: choose another directory or "
                              "pass --overwrite")  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{PLAN}.tmp"
    tmp.write_text(json.dumps(plan, indent=2) + "\n")
    os.replace(tmp, plan_path)
    return done & set(plan["parts"])


def _progress(total: int):
    import sys

    from tqdm.auto import tqdm

    if sys.stderr.isatty():
        return tqdm(total=total, desc="rag eval", unit=" questions", smoothing=0.1)
    return tqdm(total=total, desc="rag eval", unit=" questions", mininterval=30, file=sys.stdout)


# ------------------------------------------------------------------------------------------ results


def summarize_rows(rows: pa.Table, cfg: RagEvalConfig, ks: dict[str, int]) -> dict[str, Any]:
    """Per system: means with 95% CIs over questions, and the counts a reader needs to trust them."""
    from eval.rag import summarize

    systems: dict[str, Any] = {}
    for system in cfg.run_systems:
        part = rows.filter(pc.equal(rows.column("system"), system))
        if part.num_rows == 0:
            continue
        recs = part.select(list(METRICS)).to_pylist()
        s = summarize(recs, METRICS, bootstrap=cfg.bootstrap, seed=cfg.seed)
        answers = part.column("answer").to_pylist()
        systems[system] = {
            **s,
            "k": ks.get(system, 0 if system == "closed_book" else None),
            "questions": part.num_rows,
            "without_gold_answer": int(part.column("em").null_count),
            "empty_answers": sum(1 for a in answers if not (a or "").strip()),
            "unfinished": int(part.num_rows - pc.sum(part.column("finished")).as_py()),
            "dropped_passages": int(pc.sum(part.column("dropped_passages")).as_py() or 0),
            "truncated_passages": int(pc.sum(part.column("truncated_passages")).as_py() or 0),
        }
    return systems


def write_table_md(path: Path, systems: dict[str, Any], caption: str) -> None:
    def cell(m: dict[str, Any] | None) -> str:
        if not m or m.get("mean") is None:
            return "-"
        return f"{m['mean']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"

    lines = [caption, "", "| system | k | questions | EM | F1 | answer recall@k | supporting recall@k |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, s in systems.items():
        lines.append(f"| {name} | {s['k'] if s['k'] is not None else 'gold'} | {s['questions']} | {cell(s.get('em'))} "
                     f"| {cell(s.get('f1'))} | {cell(s.get('answer_in_context'))} | "
                     f"{cell(s.get('supporting_recall'))} |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def _absolute(cfg: RagEvalConfig) -> RagEvalConfig:
    """Paths as the driver resolves them: the actors and write tasks run in other working directories (and, on a
    cluster, on other nodes, which must mount the same paths). A generator that is not a local path is a hub id."""

    def a(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p else p

    gen = cfg.generator if not Path(cfg.generator).exists() else a(cfg.generator)
    retrievers = {n: r.model_copy(update={"index": a(r.index),
                                          "retriever": a(r.retriever) if Path(r.retriever).exists() else r.retriever})
                  for n, r in cfg.retrievers.items()}  # fmt: skip
    retriever = (
        a(cfg.retriever)
        if cfg.retriever not in ("bm25", "dense") and Path(cfg.retriever).exists()
        else cfg.retriever
    )
    return cfg.model_copy(update={"out": a(cfg.out), "index": a(cfg.index), "questions": a(cfg.questions),
                                  "qrels": a(cfg.qrels), "generator": gen, "retrievers": retrievers,
                                  "retriever": retriever})  # fmt: skip


def check_fits(cfg: RagEvalConfig) -> None:
    """Refuse a pool the cluster can never place (Ray Data would wait for its actors for ever): an actor needs
    more CPUs or GPUs than any node has, or the smallest pool leaves no CPU for the write tasks."""
    import ray

    if cfg.autoscaling_cluster:
        return
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if cfg.num_gpus_per_actor and not any(r.get("GPU", 0) >= cfg.num_gpus_per_actor for r in nodes):
        raise ConfigError(f"num_gpus_per_actor: {cfg.num_gpus_per_actor} GPU(s) per actor, and no node of this cluster "
                          "has that many (set autoscaling_cluster: true if a GPU group scales up on demand)")  # fmt: skip
    if not any(r.get("CPU", 0) >= cfg.num_cpus_per_actor for r in nodes):
        raise ConfigError(
            f"num_cpus_per_actor: {cfg.num_cpus_per_actor} CPUs per actor, more than any node has"
        )
    total = sum(r.get("CPU", 0) for r in nodes)
    if cfg.concurrency[0] * cfg.num_cpus_per_actor > total - IO_TASK_CPUS:
        raise ConfigError(f"concurrency: {cfg.concurrency[0]} actors x {cfg.num_cpus_per_actor} CPUs leave no CPU "
                          f"for the write tasks on this {total:g}-CPU cluster")  # fmt: skip


def run(cfg: RagEvalConfig) -> StageResult:
    """Plan partitions, run the missing ones through the RAG actor pool with a progress bar, score, write."""
    import ray

    from cluster.embedded import init_ray
    from models.generator import RagPrompt

    cfg = _absolute(cfg)
    out = Path(cfg.out)
    with Timer() as timer:
        questions, rejected = read_questions(cfg)
        systems = cfg.run_systems
        has_gold = questions.num_rows - questions.column("supporting").null_count
        if "oracle" in systems and not has_gold:
            log.warning("oracle: no question has gold supporting passages (questions.supporting or --qrels): "
                        "skipped")  # fmt: skip
            systems.remove("oracle")
            if not systems:
                raise DataError(
                    "systems: only oracle asked for, and no question has gold supporting passages"
                )
        retrievals = check_indexes(cfg)
        ks = {n: r["k"] for n, r in retrievals.items()}
        prompt = RagPrompt(passage_tokens=cfg.passage_tokens, max_new_tokens=cfg.max_new_tokens)
        parts = plan_partitions(questions, systems, cfg.partition_questions)
        plan = {"questions": _fingerprint(questions), "index": str(cfg.index), "retrievals": retrievals,
                "indexes": {i: index_identity(i) for i in {cfg.index, *(r["index"] for r in retrievals.values())} if i},
                "generator_identity": generator_identity(cfg.generator), "dtype": cfg.dtype,
                "generator": cfg.generator, "prompt": prompt.version, "partition_questions": cfg.partition_questions,
                "parts": [name for name, _ in parts]}  # fmt: skip
        done = _prepare_out(cfg, plan)
        pending = [(name, q) for name, q in parts if name not in done]
        log.info("%d partitions (%d questions x %s), %d done, %d to run", len(parts), questions.num_rows,
                 "+".join(systems), len(done), len(pending))  # fmt: skip
        generated, busy, missing, t_run = 0, 0.0, 0, 0.0
        per_actor: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        if pending:
            init_ray()
            check_fits(cfg)
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # ours counts questions; Ray's per-operator bars would repeat it
            blocks = [_tag(name, name.split("-")[1], q) for name, q in pending]
            expect = {name: q.num_rows for name, q in pending}
            fragments: set[str] = set()
            t0 = time.perf_counter()
            with _progress(sum(expect.values())) as bar:
                for batch in transform(blocks, cfg, retrievals).iter_batches(
                    batch_size=None, batch_format="pyarrow"
                ):
                    for row in batch.to_pylist():
                        bar.update(row["questions"])
                        generated += row["questions"]
                        busy += row["busy_s"]
                        missing += row["missing"]
                        per_actor[row["actor"]][0] += row["questions"]
                        per_actor[row["actor"]][1] += row["busy_s"]
                        if row["fragment"]:
                            fragments.add(row["part"])
                        if row["part"] in fragments and _join_fragments(
                            out, row["part"], expect[row["part"]]
                        ):
                            fragments.discard(row["part"])
            t_run = time.perf_counter() - t0
        written = {p.stem for p in (out / "rows").glob("part-*.parquet")}
        absent = [name for name, _ in parts if name not in written]
        if absent:
            raise DataError(f"{len(absent)} partition(s) have no rows after the run (first: {absent[0]}): run again "
                            "with --resume")  # fmt: skip
        files = [out / "rows" / f"{name}.parquet" for name, _ in parts]
        rows = pa.concat_tables([pq.read_table(f) for f in files])
        busy_all = sum(_meta(f).get("busy_s", 0.0) for f in files)
        if rows.num_rows != questions.num_rows * len(systems):
            raise DataError(
                f"{rows.num_rows} rows in {out}/rows, {questions.num_rows} x {len(systems)} expected"
            )
        summary = summarize_rows(rows, cfg, ks)
        if rejected.num_rows:
            from pipelines.io import write_table

            write_table(out / "rejected", rejected)
    k = max(ks.values(), default=0)
    shown = (
        ", ".join(f"{n}: {r['kind']} over {r['index']}" for n, r in retrievals.items())
        or "none (closed book)"
    )
    caption = (f"RAG on {questions.num_rows} questions: generator {cfg.generator}, top {k}; retrieval {shown}; "
               "95% CIs over questions.")  # fmt: skip
    metrics = {"caption": caption, "systems": summary, "retrievals": retrievals, "index": cfg.index,
               "generator": cfg.generator, "prompt_version": prompt.version, "k": k, "k_requested": cfg.k,
               # one answer per (system, question); wall time of this run includes Ray Data and model start-up, busy
               # time (summed over every partition, a resumed run's earlier ones too) is the actors' steady rate
               "answers_this_run": generated,
               "answers_per_s": round(generated / t_run, 4) if generated and t_run else None,
               "answers_per_busy_s": round(rows.num_rows / busy_all, 4) if busy_all else None,
               "answers_per_s_per_actor": {a: round(n / s, 4) if s else None for a, (n, s) in per_actor.items()},
               "oracle_passages_missing": missing}  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_table_md(out / "table.md", summary, caption)
    counts = {"questions": questions.num_rows, "rows": rows.num_rows, "generated_now": generated,
              "without_gold_answer": int(questions.num_rows - sum(1 for a in questions.column("answers").to_pylist()
                                                                  if any((x or "").strip() for x in (a or [])))),
              "rejected": rejected.num_rows}  # fmt: skip
    indexes = list(
        dict.fromkeys([*([cfg.index] if cfg.index else []), *(r["index"] for r in retrievals.values())])
    )
    return write_stage_files(out, "rag.eval", cfg, counts, [cfg.questions, *indexes],
                             timer.seconds, metrics)  # fmt: skip
