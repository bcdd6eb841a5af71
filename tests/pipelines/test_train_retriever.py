"""`augrel retriever train`: label sources and groups on the driver (no Ray), and real Ray Train runs with a tiny
encoder on a synthetic corpus."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.errors import ConfigError, DataError
from pipelines.train_retriever import RetrieverTrainConfig, lr_schedule, prepare


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic corpus indexed (BM25 + docstore), its queries and human qrels, a judgments table that grades
    the human positives 3 and a few others 2, and a utility table selecting the grade-3 passages."""
    from pipelines.index import IndexConfig, build
    from pipelines.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("retriever-world")
    docs, queries, qrels = generate(SynthConfig(out=str(root), entities=16))
    pq.write_table(pa.table({"docid": [d["_id"] for d in docs], "text": [d["text"] for d in docs],
                             "title": [d["title"] for d in docs]}), root / "docs.parquet")  # fmt: skip
    pq.write_table(pa.table({"qid": [q["_id"] for q in queries], "query": [q["text"] for q in queries]}),
                   root / "queries.parquet")  # fmt: skip
    q, d, g = zip(*qrels, strict=True)
    pq.write_table(pa.table({"qid": list(q), "docid": list(d), "label": pa.array(g, pa.int8())}),
                   root / "qrels.parquet")  # fmt: skip
    rng = np.random.default_rng(0)
    jl = [3 if x >= 2 else int(rng.random() < 0.1) * 2 for x in g]
    pq.write_table(pa.table({"qid": list(q), "docid": list(d), "label": pa.array(jl, pa.int8()),
                             "score": pa.array([x + rng.random() * 0.5 for x in jl], pa.float32()),
                             "judge": ["j"] * len(q), "prompt_version": ["v"] * len(q)}),
                   root / "judgments.parquet")  # fmt: skip
    pq.write_table(pa.table({"qid": list(q), "docid": list(d), "selected": [x == 3 for x in g]}),
                   root / "utility.parquet")  # fmt: skip
    build(IndexConfig(docs=str(root / "docs.parquet"), out=str(root / "index"), dense=False))
    return root


def _cfg(world, tiny_encoder, tmp_path, **labels_and_more):
    labels = {k: v for k, v in labels_and_more.items() if k in ("source", "human", "llm", "llm_kind",
                                                                 "human_fraction", "judge_top_fraction")}  # fmt: skip
    rest = {k: v for k, v in labels_and_more.items() if k not in labels}
    return RetrieverTrainConfig.model_validate({
        "index": str(world / "index"), "queries": str(world / "queries.parquet"), "out": str(tmp_path / "ret"),
        "labels": {"human": [str(world / "qrels.parquet")], **labels}, "base_model": str(tiny_encoder),
        "group_size": 4, "max_positives": 2, "batch_size": 4, "num_workers": 2, "val_fraction": 0.25,
        "val_distractors": 20, "val_depth": 10, "epochs": 1, "max_query_length": 16, "max_passage_length": 32,
        **rest,
    })  # fmt: skip


def test_human_source_holds_validation_queries_out_of_training(world, tiny_encoder, tmp_path):
    data, _ = prepare(_cfg(world, tiny_encoder, tmp_path))
    (phase,) = data.phases
    groups = phase["groups"]
    assert set(groups.qids).isdisjoint(data.val_qrels)
    assert len(groups) + len(data.val_qrels) <= 32 and len(data.val_qrels) >= 4
    qrels = pq.read_table(world / "qrels.parquet").to_pylist()
    graded = {(r["qid"], r["docid"]): r["label"] for r in qrels}
    for grp in groups.epoch(0):
        assert len(grp.docids) == 4 and 1 <= len(grp.positives) <= 2
        assert all(graded[grp.qid, p] >= 2 for p in grp.positives)
        # no passage the labels grade relevant at any level is a negative
        assert all(graded.get((grp.qid, n), 0) == 0 for n in grp.negatives)


def test_judge_utility_mix_and_curriculum_sources(world, tiny_encoder, tmp_path):
    judgments, utility = str(world / "judgments.parquet"), str(world / "utility.parquet")
    judge, _ = prepare(_cfg(world, tiny_encoder, tmp_path, source="judge", llm=[judgments]))
    top, _ = prepare(
        _cfg(world, tiny_encoder, tmp_path, source="judge", llm=[judgments], judge_top_fraction=0.01)
    )
    util, _ = prepare(_cfg(world, tiny_encoder, tmp_path, source="utility", llm=[utility]))
    mix, _ = prepare(_cfg(world, tiny_encoder, tmp_path, source="mix", llm=[judgments], human_fraction=0.5))
    cur, _ = prepare(
        _cfg(world, tiny_encoder, tmp_path, source="curriculum", llm=[judgments], human_fraction=0.2)
    )
    # the same held-out validation queries whatever the source: none trains
    for d in (judge, top, util, mix, cur):
        assert d.val_qrels == judge.val_qrels
        assert all(set(p["groups"].qids).isdisjoint(d.val_qrels) for p in d.phases)
    assert len(top.phases[0]["groups"].epoch(0)[0].positives) == 1  # top 1%: at least one per query
    assert [p["name"] for p in cur.phases] == ["llm", "human"] and [p["epochs"] for p in cur.phases] == [1, 1]
    n_human = len(cur.phases[1]["groups"])
    assert 1 <= n_human < len(cur.phases[0]["groups"])
    assert len(mix.summary["human_queries"]) >= 1
    assert judge.fingerprint != util.fingerprint != mix.fingerprint


def test_bad_labels_name_the_missing_columns(world, tiny_encoder, tmp_path):
    pq.write_table(pa.table({"qid": ["q"], "docid": ["d"]}), tmp_path / "nolabel.parquet")
    with pytest.raises(DataError, match="label"):
        prepare(_cfg(world, tiny_encoder, tmp_path, source="judge", llm=[str(tmp_path / "nolabel.parquet")]))
    with pytest.raises(ValueError, match=r"labels\.llm"):
        _cfg(world, tiny_encoder, tmp_path, source="judge")
    with pytest.raises(ValueError, match="multiple of num_workers"):
        _cfg(world, tiny_encoder, tmp_path, batch_size=5)


def test_judge_source_without_human_tables_needs_validation_qrels(world, tiny_encoder, tmp_path):
    cfg = RetrieverTrainConfig.model_validate({
        "index": str(world / "index"), "queries": str(world / "queries.parquet"), "out": str(tmp_path / "r"),
        "labels": {"source": "judge", "llm": [str(world / "judgments.parquet")]}})  # fmt: skip
    with pytest.raises(ConfigError, match="val"):
        prepare(cfg)


def test_learning_rate_restarts_at_each_curriculum_phase():
    f = lr_schedule([{"steps": 10}, {"steps": 4}], warmup_ratio=0.2)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(0.9)
    assert f(9) < 0.2 and f(10) == pytest.approx(1.0) and f(13) < f(11)


def test_train_on_two_workers_writes_an_encoder_that_indexes_and_serves_features(
    world, tiny_encoder, tmp_path, ray_session
):
    """Curriculum on 2 Ray Train workers (DDP over gloo, cross-worker negatives): the output is a
    sentence-transformers directory with its card, and `augrel index build` and PairFeaturizer take it."""
    from sentence_transformers import SentenceTransformer

    from models.encoder import BiEncoder
    from pipelines.index import IndexConfig, build
    from pipelines.train_retriever import train

    cfg = _cfg(world, tiny_encoder, tmp_path, source="curriculum", llm=[str(world / "judgments.parquet")],
               human_fraction=0.5, eval_every=2, storage_path=str(tmp_path / "storage"))  # fmt: skip
    result = train(cfg)
    out = tmp_path / "ret"
    card = json.loads((out / "retriever_card.json").read_text())
    assert (
        card["loss"] == "summarglh" and card["label_source"] == "curriculum" and card["temperature"] == 0.05
    )
    assert [p["name"] for p in card["data"]["phases"]] == ["llm", "human"]
    history = card["training"]["history"]
    assert [h["phase"] for h in history][-1] == "human" and history[-1]["step"] == result.counts["steps"]
    assert 0 <= card["metrics"]["val_ndcg10"] <= 1
    before = BiEncoder(str(tiny_encoder)).encode_passages(["river town"])
    after = BiEncoder(str(out)).encode_passages(["river town"])
    assert not np.allclose(before, after)  # it trained
    assert np.allclose(SentenceTransformer(str(out), device="cpu").encode(["river town"]), after, atol=1e-5)
    build(IndexConfig(docs=str(world / "docs.parquet"), out=str(tmp_path / "index"), encoder=str(out)))
    assert json.loads((tmp_path / "index" / "dense" / "dense.json").read_text())["dim"] == 16
