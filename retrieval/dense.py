"""Dense retrieval with FAISS: inner product over unit vectors (the cosine), exact (``flat``) or approximate
(``ivf``: inverted lists over k-means cells; ``hnsw``: a navigable small-world graph).

The index is a directory: ``index.faiss`` (always written as a CPU index), ``docids.json`` (row -> docid) and
``dense.json`` (its parameters and the encoder that made the vectors, so queries are encoded the same way).
``device="auto"`` moves a flat or IVF index to the GPU when faiss-gpu sees one (``pip install augrel[gpu]``);
HNSW has no GPU implementation in FAISS and stays on the CPU.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

IndexKind = Literal["flat", "ivf", "hnsw"]


@dataclass(frozen=True)
class DenseParams:
    kind: IndexKind = "flat"
    nlist: int = 0  # ivf cells; 0: about 4 sqrt(n), capped so each cell trains on 39+ points
    nprobe: int = 16  # ivf cells visited per query
    hnsw_m: int = 32  # hnsw neighbours per node
    ef_search: int = 128  # hnsw candidate list per query
    encoder: str | None = None  # the encoder that made the vectors (None: the packaged MiniLM)


def gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class DenseIndex:
    """A FAISS index of unit vectors with its docids; ``search`` returns (docid, cosine) best first."""

    def __init__(self, index, docids: list[str], params: DenseParams):
        self.index, self.docids, self.params = index, docids, params
        self.on_gpu = False

    @classmethod
    def build(
        cls, docids: Sequence[str], vectors: np.ndarray, params: DenseParams = DenseParams()
    ) -> DenseIndex:
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(docids):
            raise ValueError(f"{len(docids)} docids but vectors of shape {vectors.shape}")
        if len(set(docids)) != len(docids):
            raise ValueError("docids are not unique")
        n, dim = vectors.shape
        if params.kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif params.kind == "ivf":
            nlist = params.nlist or int(4 * np.sqrt(n))
            nlist = max(1, min(nlist, n // 39))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = min(params.nprobe, nlist)
        elif params.kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = params.ef_search
        else:
            raise ValueError(f"kind: {params.kind!r} is not one of flat, ivf, hnsw")
        index.add(vectors)
        return cls(index, list(docids), params)

    def to_device(self, device: str = "auto") -> DenseIndex:
        """Move the index to GPU 0 for ``cuda``, or for ``auto`` when faiss-gpu sees a GPU; ``cpu``: stay."""
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: {device!r} is not one of auto, cpu, cuda")
        if device == "cpu" or self.on_gpu:
            return self
        if gpu_count() == 0:
            if device == "cuda":
                raise RuntimeError(
                    "device: cuda asked for, but faiss sees no GPU (install faiss-gpu: augrel[gpu])"
                )
            return self
        if self.params.kind == "hnsw":
            if device == "cuda":
                raise ValueError("device: cuda has no HNSW index in FAISS; use kind flat or ivf on a GPU")
            return self
        import faiss

        self._gpu_resources = faiss.StandardGpuResources()
        self.index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index)
        self.on_gpu = True
        return self

    def save(self, path: str | Path) -> Path:
        import faiss

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        index = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        faiss.write_index(index, str(path / "index.faiss"))
        (path / "docids.json").write_text(json.dumps(self.docids))
        (path / "dense.json").write_text(
            json.dumps({**asdict(self.params), "dim": index.d, "n": index.ntotal})
        )
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> DenseIndex:
        import faiss

        path = Path(path)
        meta = json.loads((path / "dense.json").read_text())
        meta.pop("dim", None), meta.pop("n", None)
        params = DenseParams(**meta)
        index = faiss.read_index(str(path / "index.faiss"))
        if params.kind == "ivf":
            index.nprobe = min(params.nprobe, index.nlist)
        elif params.kind == "hnsw":
            index.hnsw.efSearch = params.ef_search
        return cls(index, json.loads((path / "docids.json").read_text()), params).to_device(device)

    @property
    def dim(self) -> int:
        return self.index.d

    def search(self, query_vectors: np.ndarray, k: int = 100) -> list[list[tuple[str, float]]]:
        """Top-``k`` (docid, cosine) per query vector, best first."""
        q = np.ascontiguousarray(np.atleast_2d(query_vectors), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"query vectors have {q.shape[1]} dimensions, the index {self.dim}")
        k = min(k, len(self.docids))
        if k == 0:
            return [[] for _ in q]
        scores, rows = self.index.search(q, k)
        return [[(self.docids[r], float(s)) for s, r in zip(srow, rrow, strict=True) if r >= 0]
                for srow, rrow in zip(scores, rows, strict=True)]  # fmt: skip


class DocVectors:
    """The corpus' document vectors by docid (``vectors.npy``, memory-mapped, beside the FAISS index): the
    ranker's ``dense_cos`` of an indexed document then costs one query encoding, not a document encoding."""

    def __init__(self, vectors: np.ndarray, docids: list[str]):
        if len(vectors) != len(docids):
            raise ValueError(f"{len(docids)} docids but {len(vectors)} vectors")
        self.vectors, self._row = vectors, {d: i for i, d in enumerate(docids)}

    @staticmethod
    def save(path: str | Path, vectors: np.ndarray) -> Path:
        path = Path(path) / "vectors.npy"
        np.save(path, np.ascontiguousarray(vectors, dtype=np.float32))
        return path

    @classmethod
    def load(cls, path: str | Path) -> DocVectors:
        path = Path(path)
        return cls(
            np.load(path / "vectors.npy", mmap_mode="r"), json.loads((path / "docids.json").read_text())
        )

    def __contains__(self, docid: str) -> bool:
        return docid in self._row

    def get(self, docids: Sequence[str]) -> np.ndarray:
        """(n, dim) float32 vectors of indexed docids (KeyError naming the first unknown one)."""
        rows = [self._row[d] for d in docids]
        return np.asarray(self.vectors[rows], dtype=np.float32)
