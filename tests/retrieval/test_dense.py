"""FAISS dense index: exact and approximate search agree on well-separated data; save/load; device choice."""

import itertools

import numpy as np
import pytest

from retrieval.dense import DenseIndex, DenseParams, gpu_count


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    centers = _unit(rng.normal(size=(20, 32)))
    vecs = _unit(np.repeat(centers, 50, axis=0) + 0.05 * rng.normal(size=(1000, 32)))
    return [f"d{i}" for i in range(1000)], vecs


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_search_finds_the_document_itself(corpus, kind, tmp_path):
    docids, vecs = corpus
    ix = DenseIndex.build(docids, vecs, DenseParams(kind=kind, nprobe=8))
    hits = ix.search(vecs[[3, 500, 999]], k=5)
    assert [h[0][0] for h in hits] == ["d3", "d500", "d999"]
    assert all(abs(h[0][1] - 1.0) < 1e-4 for h in hits)
    assert all(s1 >= s2 for h in hits for (_, s1), (_, s2) in itertools.pairwise(h))
    loaded = DenseIndex.load(ix.save(tmp_path / kind), device="cpu")
    assert loaded.search(vecs[[3]], k=5) == ix.search(vecs[[3]], k=5) and loaded.params == ix.params


def test_bad_input_is_named(corpus):
    docids, vecs = corpus
    with pytest.raises(ValueError, match="docids"):
        DenseIndex.build(docids[:10], vecs)
    with pytest.raises(ValueError, match="kind"):
        DenseIndex.build(docids, vecs, DenseParams(kind="lsh"))
    ix = DenseIndex.build(docids, vecs)
    with pytest.raises(ValueError, match="dimensions"):
        ix.search(np.ones((1, 8), np.float32))
    with pytest.raises(ValueError, match="device"):
        ix.to_device("tpu")


def test_auto_device_stays_on_cpu_without_a_gpu(corpus):
    if gpu_count():
        pytest.skip("a GPU is present")
    docids, vecs = corpus
    ix = DenseIndex.build(docids, vecs).to_device("auto")
    assert not ix.on_gpu
    with pytest.raises(RuntimeError, match="faiss-gpu"):
        ix.to_device("cuda")


@pytest.mark.gpu
def test_gpu_flat_index_matches_cpu(corpus):
    docids, vecs = corpus
    cpu = DenseIndex.build(docids, vecs)
    gpu = DenseIndex.build(docids, vecs).to_device("cuda")
    assert gpu.on_gpu
    assert [h[0] for h in gpu.search(vecs[:10], k=3)] == [h[0] for h in cpu.search(vecs[:10], k=3)]
