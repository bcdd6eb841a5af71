"""``augrel experiment augment``: do judge labels make up for missing human labels? (papers 1 and 2)

Query-level k-fold cross-validation over a labelled features table (every query is tested exactly once, and
test folds are always scored against the human labels only). On each fold, for each seed (which redraws the
human sample and seeds LightGBM), rankers are trained with:

- ``h20``: a ``human_fraction`` share of each training query's human labels, nothing else;
- ``h20+judge``: those human labels, and the judge's labels on the rest of the training pairs (``mix``);
- ``curriculum``: the judge's labels on every training pair, then more trees on the same human share;
- ``judge``: the judge's labels only;
- ``h100``: every human label;

next to two unsupervised baselines, BM25 and the MiniLM cosine, ranked on the same candidates. Training
queries are split again (``val_fraction``) for early stopping, labelled like the training part. Per query,
a method's value is its mean over seeds; the table gives the mean over queries with a bootstrap 95% interval,
and a paired t-test against ``h20``. Writes ``results.json``, ``table.md``, ``per_query.parquet`` and
``augment.png``.

Every query of the features table is scored in some test fold, so none of them may be a query whose human
labels trained, validated or calibrated the judge: its labels there would grade pairs it learnt from, and the
judge-labelled rows would be measured in sample. The stage reads which queries those are from the judge that
made the judgments (``judge_label_queries``) and refuses an overlap; the table says which queries trained what.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipelines.errors import DataError
from pipelines.io import write_table
from pipelines.rank import (
    RankerSettings,
    RankTrainConfig,
    attach_judge,
    feature_matrix,
    fit_ranker,
    read_features,
    split_queries,
)
from pipelines.stage import StageConfig, StageResult, Timer, write_stage_files

log = logging.getLogger("augrel")

METHODS = {
    "bm25": "BM25",
    "dense": "MiniLM cosine",
    "h20": "LambdaMART, {pct}% human",
    "h20+judge": "LambdaMART, {pct}% human + judge on the rest",
    "curriculum": "LambdaMART, judge then {pct}% human",
    "judge": "LambdaMART, judge labels only",
    "h100": "LambdaMART, 100% human",
}
TRAINED = {"h20": ("human", None), "h20+judge": ("mix", None), "curriculum": ("curriculum", None),
           "judge": ("judge", 1.0), "h100": ("human", 1.0)}  # fmt: skip


class AugmentConfig(StageConfig):
    """``augrel experiment augment``: the augmentation experiment on a labelled features table."""

    features: str = Field(description="features table with human labels (augrel rank features)")
    judgments: str = Field(description="judge labels for the same pairs (augrel annotate)")
    out: str = Field(description="output directory")
    folds: int = Field(5, ge=2)
    human_fraction: float = Field(0.2, gt=0, lt=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    val_fraction: float = Field(0.2, ge=0, lt=1)
    fold_seed: int = 0
    methods: list[str] = Field(default_factory=lambda: list(METHODS))
    ranker: RankerSettings = RankerSettings(n_estimators=300)
    judge_label_queries: list[str] | None = Field(
        None,
        description="queries whose human labels trained, validated or calibrated whatever made the judgments "
        "(none of them may be scored here); default: read from the judge named in the judgments' config.yaml "
        "(its card's training and validation sources, and the calibration pairs of `judge calibrate`)",
    )


def _qids_of(paths: list[str]) -> set[str]:
    from pipelines.io import read_table

    qids: set[str] = set()
    for p in paths:
        try:
            qids.update(str(q) for q in read_table(p).column("qid").to_pylist())
        except (DataError, OSError) as e:
            raise DataError(f"judgments: cannot read the queries of the judge's source {p} ({e}): set "
                            "judge_label_queries") from None  # fmt: skip
    return qids


def judge_label_queries(judgments: str) -> dict[str, Any]:
    """Which queries' human labels shaped the judge that made ``judgments``: ``{"judge", "queries", "sources",
    "trained", "validated", "calibrated"}``. Annotate's manifest holds the judge's card and its config.yaml the
    judge directory. A fine-tuned judge counts every query of its card's training and validation sources (the
    pools its training, checkpoint-selection, cut-point and stacking pairs were drawn from); a judge from
    ``judge calibrate`` adds its calibration pairs' queries; a base model used zero-shot learnt from none."""
    import yaml

    from models.judge_card import CARD, is_judge_dir
    from pipelines.stage import read_manifest

    manifest = read_manifest(judgments) or {}
    card = manifest.get("judge_card")
    conf = Path(judgments) / "config.yaml"
    judge = str((yaml.safe_load(conf.read_text()) or {}).get("judge") or "") if conf.exists() else ""
    if card is None or not judge:
        raise DataError(f"judgments: {judgments} has no annotate manifest and config naming its judge, so which "
                        "queries trained the judge is unknown: set judge_label_queries")  # fmt: skip
    calib_src: list[str] = []
    if is_judge_dir(judge):
        card = json.loads((Path(judge) / CARD).read_text())
        if (read_manifest(judge) or {}).get("stage") == "judge.calibrate":
            calib_src = list(
                (yaml.safe_load((Path(judge) / "config.yaml").read_text()) or {}).get("pairs") or []
            )
    elif card.get("combiner"):
        raise DataError(f"judgments: the calibrated judge {judge} is not on this machine, so its calibration "
                        "queries are unknown: set judge_label_queries")  # fmt: skip
    data = card.get("data") or {}
    train_src = list(data.get("train_sources") or [])
    val_src = data.get("val_sources")
    val_src = list(val_src) if isinstance(val_src, list) else []  # else: held-out queries of train_sources
    if card.get("adapter") and not train_src:
        raise DataError(f"judgments: the card of {judge} lists no training sources: set judge_label_queries")
    sources = train_src + val_src + calib_src
    return {"judge": card.get("base_model", judge) + ("+lora" if card.get("adapter") else "")
            + ("+stack" if card.get("combiner") else ""),
            "queries": _qids_of(sources), "sources": sources,
            "trained": data.get("train_queries", 0), "validated": data.get("val_queries", 0),
            "calibrated": len(_qids_of(calib_src)) if calib_src else 0}  # fmt: skip


def _per_query(table: pa.Table, rows: np.ndarray, scores: np.ndarray, qrels) -> dict[str, dict[str, float]]:
    from eval.ranking import evaluate_run, run_from_scores

    qids = np.asarray(table.column("qid").to_pylist(), dtype=object)[rows]
    docids = np.asarray(table.column("docid").to_pylist(), dtype=object)[rows]
    run = run_from_scores(list(qids), list(docids), scores)
    return evaluate_run(run, {q: qrels[q] for q in set(qids) if q in qrels}).per_query


def augment(cfg: AugmentConfig) -> StageResult:
    from eval.ranking import bootstrap_ci, paired_compare, qrels_from_labels, short_name
    from pipelines.data import assign_folds

    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise DataError(f"methods: unknown {unknown} (known: {list(METHODS)})")
    out = Path(cfg.out)
    pct = round(100 * cfg.human_fraction)
    with Timer() as timer:
        table = attach_judge(read_features(cfg.features), cfg.judgments)
        qids = table.column("qid").to_pylist()
        if cfg.judge_label_queries is not None:
            judge_info = {
                "judge": "as given",
                "queries": set(map(str, cfg.judge_label_queries)),
                "sources": [],
            }
        else:
            judge_info = judge_label_queries(cfg.judgments)
        scored = {str(q) for q in qids}
        in_sample = sorted(scored & judge_info["queries"])
        if in_sample:
            raise DataError(
                f"judgments: the judge ({judge_info['judge']}) trained, validated or was calibrated on "
                f"{len(in_sample)} of the {len(scored)} queries this experiment scores (first: {in_sample[:5]}); "
                "every query is in some test fold, so its judge-labelled rankers would be scored in sample. "
                "Use a judge fit on other queries (benchmarks/augmentation.py: configs/judge-llmjudge.yaml)"
            )
        qrels = qrels_from_labels(qids, table.column("docid").to_pylist(), table.column("label").to_pylist())
        fold_of = assign_folds(qids, cfg.folds, cfg.fold_seed)
        qarr = np.asarray(qids, dtype=object)
        # method -> seed -> measure -> qid -> value
        results: dict[str, dict[int, dict[str, dict[str, float]]]] = {m: {} for m in cfg.methods}
        for seed in cfg.seeds:
            for m in cfg.methods:
                results[m][seed] = {}
            for fold in range(cfg.folds):
                test_q = {q for q, f in fold_of.items() if f == fold}
                test_rows = np.flatnonzero(np.isin(qarr, list(test_q)))
                train_q, val_q = split_queries([q for q in fold_of if fold_of[q] != fold], cfg.val_fraction,
                                               seed * 1000 + fold)  # fmt: skip
                for m in cfg.methods:
                    if m in ("bm25", "dense"):
                        if seed != cfg.seeds[0]:
                            results[m][seed] = results[m][cfg.seeds[0]]
                            continue
                        col = "bm25" if m == "bm25" else "dense_cos"
                        scores = feature_matrix(table.take(pa.array(test_rows)), [col])[:, 0]
                    else:
                        source, fraction = TRAINED[m]
                        rcfg = RankTrainConfig(features=cfg.features, out=str(out), label_source=source,
                                               human_fraction=fraction or cfg.human_fraction, seed=seed,
                                               ranker=cfg.ranker)  # fmt: skip
                        ranker, _ = fit_ranker(table, rcfg, train_q, val_q)
                        scores = ranker.predict(
                            feature_matrix(table.take(pa.array(test_rows)), ranker.features)
                        )
                    for measure, vals in _per_query(table, test_rows, scores, qrels).items():
                        results[m][seed].setdefault(measure, {}).update(vals)
            log.info("seed %d done", seed)

        # per query: mean over seeds; then mean over queries with a bootstrap CI, paired tests against h20
        summary: dict[str, dict[str, Any]] = {}
        per_query_rows: dict[str, list] = {"method": [], "qid": []}
        measures = list(next(iter(results[cfg.methods[0]].values())).keys())
        averaged: dict[str, dict[str, dict[str, float]]] = {}
        for m in cfg.methods:
            averaged[m] = {}
            for measure in measures:
                qs = sorted(results[m][cfg.seeds[0]][measure])
                averaged[m][measure] = {
                    q: float(np.mean([results[m][s][measure][q] for s in cfg.seeds])) for q in qs
                }
            summary[m] = {"name": METHODS[m].format(pct=pct)}
            for measure in measures:
                v = averaged[m][measure]
                summary[m][short_name(measure)] = float(np.mean(list(v.values())))
                summary[m][short_name(measure) + "_ci95"] = bootstrap_ci(v.values())
        for m in cfg.methods:
            for measure in measures:
                if "h20" in averaged and m != "h20":
                    c = paired_compare(averaged["h20"][measure], averaged[m][measure], measure)
                    summary[m][short_name(measure) + "_vs_h20_p"] = c.p_ttest
            qs = sorted(averaged[m][measures[0]])
            per_query_rows["method"] += [m] * len(qs)
            per_query_rows["qid"] += qs
            for measure in measures:
                per_query_rows.setdefault(short_name(measure), []).extend(averaged[m][measure][q] for q in qs)
        n_queries = len(averaged[cfg.methods[0]][measures[0]])
        out.mkdir(parents=True, exist_ok=True)
        write_table(out / "per_query", pa.table(per_query_rows))
        (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        provenance = {
            "judge": judge_info["judge"],
            "judge_queries": len(judge_info["queries"]),
            "judge_sources": judge_info["sources"],
            "judge_trained_queries": judge_info.get("trained"),
            "judge_validated_queries": judge_info.get("validated"),
            "judge_calibrated_queries": judge_info.get("calibrated"),
            "judge_queries_scored_here": 0,
            "scored_queries": n_queries,
        }
        (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        table_md = render_table(summary, cfg, n_queries, provenance)
        (out / "table.md").write_text(table_md + "\n")
        plot_augment(summary, out / "augment.png", f"TREC-style {cfg.folds}-fold CV, {n_queries} queries, "
                                                   f"{len(cfg.seeds)} seeds")  # fmt: skip
    return write_stage_files(out, "experiment.augment", cfg, {"queries": n_queries, "pairs": table.num_rows},
                             [cfg.features, cfg.judgments], timer.seconds,
                             {"summary": summary, "provenance": provenance})  # fmt: skip


TRAINED_ON = {
    "bm25": "no labels",
    "dense": "no labels here (pretrained encoder)",
    "h20": "{pct}% of the training folds' human labels",
    "h20+judge": "{pct}% of the training folds' human labels + judge labels on their other pairs",
    "curriculum": "judge labels on the training folds, then {pct}% of their human labels",
    "judge": "judge labels on the training folds",
    "h100": "every human label of the training folds",
}


def render_table(
    summary: dict[str, dict[str, Any]], cfg: AugmentConfig, n_queries: int, provenance: dict[str, Any]
) -> str:
    pct = round(100 * cfg.human_fraction)
    j = provenance
    if j["judge"] == "as given":
        judge_line = (f"judge labels: made from the human labels of {j['judge_queries']} given queries (config "
                      "judge_label_queries), none scored here")  # fmt: skip
    elif j["judge_queries"]:
        # the card counts the queries of the sampled training pairs; the rest of its sources were held out, and
        # the checkpoint, cut-points and stack were drawn from them
        trained = j.get("judge_trained_queries") or 0
        held_out = j["judge_queries"] - trained - (j.get("judge_calibrated_queries") or 0)
        split = f" ({trained} to train" if trained else ""
        split += (f", {held_out} held out for checkpoint, cut-points and stack)" if trained and held_out
                  else ")" if trained else "")  # fmt: skip
        calib = (
            f", {j['judge_calibrated_queries']} for calibration" if j.get("judge_calibrated_queries") else ""
        )
        judge_line = (f"judge ({j['judge']}): trained on the human labels of {j['judge_queries']} queries{split}"
                      f"{calib}, from {', '.join(j['judge_sources']) or 'the given list'}; none is scored here")  # fmt: skip
    else:
        judge_line = f"judge ({j['judge']}): no human labels (zero-shot)"
    lines = [f"{cfg.folds}-fold query-level CV over {n_queries} queries, seeds {cfg.seeds}.",
             f"- {judge_line}; it grades every pair, and rankers use its labels of training-fold pairs only.",
             f"- rankers: trained on the other {cfg.folds - 1} folds' queries ({round(100 * cfg.val_fraction)}% of "
             "them held out for early stopping, labelled the same way), as the 'trained on' column says.",
             "- scored: each test fold's queries, with their human labels only; 95% bootstrap intervals over "
             "queries; p: paired t-test against the human-sample row.",
             "",
             "| method | trained on | NDCG@10 | 95% CI | MRR@10 | NDCG@100 | R@100 | p vs h20 (NDCG@10) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for m, s in summary.items():
        lo, hi = s["ndcg10_ci95"]
        p = s.get("ndcg10_vs_h20_p")
        lines.append(f"| {s['name']} | {TRAINED_ON[m].format(pct=pct)} | {s['ndcg10']:.4f} | [{lo:.3f}, {hi:.3f}] | "
                     f"{s['mrr10']:.4f} | {s['ndcg100']:.4f} | {s['recall100']:.4f} | "
                     f"{'' if p is None else f'{p:.3f}'} |")  # fmt: skip
    return "\n".join(lines)


def plot_augment(summary: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["name"] for s in summary.values()]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.5), sharey=True)
    for ax, key, label in zip(axes, ("ndcg10", "mrr10"), ("NDCG@10", "MRR@10 (rel >= 2)"), strict=True):
        means = [s[key] for s in summary.values()]
        err = np.array(
            [[s[key] - s[key + "_ci95"][0], s[key + "_ci95"][1] - s[key]] for s in summary.values()]
        ).T
        colors = ["#999999" if m in ("bm25", "dense") else "#4C72B0" for m in summary]
        ax.barh(range(len(names)), means, xerr=err, color=colors, capsize=3)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel(label)
        ax.invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
