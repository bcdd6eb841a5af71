"""An `augrel retriever train` output directory (a sentence-transformers directory + retriever_card.json) plugs
into `rank features` and `serve` unchanged, and a serve replica refuses an encoder of another dimension than its
index's. The directory is made as the stage makes it (BiEncoder.save with its card and the stage files) from the
tiny encoder, not by running Ray Train: what is under test is the format, not training."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipelines.errors import ConfigError
from pipelines.io import read_table

QUERY_PREFIX, PASSAGE_PREFIX = "query: ", "passage: "


def save_retriever(base: str, out, *, hidden_size: int | None = None):
    """A retriever directory as `augrel retriever train` leaves it: the encoder saved by BiEncoder.save with a
    card carrying the training fields, plus the stage's config.yaml and manifest.json. With ``hidden_size``, a
    fresh random BERT of that width (sharing ``base``'s tokenizer) stands in for the encoder."""
    from models.encoder import BiEncoder
    from pipelines.stage import write_stage_files
    from pipelines.train_retriever import RetrieverTrainConfig

    if hidden_size is not None:
        import torch
        from transformers import AutoTokenizer, BertConfig, BertModel

        tok = AutoTokenizer.from_pretrained(base)
        torch.manual_seed(1)
        raw = out.parent / f"{out.name}-base"
        BertModel(BertConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                             num_hidden_layers=1, num_attention_heads=2, pad_token_id=0)).save_pretrained(raw)  # fmt: skip
        tok.save_pretrained(raw)
        base = str(raw)
    enc = BiEncoder(base, query_prefix=QUERY_PREFIX, passage_prefix=PASSAGE_PREFIX, max_query_length=16,
                    max_passage_length=64)  # fmt: skip
    card = enc.describe(base_model=base, loss="summarglh", temperature=0.05, label_source="human",
                        data_fingerprint="test", metrics={"val_ndcg10": 0.5, "step": 4})  # fmt: skip
    enc.save(out, card)
    cfg = RetrieverTrainConfig.model_validate({"index": "unused", "queries": ["unused"], "out": str(out),
                                               "labels": {"human": ["unused"]}, "base_model": base,
                                               "query_prefix": QUERY_PREFIX, "passage_prefix": PASSAGE_PREFIX,
                                               "max_query_length": 16, "max_passage_length": 64})  # fmt: skip
    write_stage_files(out, "retriever.train", cfg, {"steps": 4}, [], 0.0, {"metrics": card.metrics})
    return out


@pytest.fixture(scope="module")
def artifacts(ray_session, synth_dataset, tiny_encoder, tmp_path_factory):
    """A retriever directory; an index (BM25 + flat FAISS) built with it by `augrel index build`; rank features
    of the synthetic pairs computed with it; and a ranker trained on those features.

    The features are computed by ``FeatureActor`` in this process, built with the constructor arguments the
    features stage gives it: the stage's Ray Data plumbing is covered by tests/pipelines/test_rank.py, and a
    second actor pool here would cost half a minute of worker start-up for nothing more about the encoder."""
    from models.features import FEATURES
    from pipelines.index import IndexConfig, build
    from pipelines.io import write_table
    from pipelines.rank import FeatureActor, FeaturesConfig, RankTrainConfig, build_bm25, train

    root = tmp_path_factory.mktemp("retriever-outputs")
    ret = str(save_retriever(str(tiny_encoder), root / "retriever"))
    docs = str(synth_dataset / "docs")
    build(IndexConfig(docs=docs, out=str(root / "index"), encoder=ret, concurrency=1, num_cpus_per_actor=1))
    fcfg = FeaturesConfig(
        pairs=str(synth_dataset / "pairs"), docs=docs, out=str(root / "features"), encoder=ret
    )
    pairs = read_table(fcfg.pairs)
    actor = FeatureActor(str(build_bm25(fcfg, pairs)), fcfg.encoder, threads=1)
    table = actor(pairs)
    write_table(root / "features", table.select(["qid", "docid", "label", *FEATURES]))
    train(RankTrainConfig(features=str(root / "features"), label_source="human", out=str(root / "ranker"),
                          ranker={"n_estimators": 20}))  # fmt: skip
    return root


def test_rank_features_use_the_retrievers_query_and_passage_encodings(artifacts, synth_dataset):
    from models.encoder import BiEncoder

    ret = BiEncoder(str(artifacts / "retriever"))
    assert (ret.query_prefix, ret.passage_prefix, ret.max_query_length) == (QUERY_PREFIX, PASSAGE_PREFIX, 16)
    feats = read_table(artifacts / "features")
    got = dict(zip(zip(feats.column("qid").to_pylist(), feats.column("docid").to_pylist(), strict=True),
                   feats.column("dense_cos").to_numpy(), strict=True))  # fmt: skip
    pairs = read_table(synth_dataset / "pairs")
    assert len(got) == pairs.num_rows
    queries, texts = pairs.column("query").to_pylist(), pairs.column("text").to_pylist()
    want = (ret.encode_queries(queries) * ret.encode_passages(texts)).sum(1)
    keys = zip(pairs.column("qid").to_pylist(), pairs.column("docid").to_pylist(), strict=True)
    assert np.allclose([got[k] for k in keys], want, atol=1e-4)
    # the prefixes change the cosine: the card's settings were applied, not just the weights
    bare = BiEncoder(str(artifacts / "retriever"), query_prefix="", passage_prefix="")
    unprefixed = (bare.encode_queries(queries) * bare.encode_passages(texts)).sum(1)
    assert np.abs(unprefixed - want).max() > 1e-3


def test_serve_retrieves_with_the_retriever_and_its_query_prefix(artifacts, synth_dataset):
    from models.encoder import BiEncoder
    from pipelines.serve import RankService, ServeConfig

    cfg = ServeConfig(ranker=str(artifacts / "ranker"), index=str(artifacts / "index"), retriever="dense")
    cfg.check_paths()
    svc = RankService(cfg)
    assert svc.encoder.path == str(artifacts / "retriever") and svc.encoder.query_prefix == QUERY_PREFIX
    query = read_table(synth_dataset / "queries").column("query")[0].as_py()
    qvec = svc.featurize.encode_queries([query])[0]
    bare = BiEncoder(str(artifacts / "retriever"), query_prefix="")
    assert np.allclose(qvec, bare.encode_queries([QUERY_PREFIX + query])[0], atol=1e-6)
    assert not np.allclose(qvec, bare.encode_queries([query])[0], atol=1e-3)
    # the dense first stage returns the exact top 10 of the stored passage vectors for that query vector
    hits = svc.retrieve(query, 10)
    rows = svc.store.rows(hits)
    assert len(set(hits)) == 10 and (rows >= 0).all()
    scores = np.asarray(svc.store_vectors, np.float32) @ qvec
    assert np.allclose(scores[rows], np.sort(scores)[::-1][:10], atol=1e-5)
    # and those vectors are the retriever's passage encodings (its passage prefix) of the stored texts
    texts = svc.store.take(rows).column("text").to_pylist()
    assert np.allclose(svc.store_vectors[rows], BiEncoder(str(artifacts / "retriever")).encode_passages(texts),
                       atol=1e-5)  # fmt: skip
    out = svc.rank(query, 5)
    assert out["source"] == "dense" and len(out["results"]) == 5
    assert {h["docid"] for h in out["results"]} <= set(svc.retrieve(query, cfg.first_stage_k))
    # a serve config naming the retriever directory itself (as the index names it) serves the same
    named = RankService(ServeConfig(**{**cfg.model_dump(), "encoder": str(artifacts / "retriever")}))
    assert named.retrieve(query, 10) == hits and named.rank(query, 5)["results"] == out["results"]


@pytest.mark.parametrize("retriever", ["dense", "bm25"])
def test_serve_refuses_an_encoder_of_another_dimension_than_the_index(
    artifacts, tiny_encoder, tmp_path, retriever
):
    """The encoder directory an index names was replaced by one making 8-d vectors; the index holds 16-d ones."""
    from pipelines.serve import RankService, ServeConfig

    index = tmp_path / "index"
    shutil.copytree(artifacts / "index", index)
    replaced = save_retriever(str(tiny_encoder), tmp_path / "retriever", hidden_size=8)
    meta_path = index / "dense" / "dense.json"
    meta = json.loads(meta_path.read_text())
    assert meta["encoder"] == str(artifacts / "retriever") and meta["dim"] == 16
    meta_path.write_text(json.dumps({**meta, "encoder": str(replaced)}))
    cfg = ServeConfig(ranker=str(artifacts / "ranker"), index=str(index), retriever=retriever)
    cfg.check_paths()
    with pytest.raises(ConfigError, match=r"^encoder: encoder .*retriever makes 8-d vectors, but .* 16-d"):
        RankService(cfg)
