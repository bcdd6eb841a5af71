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


def test_score_texts_matches_the_corpus_scores_and_ranks(tmp_path):
    ix = BM25Index.load(BM25Index.build(list(DOCS), list(DOCS.values())).save(tmp_path / "bm25"))
    for q in ["running dogs", "cat", "rivers cat mat", "nothing matches"]:
        by_id, by_text = ix.score_pairs(q, list(DOCS)), ix.score_texts(q, list(DOCS.values()))
        np.testing.assert_allclose(by_text[0], by_id[0], rtol=1e-6)
        assert by_text[1].tolist() == by_id[1].tolist()
    # a new text repeating the query's terms outscores the whole corpus, so takes rank 1
    score, rank = ix.score_texts("running dogs", ["dogs running, dogs running", None])
    assert score[0] > ix.scores("running dogs").max() and rank[0] == 1 and score[1] == 0
