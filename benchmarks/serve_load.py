"""Serving: ``POST /rank`` with 100 candidates on Ray Serve (127.0.0.1) under a bounded closed-loop load,
against calling the same ranking code in-process. One table; every row measured in this run.

Corpus: TREC DL 2019 passages (../shared/data; --quick: the passages of 10 queries), indexed by
``augrel index build`` (BM25 + FAISS + stored MiniLM vectors); a LambdaMART ranker trained on the judged pairs.
Each request ranks 100 judged passages of one DL19 query (top 10 returned).

rows: in-process ``RankService.rank`` (one caller) | Serve, 1 client | Serve, N clients (the load test) |
the same with a quarter of the requests malformed (422 expected, never 5xx) | 8N clients past the queue
(load shedding: 503 expected, never another 5xx) | a replica killed under 1 client (time to the next 200) |
1 client sending 100 texts the index has not seen (each encoded per request).

Last line: ``RESULT rps=.. p50_ms=.. p99_ms=.. errors_5xx=.. overhead_ratio=.. recovery_s=..`` where rps and
latencies are the load-test row's, errors_5xx counts 5xx answers in every row but the overload row's 503s,
and overhead_ratio is Serve's p50 at one client over the in-process p50.

    python benchmarks/serve_load.py [--quick] [--clients N] [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

DATA = Path(os.environ.get("AUGREL_DATA_DIR", ROOT.parent / "shared" / "data"))
WORK = Path(os.environ.get("AUGREL_BENCH_DIR", "/tmp/augrel-bench")) / "serve"


# ------------------------------------------------------------------------------------------- inputs


def build_inputs(n_queries: int | None) -> tuple[Path, list[dict]]:
    """Index + ranker over DL19 (the first ``n_queries`` queries' passages), and one request body per query."""
    import pyarrow.compute as pc

    from models.encoder import MeanPoolEncoder
    from models.features import PairFeaturizer
    from models.ranker import LambdaMARTRanker, RankerParams
    from pipelines.data import PrepareConfig, prepare
    from pipelines.index import IndexConfig, build
    from pipelines.io import read_table, write_table
    from retrieval.bm25 import BM25Index
    from retrieval.dense import DocVectors

    prepared = WORK / "dl19"
    if not (prepared / "pairs").exists():
        prepare(PrepareConfig(format="trec-dl", src=str(DATA / "trec-dl-2019"), out=str(prepared)))
    pairs = read_table(prepared / "pairs")
    qids = sorted(set(pairs.column("qid").to_pylist()))[:n_queries]
    pairs = pairs.filter(pc.is_in(pairs.column("qid"), value_set=__import__("pyarrow").array(qids)))
    root = WORK / f"dl19-{len(qids)}q"
    if not (root / "index" / "manifest.json").exists():
        docs = (
            pairs.select(["docid", "text"])
            .group_by("docid", use_threads=False)
            .aggregate([("text", "first")])
        )
        write_table(root / "docs", docs.rename_columns(["docid", "text"]))
        build(
            IndexConfig(docs=str(root / "docs"), out=str(root / "index"), concurrency=1, num_cpus_per_actor=2)
        )
    if not (root / "ranker" / "ranker.json").exists():
        featurize = PairFeaturizer(BM25Index.load(root / "index" / "bm25"), MeanPoolEncoder())
        vecs = DocVectors.load(root / "index" / "dense")
        docids = pairs.column("docid").to_pylist()
        feats = featurize(pairs.column("query").to_pylist(), pairs.column("text").to_pylist(), docids=docids,
                          doc_vectors=vecs.get(docids))  # fmt: skip
        ranker = LambdaMARTRanker(list(feats), RankerParams(n_estimators=100))
        X = np.column_stack(list(feats.values()))
        ranker.fit(X, pairs.column("label").to_numpy(), pairs.column("qid").to_pylist())
        ranker.save(root / "ranker", label_source="human")
    bodies = []
    rng = np.random.default_rng(0)
    for q in qids:
        rows = pairs.filter(pc.equal(pairs.column("qid"), q)).to_pylist()
        pick = rng.permutation(len(rows))[:100]
        bodies.append({"query": rows[0]["query"], "k": 10,
                       "candidates": [{"docid": rows[i]["docid"], "text": rows[i]["text"]} for i in pick]})  # fmt: skip
    return root, bodies


# ----------------------------------------------------------------------------------------- load


def closed_loop(url: str, bodies: list[dict], clients: int, seconds: float, bad_every: int = 0) -> dict:
    """``clients`` threads, each sending its next request when the last one answered, for ``seconds``."""
    import requests

    lat: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()
    stop = time.perf_counter() + seconds
    bad = {"query": "", "k": 0}

    def client(i: int) -> None:
        s = requests.Session()
        n = i
        while time.perf_counter() < stop:
            body = bad if bad_every and n % bad_every == 0 else bodies[n % len(bodies)]
            t0 = time.perf_counter()
            try:
                code = s.post(url + "/rank", json=body, timeout=120).status_code
            except requests.RequestException:
                code = -1  # connection refused / reset: counted as an error
            dt = time.perf_counter() - t0
            with lock:
                codes[code] = codes.get(code, 0) + 1
                if code == 200:
                    lat.append(dt)
            n += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(lat, codes, time.perf_counter() - t0)


def summary(lat: list[float], codes: dict[int, int], wall: float) -> dict:
    ms = np.array(lat) * 1000 if lat else np.array([np.nan])
    return {"ok": len(lat), "rps": len(lat) / wall, "p50": float(np.percentile(ms, 50)),
            "p95": float(np.percentile(ms, 95)), "p99": float(np.percentile(ms, 99)),
            "4xx": sum(v for c, v in codes.items() if 400 <= c < 500),
            "503": codes.get(503, 0), "5xx": sum(v for c, v in codes.items() if c >= 500 and c != 503),
            "conn_err": codes.get(-1, 0)}  # fmt: skip


def in_process(service, bodies: list[dict], seconds: float) -> dict:
    lat = []
    stop, n, t0 = time.perf_counter() + seconds, 0, time.perf_counter()
    while time.perf_counter() < stop:
        b = bodies[n % len(bodies)]
        s = time.perf_counter()
        service.rank(b["query"], b["k"], b["candidates"])
        lat.append(time.perf_counter() - s)
        n += 1
    return summary(lat, {200: len(lat)}, time.perf_counter() - t0)


def running_replicas(app: str, deployment: str = "Ranker") -> int:
    from ray import serve

    states = serve.status().applications[app].deployments[deployment].replica_states
    return int(sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING"))


def recovery(url: str, bodies: list[dict], app: str) -> dict:
    """Kill one Ranker replica under one closed-loop client: how long until Serve runs a replacement (the
    replica count is back), and what the client saw meanwhile (the other replica keeps answering)."""
    import ray

    target = running_replicas(app)
    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and "REPLICA" in a["name"] and "Ranker" in a["name"])  # fmt: skip
    result: dict = {}
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            r = closed_loop(url, bodies, 1, 1.0)
            for k, v in r.items():
                result.setdefault(k, []).append(v)

    client = threading.Thread(target=load)
    client.start()
    time.sleep(0.5)
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 5 and running_replicas(app) == target:
        time.sleep(0.05)  # until the controller notices the death
    while time.perf_counter() - t0 < 180 and running_replicas(app) < target:
        time.sleep(0.1)
    took = time.perf_counter() - t0
    done.set()
    client.join()
    n = sum(result["ok"])
    out = {k: sum(v) for k, v in result.items() if k in ("4xx", "503", "5xx", "conn_err")}
    return {**out, "ok": n, "rps": n / max(took, 1e-9), "p50": float(np.median(result["p50"])),
            "p95": float(np.max(result["p95"])), "p99": float(np.max(result["p99"])), "recovery_s": took}  # fmt: skip


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="10 queries' passages, 5 s per row (under 2 minutes)"
    )
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients in the load test")
    ap.add_argument("--seconds", type=float, help="duration of each row (default 5 quick, 20 full)")
    a = ap.parse_args()
    seconds = a.seconds or (5.0 if a.quick else 20.0)

    from ray import serve

    from cluster.embedded import init_ray
    from pipelines import serve as S

    init_ray("local", num_cpus=2)
    root, bodies = build_inputs(10 if a.quick else None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = S.ServeConfig(
        ranker=str(root / "ranker"), index=str(root / "index"), port=port, name="bench", auth_token_env=None,
        deployment={"num_cpus": 0.5, "threads": 1, "max_ongoing_requests": 4, "max_queued_requests": 2 * a.clients,
                    "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
    )  # fmt: skip
    service = S.RankService(cfg)
    service.rank(
        bodies[0]["query"], 10, bodies[0]["candidates"]
    )  # warm: first-call costs are not the service's
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(S.build_app(cfg), name=cfg.name, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    closed_loop(url, bodies, 2, 2.0)  # warm the replicas

    rng = np.random.default_rng(1)
    fresh = [{**b, "candidates": [{"docid": f"new-{i}", "text": " ".join(rng.permutation(c["text"].split()))}
                                  for i, c in enumerate(b["candidates"])]} for b in bodies]  # fmt: skip
    rows = [
        ("in-process RankService, 1 caller", in_process(service, bodies, seconds)),
        ("Serve, 1 client", closed_loop(url, bodies, 1, seconds)),
        (f"Serve, {a.clients} clients (load test)", closed_loop(url, bodies, a.clients, seconds)),
        (f"Serve, {a.clients} clients, 1 in 4 malformed", closed_loop(url, bodies, a.clients, seconds, bad_every=4)),
        (f"Serve, {8 * a.clients} clients (past the queue)", closed_loop(url, bodies, 8 * a.clients, seconds)),
        ("Serve, a replica killed, 1 client", recovery(url, bodies, cfg.name)),
        ("Serve, 1 client, 100 unseen texts", closed_loop(url, fresh, 1, seconds)),
    ]  # fmt: skip
    serve.shutdown()

    head = (f"{'row':<44} {'ok':>6} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'4xx':>5} "
            f"{'503':>5} {'5xx':>4} {'conn':>5}")  # fmt: skip
    print(
        f"POST /rank, 100 candidates -> top 10; {len(bodies)} DL19 queries, index of {service.n_docs:,} "
        f"passages; 2 replicas x 0.5 CPU, 1 thread; {seconds:g} s per row, 2 cores shared with the clients"
    )
    print(head)
    print("-" * len(head))
    for name, r in rows:
        print(f"{name:<44} {r['ok']:>6} {r['rps']:>7.1f} {r['p50']:>8.1f} {r['p95']:>8.1f} {r['p99']:>8.1f} "
              f"{r['4xx']:>5} {r['503']:>5} {r['5xx']:>4} {r['conn_err']:>5}")  # fmt: skip
    by = dict(rows)
    load = by[f"Serve, {a.clients} clients (load test)"]
    rec = by["Serve, a replica killed, 1 client"]
    errors_5xx = sum(r["5xx"] for _, r in rows) + sum(
        r["503"] for n, r in rows if "past the queue" not in n and "killed" not in n
    )
    overhead = by["Serve, 1 client"]["p50"] / by["in-process RankService, 1 caller"]["p50"]
    print()
    print(
        f"recovery after a replica kill: {rec['recovery_s']:.1f} s until Serve ran 2 replicas again; the client "
        f"meanwhile: {rec['ok']} answered, 503 x{rec['503']}, other 5xx x{rec['5xx']}, "
        f"connection errors x{rec['conn_err']}"
    )
    print(f"RESULT rps={load['rps']:.1f} p50_ms={load['p50']:.1f} p99_ms={load['p99']:.1f} errors_5xx={errors_5xx} "
          f"overhead_ratio={overhead:.2f} recovery_s={rec['recovery_s']:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
