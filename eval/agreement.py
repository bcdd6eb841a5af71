"""Agreement between a judge and human assessors (no Ray).

Inputs are aligned arrays over the same (qid, docid) pairs: ``human`` grades, the judge's ``label`` (argmax)
and ``score`` (expected grade), and ``qid`` for per-query statistics. With 25-50 queries kappa moves by
several hundredths from query sampling alone, so the headline figures come with a bootstrap interval over
queries (resampling whole queries, not pairs).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau
from sklearn.metrics import cohen_kappa_score, confusion_matrix, precision_recall_fscore_support


def krippendorff_alpha_ordinal(human: np.ndarray, judge: np.ndarray) -> float:
    import krippendorff

    data = np.vstack([human, judge]).astype(float)
    if len(np.unique(data)) < 2:
        return float("nan")
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal"))


def _kappa(h: np.ndarray, j: np.ndarray, grades: Sequence[int], weights: str | None = None) -> float:
    if len(h) == 0 or (len(np.unique(h)) < 2 and len(np.unique(j)) < 2):
        return float("nan")
    return float(cohen_kappa_score(h, j, labels=list(grades), weights=weights))


def cohen_kappa(human: np.ndarray, judge: np.ndarray, grades: Sequence[int] = (0, 1, 2, 3)) -> float:
    """Cohen's kappa over the given grades (nan when neither side varies)."""
    return _kappa(np.asarray(human), np.asarray(judge), grades)


def _tau(h: np.ndarray, s: np.ndarray) -> float:
    if len(h) < 2 or len(np.unique(h)) < 2 or len(np.unique(s)) < 2:
        return float("nan")
    return float(kendalltau(h, s, variant="b").statistic)


def grades_from_cutpoints(score: np.ndarray, cutpoints: Sequence[float], grades: Sequence[int]) -> np.ndarray:
    """Map expected grades to labels: grade i where cutpoints[i-1] <= score < cutpoints[i]."""
    return np.asarray(grades)[np.searchsorted(np.asarray(cutpoints), score, side="right")]


def tune_cutpoints(
    score: np.ndarray,
    human: np.ndarray,
    grades: Sequence[int] = (0, 1, 2, 3),
    steps: int = 101,
    rounds: int = 3,
) -> list[float]:
    """Cut-points on the expected grade that maximise Cohen's kappa (coordinate ascent over a grid).

    The standard ordinal trick (Yamasaki & Tanaka, TMLR 2023): tune on validation data, apply to test data.
    The grid is the scores' own quantiles, not evenly spaced grades: a judge trained on the natural grade mix
    puts nearly all expected grades in a narrow band (say 0.4-0.9), which a 0.075-wide grid over 0-3 cannot
    cut. The search starts from the cut-points that reproduce the human grade mix, then moves each one to
    whatever maximises kappa (forcing the mix itself lowers kappa: ../shared/notes/judge-levers.md, lever 1).
    """
    score, human = np.asarray(score, dtype=float), np.asarray(human)
    grades = sorted(grades)
    unknown = sorted(set(human.tolist()) - set(grades))
    if unknown:
        raise ValueError(f"human grades {unknown} are not among grades {grades}")
    if len(score) == 0:
        return [(a + b) / 2 for a, b in itertools.pairwise(grades)]
    # midpoints between neighbouring distinct quantiles, so a cut never sits on a score
    q = np.unique(np.quantile(score, np.linspace(0, 1, steps)))
    grid = np.unique(np.concatenate([(q[:-1] + q[1:]) / 2, [q[0] - 1e-6, q[-1] + 1e-6]]))
    mix = np.cumsum([np.mean(human == g) for g in grades[:-1]])
    cuts = sorted(float(grid[np.abs(grid - np.quantile(score, m)).argmin()]) for m in mix)
    # Cohen's kappa from a bincount confusion matrix (what cohen_kappa_score computes, ~50x faster): this loop
    # evaluates a few hundred cut-point sets, and the stacked judge's signal selection calls it per fold.
    g = len(grades)
    h_idx = np.searchsorted(np.asarray(grades), human)  # exact: every human grade is in the sorted grades

    def kappa_of(trial: list[float]) -> float:
        j_idx = np.searchsorted(np.asarray(trial), score, side="right")
        cm = np.bincount(h_idx * g + j_idx, minlength=g * g).reshape(g, g).astype(float)
        n = cm.sum()
        pe = float(cm.sum(1) @ cm.sum(0)) / n**2 if n else 1.0
        return (np.trace(cm) / n - pe) / (1 - pe) if pe < 1 else float("nan")

    best = kappa_of(cuts)
    best = -np.inf if np.isnan(best) else best
    for _ in range(rounds):
        for i in range(len(cuts)):
            left = cuts[i - 1] if i else -np.inf
            right = cuts[i + 1] if i + 1 < len(cuts) else np.inf
            for c in grid[(grid >= left) & (grid <= right)]:
                trial = [*cuts[:i], float(c), *cuts[i + 1 :]]
                k = kappa_of(trial)
                if k > best + 1e-12:
                    best, cuts = k, trial
    return [float(c) for c in cuts]


@dataclass
class AgreementReport:
    n_pairs: int
    n_queries: int
    grades: list[int]
    metrics: dict[str, float]
    ci95: dict[str, list[float]]
    per_grade: dict[str, dict[str, float]]
    confusion: list[list[int]]  # rows: human grade, columns: judge label
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "n_pairs": self.n_pairs,
            "n_queries": self.n_queries,
            "grades": self.grades,
            "metrics": self.metrics,
            "ci95": self.ci95,
            "per_grade": self.per_grade,
            "confusion": self.confusion,
            **self.extra,
        }

    def table(self) -> str:
        lines = [f"{'metric':<30} {'value':>7}  95% CI (bootstrap over queries)"]
        for k, v in self.metrics.items():
            ci = self.ci95.get(k)
            ci_s = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            lines.append(f"{k:<30} {v:>7.3f}  {ci_s}")
        return "\n".join(lines)


def _point_metrics(h, j, s, q, grades) -> dict[str, float]:
    per_query = []
    for qid in np.unique(q):
        m = q == qid
        t = _tau(h[m], s[m])
        if not np.isnan(t):
            per_query.append(t)
    return {
        "cohen_kappa": _kappa(h, j, grades),
        "weighted_kappa_quadratic": _kappa(h, j, grades, "quadratic"),
        "krippendorff_alpha_ordinal": krippendorff_alpha_ordinal(h, j),
        "accuracy": float(np.mean(h == j)) if len(h) else float("nan"),
        "kendall_tau_b_pooled": _tau(h, s),
        "kendall_tau_b_per_query_mean": float(np.mean(per_query)) if per_query else float("nan"),
    }


def query_resamples(qids: Sequence[str], n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Row indices of ``n_boot`` bootstrap samples over whole queries (none with fewer than two queries):
    pairs of one query are not independent, so intervals resample queries, not pairs."""
    q = np.asarray(qids).astype(str)
    uniq = np.unique(q)
    if len(uniq) < 2:
        return
    rows_of = {u: np.flatnonzero(q == u) for u in uniq}
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.concatenate([rows_of[u] for u in rng.choice(uniq, size=len(uniq), replace=True)])


def agreement(
    human: np.ndarray,
    label: np.ndarray,
    score: np.ndarray,
    qid: np.ndarray,
    grades: Sequence[int] = (0, 1, 2, 3),
    n_boot: int = 1000,
    seed: int = 0,
) -> AgreementReport:
    """Every agreement figure of the judge issue, with 95% bootstrap intervals over queries."""
    if not (len(human) == len(label) == len(score) == len(qid)):
        raise ValueError("human, label, score and qid must have the same length")
    if len(human) == 0:
        raise ValueError("no pairs to compare")
    for name, v in (("human", human), ("label", label)):
        if not np.isfinite(np.asarray(v, dtype=float)).all():
            raise ValueError(f"{name}: grades must be finite numbers (found NaN or inf)")
    h, j = np.asarray(human, dtype=int), np.asarray(label, dtype=int)
    s, q = np.asarray(score, dtype=float), np.asarray(qid).astype(str)
    grades = list(grades)
    metrics = _point_metrics(h, j, s, q, grades)
    uniq = np.unique(q)
    boot: dict[str, list[float]] = {k: [] for k in metrics}
    for idx in query_resamples(q, n_boot, seed):
        for k, v in _point_metrics(h[idx], j[idx], s[idx], q[idx], grades).items():
            if not np.isnan(v):
                boot[k].append(v)
    ci = {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in boot.items() if v}
    p, r, f, support = precision_recall_fscore_support(h, j, labels=grades, zero_division=0)
    per_grade = {
        str(g): {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(support[i]),
        }
        for i, g in enumerate(grades)
    }
    cm = confusion_matrix(h, j, labels=grades).tolist()
    return AgreementReport(len(h), len(uniq), grades, metrics, ci, per_grade, cm)


def plot_confusion(report: AgreementReport, path: str | Path, title: str = "judge vs human") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(report.confusion)
    row_share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.8, 4.2), dpi=120)
    ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for k in range(cm.shape[1]):
            color = "white" if row_share[i, k] > 0.6 else "black"
            ax.text(
                k, i, f"{cm[i, k]}\n{row_share[i, k]:.0%}", ha="center", va="center", fontsize=8, color=color
            )
    ax.set_xticks(range(len(report.grades)), report.grades)
    ax.set_yticks(range(len(report.grades)), report.grades)
    ax.set_xlabel("judge label")
    ax.set_ylabel("human grade")
    kappa = report.metrics["cohen_kappa"]
    ax.set_title(f"{title}\nkappa {kappa:.3f}, n={report.n_pairs:,}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_calibration(
    human: np.ndarray,
    probs: np.ndarray,
    score: np.ndarray,
    grades: Sequence[int],
    path: str | Path,
    bins: int = 10,
) -> Path:
    """Reliability per grade (predicted P(grade) vs observed share) and expected grade vs mean human grade."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = np.asarray(human)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), dpi=120)
    edges = np.linspace(0, 1, bins + 1)
    ax = axes[0]
    for gi, g in enumerate(grades):
        p = probs[:, gi]
        which = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
        xs, ys, ns = [], [], []
        for b in range(bins):
            m = which == b
            if m.sum() >= 5:
                xs.append(p[m].mean())
                ys.append(np.mean(h[m] == g))
                ns.append(m.sum())
        ax.plot(xs, ys, marker="o", label=f"grade {g}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("judge probability of the grade")
    ax.set_ylabel("share of pairs humans gave that grade")
    ax.set_title("reliability per grade", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1]
    lo, hi = min(grades), max(grades)
    sedges = np.linspace(lo, hi, bins + 1)
    which = np.clip(np.digitize(score, sedges) - 1, 0, bins - 1)
    xs = [score[which == b].mean() for b in range(bins) if (which == b).sum() >= 5]
    ys = [h[which == b].mean() for b in range(bins) if (which == b).sum() >= 5]
    ax.plot(xs, ys, marker="o")
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("judge expected grade")
    ax.set_ylabel("mean human grade")
    ax.set_title("expected grade vs human grade", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_report(report: AgreementReport, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return out / "metrics.json"
