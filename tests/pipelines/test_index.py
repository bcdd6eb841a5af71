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
