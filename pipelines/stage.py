"""What every stage shares: its config (pydantic, YAML, ``--set key=value``), its manifest, its result.

Stage contract (../shared/DESIGN.md): ``XConfig`` validated on load with a message naming the bad key;
``run(cfg) -> StageResult`` writes ``part-*.parquet``, the resolved ``config.yaml`` and ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipelines.errors import ConfigError

C = TypeVar("C", bound="StageConfig")


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["a.b=3", "c=[1,2]"]`` -> ``{"a": {"b": 3}, "c": [1, 2]}``; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def format_validation_error(cls: type[BaseModel], err: ValidationError, source: str = "config") -> str:
    lines = [f"invalid {cls.__name__} ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            known = ", ".join(sorted(cls.model_fields))
            msg = f"unknown key (known keys: {known})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_config(
    cls: type[C],
    config_path: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    /,
    section: str | None = None,
    **values: Any,
) -> C:
    """Build a config from a YAML file (or one ``section`` of it), explicit values, then ``--set`` overrides."""
    data: dict[str, Any] = {}
    source = "command line"
    if config_path is not None:
        source = str(config_path)
        try:
            loaded = yaml.safe_load(Path(config_path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{config_path}: no such config file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{config_path}: not valid YAML: {e}") from None
        if section is not None:
            loaded = loaded.get(section, {})
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_path}: expected a mapping of keys to values")
        data = loaded
    data = deep_merge(data, {k: v for k, v in values.items() if v is not None})
    data = deep_merge(data, parse_overrides(overrides))
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(cls, e, source)) from None


def code_version() -> str:
    """The git commit of the code that ran (``+dirty.<hash of the diff>`` when its Python files are edited), or
    the package version outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        # An edited tree is named by a hash of its diff, so `augrel run` reruns stages after every edit,
        # not only after the first one.
        diff = subprocess.run(
            ["git", "-C", str(root), "diff", "HEAD", "--", "*.py"], capture_output=True, timeout=10
        ).stdout
        return sha + (f"+dirty.{hashlib.sha256(diff).hexdigest()[:8]}" if diff.strip() else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "augrel " + version("augrel")
        except PackageNotFoundError:
            return "unknown"


#: the packages whose code decides what a stage computes
CODE_PACKAGES = ("cluster", "pipelines", "models", "retrieval", "eval")


def code_fingerprint() -> str:
    """A hash of the packages' Python files (path and bytes). The same code hashes the same in a checkout, in a
    Ray job's unpacked working_dir and in an image without .git, where the git commit cannot be read; a commit
    that changes only docs or tests keeps it."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in CODE_PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass
class StageResult:
    stage: str
    out_dir: str
    counts: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        counts = ", ".join(f"{k}={v:,}" for k, v in self.counts.items())
        return f"{self.stage}: {counts} in {self.wall_s:.1f}s -> {self.out_dir}"


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def write_stage_files(
    out_dir: str | os.PathLike,
    stage: str,
    cfg: BaseModel,
    counts: Mapping[str, int],
    inputs: Iterable[str],
    wall_s: float,
    extra: Mapping[str, Any] | None = None,
) -> StageResult:
    """Write the resolved ``config.yaml`` and ``manifest.json`` beside a stage's tables."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    manifest = {
        "stage": stage,
        "counts": dict(counts),
        "inputs": [str(i) for i in inputs],
        "code_version": code_version(),
        "python": platform.python_version(),
        "host": platform.node(),
        "wall_s": round(wall_s, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(dict(extra) if extra else {}),
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, out / "manifest.json")
    return StageResult(stage, str(out), dict(counts), wall_s, dict(extra or {}))


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(out_dir) / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else None


def result_dict(r: StageResult) -> dict[str, Any]:
    return asdict(r)
