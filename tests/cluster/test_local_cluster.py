"""A real 2-node Ray cluster on 127.0.0.1, driven through the CLI as a user would."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO


def _augrel(*args, timeout=300):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("AUGREL_MODEL_CACHE", None)  # each node's own cache
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


@pytest.fixture
def three_node_cluster():
    """A head that runs job drivers only (0 CPUs, as KubeRay's) and two 1-CPU worker nodes, each node with
    an AUGREL_HOME of its own, as pods each have their own disk."""
    name = f"test{os.getpid()}"
    up = _augrel("cluster", "up", "--workers", "2", "--cpus-per-node", "1", "--head-cpus", "0", "--name", name,
                 timeout=600)  # fmt: skip
    assert up.returncode == 0, up.stdout + up.stderr
    status = json.loads(_augrel("cluster", "status", "--name", name).stdout)
    yield name, status
    _augrel("cluster", "down", "--name", name)


def test_the_main_flow_through_submit_on_a_cluster_whose_nodes_have_their_own_homes(
    three_node_cluster, synth_dataset, tiny_causal_lm, tmp_path
):
    """index build, candidates, judge finetune and annotate as Ray jobs on three nodes with three AUGREL_HOMEs.

    The offline alias ``gemma3-270m`` resolves into the resolving node's home. Each worker's home holds a
    converted model (the tiny test model stands in for the converted Gemma, which would take a minute per node);
    the head's, where the drivers run, holds none. So the jobs succeed only if every worker resolves the model
    on its own node: a path shipped from the driver would not exist (and a driver that resolved it would
    convert the real GGUF into the head's home, which the test checks stayed empty)."""
    name, status = three_node_cluster
    assert status["up"] and status["nodes_alive"] == 3
    homes = {role: Path(h) for role, h in status["homes"].items()}
    assert len(set(homes.values())) == 3
    for role in ("worker-0", "worker-1"):
        shutil.copytree(tiny_causal_lm, homes[role] / "models" / "gemma-3-270m-q4_k_m")
    pids = list(status["processes"].values())

    def submit(*args):
        job = _augrel("submit", "--address", status["dashboard_url"], "--", *args, timeout=600)
        assert job.returncode == 0 and "SUCCEEDED" in job.stdout, job.stdout[-4000:] + job.stderr[-2000:]
        return job

    report = tmp_path / "report.json"
    job = submit("data", "validate", str(synth_dataset), "--report", str(report))
    assert "ray: 3 node(s), 2 CPU(s) at 127.0.0.1" in job.stdout  # the driver joined this cluster
    assert json.loads(report.read_text())["ok"] is True

    index, cands, judge, out = (tmp_path / d for d in ("index", "candidates", "judge", "judgments"))
    submit("index", "build", "--docs", str(synth_dataset / "docs"), "--out", str(index),
           "--set", "num_cpus_per_actor=0.5")  # fmt: skip
    assert json.loads((index / "manifest.json").read_text())["counts"]["docs"] == 328
    submit("candidates", "--queries", str(synth_dataset / "queries"), "--index", str(index), "--k", "3",
           "--qrels", str(synth_dataset / "qrels"), "--out", str(cands),
           "--set", "concurrency=[1,1]", "--set", "num_cpus_per_actor=0.5")  # fmt: skip
    n_cands = json.loads((cands / "manifest.json").read_text())["counts"]["pairs"]
    assert n_cands == 48 * 3
    submit("judge", "finetune", "--train", str(synth_dataset / "pairs"), "--base-model", "gemma3-270m",
           "--out", str(judge), "--set", "n_train=8", "--set", "n_val=8", "--set", "batch_size=2",
           "--set", "max_steps=1", "--set", "num_workers=2", "--set", "dtype=fp32", "--set", "stack=null",
           "--set", "cutpoint_pairs=16")  # fmt: skip
    card = json.loads((judge / "judge_card.json").read_text())
    assert card["base_model"] == "gemma3-270m" and len(card["cutpoints"]) == 3
    assert card["training"]["deepspeed"] == "zero2"  # auto, on CPU workers
    submit("annotate", "--judge", str(judge), "--pairs", str(cands), "--out", str(out), "--unit-rows", "50",
           "--concurrency", "1,2", "--num-cpus-per-actor", "0.5")  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"] == {
        "pairs_in": n_cands,
        "judged": n_cands,
        "rejected": 0,
    }

    # nothing resolved the model on the drivers' node: the workers loaded it from their own homes
    assert not (homes["head"] / "models").exists()

    # a failing job exits non-zero with the job's status
    bad = _augrel(
        "submit", "--address", status["dashboard_url"], "--", "data", "validate", str(tmp_path / "nope")
    )
    assert bad.returncode == 1 and "FAILED" in bad.stdout

    down = _augrel("cluster", "down", "--name", name)
    assert down.returncode == 0 and "worker-1, worker-0, head" in down.stdout
    for pid in pids:  # exactly those process groups are gone
        assert not any(os.getpgid(p.pid) == pid for p in psutil.process_iter() if p.status() != "zombie")


def test_submit_without_cluster_says_how_to_get_one():
    proc = _augrel("submit", "--", "data", "validate", "x")
    if "RAY_API_SERVER_ADDRESS" in os.environ:
        pytest.skip("a cluster address is configured in this environment")
    assert proc.returncode == 2 and "augrel cluster up" in proc.stderr
