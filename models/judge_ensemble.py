"""The stacked judge: the LLM's grade distribution combined with cheap relevance signals (no Ray here).

Why: a small LLM fine-tuned on about a thousand labels learns the grade prior long before it learns relevance
across queries (on TREC DL 2019 a LoRA-tuned Gemma 3 270M stayed near kappa 0), while an off-the-shelf sentence
encoder already carries relevance from its own training (MiniLM's cosine alone reaches kappa ~0.2 there with
tuned cut-points). ../shared/notes/judge-levers.md lever 5: combining a small generative judge with an embedding
model at the probability level (QUPID) gave a large gain. So the judge may carry a ``GradeCombiner``:

    signals(pair) = [log p_LLM(g) for each grade g, E_LLM[grade], cos(MiniLM(q), MiniLM(d)),
                     share of query words in the passage, log(1 + passage words)]
    P(grade | pair) = softmax(W . standardise(signals) + b)        (multinomial logistic regression)
    label = cut-points on the expected grade, tuned for Cohen's kappa (lever 1)

fit on a *calibration* sample: labelled pairs of queries the LoRA never trained on, drawn with their natural
grade mix (lever 2: train balanced if you like, correct the prior afterwards). Everything the combiner needs
travels with the judge directory as ``combiner.json``; ``EnsembleScorer`` has the ``LabelTokenScorer``
interface, so predict, annotate and serve use it unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eval.agreement import grades_from_cutpoints, tune_cutpoints
from models.features import lexical_features
from models.judge import LabelTokenScorer, Scores

COMBINER_FILE = "combiner.json"
#: the signals a combiner can use, in this order; ``llm_logp_<g>`` are expanded per grade
SIGNALS = ("llm_logp", "llm_score", "dense_cos", "overlap", "doc_len")
LLM_ONLY = ("llm_logp", "llm_score")


def signal_names(signals: Sequence[str], grades: Sequence[int]) -> list[str]:
    names = []
    for s in signals:
        if s not in SIGNALS:
            raise ValueError(f"unknown judge signal {s!r} (known: {', '.join(SIGNALS)})")
        names += [f"llm_logp_{g}" for g in grades] if s == "llm_logp" else [s]
    return names


def pair_signals(
    llm: Scores,
    queries: Sequence[str],
    texts: Sequence[str | None],
    grades: Sequence[int],
    encoder: Any | None = None,
    signals: Sequence[str] = SIGNALS,
) -> dict[str, np.ndarray]:
    """Signal name -> (n,) float64 for parallel pairs, from the LLM's scores and (for ``dense_cos``) ``encoder``:
    anything with ``encode_queries`` / ``encode_passages(texts) -> (n, dim)`` unit vectors. Queries are encoded once each."""
    out: dict[str, np.ndarray] = {}
    if "llm_logp" in signals:
        logp = np.log(np.clip(llm.probs.astype(np.float64), 1e-12, 1.0))
        out.update({f"llm_logp_{g}": logp[:, i] for i, g in enumerate(grades)})
    if "llm_score" in signals:
        out["llm_score"] = llm.score.astype(np.float64)
    if "dense_cos" in signals:
        if encoder is None:
            raise ValueError("signal 'dense_cos' needs an encoder")
        uniq = list(dict.fromkeys(queries))
        qvec = dict(zip(uniq, encoder.encode_queries(uniq), strict=True))
        dvec = encoder.encode_passages(list(texts))
        out["dense_cos"] = np.einsum("ij,ij->i", np.stack([qvec[q] for q in queries]), dvec).astype(
            np.float64
        )
    if "overlap" in signals or "doc_len" in signals:
        lex = lexical_features(queries, texts)
        for name in ("overlap", "doc_len"):
            if name in signals:
                out[name] = lex[name].astype(np.float64)
    return out


@dataclass
class GradeCombiner:
    """Multinomial logistic regression from standardised pair signals to grade probabilities, plus cut-points.

    Inputs to ``fit``: ``signals`` (name -> (n,) array, see ``pair_signals``), ``human`` (n,) grades in
    ``grades``. ``predict_proba`` returns (n, G) probabilities whose columns follow ``grades``; the label is
    the expected grade cut at ``cutpoints`` (tuned for kappa on the same calibration pairs).
    """

    features: list[str]
    grades: list[int]
    mean: list[float]
    scale: list[float]
    coef: list[list[float]]  # (G, F)
    intercept: list[float]  # (G,)
    cutpoints: list[float]
    signals: list[str] = field(default_factory=lambda: list(SIGNALS))
    encoder: str | None = None  # the dense encoder behind dense_cos: a path or hub id, None = packaged MiniLM
    encoder_dtype: str = "fp32"
    fit_report: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str:
        blob = json.dumps([self.features, self.coef, self.intercept, self.cutpoints, self.mean, self.scale])
        return "stack@" + hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def needs_encoder(self) -> bool:
        return "dense_cos" in self.features

    @property
    def uses_llm(self) -> bool:
        return bool(set(self.signals) & set(LLM_ONLY))

    @classmethod
    def fit(
        cls,
        signals: dict[str, np.ndarray],
        human: np.ndarray,
        grades: Sequence[int],
        use: Sequence[str] = SIGNALS,
        c: float = 1.0,
        encoder: str | None = None,
        encoder_dtype: str = "fp32",
    ) -> GradeCombiner:
        from sklearn.linear_model import LogisticRegression

        grades = list(grades)
        names = signal_names(use, grades)
        missing = [n for n in names if n not in signals]
        if missing:
            raise ValueError(f"signals missing for the combiner: {missing}")
        human = np.asarray(human, dtype=int)
        present = sorted(set(human.tolist()))
        if len(present) < 2:
            raise ValueError(f"calibration pairs need at least two grades, got only {present}")
        x = np.column_stack([signals[n] for n in names])
        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale[scale < 1e-9] = 1.0
        lr = LogisticRegression(C=c, max_iter=2000)
        lr.fit((x - mean) / scale, human)
        # Columns follow ``grades``; a grade absent from the calibration sample gets no probability. With two
        # grades present sklearn keeps one weight vector w (class 1 vs 0): the softmax form is -w/2, +w/2.
        w, b = lr.coef_, lr.intercept_
        if len(lr.classes_) == 2:
            w, b = np.vstack([-w[0] / 2, w[0] / 2]), np.array([-b[0] / 2, b[0] / 2])
        coef = np.zeros((len(grades), x.shape[1]))
        intercept = np.full(len(grades), -1e4)
        for row, g in enumerate(lr.classes_):
            coef[grades.index(int(g))], intercept[grades.index(int(g))] = w[row], b[row]
        combiner = cls(names, grades, mean.tolist(), scale.tolist(), coef.tolist(), intercept.tolist(),
                       cutpoints=[], signals=list(use), encoder=encoder, encoder_dtype=encoder_dtype)  # fmt: skip
        expected = combiner.predict_proba(signals) @ np.asarray(grades, dtype=float)
        combiner.cutpoints = tune_cutpoints(expected, human, grades)
        return combiner

    def predict_proba(self, signals: dict[str, np.ndarray]) -> np.ndarray:
        missing = [n for n in self.features if n not in signals]
        if missing:
            raise ValueError(f"signals missing for the combiner: {missing}")
        x = np.column_stack([np.asarray(signals[n], dtype=np.float64) for n in self.features])
        z = ((x - np.asarray(self.mean)) / np.asarray(self.scale)) @ np.asarray(self.coef).T + np.asarray(
            self.intercept
        )
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def grade(self, signals: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(label, probs, score) as the scorer returns them."""
        probs = self.predict_proba(signals)
        score = probs @ np.asarray(self.grades, dtype=float)
        label = grades_from_cutpoints(score, self.cutpoints, self.grades)
        return label.astype(np.int8), probs.astype(np.float32), score.astype(np.float32)

    def save(self, judge_dir: str | Path) -> Path:
        p = Path(judge_dir) / COMBINER_FILE
        p.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return p

    @classmethod
    def load(cls, path: str | Path) -> GradeCombiner:
        p = Path(path)
        return cls(**json.loads((p / COMBINER_FILE if p.is_dir() else p).read_text()))


class EnsembleScorer:
    """A ``LabelTokenScorer`` whose output goes through a ``GradeCombiner``: same ``score`` signature and
    ``Scores`` result (``probs`` are the combiner's, ``label`` its cut-point grade, ``score`` its expectation),
    so every caller of the plain scorer can take it. When the combiner uses no LLM signal the LLM is not run."""

    def __init__(self, llm: LabelTokenScorer, combiner: GradeCombiner, encoder: Any | None = None):
        if combiner.needs_encoder and encoder is None:
            raise ValueError("this combiner uses dense_cos: pass the encoder it was fit with")
        self.llm, self.combiner, self.encoder = llm, combiner, encoder
        self.grades = tuple(combiner.grades)

    @property
    def prompt_version(self) -> str:
        return f"{self.llm.prompt_version}+{self.combiner.version}"

    def score(self, queries, texts, titles=None, urls=None, use_prefix_cache: bool | None = None) -> Scores:
        if self.combiner.uses_llm or not len(queries):
            s = self.llm.score(queries, texts, titles, urls, use_prefix_cache)
        else:
            # Selection left the LLM out: its forward pass (nearly all the cost) is skipped; the prompt is still
            # encoded so truncation and token counts are reported as for any judge.
            s = self.llm.encoded_without_scores(self.llm.encoder.encode_many(queries, texts, titles, urls))
        if not len(s):
            return s
        sig = pair_signals(s, list(queries), list(texts), self.grades, self.encoder, self.combiner.signals)
        label, probs, score = self.combiner.grade(sig)
        return Scores(label=label, probs=probs, score=score, truncated=s.truncated, n_tokens=s.n_tokens)


def query_folds(qids: Sequence[str], k: int) -> np.ndarray:
    """Fold index per pair, whole queries per fold (round-robin over sorted query ids: deterministic)."""
    uniq = sorted(set(qids))
    fold_of = {q: i % k for i, q in enumerate(uniq)}
    return np.array([fold_of[q] for q in qids])


def cross_validated_grades(
    signals: dict[str, np.ndarray],
    human: np.ndarray,
    qids: Sequence[str],
    grades: Sequence[int],
    use: Sequence[str],
    c: float = 1.0,
    k: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """(label, score) for every calibration pair from a combiner fit on the other query folds: an honest
    estimate of the stacked judge on unseen queries (fitting and scoring the same pairs flatters it)."""
    folds = query_folds(qids, min(k, len(set(qids))))
    label, score = np.zeros(len(human), dtype=np.int8), np.zeros(len(human), dtype=np.float32)
    human = np.asarray(human)
    for f in np.unique(folds):
        train = folds != f
        present = np.unique(human[train])
        if len(present) < 2:  # the other folds hold one grade only: the only honest prediction is that grade
            label[~train], score[~train] = present[0], present[0]
            continue
        part = {n: v[train] for n, v in signals.items()}
        comb = GradeCombiner.fit(part, human[train], grades, use=use, c=c)
        held = {n: v[~train] for n, v in signals.items()}
        label[~train], _, score[~train] = comb.grade(held)
    return label, score


def kappa_gain_se(
    human: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    qids: Sequence[str],
    grades: Sequence[int],
    n_boot: int = 200,
    seed: int = 0,
) -> float:
    """Standard error of kappa(human, after) - kappa(human, before) from a paired bootstrap over queries:
    how much of a selection step's gain the choice of calibration queries alone could produce."""
    from eval.agreement import _kappa, query_resamples

    diffs = []
    for idx in query_resamples(qids, n_boot, seed):
        d = _kappa(human[idx], after[idx], grades) - _kappa(human[idx], before[idx], grades)
        if not np.isnan(d):
            diffs.append(d)
    return float(np.std(diffs, ddof=1)) if len(diffs) > 1 else float("nan")


def select_signals(
    signals: dict[str, np.ndarray],
    human: np.ndarray,
    qids: Sequence[str],
    grades: Sequence[int],
    candidates: Sequence[str] = SIGNALS,
    c: float = 1.0,
    k: int = 5,
    min_gain: float = 0.005,
    min_gain_se: float = 1.0,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Greedy forward selection of signal groups by query-fold cross-validated kappa on the calibration pairs.

    Adds, one at a time, the group that raises the held-out kappa most, and stops when the best gain is below
    ``max(min_gain, min_gain_se * SE)``, SE being the standard error of that gain over a paired bootstrap of
    the calibration queries (``kappa_gain_se``): a signal that only fits the calibration queries stays out.
    The SE term is the one-standard-error rule of model selection; it scales with the calibration set, so a
    few hundred pairs of a few queries (where the fold kappas are noisy enough to admit noise) need no hand
    tuning. On TREC DL 2019, a LoRA-tuned Gemma 3 270M's own signals lowered the held-out kappa and stayed out.
    The first group always enters (the judge needs one). Returns the chosen groups and the path taken."""
    from eval.agreement import _kappa

    human = np.asarray(human)
    chosen: list[str] = []
    best, best_label = -1.0, None
    path: list[dict[str, Any]] = []
    while True:
        labels = {
            s: cross_validated_grades(signals, human, qids, grades, [*chosen, s], c, k)[0]
            for s in candidates
            if s not in chosen
        }
        trials = {s: _kappa(human, lab, grades) for s, lab in labels.items()}
        trials = {s: v for s, v in trials.items() if not np.isnan(v)}
        if not trials:
            break
        s, v = max(trials.items(), key=lambda kv: kv[1])
        step: dict[str, Any] = {"added": s, "cv_kappa": round(float(v), 4)}
        if chosen:
            se = kappa_gain_se(human, best_label, labels[s], qids, grades)
            need = max(min_gain, min_gain_se * se) if not np.isnan(se) else min_gain
            if v - best < need:
                path.append(
                    {"stopped": s, "gain": round(float(v - best), 4), "needed": round(float(need), 4)}
                )
                break
            step |= {"gain": round(float(v - best), 4), "gain_se": round(float(se), 4)}
        chosen.append(s)
        best, best_label = v, labels[s]
        path.append(step | {"tried": {n: round(float(x), 4) for n, x in trials.items()}})
    return chosen, path


def describe_selection(path: Sequence[dict[str, Any]]) -> str:
    """One line for a log: the selection path of ``select_signals``."""
    parts = []
    for step in path:
        if "stopped" in step:
            parts.append(
                f"stopped before {step['stopped']} ({step['gain']:+.3f} < {step['needed']:.3f} needed)"
            )
        elif "gain" in step:
            parts.append(
                f"+ {step['added']} -> {step['cv_kappa']:.3f} ({step['gain']:+.3f}, SE {step['gain_se']:.3f})"
            )
        else:
            parts.append(f"{step['added']} {step['cv_kappa']:.3f}")
    return "; ".join(parts) if parts else "no selection"


def fit_stacked(
    signals: dict[str, np.ndarray],
    human: np.ndarray,
    qids: Sequence[str],
    grades: Sequence[int],
    candidates: Sequence[str] = SIGNALS,
    c: float = 1.0,
    folds: int = 5,
    select: bool = True,
    min_gain: float = 0.005,
    min_gain_se: float = 1.0,
    **combiner_kw: Any,
) -> tuple[GradeCombiner, list[dict[str, Any]]]:
    """The combiner ``judge calibrate`` fits: signal groups chosen by ``select_signals`` (when ``select`` and
    the calibration pairs span two or more queries), then ``GradeCombiner.fit`` on all the pairs."""
    use, path = list(candidates), []
    if select and len(set(qids)) >= 2 and len(use) > 1:
        use, path = select_signals(signals, human, qids, grades, candidates, c, folds, min_gain, min_gain_se)
    return GradeCombiner.fit(signals, human, grades, use=use, c=c, **combiner_kw), path
