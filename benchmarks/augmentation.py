"""The augmentation experiment on TREC DL 2019: rankers trained on 20% human labels, on 20% human + judge labels,
on judge labels, with the curriculum, on 100% human labels, and the BM25 / MiniLM baselines, ranked on the
assessed pool of each query, 5-fold query-level CV, several seeds, test folds scored with human labels only.

Steps (each an augrel stage, outputs under $AUGREL_BENCH_DIR/augment):
1. ``data prepare trec-dl`` on ../shared/data/trec-dl-2019;
2. ``annotate``: the judge grades every pair (a fine-tuned judge directory with --judge, by default
   runs/dl19/judge when it exists, else the zero-shot Gemma 3 270M); skipped with --judgments;
3. ``rank features`` (BM25 over the collection, MiniLM cosine, lengths, overlap) on a Ray Data actor pool;
4. ``experiment augment``: prints the table; the plot is augment.png.

--quick keeps 8 pairs per query (every query keeps its relevant pairs first) and 2 seeds, so the judge
grades about 340 pairs. Last line:
``RESULT ndcg10_h20=.. ndcg10_h20_judge=.. ndcg10_h100=.. ndcg10_bm25=.. mrr10_h20_judge=..``.

    python benchmarks/augmentation.py [--quick] [--judge DIR_OR_MODEL] [--judgments DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("AUGREL_DATA_DIR", ROOT.parent / "shared" / "data"))
WORK = Path(os.environ.get("AUGREL_BENCH_DIR", "/tmp/augrel-bench")) / "augment"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 pairs per query, 2 seeds (about 2 minutes)")
    ap.add_argument("--judge", help="judge directory or base model (default: runs/dl19/judge if present)")
    ap.add_argument("--judgments", help="use these judge labels instead of annotating")
    a = ap.parse_args()

    from dataclasses import asdict

    from cluster.embedded import init_ray
    from models.judge_card import JudgeCard, is_judge_dir
    from pipelines.annotate import AnnotateConfig
    from pipelines.annotate import run as annotate
    from pipelines.data import PrepareConfig, prepare
    from pipelines.experiment import AugmentConfig, augment
    from pipelines.rank import FeaturesConfig, features

    init_ray()
    data = WORK / "dl19"
    if not (data / "pairs").exists():
        prepare(PrepareConfig(format="trec-dl", src=str(DATA / "trec-dl-2019"), out=str(data)))
    per_query = 8
    tag = f"quick{per_query}" if a.quick else "full"  # names every cached step: a changed subsample rebuilds
    pairs = subsample(data / "pairs", WORK / f"pairs-{tag}", per_query) if a.quick else data / "pairs"

    judge = a.judge or (str(ROOT / "runs/dl19/judge") if (ROOT / "runs/dl19/judge/judge_card.json").exists()
                        else "gemma3-270m")  # fmt: skip
    judgments = a.judgments
    if not judgments:
        # named by the judge too: judgments of another judge are never reused
        judge_key = hashlib.sha256(
            str(Path(judge).resolve() if Path(judge).exists() else judge).encode()
        ).hexdigest()[:8]
        judgments = str(WORK / f"judgments-{tag}-{judge_key}")
        done = (
            json.loads((Path(judgments) / "manifest.json").read_text())
            if (Path(judgments) / "manifest.json").exists()
            else None
        )
        if not (
            done
            and done.get("complete")
            and done["judge_card"].get("base_model")
            and done["inputs"] == [str(pairs)]
            and (not is_judge_dir(judge) or done["judge_card"] == asdict(JudgeCard.load(judge)))
        ):
            annotate(
                AnnotateConfig(judge=judge, pairs=str(pairs), out=judgments, overwrite=True, unit_rows=128)
            )
    feats = WORK / f"features-{tag}"
    if not (feats / "manifest.json").exists() or json.loads((feats / "manifest.json").read_text())[
        "inputs"
    ] != [str(pairs)]:
        features(FeaturesConfig(pairs=str(pairs), docs=str(data / "docs"), out=str(feats)))
    cfg = AugmentConfig(features=str(feats), judgments=judgments, out=str(WORK / f"experiment-{tag}"),
                        seeds=[0, 1] if a.quick else [0, 1, 2, 3, 4])  # fmt: skip
    r = augment(cfg)
    s = r.extra["summary"]
    print(f"judge: {judge}" if not a.judgments else f"judgments: {judgments}")
    print((Path(cfg.out) / "table.md").read_text())
    print(f"plot: {Path(cfg.out) / 'augment.png'}")
    print(f"RESULT ndcg10_h20={s['h20']['ndcg10']:.4f} ndcg10_h20_judge={s['h20+judge']['ndcg10']:.4f} "
          f"ndcg10_h100={s['h100']['ndcg10']:.4f} ndcg10_bm25={s['bm25']['ndcg10']:.4f} "
          f"mrr10_h20_judge={s['h20+judge']['mrr10']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
