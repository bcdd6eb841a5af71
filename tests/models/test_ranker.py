"""LambdaMART: query grouping, learning a separable signal, continuing training, features."""

import numpy as np
import pytest

from models.features import check_finite, lexical_features
from models.ranker import LambdaMARTRanker, RankerParams, group_by_query


def test_group_by_query_makes_queries_contiguous_and_keeps_row_order():
    order, sizes = group_by_query(["b", "a", "b", "c", "a", "b"])
    assert order.tolist() == [0, 2, 5, 1, 4, 3] and sizes.tolist() == [3, 2, 1]


def _data(n_q=40, per_q=12, seed=0):
    rng = np.random.default_rng(seed)
    qids = np.repeat([f"q{i}" for i in range(n_q)], per_q)
    y = rng.integers(0, 4, size=len(qids))
    X = np.column_stack(
        [y + rng.normal(0, 0.7, len(y)), rng.normal(size=len(y))]
    )  # feature 0 carries the grade
    return X, y, qids


def test_ranker_learns_the_informative_feature(tmp_path):
    X, y, q = _data()
    Xv, yv, qv = _data(10, seed=1)
    params = RankerParams(n_estimators=60, min_data_in_leaf=5, early_stopping_rounds=20)
    r = LambdaMARTRanker(["signal", "noise"], params).fit(X, y, q, Xv, yv, qv)
    imp = r.importances()
    assert imp["signal"] > 0.8 and abs(sum(imp.values()) - 1) < 1e-6
    s = r.predict(Xv)
    assert np.corrcoef(s, yv)[0, 1] > 0.7
    loaded = LambdaMARTRanker.load(r.save(tmp_path / "ranker", label_source="human"))
    np.testing.assert_allclose(loaded.predict(Xv), s, rtol=1e-6)
    # continued training (the curriculum) starts from the first model's trees
    more = LambdaMARTRanker(["signal", "noise"], params).fit(X, y, q, init_from=r, n_estimators=10)
    assert more.booster.num_trees() == r.booster.num_trees() + 10


def test_single_document_and_no_positive_queries_are_accepted():
    X, y, q = _data(5, 4)
    X, y, q = np.vstack([X, [[0.0, 0.0]]]), np.append(y, 0), np.append(q, "lonely")
    y[q == "q0"] = 0  # a query with no relevant document
    LambdaMARTRanker(["signal", "noise"], RankerParams(n_estimators=5, min_data_in_leaf=1)).fit(X, y, q)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="feature 'noise' has 1 NaN"):
        check_finite(np.array([[1.0, np.nan], [2.0, 3.0]]), ["signal", "noise"])
    with pytest.raises(ValueError, match="non-negative integer grades"):
        LambdaMARTRanker(["a"]).fit(np.ones((2, 1)), np.array([0.5, 1]), ["q", "q"])


def test_lexical_features():
    f = lexical_features(
        ["when was Varburg founded", ""], ["Varburg was founded in 1200", None], ["Varburg", None]
    )
    assert f["query_len"].tolist() == [4, 0] and f["overlap"][0] == pytest.approx(0.75)
    assert f["title_overlap"][0] == pytest.approx(0.25) and f["doc_len"][1] == 0


def test_query_vector_cache_overflow_keeps_the_batch_queries():
    """A full cache is emptied when new queries arrive; queries of the same batch cached before must survive."""
    from models.features import PairFeaturizer

    class CountingEncoder:
        def __init__(self):
            self.calls: list[list[str]] = []

        def encode_queries(self, texts):
            self.calls.append(list(texts))
            return np.array([[float(len(t)), 1.0] for t in texts], dtype=np.float32)

    enc = CountingEncoder()
    f = PairFeaturizer(None, enc, query_cache=2)
    f._query_vectors(["a", "bb"])
    v = f._query_vectors(["a", "ccc", "a"])
    assert v[:, 0].tolist() == [1.0, 3.0, 1.0]
    assert enc.calls == [["a", "bb"], ["ccc"]]
    assert set(f._query_vec) <= {"a", "ccc"}


def test_curriculum_continues_from_the_first_stages_best_iteration():
    X, y, q = _data()
    y_noise = np.random.default_rng(7).integers(0, 4, size=len(y))  # labels unrelated to the features
    Xv, yv, qv = _data(10, seed=1)
    params = RankerParams(n_estimators=200, min_data_in_leaf=5, early_stopping_rounds=10)
    first = LambdaMARTRanker(["signal", "noise"], params).fit(X, y_noise, q, Xv, yv, qv)
    best = first.info["best_iteration"]
    assert best < 200  # early stopping chose an iteration before the last one trained
    more = LambdaMARTRanker(["signal", "noise"], params).fit(X, y, q, init_from=first, n_estimators=10)
    trees = more.booster.dump_model()["tree_info"]
    assert len(trees) == best + 10 and more.info["init_iterations"] == best
    assert trees[:best] == first.booster.dump_model()["tree_info"][:best]

    # a ranker whose booster holds trees past its best iteration (a model file saved whole) is cut there too
    whole = LambdaMARTRanker(["signal", "noise"], params).fit(X, y_noise, q, n_estimators=30)
    assert whole.booster.num_trees() == 30
    whole.info["best_iteration"] = 12
    cont = LambdaMARTRanker(["signal", "noise"], params).fit(X, y, q, init_from=whole, n_estimators=10)
    assert cont.booster.num_trees() == 22
    assert cont.booster.dump_model()["tree_info"][:12] == whole.booster.dump_model()["tree_info"][:12]
    np.testing.assert_allclose(
        whole.best_booster().predict(Xv), whole.booster.predict(Xv, num_iteration=12), rtol=1e-6
    )
