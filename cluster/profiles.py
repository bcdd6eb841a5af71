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


#: Share of a GPU's memory the frozen base weights may take under ZeRO-2 (or their 1/world shard under ZeRO-3);
#: the rest holds activations (batch x sequence x layers), the LoRA weights with their fp32 Adam state, the
#: grade head and CUDA's own context. LoRA trains ~0.1-1% of the parameters, so their optimizer state is small.
WEIGHT_SHARE_OF_GPU = 0.6


def choose_deepspeed(
    n_params: int, gpu_bytes: int | None, world: int, bytes_per_param: int = 2
) -> tuple[str, str]:
    """The DeepSpeed config ``deepspeed: auto`` means, and why: the least partitioning that fits.

    - ZeRO-2 when the whole frozen base fits one GPU beside the activations: every GPU holds the weights and
      computes with them where they are (9B in bf16 = 18 GB, on an 80 GB GPU);
    - ZeRO-3 when only a 1/world shard of it fits: the weights are gathered layer by layer over NVLink/network;
    - ZeRO-3 with CPU offload only when not even a shard fits: frozen weights cross PCIe every step, several
      times slower, so it is the last resort, not the default;
    - ZeRO-2 without a GPU (gloo on CPU workers: the weights live in host memory either way).
    """
    weights = n_params * bytes_per_param
    size = f"{n_params / 1e9:.2f}B parameters x {bytes_per_param} bytes = {weights / 1e9:.1f} GB of weights"
    if not gpu_bytes:
        return "zero2", f"{size}; no GPU: ZeRO-2 over gloo (CPU workers keep the weights in host memory)"
    budget = WEIGHT_SHARE_OF_GPU * gpu_bytes
    room = f"{WEIGHT_SHARE_OF_GPU:.0%} of {gpu_bytes / 1e9:.1f} GB per GPU = {budget / 1e9:.1f} GB"
    if weights <= budget:
        return "zero2", f"{size} fit one GPU ({room}): ZeRO-2, no parameter partitioning or offload"
    if world > 1 and weights / world <= budget:
        return "zero3", (
            f"{size} exceed one GPU ({room}) but a 1/{world} shard fits: ZeRO-3 partitions them over {world} GPUs"
        )
    return "zero3_offload", (
        f"{size}: even a 1/{world} shard exceeds {room}: ZeRO-3 with the parameters and optimizer state "
        "offloaded to CPU memory (they cross PCIe every step)"
    )
