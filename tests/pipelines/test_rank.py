"""Learning to rank: the features stage on Ray, label sources, predict/eval, and the augmentation experiment."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from models.features import FEATURES
from pipelines.errors import DataError
from pipelines.io import read_table, write_table
from pipelines.rank import (
    FeaturesConfig,
    RankEvalConfig,
    RankPredictConfig,
    RankTrainConfig,
    attach_judge,
    evaluate,
    features,
    fit_ranker,
    human_mask,
    predict,
    read_features,
    run_table,
    split_queries,
    train,
    training_labels,
)


@pytest.fixture(scope="module")
def feature_table(ray_session, synth_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("rank") / "features"
    # two actors, so the stage's one table must be spread over the pool (test_features_use_every_actor)
    r = features(FeaturesConfig(pairs=str(synth_dataset / "pairs"), docs=str(synth_dataset / "docs"), out=str(out),
                                concurrency=(2, 2), num_cpus_per_actor=0.5, batch_size=64))  # fmt: skip
    return out, r


def _judgments(feature_dir, path, flip: float = 0.0, seed: int = 0):
    """A judge's labels for the same pairs: the human grade, with a share ``flip`` replaced at random."""
    t = read_table(feature_dir)
    rng = np.random.default_rng(seed)
    label = t.column("label").to_numpy(zero_copy_only=False).astype(np.int8)
    flipped = rng.random(len(label)) < flip
    label[flipped] = rng.integers(0, 4, size=int(flipped.sum()))
    write_table(path, pa.table({"qid": t.column("qid"), "docid": t.column("docid"), "label": pa.array(label, pa.int8()),
                                "score": pa.array(label.astype(np.float32))}))  # fmt: skip
    return path


def test_features_stage_writes_every_pair_with_finite_features(feature_table, synth_dataset):
    out, r = feature_table
    t = read_table(out)
    pairs = read_table(synth_dataset / "pairs")
    assert t.num_rows == pairs.num_rows == r.counts["pairs"]
    assert sorted(zip(t.column("qid").to_pylist(), t.column("docid").to_pylist(), strict=True)) == sorted(
        zip(pairs.column("qid").to_pylist(), pairs.column("docid").to_pylist(), strict=True))  # fmt: skip
    X = np.column_stack([t.column(f).to_numpy() for f in FEATURES])
    assert np.isfinite(X).all() and (t.column("dense_cos").to_numpy() <= 1.0001).all()
    # grade-3 pairs state the asked fact: they overlap the query more than grade-0 pairs on average
    lab, ov = t.column("label").to_numpy(), t.column("overlap").to_numpy()
    assert ov[lab == 3].mean() > ov[lab == 0].mean()
    assert "_actor" not in t.column_names


def test_features_use_every_actor(feature_table):
    """One pairs file is one block to Ray Data: cut into blocks, it keeps both actors of a (2, 2) pool busy."""
    _, r = feature_table
    per_actor = r.extra["rows_per_actor"]
    assert len(per_actor) == 2 and all(n > 0 for n in per_actor.values()), per_actor
    assert sum(per_actor.values()) == r.counts["pairs"]


def test_plan_blocks_gives_every_actor_work_in_bounded_blocks():
    from pipelines.rank import BATCHES_PER_BLOCK, plan_blocks

    assert plan_blocks(1_000_000, 8, 256) == (1024, 256)  # 977 blocks of 4 batches
    rows, batch = plan_blocks(10, 8, 256)  # fewer rows than actors x batch: smaller batches
    assert batch == 1 and rows == 1
    rows, batch = plan_blocks(600, 2, 256)
    assert batch == 150 and -(-600 // rows) >= 4 and rows <= BATCHES_PER_BLOCK * batch
    assert plan_blocks(0, 2, 256) == (1, 1)


def test_human_mask_keeps_a_share_of_each_query():
    qids = ["a"] * 10 + ["b"] * 5 + ["c"] * 3
    has = np.ones(18, bool)
    has[15:] = False  # c has no human label
    keep = human_mask(qids, has, 0.2, seed=0)
    assert keep[:10].sum() == 2 and keep[10:15].sum() == 1 and keep[15:].sum() == 0
    assert (human_mask(qids, has, 0.2, seed=0) == keep).all() and (human_mask(qids, has, 1.0, 0) == has).all()


def test_label_sources():
    t = pa.table(
        {"label": pa.array([3, 0, None, 1], pa.int8()), "judge_label": pa.array([2, 2, 1, None], pa.int8())}
    )
    keep = np.array([True, False, False, True])
    ((idx, y),) = training_labels(t, "human", keep)
    assert idx.tolist() == [0, 3] and y.tolist() == [3, 1]
    ((idx, y),) = training_labels(t, "mix", keep)
    assert idx.tolist() == [0, 1, 2, 3] and y.tolist() == [3, 2, 1, 1]  # human where kept, judge elsewhere
    ((idx, y),) = training_labels(t, "judge", keep)
    assert idx.tolist() == [0, 1, 2] and y.tolist() == [2, 2, 1]
    (j_idx, j_y), (h_idx, h_y) = training_labels(t, "curriculum", keep)
    assert j_y.tolist() == [2, 2, 1] and h_y.tolist() == [3, 1]
    assert j_idx.tolist() == [0, 1, 2] and h_idx.tolist() == [0, 3]
    with pytest.raises(DataError, match="needs judge labels"):
        training_labels(t.set_column(1, "judge_label", pa.nulls(4, pa.int8())), "mix", keep)


def test_label_sources_on_a_union_of_human_and_candidate_pairs():
    """The table `augrel run` trains on: human-labelled pairs of the training queries (not judged) plus
    candidate pairs with judge labels only, and candidates the judge could not grade (neither label)."""
    t = pa.table({"label": pa.array([2, 0, None, None, None], pa.int8()),
                  "judge_label": pa.array([None, None, 3, 1, None], pa.int8())})  # fmt: skip
    keep = np.array([True, True, False, False, False])
    ((idx, y),) = training_labels(t, "human", keep)
    assert idx.tolist() == [0, 1] and y.tolist() == [2, 0]
    ((idx, y),) = training_labels(t, "judge", keep)
    assert idx.tolist() == [2, 3] and y.tolist() == [3, 1]
    ((idx, y),) = training_labels(t, "mix", keep)
    assert idx.tolist() == [0, 1, 2, 3] and y.tolist() == [2, 0, 3, 1]  # row 4 has no label: not trained on
    (j_idx, j_y), (h_idx, h_y) = training_labels(t, "curriculum", keep)
    assert j_idx.tolist() == [2, 3] and j_y.tolist() == [3, 1]
    assert h_idx.tolist() == [0, 1] and h_y.tolist() == [2, 0]


def test_train_on_a_union_of_human_and_candidate_pairs(feature_table, tmp_path):
    out, _ = feature_table
    t = read_features(str(out))
    rng = np.random.default_rng(3)
    candidate = rng.random(t.num_rows) < 0.5  # these pairs lost their human label: candidates of the pool
    ungraded = candidate & (rng.random(t.num_rows) < 0.1)  # candidates the judge did not grade
    human = t.column("label").to_numpy(zero_copy_only=False)
    union = t.set_column(t.schema.get_field_index("label"), "label",
                         pa.array(np.where(candidate, None, human).tolist(), pa.int8()))  # fmt: skip
    write_table(tmp_path / "features", union)
    judged = candidate & ~ungraded
    write_table(tmp_path / "judgments", pa.table({
        "qid": t.column("qid").filter(pa.array(judged)), "docid": t.column("docid").filter(pa.array(judged)),
        "label": pa.array(human[judged], pa.int8()), "score": pa.array(human[judged].astype(np.float32))}))  # fmt: skip
    table = attach_judge(read_features(str(tmp_path / "features")), str(tmp_path / "judgments"))
    train_q, val_q = split_queries(table.column("qid").to_pylist(), 0.2, 0)
    rows = {}
    for source in ("human", "judge", "mix", "curriculum"):
        cfg = RankTrainConfig(features="-", out="-", label_source=source,
                              ranker={"min_data_in_leaf": 5, "n_estimators": 10})  # fmt: skip
        ranker, info = fit_ranker(table, cfg, train_q, val_q)
        rows[source] = info["label_rows"]
        assert ranker.info["train_rows"] > 0
    n_human, n_judged = int((~candidate).sum()), int(judged.sum())
    assert rows == {"human": [n_human], "judge": [n_judged], "mix": [n_human + n_judged],
                    "curriculum": [n_judged, n_human]}  # fmt: skip


def test_train_predict_eval_beat_chance(feature_table, synth_dataset, tmp_path):
    out, _ = feature_table
    judg = _judgments(out, tmp_path / "judgments", flip=0.3)
    rdir = tmp_path / "ranker"
    r = train(RankTrainConfig(features=str(out), judgments=str(judg), label_source="curriculum",
                              human_fraction=0.3, out=str(rdir), ranker={"min_data_in_leaf": 5}))  # fmt: skip
    assert (
        (rdir / "model.txt").exists() and (rdir / "importances.png").exists() and r.extra["label_rows"][0] > 0
    )
    predict(RankPredictConfig(ranker=str(rdir), features=str(out), out=str(tmp_path / "run")))
    run = read_table(tmp_path / "run")
    assert run.column("rank").to_pylist()[:1] == [1]
    # a baseline run that ranks at random
    rng = np.random.default_rng(0)
    write_table(tmp_path / "random", run_table(run.column("qid").to_pylist(), run.column("docid").to_pylist(),
                                               rng.random(run.num_rows)))  # fmt: skip
    e = evaluate(RankEvalConfig(run=str(tmp_path / "run"), qrels=str(synth_dataset / "qrels"), out=str(tmp_path / "ev"),
                                baseline=str(tmp_path / "random")))  # fmt: skip
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["mean"]["ndcg10"] > 0.7 and e.extra["vs_baseline"]["ndcg10"]["diff"] > 0.2
    assert e.extra["vs_baseline"]["ndcg10"]["p_ttest"] < 0.01


def test_row_order_of_the_features_table_does_not_change_the_ranker(feature_table, tmp_path):
    """The features stage writes rows in the order its actors finish; the same features must train the same
    ranker whatever that order (human_mask's draw and LambdaMART's groups follow row order)."""
    out, _ = feature_table
    t = read_table(out)
    shuffled = t.take(pa.array(np.random.default_rng(5).permutation(t.num_rows)))
    write_table(tmp_path / "shuffled", shuffled)
    models = []
    for name, src in (("a", str(out)), ("b", str(tmp_path / "shuffled"))):
        train(RankTrainConfig(features=src, label_source="human", human_fraction=0.5, out=str(tmp_path / name),
                              ranker={"min_data_in_leaf": 5, "n_estimators": 30}))  # fmt: skip
        models.append((tmp_path / name / "model.txt").read_text())
    assert models[0] == models[1]


def test_nan_feature_is_named(feature_table, tmp_path):
    out, _ = feature_table
    t = read_table(out)
    bm25 = t.column("bm25").to_numpy().copy()
    bm25[3] = np.nan
    write_table(tmp_path / "f", t.set_column(t.schema.get_field_index("bm25"), "bm25", pa.array(bm25)))
    with pytest.raises(DataError, match="feature 'bm25' has 1 NaN"):
        train(RankTrainConfig(features=str(tmp_path / "f"), out=str(tmp_path / "r")))


def test_attach_judge_warns_on_missing(feature_table, tmp_path, caplog):
    out, _ = feature_table
    t = read_table(out)
    j = _judgments(out, tmp_path / "j")
    write_table(tmp_path / "j2", read_table(j).slice(5))
    joined = attach_judge(t, str(tmp_path / "j2"))
    assert joined.column("judge_label").null_count == 5 and "5 of" in caplog.text


def test_attach_judge_keeps_agreeing_duplicates_once_refuses_disagreeing(feature_table, tmp_path, caplog):
    out, _ = feature_table
    t = read_features(str(out))
    j = read_table(_judgments(out, tmp_path / "j"))
    write_table(tmp_path / "twice", pa.concat_tables([j, j.slice(0, 3)]))  # three pairs judged twice, alike
    joined = attach_judge(t, str(tmp_path / "twice"))
    assert joined.num_rows == t.num_rows and joined.column("judge_label").null_count == 0
    assert "3 duplicate judgments" in caplog.text
    other = j.slice(0, 1)
    other = other.set_column(2, "label", pa.array([(other.column("label")[0].as_py() + 1) % 4], pa.int8()))
    write_table(tmp_path / "conflict", pa.concat_tables([j, other]))
    with pytest.raises(DataError, match=r"1 \(qid, docid\) pairs judged more than once with different"):
        attach_judge(t, str(tmp_path / "conflict"))


def test_augment_with_a_perfect_judge_matches_full_human_labels(feature_table, tmp_path):
    from pipelines.experiment import AugmentConfig, augment

    out, _ = feature_table
    judg = _judgments(out, tmp_path / "perfect", flip=0.0)
    # an oracle that copies the human grades, not a trained judge: no query's labels trained it
    cfg = AugmentConfig(features=str(out), judgments=str(judg), out=str(tmp_path / "aug"), folds=3, seeds=[0, 1],
                        ranker={"n_estimators": 60, "min_data_in_leaf": 5}, judge_label_queries=[])  # fmt: skip
    r = augment(cfg)
    s = r.extra["summary"]
    # a judge that agrees with the humans turns "20% human + judge" into "100% human": the same labels
    assert s["h20+judge"]["ndcg10"] == pytest.approx(s["h100"]["ndcg10"])
    assert s["judge"]["ndcg10"] == pytest.approx(s["h100"]["ndcg10"])
    assert s["h100"]["ndcg10"] > s["bm25"]["ndcg10"]
    lo, hi = s["h20"]["ndcg10_ci95"]
    assert lo <= s["h20"]["ndcg10"] <= hi
    assert (tmp_path / "aug" / "augment.png").exists() and "| LambdaMART, 20% human |" in (
        tmp_path / "aug" / "table.md"
    ).read_text()
    per_query = read_table(tmp_path / "aug" / "per_query")
    assert per_query.num_rows == len(cfg.methods) * r.counts["queries"]


def test_features_of_no_pairs_is_an_empty_table(ray_session, tmp_path):
    import ray

    from pipelines.rank import _write_parts

    ds = ray.data.from_arrow(
        pa.table({"qid": pa.array([], pa.string()), "_actor": pa.array([], pa.string())})
    )
    n, per_actor = _write_parts(ds, tmp_path / "f")
    t = read_table(tmp_path / "f")
    assert n == 0 and per_actor == {} and t.num_rows == 0 and set(FEATURES) <= set(t.column_names)


def test_early_stopping_queries_are_drawn_from_human_and_judge_only_queries_apart():
    from pipelines.rank import split_training_queries

    human = [f"h{i}" for i in range(5)]
    judged = [f"j{i}" for i in range(45)]
    table = pa.table({"qid": human + judged, "label": pa.array([2] * 5 + [None] * 45, pa.int8())})
    train_q, val_q = split_training_queries(table, 0.2, 0)
    assert len(val_q & set(human)) == 1 and len(val_q & set(judged)) == 9
    assert train_q | val_q == set(human + judged) and not train_q & val_q
