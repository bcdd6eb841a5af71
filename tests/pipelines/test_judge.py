import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import tables as T
from pipelines.errors import DataError
from pipelines.io import read_table
from pipelines.judge import EvalConfig, PredictConfig, evaluate, predict


@pytest.fixture(scope="module")
def judged(tiny_causal_lm, synth_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("judged") / "j"
    r = predict(PredictConfig(judge=str(tiny_causal_lm), pairs=str(synth_dataset / "pairs"), out=str(out),
                              limit=60, dtype="fp32", batch_size=8))  # fmt: skip
    return out, r


def test_predict_writes_a_valid_judgments_table(judged):
    out, r = judged
    t = read_table(out)
    assert t.num_rows == 60 and r.counts == {"pairs_in": 60, "judged": 60, "rejected": 0}
    assert T.check(T.JUDGMENTS, t) == []
    # a base model is read behind the injection detector (strip): the version says so
    assert set(t.column("prompt_version").to_pylist()) == {
        r.extra["judge_card"]["prompt_version"] + "+detector-v2:strip"
    }
    # confidence is the judge's probability of its own label; nothing in the synthetic passages is flagged
    probs, label = t.column("probs").to_pylist(), t.column("label").to_pylist()
    assert t.column("confidence").to_pylist() == pytest.approx(
        [p[g] for p, g in zip(probs, label, strict=True)]
    )
    assert t.column("injection").to_pylist() == [False] * 60 and t.column("injection_kind").null_count == 60
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["table"] == "judgments" and manifest["pairs_per_s"] > 0


def test_eval_writes_metrics_and_plots(judged, synth_dataset, tmp_path):
    out, _ = judged
    evaluate(
        EvalConfig(judgments=str(out), qrels=str(synth_dataset / "qrels"), out=str(tmp_path), bootstrap=20)
    )
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["n_pairs"] == 60 and "cohen_kappa" in m["metrics"] and "kendall_tau_b_pooled" in m["ci95"]
    assert m["unmatched"]["human_labels_not_judged"] > 0
    assert (tmp_path / "confusion.png").exists() and (tmp_path / "calibration.png").exists()


def test_bad_pairs_rejected_and_missing_columns_named(tiny_causal_lm, tmp_path):
    rows = [
        {"qid": "q1", "docid": "d1", "query": "what is the town", "text": ""},  # empty passage: judged
        {"qid": "q1", "docid": "d2", "query": " ", "text": "the town"},  # empty query: rejected
        {"qid": "q2", "docid": "d1", "query": "who", "text": "the ceo " * 400},  # overlong: truncated
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    r = predict(PredictConfig(judge=str(tiny_causal_lm), pairs=str(tmp_path / "pairs.parquet"),
                              out=str(tmp_path / "j"), dtype="fp32", max_doc_tokens=32))  # fmt: skip
    assert r.counts == {"pairs_in": 3, "judged": 2, "rejected": 1} and r.extra["truncated"] == 1
    assert "query: empty string" in read_table(tmp_path / "j" / "rejected").column("reason")[0].as_py()
    pq.write_table(pa.table({"qid": ["q"], "docid": ["d"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"query.*text|text.*query"):
        predict(
            PredictConfig(
                judge=str(tiny_causal_lm), pairs=str(tmp_path / "bad.parquet"), out=str(tmp_path / "x")
            )
        )
