"""Human review files: Label Studio tasks and labeling config out, Label Studio exports and grade logs in (no Ray).

Formats, as Label Studio documents them (looked up for this module):

- Task import with pre-annotations ("Import pre-annotated data into Label Studio",
  https://labelstud.io/guide/predictions, and the Create prediction API reference,
  https://api.labelstud.io/api-reference/api-reference/predictions/create): a JSON list of tasks, each
  ``{"data": {...}, "predictions": [{"model_version": str, "score": float, "result": [...]}]}``; a choices
  result is ``{"from_name": <Choices name>, "to_name": <object name>, "type": "choices",
  "value": {"choices": [<Choice value>]}}``. ``score`` sorts tasks in Label Studio's Data Manager, so a
  reviewer can take the least confident first there too. Label Studio assigns its own task ids on import,
  which is why every task carries ``qid`` and ``docid`` in ``data``. Imported data must hold every ``$variable``
  the labeling config uses (Import tasks API, https://api.labelstud.io/api-reference/api-reference/projects/
  import-tasks), hence an empty ``title`` rather than none.
- Export ("Label Studio Task Format", https://labelstud.io/guide/task_format): the JSON export is a list of
  tasks, each with ``data`` and ``annotations``; an annotation has ``result`` (the same result objects),
  ``was_cancelled`` (the annotator skipped the task), ``created_at`` / ``updated_at`` and ``completed_by``.
  The JSON-MIN export flattens a task to its data keys plus one key per control (here ``grade``), which
  :func:`parse_records` reads like any other flat record.
- Labeling config tags (https://labelstud.io/tags/choices, https://labelstud.io/tags/choice): ``<Choices
  name toName choice="single">`` holding ``<Choice value hotkey>``; ``<Text name value="$field">`` and
  ``<Header value="$field">`` show task data.

Import rules (every row in ends as a label or as a rejected row with a reason; nothing is dropped):

- a Label Studio task needs ``data.qid`` and ``data.docid``; annotations with ``was_cancelled`` true are
  skipped; a task left with no annotation, only cancelled ones, or an annotation without a grade choice
  (one choice, one of the grades) is rejected, naming which;
- several annotations of one task (overlap: several annotators) that agree give that grade; if they disagree the
  task is rejected (``on_disagreement="reject"``, the default: a disagreement is for someone to adjudicate, not
  for a rule to hide) or the latest (``updated_at``, else ``created_at``, else position) wins
  (``on_disagreement="latest"``);
- the same (qid, docid) in several tasks or records: one row when all agree, all rejected when they do not,
  except in the review page's grade log (records carrying ``graded_at``), where the reviewer changing their mind
  is expected: the last grade in the file wins and the earlier ones are counted as superseded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from xml.sax.saxutils import quoteattr

#: the names the exported labeling config gives its controls; import reads results by ``GRADE_CONTROL``
GRADE_CONTROL = "grade"
PASSAGE_OBJECT = "passage"
#: the key that marks a record of the review page's grade log (``augrel review serve``)
LOG_TIME_KEY = "graded_at"

GRADE_MEANING = {0: "irrelevant", 1: "related", 2: "highly relevant", 3: "perfectly relevant"}


@dataclass(frozen=True)
class Grade:
    """One human grade read from a file: ``line`` is the 1-based line (JSONL, qrels) or task position (JSON)."""

    qid: str
    docid: str
    label: int
    line: int | None
    raw: str


@dataclass(frozen=True)
class Reject:
    """A row that gave no grade. ``kind`` is a short stable code (counted in the manifest), ``reason`` the text."""

    kind: str
    reason: str
    line: int | None
    raw: str | None


@dataclass
class Parsed:
    grades: list[Grade] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    #: rows read (tasks or records), before any rule
    rows_in: int = 0
    #: grades of the review log replaced by a later grade of the same pair
    superseded: int = 0
    #: extra rows of a pair that repeated the same grade (kept once)
    duplicates_same_grade: int = 0


def _raw(obj: Any, limit: int = 500) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def grade_of(value: Any, grades: Sequence[int]) -> int | None:
    """A grade from an int or a string such as ``"2"``; None when it is not one of ``grades``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            return None
    return value if isinstance(value, int) and value in grades else None


def _id(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    return value.strip() if isinstance(value, str) and value.strip() else None


# ------------------------------------------------------------------------------------------- export


def label_config_xml(grades: Sequence[int]) -> str:
    """A Label Studio labeling config: the query and title as headers, the passage as Text, one grade choice.

    The grade values are the grades' digits, and each digit is also its hotkey, so "2" in a result means grade 2.
    """
    choices = "\n".join(
        f"    <Choice value={quoteattr(str(g))} hotkey={quoteattr(str(g))}"
        + (f" hint={quoteattr(GRADE_MEANING[g])}" if g in GRADE_MEANING else "")
        + "/>"
        for g in grades
    )
    rubric = "; ".join(f"{g} {GRADE_MEANING.get(g, '')}".strip() for g in grades)
    return f"""<View>
  <Header value="$query"/>
  <Header value="$title" size="5"/>
  <Text name="{PASSAGE_OBJECT}" value="$text"/>
  <Header value={quoteattr("Grade the passage for the query: " + rubric)} size="6"/>
  <Choices name="{GRADE_CONTROL}" toName="{PASSAGE_OBJECT}" choice="single" showInline="true" required="true">
{choices}
  </Choices>
</View>
"""


def task(row: dict[str, Any]) -> dict[str, Any]:
    """One Label Studio task for a queue row (qid, docid, query, text, title, judge_label, confidence, judge,
    rank, ...): the pair and its ids in ``data``, the judge's grade as a prediction scored by its confidence."""
    data = {k: v for k, v in row.items() if v is not None}
    data["title"] = row.get("title") or ""  # $title must resolve in the config even without a title
    prediction = {
        "model_version": row.get("judge") or "judge",
        "result": [
            {
                "from_name": GRADE_CONTROL,
                "to_name": PASSAGE_OBJECT,
                "type": "choices",
                "value": {"choices": [str(int(row["judge_label"]))]},
            }
        ],
    }
    if row.get("confidence") is not None:
        prediction["score"] = float(row["confidence"])
    return {"id": int(row["rank"]), "data": data, "predictions": [prediction]}


# ------------------------------------------------------------------------------------------- import


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else None  # naive and aware times cannot be ordered together


def _annotation_grade(ann: dict[str, Any], grades: Sequence[int]) -> tuple[int | None, str]:
    """(grade, "") or (None, why not) for one Label Studio annotation."""
    results = ann.get("result")
    if not isinstance(results, list):
        return None, "annotation has no result list"
    picked = [
        r
        for r in results
        if isinstance(r, dict)
        and isinstance(r.get("value"), dict)
        and "choices" in r["value"]
        and r.get("from_name", GRADE_CONTROL) == GRADE_CONTROL
    ]
    if not picked:
        return None, f"annotation has no '{GRADE_CONTROL}' choice"
    if len(picked) > 1:
        return None, f"annotation has {len(picked)} '{GRADE_CONTROL}' results"
    choices = picked[0]["value"]["choices"]
    if not isinstance(choices, list) or len(choices) != 1:
        return None, f"annotation's '{GRADE_CONTROL}' holds {choices!r}, not one choice"
    g = grade_of(choices[0], grades)
    if g is None:
        return None, f"choice {choices[0]!r} is not a grade (grades are {list(grades)})"
    return g, ""


def parse_label_studio(
    tasks: list[Any], grades: Sequence[int], on_disagreement: str = "reject"
) -> tuple[list[Grade], list[Reject]]:
    """Grades from a Label Studio JSON export (a list of tasks), one per task at most, before pair duplicates."""
    if on_disagreement not in ("reject", "latest"):
        raise ValueError(f"on_disagreement {on_disagreement!r}: use reject or latest")
    out: list[Grade] = []
    rejects: list[Reject] = []
    for pos, t in enumerate(tasks, 1):
        raw = _raw(t)
        if not isinstance(t, dict):
            rejects.append(Reject("not_a_task", "task is not a JSON object", pos, raw))
            continue
        data = t.get("data") if isinstance(t.get("data"), dict) else {}
        qid, docid = _id(data.get("qid")), _id(data.get("docid"))
        if qid is None or docid is None:
            missing = " and ".join(k for k, v in (("data.qid", qid), ("data.docid", docid)) if v is None)
            rejects.append(Reject("missing_id", f"task {t.get('id')!r}: missing {missing}", pos, raw))
            continue
        anns = t.get("annotations") or []
        if not isinstance(anns, list) or not anns:
            rejects.append(Reject("no_annotation", f"task {t.get('id')!r}: no annotation", pos, raw))
            continue
        live = [a for a in anns if isinstance(a, dict) and not a.get("was_cancelled")]
        if not live:
            rejects.append(
                Reject(
                    "cancelled", f"task {t.get('id')!r}: every annotation was cancelled (skipped)", pos, raw
                )
            )
            continue
        graded, bad = [], []
        for i, a in enumerate(live):
            g, why = _annotation_grade(a, grades)
            if g is None:
                bad.append(f"annotation {a.get('id', i)!r}: {why}")
            else:
                graded.append((a, i, g))
        if bad:  # one unreadable annotation makes the task's grade uncertain: say which, keep nothing
            kind = "not_a_grade" if any("is not a grade" in b for b in bad) else "no_grade"
            rejects.append(Reject(kind, f"task {t.get('id')!r}: " + "; ".join(bad), pos, raw))
            continue
        labels = sorted({g for _, _, g in graded})
        if len(labels) > 1 and on_disagreement == "reject":
            rejects.append(
                Reject(
                    "disagreement",
                    f"task {t.get('id')!r}: annotations disagree (grades {[g for _, _, g in graded]})",
                    pos,
                    raw,
                )
            )
            continue
        if len(labels) > 1:
            times = [_parse_time(a.get("updated_at") or a.get("created_at")) for a, _, _ in graded]
            if all(tm is not None for tm in times):
                best = max(range(len(graded)), key=lambda k: (times[k], graded[k][1]))
            else:
                best = len(graded) - 1
            label = graded[best][2]
        else:
            label = labels[0]
        out.append(Grade(qid, docid, label, pos, raw))
    return out, rejects


def parse_records(
    records: Iterable[tuple[int | None, Any]], grades: Sequence[int]
) -> tuple[list[Grade], list[Reject], bool]:
    """Grades from flat records (qrels / pairs rows, the review log, Label Studio JSON-MIN): ``qid``, ``docid``
    and ``label`` (or ``grade``). Returns (grades, rejects, whether every record is a review-log record)."""
    out: list[Grade] = []
    rejects: list[Reject] = []
    is_log = True
    n = 0
    for line, rec in records:
        n += 1
        raw = _raw(rec)
        if not isinstance(rec, dict):
            rejects.append(Reject("not_a_record", "not a JSON object", line, raw))
            is_log = False
            continue
        is_log = is_log and LOG_TIME_KEY in rec
        qid, docid = _id(rec.get("qid")), _id(rec.get("docid"))
        if qid is None or docid is None:
            missing = " and ".join(k for k, v in (("qid", qid), ("docid", docid)) if v is None)
            rejects.append(Reject("missing_id", f"missing {missing}", line, raw))
            continue
        key = "label" if "label" in rec else GRADE_CONTROL if GRADE_CONTROL in rec else None
        if key is None or rec[key] is None:
            rejects.append(Reject("no_label", f"no label (no '{key or 'label'}' value)", line, raw))
            continue
        g = grade_of(rec[key], grades)
        if g is None:
            rejects.append(
                Reject(
                    "not_a_grade", f"{key} {rec[key]!r} is not a grade (grades are {list(grades)})", line, raw
                )
            )
            continue
        out.append(Grade(qid, docid, g, line, raw))
    return out, rejects, is_log and n > 0


def resolve_pairs(grades_in: list[Grade], last_wins: bool) -> tuple[list[Grade], list[Reject], int, int]:
    """One grade per (qid, docid): (kept, rejected, superseded, same-grade duplicates).

    ``last_wins`` (a review log): the last grade of a pair stands, earlier ones are superseded. Otherwise a pair
    whose rows agree is kept once, and a pair whose rows disagree is rejected, every row of it.
    """
    by_pair: dict[tuple[str, str], list[Grade]] = {}
    for g in grades_in:
        by_pair.setdefault((g.qid, g.docid), []).append(g)
    kept: list[Grade] = []
    rejects: list[Reject] = []
    superseded = same = 0
    for (qid, docid), rows in by_pair.items():
        if last_wins:
            kept.append(rows[-1])
            superseded += len(rows) - 1
        elif len({r.label for r in rows}) == 1:
            kept.append(rows[0])
            same += len(rows) - 1
        else:
            where = ", ".join(f"line {r.line}: {r.label}" for r in rows)
            rejects.extend(
                Reject("conflicting_duplicate",
                       f"({qid}, {docid}) appears {len(rows)} times with different grades ({where})",
                       r.line, r.raw)
                for r in rows
            )  # fmt: skip
    return kept, rejects, superseded, same


def parse_json_document(text: str, grades: Sequence[int], on_disagreement: str = "reject") -> Parsed | None:
    """A whole-file JSON document: a Label Studio export (tasks with ``data`` or ``annotations``) or a list of
    flat records (JSON-MIN). None when the text is not one JSON list (then it may be JSONL)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(doc, list):
        return None
    p = Parsed(rows_in=len(doc))
    if any(isinstance(t, dict) and ("annotations" in t or "data" in t) for t in doc):
        found, p.rejects = parse_label_studio(doc, grades, on_disagreement)
        is_log = False
    else:
        found, p.rejects, is_log = parse_records(enumerate(doc, 1), grades)
    kept, rej, p.superseded, p.duplicates_same_grade = resolve_pairs(found, last_wins=is_log)
    p.grades, p.rejects = kept, p.rejects + rej
    return p


def parse_jsonl(lines: Iterable[tuple[int, str | None]], grades: Sequence[int]) -> Parsed:
    """JSON Lines of flat records (the review log, or qrels / pairs rows); a line that is not JSON (a write cut
    off by a crash, which the server never acknowledged) is rejected, not fatal."""
    records: list[tuple[int, Any]] = []
    p = Parsed()
    for lineno, text in lines:
        p.rows_in += 1
        if text is None:
            p.rejects.append(Reject("not_json", "not UTF-8", lineno, None))
            continue
        try:
            records.append((lineno, json.loads(text)))
        except json.JSONDecodeError as e:
            p.rejects.append(Reject("not_json", f"not a JSON object ({e.msg})", lineno, _raw(text)))
    found, rej, is_log = parse_records(records, grades)
    kept, rej2, p.superseded, p.duplicates_same_grade = resolve_pairs(found, last_wins=is_log)
    p.grades, p.rejects = kept, p.rejects + rej + rej2
    return p
