"""augrel index build: the docs table, the document store and the BM25 index (and the encoder pool's spread)."""

from __future__ import annotations

import pyarrow as pa

from pipelines.io import write_table


def test_build_writes_a_docstore_beside_the_docs_table(tmp_path):
    from pipelines.index import IndexConfig, build
    from retrieval.docstore import DocStore

    docs = pa.table(
        {"docid": ["b", "a", "c"], "text": ["bee text", "ay text", "sea text"], "title": ["B", None, "C"]}
    )
    write_table(tmp_path / "docs", docs)
    result = build(IndexConfig(docs=str(tmp_path / "docs"), out=str(tmp_path / "index"), dense=False))
    store = DocStore.open(tmp_path / "index" / "docstore")
    assert len(store) == 3 and result.extra["docstore"] == str(tmp_path / "index" / "docstore")
    got = store.get(["c", "a"])
    assert got.column("text").to_pylist() == ["sea text", "ay text"]
    assert got.column("title").to_pylist() == ["C", None]


def test_pool_blocks_cover_the_table_in_bounded_slices():
    from pipelines.index import pool_blocks

    t = pa.table({"docid": [str(i) for i in range(100)]})
    blocks = pool_blocks(t, actors=2, max_rows=10)
    assert [b.num_rows for b in blocks] == [10] * 10
    assert pa.concat_tables(blocks).column("docid").to_pylist() == t.column("docid").to_pylist()
    assert len(pool_blocks(t, actors=4, max_rows=1000)) >= 4 * 4  # every actor gets several blocks
    assert [b.num_rows for b in pool_blocks(t.slice(0, 3), actors=8, max_rows=10)] == [1, 1, 1]
    assert pool_blocks(t.slice(0, 0), actors=2, max_rows=10)[0].num_rows == 0


def test_dense_build_spreads_documents_over_every_encoder_actor(ray_session, tiny_causal_lm, tmp_path):
    """One in-memory docs table, two encoder actors: both must encode (it used to be one block, one actor)."""
    from pipelines.index import IndexConfig, build
    from retrieval.dense import DenseIndex, DocVectors
    from retrieval.docstore import DocStore

    n = 64
    words = [
        "river",
        "town",
        "company",
        "species",
        "population",
        "founded",
        "lives",
        "eats",
    ]  # the tiny vocab
    texts = [f"the {words[i % 8]} of {words[i // 8]} was founded" for i in range(n)]  # 64 distinct texts
    docs = pa.table({"docid": [f"d{i}" for i in range(n)], "text": texts})
    write_table(tmp_path / "docs", docs)
    result = build(IndexConfig(docs=str(tmp_path / "docs"), out=str(tmp_path / "index"), encoder=str(tiny_causal_lm),
                               batch_size=4, concurrency=2, num_cpus_per_actor=0.5))  # fmt: skip
    assert result.extra["encoder_actors"] == 2
    # FAISS rows and stored vectors follow the document store's rows whatever order the actors finished in
    assert result.extra["dense_rows"] == "docstore"
    index = DenseIndex.load(tmp_path / "index" / "dense", device="cpu")
    store = DocStore.open(tmp_path / "index" / "docstore")
    assert index.docids == store.docids().to_pylist() == docs.column("docid").to_pylist()
    vecs = DocVectors.load(tmp_path / "index" / "dense")
    (hits,) = index.search(vecs.get(["d5"]), k=1)
    assert hits[0][0] == "d5" and vecs.vectors.shape == (n, 32)


def test_build_refuses_an_empty_corpus(tmp_path):
    import pytest

    from pipelines.errors import DataError
    from pipelines.index import IndexConfig, build

    write_table(tmp_path / "docs", pa.table({"docid": [" ", ""], "text": ["no id", "no id either"]}))
    with pytest.raises(DataError, match=r"no usable documents \(2 rejected\)"):
        build(IndexConfig(docs=str(tmp_path / "docs"), out=str(tmp_path / "index"), dense=False))


WORDS = ["river", "town", "company", "species", "population", "founded", "lives", "eats"]  # the tiny vocab


def _tiny_corpus(n: int) -> pa.Table:
    texts = [f"the {WORDS[i % 8]} of {WORDS[(i // 8) % 8]} {WORDS[i // 64]} was founded" for i in range(n)]
    return pa.table({"docid": [f"d{i}" for i in range(n)], "text": texts})


def test_index_search_writes_a_run_table_and_names_an_encoder_of_another_size(
    ray_session, tiny_encoder, tmp_path
):
    """An IVF-PQ index built from the streamed encoder batches, searched by `augrel index search` (dense: the
    default when the index has one): a query that is a document's text finds that document first, re-ranked by
    the exact cosine (1.0)."""
    import json

    import pyarrow.parquet as pq
    import pytest

    from pipelines import tables as T
    from pipelines.cli import main
    from pipelines.errors import DataError
    from pipelines.index import IndexSearchConfig, search

    docs = _tiny_corpus(300)
    write_table(tmp_path / "docs", docs)
    index = tmp_path / "index"
    assert main(["index", "build", "--docs", str(tmp_path / "docs"), "--out", str(index), "--set", "kind=ivfpq",
                 "--set", "pq_m=4", "--set", f"encoder={tiny_encoder}", "--set", "batch_size=64",
                 "--set", "num_cpus_per_actor=0.5"]) == 0  # fmt: skip
    assert not (index / "dense.partial").exists() and (index / "dense" / "vectors.npy").exists()
    qids, picks = ["q1", "q2", "q3"], [5, 123, 299]
    write_table(tmp_path / "queries", pa.table({"qid": qids, "query": docs.column("text").take(picks)}))
    assert main(["index", "search", "--index", str(index), "--queries", str(tmp_path / "queries"), "--k", "5",
                 "--out", str(tmp_path / "run"), "--set", "num_cpus_per_actor=0.5"]) == 0  # fmt: skip
    run = pq.read_table(sorted((tmp_path / "run").glob("part-*.parquet"))).sort_by(
        [("qid", "ascending"), ("rank", "ascending")]
    )
    T.conform(T.RUN, run, "run")
    assert run.schema == T.RUN.schema() and run.num_rows == 15
    assert run.column("rank").to_pylist() == [1, 2, 3, 4, 5] * 3
    top = run.filter(pa.compute.equal(run.column("rank"), 1))
    assert top.column("docid").to_pylist() == [f"d{p}" for p in picks]
    assert all(abs(s - 1.0) < 1e-4 for s in top.column("score").to_pylist())
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["retriever"] == "dense" and manifest["counts"]["rows"] == 15

    # the encoder the index names has been replaced by one of another size: the search names both
    meta = json.loads((index / "dense" / "dense.json").read_text())
    meta["encoder"] = str(tmp_path / "other-encoder")
    from tests.helpers import build_tiny_causal_lm

    build_tiny_causal_lm(tmp_path / "other-encoder")
    (index / "dense" / "dense.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"makes 32-d vectors, but the dense index at .* holds 16-d"):
        search(IndexSearchConfig(index=str(index), queries=str(tmp_path / "queries"), out=str(tmp_path / "bad"),
                                 num_cpus_per_actor=0.5))  # fmt: skip
