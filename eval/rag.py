"""Answer and retrieval metrics of retrieval-augmented generation, per question, and their means (no Ray here).

- ``exact_match`` and ``token_f1``: the SQuAD v1.1 / HotpotQA official definitions (the official normalisation:
  lower case, ASCII punctuation removed, articles a/an/the removed, whitespace collapsed; F1 over normalised
  tokens with HotpotQA's rule that a yes / no / noanswer on either side scores 0 unless both are equal), the best
  over the gold aliases as SQuAD does.
- ``answer_in_context``: answer recall of the retrieved passages (a normalised gold alias inside a normalised
  passage as whole tokens), the retrieval-side measure that does not depend on the generator.
- ``supporting_recall``: the share of the gold supporting passages among the retrieved ones.
- ``summarize`` / ``paired_difference``: means with 95% percentile-bootstrap intervals over questions.

Departures from the official scripts, all on degenerate input: gold aliases that normalise to nothing ("The",
"!") are ignored; a question without any other alias gets None from every answer measure instead of an arbitrary
0 or 1 (or the official script's crash on an empty list), so that ``summarize`` leaves it out and counts it like a
question without supporting passages; an empty prediction scores 0 in both measures.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from eval.ranking import bootstrap_ci, bootstrap_resamples

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)
# HotpotQA's answer types that are labels, not spans: half a "yes" is not partly right.
_LABEL_ANSWERS = frozenset({"yes", "no", "noanswer"})
DEFAULT_METRICS = ("em", "f1", "answer_in_context", "supporting_recall")


def normalize_answer(s: str) -> str:
    """The official SQuAD v1.1 / HotpotQA normalisation, step for step (lower, punctuation, articles, spaces)."""
    return " ".join(_ARTICLES.sub(" ", s.lower().translate(_DROP_PUNCTUATION)).split())


def _reject_single_string(value: object, name: str) -> None:
    # A bare string is a Sequence[str] of characters: "Paris" would be scored as five one-letter aliases.
    if isinstance(value, (str, bytes)):
        raise TypeError(
            f"{name} must be a sequence of strings, not one string ({value!r}); wrap it in a list"
        )


def _normalized_golds(golds: Sequence[str]) -> list[str]:
    _reject_single_string(golds, "golds")
    return [g for g in (normalize_answer(str(a)) for a in golds if a is not None) if g]


def has_gold_answer(golds: Sequence[str]) -> bool:
    """Whether ``golds`` has an alias that is not empty after normalisation: the questions EM / F1 can score."""
    return bool(_normalized_golds(golds))


def exact_match(prediction: str, golds: Sequence[str]) -> float | None:
    """1.0 when the normalised prediction equals a normalised gold alias, else 0.0 (an empty prediction: 0.0);
    None without a gold alias."""
    norm_golds = _normalized_golds(golds)
    if not norm_golds:
        return None
    pred = normalize_answer(prediction or "")
    return 1.0 if pred in norm_golds else 0.0


def _f1(pred: str, gold: str) -> float:
    if (pred in _LABEL_ANSWERS or gold in _LABEL_ANSWERS) and pred != gold:
        return 0.0
    pred_tokens, gold_tokens = pred.split(), gold.split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: Sequence[str]) -> float | None:
    """SQuAD token F1 with HotpotQA's yes / no / noanswer rule, the best over the gold aliases; None without a
    gold alias."""
    norm_golds = _normalized_golds(golds)
    if not norm_golds:
        return None
    pred = normalize_answer(prediction or "")
    return max(_f1(pred, g) for g in norm_golds)


#: answers that are labels, not spans: a passage "containing" them says nothing (HotpotQA: 16% of questions)
LABEL_ANSWERS = frozenset({"yes", "no", "noanswer"})


def answer_in_context(golds: Sequence[str], passages: Sequence[str]) -> bool | None:
    """Whether a normalised gold alias occurs in a normalised passage as a run of whole tokens ("art" is not in
    "party"); None without a gold alias, or when every alias is a label (yes / no / noanswer: the word "no" in a
    passage is no evidence, and the gold passages rarely hold it). Normalisation removes punctuation without a
    space, so "York-based" is the one token "yorkbased" and does not contain "york", as in the official EM."""
    _reject_single_string(passages, "passages")
    norm_golds = [g for g in _normalized_golds(golds) if g not in LABEL_ANSWERS]
    if not norm_golds:
        return None
    # Normalised text has single spaces between tokens, so padding turns a substring test into a token test.
    texts = [f" {normalize_answer(p)} " for p in passages if p]
    return any(f" {g} " in t for g in norm_golds for t in texts)


def supporting_recall(retrieved: Sequence[str], supporting: Collection[str]) -> float | None:
    """Share of the gold supporting docids that are among ``retrieved``; None when no docid is supporting."""
    _reject_single_string(retrieved, "retrieved")
    _reject_single_string(supporting, "supporting")
    gold = {str(d) for d in supporting}
    if not gold:
        return None
    return len(gold & {str(d) for d in retrieved}) / len(gold)


def _number(v: object, where: str) -> float | None:
    if v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where} is {v!r}, not a number, a bool or None") from None
    # pandas and Arrow conversions turn a null into NaN: the same "not applicable" as None.
    return None if math.isnan(x) else x


def summarize(
    rows: Sequence[Mapping],
    metrics: Sequence[str] = DEFAULT_METRICS,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float | int | None]]:
    """Per metric: {"mean", "ci_low", "ci_high", "n"} over the rows where the metric is present and not None or
    NaN (a bool counts 0 / 1); the CI is a 95% percentile bootstrap over rows (one row per question). With n = 0
    the mean and CI are None (valid JSON, and "not applicable" rather than a number)."""
    _reject_single_string(metrics, "metrics")
    if bootstrap < 1:
        raise ValueError(f"bootstrap must be at least 1 resample, got {bootstrap}")
    out: dict[str, dict[str, float | int | None]] = {}
    for m in metrics:
        values = [v for i, r in enumerate(rows) if (v := _number(r.get(m), f"row {i}: {m!r}")) is not None]
        if not values:
            out[m] = {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
            continue
        low, high = bootstrap_ci(values, n_boot=bootstrap, seed=seed)
        out[m] = {"mean": float(np.mean(values)), "ci_low": low, "ci_high": high, "n": len(values)}
    return out


def paired_difference(
    a: Sequence[float | None], b: Sequence[float | None], bootstrap: int = 1000, seed: int = 0
) -> dict[str, float | int | None]:
    """mean(a - b) over the same questions (position i of ``a`` and ``b`` is one question; pairs where either is
    None or NaN are left out and not counted in n), with a paired 95% percentile-bootstrap interval and ``p``, the
    share of resamples whose mean difference is <= 0 (one-sided: how often a does not beat b); ``ratio`` is
    mean(a) / mean(b) with its paired interval (None where mean(b) is 0 or too many resamples have mean(b) 0): the
    form of a claim like "reaches 0.98x of b". Without a pair, the figures are None and n is 0."""
    if len(a) != len(b):
        raise ValueError(f"a and b must score the same questions: {len(a)} values against {len(b)}")
    if bootstrap < 1:
        raise ValueError(f"bootstrap must be at least 1 resample, got {bootstrap}")
    numbers = [
        (_number(x, f"a[{i}]"), _number(y, f"b[{i}]")) for i, (x, y) in enumerate(zip(a, b, strict=True))
    ]
    pairs = [(x, y) for x, y in numbers if x is not None and y is not None]
    if not pairs:
        return {
            "mean": None,
            "ci_low": None,
            "ci_high": None,
            "p": None,
            "n": 0,
            "mean_a": None,
            "mean_b": None,
            "ratio": None,
            "ratio_ci_low": None,
            "ratio_ci_high": None,
        }
    va, vb = np.array(pairs, dtype=np.float64).T
    d = va - vb
    # eval.ranking.bootstrap_ci returns only the interval; the interval, p and the ratio's interval are read off
    # one set of resamples (the same questions drawn for a and b: a paired interval of mean(a) / mean(b)).
    chunks = [(d[i].mean(axis=1), va[i].mean(axis=1), vb[i].mean(axis=1))
              for i in bootstrap_resamples(len(d), bootstrap, seed)]  # fmt: skip
    means, ma, mb = (np.concatenate(c) for c in zip(*chunks, strict=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(mb > 0, ma / mb, np.nan)
    defined = bool(
        vb.mean() > 0 and np.isfinite(ratios).mean() >= 0.975
    )  # a 95% interval needs 97.5% defined
    return {
        "mean": float(d.mean()),
        "ci_low": float(np.percentile(means, 2.5)),
        "ci_high": float(np.percentile(means, 97.5)),
        "p": float(np.mean(means <= 0)),
        "n": len(d),
        "mean_a": float(va.mean()),
        "mean_b": float(vb.mean()),
        "ratio": float(va.mean() / vb.mean()) if vb.mean() > 0 else None,
        "ratio_ci_low": float(np.nanpercentile(ratios, 2.5)) if defined else None,
        "ratio_ci_high": float(np.nanpercentile(ratios, 97.5)) if defined else None,
    }
