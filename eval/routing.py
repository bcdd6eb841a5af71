"""Which judged pairs a human should look at next (no Ray).

Human labels are the scarce input of the whole method: a few hundred of them train and calibrate the judge.
Where to spend the next hundred is a choice with three honest answers, all seeded and deterministic:

- ``uncertain``: the pairs whose label the judge is least sure of (lowest ``confidence``, the judge's
  probability of its own label, ``models.judge.label_confidence``): uncertainty sampling;
- ``random``: uniform over the pool, the baseline every other strategy must beat;
- ``stratified``: the same number of pairs per judge grade (random within a grade), so the rare high grades get
  reviewed at all; a grade with too few pairs gives its share to the others.

``select_for_review`` returns row indices into the arrays it is given, most-worth-a-look first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

STRATEGIES = ("uncertain", "random", "stratified")


def select_for_review(
    label: Sequence[int] | np.ndarray,
    confidence: Sequence[float] | np.ndarray,
    budget: int,
    strategy: str = "uncertain",
    seed: int = 0,
    exclude: Sequence[bool] | np.ndarray | None = None,
) -> np.ndarray:
    """Indices of up to ``budget`` rows to review, in review order.

    Args:
        label: the judge's grade per row.
        confidence: the judge's probability of that grade per row (NaN counts as least sure).
        budget: how many rows to pick (fewer when the pool is smaller).
        strategy: one of ``STRATEGIES``.
        seed: breaks ties (uncertain) and draws (random, stratified) reproducibly.
        exclude: rows not to pick (already labelled by a human).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    label = np.asarray(label)
    conf = np.asarray(confidence, dtype=np.float64)
    if len(conf) != len(label):
        raise ValueError(f"{len(label)} labels but {len(conf)} confidences")
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(~np.asarray(exclude, dtype=bool)) if exclude is not None else np.arange(len(label))
    budget = min(budget, len(pool))
    if strategy == "random":
        return rng.permutation(pool)[:budget]
    if strategy == "uncertain":
        c = np.where(np.isnan(conf[pool]), -np.inf, conf[pool])
        order = np.lexsort((rng.random(len(pool)), c))  # lowest confidence first, ties at random
        return pool[order[:budget]]
    by_grade = {g: list(rng.permutation(pool[label[pool] == g])) for g in np.unique(label[pool])}
    picked: list[int] = []
    while (
        len(picked) < budget
    ):  # round-robin over the grades: equal shares, a short grade's rest to the others
        for g in sorted(by_grade):
            if by_grade[g] and len(picked) < budget:
                picked.append(int(by_grade[g].pop(0)))
    return np.asarray(picked, dtype=np.int64)
