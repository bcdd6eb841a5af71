"""BM25 with bm25s: stemming, ranks over the corpus, save/load."""

import numpy as np

from retrieval.bm25 import BM25Index

DOCS = {"a": "The cat sat on the mat", "b": "Dogs are running fast", "c": "cats and dogs running together",
        "d": "an unrelated passage about rivers"}  # fmt: skip


def test_search_stems_and_ranks(tmp_path):
    ix = BM25Index.build(list(DOCS), list(DOCS.values()))
    (hits,) = ix.search(["cat"], k=3)
    assert {d for d, _ in hits} == {"a", "c"}  # "cats" stems to "cat"; docs without the term are left out
    score, rank = ix.score_pairs("running dogs", ["b", "d", "unknown"])
    assert score[0] > 0 and score[1] == 0 and rank[0] == 1 and rank[2] == len(DOCS) + 1
    loaded = BM25Index.load(ix.save(tmp_path / "bm25"))
    np.testing.assert_allclose(loaded.scores("running dogs"), ix.scores("running dogs"))
    assert loaded.docids == ix.docids
