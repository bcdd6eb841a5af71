"""``augrel rag eval`` on embedded Ray with a tiny random causal LM: every system, exactly-once, resume, bad input."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipelines.errors import ConfigError, DataError
from pipelines.io import read_table
from pipelines.rag import RagEvalConfig, run, summarize_rows
from tests.helpers import kill_a_map_worker_once


@pytest.fixture(scope="module")
def bm25_index(synth_dataset, tmp_path_factory):
    from pipelines.index import IndexConfig, build

    out = tmp_path_factory.mktemp("rag-index") / "index"
    build(IndexConfig(docs=str(synth_dataset / "docs"), out=str(out), dense=False))
    return out


def _cfg(model: Path, data: Path, index: Path | None, out: Path, **kw) -> RagEvalConfig:
    values = {"questions": str(data / "questions"), "index": str(index) if index else None, "generator": str(model),
              "k": 3, "limit": 10, "partition_questions": 4, "concurrency": (1, 1), "num_cpus_per_actor": 0.5,
              "max_new_tokens": 4, "bootstrap": 200, "out": str(out), **kw}  # fmt: skip
    return RagEvalConfig(**values)


@pytest.fixture(scope="module")
def reference_run(ray_session, tiny_causal_lm, synth_dataset, bm25_index, tmp_path_factory):
    out = tmp_path_factory.mktemp("rag") / "ref"
    return out, run(_cfg(tiny_causal_lm, synth_dataset, bm25_index, out))


def test_every_question_is_answered_once_per_system_and_scored(reference_run, synth_dataset, bm25_index):
    out, r = reference_run
    rows = read_table(out / "rows")
    questions = read_table(synth_dataset / "questions").sort_by("qid").slice(0, 10)
    assert rows.num_rows == 30 and r.counts["generated_now"] == 30
    for system in ("retrieved", "closed_book", "oracle"):
        part = rows.filter(pc.equal(rows.column("system"), system))
        assert sorted(part.column("qid").to_pylist()) == questions.column("qid").to_pylist()
    by = {(x["system"], x["qid"]): x for x in rows.to_pylist()}
    gold = {q["qid"]: q for q in questions.to_pylist()}
    for (system, qid), x in by.items():
        assert 0.0 <= x["f1"] <= 1.0 and x["em"] in (0.0, 1.0)
        if system == "retrieved":
            assert len(x["docids"]) == 3 and x["answer_in_context"] is not None
        elif system == "closed_book":
            assert x["docids"] == [] and x["answer_in_context"] is None and x["supporting_recall"] is None
        else:  # the gold supporting passages are the context, so supporting recall is 1
            assert sorted(x["docids"]) == sorted(gold[qid]["supporting"]) and x["supporting_recall"] == 1.0
    # retrieval is BM25's top 3: the same the index search gives
    from retrieval.candidates import CandidateGenerator, CandidateParams

    gen = CandidateGenerator(bm25_index, CandidateParams(k=3, retrievers=("bm25",)))
    cands = gen(questions.column("qid").to_pylist(), questions.column("question").to_pylist())
    for qid in questions.column("qid").to_pylist():
        want = cands.filter(pc.equal(cands.column("qid"), qid)).column("docid").to_pylist()
        assert by[("retrieved", qid)]["docids"] == want
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["systems"]) == {"retrieved", "closed_book", "oracle"} and m["k"] == 3
    for s in m["systems"].values():
        assert s["questions"] == 10 and s["em"]["ci_low"] <= s["em"]["mean"] <= s["em"]["ci_high"]
    assert m["systems"]["oracle"]["supporting_recall"]["mean"] == 1.0
    assert "| oracle | gold | 10 |" in (out / "table.md").read_text()
    assert m["answers_per_s"] > 0 and m["answers_per_busy_s"] > 0


def test_a_killed_actor_costs_its_partition_only_and_resume_finishes_nothing_twice(
    ray_session, tiny_causal_lm, synth_dataset, bm25_index, reference_run, tmp_path
):
    out = tmp_path / "rag"
    cfg = _cfg(tiny_causal_lm, synth_dataset, bm25_index, out, partition_questions=2)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(r=run(cfg)))
    worker.start()
    killed = kill_a_map_worker_once(out / "rows", 2, worker) is not None
    worker.join(timeout=300)
    assert killed, "the run ended before an actor could be killed"
    rows = read_table(out / "rows")
    assert rows.num_rows == 30 and not pc.any(pc.is_null(rows.column("answer"))).as_py()
    keys = list(zip(rows.column("system").to_pylist(), rows.column("qid").to_pylist(), strict=True))
    assert len(set(keys)) == 30
    # greedy: a retried partition answers as the first time did
    ref = read_table(reference_run[0] / "rows").sort_by([("system", "ascending"), ("qid", "ascending")])
    got = rows.sort_by([("system", "ascending"), ("qid", "ascending")])
    assert got.select(["qid", "docids", "answer", "em"]).equals(ref.select(["qid", "docids", "answer", "em"]))
    # a second run must say what it would do; resume finds nothing left; a lost partition is run alone
    with pytest.raises(ConfigError, match="--resume"):
        run(cfg)
    assert run(cfg.model_copy(update={"resume": True})).counts["generated_now"] == 0
    next(iter(sorted((out / "rows").glob("part-oracle-*.parquet")))).unlink()
    again = run(cfg.model_copy(update={"resume": True}))
    assert again.counts["generated_now"] == 2 and read_table(out / "rows").num_rows == 30
    with pytest.raises(ConfigError, match="'retrievals' changed"):
        run(cfg.model_copy(update={"resume": True, "k": 2}))


def test_questions_without_answers_are_kept_and_counted_and_k_is_capped(
    ray_session, tiny_causal_lm, bm25_index, tmp_path
):
    data = tmp_path / "data"
    (data / "questions").mkdir(parents=True)
    pq.write_table(pa.table({"qid": ["a", "b"], "question": ["who founded the company", "what river"],
                             "answers": [["the town"], []]}), data / "questions" / "part-0.parquet")  # fmt: skip
    from retrieval.docstore import DocStore

    n_docs = len(DocStore.open(bm25_index / "docstore"))
    r = run(_cfg(tiny_causal_lm, data, bm25_index, tmp_path / "out", k=n_docs + 5, systems=["retrieved"],
                 max_new_tokens=1))  # fmt: skip
    assert r.extra["k"] == n_docs and r.extra["k_requested"] == n_docs + 5
    s = r.extra["systems"]["retrieved"]
    assert s["questions"] == 2 and s["without_gold_answer"] == 1 and s["em"]["n"] == 1
    rows = read_table(tmp_path / "out" / "rows").sort_by("qid").to_pylist()
    # BM25 returns only passages sharing a term with the question, however large k is
    assert rows[1]["em"] is None and rows[1]["answer"] is not None and 3 < len(rows[0]["docids"]) <= n_docs
    # an oracle row without gold passages was answered closed book: it scores nothing, and is counted
    with_gold = tmp_path / "gold" / "questions"
    with_gold.mkdir(parents=True)
    pq.write_table(pa.table({"qid": ["a", "b"], "question": ["who founded the company", "what river"],
                             "answers": [["the town"], ["the river"]], "supporting": [["nowhere"], None]}),
                   with_gold / "part-0.parquet")  # fmt: skip
    r = run(
        _cfg(
            tiny_causal_lm,
            with_gold.parent,
            bm25_index,
            tmp_path / "out3",
            systems=["oracle"],
            max_new_tokens=1,
        )
    )
    oracle = {x["qid"]: x for x in read_table(tmp_path / "out3" / "rows").to_pylist()}
    assert (
        oracle["b"]["em"] is None
        and oracle["a"]["em"] is not None
        and r.extra["oracle_passages_missing"] == 1
    )
    # no gold supporting passage anywhere: the oracle is skipped, and said
    r = run(_cfg(tiny_causal_lm, data, bm25_index, tmp_path / "out2", k=0, max_new_tokens=1))
    assert set(r.extra["systems"]) == {"closed_book"}


def test_bad_input_is_named(ray_session, tiny_causal_lm, tiny_encoder, synth_dataset, bm25_index, tmp_path):
    bad = tmp_path / "bad" / "questions"
    bad.mkdir(parents=True)
    pq.write_table(pa.table({"qid": ["a"], "question": ["who"]}), bad / "part-0.parquet")
    with pytest.raises(DataError, match=r"no column\(s\) \['answers'\]"):
        run(_cfg(tiny_causal_lm, bad.parent, bm25_index, tmp_path / "o1"))
    with pytest.raises(DataError, match="no dense/"):
        run(_cfg(tiny_causal_lm, synth_dataset, bm25_index, tmp_path / "o2", retriever="dense"))
    with pytest.raises(ValueError, match="index: required"):
        _cfg(tiny_causal_lm, synth_dataset, None, tmp_path / "o3")
    assert _cfg(
        tiny_causal_lm, synth_dataset, None, tmp_path / "o3", systems=["closed_book"]
    ).run_systems == ["closed_book"]
    with pytest.raises(ConfigError, match="num_gpus_per_actor: 1"):  # Ray Data would wait for it for ever
        run(_cfg(tiny_causal_lm, synth_dataset, bm25_index, tmp_path / "o5", num_gpus_per_actor=1))
    with pytest.raises(ValueError, match="dtype"):
        _cfg(tiny_causal_lm, synth_dataset, bm25_index, tmp_path / "o6", dtype="float32")
    with pytest.raises(ValueError, match="concurrency"):
        _cfg(tiny_causal_lm, synth_dataset, bm25_index, tmp_path / "o4", concurrency=(2, 1))


def test_encoder_directory_must_be_the_one_the_index_was_built_with(
    ray_session, tiny_causal_lm, tiny_encoder, synth_dataset, tmp_path
):
    from pipelines.index import IndexConfig, build

    index = tmp_path / "index"
    build(IndexConfig(docs=str(synth_dataset / "docs"), out=str(index), encoder=str(tiny_encoder)))
    with pytest.raises(ConfigError, match="not the encoder the index"):
        run(_cfg(tiny_causal_lm, synth_dataset, index, tmp_path / "o", retriever=str(tmp_path)))
    # several retrievers in one pass (one generator load per actor): each its own system, searched as alone
    r = run(_cfg(tiny_causal_lm, synth_dataset, index, tmp_path / "o", retriever=str(tiny_encoder), limit=3,
                 systems=["retrieved"], max_new_tokens=1,
                 retrievers={"lexical": {"index": str(index), "retriever": "bm25"}}))  # fmt: skip
    assert {k: v["questions"] for k, v in r.extra["systems"].items()} == {"retrieved": 3, "lexical": 3}
    rows = read_table(tmp_path / "o" / "rows")
    lexical = rows.filter(pc.equal(rows.column("system"), "lexical")).sort_by("qid")
    from retrieval.candidates import CandidateGenerator, CandidateParams

    want = CandidateGenerator(index, CandidateParams(k=3, retrievers=("bm25",)))(
        lexical.column("qid").to_pylist(), lexical.column("question").to_pylist()
    )
    assert [d for ds in lexical.column("docids").to_pylist() for d in ds] == want.column("docid").to_pylist()
    with pytest.raises(ConfigError, match=r"retrievers\.lexical\.retriever: .* is not the encoder"):
        run(_cfg(tiny_causal_lm, synth_dataset, index, tmp_path / "o2", systems=["closed_book"],
                 retrievers={"lexical": {"index": str(index), "retriever": str(tmp_path)}}))  # fmt: skip
    with pytest.raises(ValueError, match=r"retrievers\.oracle: a name of a built-in system"):
        _cfg(
            tiny_causal_lm,
            synth_dataset,
            index,
            tmp_path / "o3",
            retrievers={"oracle": {"index": str(index)}},
        )


def test_summary_counts_empty_answers_and_missing_gold():
    cfg = RagEvalConfig(questions="q", index="i", out="o", systems=["retrieved"], bootstrap=100)
    rows = pa.table({"qid": ["a", "b", "c"], "system": ["retrieved"] * 3, "answer": ["", "x", "y"],
                     "em": [0.0, 1.0, None], "f1": [0.0, 1.0, None], "answer_in_context": [False, True, None],
                     "supporting_recall": [None, 0.5, None], "finished": [True, True, False],
                     "dropped_passages": [0, 1, 0], "truncated_passages": [2, 0, 0]})  # fmt: skip
    s = summarize_rows(rows, cfg, {"retrieved": 5})["retrieved"]
    assert s["empty_answers"] == 1 and s["without_gold_answer"] == 1 and s["unfinished"] == 1
    assert s["em"]["mean"] == 0.5 and s["em"]["n"] == 2 and s["supporting_recall"]["n"] == 1
    assert s["dropped_passages"] == 1 and s["truncated_passages"] == 2 and s["k"] == 5
