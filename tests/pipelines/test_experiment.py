"""The augmentation experiment keeps the judge out of sample: it reads which queries trained, validated or
calibrated the judge from the files `judge finetune`, `judge calibrate` and `annotate` write, and refuses to
score any of them."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from models.features import FEATURES
from models.judge_card import JudgeCard
from pipelines.annotate import AnnotateConfig
from pipelines.calibrate_judge import CalibrateConfig
from pipelines.errors import DataError
from pipelines.experiment import AugmentConfig, augment, judge_label_queries
from pipelines.finetune_judge import FinetuneConfig
from pipelines.io import write_table
from pipelines.stage import write_stage_files

QUERIES = [f"dl{i}" for i in range(8)]


@pytest.fixture
def features_dir(tmp_path):
    """8 queries x 12 pairs whose human grade drives the overlap feature (a ranker can learn it)."""
    rng = np.random.default_rng(0)
    qids = np.repeat(QUERIES, 12)
    label = rng.integers(0, 4, size=len(qids))
    cols = {"qid": pa.array(qids), "docid": pa.array([f"d{i}" for i in range(len(qids))]),
            "label": pa.array(label, pa.int8())}  # fmt: skip
    for f in FEATURES:
        cols[f] = pa.array(rng.random(len(qids)), pa.float32())
    cols["overlap"] = pa.array(label / 3 + 0.3 * rng.random(len(qids)), pa.float32())
    t = pa.table(cols)
    write_table(tmp_path / "features", t)
    write_table(tmp_path / "pairs", t.select(["qid", "docid", "label"]))
    return tmp_path / "features"


def _pairs(path, qids):
    write_table(
        path, pa.table({"qid": qids, "docid": [f"x{i}" for i in range(len(qids))], "label": [0] * len(qids)})
    )
    return str(path)


def _finetuned_judge(tmp_path, train_qids, val_qids=None):
    """A judge directory as `judge finetune` leaves it (card with its data sources, config, manifest)."""
    judge = tmp_path / "judge"
    train = _pairs(tmp_path / "judge-train", train_qids)
    val = [_pairs(tmp_path / "judge-val", val_qids)] if val_qids else None
    cfg = FinetuneConfig(train=[train], val=val, out=str(judge))
    JudgeCard(base_model="gemma3-270m", prompt_template="umbrela-v1", prompt_version="v1",
              data={"train_sources": [train], "val_sources": val or "held-out queries of train",
                    "train_queries": len(set(train_qids)), "val_queries": len(set(val_qids or []))}).save(judge)  # fmt: skip
    write_stage_files(judge, "judge.finetune", cfg, {}, [train], 0.0)
    return judge


def _judgments(tmp_path, judge, features_dir, name="judgments"):
    """Judgments as `annotate` leaves them: the judge's labels (here: the human grade) with config + manifest."""
    from pipelines.annotate import _card_dict
    from pipelines.io import read_table

    t = read_table(features_dir)
    out = tmp_path / name
    write_table(out, pa.table({"qid": t.column("qid"), "docid": t.column("docid"), "label": t.column("label"),
                               "score": t.column("label").cast(pa.float32())}))  # fmt: skip
    cfg = AnnotateConfig(judge=str(judge), pairs=str(tmp_path / "pairs"), out=str(out))
    write_stage_files(out, "annotate", cfg, {}, [cfg.pairs], 0.0, {"judge_card": _card_dict(str(judge))})
    return str(out)


def _augment(features_dir, judgments, out, **kw):
    return augment(AugmentConfig(features=str(features_dir), judgments=judgments, out=str(out), folds=2, seeds=[0],
                                 methods=["bm25", "h20", "h20+judge", "h100"],
                                 ranker={"n_estimators": 10, "min_data_in_leaf": 2}, **kw))  # fmt: skip


def test_augment_refuses_a_judge_that_trained_or_validated_on_a_scored_query(tmp_path, features_dir):
    judge = _finetuned_judge(tmp_path, ["llmj1", "llmj2"], val_qids=["llmj3", "dl5"])
    judgments = _judgments(tmp_path, judge, features_dir)
    with pytest.raises(DataError, match=r"1 of the 8 queries this experiment scores \(first: \['dl5'\]\)"):
        _augment(features_dir, judgments, tmp_path / "aug")


def test_augment_with_an_out_of_sample_judge_says_who_trained_what(tmp_path, features_dir):
    judge = _finetuned_judge(tmp_path, ["llmj1", "llmj2", "llmj3"])
    r = _augment(features_dir, _judgments(tmp_path, judge, features_dir), tmp_path / "aug")
    prov = json.loads((tmp_path / "aug" / "provenance.json").read_text())
    assert (
        prov["judge_queries"] == 3 and prov["judge_queries_scored_here"] == 0 and prov["scored_queries"] == 8
    )
    assert r.extra["provenance"] == prov
    table = (tmp_path / "aug" / "table.md").read_text()
    assert "trained on the human labels of 3 queries (3 to train), from" in table
    assert (
        "| LambdaMART, 20% human + judge on the rest | 20% of the training folds' human labels + judge"
        in table
    )
    assert "| BM25 | no labels |" in table


def test_judge_label_queries_adds_calibration_pairs_and_knows_a_zero_shot_judge(tmp_path, features_dir):
    from models.judge_ensemble import COMBINER_FILE

    judge = _finetuned_judge(tmp_path, ["llmj1"], val_qids=["llmj2"])
    calib = _pairs(tmp_path / "calib", ["llmj7", "llmj8"])
    card = JudgeCard.load(judge)
    card.combiner = COMBINER_FILE
    card.save(judge)
    (judge / COMBINER_FILE).write_text("{}")
    write_stage_files(judge, "judge.calibrate", CalibrateConfig(judge=str(judge), pairs=[calib], out=str(judge)),
                      {}, [calib], 0.0)  # fmt: skip
    info = judge_label_queries(_judgments(tmp_path, judge, features_dir))
    assert info["queries"] == {"llmj1", "llmj2", "llmj7", "llmj8"} and info["calibrated"] == 2
    assert info["judge"] == "gemma3-270m+lora+stack"
    assert info["trained"] == 1 and info["validated"] == 1

    zero_shot = judge_label_queries(_judgments(tmp_path, "gemma3-270m", features_dir, "zs"))
    assert zero_shot["queries"] == set() and zero_shot["judge"] == "gemma3-270m"


def test_judge_labels_of_unknown_origin_need_their_queries_named(tmp_path, features_dir):
    from pipelines.io import read_table

    t = read_table(features_dir)
    write_table(
        tmp_path / "bare", t.select(["qid", "docid", "label"]).append_column("score", t.column("overlap"))
    )
    with pytest.raises(DataError, match="set judge_label_queries"):
        _augment(features_dir, str(tmp_path / "bare"), tmp_path / "aug")
    with pytest.raises(DataError, match=r"first: \['dl0'\]"):
        _augment(features_dir, str(tmp_path / "bare"), tmp_path / "aug", judge_label_queries=["dl0"])
    r = _augment(features_dir, str(tmp_path / "bare"), tmp_path / "aug", judge_label_queries=["elsewhere"])
    assert r.extra["provenance"]["judge_queries"] == 1
