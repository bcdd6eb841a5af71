"""Utility annotation quality on HotpotQA (paper 2's annotation, ../shared/papers.md section 2): which of a
question's 10 paragraphs each method marks positive, against HotpotQA's ``is_supporting`` (2 per question).

Data: ../shared/data/hotpotqa-dev-500/questions.jsonl ($AUGREL_DATA_DIR overrides ../shared/data), the first N
questions that have exactly 10 paragraphs (489 of the 500 do; the others have 2-8, which would make a top-2
baseline trivially right). Every method sees the same passage text: the paragraph's title, ". ", its text.
The gold answer is the first span of ``answers_objects``.

Rows (one Gemma 3 270M, offline default, loaded once and shared by every utility mode):

- RelSel, UtilSel, UtilRank: ``models.utility.UtilityAnnotator`` in modes relsel / utility-sel / utility-rank,
  listwise decoding constrained to the format's tokens (the default). RelSel and the pseudo answer are greedy and
  seeded per window, so every mode that starts with them computes the very same thing: they run once per question
  (in the UtilSel pass) and UtilRank and answer-likelihood (pseudo) reuse them; the RelSel row is the ``relevant``
  flag of that pass. Seconds charge each mode every stage it needs (RelSel row: RelSel alone; UtilSel: RelSel +
  answer + UtilSel; ...), measured per stage.
- answer-likelihood, utility = log P(answer | q, p) - log P(answer | q), with the gold answer and with the pseudo
  answer, each with the annotator's default rule (its top 10%, i.e. 1 of 10, when the utility is above 0), and
  "gold, top-2": its 2 highest utilities, which uses the known count of 2 positives, as the baselines do.
- the relevance judge thresholded: the zero-shot pointwise judge (``load_judge("gemma3-270m")``, umbrela-v1,
  256 passage tokens, as ``augrel annotate --mode relevance`` builds it), positive = label >= 2. Its pairs/s is
  the relevance annotation throughput to set the utility modes' pairs/s beside (same passages).
- baselines, top-2 of each question's 10 paragraphs (they know the count): MiniLM cosine (the packaged
  all-MiniLM-L6-v2) and BM25 (retrieval/bm25.py, an index of the question's 10 paragraphs).
- "UtilSel unconstrained" on a small subset: the same prompts with ``constrain_listwise=False``, to show what the
  270M model writes when free (one raw output is printed).

Scores: precision, recall, F1 pooled over all (question, paragraph) pairs (micro: the headline, paper 2 reports
precision and recall over the positives), and the mean over questions (a question that selects nothing has
precision 0); the F1 95% interval is a percentile bootstrap over questions. Positives per question; parse failures
per listwise stage (windows whose output holds no bracketed index / windows); seconds, questions/s and pairs/s.

Cost here (2 shared cores, --quick): answer-likelihood ~7 s a question, RelSel, UtilSel and UtilRank ~15 s a
question each (the 270M model counts [1],[2],... up to the token bound), the pseudo answer ~5 s: about 75 s a
question in all. --quick: 20 questions (about 25 minutes); default 100 (about 2 hours).

Last line: ``RESULT p_relsel=.. r_relsel=.. p_utilsel=.. r_utilsel=.. p_utilrank=.. r_utilrank=.. f1_answerlik=..
f1_cosine_top2=.. parse_fail_rate=.. questions_per_s=..`` (f1_answerlik: the better answer-likelihood row with
the default rule; parse_fail_rate: over every window of the constrained listwise stages, RelSel's counted once;
questions_per_s: UtilSel's, all its stages included). The table also goes to a JSON file (--json).

    python benchmarks/utility_quality.py [--quick] [--questions N] [--unconstrained N] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.loading import cpu_description, load_causal_lm  # noqa: E402
from models.utility import Candidate, Question, UtilityAnnotator, UtilityPrompts  # noqa: E402

DATA = Path(os.environ.get("AUGREL_DATA_DIR", REPO.parent / "shared" / "data"))
WORK = Path(os.environ.get("AUGREL_BENCH_DIR", "/tmp/augrel-bench")) / "utility"
PARAGRAPHS = 10
LISTWISE_STAGES = ("relsel", "utilsel", "utilrank")


def load_questions(n: int) -> tuple[list[Question], list[np.ndarray]]:
    """The first ``n`` questions with exactly 10 paragraphs, and their ``is_supporting`` flags."""
    questions, gold = [], []
    with (DATA / "hotpotqa-dev-500" / "questions.jsonl").open() as f:
        for line in f:
            r = json.loads(line)
            if len(r["contexts"]) != PARAGRAPHS:
                continue
            qid = str(r["question_id"])
            cands = [
                Candidate(f"{qid}:{c['id']}", f"{c['title']}. {c['paragraph_text']}") for c in r["contexts"]
            ]
            spans = r["answers_objects"][0]["spans"]
            questions.append(Question(qid, r["question_text"], cands, spans[0] if spans else None))
            gold.append(np.array([bool(c["is_supporting"]) for c in r["contexts"]]))
            if len(questions) == n:
                break
    if len(questions) < n:
        raise ValueError(
            f"--questions {n}: the data has only {len(questions)} questions with {PARAGRAPHS} paragraphs"
        )
    return questions, gold


class MeasuredAnnotator(UtilityAnnotator):
    """The annotator with its stages timed, and RelSel + pseudo answer shared through ``shared`` (keyed by prompt
    version, seed and qid): recomputing them per mode would triple the run for identical outputs."""

    def __init__(self, *args, shared: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.shared, self.seconds = shared, Counter()

    def _timed(self, stage, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds[stage] += time.perf_counter() - t0
        return out

    def _select(self, questions, texts, stage, pools, results):
        return self._timed(stage, super()._select, questions, texts, stage, pools, results)

    def _pseudo_answers(self, questions, texts, kept, results):
        return self._timed("answer", super()._pseudo_answers, questions, texts, kept, results)

    def _rank(self, questions, texts, kept, results):
        return self._timed("utilrank", super()._rank, questions, texts, kept, results)

    def _answer_likelihood(self, questions, texts, results):
        return self._timed("likelihood", super()._answer_likelihood, questions, texts, results)

    def _relsel_and_answer(self, questions, texts, results, answer: bool = True):
        keys = [(self.prompts.version, self.seed, q.qid) for q in questions]
        if answer and all(k in self.shared for k in keys):
            kept = []
            for k, res in zip(keys, results, strict=True):
                memo = self.shared[k]
                for r, (relevant, windows, notes) in zip(res.passages, memo["passages"], strict=True):
                    r.relevant, r.selected = relevant, False
                    r.windows, r.notes = copy.deepcopy(windows), list(notes)
                res.pseudo_answer = memo["answer"]
                kept.append(set(memo["kept"]))
            return kept
        kept = super()._relsel_and_answer(questions, texts, results, answer)
        if answer:
            for k, res, kq in zip(keys, results, kept, strict=True):
                self.shared[k] = {
                    "kept": sorted(kq),
                    "answer": res.pseudo_answer,
                    "passages": [(r.relevant, copy.deepcopy(r.windows), list(r.notes)) for r in res.passages],
                }
        return kept


# ------------------------------------------------------------------------------------------- scoring


@dataclass
class Row:
    name: str
    selected: list[np.ndarray]
    gold: list[np.ndarray]
    seconds: float
    parse: dict[str, tuple[int, int]] = field(default_factory=dict)  # stage -> (no_bracket, windows)
    note: str = ""


def scores(sel: list[np.ndarray], gold: list[np.ndarray], n_boot: int, seed: int = 0) -> dict:
    tp = np.array([(s & g).sum() for s, g in zip(sel, gold, strict=True)], dtype=float)
    ns = np.array([s.sum() for s in sel], dtype=float)
    ng = np.array([g.sum() for g in gold], dtype=float)

    def prf(tp, ns, ng):
        p = np.divide(tp, ns, out=np.zeros_like(tp), where=ns > 0)
        r = np.divide(tp, ng, out=np.zeros_like(tp), where=ng > 0)
        f = np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) > 0)
        return p, r, f

    p, r, f1 = prf(tp.sum(-1), ns.sum(-1), ng.sum(-1))
    pq, rq, fq = prf(tp, ns, ng)
    idx = np.random.default_rng(seed).integers(0, len(tp), size=(n_boot, len(tp)))
    _, _, fb = prf(tp[idx].sum(1), ns[idx].sum(1), ng[idx].sum(1))
    fqb = fq[idx].mean(1)
    return {
        "precision": float(p), "recall": float(r), "f1": float(f1),
        "f1_ci95": [float(np.percentile(fb, 2.5)), float(np.percentile(fb, 97.5))],
        "precision_per_q": float(pq.mean()), "recall_per_q": float(rq.mean()), "f1_per_q": float(fq.mean()),
        "f1_per_q_ci95": [float(np.percentile(fqb, 2.5)), float(np.percentile(fqb, 97.5))],
        "positives_per_q": float(ns.mean()), "questions": len(tp),
    }  # fmt: skip


def parse_counts(stats: dict, stages=LISTWISE_STAGES) -> dict[str, tuple[int, int]]:
    return {s: (stats[s].get("no_bracket", 0), stats[s].get("windows", 0)) for s in stages if s in stats}


def top_k(score: np.ndarray, k: int = 2) -> np.ndarray:
    out = np.zeros(len(score), bool)
    out[np.argsort(-score, kind="stable")[:k]] = True
    return out


# -------------------------------------------------------------------------------------------- running


def annotate_in_chunks(ann: UtilityAnnotator, questions, mode: str, chunk: int, label: str):
    """``annotate`` over chunks of questions (a chunk batches generation across its questions), with an ETA."""
    results, t0 = [], time.perf_counter()
    for start in range(0, len(questions), chunk):
        results += ann.annotate(questions[start : start + chunk], mode)
        done, el = len(results), time.perf_counter() - t0
        print(f"  {label}: {done}/{len(questions)} questions, {el:.0f}s, {el / done:.1f} s/question, "
              f"ETA {el / done * (len(questions) - done):.0f}s", flush=True)  # fmt: skip
    return results


def selected_of(results, attr: str = "selected") -> list[np.ndarray]:
    return [np.array([bool(getattr(p, attr)) for p in r.passages]) for r in results]


def first_raw_output(results) -> tuple[str, str] | None:
    for r in results:
        for p in r.passages:
            for w in p.windows:
                if "output" in w:
                    return w["stage"], w["output"]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 questions (minutes)")
    ap.add_argument("--questions", type=int, help="questions (default 100; --quick: 20)")
    ap.add_argument(
        "--unconstrained", type=int, help="questions for the unconstrained row (default 8; quick 4)"
    )
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per generate / forward call")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument(
        "--json", help="write the table here (default $AUGREL_BENCH_DIR/utility/quality-<N>q.json)"
    )
    args = ap.parse_args()
    n = args.questions or (20 if args.quick else 100)
    n_free = min(n, args.unconstrained or (4 if args.quick else 8))
    questions, gold = load_questions(n)
    chunk = args.batch_size
    rows: list[Row] = []

    # ------------------------------------------------------------------ baselines (top-2, knowing the count)
    from models.encoder import BiEncoder
    from retrieval.bm25 import BM25Index

    print(f"baselines on {n} questions", flush=True)
    encoder = BiEncoder(dtype="auto")
    t0 = time.perf_counter()
    qv = encoder.encode_queries([q.query for q in questions])
    pv = encoder.encode_passages([c.text for q in questions for c in q.candidates]).reshape(n, PARAGRAPHS, -1)
    rows.append(Row("MiniLM cosine top-2", [top_k(pv[i] @ qv[i]) for i in range(n)], gold,
                    time.perf_counter() - t0, note="knows 2 positives"))  # fmt: skip
    t0 = time.perf_counter()
    bm25 = []
    for q in questions:
        index = BM25Index.build([c.docid for c in q.candidates], [c.text for c in q.candidates])
        bm25.append(top_k(index.scores(q.query)))
    rows.append(Row("BM25 top-2 (index of the 10 paragraphs)", bm25, gold, time.perf_counter() - t0,
                    note="knows 2 positives"))  # fmt: skip

    # ------------------------------------------------------------------------------- the relevance judge
    from models.judge_card import load_judge

    print(f"relevance judge on {n * PARAGRAPHS} pairs", flush=True)
    judge = load_judge(args.model, template="umbrela-v1", max_doc_tokens=256)
    scorer = judge.scorer(16)
    scorer.score([questions[0].query], [questions[0].candidates[0].text])  # warm-up, untimed
    t0 = time.perf_counter()
    js = scorer.score([q.query for q in questions for _ in q.candidates],
                      [c.text for q in questions for c in q.candidates])  # fmt: skip
    judge_s = time.perf_counter() - t0
    labels = np.asarray(js.label).reshape(n, PARAGRAPHS)
    rows.append(Row("relevance judge (umbrela-v1), label >= 2", [lab >= 2 for lab in labels], gold, judge_s,
                    note=f"label counts {dict(sorted(Counter(labels.ravel().tolist()).items()))}"))  # fmt: skip
    del judge, scorer

    # ------------------------------------------------------------------------------------ utility modes
    lm = load_causal_lm(args.model)
    shared: dict = {}

    def annotator(prompts=None, **kw) -> MeasuredAnnotator:
        a = MeasuredAnnotator(
            lm.model, lm.tokenizer, prompts, batch_size=args.batch_size, shared=shared, **kw
        )
        _ = (
            a.listwise_ids
        )  # the decoding vocabulary (a scan of the tokenizer, ~10 s): built before any timing
        return a

    print(f"answer-likelihood, gold answer, {n} questions", flush=True)
    gold_ann = annotator(answer_source="gold")
    al_gold = annotate_in_chunks(gold_ann, questions, "answer-likelihood", chunk, "answer-likelihood gold")
    t_gold = gold_ann.seconds["likelihood"]

    print(f"UtilSel (with RelSel and the pseudo answer), {n} questions", flush=True)
    sel_ann = annotator()
    utilsel = annotate_in_chunks(sel_ann, questions, "utility-sel", chunk, "utility-sel")
    t = sel_ann.seconds
    print(f"UtilRank (RelSel and pseudo answers reused), {n} questions", flush=True)
    rank_ann = annotator()
    utilrank = annotate_in_chunks(rank_ann, questions, "utility-rank", chunk, "utility-rank")
    print(f"answer-likelihood, pseudo answer (reused), {n} questions", flush=True)
    pseudo_ann = annotator(answer_source="pseudo")
    al_pseudo = annotate_in_chunks(
        pseudo_ann, questions, "answer-likelihood", chunk, "answer-likelihood pseudo"
    )

    sel_stats, rank_stats = sel_ann.stats.as_dict(), rank_ann.stats.as_dict()
    rows.append(Row("RelSel", selected_of(utilsel, "relevant"), gold, t["relsel"],
                    parse_counts(sel_stats, ("relsel",))))  # fmt: skip
    rows.append(Row("UtilSel", selected_of(utilsel), gold, t["relsel"] + t["answer"] + t["utilsel"],
                    parse_counts(sel_stats)))  # fmt: skip
    rows.append(Row("UtilRank (top 10%, at least 1)", selected_of(utilrank), gold,
                    t["relsel"] + t["answer"] + rank_ann.seconds["utilrank"],
                    {**parse_counts(sel_stats, ("relsel",)), **parse_counts(rank_stats)}))  # fmt: skip
    rows.append(Row("answer-likelihood, gold answer", selected_of(al_gold), gold, t_gold,
                    note="top 10% (1 of 10) if utility > 0"))  # fmt: skip
    rows.append(Row("answer-likelihood, pseudo answer", selected_of(al_pseudo), gold,
                    t["relsel"] + t["answer"] + pseudo_ann.seconds["likelihood"],
                    parse_counts(sel_stats, ("relsel",)), note="top 10% (1 of 10) if utility > 0"))  # fmt: skip
    top2 = [np.array([p.rank is not None and p.rank <= 2 for p in r.passages]) for r in al_gold]
    rows.append(Row("answer-likelihood, gold answer, top-2", top2, gold, t_gold, note="knows 2 positives"))

    print(f"UtilSel unconstrained decoding, {n_free} questions", flush=True)
    free_ann = annotator(UtilityPrompts(constrain_listwise=False))
    free = annotate_in_chunks(free_ann, questions[:n_free], "utility-sel", chunk, "utility-sel unconstrained")
    free_stats = free_ann.stats.as_dict()
    rows.append(Row(f"UtilSel unconstrained ({n_free} questions)", selected_of(free), gold[:n_free],
                    sum(free_ann.seconds.values()), parse_counts(free_stats)))  # fmt: skip

    # ----------------------------------------------------------------------------------------- report
    table = []
    for row in rows:
        m = scores(row.selected, row.gold, args.bootstrap)
        q = m["questions"]
        table.append({"method": row.name, **m, "seconds": row.seconds, "questions_per_s": q / row.seconds,
                      "pairs_per_s": q * PARAGRAPHS / row.seconds,
                      "parse_failures": {s: {"no_bracket": a, "windows": w} for s, (a, w) in row.parse.items()},
                      "note": row.note})  # fmt: skip

    def fmt_parse(parse: dict) -> str:
        return " ".join(f"{s} {v['no_bracket']}/{v['windows']}" for s, v in parse.items()) or "-"

    answers = sum(1 for r in utilsel if r.pseudo_answer)
    print(f"\nutility annotation quality: HotpotQA dev, {n} questions x {PARAGRAPHS} paragraphs (title. text), "
          f"gold = is_supporting (2 per question); {args.model} ({lm.dtype}), batch {args.batch_size}; "
          f"{cpu_description()}")  # fmt: skip
    print("P/R/F1: pooled over all pairs (headline); mP/mR/mF1: mean over questions; CI: bootstrap over questions; "
          "parse: windows with no bracketed index / windows, per stage")  # fmt: skip
    hdr = (f"{'method':<46} {'P':>5} {'R':>5} {'F1':>5} {'F1 95% CI':>13} {'mP':>5} {'mR':>5} {'mF1':>5} "
           f"{'pos/q':>5} {'s':>6} {'q/s':>6} {'pairs/s':>7}  parse")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    for r in table:
        ci = r["f1_ci95"]
        print(f"{r['method']:<46} {r['precision']:>5.3f} {r['recall']:>5.3f} {r['f1']:>5.3f} "
              f"[{ci[0]:.3f},{ci[1]:.3f}] {r['precision_per_q']:>5.3f} {r['recall_per_q']:>5.3f} "
              f"{r['f1_per_q']:>5.3f} {r['positives_per_q']:>5.2f} {r['seconds']:>6.0f} "
              f"{r['questions_per_s']:>6.3f} {r['pairs_per_s']:>7.2f}  {fmt_parse(r['parse_failures'])}")  # fmt: skip
    for r in table:
        if r["note"]:
            print(f"  {r['method']}: {r['note']}")
    print(f"stage stats (UtilSel pass): {sel_stats}")
    print(f"stage stats (UtilRank pass, RelSel and answers reused): {rank_stats}")
    print(f"stage stats (unconstrained): {free_stats}")
    print(f"pseudo answers: {answers}/{n} questions have one (none when RelSel keeps nothing); "
          f"stage seconds: {dict((k, round(v, 1)) for k, v in t.items())}, utilrank "
          f"{rank_ann.seconds['utilrank']:.1f}, likelihood gold {t_gold:.1f} / pseudo "
          f"{pseudo_ann.seconds['likelihood']:.1f}")  # fmt: skip
    example = first_raw_output(free)
    print(
        "unconstrained raw output (first window with no bracketed index): "
        + (f"[{example[0]}] {example[1]!r}" if example else "none: every window held an index")
    )
    for r in utilsel[:2]:
        print(f"example pseudo answer ({r.qid}): {r.pseudo_answer!r}")

    by = {r["method"]: r for r in table}
    fails = [parse_counts(sel_stats), parse_counts(rank_stats, ("utilrank",))]
    no_bracket = sum(a for d in fails for a, _ in d.values())
    windows = sum(w for d in fails for _, w in d.values())
    out = Path(args.json) if args.json else WORK / f"quality-{n}q.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"questions": n, "model": args.model, "cpu": cpu_description(), "rows": table,
                               "stats": {"utilsel": sel_stats, "utilrank": rank_stats, "unconstrained": free_stats},
                               "unconstrained_example": example}, indent=2))  # fmt: skip
    print(f"table: {out}")
    f1_al = max(by["answer-likelihood, gold answer"]["f1"], by["answer-likelihood, pseudo answer"]["f1"])
    print(f"RESULT p_relsel={by['RelSel']['precision']:.4f} r_relsel={by['RelSel']['recall']:.4f} "
          f"p_utilsel={by['UtilSel']['precision']:.4f} r_utilsel={by['UtilSel']['recall']:.4f} "
          f"p_utilrank={by['UtilRank (top 10%, at least 1)']['precision']:.4f} "
          f"r_utilrank={by['UtilRank (top 10%, at least 1)']['recall']:.4f} f1_answerlik={f1_al:.4f} "
          f"f1_cosine_top2={by['MiniLM cosine top-2']['f1']:.4f} "
          f"parse_fail_rate={no_bracket / max(1, windows):.4f} "
          f"questions_per_s={by['UtilSel']['questions_per_s']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
