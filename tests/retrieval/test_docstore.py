"""The memory-mapped document store and its docid -> row lookup."""

import numpy as np
import pyarrow as pa
import pytest

from retrieval.docstore import DocidIndex, DocStore


def _docs(n: int, titles: bool = True) -> pa.Table:
    cols = {"docid": [f"d{i:04d}" for i in range(n)][::-1], "text": [f"text of {i}" for i in range(n)][::-1]}
    if titles:
        cols["title"] = [None if i % 3 == 0 else f"title {i}" for i in range(n)][::-1]
    return pa.table(cols)


def test_round_trip_keeps_the_asked_order_across_record_batches(tmp_path):
    docs = _docs(50)
    store = DocStore.open(DocStore.write(tmp_path / "ds", docs, batch_rows=7))  # 8 batches
    assert len(store) == 50 and "d0003" in store and "nope" not in store
    asked = ["d0049", "d0000", "d0021", "d0007", "d0021", "d0014"]
    got = store.get(asked)
    assert got.column_names == ["docid", "text", "title"]
    assert got.column("docid").to_pylist() == asked
    assert got.column("text").to_pylist() == [f"text of {int(d[1:])}" for d in asked]
    assert got.column("title").to_pylist() == [
        None if int(d[1:]) % 3 == 0 else f"title {int(d[1:])}" for d in asked
    ]
    assert store.docids().to_pylist() == docs.column("docid").to_pylist()
    assert store.get([]).num_rows == 0


def test_unknown_docid_raises_naming_the_first(tmp_path):
    store = DocStore.open(DocStore.write(tmp_path / "ds", _docs(5)))
    with pytest.raises(KeyError, match="'missing-1'"):
        store.get(["d0001", "missing-1", "missing-2"])
    assert store.rows(["d0001", "missing-1"]).tolist() == [3, -1]


def test_duplicate_docids_are_refused_by_name(tmp_path):
    docs = pa.table({"docid": ["a", "b", "a", "c"], "text": ["1", "2", "3", "4"]})
    with pytest.raises(ValueError, match="duplicate docid 'a'"):
        DocStore.write(tmp_path / "ds", docs)
    assert not DocStore.exists(tmp_path / "ds")


def test_missing_text_column_is_named(tmp_path):
    with pytest.raises(ValueError, match="'text'"):
        DocStore.write(tmp_path / "ds", pa.table({"docid": ["a"]}))


def test_empty_store(tmp_path):
    store = DocStore.open(DocStore.write(tmp_path / "ds", _docs(0)))
    assert len(store) == 0 and "x" not in store
    assert store.get([]).num_rows == 0
    with pytest.raises(KeyError, match="'x'"):
        store.get(["x"])


def test_titles_absent_come_back_null(tmp_path):
    store = DocStore.open(DocStore.write(tmp_path / "ds", _docs(4, titles=False)))
    got = store.get(["d0002", "d0000"])
    assert got.column("title").null_count == 2
    assert got.column("text").to_pylist() == ["text of 2", "text of 0"]


def test_docid_index_survives_key_collisions(monkeypatch):
    """Force every docid onto one key: the lookup must still compare the strings, never return another row."""
    import retrieval.docstore as mod

    ix = DocidIndex.build(["x", "y", "z"])
    collided = DocidIndex(ix.docids, np.zeros(3, np.uint64), np.array([2, 0, 1]))
    monkeypatch.setattr(mod, "docid_keys", lambda ds: np.zeros(len(list(ds)), np.uint64))
    assert collided.rows(["y", "x", "z", "w"]).tolist() == [1, 0, 2, -1]


def test_docid_index_save_load(tmp_path):
    ix = DocidIndex.build([f"doc-{i}" for i in range(100)])
    loaded = DocidIndex.load(ix.save(tmp_path / "ix"))
    assert DocidIndex.exists(tmp_path / "ix")
    assert loaded.rows(["doc-42", "doc-0", "doc-100"]).tolist() == [42, 0, -1]
    assert loaded.docid([5, 99]) == ["doc-5", "doc-99"] and len(loaded) == 100
