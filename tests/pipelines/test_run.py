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
    with pytest.raises(ConfigError, match="--until"):
        run(_pipeline(tmp_path), until="nope", echo=_quiet)
    with pytest.raises(ConfigError, match="data"):
        load_config(PipelineConfig, None, ["data.sorce=x"], out=str(tmp_path))


@pytest.mark.parametrize("name", ["demo.yaml", "dl19.yaml", "gpu-cluster.yaml"])
def test_shipped_pipelines_load_and_wire_every_stage(name):
    p = load_config(PipelineConfig, REPO / "configs" / name)
    built = {s.name: s.configs(p, Path(p.out), False) for s in stages(p)}
    assert {"judge", "annotate", "ranker", "augment", "report"} <= set(built)
    if name == "gpu-cluster.yaml":
        (ft,) = built["judge"]
        assert ft.use_gpu and ft.deepspeed == "zero3_offload" and ft.dtype == "bf16"
        assert ft.base_model == "google/gemma-2-9b-it"
        (ann,) = built["annotate"]
        assert ann.profile == "gpu-8" and ann.autoscaling_cluster
        (ix,) = built["index"]
        assert ix.num_gpus_per_actor > 0
        (sv,) = built["serve"]
        assert sv.device == "cuda" and sv.retriever == "dense" and sv.judge.path == "/data/runs/prod/judge"


@pytest.fixture(scope="module")
def full_run(ray_session, tiny_causal_lm, tmp_path_factory):
    """The whole pipeline on a tiny random judge: every stage runs for real, small."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("pipeline") / "run"
    p = _pipeline(
        out,
        judge={"base_model": str(tiny_causal_lm), "n_train": 16, "n_val": 8, "batch_size": 4, "max_steps": 2,
               "eval_every": 1, "num_workers": 2, "dtype": "fp32", "lr": 1e-2},
        annotate={"unit_rows": 64},
        augment={"folds": 2, "seeds": [0], "ranker": {"n_estimators": 20}, "methods": ["bm25", "h20", "h20+judge"]},
        ranker={"ranker": {"n_estimators": 20}},
        serve={"check": True, "settings": {"port": port, "deployment": {"num_cpus": 0.25},
                                           "judge": {"deployment": {"num_cpus": 0.25}}}},
    )  # fmt: skip
    return p, run(p, echo=_quiet)


def test_the_whole_pipeline_runs_and_a_rerun_does_nothing(full_run):
    p, r = full_run
    assert r.ran == [s.name for s in stages(p)]
    out = Path(p.out)
    for d in (
        "judge",
        "judgments",
        "judge-eval",
        "ranker",
        "rank-eval",
        "augment",
        "index",
        "serve",
        "report",
    ):
        assert (out / d).exists(), d
    assert r.report == str(out / "report" / "index.html")
    again = run(p, echo=_quiet)
    assert again.ran == [] and len(again.skipped) == len(r.ran)


def test_report_renders_in_headless_chromium(full_run, tmp_path):
    import re
    import shutil
    import subprocess

    _, r = full_run
    html = Path(r.report).read_text()
    heads = re.findall(r"<h2>(.*?)</h2>", html)
    assert heads == ["Data", "Judge", "Annotation", "Ranking", "Retrieval and serving", "Configs"]
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
