"""PairFeaturizer: one featurizer shared by a server's threads; the served path sees the trained features."""

from __future__ import annotations

import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from models.features import FEATURES, PairFeaturizer
from retrieval.bm25 import BM25Index, BM25Params

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dogs", "run", "fast", "rivers", "flow", "to", "sea"]


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(3, 10))) for _ in range(60)]
    return [f"d{i}" for i in range(60)], texts


@pytest.fixture(scope="module")
def encoder(tiny_causal_lm):
    from models.encoder import BiEncoder

    return BiEncoder(str(tiny_causal_lm))


class OneAtATime:
    """The tiny encoder, recording how many threads were inside ``encode`` at once (a fast tokenizer entered by
    two threads fails with "Already borrowed"); the pause makes an unguarded overlap all but certain."""

    def __init__(self, encoder):
        self.encoder, self.inside, self.most_inside = encoder, 0, 0
        self._count = threading.Lock()

    def encode_queries(self, texts):
        return self._inside(self.encoder.encode_queries, texts)

    def encode_passages(self, texts):
        return self._inside(self.encoder.encode_passages, texts)

    def _inside(self, encode, texts):
        with self._count:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            time.sleep(0.002)
            return encode(texts)
        finally:
            with self._count:
                self.inside -= 1


def test_query_cache_under_threads_returns_each_querys_own_vector(corpus, encoder):
    """Eight threads, a cache of 4 queries over 24: lookups race evictions. Every row must be the vector of its
    own query, nothing may raise, and the encoder is never entered by two threads at once."""
    docids, texts = corpus
    guarded = OneAtATime(encoder)
    featurize = PairFeaturizer(BM25Index.build(docids, texts), guarded, query_cache=4)
    queries = [" ".join(random.Random(i).choices(WORDS, k=3)) for i in range(24)]
    reference = dict(zip(queries, encoder.encode_queries(queries), strict=True))
    doc_vec = encoder.encode_passages(texts[:3])

    def hammer(seed: int) -> int:
        rng = random.Random(seed)
        for _ in range(60):
            qs = rng.choices(queries, k=3)
            got = featurize(qs, texts[:3], docids=docids[:3], doc_vectors=doc_vec)["dense_cos"]
            want = np.array([reference[q] @ doc_vec[i] for i, q in enumerate(qs)], np.float32)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        return 60

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, so the races get their chances
    try:
        with ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(hammer, range(8))) == 8 * 60
    finally:
        sys.setswitchinterval(old)
    assert len(featurize._query_vec) <= 4
    assert guarded.most_inside == 1


def test_features_by_text_equal_features_by_docid(corpus, encoder):
    """The served path (a request's texts) and the features stage (docids) give a corpus document the same
    features, bm25_rank included, past the rank depth too."""
    docids, texts = corpus
    featurize = PairFeaturizer(BM25Index.build(docids, texts, BM25Params(rank_depth=10)), encoder)
    q = ["cat on a mat"] * len(docids)
    by_id, by_text = featurize(q, texts, docids=docids), featurize(q, texts)
    for name in FEATURES:
        np.testing.assert_array_equal(by_id[name], by_text[name], err_msg=name)
    assert by_id["bm25_rank"].max() == np.float32(np.log2(11))  # documents past the top 10 share rank 11


def test_queries_with_no_indexed_term_get_zero_bm25_and_leave_the_batch_alone(corpus, encoder):
    """Stop words only, punctuation, a digit, empty, other scripts: rows the features stage and the served ranker
    meet in real query logs; each scores 0 on BM25 (rank 1: no document above another), finite everywhere, and
    the other queries' rows of the same batch are unchanged."""
    from models.features import check_finite

    docids, texts = corpus
    featurize = PairFeaturizer(BM25Index.build(docids, texts), encoder)
    no_term = ["the", "?", "0", "", "日本語", "Привет"]
    queries = [q for q in no_term for _ in range(3)] + ["cat on a mat"] * 3
    ids, docs = docids[:3] * (len(no_term) + 1), texts[:3] * (len(no_term) + 1)
    alone = featurize(["cat on a mat"] * 3, texts[:3], docids=docids[:3])
    for by in ({"docids": ids}, {}):
        feats = featurize(queries, docs, **by)
        check_finite(np.column_stack([feats[f] for f in FEATURES]), FEATURES)
        assert feats["bm25"][:-3].tolist() == [0] * (len(queries) - 3)
        assert feats["bm25_rank"][:-3].tolist() == [0] * (len(queries) - 3)
        for name in FEATURES:
            np.testing.assert_array_equal(feats[name][-3:], alone[name], err_msg=name)
