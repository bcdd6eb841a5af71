"""The pool stage: which candidate pairs the judge labels for the rankers (never a held-out query's)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.errors import DataError
from pipelines.io import write_table
from pipelines.pool import POOL_SCHEMA, PoolConfig, run, unlabelled_outside


def _cands(rows):
    return pa.table(
        {
            "qid": [r[0] for r in rows],
            "docid": [r[1] for r in rows],
            "query": ["q"] * len(rows),
            "text": ["t"] * len(rows),
            "title": [None] * len(rows),
            "label": pa.array([r[2] for r in rows], pa.int8()),
            "cand_rank": pa.array(range(1, len(rows) + 1), pa.int32()),
        }
    )


def test_unlabelled_pairs_of_queries_not_held_out():
    batch = _cands([("a", "d1", None), ("a", "d2", 2), ("t", "d1", None), ("u", "d3", None)])
    out = unlabelled_outside(batch, pa.array(["t"]), pa.array([], pa.string()))
    assert out.schema == POOL_SCHEMA
    assert list(zip(out.column("qid").to_pylist(), out.column("docid").to_pylist(), strict=True)) == [
        ("a", "d1"),
        ("u", "d3"),
    ]


def test_a_pair_the_human_splits_label_is_never_judged():
    batch = _cands([("a", "d1", None), ("u", "d3", None)])  # candidates made without --qrels: no label
    out = unlabelled_outside(batch, pa.array([], pa.string()), pa.array(["u\x1fd3"]))
    assert out.column("docid").to_pylist() == ["d1"]


def test_pool_stage_writes_the_pool_and_the_human_pairs(ray_session, tmp_path):
    splits = tmp_path / "splits"
    write_table(
        splits / "splits", pa.table({"qid": ["a", "t", "u"], "split": ["train", "test", "unlabelled"]})
    )
    write_table(
        splits / "train" / "pairs", _cands([("a", "d2", 2), ("a", "d9", 0)]).drop_columns(["cand_rank"])
    )
    for empty in ("val", "test", "unlabelled"):  # the pool reads train's and val's pairs; test's are not read
        write_table(splits / empty / "pairs", _cands([]).drop_columns(["cand_rank"]))
    write_table(
        tmp_path / "cands", _cands([("a", "d1", None), ("a", "d2", 2), ("t", "d1", None), ("u", "d3", None)])
    )
    r = run(PoolConfig(candidates=str(tmp_path / "cands"), splits=str(splits), out=str(tmp_path / "pool")))
    assert r.counts == {"unlabelled_pairs": 2, "unlabelled_pairs_queries": 2, "human_pairs": 2, "human_queries": 1,
                        "held_out_queries": 1}  # fmt: skip
    with pytest.raises(DataError, match="no split"):
        run(PoolConfig(candidates=str(tmp_path / "cands"), splits=str(splits), out=str(tmp_path / "p2"),
                       hold_out=["dev"]))  # fmt: skip
