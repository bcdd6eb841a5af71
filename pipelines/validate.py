"""``augrel data validate DIR``: check every table in a dataset or stage directory against its schema.

Files are checked in parallel as Ray tasks (one per part file, so a 50M-row table spreads over the cluster);
each task returns its rule violations and 64-bit hashes of its key columns, and the driver finds keys that
repeat across files. Every violation names the file, the column and the first bad row.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from pydantic import Field

from pipelines import tables as T
from pipelines.errors import DataError
from pipelines.io import PART_GLOB, expand_paths, read_file
from pipelines.stage import StageConfig, Timer


class ValidateConfig(StageConfig):
    """``augrel data validate``: which directory, which tables, which grade scale."""

    path: str = Field(description="a dataset directory (queries/, docs/, pairs/, ...) or one table directory")
    tables: list[str] | None = Field(None, description="tables to check; default: every table found")
    grades: list[int] = Field(default_factory=lambda: list(T.DEFAULT_GRADES))
    report: str | None = Field(None, description="also write the report as JSON to this path")


@dataclass
class FileReport:
    table: str
    path: str
    rows: int
    violations: list[T.Violation]
    hashes: np.ndarray | None = None


@dataclass
class TableReport:
    table: str
    files: int
    rows: int
    violations: list[T.Violation] = field(default_factory=list)


@dataclass
class ValidationReport:
    path: str
    tables: list[TableReport]
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(not t.violations for t in self.tables)

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "ok": self.ok,
            "wall_s": round(self.wall_s, 3),
            "tables": [
                {
                    "table": t.table,
                    "files": t.files,
                    "rows": t.rows,
                    "violations": [{**asdict(v), "message": str(v)} for v in t.violations],
                }
                for t in self.tables
            ],
        }

    def render(self) -> str:
        lines = [f"{'table':<10} {'files':>5} {'rows':>12}  status"]
        for t in self.tables:
            status = "ok" if not t.violations else f"{len(t.violations)} problem(s)"
            lines.append(f"{t.table:<10} {t.files:>5} {t.rows:>12,}  {status}")
        for t in self.tables:
            lines.extend(f"  {v}" for v in t.violations)
        return "\n".join(lines)


def discover_tables(path: Path) -> dict[str, Path]:
    """Table directories under ``path`` (named after the table specs), or ``path`` itself if it is one."""
    if not path.exists():
        raise DataError(f"{path}: no such directory")
    found = {name: path / name for name in T.TABLES if (path / name).is_dir()}
    if found:
        return found
    if path.name in T.TABLES and any(path.glob(PART_GLOB)):
        return {path.name: path}
    manifest = path / "manifest.json"
    if manifest.exists():
        table = json.loads(manifest.read_text()).get("table")
        if table in T.TABLES:
            return {table: path}
    raise DataError(
        f"{path}: no augrel tables here (expected subdirectories named {', '.join(T.TABLES)}, "
        "each holding part-*.parquet)"
    )


def check_file(table: str, path: str, grades: list[int]) -> FileReport:
    """Row rules for one file, plus key hashes for the cross-file duplicate check. Runs as a Ray task."""
    spec = T.TABLES[table]
    try:
        data = read_file(Path(path))
    except Exception as e:  # a corrupt parquet footer, truncated file...: report, do not crash the job
        return FileReport(table, path, 0, [T.Violation(table, None, None, f"unreadable: {e}", None, path)])
    violations = T.check(spec, data, path=path, grades=grades)
    hashes = None
    if all(k in data.column_names for k in spec.key):
        hashes = T.key_hashes(data, spec.key)
    return FileReport(table, path, data.num_rows, violations, hashes)


def _cross_file_duplicates(table: str, reports: list[FileReport]) -> list[T.Violation]:
    """A key that appears in two files (duplicates inside one file are already reported by the file)."""
    parts = [(i, r.hashes) for i, r in enumerate(reports) if r.hashes is not None and len(r.hashes)]
    if len(parts) < 2:
        return []
    file_of = np.concatenate([np.full(len(h), i) for i, h in parts])
    row_of = np.concatenate([np.arange(len(h)) for _, h in parts])
    hashes = np.concatenate([h for _, h in parts])
    order = np.argsort(hashes, kind="stable")
    sorted_h = hashes[order]
    repeat = np.flatnonzero(sorted_h[1:] == sorted_h[:-1]) + 1
    cross = [(order[j - 1], order[j]) for j in repeat if file_of[order[j - 1]] != file_of[order[j]]]
    if not cross:
        return []
    first, second = min(cross, key=lambda ab: (file_of[ab[1]], row_of[ab[1]]))
    spec = T.TABLES[table]
    a_path, b_path = reports[file_of[first]].path, reports[file_of[second]].path
    a_key = pq.read_table(a_path, columns=list(spec.key)).slice(int(row_of[first]), 1).to_pylist()[0]
    b_key = pq.read_table(b_path, columns=list(spec.key)).slice(int(row_of[second]), 1).to_pylist()[0]
    if a_key != b_key:  # a 64-bit hash collision: astronomically rare, and not a duplicate
        return []
    return [
        T.Violation(
            table,
            ",".join(spec.key),
            int(row_of[second]),
            f"duplicate ({', '.join(spec.key)}) across files: also row {int(row_of[first])} of {a_path}; "
            f"{len(cross)} such key(s) in all",
            tuple(b_key.values()),
            b_path,
        )
    ]


def validate(cfg: ValidateConfig) -> ValidationReport:
    """Check the tables under ``cfg.path`` on the Ray cluster (embedded if none is running)."""
    import ray

    from cluster.embedded import init_ray

    init_ray()
    root = Path(cfg.path)
    found = discover_tables(root)
    if cfg.tables:
        unknown = [t for t in cfg.tables if t not in found]
        if unknown:
            raise DataError(f"{root}: table(s) {unknown} not found (found {sorted(found)})")
        found = {t: found[t] for t in cfg.tables}
    check = ray.remote(num_cpus=1)(check_file)
    with Timer() as timer:
        futures = {
            name: [check.remote(name, str(f), list(cfg.grades)) for f in expand_paths(d)]
            for name, d in found.items()
        }
        out = []
        for name, futs in futures.items():
            reports = ray.get(futs)
            violations = [v for r in reports for v in r.violations]
            violations += _cross_file_duplicates(name, reports)
            out.append(TableReport(name, len(reports), sum(r.rows for r in reports), violations))
    report = ValidationReport(str(root), out, timer.seconds)
    if cfg.report:
        Path(cfg.report).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.report).write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
    return report
