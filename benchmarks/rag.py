"""Paper 2's experiment at our scale: do utility labels train retrievers as good as human labels, and do better
retrievers give better answers? ../shared/data/hotpotqa-dev-500, through ``augrel run configs/hotpotqa.yaml``
itself, so the figures are the ones a user gets from the pipeline.

Data: the 500 dev questions (distractor setting) split by question, seeded: train 60% / val 10% / test 30%; every
paragraph of every question pooled into one corpus (4,858 passages once repeats are merged). Who learns from what:
the first 100 train questions' retrieved candidates (BM25 + MiniLM, fused, top 10) are utility-annotated (answer likelihood of the gold answer
by Gemma 3 270M, the top 20% of each question's candidates kept) and, with the train questions' human supporting
labels, train three MiniLM retrievers (SumMargLH, 2 Ray Train workers, one epoch): human labels; utility labels; utility labels
then one epoch on the human labels of 20% of the questions (curriculum). The val questions pick each retriever's
checkpoint. The test questions train, validate and calibrate nothing: they are the rows of the table.

Rows: BM25, MiniLM off the shelf, the three fine-tuned retrievers (each with a FAISS flat index of the whole
corpus), closed book (no passage) and oracle (the two gold supporting paragraphs). Columns: supporting recall@5,
answer recall@5 (a normalised gold answer inside the top 5), exact match and token F1 of Gemma 3 270M's answer
(SQuAD / HotpotQA normalisation), each a mean over the test questions with a query-bootstrap 95% CI; the paired
difference in answer recall of each utility-trained retriever against the human-trained one; generation
throughput (answers per actor-second; every row's answers are generated in one Ray Data pass).

--quick: 80 train questions annotated, 20 test questions answered, one training epoch; the same rows.

Last line: ``RESULT recall5_bm25=.. recall5_base=.. recall5_human=.. recall5_utility=.. recall5_utility_h20=..
em_oracle=.. em_best=.. f1_best=.. questions_per_s=..`` (recall5: answer recall@5; best: the retrieved row with the
highest EM, F1 its F1, chosen on the test questions, so optimistic; questions_per_s: answers generated per
actor-second, each answer one question of one row).

    python benchmarks/rag.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORK = Path(os.environ.get("AUGREL_BENCH_DIR", "/tmp/augrel-bench")) / "rag"
DATA = Path(os.environ.get("AUGREL_DATA_DIR", ROOT.parent / "shared" / "data"))
ROWS = ["bm25", "minilm", "human", "utility", "utility_h20", "closed_book", "oracle"]


def overrides(quick: bool, out: Path) -> list[str]:
    sets = [f"out={out}", f"data.src={DATA / 'hotpotqa-dev-500'}"]
    if quick:
        sets += ["rag.train_questions=80", "rag.questions=20", "rag.retriever.epochs=1"]
    return sets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="80 train questions, 20 test questions, one epoch")
    ap.add_argument("--out", type=Path, help="run directory (default: $AUGREL_BENCH_DIR/rag/{quick,full})")
    a = ap.parse_args()

    from cluster.embedded import init_ray
    from models.loading import cpu_description
    from pipelines.run import PipelineConfig, run
    from pipelines.stage import load_config

    out = a.out or WORK / ("quick" if a.quick else "full")
    p = load_config(PipelineConfig, ROOT / "configs" / "hotpotqa.yaml", overrides(a.quick, out))
    print(
        f"RAG benchmark (configs/hotpotqa.yaml{', --quick' if a.quick else ''}) on {cpu_description()}",
        flush=True,
    )
    init_ray(quiet=True, worker_output=True)
    t0 = time.perf_counter()
    r = run(p, resume=True)
    wall = time.perf_counter() - t0
    s = json.loads((out / "rag-eval" / "summary.json").read_text())
    m = json.loads((out / "pipeline.json").read_text())
    ann = m["stages"]["rag_utility"]["result"]
    rows = s["rows"]

    def cell(r: dict, k: str) -> str:
        v, ci = r.get(k), r.get(f"{k}_ci95") or [None, None]
        return "      -        " if v is None else f"{v:.3f} [{ci[0]:.2f},{ci[1]:.2f}]"

    print()
    print(s["caption"])
    print(f"utility labels: {ann['mode']} on {ann['questions']} train questions' candidates, "
          f"{ann.get('questions_per_s')} questions/s; stages run now: {', '.join(r.ran) or 'none'} ({wall:.0f} s)")  # fmt: skip
    head = f"{'row':<46} {'k':>4}  {'supporting R@k':<20} {'answer R@k':<20} {'EM':<20} {'F1':<20}"
    print(head)
    print("-" * len(head))
    for name in ROWS:
        if name in rows:
            x = rows[name]
            k = "gold" if x["k"] is None else x["k"]
            print(f"{x['name']:<46} {k:>4}  {cell(x, 'supporting_recall'):<20} {cell(x, 'answer_in_context'):<20} "
                  f"{cell(x, 'em'):<20} {cell(x, 'f1'):<20}")  # fmt: skip
    for line in s.get("comparisons", ()):
        print(line)
    print(
        f"generation ({s['generator']}): {s['answers_per_busy_s']} answers per actor-second (one answer per "
        f"question and row), {s.get('answers_per_s')} answers/s over the wall time of the last run, start-up included"
    )
    retrieved = [n for n in ("bm25", "minilm", "human", "utility", "utility_h20") if n in rows]
    best = max(retrieved, key=lambda n: rows[n]["em"] or 0.0)

    def f(name: str, key: str) -> str:
        v = rows.get(name, {}).get(key)
        return "nan" if v is None else f"{v:.4f}"

    print(f"RESULT recall5_bm25={f('bm25', 'answer_in_context')} recall5_base={f('minilm', 'answer_in_context')} "
          f"recall5_human={f('human', 'answer_in_context')} recall5_utility={f('utility', 'answer_in_context')} "
          f"recall5_utility_h20={f('utility_h20', 'answer_in_context')} em_oracle={f('oracle', 'em')} "
          f"em_best={f(best, 'em')} f1_best={f(best, 'f1')} questions_per_s={s['answers_per_busy_s']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
