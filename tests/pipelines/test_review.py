"""augrel review export / import / serve: the queue each strategy picks, Label Studio files out and in with every
bad row rejected for its reason, and the review page in headless Chromium surviving a killed server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import review
from pipelines.cli import main
from pipelines.errors import ConfigError, DataError
from pipelines.io import read_table
from pipelines.stage import load_config, read_manifest

ROOT = Path(__file__).resolve().parents[2]

# (qid, docid, judge label, confidence): confidences all distinct, so "uncertain" has one right order
ROWS = [
    ("q1", "d1", 0, 0.91), ("q1", "d2", 1, 0.35), ("q1", "d3", 2, 0.52), ("q1", "d4", 3, 0.44),
    ("q2", "d1", 0, 0.30), ("q2", "d5", 1, 0.61), ("q2", "d6", 2, 0.27), ("q2", "d7", 3, 0.80),
    ("q3", "d8", 0, 0.75), ("q3", "d9", 1, 0.58),
]  # fmt: skip
HUMAN = {("q2", "d6"): 2}  # the least confident pair already has a human grade in the pairs table


def _probs(label: int, conf: float) -> list[float]:
    rest = (1.0 - conf) / 3
    return [conf if g == label else rest for g in range(4)]


def _judgments(tmp: Path, with_confidence: bool = True, extra: list[tuple] = ()) -> Path:
    rows = ROWS + list(extra)
    cols = {
        "qid": [r[0] for r in rows], "docid": [r[1] for r in rows],
        "label": pa.array([r[2] for r in rows], pa.int8()),
        "score": pa.array([float(np.dot(range(4), _probs(r[2], r[3]))) for r in rows], pa.float32()),
        "probs": pa.array([_probs(r[2], r[3]) for r in rows], pa.list_(pa.float32())),
        "judge": ["tiny-judge"] * len(rows), "prompt_version": ["umbrela-v1"] * len(rows),
        "injection": [r[1] == "d4" for r in rows],
        "injection_kind": ["claim" if r[1] == "d4" else None for r in rows],
    }  # fmt: skip
    if with_confidence:
        cols["confidence"] = pa.array([r[3] for r in rows], pa.float32())
    out = tmp / ("judgments" if with_confidence else "judgments-old")
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), out / "part-00000.parquet")
    return out


def _pairs(tmp: Path) -> Path:
    cols = {
        "qid": [r[0] for r in ROWS], "docid": [r[1] for r in ROWS],
        "query": [f"query {r[0]} <b>bold?</b>" for r in ROWS],
        "text": [f"passage {r[1]} for {r[0]}. <script>document.title='pwned'</script>" for r in ROWS],
        "title": [f"title {r[1]}" if r[1] != "d9" else None for r in ROWS],
        "label": pa.array([HUMAN.get((r[0], r[1])) for r in ROWS], pa.int8()),
    }  # fmt: skip
    out = tmp / "pairs"
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), out / "part-00000.parquet")
    return out


def _export(tmp: Path, out: str = "review", **kw) -> tuple[pa.Table, dict]:
    values = {
        "judgments": str(_judgments(tmp)),
        "pairs": str(_pairs(tmp)),
        "out": str(tmp / out),
        "budget": 4,
    }
    values.update(kw)
    cfg = load_config(review.ExportConfig, None, (), **values)
    r = review.export(cfg)
    return pq.read_table(tmp / out / "queue.parquet"), r.counts | r.extra


def _keys(queue: pa.Table) -> list[tuple[str, str]]:
    return list(zip(queue.column("qid").to_pylist(), queue.column("docid").to_pylist(), strict=True))


# ------------------------------------------------------------------------------------------- export


def test_export_uncertain_takes_the_least_confident_unlabelled_pairs_in_order(tmp_path):
    qrels = tmp_path / "extra.qrels"
    qrels.write_text("q1 0 d2 1\n")  # another human label, given with --exclude
    queue, info = _export(tmp_path, exclude=[str(qrels)])
    # by confidence: q2/d6 .27 (human in pairs), q2/d1 .30, q1/d2 .35 (in --exclude), q1/d4 .44, q1/d3 .52, q3/d9 .58
    assert _keys(queue) == [("q2", "d1"), ("q1", "d4"), ("q1", "d3"), ("q3", "d9")]
    assert queue.column("rank").to_pylist() == [1, 2, 3, 4]
    assert queue.column("judge_label").to_pylist() == [0, 3, 2, 1]
    np.testing.assert_allclose(queue.column("confidence").to_pylist(), [0.30, 0.44, 0.52, 0.58], rtol=1e-6)
    assert queue.column("injection").to_pylist() == [False, True, False, False]
    assert queue.column("title").to_pylist() == ["title d1", "title d4", "title d3", None]
    assert set(queue.column_names) >= {"query", "text", "score", "judge", "prompt_version", "injection_kind"}
    assert info["excluded_by_pairs_label"] == 1 and info["excluded_by_qrels"] == 1
    assert info["queued"] == 4 and info["pool"] == 8 and info["confidence_derived"] == 0
    assert read_manifest(tmp_path / "review")["counts"]["queued"] == 4


def test_export_random_and_stratified_never_pick_human_labelled_pairs(tmp_path):
    random1, _ = _export(tmp_path, out="r1", strategy="random", budget=5, seed=1)
    random1b, _ = _export(tmp_path, out="r1b", strategy="random", budget=5, seed=1)
    random2, _ = _export(tmp_path, out="r2", strategy="random", budget=5, seed=2)
    assert _keys(random1) == _keys(random1b) and _keys(random1) != _keys(random2)
    for q in (random1, random2):
        assert len(set(_keys(q))) == 5 and ("q2", "d6") not in _keys(q)
    strat, info = _export(tmp_path, out="s", strategy="stratified", budget=4)
    assert sorted(strat.column("judge_label").to_pylist()) == [0, 1, 2, 3]  # one per judge grade
    assert info["queue_judge_grades"] == {"0": 1, "1": 1, "2": 1, "3": 1}
    everything, info = _export(tmp_path, out="all", strategy="stratified", budget=50)
    assert everything.num_rows == 9 and ("q2", "d6") not in _keys(everything)  # the pool, not the budget


def test_export_writes_label_studio_tasks_and_a_matching_labeling_config(tmp_path):
    queue, _ = _export(tmp_path, budget=5)
    tasks = json.loads((tmp_path / "review" / "tasks.json").read_text())
    root = ET.fromstring((tmp_path / "review" / "label_config.xml").read_text())
    choices = root.find("Choices")
    text = root.find("Text")
    assert choices.get("name") == "grade" and choices.get("toName") == text.get("name") == "passage"
    assert choices.get("choice") == "single" and text.get("value") == "$text"
    assert [(c.get("value"), c.get("hotkey")) for c in choices.findall("Choice")] == [
        (str(g), str(g)) for g in range(4)
    ]
    variables = {h.get("value") for h in root.iter("Header") if h.get("value", "").startswith("$")}
    assert len(tasks) == queue.num_rows
    for t, row in zip(tasks, queue.to_pylist(), strict=True):
        assert set(t) == {"id", "data", "predictions"} and t["id"] == row["rank"]
        assert (t["data"]["qid"], t["data"]["docid"]) == (row["qid"], row["docid"])
        assert all(v[1:] in t["data"] for v in variables | {text.get("value")})  # every $field resolves
        (pred,) = t["predictions"]
        assert pred["model_version"] == "tiny-judge" and pred["score"] == pytest.approx(row["confidence"])
        (res,) = pred["result"]
        assert (res["from_name"], res["to_name"], res["type"]) == ("grade", "passage", "choices")
        assert res["value"] == {"choices": [str(row["judge_label"])]}
    assert tasks[4]["data"]["title"] == ""  # null title still resolves $title


def test_export_derives_confidence_for_old_tables_and_rejects_judgments_without_a_pair(tmp_path):
    old = _judgments(tmp_path, with_confidence=False, extra=[("q9", "d99", 1, 0.1)])
    cfg = load_config(review.ExportConfig, None, (), judgments=str(old), pairs=str(_pairs(tmp_path)),
                      out=str(tmp_path / "old"), budget=3)  # fmt: skip
    r = review.export(cfg)
    queue = pq.read_table(tmp_path / "old" / "queue.parquet")
    assert _keys(queue) == [("q2", "d1"), ("q1", "d2"), ("q1", "d4")]  # p(label), as the new column holds
    np.testing.assert_allclose(queue.column("confidence").to_pylist(), [0.30, 0.35, 0.44], rtol=1e-6)
    assert (
        r.counts["confidence_derived"] == 11 and r.counts["without_pair"] == 1 and r.counts["rejected"] == 1
    )
    (reason,) = read_table(tmp_path / "old" / "rejected").column("reason").to_pylist()
    assert "no pair (q9, d99)" in reason


def test_export_errors_name_the_bad_field_or_file(tmp_path):
    with pytest.raises(ConfigError, match="budget"):
        load_config(review.ExportConfig, None, (), judgments="j", pairs="p", out="o", budget=0)
    with pytest.raises(ConfigError, match="strategy"):
        load_config(
            review.ExportConfig, None, (), judgments="j", pairs="p", out="o", budget=3, strategy="hard"
        )
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"qid": ["q"], "docid": ["d"]}), bad / "part-00000.parquet")
    cfg = load_config(review.ExportConfig, None, (), judgments=str(bad), pairs=str(_pairs(tmp_path)),
                      out=str(tmp_path / "o"), budget=3)  # fmt: skip
    with pytest.raises(DataError, match=r"bad: not a judgments table.*'label'"):
        review.export(cfg)


# ------------------------------------------------------------------------------------------- import


def _ann(choice, cancelled=False, updated="2026-12-03T10:00:00Z", ann_id=1):
    result = [] if choice is None else [
        {"from_name": "grade", "to_name": "passage", "type": "choices", "value": {"choices": [choice]}}
    ]  # fmt: skip
    return {"id": ann_id, "result": result, "was_cancelled": cancelled, "updated_at": updated}


def _task(tid, qid, docid, anns):
    data = {"qid": qid, "docid": docid, "query": "q", "text": "t"}
    return {"id": tid, "data": {k: v for k, v in data.items() if v is not None}, "annotations": anns}


LS_EXPORT = [
    _task(1, "q1", "d1", [_ann("2")]),  # good
    _task(2, "q1", "d2", [_ann("1", ann_id=1), _ann("1", ann_id=2)]),  # two annotators agree
    _task(3, "q1", "d3", []),  # no annotation
    _task(4, "q1", "d4", [_ann("3", cancelled=True)]),  # only a cancelled one
    _task(5, "q2", "d1", [_ann("0", cancelled=True), _ann("3")]),  # cancelled one ignored: 3
    _task(6, "q2", "d2", [_ann("5")]),  # not on the scale
    _task(7, "q2", "d3", [_ann("relevant")]),  # not a grade at all
    _task(8, "q2", "d4", [_ann("1", updated="2026-12-03T09:00:00Z"), _ann("3", updated="2026-12-03T11:00:00Z", ann_id=2)]),
    _task(9, None, "d5", [_ann("2")]),  # missing qid
    _task(10, "q3", "d1", [_ann("2")]),  # the same pair twice, different grades
    _task(11, "q3", "d1", [_ann("0")]),
    _task(12, "q3", "d2", [_ann("1")]),  # the same pair twice, same grade: one label
    _task(13, "q3", "d2", [_ann("1")]),
    _task(14, "q3", "d3", [_ann(None)]),  # an annotation without a grade choice
]  # fmt: skip


def _import(tmp: Path, labels: Path, out: str = "qrels", **kw):
    cfg = load_config(review.ImportConfig, None, (), labels=str(labels), out=str(tmp / out), **kw)
    r = review.import_labels(cfg)
    qrels = read_table(tmp / out)
    got = {
        (q, d): v
        for q, d, v in zip(*(qrels.column(c).to_pylist() for c in ("qid", "docid", "label")), strict=True)
    }
    rejected = read_table(tmp / out / "rejected").to_pylist()
    return got, rejected, r


def test_import_label_studio_export_rejects_every_bad_row_for_its_reason(tmp_path):
    path = tmp_path / "project-1.json"
    path.write_text(json.dumps(LS_EXPORT))
    got, rejected, r = _import(tmp_path, path)
    assert got == {("q1", "d1"): 2, ("q1", "d2"): 1, ("q2", "d1"): 3, ("q3", "d2"): 1}
    assert read_table(tmp_path / "qrels").schema.field("label").type == pa.int8()
    by_line = {x["line"]: x["reason"] for x in rejected}
    assert "no annotation" in by_line[3]
    assert "every annotation was cancelled" in by_line[4]
    assert "choice '5' is not a grade" in by_line[6]
    assert "choice 'relevant' is not a grade" in by_line[7]
    assert "annotations disagree (grades [1, 3])" in by_line[8]
    assert "missing data.qid" in by_line[9]
    assert "(q3, d1) appears 2 times with different grades" in by_line[10] and by_line[10] == by_line[11]
    assert "no 'grade' choice" in by_line[14]
    assert all(x["source"] == str(path) and x["raw"] for x in rejected)
    assert r.counts == {
        "rows_in": 14,
        "labels": 4,
        "rejected": 9,
        "superseded": 0,
        "duplicates_same_grade": 1,
    }
    assert r.extra["rejected_reasons"] == {"cancelled": 1, "conflicting_duplicate": 2, "disagreement": 1,
                                           "missing_id": 1, "no_annotation": 1, "no_grade": 1, "not_a_grade": 2}  # fmt: skip
    # every task is accounted for: a label, a rejection, or a repeat of a label
    assert (
        r.counts["labels"] + r.counts["rejected"] + r.counts["duplicates_same_grade"] == r.counts["rows_in"]
    )
    latest, _, _ = _import(tmp_path, path, out="latest", on_disagreement="latest")
    assert latest[("q2", "d4")] == 3  # the later annotation


def test_import_trec_qrels_file_and_pairs_table(tmp_path):
    trec = tmp_path / "human.qrels"
    trec.write_text("q1 0 d1 2\nq1 0 d2 7\nq1 0 d3\nq2 0 d1 1\nq2 0 d1 3\nq2 0 d2 0\n")
    got, rejected, r = _import(tmp_path, trec)
    assert got == {("q1", "d1"): 2, ("q2", "d2"): 0}
    reasons = sorted(x["reason"] for x in rejected)
    assert len(reasons) == 4 and r.counts["rejected"] == 4
    assert any("unknown grade '7'" in x for x in reasons) and any("expected 4 fields" in x for x in reasons)
    assert sum("(q2, d1) appears 2 times with different grades" in x for x in reasons) == 2
    got, rejected, r = _import(tmp_path, _pairs(tmp_path), out="from-pairs")
    assert got == HUMAN and r.counts["rejected"] == len(ROWS) - 1
    assert {x["reason"] for x in rejected} == {"no label (no 'label' value)"}
    with pytest.raises(DataError, match=r"nolabel.parquet: missing column\(s\) \['label'\]"):
        review.read_labels(str(_write_table_without_label(tmp_path)), [0, 1, 2, 3])


def _write_table_without_label(tmp: Path) -> Path:
    p = tmp / "nolabel.parquet"
    pq.write_table(pa.table({"qid": ["q"], "docid": ["d"]}), p)
    return p


def test_import_grades_log_last_grade_wins_and_a_torn_line_is_rejected(tmp_path):
    log = tmp_path / "grades.jsonl"
    lines = [
        {"qid": "q1", "docid": "d1", "label": 1, "graded_at": "2026-12-03T10:00:00.000+00:00"},
        {"qid": "q1", "docid": "d2", "label": 0, "graded_at": "2026-12-03T10:00:01.000+00:00"},
        {"qid": "q1", "docid": "d1", "label": 3, "graded_at": "2026-12-03T10:00:02.000+00:00"},
    ]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"qid": "q1", "docid": "d3", "lab')
    got, rejected, r = _import(tmp_path, log)
    assert got == {("q1", "d1"): 3, ("q1", "d2"): 0}
    assert r.counts["superseded"] == 1 and r.counts["rejected"] == 1
    assert rejected[0]["line"] == 4 and "not a JSON object" in rejected[0]["reason"]


# -------------------------------------------------------------------------------------------- serve


def _request(url: str, body: object | None = None, ctype: str = "application/json") -> tuple[int, dict]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": ctype} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_review_server_saves_each_grade_before_answering_and_rejects_bad_posts(tmp_path):
    _export(tmp_path)
    cfg = load_config(review.ReviewServeConfig, None, (), queue=str(tmp_path / "review"),
                      out=str(tmp_path / "page"), port=0, reviewer="ann")  # fmt: skip
    server = review.make_server(cfg)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with urllib.request.urlopen(url + "/", timeout=10) as resp:
            assert (
                "augrel review" in resp.read().decode()
                and "default-src 'none'" in resp.headers["Content-Security-Policy"]
            )
        status, queue = _request(url + "/api/queue")
        assert status == 200 and [it["docid"] for it in queue["items"]] == ["d1", "d2", "d4", "d3"]
        assert _request(url + "/api/grades", {"qid": "q2", "docid": "d1", "label": 2}, "text/plain")[0] == 415
        assert _request(url + "/api/grades", b"{not json")[0] == 400
        status, err = _request(url + "/api/grades", {"qid": "q2", "docid": "nope", "label": 2})
        assert status == 404 and "(q2, nope) is not in the queue" in err["error"]
        status, err = _request(url + "/api/grades", {"qid": "q2", "docid": "d1", "label": 4})
        assert status == 400 and err["error"].startswith("label: 4 is not a grade")
        assert _request(url + "/api/grades", {"qid": "q2", "docid": "d1", "label": True})[0] == 400
        status, ok = _request(url + "/api/grades", {"qid": "q2", "docid": "d1", "label": 2})
        assert status == 200 and ok == {"saved": True, "graded": 1, "of": 4}
        # acknowledged means on disk: the line is there before anything else happens
        (line,) = (tmp_path / "page" / "grades.jsonl").read_text().splitlines()
        assert json.loads(line) | {"graded_at": None} == {"qid": "q2", "docid": "d1", "label": 2, "rank": 1,
                                                           "reviewer": "ann", "graded_at": None}  # fmt: skip
        _request(url + "/api/grades", {"qid": "q2", "docid": "d1", "label": 0})
        assert _request(url + "/api/grades")[1]["grades"] == [{"qid": "q2", "docid": "d1", "label": 0}]

        class DiskFull:  # writes half the line, then fails, as a full disk does
            def __init__(self, fh):
                self.fh = fh

            def write(self, data):
                self.fh.write(data[: len(data) // 2])
                self.fh.flush()
                raise OSError(28, "No space left on device")

        real = server.log.fh
        server.log.fh = DiskFull(real)
        status, err = _request(url + "/api/grades", {"qid": "q1", "docid": "d2", "label": 1})
        assert status == 500 and "No space left on device" in err["error"]
        server.log.fh = real
        assert _request(url + "/api/grades")[1]["graded"] == 1  # the failed grade is not counted
        status, ok = _request(url + "/api/grades", {"qid": "q1", "docid": "d2", "label": 1})  # pressed again
        assert status == 200 and ok["graded"] == 2
    finally:
        server.shutdown()
        server.server_close()
        server.log.close()
    # a torn last line (a crash mid-write, never acknowledged) is skipped and the next grade starts a new line
    with open(tmp_path / "page" / "grades.jsonl", "a") as fh:
        fh.write('{"qid": "q1", "docid": "d4", "la')
    server = review.make_server(cfg)
    try:
        assert server.log.current == {("q2", "d1"): 0, ("q1", "d2"): 1}
        server.log.record("q1", "d4", 3)
    finally:
        server.server_close()
        server.log.close()
    got, rejected, r = _import(tmp_path, tmp_path / "page" / "grades.jsonl")
    assert got == {("q2", "d1"): 0, ("q1", "d2"): 1, ("q1", "d4"): 3} and r.counts["superseded"] == 1
    assert [x["reason"].startswith("not a JSON object") for x in rejected] == [
        True,
        True,
    ]  # the two cut lines


class _Page:
    """One Chromium tab driven over the DevTools protocol (websockets ships with ray[serve]'s uvicorn[standard])."""

    def __init__(self, browser: str, url: str, profile: Path):
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        port_file = profile / "DevToolsActivePort"
        port = _wait(lambda: port_file.exists() and port_file.read_text().split("\n")[0], "DevTools port")
        targets = _wait(lambda: [t for t in json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/json/list", timeout=5).read()) if t["type"] == "page"], "a page target")  # fmt: skip
        self.ws = connect(targets[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=20)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]

    def text(self, element_id: str) -> str:
        r = self.call("Runtime.evaluate", expression=f"document.getElementById('{element_id}').textContent",
                      returnByValue=True)  # fmt: skip
        return r["result"].get("value")

    def wait_text(self, element_id: str, expected: str) -> None:
        _wait(
            lambda: self.text(element_id) == expected,
            f"#{element_id} == {expected!r} (is {self.text(element_id)!r})",
        )

    def press(self, key: str) -> None:
        code = {"ArrowLeft": 37, "ArrowRight": 39}[key] if len(key) > 1 else ord(key)
        text = {"text": key} if len(key) == 1 else {}
        self.call("Input.dispatchKeyEvent", type="keyDown", key=key, windowsVirtualKeyCode=code, **text)
        self.call("Input.dispatchKeyEvent", type="keyUp", key=key, windowsVirtualKeyCode=code)

    def close(self) -> None:
        self.ws.close()
        self.proc.kill()
        self.proc.wait(timeout=30)


def _wait(probe, what: str, deadline_s: float = 30.0):
    """Poll until ``probe`` returns something truthy; the deadline only bounds a hang, it asserts no timing."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            v = probe()
        except (OSError, ValueError):
            v = None
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def _start_server(queue: Path, out: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "review", "serve", "--queue", str(queue), "--out", str(out),
         "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()  # the server prints its address once it listens
    assert f"http://127.0.0.1:{port}/" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


@pytest.mark.timeout(180)
def test_review_page_in_headless_chromium_loses_no_saved_grade_when_the_server_is_killed(tmp_path):
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless Chromium (make test installs Debian's chromium where apt-get is available)")
    queue, _ = _export(tmp_path)
    items = queue.to_pylist()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "page"
    log = out / "grades.jsonl"
    server = _start_server(tmp_path / "review", out, port)
    page = None
    try:
        page = _Page(browser, f"http://127.0.0.1:{port}/", tmp_path / "chromium")
        page.wait_text("progress", "0 graded of 4")
        assert page.text("query") == items[0]["query"] and page.text("title") == items[0]["title"]
        assert page.text("text") == items[0]["text"]  # the passage's <script> is shown as text, never run
        assert (
            page.call("Runtime.evaluate", expression="document.title")["result"]["value"] == "augrel review"
        )
        assert page.text("judge") == "judge (tiny-judge): grade 0, confidence 0.30"
        for n, key in enumerate("230", 1):
            page.press(key)
            page.wait_text("progress", f"{n} graded of 4")
        page.wait_text("position", "pair 4 of 4")
        page.press("ArrowLeft")
        page.wait_text("position", "pair 3 of 4")
        page.press("1")  # a changed mind: the last grade of a pair wins
        page.wait_text("position", "pair 4 of 4")
        assert page.text("progress") == "3 graded of 4"
        saved = [json.loads(x) for x in log.read_text().splitlines()]
        assert [(x["qid"], x["docid"], x["label"]) for x in saved] == [
            (items[i]["qid"], items[i]["docid"], g) for i, g in ((0, 2), (1, 3), (2, 0), (2, 1))
        ]

        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        page.press("2")  # nobody answers: the page must say so and keep the pair
        _wait(lambda: page.text("status").startswith("NOT saved"), "the page to report the failed save")
        assert page.text("progress") == "3 graded of 4" and page.text("position") == "pair 4 of 4"

        server = _start_server(tmp_path / "review", out, port)
        page.call("Page.reload", ignoreCache=True)
        page.wait_text("progress", "3 graded of 4")
        page.wait_text("position", "pair 4 of 4")  # the first ungraded pair
        assert page.text("query") == items[3]["query"]
        page.press("ArrowLeft")
        page.wait_text("position", "pair 3 of 4")
        assert page.call("Runtime.evaluate", returnByValue=True, expression=(
            "[...document.querySelectorAll('#buttons button.mine')].map(b => b.dataset.grade).join()"))["result"]["value"] == "1"  # fmt: skip
        page.press("ArrowRight")
        page.press("1")
        page.wait_text("progress", "4 graded of 4")
        page.wait_text("position", "end of queue")
    finally:
        if page is not None:
            page.close()
        server.kill()
        server.wait(timeout=30)
    got, rejected, r = _import(tmp_path, log)
    assert got == {(items[i]["qid"], items[i]["docid"]): g for i, g in ((0, 2), (1, 3), (2, 1), (3, 1))}
    assert rejected == [] and r.counts["superseded"] == 1


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_round_trip_export_label_studio_import(tmp_path, capsys):
    judgments, pairs = _judgments(tmp_path), _pairs(tmp_path)
    out = tmp_path / "cli"
    assert main(["review", "export", "--judgments", str(judgments), "--pairs", str(pairs), "--budget", "3",
                 "--strategy", "uncertain", "--out", str(out)]) == 0  # fmt: skip
    assert "review.export: " in capsys.readouterr().out
    # a reviewer accepts every prediction in Label Studio: the export carries them back as annotations
    tasks = json.loads((out / "tasks.json").read_text())
    exported = [dict(t, annotations=[{"id": 1, "result": t["predictions"][0]["result"], "was_cancelled": False}])
                for t in tasks]  # fmt: skip
    (tmp_path / "ls.json").write_text(json.dumps(exported))
    assert main(["review", "import", "--labels", str(tmp_path / "ls.json"), "--out", str(tmp_path / "q"),
                 "--queue", str(out)]) == 0  # fmt: skip
    queue = pq.read_table(out / "queue.parquet")
    qrels = read_table(tmp_path / "q")
    assert qrels.column("label").to_pylist() == queue.column("judge_label").to_pylist()
    # the labelled pairs calibrate and finetune read: the queue's texts with the human grades, all valid
    from pipelines.judge import read_pairs

    pairs, bad = read_pairs(str(tmp_path / "q" / "pairs"))
    assert bad.num_rows == 0 and pairs.num_rows == 3
    texts = ["qid", "docid", "query", "text", "title"]
    assert pairs.select(texts).to_pylist() == queue.select(texts).to_pylist()
    assert pairs.column("label").to_pylist() == qrels.column("label").to_pylist()
    assert read_manifest(tmp_path / "q")["counts"]["labels_not_in_queue"] == 0
    assert (
        main(["review", "import", "--labels", str(tmp_path / "nothing.json"), "--out", str(tmp_path / "x")])
        == 2
    )
    assert "nothing.json: no such file" in capsys.readouterr().err
    assert main(["review", "import", "--labels", "x", "--out", "y", "--grades", "0,a"]) == 2
    assert "--grades '0,a'" in capsys.readouterr().err


def test_imported_pairs_feed_judge_calibrate_beside_pairs_with_urls(tmp_path):
    """Found on DL19: calibrate's reader selected a url column the imported pairs (like any pairs table) may lack."""
    from pipelines.finetune_judge import _labelled

    out = tmp_path / "review"
    assert main(["review", "export", "--judgments", str(_judgments(tmp_path)), "--pairs", str(_pairs(tmp_path)),
                 "--budget", "3", "--out", str(out)]) == 0  # fmt: skip
    graded = [{"qid": t["data"]["qid"], "docid": t["data"]["docid"], "label": 1} for t in
              json.loads((out / "tasks.json").read_text())]  # fmt: skip
    (tmp_path / "grades.jsonl").write_text("".join(json.dumps(g) + "\n" for g in graded))
    assert main(["review", "import", "--labels", str(tmp_path / "grades.jsonl"), "--queue", str(out),
                 "--out", str(tmp_path / "q")]) == 0  # fmt: skip
    natural = tmp_path / "natural"
    natural.mkdir()
    row = {
        "qid": ["q9"],
        "docid": ["d1"],
        "query": ["q"],
        "text": ["t"],
        "title": [None],
        "url": ["http://x"],
    }
    pq.write_table(pa.table(row | {"label": pa.array([0], pa.int8())}), natural / "part-00000.parquet")
    pool = _labelled([str(natural), str(tmp_path / "q" / "pairs")])
    assert pool.num_rows == 4
    assert pool.column("url").to_pylist() == ["http://x", None, None, None]
    assert sorted(zip(pool.column("docid").to_pylist()[1:], pool.column("label").to_pylist()[1:], strict=True)) == \
        sorted((g["docid"], 1) for g in graded)  # fmt: skip


@pytest.mark.parametrize("action", ["export", "import", "serve"])
def test_cli_help_explains_each_review_command_with_an_example(action, capsys):
    with pytest.raises(SystemExit) as e:
        main(["review", action, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert f"augrel review {action} --" in text and "example" in text


def test_serve_refuses_a_missing_queue_naming_the_file(tmp_path):
    cfg = load_config(
        review.ReviewServeConfig, None, (), queue=str(tmp_path / "none"), out=str(tmp_path / "o")
    )
    with pytest.raises(DataError, match=r"none/queue\.parquet: no review queue"):
        review.make_server(cfg)
    assert os.listdir(tmp_path) == []
