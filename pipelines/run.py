"""``augrel run PIPELINE.yaml``: the method as one DAG of stages, each stage's output the next one's input.

    synth? -> prepare -> validate
                      -> split (train / val / test / unlabelled queries)
                      -> index (BM25 + FAISS) -> candidates (top-k for every query) -> pool
    split -> judge (fine-tuned on train, selected and stacked on val)
          -> annotate (test pairs) -> judge_eval          the judge measured on queries it never saw
          -> annotate_pool (pool: unlabelled candidates of train/val/unlabelled queries)
    pool, annotate_pool -> features_train -> rankers (human / judge / mix / curriculum labels)
    split -> features_test -> rank_eval (every ranker, BM25 and dense baselines, test queries' human labels)
    split, index, annotate_pool -> retriever (bi-encoder fine-tuned on train human + pool judge labels, validated
          on val) -> retriever_index (the corpus re-encoded) -> retriever_eval (full-corpus retrieval of the test
          queries: BM25, the base encoder, the fine-tuned one)
    features_test, annotate -> augment (cross-validated over the test queries, judge out of sample)
    index, rankers, judge -> serve; every stage -> report

Test queries train and calibrate nothing: the judge learns on train, is selected and stacked on val, labels
only pairs of non-test queries for the rankers, and every ranking figure is scored on test queries with human
labels. ``pipeline.json`` records how each split was used (``splits_use``), and the report says it.

A stage is skipped when its last run finished with the same code version, its resolved config hashes the
same, the content hashes of its inputs (the upstream stages' outputs) are unchanged, and its own outputs still
hash as they did: a second run with nothing changed does no work, and changing one stage's section reruns that
stage and those after it. OUT/pipeline.json records the DAG, every stage's config hash, input and output
hashes, code version, status and wall time.

Each section of the pipeline YAML is the config of one stage (``augrel <stage> --help`` lists its keys); the
runner fills in the paths that chain the stages. ``--set judge.lr=1e-4`` overrides one value.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.errors import ConfigError
from pipelines.stage import StageConfig, code_fingerprint, code_version

log = logging.getLogger("augrel")

MANIFEST = "pipeline.json"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSection(_Section):
    source: Literal["synth", "beir", "trec-dl", "pairs", "hotpotqa"] = Field(
        "synth", description="synth: generate a corpus (augrel data synth); else the format of src"
    )
    src: str | None = Field(None, description="the raw data (for every source but synth)")
    synth: dict[str, Any] = Field(default_factory=dict, description="augrel data synth settings")
    prepare: dict[str, Any] = Field(default_factory=dict, description="augrel data prepare settings")
    split: dict[str, Any] = Field(default_factory=dict, description="augrel data split settings")


class TrackingSection(_Section):
    mlflow_uri: str | None = Field(None, description="log every stage to MLflow here (e.g. file:runs/mlruns)")
    experiment: str = "augrel"


class ServeSection(_Section):
    check: bool = Field(False, description="deploy on Ray Serve, rank and grade once, take it down")
    settings: dict[str, Any] = Field(default_factory=dict, description="augrel serve settings")


class UtilitySection(_Section):
    modes: list[Literal["relsel", "utility-sel", "utility-rank", "answer-likelihood"]] = Field(
        default_factory=lambda: ["utility-sel", "answer-likelihood"],
        description="augrel annotate modes run (RelSel's verdict comes with every listwise mode)",
    )
    questions: int | None = Field(8, gt=0, description="the first N held-out questions by qid (null: all)")
    settings: dict[str, Any] = Field(
        default_factory=dict, description="augrel annotate settings (window, ...)"
    )


class RagSection(_Section):
    """Paper 2's experiment: the retrieved candidates of the train questions are utility-annotated, a retriever is
    trained per label source on those questions, and each retriever's top k feeds a generator on the held-out
    questions, beside BM25, the base encoder, a closed book and the gold passages."""

    train_questions: int | None = Field(
        None, gt=0, description="annotate the candidates of the first N train questions by qid, and train every "
        "retriever on these questions only, so the label sources compare on the same questions (null: all)",
    )  # fmt: skip
    questions: int | None = Field(None, gt=0, description="the first N held-out questions by qid (null: all)")
    utility_mode: Literal["relsel", "utility-sel", "utility-rank", "answer-likelihood"] = Field(
        "utility-sel", description="augrel annotate mode that makes the utility labels (paper 2: utility-sel)"
    )
    utility: dict[str, Any] = Field(
        default_factory=dict, description="augrel annotate settings (window, ...)"
    )
    label_sources: list[Literal["human", "utility", "utility_h20"]] = Field(
        default_factory=lambda: ["human", "utility", "utility_h20"],
        description="retrievers trained: human positives, utility positives, utility then a human_fraction "
        "of human positives (paper 2's curriculum)",
    )  # fmt: skip
    human_fraction: float = Field(
        0.2, gt=0, le=1, description="utility_h20: share of questions with human labels"
    )
    min_grade: int = Field(
        1, ge=0, description="a human label at least this is a positive / supporting passage"
    )
    retriever: dict[str, Any] = Field(
        default_factory=dict, description="augrel retriever train settings shared by every retriever"
    )
    eval: dict[str, Any] = Field(
        default_factory=dict,
        description="augrel rag eval settings (k, generator, batch_size, concurrency, ...)",
    )


class PipelineConfig(StageConfig):
    """``augrel run``: where the run lives, the data, and one section per stage."""

    name: str = "augrel"
    out: str = Field(description="run directory; every stage writes a subdirectory of it")
    data: DataSection = DataSection()
    candidates: dict[str, Any] = Field(
        default_factory=dict, description="augrel candidates settings (k, retrievers)"
    )
    judge: dict[str, Any] | None = Field(
        default_factory=dict, description="augrel judge finetune settings; null: no relevance judge, and none of "
        "the stages that need it (annotation, rankers, the judge-labelled retriever, utility eval, serve)",
    )  # fmt: skip
    annotate_split: str = Field("test", description="the held-out split whose pairs measure the judge")
    annotate: dict[str, Any] = Field(
        default_factory=dict, description="augrel annotate settings (both the test pairs and the pool)"
    )
    judge_eval: dict[str, Any] = Field(default_factory=dict, description="augrel judge eval settings")
    features: dict[str, Any] = Field(default_factory=dict, description="augrel rank features settings")
    ranker: dict[str, Any] = Field(
        default_factory=dict,
        description="augrel rank train settings shared by every ranker; label_source picks the one served",
    )
    label_sources: list[Literal["human", "judge", "mix", "curriculum"]] = Field(
        default_factory=lambda: ["human", "judge", "mix", "curriculum"],
        description="the rankers trained and evaluated, one per label source",
    )
    augment: dict[str, Any] = Field(default_factory=dict, description="augrel experiment augment settings")
    index: dict[str, Any] = Field(default_factory=dict, description="augrel index build settings")
    retriever: dict[str, Any] | None = Field(
        default_factory=dict,
        description="augrel retriever train settings (default labels: human positives of the train split's "
        "queries, judge positives of the pool's other queries); null: no retriever stages",
    )
    utility: UtilitySection | None = Field(
        None,
        description="utility annotation (paper 2) of a sample of the held-out questions, each mode scored "
        "against their human positives beside the relevance judge and top-k baselines; null: not run",
    )
    rag: RagSection | None = Field(
        None, description="paper 2's experiment: retrievers trained on human / utility / utility + 20% human labels "
        "of the train questions, each scored by the answers a generator writes from its top k; null: not run",
    )  # fmt: skip
    serve: ServeSection = ServeSection()
    tracking: TrackingSection = TrackingSection()

    @model_validator(mode="after")
    def _served_ranker_is_trained(self) -> PipelineConfig:
        if self.judge is None:
            on = [f for f, v in (("retriever", self.retriever is not None), ("utility", self.utility is not None),
                                 ("serve.check", self.serve.check)) if v]  # fmt: skip
            if on:
                raise ValueError(f"judge: null (no relevance judge) needs {', '.join(on)} off too: they use the judge's "
                                 f"labels or rankers (set {', '.join(f + ': null' if f != 'serve.check' else 'serve: {check: false}' for f in on)})")  # fmt: skip
            if self.rag is None:
                raise ValueError("judge: null and rag: null leave nothing to run after the index")
            return self
        if not self.label_sources:
            raise ValueError("label_sources: train at least one ranker")
        if len(set(self.label_sources)) != len(self.label_sources):
            raise ValueError(f"label_sources: {self.label_sources} repeats a source")
        served = self.served_source
        if served not in self.label_sources:
            raise ValueError(
                f"ranker.label_source: {served!r} is served but not in label_sources {self.label_sources}"
            )
        fractions = self.data.split.get("fractions") or {"train": 0.6, "val": 0.2, "test": 0.2}
        if self.annotate_split in ("train", "val", "unlabelled") or self.annotate_split not in fractions:
            held = [k for k in fractions if k not in ("train", "val")]
            raise ValueError(f"annotate_split: {self.annotate_split!r} must be a held-out split of "
                             f"data.split.fractions ({held or 'none: add test'}); train and val train and "
                             "calibrate the judge, unlabelled has no labels to score")  # fmt: skip
        for need in ("train",) + (() if "val" in self.judge else ("val",)):
            if not fractions.get(need):
                raise ValueError(f"data.split.fractions: needs a {need} split (the judge "
                                 f"{'trains' if need == 'train' else 'selects and calibrates'} on it)")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _rag_splits(self) -> PipelineConfig:
        if self.rag is None:
            return self
        fractions = self.data.split.get("fractions") or {"train": 0.6, "val": 0.2, "test": 0.2}
        for need, why in (("train", "its questions' labels train the retrievers"),
                          ("val", "the retrievers validate on it"),
                          (self.annotate_split, "annotate_split: the held-out questions answered")):  # fmt: skip
            if not fractions.get(need):
                raise ValueError(f"data.split.fractions: rag needs a {need} split ({why})")
        if self.annotate_split in ("train", "val", "unlabelled"):
            raise ValueError(f"annotate_split: {self.annotate_split!r} trains or validates the retrievers; rag "
                             "answers a held-out split")  # fmt: skip
        return self

    @property
    def served_source(self) -> str:
        return self.ranker.get(
            "label_source", "mix" if "mix" in self.label_sources else self.label_sources[0]
        )


#: how ``augrel run`` uses each split, recorded in pipeline.json and the report
SPLITS_USE = {
    "train": "judge fine-tuning; rankers' and the retriever's human labels; its unlabelled candidates judged for "
    "the rankers and the retriever",
    "val": "judge checkpoint selection, cut-points and stacking; rankers' human labels; its unlabelled "
    "candidates judged for the rankers; the retriever's validation (it never trains on these queries)",
    "unlabelled": "no human label: its candidates judged for the rankers and the retriever",
    "test": "scoring: the judge's agreement, every ranker's metrics, the retrievers' full-corpus metrics and the "
    "utility annotation's precision / recall (the candidates of a sample of its questions), with human labels; the augmentation experiment alone trains on it, in cross-validation folds scored apart (its "
    "own table says so)",
}


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    outputs: tuple[str, ...]  # paths under OUT
    configs: Callable[[PipelineConfig, Path, bool], list[StageConfig]]
    run: Callable[[list[StageConfig]], dict[str, Any]]
    resumable: bool = False


# ---------------------------------------------------------------------------------------- the stages


def _cfg(cls, section: str, values: dict[str, Any], wired: dict[str, Any]) -> StageConfig:
    """A stage config from the pipeline's section plus the wired paths; errors name ``section.key``."""
    from pydantic import ValidationError

    clash = sorted(set(values) & set(wired))
    if clash:
        raise ConfigError(f"{section}.{clash[0]}: set by the pipeline (it chains the stages); remove it")
    try:
        return cls.model_validate({**values, **wired})
    except ValidationError as e:
        lines = [f"invalid pipeline section '{section}':"]
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {section}.{key}: {msg}")
        raise ConfigError("\n".join(lines)) from None


def _synth(p, out, resume):
    from pipelines.synth import SynthConfig

    return [_cfg(SynthConfig, "data.synth", p.data.synth, {"out": str(out / "raw")})]


def _prepare(p, out, resume):
    from pipelines.data import PrepareConfig

    src = str(out / "raw") if p.data.source == "synth" else p.data.src
    if src is None:
        raise ConfigError(f"data.src: required for data.source {p.data.source}")
    fmt = "beir" if p.data.source == "synth" else p.data.source
    return [
        _cfg(
            PrepareConfig,
            "data.prepare",
            p.data.prepare,
            {"format": fmt, "src": src, "out": str(out / "data")},
        )
    ]


def _validate(p, out, resume):
    from pipelines.validate import ValidateConfig

    return [ValidateConfig(path=str(out / "data"), report=str(out / "validation" / "report.json"))]


def _split(p, out, resume):
    from pipelines.data import SplitConfig

    return [
        _cfg(SplitConfig, "data.split", p.data.split, {"src": str(out / "data"), "out": str(out / "splits")})
    ]


def _judge(p, out, resume):
    from pipelines.finetune_judge import FinetuneConfig

    wired = {"train": [str(out / "splits" / "train" / "pairs")], "out": str(out / "judge")}
    if "val" not in p.judge:
        wired["val"] = [str(out / "splits" / "val" / "pairs")]
    return [_cfg(FinetuneConfig, "judge", p.judge, {**wired, "resume": resume})]


def _index(p, out, resume):
    from pipelines.index import IndexConfig

    return [
        _cfg(IndexConfig, "index", p.index, {"docs": str(out / "data" / "docs"), "out": str(out / "index")})
    ]


def _candidates(p, out, resume):
    from pipelines.candidates import CandidatesConfig

    wired = {"queries": str(out / "data" / "queries"), "index": str(out / "index"),
             "qrels": str(out / "data" / "pairs"), "out": str(out / "candidates")}  # fmt: skip
    return [_cfg(CandidatesConfig, "candidates", p.candidates, wired)]


def _pool(p, out, resume):
    from pipelines.pool import PoolConfig

    return [PoolConfig(candidates=str(out / "candidates"), splits=str(out / "splits"), out=str(out / "pool"),
                       hold_out=[p.annotate_split])]  # fmt: skip


def _annotate_on(pairs: str, dest: str):
    def build(p, out, resume):
        from pipelines.annotate import AnnotateConfig

        wired = {"judge": str(out / "judge"), "pairs": str(out / pairs), "out": str(out / dest),
                 "resume": resume, "overwrite": not resume}  # fmt: skip
        return [_cfg(AnnotateConfig, "annotate", p.annotate, wired)]

    return build


def _judge_eval(p, out, resume):
    from pipelines.judge import EvalConfig

    wired = {"judgments": str(out / "judgments"), "qrels": str(out / "splits" / p.annotate_split / "qrels"),
             "out": str(out / "judge-eval")}  # fmt: skip
    return [_cfg(EvalConfig, "judge_eval", p.judge_eval, wired)]


def _features(pairs: str, dest: str):
    def build(p, out, resume):
        from pipelines.rank import FeaturesConfig

        wired = {"pairs": str(out / pairs), "docs": str(out / "data" / "docs"), "out": str(out / dest)}
        return [_cfg(FeaturesConfig, "features", p.features, wired)]

    return build


def _rankers(p, out, resume):
    """One ranker per label source, on one features table (the human-labelled pairs of train/val queries and the
    judged pool of unlabelled candidates beside them) with the same settings. The sources use different rows of
    it: human the labelled pairs, judge the pool, mix and curriculum both."""
    from pipelines.rank import RankTrainConfig

    values = {k: v for k, v in p.ranker.items() if k != "label_source"}
    return [_cfg(RankTrainConfig, "ranker", {**values, "label_source": src},
                 {"features": str(out / "features-train"), "judgments": str(out / "judgments-pool"),
                  "out": str(out / f"ranker-{src}")})
            for src in p.label_sources]  # fmt: skip


def _rank_eval(p, out, resume):
    from pipelines.rank import RankEvalConfig, RankPredictConfig

    test, qrels = str(out / "features-test"), str(out / "splits" / p.annotate_split / "qrels")
    cfgs: list[StageConfig] = [RankPredictConfig(feature=f, features=test, out=str(out / "rank-eval" / f"run-{name}"))
                               for name, f in BASELINES.items()]  # fmt: skip
    for src in p.label_sources:
        cfgs.append(RankPredictConfig(ranker=str(out / f"ranker-{src}"), features=test,
                                      out=str(out / "rank-eval" / f"run-{src}")))  # fmt: skip
    for name in [*BASELINES, *p.label_sources]:
        cfgs.append(RankEvalConfig(run=str(out / "rank-eval" / f"run-{name}"), qrels=qrels,
                                   baseline=None if name == "bm25" else str(out / "rank-eval" / "run-bm25"),
                                   out=str(out / "rank-eval" / name)))  # fmt: skip
    return cfgs


#: the rows every ranker is compared with: one feature alone ranks the test pairs
BASELINES = {"bm25": "bm25", "dense": "dense_cos"}


def _retriever(p, out, resume):
    """The bi-encoder on the same labels as the rankers: human positives of the train split, judge positives of
    the judged pool of the other non-held-out queries (labels.source mix with human_fraction 1), validated on the
    val split's human labels; the held-out split's queries are excluded from everything."""
    from pipelines.stage import deep_merge
    from pipelines.train_retriever import RetrieverTrainConfig

    values = deep_merge({"labels": {"source": "mix", "human_fraction": 1.0}}, p.retriever or {})
    labels = dict(values.pop("labels"))
    clash = sorted({"human", "llm"} & set(labels))
    if clash:
        raise ConfigError(
            f"retriever.labels.{clash[0]}: set by the pipeline (it chains the stages); remove it"
        )
    labels.update(human=[str(out / "splits" / "train" / "qrels")], llm=[str(out / "judgments-pool")])
    wired = {"index": str(out / "index"), "queries": [str(out / "data" / "queries")], "labels": labels,
             "val": [str(out / "splits" / "val" / "qrels")],
             "exclude_queries": [str(out / "splits" / p.annotate_split / "queries")],
             "out": str(out / "retriever"), "resume": resume}  # fmt: skip
    return [_cfg(RetrieverTrainConfig, "retriever", values, wired)]


def _retriever_index(p, out, resume):
    from pipelines.index import IndexConfig

    # the index section's settings (kind, actors, GPUs), with the fine-tuned encoder in place of its own
    values = {**{k: v for k, v in p.index.items() if k != "encoder"}, "dense": True}
    return [_cfg(IndexConfig, "index", values, {"docs": str(out / "data" / "docs"), "out": str(out / "retriever-index"),
                                                "encoder": str(out / "retriever")})]  # fmt: skip


#: full-corpus first-stage rows of retriever_eval: (index directory under OUT, retriever)
RETRIEVER_ROWS = {
    "bm25": ("index", "bm25"),
    "minilm": ("index", "dense"),
    "finetuned": ("retriever-index", "dense"),
}


def _retriever_eval(p, out, resume):
    from pipelines.index import IndexSearchConfig
    from pipelines.rank import RankEvalConfig

    queries, qrels = (
        str(out / "splits" / p.annotate_split / "queries"),
        str(out / "splits" / p.annotate_split / "qrels"),
    )
    rows = {k: v for k, v in RETRIEVER_ROWS.items() if k != "minilm" or p.index.get("dense", True)}
    cfgs: list[StageConfig] = [IndexSearchConfig(index=str(out / idx), queries=queries, retriever=kind, k=100,
                                                 out=str(out / "retriever-eval" / f"run-{name}"))
                               for name, (idx, kind) in rows.items()]  # fmt: skip
    for name in rows:
        cfgs.append(RankEvalConfig(run=str(out / "retriever-eval" / f"run-{name}"), qrels=qrels,
                                   baseline=None if name == "bm25" else str(out / "retriever-eval" / "run-bm25"),
                                   out=str(out / "retriever-eval" / name)))  # fmt: skip
    return cfgs


def _run_retriever_eval(cfgs):
    """Retrieve the held-out queries from the whole corpus with BM25, the base encoder and the fine-tuned one,
    score each against their human labels, and write retriever-eval/summary.json, table.md and ndcg10.png."""
    from pipelines.index import search

    results, out = _produce_and_score(cfgs, search)
    caption = (
        "First-stage retrieval from the whole corpus (top 100) of {n} test queries, human labels; the "
        "fine-tuned encoder trained on the train split's human labels and the judge's labels of other "
        "non-test queries, was validated on the val split, and saw no test query. 95% CIs over queries."
    )
    summary = rank_summary(results, out, caption=caption, baselines=("bm25", "minilm"))
    return {"ndcg10": {k: v["ndcg10"] for k, v in summary["rows"].items()}, "n_queries": summary["n_queries"]}


def _augment(p, out, resume):
    from pipelines.experiment import AugmentConfig

    wired = {"features": str(out / "features-test"), "judgments": str(out / "judgments"),
             "out": str(out / "augment")}  # fmt: skip
    return [_cfg(AugmentConfig, "augment", p.augment, wired)]


def _serve(p, out, resume):
    from pipelines.serve import ServeConfig
    from pipelines.stage import deep_merge

    values = deep_merge({"judge": {"path": str(out / "judge")}, "port": 8765}, p.serve.settings)
    return [
        _cfg(
            ServeConfig,
            "serve.settings",
            values,
            {"ranker": str(out / f"ranker-{p.served_source}"), "index": str(out / "index")},
        )
    ]


class UtilitySampleConfig(StageConfig):
    """The questions the utility stage annotates: the retrieved candidates of the first ``questions`` held-out
    queries (by qid) that have a human positive among them (all such queries: null). Retrieved candidates are
    what a team annotates; the held-out queries' human labels then score the annotation."""

    candidates: str
    queries: str
    questions: int | None = None
    min_grade: int = 2
    out: str


def _utility(p, out, resume):
    from pipelines.annotate import AnnotateConfig

    sample = UtilitySampleConfig(candidates=str(out / "candidates"),
                                 queries=str(out / "splits" / p.annotate_split / "queries"),
                                 questions=p.utility.questions, out=str(out / "utility" / "pairs"))  # fmt: skip
    wired = [{"pairs": sample.out, "out": str(out / "utility" / m), "mode": m, "resume": resume,
              "overwrite": not resume} for m in p.utility.modes]  # fmt: skip
    return [sample] + [_cfg(AnnotateConfig, "utility.settings", p.utility.settings, w) for w in wired]


def _run_utility(cfgs):
    """Write the sample (each question's candidates together, in qid order), then annotate it in each mode."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipelines.annotate import run as annotate
    from pipelines.io import read_table

    sample, *modes = cfgs
    held = set(read_table(sample.queries).column("qid").to_pylist())
    cands = read_table(sample.candidates)
    cands = cands.filter(pc.is_in(cands.column("qid"), value_set=pa.array(sorted(held), pa.string())))
    positive = pc.fill_null(pc.greater_equal(cands.column("label"), sample.min_grade), False)
    qids = sorted(set(cands.filter(positive).column("qid").to_pylist()))[: sample.questions]
    keep = cands.filter(pc.is_in(cands.column("qid"), value_set=pa.array(qids, pa.string())))
    keep = keep.sort_by([("qid", "ascending"), ("cand_rank", "ascending")])
    dest = Path(sample.out) / "part-00000.parquet"
    dest.parent.mkdir(parents=True, exist_ok=True)
    # rewritten only when it differs: annotate --resume refuses an input whose file changed under it
    if not dest.exists() or not pq.read_table(dest).equals(keep):
        pq.write_table(keep, dest)
    results = {}
    for cfg in modes:
        r = annotate(cfg)
        results[cfg.mode] = {**_summary(r), "questions_per_s": r.extra.get("questions_per_s"),
                             "parse_fail_rate": r.extra.get("parse_fail_rate")}  # fmt: skip
    return {"questions": len(qids), "modes": results}


def _utility_eval(p, out, resume):
    from pipelines.utility_eval import UtilityEvalConfig

    sp = p.annotate_split
    return [UtilityEvalConfig(utility={m: str(out / "utility" / m) for m in p.utility.modes},
                              pairs=str(out / "utility" / "pairs"), judgments=str(out / "judgments"),
                              features=str(out / "features-test"), out=str(out / "utility-eval"),
                              bootstrap=p.judge_eval.get("bootstrap", 1000))] if sp else []  # fmt: skip


def _run_utility_eval(cfgs):
    from pipelines.utility_eval import run

    r = run(cfgs[0])
    return {"f1_per_question": {k: v["f1_per_question"] for k, v in r.extra["rows"].items()},
            "questions": r.extra["questions"]}  # fmt: skip


# ------------------------------------------------------------------------- paper 2: retrievers and RAG


class RagSampleConfig(StageConfig):
    """The train questions the rag stages learn from: the first ``questions`` (by qid) of the split's questions
    that have a candidate. Writes their candidates (each question's together, by rank) for utility annotation and
    their human labels, so that every retriever trains on the same questions."""

    candidates: str
    queries: str
    qrels: str
    questions: int | None = None
    out: str


def _rag_sample(p: PipelineConfig, out: Path) -> RagSampleConfig:
    return RagSampleConfig(candidates=str(out / "candidates"), queries=str(out / "splits" / "train" / "queries"),
                           qrels=str(out / "splits" / "train" / "qrels"), questions=p.rag.train_questions,
                           out=str(out / "rag" / "train"))  # fmt: skip


def _rag_utility(p, out, resume):
    from pipelines.annotate import AnnotateConfig

    sample = _rag_sample(p, out)
    wired = {"pairs": str(Path(sample.out) / "pairs"), "out": str(out / "rag" / "utility"),
             "mode": p.rag.utility_mode, "resume": resume, "overwrite": not resume}  # fmt: skip
    return [sample, _cfg(AnnotateConfig, "rag.utility", p.rag.utility, wired)]


def _write_if_changed(table, dest: Path) -> None:
    """Rewritten only when it differs: annotate --resume refuses an input whose file changed under it, and the
    runner's output hash would change for nothing."""
    import pyarrow.parquet as pq

    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists() or not pq.read_table(dest).equals(table):
        pq.write_table(table, dest)


def write_rag_sample(sample: RagSampleConfig) -> list[str]:
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines.io import read_table

    split = set(read_table(sample.queries).column("qid").to_pylist())
    cands = read_table(sample.candidates)
    cands = cands.filter(pc.is_in(cands.column("qid"), value_set=pa.array(sorted(split), pa.string())))
    qids = sorted(set(cands.column("qid").to_pylist()))[: sample.questions]
    keep = pa.array(qids, pa.string())
    pairs = cands.filter(pc.is_in(cands.column("qid"), value_set=keep))
    pairs = pairs.sort_by([("qid", "ascending"), ("cand_rank", "ascending")])
    qrels = read_table(sample.qrels)
    qrels = qrels.filter(pc.is_in(qrels.column("qid"), value_set=keep)).sort_by([("qid", "ascending"),
                                                                                ("docid", "ascending")])  # fmt: skip
    _write_if_changed(pairs, Path(sample.out) / "pairs" / "part-00000.parquet")
    _write_if_changed(qrels, Path(sample.out) / "qrels" / "part-00000.parquet")
    return qids


def _run_rag_utility(cfgs):
    from pipelines.annotate import run as annotate

    sample, cfg = cfgs
    qids = write_rag_sample(sample)
    r = annotate(cfg)
    return {"questions": len(qids), **_summary(r), "mode": cfg.mode, "questions_per_s": r.extra.get("questions_per_s"),
            "parse_fail_rate": r.extra.get("parse_fail_rate"), "utility": r.extra.get("utility")}  # fmt: skip


def _rag_retrievers(p, out, resume):
    """One retriever per label source, all on the sampled train questions, with the same settings, validated on
    the val split's human labels; the held-out questions are excluded from everything."""
    from pipelines.stage import deep_merge
    from pipelines.train_retriever import RetrieverTrainConfig

    human, utility = str(out / "rag" / "train" / "qrels"), str(out / "rag" / "utility")
    labels = {"human": {"source": "human", "human": [human]},
              "utility": {"source": "utility", "llm": [utility]},
              "utility_h20": {"source": "curriculum", "human": [human], "llm": [utility], "llm_kind": "utility",
                              "human_fraction": p.rag.human_fraction}}  # fmt: skip
    values = dict(p.rag.retriever)
    if "labels" in values:
        raise ConfigError(
            "rag.retriever.labels: set by the pipeline (one retriever per rag.label_sources); remove it"
        )
    cfgs = []
    for src in p.rag.label_sources:
        wired = {"index": str(out / "index"), "queries": [str(out / "data" / "queries")],
                 "labels": deep_merge(labels[src], {"min_grade": p.rag.min_grade}),
                 "val": [str(out / "splits" / "val" / "qrels")],
                 "exclude_queries": [str(out / "splits" / p.annotate_split / "queries")],
                 "out": str(out / "rag" / f"retriever-{src}"), "resume": resume}  # fmt: skip
        cfgs.append(_cfg(RetrieverTrainConfig, "rag.retriever", values, wired))
    return cfgs


def _run_rag_retrievers(cfgs):
    from pipelines.train_retriever import train

    out = {}
    for c in cfgs:
        r = train(c)
        out[Path(c.out).name.removeprefix("retriever-")] = {
            **_summary(r),
            "val_ndcg10": r.extra["metrics"].get("val_ndcg10"),
        }
    return out


def _rag_indexes(p, out, resume):
    from pipelines.index import IndexConfig

    # the index section's settings (kind, actors, GPUs), each fine-tuned encoder in place of its own
    values = {**{k: v for k, v in p.index.items() if k != "encoder"}, "dense": True}
    return [_cfg(IndexConfig, "index", values, {"docs": str(out / "data" / "docs"),
                                                "out": str(out / "rag" / f"index-{src}"),
                                                "encoder": str(out / "rag" / f"retriever-{src}")})
            for src in p.rag.label_sources]  # fmt: skip


def _run_rag_indexes(cfgs):
    from pipelines.index import build

    return {Path(c.out).name.removeprefix("index-"): _summary(build(c)) for c in cfgs}


def rag_rows(p: PipelineConfig) -> dict[str, tuple[str, str]]:
    """The retrievers rag_eval compares: name -> (index directory under OUT, retriever)."""
    rows = {"bm25": ("index", "bm25")}
    if p.index.get("dense", True):
        rows["minilm"] = ("index", "dense")
    rows.update({src: (f"rag/index-{src}", "dense") for src in p.rag.label_sources})
    return rows


def _rag_eval(p, out, resume):
    """One rag eval over every retriever and both brackets: the generator is loaded once per actor for all."""
    from pipelines.rag import RagEvalConfig

    split = out / "splits" / p.annotate_split
    retrievers = {
        name: {"index": str(out / idx), "retriever": kind} for name, (idx, kind) in rag_rows(p).items()
    }
    wired = {"questions": str(split / "questions"), "qrels": str(split / "qrels"), "min_grade": p.rag.min_grade,
             "limit": p.rag.questions, "index": str(out / "index"), "systems": ["closed_book", "oracle"],
             "retrievers": retrievers, "out": str(out / "rag-eval" / "answers"), "resume": resume,
             "overwrite": not resume}  # fmt: skip
    return [_cfg(RagEvalConfig, "rag.eval", p.rag.eval, wired)]


def _run_rag_eval(cfgs):
    from pipelines.rag import run as rag_eval

    r = rag_eval(cfgs[0])
    summary = rag_summary(r.extra, Path(cfgs[0].out))
    return {"answer_recall": {k: v.get("answer_in_context") for k, v in summary["rows"].items()},
            "em": {k: v.get("em") for k, v in summary["rows"].items()}, "questions": summary["questions"],
            "answers_per_busy_s": summary["answers_per_busy_s"]}  # fmt: skip


#: how the rag_eval table names its rows
RAG_LABELS = {"bm25": "BM25", "minilm": "MiniLM (off the shelf)", "human": "fine-tuned: human labels",
              "utility": "fine-tuned: utility labels", "utility_h20": "fine-tuned: utility + 20% human (curriculum)",
              "closed_book": "closed book (no passage)", "oracle": "oracle (gold supporting passages)"}  # fmt: skip


def rag_summary(metrics: dict[str, Any], answers: Path) -> dict[str, Any]:
    """rag-eval/summary.json, table.md and rag.png beside ``answers`` (the rag eval's directory): a row per
    retriever and bracket with its 95% CIs, and the paired difference in answer recall of each fine-tuned
    retriever against the human-trained one."""
    from eval.rag import paired_difference
    from pipelines.io import read_table

    out = answers.parent
    order = [*RAG_LABELS, *metrics["systems"]]
    rows: dict[str, dict[str, Any]] = {}
    for key in sorted(metrics["systems"], key=order.index):
        s = metrics["systems"][key]
        rows[key] = {"name": RAG_LABELS.get(key, key), "k": s["k"], "questions": s["questions"],
                     **{m: (s.get(m) or {}).get("mean") for m in ("em", "f1", "answer_in_context", "supporting_recall")},
                     **{f"{m}_ci95": [(s.get(m) or {}).get("ci_low"), (s.get(m) or {}).get("ci_high")]
                        for m in ("em", "f1", "answer_in_context", "supporting_recall")},
                     "empty_answers": s["empty_answers"], "without_gold_answer": s["without_gold_answer"]}  # fmt: skip
    per_q: dict[str, dict[str, float]] = {}
    t = read_table(answers / "rows")
    for system, qid, v in zip(t.column("system").to_pylist(), t.column("qid").to_pylist(),
                              t.column("answer_in_context").to_pylist(), strict=True):  # fmt: skip
        if v is not None:
            per_q.setdefault(system, {})[qid] = float(v)
    if "human" in per_q:
        for name in ("utility", "utility_h20"):
            if name in per_q:
                common = sorted(set(per_q[name]) & set(per_q["human"]))
                d = paired_difference([per_q[name][q] for q in common], [per_q["human"][q] for q in common])
                rows[name]["answer_recall_vs_human"] = d
    comparisons = [_vs_human(r["name"], r["answer_recall_vs_human"]) for r in rows.values()
                   if r.get("answer_recall_vs_human")]  # fmt: skip
    summary = {"caption": f"RAG on {max(r['questions'] for r in rows.values())} held-out questions, top "
                          f"{metrics['k']} passages, generator {metrics['generator']} ({metrics['prompt_version']}); "
                          "retrievers fine-tuned on the train split's questions only (utility: LLM labels only), "
                          "each checkpoint chosen on the val split's human labels; answer recall leaves out "
                          "yes/no answers; 95% CIs over questions.",
               "rows": rows, "comparisons": comparisons, "questions": max(r["questions"] for r in rows.values()),
               "generator": metrics["generator"], "answers_per_busy_s": metrics.get("answers_per_busy_s"),
               "answers_per_s": metrics.get("answers_per_s")}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _rag_table(out / "table.md", summary)
    _rag_plot(out / "rag.png", summary)
    return summary


def _rag_table(path: Path, summary: dict[str, Any]) -> None:
    def cell(r, m):
        v, ci = r.get(m), r.get(f"{m}_ci95") or [None, None]
        return "-" if v is None else f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

    lines = [summary["caption"], "", "| retriever | k | supporting recall@k | answer recall@k | EM | F1 | questions "
             "| no gold answer | empty answers |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in summary["rows"].values():
        lines.append(f"| {r['name']} | {r['k'] if r['k'] is not None else 'gold'} | {cell(r, 'supporting_recall')} | "
                     f"{cell(r, 'answer_in_context')} | {cell(r, 'em')} | {cell(r, 'f1')} | {r['questions']} | "
                     f"{r['without_gold_answer']} | {r['empty_answers']} |")  # fmt: skip
    lines += ["", *summary.get("comparisons", ())]
    path.write_text("\n".join(lines) + "\n")


def _vs_human(name: str, d: dict[str, Any]) -> str:
    """One fine-tuned retriever against the human-trained one, in the words of paper 2's claims (a difference and
    a ratio of answer recall, each with its paired 95% interval): written once, shown by the table and report."""
    if d.get("mean") is None:
        return f"{name} vs human labels: no question scored by both."
    ratio = "ratio undefined (the human-trained retriever recalls no answer)"
    if d.get("ratio") is not None:
        ci = "" if d.get("ratio_ci_low") is None else f" [{d['ratio_ci_low']:.2f}, {d['ratio_ci_high']:.2f}]"
        ratio = f"{d['ratio']:.2f}x{ci}"
    return (f"{name} vs human labels, answer recall@k: {d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], "
            f"{ratio} of the human-trained retriever's; paired over {d['n']} questions.")  # fmt: skip


def _rag_plot(path: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = list(summary["rows"].values())
    metrics = [("answer_in_context", "answer recall@k"), ("em", "EM"), ("f1", "F1")]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows) * 1.2))
    y = np.arange(len(rows))
    h = 0.8 / len(metrics)
    for j, (m, label) in enumerate(metrics):
        vals = np.array([r.get(m) if r.get(m) is not None else np.nan for r in rows], float)
        ci = [r.get(f"{m}_ci95") or [None, None] for r in rows]
        lo = np.array([np.nan if c[0] is None else c[0] for c in ci], float)  # a bound of 0.0 is a bound
        hi = np.array([np.nan if c[1] is None else c[1] for c in ci], float)
        err = np.nan_to_num(np.vstack([vals - lo, hi - vals]), nan=0.0).clip(min=0)
        ax.barh(y + (j - 1) * h, np.nan_to_num(vals), h, xerr=err, capsize=2, label=label)
    ax.set_yticks(y, [r["name"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"{summary['questions']} held-out questions (95% CI)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report(p, out, resume):
    return [ReportConfig(run=str(out), out=str(out / "report"))]


class ReportConfig(StageConfig):
    run: str
    out: str


# ------------------------------------------------------------------------------------------ runners


def _summary(r) -> dict[str, Any]:
    return {"counts": dict(r.counts), "wall_s": r.wall_s}


def _run_one(fn_path: str):
    def run(cfgs):
        import importlib

        module, _, fn = fn_path.partition(":")
        return _summary(getattr(importlib.import_module(module), fn)(cfgs[0]))

    return run


def _run_validate(cfgs):
    from pipelines.validate import validate

    Path(cfgs[0].report).parent.mkdir(parents=True, exist_ok=True)
    report = validate(cfgs[0])
    if not report.ok:
        raise ConfigError(f"data validation failed: see {report.path}")
    return {"ok": True}


def _produce_and_score(cfgs, produce) -> tuple[dict[str, Any], Path]:
    """Write each run table (``produce``: rank predict or index search), then score the runs in order: the
    RankEvalConfigs follow the configs that make the runs they read. Returns each score by name and the
    directory the runs live in."""
    from pipelines.rank import RankEvalConfig, evaluate

    results = {}
    for cfg in cfgs:
        if isinstance(cfg, RankEvalConfig):
            results[Path(cfg.out).name] = evaluate(cfg).extra
        else:
            produce(cfg)
    return results, Path(cfgs[0].out).parent


def _run_rank_eval(cfgs):
    """Predict every ranker and baseline on the test features, score each against the test queries' human
    labels, and write rank-eval/summary.json, table.md and ndcg10.png: one row per ranker and baseline."""
    from pipelines.rank import predict

    results, out = _produce_and_score(cfgs, predict)
    summary = rank_summary(results, out)
    return {"ndcg10": {k: v["ndcg10"] for k, v in summary["rows"].items()}, "n_queries": summary["n_queries"]}


RANKERS_CAPTION = (
    "Rankers on {n} test queries (human labels; no test query trained or calibrated the judge or a "
    "ranker); 95% CIs over queries."
)


def rank_summary(results: dict[str, dict[str, Any]], out: Path, caption: str = RANKERS_CAPTION,
                 baselines: tuple[str, ...] = tuple(BASELINES)) -> dict[str, Any]:  # fmt: skip
    """Per ranker: mean NDCG@10 / MRR@10 / R@100 with 95% bootstrap CIs over test queries, and the paired
    difference from BM25; written as summary.json, table.md and a plot with the intervals."""
    from eval.ranking import bootstrap_ci
    from pipelines.io import read_table

    rows: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        per_query = read_table(out / name / "per_query")
        row: dict[str, Any] = {"name": name, "n_queries": r["n_queries"]}
        for m in ("ndcg10", "mrr10", "recall100"):
            if m in per_query.column_names:
                row[m] = r["mean"][m]
                row[f"{m}_ci95"] = list(bootstrap_ci(per_query.column(m).to_pylist()))
        vs = (r.get("vs_baseline") or {}).get("ndcg10")
        if vs:
            row["ndcg10_vs_bm25"] = vs["diff"]
            row["ndcg10_vs_bm25_ci95"] = vs["ci95"]
            row["ndcg10_vs_bm25_p"] = vs["p_ttest"]
        rows[name] = row
    n = max((r["n_queries"] for r in rows.values()), default=0)
    summary = {"n_queries": n, "rows": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [caption.format(n=n), "",
             "| ranker | NDCG@10 | 95% CI | MRR@10 | R@100 | NDCG@10 - BM25 | 95% CI | p |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def ci(v):
        return f"[{v[0]:.3f}, {v[1]:.3f}]" if v else ""

    for r in rows.values():
        lines.append(f"| {r['name']} | {r.get('ndcg10', float('nan')):.4f} | {ci(r.get('ndcg10_ci95'))} | "
                     f"{r.get('mrr10', float('nan')):.4f} | {r.get('recall100', float('nan')):.4f} | "
                     + (f"{r['ndcg10_vs_bm25']:+.4f} | {ci(r['ndcg10_vs_bm25_ci95'])} | {r['ndcg10_vs_bm25_p']:.3g} |"
                        if "ndcg10_vs_bm25" in r else " | | |"))  # fmt: skip
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _plot_rankers(rows, out / "ndcg10.png", n, baselines)
    return summary


def _plot_rankers(rows: dict[str, dict[str, Any]], path: Path, n: int, baselines: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in rows if "ndcg10" in rows[k]]
    means = [rows[k]["ndcg10"] for k in names]
    lo = [m - rows[k]["ndcg10_ci95"][0] for k, m in zip(names, means, strict=True)]
    hi = [rows[k]["ndcg10_ci95"][1] - m for k, m in zip(names, means, strict=True)]
    fig, ax = plt.subplots(figsize=(6, 3))
    colors = ["#999999" if k in baselines else "#3b6ea8" for k in names]
    ax.barh(names[::-1], means[::-1], xerr=[lo[::-1], hi[::-1]], color=colors[::-1], capsize=3)
    ax.set_xlabel(f"NDCG@10 on {n} test queries (95% CI)")
    ax.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_serve(cfgs):
    from ray import serve as ray_serve

    from pipelines import serve

    cfg = cfgs[0]
    running = _serve_running()
    serve.start(cfg)
    url = f"http://{cfg.host}:{cfg.port}"
    t0 = time.perf_counter()
    try:
        code = serve.check(cfg, url)
    finally:
        if not running:  # Serve was started for this check: take it down with its proxy and port
            ray_serve.shutdown()
    if code:
        raise ConfigError(f"serve check failed at {url}")
    result = {
        "url": url,
        "ok": True,
        "check_s": round(time.perf_counter() - t0, 2),
        "judge": cfg.judge is not None,
    }
    out = Path(cfg.ranker).parent / "serve"
    out.mkdir(parents=True, exist_ok=True)
    (out / "check.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _serve_running() -> bool:
    """Whether a Serve controller already runs on this cluster (not asking Serve itself: that starts one)."""
    import ray

    return any(a["name"] == "SERVE_CONTROLLER_ACTOR" for a in ray.util.list_named_actors(all_namespaces=True))


def _run_report(cfgs):
    from eval.report import write_report

    path = write_report(cfgs[0].run, cfgs[0].out)
    return {"report": str(path)}


def _run_rankers(cfgs):
    from pipelines.rank import train

    return {c.label_source: _summary(train(c)) for c in cfgs}


def _run_annotate_pool(cfgs):
    """Annotate the pool, after checking that no held-out query trained, selected or calibrated the judge
    (the wiring could be overridden, e.g. judge.val pointed at the test pairs)."""
    from pipelines.annotate import run as annotate
    from pipelines.experiment import judge_label_queries
    from pipelines.io import read_table

    out = Path(cfgs[0].out).parent
    pool = json.loads((out / "pool" / "manifest.json").read_text())
    assignment = read_table(out / "splits" / "splits")
    held = {q for q, sp in zip(assignment.column("qid").to_pylist(), assignment.column("split").to_pylist(),
                               strict=True) if sp in pool.get("hold_out", [])}  # fmt: skip
    seen = set(judge_label_queries(str(out / "judgments"))["queries"]) & held
    if seen:
        raise ConfigError(f"judge.train / judge.val: the judge learned from {len(seen)} held-out quer(ies), e.g. "
                          f"{sorted(seen)[0]}: its labels would train rankers scored on them")  # fmt: skip
    return _summary(annotate(cfgs[0]))


def _run_pool(cfgs):
    from pipelines.pool import run as pool

    return _summary(pool(cfgs[0]))


def stages(p: PipelineConfig) -> list[Stage]:
    """The DAG of this pipeline, in an order that runs every stage after the stages it needs."""
    out: list[Stage] = []
    if p.data.source == "synth":
        out.append(Stage("synth", (), ("raw",), _synth, _run_one("pipelines.synth:synth")))
    out += [
        Stage("prepare", ("synth",) if p.data.source == "synth" else (), ("data",), _prepare,
              _run_one("pipelines.data:prepare")),
        Stage("validate", ("prepare",), ("validation",), _validate, _run_validate),
        Stage("split", ("prepare",), ("splits",), _split, _run_one("pipelines.data:split")),
        Stage("index", ("prepare",), ("index",), _index, _run_one("pipelines.index:build")),
        Stage("candidates", ("prepare", "index"), ("candidates",), _candidates, _run_one("pipelines.candidates:run")),
    ]  # fmt: skip
    if p.judge is not None:
        out += _relevance_stages(p)
    if p.rag is not None:
        out += [
            Stage("rag_utility", ("candidates", "split"), ("rag/train", "rag/utility"), _rag_utility,
                  _run_rag_utility, resumable=True),
            Stage("rag_retrievers", ("rag_utility", "index", "split"),
                  tuple(f"rag/retriever-{s}" for s in p.rag.label_sources), _rag_retrievers, _run_rag_retrievers,
                  resumable=True),
            Stage("rag_indexes", ("rag_retrievers", "prepare"), tuple(f"rag/index-{s}" for s in p.rag.label_sources),
                  _rag_indexes, _run_rag_indexes),
            Stage("rag_eval", ("rag_indexes", "index", "split"), ("rag-eval",), _rag_eval, _run_rag_eval,
                  resumable=True),
        ]  # fmt: skip
    if p.serve.check:
        out.append(Stage("serve", ("rankers", "index", "judge"), ("serve",), _serve, _run_serve))
    out.append(Stage("report", tuple(s.name for s in out), ("report",), _report, _run_report))
    return out


def _relevance_stages(p: PipelineConfig) -> list[Stage]:
    """Paper 1's half: the judge, its annotation of the pool, the rankers and the judge-labelled retriever."""
    sp = p.annotate_split
    out = [
        Stage("pool", ("candidates", "split"), ("pool",), _pool, _run_pool),
        Stage("judge", ("split",), ("judge",), _judge, _run_one("pipelines.finetune_judge:finetune"), resumable=True),
        Stage("annotate", ("judge", "split"), ("judgments",), _annotate_on(f"splits/{sp}/pairs", "judgments"),
              _run_one("pipelines.annotate:run"), resumable=True),
        Stage("judge_eval", ("annotate", "split"), ("judge-eval",), _judge_eval, _run_one("pipelines.judge:evaluate")),
        Stage("annotate_pool", ("judge", "pool", "annotate"), ("judgments-pool",),
              _annotate_on("pool/unlabelled", "judgments-pool"), _run_annotate_pool, resumable=True),
        Stage("features_train", ("pool", "prepare"), ("features-train",), _features("pool/*/part-*.parquet", "features-train"),
              _run_one("pipelines.rank:features")),
        Stage("features_test", ("split", "prepare"), ("features-test",), _features(f"splits/{sp}/pairs", "features-test"),
              _run_one("pipelines.rank:features")),
        Stage("rankers", ("features_train", "annotate_pool"), tuple(f"ranker-{s}" for s in p.label_sources), _rankers,
              _run_rankers),
        Stage("rank_eval", ("rankers", "features_test", "split"), ("rank-eval",), _rank_eval, _run_rank_eval),
        Stage("augment", ("features_test", "annotate"), ("augment",), _augment, _run_one("pipelines.experiment:augment")),
    ]  # fmt: skip
    if p.retriever is not None:
        out += [
            Stage("retriever", ("split", "index", "annotate_pool"), ("retriever",), _retriever,
                  _run_one("pipelines.train_retriever:train"), resumable=True),
            Stage("retriever_index", ("retriever", "prepare"), ("retriever-index",), _retriever_index,
                  _run_one("pipelines.index:build")),
            Stage("retriever_eval", ("retriever_index", "index", "split"), ("retriever-eval",), _retriever_eval,
                  _run_retriever_eval),
        ]  # fmt: skip
    if p.utility is not None:
        out += [
            Stage("utility", ("candidates", "split"), ("utility",), _utility, _run_utility, resumable=True),
            Stage("utility_eval", ("utility", "annotate", "features_test"), ("utility-eval",), _utility_eval,
                  _run_utility_eval),
        ]  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------ hashing


def config_hash(cfgs: list[StageConfig]) -> str:
    """Hash of what a stage computes: its configs without the flags that only say how to (re)start it."""
    data = [
        {k: v for k, v in c.model_dump(mode="json").items() if k not in ("resume", "overwrite")} for c in cfgs
    ]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class OutputHasher:
    """Content hash of a stage's output paths: every file's relative path and bytes. A file whose size and
    mtime match the last run's reuses that run's digest, so an unchanged multi-GB output is not re-read."""

    SKIP_DIRS = frozenset({"ray_train", "__pycache__", ".staging"})

    def __init__(self, cache: dict[str, list]):
        self.cache = cache

    def file_digest(self, path: Path) -> str:
        st = path.stat()
        key = str(path)
        hit = self.cache.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        h = hashlib.sha256()
        if path.name == "judge_card.json":
            # `augrel judge diff --record` writes audit figures into a judge's card; they do not change the judge,
            # so they must not make the next run retrain it and everything after it. The card is digested as
            # JudgeCard.save writes it, without the audit: a card written before audits existed keeps its digest.
            card = {k: v for k, v in json.loads(path.read_text()).items() if k != "audit"}
            h.update((json.dumps(card, indent=2, default=str) + "\n").encode())
        else:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        self.cache[key] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
        return h.hexdigest()

    def __call__(self, root: Path, rels: tuple[str, ...]) -> str | None:
        h = hashlib.sha256()
        for rel in rels:
            p = root / rel
            if not p.exists():
                return None
            files = [p] if p.is_file() else sorted(
                f for f in p.rglob("*") if f.is_file() and not (set(f.relative_to(p).parts) & self.SKIP_DIRS)
                and not f.name.startswith("."))  # fmt: skip
            for f in files:
                h.update(str(f.relative_to(root)).encode() + b"\0" + self.file_digest(f).encode())
        return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------- running


def _load_manifest(out: Path) -> dict[str, Any]:
    p = out / MANIFEST
    return json.loads(p.read_text()) if p.exists() else {}


def _save_manifest(out: Path, m: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(m, indent=2, default=str) + "\n")
    os.replace(tmp, out / MANIFEST)


def _paths_every_node_sees(p: PipelineConfig) -> None:
    """On a cluster of several nodes, a relative path resolves in each node's own working directory (under
    `augrel submit`, a copy of the repository per node): write tasks on other nodes would write elsewhere and
    rows would be lost. Refuse it, naming the field."""
    import ray

    if not ray.is_initialized():
        return
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes < 2:
        return
    for field, value in (("out", p.out), ("data.src", p.data.src)):
        if value and not Path(value).is_absolute():
            raise ConfigError(f"{field}: {value!r} is relative and this Ray cluster has {nodes} nodes, each of which "
                              "would resolve it in its own working directory; give a path every node mounts")  # fmt: skip


@dataclass
class RunResult:
    out: str
    ran: list[str]
    skipped: list[str]
    wall_s: dict[str, float]
    report: str | None


def run(p: PipelineConfig, *, resume: bool = False, from_stage: str | None = None, until: str | None = None,
        echo: Callable[[str], None] = print) -> RunResult:  # fmt: skip
    from pipelines.tracking import Tracker

    _paths_every_node_sees(p)
    out = Path(p.out)
    dag = stages(p)
    names = [s.name for s in dag]
    for flag, value in (("--from", from_stage), ("--until", until)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value}: no such stage (stages: {', '.join(names)})")
    m = _load_manifest(out)
    version = code_fingerprint()
    m.update(name=p.name, dag={s.name: list(s.needs) for s in dag}, order=names,
             config=p.model_dump(mode="json"), splits_use=SPLITS_USE, held_out_split=p.annotate_split)  # fmt: skip
    recs: dict[str, Any] = m.setdefault("stages", {})
    hasher = OutputHasher(m.setdefault("file_hashes", {}))
    forced = set(names[names.index(from_stage) :]) if from_stage else set()
    last = names.index(until) if until else len(names) - 1
    ran, skipped, walls = [], [], {}
    t_run = time.time()
    tracker = Tracker(p.tracking.mlflow_uri, p.tracking.experiment, p.name)
    with tracker:
        for i, st in enumerate(dag[: last + 1]):
            rec = recs.get(st.name, {})
            interrupted = rec.get("status") == "running"
            inputs = {n: recs.get(n, {}).get("output_hash") for n in st.needs if n in names}
            # resume only onto the same config and inputs: a changed section, or an upstream stage rerun since (a
            # retrained retriever, a rebuilt index), makes the interrupted stage's finished part stale
            cfgs = st.configs(p, out, False)
            chash = config_hash(cfgs)
            resuming = (resume and st.resumable and interrupted and rec.get("inputs") == inputs
                        and rec.get("config_hash") == chash)  # fmt: skip
            if resuming:
                cfgs = st.configs(p, out, True)
            current = hasher(out, st.outputs) if rec.get("status") == "done" else None
            if (st.name not in forced and rec.get("status") == "done" and rec.get("config_hash") == chash
                    and rec.get("code_version") == version and rec.get("inputs") == inputs
                    and current is not None and current == rec.get("output_hash")):  # fmt: skip
                skipped.append(st.name)
                echo(f"== {i + 1}/{len(dag)} {st.name}: unchanged, skipped")
                continue
            why = ("forced (--from)" if st.name in forced else "first run" if not rec else
                   "resuming" if resuming else
                   "interrupted" if interrupted else "config changed" if rec.get("config_hash") != chash else
                   "code changed" if rec.get("code_version") != version else
                   "inputs changed" if rec.get("inputs") != inputs else "outputs changed or missing")  # fmt: skip
            echo(f"== {i + 1}/{len(dag)} {st.name} ({why}) -> {', '.join(str(out / o) for o in st.outputs)}")
            recs[st.name] = {"status": "running", "config_hash": chash, "inputs": inputs,
                             "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
            _save_manifest(out, m)
            t0 = time.perf_counter()
            result = st.run(cfgs)
            wall = time.perf_counter() - t0
            recs[st.name] = {**recs[st.name], "status": "done", "output_hash": hasher(out, st.outputs),
                             "wall_s": round(wall, 2), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "result": result, "code_version": version, "git": code_version()}  # fmt: skip
            _save_manifest(out, m)
            tracker.log_stage(st.name, cfgs, result, wall, [out / o for o in st.outputs])
            ran.append(st.name)
            walls[st.name] = wall
            echo(f"   {st.name} done in {wall:.1f}s")
        m.setdefault("runs", []).append({"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t_run)),
                                         "wall_s": round(time.time() - t_run, 2), "ran": ran, "skipped": skipped})  # fmt: skip
        _save_manifest(out, m)
    report = recs.get("report", {}).get("result", {}).get("report")
    return RunResult(str(out), ran, skipped, walls, report)


def headline(out: Path) -> list[str]:
    """The figures a run is judged by, one line each, from its stage outputs."""
    lines = []
    j = out / "judge-eval" / "metrics.json"
    if j.exists():
        m = json.loads(j.read_text())["metrics"]
        lines.append(f"judge vs human: kappa {m['cohen_kappa']:.3f}, weighted kappa {m['weighted_kappa_quadratic']:.3f}, "
                     f"alpha {m['krippendorff_alpha_ordinal']:.3f}, tau {m['kendall_tau_b_pooled']:.3f}")  # fmt: skip
    for name, what in (("judgments-pool", "the pool (rankers' judge labels)"), ("judgments", "test pairs")):
        a = out / name / "manifest.json"
        if a.exists():
            m = json.loads(a.read_text())
            lines.append(f"annotation, {what}: {m['counts'].get('judged', 0):,} pairs judged, "
                         f"{m['counts'].get('rejected', 0):,} rejected, "
                         f"{m.get('steady_pairs_per_s') or m.get('pairs_per_s')} pairs/s")  # fmt: skip
    r = out / "rank-eval" / "summary.json"
    if r.exists():
        rows = json.loads(r.read_text())["rows"]
        lines.append("rankers NDCG@10 on test queries: " + ", ".join(
            f"{k} {v['ndcg10']:.4f}" for k, v in rows.items() if "ndcg10" in v))  # fmt: skip
    a = out / "rag-eval" / "summary.json"
    if a.exists():
        rows = json.loads(a.read_text())["rows"]
        lines.append("RAG answer recall@k / EM on test questions: " + ", ".join(
            f"{k} {v['answer_in_context']:.3f} / {v['em']:.3f}" if v.get("answer_in_context") is not None
            else f"{k} - / {v['em']:.3f}" for k, v in rows.items() if v.get("em") is not None))  # fmt: skip
    g = out / "augment" / "results.json"
    if g.exists():
        m = json.loads(g.read_text())
        lines.append("augmentation NDCG@10: " + ", ".join(f"{k} {v['ndcg10']:.4f}" for k, v in m.items()))
    return lines
