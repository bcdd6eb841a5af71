import json
import re

import numpy as np
import pytest

from eval.agreement import _kappa
from eval.judge_diff import _confusion, _kappa_cm, _weights, align, audit_entry, diff_judges, render_html


def _pairs(n_queries: int = 6, per_query: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    qid = np.repeat([f"q{i}" for i in range(n_queries)], per_query)
    docid = np.array([f"d{i}" for i in range(len(qid))])
    label = rng.integers(0, 4, len(qid))
    score = label + rng.uniform(-0.4, 0.4, len(qid))
    return qid, docid, label, score


def test_identical_judges_agree_fully():
    qid, docid, label, score = _pairs()
    d = diff_judges(qid, docid, label, score, label, score, n_boot=50)
    assert d["agreement"]["cohen_kappa"] == pytest.approx(1.0)
    assert d["agreement"]["weighted_kappa_quadratic"] == pytest.approx(1.0)
    assert d["agreement"]["changed"] == 0 and d["changed"] == {"pairs": 0, "up": 0, "down": 0}
    assert d["ci95"]["cohen_kappa"] == pytest.approx([1.0, 1.0])
    assert np.trace(np.asarray(d["transitions"])) == len(qid)
    assert all(v["shift"] == 0 for v in d["distribution"].values())
    assert all(r["score_shift"] == 0 for r in d["top_moved"])


def test_a_judge_one_grade_up_everywhere():
    qid, docid, label, score = _pairs()
    label = np.minimum(label, 2)  # room to move up
    score = np.minimum(score, 2.4)
    up, up_score = label + 1, score + 1.0
    # one pair moves further than the rest: it must head the most-moved list
    up_score[5] += 0.5
    d = diff_judges(qid, docid, label, score, up, up_score, top=3, n_boot=30)
    n = len(qid)
    t = np.asarray(d["transitions"])
    for g in range(3):
        assert t[g, g + 1] == np.sum(label == g) and t[g].sum() == t[g, g + 1]
    assert t[3].sum() == 0
    assert d["changed"] == {"pairs": n, "up": n, "down": 0} and d["agreement"]["changed"] == 1.0
    assert d["agreement"]["mean_label_shift"] == pytest.approx(1.0)
    assert d["distribution"]["0"]["b"] == 0 and d["distribution"]["3"]["a"] == 0
    assert d["distribution"]["3"]["shift"] == pytest.approx(np.mean(label == 2))
    assert d["distribution"]["0"]["shift"] == pytest.approx(-np.mean(label == 0))
    assert sum(v["shift"] for v in d["distribution"].values()) == pytest.approx(0.0, abs=1e-9)
    top = d["top_moved"]
    assert len(top) == 3 and top[0]["docid"] == "d5" and top[0]["score_shift"] == pytest.approx(1.5)
    # the rest tie on |shift| 1 and on |label change| 1: ordered by ids
    assert [r["docid"] for r in top[1:]] == ["d0", "d1"]
    assert d["agreement"]["cohen_kappa"] < 0.5


def test_top_moved_breaks_score_ties_by_label_change():
    qid = ["q1"] * 3
    docid = ["x", "y", "z"]
    d = diff_judges(qid, docid, [0, 0, 1], [1.0, 1.0, 1.0], [0, 2, 1], [2.0, 2.0, 1.2], n_boot=0)
    assert [r["docid"] for r in d["top_moved"]] == ["y", "x", "z"]
    assert d["ci95"] == {}


def test_per_query_figures_sorted_by_shift():
    qid = ["q1"] * 2 + ["q2"] * 3 + ["q3"]
    docid = list("abcdef")
    la = [0, 1, 2, 2, 3, 1]
    sa = [0.0, 1.0, 2.0, 2.0, 3.0, 1.0]
    lb = [0, 1, 0, 1, 3, 2]
    sb = [0.2, 1.0, 0.5, 1.0, 3.0, 1.5]
    d = diff_judges(qid, docid, la, sa, lb, sb, query=["Q1", "Q1", "Q2", "Q2", "Q2", "Q3"], n_boot=0)
    rows = {r["qid"]: r for r in d["per_query"]}
    assert [r["qid"] for r in d["per_query"]] == ["q2", "q3", "q1"]
    assert rows["q2"] == {"qid": "q2", "query": "Q2", "pairs": 3, "changed": 2, "up": 0, "down": 2,
                          "mean_score_shift": pytest.approx(-2.5 / 3), "mean_label_shift": pytest.approx(-1.0)}  # fmt: skip
    assert rows["q1"]["changed"] == 0 and rows["q1"]["mean_score_shift"] == pytest.approx(0.1)
    assert rows["q3"]["up"] == 1


def test_bootstrap_kappa_matches_sklearn():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    for weighting in (None, "quadratic"):
        cm = _confusion(a, b, 4)
        assert _kappa_cm(cm, _weights(4, weighting)) == pytest.approx(_kappa(a, b, [0, 1, 2, 3], weighting))


def test_human_paired_difference_names_the_better_judge():
    qid, docid, human, _ = _pairs(n_queries=12, per_query=10, seed=1)
    rng = np.random.default_rng(2)
    good = human.copy()
    flip = rng.random(len(human)) < 0.1
    good[flip] = rng.integers(0, 4, flip.sum())
    bad = human.copy()
    flip = rng.random(len(human)) < 0.7
    bad[flip] = rng.integers(0, 4, flip.sum())
    # a pair without a human grade counts for A vs B but not for the human comparison
    h = human.astype(object)
    h[0] = None
    d = diff_judges(qid, docid, bad, bad.astype(float), good, good.astype(float), human=h, n_boot=200)
    k = d["human"]["cohen_kappa"]
    assert d["human"]["pairs"] == len(qid) - 1 and d["pairs"] == len(qid)
    assert k["b"] > k["a"] and k["diff"] == pytest.approx(k["b"] - k["a"])
    assert k["diff_ci95"][0] > 0 and k["verdict"].startswith("B agrees better")
    assert k["a_ci95"][0] <= k["a"] <= k["a_ci95"][1]
    swapped = diff_judges(qid, docid, good, good.astype(float), bad, bad.astype(float), human=h, n_boot=200)
    assert swapped["human"]["cohen_kappa"]["verdict"].startswith("A agrees better")
    none = diff_judges(qid, docid, good, good, bad, bad, human=[None] * len(qid), n_boot=0)
    assert none["human"] is None


def test_align_keeps_pairs_both_judged_and_counts_the_rest():
    a = [("q1", "d1"), ("q1", "d2"), ("q2", "d1"), ("q1", "d1")]
    b = [("q2", "d1"), ("q1", "d1"), ("q3", "d9"), ("q2", "d1")]
    ia, ib, dropped = align(a, b)
    assert ia.tolist() == [0, 2] and ib.tolist() == [1, 0]
    assert dropped == {"only_in_a": 1, "only_in_b": 1, "duplicates_in_a": 1, "duplicates_in_b": 1}


def test_errors_name_the_bad_input():
    with pytest.raises(ValueError, match="label_b: grades \\[7\\]"):
        diff_judges(["q"], ["d"], [1], [1.0], [7], [1.0], n_boot=0)
    with pytest.raises(ValueError, match="no pairs"):
        diff_judges([], [], [], [], [], [], n_boot=0)
    with pytest.raises(ValueError, match="same length"):
        diff_judges(["q"], ["d"], [1], [1.0], [1, 2], [1.0], n_boot=0)


def test_html_page_and_audit_entry():
    qid, docid, label, score = _pairs()
    up = np.minimum(label + 1, 3)
    d = diff_judges(qid, docid, label, score, up, up + 0.1, human=label, n_boot=20, top=4,
                    query=[f"query <{q}>" for q in qid], text=["passage & text"] * len(qid),
                    dropped={"only_in_a": 2})  # fmt: skip
    json.dumps(d)  # the result is JSON as it is
    page = render_html(d, "judge-v1", "judge-v2")
    assert page.startswith("<!doctype html>") and "<script" not in page and "src=" not in page
    assert "query &lt;q0&gt;" in page and "passage &amp; text" in page and "only in a 2" in page
    assert page.count('class="heat"') == 16 and "Against the human grades" in page
    assert "they are rough" in page  # six queries
    assert len(re.findall(r'class="bar a"', page)) == 4
    entry = audit_entry(d, "runs/judge-v1", "2026-12-03T16:00:00+0000")
    assert entry["against"] == "runs/judge-v1" and entry["pairs"] == len(qid)
    assert (
        entry["kappa_ab"] == d["agreement"]["cohen_kappa"] and entry["changed"] == d["agreement"]["changed"]
    )
    assert set(entry["label_shift"]) == {"0", "1", "2", "3"} and entry["human_kappa"]["diff"] < 0


def test_report_shows_the_cards_audit(tmp_path):
    from eval.report import judge_section, render

    card = {"base_model": "tiny", "prompt_version": "umbrela-v1", "training": {}, "data": {}, "metrics": {}}
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "judge_card.json").write_text(json.dumps(card))
    assert "Judge audit" not in judge_section(tmp_path)  # a card written before audits
    qid, docid, label, score = _pairs()
    d = diff_judges(qid, docid, label, score, np.minimum(label + 1, 3), score + 1, human=label, n_boot=20)
    card["audit"] = {
        "diffs": [audit_entry(d, "runs/judge-v1", "2026-12-03T16:00:00+0000")],
        "manipulation": {"label_rise": 0.031, "label_rise_undefended": 0.42, "clean_kappa": 0.5,
                         "templates": {"claim": {"label_rise": 0.02, "score_shift": 0.1}, "fake-note": {"label_rise": 0.05}}},
    }  # fmt: skip
    (tmp_path / "judge" / "judge_card.json").write_text(json.dumps(card))
    section = judge_section(tmp_path)
    assert "Judge audit" in section and "runs/judge-v1" in section and "2026-12-03T16:00:00+0000" in section
    assert f"{d['agreement']['changed']:.1%}" in section
    assert "label_rise_undefended" in section and "0.4200" in section and "fake-note" in section
    assert "score_shift" in section
    assert "Judge audit" in render(tmp_path)
