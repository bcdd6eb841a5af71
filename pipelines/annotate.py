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
  the writer, and a rewrite of the same partition replaces it, so nothing is lost or duplicated.

The dataset is streamed: read tasks -> judge actors (``map_batches`` with a callable class, the model loaded
once per actor, an autoscaling pool of ``concurrency=(min, max)``) -> write tasks -> the driver, which only
sees one small summary row per unit (for the progress bar and the manifest). Memory stays flat in the number
of pairs. Actors are sized so that read and write tasks always find a CPU: a pool holding every CPU starves
them and the dataset hangs.

Input columns: ``qid, docid, query, text`` (+ optional ``title, url``; ``label`` is ignored). Output: the
judgments table ``qid, docid, label, score, probs, judge, prompt_version, truncated, n_tokens``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

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


class AnnotateConfig(StageConfig):
    """``augrel annotate``: which judge grades which pairs, on what resources, and where the judgments go."""

    judge: str = Field("gemma3-270m", description="a judge directory (from finetune) or a base model")
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
    compile: bool = Field(
        False,
        description="torch.compile each actor's decoder (faster scoring after a one-off compile of minutes)",
    )
    limit_units: int | None = Field(
        None, gt=0, description="run at most N pending units, then stop (a partial run; --resume finishes it)"
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
        return self


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


def plan_units(pairs: str, unit_rows: int) -> tuple[list[WorkUnit], list[dict[str, Any]]]:
    """The work units of an input, in a fixed order, and a fingerprint of the files they come from."""
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
        units += [WorkUnit(f"part-{fi:05d}-{ui:05d}", str(path.resolve()), fmt, s, e)
                  for ui, (s, e) in enumerate(bounds)]  # fmt: skip
    return units, fingerprint


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
            rows.append({c: (str(obj[c]) if obj.get(c) is not None else None) for c in INPUT_COLUMNS}
                        | {"_offset": offset})  # fmt: skip
    return rows, bad


def _read_parquet_rows(path: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a Parquet file, holding about one unit in memory whatever its row groups.

    A row group small next to the unit is read whole and sliced. A large one (pandas and pyarrow write up to a
    million rows per group) is streamed in unit-sized batches from the group's start, keeping only the unit's:
    reading it whole would make every read task hold a whole group, so memory would grow with the size of the
    input's files (seen: 1.15x more private memory at 1M pairs than at 100k in 8 files).
    """
    pf = pq.ParquetFile(path, buffer_size=1 << 20)  # buffered: a column chunk is not read into memory whole
    cols = [c for c in INPUT_COLUMNS if c in pf.schema_arrow.names]
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


def read_unit(unit: WorkUnit, max_chars: int) -> tuple[pa.Table, pa.Table, int]:
    """(good pairs, rejected rows with reasons, rows read) of one unit.

    Good pairs have the columns qid, docid, query, text, title, url and ``_clipped`` (the passage was cut to
    ``max_chars``). A rejected row's ``line`` is its 1-based row number in a Parquet file, or the byte offset of
    its line in a JSONL file (counting lines would mean reading the file from its start).
    """
    source = f"{unit.path}"
    if unit.fmt == "parquet":
        table = _read_parquet_rows(unit.path, unit.start, unit.stop)
        line = pa.array(np.arange(unit.start, unit.start + table.num_rows) + 1, pa.int64())  # 1-based row
        bad_rows: list[tuple[int, str, str]] = []
    else:
        rows, bad_rows = _jsonl_rows(unit)
        table = pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in INPUT_COLUMNS})
        line = pa.array([r["_offset"] for r in rows], pa.int64())  # byte offset of the line
    n_read = table.num_rows + len(bad_rows)
    try:
        conformed = T.conform(T.PAIRS, table, source)
    except T.SchemaError as e:
        raise DataError(f"{source}: not a pairs table: {e}") from None
    good, rejected = T.split_rejected(T.PAIRS, conformed, source=source, line=line)
    if bad_rows:
        rejected = pa.concat_tables([rejected, T.rejected_rows("pairs", source, bad_rows)])
    texts, clipped = _clip(good.column("text").to_pylist(), max_chars)
    good = good.set_column(good.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    for c in ("title", "url"):
        if c not in good.column_names:
            good = good.append_column(c, pa.nulls(good.num_rows, pa.string()))
    good = good.select(list(INPUT_COLUMNS)).append_column("_clipped", pa.array(clipped, pa.bool_()))
    return good, rejected, n_read


def read_units(batch: pa.Table, out: str, max_chars: int) -> pa.Table:
    """Ray Data map_batches fn (tasks): unit descriptors -> their good pairs, tagged with their unit.

    Bad rows are written to ``rejected/`` here, before the unit's judgments exist; a unit without a single good
    pair is finished here too (an empty partition), as nothing of it goes on to the judge.
    """
    parts = []
    for d in batch.to_pylist():
        unit = WorkUnit(**{k: d[k] for k in ("name", "path", "fmt", "start", "stop")})
        good, rejected, n_read = read_unit(unit, max_chars)
        if rejected.num_rows:
            _write_atomic(rejected, Path(out) / "rejected" / f"{unit.name}.parquet", {"unit": unit.name})
        n = good.num_rows
        if n == 0:
            _write_atomic(_empty_judgments(0), Path(out) / f"{unit.name}.parquet",
                          {"unit": unit.name, "read": n_read, "judged": 0})  # fmt: skip
            continue
        parts.append(good.append_column("_unit", pa.array([unit.name] * n, pa.string()))
                     .append_column("_expect", pa.array([n] * n, pa.int64()))
                     .append_column("_read", pa.array([n_read] * n, pa.int64())))  # fmt: skip
    return pa.concat_tables(parts) if parts else _READ_SCHEMA.empty_table()


_READ_SCHEMA = pa.schema([*(pa.field(c, pa.string()) for c in INPUT_COLUMNS), ("_clipped", pa.bool_()),
                          ("_unit", pa.string()), ("_expect", pa.int64()), ("_read", pa.int64())])  # fmt: skip


# ------------------------------------------------------------------------------------------ judge


class JudgeActor:
    """Ray Data map_batches callable class: the judge, loaded once per actor, grading batches of pairs.

    Input columns: qid, docid, query, text, title, url, _clipped, _unit, _expect, _read (from ``read_units``).
    Output: the judgments columns plus _unit, _expect, _read, _actor, _busy_s (for the writer and manifest).
    """

    def __init__(self, judge: str, template: str, max_doc_tokens: int, dtype: str, batch_size: int,
                 threads: int, max_batch_tokens: int | None = None, device: str = "auto",
                 compile: bool = False):  # fmt: skip
        import torch

        from models.judge_card import load_judge

        torch.set_num_threads(threads)
        self.judge = load_judge(
            judge, template=template, max_doc_tokens=max_doc_tokens, dtype=dtype, device=device
        )
        self.scorer = self.judge.scorer(batch_size, max_batch_tokens=max_batch_tokens, compile=compile)
        self.actor = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipelines.judge import judgments_table

        t0 = time.perf_counter()
        pairs = batch
        s = self.scorer.score(pairs.column("query").to_pylist(), pairs.column("text").to_pylist(),
                              pairs.column("title").to_pylist(), pairs.column("url").to_pylist())  # fmt: skip
        s.truncated |= pairs.column("_clipped").to_numpy(zero_copy_only=False)
        out = judgments_table(pairs, s, self.judge.card.name, self.scorer.prompt_version)
        busy = time.perf_counter() - t0
        n = out.num_rows
        for c in ("_unit", "_expect", "_read"):
            out = out.append_column(c, pairs.column(c))
        return out.append_column("_actor", pa.array([self.actor] * n, pa.string())).append_column(
            "_busy_s", pa.array([busy / max(1, n)] * n, pa.float64())
        )


def _empty_judgments(n: int) -> pa.Table:
    schema = T.JUDGMENTS.schema(["truncated", "n_tokens"])
    return pa.table({f.name: pa.nulls(n, f.type) for f in schema}, schema=schema)


# ------------------------------------------------------------------------------------------ write


def _write_atomic(table: pa.Table, path: Path, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"augrel": json.dumps(meta).encode()})  # fmt: skip
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)  # a partition is whole or absent


def write_units(batch: pa.Table, out: str) -> pa.Table:
    """Ray Data map_batches fn (tasks): judged rows -> one partition per unit; returns one summary row per unit.

    A batch may hold several units (Ray Data bundles small blocks); a unit spans batches only if a block was
    split, which the row count check turns into a loud error instead of a short partition.
    """
    units = batch.column("_unit").to_pylist()
    summary = defaultdict(list)
    for name in dict.fromkeys(units):
        rows = batch.take(pa.array([i for i, u in enumerate(units) if u == name]))
        expect = rows.column("_expect")[0].as_py()
        if rows.num_rows != expect:
            raise RuntimeError(f"unit {name}: {rows.num_rows} judged rows in this block, {expect} expected "
                               "(a unit was split across blocks: lower unit_rows)")  # fmt: skip
        n_read = rows.column("_read")[0].as_py()
        table = rows.drop_columns(["_unit", "_expect", "_read", "_actor", "_busy_s"])
        _write_atomic(table, Path(out) / f"{name}.parquet", {"unit": name, "read": n_read, "judged": expect})
        summary["unit"].append(name)
        summary["judged"].append(expect)
        summary["read"].append(n_read)
        summary["actor"].append(rows.column("_actor")[0].as_py())
        summary["busy_s"].append(float(pc.sum(rows.column("_busy_s")).as_py()))
    return pa.table(dict(summary))


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
    """Progress for logs (a Ray job, a pod, nohup): one line every ``every`` seconds instead of a redrawn bar."""

    def __init__(self, total: int | None, every: float = 30.0):
        self.total, self.every, self.n = total, every, 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            rate = self.n / (now - self.start)
            left = f", about {(self.total - self.n) / rate / 60:.0f} min left" if self.total and rate else ""
            of = f" / {self.total:,}" if self.total else ""
            print(f"annotating: {self.n:,}{of} pairs, {rate:.1f} pairs/s{left}", flush=True)

    def __enter__(self) -> _LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress(total: int | None):
    """A tqdm bar on a terminal; periodic log lines otherwise (a redrawn bar is unreadable in job logs)."""
    import sys

    from tqdm.auto import tqdm

    if sys.stderr.isatty():
        return tqdm(total=total, desc="annotating", unit=" pairs", smoothing=0.1)
    return _LogProgress(total)


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


def transform(units, cfg: AnnotateConfig, res: ActorResources):
    """Lazy Ray Data pipeline: unit descriptors -> read tasks -> judge actors -> write tasks -> unit summaries.

    The reads and writes are tasks of this pipeline (not a ``read_parquet`` before it and a ``write_parquet``
    after it) because exactly-once needs one atomically written partition per unit, named after the unit.
    """
    import ray.data

    from models.judge_card import JudgeCard, is_judge_dir
    from models.loading import device_for_gpus

    max_chars = CHARS_PER_TOKEN_BOUND * cfg.max_doc_tokens
    if is_judge_dir(cfg.judge):
        max_chars = CHARS_PER_TOKEN_BOUND * JudgeCard.load(cfg.judge).max_doc_tokens
    # Reads and writes run in a pool of IO_TASK_POOL tasks: uncapped, Ray Data launches as many 0.1-CPU tasks as
    # fit (20 on 2 CPUs), each in its own worker process, and private memory grew with the input (1.18x from 100k
    # to 1M pairs) although every unit streams.
    io = ray.data.TaskPoolStrategy(size=IO_TASK_POOL)
    ds = units.map_batches(read_units, batch_size=1, batch_format="pyarrow", num_cpus=IO_TASK_CPUS, compute=io,
                           fn_kwargs={"out": str(Path(cfg.out).resolve()), "max_chars": max_chars})  # fmt: skip
    ds = ds.map_batches(
        JudgeActor,
        batch_size=None,  # a whole block (one or more whole units) per call
        batch_format="pyarrow",
        fn_constructor_kwargs={
            "judge": cfg.judge,
            "device": device_for_gpus(res.num_gpus),
            "template": cfg.template,
            "max_doc_tokens": cfg.max_doc_tokens,
            "dtype": cfg.dtype,
            "batch_size": res.batch_size,
            "threads": res.threads,
            "max_batch_tokens": res.max_batch_tokens,
            "compile": cfg.compile,
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


def done_units(out: Path) -> set[str]:
    return {p.stem for p in out.glob("part-*.parquet")}


def _prepare_out(cfg: AnnotateConfig, units: list[WorkUnit], plan: dict[str, Any]) -> set[str]:
    """Check OUT against the plan; return the units already done. Refuses to mix two different runs."""
    out = Path(cfg.out)
    plan_path = out / PLAN
    if plan_path.exists() and not cfg.overwrite:
        old = json.loads(plan_path.read_text())
        done = done_units(out)
        if not cfg.resume:
            raise ConfigError(f"out: {out} holds an annotation run ({len(done)} of {old['n_units']} units done): "
                              "pass --resume to finish it, or --overwrite to start again")  # fmt: skip
        for key in ("inputs", "judge", "unit_rows", "prompt"):
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
        return done & {u.name for u in units}
    if cfg.overwrite and out.exists():
        for p in [
            *out.glob("part-*.parquet"),
            *out.glob("rejected/part-*.parquet"),
            *out.rglob(".part-*.tmp"),
        ]:
            p.unlink()
    elif out.exists() and any(out.glob("part-*.parquet")):
        raise ConfigError(f"out: {out} already holds part files from something else: choose another directory "
                          "or pass --overwrite")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{PLAN}.tmp"
    tmp.write_text(json.dumps(plan, indent=2) + "\n")
    os.replace(tmp, plan_path)
    return set()


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
        units, inputs = plan_units(cfg.pairs, cfg.unit_rows)
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
        prompt = (
            None
            if is_judge_dir(cfg.judge)
            else {"template": cfg.template, "max_doc_tokens": cfg.max_doc_tokens}
        )
        plan = {"inputs": inputs, "judge": judge_fingerprint(cfg.judge), "unit_rows": cfg.unit_rows,
                "prompt": prompt, "n_units": len(units),
                "scoring": {"dtype": cfg.dtype, "batch_size": res.batch_size, "max_batch_tokens": res.max_batch_tokens},
                "units": [asdict(u) for u in units]}  # fmt: skip
        done = _prepare_out(cfg, units, plan)
        pending = [u for u in units if u.name not in done]
        if cfg.limit_units:
            pending = pending[: cfg.limit_units]
        log.info("%d units, %d done, %d to run", len(units), len(done), len(pending))
        per_actor: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        t_start = time.perf_counter()
        judged_now = 0
        # Start-up (Ray Data, actors loading the model) is paid once per run: the rate after the first batch of
        # finished units is what a long run sees.
        t_first = t_last = None
        judged_first = 0
        if pending:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # ours counts pairs; Ray's per-operator bars would repeat it
            units_ds = ray.data.from_items([asdict(u) for u in pending], override_num_blocks=len(pending))
            ds = transform(units_ds, cfg, res)
            est = estimate_pairs(pending) or None
            with progress(est) as bar:
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    t_last = time.perf_counter()
                    if t_first is None:
                        t_first, judged_first = t_last, int(pc.sum(batch.column("judged")).as_py() or 0)
                    for row in batch.to_pylist():
                        per_actor[row["actor"]][0] += row["judged"]
                        per_actor[row["actor"]][1] += row["busy_s"]
                        judged_now += row["judged"]
                        bar.update(row["judged"])
        run_s = time.perf_counter() - t_start
        counts, missing, mismatched = _account(out, units)
    if missing and not cfg.limit_units:
        raise DataError(f"{len(missing)} units have no output after the run (first: {missing[0]}): run again "
                        "with --resume")  # fmt: skip
    if mismatched:
        raise DataError(f"units whose judged + rejected rows differ from the rows read: {mismatched[:5]}")
    card = _card_dict(cfg.judge)
    return write_stage_files(
        out, "annotate", cfg, counts, [cfg.pairs], timer.seconds,
        {"table": "judgments", "judge_card": card, "resources": asdict(res), "units": len(units),
         "units_this_run": len(pending), "units_missing": len(missing),
         "pairs_per_s": round(judged_now / run_s, 3) if judged_now and run_s > 0 else None,
         "steady_pairs_per_s": round((judged_now - judged_first) / (t_last - t_first), 3)
         if t_first is not None and t_last > t_first else None,
         "pairs_per_s_per_actor": {a: round(n / s, 3) if s else None for a, (n, s) in per_actor.items()},
         "complete": not missing},
    )  # fmt: skip


def _account(out: Path, units: list[WorkUnit]) -> tuple[dict[str, int], list[str], list[str]]:
    """Counts from the partitions' own metadata: every pair read is judged or rejected, exactly once."""
    counts = {"pairs_in": 0, "judged": 0, "rejected": 0}
    missing, mismatched = [], []
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
        counts["judged"] += judged
        counts["rejected"] += rejected
        if judged + rejected != meta["read"]:
            mismatched.append(u.name)
    return counts, missing, mismatched


def _card_dict(judge: str) -> dict[str, Any]:
    from models.judge_card import CARD, is_judge_dir

    if is_judge_dir(judge):
        return json.loads((Path(judge) / CARD).read_text())
    return {"base_model": judge, "adapter": None}
