"""Reading and writing table directories (``part-*.parquet``), with JSONL accepted on input."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.errors import DataError

PART_GLOB = "part-*.parquet"
DEFAULT_ROWS_PER_FILE = 1_000_000


def expand_paths(path_or_glob: str | os.PathLike) -> list[Path]:
    """Files behind a path: a file, a table directory (its part files), or a glob. Sorted, so order is stable."""
    p = Path(path_or_glob)
    if p.is_dir():
        files = sorted(p.glob(PART_GLOB)) or sorted(p.glob("*.parquet")) or sorted(p.glob("*.jsonl"))
        if not files:
            raise DataError(f"{p}: no part-*.parquet, *.parquet or *.jsonl files in this directory")
        return files
    if p.is_file():
        return [p]
    files = sorted(Path(f) for f in glob.glob(str(path_or_glob)) if Path(f).is_file())
    if not files:
        raise DataError(f"{path_or_glob}: no such file, directory or matching files")
    return files


def read_file(path: Path) -> pa.Table:
    if path.suffix == ".parquet":
        return pq.read_table(path)
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    rows.append(json.loads(raw.decode("utf-8")))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise DataError(f"{path}: line {lineno}: not a UTF-8 JSON object ({e})") from None
        return pa.Table.from_pylist(rows)
    raise DataError(f"{path}: unsupported file type (use .parquet or .jsonl)")


def read_table(path_or_glob: str | os.PathLike) -> pa.Table:
    files = expand_paths(path_or_glob)
    tables = [read_file(f) for f in files]
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def write_table(
    out_dir: str | os.PathLike, table: pa.Table, rows_per_file: int = DEFAULT_ROWS_PER_FILE
) -> list[Path]:
    """Write ``table`` as ``out_dir/part-00000.parquet`` ... replacing earlier part files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(PART_GLOB):
        old.unlink()
    paths = []
    for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        path = out / f"part-{i:05d}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(table.slice(start, rows_per_file), tmp, compression="zstd")
        os.replace(tmp, path)  # a reader never sees half a file
        paths.append(path)
    return paths


def iter_lines(path: Path) -> Iterator[tuple[int, str | None, bytes]]:
    """(line number, decoded text or None if the bytes are not UTF-8, raw bytes) for each non-blank line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                yield lineno, raw.decode("utf-8"), raw
            except UnicodeDecodeError:
                yield lineno, None, raw


def write_dataset(ds, out_dir: str | os.PathLike) -> int:
    """Write a Ray dataset as OUT/part-NNNNN.parquet, replacing earlier part files; returns the row count.

    Ray's tasks write the files (on shared storage, from whichever node holds the blocks) and name them by
    write UUID: they are written aside, then renamed, so a reader never mixes two runs' parts.
    """
    import shutil
    import uuid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".staging-{uuid.uuid4().hex[:8]}"
    # light write tasks fit beside an actor pool that holds most CPUs (one that took them all starved them)
    ds.write_parquet(str(staging), ray_remote_args={"num_cpus": 0.1})
    for old in out.glob(PART_GLOB):
        old.unlink()
    files = sorted(staging.glob("*.parquet"))
    for i, f in enumerate(files):
        os.replace(f, out / f"part-{i:05d}.parquet")
    shutil.rmtree(staging)
    return sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob(PART_GLOB))
