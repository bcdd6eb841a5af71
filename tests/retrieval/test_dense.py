"""FAISS dense index: every kind finds what exact search finds on clustered data and survives save/load; IVF-PQ's
re-ranking is exact; the streaming builder equals a one-shot build; bad input is named; device choice."""

import itertools
import json

import numpy as np
import pytest

from retrieval.dense import (
    DenseIndex,
    DenseIndexBuilder,
    DenseParams,
    check_encoder_dim,
    gpu_count,
)

KINDS = ["flat", "ivf", "hnsw", "ivfpq"]


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _mixture(n, dim, centres, noise, seed):
    """Unit vectors around ``centres`` fixed centres (the same for every seed), ``seed`` drawing the points."""
    c = _unit(np.random.default_rng(0).normal(size=(centres, dim)))
    rng = np.random.default_rng(seed)
    return _unit(c[rng.integers(0, centres, n)] + noise * rng.normal(size=(n, dim)))


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    centers = _unit(rng.normal(size=(20, 32)))
    vecs = _unit(np.repeat(centers, 50, axis=0) + 0.05 * rng.normal(size=(1000, 32)))
    return [f"d{i}" for i in range(1000)], vecs


def _params(kind):
    return DenseParams(kind=kind, nprobe=8, pq_m=8, refine=4.0)


@pytest.mark.parametrize("kind", KINDS)
def test_search_finds_the_document_itself(corpus, kind, tmp_path):
    docids, vecs = corpus
    ix = DenseIndex.build(docids, vecs, _params(kind))
    hits = ix.search(vecs[[3, 500, 999]], k=5)
    assert [h[0][0] for h in hits] == ["d3", "d500", "d999"]
    assert all(abs(h[0][1] - 1.0) < 1e-4 for h in hits)
    assert all(s1 >= s2 for h in hits for (_, s1), (_, s2) in itertools.pairwise(h))
    loaded = DenseIndex.load(ix.save(tmp_path / kind), device="cpu")
    assert loaded.search(vecs[[3, 42]], k=5) == ix.search(vecs[[3, 42]], k=5) and loaded.params == ix.params
    assert np.array_equal(np.load(tmp_path / kind / "vectors.npy"), vecs)
    assert json.loads((tmp_path / kind / "docids.json").read_text()) == docids


def test_ivfpq_with_refine_recalls_what_flat_finds_and_scores_exactly():
    docs = _mixture(4000, 32, centres=40, noise=0.25, seed=1)
    queries = _mixture(100, 32, centres=40, noise=0.25, seed=2)
    docids = [f"d{i}" for i in range(len(docs))]
    exact = DenseIndex.build(docids, docs).search(queries, k=10)

    def recall(index):
        found = index.search(queries, k=10)
        return np.mean(
            [len({d for d, _ in f} & {d for d, _ in e}) / 10 for f, e in zip(found, exact, strict=True)]
        )

    refined = DenseIndex.build(docids, docs, DenseParams(kind="ivfpq", nlist=16, nprobe=16, pq_m=8, refine=8))
    coarse = DenseIndex.build(docids, docs, DenseParams(kind="ivfpq", nlist=16, nprobe=16, pq_m=8, refine=0))
    r_refined, r_coarse = recall(refined), recall(coarse)
    assert r_refined >= 0.9 and r_refined > r_coarse
    # re-ranked scores are the exact cosines, not the codes' estimates
    (hits,) = refined.search(queries[:1], k=10)
    row = {d: i for i, d in enumerate(docids)}
    assert np.allclose([s for _, s in hits], [float(docs[row[d]] @ queries[0]) for d, _ in hits], atol=1e-5)


def test_ivfpq_reranking_reads_the_stored_vectors(corpus, tmp_path):
    docids, vecs = corpus
    path = DenseIndex.build(docids, vecs, _params("ivfpq")).save(tmp_path / "pq")
    assert isinstance(DenseIndex.load(path, device="cpu").vectors, np.memmap)
    (path / "vectors.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"vectors\.npy"):
        DenseIndex.load(path, device="cpu")


def test_an_index_saved_before_the_new_parameters_still_loads(corpus, tmp_path):
    docids, vecs = corpus
    path = DenseIndex.build(docids, vecs, DenseParams(kind="hnsw")).save(tmp_path / "old")
    meta = json.loads((path / "dense.json").read_text())
    old = {k: meta[k] for k in ("kind", "nlist", "nprobe", "hnsw_m", "ef_search", "encoder", "dim", "n")}
    (path / "dense.json").write_text(json.dumps(old))
    assert DenseIndex.load(path, device="cpu").search(vecs[[7]], k=1)[0][0][0] == "d7"


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_streaming_builder_equals_a_one_shot_build(corpus, kind, tmp_path):
    docids, vecs = corpus
    params = DenseParams(kind=kind, nprobe=8)
    builder = DenseIndexBuilder(tmp_path / "streamed", docids, params, train_size=400, add_batch=128)
    order = np.random.default_rng(3).permutation(len(docids))  # batches arrive in any row order
    for part in np.array_split(order, 13):
        builder.add(part, vecs[part])
    streamed = builder.finish()
    # stored vectors by row, FAISS id = row: the docstore order contract
    assert np.array_equal(np.load(tmp_path / "streamed" / "vectors.npy"), vecs)
    assert streamed.index.ntotal == len(docids) and streamed.docids == docids
    loaded = DenseIndex.load(tmp_path / "streamed", device="cpu")
    queries = vecs[[0, 250, 777]] + 0.01
    if kind == "flat":
        assert loaded.search(queries, k=10) == DenseIndex.build(docids, vecs, params).search(queries, k=10)
    else:
        assert [h[0][0] for h in loaded.search(vecs[[0, 250, 777]], k=3)] == ["d0", "d250", "d777"]


def test_builder_trains_on_a_sample_then_adds_every_vector(corpus, tmp_path):
    docids, vecs = corpus
    builder = DenseIndexBuilder(tmp_path / "pq", docids, _params("ivfpq"), train_size=300, add_batch=100)
    builder.add(np.arange(1000), vecs)
    index = builder.finish()
    assert builder.train_rows == 300 and index.index.is_trained and index.index.ntotal == 1000
    assert DenseIndex.load(tmp_path / "pq", device="cpu").search(vecs[[9]], k=1)[0][0][0] == "d9"


def test_builder_names_lost_and_doubled_vectors(corpus, tmp_path):
    docids, vecs = corpus
    builder = DenseIndexBuilder(tmp_path / "b", docids, DenseParams())
    builder.add([0, 1], vecs[:2])
    with pytest.raises(ValueError, match=r"'d1'.*two vectors"):
        builder.add([1, 2], vecs[1:3])
    with pytest.raises(ValueError, match="two vectors"):
        builder.add([5, 5], vecs[:2])
    with pytest.raises(ValueError, match="outside"):
        builder.add([1000], vecs[:1])
    with pytest.raises(ValueError, match="8-d vectors, but earlier batches were 32-d"):
        builder.add([3], np.ones((1, 8), np.float32))
    with pytest.raises(ValueError, match=r"998 of 1000 documents got no vector, e\.g\. docid 'd2'"):
        builder.finish()


def test_empty_corpus_is_refused(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        DenseIndexBuilder(tmp_path / "e", [], DenseParams())
    with pytest.raises(ValueError, match="empty corpus"):
        DenseIndex.build([], np.zeros((0, 8), np.float32))


def test_encoder_dimension_mismatch_names_both():
    check_encoder_dim(384, 384, "minilm", "idx/dense")
    with pytest.raises(ValueError, match=r"encoder enc-768 makes 768-d vectors.*idx/dense holds 384-d"):
        check_encoder_dim(768, 384, "enc-768", "idx/dense")
    with pytest.raises(ValueError, match="packaged MiniLM makes 16-d"):
        check_encoder_dim(16, 384, None, "idx/dense")


def test_bad_input_is_named(corpus):
    docids, vecs = corpus
    with pytest.raises(ValueError, match="docids"):
        DenseIndex.build(docids[:10], vecs)
    with pytest.raises(ValueError, match="kind"):
        DenseIndex.build(docids, vecs, DenseParams(kind="lsh"))
    with pytest.raises(ValueError, match=r"pq_m: 5 sub-quantizers do not divide .* 32 dimensions"):
        DenseIndex.build(docids, vecs, DenseParams(kind="ivfpq", pq_m=5))
    with pytest.raises(ValueError, match="pq_nbits"):
        DenseIndex.build(docids[:100], vecs[:100], DenseParams(kind="ivfpq", pq_m=4))
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
@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_gpu_index_sharded_over_every_gpu_matches_cpu(corpus, kind, tmp_path):
    docids, vecs = corpus
    cpu = DenseIndex.build(docids, vecs, _params(kind))
    gpu = DenseIndex.load(cpu.save(tmp_path / kind), device="cuda")
    assert gpu.on_gpu
    assert [h[0][0] for h in gpu.search(vecs[:10], k=3)] == [h[0][0] for h in cpu.search(vecs[:10], k=3)]
    # saved from the GPU(s), the shards merge back into one CPU index
    again = DenseIndex.load(gpu.save(tmp_path / f"{kind}-again"), device="cpu")
    assert again.index.ntotal == len(docids)


@pytest.mark.gpu
def test_hnsw_stays_on_cpu_and_cuda_says_why(corpus):
    docids, vecs = corpus
    ix = DenseIndex.build(docids, vecs, DenseParams(kind="hnsw")).to_device("auto")
    assert not ix.on_gpu
    with pytest.raises(ValueError, match="no hnsw index"):
        ix.to_device("cuda")


@pytest.mark.gpu
def test_builder_trains_ivf_on_the_gpus(corpus, tmp_path):
    docids, vecs = corpus
    builder = DenseIndexBuilder(tmp_path / "g", docids, _params("ivfpq"), device="cuda")
    builder.add(np.arange(1000), vecs)
    assert builder.finish().search(vecs[[4]], k=1)[0][0][0] == "d4"
