"""Dense retrieval with FAISS: inner product over unit vectors (the cosine), exact (``flat``) or approximate
(``ivf``: inverted lists over k-means cells; ``hnsw``: a navigable small-world graph; ``ivfpq``: inverted lists
of product-quantized codes, ``pq_m`` bytes a vector, re-ranked exactly from the stored vectors).

The index is a directory: ``index.faiss`` (always written as a CPU index), ``docids.json`` (row -> docid, a JSON
list), ``dense.json`` (its parameters and the encoder that made the vectors, so queries are encoded the same way)
and ``vectors.npy`` (the float32 vectors by row: the ranker's ``dense_cos``, serving's features and IVF-PQ's
re-ranking read it memory-mapped). FAISS id = row of ``vectors.npy`` = row of ``docids.json``.

IVF-PQ's re-ranking (``refine``) reads the candidates' vectors from the memory-mapped ``vectors.npy`` instead of
FAISS' ``IndexRefineFlat``: that wrapper keeps a second full-precision copy of every vector inside the index
(in RAM when loaded, and in the driver while building), which is what IVF-PQ is chosen to avoid; ``vectors.npy``
is on disk anyway, and re-ranking touches only the candidates' pages. The same split (compressed index on the
GPU, exact re-ranking on CPU threads from the raw vectors) is what cuVS documents for IVF-PQ.

``DenseIndexBuilder`` builds with memory bounded by its batches, not the corpus: vectors are written into a
memory-mapped ``vectors.npy`` at their row as they arrive, the quantizer is trained on a seeded sample of rows,
then the index is filled from the file in row order, ``add_batch`` rows at a time.

``device="auto"`` moves a flat, IVF or IVF-PQ index to every GPU faiss-gpu sees (sharded: each GPU holds a
part; ``pip install augrel[gpu]``); HNSW has no GPU implementation in FAISS and stays on the CPU.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

IndexKind = Literal["flat", "ivf", "hnsw", "ivfpq"]
KINDS = ("flat", "ivf", "hnsw", "ivfpq")
#: kinds that FAISS can clone to GPUs
GPU_KINDS = ("flat", "ivf", "ivfpq")
#: training vectors at most, whatever the corpus (1M x 384-d float32 = 1.5 GB)
MAX_TRAIN = 1_000_000


@dataclass(frozen=True)
class DenseParams:
    kind: IndexKind = "flat"
    nlist: int = 0  # ivf / ivfpq cells; 0: about 4 sqrt(n), capped so each cell trains on 39+ points
    nprobe: int = 16  # ivf / ivfpq cells visited per query
    hnsw_m: int = 32  # hnsw neighbours per node
    ef_search: int = 128  # hnsw candidate list per query
    ef_construction: int = 40  # hnsw candidate list while adding (FAISS' default)
    pq_m: int = 0  # ivfpq sub-quantizers (bytes per code at 8 bits); must divide dim; 0: dim / 8 or less
    pq_nbits: int = 8  # ivfpq bits per sub-quantizer code
    refine: float = 4.0  # ivfpq: re-rank k * refine candidates exactly from vectors.npy; <= 1: no re-ranking
    encoder: str | None = None  # the encoder that made the vectors (None: the packaged MiniLM)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("nlist", "pq_m"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0 (0: automatic), got {getattr(self, name)}")
        for name in ("nprobe", "hnsw_m", "ef_search", "ef_construction"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.pq_nbits <= 16:
            raise ValueError(f"pq_nbits: must be in 1..16, got {self.pq_nbits}")

    @property
    def refines(self) -> bool:
        return self.kind == "ivfpq" and self.refine > 1

    def resolved_nlist(self, n: int) -> int:
        nlist = self.nlist or int(4 * np.sqrt(n))
        return max(1, min(nlist, n // 39))

    def resolved_pq_m(self, dim: int) -> int:
        if self.pq_m:
            if dim % self.pq_m:
                divisors = [m for m in range(1, dim + 1) if dim % m == 0]
                raise ValueError(
                    f"pq_m: {self.pq_m} sub-quantizers do not divide the vectors' {dim} dimensions "
                    f"(divisors of {dim}: {divisors})"
                )
            return self.pq_m
        return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)

    def train_size(self, n: int) -> int:
        """Training vectors for ``n`` documents: 100 per IVF cell (FAISS' k-means samples at most 256) and, for
        PQ, 39 per code centroid (FAISS' minimum without a warning), capped at :data:`MAX_TRAIN`."""
        if self.kind in ("flat", "hnsw"):
            return 0
        need = 100 * self.resolved_nlist(n)
        if self.kind == "ivfpq":
            need = max(need, 39 * 2**self.pq_nbits)
        return min(n, need, MAX_TRAIN)


def check_encoder_dim(encoder_dim: int, index_dim: int, encoder_name: str | None, index_path) -> None:
    """ValueError naming both when an encoder's vectors cannot be searched in a dense index."""
    if int(encoder_dim) != int(index_dim):
        raise ValueError(
            f"encoder {encoder_name or 'the packaged MiniLM'} makes {encoder_dim}-d vectors, but the dense index "
            f"at {index_path} holds {index_dim}-d ones: encode with the encoder the index was built with "
            f"(its dense.json 'encoder'), or rebuild the index with this one (augrel index build)"
        )


def gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def new_index(params: DenseParams, dim: int, n: int):
    """An empty (untrained for ivf / ivfpq) CPU index for ``n`` vectors of ``dim`` dimensions."""
    import faiss

    if params.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
        return index
    nlist = params.resolved_nlist(n)
    if params.kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        if n < 2**params.pq_nbits:
            raise ValueError(
                f"pq_nbits: {params.pq_nbits} bits train {2**params.pq_nbits} centroids per sub-quantizer, "
                f"more than the {n} vectors to index: lower pq_nbits or use kind flat"
            )
        m = params.resolved_pq_m(dim)
        index = faiss.IndexIVFPQ(
            faiss.IndexFlatIP(dim), dim, nlist, m, params.pq_nbits, faiss.METRIC_INNER_PRODUCT
        )
    index.nprobe = min(params.nprobe, nlist)
    return index


def _set_search_params(index, params: DenseParams) -> None:
    import faiss

    if params.kind in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = min(params.nprobe, faiss.extract_index_ivf(index).nlist)
    elif params.kind == "hnsw":
        index.hnsw.efSearch = params.ef_search


def _train_on_gpus(index, sample: np.ndarray) -> None:
    """k-means of an IVF index on every GPU (its assignment step is the cost); the trained index stays a CPU
    index. FAISS' documented way: an IVF index's ``clustering_index`` replaces its quantizer during training."""
    import faiss

    index.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(index.d))
    try:
        index.train(sample)
    finally:
        index.clustering_index = None


def _train(index, sample: np.ndarray, device: str) -> None:
    if device != "cpu" and gpu_count() and hasattr(index, "clustering_index"):
        _train_on_gpus(index, sample)
    else:
        index.train(sample)


class DenseIndex:
    """A FAISS index of unit vectors with its docids; ``search`` returns (docid, cosine) best first.

    ``vectors`` (row -> float32 vector, in memory or memory-mapped) is needed for IVF-PQ's re-ranking.
    """

    def __init__(self, index, docids: list[str], params: DenseParams, vectors: np.ndarray | None = None):
        self.index, self.docids, self.params, self.vectors = index, docids, params, vectors
        self.on_gpu = False
        if params.refines and vectors is None:
            raise ValueError("refine: IVF-PQ re-ranking needs the stored vectors (vectors.npy)")

    @classmethod
    def build(
        cls,
        docids: Sequence[str],
        vectors: np.ndarray,
        params: DenseParams = DenseParams(),
        device: str = "cpu",
    ) -> DenseIndex:
        """In memory, from all the vectors at once (small corpora, tests); :class:`DenseIndexBuilder` streams."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(docids):
            raise ValueError(f"{len(docids)} docids but vectors of shape {vectors.shape}")
        if len(docids) == 0:
            raise ValueError("no documents to index (an empty corpus)")
        if len(set(docids)) != len(docids):
            raise ValueError("docids are not unique")
        n, dim = vectors.shape
        index = new_index(params, dim, n)
        if not index.is_trained:
            rows = np.random.default_rng(0).choice(n, params.train_size(n), replace=False)
            _train(index, vectors[np.sort(rows)], device)
        index.add(vectors)
        return cls(index, list(docids), params, vectors)

    def to_device(self, device: str = "auto") -> DenseIndex:
        """Shard the index over every GPU faiss sees for ``cuda``, or for ``auto`` when it sees one; ``cpu``:
        stay. IVF-PQ's re-ranking stays on the CPU (it reads the memory-mapped vectors)."""
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
        if self.params.kind not in GPU_KINDS:
            if device == "cuda":
                raise ValueError(
                    f"device: cuda has no {self.params.kind} index in FAISS; use kind flat, ivf or ivfpq on GPUs"
                )
            return self
        import faiss

        co = faiss.GpuMultipleClonerOptions()
        co.shard = True  # each GPU holds 1/n of the vectors (replicas would each hold them all)
        if self.params.kind == "ivfpq":
            # FAISS' GPU IVF-PQ keeps its lookup tables in shared memory: past 48 bytes a code they only fit in
            # float16 (the codes themselves are unchanged)
            co.useFloat16 = self.params.resolved_pq_m(self.dim) > 48
        try:
            self.index = faiss.index_cpu_to_all_gpus(self.index, co=co)
        except RuntimeError as e:
            raise RuntimeError(
                f"kind: {self.params.kind} could not move to the GPU(s) ({e}); GPU IVF-PQ supports "
                "pq_nbits 8 and pq_m of 1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64 or 96; "
                "use device: cpu"
            ) from e
        _set_search_params(self.index, self.params)
        self.on_gpu = True
        return self

    def save(self, path: str | Path) -> Path:
        """index.faiss, docids.json, dense.json; vectors.npy too when the index holds vectors that are not
        already that file."""
        import faiss

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        index = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        faiss.write_index(index, str(path / "index.faiss"))
        with open(path / "docids.json", "w") as f:
            json.dump(self.docids, f)
        (path / "dense.json").write_text(
            json.dumps({**asdict(self.params), "dim": index.d, "n": index.ntotal})
        )
        target = path / "vectors.npy"
        if self.vectors is not None and not _is_file(self.vectors, target):
            DocVectors.save(path, self.vectors)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> DenseIndex:
        import faiss

        path = Path(path)
        meta = json.loads((path / "dense.json").read_text())
        meta.pop("dim", None), meta.pop("n", None)
        params = DenseParams(**meta)
        index = faiss.read_index(str(path / "index.faiss"))
        _set_search_params(index, params)
        vectors = None
        if params.refines:
            if not (path / "vectors.npy").exists():
                raise FileNotFoundError(
                    f"{path}/vectors.npy: IVF-PQ with refine: {params.refine} re-ranks from the stored vectors, "
                    "and they are missing (rebuild the index, or set refine: 0 in its dense.json)"
                )
            vectors = np.load(path / "vectors.npy", mmap_mode="r")
        docids = json.loads((path / "docids.json").read_text())
        return cls(index, docids, params, vectors).to_device(device)

    @property
    def dim(self) -> int:
        return self.index.d

    def check_encoder(self, encoder_dim: int, encoder_name: str | None, index_path) -> None:
        check_encoder_dim(encoder_dim, self.dim, encoder_name, index_path)

    def search(self, query_vectors: np.ndarray, k: int = 100) -> list[list[tuple[str, float]]]:
        """Top-``k`` (docid, cosine) per query vector, best first."""
        q = np.ascontiguousarray(np.atleast_2d(query_vectors), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"query vectors have {q.shape[1]} dimensions, the index {self.dim}")
        k = min(k, len(self.docids))
        if k == 0:
            return [[] for _ in q]
        if self.params.refines:
            scores, rows = self._search_refined(q, k)
        else:
            scores, rows = self.index.search(q, k)
        return [[(self.docids[r], float(s)) for s, r in zip(srow, rrow, strict=True) if r >= 0]
                for srow, rrow in zip(scores, rows, strict=True)]  # fmt: skip

    def _search_refined(self, q: np.ndarray, k: int, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """The base index's top k * refine, re-scored by the exact inner product with the stored vectors."""
        depth = min(len(self.docids), max(k, int(np.ceil(k * self.params.refine))))
        _, cand = self.index.search(q, depth)
        scores = np.full((len(q), k), -np.inf, np.float32)
        rows = np.full((len(q), k), -1, np.int64)
        for start in range(0, len(q), chunk):
            c = cand[start : start + chunk]
            valid = c >= 0
            # the union of the chunk's candidates, read once and in file order from the memory map
            uniq, inverse = np.unique(np.where(valid, c, 0), return_inverse=True)
            vecs = np.asarray(self.vectors[uniq], dtype=np.float32)
            exact = np.einsum("qcd,qd->qc", vecs[inverse.reshape(c.shape)], q[start : start + chunk])
            exact = np.where(valid, exact, -np.inf)
            top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
            scores[start : start + chunk] = np.take_along_axis(exact, top, 1)
            rows[start : start + chunk] = np.where(
                np.isfinite(scores[start : start + chunk]), np.take_along_axis(c, top, 1), -1
            )
        return scores, rows


def _is_file(vectors: np.ndarray, target: Path) -> bool:
    filename = getattr(vectors, "filename", None)
    return filename is not None and target.exists() and Path(filename).resolve() == target.resolve()


class DenseIndexBuilder:
    """Builds a :class:`DenseIndex` directory from vectors that arrive in batches, in any row order, with memory
    bounded by a batch (plus the training sample), not by the corpus.

    ``add(rows, vectors)`` writes each batch into ``PATH/vectors.npy`` (a disk memory map) at its rows (the
    document store's rows). ``finish()`` checks that every row arrived exactly once, trains the quantizer (ivf,
    ivfpq) on a seeded random sample of ``train_size`` rows of the whole corpus (not the first batches to
    arrive: a corpus sorted by source or topic would train cells on one topic), then adds the vectors to the
    index in row order, ``add_batch`` rows at a time, so FAISS id = row for every kind (flat and HNSW have no
    ``add_with_ids`` without an ID map). Vectors are assumed unit-length (inner product = cosine).
    """

    def __init__(
        self,
        path: str | Path,
        docids: Sequence[str],
        params: DenseParams = DenseParams(),
        train_size: int = 0,
        add_batch: int = 65_536,
        device: str = "cpu",
        seed: int = 0,
    ):
        if len(docids) == 0:
            raise ValueError("no documents to index (an empty corpus)")
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: {device!r} is not one of auto, cpu, cuda")
        self.path, self.docids, self.params = Path(path), docids, params
        self.n = len(docids)
        self.train_rows = train_size or params.train_size(self.n)
        self.add_batch, self.device, self.seed = add_batch, device, seed
        self.path.mkdir(parents=True, exist_ok=True)
        self._vectors: np.ndarray | None = None
        self._arrived = np.zeros(self.n, bool)

    @property
    def dim(self) -> int | None:
        return None if self._vectors is None else self._vectors.shape[1]

    def add(self, rows: Sequence[int] | np.ndarray, vectors: np.ndarray) -> None:
        rows = np.asarray(rows, np.int64)
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or len(vectors) != len(rows):
            raise ValueError(f"{len(rows)} rows but vectors of shape {vectors.shape}")
        if not len(rows):
            return
        if self._vectors is None:
            if self.params.kind == "ivfpq":
                self.params.resolved_pq_m(vectors.shape[1])  # a bad pq_m fails before hours of encoding
            self._vectors = np.lib.format.open_memmap(
                self.path / "vectors.npy", mode="w+", dtype=np.float32, shape=(self.n, vectors.shape[1])
            )
        if vectors.shape[1] != self.dim:
            raise ValueError(
                f"a batch of {vectors.shape[1]}-d vectors, but earlier batches were {self.dim}-d"
            )
        bad = (rows < 0) | (rows >= self.n)
        if bad.any():
            raise ValueError(f"row {int(rows[bad][0])} is outside the corpus' {self.n} rows")
        again = self._arrived[rows] | (np.bincount(rows - rows.min()) > 1)[rows - rows.min()]
        if again.any():
            raise ValueError(f"docid {self.docids[int(rows[again][0])]!r} (row {int(rows[again][0])}) got two "
                             "vectors")  # fmt: skip
        self._vectors[rows] = vectors
        self._arrived[rows] = True

    def finish(self) -> DenseIndex:
        """Train, fill and save the index (``PATH``): every row must have arrived."""
        missing = np.flatnonzero(~self._arrived)
        if len(missing):
            raise ValueError(f"{len(missing)} of {self.n} documents got no vector, e.g. docid "
                             f"{self.docids[int(missing[0])]!r}")  # fmt: skip
        self._vectors.flush()
        del self._vectors
        vectors = np.load(self.path / "vectors.npy", mmap_mode="r")
        self._vectors = None
        index = new_index(self.params, vectors.shape[1], self.n)
        if not index.is_trained:
            rows = np.random.default_rng(self.seed).choice(
                self.n, min(self.n, self.train_rows), replace=False
            )
            _train(index, np.asarray(vectors[np.sort(rows)], np.float32), self.device)
        for start in range(0, self.n, self.add_batch):
            index.add(np.ascontiguousarray(vectors[start : start + self.add_batch], dtype=np.float32))
        dense = DenseIndex(index, list(self.docids), self.params, vectors)
        dense.save(self.path)
        return dense


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
