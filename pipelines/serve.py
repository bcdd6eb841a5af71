"""``augrel serve``: the LambdaMART ranker (and, optionally, the judge) on Ray Serve behind a FastAPI ingress.

Routes (OpenAPI at ``/docs``):

- ``POST /rank`` ``{query, k, candidates?: [{docid, text, title?}]}`` -> ``{results: [{docid, score, rank}]}``.
  Without candidates, the top ``first_stage_k`` documents are retrieved from the index (``augrel index build``:
  BM25 or FAISS); either way each candidate gets the ranker's features (``models.features.PairFeaturizer``, the
  code the features stage runs, so served features are the trained ones) and the top ``k`` by ranker score return.
- ``POST /judge`` ``{pairs: [{query, text, title?}]}`` -> the judge's grade, expected grade and grade
  probabilities per pair. Pairs from concurrent requests are batched into one forward pass (``@serve.batch``).
- ``GET /healthz`` (the process answers), ``GET /readyz`` (models loaded; what is served).

Requests are JSON validated by pydantic models whose caps come from ``limits`` (a bad field answers 422 naming
it; a candidate given by docid alone that the index does not have, 404); bodies over ``limits.max_body_bytes``
answer 413 before they are parsed; nothing is ever unpickled from a request. Every status a route answers is in the
OpenAPI document (``/openapi.json``), and every error the application answers has one body shape, ``ErrorBody``
(Schemathesis checks both: tests/pipelines/test_serve_contract.py). ``max_ongoing_requests`` per replica and ``max_queued_requests`` bound the queue: past them Serve answers
503 at once instead of letting latency grow without bound. With ``auth_token_env`` naming a set environment
variable, every route but the health checks needs ``Authorization: Bearer <token>`` (401 otherwise); the replicas
get only the token's SHA-256.

On Kubernetes the same application is built by ``app_builder`` from a RayService's ``serveConfigV2``
(``import_path: pipelines.serve:app_builder``, ``args: {config: configs/serve-....yaml}``).
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations at definition time, and the
# request models are built per config (their caps come from `limits`), so they are locals a string can't name.
import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from pipelines.errors import ConfigError
from pipelines.stage import StageConfig

log = logging.getLogger("augrel")

SERVE_VERSION = "1"


# ---------------------------------------------------------------------------------------------- config


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingSettings(_Section):
    """Ray Serve autoscaling: replicas are added when the average ongoing requests per replica pass the target."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class DeploymentSettings(_Section):
    autoscaling: AutoscalingSettings = AutoscalingSettings()
    max_ongoing_requests: int = Field(4, ge=1, description="requests a replica works on at once")
    max_queued_requests: int = Field(
        16, ge=1, description="requests waiting for a replica; past it: 503 at once"
    )
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    threads: int = Field(1, ge=1, description="torch threads per replica")

    def options(self) -> dict[str, Any]:
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        return {"autoscaling_config": self.autoscaling.model_dump(), "max_ongoing_requests": self.max_ongoing_requests,
                "max_queued_requests": self.max_queued_requests, "ray_actor_options": actor}  # fmt: skip


class JudgeServeSettings(_Section):
    path: str = Field(description="judge directory (augrel judge finetune) or a causal LM used zero-shot")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    max_batch_size: int = Field(16, ge=1, description="pairs per forward pass, across concurrent requests")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="how long a batch waits to fill")
    deployment: DeploymentSettings = DeploymentSettings(
        autoscaling=AutoscalingSettings(min_replicas=1, max_replicas=1), max_ongoing_requests=64,
        max_queued_requests=256)  # fmt: skip


class Limits(_Section):
    max_query_chars: int = Field(2_000, ge=1)
    max_k: int = Field(1_000, ge=1, le=1_000)
    max_candidates: int = Field(1_000, ge=1)
    max_text_chars: int = Field(50_000, ge=1, description="per candidate text")
    max_docid_chars: int = Field(256, ge=1)
    max_judge_pairs: int = Field(64, ge=1)
    max_body_bytes: int = Field(8 * 2**20, ge=1024)


class ServeConfig(StageConfig):
    """``augrel serve``: the ranker (+ judge) as a Ray Serve application."""

    ranker: str = Field(description="ranker directory (augrel rank train)")
    index: str = Field(description="index directory (augrel index build): docs, bm25/, dense/")
    retriever: Literal["bm25", "dense"] = Field(
        "bm25", description="first stage when a request has no candidates"
    )
    first_stage_k: int = Field(100, ge=1, description="documents retrieved per query before ranking")
    encoder: str | None = Field(None, description="dense encoder; default: the one the index was built with")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="encoder and FAISS index device; auto: cuda when the replica reserves GPUs "
        "(deployment.num_gpus > 0), else cpu",
    )
    judge: JudgeServeSettings | None = None
    deployment: DeploymentSettings = DeploymentSettings()
    limits: Limits = Limits()
    auth_token_env: str | None = Field("AUGREL_SERVE_TOKEN",
                                       description="env var holding the bearer token; unset or empty: no auth")  # fmt: skip
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    name: str = Field("augrel", description="Serve application name")
    route_prefix: str = "/"

    @model_validator(mode="after")
    def _device_has_a_gpu(self) -> "ServeConfig":
        if self.device == "cuda" and not self.deployment.num_gpus:
            raise ValueError(
                "device: cuda, but deployment.num_gpus is 0 (a replica uses the GPUs it reserves)"
            )
        return self

    def resolved_device(self) -> str:
        """The replica's device: from the GPUs it reserved, as every Ray stage picks it (``device_for_gpus``)."""
        from models.loading import device_for_gpus

        return "cpu" if self.device == "cpu" else device_for_gpus(self.deployment.num_gpus)

    def check_paths(self) -> None:
        """Raise ConfigError naming the field whose directory is missing or of the wrong kind. Not a validator:
        a config written for a cluster (paths on its volume) must still load and validate elsewhere."""
        problems = []
        if not (Path(self.ranker) / "ranker.json").exists():
            problems.append(
                f"ranker: {self.ranker} is not a ranker directory (no ranker.json; augrel rank train)"
            )
        if not (Path(self.index) / "bm25").exists():
            problems.append(f"index: {self.index} is not an index directory (no bm25/; augrel index build)")
        elif not (Path(self.index) / "docstore" / "docstore.json").exists():
            problems.append(f"index: {self.index} has no docstore/ (built before the document store; run "
                            "augrel index build again)")  # fmt: skip
        elif self.retriever == "dense" and not (Path(self.index) / "dense").exists():
            problems.append(
                f"retriever: dense, but {self.index} has no dense/ index (build it with dense: true)"
            )
        if problems:
            raise ConfigError("invalid ServeConfig:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------ the rank service


class UnknownCandidate(ValueError):
    def __init__(self, index: int, docid: str):
        super().__init__(f"candidate {index}: docid {docid!r} is not in the index, so its text is needed")
        self.index, self.docid = index, docid


class RankService:
    """Retrieve (when no candidates are given), featurize and score: plain Python, no Serve, so the served path
    and the in-process benchmark run the same code.

    Nothing here grows with the corpus per replica: documents come from the index's memory-mapped document store
    (``retrieval.docstore.DocStore``), the BM25 arrays and the document vectors are memory-mapped too, BM25
    retrieval is bm25s' top-k (cached per query, and reused by the ``bm25_rank`` feature of the same request).
    """

    def __init__(self, cfg: ServeConfig):
        import torch

        from models.encoder import BiEncoder
        from models.features import JUDGE_FEATURE, PairFeaturizer
        from models.ranker import LambdaMARTRanker
        from pipelines.stage import read_manifest
        from retrieval.bm25 import BM25Index
        from retrieval.docstore import DocStore

        torch.set_num_threads(cfg.deployment.threads)
        self.ranker = LambdaMARTRanker.load(cfg.ranker)
        if JUDGE_FEATURE in self.ranker.features:
            raise ConfigError(f"ranker: {cfg.ranker} uses the judge's score as a feature; serving it would run the "
                              "judge on every candidate: train the served ranker without use_judge_feature")  # fmt: skip
        index = Path(cfg.index)
        self.bm25 = BM25Index.load(index / "bm25")
        self.store = DocStore.open(index / "docstore")
        self.dense = None
        self.store_vectors = None  # (docs, dim) memory-mapped, in the store's row order
        self.legacy_vectors = None  # an index built before that order: a dict of docid -> vector
        encoder = cfg.encoder
        device = cfg.resolved_device()
        if (index / "dense").exists():
            from retrieval.dense import DenseIndex, DocVectors

            built_with = json.loads((index / "dense" / "dense.json").read_text()).get("encoder")
            if cfg.retriever == "dense" and encoder not in (None, built_with):
                raise ConfigError(f"encoder: {encoder} differs from the one {cfg.index}/dense was built with "
                                  f"({built_with or 'the packaged MiniLM'}); queries must be encoded the same way")  # fmt: skip
            if encoder in (None, built_with) and (index / "dense" / "vectors.npy").exists():
                if (read_manifest(index) or {}).get("dense_rows") == "docstore":
                    self.store_vectors = np.load(index / "dense" / "vectors.npy", mmap_mode="r")
                else:
                    log.warning("%s/dense predates vectors in document-store order: each replica maps every "
                                "docid to its vector in memory; rebuild the index (augrel index build)", index)  # fmt: skip
                    self.legacy_vectors = DocVectors.load(index / "dense")
                encoder = built_with
            if cfg.retriever == "dense":
                # in a GPU replica, "auto" keeps an HNSW index (no FAISS GPU version) or a faiss-cpu install on
                # the CPU; the GPUs Ray shows a GPU replica are its own
                faiss_device = cfg.device if device == "cuda" else "cpu"
                self.dense = DenseIndex.load(index / "dense", device=faiss_device)
                encoder = encoder or self.dense.params.encoder
        self.featurize = PairFeaturizer(self.bm25, BiEncoder(encoder, device=device))
        self.encoder = self.featurize.encoder
        # A replaced encoder directory would otherwise fail only at request time, with a numpy shape error.
        from retrieval.dense import check_encoder_dim

        stored = (
            self.store_vectors
            if self.store_vectors is not None
            else getattr(self.legacy_vectors, "vectors", None)
        )
        for dim in ([self.dense.dim] if self.dense is not None else []) + (
            [stored.shape[1]] if stored is not None else []
        ):
            try:
                check_encoder_dim(self.encoder.dim, dim, encoder, index / "dense")
            except ValueError as e:
                raise ConfigError(f"encoder: {e}") from None
        self.retriever, self.first_stage_k = cfg.retriever, cfg.first_stage_k
        self.n_docs = len(self.store)

    def retrieve(self, query: str, k: int) -> list[str]:
        if self.dense is not None:
            (hits,) = self.dense.search(self.featurize.encode_queries([query]), k)
        else:
            (hits,) = self.bm25.search([query], k)
        return [d for d, _ in hits]

    def _vectors(self, rows: np.ndarray, docids: list[str]) -> np.ndarray | None:
        """Stored vectors of indexed documents (store ``rows``), or None when the index keeps none."""
        if self.store_vectors is not None:
            return np.asarray(self.store_vectors[rows], np.float32)
        if self.legacy_vectors is not None:
            return self.legacy_vectors.get(docids)
        return None

    def _candidates(self, candidates: list[dict[str, Any]]):
        """A request's candidates: an indexed docid sent without text, or with the indexed text, reuses the
        stored document vector; any other text is encoded as sent."""
        docids = [c["docid"] for c in candidates]
        rows = self.store.rows(docids)
        for i, c in enumerate(candidates):
            if c.get("text") is None and rows[i] < 0:
                raise UnknownCandidate(i, c["docid"])
        indexed = np.flatnonzero(rows >= 0)
        stored = self.store.take(rows[indexed])
        stored_text = dict(zip(indexed.tolist(), stored.column("text").to_pylist(), strict=True))
        stored_title = dict(zip(indexed.tolist(), stored.column("title").to_pylist(), strict=True))
        texts = [c["text"] if c.get("text") is not None else stored_text[i] for i, c in enumerate(candidates)]
        titles = [c.get("title") or (stored_title.get(i) if c.get("text") is None else None)
                  for i, c in enumerate(candidates)]  # fmt: skip
        if self.store_vectors is None and self.legacy_vectors is None:
            return docids, texts, titles, None
        known = [i for i in indexed.tolist() if stored_text[i] == texts[i]]
        if self.legacy_vectors is not None:
            known = [i for i in known if docids[i] in self.legacy_vectors]
        new = sorted(set(range(len(docids))) - set(known))
        dvec = np.zeros((len(docids), self.encoder.dim), np.float32)
        if known:
            dvec[known] = self._vectors(rows[known], [docids[i] for i in known])
        if new:
            dvec[new] = self.featurize.encode_passages([texts[i] for i in new])
        return docids, texts, titles, dvec

    def rank(self, query: str, k: int, candidates: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Top ``k`` of the candidates (or of the retrieved documents) by ranker score, best first."""
        t0 = time.perf_counter()
        if candidates is None:
            docids = self.retrieve(query, self.first_stage_k)
            rows = self.store.rows(docids)
            docs = self.store.take(rows)
            texts, titles = docs.column("text").to_pylist(), docs.column("title").to_pylist()
            # indexed documents: BM25 reads the index, no re-tokenizing
            source, by_id = self.retriever, docids
            dvec = self._vectors(rows, docids)
        else:
            docids, texts, titles, dvec = self._candidates(candidates)
            source, by_id = "request", None
        results: list[dict[str, Any]] = []
        if docids:
            from models.features import check_finite

            feats = self.featurize(
                [query] * len(docids), texts, docids=by_id, titles=titles, doc_vectors=dvec
            )
            X = np.column_stack([feats[f] for f in self.ranker.features])
            check_finite(X, self.ranker.features)
            scores = self.ranker.predict(X)
            order = np.lexsort((np.arange(len(scores)), -scores))[:k]  # ties keep the candidates' order
            results = [
                {"docid": docids[i], "score": float(scores[i]), "rank": r + 1} for r, i in enumerate(order)
            ]
        return {"query": query, "results": results, "candidates": len(docids), "source": source,
                "took_ms": round(1000 * (time.perf_counter() - t0), 2)}  # fmt: skip


# ------------------------------------------------------------------------------------ request models


def request_models(limits: Limits) -> dict[str, type[BaseModel]]:
    """The request bodies, with the caps of ``limits`` (pydantic answers 422 naming the field past a cap)."""
    strict = ConfigDict(extra="forbid")

    Candidate = create_model(
        "Candidate", __config__=strict,
        docid=(str, Field(min_length=1, max_length=limits.max_docid_chars)),
        text=(str | None, Field(None, max_length=limits.max_text_chars,
                                description="omitted: the indexed document of this docid")),
        title=(str | None, Field(None, max_length=limits.max_docid_chars * 4)),
    )  # fmt: skip

    def _unique(cls, v):
        if v is not None:
            seen: set[str] = set()
            for c in v:
                if c.docid in seen:
                    raise ValueError(f"duplicate docid {c.docid!r}")
                seen.add(c.docid)
        return v

    RankRequest = create_model(
        "RankRequest", __config__=strict,
        __validators__={"unique_docids": field_validator("candidates")(_unique)},
        query=(str, Field(min_length=1, max_length=limits.max_query_chars, pattern=r"\S")),
        k=(int, Field(10, ge=1, le=limits.max_k)),
        # uniqueItems says part of what unique_docids checks (two candidates may differ in text, not in docid),
        # so a schema-driven client or fuzzer does not send the same candidate twice
        candidates=(list[Candidate] | None, Field(None, max_length=limits.max_candidates,
                                                  json_schema_extra={"uniqueItems": True},
                                                  description="rank these, docids distinct; omitted: retrieve from "
                                                              "the index")),
    )  # fmt: skip
    JudgePair = create_model(
        "JudgePair", __config__=strict,
        query=(str, Field(min_length=1, max_length=limits.max_query_chars, pattern=r"\S")),
        text=(str, Field(max_length=limits.max_text_chars)),
        title=(str | None, Field(None, max_length=limits.max_docid_chars * 4)),
    )  # fmt: skip
    JudgeRequest = create_model(
        "JudgeRequest", __config__=strict,
        pairs=(list[JudgePair], Field(min_length=1, max_length=limits.max_judge_pairs)),
    )  # fmt: skip
    return {
        "Candidate": Candidate,
        "RankRequest": RankRequest,
        "JudgePair": JudgePair,
        "JudgeRequest": JudgeRequest,
    }


class RankedDoc(BaseModel):
    docid: str
    score: float
    rank: int


class RankResponse(BaseModel):
    query: str
    results: list[RankedDoc]
    candidates: int = Field(description="documents scored")
    source: str = Field(description="where the candidates came from: request, bm25 or dense")
    took_ms: float


class Grade(BaseModel):
    label: int = Field(
        description="the judge's grade (cut-points on the expected grade, else the most probable)"
    )
    score: float = Field(description="expected grade")
    probs: list[float] = Field(description="probability of each grade, lowest first")
    truncated: bool
    confidence: float = Field(description="the judge's probability of its own label")
    injection: bool | None = Field(
        None,
        description="an instruction-like span was found in the passage (null: the judge runs no detector)",
    )
    injection_kind: str | None = Field(None, description="the kinds of the flagged spans, comma-separated")


class JudgeResponse(BaseModel):
    judge: str
    prompt_version: str
    grades: list[Grade]


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# ------------------------------------------------------------------------------------------ errors


class ErrorItem(BaseModel):
    """One thing wrong with a request. 422s add pydantic's own keys (``input``, ``ctx``, ``url``)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(
        description="machine-readable kind: a pydantic error type, unauthorized, too_large, ..."
    )
    loc: list[str | int] = Field(
        description="where: e.g. [body, candidates, 3, text]; [] when nowhere in particular"
    )
    msg: str


class ErrorBody(BaseModel):
    """The body of every error the application answers (401, 404, 405, 413, 422): FastAPI's validation-error
    shape, used for the other errors too, so a client reads one shape."""

    detail: list[ErrorItem]


def error_body(status: int, msg: str, loc: list[str | int] | None = None, type: str | None = None) -> dict:
    return {"detail": [{"type": type or _ERROR_TYPES.get(status, "error"), "loc": loc or [], "msg": msg}]}


_ERROR_TYPES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}

# What the service answers besides 200, per route. 503 is Ray Serve's own answer (plain text, Retry-After) when a
# deployment's queue is full (max_queued_requests) or it has no replica running: the application never sees those
# requests, so the body is Serve's, not ErrorBody.
_BACKPRESSURE = {503: {"description": "overloaded: the queue is full (max_queued_requests) or no replica runs; "
                                      "retry after Retry-After seconds (Ray Serve's plain-text answer)",
                       "content": {"text/plain": {"schema": {"type": "string"}}},
                       "headers": {"Retry-After": {"schema": {"type": "integer"},
                                                   "description": "seconds (sent when Serve knows a delay)"}}}}  # fmt: skip
_TOO_LARGE = {413: {"model": ErrorBody, "description": "request body over limits.max_body_bytes"}}
_INVALID = {422: {"model": ErrorBody, "description": "invalid request: not JSON, or a field past its cap"}}
_UNAUTHORIZED = {401: {"model": ErrorBody, "description": "missing or wrong bearer token",
                       "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}}}  # fmt: skip


class BodyLimit:
    """ASGI middleware: a request body past ``max_bytes`` answers 413 before anything parses it. A declared
    Content-Length is checked up front; a chunked body is read here, counted as it arrives, and handed on whole
    (an exception raised from inside the app's body read would reach FastAPI's body parser, which answers any
    error there with 400)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._reject(send)
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return None  # the client left before sending its body: nobody to answer
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                return await self._reject(send)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        body, handed = b"".join(chunks), False

        async def replay():
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body, what the server sends next (a disconnect)

        return await self.app(scope, replay, send)

    async def _reject(self, send):
        msg = f"request body over {self.max_bytes} bytes (limits.max_body_bytes)"
        body = json.dumps(error_body(413, msg, ["body"])).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------ the app


class _JudgeHandle:
    """The judge deployment as the routes call it (a Serve handle: pairs of concurrent requests meet in its
    ``@serve.batch``)."""

    def __init__(self, handle):
        self.handle = handle

    async def grade(self, pair: tuple[str, str, str | None]) -> dict[str, Any]:
        return await self.handle.grade.remote(pair)

    async def info(self) -> dict[str, str]:
        return await self.handle.info.remote()


class LocalJudge:
    """The judge in this process, one pair per forward pass: for ``make_api`` without Serve (the contract test and
    the in-process benchmark run the routes the replicas run)."""

    def __init__(self, settings: "JudgeServeSettings"):
        from models.judge_card import load_judge

        self.judge = load_judge(settings.path, dtype=settings.dtype)
        self.scorer = self.judge.scorer(settings.max_batch_size)

    async def grade(self, pair: tuple[str, str, str | None]) -> dict[str, Any]:
        (g,) = await asyncio.to_thread(_grades, self.scorer, [pair])
        return g

    async def info(self) -> dict[str, str]:
        return {"judge": self.judge.card.name, "prompt_version": self.scorer.prompt_version}


def _grades(scorer, pairs: list[tuple[str, str, str | None]]) -> list[dict[str, Any]]:
    q, t, ti = zip(*pairs, strict=True)
    s = scorer.score(list(q), list(t), list(ti))
    confidence = s.confidence(scorer.grades)
    flags, kinds = s.injection, s.injection_kind
    return [{"label": int(s.label[i]), "score": float(s.score[i]), "probs": s.probs[i].tolist(),
             "truncated": bool(s.truncated[i]), "confidence": float(confidence[i]),
             "injection": None if flags is None else bool(flags[i]),
             "injection_kind": None if kinds is None else kinds[i]} for i in range(len(pairs))]  # fmt: skip


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    ranker: str
    features: list[str]
    index_docs: int
    retriever: str
    judge: str | None
    uptime_s: float


def make_api(cfg: ServeConfig, service: RankService, digest: str | None = None, judge=None):
    """The FastAPI application a ranker replica serves, around a loaded ``service``: what Serve's proxy routes to,
    and what a test drives in-process. ``digest``: SHA-256 of the bearer token (None: no auth); ``judge``: an
    object with async ``grade(pair)`` and ``info()`` (None: /judge answers 404)."""
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from starlette.exceptions import HTTPException as StarletteHTTPException

    models = request_models(cfg.limits)
    RankRequest, JudgeRequest = models["RankRequest"], models["JudgeRequest"]
    started = time.time()

    api = FastAPI(title="augrel", version=SERVE_VERSION,
                  description="Rank documents with augrel's LambdaMART ranker; grade pairs with its judge.")  # fmt: skip
    api.add_middleware(BodyLimit, max_bytes=cfg.limits.max_body_bytes)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's answer to a body it could not decode before JSON parsing (not UTF-8): malformed input,
            # like malformed JSON, which it answers 422
            body = error_body(
                422, "the body is not JSON (it could not be decoded as UTF-8)", ["body"], "json_invalid"
            )
            return JSONResponse(body, status_code=422)
        body = (
            {"detail": exc.detail}
            if isinstance(exc.detail, list)
            else error_body(exc.status_code, str(exc.detail))
        )
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <token> (auth_token_env)")

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials.strip() if credentials is not None else ""
        if credentials is None or not hmac.compare_digest(token_digest(given), digest or ""):
            raise HTTPException(401, [{"type": "unauthorized", "loc": ["header", "authorization"],
                                       "msg": "missing or wrong bearer token"}],
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    guarded = [Depends(authorized)] if digest is not None else []
    errors = {**_BACKPRESSURE, **_TOO_LARGE}
    body_errors = {**(_UNAUTHORIZED if digest is not None else {}), **_TOO_LARGE, **_INVALID, **_BACKPRESSURE}

    @api.get("/healthz", response_model=Health, responses=errors, summary="liveness: the replica answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get(
        "/readyz", response_model=Ready, responses=errors, summary="readiness: models loaded; what is served"
    )
    def readyz() -> dict[str, Any]:
        return {"status": "ready", "ranker": cfg.ranker, "features": service.ranker.features,
                "index_docs": service.n_docs, "retriever": cfg.retriever,
                "judge": cfg.judge.path if cfg.judge else None,
                "uptime_s": round(time.time() - started, 1)}  # fmt: skip

    rank_errors = {
        **body_errors,
        404: {
            "model": ErrorBody,
            "description": "a candidate without text names a docid the index does not have",
        },
    }

    @api.post("/rank", response_model=RankResponse, dependencies=guarded, responses=rank_errors,
              summary="rank the given candidates, or retrieve and rank")  # fmt: skip
    def rank(req: RankRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        cands = None if req.candidates is None else [c.model_dump() for c in req.candidates]
        try:
            return service.rank(req.query, req.k, cands)
        except UnknownCandidate as e:
            # the body is valid, the document it names is not there: not found, as a GET of that docid would be
            raise HTTPException(404, [{"type": "unknown_docid", "loc": ["body", "candidates", e.index, "docid"],
                                       "msg": str(e)}]) from None  # fmt: skip

    judge_errors = {**body_errors, 404: {"model": ErrorBody, "description": "no judge is served"}}

    @api.post("/judge", response_model=JudgeResponse, dependencies=guarded, responses=judge_errors,
              summary="grade (query, passage) pairs with the judge")  # fmt: skip
    async def grade(req: JudgeRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        if judge is None:
            raise HTTPException(404, [{"type": "not_found", "loc": [],
                                       "msg": "no judge is served (set judge.path in the serve config)"}])  # fmt: skip
        grades = await asyncio.gather(*[judge.grade((p.query, p.text, p.title)) for p in req.pairs])
        return {**await judge.info(), "grades": grades}

    return api


def build_app(cfg: ServeConfig, token: str | None = None):
    """The Serve application: a FastAPI ingress deployment for the ranker (``make_api`` built in each replica),
    bound to a judge deployment when ``cfg.judge`` is set. ``token`` defaults to the value of
    ``cfg.auth_token_env`` in this environment; the replicas get only its SHA-256."""
    from ray import serve

    cfg.check_paths()
    if token is None and cfg.auth_token_env:
        token = os.environ.get(cfg.auth_token_env) or None
    digest = token_digest(token) if token else None

    judge_app = None
    if cfg.judge is not None:
        j = cfg.judge

        @serve.deployment(name="Judge", **j.deployment.options())
        class JudgeDeployment:
            def __init__(self, settings: dict[str, Any]):
                import torch

                from models.judge_card import load_judge
                from models.loading import device_for_gpus

                s = JudgeServeSettings.model_validate(settings)
                torch.set_num_threads(s.deployment.threads)
                self.judge = load_judge(s.path, dtype=s.dtype, device=device_for_gpus(s.deployment.num_gpus))
                self.scorer = self.judge.scorer(s.max_batch_size)
                self.grade.set_max_batch_size(s.max_batch_size)
                self.grade.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

            def info(self) -> dict[str, str]:
                return {"judge": self.judge.card.name, "prompt_version": self.scorer.prompt_version}

            @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
            async def grade(self, pairs: list[tuple[str, str, str | None]]) -> list[dict[str, Any]]:
                return await asyncio.to_thread(_grades, self.scorer, pairs)

        judge_app = JudgeDeployment.bind(j.model_dump())

    # the app is built in the replica, around the service it loaded (serve.ingress without an app calls
    # __serve_build_asgi_app__ after __init__): the same make_api a test runs in-process
    @serve.deployment(name="Ranker", **cfg.deployment.options())
    @serve.ingress()
    class RankerIngress:
        def __init__(self, settings: dict[str, Any], digest: str | None, judge=None):
            self.cfg = ServeConfig.model_validate(settings)
            self.service = RankService(self.cfg)
            self.digest, self.judge = digest, None if judge is None else _JudgeHandle(judge)

        def __serve_build_asgi_app__(self):
            return make_api(self.cfg, self.service, self.digest, self.judge)

    return RankerIngress.bind(cfg.model_dump(mode="json"), digest, judge_app)


def app_builder(args: dict[str, Any]):
    """Entry point for ``serveConfigV2`` / ``serve run``: ``args: {config: PATH, set: [key=value, ...]}``."""
    from pipelines.stage import load_config

    if "config" not in args:
        raise ConfigError("serve application args: 'config' (path of a serve YAML) is required")
    cfg = load_config(ServeConfig, args["config"], list(args.get("set", [])))
    return build_app(cfg)


def start(cfg: ServeConfig):
    """Start Serve's HTTP proxy on ``cfg.host:cfg.port`` and deploy the application; returns its handle."""
    from ray import serve

    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    handle = serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix, blocking=False)
    # serve.start keeps the HTTP options of a Serve instance already running on the cluster: say so rather than
    # answer on another port than the one asked for
    probe = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}/-/routes"
    if not _answers(probe):
        raise ConfigError(f"port: Serve is already running on this cluster with other HTTP options, and nothing "
                          f"answers at {probe}; use its port, or `serve shutdown` first")  # fmt: skip
    return handle


def _answers(url: str, tries: int = 20) -> bool:
    import requests

    for _ in range(tries):
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return False


def check(cfg: ServeConfig, url: str, query: str | None = None) -> int:
    """Ask the running service to rank one query (by default the start of an indexed document), print the
    answer, and take the application down. What ``augrel serve --check`` (and ``make demo``) runs."""
    import requests
    from ray import serve

    from retrieval.docstore import DocStore

    store = DocStore.open(Path(cfg.index) / "docstore")
    if query is None:
        text = store.take(np.array([0])).column("text")[0].as_py()
        query = " ".join(text.split()[:6])
    headers = {}
    if cfg.auth_token_env and os.environ.get(cfg.auth_token_env):
        headers["Authorization"] = f"Bearer {os.environ[cfg.auth_token_env]}"
    try:
        ready = requests.get(f"{url}/readyz", timeout=30)
        r = requests.post(f"{url}/rank", json={"query": query, "k": 5}, headers=headers, timeout=60)
        print(f"GET /readyz -> {ready.status_code}; POST /rank {query!r} -> {r.status_code}")
        if r.ok:
            for hit in r.json()["results"]:
                print(f"  {hit['rank']}. {hit['docid']}  {hit['score']:+.3f}")
            print(
                f"  ({r.json()['candidates']} candidates from {r.json()['source']}, {r.json()['took_ms']:.0f} ms)"
            )
        else:
            print(r.text[:2000])
        ok = ready.ok and r.ok
        if cfg.judge is not None and r.ok and r.json()["results"]:
            top = r.json()["results"][0]["docid"]
            text = store.get([top]).column("text")[0].as_py()
            j = requests.post(f"{url}/judge", json={"pairs": [{"query": query, "text": text}]}, headers=headers,
                              timeout=120)  # fmt: skip
            if j.ok:
                g = j.json()["grades"][0]
                print(
                    f"POST /judge (query, top document) -> 200: grade {g['label']}, expected {g['score']:.2f}"
                )
            else:
                print(f"POST /judge -> {j.status_code}\n{j.text[:2000]}")
            ok = ok and j.ok
        return 0 if ok else 1
    finally:
        serve.delete(cfg.name)
