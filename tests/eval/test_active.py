import numpy as np
import pytest

from eval.active import (
    choose,
    first_labels,
    kappa,
    kappa_ci,
    learning_curve,
    paired_kappa_difference,
    ranker_labels,
)


def test_first_labels_are_seeded_and_from_the_pool():
    pool = np.array([True, False, True, True, False, True, True, True])
    a, b = first_labels(pool, 3, seed=4), first_labels(pool, 3, seed=4)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 3
    assert pool[a].all()
    with pytest.raises(ValueError, match="pool holds 6"):
        first_labels(pool, 7, seed=0)


def test_mixed_takes_half_least_sure_half_random_never_an_excluded_row():
    conf = np.array([0.9, 0.1, 0.2, 0.95, 0.3, 0.8, 0.85, 0.99, 0.05, 0.7])
    label = np.zeros(10, int)
    exclude = np.zeros(10, bool)
    exclude[8] = True  # the least sure row is already bought
    picked = choose(label, conf, 4, "mixed", seed=0, exclude=exclude)
    assert len(picked) == 4 and len(set(picked.tolist())) == 4
    assert 8 not in picked
    assert picked[:2].tolist() == [1, 2]  # the two least sure of the rest come first
    with pytest.raises(ValueError, match="strategy 'greedy'"):
        choose(label, conf, 4, "greedy", seed=0, exclude=exclude)


def test_learning_curve_buys_the_least_sure_pool_rows_each_round():
    pool = np.array([True] * 8 + [False] * 4)  # the last four rows are held out: never bought
    conf_all = np.array([0.5, 0.4, 0.3, 0.2, 0.1, 0.6, 0.7, 0.8, 0.0, 0.0, 0.0, 0.0])
    seen = []

    def fit(bought):
        seen.append(sorted(bought.tolist()))
        return np.zeros(12, int), conf_all, len(bought)

    rounds = list(learning_curve(pool, fit, "uncertain", start=2, step=2, until=6, seed=1,
                                 first=np.array([0, 7])))  # fmt: skip
    assert [len(r.bought) for r in rounds] == [2, 4, 6]
    assert [r.extra for r in rounds] == [2, 4, 6]
    assert seen[1] == [0, 3, 4, 7]  # 0.1 and 0.2: the least sure pool rows, not the held-out zeros
    assert seen[2] == [0, 1, 2, 3, 4, 7]
    assert all(pool[r.bought].all() for r in rounds)


def test_learning_curve_reuses_a_shared_first_fit_and_checks_fit_output():
    pool = np.ones(6, bool)
    calls = []

    def fit(bought):
        calls.append(len(bought))
        return np.zeros(6, int), np.linspace(0, 1, 6), None

    first = np.array([0, 1])
    shared = (np.zeros(6, int), np.linspace(0, 1, 6), "shared")
    rounds = list(learning_curve(pool, fit, "random", 2, 2, 4, seed=0, first=first, first_fit=shared))
    assert rounds[0].extra == "shared" and calls == [4]

    def short_fit(bought):
        return np.zeros(3, int), np.zeros(3), None

    with pytest.raises(ValueError, match="for 6 rows"):
        list(learning_curve(pool, short_fit, "random", 2, 2, 4, seed=0))


def test_paired_kappa_difference_is_zero_for_equal_labels_and_positive_for_a_better_one():
    rng = np.random.default_rng(0)
    qids = np.repeat([f"q{i}" for i in range(20)], 10)
    human = rng.integers(0, 4, len(qids))
    d, ci = paired_kappa_difference(human, human, human, qids, [0, 1, 2, 3], n_boot=100)
    assert d == 0 and ci == (0.0, 0.0)
    noisy = rng.integers(0, 4, len(qids))
    d, ci = paired_kappa_difference(human, human, noisy, qids, [0, 1, 2, 3], n_boot=100)
    assert d > 0.5 and ci[0] > 0.5 and ci[0] <= d <= ci[1]


def test_ranker_labels_take_the_human_grade_where_bought():
    out = ranker_labels(np.array([3, 2, 1, 0]), np.array([0, 0, 0, 3]), np.array([0, 2]))
    assert out.tolist() == [3, 0, 1, 3]
    with pytest.raises(ValueError, match="3 human grades"):
        ranker_labels(np.zeros(3), np.zeros(4), np.array([0]))


def test_fast_kappa_equals_sklearns_and_its_interval_brackets_it():
    from eval.agreement import cohen_kappa

    rng = np.random.default_rng(1)
    human = rng.integers(0, 4, 300)
    label = np.where(rng.random(300) < 0.6, human, rng.integers(0, 4, 300))
    assert kappa(human, label, [0, 1, 2, 3]) == pytest.approx(cohen_kappa(human, label), abs=1e-12)
    assert np.isnan(kappa(np.zeros(5, int), np.zeros(5, int), [0, 1, 2, 3]))
    k, (lo, hi) = kappa_ci(
        human, label, np.repeat([f"q{i}" for i in range(30)], 10), [0, 1, 2, 3], n_boot=100
    )
    assert lo < k < hi
