import pytest

from retrieval.candidates import CandidateGenerator, CandidateParams, attach_labels, fuse, label_lookup


def test_fuse_one_retriever_keeps_its_scores_and_order():
    runs = {"bm25": [[("a", 3.0), ("b", 2.0), ("c", 1.0)], []]}
    assert fuse(runs, k=2) == [[("a", 3.0, "bm25"), ("b", 2.0, "bm25")], []]


def test_fuse_is_reciprocal_rank_fusion():
    runs = {"bm25": [[("a", 9.0), ("b", 5.0)]], "dense": [[("b", 0.9), ("c", 0.8)]]}
    (fused,) = fuse(runs, k=3, rrf_k=60)
    # b: 1/62 + 1/61; a: 1/61; c: 1/62
    assert [d for d, _, _ in fused] == ["b", "a", "c"]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[1][1] == pytest.approx(1 / 61)
    assert [by for _, _, by in fused] == ["bm25+dense", "bm25", "dense"]


def test_fuse_breaks_ties_by_docid_whatever_the_retriever_order():
    a = fuse({"x": [[("d2", 1.0)]], "y": [[("d1", 1.0)]]}, k=2)
    b = fuse({"y": [[("d1", 1.0)]], "x": [[("d2", 1.0)]]}, k=2)
    assert [d for d, _, _ in a[0]] == [d for d, _, _ in b[0]] == ["d1", "d2"]


def test_params_are_checked():
    with pytest.raises(ValueError, match="retrievers"):
        CandidateParams(retrievers=("splade",))
    with pytest.raises(ValueError, match="k must"):
        CandidateParams(k=0)
    assert CandidateParams(k=10).per_retriever == 10
    assert CandidateParams(k=10, retrievers=("bm25", "dense")).per_retriever == 20


def test_bm25_candidates_from_an_index_directory(tmp_path):
    from retrieval.bm25 import BM25Index

    docids = ["d1", "d2", "d3", "d4"]
    texts = ["the river flows north", "a town on the river", "company ceo founded", "species lives here"]
    BM25Index.build(docids, texts).save(tmp_path / "bm25")
    gen = CandidateGenerator(tmp_path, CandidateParams(k=2))
    table = gen(["q1", "q2", "q3"], ["river town", "ceo", "zebra"])
    rows = table.to_pylist()
    assert [(r["qid"], r["docid"], r["cand_rank"]) for r in rows] == [
        ("q1", "d2", 1),
        ("q1", "d1", 2),
        ("q2", "d3", 1),
    ]  # q3 matches no term: no candidate
    assert all(r["retrieved_by"] == "bm25" for r in rows)
    with pytest.raises(FileNotFoundError, match="dense"):
        CandidateGenerator(tmp_path, CandidateParams(retrievers=("dense",)))


def test_labels_attach_where_known():
    import pyarrow as pa

    qrels = pa.table(
        {"qid": ["q1", "q1", "q2"], "docid": ["d1", "d2", "d1"], "label": pa.array([3, None, 0], pa.int8())}
    )
    cands = pa.table({"qid": ["q1", "q1", "q2", "q3"], "docid": ["d1", "d2", "d1", "d1"]})
    assert attach_labels(cands, label_lookup(qrels)).to_pylist() == [3, None, 0, None]


def test_dense_and_fused_candidates_use_the_index_encoder(tmp_path):
    from models.encoder import BiEncoder
    from retrieval.bm25 import BM25Index
    from retrieval.dense import DenseIndex

    docids = ["d1", "d2", "d3"]
    texts = ["the river flows north through the town", "a company and its ceo", "a species that eats fish"]
    BM25Index.build(docids, texts).save(tmp_path / "bm25")
    DenseIndex.build(docids, BiEncoder().encode(texts)).save(tmp_path / "dense")
    dense = CandidateGenerator(tmp_path, CandidateParams(k=1, retrievers=("dense",)))
    assert dense(["q"], ["which animal eats fish"]).column("docid").to_pylist() == ["d3"]
    both = CandidateGenerator(tmp_path, CandidateParams(k=3, retrievers=("bm25", "dense")))
    rows = both(["q"], ["river town"]).to_pylist()
    assert rows[0]["docid"] == "d1" and rows[0]["retrieved_by"] == "bm25+dense"
    assert [r["cand_rank"] for r in rows] == [1, 2, 3]  # dense ranks every doc: all three are fused in
