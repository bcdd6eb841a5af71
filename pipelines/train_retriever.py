"""``augrel retriever train``: fine-tune a dense bi-encoder on human, judge or utility labels on Ray Train.

Paper 2's retrieval half (../shared/papers.md, section 2): per query a group of ``group_size`` passages (its
positives, up to ``max_positives``, then hard negatives sampled each epoch from the BM25 or dense top-k minus
every passage the labels grade relevant), scored against the query by dot product over the group, in-batch and
cross-worker passages, with one of the losses of ``models.losses`` (SumMargLH by default; InfoNCE, Rand1LH,
JointLH for the ablation).

    labels (human / judge / utility / mix / curriculum) --> positives per query (retrieval.training_data)
    index/bm25 or index/dense top-k, index/docstore texts --> groups per epoch --> a Ray Dataset per epoch
    TorchTrainer (DDP: gloo on CPU, NCCL + bf16 autocast on GPU; DeepSpeed selectable) -> each worker a shard
    validation every ``eval_every`` steps on held-out queries (nDCG@10, recall@100) -> best checkpoint

OUT is the trained encoder: a sentence-transformers directory (``SentenceTransformer(OUT)`` loads it) with
``retriever_card.json`` (base model, pooling, loss, temperature, label source, data fingerprint, validation
metrics and history); every ``encoder:`` key of augrel (index build, rank features, serve, judge stack) takes it.
Checkpoints live under ``storage_path`` (default OUT/ray_train) in a run named by a fingerprint of config + data:
a cut-off run resumes from its last checkpoint, ``FailureConfig`` restarts a run whose worker died, and a run
never removes another's checkpoints.

Validation ranks a pool per held-out query, not the whole corpus (a full-corpus pass per evaluation would cost
more than the training on CPU): its BM25 top ``val_depth``, its judged passages, and ``val_distractors``
random corpus passages shared by all queries. The card says so; ``benchmarks/retriever.py`` measures the final
encoder on the full corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines import tables as T
from pipelines.data import assign_splits
from pipelines.errors import ConfigError, DataError
from pipelines.io import read_table
from pipelines.stage import StageConfig, StageResult, Timer, write_stage_files

log = logging.getLogger("augrel")

LossName = Literal["infonce", "rand1lh", "jointlh", "summarglh"]


class LabelSettings(BaseModel):
    """Where the positives come from.

    ``human``: grades of ``human`` tables (qrels or pairs) at or above ``min_grade``. ``judge``: a judgments table
    in ``llm`` (grade at or above ``judge_threshold``, default ``min_grade``, or the top ``judge_top_fraction`` of
    each query's pairs by expected grade, at least one). ``utility``: any table in ``llm`` with qid, docid and a
    ``selected`` or ``label`` column. ``mix``: human positives for a seeded ``human_fraction`` of the human-labelled
    queries, LLM positives (``llm_kind``) for the rest, as one pool. ``curriculum``: LLM positives for ``epochs``,
    then one more epoch, learning rate reset, on the human positives of a seeded ``human_fraction`` of queries
    (paper 2's 20% setting)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["human", "judge", "utility", "mix", "curriculum"] = "human"
    human: list[str] = Field(default_factory=list, description="qrels or pairs tables with human grades")
    llm: list[str] = Field(default_factory=list, description="judgments (judge) or utility tables")
    llm_kind: Literal["judge", "utility"] = Field(
        "judge", description="what the llm tables are (mix, curriculum)"
    )
    min_grade: int = Field(2, description="grade at or above which a label is a positive (TREC DL: 2)")
    judge_threshold: float | None = Field(
        None, description="judge grade at or above which a pair is positive"
    )
    judge_top_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="instead: the top fraction of each query's judged pairs by expected grade",
    )
    human_fraction: float = Field(
        0.2, ge=0, le=1, description="mix / curriculum: share of human-labelled queries"
    )
    exclude_graded: bool = Field(
        True,
        description="never use as a negative a passage any label grades relevant (grade >= 1 or selected)",
    )

    @field_validator("human", "llm", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _tables_present(self) -> LabelSettings:
        if self.source in ("human", "mix", "curriculum") and not self.human:
            raise ValueError(f"labels.human: source {self.source} needs human-labelled tables")
        if self.source in ("judge", "utility", "mix", "curriculum") and not self.llm:
            raise ValueError(f"labels.llm: source {self.source} needs judgments or utility tables")
        return self

    @model_validator(mode="after")
    def _one_judge_rule(self) -> LabelSettings:
        if self.judge_threshold is not None and self.judge_top_fraction is not None:
            raise ValueError("labels: give judge_threshold or judge_top_fraction, not both")
        return self

    @property
    def llm_source(self) -> str:
        return self.source if self.source in ("judge", "utility") else self.llm_kind


class RetrieverTrainConfig(StageConfig):
    """``augrel retriever train``: data, encoder, loss, groups, optimisation and the Ray Train setup."""

    index: str = Field(
        description="`augrel index build` directory: docstore (texts), bm25 / dense (negatives)"
    )
    queries: list[str] = Field(
        description="queries tables (qid, query) of the training and validation queries"
    )
    labels: LabelSettings
    out: str = Field(description="output directory: the trained encoder (a sentence-transformers directory)")
    val: list[str] | None = Field(
        None,
        description="human qrels of held-out validation queries; default: val_fraction of the human queries",
    )
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of human-labelled queries held out")
    exclude_queries: list[str] = Field(
        default_factory=list,
        description="queries tables whose queries are never trained or validated on (a test split)",
    )
    base_model: str | None = Field(None, description="encoder hub id or path; default: the packaged MiniLM")
    pooling: Literal["cls", "mean"] | None = Field(None, description="default: the base model's own")
    normalize: bool | None = Field(
        None, description="L2-normalise the vectors; default: the base model's own"
    )
    query_prefix: str | None = None
    passage_prefix: str | None = None
    max_query_length: int = Field(32, gt=0)
    max_passage_length: int = Field(192, gt=0)
    loss: LossName = Field("summarglh", description="infonce, rand1lh, jointlh or summarglh (paper 2's)")
    temperature: float | None = Field(
        None, gt=0, description="default: 1.0 on raw dot products (paper 2), 0.05 on unit vectors (cosines)"
    )
    group_size: int = Field(16, ge=2, description="passages per query: positives + hard negatives")
    max_positives: int = Field(8, ge=1, description="positives per group (InfoNCE and Rand1LH use one)")
    negatives: Literal["bm25", "dense"] = Field(
        "bm25", description="hard negatives from BM25 or the dense index"
    )
    negative_depth: int = Field(30, gt=0, description="candidates per query negatives are sampled from")
    epochs: int = Field(2, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    batch_size: int = Field(16, gt=0, description="queries per optimizer step, over all workers")
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_every: int | None = Field(
        None, gt=0, description="evaluate + checkpoint every N steps; default: per epoch"
    )
    val_depth: int = Field(100, gt=0, description="BM25 candidates per validation query in its pool")
    val_distractors: int = Field(
        1000, ge=0, description="random corpus passages added to every validation pool"
    )
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, gt=0)
    deepspeed: str | None = Field(
        None, description="null: DDP; zero2, zero3, zero3_offload or a DeepSpeed JSON for larger backbones"
    )
    dtype: str = Field(
        "auto", pattern="^(auto|bf16|fp32)$", description="autocast dtype on GPU (weights fp32)"
    )
    max_failures: int = Field(2, ge=0)
    storage_path: str | None = Field(None, description="Ray Train storage (default: OUT/ray_train)")
    resume: bool = Field(True, description="continue this run's last checkpoint if it was cut off")
    seed: int = 13

    @field_validator("queries", "val", "exclude_queries", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("deepspeed")
    @classmethod
    def _known_deepspeed(cls, v: str | None) -> str | None:
        from cluster.profiles import deepspeed_names

        if v is not None and not Path(v).suffix and v not in deepspeed_names():
            raise ValueError(
                f"{v!r}: use null (DDP), {', '.join(deepspeed_names())}, or a DeepSpeed JSON path"
            )
        return v

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> RetrieverTrainConfig:
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of num_workers ({self.num_workers}): each "
                "worker takes batch_size / num_workers queries per step"
            )
        if self.max_positives >= self.group_size:
            raise ValueError(f"max_positives ({self.max_positives}) must leave room for negatives in a group of "
                             f"group_size ({self.group_size})")  # fmt: skip
        return self

    def positives_per_group(self) -> int:
        return 1 if self.loss == "infonce" else self.max_positives


#: config fields that do not change what is trained
_NOT_TRAINING = {"out", "resume", "storage_path", "max_failures"}


# ------------------------------------------------------------------------------------------ data


def _qids(paths: list[str]) -> set[str]:
    return {q for p in paths for q in read_table(p).column("qid").cast(pa.string()).to_pylist()}


def _queries(cfg: RetrieverTrainConfig) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in cfg.queries:
        t = T.conform(T.QUERIES, read_table(p), p)
        good, bad = T.split_rejected(T.QUERIES, t, source=p)
        if bad.num_rows:
            log.warning("%s: %d queries skipped (%s)", p, bad.num_rows, bad.column("reason")[0].as_py())
        out.update(zip(good.column("qid").to_pylist(), good.column("query").to_pylist(), strict=True))
    if not out:
        raise DataError(f"queries: no valid query in {cfg.queries}")
    return out


def _label_table(paths: list[str], kind: str) -> pa.Table:
    """The label tables concatenated on the columns the source needs (ids as strings)."""
    parts = []
    for p in paths:
        t = read_table(p)
        for c in ("qid", "docid"):
            if c in t.column_names:
                t = t.set_column(t.column_names.index(c), c, t.column(c).cast(pa.string()))
        parts.append(t)
    keep = set.intersection(*(set(t.column_names) for t in parts))
    return pa.concat_tables([t.select([c for c in parts[0].column_names if c in keep]) for t in parts],
                            promote_options="permissive")  # fmt: skip


def _positives(table: pa.Table, source: str, labels: LabelSettings, name: str) -> dict[str, list[str]]:
    from retrieval.training_data import LabelsError, positives_from_labels

    kwargs: dict[str, Any] = {"min_grade": labels.min_grade, "table_name": name}
    if source == "judge":
        kwargs.update(threshold=labels.judge_threshold, top_fraction=labels.judge_top_fraction)
    try:
        return positives_from_labels(table, source, **kwargs)  # type: ignore[arg-type]
    except LabelsError as e:
        raise DataError(f"labels: {e}") from e


class TrainingData(BaseModel):
    """What the driver hands Ray Train, and the summary the card keeps."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    phases: list[dict[str, Any]]  # name, epochs, group set (not serialised), manifest
    val_qrels: dict[str, dict[str, int]]
    val_queries: dict[str, str]
    summary: dict[str, Any]
    fingerprint: str


def prepare(cfg: RetrieverTrainConfig) -> tuple[TrainingData, Any]:
    """Positives per phase, groups, and the validation queries; returns the data and the opened docstore."""
    from retrieval.docstore import DocStore
    from retrieval.training_data import build_groups, curriculum_stages, graded_relevant, mix_positives

    index = Path(cfg.index)
    if not DocStore.exists(index / "docstore"):
        raise DataError(f"index: {index}/docstore not found (build it with `augrel index build`)")
    store = DocStore.open(index / "docstore")
    queries = _queries(cfg)
    excluded = _qids(cfg.exclude_queries) if cfg.exclude_queries else set()
    L = cfg.labels
    human_t = _label_table(L.human, "human") if L.human else None
    llm_t = _label_table(L.llm, L.llm_source) if L.llm else None
    human = _positives(human_t, "human", L, ",".join(L.human)) if human_t is not None else {}
    llm = _positives(llm_t, L.llm_source, L, ",".join(L.llm)) if llm_t is not None else {}

    # validation: held-out human queries, never trained on under any label source
    if cfg.val:
        val_t = _label_table(cfg.val, "human")
        val_qrels = _qrels(val_t)
    elif human_t is not None:
        labelled = sorted(set(human) - excluded)
        split = assign_splits(labelled, {"train": 1 - cfg.val_fraction, "val": cfg.val_fraction}, cfg.seed)
        val_ids = {q for q, s in split.items() if s == "val"}
        val_qrels = {q: g for q, g in _qrels(human_t).items() if q in val_ids}
    else:
        raise ConfigError("val: a judge or utility source without human tables needs human qrels of held-out "
                          "validation queries (val: [...])")  # fmt: skip
    val_qrels = {
        q: g
        for q, g in val_qrels.items()
        if q in queries and q not in excluded and max(g.values()) >= L.min_grade
    }
    if not val_qrels:
        raise DataError(f"val: no validation query with a passage of grade >= {L.min_grade} (labels.min_grade) "
                        "among the queries tables")  # fmt: skip
    held_out = set(val_qrels) | excluded

    def keep(p: dict[str, list[str]]) -> dict[str, list[str]]:
        return {q: d for q, d in p.items() if q not in held_out}

    human, llm = keep(human), keep(llm)
    if L.source == "human":
        stages = [("human", human, cfg.epochs)]
    elif L.source in ("judge", "utility"):
        stages = [(L.source, llm, cfg.epochs)]
    elif L.source == "mix":
        mixed, chosen = mix_positives(human, llm, L.human_fraction, cfg.seed)
        stages = [("mix", mixed, cfg.epochs)]
    else:
        first, second = curriculum_stages(llm, human, L.human_fraction, cfg.seed)
        stages = [(first.name, first.positives, cfg.epochs), (second.name, second.positives, 1)]

    exclude: dict[str, set[str]] = {}
    if L.exclude_graded:
        for t in (x for x in (human_t, llm_t) if x is not None):
            flag_ok = "label" in t.column_names or "selected" in t.column_names
            if flag_ok:
                for q, docs in graded_relevant(t, min_grade=1).items():
                    exclude.setdefault(q, set()).update(docs)

    all_train = sorted({q for _, pos, _ in stages for q in pos if q in queries})
    print(f"retriever data: {len(all_train)} training queries ({', '.join(f'{n}: {len(p)}' for n, p, _ in stages)}"
          f"), {len(val_qrels)} validation queries, negatives from {cfg.negatives} top {cfg.negative_depth}",
          flush=True)  # fmt: skip
    candidates = _candidates(cfg, {q: queries[q] for q in all_train})

    def doc_text(docids):
        return _texts(store, docids)

    phases = []
    for name, pos, epochs in stages:
        groups = build_groups({q: queries[q] for q in pos if q in queries}, pos, candidates, doc_text,
                              group_size=cfg.group_size, max_positives=cfg.positives_per_group(),
                              exclude=exclude, seed=cfg.seed)  # fmt: skip
        if len(groups) < cfg.batch_size:
            raise DataError(f"labels: phase {name!r} has {len(groups)} usable training queries, fewer than "
                            f"batch_size ({cfg.batch_size}); manifest: {json.dumps(groups.manifest)}")  # fmt: skip
        phases.append({"name": name, "epochs": epochs, "groups": groups, "manifest": groups.manifest})
    h = hashlib.sha256(
        json.dumps(cfg.model_dump(mode="json", exclude=_NOT_TRAINING), sort_keys=True).encode()
    )
    for p in phases:
        h.update(p["groups"].fingerprint().encode())
    h.update(json.dumps(val_qrels, sort_keys=True).encode())
    summary = {
        "label_source": L.source,
        "phases": [
            {"name": p["name"], "epochs": p["epochs"], "queries": len(p["groups"]), **p["manifest"]}
            for p in phases
        ],
        "validation_queries": sorted(val_qrels),
        "excluded_queries": len(excluded),
        "negatives": f"{cfg.negatives} top {cfg.negative_depth}",
    }
    if L.source == "mix":
        summary["human_queries"] = sorted(chosen)
    data = TrainingData(phases=phases, val_qrels=val_qrels, val_queries={q: queries[q] for q in val_qrels},
                        summary=summary, fingerprint=h.hexdigest()[:12])  # fmt: skip
    return data, store


def _qrels(t: pa.Table) -> dict[str, dict[str, int]]:
    t = t.filter(pc.is_valid(t.column("label")))
    out: dict[str, dict[str, int]] = {}
    for q, d, g in zip(t.column("qid").to_pylist(), t.column("docid").to_pylist(), t.column("label").to_pylist(),
                       strict=True):  # fmt: skip
        out.setdefault(q, {})[d] = int(g)
    return out


def _texts(store, docids) -> list[str | None]:
    """Texts of ``docids`` in order, None for a docid not in the corpus."""
    docids = list(docids)
    rows = store.rows(docids)
    found = np.flatnonzero(rows >= 0)
    texts: list[str | None] = [None] * len(docids)
    for i, t in zip(found, store.take(rows[found]).column("text").to_pylist(), strict=True):
        texts[i] = t
    return texts


def _candidates(cfg: RetrieverTrainConfig, queries: dict[str, str]) -> dict[str, list[str]]:
    """Ranked candidate docids per training query, negatives are drawn from (BM25 or the index's dense vectors)."""
    qids, texts = list(queries), list(queries.values())
    depth = cfg.negative_depth + cfg.max_positives
    index = Path(cfg.index)
    if cfg.negatives == "bm25":
        from retrieval.bm25 import BM25Index

        hits = BM25Index.load(index / "bm25").search(texts, k=depth)
    else:
        from models.encoder import BiEncoder
        from retrieval.dense import DenseIndex

        if not (index / "dense").is_dir():
            raise ConfigError(f"negatives: dense needs {index}/dense (build the index with dense: true)")
        dense = DenseIndex.load(index / "dense", device="cpu")
        encoder = BiEncoder(dense.params.encoder)
        if encoder.dim != dense.dim:
            raise ConfigError(f"negatives: encoder {dense.params.encoder or 'MiniLM'} makes {encoder.dim}-d vectors, "
                              f"{index}/dense holds {dense.dim}-d ones")  # fmt: skip
        hits = dense.search(encoder.encode_queries(texts), k=depth)
    return {q: [d for d, _ in h] for q, h in zip(qids, hits, strict=True)}


def epoch_table(groups, epoch: int, store) -> pa.Table:
    """One epoch's groups as rows: qid, query, passages (group texts, positives first), positive (mask)."""
    from retrieval.training_data import batch_inputs

    rows = groups.epoch(epoch)
    queries, docids, mask = batch_inputs(rows)
    texts = _texts(store, docids)
    g = groups.group_size
    return pa.table({
        "qid": [r.qid for r in rows], "query": queries,
        "passages": [[t or "" for t in texts[i * g:(i + 1) * g]] for i in range(len(rows))],
        "positive": mask,
    })  # fmt: skip


def validation_pool(cfg: RetrieverTrainConfig, data: TrainingData, store) -> dict[str, Any]:
    """Per validation query: its BM25 top ``val_depth`` and judged passages, plus random distractors shared by
    all; the texts once each."""
    from retrieval.bm25 import BM25Index

    bm25 = BM25Index.load(Path(cfg.index) / "bm25")
    qids = sorted(data.val_queries)
    hits = bm25.search([data.val_queries[q] for q in qids], k=cfg.val_depth)
    rng = np.random.default_rng(cfg.seed)
    n = len(store)
    rows = rng.choice(n, size=min(cfg.val_distractors, n), replace=False) if cfg.val_distractors else []
    distractors = store.docids().take(pa.array(np.sort(rows))).to_pylist() if len(rows) else []
    per_query = {q: sorted({d for d, _ in h} | {d for d in data.val_qrels[q] if d in store})
                 for q, h in zip(qids, hits, strict=True)}  # fmt: skip
    docids = sorted(set(distractors).union(*per_query.values()))
    return {"qids": qids, "queries": [data.val_queries[q] for q in qids], "docids": docids,
            "texts": [t or "" for t in _texts(store, docids)], "candidates": per_query,
            "distractors": distractors, "qrels": data.val_qrels, "min_rel": cfg.labels.min_grade}  # fmt: skip


# ------------------------------------------------------------------------------------ worker loop

LOSSES = {
    "infonce": "InfoNCELoss",
    "rand1lh": "Rand1LHLoss",
    "jointlh": "JointLHLoss",
    "summarglh": "SumMargLHLoss",
}


def make_loss(name: str, temperature: float, seed: int):
    import models.losses as losses

    cls = getattr(losses, LOSSES[name])
    return (
        cls(temperature=temperature, gather=True, seed=seed) if name == "rand1lh" else cls(temperature, True)
    )


def lr_schedule(phases: list[dict[str, Any]], warmup_ratio: float) -> Callable[[int], float]:
    """The learning-rate factor of global step s: linear warm-up then linear decay within each phase, so the
    curriculum's second phase starts its learning rate afresh (paper 2)."""
    bounds, start = [], 0
    for p in phases:
        bounds.append((start, p["steps"]))
        start += p["steps"]

    def factor(s: int) -> float:
        for begin, steps in bounds:
            if s < begin + steps:
                i, warm = s - begin, max(1, int(warmup_ratio * steps))
                return min(1.0, (i + 1) / warm) * max(0.0, 1 - i / max(1, steps))
        return 0.0

    return factor


def _evaluate(encoder, pool: dict[str, Any], rank: int, world: int, dist) -> dict[str, float]:
    """nDCG@10 / R@100 / MRR@10 of the validation queries over their pools; every rank encodes an equal share of
    the passages (equal: under ZeRO-3 each forward is a collective)."""
    from eval.ranking import evaluate_run, short_name

    texts = pool["texts"]
    per = math.ceil(len(texts) / world)
    mine = (texts[rank * per:(rank + 1) * per] + [texts[0]] * per)[:per]  # fmt: skip
    vecs = encoder.encode_passages(mine)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, vecs) if world > 1 else gathered.__setitem__(0, vecs)
    doc_vec = np.concatenate(gathered)[: len(texts)]
    row = {d: i for i, d in enumerate(pool["docids"])}
    qvec = encoder.encode_queries(pool["queries"])
    run: dict[str, dict[str, float]] = {}
    for qi, q in enumerate(pool["qids"]):
        cand = pool["candidates"][q] + [d for d in pool["distractors"] if d not in pool["candidates"][q]]
        scores = doc_vec[[row[d] for d in cand]] @ qvec[qi]
        top = np.argsort(-scores, kind="stable")[:100]
        run[q] = {cand[i]: float(scores[i]) for i in top}
    # relevant at the labels' own grade (HotpotQA's is_supporting is 1; TREC DL's relevant is 2)
    rep = evaluate_run(run, pool["qrels"], min_rel=pool.get("min_rel", 2))
    return {f"val_{short_name(m)}": v for m, v in rep.mean.items()}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the encoder in DDP (or a DeepSpeed engine); train, evaluate, checkpoint."""
    import contextlib

    import ray.train
    import torch
    import torch.distributed as dist

    from models.encoder import BiEncoder
    from models.loading import resolve_dtype

    cfg = RetrieverTrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    if not cfg.use_gpu:
        torch.set_num_threads(cfg.cpus_per_worker)
    device = str(ray.train.torch.get_device()) if cfg.use_gpu else "cpu"
    phases, temperature = config["phases"], config["temperature"]
    micro = cfg.batch_size // world
    total = sum(p["steps"] for p in phases)

    ckpt = ray.train.get_checkpoint()
    step, history, resumed_from = 0, [], []
    ckpt_dir = None
    if ckpt:
        ckpt_dir = ckpt.to_directory()  # a local copy: the model is loaded from it below
        state = json.loads(Path(ckpt_dir, "state.json").read_text())
        step, history = state["step"], state["history"]
        resumed_from = [*state.get("resumed_from", []), step]
        if rank == 0:
            print(f"resumed from step {step}", flush=True)
    # A resumed run starts from the checkpoint's weights (a sentence-transformers directory like the output).
    start = str(Path(ckpt_dir, "model")) if ckpt_dir else cfg.base_model
    encoder = BiEncoder(start, pooling=cfg.pooling, normalize=cfg.normalize, query_prefix=cfg.query_prefix,
                        passage_prefix=cfg.passage_prefix, max_query_length=cfg.max_query_length,
                        max_passage_length=cfg.max_passage_length, device=device, batch_size=64)  # fmt: skip
    encoder.model.train()
    autocast_dtype = resolve_dtype(cfg.dtype, device) if cfg.use_gpu else torch.float32

    class TwoTower(torch.nn.Module):
        """Queries and passages through one forward: DDP expects one forward per backward."""

        def __init__(self, st):
            super().__init__()
            self.st = st

        def forward(self, q_features, p_features):
            return self.st(q_features)["sentence_embedding"], self.st(p_features)["sentence_embedding"]

    tower = TwoTower(encoder.model)
    params = [p for p in tower.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(phases, cfg.warmup_ratio))
    engine = None
    if cfg.deepspeed:
        import deepspeed

        from cluster.profiles import deepspeed_config

        ds_cfg = deepspeed_config(cfg.deepspeed, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1,
                                  bf16=autocast_dtype == torch.bfloat16)  # fmt: skip
        ds_cfg["zero_force_ds_cpu_optimizer"] = False
        if cfg.max_grad_norm:
            ds_cfg["gradient_clipping"] = cfg.max_grad_norm
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=tower, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg
        )
        model = engine
        if ckpt_dir:
            engine.load_checkpoint(os.path.join(ckpt_dir, "deepspeed"), tag="ckpt", load_module_strict=False)
    else:
        # DDP when world > 1, on the worker's device. Unused parameters are expected: sentence-transformers
        # pools the token states itself, so a BERT checkpoint's pooler layer never receives a gradient.
        model = ray.train.torch.prepare_model(
            tower, parallel_strategy_kwargs={"find_unused_parameters": True}
        )
        if ckpt_dir and Path(ckpt_dir, "optimizer.pt").exists():
            opt_state = torch.load(Path(ckpt_dir, "optimizer.pt"), map_location=device, weights_only=True)
            optimizer.load_state_dict(opt_state["optimizer"])
            scheduler.load_state_dict(opt_state["scheduler"])
    loss_fn = make_loss(cfg.loss, temperature, cfg.seed)

    def checkpoint(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            if engine is not None:
                engine.save_checkpoint(os.path.join(tmp, "deepspeed"), tag="ckpt")
                gather = contextlib.nullcontext()
                if engine.zero_optimization_stage() == 3:
                    gather = deepspeed.zero.GatheredParameters(
                        list(encoder.model.parameters()), modifier_rank=None
                    )
                with gather:
                    if rank == 0:
                        encoder.save(
                            Path(tmp, "model"),
                            encoder.describe(base_model=cfg.base_model or "all-MiniLM-L6-v2"),
                        )
            elif rank == 0:
                encoder.save(
                    Path(tmp, "model"), encoder.describe(base_model=cfg.base_model or "all-MiniLM-L6-v2")
                )
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                           Path(tmp, "optimizer.pt"))  # fmt: skip
            if rank == 0:
                Path(tmp, "state.json").write_text(json.dumps({"step": step, "history": history,
                                                               "resumed_from": resumed_from}))  # fmt: skip
            keep = rank == 0 or engine is not None  # DeepSpeed shards its optimizer state over the ranks
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if keep else None)

    def evaluate() -> dict[str, float]:
        encoder.model.eval()
        with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype,
                            enabled=autocast_dtype != torch.float32):  # fmt: skip
            m = _evaluate(encoder, config["val_pool"], rank, world, dist)
        encoder.model.train()
        return m

    t0, losses, done = time.perf_counter(), [], step
    first_step = 0
    for phase in phases:
        for e in range(phase["epochs"]):
            name = f"{phase['name']}-{e}"
            if step >= first_step + phase["steps_per_epoch"] * (e + 1) or step >= total:
                continue  # an epoch trained before a restart
            if hasattr(loss_fn, "set_epoch"):
                loss_fn.set_epoch(phase["epoch_offset"] + e)
            shard = ray.train.get_dataset_shard(name)
            epoch_start = first_step + phase["steps_per_epoch"] * e
            for i, batch in enumerate(
                shard.iter_batches(batch_size=micro, batch_format="pyarrow", drop_last=True)
            ):
                if i >= phase["steps_per_epoch"] or step >= total:
                    break
                if epoch_start + i < step:  # trained before a restart
                    continue
                queries = batch.column("query").to_pylist()
                passages = [t for g in batch.column("passages").to_pylist() for t in g]
                mask = torch.tensor(batch.column("positive").to_pylist(), dtype=torch.bool, device=device)
                qf, pf = encoder.features(queries, "query"), encoder.features(passages, "passage")
                with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype,
                                    enabled=autocast_dtype != torch.float32):  # fmt: skip
                    q, p = model(qf, pf)
                loss = loss_fn(q.float(), p.float(), mask)
                if engine is not None:
                    engine.backward(loss)
                    engine.step()
                else:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                step += 1
                losses.append(float(loss.detach()))
                if config.get("after_step") is not None:  # a caller's hook: the recovery test kills a worker
                    config["after_step"](step=step, rank=rank, world=world, resumed=bool(ckpt))
                if step % config["eval_every"] == 0 or step == total:
                    metrics = evaluate()
                    elapsed = time.perf_counter() - t0
                    metrics.update(step=step, phase=phase["name"], epoch=e, seconds=round(elapsed, 1),
                                   train_loss=float(np.mean(losses)) if losses else float("nan"),
                                   lr=float(scheduler.get_last_lr()[0]),
                                   groups_per_s=round((step - done) * cfg.batch_size / max(elapsed, 1e-9), 2))  # fmt: skip
                    history.append(metrics)
                    losses = []
                    if rank == 0:
                        print(f"step {step}/{total} [{phase['name']}] loss {metrics['train_loss']:.4f} "
                              f"val ndcg@10 {metrics['val_ndcg10']:.4f} R@100 {metrics['val_recall100']:.4f} "
                              f"({elapsed:.0f}s)", flush=True)  # fmt: skip
                    checkpoint(metrics)
        first_step += phase["steps"]


# ------------------------------------------------------------------------------------------ driver


def default_temperature(cfg: RetrieverTrainConfig, normalized: bool) -> float:
    """Paper 2 uses temperature 1 on raw dot products; on unit vectors scores lie in [-1, 1] and a temperature of
    1 leaves the softmax almost flat, so cosine encoders (MiniLM) take 0.05 (sentence-transformers' scale 20)."""
    return cfg.temperature if cfg.temperature is not None else (0.05 if normalized else 1.0)


def train(cfg: RetrieverTrainConfig, *, after_step: Callable[..., None] | None = None) -> StageResult:
    """Build the groups, run the Ray Train job, and write the best checkpoint as the encoder directory."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.embedded import init_ray
    from models.encoder import BiEncoder, RetrieverCard

    out = Path(cfg.out).resolve()
    init_ray()
    with Timer() as timer:
        data, store = prepare(cfg)
        base = BiEncoder(cfg.base_model, pooling=cfg.pooling, normalize=cfg.normalize)
        temperature = default_temperature(cfg, base.normalize)
        ray.data.DataContext.get_current().enable_progress_bars = False
        datasets, phases, offset = {}, [], 0
        for p in data.phases:
            groups = p["groups"]
            steps_per_epoch = len(groups) // cfg.batch_size
            epochs = p["epochs"]
            steps = steps_per_epoch * epochs
            if cfg.max_steps:
                steps = min(steps, max(0, cfg.max_steps - sum(x["steps"] for x in phases)))
            for e in range(epochs):
                datasets[f"{p['name']}-{e}"] = ray.data.from_arrow(epoch_table(groups, e, store))
            phases.append({"name": p["name"], "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                           "steps": steps, "epoch_offset": offset})  # fmt: skip
            offset += epochs
        total = sum(p["steps"] for p in phases)
        if total == 0:
            raise ConfigError("max_steps / batch_size leave no training step")
        eval_every = cfg.eval_every or max(1, phases[0]["steps_per_epoch"])
        val_pool = validation_pool(cfg, data, store)
        storage = Path(cfg.storage_path or out / "ray_train").resolve()
        run_name = f"retriever-{data.fingerprint}"
        if not cfg.resume and (storage / run_name).is_dir():
            log.info("removing %s: resume=false", storage / run_name)
            shutil.rmtree(storage / run_name)
        print(f"training {cfg.loss} (temperature {temperature}) for {total} steps of {cfg.batch_size} queries x "
              f"{cfg.group_size} passages on {cfg.num_workers} worker(s); validation on {len(val_pool['qids'])} "
              f"queries over {len(val_pool['docids'])} passages", flush=True)  # fmt: skip
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "phases": phases, "temperature": temperature,
                               "val_pool": val_pool, "eval_every": eval_every, "after_step": after_step},
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                         resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                               **({"GPU": 1} if cfg.use_gpu else {})}),
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            run_config=RunConfig(name=run_name, storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=cfg.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2,
                                                                    checkpoint_score_attribute="val_ndcg10",
                                                                    checkpoint_score_order="max")),
            datasets=datasets,
            dataset_config=DataConfig(datasets_to_split="all"),
        )  # fmt: skip
        result = trainer.fit()
        best_ckpt, best_metrics = max(
            result.best_checkpoints, key=lambda cm: _nan_low(cm[1].get("val_ndcg10"))
        )
        with result.checkpoint.as_directory() as d:  # the latest: the whole history
            state = json.loads(Path(d, "state.json").read_text())
        with best_ckpt.as_directory() as d:
            for child in out.iterdir() if out.exists() else []:
                if child.name not in ("ray_train", "config.yaml", "manifest.json") and child != storage:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            out.mkdir(parents=True, exist_ok=True)
            shutil.copytree(Path(d) / "model", out, dirs_exist_ok=True)
        metrics = {
            k: v for k, v in best_metrics.items() if k.startswith("val_") or k in ("step", "train_loss")
        }
        card = RetrieverCard.load(out).model_copy(update={
            "base_model": cfg.base_model or "all-MiniLM-L6-v2", "loss": cfg.loss, "temperature": temperature,
            "label_source": cfg.labels.source, "data_fingerprint": data.fingerprint,
            "data": {**data.summary, "validation": "pool per query: BM25 top "
                     f"{cfg.val_depth} + judged passages + {len(val_pool['distractors'])} random passages"},
            "metrics": metrics,
            "training": {"history": state["history"], "resumed_from_steps": state.get("resumed_from", []),
                         "num_workers": cfg.num_workers, "batch_size": cfg.batch_size, "epochs": cfg.epochs,
                         "lr": cfg.lr, "group_size": cfg.group_size, "max_positives": cfg.positives_per_group(),
                         "deepspeed": cfg.deepspeed, "ray_train_run": str(storage / run_name)},
        })  # fmt: skip
        card.save(out)
    counts = {"train_queries": sum(len(p["groups"]) for p in data.phases), "val_queries": len(data.val_qrels),
              "steps": total}  # fmt: skip
    inputs = [*cfg.labels.human, *cfg.labels.llm, *(cfg.val or []), *cfg.queries]
    return write_stage_files(out, "retriever.train", cfg, counts, inputs, timer.seconds,
                             {"metrics": metrics, "temperature": temperature, "storage": str(storage)})  # fmt: skip


def _nan_low(x: float | None) -> float:
    return float("-inf") if x is None or (isinstance(x, float) and math.isnan(x)) else x
