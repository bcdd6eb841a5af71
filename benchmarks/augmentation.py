"""The augmentation experiment on TREC DL 2019 with a judge that never saw a DL19 query: rankers trained on 20%
human labels, on 20% human + judge labels, on judge labels, with the curriculum, on 100% human labels, and the
BM25 / MiniLM baselines, ranked on the assessed pool of each query, 5-fold query-level CV, several seeds, test
folds scored with human labels only.

Who learns from which queries:
- the judge: fine-tuned, checkpoint-selected, cut-point-tuned and stacked on LLMJudge dev only (TREC DL 2023
  queries, configs/judge-llmjudge.yaml: 15 queries to train, 7 to validate and calibrate), then it grades every
  DL19 pair, so every DL19 query is out of sample for it (cross-collection, as a user's judge would be);
- the rankers: the CV training folds' DL19 queries (human labels as each row says, judge labels for the rest);
- the score: each test fold's DL19 queries, human labels only.
``experiment augment`` checks the first point itself: it refuses judgments whose judge trained or was calibrated
on a query it scores.

Steps (each an augrel stage, outputs under $AUGREL_BENCH_DIR/augment, default /tmp/augrel-bench/augment):
1. ``data prepare trec-dl`` on ../shared/data/trec-dl-2019, ``data prepare pairs`` on ../shared/data/llmjudge-dev;
2. ``judge finetune --config configs/judge-llmjudge.yaml`` (its ``stack`` section does what ``judge calibrate``
   does, on the validation queries); reused when the judge directory holds a finished run of the same config;
   skipped with --judge or --judgments;
3. ``annotate``: the judge grades every DL19 pair;
4. ``rank features`` (BM25 over the collection, MiniLM cosine, lengths, overlap) on a Ray Data actor pool;
5. ``experiment augment --config configs/augment-dl19.yaml``: prints the table; the plot is augment.png.

Full: about 15-20 minutes of fine-tuning, 15 of grading 9,260 pairs and a few for features and rankers on 2
cores. --quick runs the same comparison small: a 6-step fine-tune validated on 48 pairs and stacked on 120,
8 DL19 pairs per query (every query keeps relevant pairs first, about 340 pairs to grade), 2 seeds. Last line:
``RESULT ndcg10_h20=.. ndcg10_h20_judge=.. ndcg10_curriculum=.. ndcg10_judge=.. ndcg10_h100=.. ndcg10_bm25=..
ndcg10_dense=.. mrr10_h20_judge=.. judge_kappa_val_cut=.. judge_kappa_stack_cv=..`` (the judge's kappa on its
LLMJudge validation queries, from its card: the LLM's cut-point labels, and the stack's query-fold CV).

``--pool-fraction 0.3`` grades 30% of each query's pool (drawn within grades) with the full judge: the same
experiment where grading all 9,260 pairs does not fit the time at hand.

    python benchmarks/augmentation.py [--quick] [--pool-fraction F] [--judge DIR_OR_MODEL] [--judgments DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("AUGREL_DATA_DIR", ROOT.parent / "shared" / "data"))
WORK = Path(os.environ.get("AUGREL_BENCH_DIR", "/tmp/augrel-bench")) / "augment"
JUDGE_CONFIG = ROOT / "configs" / "judge-llmjudge.yaml"
AUGMENT_CONFIG = ROOT / "configs" / "augment-dl19.yaml"
# --quick: a fine-tune that only shows the steps run (it learns little in 6 steps)
QUICK_JUDGE = ["max_steps=6", "eval_every=3", "n_val=48", "stack.n_pairs=120"]


def subsample(pairs_dir: Path, out: Path, per_query: int, seed: int = 0) -> Path:
    """At most ``per_query`` pairs per query: half from its relevant (grade >= 2) pairs, the rest at random."""
    from pipelines.io import read_table, write_table

    t = read_table(pairs_dir)
    rng = np.random.default_rng(seed)
    qids = np.asarray(t.column("qid").to_pylist(), dtype=object)
    label = t.column("label").to_numpy(zero_copy_only=False)
    keep = []
    for q in sorted(set(qids)):
        idx = np.flatnonzero(qids == q)
        rel, other = idx[label[idx] >= 2], idx[label[idx] < 2]
        take_rel = rng.permutation(rel)[: per_query // 2]
        take = np.concatenate([take_rel, rng.permutation(other)[: per_query - len(take_rel)]])
        keep.extend(sorted(take.tolist()))
    write_table(out, t.take(pa.array(sorted(keep))))
    return out


def pool_sample(pairs_dir: Path, out: Path, fraction: float, seed: int = 0) -> Path:
    """A ``fraction`` of each query's assessed pool, drawn within each grade (at least one pair of every grade the
    query has), so every pool keeps its grade mix: a smaller run of the same experiment."""
    from pipelines.io import read_table, write_table

    t = read_table(pairs_dir)
    qids = np.asarray(t.column("qid").to_pylist(), dtype=object)
    label = t.column("label").to_numpy(zero_copy_only=False)
    write_table(out, t.take(pa.array(pool_rows(qids, label, fraction, seed))))
    return out


def pool_rows(qids: np.ndarray, label: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Row indices of ``pool_sample``'s draw (benchmarks/active_labels.py takes the very same pairs)."""
    rng = np.random.default_rng(seed)
    keep = []
    for q in sorted(set(qids)):
        idx = np.flatnonzero(qids == q)
        for g in np.unique(label[idx]):
            of_grade = idx[label[idx] == g]
            keep.extend(rng.permutation(of_grade)[: max(1, round(fraction * len(of_grade)))].tolist())
    return np.asarray(sorted(keep), dtype=np.int64)


def finetuned_judge(llmjudge_pairs: Path, quick: bool) -> str:
    """The judge of configs/judge-llmjudge.yaml, fit on LLMJudge dev; a finished run of the same config is
    reused (the fine-tune alone is a quarter of an hour here)."""
    from pipelines.finetune_judge import FinetuneConfig, finetune
    from pipelines.stage import load_config, read_manifest

    out = WORK / f"judge-llmjudge-{'quick' if quick else 'full'}"
    cfg = load_config(FinetuneConfig, JUDGE_CONFIG, QUICK_JUDGE if quick else [], train=[str(llmjudge_pairs)],
                      out=str(out))  # fmt: skip
    done = read_manifest(out)
    if (
        done
        and done.get("stage") == "judge.finetune"
        and yaml.safe_load((out / "config.yaml").read_text()) == cfg.model_dump(mode="json")
    ):
        print(f"judge: reusing {out} (same config, finished {done['finished_at']})", flush=True)
    else:
        finetune(cfg)
    return str(out)


def annotated(judge: str, pairs: Path, tag: str) -> str:
    """Every pair graded by ``judge``; judgments of the same judge (card, adapter and stack bytes) and pairs are
    reused."""
    import hashlib

    from pipelines.annotate import AnnotateConfig, judge_fingerprint
    from pipelines.annotate import run as annotate
    from pipelines.stage import read_manifest

    fingerprint = judge_fingerprint(judge)
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:8]
    out = WORK / f"judgments-{tag}-{key}"
    done = read_manifest(out)
    if not (done and done.get("complete") and done["inputs"] == [str(pairs)]):
        # an interrupted run of the same judge and pairs continues where it stopped (annotate checks both)
        annotate(AnnotateConfig(judge=judge, pairs=str(pairs), out=str(out), resume=True, unit_rows=128))
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small judge fine-tune, 8 pairs per query, 2 seeds")
    ap.add_argument("--judge", help="a judge directory or base model instead of the LLMJudge-dev fine-tune "
                    "(experiment augment refuses one that trained on DL19 queries)")  # fmt: skip
    ap.add_argument("--judgments", help="use these judge labels instead of annotating")
    ap.add_argument("--pool-fraction", type=float, default=1.0,
                    help="grade this share of each DL19 query's pool (drawn within grades; 1: every pair)")  # fmt: skip
    a = ap.parse_args()

    from cluster.embedded import init_ray
    from pipelines.data import PrepareConfig, prepare
    from pipelines.experiment import AugmentConfig, augment
    from pipelines.rank import FeaturesConfig, features
    from pipelines.stage import load_config

    init_ray()
    data, llmj = WORK / "dl19", WORK / "llmjudge"
    if not (data / "pairs").exists():
        prepare(PrepareConfig(format="trec-dl", src=str(DATA / "trec-dl-2019"), out=str(data)))
    if not (llmj / "pairs").exists():
        prepare(PrepareConfig(format="pairs", src=str(DATA / "llmjudge-dev" / "pairs.jsonl"), out=str(llmj)))
    per_query = 8
    if not 0 < a.pool_fraction <= 1:
        ap.error("--pool-fraction: a share in (0, 1]")
    # the tag names every cached step: a changed subsample rebuilds
    if a.quick:
        tag = f"quick{per_query}"
        pairs = subsample(data / "pairs", WORK / f"pairs-{tag}", per_query)
    elif a.pool_fraction < 1:
        tag = f"pool{round(100 * a.pool_fraction)}"
        pairs = pool_sample(data / "pairs", WORK / f"pairs-{tag}", a.pool_fraction)
    else:
        tag, pairs = "full", data / "pairs"

    judge = None
    judgments = a.judgments
    if not judgments:
        judge = a.judge or finetuned_judge(llmj / "pairs", a.quick)
        judgments = annotated(judge, pairs, tag)
    feats = WORK / f"features-{tag}"
    if not (feats / "manifest.json").exists() or json.loads((feats / "manifest.json").read_text())[
        "inputs"
    ] != [str(pairs)]:
        features(FeaturesConfig(pairs=str(pairs), docs=str(data / "docs"), out=str(feats)))
    cfg = load_config(AugmentConfig, AUGMENT_CONFIG, ["seeds=[0, 1]"] if a.quick else [], features=str(feats),
                      judgments=judgments, out=str(WORK / f"experiment-{tag}"))  # fmt: skip
    r = augment(cfg)
    s = r.extra["summary"]
    kappas = {}
    if judge and (Path(judge) / "judge_card.json").exists():
        m = json.loads((Path(judge) / "judge_card.json").read_text()).get("metrics", {})
        kappas["judge_kappa_val_cut"] = m.get("val_kappa_cut")
        cv = ((m.get("stack") or {}).get("agreement") or {}).get("stacked (query-fold CV)") or {}
        kappas["judge_kappa_stack_cv"] = cv.get("cohen_kappa")
    print(f"judge: {judge}" if judge else f"judgments: {judgments}")
    print((Path(cfg.out) / "table.md").read_text())
    print(f"plot: {Path(cfg.out) / 'augment.png'}")
    fields = [f"ndcg10_{k.replace('+', '_')}={s[k]['ndcg10']:.4f}" for k in cfg.methods]
    fields.append(f"mrr10_h20_judge={s['h20+judge']['mrr10']:.4f}")
    fields += [f"{k}={v:.4f}" for k, v in kappas.items() if v is not None]
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
