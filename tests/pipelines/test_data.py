import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipelines import tables as T
from pipelines.data import PrepareConfig, SplitConfig, assign_folds, assign_splits, prepare, split
from pipelines.errors import ConfigError, DataError
from pipelines.io import read_table, write_table
from pipelines.stage import load_config


def _write_trec(src, qrels_lines, topics_lines=None, passages=None):
    src.mkdir(parents=True, exist_ok=True)
    topics = topics_lines or [b"1\twhat is x", b"2\twho is y", b"3\t   "]
    (src / "queries.tsv").write_bytes(b"\n".join(topics) + b"\n")
    (src / "qrels.txt").write_bytes(b"\n".join(qrels_lines) + b"\n")
    passages = passages or [
        {"docid": "a", "doc": "x is a letter"},
        {"docid": "b", "doc": ""},
        {"docid": "c", "doc": "y is a person"},
    ]
    (src / "passages.jsonl").write_text("\n".join(json.dumps(p) for p in passages) + "\n")


def test_trec_dl_rejects_bad_rows_with_reasons(tmp_path):
    src = tmp_path / "src"
    _write_trec(
        src,
        [
            b"1 Q0 a 3",
            b"1 Q0 b 0",  # empty passage: valid
            b"1 Q0 a 2",  # duplicate (qid, docid)
            b"2 Q0 c 7",  # unknown grade
            b"2 Q0 c high",  # unknown grade
            b"2 Q0 \xff\xfe 1",  # not UTF-8
            b"2 Q0 zz 1",  # docid not in corpus
            b"3 Q0 a 1",  # query 3 is empty, so it is rejected and this pair dangles
            b"9 Q0 a 1",  # qid not in queries
            b"1 Q0",  # wrong field count
            b"2 Q0 c 1",
        ],
        passages=[
            {"docid": "a", "doc": "x is a letter"},
            {"docid": "b", "doc": ""},
            {"docid": "c", "doc": "y is a person"},
            {"doc": "no id"},
            {"docid": "d", "doc": None},
        ],
    )
    (src / "passages.jsonl").write_bytes((src / "passages.jsonl").read_bytes() + b"{not json\n")
    out = tmp_path / "out"
    result = prepare(PrepareConfig(format="trec-dl", src=str(src), out=str(out)))
    pairs = read_table(out / "pairs")
    rejected = read_table(out / "rejected").to_pylist()
    assert sorted(zip(pairs.column("qid").to_pylist(), pairs.column("docid").to_pylist(), strict=False)) == [
        ("1", "a"),
        ("1", "b"),
        ("2", "c"),
    ]
    reasons = [r["reason"] for r in rejected]
    text = "\n".join(reasons)
    for expected in (
        "unknown grade '7'",
        "unknown grade 'high'",
        "not UTF-8",
        "duplicate (qid, docid)",
        "docid not in corpus",
        "qid not in queries",
        "expected 4 fields",
        "query: empty string",
        "missing document id",
        "non-text body",
        "invalid JSON",
    ):
        assert expected in text, expected
    # nothing lost: every qrels line is either a pair or a rejected qrels row
    qrels_rejected = [r for r in rejected if r["table"] == "qrels"]
    assert pairs.num_rows + len(qrels_rejected) == 11
    assert result.counts["rejected"] == len(rejected)
    assert all(r["source"] for r in rejected)


def test_prepare_dl19_counts(shared_data, tmp_path):
    out = tmp_path / "dl19"
    r = prepare(PrepareConfig(format="trec-dl", src=str(shared_data / "trec-dl-2019"), out=str(out)))
    assert r.counts["pairs"] == 9260 and r.counts["judged_queries"] == 43 and r.counts["rejected"] == 0
    assert r.extra["grades"] == {"0": 5158, "1": 1601, "2": 1804, "3": 697}
    pairs = read_table(out / "pairs")
    assert T.check(T.PAIRS, pairs) == []
    assert pairs.schema.field("label").type == "int8"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["pairs"] == 9260 and (out / "config.yaml").exists()


def test_prepare_llmjudge_pairs_keeps_empty_passages(shared_data, tmp_path):
    out = tmp_path / "llmj"
    r = prepare(
        PrepareConfig(format="pairs", src=str(shared_data / "llmjudge-dev" / "pairs.jsonl"), out=str(out))
    )
    assert r.counts["pairs"] == 1776 and r.counts["judged_queries"] == 22
    pairs = read_table(out / "pairs")
    assert pc.sum(pc.equal(pairs.column("text"), "")).as_py() > 0


def test_prepare_hotpotqa(shared_data, tmp_path):
    out = tmp_path / "hp"
    r = prepare(PrepareConfig(format="hotpotqa", src=str(shared_data / "hotpotqa-dev-500"), out=str(out)))
    assert r.counts["queries"] == 500 and r.counts["rejected"] == 0
    queries = read_table(out / "queries")
    assert all(queries.column("answers").to_pylist())
    labels = read_table(out / "qrels").column("label").to_pylist()
    assert set(labels) == {0, 1} and sum(labels) >= 2 * 500 - 10  # two supporting paragraphs per question
    # every pair carries its question's gold answers (answer-likelihood utility reads them beside the passage)
    gold = dict(zip(queries.column("qid").to_pylist(), queries.column("answers").to_pylist(), strict=True))
    pairs = read_table(out / "pairs")
    assert pairs.num_rows == r.counts["pairs"] and pairs.column("answers").null_count == 0
    assert all(a == gold[q] for q, a in zip(pairs.column("qid").to_pylist(), pairs.column("answers").to_pylist(),
                                            strict=True))  # fmt: skip


def test_pairs_format_rejects_and_keeps_unlabelled(tmp_path):
    src = tmp_path / "pairs.jsonl"
    rows = [
        {"qid": "q1", "docid": "d1", "query": "x", "text": "t", "label": 2},
        {"qid": "q1", "docid": "d2", "query": "x", "text": "t"},  # unlabelled: kept, label null
        {"qid": "", "docid": "d3", "query": "x", "text": "t"},  # missing id
        {"qid": "q2", "docid": "d1", "query": "y", "text": 5},  # non-text
        {"qid": "q2", "docid": "d4", "query": "y", "text": "t", "label": 4},  # unknown grade
        {"qid": "q1", "docid": "d1", "query": "x", "text": "t", "label": 1},  # duplicate
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    r = prepare(PrepareConfig(format="pairs", src=str(src), out=str(out)))
    pairs = read_table(out / "pairs")
    assert pairs.column("docid").to_pylist() == ["d1", "d2"]
    assert pairs.column("label").to_pylist() == [2, None]
    assert r.counts["qrels"] == 1 and r.counts["rejected"] == 4
    reasons = read_table(out / "rejected").column("reason").to_pylist()
    assert any("qid: missing value" in x for x in reasons)
    assert any("text: not text" in x for x in reasons)


def test_beir_synth_roundtrip(synth_dataset):
    pairs = read_table(synth_dataset / "pairs")
    assert pairs.num_rows > 500
    assert set(pairs.column("label").to_pylist()) == {0, 1, 2, 3}
    assert read_table(synth_dataset / "rejected").num_rows == 0
    # synth's answers (queries.jsonl metadata) reach the queries and every pair
    assert read_table(synth_dataset / "queries").column("answers").null_count == 0
    assert pairs.column("answers").null_count == 0


def _write_beir(src, queries):
    (src / "qrels").mkdir(parents=True)
    (src / "corpus.jsonl").write_text(
        "\n".join(json.dumps({"_id": d, "title": "", "text": f"passage {d}"}) for d in ("d1", "d2")) + "\n"
    )
    (src / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries) + "\n")
    qids = [q["_id"] for q in queries]
    (src / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q in qids for d in ("d1", "d2"))
    )


def test_beir_reads_gold_answers_from_query_metadata(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _write_beir(src, [
        {"_id": "list", "text": "when was it founded", "metadata": {"answers": ["1987", " in 1987 "]}},
        {"_id": "str", "text": "who runs it", "metadata": {"answers": "Ada Marsh"}},
        {"_id": "none", "text": "no answer known", "metadata": {}},
        {"_id": "nometa", "text": "no metadata at all"},
        {"_id": "bad", "text": "answers of the wrong type", "metadata": {"answers": [1987]}},
        {"_id": "blank", "text": "a blank answer", "metadata": {"answers": ""}},
    ])  # fmt: skip
    r = prepare(PrepareConfig(format="beir", src=str(src), out=str(out)))
    queries = read_table(out / "queries")
    gold = dict(zip(queries.column("qid").to_pylist(), queries.column("answers").to_pylist(), strict=True))
    assert gold == {"list": ["1987", "in 1987"], "str": ["Ada Marsh"], "none": None, "nometa": None}
    pairs = read_table(out / "pairs")
    assert pairs.num_rows == 8 == r.counts["pairs"]
    assert all(a == gold[q] for q, a in zip(pairs.column("qid").to_pylist(), pairs.column("answers").to_pylist(),
                                            strict=True))  # fmt: skip
    # a malformed answer is named and its query rejected (with its qrels, as dangling), never a traceback
    rejected = read_table(out / "rejected").to_pylist()
    bad = [x for x in rejected if x["table"] == "queries"]
    assert len(bad) == 2 and all(x["reason"].startswith("metadata.answers: expected") for x in bad)
    assert sum(x["reason"] == "qid not in queries" for x in rejected) == 4


def test_beir_without_answers_loads_without_the_column(tmp_path):
    """Public BEIR sets have no answers: no answers column anywhere, no rejected row."""
    src, out = tmp_path / "src", tmp_path / "out"
    _write_beir(src, [{"_id": "1", "text": "what is x", "metadata": {}}, {"_id": "2", "text": "who is y"}])
    r = prepare(PrepareConfig(format="beir", src=str(src), out=str(out)))
    assert r.counts["pairs"] == 4 and r.counts["rejected"] == 0
    for name in ("queries", "pairs"):
        assert "answers" not in read_table(out / name).column_names


def test_pairs_format_reads_gold_answers(tmp_path):
    src, out = tmp_path / "pairs.jsonl", tmp_path / "out"
    rows = [
        {"qid": "q1", "docid": "d1", "query": "x", "text": "t", "label": 1, "answers": ["a1", "a2"]},
        {"qid": "q1", "docid": "d2", "query": "x", "text": "t", "answers": ["a1", "a2"]},
        {"qid": "q2", "docid": "d1", "query": "y", "text": "t", "label": 0, "answers": "b"},
        {"qid": "q3", "docid": "d1", "query": "z", "text": "t", "label": 0},
        {"qid": "q4", "docid": "d1", "query": "w", "text": "t", "answers": {"text": "c"}},
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prepare(PrepareConfig(format="pairs", src=str(src), out=str(out)))
    pairs = read_table(out / "pairs")
    assert pairs.column("answers").to_pylist() == [["a1", "a2"], ["a1", "a2"], ["b"], None]
    queries = read_table(out / "queries")
    assert dict(zip(queries.column("qid").to_pylist(), queries.column("answers").to_pylist(), strict=True)) == {
        "q1": ["a1", "a2"], "q2": ["b"], "q3": None}  # fmt: skip
    reasons = read_table(out / "rejected").column("reason").to_pylist()
    assert len(reasons) == 1 and reasons[0].startswith("answers: expected")


def test_missing_input_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"queries\.tsv: not found"):
        prepare(PrepareConfig(format="trec-dl", src=str(tmp_path), out=str(tmp_path / "o")))


def test_config_rejects_unknown_key_naming_it():
    with pytest.raises(ConfigError, match="grdes: unknown key"):
        load_config(PrepareConfig, None, ["grdes=[0,1]"], format="beir", src="s", out="o")


def test_splits_are_disjoint_deterministic_and_sized():
    qids = [f"q{i}" for i in range(43)]
    a = assign_splits(qids, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=1)
    b = assign_splits(list(reversed(qids)), {"train": 0.6, "val": 0.2, "test": 0.2}, seed=1)
    assert a == b  # independent of input order
    assert set(a) == set(qids)  # every query in exactly one split
    sizes = {s: sum(1 for v in a.values() if v == s) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 43 and sizes["train"] in (25, 26, 27)
    c = assign_splits(qids, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=2)
    assert a != c
    folds = assign_folds(qids, 5, seed=1)
    assert sorted({sum(1 for f in folds.values() if f == k) for k in range(5)}) == [8, 9]


def test_tiny_split_keeps_every_requested_split_nonempty():
    a = assign_splits(["a", "b", "c"], {"train": 0.9, "val": 0.05, "test": 0.05}, seed=0)
    assert sorted(a.values()) == ["test", "train", "val"]


def test_split_stage_writes_query_disjoint_tables(synth_dataset, tmp_path):
    out = tmp_path / "splits"
    split(SplitConfig(src=str(synth_dataset), out=str(out), folds=3))
    seen: dict[str, str] = {}
    total = 0
    for name in ("train", "val", "test"):
        pairs = read_table(out / name / "pairs")
        total += pairs.num_rows
        for q in set(pairs.column("qid").to_pylist()):
            assert q not in seen, f"{q} in {seen.get(q)} and {name}"
            seen[q] = name
    assert total == read_table(synth_dataset / "pairs").num_rows
    splits = read_table(out / "splits")
    assert set(splits.column("fold").to_pylist()) == {0, 1, 2}
    # the gold answers travel with the queries and pairs of each split
    for name in ("train", "val", "test"):
        for table in ("queries", "pairs"):
            t = read_table(out / name / table)
            assert t.num_rows and t.column("answers").null_count == 0, (name, table)


def test_split_config_validates_fractions():
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(SplitConfig, None, (), src="a", out="b", fractions={"train": 0.5, "test": 0.2})


def test_split_keeps_unlabelled_queries_and_their_pairs(tmp_path):
    """Queries without a human label (only unlabelled pairs, or no pair at all) form the 'unlabelled' split."""
    src = tmp_path / "pairs.jsonl"
    rows = [{"qid": f"q{i}", "docid": f"d{j}", "query": f"query {i}", "text": "t", "label": (i + j) % 4}
            for i in range(6) for j in range(3)]  # fmt: skip
    # an unlabelled pair of a judged query, and a query with unlabelled pairs only
    rows += [{"qid": "q0", "docid": "d9", "query": "query 0", "text": "t"}]
    rows += [{"qid": "u1", "docid": f"d{j}", "query": "unjudged", "text": "t"} for j in range(4)]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data, out = tmp_path / "data", tmp_path / "splits"
    prepare(PrepareConfig(format="pairs", src=str(src), out=str(data)))
    # a query in the queries table with no pair at all (TREC DL topics without qrels) is unlabelled too
    no_pairs = pa.table({"qid": ["u2"], "query": ["no pairs"]})
    queries = read_table(data / "queries")
    write_table(data / "queries", pa.concat_tables([queries, no_pairs.cast(queries.schema)]))
    r = split(SplitConfig(src=str(data), out=str(out), fractions={"train": 0.5, "test": 0.5}, folds=2))
    splits = read_table(out / "splits")
    by_split = dict(zip(splits.column("qid").to_pylist(), splits.column("split").to_pylist(), strict=True))
    assert by_split["u1"] == by_split["u2"] == "unlabelled"
    assert sorted(q for q, s in by_split.items() if s != "unlabelled") == [f"q{i}" for i in range(6)]
    folds = dict(zip(splits.column("qid").to_pylist(), splits.column("fold").to_pylist(), strict=True))
    assert folds["u1"] is None and folds["q0"] in (0, 1)
    unl = read_table(out / "unlabelled" / "pairs")
    assert unl.num_rows == 4 and set(unl.column("qid").to_pylist()) == {"u1"}
    assert sorted(read_table(out / "unlabelled" / "queries").column("qid").to_pylist()) == ["u1", "u2"]
    assert read_table(out / "unlabelled" / "qrels").num_rows == 0
    assert r.counts["unlabelled.queries"] == 2 and r.counts["unlabelled.pairs"] == 4
    # nothing dropped: the judged query's unlabelled pair stays with it, every pair is in one split
    total = sum(r.counts[f"{s}.pairs"] for s in ("train", "test", "unlabelled"))
    assert total == read_table(data / "pairs").num_rows == 6 * 3 + 1 + 4
    assert r.counts["train.queries_split"] + r.counts["test.queries_split"] == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["unlabelled.pairs"] == 4
    with pytest.raises(ConfigError, match="'unlabelled' is the split of queries without a human label"):
        load_config(SplitConfig, None, (), src="a", out="b", fractions={"train": 0.5, "unlabelled": 0.5})


def test_split_dl19_has_157_unlabelled_queries(shared_data, tmp_path):
    out = tmp_path / "dl19"
    prepare(PrepareConfig(format="trec-dl", src=str(shared_data / "trec-dl-2019"), out=str(out / "data")))
    r = split(SplitConfig(src=str(out / "data"), out=str(out / "splits")))
    assert r.counts["unlabelled.queries"] == 157 and r.counts["unlabelled.pairs"] == 0
    assert sum(r.counts[f"{s}.queries_split"] for s in ("train", "val", "test")) == 43


def _hotpot_line(qid, question, spans, supporting):
    contexts = [
        {
            "id": str(i),
            "title": f"T{i}",
            "paragraph_text": f"{qid} text {i}",
            "is_supporting": i in supporting,
        }
        for i in range(4)
    ]
    answers = [{"number": "", "spans": spans}] if spans is not None else []
    return {"question_id": qid, "question_text": question, "answers_objects": answers, "contexts": contexts}


def test_prepare_hotpotqa_writes_questions_with_answers_and_supporting(tmp_path):
    src, out = tmp_path / "questions.jsonl", tmp_path / "out"
    lines = [
        _hotpot_line("a", "who wrote it", ["Ada Marsh", "A. Marsh"], {1, 3}),
        _hotpot_line("b", "when was it built", None, {0, 2}),  # no gold answer: kept, counted
    ]
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = prepare(PrepareConfig(format="hotpotqa", src=str(src), out=str(out)))
    questions = read_table(out / "questions")
    assert T.check(T.QUESTIONS, questions) == []
    assert questions.to_pylist() == [
        {"qid": "a", "question": "who wrote it", "answers": ["Ada Marsh", "A. Marsh"],
         "supporting": ["a-1", "a-3"]},
        {"qid": "b", "question": "when was it built", "answers": [], "supporting": ["b-0", "b-2"]},
    ]  # fmt: skip
    assert r.counts["questions"] == 2 and r.counts["questions_without_answer"] == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["questions_without_answer"] == 1 and "questions" in manifest["tables"]


def test_beir_with_answers_writes_questions_supporting_by_min_grade(tmp_path):
    src = tmp_path / "src"
    _write_beir(src, [
        {"_id": "1", "text": "when was it founded", "metadata": {"answers": ["1987"]}},
        {"_id": "2", "text": "who runs it", "metadata": {}},
        {"_id": "3", "text": "never judged", "metadata": {"answers": "x"}},
    ])  # fmt: skip
    (src / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\td1\t3\n1\td2\t1\n2\td1\t0\n")
    out1, out2 = tmp_path / "min1", tmp_path / "min2"
    r = prepare(PrepareConfig(format="beir", src=str(src), out=str(out1)))
    prepare(PrepareConfig(format="beir", src=str(src), out=str(out2), supporting_min_grade=2))
    assert r.counts["questions"] == 3 and r.counts["questions_without_answer"] == 1
    rows = {x["qid"]: x for x in read_table(out1 / "questions").to_pylist()}
    assert [rows[q]["answers"] for q in "123"] == [["1987"], [], ["x"]]
    # judged without a passage at the grade: empty; no human label at all: unknown (null)
    assert [rows[q]["supporting"] for q in "123"] == [["d1", "d2"], [], None]
    assert read_table(out2 / "questions").column("supporting").to_pylist() == [["d1"], [], None]


def test_beir_without_answers_writes_questions_without_answers(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _write_beir(src, [{"_id": "1", "text": "what is x", "metadata": {"answers": "x"}}])
    prepare(PrepareConfig(format="beir", src=str(src), out=str(out)))
    assert read_table(out / "questions").column("answers").to_pylist() == [["x"]]
    (src / "queries.jsonl").write_text(json.dumps({"_id": "1", "text": "what is x"}) + "\n")
    r = prepare(PrepareConfig(format="beir", src=str(src), out=str(out)))
    # every query is a question; with no gold answer it is kept and counted (RAG scores its retrieval only)
    assert read_table(out / "questions").column("answers").to_pylist() == [[]]
    assert r.counts["questions"] == r.counts["questions_without_answer"] == 1


def test_pairs_with_answers_write_questions(tmp_path):
    src, out = tmp_path / "pairs.jsonl", tmp_path / "out"
    rows = [
        {"qid": "q1", "docid": "d1", "query": "x", "text": "t", "label": 2, "answers": ["a"]},
        {"qid": "q1", "docid": "d2", "query": "x", "text": "t", "label": 0, "answers": ["a"]},
        {"qid": "q2", "docid": "d1", "query": "y", "text": "t"},  # unlabelled, no answer
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = prepare(PrepareConfig(format="pairs", src=str(src), out=str(out)))
    assert read_table(out / "questions").to_pylist() == [
        {"qid": "q1", "question": "x", "answers": ["a"], "supporting": ["d1"]},
        {"qid": "q2", "question": "y", "answers": [], "supporting": None},
    ]
    assert r.counts["questions_without_answer"] == 1


def test_supporting_min_grade_must_be_on_the_scale():
    with pytest.raises(ConfigError, match="supporting_min_grade"):
        load_config(PrepareConfig, None, ["supporting_min_grade=0"], format="beir", src="s", out="o")
    with pytest.raises(ConfigError, match="supporting_min_grade"):
        load_config(PrepareConfig, None, ["grades=[0,1]", "supporting_min_grade=2"], format="beir", src="s",
                    out="o")  # fmt: skip


def test_split_writes_each_splits_questions_by_qid(synth_dataset, tmp_path):
    out = tmp_path / "splits"
    r = split(SplitConfig(src=str(synth_dataset), out=str(out)))
    total = 0
    for name in ("train", "val", "test", "unlabelled"):
        queries = read_table(out / name / "queries").column("qid").to_pylist()
        questions = read_table(out / name / "questions")
        assert sorted(questions.column("qid").to_pylist()) == sorted(queries), name
        assert r.counts[f"{name}.questions"] == questions.num_rows
        total += questions.num_rows
    assert total == read_table(synth_dataset / "questions").num_rows > 0
    # a dataset without questions (prepared before there were any) gets none in its splits, even where an
    # earlier split wrote some
    data = tmp_path / "data"
    for t in ("queries", "qrels", "pairs"):
        write_table(data / t, read_table(synth_dataset / t))
    split(SplitConfig(src=str(data), out=str(out)))
    assert not any((out / name / "questions").exists() for name in ("train", "val", "test", "unlabelled"))


def test_a_paragraph_under_several_hotpotqa_questions_is_one_passage(tmp_path):
    src, out = tmp_path / "questions.jsonl", tmp_path / "out"
    a, b = _hotpot_line("a", "who", ["x"], {0}), _hotpot_line("b", "when", ["y"], {1})
    b["contexts"][1] = {
        **a["contexts"][0],
        "id": "1",
        "is_supporting": True,
    }  # a's paragraph 0, gold for b too
    src.write_text("\n".join(json.dumps(x) for x in (a, b)) + "\n")
    r = prepare(PrepareConfig(format="hotpotqa", src=str(src), out=str(out)))
    assert r.counts["docs"] == 7 and r.counts["qrels"] == 8 and r.counts["rejected"] == 0
    supporting = {q["qid"]: q["supporting"] for q in read_table(out / "questions").to_pylist()}
    assert supporting == {"a": ["a-0"], "b": ["a-0"]}
