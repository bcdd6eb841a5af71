"""``augrel run PIPELINE.yaml``: the whole method as one DAG of stages, each stage's output the next one's input.

    synth? -> prepare -> validate
                      -> split -> judge -> annotate -> judge_eval
                               -> features_train -> ranker -> rank_eval
                               -> features_test  -> rank_eval, augment (with annotate)
                      -> index -> serve (ranker, judge)
    every stage -> report

A stage is skipped when its last run finished, its resolved config hashes the same, the content hashes of its
inputs (the upstream stages' outputs) are unchanged, and its own outputs still hash as they did: a second run
with nothing changed does no work, and changing one stage's section reruns that stage and those after it.
OUT/pipeline.json records the DAG, every stage's config hash, input and output hashes, status and wall time.

Each section of the pipeline YAML is the config of one stage (``augrel <stage> --help`` lists its keys); the
runner fills in the paths that chain the stages. ``--set judge.lr=1e-4`` overrides one value.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.errors import ConfigError
from pipelines.stage import StageConfig, code_version

log = logging.getLogger("augrel")

MANIFEST = "pipeline.json"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSection(_Section):
    source: Literal["synth", "beir", "trec-dl", "pairs", "hotpotqa"] = Field(
        "synth", description="synth: generate a corpus (augrel data synth); else the format of src"
    )
    src: str | None = Field(None, description="the raw data (for every source but synth)")
    synth: dict[str, Any] = Field(default_factory=dict, description="augrel data synth settings")
    prepare: dict[str, Any] = Field(default_factory=dict, description="augrel data prepare settings")
    split: dict[str, Any] = Field(default_factory=dict, description="augrel data split settings")


class TrackingSection(_Section):
    mlflow_uri: str | None = Field(None, description="log every stage to MLflow here (e.g. file:runs/mlruns)")
    experiment: str = "augrel"


class ServeSection(_Section):
    check: bool = Field(False, description="deploy on Ray Serve, rank and grade once, take it down")
    settings: dict[str, Any] = Field(default_factory=dict, description="augrel serve settings")


class PipelineConfig(StageConfig):
    """``augrel run``: where the run lives, the data, and one section per stage."""

    name: str = "augrel"
    out: str = Field(description="run directory; every stage writes a subdirectory of it")
    data: DataSection = DataSection()
    judge: dict[str, Any] = Field(default_factory=dict, description="augrel judge finetune settings")
    annotate_split: str = Field("test", description="the split whose pairs the judge annotates")
    annotate: dict[str, Any] = Field(default_factory=dict, description="augrel annotate settings")
    judge_eval: dict[str, Any] = Field(default_factory=dict, description="augrel judge eval settings")
    features: dict[str, Any] = Field(default_factory=dict, description="augrel rank features settings")
    ranker: dict[str, Any] = Field(default_factory=dict, description="augrel rank train settings")
    augment: dict[str, Any] = Field(default_factory=dict, description="augrel experiment augment settings")
    index: dict[str, Any] = Field(default_factory=dict, description="augrel index build settings")
    serve: ServeSection = ServeSection()
    tracking: TrackingSection = TrackingSection()


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    outputs: tuple[str, ...]  # paths under OUT
    configs: Callable[[PipelineConfig, Path, bool], list[StageConfig]]
    run: Callable[[list[StageConfig]], dict[str, Any]]
    resumable: bool = False


# ---------------------------------------------------------------------------------------- the stages


def _cfg(cls, section: str, values: dict[str, Any], wired: dict[str, Any]) -> StageConfig:
    """A stage config from the pipeline's section plus the wired paths; errors name ``section.key``."""
    from pydantic import ValidationError

    clash = sorted(set(values) & set(wired))
    if clash:
        raise ConfigError(f"{section}.{clash[0]}: set by the pipeline (it chains the stages); remove it")
    try:
        return cls.model_validate({**values, **wired})
    except ValidationError as e:
        lines = [f"invalid pipeline section '{section}':"]
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {section}.{key}: {msg}")
        raise ConfigError("\n".join(lines)) from None


def _synth(p, out, resume):
    from pipelines.synth import SynthConfig

    return [_cfg(SynthConfig, "data.synth", p.data.synth, {"out": str(out / "raw")})]


def _prepare(p, out, resume):
    from pipelines.data import PrepareConfig

    src = str(out / "raw") if p.data.source == "synth" else p.data.src
    if src is None:
        raise ConfigError(f"data.src: required for data.source {p.data.source}")
    fmt = "beir" if p.data.source == "synth" else p.data.source
    return [
        _cfg(
            PrepareConfig,
            "data.prepare",
            p.data.prepare,
            {"format": fmt, "src": src, "out": str(out / "data")},
        )
    ]


def _validate(p, out, resume):
    from pipelines.validate import ValidateConfig

    return [ValidateConfig(path=str(out / "data"), report=str(out / "validation" / "report.json"))]


def _split(p, out, resume):
    from pipelines.data import SplitConfig

    return [
        _cfg(SplitConfig, "data.split", p.data.split, {"src": str(out / "data"), "out": str(out / "splits")})
    ]


def _judge(p, out, resume):
    from pipelines.finetune_judge import FinetuneConfig

    wired = {"train": [str(out / "splits" / "train" / "pairs")], "out": str(out / "judge")}
    if "val" not in p.judge:
        wired["val"] = [str(out / "splits" / "val" / "pairs")]
    return [_cfg(FinetuneConfig, "judge", p.judge, {**wired, "resume": resume})]


def _annotate(p, out, resume):
    from pipelines.annotate import AnnotateConfig

    wired = {"judge": str(out / "judge"), "pairs": str(out / "splits" / p.annotate_split / "pairs"),
             "out": str(out / "judgments"), "resume": resume, "overwrite": not resume}  # fmt: skip
    return [_cfg(AnnotateConfig, "annotate", p.annotate, wired)]


def _judge_eval(p, out, resume):
    from pipelines.judge import EvalConfig

    wired = {"judgments": str(out / "judgments"), "qrels": str(out / "splits" / p.annotate_split / "qrels"),
             "out": str(out / "judge-eval")}  # fmt: skip
    return [_cfg(EvalConfig, "judge_eval", p.judge_eval, wired)]


def _features(split_name):
    def build(p, out, resume):
        from pipelines.rank import FeaturesConfig

        wired = {"pairs": str(out / "splits" / split_name / "pairs"), "docs": str(out / "data" / "docs"),
                 "out": str(out / f"features-{split_name}")}  # fmt: skip
        return [_cfg(FeaturesConfig, "features", p.features, wired)]

    return build


def _ranker(p, out, resume):
    from pipelines.rank import RankTrainConfig

    values = {"label_source": "human", **p.ranker}
    return [
        _cfg(
            RankTrainConfig,
            "ranker",
            values,
            {"features": str(out / "features-train"), "out": str(out / "ranker")},
        )
    ]


def _rank_eval(p, out, resume):
    from pipelines.rank import RankEvalConfig, RankPredictConfig

    test = str(out / "features-test")
    return [RankPredictConfig(ranker=str(out / "ranker"), features=test, out=str(out / "run-lambdamart")),
            RankPredictConfig(feature="bm25", features=test, out=str(out / "run-bm25")),
            RankEvalConfig(run=str(out / "run-lambdamart"), baseline=str(out / "run-bm25"),
                           qrels=str(out / "splits" / "test" / "qrels"), out=str(out / "rank-eval"))]  # fmt: skip


def _augment(p, out, resume):
    from pipelines.experiment import AugmentConfig

    wired = {"features": str(out / f"features-{p.annotate_split}"), "judgments": str(out / "judgments"),
             "out": str(out / "augment")}  # fmt: skip
    return [_cfg(AugmentConfig, "augment", p.augment, wired)]


def _index(p, out, resume):
    from pipelines.index import IndexConfig

    return [
        _cfg(IndexConfig, "index", p.index, {"docs": str(out / "data" / "docs"), "out": str(out / "index")})
    ]


def _serve(p, out, resume):
    from pipelines.serve import ServeConfig
    from pipelines.stage import deep_merge

    values = deep_merge({"judge": {"path": str(out / "judge")}, "port": 8765}, p.serve.settings)
    return [
        _cfg(
            ServeConfig,
            "serve.settings",
            values,
            {"ranker": str(out / "ranker"), "index": str(out / "index")},
        )
    ]


def _report(p, out, resume):
    return [ReportConfig(run=str(out), out=str(out / "report"))]


class ReportConfig(StageConfig):
    run: str
    out: str


# ------------------------------------------------------------------------------------------ runners


def _summary(r) -> dict[str, Any]:
    return {"counts": dict(r.counts), "wall_s": r.wall_s}


def _run_one(fn_path: str):
    def run(cfgs):
        import importlib

        module, _, fn = fn_path.partition(":")
        return _summary(getattr(importlib.import_module(module), fn)(cfgs[0]))

    return run


def _run_validate(cfgs):
    from pipelines.validate import validate

    Path(cfgs[0].report).parent.mkdir(parents=True, exist_ok=True)
    report = validate(cfgs[0])
    if not report.ok:
        raise ConfigError(f"data validation failed: see {report.path}")
    return {"ok": True}


def _run_rank_eval(cfgs):
    from pipelines.rank import evaluate, predict

    predict(cfgs[0])
    predict(cfgs[1])
    r = evaluate(cfgs[2])
    return {"mean": r.extra["mean"], "vs_baseline": r.extra.get("vs_baseline", {})}


def _run_serve(cfgs):
    from ray import serve as ray_serve

    from pipelines import serve

    cfg = cfgs[0]
    running = _serve_running()
    serve.start(cfg)
    url = f"http://{cfg.host}:{cfg.port}"
    t0 = time.perf_counter()
    try:
        code = serve.check(cfg, url)
    finally:
        if not running:  # Serve was started for this check: take it down with its proxy and port
            ray_serve.shutdown()
    if code:
        raise ConfigError(f"serve check failed at {url}")
    result = {
        "url": url,
        "ok": True,
        "check_s": round(time.perf_counter() - t0, 2),
        "judge": cfg.judge is not None,
    }
    out = Path(cfg.ranker).parent / "serve"
    out.mkdir(parents=True, exist_ok=True)
    (out / "check.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _serve_running() -> bool:
    """Whether a Serve controller already runs on this cluster (not asking Serve itself: that starts one)."""
    import ray

    return any(a["name"] == "SERVE_CONTROLLER_ACTOR" for a in ray.util.list_named_actors(all_namespaces=True))


def _run_report(cfgs):
    from eval.report import write_report

    path = write_report(cfgs[0].run, cfgs[0].out)
    return {"report": str(path)}


def stages(p: PipelineConfig) -> list[Stage]:
    """The DAG of this pipeline, in an order that runs every stage after the stages it needs."""
    out: list[Stage] = []
    if p.data.source == "synth":
        out.append(Stage("synth", (), ("raw",), _synth, _run_one("pipelines.synth:synth")))
    out += [
        Stage("prepare", ("synth",) if p.data.source == "synth" else (), ("data",), _prepare,
              _run_one("pipelines.data:prepare")),
        Stage("validate", ("prepare",), ("validation",), _validate, _run_validate),
        Stage("split", ("prepare",), ("splits",), _split, _run_one("pipelines.data:split")),
        Stage("judge", ("split",), ("judge",), _judge, _run_one("pipelines.finetune_judge:finetune"), resumable=True),
        Stage("annotate", ("judge", "split"), ("judgments",), _annotate, _run_one("pipelines.annotate:run"),
              resumable=True),
        Stage("judge_eval", ("annotate", "split"), ("judge-eval",), _judge_eval, _run_one("pipelines.judge:evaluate")),
        Stage("features_train", ("split", "prepare"), ("features-train",), _features("train"),
              _run_one("pipelines.rank:features")),
        Stage("features_test", ("split", "prepare"), ("features-test",), _features("test"),
              _run_one("pipelines.rank:features")),
        Stage("ranker", ("features_train",), ("ranker",), _ranker, _run_one("pipelines.rank:train")),
        Stage("rank_eval", ("ranker", "features_test", "split"), ("run-lambdamart", "run-bm25", "rank-eval"),
              _rank_eval, _run_rank_eval),
        Stage("augment", (f"features_{p.annotate_split}", "annotate"), ("augment",), _augment,
              _run_one("pipelines.experiment:augment")),
        Stage("index", ("prepare",), ("index",), _index, _run_one("pipelines.index:build")),
    ]  # fmt: skip
    if p.serve.check:
        out.append(Stage("serve", ("ranker", "index", "judge"), ("serve",), _serve, _run_serve))
    upstream = tuple(s.name for s in out if s.name != "serve")
    out.append(Stage("report", upstream, ("report",), _report, _run_report))
    return out


# ------------------------------------------------------------------------------------------ hashing


def config_hash(cfgs: list[StageConfig]) -> str:
    """Hash of what a stage computes: its configs without the flags that only say how to (re)start it."""
    data = [
        {k: v for k, v in c.model_dump(mode="json").items() if k not in ("resume", "overwrite")} for c in cfgs
    ]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class OutputHasher:
    """Content hash of a stage's output paths: every file's relative path and bytes. A file whose size and
    mtime match the last run's reuses that run's digest, so an unchanged multi-GB output is not re-read."""

    SKIP_DIRS = frozenset({"ray_train", "__pycache__", ".staging"})

    def __init__(self, cache: dict[str, list]):
        self.cache = cache

    def file_digest(self, path: Path) -> str:
        st = path.stat()
        key = str(path)
        hit = self.cache.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        self.cache[key] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
        return h.hexdigest()

    def __call__(self, root: Path, rels: tuple[str, ...]) -> str | None:
        h = hashlib.sha256()
        for rel in rels:
            p = root / rel
            if not p.exists():
                return None
            files = [p] if p.is_file() else sorted(
                f for f in p.rglob("*") if f.is_file() and not (set(f.relative_to(p).parts) & self.SKIP_DIRS)
                and not f.name.startswith("."))  # fmt: skip
            for f in files:
                h.update(str(f.relative_to(root)).encode() + b"\0" + self.file_digest(f).encode())
        return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------- running


def _load_manifest(out: Path) -> dict[str, Any]:
    p = out / MANIFEST
    return json.loads(p.read_text()) if p.exists() else {}


def _save_manifest(out: Path, m: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(m, indent=2, default=str) + "\n")
    os.replace(tmp, out / MANIFEST)


@dataclass
class RunResult:
    out: str
    ran: list[str]
    skipped: list[str]
    wall_s: dict[str, float]
    report: str | None


def run(p: PipelineConfig, *, resume: bool = False, from_stage: str | None = None, until: str | None = None,
        echo: Callable[[str], None] = print) -> RunResult:  # fmt: skip
    from pipelines.tracking import Tracker

    out = Path(p.out)
    dag = stages(p)
    names = [s.name for s in dag]
    for flag, value in (("--from", from_stage), ("--until", until)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value}: no such stage (stages: {', '.join(names)})")
    m = _load_manifest(out)
    m.update(name=p.name, dag={s.name: list(s.needs) for s in dag}, order=names,
             config=p.model_dump(mode="json"))  # fmt: skip
    recs: dict[str, Any] = m.setdefault("stages", {})
    hasher = OutputHasher(m.setdefault("file_hashes", {}))
    forced = set(names[names.index(from_stage) :]) if from_stage else set()
    last = names.index(until) if until else len(names) - 1
    ran, skipped, walls = [], [], {}
    t_run = time.time()
    tracker = Tracker(p.tracking.mlflow_uri, p.tracking.experiment, p.name)
    with tracker:
        for i, st in enumerate(dag[: last + 1]):
            rec = recs.get(st.name, {})
            interrupted = rec.get("status") == "running"
            cfgs = st.configs(p, out, resume and st.resumable and interrupted)
            chash = config_hash(cfgs)
            inputs = {n: recs.get(n, {}).get("output_hash") for n in st.needs if n in names}
            current = hasher(out, st.outputs) if rec.get("status") == "done" else None
            if (st.name not in forced and rec.get("status") == "done" and rec.get("config_hash") == chash
                    and rec.get("inputs") == inputs and current is not None and current == rec.get("output_hash")):  # fmt: skip
                skipped.append(st.name)
                echo(f"== {i + 1}/{len(dag)} {st.name}: unchanged, skipped")
                continue
            why = ("forced (--from)" if st.name in forced else "first run" if not rec else
                   "resuming" if interrupted and resume and st.resumable else
                   "interrupted" if interrupted else "config changed" if rec.get("config_hash") != chash else
                   "inputs changed" if rec.get("inputs") != inputs else "outputs changed or missing")  # fmt: skip
            echo(f"== {i + 1}/{len(dag)} {st.name} ({why}) -> {', '.join(str(out / o) for o in st.outputs)}")
            recs[st.name] = {"status": "running", "config_hash": chash, "inputs": inputs,
                             "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
            _save_manifest(out, m)
            t0 = time.perf_counter()
            result = st.run(cfgs)
            wall = time.perf_counter() - t0
            recs[st.name] = {**recs[st.name], "status": "done", "output_hash": hasher(out, st.outputs),
                             "wall_s": round(wall, 2), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "result": result, "code_version": code_version()}  # fmt: skip
            _save_manifest(out, m)
            tracker.log_stage(st.name, cfgs, result, wall, [out / o for o in st.outputs])
            ran.append(st.name)
            walls[st.name] = wall
            echo(f"   {st.name} done in {wall:.1f}s")
        m.setdefault("runs", []).append({"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t_run)),
                                         "wall_s": round(time.time() - t_run, 2), "ran": ran, "skipped": skipped})  # fmt: skip
        _save_manifest(out, m)
    report = recs.get("report", {}).get("result", {}).get("report")
    return RunResult(str(out), ran, skipped, walls, report)


def headline(out: Path) -> list[str]:
    """The figures a run is judged by, one line each, from its stage outputs."""
    lines = []
    j = out / "judge-eval" / "metrics.json"
    if j.exists():
        m = json.loads(j.read_text())["metrics"]
        lines.append(f"judge vs human: kappa {m['cohen_kappa']:.3f}, weighted kappa {m['weighted_kappa_quadratic']:.3f}, "
                     f"alpha {m['krippendorff_alpha_ordinal']:.3f}, tau {m['kendall_tau_b_pooled']:.3f}")  # fmt: skip
    a = out / "judgments" / "manifest.json"
    if a.exists():
        m = json.loads(a.read_text())
        lines.append(f"annotation: {m['counts'].get('judged', 0):,} pairs judged, {m['counts'].get('rejected', 0):,} "
                     f"rejected, {m.get('steady_pairs_per_s') or m.get('pairs_per_s')} pairs/s")  # fmt: skip
    r = out / "rank-eval" / "metrics.json"
    if r.exists():
        m = json.loads(r.read_text())
        vs = m.get("vs_baseline", {}).get("ndcg10")
        lines.append(
            f"ranker NDCG@10 {m['mean']['ndcg10']:.4f}"
            + (f" (BM25 {vs['mean_a']:.4f}, p={vs['p_ttest']:.3g})" if vs else "")
        )
    g = out / "augment" / "results.json"
    if g.exists():
        m = json.loads(g.read_text())
        lines.append("augmentation NDCG@10: " + ", ".join(f"{k} {v['ndcg10']:.4f}" for k, v in m.items()))
    return lines
