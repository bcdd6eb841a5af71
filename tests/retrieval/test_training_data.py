import pyarrow as pa
import pytest

from retrieval.training_data import (
    REJECT_EMPTY,
    REJECT_MISSING,
    LabelsError,
    TrainingGroup,
    batch_inputs,
    build_groups,
    curriculum_stages,
    graded_relevant,
    mix_positives,
    positives_from_labels,
    sample_queries,
)


def _labels(rows, **extra):
    cols = {"qid": [r[0] for r in rows], "docid": [r[1] for r in rows]}
    cols.update(extra)
    return pa.table(cols)


def test_human_positives_at_or_above_min_grade_best_first():
    rows = [("q1", "a"), ("q1", "b"), ("q1", "c"), ("q2", "d"), ("q2", "e"), ("q3", "f")]
    table = _labels(rows, label=pa.array([2, 3, 1, 0, None, 1], pa.int8()))
    assert positives_from_labels(table, "human") == {"q1": ["b", "a"]}
    assert positives_from_labels(table, "human", min_grade=1) == {"q1": ["b", "a", "c"], "q3": ["f"]}


def _judgments():
    # q1: 10 judged pairs with expected grades 0.0 .. 2.7; q2: 3 pairs, none graded >= 2
    rows = [("q1", f"d{i}") for i in range(10)] + [("q2", "x"), ("q2", "y"), ("q2", "z")]
    score = [0.3 * i for i in range(10)] + [0.4, 1.2, 0.9]
    label = [round(s) for s in score]
    return _labels(rows, label=pa.array(label, pa.int8()), score=pa.array(score, pa.float32()))


def test_judge_positives_by_threshold():
    table = _judgments()
    # labels of q1: d0..d9 -> 0 0 1 1 1 2 2 2 2 3; best first by score
    assert positives_from_labels(table, "judge") == {"q1": ["d9", "d8", "d7", "d6", "d5"]}
    assert positives_from_labels(table, "judge", threshold=3) == {"q1": ["d9"]}
    assert positives_from_labels(table, "judge", threshold=1)["q2"] == ["y", "z"]


def test_judge_positives_by_top_fraction_keep_at_least_one_per_query():
    table = _judgments()
    top = positives_from_labels(table, "judge", top_fraction=0.3)
    assert top == {"q1": ["d9", "d8", "d7"], "q2": ["y"]}  # floor(0.3 * 3) = 0 -> at least 1
    assert positives_from_labels(table, "judge", top_fraction=0.1) == {"q1": ["d9"], "q2": ["y"]}
    with pytest.raises(ValueError, match="not both"):
        positives_from_labels(table, "judge", threshold=2, top_fraction=0.1)
    with pytest.raises(ValueError, match="top_fraction"):
        positives_from_labels(table, "judge", top_fraction=0.0)


def test_utility_positives_from_selected_or_label():
    rows = [("q1", "a"), ("q1", "b"), ("q1", "c"), ("q2", "d")]
    selected = _labels(rows, selected=[True, False, True, None], rank=pa.array([3, 1, 2, None], pa.int32()))
    assert positives_from_labels(selected, "utility") == {"q1": ["c", "a"]}  # ordered by rank
    graded = _labels(rows, label=pa.array([2, 3, 0, 2], pa.int8()))
    assert positives_from_labels(graded, "utility") == {"q1": ["b", "a"], "q2": ["d"]}


def test_missing_columns_are_named_with_the_table():
    with pytest.raises(LabelsError, match=r"human labels table 'qrels/train' lacks column\(s\) \['label'\]"):
        positives_from_labels(_labels([("q", "d")]), "human", table_name="qrels/train")
    with pytest.raises(LabelsError, match=r"\['score'\]"):
        positives_from_labels(_labels([("q", "d")], label=[2]), "judge", top_fraction=0.1)
    with pytest.raises(LabelsError, match=r"selected \(or label\)"):
        positives_from_labels(_labels([("q", "d")], rank=[1]), "utility")
    with pytest.raises(LabelsError, match=r"\['docid', 'label'\]"):
        positives_from_labels(pa.table({"qid": ["q"]}), "human")
    with pytest.raises(LabelsError, match="'qid' holds null"):
        positives_from_labels(pa.table({"qid": [None], "docid": ["d"], "label": [2]}), "human")
    assert issubclass(LabelsError, ValueError)


def test_graded_relevant_takes_every_grade_above_zero():
    table = _labels([("q1", "a"), ("q1", "b"), ("q2", "c")], label=pa.array([1, 0, 3], pa.int8()))
    assert graded_relevant(table) == {"q1": {"a"}, "q2": {"c"}}


def test_sample_queries_fraction_at_least_one_and_deterministic():
    qids = [f"q{i:02d}" for i in range(50)]
    twenty = sample_queries(qids, 0.2, seed=1)
    assert len(twenty) == 10 and twenty <= set(qids)
    assert sample_queries(reversed(qids), 0.2, seed=1) == twenty
    assert sample_queries(qids, 0.2, seed=2) != twenty
    assert len(sample_queries(qids, 0.001, seed=1)) == 1
    assert sample_queries(qids, 0.0, seed=1) == set()
    assert sample_queries(qids, 1.0, seed=1) == set(qids)


def test_mix_takes_human_positives_for_a_seeded_fraction():
    human = {f"q{i}": [f"h{i}"] for i in range(10)}
    llm = {f"q{i}": [f"l{i}", f"m{i}"] for i in range(12)}
    mixed, chosen = mix_positives(human, llm, 0.3, seed=5)
    assert len(chosen) == 3 and chosen <= set(human)
    assert mixed == {q: (human[q] if q in chosen else llm[q]) for q in llm}
    assert mix_positives(human, llm, 0.3, seed=5) == (mixed, chosen)
    assert mix_positives(human, llm, 0.3, seed=6)[1] != chosen
    assert mix_positives(human, llm, 0.0, seed=5) == ({q: llm[q] for q in sorted(llm)}, set())


def test_curriculum_llm_first_then_human_for_a_fraction():
    human = {f"q{i}": [f"h{i}"] for i in range(10)}
    llm = {f"q{i}": [f"l{i}"] for i in range(10)}
    first, second = curriculum_stages(llm, human, 0.2, seed=0)
    assert (first.name, second.name) == ("llm", "human")
    assert first.positives == llm
    assert len(second.positives) == 2 and all(second.positives[q] == human[q] for q in second.positives)
    assert set(second.positives) == mix_positives(human, llm, 0.2, seed=0)[1]


CORPUS = {f"d{i}": f"passage {i}" for i in range(40)} | {"empty": "  "}


def _doc_text(docids):
    return [CORPUS.get(d) for d in docids]


def _set(**kw):
    queries = {"q1": "first", "q2": "second", "q3": "third", "q4": "fourth"}
    positives = {"q1": ["d0", "gone", "empty", "d1"], "q2": ["d10"], "q3": [], "q9": ["d5"]}
    candidates = {
        "q1": ["d1", "d2", "d3", "d4", "d5", "d6", "d7", "d8", "gone", "d0"],
        "q2": [
            "d10",
            "d11",
            "d12",
            "d13",
            "d14",
            "d15",
            "d16",
            "d17",
            "d18",
            "d19",
            "d20",
            "nowhere",
            "empty",
        ],
    }
    args = {"group_size": 6, "max_positives": 4, "seed": 3} | kw
    return build_groups(queries, positives, candidates, _doc_text, **args)


def test_skips_rejects_and_counts_in_the_manifest():
    groups = _set()
    m = groups.manifest
    assert sorted(groups.queries) == ["q1", "q2"]
    assert m["queries_in"] == 4 and m["queries_used"] == 2
    assert m["queries_skipped_no_positive"] == {"count": 2, "examples": ["q3", "q4"]}
    assert m["positives_of_unknown_queries"] == {"count": 1, "examples": ["q9"]}
    assert m["positives_rejected"]["reasons"] == {REJECT_MISSING: 1, REJECT_EMPTY: 1}
    assert ["q1", "gone", REJECT_MISSING] in m["positives_rejected"]["examples"]
    assert groups.positives["q1"] == ("d0", "d1")
    # "gone" and "empty" are known positives of q1, so never its negatives; for q2 they are rejected candidates
    assert m["negatives_rejected"] == {"count": 2, "reasons": {REJECT_MISSING: 1, REJECT_EMPTY: 1}}
    assert "nowhere" not in groups.pools["q2"] and "empty" not in groups.pools["q2"]


def test_positives_and_excluded_passages_are_never_negatives():
    groups = _set(exclude={"q1": {"d2", "d3"}, "q2": {"d11"}})
    for epoch in range(20):
        for g in groups.epoch(epoch):
            known = {"q1": {"d0", "gone", "empty", "d1", "d2", "d3"}, "q2": {"d10", "d11"}}[g.qid]
            assert not known & set(g.negatives)
            assert len(set(g.negatives)) == len(g.negatives)
    # q1's pool is d4..d8: 5 for 4 slots; q2's pool d12..d20
    assert set(groups.pools["q1"]) == {"d4", "d5", "d6", "d7", "d8"}


def test_group_size_fixed_and_max_positives_honoured():
    groups = _set(max_positives=1)
    for g in groups.epoch(0):
        assert len(g.docids) == 6 and len(g.positives) == 1
        assert g.positive_mask == (True, False, False, False, False, False)
    assert groups.epoch(0)[0].positives in {("d0",), ("d10",)}
    assert groups.manifest["queries_over_max_positives"] == 1
    queries, docids, mask = batch_inputs(groups.epoch(0))
    assert len(queries) == 2 and len(docids) == 12 and [len(r) for r in mask] == [6, 6]
    with pytest.raises(ValueError, match="max_positives"):
        _set(max_positives=6)


def test_short_pool_is_filled_with_other_queries_passages_and_counted():
    # q1: 2 positives, so 7 negatives to find in a pool of 7 (d2..d8); without d2..d4 it is 3 short
    assert _set(group_size=9).manifest["queries_short_of_negatives"]["count"] == 0
    groups = _set(group_size=9, exclude={"q1": {"d2", "d3", "d4"}})
    short = groups.manifest["queries_short_of_negatives"]
    assert short["count"] == 1 and short["examples"] == ["q1"] and short["slots_filled_per_epoch"] == 3
    assert short["queries_repeating_negatives"] == 0
    for epoch in range(5):
        (g1,) = [g for g in groups.epoch(epoch) if g.qid == "q1"]
        assert len(g1.docids) == 9 and len(set(g1.docids)) == 9
        assert {"d5", "d6", "d7", "d8"} <= set(g1.negatives)
        assert not {"d0", "d1", "d2", "d3", "d4", "gone", "empty"} & set(g1.negatives)
        assert set(g1.negatives) - {"d5", "d6", "d7", "d8"} <= set(groups.pools["q2"])


def test_a_query_with_no_possible_negative_is_skipped_and_counted():
    groups = build_groups(
        {"q": "text"}, {"q": ["d0"]}, {"q": ["d0"]}, _doc_text, group_size=4, max_positives=1
    )
    assert len(groups) == 0 and groups.manifest["queries_skipped_no_negative"]["examples"] == ["q"]


def test_seeded_epochs_repeat_and_differ():
    queries = {f"q{i:02d}": f"query {i}" for i in range(20)}
    positives = {q: [f"d{i}"] for i, q in enumerate(queries)}

    def candidates(qids):
        return [[f"d{(int(q[1:]) + j) % 40}" for j in range(1, 16)] for q in qids]

    a = build_groups(queries, positives, candidates, _doc_text, group_size=5, max_positives=1, seed=7)
    b = build_groups(
        dict(reversed(queries.items())),
        positives,
        candidates,
        _doc_text,
        group_size=5,
        max_positives=1,
        seed=7,
    )
    assert a.epoch(0) == b.epoch(0) and a.fingerprint() == b.fingerprint()
    assert [g.qid for g in a.epoch(0)] == a.epoch_order(0)
    assert a.epoch_order(0) != a.epoch_order(1)
    assert [g.negatives for g in sorted(a.epoch(0), key=lambda g: g.qid)] != [
        g.negatives for g in sorted(a.epoch(1), key=lambda g: g.qid)
    ]
    other = build_groups(queries, positives, candidates, _doc_text, group_size=5, max_positives=1, seed=8)
    assert other.epoch_order(0) != a.epoch_order(0) and other.fingerprint() != a.fingerprint()


def test_candidates_callable_gets_the_used_qids():
    seen = []

    def candidates(qids):
        seen.append(list(qids))
        return [[f"d{j}" for j in range(20, 30)] for _ in qids]

    groups = build_groups({"a": "x", "b": "y", "c": "z"}, {"a": ["d1"], "c": ["d2"]}, candidates, _doc_text,
                          group_size=4, max_positives=2)  # fmt: skip
    assert seen == [["a", "c"]] and sorted(groups.queries) == ["a", "c"]
    with pytest.raises(ValueError, match="1 lists for 2 queries"):
        build_groups({"a": "x", "c": "z"}, {"a": ["d1"], "c": ["d2"]}, lambda q: [["d3"]], _doc_text)


def test_training_group_mask_matches_docids():
    g = TrainingGroup("q", "text", ("a", "b"), ("c",))
    assert g.docids == ("a", "b", "c") and g.positive_mask == (True, True, False)
