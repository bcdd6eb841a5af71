"""``augrel judge predict`` and ``augrel judge eval``: grade a (small) pairs table in one process, and measure
a judgments table against human labels. The distributed version of predict is ``augrel annotate``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field
from tqdm.auto import tqdm

from pipelines import tables as T
from pipelines.errors import DataError
from pipelines.io import read_table, write_table
from pipelines.stage import StageConfig, StageResult, Timer, write_stage_files

log = logging.getLogger("augrel")


class PredictConfig(StageConfig):
    """``augrel judge predict``: which judge grades which pairs, and where the judgments go."""

    judge: str = Field("gemma3-270m", description="a judge directory (from finetune) or a base model")
    pairs: str = Field(description="pairs table: a directory, Parquet/JSONL file or glob")
    out: str = Field(description="output directory for the judgments table")
    template: str = Field(
        "umbrela-v1", description="prompt template for a base model (a judge dir has its own)"
    )
    max_doc_tokens: int = Field(256, gt=0, description="passage truncation for a base model")
    batch_size: int = Field(16, gt=0)
    dtype: str = Field("auto", pattern="^(auto|bf16|fp16|fp32)$")
    device: str = "auto"
    guard: Literal["off", "flag", "strip"] | None = Field(
        None, description="the injection detector (models.injection); default: the judge card's (strip for a base "
        "model)",
    )  # fmt: skip
    limit: int | None = Field(None, gt=0, description="grade only the first N pairs")
    chunk_size: int = Field(512, gt=0, description="pairs per progress step")


def read_pairs(path: str, limit: int | None = None) -> tuple[pa.Table, pa.Table]:
    """A pairs table conformed to the schema, and its rejected rows (empty query, missing ids, ...)."""
    raw = read_table(path)
    try:
        table = T.conform(T.PAIRS, raw, path)
    except T.SchemaError as e:
        raise DataError(f"{path}: not a pairs table: {e}") from None
    if limit:
        table = table.slice(0, limit)
    return T.split_rejected(T.PAIRS, table, source=str(path))


def judgments_table(
    pairs: pa.Table, scores, judge_name: str, prompt_version: str, grades=T.DEFAULT_GRADES
) -> pa.Table:
    """The judgments table of ``scores`` for ``pairs``; ``injection`` columns are null when no detector ran."""
    n = pairs.num_rows
    probs = pa.FixedSizeListArray.from_arrays(
        pa.array(scores.probs.reshape(-1), pa.float32()), scores.probs.shape[1]
    )
    injection = getattr(scores, "injection", None)
    kinds = getattr(scores, "injection_kind", None)
    return pa.table(
        {
            "qid": pairs.column("qid"),
            "docid": pairs.column("docid"),
            "label": pa.array(scores.label, pa.int8()),
            "score": pa.array(scores.score, pa.float32()),
            "probs": probs.cast(pa.list_(pa.float32())),
            "judge": pa.array([judge_name] * n, pa.string()),
            "prompt_version": pa.array([prompt_version] * n, pa.string()),
            "truncated": pa.array(scores.truncated, pa.bool_()),
            "n_tokens": pa.array(scores.n_tokens, pa.int32()),
            "confidence": pa.array(scores.confidence(grades), pa.float32()),
            "injection": pa.array(injection, pa.bool_())
            if injection is not None
            else pa.nulls(n, pa.bool_()),
            "injection_kind": pa.array(kinds if kinds is not None else [None] * n, pa.string()),
        }
    )


def judge_pairs(judge, scorer, pairs: pa.Table, chunk_size: int, desc: str = "judging") -> pa.Table:
    """The judgments table of ``pairs`` graded by ``scorer`` (of the loaded ``judge``), ``chunk_size`` pairs per
    progress step; an empty judgments table for no pairs."""
    parts = []
    with tqdm(total=pairs.num_rows, desc=desc, unit=" pairs", disable=None) as bar:
        for start in range(0, pairs.num_rows, chunk_size):
            chunk = pairs.slice(start, chunk_size)
            scores = scorer.score(
                chunk.column("query").to_pylist(), chunk.column("text").to_pylist(),
                chunk.column("title").to_pylist() if "title" in chunk.column_names else None,
                chunk.column("url").to_pylist() if "url" in chunk.column_names else None,
            )  # fmt: skip
            parts.append(
                judgments_table(chunk, scores, judge.card.name, scorer.prompt_version, judge.card.grades)
            )
            bar.update(chunk.num_rows)
    if parts:
        return pa.concat_tables(parts)
    return T.JUDGMENTS.schema([c.name for c in T.JUDGMENTS.optional]).empty_table()


def predict(cfg: PredictConfig) -> StageResult:
    from dataclasses import asdict

    from models.judge_card import load_judge

    out = Path(cfg.out)
    with Timer() as timer:
        pairs, rejected = read_pairs(cfg.pairs, cfg.limit)
        t0 = time.perf_counter()
        judge = load_judge(cfg.judge, template=cfg.template, max_doc_tokens=cfg.max_doc_tokens,
                           dtype=cfg.dtype, device=cfg.device, guard=cfg.guard or "strip")  # fmt: skip
        load_s = time.perf_counter() - t0
        scorer = judge.scorer(cfg.batch_size, cfg.guard)
        t0 = time.perf_counter()
        table = judge_pairs(judge, scorer, pairs, cfg.chunk_size)
        score_s = time.perf_counter() - t0
        write_table(out, table)
        write_table(out / "rejected", rejected)
    counts = {
        "pairs_in": pairs.num_rows + rejected.num_rows,
        "judged": table.num_rows,
        "rejected": rejected.num_rows,
    }
    truncated = int(pc.sum(table.column("truncated")).as_py() or 0) if table.num_rows else 0
    return write_stage_files(
        out, "judge.predict", cfg, counts, [cfg.pairs], timer.seconds,
        {
            "table": "judgments",
            "judge_card": asdict(judge.card),
            "dtype": str(judge.lm.dtype),
            "device": judge.lm.device,
            "model_load_s": round(load_s, 2),
            "pairs_per_s": round(table.num_rows / score_s, 3) if score_s > 0 else None,
            "truncated": truncated,
        },
    )  # fmt: skip


class EvalConfig(StageConfig):
    """``augrel judge eval``: judgments against human labels."""

    judgments: str = Field(description="judgments table (directory or file)")
    qrels: str = Field(description="human labels: a qrels/pairs table, or a TREC qrels text file")
    out: str = Field(description="output directory: metrics.json, confusion.png, calibration.png")
    grades: list[int] = Field(default_factory=lambda: list(T.DEFAULT_GRADES))
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples over queries for the 95% intervals")
    cutpoints: list[float] | None = Field(
        None, description="map expected grade to labels with these cut-points"
    )


def read_qrels(path: str, grades: list[int]) -> pa.Table:
    p = Path(path)
    if p.is_file() and p.suffix not in (".parquet", ".jsonl", ".json"):
        from pipelines.data import read_trec_qrels

        rejects: list[pa.Table] = []
        table = read_trec_qrels(p, grades, rejects).drop_columns(["_line"])
        if rejects:
            log.warning("%s: %d qrels lines could not be read", p, sum(r.num_rows for r in rejects))
        return table
    table = read_table(path)
    if "label" not in table.column_names:
        raise DataError(f"{path}: no 'label' column: give a qrels or labelled pairs table")
    table = table.select(["qid", "docid", "label"]).filter(pc.is_valid(table.column("label")))
    return T.conform(T.QRELS, table, path)


def evaluate(cfg: EvalConfig) -> StageResult:
    from eval.agreement import (
        agreement,
        grades_from_cutpoints,
        plot_calibration,
        plot_confusion,
        write_report,
    )

    out = Path(cfg.out)
    with Timer() as timer:
        judgments = T.conform(T.JUDGMENTS, read_table(cfg.judgments), cfg.judgments)
        qrels = read_qrels(cfg.qrels, cfg.grades).rename_columns(["qid", "docid", "human"])
        # Arrow joins cannot carry list columns (probs): join the keys, then take the judgment rows.
        keys = judgments.select(["qid", "docid"]).append_column(
            "_row", pa.array(np.arange(judgments.num_rows))
        )
        matched = keys.join(qrels, ["qid", "docid"], join_type="inner", use_threads=False)
        matched = matched.sort_by([("qid", "ascending"), ("docid", "ascending")])
        joined = judgments.take(matched.column("_row")).append_column("human", matched.column("human"))
        unmatched = {"judgments_without_human_label": judgments.num_rows - joined.num_rows,
                     "human_labels_not_judged": qrels.num_rows - joined.num_rows}  # fmt: skip
        for k, v in unmatched.items():
            if v:
                log.warning("%s: %d", k, v)
        if joined.num_rows == 0:
            raise DataError(f"no (qid, docid) in common between {cfg.judgments} and {cfg.qrels}")
        human = joined.column("human").to_numpy()
        score = joined.column("score").to_numpy()
        label = joined.column("label").to_numpy()
        if cfg.cutpoints:
            label = grades_from_cutpoints(score, cfg.cutpoints, cfg.grades)
        probs = np.asarray(joined.column("probs").to_pylist(), dtype=np.float32)
        qid = np.asarray(joined.column("qid").to_pylist())
        report = agreement(human, label, score, qid, cfg.grades, n_boot=cfg.bootstrap)
        judges = pc.unique(joined.column("judge")).to_pylist()
        report.extra = {"judge": judges, "prompt_version": pc.unique(joined.column("prompt_version")).to_pylist(),
                        "unmatched": unmatched, "cutpoints": cfg.cutpoints}  # fmt: skip
        write_report(report, out)
        plot_confusion(report, out / "confusion.png", title=", ".join(judges))
        plot_calibration(human, probs, score, cfg.grades, out / "calibration.png")
        (out / "metrics.txt").write_text(report.table() + "\n")
    return write_stage_files(
        out, "judge.eval", cfg, {"pairs": report.n_pairs, "queries": report.n_queries},
        [cfg.judgments, cfg.qrels], timer.seconds, {"metrics": report.metrics, "ci95": report.ci95},
    )  # fmt: skip
