"""Data preparation: read public IR formats, write augrel's tables, reject what cannot be used.

``augrel data prepare {trec-dl,beir,hotpotqa,pairs} --src DIR --out DIR`` writes::

    OUT/queries/part-*.parquet   qid, query[, answers]
    OUT/docs/part-*.parquet      docid, text, title, url
    OUT/qrels/part-*.parquet     qid, docid, label
    OUT/pairs/part-*.parquet     qid, docid, query, text, label[, answers]   (every judged pair, with its texts)
    OUT/questions/part-*.parquet qid, question, answers, supporting   (every query as a question)
    OUT/rejected/part-*.parquet  table, source, line, reason, raw (rows that could not be used, and why)
    OUT/config.yaml, OUT/manifest.json

Every input row ends up in exactly one table or in ``rejected/``: non-UTF-8 bytes, invalid JSON, missing
ids, empty queries, duplicate keys, unknown grades and dangling references are rejected with a reason, never
dropped silently and never a traceback. Splits are by query (``augrel data split``): a query never sits in
two splits, and queries without a human label form the ``unlabelled`` split.

The ``questions`` table is what RAG evaluation reads: every query, with its gold answers where the data has them
(hotpotqa always; beir when ``queries.jsonl`` has ``metadata.answers``, as ``augrel data synth`` writes it; pairs
with an ``answers`` column). A question without a gold answer is kept with an empty ``answers`` list and
counted (``questions_without_answer``): RAG evaluation still retrieves and answers it and scores its supporting
recall, and leaves it out of EM / F1 (a collection without answers, e.g. TREC DL, gets retrieval figures only). ``supporting`` lists the docids with a human grade of at least
``supporting_min_grade`` (hotpotqa: the ``is_supporting`` paragraphs).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from pipelines import tables as T
from pipelines.errors import DataError
from pipelines.io import DEFAULT_ROWS_PER_FILE, expand_paths, iter_lines, read_table, write_table
from pipelines.stage import StageConfig, StageResult, Timer, write_stage_files

Format = Literal["trec-dl", "beir", "hotpotqa", "pairs"]
Reject = tuple[int | None, str, str | None]  # (line, reason, raw)

_DOCID_KEYS = ("docid", "_id", "id", "pid", "doc_id")
_TEXT_KEYS = ("text", "doc", "contents", "passage", "body")


class PrepareConfig(StageConfig):
    """``augrel data prepare``: which format to read from where, and where to write the tables."""

    format: Format = Field(description="input format: trec-dl, beir, hotpotqa or pairs")
    src: str = Field(description="input directory (or file / glob for the pairs format)")
    out: str = Field(description="output directory for the tables")
    grades: list[int] = Field(default_factory=lambda: list(T.DEFAULT_GRADES), description="the grade scale")
    topics: str = Field(
        "queries.tsv", description="trec-dl: topics file inside src (qid<TAB>query or TREC SGML)"
    )
    qrels: str = Field("qrels.txt", description="trec-dl: qrels file inside src (qid iter docid grade)")
    corpus: str = Field("passages.jsonl", description="trec-dl: passages JSONL inside src")
    beir_split: str | None = Field(None, description="beir: qrels/<split>.tsv to read; all splits if unset")
    rows_per_file: int = Field(DEFAULT_ROWS_PER_FILE, gt=0)
    supporting_min_grade: int = Field(
        1,
        description="questions table: a judged passage with at least this human grade is a gold supporting "
        "passage of its question (the oracle of RAG evaluation, supporting-passage recall)",
    )

    @field_validator("grades")
    @classmethod
    def _grades_sorted_unique(cls, v: list[int]) -> list[int]:
        if not v or sorted(set(v)) != v or min(v) < 0 or max(v) > 127:
            raise ValueError("grades must be a non-empty increasing list of distinct integers in 0..127")
        return v

    @model_validator(mode="after")
    def _supporting_grade_on_scale(self) -> PrepareConfig:
        # at the lowest grade every judged passage, irrelevant ones included, would count as gold
        if not min(self.grades) < self.supporting_min_grade <= max(self.grades):
            raise ValueError(
                f"supporting_min_grade must lie above the lowest grade and at most the highest of grades "
                f"{self.grades}, got {self.supporting_min_grade}"
            )
        return self


@dataclass
class Loaded:
    """What a format reader returns before the row rules run: raw tables plus parse-time rejects."""

    queries: pa.Table
    docs: pa.Table
    qrels: pa.Table
    rejected: list[pa.Table] = field(default_factory=list)
    #: the pairs format carries its pairs (labelled or not) directly
    pairs: pa.Table | None = None
    #: table name -> the file it was read from, to say where a rejected row came from
    sources: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- parsing


def _jsonl(
    path: Path, table: str, rejects: list[pa.Table], desc: str | None = None
) -> Iterator[tuple[int, dict]]:
    bad: list[Reject] = []
    lines = iter_lines(path)
    if desc:
        lines = tqdm(lines, desc=desc, unit=" lines", disable=None, leave=False)
    for lineno, text, raw in lines:
        if text is None:
            bad.append((lineno, "not UTF-8", raw.decode("utf-8", "backslashreplace")[:500]))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            bad.append((lineno, f"invalid JSON: {e.msg}", text[:500]))
            continue
        if not isinstance(obj, dict):
            bad.append((lineno, "not a JSON object", text[:500]))
            continue
        yield lineno, obj
    if bad:
        rejects.append(T.rejected_rows(table, str(path), bad))


def _id(value: Any) -> str | None:
    """Ids arrive as strings or numbers; normalise to strings, treat null/blank as missing."""
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    s = str(value).strip()
    return s or None


def _first(obj: dict, keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for k in keys:
        if k in obj:
            return k, obj[k]
    return None, None


def _grade(raw: str, grades: list[int]) -> int | None:
    try:
        g = int(raw)
    except ValueError:
        return None
    return g if g in grades else None


def read_trec_topics(path: Path, rejects: list[pa.Table]) -> pa.Table:
    """``qid<TAB>query`` lines (TREC DL, MS MARCO), or classic TREC SGML topics (``<num>``, ``<title>``)."""
    head = path.read_bytes()[:4096].lstrip()
    if head.startswith(b"<top>"):
        text = path.read_text("utf-8", errors="strict")
        qids, queries = [], []
        for block in re.findall(r"<top>(.*?)</top>", text, flags=re.S):
            num = re.search(r"<num>\s*(?:Number:)?\s*(\S+)", block)
            title = re.search(r"<title>\s*(?:Topic:)?\s*(.*?)\s*(?:<|$)", block, flags=re.S)
            qids.append(num.group(1) if num else None)
            queries.append(title.group(1).strip() if title else None)
        return pa.table({"qid": pa.array(qids, pa.string()), "query": pa.array(queries, pa.string())})
    qids, queries, lines, bad = [], [], [], []
    for lineno, text, raw in iter_lines(path):
        if text is None:
            bad.append((lineno, "not UTF-8", raw.decode("utf-8", "backslashreplace")))
            continue
        parts = text.split("\t", 1)
        if len(parts) != 2:
            bad.append((lineno, "expected qid<TAB>query", text))
            continue
        qids.append(_id(parts[0]))
        queries.append(parts[1].strip())
        lines.append(lineno)
    if bad:
        rejects.append(T.rejected_rows("queries", str(path), bad))
    return pa.table(
        {"qid": pa.array(qids, pa.string()), "query": pa.array(queries, pa.string()), "_line": lines}
    )


def read_trec_qrels(path: Path, grades: list[int], rejects: list[pa.Table]) -> pa.Table:
    """TREC qrels: ``qid iteration docid grade``, whitespace separated."""
    qids, docids, labels, lines, bad = [], [], [], [], []
    for lineno, text, raw in iter_lines(path):
        if text is None:
            bad.append((lineno, "not UTF-8", raw.decode("utf-8", "backslashreplace")))
            continue
        parts = text.split()
        if len(parts) != 4:
            bad.append((lineno, "expected 4 fields: qid iteration docid grade", text))
            continue
        g = _grade(parts[3], grades)
        if g is None:
            bad.append((lineno, f"unknown grade {parts[3]!r} (grades are {grades})", text))
            continue
        qids.append(parts[0])
        docids.append(parts[2])
        labels.append(g)
        lines.append(lineno)
    if bad:
        rejects.append(T.rejected_rows("qrels", str(path), bad))
    return pa.table(
        {
            "qid": qids,
            "docid": docids,
            "label": pa.array(labels, pa.int8()),
            "_line": pa.array(lines, pa.int64()),
        }
    )


def _docs_from_jsonl(path: Path, rejects: list[pa.Table]) -> pa.Table:
    docids, texts, titles, urls, lines, bad = [], [], [], [], [], []
    for lineno, obj in _jsonl(path, "docs", rejects, desc=f"reading {path.name}"):
        _, docid = _first(obj, _DOCID_KEYS)
        key, text = _first(obj, _TEXT_KEYS)
        if _id(docid) is None:
            bad.append((lineno, f"missing document id (one of {list(_DOCID_KEYS)})", json.dumps(obj)[:500]))
            continue
        if key is None or not isinstance(text, str):
            bad.append(
                (lineno, f"missing or non-text body (one of {list(_TEXT_KEYS)})", json.dumps(obj)[:500])
            )
            continue
        title, url = obj.get("title"), obj.get("url")
        docids.append(_id(docid))
        texts.append(text)
        titles.append(title if isinstance(title, str) and title else None)
        urls.append(url if isinstance(url, str) and url else None)
        lines.append(lineno)
    if bad:
        rejects.append(T.rejected_rows("docs", str(path), bad))
    return pa.table(
        {
            "docid": pa.array(docids, pa.string()),
            "text": pa.array(texts, pa.string()),
            "title": pa.array(titles, pa.string()),
            "url": pa.array(urls, pa.string()),
            "_line": pa.array(lines, pa.int64()),
        }
    )


def _need(src: Path, name: str) -> Path:
    p = src / name
    if not p.exists():
        raise DataError(f"{p}: not found (expected in {src})")
    return p


def load_trec_dl(cfg: PrepareConfig) -> Loaded:
    src = Path(cfg.src)
    rejects: list[pa.Table] = []
    queries = read_trec_topics(_need(src, cfg.topics), rejects)
    qrels = read_trec_qrels(_need(src, cfg.qrels), cfg.grades, rejects)
    docs = _docs_from_jsonl(_need(src, cfg.corpus), rejects)
    sources = {"queries": cfg.topics, "qrels": cfg.qrels, "docs": cfg.corpus}
    return Loaded(queries, docs, qrels, rejects, sources={k: str(src / v) for k, v in sources.items()})


def _answers(value: Any) -> tuple[list[str] | None, str | None]:
    """Gold answers as given (a string or a list of strings) -> (answers or None when none are given, error)."""
    if value is None:
        return None, None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(a, str) and a.strip() for a in value):
        return None, "expected a non-empty string or a list of non-empty strings"
    return ([a.strip() for a in value] or None), None


def load_beir(cfg: PrepareConfig) -> Loaded:
    """BEIR layout: ``corpus.jsonl`` {_id, title, text}, ``queries.jsonl`` {_id, text[, metadata]},
    ``qrels/<split>.tsv``. A query's gold answers are read from ``metadata.answers`` (a string or a list of
    strings; ``augrel data synth`` writes them): the queries table has an ``answers`` column when any query has
    them, none when no query does (public BEIR sets)."""
    src = Path(cfg.src)
    rejects: list[pa.Table] = []
    docs = _docs_from_jsonl(_need(src, "corpus.jsonl"), rejects)
    qids, queries, answers, lines, bad = [], [], [], [], []
    qpath = _need(src, "queries.jsonl")
    for lineno, obj in _jsonl(qpath, "queries", rejects):
        qid = _id(obj.get("_id", obj.get("qid")))
        text = obj.get("text", obj.get("query"))
        if qid is None:
            bad.append((lineno, "missing query id (_id)", json.dumps(obj)[:500]))
            continue
        if not isinstance(text, str):
            bad.append((lineno, "missing or non-text query (text)", json.dumps(obj)[:500]))
            continue
        meta = obj.get("metadata")
        gold, error = _answers(meta.get("answers") if isinstance(meta, dict) else None)
        if error:
            bad.append((lineno, f"metadata.answers: {error}", json.dumps(obj)[:500]))
            continue
        qids.append(qid)
        queries.append(text.strip())
        answers.append(gold)
        lines.append(lineno)
    if bad:
        rejects.append(T.rejected_rows("queries", str(qpath), bad))
    qdir = _need(src, "qrels")
    files = [qdir / f"{cfg.beir_split}.tsv"] if cfg.beir_split else sorted(qdir.glob("*.tsv"))
    if not files or not all(f.exists() for f in files):
        raise DataError(f"{qdir}: no qrels file for split {cfg.beir_split or '(any)'}")
    qrels_parts = []
    for f in files:
        qq, dd, ll, li, badq = [], [], [], [], []
        for lineno, text, raw in iter_lines(f):
            if text is None:
                badq.append((lineno, "not UTF-8", raw.decode("utf-8", "backslashreplace")))
                continue
            parts = text.split("\t")
            if lineno == 1 and parts[0] == "query-id":
                continue
            if len(parts) != 3:
                badq.append((lineno, "expected query-id<TAB>corpus-id<TAB>score", text))
                continue
            g = _grade(parts[2], cfg.grades)
            if g is None:
                badq.append((lineno, f"unknown grade {parts[2]!r} (grades are {cfg.grades})", text))
                continue
            qq.append(parts[0].strip())
            dd.append(parts[1].strip())
            ll.append(g)
            li.append(lineno)
        if badq:
            rejects.append(T.rejected_rows("qrels", str(f), badq))
        qrels_parts.append(
            pa.table(
                {"qid": qq, "docid": dd, "label": pa.array(ll, pa.int8()), "_line": pa.array(li, pa.int64())}
            )
        )
    qtable = pa.table(
        {"qid": pa.array(qids, pa.string()), "query": pa.array(queries, pa.string()), "_line": lines}
    )
    if any(a is not None for a in answers):
        qtable = qtable.append_column("answers", pa.array(answers, pa.list_(pa.string())))
    sources = {"queries": str(qpath), "docs": str(src / "corpus.jsonl"), "qrels": str(qdir)}
    return Loaded(qtable, docs, pa.concat_tables(qrels_parts), rejects, sources=sources)


def load_hotpotqa(cfg: PrepareConfig) -> Loaded:
    """IRCoT HotpotQA JSONL: each question with 10 paragraphs; ``is_supporting`` is the (binary) utility label.

    Paragraph ids are only unique within a question, so docid is ``<question_id>-<context id>``, the first
    question's for a paragraph (title and text) that recurs under several; answers travel with the query (for RAG
    evaluation).
    """
    src = Path(cfg.src)
    path = src if src.is_file() else _need(src, "questions.jsonl")
    rejects: list[pa.Table] = []
    q = {"qid": [], "query": [], "answers": [], "_line": []}
    d = {"docid": [], "text": [], "title": [], "url": [], "_line": []}
    r = {"qid": [], "docid": [], "label": [], "_line": []}
    bad: list[Reject] = []
    first_docid: dict[tuple[str, str], str] = {}
    labelled: set[tuple[str, str]] = set()
    for lineno, obj in _jsonl(path, "queries", rejects):
        qid, query = _id(obj.get("question_id")), obj.get("question_text")
        contexts = obj.get("contexts")
        if qid is None or not isinstance(query, str) or not isinstance(contexts, list):
            bad.append(
                (lineno, "expected question_id, question_text and a contexts list", json.dumps(obj)[:500])
            )
            continue
        answers = [s for a in obj.get("answers_objects") or [] for s in (a.get("spans") or [])]
        q["qid"].append(qid)
        q["query"].append(query.strip())
        q["answers"].append([str(a) for a in answers])
        q["_line"].append(lineno)
        for ctx in contexts:
            cid, text = _id(ctx.get("id")), ctx.get("paragraph_text")
            if cid is None or not isinstance(text, str):
                bad.append(
                    (lineno, f"question {qid}: context without id or paragraph_text", json.dumps(ctx)[:500])
                )
                continue
            # The same Wikipedia paragraph recurs under several questions (66 of the dev set's, with different
            # ids): one passage in the pooled corpus, so retrieval cannot return it twice and supporting recall
            # counts it under one docid, the first question's.
            key = (ctx.get("title") or "", text)
            docid = first_docid.setdefault(key, f"{qid}-{cid}")
            if (qid, docid) in labelled:
                continue
            labelled.add((qid, docid))
            if docid == f"{qid}-{cid}":
                d["docid"].append(docid)
                d["text"].append(text)
                d["title"].append(ctx.get("title") or None)
                d["url"].append(None)
                d["_line"].append(lineno)
            r["qid"].append(qid)
            r["docid"].append(docid)
            r["label"].append(1 if ctx.get("is_supporting") else 0)
            r["_line"].append(lineno)
    if bad:
        rejects.append(T.rejected_rows("queries", str(path), bad))
    queries = pa.table(
        {
            "qid": pa.array(q["qid"], pa.string()),
            "query": pa.array(q["query"], pa.string()),
            "answers": pa.array(q["answers"], pa.list_(pa.string())),
            "_line": pa.array(q["_line"], pa.int64()),
        }
    )
    docs = pa.table({k: pa.array(v, pa.int64() if k == "_line" else pa.string()) for k, v in d.items()})
    qrels = pa.table(
        {
            "qid": pa.array(r["qid"], pa.string()),
            "docid": pa.array(r["docid"], pa.string()),
            "label": pa.array(r["label"], pa.int8()),
            "_line": pa.array(r["_line"], pa.int64()),
        }
    )
    return Loaded(
        queries, docs, qrels, rejects, sources=dict.fromkeys(("queries", "docs", "qrels"), str(path))
    )


def load_pairs(cfg: PrepareConfig) -> Loaded:
    """Generic pairs (JSONL or Parquet files, a directory, or a glob): qid, docid, query, text[, label, title, url,
    answers (the question's gold answers: a string or a list of strings)]."""
    rejects: list[pa.Table] = []
    parts = []
    for f in expand_paths(cfg.src):
        if f.suffix == ".parquet":
            t = read_table(f)
            t = t.append_column("_line", pa.array(np.arange(1, t.num_rows + 1), pa.int64()))
            t = t.append_column("_source", pa.array([str(f)] * t.num_rows, pa.string()))
        else:
            rows, bad = [], []
            for lineno, obj in _jsonl(f, "pairs", rejects, desc=f"reading {f.name}"):
                row = {k: obj.get(k) for k in ("qid", "docid", "query", "text", "label", "title", "url")}
                for k in ("qid", "docid"):
                    row[k] = _id(row[k])
                label = row["label"]
                if label is not None:
                    g = _grade(str(label), cfg.grades) if not isinstance(label, bool) else None
                    if g is None:
                        bad.append(
                            (
                                lineno,
                                f"unknown grade {label!r} (grades are {cfg.grades})",
                                json.dumps(obj)[:500],
                            )
                        )
                        continue
                    row["label"] = g
                for k in ("query", "text", "title", "url"):
                    if row[k] is not None and not isinstance(row[k], str):
                        bad.append((lineno, f"{k}: not text", json.dumps(obj)[:500]))
                        break
                else:
                    row["answers"], error = _answers(obj.get("answers"))
                    if error:
                        bad.append((lineno, f"answers: {error}", json.dumps(obj)[:500]))
                        continue
                    row["_line"] = lineno
                    row["_source"] = str(f)
                    rows.append(row)
            if bad:
                rejects.append(T.rejected_rows("pairs", str(f), bad))
            with_answers = any(r["answers"] is not None for r in rows)
            if not with_answers:
                for r in rows:
                    del r["answers"]
            optional = ["title", "url", "answers"] if with_answers else ["title", "url"]
            schema = T.PAIRS.schema(optional).append(pa.field("_line", pa.int64()))
            schema = schema.append(pa.field("_source", pa.string()))
            t = pa.Table.from_pylist(rows, schema=schema)
        parts.append(t)
    pairs = pa.concat_tables(parts, promote_options="permissive")
    return Loaded(queries=pa.table({}), docs=pa.table({}), qrels=pa.table({}), rejected=rejects, pairs=pairs)


LOADERS = {"trec-dl": load_trec_dl, "beir": load_beir, "hotpotqa": load_hotpotqa, "pairs": load_pairs}


# ------------------------------------------------------------------------------------------- rules + joins


def _apply_rules(
    spec: T.TableSpec, raw: pa.Table, source: str, grades: list[int], rejects: list[pa.Table]
) -> pa.Table:
    line = raw.column("_line").combine_chunks() if "_line" in raw.column_names else None
    # The pairs format reads many files: name the exact file each rejected row came from.
    where = raw.column("_source").combine_chunks() if "_source" in raw.column_names else source
    table = T.conform(spec, raw.drop_columns([c for c in ("_line", "_source") if c in raw.column_names]))
    good, bad = T.split_rejected(spec, table, source=where, grades=grades, line=line)
    if bad.num_rows:
        rejects.append(bad)
    return good


def _reject_orphans(
    qrels: pa.Table, queries: pa.Table, docs: pa.Table, source: str, rejects: list[pa.Table]
) -> pa.Table:
    no_query = pc.invert(pc.is_in(qrels.column("qid"), value_set=queries.column("qid")))
    no_doc = pc.invert(pc.is_in(qrels.column("docid"), value_set=docs.column("docid")))
    reasons = np.where(
        np.asarray(no_query), "qid not in queries", np.where(np.asarray(no_doc), "docid not in corpus", "")
    )
    bad = reasons != ""
    if bad.any():
        idx = pa.array(np.flatnonzero(bad))
        rows = qrels.take(idx).to_pylist()
        rejects.append(
            T.rejected_rows(
                "qrels",
                source,
                [(None, str(reasons[i]), repr(r)) for i, r in zip(np.flatnonzero(bad), rows, strict=False)],
            )
        )
    return qrels.filter(pa.array(~bad))


def build_pairs(qrels: pa.Table, queries: pa.Table, docs: pa.Table) -> pa.Table:
    """Join judged (qid, docid) with the query and document texts (and the query's gold answers when the queries
    table has them), sorted by (qid, docid)."""
    # Acero joins no list column (answers) as payload: join the query's row number and take answers by it.
    qside = queries.select(["qid", "query"]).append_column("_qrow", pa.array(np.arange(queries.num_rows)))
    joined = qrels.join(qside, "qid", join_type="inner", use_threads=False)
    joined = joined.join(
        docs.select(["docid", "text", "title", "url"]), "docid", join_type="inner", use_threads=False
    )
    joined = joined.sort_by([("qid", "ascending"), ("docid", "ascending")])
    if "answers" in queries.column_names:
        joined = joined.append_column("answers", queries.column("answers").take(joined.column("_qrow")))
    return T.conform(T.PAIRS, joined.drop_columns(["_qrow"]))


def prepare(cfg: PrepareConfig) -> StageResult:
    """Read ``cfg.src`` in ``cfg.format``, apply the row rules, write the tables and ``rejected/``."""
    with Timer() as timer:
        loaded = LOADERS[cfg.format](cfg)
        rejects = list(loaded.rejected)
        src = cfg.src
        if loaded.pairs is not None:
            pairs = _apply_rules(T.PAIRS, loaded.pairs, src, cfg.grades, rejects)
            queries = _first_per_key(
                pairs.select([c for c in ("qid", "query", "answers") if c in pairs.column_names]), "qid"
            )
            docs = _first_per_key(
                pairs.select([c for c in ("docid", "text", "title", "url") if c in pairs.column_names]),
                "docid",
            )
            docs = T.conform(T.DOCS, docs)
            labelled = pc.is_valid(pairs.column("label"))
            qrels = T.conform(T.QRELS, pairs.filter(labelled).select(["qid", "docid", "label"]))
            pairs = T.conform(T.PAIRS, pairs)
        else:
            where = {t: loaded.sources.get(t, src) for t in ("queries", "docs", "qrels")}
            queries = _apply_rules(T.QUERIES, loaded.queries, where["queries"], cfg.grades, rejects)
            docs = _apply_rules(T.DOCS, loaded.docs, where["docs"], cfg.grades, rejects)
            qrels = _apply_rules(T.QRELS, loaded.qrels, where["qrels"], cfg.grades, rejects)
            qrels = _reject_orphans(qrels, queries, docs, where["qrels"], rejects)
            pairs = build_pairs(qrels, queries, docs)
        questions = build_questions(queries, qrels, cfg.supporting_min_grade)
        rejected = pa.concat_tables(rejects) if rejects else T.empty_rejected()
        out = Path(cfg.out)
        for name, table in (("queries", queries), ("docs", docs), ("qrels", qrels), ("pairs", pairs)):
            write_table(out / name, table, cfg.rows_per_file)
        write_table(out / "rejected", rejected, cfg.rows_per_file)
        write_table(out / "questions", questions, cfg.rows_per_file)
    counts = {
        "queries": queries.num_rows,
        "docs": docs.num_rows,
        "qrels": qrels.num_rows,
        "pairs": pairs.num_rows,
        "judged_queries": len(pc.unique(pairs.column("qid"))),
        "rejected": rejected.num_rows,
    }
    written = ["queries", "docs", "qrels", "pairs", "questions"]
    counts["questions"] = questions.num_rows
    counts["questions_without_answer"] = int(
        pc.sum(pc.equal(pc.list_value_length(questions.column("answers")), 0)).as_py() or 0
    )
    grades_hist = {str(g): int(n) for g, n in sorted(_value_counts(qrels.column("label")).items())}
    reasons = {str(k): int(v) for k, v in _value_counts(rejected.column("reason")).items()}
    return write_stage_files(
        out,
        "data.prepare",
        cfg,
        counts,
        [src],
        timer.seconds,
        {"tables": written, "grades": grades_hist, "rejected_reasons": reasons},
    )


def build_questions(queries: pa.Table, qrels: pa.Table, min_grade: int) -> pa.Table:
    """The questions table (qid, question, answers, supporting) of every query.

    A query without answers (or a collection without any) gets an empty list (kept, excluded from EM / F1 downstream). ``supporting`` holds
    the docids graded at least ``min_grade``, in qrels order; null for a question with no human label at all,
    so "no gold passage" and "never judged" stay apart.
    """
    if "answers" not in queries.column_names:
        queries = queries.append_column("answers", pa.nulls(queries.num_rows, pa.list_(pa.string())))
    answers = queries.column("answers")
    answers = pc.fill_null(answers, pa.scalar([], answers.type))
    gold = qrels.filter(pc.greater_equal(qrels.column("label"), min_grade))
    # single-threaded so each list keeps the qrels order (hotpotqa: the paragraph order of the question)
    grouped = gold.group_by("qid", use_threads=False).aggregate([("docid", "list")])
    qid = queries.column("qid")
    supporting = grouped.column("docid_list").take(pc.index_in(qid, value_set=grouped.column("qid")))
    judged_without_gold = pc.and_(pc.is_null(supporting), pc.is_in(qid, value_set=qrels.column("qid")))
    supporting = pc.if_else(judged_without_gold, pa.scalar([], supporting.type), supporting)
    table = pa.table(
        {"qid": qid, "question": queries.column("query"), "answers": answers, "supporting": supporting}
    )
    return T.conform(T.QUESTIONS, table)


def _remove_table(path: Path) -> None:
    """Remove a table an earlier run wrote where this run writes none: no stale table passes for current."""
    for old in path.glob("part-*.parquet"):
        old.unlink()
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def _first_per_key(table: pa.Table, key: str) -> pa.Table:
    keep = ~T.duplicate_mask(table, [key])
    return table.filter(pa.array(keep))


def _value_counts(arr: pa.ChunkedArray) -> dict[Any, int]:
    vc = pc.value_counts(arr)
    return {v["values"].as_py(): v["counts"].as_py() for v in vc} if len(vc) else {}


# ------------------------------------------------------------------------------------------------- splits

SPLIT_TABLES = ("queries", "qrels", "pairs", "questions")
#: The split of queries without a single human label: nothing to train or test on, but the pool the judge
#: annotates. Not one of ``fractions``; its qrels table is empty.
UNLABELLED = "unlabelled"


class SplitConfig(StageConfig):
    """``augrel data split``: query-level train/val/test splits, seeded; a query never lands in two splits."""

    src: str = Field(description="a prepared dataset directory (output of `augrel data prepare`)")
    out: str = Field(description="output directory: splits.parquet plus one dataset directory per split")
    fractions: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.6, "val": 0.2, "test": 0.2},
        description="split name -> fraction of the judged queries (queries without a human label form the "
        "'unlabelled' split)",
    )
    folds: int = Field(0, ge=0, description="also assign each query a fold 0..folds-1 for cross-validation")
    seed: int = 13

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        if not self.fractions or any(v < 0 for v in self.fractions.values()):
            raise ValueError("fractions must be non-negative, e.g. {train: 0.6, val: 0.2, test: 0.2}")
        if UNLABELLED in self.fractions:
            raise ValueError(f"fractions: '{UNLABELLED}' is the split of queries without a human label, not one "
                             "to size: use another name")  # fmt: skip
        if abs(sum(self.fractions.values()) - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1, got {sum(self.fractions.values()):.4f}")
        if self.folds == 1:
            raise ValueError("folds must be 0 (none) or at least 2")
        return self


def assign_splits(qids: list[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Deterministic query -> split: shuffle the sorted unique qids with ``seed``, cut by fractions.

    Sizes use largest-remainder rounding so they add up to the number of queries, and every split with a
    positive fraction gets at least one query when there are enough queries.
    """
    uniq = sorted(set(qids))
    order = np.random.default_rng(seed).permutation(len(uniq))
    names = list(fractions)
    exact = np.array([fractions[n] for n in names]) * len(uniq)
    sizes = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - sizes))[: len(uniq) - sizes.sum()]:
        sizes[i] += 1
    for i, n in enumerate(names):  # borrow from the largest split so no requested split is empty
        if fractions[n] > 0 and sizes[i] == 0 and len(uniq) >= len(names):
            sizes[i] += 1
            sizes[int(np.argmax(sizes))] -= 1
    out: dict[str, str] = {}
    start = 0
    for n, size in zip(names, sizes, strict=False):
        for j in order[start : start + size]:
            out[uniq[j]] = n
        start += size
    return out


def assign_folds(qids: list[str], folds: int, seed: int) -> dict[str, int]:
    uniq = sorted(set(qids))
    order = np.random.default_rng(seed + 1).permutation(len(uniq))
    return {uniq[j]: int(i % folds) for i, j in enumerate(order)}


def split(cfg: SplitConfig) -> StageResult:
    """Judged queries into ``fractions`` (and folds); every other query, from the pairs or the queries table, into
    the ``unlabelled`` split, so no pair is dropped."""
    src, out = Path(cfg.src), Path(cfg.out)
    with Timer() as timer:
        try:
            pairs = T.conform(T.PAIRS, read_table(src / "pairs"))
        except DataError as e:
            raise DataError(f"{src}: not a prepared dataset ({e})") from None
        labelled = pairs.filter(pc.is_valid(pairs.column("label")))
        judged = set(labelled.column("qid").to_pylist())
        every = set(pairs.column("qid").to_pylist())
        if (src / "queries").exists():
            every |= set(read_table(src / "queries").column("qid").to_pylist())
        assignment = assign_splits(sorted(judged), cfg.fractions, cfg.seed)
        unlabelled = sorted(every - judged)
        cols: dict[str, Any] = {
            "qid": pa.array([*assignment, *unlabelled], pa.string()),
            "split": pa.array([*assignment.values(), *[UNLABELLED] * len(unlabelled)], pa.string()),
        }
        if cfg.folds:  # folds cross-validate judged queries; an unlabelled query has none
            folds = assign_folds(list(assignment), cfg.folds, cfg.seed)
            cols["fold"] = pa.array([*(folds[q] for q in assignment), *[None] * len(unlabelled)], pa.int8())
        splits = pa.table(cols).sort_by("qid")
        write_table(out / "splits", splits)
        counts: dict[str, int] = {}
        tables = {t: read_table(src / t) for t in SPLIT_TABLES if (src / t).exists()}
        for name in [*cfg.fractions, UNLABELLED]:
            chosen = pa.array(
                unlabelled if name == UNLABELLED else [q for q, s in assignment.items() if s == name],
                pa.string(),
            )
            for tname, table in tables.items():
                part = table.filter(pc.is_in(table.column("qid"), value_set=chosen))
                write_table(out / name / tname, part)
                counts[f"{name}.{tname}"] = part.num_rows
            for tname in SPLIT_TABLES:
                if tname not in tables:
                    _remove_table(out / name / tname)
            counts[f"{name}.queries_split"] = len(chosen)
        if "queries" not in tables:
            counts[f"{UNLABELLED}.queries"] = len(unlabelled)
    return write_stage_files(out, "data.split", cfg, counts, [str(src)], timer.seconds)
