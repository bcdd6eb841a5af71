"""augrel run: the DAG's skipping logic on the data stages, config errors naming the pipeline key, the whole
pipeline end to end on a tiny judge (synthetic corpus), and its HTML report."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from pipelines.errors import ConfigError
from pipelines.run import PipelineConfig, run, stages
from pipelines.stage import load_config
from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[2]


def _pipeline(out: Path, **over) -> PipelineConfig:
    data = {"source": "synth", "synth": {"entities": 12, "distractors": 2, "random_negatives": 1, "seed": 3},
            "split": {"fractions": {"train": 0.5, "val": 0.2, "test": 0.3}, "folds": 2}}  # fmt: skip
    return PipelineConfig.model_validate({"name": "t", "out": str(out), "data": data, **over})


def _quiet(_: str) -> None:
    pass


def test_second_run_skips_and_a_changed_section_reruns_it_and_what_follows(ray_session, tmp_path):
    p = _pipeline(tmp_path / "r")
    first = run(p, until="split", echo=_quiet)
    assert first.ran == ["synth", "prepare", "validate", "split"] and first.skipped == []
    again = run(p, until="split", echo=_quiet)
    assert again.ran == [] and again.skipped == first.ran
    m = json.loads((tmp_path / "r" / "pipeline.json").read_text())
    assert m["dag"]["split"] == ["prepare"] and m["stages"]["split"]["status"] == "done"
    assert len(m["runs"]) == 2 and m["runs"][1]["ran"] == []

    # a different split seed: only split reruns (its input, the prepared data, is unchanged)
    p2 = _pipeline(tmp_path / "r", data={**p.data.model_dump(), "split": {**p.data.split, "seed": 99}})
    assert run(p2, until="split", echo=_quiet).ran == ["split"]
    # a different corpus: everything from synth on
    p3 = _pipeline(tmp_path / "r", data={**p2.data.model_dump(), "synth": {**p2.data.synth, "seed": 4}})
    assert run(p3, until="split", echo=_quiet).ran == ["synth", "prepare", "validate", "split"]


def test_a_damaged_output_reruns_its_stage_and_from_forces(ray_session, tmp_path):
    p = _pipeline(tmp_path / "r")
    run(p, until="split", echo=_quiet)
    victim = next((tmp_path / "r" / "splits").rglob("*.parquet"))
    victim.write_bytes(b"not parquet any more")
    assert run(p, until="split", echo=_quiet).ran == ["split"]
    assert run(p, until="split", from_stage="validate", echo=_quiet).ran == ["validate", "split"]
    # an interrupted stage (the process died while it ran) is rerun
    m = json.loads((tmp_path / "r" / "pipeline.json").read_text())
    m["stages"]["validate"]["status"] = "running"
    (tmp_path / "r" / "pipeline.json").write_text(json.dumps(m))
    assert run(p, until="split", echo=_quiet).ran == ["validate"]


def test_mlflow_tracking_logs_every_stage(ray_session, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"file:{tmp_path / 'mlruns'}"
    p = _pipeline(tmp_path / "r", tracking={"mlflow_uri": uri, "experiment": "augrel-test"})
    run(p, until="split", echo=_quiet)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["augrel-test"])
    by_name = {r["tags.mlflow.runName"]: r for _, r in runs.iterrows()}
    assert set(by_name) == {"t", "synth", "prepare", "validate", "split"}
    split = by_name["split"]
    assert split["params.folds"] == "2" and split["metrics.wall_s"] > 0
    assert split["tags.mlflow.parentRunId"] == by_name["t"]["run_id"]
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(split["run_id"], "splits")]
    assert "splits/manifest.json" in arts and "splits/config.yaml" in arts


def test_errors_name_the_pipeline_key(tmp_path):
    with pytest.raises(ConfigError, match=r"judge\.lrr"):
        p = _pipeline(tmp_path, judge={"lrr": 1})
        [s.configs(p, tmp_path, False) for s in stages(p)]
    with pytest.raises(ConfigError, match=r"annotate\.out: set by the pipeline"):
        p = _pipeline(tmp_path, annotate={"out": "elsewhere"})
        [s.configs(p, tmp_path, False) for s in stages(p)]
    with pytest.raises(ValueError, match="annotate_split"):  # a split that trained the judge measures nothing
        _pipeline(tmp_path, annotate_split="val")
    with pytest.raises(ValueError, match="needs a val split"):
        _pipeline(tmp_path, data={"source": "synth", "split": {"fractions": {"train": 0.7, "test": 0.3}}})
    with pytest.raises(ConfigError, match="--until"):
        run(_pipeline(tmp_path), until="nope", echo=_quiet)
    with pytest.raises(ConfigError, match="data"):
        load_config(PipelineConfig, None, ["data.sorce=x"], out=str(tmp_path))


SHIPPED = ["demo.yaml", "dl19.yaml", "gpu-cluster.yaml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_pipelines_load_and_wire_every_stage(name):
    p = load_config(PipelineConfig, REPO / "configs" / name)
    built = {s.name: s.configs(p, Path(p.out), False) for s in stages(p)}
    assert {
        "candidates",
        "pool",
        "judge",
        "annotate",
        "annotate_pool",
        "rankers",
        "rank_eval",
        "retriever",
        "retriever_eval",
        "report",
    } <= set(built)
    (rt,) = built["retriever"]
    assert rt.labels.source == "mix" and rt.exclude_queries == [f"{p.out}/splits/test/queries"]
    assert rt.val == [f"{p.out}/splits/val/qrels"] and rt.labels.llm == [f"{p.out}/judgments-pool"]
    assert [c.label_source for c in built["rankers"]] == ["human", "judge", "mix", "curriculum"]
    (pool,) = built["pool"]
    assert pool.hold_out == [p.annotate_split] == ["test"]
    assert all(c.judgments.endswith("judgments-pool") for c in built["rankers"])
    if name == "gpu-cluster.yaml":
        (ft,) = built["judge"]
        assert ft.use_gpu and ft.dtype == "bf16" and ft.base_model == "google/gemma-2-9b-it"
        assert ft.deepspeed == "auto"  # ZeRO-2 where the 9B base fits a GPU, offload only where it cannot
        (ann,) = built["annotate"]
        assert ann.profile == "gpu-8" and ann.autoscaling_cluster
        (ix,) = built["index"]
        assert ix.num_gpus_per_actor > 0
        (sv,) = built["serve"]
        assert sv.device == "cuda" and sv.retriever == "dense" and sv.judge.path == "/data/runs/prod/judge"
        assert sv.ranker == "/data/runs/prod/ranker-mix"
        assert rt.use_gpu and rt.num_workers == 4


def test_hotpotqa_pipeline_is_paper_2_without_a_judge(tmp_path):
    p = load_config(PipelineConfig, REPO / "configs" / "hotpotqa.yaml")
    built = {s.name: s.configs(p, Path(p.out), False) for s in stages(p)}
    assert list(built) == ["prepare", "validate", "split", "index", "candidates", "rag_utility", "rag_retrievers",
                           "rag_indexes", "rag_eval", "report"]  # fmt: skip
    sample, ann = built["rag_utility"]
    assert sample.queries.endswith("splits/train/queries") and ann.mode == "answer-likelihood"
    retrievers = {Path(c.out).name: c for c in built["rag_retrievers"]}
    assert [c.labels.source for c in retrievers.values()] == ["human", "utility", "curriculum"]
    assert retrievers["retriever-utility_h20"].labels.human_fraction == 0.2
    for c in retrievers.values():
        assert c.exclude_queries == [f"{p.out}/splits/test/queries"] and c.val == [
            f"{p.out}/splits/val/qrels"
        ]
        assert c.labels.min_grade == 1
    (ev,) = built["rag_eval"]  # one pass over every retriever: the generator loads once per actor
    assert set(ev.retrievers) == {"bm25", "minilm", "human", "utility", "utility_h20"} and ev.k == 5
    assert ev.questions == f"{p.out}/splits/test/questions" and ev.systems == ["closed_book", "oracle"]
    assert (
        ev.retrievers["human"].index.endswith("rag/index-human") and ev.retrievers["bm25"].retriever == "bm25"
    )
    # the relevance half off needs its dependants off too, named
    with pytest.raises(ConfigError, match="retriever: null"):
        load_config(PipelineConfig, REPO / "configs" / "hotpotqa.yaml", ["retriever={}"])
    with pytest.raises(ConfigError, match="rag needs a val split"):
        load_config(PipelineConfig, REPO / "configs" / "hotpotqa.yaml",
                    ["data.split.fractions={train: 0.7, val: 0, test: 0.3}"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"rag\.retriever\.labels: set by the pipeline"):
        p = load_config(
            PipelineConfig, REPO / "configs" / "hotpotqa.yaml", ["rag.retriever.labels={source: human}"]
        )
        _ = [s.configs(p, Path(p.out), False) for s in stages(p)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_overrides(p: PipelineConfig, out: Path, lm: Path, encoder: Path) -> list[str]:
    """``--set`` values that run a shipped pipeline on 2 CPU cores in minutes: tiny random models in place of the
    judge and the encoders, no GPUs, small pools, few steps and trees, shared data where the config names a
    cluster volume. Every stage, its wiring and its data flow stay as configured."""
    sets = [f"out={out}", f"judge.base_model={lm}", "judge.n_train=16", "judge.n_val=8", "judge.batch_size=4",
            "judge.max_steps=2", "judge.eval_every=1", "judge.num_workers=2", "judge.cpus_per_worker=1",
            "judge.use_gpu=false", "judge.dtype=fp32", f"judge.stack.encoder={encoder}", "judge.stack.n_pairs=120",
            f"index.encoder={encoder}", "index.concurrency=1", "index.num_gpus_per_actor=0", "index.kind=flat",
            f"features.encoder={encoder}", "features.concurrency=[1,1]", "features.num_gpus_per_actor=0",
            "features.num_cpus_per_actor=1", "candidates.concurrency=[1,1]", "candidates.num_gpus_per_actor=0",
            "candidates.num_cpus_per_actor=1", "candidates.k=8", "annotate.profile=cpu-small",
            "annotate.dtype=fp32", "annotate.autoscaling_cluster=false", "annotate.unit_rows=512",
            "ranker.ranker.n_estimators=20", "augment.folds=2", "augment.seeds=[0]", "augment.ranker.n_estimators=20",
            "tracking.mlflow_uri=null", f"retriever.base_model={encoder}", "retriever.batch_size=4",
            "retriever.group_size=4", "retriever.max_positives=2", "retriever.num_workers=2", "retriever.epochs=1",
            "retriever.use_gpu=false", "retriever.cpus_per_worker=1", "retriever.val_distractors=20",
            "retriever.max_passage_length=32", "retriever.eval_every=null"]  # fmt: skip
    if p.utility is not None:
        sets += [f"utility.settings.judge={lm}", "utility.settings.dtype=fp32", "utility.questions=2",
                 "utility.settings.concurrency=[1,1]", "utility.settings.num_cpus_per_actor=1",
                 "utility.settings.num_gpus_per_actor=0", "utility.settings.autoscaling_cluster=false"]  # fmt: skip
    if p.rag is not None:
        # a random tiny LM's listwise replies select nothing: answer likelihood (top third, whatever its sign)
        # gives every retriever positives to train on
        sets += ["rag.utility_mode=answer-likelihood", "rag.utility.min_utility=-1.0e9",
                 "rag.utility.top_fraction=0.34", "rag.train_questions=null", "rag.questions=3", f"rag.utility.judge={lm}", "rag.utility.dtype=fp32",
                 "rag.utility.concurrency=[1,1]", "rag.utility.num_cpus_per_actor=1", "rag.utility.num_gpus_per_actor=0",
                 "rag.utility.autoscaling_cluster=false", f"rag.retriever.base_model={encoder}",
                 "rag.retriever.batch_size=1", "rag.retriever.group_size=4", "rag.retriever.max_positives=2", "rag.retriever.num_workers=1",
                 "rag.retriever.epochs=1", "rag.retriever.use_gpu=false", "rag.retriever.cpus_per_worker=1",
                 "rag.retriever.val_distractors=20", "rag.retriever.max_passage_length=32",
                 "rag.retriever.eval_every=null", f"rag.eval.generator={lm}", "rag.eval.dtype=fp32",
                 "rag.eval.max_new_tokens=4", "rag.eval.concurrency=[1,1]", "rag.eval.num_cpus_per_actor=1",
                 "rag.eval.num_gpus_per_actor=0"]  # fmt: skip
    if p.rag is not None and p.data.source == "trec-dl":
        # no gold answers: utility labels come from pseudo answers, which a random tiny LM leaves empty
        sets += ["rag.label_sources=[human]"]
    if p.data.source == "synth":
        sets += ["data.synth.entities=12", "data.synth.distractors=2", "data.synth.random_negatives=1"]
    elif not Path(p.data.src).exists():  # a cluster volume: the same data from the shared folder
        sets.append(f"data.src={SHARED_DATA / Path(p.data.src).name}")
    if p.serve.check:
        sets += [f"serve.settings.port={_free_port()}", "serve.settings.host=127.0.0.1", "serve.settings.device=cpu",
                 "serve.settings.deployment.num_cpus=0.25", "serve.settings.deployment.num_gpus=0",
                 "serve.settings.judge.deployment.num_cpus=0.25", "serve.settings.judge.deployment.num_gpus=0",
                 "serve.settings.judge.dtype=fp32"]  # fmt: skip
    return sets


def _shipped(name: str, out: Path, lm: Path, encoder: Path) -> PipelineConfig:
    path = REPO / "configs" / name
    p = load_config(PipelineConfig, path)
    return load_config(PipelineConfig, path, cpu_overrides(p, out, lm, encoder))


@pytest.fixture(scope="module")
def full_run(ray_session, tiny_causal_lm, tiny_encoder, tmp_path_factory):
    """configs/demo.yaml end to end with tiny models: every stage runs for real, small."""
    p = _shipped("demo.yaml", tmp_path_factory.mktemp("pipeline") / "run", tiny_causal_lm, tiny_encoder)
    return p, run(p, echo=_quiet)


@pytest.mark.timeout(1800)  # the first test to use full_run runs the whole demo pipeline
def test_the_whole_pipeline_runs_and_a_rerun_does_nothing(full_run):
    p, r = full_run
    assert r.ran == [s.name for s in stages(p)]
    out = Path(p.out)
    for d in ("candidates", "pool", "judge", "judgments", "judgments-pool", "judge-eval", "ranker-human",
              "ranker-judge", "ranker-mix", "ranker-curriculum", "rank-eval", "augment", "index", "serve", "report",
              "retriever", "retriever-index", "retriever-eval", "utility", "utility-eval", "rag/utility",
              "rag/retriever-utility_h20", "rag/index-human", "rag-eval/answers", "rag-eval/rag.png"):  # fmt: skip
        assert (out / d).exists(), d
    assert r.report == str(out / "report" / "index.html")
    again = run(p, echo=_quiet)
    assert again.ran == [] and len(again.skipped) == len(r.ran)


@pytest.mark.timeout(1800)  # the first test to use full_run runs the whole demo pipeline
def test_no_test_query_is_judged_for_the_rankers_or_trains_anything(full_run):
    """The judge trains on train, is calibrated on val; the rankers' pool leaves the test queries out; every
    ranker is scored on test queries only."""
    import pyarrow.compute as pc

    from pipelines.io import read_table

    p, _ = full_run
    out = Path(p.out)
    splits = read_table(out / "splits" / "splits")
    test_q = set(splits.filter(pc.equal(splits.column("split"), "test")).column("qid").to_pylist())
    assert test_q
    judged = set(read_table(out / "judgments-pool").column("qid").to_pylist())
    trained = set(read_table(out / "features-train").column("qid").to_pylist())
    assert judged and not judged & test_q and not trained & test_q
    # the pool holds unlabelled queries' candidates too (the synthetic corpus leaves 30% of queries unjudged)
    unlabelled = set(splits.filter(pc.equal(splits.column("split"), "unlabelled")).column("qid").to_pylist())
    assert unlabelled and unlabelled & judged
    # what the judge itself says it learned from (its card's training and validation sources, its calibration)
    from pipelines.experiment import judge_label_queries

    judge_learned = set(judge_label_queries(str(out / "judgments"))["queries"])
    assert judge_learned and not judge_learned & test_q
    summary = json.loads((out / "rank-eval" / "summary.json").read_text())
    assert set(summary["rows"]) == {"bm25", "dense", "human", "judge", "mix", "curriculum"}
    scored = set(read_table(out / "rank-eval" / "mix" / "per_query").column("qid").to_pylist())
    assert scored and scored <= test_q
    # the retriever: trained on no test query, validated on val, scored on test queries only
    card = json.loads((out / "retriever" / "retriever_card.json").read_text())
    val_q = set(splits.filter(pc.equal(splits.column("split"), "val")).column("qid").to_pylist())
    assert set(card["data"]["validation_queries"]) <= val_q
    retr = json.loads((out / "retriever-eval" / "summary.json").read_text())
    assert set(retr["rows"]) == {"bm25", "minilm", "finetuned"}
    scored = set(read_table(out / "retriever-eval" / "finetuned" / "per_query").column("qid").to_pylist())
    assert scored and scored <= test_q
    # utility annotation: test questions' candidates, scored against their human labels (they train nothing)
    utility = read_table(out / "utility" / "utility-sel")
    assert set(utility.column("qid").to_pylist()) <= test_q and set(utility.column("mode").to_pylist()) == {
        "utility-sel"
    }
    u = json.loads((out / "utility-eval" / "summary.json").read_text())
    assert {"relsel", "utility-sel", "answer-likelihood", "judge"} <= set(u["rows"]) and u["questions"] >= 1
    # paper 2's experiment: utility labels and retrievers from train questions only; RAG answers test questions
    annotated = set(read_table(out / "rag" / "utility").column("qid").to_pylist())
    train_q = set(splits.filter(pc.equal(splits.column("split"), "train")).column("qid").to_pylist())
    assert annotated and annotated <= train_q
    for src in ("human", "utility", "utility_h20"):
        card = json.loads((out / "rag" / f"retriever-{src}" / "retriever_card.json").read_text())
        assert set(card["data"]["validation_queries"]) <= val_q
    rag = json.loads((out / "rag-eval" / "summary.json").read_text())
    assert set(rag["rows"]) == {"bm25", "minilm", "human", "utility", "utility_h20", "closed_book", "oracle"}
    answered = set(read_table(out / "rag-eval" / "answers" / "rows").column("qid").to_pylist())
    assert answered and answered <= test_q and rag["rows"]["oracle"]["supporting_recall"] == 1.0
    assert "answer_recall_vs_human" in rag["rows"]["utility"]
    m = json.loads((out / "pipeline.json").read_text())
    assert set(m["splits_use"]) == {"train", "val", "unlabelled", "test"} and m["held_out_split"] == "test"


@pytest.mark.timeout(1800)  # the first test to use full_run runs the whole demo pipeline
def test_a_code_change_reruns_a_stage(full_run, monkeypatch):
    from pipelines import run as run_module

    p, _ = full_run
    monkeypatch.setattr(run_module, "code_fingerprint", lambda: "another-commit")
    r = run(p, until="split", echo=_quiet)
    assert r.ran == [s.name for s in stages(p)][: len(r.ran)] and "split" in r.ran


@pytest.mark.timeout(1800)
def test_the_gpu_cluster_pipeline_finishes_on_cpu_with_tiny_models(ray_session, tiny_causal_lm, tiny_encoder,
                                                                   shared_data, tmp_path):  # fmt: skip
    """gpu-cluster.yaml end to end with tiny models on CPU (demo.yaml runs in full_run; dl19.yaml is demo's DAG on
    TREC DL, loaded and wired above): its GPU settings must leave a runnable pipeline once the devices are CPUs.
    Its rag stages run on TREC DL, which has no gold answers: retrieval and generation, no EM."""
    p = _shipped("gpu-cluster.yaml", tmp_path / "run", tiny_causal_lm, tiny_encoder)
    r = run(p, echo=_quiet)
    assert r.ran == [s.name for s in stages(p)]
    summary = json.loads((tmp_path / "run" / "rank-eval" / "summary.json").read_text())
    assert {"human", "judge", "mix", "curriculum"} <= set(summary["rows"])
    rag = json.loads((tmp_path / "run" / "rag-eval" / "summary.json").read_text())["rows"]
    assert rag["oracle"]["supporting_recall"] == 1.0 and all(v["em"] is None for v in rag.values())
    assert all(v["without_gold_answer"] == v["questions"] for v in rag.values())


@pytest.mark.timeout(1800)  # the first test to use full_run runs the whole demo pipeline
def test_report_renders_in_headless_chromium(full_run, tmp_path):
    import re
    import shutil
    import subprocess

    _, r = full_run
    html = Path(r.report).read_text()
    heads = re.findall(r"<h2>(.*?)</h2>", html)
    assert heads == [
        "Data",
        "Judge",
        "Annotation",
        "Utility annotation",
        "Ranking",
        "Retrieval and serving",
        "RAG",
        "Configs",
    ]
    assert html.count('src="data:image/png;base64,') >= 5 and "did not run" not in html
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless Chromium (make test installs Debian's chromium where apt-get is available)")
    # Chromium runs the page and dumps the DOM; a script in the page records which images decoded
    probe = html.replace("</body>", "<script>window.onload=()=>{const i=[...document.images];document.title="
                         "'images '+i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length}</script></body>")  # fmt: skip
    page = tmp_path / "probe.html"
    page.write_text(probe)
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    n = html.count("<img ")
    assert f"<title>images {n}/{n}</title>" in dom, dom[:500]
    assert all(f"<h2>{h}</h2>" in dom for h in heads)


def test_resume_continues_an_interrupted_stage_only_with_the_same_config(tmp_path, monkeypatch):
    from pipelines import run as run_module
    from pipelines.stage import StageConfig

    class Cfg(StageConfig):
        x: int
        resume: bool = False

    value, seen = {"x": 1}, []
    stage = run_module.Stage("a", (), ("a",), lambda p, out, resume: [Cfg(x=value["x"], resume=resume)],
                             lambda cfgs: seen.append(cfgs[0].resume) or {}, resumable=True)  # fmt: skip
    monkeypatch.setattr(run_module, "stages", lambda p: [stage])
    p = _pipeline(tmp_path / "r")

    def interrupt():
        m = json.loads((tmp_path / "r" / "pipeline.json").read_text())
        m["stages"]["a"]["status"] = "running"
        (tmp_path / "r" / "pipeline.json").write_text(json.dumps(m))

    run(p, echo=_quiet)
    interrupt()
    run(p, resume=True, echo=_quiet)
    interrupt()
    value["x"] = 2  # the section changed while the stage was cut off: what it finished is stale
    run(p, resume=True, echo=_quiet)
    assert seen == [False, True, False]


def test_rag_summary_states_paper_2s_claims_once_with_paired_intervals(tmp_path):
    """The vs-human comparison (difference and ratio of answer recall, paired CIs) is computed once into
    summary.json; table.md shows the same sentence; questions only one system answered are left out of the pair."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.run import rag_summary

    answers = tmp_path / "rag-eval" / "answers"
    (answers / "rows").mkdir(parents=True)
    recall = {
        "human": [1, 1, 0, 1, 0, 1, 1, 0],
        "utility": [1, 0, 0, 1, 0, 1, 1, 0],
        "utility_h20": [1, 1, 1, 1, 0, 1, 1, 0],
    }
    rows = [(f"q{i}", s, float(v)) for s, vals in recall.items() for i, v in enumerate(vals)]
    rows.append(("q9", "utility", 1.0))  # answered by utility only: not a pair
    pq.write_table(pa.table({"qid": [r[0] for r in rows], "system": [r[1] for r in rows],
                             "answer_in_context": [r[2] for r in rows]}), answers / "rows" / "part-0.parquet")  # fmt: skip

    def stat(m):
        return {"mean": m, "ci_low": m - 0.1, "ci_high": m + 0.1}

    systems = {s: {"k": 5, "questions": 8, "answer_in_context": stat(sum(v) / 8), "em": stat(0.1), "f1": stat(0.2),
                   "supporting_recall": stat(0.5), "empty_answers": 0, "without_gold_answer": 0}
               for s, v in recall.items()}  # fmt: skip
    s = rag_summary({"systems": systems, "k": 5, "generator": "tiny", "prompt_version": "rag-v1@x"}, answers)
    d = s["rows"]["utility"]["answer_recall_vs_human"]
    assert d["n"] == 8 and d["mean"] == pytest.approx(-1 / 8) and d["ratio"] == pytest.approx(4 / 5)
    assert d["ratio_ci_low"] <= d["ratio"] <= d["ratio_ci_high"]
    assert s["rows"]["utility_h20"]["answer_recall_vs_human"]["ratio"] == pytest.approx(6 / 5)
    assert len(s["comparisons"]) == 2 and "0.80x [" in s["comparisons"][0]
    saved = json.loads((tmp_path / "rag-eval" / "summary.json").read_text())
    table = (tmp_path / "rag-eval" / "table.md").read_text()
    assert saved["comparisons"] == s["comparisons"] and all(c in table for c in s["comparisons"])
    assert (tmp_path / "rag-eval" / "rag.png").stat().st_size > 0
