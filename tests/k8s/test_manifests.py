"""k8s/: every overlay renders, every KubeRay object validates against the CRD schemas in ../shared (closed:
an unknown field is an error, as the API server's strict field validation makes it), every container has
resources and limits, and every entrypoint is a real augrel command whose config loads."""

from __future__ import annotations

import copy
import importlib
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SHARED
from tests.k8s.render import load_all, render

K8S = REPO / "k8s"
SCHEMAS = SHARED / "schemas" / "kuberay"
OVERLAYS = ["base", "overlays/dev-cpu", "overlays/gpu-prod"]
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml",
             "RayCluster": "ray.io_rayclusters.yaml"}  # fmt: skip
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def closed(schema):
    """The schema with every object that lists its properties closed to others (unless it preserves them)."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):  # fmt: skip
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def validators():
    import jsonschema

    if not SCHEMAS.exists():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS}")
    out = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.load((SCHEMAS / name).read_text(), Loader=_Loader)
        for v in crd["spec"]["versions"]:
            schema = closed(v["schema"]["openAPIV3Schema"])
            out[(f"{crd['spec']['group']}/{v['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return out


def errors(validators, obj):
    v = validators.get((obj["apiVersion"], obj["kind"]))
    if v is None:
        return [f"no CRD schema for {obj['apiVersion']} {obj['kind']}"]
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(obj)]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    return request.param, render(K8S / request.param)


def test_python_rendering_equals_kubectl(rendered):
    name, objs = rendered
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not installed: the Python rendering is used alone")
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / name)], capture_output=True, text=True, check=True
    )
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(load_all(out.stdout), key=key) == sorted(objs, key=key)


def test_kuberay_objects_validate_against_the_crds(rendered, validators):
    name, objs = rendered
    ray_objs = [o for o in objs if o["apiVersion"].startswith("ray.io/")]
    assert {o["kind"] for o in ray_objs} == {"RayJob", "RayService"}
    for o in ray_objs:
        assert errors(validators, o) == [], f"{name}: {o['kind']} {o['metadata']['name']}"


def test_the_validator_catches_a_misspelled_field(validators):
    job = next(o for o in render(K8S / "base") if o["kind"] == "RayJob")
    for path, wrong in [(("spec",), "entryPoint"), (("spec", "rayClusterSpec"), "workerGroupSpec"),
                        (("spec", "rayClusterSpec", "headGroupSpec"), "rayStartParam")]:  # fmt: skip
        bad = copy.deepcopy(job)
        node = bad
        for p in path:
            node = node[p]
        node[wrong] = node.pop(next(k for k in node if k.lower().startswith(wrong.lower()[:8])), "x")
        assert any(wrong in e for e in errors(validators, bad)), wrong
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any("maxReplica" in e for e in errors(validators, bad))
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    assert errors(validators, bad)


def _pod_specs(obj):
    spec = obj["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for g in cluster.get("workerGroupSpecs", []):
        yield g["groupName"], g["template"]["spec"]
    if "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]["spec"]


def test_every_container_has_requests_and_limits_and_the_cluster_stays_inside(rendered):
    name, objs = rendered
    for o in objs:
        if not o["apiVersion"].startswith("ray.io/"):
            continue
        cluster = o["spec"].get("rayClusterSpec") or o["spec"]["rayClusterConfig"]
        assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
        assert cluster["authOptions"]["mode"] == "token"
        if cluster.get("enableInTreeAutoscaling"):
            res = cluster["autoscalerOptions"]["resources"]
            assert res["requests"] and res["limits"]
        for group, pod in _pod_specs(o):
            for c in pod["containers"]:
                r = c.get("resources", {})
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(r.get(kind, {})), (
                        f"{name} {o['metadata']['name']} {group}"
                    )
                gpus = r["limits"].get("nvidia.com/gpu")
                if name == "overlays/dev-cpu":
                    assert gpus is None, f"dev-cpu asks for a GPU in {group}"


def test_annotation_scales_gpu_workers_from_zero(rendered):
    name, objs = rendered
    job = next(o for o in objs if o["metadata"]["name"] == "augrel-annotate")
    cluster = job["spec"]["rayClusterSpec"]
    group = cluster["workerGroupSpecs"][0]
    assert cluster["enableInTreeAutoscaling"] and group["minReplicas"] == 0
    if name == "overlays/gpu-prod":
        assert group["maxReplicas"] == 8


def _app_path(p: str) -> Path:
    assert p.startswith("/app/"), p
    return REPO / p[len("/app/") :]


def test_entrypoints_are_augrel_commands_whose_configs_load(rendered):
    from pipelines.annotate import AnnotateConfig
    from pipelines.cli import build_parser
    from pipelines.finetune_judge import FinetuneConfig
    from pipelines.serve import ServeConfig
    from pipelines.stage import load_config

    stage_config = {("judge", "finetune"): FinetuneConfig, ("annotate",): AnnotateConfig}
    _, objs = rendered
    for o in objs:
        if o["kind"] == "RayJob":
            argv = shlex.split(o["spec"]["entrypoint"])
            assert argv[0] == "augrel"
            a = build_parser().parse_args(argv[1:])  # argparse exits on an unknown command or option
            cmd = tuple(x for x in (a.command, getattr(a, "judge_command", None)) if x)
            load_config(stage_config[cmd], _app_path(a.config), a.overrides)
        if o["kind"] == "RayService":
            serve_cfg = yaml.safe_load(o["spec"]["serveConfigV2"])
            for app in serve_cfg["applications"]:
                module, _, attr = app["import_path"].partition(":")
                assert callable(getattr(importlib.import_module(module), attr))
                cfg = load_config(ServeConfig, _app_path(app["args"]["config"]))
                assert cfg.host == "0.0.0.0" and cfg.port == serve_cfg["http_options"]["port"]


def test_dockerfile_copies_what_the_entrypoints_import():
    text = (K8S / "Dockerfile").read_text()
    for pkg in ("cluster", "pipelines", "models", "retrieval", "eval", "configs"):
        assert f"COPY {pkg} {pkg}" in text
    assert "VARIANT" in text and "torch==${TORCH_VERSION}" in text


def test_one_faiss_build_per_install():
    """faiss-cpu and faiss-gpu-cu12 both install the module `faiss`: neither is a base dependency, each is an
    extra of its own, and setup / the image install exactly one (CPU hosts: cpu, GPU hosts: gpu)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    faiss = lambda deps: [d for d in deps if d.startswith("faiss")]  # noqa: E731
    assert faiss(project["dependencies"]) == []
    extras = {name: faiss(deps) for name, deps in project["optional-dependencies"].items() if faiss(deps)}
    assert set(extras) == {"cpu", "gpu"}
    assert extras["cpu"][0].startswith("faiss-cpu") and extras["gpu"][0].startswith("faiss-gpu")
    makefile = (REPO / "Makefile").read_text()
    assert "'.[dev,cpu]'" in makefile and "'.[dev,gpu]'" in makefile
    docker = (K8S / "Dockerfile").read_text()
    assert '".[cpu]"' in docker and '".[gpu]"' in docker


def test_every_model_loading_pod_shares_the_model_cache(rendered):
    """AUGREL_MODEL_CACHE on the shared volume: the offline model converts once per cluster, not per pod."""
    name, objs = rendered
    seen = 0
    for obj in objs:
        if obj["kind"] not in CRD_FILES:
            continue
        for group, spec in _pod_specs(obj):
            for c in spec["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                if "HF_HOME" in env:  # a container that loads models
                    seen += 1
                    assert env.get("AUGREL_MODEL_CACHE") == "/data/models", (
                        name,
                        obj["metadata"]["name"],
                        group,
                    )
                    assert any(m["mountPath"] == "/data" for m in c.get("volumeMounts", []))
    assert seen
