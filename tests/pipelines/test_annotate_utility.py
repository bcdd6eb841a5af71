"""``augrel annotate --mode relsel|utility-sel|utility-rank|answer-likelihood``: whole-question work units, the
utility table, exactly once and resumable (a real embedded Ray, the tiny causal LM)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.utility import window_slices
from pipelines import tables as T
from pipelines.annotate import (
    AnnotateConfig,
    check_block_bound,
    input_query_starts,
    plan_units,
    query_starts,
    read_unit,
    run,
    unit_pieces,
)
from pipelines.errors import ConfigError, DataError
from pipelines.io import read_table
from tests.helpers import kill_a_map_worker_once

WORDS = ["when", "was", "the", "town", "founded", "river", "population", "company", "ceo", "of", "a"]


def _questions(sizes: list[int], seed: int = 0) -> list[dict]:
    """Pairs of questions with ``sizes[i]`` candidates each, contiguous per question, with a gold answer."""
    rng = np.random.default_rng(seed)
    rows = []
    for qi, n in enumerate(sizes):
        for j in range(n):
            rows.append({"qid": f"q{qi}", "docid": f"q{qi}-d{j}", "query": "when was the town founded",
                         "text": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))),
                         "answers": ["the town"]})  # fmt: skip
    return rows


def _write(path: Path, rows: list[dict], row_group_size: int = 7) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def _cfg(model: Path, pairs: Path, out: Path, **kw) -> AnnotateConfig:
    values = {"judge": str(model), "pairs": str(pairs), "out": str(out), "mode": "utility-sel", "unit_rows": 12,
              "batch_size": 8, "concurrency": (1, 1), "num_cpus_per_actor": 0.5, "window": 4, **kw}  # fmt: skip
    return AnnotateConfig(**values)


def _keys(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table.column("qid").to_pylist(), table.column("docid").to_pylist(), strict=True))


# ------------------------------------------------------------------------------------------ planning


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_units_hold_whole_questions(tmp_path, fmt):
    sizes = [3, 9, 1, 14, 2, 5, 7]
    rows = _questions(sizes)
    if fmt == "parquet":
        path = _write(tmp_path / "pairs.parquet", rows, row_group_size=4)
    else:
        path = tmp_path / "pairs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    starts = input_query_starts(str(path))
    units, _ = plan_units(str(path), unit_rows=6, starts=starts)
    seen: list[str] = []
    for u in units:
        good, _, _ = read_unit(u, max_chars=10_000)
        qids = good.column("qid").to_pylist()
        assert qids, u
        seen += list(dict.fromkeys(qids))
        # each piece of a unit holds whole questions too
        for a, b in unit_pieces(u, 3, starts[u.path]):
            from pipelines.annotate import WorkUnit

            part = read_unit(WorkUnit(u.name, u.path, u.fmt, a, b), max_chars=10_000)[0]
            for q in set(part.column("qid").to_pylist()):
                assert part.column("qid").to_pylist().count(q) == sizes[int(q[1:])]
    assert seen == [f"q{i}" for i in range(len(sizes))]  # every question once, in one unit, in order


def test_a_question_split_across_the_input_is_refused_by_name(tmp_path):
    rows = _questions([3, 3])
    rows.append({**rows[0], "docid": "q0-late"})  # q0 again after q1
    path = _write(tmp_path / "pairs.parquet", rows)
    with pytest.raises(DataError, match=r"question 'q0' are not contiguous \(at pairs.parquet row 0 and again at "
                                        r"pairs.parquet row 6\)"):  # fmt: skip
        query_starts(path)
    # a question running on from one file into the next is split too
    rows = _questions([3, 4])
    _write(tmp_path / "shards" / "part-0.parquet", rows[:5])
    _write(tmp_path / "shards" / "part-1.parquet", rows[5:])
    with pytest.raises(DataError, match=r"question 'q1' are not contiguous \(at part-0.parquet row 3 and again at "
                                        r"part-1.parquet row 0\)"):  # fmt: skip
        input_query_starts(str(tmp_path / "shards"))


def test_relevance_judge_directory_and_oversized_units_are_refused(tmp_path, tiny_causal_lm):
    judge = tmp_path / "judge"
    judge.mkdir()
    (judge / "judge_card.json").write_text("{}")
    with pytest.raises(ValueError, match=r"judge: .* is a relevance judge directory"):
        _cfg(judge, tmp_path / "p.parquet", tmp_path / "out")
    cfg = _cfg(tiny_causal_lm, tmp_path / "p.parquet", tmp_path / "out", unit_rows=100_000)
    with pytest.raises(
        ConfigError, match=r"unit_rows: 100000 rows .* split a question between actors: use at most"
    ):
        check_block_bound(cfg, 128 * 1024 * 1024)
    check_block_bound(_cfg(tiny_causal_lm, tmp_path / "p.parquet", tmp_path / "out"), 128 * 1024 * 1024)


# ------------------------------------------------------------------------------------------ runs


SIZES = [5, 9, 1, 4, 6, 3, 8, 2]  # 38 pairs; 9 candidates at window 4 make 3 windows


@pytest.fixture(scope="module")
def utility_pairs(tmp_path_factory) -> Path:
    rows = _questions(SIZES)
    rows[1]["text"] = ""  # an empty passage: shown, annotated
    rows[7]["text"] = " ".join(["population"] * 600)  # longer than passage_tokens: cut, recorded
    rows.insert(9, {**rows[8]})  # a duplicate docid within q1: rejected with the first occurrence named
    return _write(tmp_path_factory.mktemp("utility") / "pairs" / "part-00000.parquet", rows).parent


@pytest.fixture(scope="module")
def reference_utility_run(ray_session, tiny_causal_lm, utility_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("utility") / "reference"
    return out, run(_cfg(tiny_causal_lm, utility_pairs, out, passage_tokens=64, unit_rows=2))


def test_utility_sel_annotates_every_pair_once_with_windows_and_stats(reference_utility_run):
    out, r = reference_utility_run
    assert r.counts == {"pairs_in": 39, "judged": 38, "rejected": 1}
    table = read_table(out)
    T.check(T.UTILITY, table)  # declared columns, no duplicate (qid, docid)
    assert set(table.column("mode").to_pylist()) == {"utility-sel"}
    assert len(set(_keys(table))) == 38
    reason = read_table(out / "rejected").column("reason").to_pylist()
    assert reason == ["duplicate (qid, docid): judged in unit part-00000-00001, row 9"]
    by_q: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        by_q.setdefault(row["qid"], []).append(row)
    for qid, rows in by_q.items():
        n = SIZES[int(qid[1:])]
        assert len(rows) == n
        # RelSel saw all of a question's candidates, in windows of at most 4, each shown once: the question
        # reached one actor call whole
        relsel = [e for row in rows for e in json.loads(row["windows"]) if e["stage"] == "relsel"]
        assert len(relsel) == n and len({e["window"] for e in relsel}) == len(window_slices(n, 4))
        assert all(1 <= e["position"] <= 4 for e in relsel)
        # UtilSel only selects among the passages RelSel kept
        assert all(row["relevant"] for row in rows if row["selected"])
    assert table.filter(pa.compute.equal(table["docid"], "q0-d1"))["truncated"].to_pylist() == [False]
    assert table.filter(pa.compute.equal(table["docid"], "q1-d2"))["truncated"].to_pylist() == [True]
    manifest = json.loads((out / "manifest.json").read_text())
    u = manifest["utility"]
    assert manifest["table"] == "utility" and u["questions"] == len(SIZES) and u["passages"] == 38
    assert u["stages"]["relsel"]["windows"] == sum(len(window_slices(n, 4)) for n in SIZES)
    assert manifest["questions_per_s"] > 0 and manifest["passages_per_s"] > 0
    assert manifest["prompt_version"].startswith("utility-v1@")
    assert 0 <= manifest["parse_fail_rate"] <= 1


@pytest.mark.parametrize("mode", ["relsel", "utility-rank", "answer-likelihood"])
def test_each_mode_writes_its_columns(ray_session, tiny_causal_lm, tmp_path, mode):
    rows = _questions([3, 6, 2])
    pairs = _write(tmp_path / "pairs" / "part-0.parquet", rows).parent
    r = run(_cfg(tiny_causal_lm, pairs, tmp_path / "out", mode=mode, unit_rows=100, answer_source="gold"))
    table = read_table(tmp_path / "out")
    assert r.counts["judged"] == 11 and set(table.column("mode").to_pylist()) == {mode}
    per_q = {}
    for row in table.to_pylist():
        per_q.setdefault(row["qid"], []).append(row)
    if mode == "relsel":
        assert table.column("rank").null_count == 11
        assert table.column("selected").to_pylist() == table.column("relevant").to_pylist()
    if mode in ("utility-rank", "answer-likelihood"):
        for rows_q in per_q.values():
            # UtilRank ranks the passages RelSel kept (the others have no rank); answer-likelihood ranks all.
            # Positives: the top 10%, at least one, of what was ranked
            ranked = [x for x in rows_q if mode == "answer-likelihood" or x["relevant"]]
            assert sorted(x["rank"] for x in ranked) == list(range(1, len(ranked) + 1))
            assert all(x["rank"] is None and not x["selected"] for x in rows_q if x not in ranked)
            assert 0 <= sum(x["selected"] for x in rows_q) <= 1
            assert all(x["rank"] == 1 for x in rows_q if x["selected"])
    if mode == "answer-likelihood":
        assert table.column("utility").null_count == 0 and table.column("pseudo_answer").null_count == 11
        assert table.column("relevant").null_count == 11  # the gold answer: no RelSel was needed


def test_utility_actor_killed_mid_run_loses_and_duplicates_nothing(ray_session, reference_utility_run,
                                                                   tiny_causal_lm, utility_pairs, tmp_path):  # fmt: skip
    out = tmp_path / "killed"
    cfg = _cfg(tiny_causal_lm, utility_pairs, out, passage_tokens=64, unit_rows=2)  # a unit per question
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(r=run(cfg)))
    worker.start()
    killed = kill_a_map_worker_once(out, 2, worker) is not None
    worker.join(timeout=300)
    assert killed and len(list(out.glob("part-*.parquet"))) == len(SIZES)
    r = result["r"]
    assert r.counts == {"pairs_in": 39, "judged": 38, "rejected": 1}
    # the same labels as the uninterrupted run: a retried question is annotated as the first time (greedy,
    # seeded windows)
    got = read_table(out).sort_by([("qid", "ascending"), ("docid", "ascending")])
    ref = read_table(reference_utility_run[0]).sort_by([("qid", "ascending"), ("docid", "ascending")])
    assert got.select(["qid", "docid", "selected", "relevant", "windows"]).equals(
        ref.select(["qid", "docid", "selected", "relevant", "windows"])
    )
    # resume: nothing left; a changed window size is refused
    again = run(_cfg(tiny_causal_lm, utility_pairs, out, passage_tokens=64, unit_rows=2, resume=True))
    assert again.extra["units_this_run"] == 0 and again.extra["utility"]["questions"] == len(SIZES)
    with pytest.raises(ConfigError, match="'prompt' changed"):
        run(_cfg(tiny_causal_lm, utility_pairs, out, passage_tokens=64, unit_rows=2, resume=True, window=5))
