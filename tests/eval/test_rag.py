"""RAG answer metrics against the official scripts' outputs, answer / supporting recall, and bootstrap summaries."""

import json

import pytest

from eval.rag import (
    answer_in_context,
    exact_match,
    has_gold_answer,
    normalize_answer,
    paired_difference,
    summarize,
    supporting_recall,
    token_f1,
)

# (prediction, gold aliases, official normalised prediction, official EM, official F1).
# Recorded by running the official functions on these inputs, not re-implemented here, so a shared mistake in a
# second copy cannot hide: normalize_answer / exact_match_score / metric_max_over_ground_truths of the SQuAD v1.1
# evaluate-v1.1.py (https://rajpurkar.github.io/SQuAD-explorer/, as in github.com/seominjoon/denspi @ 51915f65)
# and f1_score of github.com/hotpotqa/hotpot hotpot_evaluate_v1.py @ 4c0fa5ea, its first value, taking the max
# over aliases the SQuAD way. Re-running those scripts on a new case gives the row to add.
OFFICIAL_CASES = [
    ("The Eiffel Tower", ["Eiffel Tower"], "eiffel tower", 1.0, 1.0),
    ("an apple a day", ["apple day"], "apple day", 1.0, 1.0),
    ("Paris.", ["paris"], "paris", 1.0, 1.0),
    ("  New   York\tCity\n", ["new york city"], "new york city", 1.0, 1.0),
    ("U.S.A.", ["USA"], "usa", 1.0, 1.0),
    ("A.B. de Villiers", ["AB de Villiers"], "ab de villiers", 1.0, 1.0),
    ("Café Müller", ["café müller"], "café müller", 1.0, 1.0),
    ("ÉCOLE", ["école"], "école", 1.0, 1.0),
    # str.lower() turns the dotted capital I into i + a combining dot: no match, officially
    ("İstanbul", ["istanbul"], "i\u0307stanbul", 0.0, 0.0),
    # only ASCII punctuation is removed: curly quotes and the dash stay, as tokens
    ("\u201cHello\u201d \u2014 world", ["hello world"], "\u201chello\u201d \u2014 world", 0.0, 0.4),
    ("Super\u00a0Bowl", ["super bowl"], "super bowl", 1.0, 1.0),
    ("\u3000東京\u3000", ["東京"], "東京", 1.0, 1.0),
    ("thé party", ["Thé Party"], "thé party", 1.0, 1.0),
    ("Theatre", ["the atre"], "theatre", 0.0, 0.0),
    ("don't", ["dont"], "dont", 1.0, 1.0),
    ("rock-and-roll", ["rock and roll"], "rockandroll", 0.0, 0.0),
    ("yes", ["Yes."], "yes", 1.0, 1.0),
    ("No", ["no"], "no", 1.0, 1.0),
    ("yes", ["no"], "yes", 0.0, 0.0),
    ("yes it is", ["yes"], "yes it is", 0.0, 0.0),  # HotpotQA's rule; SQuAD's F1 would give 0.5
    ("no answer", ["noanswer"], "no answer", 0.0, 0.0),
    ("noanswer", ["No answer"], "noanswer", 0.0, 0.0),
    ("yes", ["yes", "Yes, it is"], "yes", 1.0, 1.0),
    ("Barack Obama", ["Obama", "Barack Hussein Obama"], "barack obama", 0.0, 0.8),
    ("Paris", ["London", "paris, france", "Paris"], "paris", 1.0, 1.0),
    ("The Beatles", ["Beatles", "The Beatles"], "beatles", 1.0, 1.0),
    ("paris", ["The", "Paris"], "paris", 1.0, 1.0),
    ("the cat the cat", ["cat cat cat"], "cat cat", 0.0, 0.8),
    ("Mount Everest (8,848 m)", ["Mount Everest"], "mount everest 8848 m", 0.0, 0.6666666666666666),
    ("", ["Paris"], "", 0.0, 0.0),
    ("   ", ["Paris"], "", 0.0, 0.0),
    ("1,000", ["1000"], "1000", 1.0, 1.0),
    ("3.14", ["314"], "314", 1.0, 1.0),
    ("1990s", ["1990"], "1990s", 0.0, 0.0),
    ("in 1990", ["1990", "the year 1990"], "in 1990", 0.0, 0.6666666666666666),
    ("Ⅻ", ["xii"], "ⅻ", 0.0, 0.0),
]


@pytest.mark.parametrize(("prediction", "golds", "normalized", "em", "f1"), OFFICIAL_CASES)
def test_agrees_with_the_official_scripts(prediction, golds, normalized, em, f1):
    assert normalize_answer(prediction) == normalized
    assert exact_match(prediction, golds) == em
    assert token_f1(prediction, golds) == pytest.approx(f1, abs=1e-12)


def test_hand_computed_values():
    # 2 of 3 predicted tokens in a 4-token gold: P = 2/3, R = 1/2, F1 = 2PR / (P + R) = 4/7
    assert token_f1("Abraham Lincoln memorial", ["President Abraham Lincoln, Jr."]) == pytest.approx(4 / 7)
    assert exact_match("the  Lincoln!", ["Lincoln"]) == 1.0
    assert normalize_answer("An  Example, of THE text.") == "example of text"
    assert token_f1("No", ["no", "Norway"]) == 1.0


def test_empty_prediction_and_missing_gold():
    assert exact_match("", ["Paris"]) == 0.0 and token_f1("", ["Paris"]) == 0.0
    assert exact_match(None, ["Paris"]) == 0.0
    # the official EM would score "a" against "The" as 1 (both normalise to ""): here such aliases do not exist
    assert exact_match("a", ["The", "Paris"]) == 0.0
    for golds in ([], [""], ["The", "!"], [None]):
        assert not has_gold_answer(golds)
        assert exact_match("Paris", golds) is None and token_f1("Paris", golds) is None
        assert answer_in_context(golds, ["Paris is a city"]) is None
    assert has_gold_answer(["", "Paris"])


def test_one_string_instead_of_a_list_is_refused():
    with pytest.raises(TypeError, match="golds"):
        exact_match("Paris", "Paris")
    with pytest.raises(TypeError, match="passages"):
        answer_in_context(["Paris"], "Paris is a city")
    with pytest.raises(TypeError, match="supporting"):
        supporting_recall(["d1"], "d1")


def test_answer_in_context_whole_tokens_aliases_and_normalisation():
    passages = ["He threw a party in the village.", "The ARTIST, Jean-Luc, lived in Nice."]
    assert not answer_in_context(["art"], passages)  # inside "party" and "artist": not a token
    assert answer_in_context(["party"], passages)
    assert answer_in_context(["Jean-Luc"], passages)  # both sides normalise to "jeanluc"
    assert answer_in_context(["the artist"], passages)  # articles and case go on both sides
    assert answer_in_context(["village", "Nice!"], passages[1:])  # the second alias matches
    assert not answer_in_context(["lived Nice"], passages)  # tokens must be contiguous
    assert not answer_in_context(["", "Lyon"], passages)
    assert answer_in_context(["", "Nice"], passages)  # an empty alias is ignored, not matched everywhere
    assert not answer_in_context(["Paris"], [])
    assert answer_in_context(["throw a party"], ["Let's throw   the party."])


def test_supporting_recall():
    assert supporting_recall(["d1", "d2", "d3"], {"d2", "d9"}) == 0.5
    assert supporting_recall(["d2", "d2", "d9"], ["d2", "d9"]) == 1.0  # a repeated docid counts once
    assert supporting_recall([], {"d1"}) == 0.0
    assert supporting_recall(["d1"], set()) is None


def test_summarize_means_cis_counts_and_skipped_rows():
    rows = [
        {"em": i % 2 == 0, "f1": (i % 5) / 4, "answer_in_context": True, "supporting_recall": None}
        for i in range(40)
    ]
    rows.append(
        {"em": None, "f1": float("nan"), "answer_in_context": False}
    )  # no gold answer, no gold passages
    s = summarize(rows, bootstrap=500, seed=3)
    assert set(s) == {"em", "f1", "answer_in_context", "supporting_recall"}
    assert s["em"]["n"] == 40 and s["em"]["mean"] == pytest.approx(0.5)
    assert s["f1"]["n"] == 40 and s["f1"]["mean"] == pytest.approx(0.5)
    for m in ("em", "f1"):
        assert s[m]["ci_low"] < s[m]["mean"] < s[m]["ci_high"] and s[m]["ci_high"] - s[m]["ci_low"] < 0.5
    assert s["answer_in_context"]["n"] == 41 and s["answer_in_context"]["mean"] == pytest.approx(40 / 41)
    assert s["supporting_recall"] == {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    json.dumps(s, allow_nan=False)  # metrics.json stays strict JSON when a metric has no row
    assert summarize(rows, bootstrap=500, seed=3) == s
    assert summarize(rows, bootstrap=500, seed=4)["f1"]["ci_low"] != s["f1"]["ci_low"]
    assert set(summarize(rows, metrics=["f1"], bootstrap=10)) == {"f1"}


def test_summarize_refuses_a_non_number():
    with pytest.raises(ValueError, match="row 1: 'em'"):
        summarize([{"em": 1.0}, {"em": "yes"}], metrics=["em"])


def test_paired_difference():
    a = [0.6 + 0.1 * (i % 3) for i in range(30)]
    b = [x - 0.2 + 0.1 * (i % 2) for i, x in enumerate(a)]  # a beats b by 0.1 or 0.2 on every question
    win = paired_difference(a, b, bootstrap=500, seed=1)
    assert win["n"] == 30 and win["mean"] == pytest.approx(0.15)
    assert 0 < win["ci_low"] < win["mean"] < win["ci_high"] and win["p"] == 0.0
    assert win["mean_a"] - win["mean_b"] == pytest.approx(win["mean"])
    assert win["ratio"] == pytest.approx(win["mean_a"] / win["mean_b"])
    assert 1 < win["ratio_ci_low"] < win["ratio"] < win["ratio_ci_high"]
    lose = paired_difference(b, a, bootstrap=500, seed=1)
    assert lose["ci_high"] < 0 and lose["p"] == 1.0
    tie = paired_difference(a, a)
    assert tie["mean"] == 0 and tie["p"] == 1.0
    # a question one system could not be scored on is left out of the pair, not counted as 0
    part = paired_difference([1.0, None, 0.5], [0.0, 0.3, float("nan")], bootstrap=50)
    assert part["n"] == 1 and part["mean"] == 1.0
    assert paired_difference([None], [1.0])["n"] == 0 and paired_difference([None], [1.0])["mean"] is None
    # b never scores: no ratio (not inf), the difference still stands
    zero = paired_difference([1.0, 0.0, 1.0], [0.0, 0.0, 0.0], bootstrap=50)
    assert zero["ratio"] is None and zero["ratio_ci_low"] is None and zero["mean"] == pytest.approx(2 / 3)
    # b scores on one question in 20: most resamples still have mean(b) > 0, but not 97.5% of them
    rare = paired_difference([1.0] * 20, [1.0] + [0.0] * 19, bootstrap=500)
    assert rare["ratio"] == 20.0 and rare["ratio_ci_low"] is None
    assert paired_difference(a, b, bootstrap=500, seed=1) == win
    with pytest.raises(ValueError, match="same questions"):
        paired_difference([1.0], [1.0, 0.0])


def test_answer_recall_leaves_out_label_answers():
    # "no" in a passage is no evidence that the passage answers a yes/no question
    assert answer_in_context(["no"], ["there is no such river"]) is None
    assert answer_in_context(["Yes"], ["yes"]) is None
    assert answer_in_context(["yes", "Lake Tahoe"], ["near lake tahoe"]) is True
