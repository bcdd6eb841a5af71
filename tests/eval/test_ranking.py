"""Ranking metrics against hand-computed values, the query rule, and paired comparisons."""

import math

import pytest

from eval.ranking import evaluate_run, paired_compare, short_name

QRELS = {"q1": {"d1": 3, "d2": 1, "d3": 0}, "q2": {"d4": 1, "d5": 0}, "q3": {"d6": 2, "d7": 0}}


def test_metrics_match_hand_computation():
    run = {
        "q1": {"d3": 3.0, "d1": 2.0, "d2": 1.0},
        "q2": {"d4": 1.0, "d5": 0.5},
        "q3": {"d7": 2.0, "d6": 1.0},
    }
    r = evaluate_run(run, QRELS)
    # q1: DCG = 0/log2(2) + 3/log2(3) + 1/log2(4); IDCG = 3/log2(2) + 1/log2(3) (trec_eval's linear gains)
    dcg, idcg = 3 / math.log2(3) + 1 / 2, 3 + 1 / math.log2(3)
    assert r.per_query["nDCG@10"]["q1"] == pytest.approx(dcg / idcg, abs=1e-4)
    assert r.per_query["RR(rel=2)@10"]["q1"] == pytest.approx(0.5)  # d1 (grade 3) at rank 2
    assert r.per_query["R(rel=2)@100"]["q1"] == pytest.approx(1.0)
    # q3: the relevant d6 at rank 2 -> nDCG = (2 / log2(3)) / 2
    assert r.per_query["nDCG@10"]["q3"] == pytest.approx(1 / math.log2(3), abs=1e-4)
    # q2 has no document of grade >= 2: left out of every measure
    assert "q2" not in r.per_query["nDCG@10"] and r.n_queries == 2
    assert r.excluded["queries_without_relevant"] == 1
    assert r.mean["RR(rel=2)@10"] == pytest.approx((0.5 + 0.5) / 2)


def test_min_rel_sets_both_the_scored_queries_and_the_binary_measures():
    run = {
        "q1": {"d2": 3.0, "d1": 2.0, "d3": 1.0},
        "q2": {"d4": 1.0, "d5": 0.5},
        "q3": {"d7": 2.0, "d6": 1.0},
    }
    r = evaluate_run(run, QRELS, min_rel=1)
    assert r.n_queries == 3
    assert [short_name(m) for m in r.mean] == ["ndcg10", "ndcg100", "mrr10", "recall100"]
    rr = r.per_query["RR@10"]  # ir_measures' name for RR(rel=1)@10
    assert rr["q2"] == pytest.approx(1.0)  # q2's grade-1 d4 at rank 1 counts (with rel=2 it would be 0)
    assert rr["q1"] == pytest.approx(1.0)  # d2 (grade 1) first


def test_judged_query_missing_from_run_scores_zero_and_is_counted(caplog):
    r = evaluate_run({"q1": {"d1": 1.0}, "qX": {"d9": 1.0}}, QRELS)
    assert r.per_query["nDCG@10"]["q3"] == 0.0
    assert r.excluded["scored_queries_missing_from_run"] == 1 and r.excluded["run_queries_not_in_qrels"] == 1
    assert "disagree on queries" in caplog.text


def test_paired_compare_sign_and_interval():
    a = {f"q{i}": 0.3 for i in range(20)}
    b = {f"q{i}": 0.3 + (0.1 if i % 2 else 0.05) for i in range(20)}
    c = paired_compare(a, b, "ndcg")
    assert c.diff == pytest.approx(0.075) and c.ci95[0] > 0 and c.p_ttest < 1e-6 and c.n_queries == 20
    same = paired_compare(a, a, "ndcg")
    assert same.diff == 0 and same.p_ttest == 1.0


def test_bootstrap_draws_in_bounded_chunks_with_the_draws_of_one_call(monkeypatch):
    """Resamples come a chunk at a time (100k questions x 2,000 resamples in one array is 1.6 GB of indices),
    and chunking changes no interval: the draws equal one (n_boot, n) call with the same seed."""
    import numpy as np

    from eval import ranking

    v = np.random.default_rng(5).random(300)
    whole = v[np.random.default_rng(3).integers(0, 300, size=(500, 300))].mean(axis=1)
    expect = (np.percentile(whole, 2.5), np.percentile(whole, 97.5))
    monkeypatch.setattr(ranking, "BOOTSTRAP_CHUNK_VALUES", 300 * 7)  # 7 resamples a chunk
    chunks = list(ranking.bootstrap_resamples(300, 500, seed=3))
    assert max(len(c) for c in chunks) == 7 and sum(len(c) for c in chunks) == 500
    assert ranking.bootstrap_ci(v, n_boot=500, seed=3) == pytest.approx(expect)
