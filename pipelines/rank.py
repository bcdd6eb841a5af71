"""Learning to rank: ``augrel rank features|train|predict|eval``.

- ``features``: a Ray Data stage. A BM25 index is built once over the corpus (the docs table, or the pairs'
  distinct documents) and saved beside the output; an actor pool (BM25 index + MiniLM encoder loaded once per
  actor) turns pairs into the features table: ``qid, docid, label`` (human grade, may be null) and one float32
  column per feature of ``models.features.FEATURES``.
- ``train``: LightGBM LambdaMART on a features table with the labels chosen by ``label_source``:
  ``human`` (human grades only), ``judge`` (the judge's label on every pair), ``mix`` (human where known and kept,
  judge elsewhere) or ``curriculum`` (judge labels first, then more trees on the human labels; paper 2).
  ``human_fraction`` keeps that share of each query's human labels (seeded), the rest count as unknown.
- ``predict``: features -> run table (qid, docid, score, rank).
- ``eval``: run vs qrels: NDCG@10/100, MRR@10, R@100 per query (``eval.ranking``), and a paired comparison with
  a baseline run when given.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from pipelines import tables as T
from pipelines.errors import ConfigError, DataError
from pipelines.io import expand_paths, read_table, write_table
from pipelines.stage import StageConfig, StageResult, Timer, write_stage_files

log = logging.getLogger("augrel")

LabelSource = Literal["human", "judge", "mix", "curriculum"]


# --------------------------------------------------------------------------------------------- features


class FeaturesConfig(StageConfig):
    """``augrel rank features``: pairs -> features table (BM25, dense cosine, lengths, overlap)."""

    pairs: str = Field(description="pairs table (qid, docid, query, text, title?, label?)")
    out: str = Field(description="output directory for the features table (and bm25/, the index)")
    docs: str | None = Field(
        None, description="docs table for the BM25 corpus; default: the pairs' documents"
    )
    encoder: str | None = Field(None, description="dense encoder dir or hub id; default: packaged MiniLM")
    k1: float = Field(0.9, gt=0)
    b: float = Field(0.4, ge=0, le=1)
    batch_size: int = Field(256, gt=0)
    concurrency: tuple[int, int] = (1, 1)
    num_cpus_per_actor: float = Field(1.0, gt=0)
    num_gpus_per_actor: float = Field(0, ge=0, description="> 0: the encoder runs on the actor's GPU")


#: Read and write tasks are light: they reserve little CPU, so they always fit beside the actor pool (a pool
#: holding every CPU would starve them and the dataset would hang).
IO_TASK_CPUS = 0.1
#: Batches per input block: blocks stay a few batches big, so every actor gets several and none holds a queue.
BATCHES_PER_BLOCK = 4
#: Rows per features part file (a write task bundles blocks up to this).
ROWS_PER_PART = 1 << 16
#: How long the stage waits for its pool's minimum actors before the first block is handed out: blocks given out
#: while only one actor is up queue on it and the others stay idle. Long, as a node may be added on demand.
WAIT_FOR_ACTORS_S = 1800


def plan_blocks(n_rows: int, actors: int, batch_size: int) -> tuple[int, int]:
    """(rows per input block, rows per actor call) for ``n_rows`` pairs over a pool of at most ``actors`` actors.

    Every actor gets at least two calls when there are rows for it (a table smaller than ``actors`` batches
    gets smaller batches), and no block holds more than ``BATCHES_PER_BLOCK`` batches: one block per table fed
    one actor while the others idled.
    """
    actors = max(1, actors)
    batch = max(1, min(batch_size, -(-n_rows // (2 * actors))))
    blocks = max(1, min(n_rows, max(2 * actors, -(-n_rows // (BATCHES_PER_BLOCK * batch)))))
    return max(1, -(-n_rows // blocks)), batch


class FeatureActor:
    """Ray Data callable class: a batch of pairs -> their feature columns. Loads the index and encoder once.

    Input columns: qid, docid, query, text (+ title, label when present). Output: qid, docid, label, FEATURES,
    and ``_actor`` (node:pid, for the manifest's rows per actor; not written to the table).
    """

    def __init__(self, index_dir: str, encoder: str | None, threads: int, device: str = "cpu"):
        import socket

        import torch

        from models.encoder import BiEncoder
        from models.features import PairFeaturizer
        from retrieval.bm25 import BM25Index

        torch.set_num_threads(threads)
        self.featurize = PairFeaturizer(BM25Index.load(index_dir), BiEncoder(encoder, device=device))
        self.actor = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        from models.features import FEATURES

        n = batch.num_rows
        titles = batch.column("title").to_pylist() if "title" in batch.column_names else None
        feats = self.featurize(batch.column("query").to_pylist(), batch.column("text").to_pylist(),
                               docids=batch.column("docid").to_pylist(), titles=titles)  # fmt: skip
        label = batch.column("label") if "label" in batch.column_names else pa.nulls(n, pa.int8())
        cols = {"qid": batch.column("qid"), "docid": batch.column("docid"), "label": label.cast(pa.int8())}
        cols.update({f: pa.array(feats[f], pa.float32()) for f in FEATURES})
        cols["_actor"] = pa.array([self.actor] * n, pa.string())
        return pa.table(cols)


def build_bm25(cfg: FeaturesConfig, pairs: pa.Table) -> Path:
    from retrieval.bm25 import BM25Index, BM25Params

    if cfg.docs:
        docs = T.conform(T.DOCS, read_table(cfg.docs), cfg.docs)
    else:
        docs = pairs.select(["docid", "text"]).group_by("docid").aggregate([("text", "first")])
        docs = docs.rename_columns(["docid", "text"])
    index = BM25Index.build(docs.column("docid").to_pylist(), docs.column("text").to_pylist(),
                            BM25Params(k1=cfg.k1, b=cfg.b))  # fmt: skip
    return index.save(Path(cfg.out) / "bm25")


def features(cfg: FeaturesConfig) -> StageResult:
    import ray

    from cluster.embedded import init_ray
    from models.features import FEATURES
    from models.loading import device_for_gpus

    out = Path(cfg.out)
    init_ray()
    with Timer() as timer:
        files = expand_paths(cfg.pairs)
        pairs = T.conform(T.PAIRS, read_table(cfg.pairs), cfg.pairs)
        good, rejected = T.split_rejected(T.PAIRS, pairs, source=cfg.pairs)
        index_dir = build_bm25(cfg, good)
        rows_per_block, batch = plan_blocks(good.num_rows, cfg.concurrency[1], cfg.batch_size)
        # The pairs table is read again by Ray Data, lazily, so the features of millions of pairs stream. A file
        # is read as one block (an in-memory table is one too): cut into blocks enough for every actor.
        if any(f.suffix != ".parquet" for f in files) or rejected.num_rows:
            ds = ray.data.from_arrow(good)
        else:
            ds = ray.data.read_parquet([str(f) for f in files], num_cpus=IO_TASK_CPUS)
        ds = ds.repartition(target_num_rows_per_block=rows_per_block)
        if cfg.concurrency[0] > 1:
            ds.context.wait_for_min_actors_s = WAIT_FOR_ACTORS_S
        ds = ds.map_batches(
            FeatureActor, batch_size=batch, batch_format="pyarrow",
            fn_constructor_kwargs={"index_dir": str(index_dir), "encoder": cfg.encoder,
                                   "threads": max(1, round(cfg.num_cpus_per_actor)),
                                   "device": device_for_gpus(cfg.num_gpus_per_actor)},
            compute=ray.data.ActorPoolStrategy(min_size=cfg.concurrency[0], max_size=cfg.concurrency[1]),
            num_cpus=cfg.num_cpus_per_actor,
            num_gpus=cfg.num_gpus_per_actor or None,
        )  # fmt: skip
        n, per_actor = _write_parts(ds, out)
        write_table(out / "rejected", rejected)
    return write_stage_files(out, "rank.features", cfg, {"pairs": n, "rejected": rejected.num_rows}, [cfg.pairs],
                             timer.seconds, {"table": "features", "features": list(FEATURES),
                                             "bm25_index": str(index_dir), "rows_per_block": rows_per_block,
                                             "batch_size": batch, "rows_per_actor": per_actor})  # fmt: skip


def _write_part(batch: pa.Table, staging: str) -> pa.Table:
    """Ray Data map_batches fn (tasks): one features part file, written aside; returns rows per actor."""
    import uuid

    path = Path(staging) / f"{uuid.uuid4().hex}.parquet"
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(batch.drop_columns(["_actor"]), tmp, compression="zstd")
    os.replace(tmp, path)
    counts = pc.value_counts(batch.column("_actor"))
    return pa.table({"actor": counts.field("values"), "rows": counts.field("counts")})


def _write_parts(ds, out: Path) -> tuple[int, dict[str, int]]:
    """Write the dataset as OUT/part-NNNNN.parquet (written aside, then renamed over the old parts); returns the
    rows written and rows per actor."""
    import shutil
    import uuid

    staging = out / f".staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    per_actor: dict[str, int] = {}
    summaries = ds.map_batches(_write_part, batch_size=ROWS_PER_PART, batch_format="pyarrow",
                               num_cpus=IO_TASK_CPUS, fn_kwargs={"staging": str(staging)})  # fmt: skip
    for row in summaries.iter_rows():
        per_actor[row["actor"]] = per_actor.get(row["actor"], 0) + int(row["rows"])
    for old in out.glob("part-*.parquet"):
        old.unlink()
    files = sorted(staging.glob("*.parquet"))
    for i, f in enumerate(files):
        os.replace(f, out / f"part-{i:05d}.parquet")
    shutil.rmtree(staging)
    if not files:  # no pair to featurize: the table is still there, empty, for the stages after this one
        from models.features import FEATURES

        schema = pa.schema([("qid", pa.string()), ("docid", pa.string()), ("label", pa.int8()),
                            *((f, pa.float32()) for f in FEATURES)])  # fmt: skip
        write_table(out, schema.empty_table())
    n = sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob("part-*.parquet"))
    return n, dict(sorted(per_actor.items()))


# ---------------------------------------------------------------------------------------- labels


def human_mask(qids: list[str], has_label: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Keep ``fraction`` of each query's human labels (at least one where it has any), chosen by ``seed``."""
    keep = np.zeros(len(qids), dtype=bool)
    if fraction >= 1:
        return has_label.copy()
    rng = np.random.default_rng(seed)
    by_query: dict[str, list[int]] = {}
    for i, q in enumerate(qids):
        if has_label[i]:
            by_query.setdefault(q, []).append(i)
    for q in sorted(by_query):
        idx = np.array(by_query[q])
        k = max(1, round(fraction * len(idx)))
        keep[rng.choice(idx, size=k, replace=False)] = True
    return keep


def read_features(path: str) -> pa.Table:
    """The features table in (qid, docid) order. The features stage writes rows in the order its actors finish,
    which differs run to run; LambdaMART's query groups, its float sums and ``human_mask``'s draw all follow
    row order, so without this the same features trained a different ranker each run."""
    return read_table(path).sort_by([("qid", "ascending"), ("docid", "ascending")])


def attach_judge(table: pa.Table, judgments: str | None) -> pa.Table:
    """Add judge_label / judge_score columns (null where the judge did not grade the pair).

    A pair judged more than once counts once when its judgments agree on the label; disagreeing judgments
    are a DataError naming the first such pair."""
    if judgments is None:
        return table.append_column("judge_label", pa.nulls(table.num_rows, pa.int8())).append_column(
            "judge_score", pa.nulls(table.num_rows, pa.float32()))  # fmt: skip
    j = read_table(judgments).select(["qid", "docid", "label", "score"])
    dup = T.duplicate_mask(j, ["qid", "docid"])
    if dup.any():
        # Two judgments of one pair would join as two rows of it. Agreeing ones (the same pair judged twice)
        # are one label; disagreeing ones (two judges' tables put together) leave no label to choose.
        labels = j.group_by(["qid", "docid"], use_threads=False).aggregate([("label", "count_distinct")])
        conflict = labels.filter(pc.greater(labels.column("label_count_distinct"), 1))
        if conflict.num_rows:
            q, d = conflict.column("qid")[0].as_py(), conflict.column("docid")[0].as_py()
            raise DataError(f"{judgments}: {conflict.num_rows} (qid, docid) pairs judged more than once with "
                            f"different labels (first: ({q!r}, {d!r})): keep one judgment per pair")  # fmt: skip
        log.warning("%s: %d duplicate judgments of pairs judged more than once with the same label: one of each "
                    "is used", judgments, int(dup.sum()))  # fmt: skip
        j = j.filter(pa.array(~dup))
    j = j.rename_columns(["qid", "docid", "judge_label", "judge_score"])
    keys = table.select(["qid", "docid"]).append_column("_row", pa.array(np.arange(table.num_rows)))
    joined = keys.join(j, ["qid", "docid"], join_type="left outer", use_threads=False).sort_by("_row")
    missing = joined.column("judge_label").null_count
    if missing:
        log.warning("%s: %d of %d pairs have no judgment", judgments, missing, table.num_rows)
    return table.append_column("judge_label", joined.column("judge_label").cast(pa.int8())).append_column(
        "judge_score", joined.column("judge_score").cast(pa.float32()))  # fmt: skip


def training_labels(
    table: pa.Table, source: LabelSource, keep_human: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(row indices, labels) per training stage: one stage, or two for the curriculum (judge, then human)."""
    human = table.column("label").to_numpy(zero_copy_only=False)
    judge = table.column("judge_label").to_numpy(zero_copy_only=False)
    has_human = keep_human & ~np.isnan(human.astype(np.float64))
    has_judge = ~np.isnan(judge.astype(np.float64))
    if source in ("judge", "mix", "curriculum") and not has_judge.any():
        raise DataError(
            f"label_source {source!r} needs judge labels: give judgments (augrel annotate output)"
        )
    if source == "human":
        stages = [np.flatnonzero(has_human)]
        labels = [human]
    elif source == "judge":
        stages, labels = [np.flatnonzero(has_judge)], [judge]
    elif source == "mix":
        use_judge = ~has_human & has_judge
        mixed = np.where(has_human, human, judge)
        stages, labels = [np.flatnonzero(has_human | use_judge)], [mixed]
    else:
        stages, labels = [np.flatnonzero(has_judge), np.flatnonzero(has_human)], [judge, human]
    return [(idx, lab[idx].astype(np.int32)) for idx, lab in zip(stages, labels, strict=True)]


# ---------------------------------------------------------------------------------------- train


class RankerSettings(BaseModel):
    """LambdaMART settings a config may change (the rest are models.ranker.RankerParams defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_leaves: int = Field(15, gt=1)
    learning_rate: float = Field(0.05, gt=0)
    n_estimators: int = Field(400, gt=0, description="boosting rounds at most (early stopping may use fewer)")
    min_data_in_leaf: int = Field(20, gt=0)
    early_stopping_rounds: int = Field(50, gt=0)

    def params(self, seed: int):
        from models.ranker import RankerParams

        return RankerParams(**self.model_dump(), seed=seed)


class RankTrainConfig(StageConfig):
    """``augrel rank train``: LambdaMART on a features table with the chosen label source."""

    features: str = Field(description="features table (from `augrel rank features`)")
    out: str = Field(description="output directory: model.txt, ranker.json, importances.png")
    judgments: str | None = Field(None, description="judge labels (augrel annotate / judge predict output)")
    label_source: LabelSource = "human"
    human_fraction: float = Field(1.0, gt=0, le=1, description="share of each query's human labels kept")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="training queries held out for early stopping")
    use_judge_feature: bool = Field(
        False, description="add the judge's score as a feature (leaks the labeller)"
    )
    curriculum_rounds: int = Field(100, gt=0, description="trees added on human labels after the judge stage")
    seed: int = 0
    ranker: RankerSettings = RankerSettings()


def feature_names(use_judge: bool) -> list[str]:
    from models.features import FEATURES, JUDGE_FEATURE

    return [*FEATURES, JUDGE_FEATURE] if use_judge else list(FEATURES)


def feature_matrix(table: pa.Table, names: list[str]) -> np.ndarray:
    from models.features import check_finite

    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise DataError(f"features table has no column(s) {missing}: run `augrel rank features` first")
    X = np.column_stack([table.column(n).to_numpy(zero_copy_only=False).astype(np.float32) for n in names])
    try:
        check_finite(X, names)
    except ValueError as e:
        raise DataError(str(e)) from None
    return X


def fit_ranker(table: pa.Table, cfg: RankTrainConfig, train_q: set[str], val_q: set[str]):
    """Train on ``train_q`` with early stopping on ``val_q``, both labelled as ``cfg`` says."""
    from models.ranker import LambdaMARTRanker

    names = feature_names(cfg.use_judge_feature)
    X = feature_matrix(table, names)
    qids = np.asarray(table.column("qid").to_pylist(), dtype=object)
    human = table.column("label").to_numpy(zero_copy_only=False).astype(np.float64)
    keep = human_mask(list(qids), ~np.isnan(human), cfg.human_fraction, cfg.seed)
    stages = training_labels(table, cfg.label_source, keep)
    params = cfg.ranker.params(cfg.seed)
    ranker = None
    in_train = np.isin(qids, list(train_q))
    in_val = np.isin(qids, list(val_q))
    for s, (idx, labels) in enumerate(stages):
        tr, va = idx[in_train[idx]], idx[in_val[idx]]
        lab = dict(zip(idx.tolist(), labels.tolist(), strict=True))
        if len(tr) == 0:
            raise DataError(f"no training rows with {cfg.label_source} labels (stage {s + 1})")
        y_tr, y_va = np.array([lab[i] for i in tr]), np.array([lab[i] for i in va])
        r = LambdaMARTRanker(names, params)
        r.fit(X[tr], y_tr, qids[tr], X[va] if len(va) else None, y_va, qids[va] if len(va) else None,
              init_from=ranker, n_estimators=cfg.curriculum_rounds if ranker is not None else None)  # fmt: skip
        ranker = r
    return ranker, {"label_rows": [len(i) for i, _ in stages], "human_labels_kept": int(keep.sum())}


def split_queries(qids: list[str], val_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    from pipelines.data import assign_splits

    if val_fraction <= 0:
        return set(qids), set()
    split = assign_splits(sorted(set(qids)), {"train": 1 - val_fraction, "val": val_fraction}, seed)
    return {q for q, s in split.items() if s == "train"}, {q for q, s in split.items() if s == "val"}


def split_training_queries(table: pa.Table, val_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """(train, early-stopping) queries of a features table: queries with human labels and judge-only queries are
    split apart, each by ``val_fraction``. In a table of a few human-labelled queries beside many judged ones, one
    split over all would leave the human ranker's early stopping a query or two."""
    human_q = set(table.filter(pc.is_valid(table.column("label"))).column("qid").to_pylist())
    other_q = set(table.column("qid").to_pylist()) - human_q
    parts = [split_queries(sorted(qs), val_fraction, seed) for qs in (human_q, other_q) if qs]
    return set().union(*(t for t, _ in parts)), set().union(*(v for _, v in parts))


def train(cfg: RankTrainConfig) -> StageResult:
    out = Path(cfg.out)
    with Timer() as timer:
        table = attach_judge(read_features(cfg.features), cfg.judgments)
        train_q, val_q = split_training_queries(table, cfg.val_fraction, cfg.seed)
        ranker, info = fit_ranker(table, cfg, train_q, val_q)
        ranker.save(out, label_source=cfg.label_source, human_fraction=cfg.human_fraction,
                    leaks_judge=cfg.use_judge_feature)  # fmt: skip
        imp = ranker.importances()
        (out / "importances.json").write_text(json.dumps(imp, indent=2) + "\n")
        plot_importances(imp, out / "importances.png", f"LambdaMART ({cfg.label_source} labels)")
    return write_stage_files(out, "rank.train", cfg, {"train_queries": len(train_q), "val_queries": len(val_q),
                                                      "train_rows": ranker.info["train_rows"]},
                             [cfg.features] + ([cfg.judgments] if cfg.judgments else []), timer.seconds,
                             {**info, **ranker.info, "importances": imp})  # fmt: skip


def plot_importances(imp: dict[str, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(imp, key=imp.get)
    fig, ax = plt.subplots(figsize=(5, 0.35 * len(names) + 1))
    ax.barh(names, [imp[n] for n in names], color="#4C72B0")
    ax.set_xlabel("share of total gain")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------- predict / eval


class RankPredictConfig(StageConfig):
    """``augrel rank predict``: score a features table with a trained ranker into a run table."""

    ranker: str | None = Field(None, description="ranker directory (from `augrel rank train`)")
    feature: str | None = Field(
        None, description="rank by this one feature instead (a baseline run, e.g. bm25)"
    )
    features: str = Field(description="features table")
    out: str = Field(description="output directory for the run table")
    judgments: str | None = Field(None, description="needed when the ranker uses the judge_score feature")


def run_table(qids: list[str], docids: list[str], scores: np.ndarray) -> pa.Table:
    """qid, docid, score, rank (1 = best, ties broken by docid) sorted by qid then rank."""
    t = pa.table({"qid": pa.array(qids, pa.string()), "docid": pa.array(docids, pa.string()),
                  "score": pa.array(scores, pa.float32())})  # fmt: skip
    t = t.sort_by([("qid", "ascending"), ("score", "descending"), ("docid", "ascending")])
    q = t.column("qid").to_pylist()
    rank, prev, r = np.zeros(len(q), np.int32), None, 0
    for i, x in enumerate(q):
        r = r + 1 if x == prev else 1
        rank[i], prev = r, x
    return t.append_column("rank", pa.array(rank, pa.int32()))


def predict(cfg: RankPredictConfig) -> StageResult:
    from models.ranker import LambdaMARTRanker

    out = Path(cfg.out)
    if (cfg.ranker is None) == (cfg.feature is None):
        raise ConfigError(
            "give either ranker (a trained ranker) or feature (a baseline run), not both or neither"
        )
    with Timer() as timer:
        table = read_table(cfg.features)
        if cfg.feature:
            scores = feature_matrix(table, [cfg.feature])[:, 0]
        else:
            ranker = LambdaMARTRanker.load(cfg.ranker)
            if "judge_score" in ranker.features:
                table = attach_judge(table, cfg.judgments)
            scores = ranker.predict(feature_matrix(table, ranker.features))
        run = run_table(table.column("qid").to_pylist(), table.column("docid").to_pylist(), scores)
        write_table(out, run)
    return write_stage_files(out, "rank.predict", cfg, {"rows": run.num_rows,
                                                        "queries": len(pc.unique(run.column("qid")))},
                             [cfg.features], timer.seconds, {"table": "run"})  # fmt: skip


class RankEvalConfig(StageConfig):
    """``augrel rank eval``: a run against human qrels, optionally paired against a baseline run."""

    run: str = Field(description="run table (qid, docid, score, rank)")
    qrels: str = Field(description="qrels table, labelled pairs, or a TREC qrels file")
    out: str = Field(description="output directory: metrics.json, per_query.parquet")
    baseline: str | None = Field(
        None, description="another run to compare with (paired t-test, bootstrap CI)"
    )
    min_rel: int = Field(
        2, ge=1, description="grade counted relevant by MRR/recall; queries without one are skipped"
    )


def _run_dict(path: str) -> dict[str, dict[str, float]]:
    from eval.ranking import run_from_scores

    t = T.conform(T.RUN, read_table(path), path)
    return run_from_scores(t.column("qid").to_pylist(), t.column("docid").to_pylist(),
                           t.column("score").to_numpy(zero_copy_only=False))  # fmt: skip


def evaluate(cfg: RankEvalConfig) -> StageResult:
    from eval.ranking import evaluate_run, paired_compare, qrels_from_labels, short_name
    from pipelines.judge import read_qrels

    out = Path(cfg.out)
    with Timer() as timer:
        q = read_qrels(cfg.qrels, list(T.DEFAULT_GRADES))
        qrels = qrels_from_labels(q.column("qid").to_pylist(), q.column("docid").to_pylist(),
                                  q.column("label").to_pylist())  # fmt: skip
        report = evaluate_run(_run_dict(cfg.run), qrels, min_rel=cfg.min_rel)
        result: dict[str, Any] = {"mean": {short_name(m): v for m, v in report.mean.items()},
                                  "n_queries": report.n_queries, "excluded": report.excluded}  # fmt: skip
        if cfg.baseline:
            base = evaluate_run(_run_dict(cfg.baseline), qrels, min_rel=cfg.min_rel)
            result["vs_baseline"] = {short_name(m): paired_compare(base.per_query[m], report.per_query[m], m).__dict__
                                     for m in report.per_query}  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2, default=list) + "\n")
        qids = sorted(next(iter(report.per_query.values())))
        write_table(out / "per_query", pa.table({"qid": qids, **{short_name(m): [v[x] for x in qids]
                                                                 for m, v in report.per_query.items()}}))  # fmt: skip
    return write_stage_files(out, "rank.eval", cfg, {"queries": report.n_queries}, [cfg.run, cfg.qrels],
                             timer.seconds, result)  # fmt: skip
