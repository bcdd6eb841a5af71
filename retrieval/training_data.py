"""Training data for dense retrievers: positives from labels, and groups of positives + hard negatives.

Paper 2 (../shared/papers.md, section 2) trains a bi-encoder on groups of 16 passages per query: the query's
positives followed by hard negatives sampled, anew each epoch, from a pool of 30 candidates (BM25 / dense top-k
minus the positives). This module builds those groups from augrel's tables; plain Python and pyarrow, no Ray,
no torch: the Ray Train stage encodes what ``batch_inputs`` returns and feeds ``models.losses``.

Positives come from a label source (``positives_from_labels``): ``human`` (qrels / pairs with a grade),
``judge`` (a judgments table: grade at or above a threshold, or the top fraction of each query's pairs by
expected grade, at least one), or ``utility`` (a table with a ``selected`` flag or a grade). ``mix_positives``
and ``curriculum_stages`` combine human and LLM positives the two ways the paper compares.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

LabelSource = Literal["human", "judge", "utility"]
#: passages looked up per ``doc_text`` call: bounds the texts held at once for a large training set
LOOKUP_CHUNK = 8192
#: qids or (qid, docid) examples a manifest lists per count
EXAMPLES = 5

REJECT_MISSING = "passage missing from the corpus"
REJECT_EMPTY = "empty text"


class LabelsError(ValueError):
    """A labels table cannot give positives (missing columns, null ids); the message names the table and the
    columns. A ValueError, so that retrieval/ needs nothing from pipelines/ (whose stage turns it into a
    DataError)."""


def positives_from_labels(
    table: pa.Table,
    source: LabelSource,
    *,
    min_grade: int = 2,
    threshold: float | None = None,
    top_fraction: float | None = None,
    table_name: str = "labels",
) -> dict[str, list[str]]:
    """qid -> positive docids, best first, for the queries with at least one positive.

    - ``human``: columns qid, docid, label (qrels or pairs); positives are ``label >= min_grade`` (null labels,
      the unlabelled pairs of a pairs table, are not positives). Best first: higher grade, then docid.
    - ``judge``: a judgments table. With ``top_fraction`` (0 < f <= 1): the top ``floor(f * n)`` of each query's
      n judged pairs by ``score`` (the expected grade), at least one, as UtilRank keeps its top 10%; needs qid,
      docid, score. Otherwise ``label >= threshold`` (default ``min_grade``); needs qid, docid, label. Best first:
      higher score (when the table has one), then higher label, then docid.
    - ``utility``: qid, docid and ``selected`` (bool; True is a positive) or, without it, ``label >= min_grade``.
      Best first: ``rank`` ascending when present, else ``utility`` descending when present, else label, then
      docid.

    Raises LabelsError naming ``table_name`` and the missing columns, or a column holding null ids.
    """
    if source not in ("human", "judge", "utility"):
        raise ValueError(f"label source must be human, judge or utility, got {source!r}")
    if source != "judge" and (threshold is not None or top_fraction is not None):
        raise ValueError(f"threshold and top_fraction apply to judge labels, not to {source!r}")
    if threshold is not None and top_fraction is not None:
        raise ValueError("give threshold or top_fraction for judge labels, not both")
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    cols = table.column_names

    if source == "human":
        _require(table, ["qid", "docid", "label"], table_name, source)
        keep = pc.greater_equal(table.column("label"), min_grade)
        order = [("label", "descending")]
    elif source == "judge" and top_fraction is not None:
        _require(table, ["qid", "docid", "score"], table_name, source)
        keep = pc.is_valid(table.column("score"))
        order = [("score", "descending")] + ([("label", "descending")] if "label" in cols else [])
    elif source == "judge":
        _require(table, ["qid", "docid", "label"], table_name, source)
        keep = pc.greater_equal(table.column("label"), min_grade if threshold is None else threshold)
        order = ([("score", "descending")] if "score" in cols else []) + [("label", "descending")]
    else:
        flag = "selected" if "selected" in cols else "label"
        if flag not in cols:
            missing = [c for c in ("qid", "docid") if c not in cols] + ["selected (or label)"]
            raise LabelsError(
                f"{source} labels table {table_name!r} lacks column(s) {missing} (it has {cols})"
            )
        _require(table, ["qid", "docid"], table_name, source)
        if flag == "selected":
            keep = table.column("selected").cast(pa.bool_())
        else:
            keep = pc.greater_equal(table.column("label"), min_grade)
        if "rank" in cols:
            order = [("rank", "ascending")]
        elif "utility" in cols:
            order = [("utility", "descending")]
        else:
            order = [("label", "descending")] if "label" in cols else []

    rows = table.filter(pc.fill_null(keep, False))
    rows = rows.sort_by([("qid", "ascending"), *order, ("docid", "ascending")])
    positives: dict[str, list[str]] = {}
    for qid, docid in zip(rows.column("qid").to_pylist(), rows.column("docid").to_pylist(), strict=True):
        docs = positives.setdefault(qid, [])
        if docid not in docs:
            docs.append(docid)
    if top_fraction is not None:
        judged = Counter(table.filter(pc.is_valid(table.column("score"))).column("qid").to_pylist())
        positives = {
            q: docs[: max(1, math.floor(top_fraction * judged[q] + 1e-9))] for q, docs in positives.items()
        }
    return positives


def graded_relevant(
    table: pa.Table, *, min_grade: int = 1, table_name: str = "labels"
) -> dict[str, set[str]]:
    """qid -> the docids a labels table grades relevant at any level (``label >= min_grade``, default 1, or
    ``selected``): the ``exclude`` of ``build_groups``, so that no labelled-relevant passage is a negative."""
    flag = "label" if "label" in table.column_names else "selected"
    _require(table, ["qid", "docid", flag], table_name, "relevance")
    keep = pc.greater_equal(table.column(flag), min_grade) if flag == "label" else table.column(flag)
    rows = table.filter(pc.fill_null(keep, False))
    out: dict[str, set[str]] = {}
    for qid, docid in zip(rows.column("qid").to_pylist(), rows.column("docid").to_pylist(), strict=True):
        out.setdefault(qid, set()).add(docid)
    return out


def _require(table: pa.Table, columns: Sequence[str], table_name: str, source: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise LabelsError(
            f"{source} labels table {table_name!r} lacks column(s) {missing} (it has {table.column_names})"
        )
    for c in ("qid", "docid"):
        if c in columns and table.column(c).null_count:
            raise LabelsError(f"{source} labels table {table_name!r}: column {c!r} holds null values")


def sample_queries(qids: Iterable[str], fraction: float, seed: int) -> set[str]:
    """A seeded sample of ``round(fraction * n)`` of the distinct qids, at least one when ``fraction > 0``;
    the same for the same qids in any order."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    pool = sorted(set(qids))
    if fraction == 0 or not pool:
        return set()
    k = max(1, math.floor(fraction * len(pool) + 0.5))
    chosen = np.random.default_rng(seed).choice(len(pool), size=k, replace=False)
    return {pool[i] for i in chosen}


def mix_positives(
    human: Mapping[str, Sequence[str]], llm: Mapping[str, Sequence[str]], human_fraction: float, seed: int
) -> tuple[dict[str, list[str]], set[str]]:
    """One pool of positives: a seeded ``human_fraction`` of the human-labelled queries take their human
    positives, every other query its LLM positives. Returns the pool and the qids that took human positives.

    A human-labelled query outside the sample and without LLM positives has none in the pool (``build_groups``
    counts it as skipped when it is among the training queries).
    """
    chosen = sample_queries([q for q, docs in human.items() if docs], human_fraction, seed)
    mixed = {q: list(docs) for q, docs in llm.items() if docs and q not in chosen}
    mixed.update({q: list(human[q]) for q in chosen})
    return dict(sorted(mixed.items())), chosen


@dataclass(frozen=True)
class CurriculumStage:
    name: str
    positives: dict[str, list[str]]


def curriculum_stages(
    llm: Mapping[str, Sequence[str]], human: Mapping[str, Sequence[str]], human_fraction: float, seed: int
) -> list[CurriculumStage]:
    """Paper 2's curriculum: stage ``llm`` trains on the LLM positives of every query, then stage ``human`` (one
    more epoch, learning rate reset) on the human positives of a seeded ``human_fraction`` of the
    human-labelled queries (the paper's 20% setting: 0.2)."""
    chosen = sample_queries([q for q, docs in human.items() if docs], human_fraction, seed)
    return [
        CurriculumStage("llm", {q: list(docs) for q, docs in sorted(llm.items()) if docs}),
        CurriculumStage("human", {q: list(human[q]) for q in sorted(chosen)}),
    ]


@dataclass(frozen=True)
class TrainingGroup:
    """One query and its group: ``positives`` then ``negatives``, ``group_size`` passages in all."""

    qid: str
    query: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...]

    @property
    def docids(self) -> tuple[str, ...]:
        return self.positives + self.negatives

    @property
    def positive_mask(self) -> tuple[bool, ...]:
        return (True,) * len(self.positives) + (False,) * len(self.negatives)


def batch_inputs(groups: Sequence[TrainingGroup]) -> tuple[list[str], list[str], list[list[bool]]]:
    """What the losses of ``models.losses`` take, for a batch of B groups of G passages: the B query texts,
    the B*G docids group-major (rows ``i*G .. i*G+G-1`` are group i) and the (B, G) positive mask."""
    sizes = {len(g.docids) for g in groups}
    if len(sizes) > 1:
        raise ValueError(f"groups of different sizes {sorted(sizes)} cannot share a batch")
    docids = [d for g in groups for d in g.docids]
    return [g.query for g in groups], docids, [list(g.positive_mask) for g in groups]


@dataclass
class GroupSet:
    """The training groups of every usable query, before negatives are sampled, plus a manifest of what was
    kept, skipped, rejected and filled (see ``build_groups``).

    ``epoch(e)`` samples each query's negatives from its pool and shuffles the queries, both seeded by
    (seed, e): the same epoch gives the same groups in the same order, another epoch other negatives and
    another order.
    """

    queries: dict[str, str]
    positives: dict[str, tuple[str, ...]]
    #: negative pool per qid: its candidates, best first, minus known positives, excluded and rejected passages
    pools: dict[str, tuple[str, ...]]
    #: per qid: the passages that may never be its negatives (all its known positives, its excluded ones)
    blocked: dict[str, frozenset[str]]
    #: every valid pool passage of every query, sorted: the random passages that fill a short pool
    fill: tuple[str, ...]
    group_size: int
    seed: int
    manifest: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def qids(self) -> list[str]:
        return sorted(self.queries)

    def epoch_order(self, epoch: int) -> list[str]:
        """The qids in the order epoch ``epoch`` visits them."""
        qids = self.qids
        rng = np.random.default_rng([self.seed, epoch, 0])
        return [qids[i] for i in rng.permutation(len(qids))]

    def epoch(self, epoch: int) -> list[TrainingGroup]:
        """Every query's group for epoch ``epoch``, in ``epoch_order(epoch)``, with negatives sampled without
        replacement from the query's pool (seeded by seed and epoch)."""
        rng = np.random.default_rng([self.seed, epoch, 1])
        negatives = {q: self._negatives(q, rng) for q in self.qids}
        return [
            TrainingGroup(q, self.queries[q], self.positives[q], negatives[q])
            for q in self.epoch_order(epoch)
        ]

    def _negatives(self, qid: str, rng: np.random.Generator) -> tuple[str, ...]:
        pool, need = self.pools[qid], self.group_size - len(self.positives[qid])
        if len(pool) >= need:
            return tuple(pool[i] for i in rng.choice(len(pool), size=need, replace=False))
        chosen = list(pool)
        taken = set(pool) | self.blocked[qid]
        # most of the fill is eligible: draw at random and skip the ineligible before listing the eligible
        for _ in range(8 * (need - len(chosen))):
            if len(chosen) == need or not self.fill:
                break
            d = self.fill[int(rng.integers(len(self.fill)))]
            if d not in taken:
                chosen.append(d)
                taken.add(d)
        if len(chosen) < need:
            eligible = [d for d in self.fill if d not in taken]
            k = min(need - len(chosen), len(eligible))
            chosen += [eligible[i] for i in rng.choice(len(eligible), size=k, replace=False)]
        if len(chosen) < need:
            # the whole training set has too few distinct passages (a tiny corpus): repeat some
            distinct = list(chosen)
            chosen += [distinct[i] for i in rng.integers(len(distinct), size=need - len(chosen))]
        return tuple(chosen)

    def fingerprint(self) -> str:
        """A hash of everything that decides the groups (queries, positives, pools, group size, seed)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([self.group_size, self.seed]).encode())
        for q in self.qids:
            parts = [q, self.queries[q], self.positives[q], self.pools[q], sorted(self.blocked[q])]
            h.update(json.dumps(parts).encode())
        return h.hexdigest()


Candidates = Callable[[list[str]], list[list[str]]] | Mapping[str, Sequence[str]]
DocText = Callable[[Sequence[str]], Sequence[str | None]]


def build_groups(
    queries: Mapping[str, str],
    positives: Mapping[str, Sequence[str]],
    candidates: Candidates,
    doc_text: DocText,
    *,
    group_size: int = 16,
    max_positives: int = 8,
    exclude: Mapping[str, set[str]] | None = None,
    seed: int = 0,
) -> GroupSet:
    """The training groups of ``queries`` (qid -> text).

    ``positives``: qid -> docids, best first (``positives_from_labels``, ``mix_positives``). ``candidates``:
    qid -> ranked docids (BM25 or dense top-k), as a mapping or as a function of a list of qids returning one
    ranked list per qid. ``doc_text``: docids -> texts, None for a docid not in the corpus (a ``DocStore``
    lookup). ``exclude``: qid -> passages never to use as its negatives (those the labels grade relevant at any
    level, ``graded_relevant``).

    Per query: the positives whose passage exists and has text, the first ``max_positives`` of them (for InfoNCE
    the trainer asks for 1), then ``group_size - len(positives)`` negatives per epoch from its pool: its
    candidates minus all its known positives (used or not), minus ``exclude``, minus passages missing or empty.
    A query with no usable positive is skipped and counted; so is one with an empty query text.

    When a pool holds fewer negatives than a group needs, the rest are random passages from the other
    queries' pools (valid corpus passages, none known relevant to this query). Repeating the query's own
    negatives instead would count them twice in the softmax's denominator, over-weighting a few passages; the
    other pools are already looked up, so the fill costs no corpus access. Only when the training set holds too
    few distinct passages does a negative repeat. Both are counted in the manifest.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (a positive and a negative), got {group_size}")
    if not 1 <= max_positives < group_size:
        raise ValueError(
            f"max_positives must be in [1, group_size - 1 = {group_size - 1}], got {max_positives}"
        )
    exclude = exclude or {}
    manifest: dict[str, Any] = {"queries_in": len(queries), "group_size": group_size,
                                "max_positives": max_positives, "seed": seed}  # fmt: skip

    unknown = sorted(q for q, docs in positives.items() if docs and q not in queries)
    manifest["positives_of_unknown_queries"] = _count(unknown)
    no_text = sorted(q for q, text in queries.items() if not (text or "").strip())
    no_text_set = set(no_text)
    manifest["queries_skipped_empty_text"] = _count(no_text)

    texts = _lookup(sorted({d for q in queries for d in positives.get(q, ())}), doc_text)
    rejected: list[tuple[str, str, str]] = []
    used: dict[str, tuple[str, ...]] = {}
    truncated = 0
    for qid in sorted(queries):
        if qid in no_text_set:
            continue
        valid = []
        for d in dict.fromkeys(positives.get(qid, ())):
            reason = _problem(texts[d])
            if reason:
                rejected.append((qid, d, reason))
            else:
                valid.append(d)
        if valid:
            truncated += len(valid) > max_positives
            used[qid] = tuple(valid[:max_positives])
    no_positive = sorted(q for q in queries if q not in used and q not in no_text_set)
    manifest["queries_skipped_no_positive"] = _count(no_positive)
    manifest["positives_rejected"] = {
        "count": len(rejected),
        "reasons": dict(Counter(r for _, _, r in rejected)),
        "examples": [list(r) for r in rejected[:EXAMPLES]],
    }
    manifest["queries_over_max_positives"] = truncated

    qids = sorted(used)
    ranked = _ranked_candidates(candidates, qids)
    blocked = {q: frozenset(positives.get(q, ())) | frozenset(exclude.get(q, ())) for q in qids}
    raw_pools = {q: [d for d in dict.fromkeys(ranked[q]) if d not in blocked[q]] for q in qids}
    looked_up = sorted({d for pool in raw_pools.values() for d in pool})
    problems = {d: _problem(t) for d, t in _lookup(looked_up, doc_text).items()}
    bad = {d for d, p in problems.items() if p}
    bad_negatives = Counter(problems[d] for d in bad)
    pools = {q: tuple(d for d in pool if d not in bad) for q, pool in raw_pools.items()}
    fill = tuple(d for d in looked_up if d not in bad)
    # distinct candidate passages, not (query, passage) pairs
    manifest["negatives_rejected"] = {"count": sum(bad_negatives.values()), "reasons": dict(bad_negatives)}
    manifest["candidates_removed_as_known_relevant"] = sum(len(set(ranked[q]) & blocked[q]) for q in qids)

    fill_set = set(fill)
    short, slots, repeat, no_negative = [], 0, [], []
    for q in qids:
        need = group_size - len(used[q])
        if len(pools[q]) >= need:
            continue
        # the pool is part of the fill and shares nothing with blocked: count without copying the fill
        eligible = len(fill_set) - sum(1 for d in blocked[q] if d in fill_set)
        if eligible == 0:
            no_negative.append(q)
            continue
        short.append(q)
        slots += need - len(pools[q])
        if eligible < need:
            repeat.append(q)
    for q in no_negative:
        del used[q]
        del pools[q]
        del blocked[q]
    manifest["queries_skipped_no_negative"] = _count(no_negative)
    manifest["queries_short_of_negatives"] = {
        **_count(short),
        "fill": "random passages from other queries' candidate pools",
        "slots_filled_per_epoch": slots,
        "queries_repeating_negatives": len(repeat),
    }
    n_pos = [len(p) for p in used.values()]
    manifest["queries_used"] = len(used)
    manifest["positives_used"] = sum(n_pos)
    manifest["positives_per_query"] = {"mean": float(np.mean(n_pos)) if n_pos else 0.0,
                                       "max": max(n_pos, default=0)}  # fmt: skip
    return GroupSet(
        queries={q: queries[q] for q in used},
        positives=used,
        pools=pools,
        blocked=blocked,
        fill=fill,
        group_size=group_size,
        seed=seed,
        manifest=manifest,
    )


def _count(qids: Sequence[str]) -> dict[str, Any]:
    return {"count": len(qids), "examples": list(qids[:EXAMPLES])}


def _problem(text: str | None) -> str | None:
    if text is None:
        return REJECT_MISSING
    return REJECT_EMPTY if not text.strip() else None


def _lookup(docids: Sequence[str], doc_text: DocText) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for start in range(0, len(docids), LOOKUP_CHUNK):
        chunk = docids[start : start + LOOKUP_CHUNK]
        texts = list(doc_text(chunk))
        if len(texts) != len(chunk):
            raise ValueError(f"doc_text returned {len(texts)} texts for {len(chunk)} docids")
        out.update(zip(chunk, texts, strict=True))
    return out


def _ranked_candidates(candidates: Candidates, qids: list[str]) -> dict[str, Sequence[str]]:
    if isinstance(candidates, Mapping):
        return {q: candidates.get(q, ()) for q in qids}
    ranked = list(candidates(qids))
    if len(ranked) != len(qids):
        raise ValueError(f"candidates returned {len(ranked)} lists for {len(qids)} queries")
    return dict(zip(qids, ranked, strict=True))
