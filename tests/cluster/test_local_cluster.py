"""A real 2-node Ray cluster on 127.0.0.1, driven through the CLI as a user would."""

import json
import os
import subprocess
import sys

import psutil
import pytest

from tests.conftest import REPO


def _augrel(*args, timeout=300):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


@pytest.fixture
def two_node_cluster():
    name = f"test{os.getpid()}"
    up = _augrel("cluster", "up", "--workers", "1", "--cpus-per-node", "1", "--name", name)
    assert up.returncode == 0, up.stdout + up.stderr
    status = json.loads(_augrel("cluster", "status", "--name", name).stdout)
    yield name, status
    _augrel("cluster", "down", "--name", name)


def test_submit_validate_and_annotate_to_two_node_cluster(
    two_node_cluster, synth_dataset, tiny_causal_lm, tmp_path
):
    name, status = two_node_cluster
    assert status["up"] and status["nodes_alive"] == 2
    pids = list(status["processes"].values())
    report = tmp_path / "report.json"
    job = _augrel(
        "submit",
        "--address",
        status["dashboard_url"],
        "--",
        "data",
        "validate",
        str(synth_dataset),
        "--report",
        str(report),
    )
    assert job.returncode == 0, job.stdout + job.stderr
    assert "SUCCEEDED" in job.stdout
    assert "ray: 2 node(s), 2 CPU(s) at 127.0.0.1" in job.stdout  # the driver joined this cluster
    assert json.loads(report.read_text())["ok"] is True

    # the distributed judge: a Ray Data actor pool on the 2-node cluster, every pair judged once
    out = tmp_path / "judgments"
    job = _augrel("submit", "--address", status["dashboard_url"], "--", "annotate", "--judge", str(tiny_causal_lm),
                  "--pairs", str(synth_dataset / "pairs"), "--out", str(out), "--unit-rows", "200",
                  "--concurrency", "1,2", "--num-cpus-per-actor", "0.5")  # fmt: skip
    assert job.returncode == 0, job.stdout + job.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    pairs = json.loads((synth_dataset / "manifest.json").read_text())["counts"]["pairs"]
    assert manifest["complete"] and manifest["counts"] == {"pairs_in": pairs, "judged": pairs, "rejected": 0}

    # a failing job exits non-zero with the job's status
    bad = _augrel(
        "submit", "--address", status["dashboard_url"], "--", "data", "validate", str(tmp_path / "nope")
    )
    assert bad.returncode == 1 and "FAILED" in bad.stdout

    down = _augrel("cluster", "down", "--name", name)
    assert down.returncode == 0 and "worker-0, head" in down.stdout
    for pid in pids:  # exactly those process groups are gone
        assert not any(os.getpgid(p.pid) == pid for p in psutil.process_iter() if p.status() != "zombie")


def test_submit_without_cluster_says_how_to_get_one():
    proc = _augrel("submit", "--", "data", "validate", "x")
    if "RAY_API_SERVER_ADDRESS" in os.environ:
        pytest.skip("a cluster address is configured in this environment")
    assert proc.returncode == 2 and "augrel cluster up" in proc.stderr
