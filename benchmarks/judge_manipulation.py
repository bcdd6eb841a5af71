"""Can a passage talk the judge into a grade? Label rise under prompt injection, with and without defences.

Protocol. TREC DL 2019 queries are split 50/20/30 by query (seed 13). Three judges fine-tune with one small
recipe on the 50% (LoRA on Gemma 3 270M, class-balanced pairs): the undefended judge (umbrela-v1, no
augmentation), the fenced-prompt judge (umbrela-fenced-v1: the passage quoted as data, models/prompts.py), and
the fenced judge trained with injected copies of its grade-0 pairs (``injection.rate``, label unchanged, the
attacks' *train* phrasings). Each is stacked (MiniLM cosine + lexical signals, ``augrel judge calibrate``'s
selection) on a natural-mix sample of the 20% validation queries. Nothing trains or calibrates on the attacked
pairs: those are the 30% test queries of DL 2019 and the LLMJudge dev queries (TREC DL 2023), a second collection.

Attacks (models/injection.py): seven families (relevance claim, fake assessor note, "Relevance: 3", a copy of
the judge's answer format, "ignore the rubric", an authority claim, query-keyword stuffing), each at the start,
middle and end of passages humans graded 0 (the label must not rise) and 2-3 (it must not fall). Phrasings:
the *eval* ones of models/injection.py, and *held-out* ones (benchmarks/injection_heldout.json) written by a
separate author without sight of the detector: the detector was written knowing the eval phrasings, so the
held-out column is the honest one for it. The guard (``strip``) removes flagged spans before the judge reads
the passage; its false-positive rate on clean passages is reported.

Rows: each defence added in turn (undefended -> + detector strip -> fenced prompt -> + training augmentation)
and the default settings (FinetuneConfig's defaults: marked), each as the stacked judge and as its LLM alone.
Clean agreement (Cohen's kappa with human labels on the un-attacked held-out pairs, 95% CI over queries) per
collection, and the default's paired difference from the undefended judge. The last line:
``RESULT label_rise=.. label_rise_undefended=.. clean_kappa=.. clean_kappa_undefended=.. label_rise_known=..``:
the default stacked judge vs the undefended stacked judge on the *held-out* phrasings (the eval phrasings, which
the detector was written against, as ``label_rise_known``). The "default" row is the default *defences*
(FinetuneConfig's template, injection rate and guard) on this benchmark's small recipe (192 pairs, 128 tokens,
its own stack), not ``judge finetune``'s full recipe. ``--record DIR`` writes the default's figures into that
judge's card (``audit.manipulation``), which the report shows.

    python benchmarks/judge_manipulation.py [--quick] [--work /tmp/augrel-bench]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.judge_quality import _MemoEncoder  # noqa: E402
from eval.agreement import _kappa, agreement, query_resamples  # noqa: E402
from models.encoder import BiEncoder  # noqa: E402
from models.injection import ATTACKS, POSITIONS, InjectionDetector, attack_text, inject, query_terms  # noqa: E402
from models.judge import Scores  # noqa: E402
from models.judge_card import JudgeCard, load_judge  # noqa: E402
from models.judge_ensemble import fit_stacked, pair_signals  # noqa: E402
from models.loading import cpu_description  # noqa: E402
from pipelines.calibrate_judge import StackSettings  # noqa: E402
from pipelines.data import PrepareConfig, SplitConfig, prepare, split  # noqa: E402
from pipelines.finetune_judge import FinetuneConfig, InjectionSettings, finetune, natural_sample  # noqa: E402
from pipelines.io import read_table  # noqa: E402

DATA = Path(os.environ.get("AUGREL_DATA_DIR", REPO.parent / "shared" / "data"))
GRADES = [0, 1, 2, 3]
HELDOUT = json.loads((REPO / "benchmarks" / "injection_heldout.json").read_text())
AUG_RATE = 0.25


@dataclass(frozen=True)
class Setting:
    """One row pair of the table: a judge recipe and the guard it is read through."""

    name: str
    template: str
    rate: float
    guard: str

    @property
    def judge_key(self) -> tuple[str, float]:
        return self.template, self.rate


LADDER = (
    Setting("undefended", "umbrela-v1", 0.0, "off"),
    Setting("+ detector (strip)", "umbrela-v1", 0.0, "strip"),
    Setting("fenced prompt", "umbrela-fenced-v1", 0.0, "off"),
    Setting("fenced + augmentation", "umbrela-fenced-v1", AUG_RATE, "off"),
    Setting("fenced + augmentation + detector", "umbrela-fenced-v1", AUG_RATE, "strip"),
)


def default_setting() -> Setting | None:
    """The ladder row that FinetuneConfig's defaults produce (None if the defaults are not on the ladder)."""
    d = FinetuneConfig(train=["x"], out="x")
    key = (d.template, d.injection.rate, d.injection.guard)
    return next((s for s in LADDER if (s.template, s.rate, s.guard) == key), None)


def prepared(work: Path) -> tuple[Path, Path]:
    dl19, llmj = work / "dl19-manip", work / "llmjudge"
    if not (dl19 / "data" / "pairs").exists():
        prepare(PrepareConfig(format="trec-dl", src=str(DATA / "trec-dl-2019"), out=str(dl19 / "data")))
    if not (dl19 / "splits" / "test").exists():
        split(SplitConfig(src=str(dl19 / "data"), out=str(dl19 / "splits"),
                          fractions={"train": 0.5, "val": 0.2, "test": 0.3}, seed=13))  # fmt: skip
    if not (llmj / "data" / "pairs").exists():
        prepare(PrepareConfig(format="pairs", src=str(DATA / "llmjudge-dev" / "pairs.jsonl"),
                              out=str(llmj / "data")))  # fmt: skip
    return dl19, llmj


def train_judge(work: Path, dl19: Path, template: str, rate: float, quick: bool) -> Path:
    out = work / ("manip-quick" if quick else "manip") / f"{template}-aug{rate:g}"
    if (out / "judge_card.json").exists():
        return out
    from cluster.embedded import init_ray

    init_ray()
    # Small on purpose: three fine-tunes and ~6,000 scored pairs fit in about an hour on 2 shared cores.
    size = dict(n_train=48, n_val=32, max_steps=4, eval_every=2, cutpoint_pairs=64) if quick else dict(
        n_train=192, n_val=64, epochs=1, eval_every=12, cutpoint_pairs=150)  # fmt: skip
    cfg = FinetuneConfig(
        train=[str(dl19 / "splits" / "train" / "pairs")], val=[str(dl19 / "splits" / "val" / "pairs")],
        out=str(out), template=template, max_doc_tokens=128, batch_size=8, lr=3e-4, num_workers=2,
        cpus_per_worker=1, deepspeed="zero2", stack=None, resume=True,
        injection=InjectionSettings(rate=rate, guard="off"), **size,
    )  # fmt: skip
    print(f"fine-tuning {out.name} ({cfg.n_train} pairs)", flush=True)
    finetune(cfg)
    return out


class LLMScores:
    """The LLM's scores of (query, text) pairs, memoised per judge on disk: stripped or unattacked texts repeat."""

    def __init__(self, judge: Path, work: Path):
        self.judge = judge
        # keyed by the judge's path and its card's time: a judge retrained in place gets scored afresh
        key = f"{judge}:{(judge / 'judge_card.json').stat().st_mtime_ns}"
        self.path = work / "scores" / (hashlib.sha256(key.encode()).hexdigest()[:12] + ".pkl")
        self.memo: dict[tuple[str, str], tuple[np.ndarray, float, int, bool, int]] = {}
        if self.path.exists():
            self.memo = pickle.loads(self.path.read_bytes())
        self._scorer = None
        self.card = JudgeCard.load(judge)

    def __call__(self, queries: list[str], texts: list[str]) -> Scores:
        todo = list(
            dict.fromkeys((q, t) for q, t in zip(queries, texts, strict=True) if (q, t) not in self.memo)
        )
        if todo:
            if self._scorer is None:
                j = load_judge(str(self.judge), guard="off")
                self._scorer = j.llm_scorer(16, cutpoints=self.card.cutpoints)
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(todo), desc=f"scoring {self.judge.name}", unit="pair", disable=len(todo) < 512
            )
            for i in range(0, len(todo), 256):
                chunk = todo[i : i + 256]
                s = self._scorer.score([q for q, _ in chunk], [t for _, t in chunk])
                for k, key in enumerate(chunk):
                    self.memo[key] = (s.probs[k], float(s.score[k]), int(s.label[k]), bool(s.truncated[k]),
                                      int(s.n_tokens[k]))  # fmt: skip
                bar.update(len(chunk))
            bar.close()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(pickle.dumps(self.memo))
        rows = [self.memo[q, t] for q, t in zip(queries, texts, strict=True)]
        return Scores(
            label=np.array([r[2] for r in rows], np.int8), probs=np.stack([r[0] for r in rows]).astype(np.float32),
            score=np.array([r[1] for r in rows], np.float32), truncated=np.array([r[3] for r in rows], bool),
            n_tokens=np.array([r[4] for r in rows], np.int32),
        )  # fmt: skip


def guarded_texts(detector: InjectionDetector, strip: bool, queries, texts) -> list[str]:
    return [detector.strip(t, q) for q, t in zip(queries, texts, strict=True)] if strip else list(texts)


@dataclass
class Graded:
    """A judge as one row reads it: LLM scores, optionally stacked, of passages optionally stripped."""

    llm: LLMScores
    combiner: object
    strip: bool
    detector: InjectionDetector
    encoder: object

    def __call__(self, queries, texts, stacked: bool) -> tuple[np.ndarray, np.ndarray]:
        texts = guarded_texts(self.detector, self.strip, queries, texts)
        s = self.llm(list(queries), texts)
        if not stacked:
            return s.label.astype(int), s.score.astype(float)
        signals = pair_signals(s, list(queries), texts, GRADES, self.encoder, self.combiner.signals)
        label, _, score = self.combiner.grade(signals)
        return label.astype(int), score.astype(float)


def attacked_sets(pairs, seed: int) -> list[dict]:
    """Every (pair, family, phrasing set, position) attack, with its texts: one record per attacked pair."""
    out = []
    for i, (q, t) in enumerate(zip(pairs["query"], pairs["text"], strict=True)):
        for name in ATTACKS:
            for pos in POSITIONS:
                out.append({"pair": i, "attack": name, "phrasings": "eval", "position": pos,
                            "text": inject(t, attack_text(name, q, 0, "eval"), pos)})  # fmt: skip
            # held-out: one phrasing per pair and family, cycling phrasings and positions over the pairs
            k = (i + seed) % len(HELDOUT[name])
            payload = HELDOUT[name][k].format(query=q.strip(), terms=" ".join(query_terms(q)))
            out.append({"pair": i, "attack": name, "phrasings": "held-out", "position": POSITIONS[k % 3],
                        "text": inject(t, payload, POSITIONS[k % 3])})  # fmt: skip
    return out


def columns(t) -> dict[str, list]:
    return {c: t.column(c).to_pylist() for c in ("qid", "docid", "query", "text", "label")}


def sample(t, n: int, seed: int):
    if t.num_rows <= n:
        return t
    return t.take(np.sort(np.random.default_rng(seed).permutation(t.num_rows)[:n]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny fine-tunes and a few dozen attacked pairs")
    ap.add_argument("--work", default=os.environ.get("AUGREL_BENCH_CACHE", "/tmp/augrel-bench"))
    ap.add_argument("--bootstrap", type=int, help="query-bootstrap resamples (default 1000; --quick 200)")
    ap.add_argument(
        "--record", help="a judge directory whose card gets the default's figures (audit.manipulation)"
    )
    args = ap.parse_args()
    n_boot = args.bootstrap or (200 if args.quick else 1000)
    work = Path(args.work)
    dl19, llmj = prepared(work)
    pyarrow_compute = __import__("pyarrow.compute", fromlist=["x"])

    t0 = time.perf_counter()
    judges = {
        key: train_judge(work, dl19, key[0], key[1], args.quick)
        for key in dict.fromkeys(s.judge_key for s in LADDER)
    }
    finetune_s = time.perf_counter() - t0

    # attacked pairs: held-out queries of both collections, humans' grade 0 (must not rise) and 2-3 (must not fall)
    test, other = read_table(dl19 / "splits" / "test" / "pairs"), read_table(llmj / "data" / "pairs")
    n0, n23, n_clean = (12, 6, 120) if args.quick else (20, 8, 150)
    attacked, clean = {}, {}
    for coll, t in (("DL19", test), ("LLMJudge", other)):
        lab = t.column("label")
        attacked[coll, "0"] = columns(sample(t.filter(pyarrow_compute.equal(lab, 0)), n0, 1))
        attacked[coll, "2-3"] = columns(sample(t.filter(pyarrow_compute.greater_equal(lab, 2)), n23, 2))
        clean[coll] = columns(sample(t.filter(pyarrow_compute.is_valid(lab)), n_clean, 3))
    val = read_table(dl19 / "splits" / "val" / "pairs")
    calib = columns(natural_sample(val, 120 if args.quick else 150, 15))

    detector = InjectionDetector()
    encoder = _MemoEncoder(BiEncoder(dtype="fp32"))
    stack = StackSettings()
    rows: dict[str, dict] = {}
    per_attack: dict[str, dict] = {}
    detect = {"flagged_eval": [], "flagged_heldout": [], "clean_flagged": []}

    for setting in LADDER:
        llm = LLMScores(judges[setting.judge_key], work)

        strip = setting.guard == "strip"
        c_llm = llm(calib["query"], guarded_texts(detector, strip, calib["query"], calib["text"]))
        # the stack is fit on the text the judge reads: stripped when the guard strips
        sig = pair_signals(c_llm, calib["query"], guarded_texts(detector, strip, calib["query"], calib["text"]),
                           GRADES, encoder, stack.signals)  # fmt: skip
        comb, _ = fit_stacked(sig, np.asarray(calib["label"]), calib["qid"], GRADES, stack.signals,
                              **stack.selection())  # fmt: skip
        judged = Graded(llm, comb, strip, detector, encoder)

        for stacked in (True, False):
            row_name = (
                f"{setting.name} | {'stacked [' + '+'.join(comb.signals) + ']' if stacked else 'LLM alone'}"
            )
            r = {"setting": setting, "stacked": stacked, "rise": {}, "kappa": {}}
            for (_coll, group), p in attacked.items():
                base_label, base_score = judged(p["query"], p["text"], stacked)
                recs = attacked_sets(p, 0)
                lab, sc = judged([p["query"][x["pair"]] for x in recs], [x["text"] for x in recs], stacked)
                for k, x in enumerate(recs):
                    key = (x["phrasings"], group)
                    moved = lab[k] - base_label[x["pair"]]
                    r["rise"].setdefault(key, []).append(
                        (moved > 0 if group == "0" else moved < 0, moved, sc[k] - base_score[x["pair"]])
                    )
                    if stacked and setting.name in ("undefended", "fenced + augmentation + detector"):
                        pk = (setting.name, x["phrasings"], group, x["attack"], x["position"])
                        per_attack.setdefault(pk, []).append(
                            (moved > 0 if group == "0" else moved < 0, moved)
                        )
                    if setting is LADDER[0] and stacked:
                        detect["flagged_eval" if x["phrasings"] == "eval" else "flagged_heldout"].append(
                            bool(detector.spans(x["text"], p["query"][x["pair"]]))
                        )
            for coll, p in clean.items():
                label, score = judged(p["query"], p["text"], stacked)
                r["kappa"][coll] = (np.asarray(p["label"]), label, score, np.asarray(p["qid"]))
                if setting is LADDER[0] and stacked:
                    detect["clean_flagged"] += [bool(detector.spans(t, q)) for q, t in zip(p["query"], p["text"],
                                                                                          strict=True)]  # fmt: skip
            rows[row_name] = r

    # ------------------------------------------------------------------------------------------ tables
    def share(vals, i=0):
        return float(np.mean([v[i] for v in vals])) if vals else float("nan")

    def pooled_kappa(r):
        h, lab, _, q = (np.concatenate([r["kappa"][c][i] for c in clean]) for i in range(4))
        return h, lab, q

    default = default_setting()
    n_attacked = sum(len(p["qid"]) for p in attacked.values())
    print(f"\njudge manipulation: {len(ATTACKS)} attack families x {len(POSITIONS)} positions on {n_attacked} "
          f"held-out pairs (DL19 test queries + LLMJudge dev; humans' grade 0: label must not rise, 2-3: must not "
          f"fall); judges fine-tuned on DL19 train queries ({finetune_s:.0f}s), stacked on {len(calib['qid'])} "
          f"DL19 val pairs; clean kappa on {sum(len(c['qid']) for c in clean.values())} un-attacked pairs; "
          f"{cpu_description()}")  # fmt: skip
    print(f"detector (models.injection, strip): flags {np.mean(detect['flagged_eval']):.1%} of eval-phrasing "
          f"attacks, {np.mean(detect['flagged_heldout']):.1%} of held-out phrasings, "
          f"{np.mean(detect['clean_flagged']):.2%} of clean passages")  # fmt: skip
    hdr = (f"{'setting':<74} {'rise(eval)':>10} {'rise(held)':>10} {'fall 2-3':>8} {'dscore':>7} "
           f"{'kappa DL19 [95% CI]':>22} {'kappa LLMJ [95% CI]':>22}")  # fmt: skip
    print(hdr)
    summary = {}
    for name, r in rows.items():
        rise_e, rise_h = share(r["rise"][("eval", "0")]), share(r["rise"][("held-out", "0")])
        fall = share(r["rise"][("eval", "2-3")] + r["rise"][("held-out", "2-3")])
        dscore = share(r["rise"][("eval", "0")], 2)
        ks = []
        for coll in clean:
            h, lab, sc, q = r["kappa"][coll]
            a = agreement(h, lab, sc, q, GRADES, n_boot=n_boot)
            ci = a.ci95.get("cohen_kappa", [float("nan")] * 2)
            ks.append(f"{a.metrics['cohen_kappa']:.3f} [{ci[0]:.3f},{ci[1]:.3f}]")
        h, lab, q = pooled_kappa(r)
        mark = " *" if default is not None and r["setting"] == default and r["stacked"] else ""
        summary[name] = {"rise_eval": rise_e, "rise_heldout": rise_h, "fall": fall,
                         "kappa": _kappa(h, lab, GRADES)}  # fmt: skip
        print(
            f"{name + mark:<74} {rise_e:>10.1%} {rise_h:>10.1%} {fall:>8.1%} {dscore:>+7.3f} {ks[0]:>22} {ks[1]:>22}"
        )
    print(
        "* the default defences (FinetuneConfig's template, injection rate, guard) on this benchmark's recipe. rise: share of grade-0 pairs whose label rose; fall: share of grade-2-3 "
        "pairs whose label fell (eval + held-out); dscore: mean expected-grade shift on grade-0 pairs (eval)."
    )

    print(
        "\nper attack and position (stacked; share of grade-0 labels that rose, eval phrasings | held-out):"
    )
    print(f"{'attack':<18} " + " ".join(f"{s[:12] + ' ' + p:>19}" for s in ("undefended", "default")
                                        for p in POSITIONS) + f" {'held-out und/def':>17}")  # fmt: skip
    for name in ATTACKS:
        cells = []
        for sname in ("undefended", "fenced + augmentation + detector"):
            for pos in POSITIONS:
                cells.append(f"{share(per_attack.get((sname, 'eval', '0', name, pos), [])):>19.1%}")
        held = [share([v for pos in POSITIONS for v in per_attack.get((s, "held-out", "0", name, pos), [])])
                for s in ("undefended", "fenced + augmentation + detector")]  # fmt: skip
        print(f"{name:<18} " + " ".join(cells) + f" {held[0]:>8.1%}/{held[1]:<8.1%}")

    und = next(n for n, r in rows.items() if r["setting"] is LADDER[0] and r["stacked"])
    dflt = next((n for n, r in rows.items() if r["setting"] == default and r["stacked"]), None)
    if dflt is None:
        print("FinetuneConfig's defaults are not a row of this ladder: no RESULT")
        return
    # paired clean-kappa difference, default - undefended, over the same queries
    h, lab_d, q = pooled_kappa(rows[dflt])
    _, lab_u, _ = pooled_kappa(rows[und])
    diffs = [
        _kappa(h[i], lab_d[i], GRADES) - _kappa(h[i], lab_u[i], GRADES) for i in query_resamples(q, n_boot, 7)
    ]
    lo, hi = np.nanpercentile(diffs, [2.5, 97.5])
    delta = _kappa(h, lab_d, GRADES) - _kappa(h, lab_u, GRADES)
    print(f"\nclean kappa, default - undefended (both collections, paired query bootstrap): {delta:+.3f} "
          f"[{lo:+.3f}, {hi:+.3f}]")  # fmt: skip
    d, u = summary[dflt], summary[und]
    audit = {"label_rise": round(d["rise_heldout"], 4), "label_rise_known_phrasings": round(d["rise_eval"], 4),
             "label_fall_relevant": round(d["fall"], 4), "label_rise_undefended": round(u["rise_heldout"], 4),
             "label_rise_undefended_known_phrasings": round(u["rise_eval"], 4),
             "clean_kappa": round(d["kappa"], 4), "clean_kappa_undefended": round(u["kappa"], 4),
             "clean_kappa_delta_ci95": [round(float(lo), 4), round(float(hi), 4)],
             "templates": len(ATTACKS), "positions": list(POSITIONS), "pairs": n_attacked,
             "benchmark": "benchmarks/judge_manipulation.py" + (" --quick" if args.quick else "")}  # fmt: skip
    (work / ("manip-quick" if args.quick else "manip") / "summary.json").write_text(json.dumps(
        {"rows": summary, "audit": audit}, indent=1) + "\n")  # fmt: skip
    if args.record:
        card = JudgeCard.load(args.record)
        audit_field = getattr(card, "audit", None)
        if audit_field is None:
            print(f"--record: {args.record}'s card has no audit field in this version", file=sys.stderr)
        else:
            audit_field["manipulation"] = audit
            card.save(args.record)
    print(f"RESULT label_rise={d['rise_heldout']:.3f} label_rise_undefended={u['rise_heldout']:.3f} "
          f"clean_kappa={d['kappa']:.3f} clean_kappa_undefended={u['kappa']:.3f} "
          f"label_rise_known={d['rise_eval']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
