"""The fixed tables that travel between stages, and their validators.

Every stage reads and writes one of these tables (../shared/DESIGN.md). A table is a directory of
``part-*.parquet`` files; JSONL is accepted on input. The specs here are the single source of truth for
column names, Arrow types and row rules, used both to *reject* rows while preparing data and to *validate*
a finished table (naming the bad column and the first bad row).

No Ray here: the checks work on one ``pyarrow.Table`` at a time and are mapped over files by
``pipelines.validate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: The grade scale of TREC DL / LLMJudge: 0 irrelevant, 1 related, 2 highly relevant, 3 perfectly relevant.
DEFAULT_GRADES: tuple[int, ...] = (0, 1, 2, 3)


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    nullable: bool = False
    #: strings that must hold something other than whitespace (ids, queries). Passage text may be empty:
    #: empty passages exist in real collections and a judge must grade them.
    non_empty: bool = False
    #: the column holds a grade from the table's grade scale
    grade: bool = False


@dataclass(frozen=True)
class TableSpec:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    doc: str = ""
    optional: tuple[Column, ...] = field(default=())

    @property
    def required_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def schema(self, with_optional: Sequence[str] = ()) -> pa.Schema:
        cols = list(self.columns) + [c for c in self.optional if c.name in with_optional]
        return pa.schema([pa.field(c.name, c.type, nullable=c.nullable) for c in cols])

    def column(self, name: str) -> Column:
        for c in (*self.columns, *self.optional):
            if c.name == name:
                return c
        raise KeyError(name)


_STR = pa.string()

QUERIES = TableSpec(
    "queries",
    (Column("qid", _STR, non_empty=True), Column("query", _STR, non_empty=True)),
    key=("qid",),
    doc="one row per query",
    optional=(Column("answers", pa.list_(_STR), nullable=True),),
)
DOCS = TableSpec(
    "docs",
    (
        Column("docid", _STR, non_empty=True),
        Column("text", _STR),
        Column("title", _STR, nullable=True),
        Column("url", _STR, nullable=True),
    ),
    key=("docid",),
    doc="one row per document or passage",
)
PAIRS = TableSpec(
    "pairs",
    (
        Column("qid", _STR, non_empty=True),
        Column("docid", _STR, non_empty=True),
        Column("query", _STR, non_empty=True),
        Column("text", _STR),
        Column("label", pa.int8(), nullable=True, grade=True),
    ),
    key=("qid", "docid"),
    doc="(query, document) pairs with their texts; label is the human grade when known",
    optional=(
        Column("title", _STR, nullable=True),
        Column("url", _STR, nullable=True),
        # the question's gold answers, when the data has them (answer-likelihood utility, RAG evaluation)
        Column("answers", pa.list_(_STR), nullable=True),
    ),
)
JUDGMENTS = TableSpec(
    "judgments",
    (
        Column("qid", _STR, non_empty=True),
        Column("docid", _STR, non_empty=True),
        Column("label", pa.int8(), grade=True),
        Column("score", pa.float32()),
        Column("probs", pa.list_(pa.float32())),
        Column("judge", _STR, non_empty=True),
        Column("prompt_version", _STR, non_empty=True),
    ),
    key=("qid", "docid"),
    doc="the judge's grade (argmax), expected grade and grade distribution per pair",
    optional=(
        Column("truncated", pa.bool_(), nullable=True),
        Column("n_tokens", pa.int32(), nullable=True),
        # the judge's probability of its own label (models.judge.label_confidence): what review routing sorts by
        Column("confidence", pa.float32(), nullable=True),
        # models.injection: an instruction-like span was found in the passage (null: no detector ran), its kinds
        Column("injection", pa.bool_(), nullable=True),
        Column("injection_kind", _STR, nullable=True),
    ),
)
QRELS = TableSpec(
    "qrels",
    (
        Column("qid", _STR, non_empty=True),
        Column("docid", _STR, non_empty=True),
        Column("label", pa.int8(), grade=True),
    ),
    key=("qid", "docid"),
    doc="human relevance grades",
)
RUN = TableSpec(
    "run",
    (
        Column("qid", _STR, non_empty=True),
        Column("docid", _STR, non_empty=True),
        Column("score", pa.float32()),
        Column("rank", pa.int32()),
    ),
    key=("qid", "docid"),
    doc="a ranking: one scored document per row, rank starting at 1",
)

UTILITY = TableSpec(
    "utility",
    (
        Column("qid", _STR, non_empty=True),
        Column("docid", _STR, non_empty=True),
        Column("selected", pa.bool_()),
        Column("mode", _STR, non_empty=True),
        Column("annotator", _STR, non_empty=True),
        Column("prompt_version", _STR, non_empty=True),
    ),
    key=("qid", "docid"),
    doc="utility labels per (question, passage): selected is a positive; rank (utility-rank) and utility "
    "(answer-likelihood: log P(answer | q, p) - log P(answer | q)) order them",
    optional=(
        Column("rank", pa.int32(), nullable=True),  # 1 = most useful; null where the stage did not rank it
        Column("utility", pa.float32(), nullable=True),
        Column("pseudo_answer", _STR, nullable=True),
        Column("relevant", pa.bool_(), nullable=True),  # RelSel's verdict, for the modes that run it
        Column("truncated", pa.bool_(), nullable=True),  # the passage was cut to the token budget
        # JSON: the listwise windows that showed this passage (stage, window, seed, position, parse status)
        Column("windows", _STR, nullable=True),
        Column("note", _STR, nullable=True),  # why a stage's verdict is missing (a parse failure, ...)
    ),
)

QUESTIONS = TableSpec(
    "questions",
    (
        Column("qid", _STR, non_empty=True),
        Column("question", _STR, non_empty=True),
        # the gold answer aliases; an empty list is a question without a gold answer: it is kept (a retriever
        # and a generator still run on it) and left out of EM / F1, where it is counted
        Column("answers", pa.list_(_STR)),
    ),
    key=("qid",),
    doc="the questions of RAG evaluation, with their gold answers",
    optional=(
        # docids of the gold supporting passages (human grade >= the prepare setting supporting_min_grade);
        # null where the question has no human label at all, empty where no judged passage reaches the grade
        Column("supporting", pa.list_(_STR), nullable=True),
    ),
)

TABLES: dict[str, TableSpec] = {
    t.name: t for t in (QUERIES, DOCS, PAIRS, JUDGMENTS, QRELS, RUN, UTILITY, QUESTIONS)
}

#: Rows a stage could not process: where they came from and why.
REJECTED_SCHEMA = pa.schema(
    [
        pa.field("table", _STR),
        pa.field("source", _STR),
        pa.field("line", pa.int64(), nullable=True),
        pa.field("reason", _STR),
        pa.field("raw", _STR, nullable=True),
    ]
)


@dataclass(frozen=True)
class Violation:
    """One broken rule: the first row (0-based, within ``path``) that breaks it."""

    table: str
    column: str | None
    row: int | None
    reason: str
    value: object = None
    path: str | None = None

    def __str__(self) -> str:
        where = self.path or self.table
        parts = [where]
        if self.column is not None:
            parts.append(f"column '{self.column}'")
        if self.row is not None:
            parts.append(f"row {self.row}")
        msg = ", ".join(parts) + f": {self.reason}"
        if self.value is not None:
            shown = repr(self.value)
            msg += f" (value {shown[:80] + '...' if len(shown) > 80 else shown})"
        return msg


@dataclass
class RowFailure:
    """Rows that break one rule, as a boolean mask over the table (True = bad)."""

    column: str
    reason: str
    mask: np.ndarray

    def first(self) -> int:
        return int(np.argmax(self.mask))


class SchemaError(ValueError):
    """A table that cannot be checked row by row: columns are missing or of an unusable type."""

    def __init__(self, violations: list[Violation]):
        self.violations = violations
        super().__init__("; ".join(str(v) for v in violations))


def _mask(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def _coerce(spec: TableSpec, col: Column, arr: pa.ChunkedArray, path: str | None) -> pa.ChunkedArray:
    """Cast to the spec's type when that loses nothing; otherwise name the first value that does not fit."""
    if arr.type == col.type:
        return arr
    try:
        return pc.cast(arr, col.type, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # Find the first offending value to quote it: slow, but only on the error path.
    for i, value in enumerate(arr.to_pylist()):
        if value is None:
            continue
        try:
            pc.cast(pa.array([value]), col.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            raise SchemaError(
                [Violation(spec.name, col.name, i, f"expected {col.type}, got {arr.type}", value, path)]
            ) from None
    raise SchemaError(
        [Violation(spec.name, col.name, None, f"expected {col.type}, got {arr.type}", None, path)]
    )


def conform(spec: TableSpec, table: pa.Table, path: str | None = None) -> pa.Table:
    """Select the spec's columns (plus known optional ones present) in order, cast to the spec's types.

    Raises :class:`SchemaError` naming missing columns or the first value that cannot be cast.
    """
    missing = [c for c in spec.required_names if c not in table.column_names]
    nullable_missing = [c for c in missing if spec.column(c).nullable]
    hard_missing = [c for c in missing if c not in nullable_missing]
    if hard_missing:
        raise SchemaError(
            [
                Violation(
                    spec.name, c, None, f"missing column (the {spec.name} table needs {spec.required_names})"
                )
                for c in hard_missing
            ]
        )
    present_optional = [c.name for c in spec.optional if c.name in table.column_names]
    schema = spec.schema(present_optional)
    arrays = []
    for f in schema:
        col = spec.column(f.name)
        if f.name in table.column_names:
            arrays.append(_coerce(spec, col, table.column(f.name), path))
        else:  # a nullable column that is absent is all-null, e.g. pairs without human labels
            arrays.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def row_failures(
    spec: TableSpec, table: pa.Table, grades: Sequence[int] = DEFAULT_GRADES
) -> list[RowFailure]:
    """Row rules over a conformed table: nulls, empty strings, grades, probabilities, ranks, duplicate keys."""
    out: list[RowFailure] = []
    n = table.num_rows
    if n == 0:
        return out
    grade_set = pa.array(sorted(set(grades)), pa.int8())
    for col in (*spec.columns, *spec.optional):
        if col.name not in table.column_names:
            continue
        arr = table.column(col.name)
        if not col.nullable and arr.null_count:
            out.append(RowFailure(col.name, "missing value (null)", _mask(pc.is_null(arr))))
        if col.non_empty:
            empty = pc.equal(pc.utf8_trim_whitespace(arr), "")
            if pc.any(empty).as_py():
                out.append(RowFailure(col.name, "empty string", _mask(empty)))
        if col.grade:
            bad = pc.invert(pc.is_in(arr, value_set=grade_set))
            bad = pc.and_(bad, pc.is_valid(arr))
            if pc.any(bad).as_py():
                out.append(RowFailure(col.name, f"unknown grade (grades are {list(grades)})", _mask(bad)))
    if spec is JUDGMENTS:
        probs = table.column("probs")
        lengths = pc.list_value_length(probs)
        bad_len = pc.not_equal(lengths, len(grades))
        if pc.any(bad_len).as_py():
            out.append(
                RowFailure("probs", f"expected {len(grades)} probabilities, one per grade", _mask(bad_len))
            )
        else:
            flat = np.asarray(pc.list_flatten(probs).to_numpy(zero_copy_only=False), dtype=np.float64)
            mat = flat.reshape(-1, len(grades))
            bad = (
                (np.abs(mat.sum(axis=1) - 1.0) > 1e-3) | (mat < 0).any(axis=1) | ~np.isfinite(mat).all(axis=1)
            )
            if bad.any():
                out.append(RowFailure("probs", "probabilities must be >= 0 and sum to 1", bad))
        score = np.asarray(table.column("score").to_numpy(zero_copy_only=False), dtype=np.float64)
        bad = ~np.isfinite(score) | (score < min(grades) - 1e-4) | (score > max(grades) + 1e-4)
        if bad.any():
            out.append(RowFailure("score", f"expected grade must lie in [{min(grades)}, {max(grades)}]", bad))
    if spec is UTILITY and "rank" in table.column_names:
        bad = pc.fill_null(pc.less(table.column("rank"), 1), False)
        if pc.any(bad).as_py():
            out.append(RowFailure("rank", "rank starts at 1", _mask(bad)))
    if spec is RUN:
        rank = table.column("rank")
        bad = pc.less(rank, 1)
        if pc.any(bad).as_py():
            out.append(RowFailure("rank", "rank starts at 1", _mask(bad)))
        score = np.asarray(table.column("score").to_numpy(zero_copy_only=False), dtype=np.float64)
        if (~np.isfinite(score)).any():
            out.append(RowFailure("score", "score is NaN or infinite", ~np.isfinite(score)))
    dup = duplicate_mask(table, spec.key)
    if dup.any():
        out.append(RowFailure(",".join(spec.key), f"duplicate ({', '.join(spec.key)})", dup))
    return out


def duplicate_mask(table: pa.Table, key: Sequence[str]) -> np.ndarray:
    """True for every row whose key was already seen earlier in the table (the first occurrence is kept)."""
    return table.select(list(key)).to_pandas().duplicated(keep="first").to_numpy()


def key_hashes(table: pa.Table, key: Sequence[str]) -> np.ndarray:
    """64-bit hashes of the key columns, to find duplicates across files without moving the keys around."""
    import pandas as pd

    return pd.util.hash_pandas_object(table.select(list(key)).to_pandas(), index=False).to_numpy()


def check(
    spec: TableSpec,
    table: pa.Table,
    *,
    path: str | None = None,
    grades: Sequence[int] = DEFAULT_GRADES,
) -> list[Violation]:
    """All rule violations of ``table``, each reported at its first bad row."""
    try:
        conformed = conform(spec, table, path)
    except SchemaError as e:
        return e.violations
    out = []
    for f in row_failures(spec, conformed, grades):
        row = f.first()
        value = conformed.column(f.column)[row].as_py() if f.column in conformed.column_names else None
        if value is None and "," in f.column:
            value = tuple(conformed.column(k)[row].as_py() for k in spec.key)
        out.append(Violation(spec.name, f.column, row, f.reason, value, path))
    return out


def split_rejected(
    spec: TableSpec,
    table: pa.Table,
    *,
    source: str | pa.Array,
    grades: Sequence[int] = DEFAULT_GRADES,
    line: pa.Array | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Split a conformed table into (good rows, rejected rows with a reason): nothing is dropped silently.

    ``source`` and ``line`` say where each row came from: one source for all rows, or one per row.
    """
    failures = row_failures(spec, table, grades)
    if not failures:
        return table, empty_rejected()
    reasons = np.full(table.num_rows, None, dtype=object)
    for f in failures:  # the first failing rule names the reason
        fill = f.mask & (reasons == None)  # noqa: E711 (element-wise on an object array)
        reasons[fill] = f"{f.column}: {f.reason}"
    bad = reasons != None  # noqa: E711
    bad_idx = np.flatnonzero(bad)
    raw = [repr(r) for r in table.take(pa.array(bad_idx)).to_pylist()]
    rejected = pa.table(
        {
            "table": pa.array([spec.name] * len(bad_idx), _STR),
            "source": (
                pa.array([source] * len(bad_idx), _STR)
                if isinstance(source, str)
                else source.take(pa.array(bad_idx))
            ),
            "line": line.take(pa.array(bad_idx)) if line is not None else pa.nulls(len(bad_idx), pa.int64()),
            "reason": pa.array(list(reasons[bad_idx]), _STR),
            "raw": pa.array(raw, _STR),
        },
        schema=REJECTED_SCHEMA,
    )
    return table.filter(pa.array(~bad)), rejected


def empty_rejected() -> pa.Table:
    return REJECTED_SCHEMA.empty_table()


def rejected_rows(table: str, source: str, rows: list[tuple[int | None, str, str | None]]) -> pa.Table:
    """Build a rejected table from (line, reason, raw) tuples collected while parsing."""
    return pa.table(
        {
            "table": pa.array([table] * len(rows), _STR),
            "source": pa.array([source] * len(rows), _STR),
            "line": pa.array([r[0] for r in rows], pa.int64()),
            "reason": pa.array([r[1] for r in rows], _STR),
            "raw": pa.array([r[2] for r in rows], _STR),
        },
        schema=REJECTED_SCHEMA,
    )
