"""Buying human labels in rounds (active labelling) and comparing two ways of choosing them (no Ray here).

A learning curve: start from ``start`` human labels drawn at random from a pool, fit the judge on what has been
bought, let a strategy choose the next ``step`` pairs from the judge's labels and confidences, buy their human
labels, re-fit, until ``until`` labels are spent. The strategies are those of ``eval.routing.select_for_review``
(uncertain, random, stratified) plus ``mixed``: half the round by uncertainty, half at random. Mixing is the
usual guard when the judge is weak: its least-sure pairs are then often the ones no signal can decide, and pure
uncertainty sampling spends the budget on noise while the stack's calibration set drifts away from the natural
grade mix it has to predict.

``learning_curve`` is plain Python over index arrays: the caller's ``fit`` does the modelling, so the loop is the
same for any judge. ``paired_kappa_difference`` is the paired query-bootstrap interval used to compare two
strategies on the same held-out pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from eval.agreement import query_resamples
from eval.routing import STRATEGIES as ROUTING_STRATEGIES
from eval.routing import select_for_review

STRATEGIES = (*ROUTING_STRATEGIES, "mixed")


def first_labels(pool: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` rows drawn at random (seeded) from the boolean ``pool`` mask: the start every strategy shares."""
    rows = np.flatnonzero(np.asarray(pool, dtype=bool))
    if n > len(rows):
        raise ValueError(f"start: {n} labels asked for but the pool holds {len(rows)} pairs")
    return np.sort(np.random.default_rng(seed).permutation(rows)[:n])


def choose(
    label: np.ndarray,
    confidence: np.ndarray,
    budget: int,
    strategy: str,
    seed: int,
    exclude: np.ndarray,
) -> np.ndarray:
    """The next ``budget`` rows to buy (never an excluded one), by ``strategy`` (one of ``STRATEGIES``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if strategy != "mixed":
        return select_for_review(label, confidence, budget, strategy, seed, exclude)
    half = select_for_review(label, confidence, budget // 2, "uncertain", seed, exclude)
    taken = np.asarray(exclude, dtype=bool).copy()
    taken[half] = True
    rest = select_for_review(label, confidence, budget - len(half), "random", seed + 1, taken)
    return np.concatenate([half, rest])


@dataclass
class Round:
    """One point of a learning curve: the rows whose human label was bought, and the judge fit on them, as
    ``fit`` returned it for every row (label and confidence arrays, plus whatever else it returned)."""

    bought: np.ndarray
    label: np.ndarray
    confidence: np.ndarray
    extra: object = None


def learning_curve(
    pool: np.ndarray,
    fit: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, object]],
    strategy: str,
    start: int,
    step: int,
    until: int,
    seed: int,
    first: np.ndarray | None = None,
    first_fit: tuple[np.ndarray, np.ndarray, object] | None = None,
) -> Iterator[Round]:
    """Rounds of buying ``step`` human labels from the boolean ``pool`` mask until ``until`` are bought.

    ``fit(bought_rows) -> (label, confidence, extra)`` fits the judge on the bought rows and predicts every row
    (arrays as long as ``pool``). The first round is ``first`` (default ``first_labels(pool, start, seed)``);
    ``first_fit``, when given, is ``fit(first)`` already computed (every strategy shares it). Yields one
    ``Round`` per fit, the first at ``start`` labels, the last at ``until`` (or when the pool runs out).
    """
    pool = np.asarray(pool, dtype=bool)
    if step <= 0 or until < start:
        raise ValueError(f"need step > 0 and until >= start, got step={step}, start={start}, until={until}")
    bought = first_labels(pool, start, seed) if first is None else np.asarray(first, dtype=np.int64)
    if not pool[bought].all():
        raise ValueError("first: every starting row must be in the pool")
    result = first_fit if first_fit is not None else fit(bought)
    for r in range(len(pool) + 1):
        label, conf, extra = result
        if len(label) != len(pool) or len(conf) != len(pool):
            raise ValueError(
                f"fit returned {len(label)} labels / {len(conf)} confidences for {len(pool)} rows"
            )
        yield Round(bought, label, conf, extra)
        if len(bought) >= until:
            return
        taken = ~pool
        taken[bought] = True
        new = choose(label, conf, min(step, until - len(bought)), strategy, seed * 1009 + r, taken)
        if not len(new):
            return
        bought = np.concatenate([bought, new])
        result = fit(bought)


def kappa(human: np.ndarray, label: np.ndarray, grades: Sequence[int]) -> float:
    """Cohen's kappa from a bincount confusion matrix: ``eval.agreement.cohen_kappa``'s value (NaN when neither
    side varies), fast enough for thousands of bootstrap resamples of thousands of pairs."""
    grades = np.asarray(sorted(grades))
    human, label = np.asarray(human), np.asarray(label)
    if len(human) == 0 or (len(np.unique(human)) < 2 and len(np.unique(label)) < 2):
        return float("nan")
    g = len(grades)
    cm = np.bincount(np.searchsorted(grades, human) * g + np.searchsorted(grades, label), minlength=g * g)
    cm = cm.reshape(g, g).astype(float)
    n = cm.sum()
    pe = float(cm.sum(1) @ cm.sum(0)) / n**2
    return float((np.trace(cm) / n - pe) / (1 - pe)) if pe < 1 else float("nan")


def kappa_ci(
    human: np.ndarray,
    label: np.ndarray,
    qids: Sequence[str],
    grades: Sequence[int],
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """Cohen's kappa and its 95% interval from a bootstrap over queries."""
    human, label = np.asarray(human), np.asarray(label)
    boots = [kappa(human[i], label[i], grades) for i in query_resamples(qids, n_boot, seed)]
    boots = [b for b in boots if not np.isnan(b)]
    if not boots:
        return kappa(human, label, grades), (float("nan"), float("nan"))
    return kappa(human, label, grades), (float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5)))


def paired_kappa_difference(
    human: np.ndarray,
    label_a: np.ndarray,
    label_b: np.ndarray,
    qids: Sequence[str],
    grades: Sequence[int],
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """kappa(human, a) - kappa(human, b) and its 95% interval from a paired bootstrap over queries (both
    labellings of the same resampled pairs), so query difficulty shared by a and b cancels."""
    human, label_a, label_b = (np.asarray(v) for v in (human, label_a, label_b))
    if not (len(human) == len(label_a) == len(label_b) == len(qids)):
        raise ValueError("human, label_a, label_b and qids must have the same length")
    point = kappa(human, label_a, grades) - kappa(human, label_b, grades)
    diffs = [
        kappa(human[i], label_a[i], grades) - kappa(human[i], label_b[i], grades)
        for i in query_resamples(qids, n_boot, seed)
    ]
    diffs = [d for d in diffs if not np.isnan(d)]
    if not diffs:
        return float(point), (float("nan"), float("nan"))
    return float(point), (float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5)))


def ranker_labels(human: np.ndarray, judge: np.ndarray, bought: np.ndarray) -> np.ndarray:
    """Training labels for a ranker: the human grade where it was bought, the judge's label elsewhere."""
    human, judge = np.asarray(human), np.asarray(judge)
    if len(human) != len(judge):
        raise ValueError(f"{len(human)} human grades but {len(judge)} judge labels")
    out = judge.astype(np.int64).copy()
    out[bought] = human[bought]
    return out
