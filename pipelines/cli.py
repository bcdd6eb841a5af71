"""``augrel``: the command line. One subcommand per stage; each takes a YAML ``--config`` and ``--set`` overrides.

Errors a user can fix (a bad config key, a missing file, a table that breaks its schema) print one clear
message and exit non-zero; they never print a traceback (``-v`` shows one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from models.features import FEATURE_DOCS
from pipelines.errors import AugrelError, ConfigError

EPILOG = """\
examples:
  augrel data synth --out runs/demo/raw
  augrel data prepare beir --src runs/demo/raw --out runs/demo/data
  augrel data prepare trec-dl --src ../shared/data/trec-dl-2019 --out runs/dl19/data
  augrel data validate runs/dl19/data
  augrel data split runs/dl19/data --out runs/dl19/splits --folds 5
  augrel annotate --judge runs/dl19/judge --pairs runs/dl19/data/pairs --out runs/dl19/judgments
  augrel cluster up --workers 1
  augrel submit -- data validate $PWD/runs/dl19/data
  augrel cluster down

Ray: commands that use Ray start an embedded Ray sized to this machine, unless --address (or RAY_ADDRESS)
names a running cluster. `augrel submit` runs any command as a Ray job on a cluster instead.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks. Defaults are stated in each option's help where they are real:
    most options default to the stage config's value, which `--help` of ArgumentDefaultsHelpFormatter would
    misreport as None."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="read the stage config from this YAML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value (repeatable), e.g. --set seed=3",
    )


def _parse_fractions(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(
                f"--fractions {text!r}: expected name=fraction,..., e.g. train=0.6,val=0.2,test=0.2"
            ) from None
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="augrel",
        description="augrel: fine-tune a small LLM relevance judge on a few hundred human labels, label millions "
        "of (query, document) pairs with it on Ray, and train and evaluate rankers on the result.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument(
        "--address",
        help="Ray cluster to join (GCS address, e.g. 127.0.0.1:6379); default: "
        "$RAY_ADDRESS, else an embedded Ray on this machine",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray's logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ------------------------------------------------------------------ data
    data = sub.add_parser(
        "data", help="prepare, validate, split and synthesise datasets", formatter_class=_Formatter
    )
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = dsub.add_parser(
        "prepare",
        formatter_class=_Formatter,
        help="read a public IR format and write augrel's tables (queries, docs, qrels, pairs, rejected)",
        description="Read TREC DL (topics TSV, qrels, passages JSONL), BEIR (corpus.jsonl, queries.jsonl, "
        "qrels/*.tsv), HotpotQA (IRCoT JSONL) or generic pairs (JSONL/Parquet: qid, docid, query, text[, label]) "
        "and write Parquet tables. Rows that cannot be used go to OUT/rejected/ with a reason.",
    )
    p.add_argument("format", choices=["trec-dl", "beir", "hotpotqa", "pairs"])
    p.add_argument("--src", required=True, help="input directory (or file/glob for pairs)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--beir-split", help="beir: read only qrels/<split>.tsv")
    _add_config_args(p)

    p = dsub.add_parser(
        "validate",
        formatter_class=_Formatter,
        help="check every table in a directory against its schema (runs on Ray)",
        description="Check each table (queries, docs, pairs, qrels, judgments, run) under DIR: required columns "
        "and types, nulls, empty ids and queries, grades on the scale, probabilities, ranks, duplicate keys "
        "within and across files. Each problem names the file, column and first bad row. Exit 1 if any.",
    )
    p.add_argument("path", metavar="DIR")
    p.add_argument("--table", dest="tables", action="append", help="check only this table (repeatable)")
    p.add_argument("--report", help="also write the report as JSON here")
    _add_config_args(p)

    p = dsub.add_parser(
        "split",
        formatter_class=_Formatter,
        help="query-level train/val/test splits (seeded; a query is never in two splits)",
        description="Assign each judged query of a prepared dataset to one split, deterministically for the "
        "seed, and write OUT/splits/ (qid, split[, fold]) plus OUT/<split>/{queries,qrels,pairs}/.",
    )
    p.add_argument("src", metavar="DIR", help="a prepared dataset directory")
    p.add_argument("--out", required=True)
    p.add_argument("--fractions", type=_parse_fractions, help="e.g. train=0.6,val=0.2,test=0.2 (the default)")
    p.add_argument("--folds", type=int, help="also assign K cross-validation folds")
    p.add_argument("--seed", type=int)
    _add_config_args(p)

    p = dsub.add_parser(
        "synth",
        formatter_class=_Formatter,
        help="write a synthetic graded corpus (BEIR layout) whose labels follow from how it was generated",
        description="Generate fictional towns, companies and species with facts, queries asking for one fact, and "
        "passages whose 0-3 grade for each query is known by construction (answers, partial answers, same "
        "entity, look-alike names, comparisons, other topics). Deterministic for the seed.",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--entities", type=int, help="number of fictional entities (default 100: 200 queries)")
    p.add_argument("--seed", type=int)
    _add_config_args(p)

    # ----------------------------------------------------------------- judge
    jd = sub.add_parser(
        "judge", help="fine-tune, run and evaluate the LLM relevance judge", formatter_class=_Formatter
    )
    jsub = jd.add_subparsers(dest="judge_command", metavar="ACTION", required=True)
    p = jsub.add_parser(
        "finetune",
        formatter_class=_Formatter,
        help="LoRA fine-tuning of the judge on Ray Train + DeepSpeed (class-balanced, split by query)",
        description="Sample class-balanced training and validation pairs (disjoint by query), fine-tune a LoRA "
        "adapter with cross-entropy over the grade tokens on Ray Train workers inside DeepSpeed (stage chosen "
        "from model size and GPU memory: --set deepspeed=auto|zero2|zero3|zero3_offload), checkpoint at each evaluation and resume after failures. Writes OUT/adapter, "
        "OUT/judge_card.json (validation kappa, tuned cut-points) and OUT/config.yaml; then (unless "
        "--set stack=null) stacks the judge with MiniLM cosine and lexical signals fit on the validation queries "
        "(see `judge calibrate`). Example config: configs/judge-dl19.yaml.",
    )
    p.add_argument("--train", action="append", help="labelled pairs table (repeatable)")
    p.add_argument("--val", action="append", help="validation pairs table (default: held-out train queries)")
    p.add_argument("--out", help="output judge directory")
    p.add_argument("--base-model", help="hub id, local path or gemma3-270m (default)")
    _add_config_args(p)
    p = jsub.add_parser(
        "calibrate",
        formatter_class=_Formatter,
        help="stack a judge with MiniLM cosine and lexical signals, fit on held-out labelled pairs",
        description="Draw labelled pairs of queries the judge never trained on (natural grade mix, --set "
        "stack.n_pairs=N), score them with the judge's LLM, add the MiniLM cosine, query-word overlap and "
        "passage length, and fit a multinomial logistic regression to the human grades plus cut-points tuned "
        "for kappa. Writes a judge directory (adapter, judge_card.json naming combiner.json) that predict, "
        "annotate and serve use as they are; the card reports the stacked judge's agreement on held-out query "
        "folds next to the LLM alone's.",
    )
    p.add_argument("--judge", help="judge directory, or a base model used zero-shot")
    p.add_argument("--pairs", action="append", help="labelled pairs of held-out queries (repeatable)")
    p.add_argument("--out", help="output judge directory (may be --judge itself)")
    _add_config_args(p)
    p = jsub.add_parser(
        "predict",
        formatter_class=_Formatter,
        help="grade a pairs table in this process (small sets; `augrel annotate` is the distributed version)",
        description="Grade each (query, passage) pair with the judge in one forward pass: the next-token "
        "distribution over the grade tokens gives probs, label (argmax) and score (expected grade). Writes a "
        "judgments table; rows with an empty query or missing ids go to OUT/rejected/.",
    )
    p.add_argument(
        "--judge",
        help="judge directory from `augrel judge finetune`, or a base model (hub id, "
        "local path, or gemma3-270m: the packaged offline default)",
    )
    p.add_argument("--pairs", help="pairs table (directory, Parquet/JSONL file, or glob)")
    p.add_argument("--out", help="output directory for the judgments table")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--limit", type=int, help="grade only the first N pairs")
    _add_config_args(p)
    p = jsub.add_parser(
        "eval",
        formatter_class=_Formatter,
        help="agreement of judgments with human labels: kappa, weighted kappa, alpha, tau, plots",
        description="Join judgments with human grades on (qid, docid) and write metrics.json (Cohen's kappa, "
        "quadratic weighted kappa, Krippendorff's alpha (ordinal), accuracy, per-grade precision/recall, "
        "Kendall's tau-b pooled and per query, each with a 95% bootstrap interval over queries), "
        "confusion.png and calibration.png.",
    )
    p.add_argument("--judgments", help="judgments table")
    p.add_argument("--qrels", help="human labels: qrels/pairs table or a TREC qrels file")
    p.add_argument("--out", help="output directory")
    _add_config_args(p)
    p = jsub.add_parser(
        "diff",
        formatter_class=_Formatter,
        help="two judges on the same pairs: agreement, label shift, transitions, the pairs that moved most",
        description="A and B are each a judge directory, a base model (zero-shot: --set template_a=...), or a "
        "judgments table already written. Judges grade --pairs in this process (their judgments stay in OUT/a "
        "and OUT/b and are reused by a rerun with the same judge and pairs). Writes OUT/diff.json and "
        "OUT/diff.html: Cohen's and quadratic weighted kappa between A and B with 95% bootstrap intervals over "
        "queries, labels changed, each label distribution and the shift, the grade transition matrix, per-query "
        "changes, the most-moved pairs, and, where the pairs carry human grades, each judge's kappa with the "
        "humans and the paired difference B - A. --record (default when B is a judge directory) keeps the "
        "summary in B's judge_card.json under audit.diffs, which the run report shows.\n\n"
        "example:\n  augrel judge diff runs/dl19/judge-v1 runs/dl19/judge-v2 --pairs runs/dl19/test/pairs "
        "--out runs/dl19/judge-diff",
    )
    p.add_argument("a", metavar="A", help="the earlier judge: judge directory, base model or judgments table")
    p.add_argument("b", metavar="B", help="the later judge: the same kinds as A")
    p.add_argument("--pairs", help="pairs table both judges grade (with a label column: human grades)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--record", action=argparse.BooleanOptionalAction, default=None,
                   help="write the summary into B's judge card (default: when B is a judge directory)")  # fmt: skip
    p.add_argument("--top", type=int, help="how many most-moved pairs to list (default 20)")
    p.add_argument("--batch-size", type=int)
    _add_config_args(p)

    # -------------------------------------------------------------- annotate
    p = sub.add_parser(
        "annotate",
        formatter_class=_Formatter,
        help="grade millions of pairs with the judge on Ray Data actor pools (exactly once, resumable)",
        description="Stream a pairs table (Parquet/JSONL, a directory or a glob) through an autoscaling pool of "
        "judge actors (model loaded once per actor) and write the judgments table. The input is cut into work "
        "units of --unit-rows pairs; each unit's judgments are written atomically to one partition named after "
        "it, and its bad rows to OUT/rejected/ with a reason, so every pair is judged or rejected exactly once. "
        "After a crash or Ctrl-C, --resume runs only the missing units; the result equals an uninterrupted run. "
        "Defaults for the pool come from --profile (see `augrel cluster profile`). "
        "--mode relsel | utility-sel | utility-rank | answer-likelihood runs paper 2's utility annotation "
        "instead (listwise windows of each question's candidates, a pseudo answer, then a utility selection or "
        "ranking; or log P(answer | q, p) - log P(answer | q) per pair) and writes a utility table, the "
        "`utility` label source of `augrel retriever train`. Then work units hold whole questions: the pairs of "
        "a question must be contiguous in the input.",
    )
    p.add_argument("--mode", choices=["relevance", "relsel", "utility-sel", "utility-rank", "answer-likelihood"],
                   help="what to annotate (default relevance: the judge grades each pair)")  # fmt: skip
    p.add_argument("--judge", help="judge directory from `augrel judge finetune`, or a base model (utility "
                   "modes: the causal LM that annotates; default gemma3-270m)")  # fmt: skip
    p.add_argument("--pairs", help="pairs: table directory, Parquet/JSONL file, or glob")
    p.add_argument("--out", help="output directory for the judgments table")
    p.add_argument("--resume", action="store_true", default=None, help="finish the interrupted run in OUT")
    p.add_argument("--overwrite", action="store_true", default=None, help="discard OUT's run and start again")
    p.add_argument("--profile", help="resource profile: cpu-small (default), gpu-1, gpu-8, or a YAML path")
    p.add_argument("--concurrency", metavar="MIN,MAX", help="judge actors, e.g. 1,4 (autoscaling between)")
    p.add_argument("--batch-size", type=int, help="pairs per forward pass")
    p.add_argument("--num-gpus-per-actor", type=float)
    p.add_argument("--num-cpus-per-actor", type=float)
    p.add_argument("--unit-rows", type=int, help="pairs per work unit (progress, retry and resume grain)")
    p.add_argument("--window", type=int, help="utility modes: passages per listwise prompt (default 16)")
    p.add_argument("--answer-source", choices=["auto", "gold", "pseudo"],
                   help="answer-likelihood: the pairs' gold answers (auto: when present) or a pseudo answer")  # fmt: skip
    _add_config_args(p)

    # ------------------------------------------------------------------ rank
    rk = sub.add_parser("rank", help="learning to rank: features, LambdaMART train/predict, ranking metrics",
                        formatter_class=_Formatter)  # fmt: skip
    rsub = rk.add_subparsers(dest="rank_command", metavar="ACTION", required=True)
    p = rsub.add_parser(
        "features", formatter_class=_Formatter,
        help="pairs -> features table on a Ray Data actor pool (BM25, MiniLM cosine, lengths, overlap)",
        description="Build a BM25 index (bm25s, stemmed) over the corpus (--docs, or the pairs' documents), then "
        "compute each pair's features on an actor pool that loads the index and the MiniLM encoder once. The "
        "judge's score is not a feature here (it leaks the labeller); `rank train --set use_judge_feature=true` "
        "adds it.\n\nfeatures:\n" + "\n".join(f"  {k:<14}{v}" for k, v in FEATURE_DOCS.items()),
    )  # fmt: skip
    p.add_argument("--pairs", help="pairs table")
    p.add_argument("--docs", help="docs table for BM25 statistics (default: the pairs' documents)")
    p.add_argument("--out", help="output directory")
    _add_config_args(p)
    p = rsub.add_parser(
        "train", formatter_class=_Formatter, help="LightGBM LambdaMART with human, judge, mix or curriculum labels",
        description="Train a LambdaMART ranker (LightGBM lambdarank, early stopping on validation NDCG@10 over "
        "held-out training queries). --label-source: human (human grades only), judge (the judge's labels), mix "
        "(human where known, judge elsewhere), curriculum (judge labels, then more trees on human labels). "
        "--human-fraction keeps that share of each query's human labels. Writes model.txt, ranker.json, "
        "importances.json/png.",
    )  # fmt: skip
    p.add_argument("--features", help="features table")
    p.add_argument("--judgments", help="judge labels (augrel annotate output)")
    p.add_argument("--label-source", choices=["human", "judge", "mix", "curriculum"])
    p.add_argument("--human-fraction", type=float)
    p.add_argument("--out", help="output directory")
    _add_config_args(p)
    p = rsub.add_parser("predict", formatter_class=_Formatter, help="score a features table into a run table")
    p.add_argument("--ranker", help="ranker directory")
    p.add_argument(
        "--feature", help="rank by this feature instead of a ranker (a baseline run: bm25, dense_cos)"
    )
    p.add_argument("--features", help="features table")
    p.add_argument("--out", help="output directory for the run")
    _add_config_args(p)
    p = rsub.add_parser(
        "eval", formatter_class=_Formatter, help="NDCG@10/100, MRR@10, R@100 per query; paired test vs a baseline",
        description="Measures from ir_measures; MRR and recall count grade >= min_rel relevant (default 2, "
        "`--set min_rel=1`); queries without a relevant document are left out (and counted in metrics.json). With --baseline: paired t-test and a "
        "bootstrap 95% interval of the difference over queries.",
    )  # fmt: skip
    p.add_argument("--run", help="run table")
    p.add_argument("--qrels", help="qrels table, labelled pairs, or a TREC qrels file")
    p.add_argument("--baseline", help="baseline run table")
    p.add_argument("--out", help="output directory")
    _add_config_args(p)

    # ------------------------------------------------------------ experiment
    ex = sub.add_parser(
        "experiment", help="experiments that answer the method's questions", formatter_class=_Formatter
    )
    xsub = ex.add_subparsers(dest="experiment_command", metavar="NAME", required=True)
    p = xsub.add_parser(
        "augment", formatter_class=_Formatter,
        help="rankers on 20%% human labels, + judge labels, 100%% human, and BM25 / dense baselines (k-fold CV)",
        description="Query-level k-fold cross-validation; test folds scored with human labels only; several "
        "seeds for the human sample. One table (mean, bootstrap CI, paired t-test vs the human sample) and a plot. "
        "Example config: configs/augment-dl19.yaml.",
    )  # fmt: skip
    p.add_argument("--features", help="labelled features table")
    p.add_argument("--judgments", help="judge labels for the same pairs")
    p.add_argument("--out", help="output directory")
    _add_config_args(p)

    # ------------------------------------------------------------------- run
    p = sub.add_parser(
        "run", formatter_class=_Formatter,
        help="the whole method as one pipeline: judge, annotate, rank, evaluate, report (skips unchanged stages)",
        description="Run the stages of PIPELINE.yaml in order (data, validate, split, judge finetune, annotate, "
        "judge eval, rank features, rank train, rank eval, experiment augment, index build, serve check, "
        "report), each stage's output directory under OUT the next one's input. A stage whose config, inputs "
        "(content hashes) and outputs are unchanged since its last run is skipped; OUT/pipeline.json records "
        "the DAG and hashes. Ends with the report's path (OUT/report/index.html) and the headline figures. "
        "Configs: configs/demo.yaml, configs/dl19.yaml, configs/gpu-cluster.yaml.",
    )  # fmt: skip
    p.add_argument("pipeline", metavar="PIPELINE.yaml", help="the pipeline config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one value, e.g. --set judge.lr=1e-4 --set out=runs/x")  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted stage where it stopped (annotate, judge finetune)")  # fmt: skip
    p.add_argument(
        "--from", dest="from_stage", metavar="STAGE", help="rerun from this stage on, changed or not"
    )
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")

    # ------------------------------------------------------------ candidates
    p = sub.add_parser(
        "candidates", formatter_class=_Formatter,
        help="BM25 and/or dense top-k for every query -> the pairs table the judge annotates",
        description="Retrieve the top --k passages of every query (labelled or not) from an index built by "
        "`augrel index build`: BM25, dense (FAISS over the index's encoder vectors), or both fused by reciprocal "
        "rank (--set retrievers=[bm25,dense]). Queries are sharded over a Ray Data actor pool that loads the index "
        "once per actor; passage texts come from the index's memory-mapped document store. Writes a pairs table "
        "(qid, docid, query, text, title, label, cand_rank, cand_score, retrieved_by): label is the human grade "
        "from --qrels where one exists, null elsewhere (the unlabelled pool). Queries without a candidate are "
        "counted; bad query rows go to OUT/rejected/.",
    )  # fmt: skip
    p.add_argument("--queries", help="queries table (qid, query)")
    p.add_argument("--index", help="index directory (augrel index build)")
    p.add_argument("--k", type=int, help="candidates per query (default 100)")
    p.add_argument("--qrels", help="human labels to attach: qrels or pairs table (optional)")
    p.add_argument("--out", help="output directory")
    _add_config_args(p)

    # ----------------------------------------------------------------- retriever
    rt = sub.add_parser(
        "retriever",
        help="fine-tune a dense bi-encoder on human / judge / utility labels",
        formatter_class=_Formatter,
    )
    rsub2 = rt.add_subparsers(dest="retriever_command", metavar="ACTION", required=True)
    p = rsub2.add_parser(
        "train", formatter_class=_Formatter,
        help="SumMargLH (or InfoNCE / Rand1LH / JointLH) fine-tuning of a bi-encoder on Ray Train",
        description="Per query a group of its positives (labels.source: human, judge, utility, mix, or "
        "curriculum = LLM labels then one epoch on a fraction of human labels) and hard negatives sampled each "
        "epoch from the index's BM25 (or dense: --set negatives=dense) top-k; in-batch and cross-worker negatives; "
        "DDP over Ray Train workers (gloo on CPU, NCCL + bf16 autocast with --set use_gpu=true; --set "
        "deepspeed=zero2 for larger backbones); validation nDCG@10 / R@100 on held-out queries every eval_every "
        "steps; checkpoints resume a cut-off run. OUT is a sentence-transformers directory with "
        "retriever_card.json: pass it as `encoder:` to index build, rank features, serve or the judge stack. "
        "Example config: configs/retriever-dl19.yaml.",
    )  # fmt: skip
    p.add_argument("--index", help="index directory (augrel index build): passage texts and negatives")
    p.add_argument("--queries", action="append", help="queries table (repeatable)")
    p.add_argument("--out", help="output encoder directory")
    p.add_argument("--base-model", help="encoder hub id or path (default: the packaged all-MiniLM-L6-v2)")
    _add_config_args(p)

    # ----------------------------------------------------------------- index
    ix = sub.add_parser(
        "index", help="retrieval indexes over a docs table (BM25, FAISS)", formatter_class=_Formatter
    )
    isub = ix.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    p = isub.add_parser(
        "build", formatter_class=_Formatter, help="docs -> BM25 + FAISS index directory (what augrel serve loads)",
        description="Copy the docs (docid, text, title) into OUT/docs, build a BM25 index (bm25s, stemmed) in "
        "OUT/bm25 and, unless --set dense=false, a FAISS index of MiniLM document vectors in OUT/dense (vectors "
        "computed on a Ray Data actor pool and written to disk as they arrive; --set kind=flat|ivf|hnsw|ivfpq, ivfpq: "
        "pq_m, refine; --set num_gpus_per_actor=1 on GPUs).",
    )  # fmt: skip
    p.add_argument("--docs", help="docs table")
    p.add_argument("--out", help="index directory")
    _add_config_args(p)
    p = isub.add_parser(
        "search", formatter_class=_Formatter, help="queries -> run table (qid, docid, score, rank) from an index",
        description="Retrieve the top --k documents of every query from an index built by `augrel index build`: "
        "dense (the default when the index has one: queries are encoded by the encoder the index was built "
        "with, an error names both sizes if it no longer matches the index) or BM25 (--set retriever=bm25). "
        "Queries are sharded over a Ray Data actor pool that loads the index once per actor (--set "
        "concurrency=[1,4], num_gpus_per_actor=1 for FAISS and the encoder on GPUs). Writes a run table to "
        "OUT; bad query rows go to OUT/rejected/.",
    )  # fmt: skip
    p.add_argument("--index", help="index directory (augrel index build)")
    p.add_argument("--queries", help="queries table (qid, query)")
    p.add_argument("--k", type=int, help="documents per query (default 100)")
    p.add_argument("--out", help="output directory: the run table")
    _add_config_args(p)

    # ----------------------------------------------------------------- rag
    rg = sub.add_parser(
        "rag", help="retrieval-augmented generation: answer questions from retrieved passages, score EM / F1",
        formatter_class=_Formatter,
    )  # fmt: skip
    rsub3 = rg.add_subparsers(dest="rag_command", metavar="ACTION", required=True)
    p = rsub3.add_parser(
        "eval", formatter_class=_Formatter,
        help="top-k retrieval + a generator on a Ray Data actor pool -> per-question EM / F1 / answer recall",
        description="For every question of --questions (qid, question, answers[, supporting]; a queries table "
        "with answers also works): retrieve the top --k passages from --index with --retriever (bm25; dense: "
        "the index's own encoder; or an encoder directory, which must be the one the index was built with), "
        "give them with their titles to --generator (any causal LM; default: the packaged Gemma 3 270M) and "
        "score its short answer: exact match and token F1 (SQuAD / HotpotQA normalisation, best over the gold "
        "aliases), answer recall@k (a gold answer inside the passages), supporting recall@k (where gold "
        "supporting passages are known: questions.supporting or --qrels). Two brackets run beside it: "
        "closed_book (no passage) and oracle (the gold supporting passages). Writes OUT/rows (one row per "
        "system and question), OUT/metrics.json and OUT/table.md (means with 95% CIs over questions). "
        "Partitions of questions are written exactly once; --resume finishes an interrupted run. On GPUs: "
        "--set num_gpus_per_actor=1 --set concurrency=[1,8].",
    )  # fmt: skip
    p.add_argument("--questions", help="questions table (qid, question, answers[, supporting])")
    p.add_argument("--index", help="index directory (augrel index build)")
    p.add_argument(
        "--retriever", help="bm25 (default), dense, or the encoder directory the index was built with"
    )
    p.add_argument("--k", type=int, help="passages per question (default 5; 0: closed book only)")
    p.add_argument("--generator", help="causal LM hub id or path (default: the packaged Gemma 3 270M)")
    p.add_argument("--qrels", help="gold supporting passages (qrels or pairs table), if questions has none")
    p.add_argument("--out", help="output directory")
    p.add_argument("--resume", action="store_true", default=None, help="finish an interrupted run in OUT")
    p.add_argument("--overwrite", action="store_true", default=None, help="start OUT again")
    _add_config_args(p)

    # ----------------------------------------------------------------- serve
    p = sub.add_parser(
        "serve", formatter_class=_Formatter,
        help="serve the ranker (and judge) on Ray Serve: POST /rank, POST /judge, /healthz, /readyz, /docs",
        description="Start Ray Serve's HTTP proxy on HOST:PORT and deploy the ranker behind a FastAPI ingress "
        "(autoscaled replicas; 503 past max_queued_requests; 422 naming the bad field; bearer-token auth when "
        "$AUGREL_SERVE_TOKEN is set). Runs until Ctrl-C on an embedded Ray; with --address and --detach it "
        "leaves the application on the cluster. Example config: configs/serve-demo.yaml.",
    )  # fmt: skip
    p.add_argument("--ranker", help="ranker directory (augrel rank train)")
    p.add_argument("--index", help="index directory (augrel index build)")
    p.add_argument("--judge", help="judge directory or model to serve on POST /judge")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument(
        "--detach", action="store_true", help="deploy and return (on a cluster given by --address)"
    )
    p.add_argument(
        "--check", action="store_true", help="deploy, rank one query from the index, print it, stop"
    )
    _add_config_args(p)

    # ---------------------------------------------------------------- review
    rv = sub.add_parser(
        "review", help="route the pairs the judge is least sure of to people, and read their grades back",
        formatter_class=_Formatter,
        description="export: a review queue (Parquet + Label Studio tasks and labeling config); serve: a "
        "one-page review tool that saves every grade as it is entered; import: grades from Label Studio, the "
        "page, a TREC qrels file or a qrels table -> a qrels table, every unusable row rejected with a reason.",
        epilog="examples:\n"
        "  augrel review export --judgments runs/dl19/judgments --pairs runs/dl19/data/pairs --budget 100 \\\n"
        "      --strategy uncertain --out runs/dl19/review\n"
        "  augrel review serve --queue runs/dl19/review --out runs/dl19/review/page\n"
        "  augrel review import --labels runs/dl19/review/page/grades.jsonl --out runs/dl19/review/qrels\n",
    )  # fmt: skip
    rvsub = rv.add_subparsers(dest="review_command", metavar="ACTION", required=True)
    p = rvsub.add_parser(
        "export", formatter_class=_Formatter,
        help="judgments + pairs -> the K pairs most worth a human look (queue.parquet, Label Studio tasks.json)",
        description="Pick --budget judged pairs for human review: uncertain (the judge's lowest confidence, its "
        "probability of its own label, first), random, or stratified (equal shares per judge grade). Pairs "
        "with a human label (the pairs table's label, or --exclude qrels) are never picked. Writes "
        "OUT/queue.parquet (qid, docid, query, text, title, judge_label, confidence, score, judge, "
        "prompt_version, rank in review order, injection flags when the judgments have them), OUT/tasks.json "
        "(Label Studio tasks, the judge's grade as a prediction scored by its confidence) and "
        "OUT/label_config.xml (the labeling config: grades 0-3 with hotkeys 0-3): create a Label Studio project "
        "from those two files. Judgments without a pair, and bad rows, go to OUT/rejected/.\n\n"
        "example:\n  augrel review export --judgments runs/dl19/judgments --pairs runs/dl19/data/pairs "
        "--budget 100 --strategy uncertain --out runs/dl19/review",
    )  # fmt: skip
    p.add_argument("--judgments", help="judgments table (augrel annotate / judge predict)")
    p.add_argument("--pairs", help="pairs table with the texts (query, text, title, label)")
    p.add_argument("--budget", type=int, help="how many pairs to queue")
    p.add_argument("--strategy", choices=["uncertain", "random", "stratified"], help="default uncertain")
    p.add_argument("--seed", type=int, help="draws and ties (default 0)")
    p.add_argument(
        "--exclude", action="append", metavar="QRELS", help="human labels not to queue (repeatable)"
    )
    p.add_argument("--out", help="output directory")
    _add_config_args(p)
    p = rvsub.add_parser(
        "import", formatter_class=_Formatter,
        help="Label Studio export / grades.jsonl / TREC qrels / qrels table -> qrels table, bad rows rejected",
        description="Read human grades and write a qrels table (qid, docid, label) to OUT and every row that "
        "gives no grade to OUT/rejected/ with its reason: no annotation, every annotation cancelled, a choice "
        "that is not a grade, annotators who disagree (rejected for adjudication; --set on_disagreement=latest "
        "takes the latest), missing qid/docid, the same pair twice with different grades. In the review page's "
        "grades.jsonl the last grade of a pair wins. manifest.json counts each reason.\n\n"
        "examples:\n  augrel review import --labels project-1-at-2026-12-03.json --out runs/dl19/review/qrels\n"
        "  augrel review import --labels runs/dl19/review/page/grades.jsonl --out runs/dl19/review/qrels",
    )  # fmt: skip
    p.add_argument("--labels", help="the file (or table directory) to read")
    p.add_argument("--out", help="output directory: the qrels table")
    p.add_argument("--grades", help="the grade scale, comma separated (default 0,1,2,3)")
    p.add_argument("--queue", help="the export's directory: also write OUT/pairs (texts + human labels)")
    _add_config_args(p)
    p = rvsub.add_parser(
        "serve", formatter_class=_Formatter,
        help="a review page over a queue: grade buttons 0-3 and keys, progress, every grade saved at once",
        description="Serve one page showing one pair at a time (query, title, passage, the judge's grade and "
        "confidence) with grade buttons and keys 0-3, back / skip (arrow keys) and progress. Every grade is "
        "appended to OUT/grades.jsonl and fsynced before the page counts it as saved; a reloaded page (or a "
        "restarted server) resumes at the first ungraded pair; the last grade of a pair wins. Binds to "
        "127.0.0.1 unless --host says otherwise (there is no login). Read the grades with `augrel review "
        "import --labels OUT/grades.jsonl`.\n\n"
        "example:\n  augrel review serve --queue runs/dl19/review --out runs/dl19/review/page --port 8765",
    )  # fmt: skip
    p.add_argument("--queue", help="the export's directory (queue.parquet)")
    p.add_argument("--out", help="directory of grades.jsonl")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--reviewer", help="name recorded with every grade")
    _add_config_args(p)

    # --------------------------------------------------------------- cluster
    cl = sub.add_parser(
        "cluster",
        help="a real multi-node Ray cluster on this machine (127.0.0.1)",
        formatter_class=_Formatter,
    )
    csub = cl.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    p = csub.add_parser(
        "up", help="start a head node and N worker nodes on 127.0.0.1", formatter_class=_Formatter
    )
    p.add_argument("--workers", type=int, default=1, help="worker nodes besides the head (default: 1)")
    p.add_argument("--cpus-per-node", type=int, help="CPUs each node offers (default: cores / nodes)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs each node offers (default: 0)")
    p.add_argument("--head-cpus", type=int, help="CPUs the head offers (0: job drivers only, as on KubeRay)")
    p.add_argument("--name", default="local", help="the local cluster's name (default: local)")
    p = csub.add_parser(
        "down", help="stop exactly the processes `cluster up` started", formatter_class=_Formatter
    )
    p.add_argument("--name", default="local", help="the local cluster's name (default: local)")
    p = csub.add_parser(
        "status", help="show the local cluster's nodes and addresses", formatter_class=_Formatter
    )
    p.add_argument("--name", default="local", help="the local cluster's name (default: local)")
    p = csub.add_parser(
        "profile", help="print a resource profile (cpu-small, gpu-1, gpu-8)", formatter_class=_Formatter
    )
    p.add_argument(
        "name", nargs="?", default="cpu-small", help="profile name or YAML path (default: cpu-small)"
    )

    # ---------------------------------------------------------------- submit
    p = sub.add_parser(
        "submit",
        formatter_class=_Formatter,
        help="run an augrel command as a Ray job (Jobs API), follow its logs, exit with its status",
        description="Submit `augrel ARGS...` to a Ray cluster's Jobs API with this repository as working_dir. "
        "Exit status: 0 SUCCEEDED, 1 FAILED, 2 STOPPED. Paths in ARGS are read on the cluster.",
        usage="augrel submit [--address URL] [--no-wait] -- ARGS...",
    )
    p.add_argument(
        "--address",
        dest="job_address",
        help="Jobs API URL, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS, else the "
        "cluster from `augrel cluster up`)",
    )
    p.add_argument(
        "--no-wait", action="store_true", help="print the job id and return without following logs"
    )
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for the job")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the augrel command to run, after --")
    return parser


def _cmd_data(a: argparse.Namespace) -> int:
    from pipelines.stage import load_config

    if a.data_command == "prepare":
        from pipelines.data import PrepareConfig, prepare

        cfg = load_config(
            PrepareConfig,
            a.config,
            a.overrides,
            format=a.format,
            src=a.src,
            out=a.out,
            beir_split=a.beir_split,
        )
        result = prepare(cfg)
        print(result.summary())
        if result.counts["rejected"]:
            reasons = "; ".join(f"{k}: {v}" for k, v in result.extra["rejected_reasons"].items())
            print(f"rejected {result.counts['rejected']:,} row(s) -> {cfg.out}/rejected/ ({reasons})")
        return 0
    if a.data_command == "validate":
        from cluster.embedded import init_ray
        from pipelines.validate import ValidateConfig, validate

        cfg = load_config(
            ValidateConfig, a.config, a.overrides, path=a.path, tables=a.tables, report=a.report
        )
        ray_info = init_ray(a.address, quiet=not a.verbose)
        cpus = int(ray_info["resources"].get("CPU", 0))
        print(f"ray: {ray_info['nodes']} node(s), {cpus} CPU(s) at {ray_info['address']}")
        report = validate(cfg)
        print(report.render())
        print(f"{'valid' if report.ok else 'INVALID'}: {report.path} ({report.wall_s:.1f}s)")
        return 0 if report.ok else 1
    if a.data_command == "split":
        from pipelines.data import SplitConfig, split

        cfg = load_config(
            SplitConfig,
            a.config,
            a.overrides,
            src=a.src,
            out=a.out,
            fractions=a.fractions,
            folds=a.folds,
            seed=a.seed,
        )
        print(split(cfg).summary())
        return 0
    if a.data_command == "synth":
        from pipelines.synth import SynthConfig, synth

        cfg = load_config(SynthConfig, a.config, a.overrides, out=a.out, entities=a.entities, seed=a.seed)
        result = synth(cfg)
        print(result.summary(), "grades:", result.extra["grades"])
        return 0
    raise AssertionError(a.data_command)


def _cmd_judge(a: argparse.Namespace) -> int:
    from pipelines.stage import load_config

    if a.judge_command == "finetune":
        from cluster.embedded import init_ray
        from pipelines.finetune_judge import FinetuneConfig, finetune

        cfg = load_config(FinetuneConfig, a.config, a.overrides, train=a.train, val=a.val, out=a.out,
                          base_model=a.base_model)  # fmt: skip
        # the workers' progress lines (one per evaluation) are the progress bar; Ray's narration goes to the log
        init_ray(a.address, quiet=not a.verbose, worker_output=True)
        r = finetune(cfg)
        m = r.extra["metrics"]
        print(r.summary())
        print(f"best checkpoint: step {m.get('step')}, val kappa {m.get('val_kappa', float('nan')):.3f} "
              f"(cut-points {m.get('val_kappa_cut', float('nan')):.3f}), "
              f"tau {m.get('val_tau', float('nan')):.3f}; judge in {cfg.out}")  # fmt: skip
        if m.get("stack"):
            cv = m["stack"]["agreement"].get("stacked (query-fold CV)", {})
            print(f"stacked with {', '.join(m['stack']['signals'])}: kappa {cv.get('cohen_kappa', float('nan')):.3f} "
                  f"on held-out folds of {m['stack']['pairs']} validation-query pairs")  # fmt: skip
        return 0
    if a.judge_command == "calibrate":
        from cluster.embedded import init_ray
        from pipelines.calibrate_judge import CalibrateConfig, calibrate

        cfg = load_config(CalibrateConfig, a.config, a.overrides, judge=a.judge, pairs=a.pairs, out=a.out)
        init_ray(a.address)
        r = calibrate(cfg)
        print(r.summary())
        for name, m in r.extra["stack"]["agreement"].items():
            print(f"  {name:<26} kappa {m['cohen_kappa']:.3f}  weighted kappa {m['weighted_kappa_quadratic']:.3f}  "
                  f"tau {m['kendall_tau_b_pooled']:.3f}")  # fmt: skip
        print(f"signals: {', '.join(r.extra['stack']['signals'])}; stacked judge in {cfg.out}")
        return 0
    if a.judge_command == "predict":
        from pipelines.judge import PredictConfig, predict

        cfg = load_config(PredictConfig, a.config, a.overrides, judge=a.judge, pairs=a.pairs, out=a.out,
                          batch_size=a.batch_size, limit=a.limit)  # fmt: skip
        r = predict(cfg)
        print(r.summary(), f"({r.extra['pairs_per_s']} pairs/s, {r.extra['dtype']})")
        return 0
    if a.judge_command == "eval":
        from pipelines.judge import EvalConfig, evaluate

        cfg = load_config(EvalConfig, a.config, a.overrides, judgments=a.judgments, qrels=a.qrels, out=a.out)
        r = evaluate(cfg)
        print((Path(cfg.out) / "metrics.txt").read_text(), end="")
        print(r.summary())
        return 0
    if a.judge_command == "diff":
        from pipelines.judge_diff import JudgeDiffConfig
        from pipelines.judge_diff import run as judge_diff

        cfg = load_config(JudgeDiffConfig, a.config, a.overrides, a=a.a, b=a.b, pairs=a.pairs, out=a.out,
                          record=a.record, top=a.top, batch_size=a.batch_size)  # fmt: skip
        r = judge_diff(cfg)
        m, ci, h = r.extra["agreement"], r.extra["ci95"], r.extra["human"]
        print(r.summary())
        print(f"A vs B: kappa {_fmt_num(m['cohen_kappa'])} {_fmt_ci(ci.get('cohen_kappa'))}, weighted kappa "
              f"{_fmt_num(m['weighted_kappa_quadratic'])} {_fmt_ci(ci.get('weighted_kappa_quadratic'))}, labels changed "
              f"{m['changed']:.1%}, mean expected-grade shift {m['mean_score_shift']:+.3f}")  # fmt: skip
        if h:
            k = h["cohen_kappa"]
            print(f"with {h['pairs']} human grades: kappa A {_fmt_num(k['a'])}, B {_fmt_num(k['b'])}, B - A "
                  f"{_fmt_num(k['diff'], '+.3f')} {_fmt_ci(k['diff_ci95'])}: {k['verdict']}")  # fmt: skip
        recorded = f"; recorded in {r.extra['recorded']}" if r.extra["recorded"] else ""
        print(f"page: {Path(cfg.out) / 'diff.html'}{recorded}")
        return 0
    raise AssertionError(a.judge_command)


def _fmt_ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "(no interval)"


def _fmt_num(v: float | None, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _cmd_annotate(a: argparse.Namespace) -> int:
    from cluster.embedded import init_ray
    from pipelines.annotate import AnnotateConfig, run
    from pipelines.stage import load_config

    concurrency = None
    if a.concurrency:
        try:
            lo, _, hi = a.concurrency.partition(",")
            concurrency = (int(lo), int(hi or lo))
        except ValueError:
            raise ConfigError(f"--concurrency {a.concurrency!r}: expected MIN,MAX, e.g. 1,4") from None
    cfg = load_config(AnnotateConfig, a.config, a.overrides, judge=a.judge, pairs=a.pairs, out=a.out,
                      resume=a.resume, overwrite=a.overwrite, profile=a.profile, concurrency=concurrency,
                      batch_size=a.batch_size, num_gpus_per_actor=a.num_gpus_per_actor,
                      num_cpus_per_actor=a.num_cpus_per_actor, unit_rows=a.unit_rows, mode=a.mode,
                      window=a.window, answer_source=a.answer_source)  # fmt: skip
    info = init_ray(a.address, quiet=not a.verbose)
    print(f"ray: {info['nodes']} node(s), {int(info['resources'].get('CPU', 0))} CPU(s) at {info['address']}")
    r = run(cfg)
    print(r.summary())
    if r.extra.get("mode"):
        u = r.extra["utility"]
        stages = "; ".join(f"{k}: " + ", ".join(f"{n} {kind}" for kind, n in v.items())
                           for k, v in u.get("stages", {}).items())  # fmt: skip
        print(f"{r.extra['mode']}: {u.get('selected', 0):,} of {u.get('passages', 0):,} passages selected over "
              f"{u.get('questions', 0):,} questions; {r.extra['questions_per_s']} questions/s, "
              f"{r.extra['passages_per_s']} passages/s; parse failures {r.extra['parse_fail_rate']} of windows"
              f"{' (' + stages + ')' if stages else ''}")  # fmt: skip
    rate = ", ".join(f"{k}: {v}" for k, v in r.extra["pairs_per_s_per_actor"].items())
    print(f"{r.extra['units_this_run']} of {r.extra['units']} units run now; {r.extra['pairs_per_s']} pairs/s "
          f"({rate or 'no actor ran'})")  # fmt: skip
    if r.counts["rejected"]:
        print(f"rejected {r.counts['rejected']:,} pair(s) -> {cfg.out}/rejected/")
    return 0


def _cmd_rank(a: argparse.Namespace) -> int:
    from pipelines import rank
    from pipelines.stage import load_config

    if a.rank_command == "features":
        from cluster.embedded import init_ray

        cfg = load_config(rank.FeaturesConfig, a.config, a.overrides, pairs=a.pairs, docs=a.docs, out=a.out)
        init_ray(a.address, quiet=not a.verbose)
        print(rank.features(cfg).summary())
        return 0
    if a.rank_command == "train":
        cfg = load_config(rank.RankTrainConfig, a.config, a.overrides, features=a.features, judgments=a.judgments,
                          label_source=a.label_source, human_fraction=a.human_fraction, out=a.out)  # fmt: skip
        r = rank.train(cfg)
        print(r.summary())
        top = sorted(r.extra["importances"].items(), key=lambda kv: -kv[1])[:4]
        print(
            "best iteration",
            r.extra["best_iteration"],
            "| top features:",
            ", ".join(f"{k} {v:.2f}" for k, v in top),
        )
        return 0
    if a.rank_command == "predict":
        cfg = load_config(rank.RankPredictConfig, a.config, a.overrides, ranker=a.ranker, feature=a.feature,
                          features=a.features, out=a.out)  # fmt: skip
        print(rank.predict(cfg).summary())
        return 0
    if a.rank_command == "eval":
        cfg = load_config(rank.RankEvalConfig, a.config, a.overrides, run=a.run, qrels=a.qrels, baseline=a.baseline,
                          out=a.out)  # fmt: skip
        r = rank.evaluate(cfg)
        print(
            "  ".join(f"{k} {v:.4f}" for k, v in r.extra["mean"].items()), f"({r.extra['n_queries']} queries)"
        )
        for k, c in r.extra.get("vs_baseline", {}).items():
            print(
                f"  vs baseline {k}: {c['diff']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] p={c['p_ttest']:.3f}"
            )
        return 0
    raise AssertionError(a.rank_command)


def _cmd_experiment(a: argparse.Namespace) -> int:
    from pipelines.experiment import AugmentConfig, augment
    from pipelines.stage import load_config

    cfg = load_config(
        AugmentConfig, a.config, a.overrides, features=a.features, judgments=a.judgments, out=a.out
    )
    r = augment(cfg)
    print((Path(cfg.out) / "table.md").read_text(), end="")
    print(r.summary())
    return 0


def _cmd_run(a: argparse.Namespace) -> int:
    from cluster.embedded import init_ray
    from pipelines.run import PipelineConfig, headline, run
    from pipelines.stage import load_config

    cfg = load_config(PipelineConfig, a.pipeline, a.overrides)
    init_ray(
        a.address, quiet=not a.verbose, worker_output=True
    )  # the fine-tune reports progress from its workers
    r = run(cfg, resume=a.resume, from_stage=a.from_stage, until=a.until)
    print()
    print(f"ran {len(r.ran)} stage(s), skipped {len(r.skipped)} unchanged: "
          + ", ".join(f"{n} {s:.0f}s" for n, s in r.wall_s.items()))  # fmt: skip
    for line in headline(Path(r.out)):
        print(line)
    if r.report:
        print(f"report: {r.report}")
    return 0


def _cmd_candidates(a: argparse.Namespace) -> int:
    from cluster.embedded import init_ray
    from pipelines.candidates import CandidatesConfig, run
    from pipelines.stage import load_config

    cfg = load_config(CandidatesConfig, a.config, a.overrides, queries=a.queries, index=a.index, k=a.k,
                      qrels=a.qrels, out=a.out)  # fmt: skip
    info = init_ray(a.address, quiet=not a.verbose)
    print(f"ray: {info['nodes']} node(s), {int(info['resources'].get('CPU', 0))} CPU(s) at {info['address']}")
    r = run(cfg)
    print(r.summary())
    return 0


def _cmd_retriever(a: argparse.Namespace) -> int:
    from cluster.embedded import init_ray
    from pipelines.stage import load_config
    from pipelines.train_retriever import RetrieverTrainConfig, train

    cfg = load_config(RetrieverTrainConfig, a.config, a.overrides, index=a.index, queries=a.queries, out=a.out,
                      base_model=a.base_model)  # fmt: skip
    init_ray(a.address, quiet=not a.verbose, worker_output=True)  # the workers' lines are the progress bar
    r = train(cfg)
    m = r.extra["metrics"]
    print(r.summary())
    print(f"best checkpoint: step {m.get('step')}, validation nDCG@10 {m.get('val_ndcg10', float('nan')):.4f}, "
          f"R@100 {m.get('val_recall100', float('nan')):.4f}; encoder in {cfg.out}")  # fmt: skip
    return 0


def _cmd_index(a: argparse.Namespace) -> int:
    from pipelines.index import IndexConfig, build
    from pipelines.stage import load_config

    if a.index_command == "search":
        from cluster.embedded import init_ray
        from pipelines.index import IndexSearchConfig, search

        cfg = load_config(IndexSearchConfig, a.config, a.overrides, index=a.index, queries=a.queries, k=a.k,
                          out=a.out)  # fmt: skip
        init_ray(a.address, quiet=not a.verbose)
        print(search(cfg).summary())
        return 0
    cfg = load_config(IndexConfig, a.config, a.overrides, docs=a.docs, out=a.out)
    if cfg.dense:
        from cluster.embedded import init_ray

        init_ray(a.address, quiet=not a.verbose)
    print(build(cfg).summary())
    return 0


def _cmd_rag(a: argparse.Namespace) -> int:
    from cluster.embedded import init_ray
    from pipelines.rag import RagEvalConfig, run
    from pipelines.stage import load_config

    cfg = load_config(RagEvalConfig, a.config, a.overrides, questions=a.questions, index=a.index,
                      retriever=a.retriever, k=a.k, generator=a.generator, qrels=a.qrels, out=a.out,
                      resume=a.resume, overwrite=a.overwrite)  # fmt: skip
    info = init_ray(a.address, quiet=not a.verbose)
    print(f"ray: {info['nodes']} node(s), {int(info['resources'].get('CPU', 0))} CPU(s) at {info['address']}")
    r = run(cfg)
    print((Path(cfg.out) / "table.md").read_text(), end="")
    print(r.summary())
    print(f"generation: {r.extra['answers_per_busy_s']} answers per actor-second, {r.extra['answers_per_s']} answers/s "
          f"wall this run ({', '.join(f'{k}: {v}' for k, v in r.extra['answers_per_s_per_actor'].items()) or 'nothing to run'})")  # fmt: skip
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    from cluster.embedded import init_ray
    from pipelines import serve
    from pipelines.stage import load_config

    values = {"ranker": a.ranker, "index": a.index, "host": a.host, "port": a.port}
    if a.judge:
        values["judge"] = {"path": a.judge}
    cfg = load_config(serve.ServeConfig, a.config, a.overrides, **values)
    if a.detach and not (a.address or os.environ.get("RAY_ADDRESS")):
        raise ConfigError(
            "--detach needs a cluster (--address or RAY_ADDRESS): an embedded Ray ends with this process"
        )
    init_ray(a.address, quiet=not a.verbose)
    serve.start(cfg)
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    auth = (
        " (bearer token from $" + cfg.auth_token_env + ")"
        if cfg.auth_token_env and os.environ.get(cfg.auth_token_env)
        else ""
    )
    print(f"serving {cfg.name} at {url}{auth}: POST /rank, POST /judge, GET /healthz, /readyz, /docs")
    if a.check:
        return serve.check(cfg, url)
    if a.detach:
        return 0
    print("Ctrl-C stops it")
    try:
        while True:
            import time

            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve as ray_serve

        ray_serve.shutdown()
    return 0


def _cmd_review(a: argparse.Namespace) -> int:
    from pipelines import review
    from pipelines.stage import load_config

    if a.review_command == "export":
        cfg = load_config(review.ExportConfig, a.config, a.overrides, judgments=a.judgments, pairs=a.pairs,
                          budget=a.budget, strategy=a.strategy, seed=a.seed, exclude=a.exclude, out=a.out)  # fmt: skip
        r = review.export(cfg)
        print(r.summary())
        print(f"{cfg.strategy}: judge grades in the queue {r.extra['queue_judge_grades']}, mean confidence "
              f"{r.extra['queue_confidence_mean']}; Label Studio: {cfg.out}/tasks.json + {cfg.out}/label_config.xml")  # fmt: skip
        return 0
    if a.review_command == "import":
        grades = None
        if a.grades:
            try:
                grades = [int(g) for g in a.grades.split(",")]
            except ValueError:
                raise ConfigError(f"--grades {a.grades!r}: expected integers, e.g. 0,1,2,3") from None
        cfg = load_config(review.ImportConfig, a.config, a.overrides, labels=a.labels, out=a.out, grades=grades,
                          queue=a.queue)  # fmt: skip
        r = review.import_labels(cfg)
        print(r.summary())
        if r.counts["rejected"]:
            reasons = "; ".join(f"{k}: {v}" for k, v in r.extra["rejected_reasons"].items())
            print(f"rejected {r.counts['rejected']:,} row(s) -> {cfg.out}/rejected/ ({reasons})")
        if cfg.queue:
            print(f"labelled pairs (for judge calibrate --pairs): {cfg.out}/pairs")
        return 0
    if a.review_command == "serve":
        cfg = load_config(review.ReviewServeConfig, a.config, a.overrides, queue=a.queue, out=a.out, host=a.host,
                          port=a.port, reviewer=a.reviewer)  # fmt: skip
        review.serve(cfg)
        return 0
    raise AssertionError(a.review_command)


def _cmd_cluster(a: argparse.Namespace) -> int:
    from cluster import local

    if a.cluster_command == "up":
        c = local.up(a.workers, name=a.name, cpus_per_node=a.cpus_per_node, gpus_per_node=a.gpus_per_node,
                     head_cpus=a.head_cpus)  # fmt: skip
        print(f"cluster '{c.name}' up: {len(c.nodes)} nodes on 127.0.0.1")
        print(f"  GCS address   {c.gcs_address}      (augrel --address {c.gcs_address} ...)")
        print(f"  Jobs API      {c.dashboard_url}  (augrel submit --address {c.dashboard_url} -- ...)")
        print(f"  logs          {os.path.dirname(c.nodes[0].log)}")
        return 0
    if a.cluster_command == "down":
        stopped = local.down(a.name)
        print(f"cluster '{a.name}' down: stopped {', '.join(stopped) or 'nothing (already stopped)'}")
        return 0
    if a.cluster_command == "status":
        print(json.dumps(local.status(a.name), indent=2))
        return 0
    if a.cluster_command == "profile":
        from cluster.profiles import load_profile

        print(json.dumps(load_profile(a.name).model_dump(), indent=2))
        return 0
    raise AssertionError(a.cluster_command)


def _cmd_submit(a: argparse.Namespace) -> int:
    from cluster.submit import EXIT_CODES, submit
    from pipelines.stage import parse_overrides

    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    env = {k: str(v) for k, v in parse_overrides(a.env).items()}
    _, status = submit(args, address=a.job_address, wait=not a.no_wait, env_vars=env)
    return EXIT_CODES.get(status, 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    handlers = {
        "data": _cmd_data,
        "judge": _cmd_judge,
        "annotate": _cmd_annotate,
        "rank": _cmd_rank,
        "experiment": _cmd_experiment,
        "index": _cmd_index,
        "retriever": _cmd_retriever,
        "candidates": _cmd_candidates,
        "rag": _cmd_rag,
        "run": _cmd_run,
        "serve": _cmd_serve,
        "cluster": _cmd_cluster,
        "submit": _cmd_submit,
        "review": _cmd_review,
    }
    try:
        return handlers[a.command](a)
    except AugrelError as e:
        if a.verbose:
            raise
        print(f"augrel: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("augrel: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
