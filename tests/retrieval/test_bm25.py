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


def _random_corpus(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    words = "river bank money fish boat loan water rate stream credit shore cash".split()  # noqa: SIM905
    texts = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(n)]
    return [f"doc{i}" for i in range(n)], texts


def test_rank_is_the_corpus_rank_within_the_top_and_depth_plus_one_beyond(tmp_path):
    from retrieval.bm25 import BM25Params

    docids, texts = _random_corpus(300)
    ix = BM25Index.load(BM25Index.build(docids, texts, BM25Params(rank_depth=25)).save(tmp_path / "bm25"))
    assert ix.depth == 25
    for q in ["river bank", "money loan rate rate", "fish", "shore cash credit water"]:
        full = ix.scores(q)  # the whole-corpus reference the served path must never need
        exact = 1 + np.array([(full > s).sum() for s in full])
        score, rank = ix.score_pairs(q, docids)
        np.testing.assert_array_equal(score, full)  # read from the token columns: the same float32 sums
        np.testing.assert_array_equal(rank, np.minimum(exact, 26))
        assert (rank <= 25).sum() >= 25  # ties may put more than 25 documents inside the top
        by_text_score, by_text_rank = ix.score_texts(q, texts)
        np.testing.assert_array_equal(by_text_score, score)  # bm25s arithmetic, step for step
        np.testing.assert_array_equal(by_text_rank, rank)


def test_search_is_bm25s_top_k_in_a_stable_order(tmp_path):
    docids, texts = _random_corpus(300, seed=1)
    ix = BM25Index.build(docids, texts)
    (hits,) = ix.search(["river money"], k=40)
    full = ix.scores("river money")
    expected = sorted(range(len(full)), key=lambda i: (-full[i], i))[:40]
    assert [d for d, _ in hits] == [docids[i] for i in expected]
    np.testing.assert_array_equal([s for _, s in hits], full[expected])
    assert ix.search(["river money"], k=40) == [hits]  # the cached top returns the same list
    (deep,) = ix.search(["river money"], k=2000)  # deeper than rank_depth and the corpus: every match, once
    assert len(deep) == int((full > 0).sum()) and len({d for d, _ in deep}) == len(deep)


def test_queries_without_indexed_terms(tmp_path):
    ix = BM25Index.build(list(DOCS), list(DOCS.values()))
    for q in ["the and of", "zebra quokka"]:  # stop words only; words no document has
        assert ix.search([q], k=3) == [[]]
        score, rank = ix.score_pairs(q, ["a", "b"])
        assert score.tolist() == [0, 0] and rank.tolist() == [1, 1]


NO_TERM = [
    "the",
    "?",
    "0",
    "",
    "   ",
    "日本語",
    "Привет",
    "the ? 0 of",
]  # stop words, punctuation, digits, other scripts


def test_a_query_with_no_indexed_term_scores_zero_everywhere(tmp_path):
    built = BM25Index.build(list(DOCS), list(DOCS.values()))
    for ix in (built, BM25Index.load(built.save(tmp_path / "bm25"))):
        for q in NO_TERM:
            assert ix.scores(q).tolist() == [0] * len(DOCS), q
            assert ix.search([q], k=3) == [[]], q
            rows, scores = ix.top(q, 3)
            assert len(rows) == len(scores) == 0
            score, rank = ix.score_pairs(q, ["a", "b", "unknown"])
            assert score.tolist() == [0, 0, 0] and rank.tolist() == [1, 1, len(DOCS) + 1], q
            score, rank = ix.score_texts(q, ["the cat sat", None, "日本語 0 ?"])
            assert score.tolist() == [0, 0, 0] and rank.tolist() == [1, 1, 1], q
        # one such query in a batch leaves the others' results alone
        hits = ix.search(["cat", "the", "dogs"], k=3)
        assert (
            hits[1] == [] and hits[0] == ix.search(["cat"], k=3)[0] and hits[2] == ix.search(["dogs"], k=3)[0]
        )


def test_loaded_index_is_memory_mapped_without_a_docid_dict(tmp_path):
    ix = BM25Index.load(BM25Index.build(list(DOCS), list(DOCS.values())).save(tmp_path / "bm25"))
    assert isinstance(ix.retriever.scores["data"], np.memmap)
    assert not any(isinstance(v, dict) and len(v) == len(DOCS) for v in vars(ix).values())
    assert ix.score_pairs("cat", ["c", "a"])[1].tolist() == [2, 1]


def test_index_written_with_docids_json_still_loads(tmp_path):
    import json

    path = BM25Index.build(list(DOCS), list(DOCS.values())).save(tmp_path / "bm25")
    for f in path.glob("docids.*"):
        f.unlink()
    (path / "docids.json").write_text(json.dumps(list(DOCS)))
    assert BM25Index.load(path).search(["cat"], k=1)[0][0][0] == "a"


def test_duplicate_docids_are_named():
    import pytest

    with pytest.raises(ValueError, match="duplicate docid 'a'"):
        BM25Index.build(["a", "b", "a"], ["x", "y", "z"])
