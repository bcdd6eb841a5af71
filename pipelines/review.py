"""``augrel review export | import | serve``: route the pairs the judge is least sure of to people, and read their
grades back.

- ``export``: a judgments table and its pairs -> the ``budget`` pairs most worth a human look
  (``eval.routing.select_for_review``: uncertain, random or stratified), skipping pairs a human already graded,
  written as ``OUT/queue.parquet`` (review order), ``OUT/tasks.json`` (Label Studio tasks with the judge's
  grade as a prediction) and ``OUT/label_config.xml`` (the Label Studio labeling config for those tasks).
- ``serve``: a one-page review tool over a queue; every grade is appended to ``OUT/grades.jsonl`` and fsynced
  before the page is told it is saved, so a killed server loses nothing it acknowledged, and a reloaded page
  resumes at the first ungraded pair.
- ``import``: a Label Studio JSON (or JSON-MIN) export, the review page's ``grades.jsonl``, a TREC qrels file or
  a qrels / pairs table -> a qrels table; every row that gives no grade goes to ``OUT/rejected/`` with a reason
  (the rules are in ``eval.review_io``), and the manifest counts each kind.

No Ray: a review queue is hundreds to thousands of pairs, and the judgments table is read once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import Counter
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from eval import review_io
from pipelines import tables as T
from pipelines.errors import ConfigError, DataError
from pipelines.io import iter_lines, read_table, write_table
from pipelines.stage import StageConfig, StageResult, Timer, write_stage_files

log = logging.getLogger("augrel")

QUEUE_FILE = "queue.parquet"
TASKS_FILE = "tasks.json"
LABEL_CONFIG_FILE = "label_config.xml"
GRADES_LOG = "grades.jsonl"


def _check_grades(v: list[int]) -> list[int]:
    if not v or sorted(set(v)) != v or min(v) < 0 or max(v) > 9:
        # one digit per grade: the digit is the grade's keyboard shortcut on the page and in Label Studio
        raise ValueError("grades must be a non-empty increasing list of distinct integers in 0..9")
    return v


class ExportConfig(StageConfig):
    """``augrel review export``: which judged pairs go to human review, and where the queue is written."""

    judgments: str = Field(description="judgments table (directory, Parquet/JSONL file or glob)")
    pairs: str = Field(
        description="pairs table with the texts (query, text, title); its label marks human-graded"
    )
    out: str = Field(description="output directory: queue.parquet, tasks.json, label_config.xml, rejected/")
    budget: int = Field(gt=0, description="how many pairs to queue")
    strategy: Literal["uncertain", "random", "stratified"] = Field(
        "uncertain",
        description="uncertain: lowest confidence first; random; stratified: equal shares per grade",
    )
    seed: int = 0
    exclude: list[str] = Field(
        default_factory=list,
        description="human labels (qrels / pairs tables, TREC qrels files) not to queue again",
    )
    grades: list[int] = Field(default_factory=lambda: list(T.DEFAULT_GRADES))

    _grades = field_validator("grades")(_check_grades)


class ImportConfig(StageConfig):
    """``augrel review import``: human grades from a review tool -> a qrels table."""

    labels: str = Field(
        description="a Label Studio JSON / JSON-MIN export, the review page's grades.jsonl, a TREC qrels file, "
        "or a qrels / pairs table (qid, docid, label)"
    )
    out: str = Field(description="output directory: the qrels table, rejected/, manifest.json")
    grades: list[int] = Field(default_factory=lambda: list(T.DEFAULT_GRADES))
    on_disagreement: Literal["reject", "latest"] = Field(
        "reject",
        description="Label Studio tasks whose annotators disagree: reject them (to adjudicate) or take the latest",
    )
    queue: str | None = Field(
        None,
        description="the export's directory: also write OUT/pairs (the queue's texts with the human labels), "
        "the labelled pairs `judge calibrate --pairs` and `judge finetune` read",
    )

    _grades = field_validator("grades")(_check_grades)


class ReviewServeConfig(StageConfig):
    """``augrel review serve``: the review page over a queue."""

    queue: str = Field(description="the export's directory (or its queue.parquet)")
    out: str = Field(description="directory of grades.jsonl (created; grades already there are resumed)")
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535, description="0 picks a free port")
    reviewer: str | None = Field(None, description="recorded with every grade")
    grades: list[int] = Field(default_factory=lambda: list(T.DEFAULT_GRADES))

    _grades = field_validator("grades")(_check_grades)


# --------------------------------------------------------------------------------------------- export


def _read_judgments(path: str, grades: list[int]) -> tuple[pa.Table, pa.Table, int]:
    """Valid judgments (with a ``confidence`` for every row), their rejected rows, and how many confidences
    were derived here (tables written before the column existed, or rows where it is null)."""
    raw = read_table(path)
    try:
        table = T.conform(T.JUDGMENTS, raw, path)
    except T.SchemaError as e:
        raise DataError(f"{path}: not a judgments table: {e}") from None
    table, rejected = T.split_rejected(T.JUDGMENTS, table, source=str(path), grades=grades)
    derived = 0
    if table.num_rows:
        have = (
            table.column("confidence")
            if "confidence" in table.column_names
            else pa.nulls(table.num_rows, pa.float32())
        )
        missing = np.asarray(pc.is_null(have).to_numpy(zero_copy_only=False), dtype=bool)
        derived = int(missing.sum())
        if derived:
            from models.judge import label_confidence  # imports torch: only for tables that need it

            # every row kept has one probability per grade (split_rejected checked it)
            flat = pc.list_flatten(table.column("probs")).to_numpy(zero_copy_only=False)
            probs = np.asarray(flat, dtype=np.float32).reshape(-1, len(grades))
            label = table.column("label").to_numpy()
            computed = label_confidence(probs, label, grades)
            conf = np.where(missing, computed, np.asarray(have.fill_null(0).to_numpy(), dtype=np.float32))
            arr = pa.array(conf.astype(np.float32), pa.float32())
            if "confidence" in table.column_names:
                table = table.set_column(table.schema.get_field_index("confidence"), "confidence", arr)
            else:
                table = table.append_column("confidence", arr)
    elif "confidence" not in table.column_names:
        table = table.append_column("confidence", pa.nulls(0, pa.float32()))
    return table, rejected, derived


def _human_labelled(path: str, grades: list[int]) -> pa.Table:
    from pipelines.judge import read_qrels

    try:
        return read_qrels(path, grades).select(["qid", "docid"])
    except T.SchemaError as e:
        raise DataError(f"--exclude {path}: not a qrels table: {e}") from None


def _mark(keys: pa.Table, other: pa.Table, name: str) -> np.ndarray:
    """True for each row of ``keys`` whose (qid, docid) is in ``other``."""
    if not other.num_rows or not keys.num_rows:
        return np.zeros(keys.num_rows, dtype=bool)
    k = keys.select(["qid", "docid"]).append_column("_row", pa.array(np.arange(keys.num_rows)))
    o = other.select(["qid", "docid"]).group_by(["qid", "docid"]).aggregate([])
    o = o.append_column(name, pa.array(np.ones(o.num_rows, dtype=bool)))
    joined = k.join(o, ["qid", "docid"], join_type="inner", use_threads=False)
    out = np.zeros(keys.num_rows, dtype=bool)
    out[joined.column("_row").to_numpy()] = True
    return out


def export(cfg: ExportConfig) -> StageResult:
    from eval.routing import select_for_review
    from pipelines.judge import read_pairs

    out = Path(cfg.out)
    with Timer() as timer:
        judgments, j_rejected, derived = _read_judgments(cfg.judgments, cfg.grades)
        pairs, p_rejected = read_pairs(cfg.pairs)
        # Arrow joins cannot carry list columns (probs): join row numbers, then take rows
        jk = judgments.select(["qid", "docid"]).append_column("_j", pa.array(np.arange(judgments.num_rows)))
        pk = pairs.select(["qid", "docid"]).append_column("_p", pa.array(np.arange(pairs.num_rows)))
        joined = jk.join(pk, ["qid", "docid"], join_type="left outer", use_threads=False).sort_by("_j")
        has_pair = np.asarray(pc.is_valid(joined.column("_p")).to_numpy(zero_copy_only=False), dtype=bool)
        orphan_rows = joined.column("_j").to_numpy()[~has_pair]
        orphans = T.rejected_rows(
            "judgments", str(cfg.judgments),
            [(None, f"no pair ({q}, {d}) in {cfg.pairs}: no text to show a reviewer", None)
             for q, d in zip(judgments.column("qid").take(orphan_rows).to_pylist(),
                             judgments.column("docid").take(orphan_rows).to_pylist(), strict=True)],
        )  # fmt: skip
        matched = joined.filter(pa.array(has_pair))
        jrows, prows = matched.column("_j").to_numpy(), matched.column("_p").to_numpy()
        judged = judgments.take(pa.array(jrows))
        human = pairs.column("label").take(pa.array(prows))
        labelled = np.asarray(pc.is_valid(human).to_numpy(zero_copy_only=False), dtype=bool)
        in_qrels = np.zeros(len(jrows), dtype=bool)
        for path in cfg.exclude:
            in_qrels |= _mark(judged, _human_labelled(path, cfg.grades), "_in_qrels")
        exclude = labelled | in_qrels
        picked = select_for_review(
            judged.column("label").to_numpy(), judged.column("confidence").to_numpy(zero_copy_only=False),
            cfg.budget, cfg.strategy, cfg.seed, exclude,
        )  # fmt: skip
        take = pa.array(picked, pa.int64())
        q, t = judged.take(take), pairs.take(pa.array(prows[picked]))  # texts of the picked pairs only
        cols: dict[str, pa.Array | pa.ChunkedArray] = {
            "qid": q.column("qid"), "docid": q.column("docid"),
            "query": t.column("query"), "text": t.column("text"),
            "title": t.column("title") if "title" in t.column_names else pa.nulls(len(picked), pa.string()),
            "judge_label": q.column("label"), "confidence": q.column("confidence"), "score": q.column("score"),
            "judge": q.column("judge"), "prompt_version": q.column("prompt_version"),
            "rank": pa.array(np.arange(1, len(picked) + 1), pa.int32()),
        }  # fmt: skip
        for c in ("injection", "injection_kind"):
            if c in q.column_names:
                cols[c] = q.column(c)
        queue = pa.table(cols)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (QUEUE_FILE + ".tmp")
        pq.write_table(queue, tmp, compression="zstd")
        os.replace(tmp, out / QUEUE_FILE)
        tasks = [review_io.task(row) for row in queue.to_pylist()]
        (out / TASKS_FILE).write_text(json.dumps(tasks, ensure_ascii=False, indent=1) + "\n")
        (out / LABEL_CONFIG_FILE).write_text(review_io.label_config_xml(cfg.grades))
        rejected = pa.concat_tables([j_rejected, p_rejected, orphans])
        write_table(out / "rejected", rejected)
    if len(picked) < cfg.budget:
        log.warning("only %d pairs without a human label to queue (budget %d)", len(picked), cfg.budget)
    mix = Counter(int(v) for v in queue.column("judge_label").to_pylist())
    counts = {
        "judgments_in": judgments.num_rows + j_rejected.num_rows,
        "pairs_in": pairs.num_rows + p_rejected.num_rows,
        "rejected": rejected.num_rows,
        "without_pair": orphans.num_rows,
        "human_labelled": int(exclude.sum()),
        "pool": int((~exclude).sum()),
        "queued": queue.num_rows,
        "confidence_derived": derived,
    }
    conf = np.asarray(queue.column("confidence").to_numpy(zero_copy_only=False), dtype=np.float64)
    return write_stage_files(
        out, "review.export", cfg, counts, [cfg.judgments, cfg.pairs, *cfg.exclude], timer.seconds,
        {"table": "review queue", "strategy": cfg.strategy, "seed": cfg.seed,
         "queue_judge_grades": {str(g): mix.get(g, 0) for g in cfg.grades},
         "queue_confidence_mean": round(float(np.nanmean(conf)), 4) if len(conf) else None,
         "excluded_by_pairs_label": int(labelled.sum()), "excluded_by_qrels": int((in_qrels & ~labelled).sum()),
         "files": [QUEUE_FILE, TASKS_FILE, LABEL_CONFIG_FILE]},
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- import


def read_labels(path: str, grades: list[int], on_disagreement: str = "reject") -> review_io.Parsed:
    """Parse any supported labels file into grades (one per pair) and rejects; raise DataError naming the file
    when it is none of the formats."""
    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 ({e})") from None
        parsed = review_io.parse_json_document(text, grades, on_disagreement)
        if parsed is not None:
            return parsed
        if text.lstrip().startswith("{"):  # JSON Lines under a .json name
            return review_io.parse_jsonl(((n, t) for n, t, _ in iter_lines(p)), grades)
        raise DataError(f"{p}: not a Label Studio export (a JSON list of tasks) nor JSON Lines of records")
    if p.is_file() and p.suffix == ".jsonl":
        return review_io.parse_jsonl(((n, t) for n, t, _ in iter_lines(p)), grades)
    if p.is_file() and p.suffix not in (".parquet",):
        from pipelines.data import read_trec_qrels

        rejects: list[pa.Table] = []
        table = read_trec_qrels(p, list(grades), rejects)
        parsed = review_io.Parsed()
        for r in pa.concat_tables(rejects).to_pylist() if rejects else []:
            parsed.rejects.append(review_io.Reject("bad_qrels_line", r["reason"], r["line"], r["raw"]))
        found = [
            review_io.Grade(q, d, int(g), int(n), f"{q} 0 {d} {g}")
            for q, d, g, n in zip(*(table.column(c).to_pylist() for c in ("qid", "docid", "label", "_line")),
                                  strict=True)
        ]  # fmt: skip
        parsed.rows_in = len(found) + len(parsed.rejects)
        kept, rej, _, parsed.duplicates_same_grade = review_io.resolve_pairs(found, last_wins=False)
        parsed.grades, parsed.rejects = kept, parsed.rejects + rej
        return parsed
    table = read_table(path)
    missing = [c for c in ("qid", "docid", "label") if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}: give a qrels or labelled pairs table")
    cols = ["qid", "docid", "label"] + (
        [review_io.LOG_TIME_KEY] if review_io.LOG_TIME_KEY in table.column_names else []
    )
    records = table.select(cols).to_pylist()
    parsed = review_io.Parsed(rows_in=len(records))
    found, parsed.rejects, is_log = review_io.parse_records(enumerate(records, 1), grades)
    kept, rej, parsed.superseded, parsed.duplicates_same_grade = review_io.resolve_pairs(found, is_log)
    parsed.grades, parsed.rejects = kept, parsed.rejects + rej
    return parsed


def qrels_table(found: list[review_io.Grade]) -> pa.Table:
    return pa.table(
        {
            "qid": pa.array([g.qid for g in found], pa.string()),
            "docid": pa.array([g.docid for g in found], pa.string()),
            "label": pa.array([g.label for g in found], pa.int8()),
        },
        schema=T.QRELS.schema(),
    )


def labelled_pairs(queue: pa.Table, qrels: pa.Table) -> pa.Table:
    """The queue's pairs (texts) that got a human label, as a pairs table with that label, in review order."""
    texts = queue.select(
        [c for c in ("qid", "docid", "query", "text", "title", "rank") if c in queue.column_names]
    )
    joined = texts.join(qrels, ["qid", "docid"], join_type="inner", use_threads=False).sort_by("rank")
    return T.conform(T.PAIRS, joined.drop_columns(["rank"]))


def import_labels(cfg: ImportConfig) -> StageResult:
    out = Path(cfg.out)
    with Timer() as timer:
        parsed = read_labels(cfg.labels, cfg.grades, cfg.on_disagreement)
        qrels = qrels_table(parsed.grades)
        rejected = T.rejected_rows(
            "labels", str(cfg.labels), [(r.line, r.reason, r.raw) for r in parsed.rejects]
        )
        write_table(out, qrels)
        write_table(out / "rejected", rejected)
        if cfg.queue:
            labelled = labelled_pairs(read_queue(cfg.queue), qrels)
            write_table(out / "pairs", labelled)
    reasons = Counter(r.kind for r in parsed.rejects)
    counts = {
        "rows_in": parsed.rows_in,
        "labels": qrels.num_rows,
        "rejected": rejected.num_rows,
        "superseded": parsed.superseded,
        "duplicates_same_grade": parsed.duplicates_same_grade,
    }
    if cfg.queue:
        # a label for a pair outside the queue stays in the qrels table; it has no text to make a pair of
        counts |= {"pairs": labelled.num_rows, "labels_not_in_queue": qrels.num_rows - labelled.num_rows}
    mix = Counter(g.label for g in parsed.grades)
    return write_stage_files(
        out, "review.import", cfg, counts, [cfg.labels, *([cfg.queue] if cfg.queue else [])], timer.seconds,
        {"table": "qrels", "rejected_reasons": dict(sorted(reasons.items())),
         "grades": {str(g): mix.get(g, 0) for g in cfg.grades}},
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- serve


def read_queue(path: str) -> pa.Table:
    p = Path(path)
    f = p if p.is_file() else p / QUEUE_FILE
    if not f.is_file():
        raise DataError(f"{f}: no review queue here (write one with `augrel review export`)")
    table = pq.read_table(f)
    missing = [
        c for c in ("qid", "docid", "query", "text", "judge_label", "rank") if c not in table.column_names
    ]
    if missing:
        raise DataError(f"{f}: not a review queue: missing column(s) {missing}")
    return table.sort_by("rank")


class GradeLog:
    """The review page's grades: an append-only JSONL file, each line fsynced before it is acknowledged.

    Last grade per pair wins. A line cut off by a crash was never acknowledged; it is reported and skipped, and
    the next grade starts on a fresh line."""

    def __init__(self, path: Path, queue: pa.Table, grades: list[int], reviewer: str | None):
        self.path, self.grades, self.reviewer = path, list(grades), reviewer
        self.items = queue.to_pylist()
        self.rank = {(r["qid"], r["docid"]): r["rank"] for r in self.items}
        self.lock = threading.Lock()
        self.broken = False
        self.current: dict[tuple[str, str], int] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            parsed = review_io.parse_jsonl(((n, t) for n, t, _ in iter_lines(path)), grades)
            for r in parsed.rejects:
                log.warning("%s: line %s skipped: %s", path, r.line, r.reason)
            self.current = {(g.qid, g.docid): g.label for g in parsed.grades}
        new = not path.exists()
        self.fh = open(path, "ab")  # noqa: SIM115 (held open for the server's lifetime)
        if not new and path.stat().st_size:
            with open(path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    self.fh.write(b"\n")
        self._sync()
        if new:  # the file's directory entry too, so the file itself survives a power cut
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _sync(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def graded(self) -> int:
        with self.lock:
            return sum(1 for k in self.current if k in self.rank)

    def record(self, qid: str, docid: str, label: int) -> int:
        """Append one grade and fsync it; returns how many queue pairs are graded. Raises OSError unsaved."""
        rec = {"qid": qid, "docid": docid, "label": label, "rank": self.rank[(qid, docid)],
               review_io.LOG_TIME_KEY: datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
               "reviewer": self.reviewer}  # fmt: skip
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            try:
                # after a failed write the file may end mid-line: start afresh (a blank line is skipped on read)
                self.fh.write(b"\n" + line if self.broken else line)
                self._sync()
            except OSError:
                self.broken = True
                raise
            self.broken = False
            self.current[(qid, docid)] = label
            return sum(1 for k in self.current if k in self.rank)

    def close(self) -> None:
        self.fh.close()


class _Handler(BaseHTTPRequestHandler):
    server: _ReviewServer
    MAX_BODY = 64 * 1024

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("review page: " + format, *args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        # passages are untrusted text: the page shows them with textContent, and this forbids anything else
        self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; "
                         "style-src 'unsafe-inline'; connect-src 'self'")  # fmt: skip
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def do_GET(self) -> None:
        g = self.server.log
        if self.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.encode("utf-8"), "text/html; charset=utf-8")
        elif self.path == "/api/queue":
            meaning = {g_: review_io.GRADE_MEANING.get(g_, "") for g_ in g.grades}
            self._json(
                HTTPStatus.OK,
                {"grades": g.grades, "meaning": meaning, "reviewer": g.reviewer, "items": g.items},
            )
        elif self.path == "/api/grades":
            with g.lock:
                rows = [
                    {"qid": q, "docid": d, "label": v} for (q, d), v in g.current.items() if (q, d) in g.rank
                ]
            self._json(HTTPStatus.OK, {"grades": rows, "graded": len(rows), "of": len(g.items)})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such page: {self.path}")

    def do_POST(self) -> None:
        g = self.server.log
        if self.path != "/api/grades":
            return self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: {self.path}")
        # a JSON content type makes a cross-site form post need a CORS preflight, which this server never grants
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Content-Type must be application/json")
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
        if n > self.MAX_BODY:
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {self.MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return self._error(HTTPStatus.BAD_REQUEST, f"body is not UTF-8 JSON ({e})")
        if not isinstance(body, dict):
            return self._error(HTTPStatus.BAD_REQUEST, "body must be a JSON object {qid, docid, label}")
        qid, docid, label = body.get("qid"), body.get("docid"), body.get("label")
        if not isinstance(qid, str) or not isinstance(docid, str):
            return self._error(HTTPStatus.BAD_REQUEST, "qid and docid: strings required")
        if (qid, docid) not in g.rank:
            return self._error(HTTPStatus.NOT_FOUND, f"pair ({qid}, {docid}) is not in the queue")
        if isinstance(label, bool) or not isinstance(label, int) or label not in g.grades:
            return self._error(
                HTTPStatus.BAD_REQUEST, f"label: {label!r} is not a grade (grades are {g.grades})"
            )
        try:
            graded = g.record(qid, docid, label)
        except OSError as e:  # the disk said no: the page must not count this grade as saved
            log.error("%s: could not save a grade: %s", g.path, e)
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"could not save to {g.path.name}: {e}")
        self._json(HTTPStatus.OK, {"saved": True, "graded": graded, "of": len(g.items)})


class _ReviewServer(ThreadingHTTPServer):
    daemon_threads = True
    log: GradeLog


def make_server(cfg: ReviewServeConfig) -> _ReviewServer:
    """The review server bound to ``cfg.host:cfg.port`` (not yet serving); ``server_address`` has the port."""
    queue = read_queue(cfg.queue)
    bad = sorted({int(v) for v in queue.column("judge_label").to_pylist()} - set(cfg.grades))
    if bad:
        raise ConfigError(f"grades {cfg.grades}: the queue has judge grades {bad} outside them")
    grade_log = GradeLog(Path(cfg.out) / GRADES_LOG, queue, cfg.grades, cfg.reviewer)
    try:
        server = _ReviewServer((cfg.host, cfg.port), _Handler)
    except OSError as e:
        grade_log.close()
        raise ConfigError(f"port {cfg.port} on {cfg.host}: cannot listen ({e.strerror})") from None
    server.log = grade_log
    return server


def serve(cfg: ReviewServeConfig, echo=print) -> None:
    server = make_server(cfg)
    host, port = server.server_address[:2]
    g = server.log
    echo(f"review page at http://{host}:{port}/ : {len(g.items)} pairs, {g.graded()} graded so far; "
         f"grades -> {g.path} (Ctrl-C stops it)", flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        g.close()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>augrel review</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:16px/1.45 system-ui,sans-serif;max-width:52rem;margin:1.5rem auto;padding:0 1rem;color:#222}
 header{display:flex;justify-content:space-between;align-items:baseline;border-bottom:1px solid #ddd}
 #query{font-size:1.3rem;font-weight:600;margin:1rem 0 .3rem}
 #title{font-weight:600;color:#444}
 #text{white-space:pre-wrap;background:#f7f7f7;padding:.8rem;border-radius:4px;max-height:50vh;overflow:auto}
 #judge{color:#555;margin:.5rem 0}
 #flag{color:#a40;font-weight:600}
 .grades button{font-size:1.1rem;padding:.5rem 1rem;margin-right:.4rem}
 .grades button.mine{background:#2a6;color:#fff}
 #status{min-height:1.4em;margin-top:.6rem}
 #status.error{color:#b00;font-weight:600}
 kbd{border:1px solid #bbb;border-radius:3px;padding:0 .25rem;font-size:.85em}
</style></head>
<body>
<header><h1>augrel review</h1><div><span id="progress">loading</span> · <span id="position"></span></div></header>
<main id="pair" hidden>
 <div id="query"></div><div id="title"></div><div id="text"></div>
 <div id="judge"></div><div id="flag"></div>
 <div class="grades" id="buttons"></div>
 <p><button id="back">&larr; back</button> <button id="skip">skip &rarr;</button>
  <small>keys: <kbd>0</kbd>-<kbd>3</kbd> grade, <kbd>&larr;</kbd> back, <kbd>&rarr;</kbd> skip</small></p>
</main>
<p id="done" hidden>Every pair in the queue is graded. Go back to change a grade; the last one counts.</p>
<div id="status"></div>
<script>
"use strict";
let items = [], grades = [], mine = new Map(), at = 0, saving = false;
const $ = (id) => document.getElementById(id);
const key = (it) => JSON.stringify([it.qid, it.docid]);
const firstUngraded = () => { const i = items.findIndex((it) => !mine.has(key(it))); return i < 0 ? items.length : i; };
function status(text, error) { $("status").textContent = text; $("status").className = error ? "error" : ""; }
function render() {
  $("progress").textContent = `${items.filter((it) => mine.has(key(it))).length} graded of ${items.length}`;
  $("position").textContent = at < items.length ? `pair ${at + 1} of ${items.length}` : "end of queue";
  $("done").hidden = at < items.length; $("pair").hidden = at >= items.length;
  if (at >= items.length) return;
  const it = items[at];
  $("query").textContent = it.query; $("title").textContent = it.title || ""; $("text").textContent = it.text;
  const conf = it.confidence == null ? "n/a" : Number(it.confidence).toFixed(2);
  $("judge").textContent = `judge (${it.judge || "?"}): grade ${it.judge_label}, confidence ${conf}`;
  $("flag").textContent = it.injection ? `instruction-like text in the passage (${it.injection_kind || "flagged"})` : "";
  for (const b of $("buttons").children) b.classList.toggle("mine", mine.get(key(it)) === Number(b.dataset.grade));
}
async function grade(g) {
  if (saving || at >= items.length) return;
  const it = items[at];
  saving = true; status(`saving grade ${g} ...`);
  try {
    const r = await fetch("api/grades", {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify({qid: it.qid, docid: it.docid, label: g})});
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
    mine.set(key(it), g); at += 1; status(`saved grade ${g} for ${it.qid} / ${it.docid}`);
  } catch (e) {
    status(`NOT saved (${e.message}): grade ${g} for this pair was not recorded; press it again`, true);
  } finally { saving = false; render(); }
}
function move(step) { if (!saving) { at = Math.min(Math.max(at + step, 0), items.length); status(""); render(); } }
document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const g = Number(e.key);
  if (e.key.length === 1 && grades.includes(g)) { e.preventDefault(); grade(g); }
  else if (e.key === "ArrowLeft") { e.preventDefault(); move(-1); }
  else if (e.key === "ArrowRight") { e.preventDefault(); move(1); }
});
$("back").onclick = () => move(-1); $("skip").onclick = () => move(1);
async function load() {
  try {
    const [q, s] = await Promise.all([fetch("api/queue"), fetch("api/grades")]);
    if (!q.ok || !s.ok) throw new Error(`HTTP ${q.status} / ${s.status}`);
    const queue = await q.json(), saved = await s.json();
    items = queue.items; grades = queue.grades;
    mine = new Map(saved.grades.map((r) => [key(r), r.label]));
    for (const g of grades) {
      const b = document.createElement("button");
      b.textContent = `${g} ${queue.meaning[g] || ""}`.trim(); b.dataset.grade = String(g); b.onclick = () => grade(g);
      $("buttons").appendChild(b);
    }
    at = firstUngraded(); render();
  } catch (e) { status(`could not load the queue (${e.message}); reload the page`, true); }
}
load();
</script>
</body></html>
"""
