import pyarrow as pa
import pytest

from pipelines import tables as T


def _pairs(**over):
    cols = {
        "qid": ["q1", "q1", "q2"],
        "docid": ["d1", "d2", "d1"],
        "query": ["what is x", "what is x", "who is y"],
        "text": ["x is a letter", "", "y is a person"],
        "label": [3, 0, 1],
    }
    cols.update(over)
    return pa.table(cols)


def test_valid_pairs_have_no_violations():
    assert T.check(T.PAIRS, _pairs()) == []


def test_empty_passage_text_is_valid_but_empty_query_is_not():
    vs = T.check(T.PAIRS, _pairs(query=["what is x", "  ", "who is y"]))
    assert [(v.column, v.row, v.reason) for v in vs] == [("query", 1, "empty string")]


def test_violation_names_column_and_first_bad_row():
    vs = T.check(T.PAIRS, _pairs(label=[3, 7, 9]), path="pairs/part-00000.parquet")
    assert len(vs) == 1
    v = vs[0]
    assert (v.column, v.row, v.value) == ("label", 1, 7)
    assert "column 'label', row 1" in str(v) and "part-00000.parquet" in str(v)


def test_missing_columns_are_named():
    vs = T.check(T.PAIRS, _pairs().drop_columns(["query", "text"]))
    assert {v.column for v in vs} == {"query", "text"}
    assert all("missing column" in v.reason for v in vs)


def test_missing_nullable_label_is_allowed_as_unlabelled():
    conformed = T.conform(T.PAIRS, _pairs().drop_columns(["label"]))
    assert conformed.column("label").null_count == 3


def test_uncastable_type_names_first_bad_value():
    vs = T.check(T.PAIRS, _pairs(label=["3", "high", "1"]))
    assert [(v.column, v.row, v.value) for v in vs] == [("label", 1, "high")]


def test_null_id_and_duplicate_key():
    vs = T.check(T.PAIRS, _pairs(qid=["q1", None, "q1"], docid=["d1", "d2", "d1"]))
    got = {(v.column, v.row) for v in vs}
    assert ("qid", 1) in got
    assert ("qid,docid", 2) in got


def test_judgments_probs_and_score_rules():
    t = pa.table(
        {
            "qid": ["q", "q", "q"],
            "docid": ["a", "b", "c"],
            "label": pa.array([0, 1, 2], pa.int8()),
            "score": pa.array([0.5, 1.0, 9.0], pa.float32()),
            "probs": pa.array([[0.5, 0.5, 0, 0], [0.2, 0.2, 0.2, 0.2], [0, 0, 1, 0]], pa.list_(pa.float32())),
            "judge": ["j"] * 3,
            "prompt_version": ["v1"] * 3,
        }
    )
    vs = {(v.column, v.row) for v in T.check(T.JUDGMENTS, t)}
    assert vs == {("probs", 1), ("score", 2)}


def test_judgments_wrong_number_of_probs():
    t = pa.table(
        {
            "qid": ["q"],
            "docid": ["a"],
            "label": pa.array([0], pa.int8()),
            "score": pa.array([0.0], pa.float32()),
            "probs": pa.array([[1.0, 0.0]], pa.list_(pa.float32())),
            "judge": ["j"],
            "prompt_version": ["v"],
        }
    )
    (v,) = T.check(T.JUDGMENTS, t)
    assert v.column == "probs" and "4 probabilities" in v.reason


def test_run_rank_starts_at_one():
    t = pa.table({"qid": ["q", "q"], "docid": ["a", "b"], "score": [1.0, 0.5], "rank": [0, 1]})
    (v,) = T.check(T.RUN, t)
    assert (v.column, v.row) == ("rank", 0)


def test_split_rejected_keeps_every_row_somewhere():
    t = T.conform(T.PAIRS, _pairs(label=[3, 5, 1], query=["q", "q", ""]))
    good, bad = T.split_rejected(T.PAIRS, t, source="src.jsonl", line=pa.array([1, 2, 3], pa.int64()))
    assert good.num_rows + bad.num_rows == t.num_rows
    assert good.column("docid").to_pylist() == ["d1"]
    assert bad.column("line").to_pylist() == [2, 3]
    assert "unknown grade" in bad.column("reason")[0].as_py()
    assert bad.column("reason")[1].as_py() == "query: empty string"


@pytest.mark.parametrize("grades", [(0, 1), (0, 1, 2, 3, 4)])
def test_grade_scale_is_configurable(grades):
    vs = T.check(T.QRELS, pa.table({"qid": ["q"], "docid": ["d"], "label": [4]}), grades=grades)
    assert bool(vs) == (4 not in grades)


def test_questions_table_keeps_empty_answers_but_not_missing_ones():
    t = pa.table(
        {
            "qid": ["q1", "q2", "q3"],
            "question": ["who", "what", " "],
            "answers": pa.array([["a"], [], None], pa.list_(pa.string())),
            "supporting": pa.array([["d1"], None, []], pa.list_(pa.string())),
        }
    )
    vs = {(v.column, v.row, v.reason) for v in T.check(T.QUESTIONS, t)}
    assert vs == {("answers", 2, "missing value (null)"), ("question", 2, "empty string")}
    missing = T.check(T.QUESTIONS, t.drop_columns(["answers"]))
    assert [(v.column, "missing column" in v.reason) for v in missing] == [("answers", True)]
    assert T.TABLES["questions"] is T.QUESTIONS
