"""Judge quality on held-out TREC DL 2019 queries: zero-shot base model vs fine-tuned judge vs a MiniLM
cross-encoder trained on the same labels, and each LLM stacked with MiniLM cosine + lexical signals
(``augrel judge calibrate``) next to the MiniLM cosine alone. One table, agreement with 95% bootstrap intervals
over queries.

Protocol: DL 2019 queries are split 70/30 (seed 13). The judge fine-tunes on the 70% plus LLMJudge dev (TREC DL
2023 passages), validating on held-out training queries: by default every label of the training queries in its
natural grade mix for one epoch (configs/judge-dl19-full.yaml, about an hour here), or ``--config
configs/judge-dl19.yaml`` for paper 1's 1,000 class-balanced pairs; the cross-encoder trains on the very same
sampled pairs (3 epochs of up to 2,000 pairs, else one). Every method is scored on the 30% test queries, twice:
its argmax label, and labels from cut-points on its expected grade tuned for kappa on the calibration pairs
below (../shared/notes/judge-levers.md, lever 1). The stacked rows fit their combiner on 1,000 pairs of the
validation queries in their natural grade mix (what `judge finetune` does with ``stack``); the "MiniLM cosine
alone" row is the same combiner with the cosine as its only signal, so the LLM's own contribution shows.
Ends with ``RESULT kappa_finetuned=.. kappa_zeroshot=.. kappa_crossencoder=.. kappa_stacked=.. kappa_cosine=..``
(cut-point labels for the LLM rows).

    python benchmarks/judge_quality.py [--quick] [--config configs/judge-dl19.yaml] [--judge runs/dl19/judge]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from eval.agreement import agreement, grades_from_cutpoints, tune_cutpoints  # noqa: E402
from models.cross_encoder import CrossEncoderGrader  # noqa: E402
from models.encoder import BiEncoder  # noqa: E402
from models.judge_card import load_judge  # noqa: E402
from models.judge_ensemble import GradeCombiner, fit_stacked, pair_signals  # noqa: E402
from models.loading import cpu_description  # noqa: E402
from pipelines.calibrate_judge import StackSettings  # noqa: E402
from pipelines.data import PrepareConfig, SplitConfig, prepare, split  # noqa: E402
from pipelines.finetune_judge import (  # noqa: E402
    FinetuneConfig,
    finetune,
    natural_sample,
    sample_train_val,
    split_pools,
)
from pipelines.io import read_table  # noqa: E402
from pipelines.stage import load_config  # noqa: E402

DATA = Path(os.environ.get("AUGREL_DATA_DIR", REPO.parent / "shared" / "data"))
GRADES = [0, 1, 2, 3]


def prepared(work: Path) -> tuple[Path, Path]:
    dl19, llmj = work / "dl19", work / "llmjudge"
    if not (dl19 / "data" / "pairs").exists():
        prepare(PrepareConfig(format="trec-dl", src=str(DATA / "trec-dl-2019"), out=str(dl19 / "data")))
    if not (dl19 / "splits" / "test").exists():
        split(
            SplitConfig(
                src=str(dl19 / "data"), out=str(dl19 / "splits"), fractions={"train": 0.7, "test": 0.3}
            )
        )
    if not (llmj / "data" / "pairs").exists():
        prepare(
            PrepareConfig(
                format="pairs", src=str(DATA / "llmjudge-dev" / "pairs.jsonl"), out=str(llmj / "data")
            )
        )
    return dl19, llmj


class _MemoEncoder:
    """Every stacked row re-reads the same calibration and test texts: encode each text once."""

    def __init__(self, encoder):
        self.encoder, self.vectors = encoder, {}

    def _memo(self, texts, kind):
        new = [t for t in dict.fromkeys(texts) if (kind, t) not in self.vectors]
        if new:
            self.vectors.update(
                zip([(kind, t) for t in new], self.encoder.encode_texts(new, kind), strict=True)
            )
        return np.stack([self.vectors[kind, t] for t in texts])

    def encode_queries(self, texts):
        return self._memo(texts, "query")

    def encode_passages(self, texts):
        return self._memo(texts, "passage")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sample of test pairs and a short fine-tune")
    ap.add_argument("--judge", help="an existing fine-tuned judge directory (skip fine-tuning)")
    ap.add_argument("--config", default=str(REPO / "configs" / "judge-dl19-full.yaml"),
                    help="fine-tuning recipe (default: every training-query label in its natural mix, about an "
                         "hour here; configs/judge-dl19.yaml is paper 1's 1,000 balanced pairs)")  # fmt: skip
    ap.add_argument("--work", default=os.environ.get("AUGREL_BENCH_CACHE", "/tmp/augrel-bench"))
    ap.add_argument("--test-pairs", type=int, help="score this many test pairs (default: all; --quick: 120)")
    ap.add_argument(
        "--bootstrap", type=int, help="bootstrap resamples for the intervals (default 1000; --quick: 200)"
    )
    args = ap.parse_args()
    args.bootstrap = args.bootstrap or (200 if args.quick else 1000)
    work = Path(args.work)
    dl19, llmj = prepared(work)

    # stack=null: the benchmark fits its own stacks below, on the same calibration pairs, for every judge
    overrides = [f"train=[{dl19 / 'splits' / 'train' / 'pairs'}, {llmj / 'data' / 'pairs'}]", "stack=null"]
    if args.quick:
        overrides += ["n_train=64", "n_val=48", "max_steps=6", "eval_every=3", f"out={work / 'judge-quick'}"]
    else:
        overrides += [f"out={work / Path(args.config).stem}"]
    cfg = load_config(FinetuneConfig, args.config, overrides)
    t0 = time.perf_counter()
    judge_dir = args.judge
    if not judge_dir:
        from cluster.embedded import init_ray

        init_ray()
        finetune(cfg.model_copy(update={"resume": False}))
        judge_dir = cfg.out
    finetune_s = time.perf_counter() - t0

    pools = split_pools(cfg)
    train, val, _ = sample_train_val(cfg, pools)
    stack = StackSettings()
    calib = natural_sample(pools[1], 120 if args.quick else stack.n_pairs, cfg.seed + 2)
    test = read_table(dl19 / "splits" / "test" / "pairs")
    n_test = args.test_pairs or (120 if args.quick else test.num_rows)
    if n_test < test.num_rows:
        test = test.take(np.sort(np.random.default_rng(0).permutation(test.num_rows)[:n_test]))

    def cols(t):
        return (t.column("query").to_pylist(), t.column("text").to_pylist(),
                t.column("label").to_numpy(), np.asarray(t.column("qid").to_pylist()))  # fmt: skip

    tq, tt, th, tqid = cols(test)
    cq, ct, ch, cqid = cols(calib)
    encoder = _MemoEncoder(BiEncoder(dtype=stack.encoder_dtype))
    rows = []

    def stacked(name: str, calib_llm, test_llm, use=tuple(stack.signals)):
        sig_c = pair_signals(calib_llm, cq, ct, GRADES, encoder, stack.signals)
        sig_t = pair_signals(test_llm, tq, tt, GRADES, encoder, stack.signals)
        comb, _ = fit_stacked(sig_c, ch, cqid, GRADES, use, **stack.selection())
        label, _, score = comb.grade(sig_t)
        rows.append(
            (
                f"{name} [{'+'.join(comb.signals)}]",
                agreement(th, label, score, tqid, GRADES, n_boot=args.bootstrap),
            )
        )
        if len(use) > 1:  # the same stack with every signal, no selection
            comb = GradeCombiner.fit(sig_c, ch, GRADES, use=use, c=stack.c)
            label, _, score = comb.grade(sig_t)
            rows.append(
                (f"{name}, all signals", agreement(th, label, score, tqid, GRADES, n_boot=args.bootstrap))
            )

    def report(name: str, calib_score, test_label, test_score):
        # cut-points from the natural-mix calibration pairs: tuned on the balanced validation sample they
        # would expect far more high grades than held-out queries have
        cuts = tune_cutpoints(calib_score, ch, GRADES)
        for variant, labels in (
            ("argmax", test_label),
            ("cut-points", grades_from_cutpoints(test_score, cuts, GRADES)),
        ):
            r = agreement(th, labels, test_score, tqid, GRADES, n_boot=args.bootstrap)
            rows.append((f"{name} ({variant})", r))

    def llm_scores(judge: str, sets):
        """The LLM's scores on each (queries, texts) set, cached under --work by judge and pairs (a rerun that
        changes only the stacking or the table skips the slow part)."""
        card = Path(judge) / "judge_card.json"
        key = hashlib.sha256(json.dumps([judge, card.stat().st_mtime if card.exists() else None, cfg.template,
                                         cfg.max_doc_tokens, sets]).encode()).hexdigest()[:16]  # fmt: skip
        cache = work / "scores" / f"{key}.pkl"
        if cache.exists():
            return pickle.loads(cache.read_bytes())
        scorer = load_judge(judge, template=cfg.template, max_doc_tokens=cfg.max_doc_tokens).llm_scorer(16)
        out = [scorer.score(q, t) for q, t in sets]
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps(out))
        return out

    timings = {}
    for name, judge in (
        ("zero-shot Gemma 3 270M", cfg.base_model),
        ("fine-tuned Gemma 3 270M + LoRA", judge_dir),
    ):
        t0 = time.perf_counter()
        s, c = llm_scores(judge, [(tq, tt), (cq, ct)])
        timings[name] = time.perf_counter() - t0
        report(name, c.score, s.label, s.score)
        stacked(f"{name} stacked", c, s)
    stacked("MiniLM cosine alone (same combiner)", c, s, use=("dense_cos",))

    t0 = time.perf_counter()
    ce = CrossEncoderGrader.from_pretrained(grades=GRADES)
    trq, trt, trh, _ = cols(train)
    ce.fit(
        np.asarray(trq, dtype=object), np.asarray(trt, dtype=object), trh, epochs=3 if len(trh) <= 2000 else 1
    )
    _, _, c_score = ce.predict(cq, ct)
    label, _, score = ce.predict(tq, tt)
    timings["MiniLM cross-encoder"] = time.perf_counter() - t0
    report("MiniLM cross-encoder", c_score, label, score)

    print(f"\njudge quality: held-out TREC DL 2019 queries ({len(set(tqid))} queries, {len(th)} pairs); "
          f"train {train.num_rows} / val {val.num_rows} pairs ({cfg.sampling}); stack calibration {calib.num_rows} "
          f"pairs (natural mix) of the val queries; fine-tune {finetune_s:.0f}s on {cpu_description()}")  # fmt: skip
    hdr = f"{'method':<64} {'kappa':>6} {'95% CI':>15} {'w.kappa':>8} {'alpha':>6} {'acc':>6} {'tau':>6}"
    print(hdr)
    for name, r in rows:
        m, ci = r.metrics, r.ci95.get("cohen_kappa", [float("nan")] * 2)
        print(f"{name:<64} {m['cohen_kappa']:>6.3f} [{ci[0]:>5.3f}, {ci[1]:>5.3f}] "
              f"{m['weighted_kappa_quadratic']:>8.3f} {m['krippendorff_alpha_ordinal']:>6.3f} "
              f"{m['accuracy']:>6.3f} {m['kendall_tau_b_pooled']:>6.3f}")  # fmt: skip
    print(
        "seconds (load + score test and calibration pairs): "
        + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
    )
    k = {name: r.metrics["cohen_kappa"] for name, r in rows}
    stacked_row = next(n for n in k if n.startswith("fine-tuned Gemma 3 270M + LoRA stacked ["))
    cosine_row = next(n for n in k if n.startswith("MiniLM cosine alone"))
    print(f"RESULT kappa_finetuned={k['fine-tuned Gemma 3 270M + LoRA (cut-points)']:.3f} "
          f"kappa_zeroshot={k['zero-shot Gemma 3 270M (cut-points)']:.3f} "
          f"kappa_crossencoder={k['MiniLM cross-encoder (cut-points)']:.3f} "
          f"kappa_stacked={k[stacked_row]:.3f} kappa_cosine={k[cosine_row]:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
