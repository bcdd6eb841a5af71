"""Selection quality against gold positives: hand-computed precision, recall, F1 and positives per question."""

from __future__ import annotations

import math

import pytest

from eval.utility import selection_quality, top_k_selection

GOLD = {"q1": {"a": True, "b": False, "c": True, "d": False}, "q2": {"e": True, "f": False},
        "q3": {"g": False}}  # fmt: skip


def test_micro_and_per_question_figures_by_hand():
    rows = [("q1", "a", True), ("q1", "b", True), ("q1", "c", False), ("q1", "d", False),
            ("q2", "e", False), ("q2", "f", False),
            ("q3", "g", True),  # no gold positive: q3 is not scored
            ("q1", "zz", True)]  # no gold label: left out, counted  # fmt: skip
    q = selection_quality(rows, GOLD, n_boot=200)
    # q1: tp 1, selected 2, positives 2; q2: tp 0, selected 0, positives 1
    assert q.questions == 2 and q.pairs == 6 and q.unlabelled_selected == 1
    assert q.precision == pytest.approx(1 / 2) and q.recall == pytest.approx(1 / 3)
    assert q.f1 == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    # per question: q1 F1 = 0.5, q2 selects nothing: F1 0
    assert q.f1_per_question == pytest.approx(0.25)
    assert q.positives_per_question == pytest.approx(1.0) and q.gold_per_question == pytest.approx(1.5)
    assert 0.0 <= q.f1_ci[0] <= 0.25 <= q.f1_ci[1] <= 0.5


def test_perfect_selection_and_no_scorable_question():
    rows = [("q1", "a", True), ("q1", "c", True), ("q1", "b", False), ("q2", "e", True)]
    q = selection_quality(rows, GOLD)
    assert (q.precision, q.recall, q.f1, q.f1_per_question) == (1.0, 1.0, 1.0, 1.0)
    empty = selection_quality([("q3", "g", True)], GOLD)
    assert empty.questions == 0 and math.isnan(empty.f1)


def test_top_k_selection_picks_the_highest_scores_per_question():
    rows = top_k_selection(
        ["q1", "q1", "q1", "q2", "q2"], ["a", "b", "c", "d", "e"], [0.1, 0.9, 0.5, 0.2, 0.2], 2
    )
    assert rows == [
        ("q1", "a", False),
        ("q1", "b", True),
        ("q1", "c", True),
        ("q2", "d", True),
        ("q2", "e", True),
    ]
