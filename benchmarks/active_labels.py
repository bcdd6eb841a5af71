"""Do human labels chosen by the judge's uncertainty beat random ones? Active labelling on TREC DL 2019.

Protocol. Data: TREC DL 2019 (../shared/data/trec-dl-2019, prepared as benchmarks/judge_quality.py does), 43
judged queries, 9,260 graded pairs, split into k=5 query folds (whole queries, models.judge_ensemble.query_folds).
Each fold in turn is the held-out test queries; the other folds' pairs are the pool whose human labels stay hidden
until "bought". Who learns from which queries:
- the LLM: zero-shot Gemma 3 270M (umbrela-v1 prompt, max_doc_tokens 160): no weights trained on any DL19 query.
  Its grade probabilities for all pairs are computed once and cached under --work;
- the stack (models.judge_ensemble.GradeCombiner.fit on a fixed signal set: log p_LLM(g) per grade,
  E_LLM[grade], MiniLM cosine, query-word overlap, passage length; a multinomial logistic regression, C=1, and
  cut-points on its expected grade tuned for kappa): fit on the bought human labels of pool queries only, re-fit
  every round. --select uses fit_stacked instead (``judge calibrate``'s greedy signal selection by query-fold CV
  kappa): about a minute per fit on this shared 2-core machine, 255 fits in a full run, so off by default;
- the ranker (LightGBM LambdaMART, models.ranker, 150 trees, no early stopping, features models.features.FEATURES:
  BM25 over DL19's judged passages, MiniLM cosine, lengths, overlaps): trained on every pool pair, its label the
  human grade where bought, else the stack's label;
- the score: the held-out fold's pairs and human qrels only.
Rounds: 100 human labels drawn at random from the pool (seeded; every strategy starts from the same 100 and the
same first stack), then 100 more per round chosen by each strategy (eval.active / eval.routing.select_for_review:
uncertain = lowest models.judge.label_confidence of the stack's probabilities; random; stratified by the stack's
grade; mixed = 50 uncertain + 50 random, an extra row), re-fit, until 500. Repeated over --seeds.
Measured per strategy and labels spent: Cohen's kappa of the stack's labels on the held-out pairs (every query is
held out once; seeds pooled; 95% CI by query bootstrap) and the ranker's nDCG@10 on the held-out queries (per query,
mean over seeds; 95% CI by query bootstrap); at 500 labels the paired difference uncertain - random (paired query
bootstrap). Reference rows: the stack fit on every pool label, the ranker on every pool human label.
Plot: kappa and nDCG@10 vs human labels spent (active_labels.png under --work). Last line:
``RESULT kappa_uncertain_500=.. kappa_random_500=.. ndcg10_uncertain_500=.. ndcg10_random_500=..``

--quick: 1,500 pairs (all 43 queries), 1 seed, rounds to 300, 200 bootstrap resamples: a few minutes once the LLM
scores are cached (it reads them from the full run's cache when present, else scores its 1,500 pairs).
--pool-fraction 0.3: 30% of each query's pairs drawn within grades (2,786 pairs; benchmarks/augmentation.py's
sample), for when grading all 9,260 does not fit the time at hand. --judge-probs DIR: a judgments table's grade
probabilities stand in for the zero-shot LLM's, e.g. runs/bench/augment/judgments-pool30-* from the judge that
benchmarks/augmentation.py fine-tunes and stacks on LLMJudge dev only (it never saw a DL19 query).

    python benchmarks/active_labels.py [--quick] [--seeds 0 1 2] [--pool-fraction F] [--judge-probs DIR]
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DATA = Path(os.environ.get("AUGREL_DATA_DIR", REPO.parent / "shared" / "data"))
GRADES = [0, 1, 2, 3]
MAX_DOC_TOKENS = 160
TEMPLATE = "umbrela-v1"


def prepared(work: Path) -> Path:
    """DL19's judged pairs as benchmarks/judge_quality.py prepares them (one table, no split)."""
    from pipelines.data import PrepareConfig, prepare

    dl19 = work / "dl19"
    if not (dl19 / "data" / "pairs").exists():
        prepare(PrepareConfig(format="trec-dl", src=str(DATA / "trec-dl-2019"), out=str(dl19 / "data")))
    return dl19 / "data" / "pairs"


def llm_scores(work: Path, judge: str, qids, docids, queries, texts, chunk: int = 512):
    """The LLM's Scores on every pair, computed once and cached under ``work/scores`` by judge, template and
    pairs; scored in chunks that are saved as they finish, so an interrupted run resumes where it stopped."""
    from models.judge import Scores
    from models.judge_card import load_judge

    key = cache_key(judge, qids, docids)
    cache = work / "scores" / f"{key}.pkl"
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    parts_dir = work / "scores" / f"{key}.parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    scorer = None
    parts = []
    t0 = time.perf_counter()
    for start in range(0, len(queries), chunk):
        part = parts_dir / f"{start:07d}.pkl"
        if not part.exists():
            if scorer is None:
                scorer = load_judge(judge, template=TEMPLATE, max_doc_tokens=MAX_DOC_TOKENS).llm_scorer(16)
            s = scorer.score(list(queries[start : start + chunk]), list(texts[start : start + chunk]))
            part.write_bytes(pickle.dumps(s))
            print(f"  scored {min(start + chunk, len(queries))}/{len(queries)} pairs with {judge} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip
        parts.append(pickle.loads(part.read_bytes()))
    out = Scores(
        label=np.concatenate([p.label for p in parts]),
        probs=np.concatenate([p.probs for p in parts]),
        score=np.concatenate([p.score for p in parts]),
        truncated=np.concatenate([p.truncated for p in parts]),
        n_tokens=np.concatenate([p.n_tokens for p in parts]),
    )
    cache.write_bytes(pickle.dumps(out))
    return out


def pool_sample(qids: np.ndarray, label: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Row indices of a ``fraction`` of each query's pairs drawn within each grade: benchmarks/augmentation.py's
    draw, so ``--pool-fraction 0.3`` picks the very pairs of its 30% run, whose judgments ``--judge-probs`` reads."""
    from benchmarks.augmentation import pool_rows

    return pool_rows(qids, label, fraction, seed)


def table_scores(path: str, qids, docids):
    """Scores read from a judgments table (``augrel annotate`` output) for the given pairs: another judge's
    grade probabilities, e.g. benchmarks/augmentation.py's judge fit on LLMJudge dev only (it never saw DL19)."""
    from models.judge import Scores
    from pipelines.io import read_table

    t = read_table(path)
    keys = zip(t.column("qid").to_pylist(), t.column("docid").to_pylist(), strict=True)
    at = {k: i for i, k in enumerate(keys)}
    missing = [(q, d) for q, d in zip(qids, docids, strict=True) if (q, d) not in at]
    if missing:
        raise SystemExit(f"--judge-probs {path}: {len(missing)} of the {len(qids)} pairs are not in it "
                         f"(first: {missing[0]}); pick the same pairs (--pool-fraction)")  # fmt: skip
    idx = np.array([at[q, d] for q, d in zip(qids, docids, strict=True)])
    probs = np.asarray(t.column("probs").to_pylist(), dtype=np.float32)[idx]
    score = t.column("score").to_numpy()[idx].astype(np.float32)
    label = t.column("label").to_numpy()[idx]
    return Scores(label=label, probs=probs, score=score, truncated=np.zeros(len(idx), bool),
                  n_tokens=np.zeros(len(idx), np.int32))  # fmt: skip


def load_pairs(work: Path):
    from pipelines.io import read_table

    t = read_table(prepared(work))
    return {
        "qid": np.asarray(t.column("qid").to_pylist(), dtype=object),
        "docid": np.asarray(t.column("docid").to_pylist(), dtype=object),
        "query": t.column("query").to_pylist(),
        "text": t.column("text").to_pylist(),
        "label": t.column("label").to_numpy().astype(int),
    }


def judge_scores(work: Path, judge: str, pairs: dict, rows: np.ndarray):
    """The LLM's Scores on ``rows`` of ``pairs``: read from the all-pairs cache when it exists (a --quick run
    after a full one scores nothing), else scored (and cached) for those rows only."""
    from models.judge import Scores

    def take(s, idx):
        return Scores(label=s.label[idx], probs=s.probs[idx], score=s.score[idx], truncated=s.truncated[idx],
                      n_tokens=s.n_tokens[idx])  # fmt: skip

    full_key = (judge, pairs["qid"], pairs["docid"], pairs["query"], pairs["text"])
    if len(rows) == len(pairs["qid"]) or cached(work, *full_key[:3]):
        s = llm_scores(work, *full_key)
        return take(s, rows) if len(rows) < len(pairs["qid"]) else s
    q = [pairs["query"][i] for i in rows]
    t = [pairs["text"][i] for i in rows]
    return llm_scores(work, judge, pairs["qid"][rows], pairs["docid"][rows], q, t)


def cache_key(judge: str, qids, docids) -> str:
    card = Path(judge) / "judge_card.json"
    blob = repr([judge, card.stat().st_mtime if card.exists() else None, TEMPLATE, MAX_DOC_TOKENS,
                 list(qids), list(docids)])  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached(work: Path, judge: str, qids, docids) -> bool:
    return (work / "scores" / f"{cache_key(judge, qids, docids)}.pkl").exists()


class _VectorEncoder:
    """The encoder interface of pair_signals / PairFeaturizer over MiniLM vectors computed once and cached on
    disk: the stack's dense_cos and the ranker's are the same numbers, and the texts are encoded once."""

    def __init__(self, work: Path, queries, texts):
        from models.encoder import BiEncoder

        uq, ut = list(dict.fromkeys(queries)), list(dict.fromkeys(texts))
        key = hashlib.sha256(repr([uq, ut]).encode()).hexdigest()[:16]
        path = work / "scores" / f"minilm-{key}.npz"
        if not path.exists():
            t0 = time.perf_counter()
            enc = BiEncoder(dtype="fp32")
            qv, tv = enc.encode_queries(uq), enc.encode_passages(ut)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, q=qv, t=tv)
            print(f"  MiniLM: {len(uq)} queries, {len(ut)} passages encoded ({time.perf_counter() - t0:.0f}s)",
                  flush=True)  # fmt: skip
        z = np.load(path)
        self.q = dict(zip(uq, z["q"], strict=True))
        self.t = dict(zip(ut, z["t"], strict=True))

    def encode_queries(self, texts):
        return np.stack([self.q[t] for t in texts])

    def encode_passages(self, texts):
        return np.stack([self.t[t] for t in texts])


def ranker_features(work: Path, pairs: dict, rows: np.ndarray, encoder: _VectorEncoder) -> np.ndarray:
    """models.features.FEATURES of ``rows`` (n, F): BM25 over DL19's judged passages (retrieval.bm25, as
    ``rank features`` builds it from the pairs when no corpus is given), MiniLM cosine, lengths, overlaps."""
    from models.features import FEATURES, PairFeaturizer, check_finite
    from retrieval.bm25 import BM25Index

    docs = dict(zip(pairs["docid"], pairs["text"], strict=True))
    index = BM25Index.build(list(docs), list(docs.values()))
    q = [pairs["query"][i] for i in rows]
    t = [pairs["text"][i] for i in rows]
    feats = PairFeaturizer(index, encoder)(q, t, docids=list(pairs["docid"][rows]))
    x = np.column_stack([feats[f] for f in FEATURES]).astype(np.float32)
    check_finite(x, FEATURES)
    return x


def ndcg10_per_query(qids, docids, scores, human) -> dict[str, float]:
    from eval.ranking import evaluate_run, qrels_from_labels, run_from_scores

    run = run_from_scores(list(qids), list(docids), scores)
    qrels = qrels_from_labels(list(qids), list(docids), list(human))
    return evaluate_run(run, qrels, measures=["nDCG@10"]).per_query["nDCG@10"]


def plot(curves: dict, refs: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, name in ((axes[0], "kappa", "held-out Cohen's kappa (stack)"),
                             (axes[1], "ndcg10", "held-out nDCG@10 (ranker)")):  # fmt: skip
        for strategy, pts in curves.items():
            n = sorted(pts)
            v = [pts[k][metric] for k in n]
            lo = [pts[k][metric + "_ci"][0] for k in n]
            hi = [pts[k][metric + "_ci"][1] for k in n]
            (line,) = ax.plot(n, v, marker="o", label=strategy)
            ax.fill_between(n, lo, hi, color=line.get_color(), alpha=0.12)
        if metric in refs:
            ax.axhline(refs[metric], color="grey", ls="--", lw=1, label=refs[metric + "_name"])
        ax.set_xlabel("human labels spent")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    import argparse

    from eval.active import (
        STRATEGIES,
        first_labels,
        kappa_ci,
        learning_curve,
        paired_kappa_difference,
        ranker_labels,
    )
    from eval.ranking import bootstrap_ci, paired_compare
    from models.features import FEATURES
    from models.judge import label_confidence
    from models.judge_ensemble import LLM_ONLY, SIGNALS, GradeCombiner, fit_stacked, pair_signals, query_folds
    from models.loading import cpu_description
    from models.ranker import LambdaMARTRanker, RankerParams
    from pipelines.calibrate_judge import StackSettings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,500 pairs, one seed, rounds to 300")
    ap.add_argument(
        "--work", default=str(Path(os.environ.get("AUGREL_BENCH_CACHE", "/tmp/augrel-bench")) / "active")
    )
    ap.add_argument(
        "--judge", default="gemma3-270m", help="the LLM behind the stack (must not have seen DL19)"
    )
    ap.add_argument("--seeds", type=int, nargs="+", help="(default 0 1 2; --quick: 0)")
    ap.add_argument(
        "--pairs", type=int, help="use this many pairs drawn at random (default all; --quick 1500)"
    )
    ap.add_argument(
        "--pool-fraction", type=float, help="use this fraction of each query's pairs, within grades"
    )
    ap.add_argument(
        "--judge-probs", help="a judgments table whose probs stand in for the LLM's (--judge unused)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch and LightGBM threads")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--start", type=int, default=100)
    ap.add_argument("--step", type=int, default=100)
    ap.add_argument("--until", type=int, help="labels at the last round (default 500; --quick 300)")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--trees", type=int, default=150, help="LambdaMART trees")
    ap.add_argument("--bootstrap", type=int, help="bootstrap resamples (default 1000; --quick 200)")
    ap.add_argument("--select", action="store_true", help="fit_stacked's greedy signal selection (slow)")
    ap.add_argument("--signals", nargs="+", default=list(SIGNALS), choices=SIGNALS,
                    help="the stack's signals (without llm_logp and llm_score no LLM is run)")  # fmt: skip
    args = ap.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    until = args.until or (300 if args.quick else 500)
    n_boot = args.bootstrap or (200 if args.quick else 1000)
    if "uncertain" not in args.strategies or "random" not in args.strategies:
        ap.error("--strategies must include uncertain and random (the RESULT line compares them)")
    work = Path(args.work)
    t_start = time.perf_counter()

    pairs = load_pairs(work)
    n_all = len(pairs["qid"])
    n_use = args.pairs or (1500 if args.quick else n_all)
    if args.pool_fraction:
        rows = pool_sample(pairs["qid"], pairs["label"], args.pool_fraction)
    elif n_use < n_all:
        rows = np.sort(np.random.default_rng(0).permutation(n_all)[:n_use])
    else:
        rows = np.arange(n_all)
    qid, docid = pairs["qid"][rows], pairs["docid"][rows]
    query = [pairs["query"][i] for i in rows]
    text = [pairs["text"][i] for i in rows]
    human = pairs["label"][rows]
    n = len(rows)

    t0 = time.perf_counter()
    llm_name = (
        f"{args.judge} zero-shot (umbrela-v1, max_doc_tokens {MAX_DOC_TOKENS}), trained on no DL19 query"
    )
    if not set(args.signals) & set(LLM_ONLY):
        llm, llm_name = None, "none (the stack uses no LLM signal)"
    elif args.judge_probs:
        llm_name = (f"the grade probabilities in {args.judge_probs} (a judgments table; its judge must not have "
                    "trained or been calibrated on a DL19 query)")  # fmt: skip
        llm = table_scores(args.judge_probs, list(qid), list(docid))
    else:
        import torch

        torch.set_num_threads(args.threads)
        llm = judge_scores(work, args.judge, pairs, rows)
    llm_s = time.perf_counter() - t0
    encoder = _VectorEncoder(work, query, text)
    stack = StackSettings(select=args.select, signals=args.signals)
    signals = pair_signals(llm, query, text, GRADES, encoder, stack.signals)
    x = ranker_features(work, pairs, rows, encoder)
    fold = query_folds(list(qid), args.folds)
    prep_s = time.perf_counter() - t_start
    print(
        f"prepared {n} pairs of {len(set(qid))} queries in {prep_s:.0f}s (LLM scores {llm_s:.0f}s)",
        flush=True,
    )

    def fit_stack(on: np.ndarray):
        part = {k: v[on] for k, v in signals.items()}
        if args.select:
            comb, _ = fit_stacked(part, human[on], list(qid[on]), GRADES, stack.signals, **stack.selection())
        else:
            comb = GradeCombiner.fit(part, human[on], GRADES, use=stack.signals, c=stack.c)
        label, probs, _ = comb.grade(signals)
        return label.astype(int), label_confidence(probs, label, GRADES), comb.signals

    def rank(
        train_rows: np.ndarray, labels: np.ndarray, test_rows: np.ndarray, seed: int
    ) -> dict[str, float]:
        # one thread by default: on a shared, loaded machine OpenMP's spinning workers stall each other
        params = RankerParams(n_estimators=args.trees, seed=seed, extra={"num_threads": args.threads})
        r = LambdaMARTRanker(FEATURES, params).fit(x[train_rows], labels[train_rows], list(qid[train_rows]))
        return ndcg10_per_query(qid[test_rows], docid[test_rows], r.predict(x[test_rows]), human[test_rows])

    # strategy -> labels -> seed -> held-out stack labels (every row filled once over the folds)
    held: dict = {s: {} for s in args.strategies}
    ndcg: dict = {s: {} for s in args.strategies}  # strategy -> labels -> seed -> qid -> nDCG@10
    chosen: dict = {s: {} for s in args.strategies}  # strategy -> labels -> list of signal sets
    ref_label = np.zeros(n, int)
    ref_ndcg: dict = {}
    for f in range(args.folds):
        pool, test = fold != f, np.flatnonzero(fold == f)
        train_rows = np.flatnonzero(pool)
        t0 = time.perf_counter()
        ref_label[test] = fit_stack(train_rows)[0][test]
        ref_ndcg.update(rank(train_rows, human, test, seeds[0]))
        for seed in seeds:
            first = first_labels(pool, args.start, seed * 100 + f)
            first_fit = fit_stack(first)
            for strategy in args.strategies:
                for rd in learning_curve(pool, fit_stack, strategy, args.start, args.step, until, seed * 100 + f,
                                         first=first, first_fit=first_fit):  # fmt: skip
                    k = len(rd.bought)
                    held[strategy].setdefault(k, {}).setdefault(seed, np.zeros(n, int))[test] = rd.label[test]
                    labels = ranker_labels(human, rd.label, rd.bought)
                    ndcg[strategy].setdefault(k, {}).setdefault(seed, {}).update(
                        rank(train_rows, labels, test, seed)
                    )
                    chosen[strategy].setdefault(k, []).append("+".join(rd.extra))
        print(f"  fold {f + 1}/{args.folds}: {len(set(qid[test]))} held-out queries, {len(test)} pairs "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip

    qs = np.tile(qid, len(seeds))
    h = np.tile(human, len(seeds))
    curves: dict = {}
    for strategy in args.strategies:
        curves[strategy] = {}
        for k in sorted(held[strategy]):
            lab = np.concatenate([held[strategy][k][s] for s in seeds])
            kap, kci = kappa_ci(h, lab, qs, GRADES, n_boot)
            per_q = {
                q: float(np.mean([ndcg[strategy][k][s][q] for s in seeds]))
                for q in ndcg[strategy][k][seeds[0]]
            }
            curves[strategy][k] = {"kappa": kap, "kappa_ci": kci, "ndcg10": float(np.mean(list(per_q.values()))),
                                   "ndcg10_ci": bootstrap_ci(per_q.values(), n_boot), "per_q": per_q}  # fmt: skip
    ref_kappa, ref_kci = kappa_ci(human, ref_label, qid, GRADES, n_boot)
    ref_nd = float(np.mean(list(ref_ndcg.values())))

    print(
        f"\nactive labelling on TREC DL 2019: {n} pairs, {len(set(qid))} queries, {args.folds} query folds (each "
        f"held out once; its pairs score, the other folds' are the pool), seeds {seeds}; {cpu_description()}"
    )
    print(
        f"LLM signals: {llm_name}. "
        f"Stack: {'fit_stacked (greedy selection over ' if stack.select else 'GradeCombiner.fit (fixed: '}"
        f"{', '.join(stack.signals)}) on the bought pool labels only. Ranker: LambdaMART {args.trees} trees on "
        f"{', '.join(FEATURES)}, trained on the pool queries (human grade where bought, else the stack's label), "
        f"scored on the held-out queries' human qrels. CIs: 95%, {n_boot} query-bootstrap resamples."
    )
    print(
        f"first {args.start} labels at random (shared by every strategy), then {args.step} per round by strategy"
    )
    print(f"{'strategy':<11} {'labels':>6} {'kappa':>6} {'95% CI':>15} {'nDCG@10':>8} {'95% CI':>15}  stack signals "
          "(most frequent over folds x seeds)")  # fmt: skip
    for strategy in args.strategies:
        for k, p in sorted(curves[strategy].items()):
            sig = max(set(chosen[strategy][k]), key=chosen[strategy][k].count)
            print(f"{strategy:<11} {k:>6} {p['kappa']:>6.3f} [{p['kappa_ci'][0]:>5.3f}, {p['kappa_ci'][1]:>5.3f}] "
                  f"{p['ndcg10']:>8.4f} [{p['ndcg10_ci'][0]:.4f}, {p['ndcg10_ci'][1]:.4f}]  {sig}")  # fmt: skip
    n_pool = int(np.mean([np.sum(fold != f) for f in range(args.folds)]))
    print(f"{'reference: every pool label (~' + str(n_pool) + ')':<34} {ref_kappa:.3f} [{ref_kci[0]:.3f}, "
          f"{ref_kci[1]:.3f}] {ref_nd:.4f} (stack fit on, and ranker trained on, every pool human label; seed "
          f"{seeds[0]})")  # fmt: skip
    last = max(curves["uncertain"])
    lab_u = np.concatenate([held["uncertain"][last][s] for s in seeds])
    lab_r = np.concatenate([held["random"][last][s] for s in seeds])
    dk, dkci = paired_kappa_difference(h, lab_u, lab_r, qs, GRADES, n_boot)
    dn = paired_compare(
        curves["random"][last]["per_q"], curves["uncertain"][last]["per_q"], "nDCG@10", n_boot
    )
    for other in [s for s in args.strategies if s not in ("uncertain", "random")]:
        lab_o = np.concatenate([held[other][last][s] for s in seeds])
        do, doci = paired_kappa_difference(h, lab_o, lab_r, qs, GRADES, n_boot)
        dno = paired_compare(curves["random"][last]["per_q"], curves[other][last]["per_q"], "nDCG@10", n_boot)
        print(
            f"{other} - random at {last} labels: kappa {do:+.3f} [{doci[0]:+.3f}, {doci[1]:+.3f}], "
            f"nDCG@10 {dno.diff:+.4f} [{dno.ci95[0]:+.4f}, {dno.ci95[1]:+.4f}] (paired query bootstrap)"
        )
    print(f"uncertain - random at {last} labels: kappa {dk:+.3f} [{dkci[0]:+.3f}, {dkci[1]:+.3f}], nDCG@10 "
          f"{dn.diff:+.4f} [{dn.ci95[0]:+.4f}, {dn.ci95[1]:+.4f}] (paired query bootstrap; p={dn.p_ttest:.3f} "
          "paired t-test)")  # fmt: skip
    png = plot(
        {s: {k: v for k, v in c.items()} for s, c in curves.items()},
        {
            "kappa": ref_kappa,
            "kappa_name": "every pool label",
            "ndcg10": ref_nd,
            "ndcg10_name": "every pool label",
        },
        work / f"active_labels{'-quick' if args.quick else ''}"
        f"{'-' + Path(args.judge_probs).name if args.judge_probs else ''}"
        f"{'' if llm is not None else '-nollm'}.png",
        f"TREC DL 2019, {len(set(qid))} queries, {args.folds} query folds, seeds {seeds}; stack: "
        f"{'+'.join(args.signals)}; LLM: "
        + (
            Path(args.judge_probs).name
            if args.judge_probs
            else f"{args.judge} zero-shot"
            if llm is not None
            else "none"
        ),
    )
    print(f"plot: {png}; total {time.perf_counter() - t_start:.0f}s")
    cu, cr = curves["uncertain"][last], curves["random"][last]
    print(
        f"RESULT kappa_uncertain_{last}={cu['kappa']:.3f} kappa_random_{last}={cr['kappa']:.3f} "
        f"ndcg10_uncertain_{last}={cu['ndcg10']:.4f} ndcg10_random_{last}={cr['ndcg10']:.4f}"
    )


if __name__ == "__main__":
    main()
