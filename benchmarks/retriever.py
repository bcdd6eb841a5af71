"""Dense retrievers fine-tuned on human and judge labels (paper 2's retrieval experiment at our scale): TREC DL
2019, 2 query-level folds (default), full-corpus dense retrieval, each test fold's queries never trained or
validated on.

Rows: BM25; MiniLM off the shelf (the packaged all-MiniLM-L6-v2); MiniLM fine-tuned by ``augrel retriever train``
(Ray Train, 2 workers, cross-worker negatives) with InfoNCE, Rand1LH, JointLH and SumMargLH on the human labels
(grade >= 2 positives); SumMargLH on judge labels; the curriculum (judge labels, then one epoch on the human labels
of 20% of the training queries, learning rate reset).

Who learns from which queries: per fold, the test queries are passed to the trainer as ``exclude_queries``; 4
validation queries are drawn from the training folds (evaluated once, at the end of training: see ``settings``). The judge is benchmarks/augmentation.py's
(configs/judge-llmjudge.yaml: fine-tuned, calibrated and stacked on LLMJudge dev, TREC DL 2023 queries), so it never
saw a DL19 query; its labels are its grades of DL19 judged pairs (full: augmentation.py's ``--pool-fraction 0.3``
sample, 30% of each query's assessed pool drawn within grades; --quick: its 8 pairs per query), both reused from
augmentation.py's cache when there.

Scores: nDCG@10, MRR@10 and recall@100 (grade >= 2 relevant) of the test-fold queries pooled over folds (43), each
with a query-bootstrap 95% interval; retrieval is exact (FAISS flat, inner product) over the whole corpus
encoded by the fold's encoder (vectors cached per encoder). A paired difference with its interval for the
SumMargLH-human encoder against the base. Out of domain, fold 0's encoders with no further training on HotpotQA
(../shared/data/hotpotqa-dev-500: every distinct paragraph a passage, supporting paragraphs the positives):
recall@2, @5, @10, for BM25, the base and the InfoNCE / SumMargLH encoders (Rand1LH and JointLH only in domain:
each encoder costs a 4,900-paragraph encoding). Training speed: groups/s over the whole run from the card's history.

The judge stack: models.judge_ensemble's combiner fit (``fit_stacked``) on the training folds' DL19 qrels pairs and
grading the test fold's pairs, kappa vs the human grades pooled over folds, with the base encoder's or the fold's
SumMargLH-human encoder's cosine. Its signals are dense_cos + overlap + doc_len, fixed (no selection): the LLM
signal is dropped (scoring 9,260 pairs with the 270M LLM costs a quarter of an hour on this CPU) and the stack's
selection would be free to drop the cosine the comparison is about.

--quick: a corpus of each query's judged passages (at most 20 of grade >= 2, 10 of grade 1, 10 of grade 0) + its
BM25 top 50 + 1,000 random passages (qrels restricted to it), one epoch (curriculum 1 + 1), 100 HotpotQA
questions; still 12 Ray Train runs (about 2 minutes each here, most of it start-up). Outputs under $AUGREL_BENCH_DIR/retriever (default
/tmp/augrel-bench); judge and judgments under augmentation.py's directory ($AUGREL_BENCH_DIR/augment).

Last line: ``RESULT ndcg10_base=.. ndcg10_infonce_human=.. ndcg10_summarglh_human=.. ndcg10_summarglh_judge=..
ndcg10_curriculum=.. hotpot_recall5_base=.. hotpot_recall5_summarglh=.. kappa_stack_base=.. kappa_stack_ft=..``

    python benchmarks/retriever.py [--quick] [--judgments DIR] [--folds K]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import augmentation as aug  # noqa: E402

WORK = Path(os.environ.get("AUGREL_BENCH_DIR", "/tmp/augrel-bench")) / "retriever"
GRADES = (0, 1, 2, 3)
STACK_SIGNALS = ["dense_cos", "overlap", "doc_len"]

# key, label in the tables, loss, label source
FINETUNED = [
    ("infonce_human", "InfoNCE, human", "infonce", "human"),
    ("rand1lh_human", "Rand1LH, human", "rand1lh", "human"),
    ("jointlh_human", "JointLH, human", "jointlh", "human"),
    ("summarglh_human", "SumMargLH, human", "summarglh", "human"),
    ("summarglh_judge", "SumMargLH, judge", "summarglh", "judge"),
    ("curriculum", "SumMargLH, curriculum (judge, then 20% human)", "summarglh", "curriculum"),
]


def settings(quick: bool) -> dict:
    """Training settings, chosen for what 2 shared cores do in the time (MiniLM encodes ~45 passages/s here in
    bf16; a 2-worker Ray Train step of 4 queries x 8 passages takes ~10-25 s): groups of 8, 4 queries a step so
    the ~17 training queries of a fold give 4 steps an epoch (8 would give 2), lr 5e-5, 2 epochs (quick: 1),
    128 passage tokens (DL19 passages are ~80 tokens; a batch pads to its longest), validation once at the end
    (an evaluation of the 4 validation queries' pools costs about two training steps)."""
    return {
        "max_query_length": 32,
        "max_passage_length": 128,
        "group_size": 8,
        "max_positives": 4,
        "negative_depth": 30,
        "batch_size": 4,
        "epochs": 1 if quick else 2,
        "lr": 5e-5,
        "warmup_ratio": 0.1,
        "eval_every": 10_000,
        "val_depth": 30,
        "val_distractors": 100,
        "num_workers": 2,
        "cpus_per_worker": 1,
        "seed": 13,
    }


# ----------------------------------------------------------------------------------------------- data


def load_dl19() -> tuple[Path, dict[str, str], dict[str, dict[str, int]]]:
    """augmentation.py's prepared DL19 (prepared there if missing): its directory, queries, qrels."""
    from pipelines.data import PrepareConfig, prepare
    from pipelines.io import read_table

    data = aug.WORK / "dl19"
    if not (data / "pairs").exists():
        prepare(PrepareConfig(format="trec-dl", src=str(aug.DATA / "trec-dl-2019"), out=str(data)))
    q = read_table(data / "queries")
    queries = dict(zip(q.column("qid").to_pylist(), q.column("query").to_pylist(), strict=True))
    t = read_table(data / "qrels")
    qrels: dict[str, dict[str, int]] = {}
    for qid, d, g in zip(t.column("qid").to_pylist(), t.column("docid").to_pylist(), t.column("label").to_pylist(),
                         strict=True):  # fmt: skip
        qrels.setdefault(qid, {})[d] = int(g)
    return data, queries, qrels


def quick_corpus(docs: pa.Table, queries, qrels, out: Path, seed: int = 0) -> Path:
    """Each judged query's judged passages (at most 20 / 10 / 10 of grade >= 2 / 1 / 0) + its BM25 top 50 +
    1,000 random passages."""
    from pipelines.io import write_table
    from retrieval.bm25 import BM25Index

    if (out / "docs").exists():
        return out / "docs"
    rng = np.random.default_rng(seed)
    ids = docs.column("docid").to_pylist()
    bm25 = BM25Index.build(ids, docs.column("text").to_pylist())
    qids = sorted(qrels)
    keep: set[str] = set()
    for q, hits in zip(qids, bm25.search([queries[q] for q in qids], k=50), strict=True):
        keep.update(d for d, _ in hits)
        for lo, hi, n in ((2, 9, 20), (1, 1, 10), (0, 0, 10)):
            of = sorted(d for d, g in qrels[q].items() if lo <= g <= hi)
            keep.update(rng.permutation(of)[:n].tolist() if of else [])
    keep.update(rng.choice(ids, size=1000, replace=False).tolist())
    rows = [i for i, d in enumerate(ids) if d in keep]
    write_table(out / "docs", docs.take(pa.array(rows)))
    return out / "docs"


def folds_of(qids: list[str], k: int, seed: int = 0) -> list[list[str]]:
    perm = np.random.default_rng(seed).permutation(sorted(qids))
    return [sorted(perm[i::k].tolist()) for i in range(k)]


def judgments_table(a, quick: bool) -> str:
    """The judge's grades of DL19 pairs: --judgments, else augmentation.py's judge and annotation (reused)."""
    from pipelines.data import PrepareConfig, prepare

    if a.judgments:
        return a.judgments
    data, llmj = aug.WORK / "dl19", aug.WORK / "llmjudge"
    if not (llmj / "pairs").exists():
        prepare(
            PrepareConfig(format="pairs", src=str(aug.DATA / "llmjudge-dev" / "pairs.jsonl"), out=str(llmj))
        )
    if quick:
        tag = "quick8"
        pairs = aug.subsample(data / "pairs", aug.WORK / f"pairs-{tag}", 8)
    else:
        tag = f"pool{round(100 * a.judge_pool_fraction)}"
        pairs = aug.pool_sample(data / "pairs", aug.WORK / f"pairs-{tag}", a.judge_pool_fraction)
    judge = aug.finetuned_judge(llmj / "pairs", quick)
    return aug.annotated(judge, pairs, tag)


# ------------------------------------------------------------------------------------------- training


def trained(cfg) -> Path:
    """``augrel retriever train`` with ``cfg``; a finished run of the same config is reused."""
    from pipelines.stage import read_manifest
    from pipelines.train_retriever import train

    out = Path(cfg.out)
    done = read_manifest(out)
    if (
        done
        and done.get("stage") == "retriever.train"
        and yaml.safe_load((out / "config.yaml").read_text()) == cfg.model_dump(mode="json")
    ):
        print(f"reusing {out}", flush=True)
    else:
        train(cfg)
    return out


def fold_configs(s: dict, fold_dir: Path, index: Path, data: Path, judgments: str) -> dict:
    from pipelines.train_retriever import RetrieverTrainConfig

    common = {**s, "index": str(index), "queries": [str(data / "queries")],
              "exclude_queries": [str(fold_dir / "test_queries.parquet")],
              "val": [str(fold_dir / "val_qrels.parquet")]}  # fmt: skip
    human = str(data / "qrels")
    labels = {
        "human": {"source": "human", "human": [human]},
        "judge": {"source": "judge", "llm": [judgments]},
        "curriculum": {"source": "curriculum", "human": [human], "llm": [judgments], "human_fraction": 0.2},
    }
    out = {}
    for key, _, loss, source in FINETUNED:
        extra = {}
        if source == "curriculum":
            # 20% of ~17 training queries is 3: fewer than a batch of 4, which the trainer refuses
            extra["batch_size"] = 2
        out[key] = RetrieverTrainConfig.model_validate(
            {**common, **extra, "loss": loss, "labels": labels[source], "out": str(fold_dir / key)}
        )
    return out


# ------------------------------------------------------------------------------------- dense retrieval


def encoder_key(path: str | None, max_len: int, corpus_tag: str) -> str:
    h = hashlib.sha256(f"{corpus_tag}|{max_len}|auto".encode())
    if path is None:
        h.update(b"base")
    else:
        for f in sorted(Path(path).rglob("*.safetensors")):
            h.update(f.read_bytes())
        h.update((Path(path) / "retriever_card.json").read_bytes())
    return h.hexdigest()[:16]


def passage_vectors(encoder, path: str | None, texts: list[str], corpus_tag: str, max_len: int) -> np.ndarray:
    """The corpus encoded by ``encoder``, cached by its weights and the corpus."""
    cache = WORK / "vectors" / f"{encoder_key(path, max_len, corpus_tag)}.npy"
    if cache.exists():
        return np.load(cache)
    t0 = time.perf_counter()
    vecs = encoder.encode_passages(texts)
    print(
        f"  encoded {len(texts):,} passages in {time.perf_counter() - t0:.0f}s ({path or 'base'})", flush=True
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vecs)
    return vecs


def dense_run(vecs: np.ndarray, docids: list[str], qvecs: np.ndarray, qids: list[str], k: int = 100) -> dict:
    import faiss

    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(np.ascontiguousarray(vecs, dtype=np.float32))
    scores, rows = index.search(np.ascontiguousarray(qvecs, dtype=np.float32), k)
    return {q: {docids[r]: float(s) for r, s in zip(rr, ss, strict=True) if r >= 0}
            for q, rr, ss in zip(qids, rows, scores, strict=True)}  # fmt: skip


def per_query(run, qrels, measures=None, min_rel: int = 2) -> dict[str, dict[str, float]]:
    """short measure name -> qid -> value."""
    from eval.ranking import evaluate_run, short_name

    rep = evaluate_run(run, qrels, measures, min_rel=min_rel)
    return {short_name(m): v for m, v in rep.per_query.items()}


def encoder_for(path: str | None, s: dict):
    from models.encoder import BiEncoder

    # bf16 where the CPU computes it natively (AMX here): the corpus is encoded once per encoder, 19 times in all
    return BiEncoder(path, max_query_length=s["max_query_length"], max_passage_length=s["max_passage_length"],
                     batch_size=64, dtype="auto")  # fmt: skip


# ------------------------------------------------------------------------------------------- hotpotqa


def hotpot(quick: bool) -> tuple[list[str], list[str], list[str], list[str], dict[str, dict[str, int]]]:
    """Distinct paragraphs (title. text) as the corpus, questions, supporting paragraphs as qrels."""
    rows = [json.loads(line) for line in (aug.DATA / "hotpotqa-dev-500" / "questions.jsonl").open()]
    rows = rows[:100] if quick else rows
    ids: dict[tuple[str, str], str] = {}
    qids, questions, qrels = [], [], {}
    for r in rows:
        qid = str(r["question_id"])
        qids.append(qid)
        questions.append(r["question_text"])
        for c in r["contexts"]:
            d = ids.setdefault((c["title"], c["paragraph_text"]), f"p{len(ids)}")
            if c["is_supporting"]:
                qrels.setdefault(qid, {})[d] = 1
    docids = list(ids.values())
    texts = [f"{t}. {p}" for t, p in ids]
    return docids, texts, qids, questions, qrels


HOTPOT_MEASURES = ["R@2", "R@5", "R@10"]
# each a 5,000-paragraph encoding (~2 min here): the loss ablation's Rand1LH and JointLH are left out
HOTPOT_ROWS = ["base", "infonce_human", "summarglh_human", "summarglh_judge", "curriculum"]


# ---------------------------------------------------------------------------------------- judge stack


def stack_signals(qv: dict[str, np.ndarray], doc_vec, doc_row, queries, pairs) -> dict[str, np.ndarray]:
    from models.judge_ensemble import pair_signals

    qs = [queries[q] for q, _, _ in pairs]
    texts = [t for _, _, t in pairs]
    sig = pair_signals(None, qs, texts, GRADES, None, ["overlap", "doc_len"])
    sig["dense_cos"] = np.einsum(
        "ij,ij->i", np.stack([qv[q] for q, _, _ in pairs]), doc_vec[[doc_row[d] for _, d, _ in pairs]]
    ).astype(np.float64)
    return sig


# ------------------------------------------------------------------------------------------------ main


def fmt_ci(v: list[float]) -> str:
    from eval.ranking import bootstrap_ci

    lo, hi = bootstrap_ci(v)
    return f"{np.mean(v):.4f} [{lo:.3f}, {hi:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 folds, a corpus subset, short fine-tunes")
    ap.add_argument("--folds", type=int, help="query folds (default 2)")
    ap.add_argument("--judgments", help="a judgments table of DL19 pairs from a judge that saw no DL19 query")
    ap.add_argument("--judge-pool-fraction", type=float, default=0.3,
                    help="full run: the share of each DL19 query's pool the judge grades (augmentation.py's)")  # fmt: skip
    a = ap.parse_args()

    import pyarrow.parquet as pq

    from cluster.embedded import init_ray
    from eval.agreement import agreement
    from eval.ranking import paired_compare
    from models.encoder import RetrieverCard
    from models.judge_ensemble import fit_stacked
    from models.loading import cpu_description
    from pipelines.index import IndexConfig, build
    from pipelines.io import read_table
    from retrieval.bm25 import BM25Index

    t_start = time.perf_counter()
    init_ray()
    quick = a.quick
    k = a.folds or 2
    s = settings(quick)
    tag = "quick" if quick else "full"
    root = WORK / tag
    data, queries, qrels_all = load_dl19()
    docs_all = read_table(data / "docs")
    docs_path = quick_corpus(docs_all, queries, qrels_all, root) if quick else data / "docs"
    docs = read_table(docs_path)
    docids, texts = docs.column("docid").to_pylist(), docs.column("text").to_pylist()
    doc_row = {d: i for i, d in enumerate(docids)}
    text_of = dict(zip(docids, texts, strict=True))
    qrels = {q: {d: g for d, g in g_.items() if d in doc_row} for q, g_ in qrels_all.items()}
    judged = sorted(q for q, g in qrels.items() if max(g.values(), default=0) >= 2)
    index = root / "index"
    if not (index / "manifest.json").exists():
        build(IndexConfig(docs=str(docs_path), out=str(index), dense=False))
    judgments = judgments_table(a, quick)
    folds = folds_of(judged, k)
    print(f"retriever benchmark ({tag}): {cpu_description()}; DL19 {len(judged)} judged queries in {k} query folds, "
          f"corpus {len(docids):,} passages; judgments {judgments}", flush=True)  # fmt: skip
    print("training: " + ", ".join(f"{x}={v}" for x, v in s.items()), flush=True)

    # ---- folds: test queries excluded, validation queries from the training folds
    fold_cfgs = []
    for f, test in enumerate(folds):
        fd = root / f"fold{f}"
        fd.mkdir(parents=True, exist_ok=True)
        rest = sorted(set(judged) - set(test))
        val = sorted(np.random.default_rng(100 + f).permutation(rest)[:4].tolist())
        pq.write_table(
            pa.table({"qid": test, "query": [queries[q] for q in test]}), fd / "test_queries.parquet"
        )
        vq = [(q, d, g) for q in val for d, g in sorted(qrels[q].items())]
        pq.write_table(pa.table({"qid": [x[0] for x in vq], "docid": [x[1] for x in vq],
                                 "label": pa.array([x[2] for x in vq], pa.int8())}), fd / "val_qrels.parquet")  # fmt: skip
        fold_cfgs.append(fold_configs(s, fd, index, data, judgments))
        print(f"fold {f}: {len(test)} test, {len(val)} validation, {len(rest) - len(val)} training queries",
              flush=True)  # fmt: skip

    # ---- train every encoder (one Ray Train job at a time)
    t_train = time.perf_counter()
    paths: list[dict[str, Path]] = []
    for f, cfgs in enumerate(fold_cfgs):
        paths.append({})
        for key, cfg in cfgs.items():
            print(f"fold {f}: training {key}", flush=True)
            paths[f][key] = trained(cfg)
    train_s = time.perf_counter() - t_train

    # ---- DL19: full-corpus retrieval of each fold's test queries
    t_eval = time.perf_counter()
    corpus_tag = f"dl19-{tag}-{hashlib.sha256(''.join(docids).encode()).hexdigest()[:8]}"
    all_qids = judged
    bm25 = BM25Index.load(index / "bm25")
    results: dict[str, dict[str, dict[str, float]]] = {}  # row -> measure -> qid -> value
    results["bm25"] = per_query(
        {
            q: dict(h)
            for q, h in zip(all_qids, bm25.search([queries[q] for q in all_qids], k=100), strict=True)
        },
        qrels,
    )
    base = encoder_for(None, s)
    base_vecs = passage_vectors(base, None, texts, corpus_tag, s["max_passage_length"])
    base_q = base.encode_queries([queries[q] for q in all_qids])
    results["base"] = per_query(dense_run(base_vecs, docids, base_q, all_qids), qrels)
    base_qv = dict(zip(all_qids, base_q, strict=True))
    fold_vecs: list[dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]] = []
    for f, test in enumerate(folds):
        fold_vecs.append({})
        for key, _, _, _ in FINETUNED:
            enc = encoder_for(str(paths[f][key]), s)
            vecs = passage_vectors(enc, str(paths[f][key]), texts, corpus_tag, s["max_passage_length"])
            qv = enc.encode_queries([queries[q] for q in all_qids])
            fold_vecs[f][key] = (vecs, dict(zip(all_qids, qv, strict=True)))
            run = dense_run(vecs, docids, np.stack([fold_vecs[f][key][1][q] for q in test]), test)
            for m, vals in per_query(run, {q: qrels[q] for q in test}).items():
                results.setdefault(key, {}).setdefault(m, {}).update(vals)
            del enc

    speeds = {}
    for key, *_ in FINETUNED:
        g = [RetrieverCard.load(paths[f][key]).training["history"][-1]["groups_per_s"] for f in range(k)]
        speeds[key] = float(np.mean(g))

    names = {"bm25": "BM25", "base": "MiniLM off the shelf", **{key: lab for key, lab, _, _ in FINETUNED}}
    print(f"\nTREC DL 2019, {len(all_qids)} test-fold queries pooled over {k} folds, full-corpus retrieval over "
          f"{len(docids):,} passages (FAISS flat; BM25: bm25s); mean [query-bootstrap 95% CI]\n")  # fmt: skip
    print("| retriever | nDCG@10 | MRR@10 | recall@100 | training groups/s |")
    print("|---|---|---|---|---|")
    for key, lab in names.items():
        r = results[key]
        sp = f"{speeds[key]:.2f}" if key in speeds else "-"
        print(f"| {lab} | {fmt_ci(list(r['ndcg10'].values()))} | {fmt_ci(list(r['mrr10'].values()))} | "
              f"{fmt_ci(list(r['recall100'].values()))} | {sp} |")  # fmt: skip
    print("\npaired differences (b - a) over the same queries, bootstrap 95% CI, paired t-test p:")
    for a_key, b_key in (("base", "summarglh_human"), ("jointlh_human", "summarglh_human"),
                         ("rand1lh_human", "summarglh_human"), ("summarglh_human", "curriculum"),
                         ("base", "summarglh_judge")):  # fmt: skip
        for m in ("ndcg10", "recall100"):
            c = paired_compare(results[a_key][m], results[b_key][m], m)
            print(f"  {names[b_key]} - {names[a_key]}: {m} {c.diff:+.4f} [{c.ci95[0]:+.4f}, {c.ci95[1]:+.4f}] "
                  f"p={c.p_ttest:.3g} (n={c.n_queries})")  # fmt: skip
    cur_ratio = np.mean(list(results["curriculum"]["ndcg10"].values())) / np.mean(
        list(results["summarglh_human"]["ndcg10"].values())
    )
    print(f"  curriculum / SumMargLH-human nDCG@10: {cur_ratio:.3f}x")

    # ---- judge stack: fit on training folds' pairs, grade the test fold's
    kappas = {}
    for which in ("base", "summarglh_human"):
        h_all, lab_all, sc_all, q_all = [], [], [], []
        for f, test in enumerate(folds):
            if which == "base":
                vecs, qv = base_vecs, base_qv
            else:
                vecs, qv = fold_vecs[f][which]
            train_q = sorted(set(judged) - set(test))

            def pairs_of(qs):
                return [(q, d, text_of[d]) for q in qs for d in sorted(qrels[q])]

            tr, te = pairs_of(train_q), pairs_of(test)
            sig_tr = stack_signals(qv, vecs, doc_row, queries, tr)
            sig_te = stack_signals(qv, vecs, doc_row, queries, te)
            comb, _ = fit_stacked(sig_tr, np.array([qrels[q][d] for q, d, _ in tr]), [q for q, _, _ in tr],
                                  GRADES, STACK_SIGNALS, select=False)  # fmt: skip
            lab, _, sc = comb.grade(sig_te)
            h_all += [qrels[q][d] for q, d, _ in te]
            lab_all.append(lab)
            sc_all.append(sc)
            q_all += [q for q, _, _ in te]
        rep = agreement(np.array(h_all), np.concatenate(lab_all), np.concatenate(sc_all), np.array(q_all),
                        GRADES, n_boot=200)  # fmt: skip
        kappas[which] = (rep.metrics["cohen_kappa"], rep.ci95.get("cohen_kappa"), rep.n_pairs)
    print(f"\njudge stack ({' + '.join(STACK_SIGNALS)}; no LLM signal), fit on each fold's training-query qrels "
          "pairs, graded the test fold's; Cohen's kappa vs human pooled over folds [query-bootstrap 95% CI]:")  # fmt: skip
    for which, lab in (("base", "base MiniLM cosine"), ("summarglh_human", "SumMargLH-human cosine")):
        kv, ci, n = kappas[which]
        ci_s = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        print(f"  {lab}: kappa {kv:.4f} {ci_s} ({n:,} pairs)")
    # ---- HotpotQA, fold 0's encoders
    h_docids, h_texts, h_qids, h_questions, h_qrels = hotpot(quick)
    h_tag = f"hotpot-{tag}-{len(h_docids)}"
    hot: dict[str, dict[str, dict[str, float]]] = {}
    h_bm25 = BM25Index.build(h_docids, h_texts)
    hot["bm25"] = per_query(
        {q: dict(h) for q, h in zip(h_qids, h_bm25.search(h_questions, k=100), strict=True)},
        h_qrels, HOTPOT_MEASURES, min_rel=1,
    )  # fmt: skip
    for key in HOTPOT_ROWS:
        path = None if key == "base" else str(paths[0][key])
        enc = base if key == "base" else encoder_for(path, s)
        vecs = passage_vectors(enc, path, h_texts, h_tag, s["max_passage_length"])
        run = dense_run(vecs, h_docids, enc.encode_queries(h_questions), h_qids)
        hot[key] = per_query(run, h_qrels, HOTPOT_MEASURES, min_rel=1)
    print(f"\nHotpotQA dev ({len(h_qids)} questions, {len(h_docids):,} distinct paragraphs as corpus), fold 0's "
          "encoders, no further training: recall of the 2 supporting paragraphs; mean [95% CI]\n")  # fmt: skip
    print("| retriever | recall@2 | recall@5 | recall@10 |")
    print("|---|---|---|---|")
    for key in ["bm25", *HOTPOT_ROWS]:
        lab, r = names[key], hot[key]
        print(f"| {lab} | {fmt_ci(list(r['recall2'].values()))} | {fmt_ci(list(r['recall5'].values()))} | "
              f"{fmt_ci(list(r['recall10'].values()))} |")  # fmt: skip
    c = paired_compare(hot["base"]["recall5"], hot["summarglh_human"]["recall5"], "recall5")
    print(f"  SumMargLH-human - base recall@5: {c.diff:+.4f} [{c.ci95[0]:+.4f}, {c.ci95[1]:+.4f}]")

    print(f"\ntimes: training {train_s:.0f}s, evaluation {time.perf_counter() - t_eval:.0f}s, "
          f"total {time.perf_counter() - t_start:.0f}s")  # fmt: skip

    def nd(key):
        return float(np.mean(list(results[key]["ndcg10"].values())))

    print(
        f"RESULT ndcg10_base={nd('base'):.4f} ndcg10_infonce_human={nd('infonce_human'):.4f} "
        f"ndcg10_summarglh_human={nd('summarglh_human'):.4f} ndcg10_summarglh_judge={nd('summarglh_judge'):.4f} "
        f"ndcg10_curriculum={nd('curriculum'):.4f} "
        f"hotpot_recall5_base={np.mean(list(hot['base']['recall5'].values())):.4f} "
        f"hotpot_recall5_summarglh={np.mean(list(hot['summarglh_human']['recall5'].values())):.4f} "
        f"kappa_stack_base={kappas['base'][0]:.4f} kappa_stack_ft={kappas['summarglh_human'][0]:.4f}"
    )


if __name__ == "__main__":
    main()
