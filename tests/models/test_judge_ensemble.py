import numpy as np
import pytest

from eval.agreement import agreement
from models.judge import LabelTokenScorer, Scores
from models.judge_ensemble import (
    EnsembleScorer,
    GradeCombiner,
    cross_validated_grades,
    describe_selection,
    kappa_gain_se,
    pair_signals,
    query_folds,
    select_signals,
    signal_names,
)
from models.loading import load_causal_lm
from models.prompts import UMBRELA

GRADES = [0, 1, 2, 3]


def _signals(n: int, seed: int = 0):
    """A relevance signal that determines the grade up to noise, and an LLM that knows nothing."""
    rng = np.random.default_rng(seed)
    human = rng.integers(0, 4, n)
    probs = rng.dirichlet(np.ones(4), n).astype(np.float32)
    llm = Scores(probs.argmax(1).astype(np.int8), probs, (probs @ np.arange(4)).astype(np.float32),
                 np.zeros(n, bool), np.zeros(n, np.int32))  # fmt: skip
    sig = {f"llm_logp_{g}": np.log(probs[:, g]) for g in GRADES}
    sig |= {"llm_score": llm.score.astype(float), "dense_cos": human * 0.2 + rng.normal(0, 0.05, n),
            "overlap": rng.random(n), "doc_len": rng.random(n)}  # fmt: skip
    return sig, human, llm


def test_combiner_learns_the_informative_signal_and_beats_the_llm_alone():
    sig, human, llm = _signals(800)
    comb = GradeCombiner.fit(sig, human, GRADES)
    label, probs, score = comb.grade(sig)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(score, probs @ np.arange(4), atol=1e-5)
    assert len(comb.cutpoints) == 3 and comb.cutpoints == sorted(comb.cutpoints)
    qid = np.array([f"q{i % 20}" for i in range(800)])
    stacked = agreement(human, label, score, qid, GRADES, n_boot=0).metrics["cohen_kappa"]
    alone = agreement(human, llm.label, llm.score, qid, GRADES, n_boot=0).metrics["cohen_kappa"]
    assert stacked > 0.8 and abs(alone) < 0.1
    # on fresh pairs too (held-out query folds), not only the pairs it was fit on
    cv_label, cv_score = cross_validated_grades(sig, human, qid, GRADES, ["llm_logp", "dense_cos"], k=4)
    assert agreement(human, cv_label, cv_score, qid, GRADES, n_boot=0).metrics["cohen_kappa"] > 0.8


def test_forward_selection_keeps_the_informative_signal_and_leaves_out_noise():
    sig, human, _ = _signals(600, seed=3)
    qid = np.array([f"q{i % 15}" for i in range(600)])
    chosen, path = select_signals(sig, human, qid, GRADES)
    assert chosen[0] == "dense_cos" and "llm_logp" not in chosen
    assert path[0]["added"] == "dense_cos" and path[0]["cv_kappa"] > 0.8
    assert set(path[0]["tried"]) == {"llm_logp", "llm_score", "dense_cos", "overlap", "doc_len"}


def test_combiner_save_load_roundtrip_and_version(tmp_path):
    sig, human, _ = _signals(200, seed=1)
    comb = GradeCombiner.fit(sig, human, GRADES, use=["llm_score", "dense_cos"])
    assert comb.features == ["llm_score", "dense_cos"] and comb.needs_encoder
    comb.save(tmp_path)
    back = GradeCombiner.load(tmp_path)
    np.testing.assert_allclose(back.predict_proba(sig), comb.predict_proba(sig))
    assert back.version == comb.version and back.version.startswith("stack@")


def test_grade_absent_from_calibration_gets_no_probability_two_grade_case():
    sig, human, _ = _signals(300, seed=2)
    binary = (human >= 2).astype(int) * 2  # grades 0 and 2 only
    comb = GradeCombiner.fit(sig, binary, GRADES, use=["dense_cos"])
    probs = comb.predict_proba(sig)
    assert probs[:, [1, 3]].max() < 1e-6
    assert np.mean((probs[:, 2] > 0.5) == (binary == 2)) > 0.9


def test_bad_signal_names_and_one_grade_are_errors():
    with pytest.raises(ValueError, match="unknown judge signal 'bm42'"):
        signal_names(["bm42"], GRADES)
    sig, human, _ = _signals(50)
    with pytest.raises(ValueError, match="at least two grades"):
        GradeCombiner.fit(sig, np.zeros(50, int), GRADES)
    comb = GradeCombiner.fit(sig, human, GRADES, use=["overlap"])
    with pytest.raises(ValueError, match=r"missing.*overlap"):
        comb.predict_proba({"dense_cos": sig["dense_cos"]})


def test_query_folds_keep_queries_whole():
    q = ["b", "a", "c", "a", "b", "d"]
    f = query_folds(q, 2)
    for qid in set(q):
        assert len({f[i] for i, x in enumerate(q) if x == qid}) == 1
    assert set(f) == {0, 1}


class _BagEncoder:
    """A deterministic stand-in for MiniLM in a unit test: unit bag-of-words vectors over a hashed vocabulary."""

    def encode(self, texts):
        out = np.zeros((len(texts), 64), np.float32)
        for i, t in enumerate(texts):
            for w in (t or "").lower().split():
                out[i, hash(w) % 64] += 1
        n = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(n == 0, 1, n)

    encode_queries = encode_passages = encode


def test_ensemble_scorer_wraps_a_real_tiny_lm(tiny_causal_lm):
    lm = load_causal_lm(str(tiny_causal_lm), dtype="fp32", device="cpu")
    llm = LabelTokenScorer(lm.model, lm.tokenizer, UMBRELA, batch_size=4)
    queries = ["what is the town", "who is the ceo", "what river", "how"] * 6
    texts = ["the town was founded", "a recipe for bread", "the river of the town", ""] * 6
    human = np.array([3, 0, 2, 0] * 6)
    enc = _BagEncoder()
    sig = pair_signals(llm.score(queries, texts), queries, texts, GRADES, enc)
    assert set(sig) == set(signal_names(["llm_logp", "llm_score", "dense_cos", "overlap", "doc_len"], GRADES))
    comb = GradeCombiner.fit(sig, human, GRADES)
    stacked = EnsembleScorer(llm, comb, enc)
    r = stacked.score(queries, texts)
    np.testing.assert_allclose(r.probs, comb.predict_proba(sig), atol=1e-5)
    assert r.label.dtype == np.int8 and len(r) == 24
    assert stacked.prompt_version == f"{llm.prompt_version}+{comb.version}"
    assert len(stacked.score([], [])) == 0
    with pytest.raises(ValueError, match="encoder"):
        EnsembleScorer(llm, comb, None)


def test_stack_without_llm_signals_skips_the_llm_forward_pass(tiny_causal_lm):
    lm = load_causal_lm(str(tiny_causal_lm), dtype="fp32", device="cpu")
    llm = LabelTokenScorer(lm.model, lm.tokenizer, UMBRELA, batch_size=4)
    queries, texts = (
        ["what is the town", "who", "the river"] * 4,
        ["the town was founded", "", "x " * 400] * 4,
    )
    enc = _BagEncoder()
    sig = pair_signals(llm.score(queries, texts), queries, texts, GRADES, enc)
    comb = GradeCombiner.fit(sig, np.array([3, 0, 1] * 4), GRADES, use=["dense_cos", "overlap"])
    assert not comb.uses_llm
    expected = llm.score(queries, texts)

    def no_forward(*a, **k):
        raise AssertionError("the LLM ran")

    llm.grade_logits = no_forward
    r = EnsembleScorer(llm, comb, enc).score(queries, texts)
    np.testing.assert_allclose(r.probs, comb.predict_proba(sig), atol=1e-6)
    np.testing.assert_array_equal(r.n_tokens, expected.n_tokens)
    np.testing.assert_array_equal(r.truncated, expected.truncated)


def test_one_standard_error_rule_keeps_out_a_signal_that_fits_few_queries():
    """On 6 calibration queries a noise signal can raise the fold kappa by chance; the SE rule needs the gain to
    stand out from what resampling the queries alone produces, while the informative signal still enters."""
    rng = np.random.default_rng(11)
    n, kept_loose, kept_strict = 240, 0, 0
    for rep in range(6):
        sig, human, _ = _signals(n, seed=100 + rep)
        sig["dense_cos"] = human * 0.2 + rng.normal(0, 0.25, n)  # a weak signal: kappa well below 1
        qid = np.array([f"q{i % 6}" for i in range(n)])
        loose, _ = select_signals(sig, human, qid, GRADES, min_gain=0.0, min_gain_se=0.0)
        strict, path = select_signals(sig, human, qid, GRADES, min_gain=0.0, min_gain_se=1.0)
        assert strict[0] == loose[0] == "dense_cos"
        assert set(strict) <= set(loose)
        kept_loose += len(loose) - 1
        kept_strict += len(strict) - 1
        if len(strict) < len(loose):
            assert path[-1]["stopped"] in SIGNALS_NOISE and path[-1]["gain"] < path[-1]["needed"]
            assert "stopped before" in describe_selection(path)
    assert kept_strict < kept_loose


SIGNALS_NOISE = {"llm_logp", "llm_score", "overlap", "doc_len"}


def test_kappa_gain_se_is_zero_for_identical_labels_and_grows_with_disagreement():
    rng = np.random.default_rng(0)
    human = rng.integers(0, 4, 400)
    qid = np.array([f"q{i % 20}" for i in range(400)])
    assert kappa_gain_se(human, human, human, qid, GRADES) == 0.0
    noisy = np.where(rng.random(400) < 0.5, rng.integers(0, 4, 400), human)
    se = kappa_gain_se(human, human, noisy, qid, GRADES)
    assert 0.01 < se < 0.2
    assert np.isnan(kappa_gain_se(human, human, noisy, np.array(["q"] * 400), GRADES))


def test_cross_validation_survives_a_fold_whose_other_queries_hold_one_grade():
    sig, human, _ = _signals(40, seed=4)
    qid = np.array(["a"] * 20 + ["b"] * 20)
    human = np.r_[np.zeros(20, int), human[20:]]  # query a: grade 0 only
    label, score = cross_validated_grades(sig, human, qid, GRADES, ["dense_cos"], k=2)
    assert (label[20:] == 0).all() and (score[20:] == 0).all()  # fit on a alone: its one grade
    assert len(label) == 40
