"""augrel candidates: every query's top-k as a pairs table on a real embedded Ray, labels attached where known."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipelines.errors import DataError
from pipelines.io import read_table, write_table
from pipelines.tables import SchemaError


@pytest.fixture(scope="module")
def bm25_index(synth_dataset, tmp_path_factory):
    from pipelines.index import IndexConfig, build

    out = tmp_path_factory.mktemp("cand") / "index"
    build(IndexConfig(docs=str(synth_dataset / "docs"), out=str(out), dense=False))
    return out


def test_every_query_gets_its_top_k_with_human_labels_where_known(
    ray_session, synth_dataset, bm25_index, tmp_path
):
    from pipelines.candidates import CandidatesConfig, run
    from pipelines.stage import read_manifest

    queries = read_table(synth_dataset / "queries").select(["qid", "query", "answers"])
    extra = pa.table({"qid": ["unlabelled-1", "nothing-matches"], "query": ["founded river town", "zzzz qqqq"],
                      "answers": pa.array([None, None], pa.list_(pa.string()))})  # fmt: skip
    write_table(tmp_path / "queries", pa.concat_tables([queries, extra.cast(queries.schema)]))
    cfg = CandidatesConfig(queries=str(tmp_path / "queries"), index=str(bm25_index), k=5,
                           qrels=str(synth_dataset / "pairs"), out=str(tmp_path / "out"), batch_size=8,
                           concurrency=(2, 2), num_cpus_per_actor=0.5)  # fmt: skip
    r = run(cfg)
    cands = read_table(tmp_path / "out")
    n_q = queries.num_rows + 2
    assert r.counts["queries"] == n_q and r.counts["queries_without_candidates"] == 1
    per_query = pc.value_counts(cands.column("qid")).to_pylist()
    assert len(per_query) == n_q - 1 and all(v["counts"] == 5 for v in per_query)
    # ranks 1..5 per query, no (qid, docid) twice
    assert len(
        set(zip(cands.column("qid").to_pylist(), cands.column("docid").to_pylist(), strict=True))
    ) == len(cands)
    assert sorted(set(cands.column("cand_rank").to_pylist())) == [1, 2, 3, 4, 5]
    # human labels exactly where the qrels have them; texts are the corpus' own
    pairs = read_table(synth_dataset / "pairs")
    truth = dict(zip(zip(pairs.column("qid").to_pylist(), pairs.column("docid").to_pylist(), strict=True),
                     pairs.column("label").to_pylist(), strict=True))  # fmt: skip
    docs = read_table(synth_dataset / "docs")
    text = dict(zip(docs.column("docid").to_pylist(), docs.column("text").to_pylist(), strict=True))
    for row in cands.to_pylist():
        assert row["label"] == truth.get((row["qid"], row["docid"]))
        assert row["text"] == text[row["docid"]]
    assert r.counts["pairs_with_human_label"] + r.counts["pairs_unlabelled"] == len(cands)
    assert cands.filter(pc.equal(cands.column("qid"), "unlabelled-1")).column("label").null_count == 5
    # each candidate carries its query's gold answers (null for the query that has none)
    gold = dict(zip(queries.column("qid").to_pylist(), queries.column("answers").to_pylist(), strict=True))
    assert all(gold[q] for q in gold)
    for q, a in zip(cands.column("qid").to_pylist(), cands.column("answers").to_pylist(), strict=True):
        assert a == gold.get(q), (q, a)
    assert read_manifest(tmp_path / "out")["counts"] == r.counts


def test_bad_input_is_named(ray_session, synth_dataset, bm25_index, tmp_path):
    from pipelines.candidates import CandidatesConfig, run

    write_table(tmp_path / "q", pa.table({"qid": ["a"], "text": ["no query column"]}))
    with pytest.raises((DataError, SchemaError), match="query"):
        run(CandidatesConfig(queries=str(tmp_path / "q"), index=str(bm25_index), out=str(tmp_path / "o")))
    with pytest.raises(DataError, match="dense"):
        run(CandidatesConfig(queries=str(synth_dataset / "queries"), index=str(bm25_index), out=str(tmp_path / "o"),
                             retrievers=["dense"]))  # fmt: skip
    with pytest.raises(ValueError, match="retrievers"):
        CandidatesConfig(queries="q", index="i", out="o", retrievers=["splade"])
