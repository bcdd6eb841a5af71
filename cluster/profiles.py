"""Resource profiles (cpu-small, gpu-1, gpu-8) and DeepSpeed configs, shipped with the package.

A profile says how big the annotation actor pool, its actors and their batches are on one kind of hardware
(`augrel annotate --profile`); a config value always wins over the profile. The other stages size themselves
in their own configs (configs/gpu-cluster.yaml: workers, GPUs, DeepSpeed, FAISS device).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.errors import ConfigError
from pipelines.stage import format_validation_error

HERE = Path(__file__).resolve().parent
PROFILE_DIR = HERE / "profiles"
DEEPSPEED_DIR = HERE / "deepspeed"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AnnotateResources(_Strict):
    concurrency: tuple[int, int] = (1, 1)
    num_cpus_per_actor: float = Field(1, gt=0)
    num_gpus_per_actor: float = Field(0, ge=0)
    batch_size: int = Field(16, gt=0, description="pairs per forward pass of a judge actor")
    max_batch_tokens: int | None = Field(
        None, gt=0, description="cap on pairs x tokens per forward pass (bounds activation memory on a GPU)"
    )


class ResourceProfile(_Strict):
    name: str
    description: str = ""
    annotate: AnnotateResources = AnnotateResources()


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str = "cpu-small") -> ResourceProfile:
    """A profile by name (``cpu-small``, ``gpu-1``, ``gpu-8``) or from a YAML file of the same shape."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown resource profile {name_or_path!r} (known: {', '.join(profile_names())})")
    try:
        return ResourceProfile.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as e:
        raise ConfigError(format_validation_error(ResourceProfile, e, str(path))) from None


def deepspeed_names() -> list[str]:
    return sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json"))


def _deepspeed_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if not path.suffix:
        path = DEEPSPEED_DIR / f"{name_or_path}.json"
    if not path.exists():
        raise ConfigError(
            f"unknown DeepSpeed config {name_or_path!r} (known: {', '.join(deepspeed_names())})"
        )
    return path


def zero_stage(name_or_path: str) -> int:
    """The ZeRO stage of a DeepSpeed config (0 without ``zero_optimization``)."""
    cfg = json.loads(_deepspeed_path(name_or_path).read_text())
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def deepspeed_config(name_or_path: str = "zero2", **fill: Any) -> dict[str, Any]:
    """A DeepSpeed config with its ``"auto"`` values filled from ``fill``.

    ``fill`` keys are top-level keys (``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``)
    or ``bf16`` (a bool for ``bf16.enabled``). An ``"auto"`` left unfilled is an error, not a silent default.
    """
    path = _deepspeed_path(name_or_path)
    cfg = json.loads(path.read_text())
    for key, value in fill.items():
        if key == "bf16":
            cfg.setdefault("bf16", {})["enabled"] = bool(value)
        else:
            cfg[key] = value
    unresolved = [k for k, v in _walk(cfg) if v == "auto"]
    if unresolved:
        raise ConfigError(f"DeepSpeed config {path.name}: fill these 'auto' values: {', '.join(unresolved)}")
    return cfg


def _walk(d: dict[str, Any], prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _walk(v, key + ".")
        else:
            yield key, v
