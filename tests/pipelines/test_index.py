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
