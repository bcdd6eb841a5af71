"""``augrel run``'s utility evaluation: each utility annotation (and the baselines a user would compare it with)
scored against the human positives of the same questions (eval/utility.py).

Rows: RelSel (the ``relevant`` verdict every listwise mode records), each mode's ``selected``, the relevance
judge at ``label >= min_grade`` on the same pairs, and BM25 / MiniLM-cosine top-k baselines from the rank
features (k: the questions' mean number of human positives, rounded, so they select as many as the gold has;
an advantage the annotators do not get). The human positives are ``label >= min_grade`` of the pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipelines.stage import StageConfig, StageResult, Timer, write_stage_files


class UtilityEvalConfig(StageConfig):
    """Score utility tables against the human labels of the pairs they annotated."""

    utility: dict[str, str] = Field(description="mode -> utility table directory")
    pairs: str = Field(description="the annotated pairs, with human labels")
    judgments: str | None = Field(
        None, description="the relevance judge's judgments of (a superset of) the pairs"
    )
    features: str | None = Field(
        None, description="rank features of the pairs (bm25, dense_cos): top-k baselines"
    )
    min_grade: int = Field(2, description="a human label >= this is a positive (TREC DL: highly relevant)")
    bootstrap: int = Field(1000, gt=0)
    out: str


def _rows(table: pa.Table, flag: str, qids: set[str]) -> list[tuple[str, str, bool]]:
    cols = [table.column(c).to_pylist() for c in ("qid", "docid", flag)]
    return [(q, d, bool(s)) for q, d, s in zip(*cols, strict=True) if q in qids and s is not None]


def run(cfg: UtilityEvalConfig) -> StageResult:
    from eval.utility import selection_quality, top_k_selection
    from pipelines.io import read_table

    with Timer() as timer:
        pairs = read_table(cfg.pairs)
        gold: dict[str, dict[str, bool]] = {}
        for q, d, label in zip(
            *(pairs.column(c).to_pylist() for c in ("qid", "docid", "label")), strict=True
        ):
            if label is not None:
                gold.setdefault(q, {})[d] = label >= cfg.min_grade
        qids = set(gold)
        found: dict[str, tuple[list, str]] = {}
        manifests = {}
        for mode, path in cfg.utility.items():
            table = read_table(path)
            manifests[mode] = json.loads((Path(path) / "manifest.json").read_text())
            if (
                "relsel" not in found
                and mode != "answer-likelihood"
                and table.column("relevant").null_count < table.num_rows
            ):
                found["relsel"] = (_rows(table, "relevant", qids), f"RelSel (the relevant verdict of {mode})")
            found[mode] = (_rows(table, "selected", qids), f"{mode} selected")
        annotated = {q for rows, _ in found.values() for q, _, _ in rows}
        # the judge and the baselines are scored on the same (question, passage) pairs as the annotators
        same = set(zip(pairs.column("qid").to_pylist(), pairs.column("docid").to_pylist(), strict=True))
        if cfg.judgments:
            j = read_table(cfg.judgments)
            sel = [(q, d, lab >= cfg.min_grade) for q, d, lab in zip(*(j.column(c).to_pylist() for c in ("qid", "docid", "label")), strict=True)
                   if q in annotated and (q, d) in same]  # fmt: skip
            found["judge"] = (sel, f"relevance judge, label >= {cfg.min_grade}")
        k = max(1, round(float(np.mean([sum(g.values()) for q, g in gold.items() if q in annotated] or [1]))))
        if cfg.features:
            f = read_table(cfg.features)
            keep = np.array(
                [
                    q in annotated and (q, d) in same
                    for q, d in zip(f.column("qid").to_pylist(), f.column("docid").to_pylist(), strict=True)
                ]
            )
            f = f.filter(pa.array(keep))
            for col, name in (("bm25", "BM25"), ("dense_cos", "MiniLM cosine")):
                if col in f.column_names:
                    rows = top_k_selection(f.column("qid").to_pylist(), f.column("docid").to_pylist(),
                                           f.column(col).to_pylist(), k)  # fmt: skip
                    found[f"{col}_top{k}"] = (
                        rows,
                        f"{name} top {k} (k = the mean number of human positives)",
                    )
        results = {}
        for name, (rows, what) in found.items():
            q = selection_quality(rows, gold, n_boot=cfg.bootstrap).as_dict()
            results[name] = {"what": what, **q}
        stats = {m: {k2: man.get(k2) for k2 in ("parse_fail_rate", "questions_per_s", "passages_per_s",
                                                 "prompt_version")} | {"stages": man.get("utility", {}).get("stages")}
                 for m, man in manifests.items()}  # fmt: skip
        n_q = len(annotated & {q for q, g in gold.items() if any(g.values())})
        caption = (f"Utility annotation against the human positives (label >= {cfg.min_grade}) of {n_q} held-out "
                   "questions (their labels trained and calibrated nothing); F1 per question with a 95% bootstrap "
                   "interval over questions. The top-k baselines know how many positives to pick.")  # fmt: skip
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        summary = {"caption": caption, "rows": results, "annotation": stats, "k": k, "questions": n_q}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        lines = [
            caption,
            "",
            "| labels | P | R | F1 | F1/question | 95% CI | positives/q |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results.values():
            lines.append(f"| {r['what']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
                         f"{r['f1_per_question']:.3f} | [{r['f1_ci'][0]:.3f}, {r['f1_ci'][1]:.3f}] | "
                         f"{r['positives_per_question']:.2f} |")  # fmt: skip
        (out / "table.md").write_text("\n".join(lines) + "\n")
        _plot(results, out / "f1.png")
    return write_stage_files(out, "utility.eval", cfg, {"questions": n_q, "rows": len(results)},
                             [*cfg.utility.values(), cfg.pairs], timer.seconds, summary)  # fmt: skip


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    f1 = [results[n]["f1_per_question"] for n in names]
    lo = [f - results[n]["f1_ci"][0] for n, f in zip(names, f1, strict=True)]
    hi = [results[n]["f1_ci"][1] - f for n, f in zip(names, f1, strict=True)]
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1))
    ax.barh(names, f1, xerr=[lo, hi], color="#4c78a8")
    ax.set_xlabel("F1 per question vs human positives (95% CI)")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
