"""``augrel judge diff`` on two tiny judges: the tiny random LM zero-shot (umbrela-v1) as A, and a judge directory
of the same LM with the basic-v1 prompt as B (different prompts give different grades)."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.judge_card import CARD, JudgeCard
from pipelines.cli import main
from pipelines.errors import ConfigError, DataError
from pipelines.io import read_table
from pipelines.judge_diff import JudgeDiffConfig, run

QUERIES = {"q1": "what is the population of the town", "q2": "who is the ceo of the company",
           "q3": "where does the species live", "q4": "when was the town founded"}  # fmt: skip
TEXTS = ["the town population is", "the company ceo", "the species lives in the river", "the town was founded",
         "a river of the town", "what the species eats"]  # fmt: skip


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    rows = []
    for qi, (qid, query) in enumerate(QUERIES.items()):
        for di, text in enumerate(TEXTS):
            label = (qi + di) % 4 if di < 4 else None  # some pairs carry a human grade, some do not
            rows.append({"qid": qid, "docid": f"d{di}", "query": query, "text": text, "label": label})
    rows.append({"qid": "q5", "docid": "d0", "query": " ", "text": "the town"})  # rejected: empty query
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def judge_b(tiny_causal_lm, pairs_path, tmp_path_factory):
    """The random tiny LM gives every pair the same argmax grade; B cuts its expected grade at the quartiles
    of these pairs (as `judge finetune` tunes cut-points), so its labels spread over the grades."""
    import numpy as np

    from models.judge_card import load_judge

    tiny = load_judge(str(tiny_causal_lm), template="basic-v1", dtype="fp32", device="cpu")
    score = tiny.scorer(8).score([QUERIES[q] for q in QUERIES for _ in TEXTS], TEXTS * len(QUERIES)).score
    out = tmp_path_factory.mktemp("judge-b")
    JudgeCard(base_model=str(tiny_causal_lm), prompt_template="basic-v1", prompt_version="basic-v1",
              adapter=None, cutpoints=np.quantile(score, [0.25, 0.5, 0.75]).tolist()).save(out)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def diffed(tiny_causal_lm, judge_b, pairs_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("diff") / "d"
    cfg = JudgeDiffConfig(a=str(tiny_causal_lm), b=str(judge_b), pairs=str(pairs_path), out=str(out),
                          dtype="fp32", device="cpu", bootstrap=50, top=5, batch_size=8)  # fmt: skip
    return cfg, run(cfg)


def test_diff_of_two_tiny_judges(diffed, judge_b):
    cfg, r = diffed
    out = cfg.out
    d = json.loads(Path(out, "diff.json").read_text())
    n = len(QUERIES) * len(TEXTS)
    assert d["pairs"] == n and d["queries"] == 4 and d["pairs_rejected"] == 1
    assert r.counts["pairs"] == n and r.counts["left_out"] == 0
    assert sum(map(sum, d["transitions"])) == n
    assert (
        sum(v["a"] for v in d["distribution"].values())
        == n
        == sum(v["b"] for v in d["distribution"].values())
    )
    assert d["changed"]["pairs"] == r.counts["changed"] > 0  # two prompts, two sets of grades
    assert len(d["top_moved"]) == 5 and d["top_moved"][0]["query"] in QUERIES.values()
    assert d["top_moved"][0]["text"] in TEXTS
    assert len(d["per_query"]) == 4 and sum(q["pairs"] for q in d["per_query"]) == n
    assert d["human"]["pairs"] == 16 and d["human"]["cohen_kappa"]["diff_ci95"] is not None
    assert d["a"]["source"] == "judged" and d["b"]["source"] == "judged" and d["b"]["kind"] == "judge_dir"
    html = Path(out, "diff.html").read_text()
    assert "Grade transitions" in html and TEXTS[0] in html and "Against the human grades" in html
    a, b = read_table(f"{out}/a"), read_table(f"{out}/b")
    assert a.num_rows == b.num_rows == n and all(
        v.startswith("basic-v1") for v in b.column("prompt_version").to_pylist()
    )
    assert read_table(f"{out}/rejected").num_rows == 1
    # --record is on for a judge directory B: its card keeps the summary, one entry per A
    card = JudgeCard.load(judge_b)
    (entry,) = card.audit["diffs"]
    assert entry["against"] == cfg.a and entry["pairs"] == n and entry["changed"] == d["agreement"]["changed"]
    assert entry["kappa_ab"] == pytest.approx(d["agreement"]["cohen_kappa"], nan_ok=True)
    assert set(entry["label_shift"]) == {"0", "1", "2", "3"} and entry["at"]
    assert r.extra["recorded"] == str(judge_b / CARD)


def test_rerun_reuses_judgments_and_keeps_one_entry_per_a(diffed, judge_b, tiny_causal_lm, tmp_path):
    cfg, first = diffed
    again = run(cfg.model_copy(update={"bootstrap": 20}))
    d = json.loads(Path(cfg.out, "diff.json").read_text())
    assert d["a"]["source"] == d["b"]["source"] == "reused"
    assert again.counts == first.counts
    assert len(JudgeCard.load(judge_b).audit["diffs"]) == 1
    # two judgments tables compare without a model or pairs, through the CLI; no card, so nothing recorded
    out = tmp_path / "tables"
    assert (
        main(["judge", "diff", f"{cfg.out}/a", f"{cfg.out}/b", "--out", str(out), "--set", "bootstrap=10"])
        == 0
    )
    t = json.loads((out / "diff.json").read_text())
    assert t["pairs"] == d["pairs"] and t["agreement"]["changed"] == d["agreement"]["changed"]
    assert t["a"]["kind"] == "judgments" and t["human"] is None and t["top_moved"][0]["text"] is None
    assert len(JudgeCard.load(judge_b).audit["diffs"]) == 1
    # a different A adds an entry beside the first
    JudgeCard(base_model=str(tiny_causal_lm), prompt_template="umbrela-v1", prompt_version="umbrela-v1",
              adapter=None).save(tmp_path / "judge-a")  # fmt: skip
    run(cfg.model_copy(update={"a": str(tmp_path / "judge-a"), "out": str(tmp_path / "d2"), "bootstrap": 0}))
    assert [e["against"] for e in JudgeCard.load(judge_b).audit["diffs"]] == [
        cfg.a,
        str(tmp_path / "judge-a"),
    ]


def test_old_card_without_audit_loads(tmp_path):
    card = JudgeCard(base_model="m", prompt_template="umbrela-v1", prompt_version="umbrela-v1")
    raw = json.loads(card.save(tmp_path).read_text())
    raw.pop("audit")
    (tmp_path / CARD).write_text(json.dumps(raw))
    assert JudgeCard.load(tmp_path).audit == {}


def test_errors_name_the_bad_argument(diffed, tmp_path, capsys, monkeypatch):
    cfg, _ = diffed
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(
        ConfigError, match=r"^b: runs/judge-v2: no such judge directory"
    ):  # a typo, not a hub id
        run(cfg.model_copy(update={"b": "runs/judge-v2", "out": str(tmp_path / "x")}))
    off_scale = read_table(f"{cfg.out}/b")
    off_scale = off_scale.set_column(2, "label", pa.array([7] * off_scale.num_rows, pa.int8()))
    pq.write_table(off_scale, tmp_path / "runs" / "part-00000.parquet")
    with pytest.raises(DataError, match=r"label_b: grades \[7\] are not among .*label_b: b = runs"):
        run(cfg.model_copy(update={"a": f"{cfg.out}/a", "b": "runs", "out": str(tmp_path / "x")}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^b: .*empty is a directory with neither judge_card.json"):
        run(cfg.model_copy(update={"b": str(tmp_path / "empty"), "out": str(tmp_path / "x")}))
    with pytest.raises(ConfigError, match=r"^a: .*no such judge directory"):
        run(cfg.model_copy(update={"a": str(tmp_path / "missing"), "out": str(tmp_path / "x")}))
    with pytest.raises(ConfigError, match=r"^record: b .* is not a judge directory"):
        run(cfg.model_copy(update={"a": f"{cfg.out}/a", "b": f"{cfg.out}/b", "record": True,
                                   "out": str(tmp_path / "x")}))  # fmt: skip
    with pytest.raises(ConfigError, match=r"^pairs: a .* needs --pairs"):
        run(cfg.model_copy(update={"pairs": None, "out": str(tmp_path / "x")}))
    pq.write_table(pa.table({"qid": ["q"], "docid": ["d"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet: not a pairs table.*(query|text)"):
        run(cfg.model_copy(update={"pairs": str(tmp_path / "bad.parquet"), "out": str(tmp_path / "x")}))
    (tmp_path / "notj").mkdir()
    pq.write_table(pa.table({"qid": ["q"], "docid": ["d"]}), tmp_path / "notj" / "part-00000.parquet")
    assert main(["judge", "diff", f"{cfg.out}/a", str(tmp_path / "notj"), "--out", str(tmp_path / "y")]) == 2
    assert "b: " in capsys.readouterr().err


def test_recording_an_audit_leaves_the_judge_stage_unchanged_for_augrel_run(tmp_path):
    from pipelines.judge_diff import record_audit
    from pipelines.run import OutputHasher

    card = JudgeCard(base_model="m", prompt_template="umbrela-v1", prompt_version="umbrela-v1")
    raw = json.loads(card.save(tmp_path / "judge").read_text())
    raw.pop("audit")
    (tmp_path / "judge" / CARD).write_text(json.dumps(raw, indent=2) + "\n")  # a card from before audits
    hasher = OutputHasher({})
    before = hasher(tmp_path, ("judge",))
    record_audit(tmp_path / "judge", {"against": "old-judge", "pairs": 3, "kappa_ab": 0.5})
    assert JudgeCard.load(tmp_path / "judge").audit["diffs"][0]["against"] == "old-judge"
    assert hasher(tmp_path, ("judge",)) == before
    card = JudgeCard.load(tmp_path / "judge")
    card.cutpoints = [0.5, 1.5, 2.5]
    card.save(tmp_path / "judge")
    assert hasher(tmp_path, ("judge",)) != before
