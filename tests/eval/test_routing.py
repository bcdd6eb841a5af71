import numpy as np
import pytest

from eval.routing import select_for_review


def test_uncertain_picks_the_least_confident_first_and_skips_excluded():
    conf = np.array([0.9, 0.2, np.nan, 0.5, 0.1])
    label = np.array([0, 1, 2, 3, 0])
    idx = select_for_review(label, conf, 3, "uncertain", exclude=[False, False, False, False, True])
    assert idx.tolist() == [2, 1, 3]


def test_random_is_seeded_and_without_replacement():
    label, conf = np.zeros(50, int), np.ones(50)
    a = select_for_review(label, conf, 20, "random", seed=3)
    assert len(set(a.tolist())) == 20
    assert a.tolist() == select_for_review(label, conf, 20, "random", seed=3).tolist()
    assert a.tolist() != select_for_review(label, conf, 20, "random", seed=4).tolist()


def test_stratified_gives_each_grade_an_equal_share_and_a_short_grade_its_rest_to_others():
    label = np.array([0] * 40 + [1] * 40 + [2] * 40 + [3] * 2)
    idx = select_for_review(label, np.ones(len(label)), 20, "stratified", seed=0)
    counts = np.bincount(label[idx], minlength=4)
    assert counts[3] == 2 and sorted(counts[:3].tolist()) == [6, 6, 6]


def test_budget_larger_than_the_pool_and_bad_arguments():
    assert len(select_for_review([0, 1], [0.5, 0.5], 10, "uncertain")) == 2
    with pytest.raises(ValueError, match="strategy"):
        select_for_review([0], [1.0], 1, "greedy")
    with pytest.raises(ValueError, match="confidences"):
        select_for_review([0, 1], [1.0], 1, "random")
