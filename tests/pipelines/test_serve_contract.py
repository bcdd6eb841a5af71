"""The serving API under Schemathesis: requests generated from its own OpenAPI document (schema examples,
boundary values, valid and invalid bodies, wrong methods, missing auth; every route), all of Schemathesis' checks
on each answer: no 5xx, no status code, header or body the document does not declare.

The fast run serves the ASGI app a replica serves (``make_api`` around a loaded ``RankService`` and judge) from
this process with uvicorn; the slow one goes through Ray Serve's HTTP proxy. Both run Schemathesis' CLI, the
command the README gives for a deployed service. (Its pytest plugin's ``from_fixture`` fails on pytest 9.2:
it sets ``Function._nodeid``, which pytest no longer has.)"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.pipelines.test_serve import TOKEN, build_artifacts

SEED = 21
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = {"max_candidates": 20, "max_text_chars": 500, "max_judge_pairs": 4, "max_body_bytes": 16 * 1024}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def artifacts(ray_session, synth_dataset, tmp_path_factory):
    return build_artifacts(synth_dataset, tmp_path_factory)


@pytest.fixture(scope="module")
def app(artifacts, tiny_causal_lm):
    from pipelines import serve as S

    cfg = S.ServeConfig(ranker=str(artifacts / "ranker"), index=str(artifacts / "index"),
                        judge={"path": str(tiny_causal_lm)}, limits=LIMITS)  # fmt: skip
    return S.make_api(cfg, S.RankService(cfg), S.token_digest(TOKEN), S.LocalJudge(cfg.judge))


@contextmanager
def uvicorn_serving(app):
    """``app`` on a loopback port, served by uvicorn from a thread of this process."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        assert thread.is_alive() and time.monotonic() - t0 < 60, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def schemathesis_run(url: str, max_examples: int, cwd: Path) -> tuple[subprocess.CompletedProcess, str]:
    """Schemathesis' CLI against ``url``: every check, a fixed seed, ``max_examples`` per operation and phase.
    Returns the process and its summary lines."""
    cli = Path(sys.executable).with_name("schemathesis")
    cmd = [str(cli), "--no-color", "run", f"{url}/openapi.json", "--checks", "all", "--seed", str(SEED),
           "--max-examples", str(max_examples), "--header", f"Authorization: Bearer {TOKEN}",
           "--workers", "1", "--generation-database", "none", "--request-timeout", "60",
           "--wait-for-schema", "60"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=cwd)
    summary = "\n".join(
        line for line in out.stdout.splitlines()
        if re.search(r"test cases|checks|passed|failed|failures|operations|=====.* in ", line)
    )  # fmt: skip
    print(f"\n$ {' '.join(cmd)}\n{summary}")
    return out, summary


def test_api_contract_in_process(app, tmp_path):
    with uvicorn_serving(app) as url:
        out, summary = schemathesis_run(url, max_examples=100, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
    assert re.search(r"\d+ generated", summary), summary  # it ran cases, and said so


def test_no_term_queries_over_http(app):
    from starlette.testclient import TestClient

    cands = [{"docid": "x1", "text": "the quick brown fox"}, {"docid": "x2", "text": "日本語 Привет 0 ?"}]
    with TestClient(app) as client:
        for query in ["the", "?", "0", "日本語", "Привет", "the ? 0"]:
            r = client.post("/rank", json={"query": query, "k": 5}, headers=AUTH)
            assert r.status_code == 200, (query, r.text)
            assert r.json()["results"] == [] and r.json()["candidates"] == 0
            given = client.post("/rank", headers=AUTH, json={"query": query, "k": 5, "candidates": cands})
            assert given.status_code == 200, (query, given.text)
            assert sorted(h["docid"] for h in given.json()["results"]) == ["x1", "x2"]


def test_every_error_has_the_one_shape_and_is_documented(app):
    from starlette.testclient import TestClient

    from pipelines.serve import ErrorBody

    with TestClient(app) as client:
        answers = {
            401: client.post("/rank", json={"query": "q"}),
            404: client.get("/nowhere"),
            405: client.get("/rank"),
            413: client.post("/rank", headers=AUTH, content=b"x" * (LIMITS["max_body_bytes"] + 1)),
            422: client.post("/rank", headers=AUTH, json={"query": "q", "k": 0}),
        }
        doc = client.get("/openapi.json").json()
    for status, r in answers.items():
        assert r.status_code == status, (status, r.text)
        ErrorBody.model_validate(r.json())
    assert answers[401].json()["detail"][0]["loc"] == ["header", "authorization"]
    assert answers[401].headers["www-authenticate"] == "Bearer"
    paths = doc["paths"]
    assert set(paths["/rank"]["post"]["responses"]) == {"200", "401", "404", "413", "422", "503"}
    assert set(paths["/judge"]["post"]["responses"]) == {"200", "401", "404", "413", "422", "503"}
    assert set(paths["/healthz"]["get"]["responses"]) == {"200", "413", "503"}
    assert "text/plain" in paths["/rank"]["post"]["responses"]["503"]["content"]
    assert doc["components"]["securitySchemes"]  # auth on: the bearer scheme is declared


@pytest.mark.slow
def test_api_contract_through_serves_http_proxy(ray_session, artifacts, tiny_causal_lm, tmp_path):
    from ray import serve

    from pipelines import serve as S

    cfg = S.ServeConfig(ranker=str(artifacts / "ranker"), index=str(artifacts / "index"), port=_free_port(),
                        name="augrel-contract", limits=LIMITS,
                        judge={"path": str(tiny_causal_lm), "deployment": {
                            "num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}},
                        deployment={"num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 1}})  # fmt: skip
    serve.shutdown()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    try:
        serve.run(S.build_app(cfg, token=TOKEN), name=cfg.name, route_prefix="/", blocking=False)
        out, summary = schemathesis_run(f"http://127.0.0.1:{cfg.port}", max_examples=10, cwd=tmp_path)
        assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
        assert re.search(r"\d+ generated", summary), summary
    finally:
        serve.shutdown()
