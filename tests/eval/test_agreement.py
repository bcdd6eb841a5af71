import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from eval.agreement import agreement, grades_from_cutpoints, plot_calibration, plot_confusion, tune_cutpoints


def test_perfect_agreement():
    h = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    r = agreement(h, h, h.astype(float), np.array(["a"] * 4 + ["b"] * 4), n_boot=50)
    assert r.metrics["cohen_kappa"] == pytest.approx(1.0)
    assert r.metrics["krippendorff_alpha_ordinal"] == pytest.approx(1.0)
    assert r.metrics["kendall_tau_b_per_query_mean"] == pytest.approx(1.0)
    assert r.confusion == [[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 2]]


def test_hand_computed_kappa_and_accuracy():
    # 2x2 in grades {0, 1}: observed agreement 0.6; chance 0.5*0.6 + 0.5*0.4 = 0.5; kappa = (0.6-0.5)/0.5 = 0.2
    h = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    j = np.array([0, 0, 0, 1, 1, 0, 0, 1, 1, 1])
    r = agreement(h, j, j.astype(float), np.array(["q"] * 10), grades=[0, 1], n_boot=0)
    assert r.metrics["cohen_kappa"] == pytest.approx(0.2)
    assert r.metrics["accuracy"] == pytest.approx(0.6)
    assert r.per_grade["1"]["precision"] == pytest.approx(3 / 5)
    assert r.per_grade["0"]["recall"] == pytest.approx(3 / 5)


def test_weighted_kappa_penalises_far_errors_more():
    h = np.array([0, 1, 2, 3] * 5)
    near = np.clip(h + 1, 0, 3)
    far = 3 - h
    q = np.array(["q"] * 20)
    rn = agreement(h, near, near.astype(float), q, n_boot=0)
    rf = agreement(h, far, far.astype(float), q, n_boot=0)
    assert rn.metrics["weighted_kappa_quadratic"] > rf.metrics["weighted_kappa_quadratic"]


def test_bootstrap_ci_brackets_the_point_estimate():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 4, 400)
    j = np.where(rng.random(400) < 0.6, h, rng.integers(0, 4, 400))
    q = np.repeat([f"q{i}" for i in range(40)], 10)
    r = agreement(h, j, j.astype(float), q, n_boot=300)
    lo, hi = r.ci95["cohen_kappa"]
    assert lo < r.metrics["cohen_kappa"] < hi and hi - lo < 0.3


def test_cutpoints_map_and_tuning_does_not_lower_kappa():
    assert grades_from_cutpoints(np.array([0.1, 0.5, 1.49, 2.6]), [0.5, 1.5, 2.5], [0, 1, 2, 3]).tolist() == [
        0,
        1,
        1,
        3,
    ]
    rng = np.random.default_rng(1)
    h = rng.integers(0, 4, 300)
    score = np.clip(0.5 * h + 0.4 + rng.normal(0, 0.3, 300), 0, 3)  # compressed scale: default cuts are poor
    default = cohen_kappa_score(h, grades_from_cutpoints(score, [0.5, 1.5, 2.5], [0, 1, 2, 3]))
    cuts = tune_cutpoints(score, h)
    tuned = cohen_kappa_score(h, grades_from_cutpoints(score, cuts, [0, 1, 2, 3]))
    assert tuned > default + 0.1 and cuts == sorted(cuts)


def test_cutpoints_cut_a_narrow_band_of_scores():
    # a judge trained on the natural grade mix: every expected grade between 0.60 and 0.64, still ordered
    rng = np.random.default_rng(3)
    h = rng.choice(4, 2000, p=[0.55, 0.2, 0.17, 0.08])
    score = 0.6 + 0.01 * h + rng.normal(0, 0.004, 2000)
    cuts = tune_cutpoints(score, h)
    labels = grades_from_cutpoints(score, cuts, [0, 1, 2, 3])
    assert cohen_kappa_score(h, labels) > 0.6
    assert all(0.59 < c < 0.65 for c in cuts) and cuts == sorted(cuts)


def test_cutpoints_of_a_constant_score_give_one_grade():
    cuts = tune_cutpoints(np.full(50, 1.2), np.repeat([0, 1], 25))
    assert len(set(grades_from_cutpoints(np.full(50, 1.2), cuts, [0, 1, 2, 3]))) == 1


def test_plots_are_written(tmp_path):
    rng = np.random.default_rng(2)
    h = rng.integers(0, 4, 200)
    probs = rng.dirichlet(np.ones(4), 200).astype(np.float32)
    score = probs @ np.arange(4)
    r = agreement(h, probs.argmax(1), score, np.repeat(["a", "b"], 100), n_boot=0)
    for p in (
        plot_confusion(r, tmp_path / "c.png"),
        plot_calibration(h, probs, score, [0, 1, 2, 3], tmp_path / "k.png"),
    ):
        assert p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG"


def test_cutpoints_with_gapped_grades_and_unknown_human_grade():
    rng = np.random.default_rng(0)
    human = rng.choice([0, 2, 4], 300)
    score = human + rng.normal(0, 0.3, 300)
    cuts = tune_cutpoints(score, human, [0, 2, 4])
    assert 0 < cuts[0] < 2 < cuts[1] < 4
    assert tune_cutpoints([], [], [0, 2, 4]) == [1.0, 3.0]
    with pytest.raises(ValueError, match=r"human grades \[5\] are not among grades"):
        tune_cutpoints(score, np.r_[human[:-1], 5], [0, 2, 4])


def test_agreement_rejects_empty_and_nan_grades():
    with pytest.raises(ValueError, match="no pairs"):
        agreement(np.array([]), np.array([]), np.array([]), np.array([]))
    with pytest.raises(ValueError, match="human: grades must be finite"):
        agreement(np.array([0.0, np.nan]), np.array([0, 1]), np.array([0.0, 1.0]), np.array(["q", "q"]))
