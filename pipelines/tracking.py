"""Experiment tracking: each ``augrel run`` is an MLflow run, each stage a nested run with its config as
params, its numeric results as metrics, and its small files (configs, manifests, metrics, plots) as artifacts.

Off unless ``tracking.mlflow_uri`` is set; a local ``file:`` store works offline (``mlflow ui --backend-store-uri
file:runs/mlruns`` shows it). MLflow is an optional dependency: ``pip install 'augrel[tracking]'``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipelines.errors import ConfigError

log = logging.getLogger("augrel")

ARTIFACT_SUFFIXES = {".json", ".yaml", ".txt", ".md", ".png", ".html"}
MAX_ARTIFACT_BYTES = 5 * 2**20


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def numeric(d: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in flatten(d).items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v == v}  # fmt: skip


class Tracker:
    """Context manager around one pipeline run; a no-op without a tracking URI."""

    def __init__(self, uri: str | None, experiment: str, run_name: str):
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.mlflow = None

    def __enter__(self) -> Tracker:
        if not self.uri:
            return self
        try:
            import mlflow
        except ImportError:
            raise ConfigError("tracking.mlflow_uri is set but MLflow is not installed: "
                              "pip install 'augrel[tracking]'") from None  # fmt: skip
        if self.uri.startswith("file:"):
            # MLflow 3 refuses its file store unless told otherwise; a local directory is what works offline
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(self.experiment)
        mlflow.start_run(run_name=self.run_name)
        self.mlflow = mlflow
        log.info("tracking to MLflow at %s (experiment %s)", self.uri, self.experiment)
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if self.mlflow is not None:
            self.mlflow.end_run(status="FAILED" if exc_type else "FINISHED")

    def log_stage(self, name: str, cfgs: Iterable[Any], result: Mapping[str, Any], wall_s: float,
                  outputs: Iterable[Path]) -> None:  # fmt: skip
        if self.mlflow is None:
            return
        mlflow = self.mlflow
        with mlflow.start_run(run_name=name, nested=True):
            params: dict[str, Any] = {}
            for i, c in enumerate(cfgs):
                prefix = f"{i}." if i else ""
                params.update({prefix + k: v for k, v in flatten(c.model_dump(mode="json")).items()})
            # MLflow caps a param value at 6000 characters
            mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
            mlflow.log_metrics({"wall_s": wall_s, **numeric(result)})
            for out in outputs:
                files = [out] if out.is_file() else sorted(out.rglob("*")) if out.exists() else []
                for f in files:
                    if (f.is_file() and f.suffix in ARTIFACT_SUFFIXES and f.stat().st_size <= MAX_ARTIFACT_BYTES
                            and "ray_train" not in f.parts):  # fmt: skip
                        rel = f.parent.relative_to(out.parent)
                        mlflow.log_artifact(str(f), artifact_path=str(rel))
