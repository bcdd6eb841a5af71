"""``augrel annotate``: the judge over millions of pairs with a Ray Data actor pool, exactly once, resumable.

The input (sharded Parquet or JSONL, a directory or a glob) is cut into *work units*: a row range of a Parquet
file or a byte range of a JSONL file, ``unit_rows`` pairs each. A unit is the grain of everything that must
not go wrong:

- its judgments land in ONE output partition named after it (``part-FFFFF-UUUUU.parquet``, file and unit
  index), written to a temporary name and renamed, so a partition is either whole or absent;
- its bad rows land in ``rejected/`` under the same name, with a reason, before its judgments are written;
- a unit whose partition exists is done: ``--resume`` plans the same units and runs only the missing ones, so
  the finished output is identical to an uninterrupted run's (scores of a unit depend only on its rows);
- a judge actor that dies mid-unit is restarted by Ray and its task retried; the task's output never reached
  the writer, and a rewrite of the same partition replaces it, so nothing is lost or duplicated;
- a (qid, docid) pair that came earlier in the input (in any unit) is rejected with the unit and row of its
  first occurrence, found from the key columns when the run is planned: each pair is judged once.

A unit is read as one block, or, when a run has fewer units than twice the pool, in ``pieces`` (row or byte
sub-ranges, fixed in the plan) so that every actor gets work. A unit that reaches the writers in parts (pieces,
or a block Ray Data split for exceeding ``target_max_block_size``) is written as fragments under ``_pieces/``,
and the driver assembles its partition, each row once, when every row of every piece has been written.

The dataset is streamed: read tasks -> judge actors (``map_batches`` with a callable class, the model loaded
once per actor, an autoscaling pool of ``concurrency=(min, max)``) -> write tasks -> the driver, which only
sees one small summary row per unit (for the progress bar and the manifest). Memory stays flat in the number
of pairs. Actors are sized so that read and write tasks always find a CPU: a pool holding every CPU starves
them and the dataset hangs.

Input columns: ``qid, docid, query, text`` (+ optional ``title, url``; ``label`` is ignored). Output: the
judgments table ``qid, docid, label, score, probs, judge, prompt_version, truncated, n_tokens, confidence,
injection, injection_kind`` (``confidence``: the judge's probability of its own label; ``injection``: the judge's
detector found an instruction-like span in the passage, ``models.injection``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from pipelines import tables as T
from pipelines.errors import ConfigError, DataError
from pipelines.io import expand_paths
from pipelines.stage import StageConfig, StageResult, Timer, write_stage_files

log = logging.getLogger("augrel")

PLAN = "_plan.json"
INPUT_COLUMNS = ("qid", "docid", "query", "text", "title", "url")
# Characters kept of a passage before tokenizing: no tokenizer we know packs more than 16 characters into a
# token on average, so the kept text still holds max_doc_tokens tokens, and a 1 MB passage costs no more
# than a normal one (and keeps blocks small). Cutting here is recorded as truncation.
CHARS_PER_TOKEN_BOUND = 16
# Read and write tasks are light; they reserve little CPU so they always fit beside the actor pool.
IO_TASK_CPUS = 0.1
IO_TASK_POOL = 2  # concurrent read tasks, and concurrent write tasks
# How long a run waits for its pool's minimum actors before the first piece is handed out: pieces given out while
# one actor is up queue on it (two in flight per actor) and the others idle. Long: a judge may be downloaded, or
# a GPU node added on demand.
WAIT_FOR_ACTORS_S = 1800


MODES = ("relevance", "relsel", "utility-sel", "utility-rank", "answer-likelihood")


class AnnotateConfig(StageConfig):
    """``augrel annotate``: which judge grades which pairs, on what resources, and where the judgments go.

    ``mode`` relevance grades each pair with the judge (a judgments table); the other modes run paper 2's
    utility annotation (models/utility.py) over each question's candidates with a causal LM and write a utility
    table: a work unit then holds whole questions, and a question's stages run on one actor, in order.
    """

    mode: Literal["relevance", "relsel", "utility-sel", "utility-rank", "answer-likelihood"] = Field(
        "relevance",
        description="relevance: pointwise grades (judgments table); relsel | utility-sel | utility-rank: "
        "listwise selection / ranking of each question's candidates; answer-likelihood: log P(answer|q,p) - "
        "log P(answer|q) per pair (utility table)",
    )
    judge: str = Field(
        "gemma3-270m",
        description="relevance: a judge directory (from finetune) or a base model; utility modes: the causal LM "
        "that annotates (hub id, local directory, or the offline alias)",
    )
    pairs: str = Field(description="pairs: a table directory, a Parquet/JSONL file, or a glob")
    out: str = Field(description="output directory for the judgments table")
    resume: bool = Field(False, description="finish an interrupted run in OUT: only missing units are run")
    overwrite: bool = Field(False, description="discard what OUT holds and start again")
    profile: str = Field(
        "cpu-small",
        description="resource profile giving the pool defaults below (cluster/profiles; `augrel cluster profile NAME`)",
    )
    concurrency: tuple[int, int] | None = Field(None, description="judge actors (min, max); default: profile")
    batch_size: int | None = Field(None, gt=0, description="pairs per forward pass; default: profile")
    num_cpus_per_actor: float | None = Field(None, gt=0, description="default: profile")
    num_gpus_per_actor: float | None = Field(None, ge=0, description="default: profile")
    torch_threads: int | None = Field(None, gt=0, description="per actor; default: its CPUs, at least 1")
    unit_rows: int = Field(
        2048, gt=0, description="pairs per work unit: the grain of progress, retries and resume"
    )
    template: str = Field(
        "umbrela-v1", description="prompt template for a base model (a judge dir has its own)"
    )
    max_doc_tokens: int = Field(256, gt=0, description="passage truncation for a base model")
    dtype: str = Field("auto", pattern="^(auto|bf16|fp16|fp32)$")
    guard: Literal["off", "flag", "strip"] | None = Field(
        None, description="relevance: the injection detector (models.injection): strip grades passages without "
        "instruction-like spans, flag only marks them; default: the judge card's (strip for a base model)",
    )  # fmt: skip
    compile: bool = Field(
        False,
        description="torch.compile each actor's decoder (faster scoring after a one-off compile of minutes)",
    )
    limit_units: int | None = Field(
        None, gt=0, description="run at most N pending units, then stop (a partial run; --resume finishes it)"
    )
    window: int = Field(16, gt=0, description="utility modes: passages per listwise prompt")
    passage_tokens: int = Field(400, gt=0, description="utility modes: passages cut to this many tokens")
    top_fraction: float = Field(0.1, gt=0, le=1, description="utility-rank / answer-likelihood: the top "
                                "fraction of each question's ranking (at least one) are positives")  # fmt: skip
    min_utility: float = Field(
        0.0, description="answer-likelihood: a positive must raise log P(answer) by more"
    )
    answer_source: Literal["auto", "gold", "pseudo"] = Field(
        "auto",
        description="answer-likelihood: the pairs' gold answers (auto: when present), or a pseudo answer",
    )
    seed: int = Field(0, description="utility modes: base of the per-window passage shuffles")
    constrain_listwise: bool = Field(
        True, description="utility modes: decode selections and rankings over the format's tokens only"
    )
    autoscaling_cluster: bool = Field(
        False, description="the cluster adds nodes on demand (KubeRay in-tree autoscaling, GPU groups from 0): "
        "keep the pool's size instead of fitting it to the nodes up at the start")  # fmt: skip

    @model_validator(mode="after")
    def _check(self) -> AnnotateConfig:
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite: choose one")
        if self.concurrency and not 1 <= self.concurrency[0] <= self.concurrency[1]:
            raise ValueError(f"concurrency: need 1 <= min <= max, got {list(self.concurrency)}")
        if self.mode != "relevance":
            from models.judge_card import is_judge_dir

            if is_judge_dir(self.judge):
                raise ValueError(f"judge: {self.judge} is a relevance judge directory (its adapter grades pairs); "
                                 f"mode {self.mode} needs a causal LM: a hub id, a local model directory or "
                                 "gemma3-270m")  # fmt: skip
        return self

    @property
    def utility(self) -> bool:
        return self.mode != "relevance"

    def utility_prompts(self):
        from models.utility import UtilityPrompts

        return UtilityPrompts(window=self.window, passage_tokens=self.passage_tokens,
                              top_fraction=self.top_fraction, constrain_listwise=self.constrain_listwise)  # fmt: skip


# -------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class WorkUnit:
    """A slice of one input file: rows [start, stop) of a Parquet file, or bytes [start, stop) of a JSONL file
    (the lines that *begin* in that byte range)."""

    name: str
    path: str
    fmt: str  # "parquet" | "jsonl"
    start: int
    stop: int


def _parquet_columns(path: Path) -> list[str]:
    return pq.read_schema(path).names


def query_starts(path: Path, seen: dict[str, str] | None = None) -> np.ndarray:
    """The positions (Parquet row, JSONL byte offset) where each question's rows begin, for units that hold whole
    questions. A question's rows must be contiguous: listwise annotation needs all its candidates at once, and
    regrouping a corpus-scale input is a job of its own, not something to do silently on the driver."""
    if path.suffix == ".parquet":
        qids = pc.cast(pq.read_table(path, columns=["qid"]).column("qid"), pa.string()).to_pylist()
        pos = np.arange(len(qids), dtype=np.int64)
    else:
        qids, _, offsets = _jsonl_keys(path)
        pos = np.asarray(offsets, dtype=np.int64)
    # ``seen`` is shared across the files of one input: a question must not run on into the next file either
    seen = {} if seen is None else seen
    where = "row" if path.suffix == ".parquet" else "byte"
    starts, prev = [], object()
    for i, q in enumerate(qids):
        if q == prev:
            continue
        here = f"{path.name} {where} {int(pos[i])}"
        if q is not None and q in seen:
            raise DataError(f"{path}: the candidates of question {q!r} are not contiguous (at {seen[q]} and again "
                            f"at {here}): listwise modes need each question's rows together, in one file; sort "
                            "the pairs by qid and keep a question within one file")  # fmt: skip
        if q is not None:
            seen[q] = here
        starts.append(int(pos[i]))
        prev = q
    return np.asarray(starts, dtype=np.int64)


def _snap(bounds: list[tuple[int, int]], starts: np.ndarray) -> list[tuple[int, int]]:
    """Ranges moved so that each begins where a question begins (a question is never split); empty ones dropped."""
    if not len(bounds):
        return bounds
    lo, hi = bounds[0][0], bounds[-1][1]
    cuts = [lo]
    for a, _ in bounds[1:]:
        i = int(np.searchsorted(starts, a, side="left"))
        c = int(starts[i]) if i < len(starts) else hi
        if c > cuts[-1] and c < hi:
            cuts.append(c)
    cuts.append(hi)
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a] or [(lo, hi)]


def input_query_starts(pairs: str) -> dict[str, np.ndarray]:
    """``query_starts`` of every input file, by resolved path."""
    seen: dict[str, str] = {}
    return {str(p.resolve()): query_starts(p, seen) for p in expand_paths(pairs)}


def plan_units(
    pairs: str, unit_rows: int, starts: dict[str, np.ndarray] | None = None
) -> tuple[list[WorkUnit], list[dict[str, Any]]]:
    """The work units of an input, in a fixed order, and a fingerprint of the files they come from.

    ``starts`` (``input_query_starts``): each unit boundary moves forward to where a question begins (units of
    about ``unit_rows`` pairs that never split a question's candidates)."""
    files = expand_paths(pairs)
    units: list[WorkUnit] = []
    fingerprint = []
    for fi, path in enumerate(files):
        st = path.stat()
        fingerprint.append({"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
        if path.suffix == ".parquet":
            missing = [c for c in ("qid", "docid", "query", "text") if c not in _parquet_columns(path)]
            if missing:
                raise DataError(f"{path}: not a pairs table: missing column(s) {missing} "
                                f"(pairs need qid, docid, query, text; title, url optional)")  # fmt: skip
            n = pq.ParquetFile(path).metadata.num_rows
            bounds = [(s, min(s + unit_rows, n)) for s in range(0, n, unit_rows)] or [(0, 0)]
            fmt = "parquet"
        elif path.suffix in (".jsonl", ".json"):
            # Byte ranges sized for about unit_rows lines from the average line length of the file's start.
            size = st.st_size
            with open(path, "rb") as fh:
                head = fh.read(1 << 20)
            lines = max(1, head.count(b"\n"))
            step = max(1, int(len(head) / lines * unit_rows)) if head else 1
            bounds = [(s, min(s + step, size)) for s in range(0, size, step)] or [(0, 0)]
            fmt = "jsonl"
        else:
            raise DataError(f"{path}: unsupported file type (use .parquet or .jsonl)")
        if starts is not None:
            bounds = _snap(bounds, starts[str(path.resolve())])
        units += [WorkUnit(f"part-{fi:05d}-{ui:05d}", str(path.resolve()), fmt, s, e)
                  for ui, (s, e) in enumerate(bounds)]  # fmt: skip
    return units, fingerprint


def _jsonl_keys(path: Path) -> tuple[list[str | None], list[str | None], list[int]]:
    """(qid, docid, byte offset) of every line of a JSONL file that parses to an object; the rest are the reader's
    to reject."""
    qids, docids, offsets = [], [], []
    with open(path, "rb") as fh:
        pos = 0
        for raw in fh:
            offset, pos = pos, pos + len(raw)
            try:
                obj = json.loads(raw)
            except ValueError:  # invalid JSON, not UTF-8, a blank line
                continue
            if isinstance(obj, dict):
                q, d = obj.get("qid"), obj.get("docid")
                qids.append(str(q) if isinstance(q, str | int) else None)
                docids.append(str(d) if isinstance(d, str | int) else None)
                offsets.append(offset)
    return qids, docids, offsets


def find_duplicates(units: list[WorkUnit]) -> dict[str, dict[int, str]]:
    """unit name -> {position: reason} of the pairs whose (qid, docid) came earlier in the input, in plan order.

    A position is a Parquet file's 0-based row or a JSONL line's byte offset. The first occurrence is judged; a
    later one, in whatever unit, is rejected with this reason, so a pair is judged once (twice, it was graded
    twice and broke the joins downstream). Only the key columns are read, on the driver, once per run.
    """
    files = list(dict.fromkeys(u.path for u in units))
    parts = []
    for fi, path in enumerate(files):
        if path.endswith(".parquet"):
            keys = pq.read_table(path, columns=["qid", "docid"])
            try:
                qid, docid = (pc.cast(keys.column(c), pa.string()) for c in ("qid", "docid"))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise DataError(f"{path}: qid/docid are not strings or integers ({e})") from None
            pos = pa.array(np.arange(keys.num_rows), pa.int64())
        else:
            q, d, offsets = _jsonl_keys(Path(path))
            qid, docid, pos = (
                pa.array(q, pa.string()),
                pa.array(d, pa.string()),
                pa.array(offsets, pa.int64()),
            )
        parts.append(pa.table({"qid": qid, "docid": docid, "_pos": pos,
                               "_file": pa.array(np.full(len(pos), fi), pa.int32())}))  # fmt: skip
    if not parts:
        return {}
    keys = pa.concat_tables(parts)
    keys = keys.append_column("_i", pa.array(np.arange(keys.num_rows), pa.int64()))
    valid = pc.and_(pc.and_(pc.is_valid(keys["qid"]), pc.is_valid(keys["docid"])),
                    pc.and_(pc.not_equal(pc.utf8_trim_whitespace(keys["qid"]), ""),
                            pc.not_equal(pc.utf8_trim_whitespace(keys["docid"]), "")))  # fmt: skip
    good = keys.filter(pc.fill_null(valid, False))
    agg = good.group_by(["qid", "docid"], use_threads=False).aggregate([("_i", "min"), ("_i", "count")])
    agg = agg.filter(pc.greater(agg["_i_count"], 1))
    if not agg.num_rows:
        return {}
    dup = good.join(agg.select(["qid", "docid", "_i_min"]), ["qid", "docid"], use_threads=False)
    dup = dup.filter(pc.not_equal(dup["_i"], dup["_i_min"])).sort_by("_i")
    first = keys.take(dup["_i_min"])
    by_file: dict[str, list[WorkUnit]] = defaultdict(list)
    for u in units:
        by_file[u.path].append(u)
    out: dict[str, dict[int, str]] = defaultdict(dict)
    for f, pos, ff, fpos in zip(dup["_file"].to_pylist(), dup["_pos"].to_pylist(), first["_file"].to_pylist(),
                                first["_pos"].to_pylist(), strict=True):  # fmt: skip
        unit, first_unit = _unit_at(by_file[files[f]], pos), _unit_at(by_file[files[ff]], fpos)
        where = f"row {fpos + 1}" if first_unit.fmt == "parquet" else f"byte {fpos}"
        out[unit.name][pos] = f"duplicate (qid, docid): judged in unit {first_unit.name}, {where}"
    return dict(out)


def _unit_at(units: list[WorkUnit], pos: int) -> WorkUnit:
    """The unit of one file holding position ``pos`` (units are in file order, contiguous)."""
    i = int(np.searchsorted([u.start for u in units], pos, side="right")) - 1
    return units[max(0, i)]


def plan_pieces(n_units: int, actors: int, unit_rows: int, batch_size: int) -> int:
    """Pieces per unit: 1 when the units outnumber the pool twice; otherwise enough for every actor, no piece
    smaller than a forward batch. With one unit per block, a run of fewer units than actors left actors idle."""
    if n_units == 0 or n_units >= 2 * actors:
        return 1
    return max(1, min(-(-2 * actors // n_units), unit_rows // max(1, batch_size)))


def unit_pieces(unit: WorkUnit, pieces: int, starts: np.ndarray | None = None) -> list[tuple[int, int]]:
    """The ``pieces`` sub-ranges [start, stop) of a unit: rows of a Parquet file, bytes of a JSONL file (lines
    that begin in the range). Never more pieces than a Parquet unit has rows. With ``starts`` (where questions
    begin), the cuts move to question starts, so a piece holds whole questions (fewer pieces, if need be)."""
    span = unit.stop - unit.start
    k = max(1, min(pieces, span)) if span else 1
    step = -(-span // k) if span else 0
    ranges = [(unit.start + i * step, min(unit.stop, unit.start + (i + 1) * step)) for i in range(k)]
    return _snap(ranges, starts) if starts is not None and k > 1 else ranges


def effective_guard(cfg: AnnotateConfig) -> str | None:
    """The injection guard the judge actors grade behind (None for the utility modes): the config's, else the
    judge card's (off for a card from before the detector), else strip for a base model."""
    from models.judge_card import CARD, is_judge_dir

    if cfg.utility:
        return None
    if cfg.guard:
        return cfg.guard
    if is_judge_dir(cfg.judge):
        return json.loads((Path(cfg.judge) / CARD).read_text()).get("injection_guard", "off")
    return "strip"


def judge_fingerprint(judge: str) -> dict[str, Any]:
    """What identifies a judge: its card (base model, prompt version, cut-points), its adapter's and its stack
    combiner's bytes (a judge re-calibrated in place grades differently)."""
    from models.judge_card import CARD, is_judge_dir

    if not is_judge_dir(judge):
        return {"judge": judge}
    card = json.loads((Path(judge) / CARD).read_text())
    digest = hashlib.sha256()
    adapter = Path(judge) / (card.get("adapter") or "adapter")
    for f in sorted(adapter.glob("*.safetensors")) if adapter.exists() else []:
        digest.update(f.read_bytes())
    combiner = Path(judge) / card["combiner"] if card.get("combiner") else None
    return {"judge": str(Path(judge).resolve()), "base_model": card["base_model"],
            "prompt_version": card["prompt_version"], "adapter_sha256": digest.hexdigest()[:16],
            "combiner_sha256": hashlib.sha256(combiner.read_bytes()).hexdigest()[:16] if combiner else None,
            "cutpoints": card.get("cutpoints")}  # fmt: skip


# ------------------------------------------------------------------------------------------- read


def _clip(texts: list[str | None], max_chars: int) -> tuple[list[str | None], np.ndarray]:
    clipped = np.array([t is not None and len(t) > max_chars for t in texts], dtype=bool)
    return [t[:max_chars] if c else t for t, c in zip(texts, clipped, strict=True)], clipped


def _jsonl_rows(unit: WorkUnit) -> tuple[list[dict[str, Any]], list[tuple[int, str, str]]]:
    """Parsed rows of the lines that begin in the unit's byte range, and (offset, reason, raw) of bad lines."""
    rows, bad = [], []
    with open(unit.path, "rb") as fh:
        pos = unit.start
        if pos > 0:  # the line that straddles start belongs to the previous unit
            fh.seek(pos - 1)
            pos += len(fh.readline()) - 1
        while pos < unit.stop:
            raw = fh.readline()
            if not raw:
                break
            offset, pos = pos, pos + len(raw)
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                bad.append((offset, "not UTF-8", repr(line[:200])))
                continue
            except json.JSONDecodeError as e:
                bad.append((offset, f"invalid JSON ({e.msg})", repr(line[:200])))
                continue
            if not isinstance(obj, dict):
                bad.append((offset, "not a JSON object", repr(line[:200])))
                continue
            wrong = [c for c in INPUT_COLUMNS if obj.get(c) is not None and not isinstance(obj[c], str | int)]
            if wrong:
                bad.append((offset, f"{wrong[0]}: not a string", repr(line[:200])))
                continue
            answers = obj.get("answers")
            answers = [answers] if isinstance(answers, str) else answers
            if answers is not None and not (
                isinstance(answers, list) and all(isinstance(a, str) for a in answers)
            ):
                bad.append((offset, "answers: not a string or a list of strings", repr(line[:200])))
                continue
            rows.append({c: (str(obj[c]) if obj.get(c) is not None else None) for c in INPUT_COLUMNS}
                        | {"answers": answers, "_offset": offset})  # fmt: skip
    return rows, bad


def _read_parquet_rows(path: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a Parquet file, holding about one unit in memory whatever its row groups.

    A row group small next to the unit is read whole and sliced. A large one (pandas and pyarrow write up to a
    million rows per group) is streamed in unit-sized batches from the group's start, keeping only the unit's:
    reading it whole would make every read task hold a whole group, so memory would grow with the size of the
    input's files (seen: 1.15x more private memory at 1M pairs than at 100k in 8 files).
    """
    pf = pq.ParquetFile(path, buffer_size=1 << 20)  # buffered: a column chunk is not read into memory whole
    cols = [c for c in (*INPUT_COLUMNS, "answers") if c in pf.schema_arrow.names]
    want = max(1, stop - start)
    pieces, first = [], 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = max(0, start - first), min(n, stop - first)  # the unit's rows in this group
        first += n
        if lo >= hi:
            continue
        if n <= 4 * want:
            pieces.append(pf.read_row_group(g, columns=cols).slice(lo, hi - lo))
            continue
        at = 0
        for batch in pf.iter_batches(batch_size=want, row_groups=[g], columns=cols, use_threads=False):
            b_lo, b_hi = max(lo, at), min(hi, at + batch.num_rows)
            if b_lo < b_hi:
                pieces.append(pa.Table.from_batches([batch.slice(b_lo - at, b_hi - b_lo)]))
            at += batch.num_rows
            if at >= hi:
                break
    if not pieces:
        return pf.schema_arrow.empty_table().select(cols)
    # one contiguous copy: the slices would otherwise keep their whole batches alive downstream
    return pa.concat_tables(pieces).combine_chunks()


def read_unit(
    unit: WorkUnit, max_chars: int, drop: dict[int, str] | None = None
) -> tuple[pa.Table, pa.Table, int]:
    """(good pairs, rejected rows with reasons, rows read) of one unit.

    Good pairs have the columns qid, docid, query, text, title, url and ``_clipped`` (the passage was cut to
    ``max_chars``). A rejected row's ``line`` is its 1-based row number in a Parquet file, or the byte offset of
    its line in a JSONL file (counting lines would mean reading the file from its start). ``drop`` maps
    positions (0-based Parquet row, JSONL byte offset) to the reason they are rejected (``find_duplicates``).
    """
    source = f"{unit.path}"
    if unit.fmt == "parquet":
        table = _read_parquet_rows(unit.path, unit.start, unit.stop)
        pos = np.arange(unit.start, unit.start + table.num_rows)
        line = pa.array(pos + 1, pa.int64())  # 1-based row
        bad_rows: list[tuple[int, str, str]] = []
    else:
        rows, bad_rows = _jsonl_rows(unit)
        table = pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in INPUT_COLUMNS}
                         | {"answers": pa.array([r["answers"] for r in rows], pa.list_(pa.string()))})  # fmt: skip
        pos = np.array([r["_offset"] for r in rows], dtype=np.int64)
        line = pa.array(pos, pa.int64())  # byte offset of the line
    n_read = table.num_rows + len(bad_rows)
    dropped = np.isin(pos, np.fromiter(drop, np.int64)) if drop else np.zeros(len(pos), bool)
    if dropped.any():
        idx = np.flatnonzero(dropped)
        dup_rows = [(int(line[i].as_py()), drop[int(pos[i])], repr(r))
                    for i, r in zip(idx, table.take(pa.array(idx)).to_pylist(), strict=True)]  # fmt: skip
        bad_rows = [*bad_rows, *dup_rows]
        table, line = table.filter(pa.array(~dropped)), line.filter(pa.array(~dropped))
    try:
        conformed = T.conform(T.PAIRS, table, source)
    except T.SchemaError as e:
        raise DataError(f"{source}: not a pairs table: {e}") from None
    good, rejected = T.split_rejected(T.PAIRS, conformed, source=source, line=line)
    if bad_rows:
        rejected = pa.concat_tables([rejected, T.rejected_rows("pairs", source, bad_rows)])
    texts, clipped = _clip(good.column("text").to_pylist(), max_chars)
    good = good.set_column(good.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    for c, t in (("title", pa.string()), ("url", pa.string()), ("answers", pa.list_(pa.string()))):
        if c not in good.column_names:
            good = good.append_column(c, pa.nulls(good.num_rows, t))
    good = good.select([*INPUT_COLUMNS, "answers"]).append_column("_clipped", pa.array(clipped, pa.bool_()))
    return good, rejected, n_read


#: OUT/_pieces/<unit>/: a unit's judged fragments and its pieces' rejected rows, until the unit is assembled
PIECES = "_pieces"


def _piece_file(unit: str, piece: int, first: int, n: int) -> str:
    """A fragment's name, relative to OUT: which piece of which unit, and which of the piece's rows."""
    return f"{PIECES}/{unit}/p{piece:04d}-{first:08d}-{n:08d}.parquet"


def read_units(batch: pa.Table, out: str, max_chars: int, table: str = "judgments") -> pa.Table:
    """Ray Data map_batches fn (tasks): piece descriptors -> their good pairs, tagged with unit and piece.

    Bad rows are written to ``rejected/`` here (a piece's to ``_pieces/<unit>/``), before the unit's judgments
    exist. A unit without a single good pair is finished here too (an empty partition); so is an empty piece
    (an empty fragment), as nothing of it goes on to the judge.
    """
    parts = []
    for d in batch.to_pylist():
        unit = WorkUnit(d["name"], d["path"], d["fmt"], d["piece_start"], d["piece_stop"])
        piece, pieces = d["piece"], d["pieces"]
        drop = {int(k): v for k, v in json.loads(d["drop"]).items()}
        good, rejected, n_read = read_unit(unit, max_chars, drop)
        if rejected.num_rows:
            where = (
                f"rejected/{unit.name}.parquet"
                if pieces == 1
                else f"{PIECES}/{unit.name}/rejected-{piece:04d}.parquet"
            )
            _write_atomic(rejected, Path(out) / where, {"unit": unit.name, "piece": piece})
        n = good.num_rows
        if n == 0:
            meta = {"unit": unit.name, "read": n_read, "judged": 0}
            if pieces == 1:
                _write_atomic(_empty_judgments(0, table), Path(out) / f"{unit.name}.parquet", meta)
            else:
                _write_atomic(_empty_judgments(0, table), Path(out) / _piece_file(unit.name, piece, 0, 0),
                              {**meta, "piece": piece, "expect": 0, "rejected": rejected.num_rows})  # fmt: skip
            continue
        tags = {"_unit": pa.array([unit.name] * n, pa.string()), "_piece": pa.array([piece] * n, pa.int32()),
                "_pieces": pa.array([pieces] * n, pa.int32()), "_pos": pa.array(np.arange(n), pa.int64()),
                "_expect": pa.array([n] * n, pa.int64()), "_read": pa.array([n_read] * n, pa.int64()),
                "_rejected": pa.array([rejected.num_rows] * n, pa.int64())}  # fmt: skip
        for c, a in tags.items():
            good = good.append_column(c, a)
        parts.append(good)
    return pa.concat_tables(parts) if parts else _READ_SCHEMA.empty_table()


#: The bookkeeping columns a pair carries from the reader to the writer (the judge passes them through).
_TAGS = pa.schema([("_unit", pa.string()), ("_piece", pa.int32()), ("_pieces", pa.int32()), ("_pos", pa.int64()),
                   ("_expect", pa.int64()), ("_read", pa.int64()), ("_rejected", pa.int64())])  # fmt: skip
_READ_SCHEMA = pa.schema([*(pa.field(c, pa.string()) for c in INPUT_COLUMNS), ("answers", pa.list_(pa.string())),
                          ("_clipped", pa.bool_()), *_TAGS])  # fmt: skip


# ------------------------------------------------------------------------------------------ judge


class JudgeActor:
    """Ray Data map_batches callable class: the judge, loaded once per actor, grading batches of pairs.

    Input columns: qid, docid, query, text, title, url, _clipped and the ``_TAGS`` (from ``read_units``).
    Output: the judgments columns plus the ``_TAGS``, _actor, _busy_s (for the writer and manifest).
    """

    def __init__(self, judge: str, template: str, max_doc_tokens: int, dtype: str, batch_size: int,
                 threads: int, max_batch_tokens: int | None = None, device: str = "auto",
                 compile: bool = False, guard: str | None = None):  # fmt: skip
        import torch

        from models.judge_card import load_judge

        torch.set_num_threads(threads)
        self.judge = load_judge(judge, template=template, max_doc_tokens=max_doc_tokens, dtype=dtype,
                                device=device, guard=guard or "strip")  # fmt: skip
        self.scorer = self.judge.scorer(batch_size, guard, max_batch_tokens=max_batch_tokens, compile=compile)
        self.actor = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipelines.judge import judgments_table

        t0 = time.perf_counter()
        pairs = batch
        s = self.scorer.score(pairs.column("query").to_pylist(), pairs.column("text").to_pylist(),
                              pairs.column("title").to_pylist(), pairs.column("url").to_pylist())  # fmt: skip
        s.truncated |= pairs.column("_clipped").to_numpy(zero_copy_only=False)
        out = judgments_table(
            pairs, s, self.judge.card.name, self.scorer.prompt_version, self.judge.card.grades
        )
        busy = time.perf_counter() - t0
        n = out.num_rows
        for c in _TAGS.names:
            out = out.append_column(c, pairs.column(c))
        return out.append_column("_actor", pa.array([self.actor] * n, pa.string())).append_column(
            "_busy_s", pa.array([busy / max(1, n)] * n, pa.float64())
        )


def _empty_judgments(n: int, table: str = "judgments") -> pa.Table:
    schema = (
        UTILITY_SCHEMA if table == "utility" else T.JUDGMENTS.schema([c.name for c in T.JUDGMENTS.optional])
    )
    return pa.table({f.name: pa.nulls(n, f.type) for f in schema}, schema=schema)


UTILITY_SCHEMA = T.UTILITY.schema([c.name for c in T.UTILITY.optional])


class UtilityActor:
    """Ray Data map_batches callable class: utility annotation of whole questions (models/utility.py).

    A block holds whole questions (units and pieces are cut at question starts), so every stage of a question
    (RelSel, pseudo answer, UtilSel / UtilRank) runs here, in order, with no shuffle in between. Rows come out in
    the order they came in, each with the ``_TAGS`` passed through.
    """

    def __init__(self, model: str, mode: str, prompts: dict[str, Any], dtype: str, batch_size: int, threads: int,
                 max_batch_tokens: int | None = None, device: str = "auto", seed: int = 0,
                 min_utility: float = 0.0, answer_source: str = "auto"):  # fmt: skip
        import torch

        from models.loading import load_causal_lm
        from models.utility import UtilityAnnotator, UtilityPrompts

        torch.set_num_threads(threads)
        self.lm = load_causal_lm(model, dtype=dtype, device=device)
        p = UtilityPrompts(**prompts)
        self.mode = mode
        self.annotator = UtilityAnnotator(self.lm.model, self.lm.tokenizer, p, batch_size=batch_size,
                                          max_batch_tokens=max_batch_tokens, seed=seed, min_utility=min_utility,
                                          answer_source=answer_source, likelihood_top_fraction=p.top_fraction)  # fmt: skip
        self.name = model
        self.actor = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        from models.utility import Candidate, Question

        t0 = time.perf_counter()
        # A block is a whole piece (whole questions). Ray Data cuts a block larger than its target size between
        # calls; annotated so, a question would be judged from part of its candidates: refuse it instead.
        pieces = Counter(
            zip(batch.column("_unit").to_pylist(), batch.column("_piece").to_pylist(), strict=True)
        )
        expect = dict(zip(zip(batch.column("_unit").to_pylist(), batch.column("_piece").to_pylist(), strict=True),
                          batch.column("_expect").to_pylist(), strict=True))  # fmt: skip
        split = [k for k, n in pieces.items() if n != expect[k]]
        if split:
            raise DataError(f"unit {split[0][0]} piece {split[0][1]} reached the annotator in parts ({pieces[split[0]]} "
                            f"of {expect[split[0]]} rows): Ray Data split its block; lower unit_rows")  # fmt: skip
        rows = batch.select(["qid", "docid", "query", "text", "title", "answers"]).to_pylist()
        questions: list[Question] = []
        for r in rows:
            if not questions or questions[-1].qid != r["qid"]:
                questions.append(Question(r["qid"], r["query"], []))
            if questions[-1].answer is None:  # the first non-empty gold answer among the question's rows
                answers = [a for a in (r["answers"] or []) if a and a.strip()]
                questions[-1].answer = answers[0] if answers else None
            questions[-1].candidates.append(Candidate(r["docid"], r["text"] or "", r["title"]))
        results = self.annotator.annotate(questions, self.mode)
        out = utility_table(questions, results, self.mode, self.name, self.annotator.prompt_version)
        clipped = batch.column("_clipped").to_numpy(zero_copy_only=False)
        out = out.set_column(out.schema.get_field_index("truncated"), "truncated",
                             pc.or_(out.column("truncated"), pa.array(clipped)))  # fmt: skip
        busy, n = time.perf_counter() - t0, out.num_rows
        for c in _TAGS.names:
            out = out.append_column(c, batch.column(c))
        return out.append_column("_actor", pa.array([self.actor] * n, pa.string())).append_column(
            "_busy_s", pa.array([busy / max(1, n)] * n, pa.float64())
        )


def utility_table(questions, results, mode: str, annotator: str, prompt_version: str) -> pa.Table:
    """The utility table of annotated questions, one row per candidate, in input order."""
    cols: dict[str, list] = defaultdict(list)
    for q, res in zip(questions, results, strict=True):
        for c, r in zip(q.candidates, res.passages, strict=True):
            cols["qid"].append(q.qid)
            cols["docid"].append(c.docid)
            cols["selected"].append(bool(r.selected))
            cols["rank"].append(r.rank)
            cols["utility"].append(r.utility)
            cols["pseudo_answer"].append(res.pseudo_answer)
            cols["relevant"].append(r.relevant)
            cols["truncated"].append(bool(r.truncated))
            cols["windows"].append(json.dumps(r.windows, separators=(",", ":")) if r.windows else None)
            cols["note"].append("; ".join(r.notes) or None)
    n = len(cols["qid"])
    cols["mode"], cols["annotator"], cols["prompt_version"] = (
        [mode] * n,
        [annotator] * n,
        [prompt_version] * n,
    )
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in UTILITY_SCHEMA}, schema=UTILITY_SCHEMA)


def utility_stats(table: pa.Table) -> dict[str, Any]:
    """Counts of a utility partition, for the manifest: questions, passages, selected, and per stage the windows
    (pseudo answers) run and how many showed each kind of failure. Each window counted once (its passages all
    carry it)."""
    stats: dict[str, Any] = {"questions": 0, "passages": table.num_rows, "selected": 0, "stages": {}}
    if not table.num_rows or "windows" not in table.column_names:
        return stats
    stats["questions"] = len(pc.unique(table.column("qid")))
    stats["selected"] = int(pc.sum(pc.cast(table.column("selected"), pa.int64())).as_py() or 0)
    seen: set[tuple[str, str, int]] = set()
    stages: dict[str, Counter] = defaultdict(Counter)
    for qid, w in zip(table.column("qid").to_pylist(), table.column("windows").to_pylist(), strict=True):
        for e in json.loads(w) if w else []:
            key = (qid, e["stage"], e.get("window", 0))
            if key in seen:
                continue
            seen.add(key)
            stages[e["stage"]]["windows"] += 1
            for kind in ("no_bracket", "truncated", "out_of_range", "duplicates", "empty"):
                if e.get(kind):
                    stages[e["stage"]][kind] += 1
    stats["stages"] = {k: dict(v) for k, v in stages.items()}
    return stats


def _merge_stats(total: dict[str, Any], part: dict[str, Any]) -> None:
    for k in ("questions", "passages", "selected"):
        total[k] = total.get(k, 0) + part.get(k, 0)
    for stage, counts in part.get("stages", {}).items():
        mine = total.setdefault("stages", {}).setdefault(stage, {})
        for kind, n in counts.items():
            mine[kind] = mine.get(kind, 0) + n


# ------------------------------------------------------------------------------------------ write


def _write_atomic(table: pa.Table, path: Path, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"augrel": json.dumps(meta).encode()})  # fmt: skip
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)  # a partition is whole or absent


def write_units(batch: pa.Table, out: str) -> pa.Table:
    """Ray Data map_batches fn (tasks): judged rows -> partitions; returns one summary row per unit piece seen.

    A whole one-piece unit (the usual case) is written as its partition here. Part of one (a unit cut into
    pieces for a pool larger than the run, or a block Ray Data split for its size) is written as a fragment
    under ``_pieces/<unit>/``, named after its rows, and the driver assembles the partition once the summaries
    show every row of every piece (``assemble_unit``): a retried task rewrites the same rows, which count once.
    """
    units, pieces = batch.column("_unit").to_pylist(), batch.column("_piece").to_pylist()
    summary = defaultdict(list)
    for name, piece in dict.fromkeys(zip(units, pieces, strict=True)):
        rows = batch.take(
            pa.array([i for i, k in enumerate(zip(units, pieces, strict=True)) if k == (name, piece)])
        )
        expect, n_read, n_pieces, n_rejected = (rows.column(c)[0].as_py() for c in ("_expect", "_read", "_pieces",
                                                                                    "_rejected"))  # fmt: skip
        judged = rows.drop_columns([*_TAGS.names, "_actor", "_busy_s"])
        if n_pieces == 1 and rows.num_rows == expect:
            part = judged.take(pc.sort_indices(rows.column("_pos")))
            meta = {"unit": name, "read": n_read, "judged": expect}
            if "windows" in part.column_names:
                meta["utility"] = utility_stats(part)
            _write_atomic(part, Path(out) / f"{name}.parquet", meta)
            fragment = ""
        else:
            start = int(pc.min(rows.column("_pos")).as_py())
            fragment = _piece_file(name, piece, start, rows.num_rows)
            _write_atomic(judged.append_column("_pos", rows.column("_pos")), Path(out) / fragment,
                          {"unit": name, "piece": piece, "read": n_read, "expect": expect,
                           "rejected": n_rejected})  # fmt: skip
        summary["unit"].append(name)
        summary["piece"].append(piece)
        summary["pieces"].append(n_pieces)
        summary["judged"].append(rows.num_rows)
        summary["questions"].append(len(pc.unique(rows.column("qid"))))
        summary["expect"].append(expect)
        summary["read"].append(n_read)
        summary["rejected"].append(n_rejected)
        summary["fragment"].append(fragment)
        summary["actor"].append(rows.column("_actor")[0].as_py())
        summary["busy_s"].append(float(pc.sum(rows.column("_busy_s")).as_py()))
    return pa.table(dict(summary))


@dataclass
class _Assembly:
    """What the driver knows of a unit that arrives in fragments: per piece, its rows' fragments and counts."""

    pieces: int
    fragments: dict[int, list[str]]
    expect: dict[int, int]
    read: dict[int, int]
    rejected: dict[int, int]
    covered: dict[int, set[int]]

    @classmethod
    def empty(cls, pieces: int) -> _Assembly:
        return cls(pieces, defaultdict(list), {}, {}, {}, defaultdict(set))

    def add(self, piece: int, fragment: str, expect: int, read: int, rejected: int) -> None:
        first, n = (int(x) for x in Path(fragment).stem.split("-")[1:])
        self.fragments[piece].append(fragment)
        self.expect[piece], self.read[piece], self.rejected[piece] = expect, read, rejected
        self.covered[piece].update(range(first, first + n))

    def complete(self) -> bool:
        return all(p in self.expect and len(self.covered[p]) == self.expect[p] for p in range(self.pieces))


def _find_empty_pieces(out: Path, name: str, asm: _Assembly) -> None:
    """Pieces with no good pair never reach the writer: their reader left an empty fragment, read here by name."""
    for p in range(asm.pieces):
        if p not in asm.expect:
            path = out / _piece_file(name, p, 0, 0)
            if path.exists():
                meta = _read_unit_meta(path)
                asm.add(p, _piece_file(name, p, 0, 0), 0, meta["read"], meta["rejected"])


def assemble_unit(out: Path, name: str, asm: _Assembly, table: str = "judgments") -> None:
    """A unit's partition from its fragments: rows in piece and row order, each once; the pieces' rejected rows
    first (as a one-piece unit's reader writes them before its judgments)."""
    tables = [_tag_piece(pq.read_table(out / f), p) for p, files in sorted(asm.fragments.items()) for f in files
              if not f.endswith(_piece_file(name, p, 0, 0))]  # fmt: skip
    expect = sum(asm.expect.values())
    if tables:
        rows = pa.concat_tables(tables).sort_by([("_piece", "ascending"), ("_pos", "ascending")])
        keep = ~T.duplicate_mask(rows, ["_piece", "_pos"])  # a retried task's copy of rows already written
        rows = rows.filter(pa.array(keep)).drop_columns(["_piece", "_pos"])
    else:
        rows = _empty_judgments(0, table)
    if rows.num_rows != expect:
        raise DataError(f"unit {name}: {rows.num_rows} judged rows in its fragments, {expect} expected")
    if asm.pieces > 1:
        rejected = [pq.read_table(out / PIECES / name / f"rejected-{p:04d}.parquet")
                    for p in range(asm.pieces) if asm.rejected.get(p)]  # fmt: skip
        if rejected:
            _write_atomic(pa.concat_tables(rejected).replace_schema_metadata(None),
                          out / "rejected" / f"{name}.parquet", {"unit": name})  # fmt: skip
    meta = {"unit": name, "read": sum(asm.read.values()), "judged": expect}
    if "windows" in rows.column_names:
        meta["utility"] = utility_stats(rows)
    _write_atomic(rows, out / f"{name}.parquet", meta)
    shutil.rmtree(out / PIECES / name, ignore_errors=True)


def _tag_piece(table: pa.Table, piece: int) -> pa.Table:
    table = table.replace_schema_metadata(None)
    return table.append_column("_piece", pa.array([piece] * table.num_rows, pa.int32()))


# ------------------------------------------------------------------------------------------ driver


def estimate_pairs(units: list[WorkUnit], sample_bytes: int = 1 << 18) -> int:
    """Pairs in ``units`` for the progress bar: exact for Parquet (row ranges); for JSONL (byte ranges) the
    range's bytes over the mean line length of the file's first ``sample_bytes``."""
    bytes_per_line: dict[str, float] = {}
    total = 0.0
    for u in units:
        if u.fmt == "parquet":
            total += u.stop - u.start
            continue
        if u.path not in bytes_per_line:
            with open(u.path, "rb") as f:
                head = f.read(sample_bytes)
            bytes_per_line[u.path] = len(head) / max(1, head.count(b"\n"))
        total += (u.stop - u.start) / bytes_per_line[u.path]
    return round(total)


class _LogProgress:
    """Progress for logs (a Ray job, a pod, nohup): one line every ``every`` seconds instead of a redrawn bar.
    Utility modes also count questions (their natural grain: a question's windows run together)."""

    def __init__(self, total: int | None, every: float = 30.0, what: str = "pairs", questions: bool = False):
        self.total, self.every, self.n, self.q = total, every, 0, 0
        self.what, self.questions = what, questions
        self.start = self.last = time.perf_counter()

    def update(self, n: int, questions: int = 0) -> None:
        self.n += n
        self.q += questions
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            rate = self.n / (now - self.start)
            left = f", about {(self.total - self.n) / rate / 60:.0f} min left" if self.total and rate else ""
            of = f" / {self.total:,}" if self.total else ""
            q = f", {self.q:,} questions ({self.q / (now - self.start):.2f}/s)" if self.questions else ""
            print(f"annotating: {self.n:,}{of} {self.what}, {rate:.1f} {self.what}/s{q}{left}", flush=True)

    def __enter__(self) -> _LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _BarProgress:
    """A tqdm bar over pairs (passages), with questions and questions/s beside it in utility modes."""

    def __init__(self, total: int | None, what: str, questions: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="annotating", unit=f" {what}", smoothing=0.1)
        self.questions, self.q, self.start = questions, 0, time.perf_counter()

    def update(self, n: int, questions: int = 0) -> None:
        self.q += questions
        if self.questions:
            rate = self.q / max(1e-9, time.perf_counter() - self.start)
            self.bar.set_postfix_str(f"{self.q:,} questions, {rate:.2f} questions/s", refresh=False)
        self.bar.update(n)

    def __enter__(self) -> _BarProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def progress(total: int | None, mode: str = "relevance"):
    """A tqdm bar on a terminal; periodic log lines otherwise (a redrawn bar is unreadable in job logs)."""
    import sys

    utility = mode != "relevance"
    what = "passages" if utility else "pairs"
    if sys.stderr.isatty():
        return _BarProgress(total, what, utility)
    return _LogProgress(total, what=what, questions=utility)


@dataclass(frozen=True)
class ActorResources:
    concurrency: tuple[int, int]
    num_cpus: float
    num_gpus: float
    batch_size: int
    max_batch_tokens: int | None
    threads: int


def actor_resources(cfg: AnnotateConfig) -> ActorResources:
    """The judge pool's size and per-actor resources: the config's, else the resource profile's."""
    from cluster.profiles import load_profile

    prof = load_profile(cfg.profile).annotate
    num_cpus = cfg.num_cpus_per_actor if cfg.num_cpus_per_actor is not None else prof.num_cpus_per_actor
    num_gpus = cfg.num_gpus_per_actor if cfg.num_gpus_per_actor is not None else prof.num_gpus_per_actor
    return ActorResources(
        concurrency=tuple(cfg.concurrency or prof.concurrency),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        batch_size=cfg.batch_size or prof.batch_size,
        max_batch_tokens=prof.max_batch_tokens,
        threads=cfg.torch_threads or max(1, round(num_cpus)),
    )


def _most_actors(res: ActorResources, cluster: dict[str, float]) -> int:
    """How many judge actors the cluster holds beside the read/write tasks, by CPUs and (for GPU actors) GPUs."""
    most = int((cluster.get("CPU", 0) - 2 * IO_TASK_CPUS + 1e-9) // res.num_cpus)
    if res.num_gpus:
        most = min(most, int(cluster.get("GPU", 0) // res.num_gpus))
    return most


def fit_pool(res: ActorResources, cluster: dict[str, float]) -> ActorResources:
    """Shrink a profile's pool to what the cluster holds beside the read/write tasks (never below one actor).

    Only profile defaults are shrunk; a pool the user asked for is checked by ``check_fits`` instead. The profile
    names a fixed size where it can: Ray Data's autoscaler adds actors only under queue pressure, and on a small
    machine a (1, 2) pool was seen to stay at one actor for a whole run.
    """
    most = max(1, _most_actors(res, cluster))
    lo, hi = res.concurrency
    return replace(res, concurrency=(min(lo, most), min(hi, most)))


def check_fits(
    res: ActorResources, cluster: dict[str, float], largest_node: dict[str, float] | None = None
) -> None:
    """Refuse a pool Ray could never start: an actor larger than any node, or a minimum pool that leaves no CPU
    for the read and write tasks. Either would not fail: Ray Data would wait for the actors forever."""
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    node = largest_node or cluster
    if res.num_gpus > node.get("GPU", 0.0):
        raise ConfigError(f"num_gpus_per_actor: {res.num_gpus:g} but the largest node has {node.get('GPU', 0.0):g} "
                          f"GPUs (the cluster {gpus:g})")  # fmt: skip
    if res.num_cpus > node.get("CPU", 0.0):
        raise ConfigError(f"num_cpus_per_actor: {res.num_cpus:g} but the largest node has {node.get('CPU', 0.0):g} "
                          "CPUs")  # fmt: skip
    if res.num_cpus + 2 * IO_TASK_CPUS > cpus:
        raise ConfigError(f"num_cpus_per_actor: {res.num_cpus:g} leaves no CPU for reading and writing on a "
                          f"{cpus:g}-CPU cluster (at most {cpus - 2 * IO_TASK_CPUS:g})")  # fmt: skip
    lo = res.concurrency[0]
    if lo > _most_actors(res, cluster):
        need = f"{lo} x {res.num_cpus:g} CPUs" + (
            f" and {lo} x {res.num_gpus:g} GPUs" if res.num_gpus else ""
        )
        raise ConfigError(f"concurrency: at least {lo} actors need {need}, more than the cluster's {cpus:g} CPUs / "
                          f"{gpus:g} GPUs hold beside the read/write tasks")  # fmt: skip


def transform(units, cfg: AnnotateConfig, res: ActorResources, read_first: bool = False):
    """Lazy Ray Data pipeline: piece descriptors -> read tasks -> judge actors -> write tasks -> piece summaries.

    The reads and writes are tasks of this pipeline (not a ``read_parquet`` before it and a ``write_parquet``
    after it) because exactly-once needs one atomically written partition per unit, named after the unit.
    ``read_first`` reads every piece before judging starts (a small run: a few units cut into pieces), so the
    actors get the pieces at once, one after the other: streamed, an actor that finished its piece before the
    next read ended took that one too, and the rest of the pool idled (seen with 4 pieces and 2 actors).
    """
    import ray.data

    from models.judge_card import JudgeCard, is_judge_dir
    from models.loading import device_for_gpus

    max_chars = CHARS_PER_TOKEN_BOUND * (cfg.passage_tokens if cfg.utility else cfg.max_doc_tokens)
    if not cfg.utility and is_judge_dir(cfg.judge):
        max_chars = CHARS_PER_TOKEN_BOUND * JudgeCard.load(cfg.judge).max_doc_tokens
    # Reads and writes run in a pool of IO_TASK_POOL tasks: uncapped, Ray Data launches as many 0.1-CPU tasks as
    # fit (20 on 2 CPUs), each in its own worker process, and private memory grew with the input (1.18x from 100k
    # to 1M pairs) although every unit streams.
    io = ray.data.TaskPoolStrategy(size=IO_TASK_POOL)
    ds = units.map_batches(read_units, batch_size=1, batch_format="pyarrow", num_cpus=IO_TASK_CPUS, compute=io,
                           fn_kwargs={"out": str(Path(cfg.out).resolve()), "max_chars": max_chars,
                                      "table": output_table(cfg)})  # fmt: skip
    if read_first:
        ds = ds.materialize()
    if res.concurrency[0] > 1:
        ds.context.wait_for_min_actors_s = WAIT_FOR_ACTORS_S
    if cfg.utility:
        actor, kwargs = UtilityActor, {
            "model": cfg.judge, "mode": cfg.mode, "prompts": asdict(cfg.utility_prompts()), "seed": cfg.seed,
            "min_utility": cfg.min_utility, "answer_source": cfg.answer_source}  # fmt: skip
    else:
        actor, kwargs = JudgeActor, {"judge": cfg.judge, "template": cfg.template,
                                     "max_doc_tokens": cfg.max_doc_tokens, "compile": cfg.compile,
                                     "guard": cfg.guard}  # fmt: skip
    ds = ds.map_batches(
        actor,
        # a whole block (a unit or a piece of one) per call: for the utility modes, whole questions
        batch_size=None,
        batch_format="pyarrow",
        fn_constructor_kwargs={
            **kwargs,
            "device": device_for_gpus(res.num_gpus),
            "dtype": cfg.dtype,
            "batch_size": res.batch_size,
            "threads": res.threads,
            "max_batch_tokens": res.max_batch_tokens,
        },
        # Ray Data restarts a dead actor and retries its task without limit (a preempted node must not fail a
        # day-long job); an actor whose constructor keeps failing (a bad judge path) fails the job after
        # DataContext.actor_init_max_retries.
        compute=ray.data.ActorPoolStrategy(min_size=res.concurrency[0], max_size=res.concurrency[1]),
        num_cpus=res.num_cpus,
        num_gpus=res.num_gpus or None,
    )
    return ds.map_batches(write_units, batch_size=None, batch_format="pyarrow", num_cpus=IO_TASK_CPUS, compute=io,
                          fn_kwargs={"out": str(Path(cfg.out).resolve())})  # fmt: skip


def output_table(cfg: AnnotateConfig) -> str:
    return "utility" if cfg.utility else "judgments"


def check_block_bound(cfg: AnnotateConfig, target_max_block_size: int | None) -> None:
    """Refuse units Ray Data could split: it cuts a block larger than ``target_max_block_size`` between calls,
    and a listwise actor given part of a question would annotate it from part of its candidates."""
    if not cfg.utility or not target_max_block_size:
        return
    per_row = CHARS_PER_TOKEN_BOUND * cfg.passage_tokens + 2048  # passage bound + query, ids, answers
    if cfg.unit_rows * per_row > target_max_block_size:
        most = target_max_block_size // per_row
        raise ConfigError(f"unit_rows: {cfg.unit_rows} rows of up to {per_row:,} bytes may exceed Ray Data's "
                          f"target_max_block_size ({target_max_block_size:,} bytes), which would split a question "
                          f"between actors: use at most {most}")  # fmt: skip


def done_units(out: Path) -> set[str]:
    return {p.stem for p in out.glob("part-*.parquet")}


def _prepare_out(cfg: AnnotateConfig, units: list[WorkUnit], plan: dict[str, Any]) -> tuple[set[str], int]:
    """Check OUT against the plan; return the units already done and the pieces per unit (a resumed run keeps
    its first run's, so a unit's pairs are batched alike). Refuses to mix two different runs."""
    out = Path(cfg.out)
    plan_path = out / PLAN
    if plan_path.exists() and not cfg.overwrite:
        old = json.loads(plan_path.read_text())
        done = done_units(out)
        if not cfg.resume:
            raise ConfigError(f"out: {out} holds an annotation run ({len(done)} of {old['n_units']} units done): "
                              "pass --resume to finish it, or --overwrite to start again")  # fmt: skip
        # a plan from before the detector existed graded without it ("off")
        old.setdefault("guard", "off" if plan.get("guard") else None)
        for key in ("inputs", "judge", "unit_rows", "prompt", "guard"):
            if old.get(key) != plan.get(key):
                raise ConfigError(f"--resume: '{key}' changed since the run in {out} began "
                                  f"(was {old.get(key)!r}, now {plan.get(key)!r}); use --overwrite")  # fmt: skip
        if old.get("scoring") != plan.get("scoring"):
            # allowed (an interrupted job may finish on other hardware), but the table is no longer uniform
            log.warning("--resume: scoring settings changed (was %s, now %s): the %d remaining units are scored "
                        "so, the %d done ones are kept as they were", old.get("scoring"), plan.get("scoring"),
                        len(units) - len(done), len(done))  # fmt: skip
        for tmp in out.rglob(".part-*.tmp"):  # left by a writer that was killed mid-write
            tmp.unlink()
        shutil.rmtree(out / PIECES, ignore_errors=True)  # fragments of unfinished units: they run again whole
        return done & {u.name for u in units}, int(old.get("pieces", 1))
    if cfg.overwrite and out.exists():
        for p in [
            *out.glob("part-*.parquet"),
            *out.glob("rejected/part-*.parquet"),
            *out.rglob(".part-*.tmp"),
        ]:
            p.unlink()
        shutil.rmtree(out / PIECES, ignore_errors=True)
    elif out.exists() and any(out.glob("part-*.parquet")):
        raise ConfigError(f"out: {out} already holds part files from something else: choose another directory "
                          "or pass --overwrite")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{PLAN}.tmp"
    tmp.write_text(json.dumps(plan, indent=2) + "\n")
    os.replace(tmp, plan_path)
    return set(), int(plan.get("pieces", 1))


def _read_unit_meta(path: Path) -> dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"augrel", b"{}"))


def run(cfg: AnnotateConfig) -> StageResult:
    """Plan units, run the missing ones through the actor pool with a progress bar, then account for every pair."""
    import ray

    from cluster.embedded import init_ray

    out = Path(cfg.out)
    init_ray()
    with Timer() as timer:
        starts = input_query_starts(cfg.pairs) if cfg.utility else None
        units, inputs = plan_units(cfg.pairs, cfg.unit_rows, starts)
        check_block_bound(cfg, ray.data.DataContext.get_current().target_max_block_size)
        res = actor_resources(cfg)
        if cfg.autoscaling_cluster:
            log.info("autoscaling cluster: judge pool %s, each %g CPU / %g GPU, whatever is up now",
                     res.concurrency, res.num_cpus, res.num_gpus)  # fmt: skip
        else:
            if cfg.concurrency is None:
                res = fit_pool(res, ray.cluster_resources())
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            largest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0))) if nodes else None
            check_fits(res, ray.cluster_resources(), largest)
        from models.judge_card import is_judge_dir

        # a judge directory's card fixes its prompt; template and max_doc_tokens apply to a base model only
        if cfg.utility:
            prompt = {"mode": cfg.mode, "prompt_version": cfg.utility_prompts().version, "seed": cfg.seed,
                      "min_utility": cfg.min_utility, "answer_source": cfg.answer_source}  # fmt: skip
        elif is_judge_dir(cfg.judge):
            prompt = None
        else:
            prompt = {"template": cfg.template, "max_doc_tokens": cfg.max_doc_tokens}
        duplicates = find_duplicates(units)
        pieces = plan_pieces(len(units), res.concurrency[1], cfg.unit_rows, res.batch_size)
        plan = {"inputs": inputs, "judge": judge_fingerprint(cfg.judge), "unit_rows": cfg.unit_rows,
                "prompt": prompt, "guard": effective_guard(cfg), "n_units": len(units), "pieces": pieces,
                "scoring": {"dtype": cfg.dtype, "batch_size": res.batch_size, "max_batch_tokens": res.max_batch_tokens},
                "units": [asdict(u) for u in units]}  # fmt: skip
        done, pieces = _prepare_out(cfg, units, plan)
        pending = [u for u in units if u.name not in done]
        if cfg.limit_units:
            pending = pending[: cfg.limit_units]
        n_dup = sum(len(d) for d in duplicates.values())
        log.info("%d units, %d done, %d to run, %d piece(s) each; %d duplicate pairs rejected", len(units),
                 len(done), len(pending), pieces, n_dup)  # fmt: skip
        descriptors = [
            {"name": u.name, "path": u.path, "fmt": u.fmt, "piece": i, "pieces": len(ranges), "piece_start": a,
             "piece_stop": b, "drop": json.dumps({p: r for p, r in duplicates.get(u.name, {}).items() if a <= p < b})}
            for u in pending for ranges in [unit_pieces(u, pieces, starts[u.path] if starts else None)]
            for i, (a, b) in enumerate(ranges)
        ]  # fmt: skip
        assembling: dict[str, _Assembly] = {}
        assembled: set[str] = set()
        per_actor: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        t_start = time.perf_counter()
        judged_now = questions_now = 0
        # Start-up (Ray Data, actors loading the model) is paid once per run: the rate after the first batch of
        # finished units is what a long run sees.
        t_first = t_last = None
        judged_first = 0
        if pending:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # ours counts pairs; Ray's per-operator bars would repeat it
            units_ds = ray.data.from_items(descriptors, override_num_blocks=len(descriptors))
            ds = transform(units_ds, cfg, res, read_first=pieces > 1)
            est = estimate_pairs(pending) or None
            with progress(est, cfg.mode) as bar:
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    t_last = time.perf_counter()
                    if t_first is None:
                        t_first, judged_first = t_last, int(pc.sum(batch.column("judged")).as_py() or 0)
                    for row in batch.to_pylist():
                        per_actor[row["actor"]][0] += row["judged"]
                        per_actor[row["actor"]][1] += row["busy_s"]
                        judged_now += row["judged"]
                        questions_now += row["questions"]
                        bar.update(row["judged"], row["questions"])
                        name = row["unit"]
                        if row["fragment"] and name not in assembled:
                            asm = assembling.setdefault(name, _Assembly.empty(row["pieces"]))
                            asm.add(
                                row["piece"], row["fragment"], row["expect"], row["read"], row["rejected"]
                            )
                            if asm.complete():
                                assemble_unit(out, name, assembling.pop(name), output_table(cfg))
                                assembled.add(name)
            # units cut into pieces whose last pieces held no good pair: their readers left empty fragments
            n_pieces = {d["name"]: d["pieces"] for d in descriptors}
            for name in [n for n, k in n_pieces.items() if k > 1 or n in assembling]:
                if name in assembled or (out / f"{name}.parquet").exists():
                    continue
                asm = assembling.pop(name, None) or _Assembly.empty(n_pieces[name])
                _find_empty_pieces(out, name, asm)
                if asm.complete():
                    assemble_unit(out, name, asm, output_table(cfg))
                    assembled.add(name)
        run_s = time.perf_counter() - t_start
        counts, missing, mismatched, utility = _account(out, units)
    if missing and not cfg.limit_units:
        raise DataError(f"{len(missing)} units have no output after the run (first: {missing[0]}): run again "
                        "with --resume")  # fmt: skip
    if mismatched:
        raise DataError(f"units whose judged + rejected rows differ from the rows read: {mismatched[:5]}")
    card = _card_dict(cfg.judge)
    extra: dict[str, Any] = {}
    if cfg.utility:
        windows = sum(v.get("windows", 0) for k, v in utility.get("stages", {}).items() if k != "answer")
        failed = sum(v.get("no_bracket", 0) for v in utility.get("stages", {}).values())
        extra = {"mode": cfg.mode, "prompt_version": cfg.utility_prompts().version, "utility": utility,
                 "parse_fail_rate": round(failed / windows, 4) if windows else None,
                 "questions_per_s": round(questions_now / run_s, 4) if questions_now and run_s > 0 else None,
                 "passages_per_s": round(judged_now / run_s, 3) if judged_now and run_s > 0 else None}  # fmt: skip
    return write_stage_files(
        out, "annotate", cfg, counts, [cfg.pairs], timer.seconds,
        {"table": output_table(cfg), **extra, "judge_card": None if cfg.utility else card,
         "resources": asdict(res), "units": len(units),
         "units_this_run": len(pending), "units_missing": len(missing),
         "pairs_per_s": round(judged_now / run_s, 3) if judged_now and run_s > 0 else None,
         "steady_pairs_per_s": round((judged_now - judged_first) / (t_last - t_first), 3)
         if t_first is not None and t_last > t_first else None,
         "pairs_per_s_per_actor": {a: round(n / s, 3) if s else None for a, (n, s) in per_actor.items()},
         "pieces_per_unit": pieces, "units_assembled": len(assembled),
         "duplicates_rejected": n_dup,  # of counts.rejected: pairs that came earlier in the input
         "complete": not missing},
    )  # fmt: skip


def _account(out: Path, units: list[WorkUnit]) -> tuple[dict[str, int], list[str], list[str], dict[str, Any]]:
    """Counts from the partitions' own metadata: every pair read is judged or rejected, exactly once; and the
    utility partitions' stage counts summed (those of units run before a resume included)."""
    counts = {"pairs_in": 0, "judged": 0, "rejected": 0}
    missing, mismatched = [], []
    utility: dict[str, Any] = {}
    for u in units:
        part = out / f"{u.name}.parquet"
        if not part.exists():
            missing.append(u.name)
            continue
        meta = _read_unit_meta(part)
        judged = pq.ParquetFile(part).metadata.num_rows
        rej_path = out / "rejected" / f"{u.name}.parquet"
        rejected = pq.ParquetFile(rej_path).metadata.num_rows if rej_path.exists() else 0
        counts["pairs_in"] += meta["read"]
        if "utility" in meta:
            _merge_stats(utility, meta["utility"])
        counts["judged"] += judged
        counts["rejected"] += rejected
        if judged + rejected != meta["read"]:
            mismatched.append(u.name)
    return counts, missing, mismatched, utility


def _card_dict(judge: str) -> dict[str, Any]:
    from models.judge_card import CARD, is_judge_dir

    if is_judge_dir(judge):
        return json.loads((Path(judge) / CARD).read_text())
    return {"base_model": judge, "adapter": None}
