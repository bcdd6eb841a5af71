"""Serving: ``POST /rank`` on Ray Serve (127.0.0.1) under a bounded closed-loop load, against calling the same
ranking code in-process, on the 9k-passage DL19 corpus and on a 1M-passage synthetic corpus. Every row measured in
this run.

Corpora:
- DL19: the TREC DL 2019 judged passages (../shared/data; --quick: the passages of 10 queries), indexed by
  ``augrel index build`` (BM25 + FAISS + stored MiniLM vectors); a LambdaMART ranker trained on the judged pairs.
  Requests rank 100 judged passages of one DL19 query (top 10 returned).
- synthetic: 1,000,000 passages (--quick: 100,000) of 20-60 words drawn from a Zipf(1.1) vocabulary of 50,000
  made-up words. ``augrel index build`` writes its docs, document
  store and BM25 index; its document vectors are random unit vectors (MiniLM would need hours for 1M passages
  on 2 cores): dense_cos is meaningless there, its cost (a memory-mapped row read per candidate) is the real one.
  The DL19 ranker scores it.

Table 1 (DL19, 100 candidates given per request): in-process ``RankService.rank`` (one caller) | Serve, 1 client |
Serve, N clients (the load test) | the same with a quarter of the requests malformed (422 expected, never 5xx) |
8N clients past the queue (load shedding: 503 expected, never another 5xx) | a replica killed under 1 client (time
to the next 200) | 1 client sending 100 texts the index has not seen (each encoded per request) | N clients sending
requests Schemathesis generates from the service's OpenAPI document (half valid, half not: wrong types, missing
fields, values past a cap, odd strings; 4xx expected for the invalid ones, never a 5xx).

Table 2 (corpus scale, both corpora): requests without candidates (BM25 top 100 retrieved from the corpus,
featurized from the document store and the stored vectors, ranked): in-process | Serve, 1 client | Serve, N
clients; and 100 candidates named by docid only (texts and vectors read from the store). Queries are 2-4 words of
a random passage of the corpus, the same recipe on both, and never repeat (a replica's per-query cache of the
BM25 top documents would otherwise answer them). The service's open time (index, store, ranker, encoder) is
printed per corpus.

Last line: ``RESULT rps=.. p50_ms=.. p99_ms=.. errors_5xx=.. overhead_ratio=.. recovery_s=.. p50_ms_dl19=..
p99_ms_dl19=.. p50_ms_synth=.. p99_ms_synth=.. synth_docs=.. fuzzed=.. fuzzed_5xx=..`` where rps, p50_ms and p99_ms are table 1's load
test, errors_5xx counts 5xx answers in every row but the overload row's 503s, overhead_ratio is Serve's p50 at
one client over the in-process p50, and the *_dl19 / *_synth latencies are table 2's retrieve-and-rank load test
(N clients) on each corpus, fuzzed counts the fuzzed requests answered and fuzzed_5xx their 5xx answers (503 included).

    python benchmarks/serve_load.py [--quick] [--clients N] [--seconds S] [--synth-docs N]
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

    from models.encoder import BiEncoder
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
        featurize = PairFeaturizer(BM25Index.load(root / "index" / "bm25"), BiEncoder())
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


def build_synthetic(n_docs: int, seed: int = 0) -> Path:
    """An index over ``n_docs`` synthetic passages (see the module docstring), built once and kept."""
    import json
    from dataclasses import asdict

    import pyarrow as pa

    from pipelines.index import IndexConfig, build
    from pipelines.io import write_table
    from pipelines.stage import read_manifest
    from retrieval.dense import DenseParams

    root = WORK / f"synth-{n_docs}"
    if (read_manifest(root / "index") or {}).get("dense_rows") is not None:
        return root
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    made_up = ["".join(rng.choice(letters, size=rng.integers(4, 10))) for _ in range(60_000)]
    vocab = np.unique(made_up)[:50_000]
    lengths = rng.integers(20, 61, size=n_docs)
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    words = rng.choice(len(vocab), size=int(lengths.sum()), p=p / p.sum())
    ends = np.cumsum(lengths)
    texts = [" ".join(vocab[words[e - n : e]]) for n, e in zip(lengths, ends, strict=True)]
    docs = pa.table({"docid": [f"s{i}" for i in range(n_docs)], "text": texts})
    del texts, words
    write_table(root / "docs", docs)
    print(f"synthetic corpus: {n_docs:,} passages written in {time.perf_counter() - t0:.0f} s", flush=True)
    result = build(IndexConfig(docs=str(root / "docs"), out=str(root / "index"), dense=False))
    print(f"synthetic corpus: index built in {result.wall_s:.0f} s", flush=True)
    # random unit vectors in the document store's row order, where index build puts MiniLM's
    dim, dense = 384, root / "index" / "dense"
    dense.mkdir(parents=True, exist_ok=True)
    vecs = np.lib.format.open_memmap(dense / "vectors.npy", mode="w+", dtype=np.float32, shape=(n_docs, dim))
    for start in range(0, n_docs, 100_000):
        v = rng.standard_normal((min(100_000, n_docs - start), dim), dtype=np.float32)
        vecs[start : start + len(v)] = v / np.linalg.norm(v, axis=1, keepdims=True)
    vecs.flush()
    del vecs
    (dense / "dense.json").write_text(json.dumps({**asdict(DenseParams()), "dim": dim, "n": n_docs}))
    manifest = json.loads((root / "index" / "manifest.json").read_text())
    manifest.update(dense_rows="docstore", dense_vectors="random unit vectors (benchmark)")
    (root / "index" / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def passage_queries(index_dir: Path, n: int, seed: int) -> list[dict]:
    """``n`` retrieval request bodies, each 2-4 distinct words (4+ letters) of a random indexed passage: the same
    recipe on every corpus, and distinct queries, so a row measures retrieval, not the replicas' query cache."""
    import re

    from retrieval.docstore import DocStore

    store = DocStore.open(index_dir / "docstore")
    rng = np.random.default_rng(seed)
    texts = store.take(rng.integers(0, len(store), size=3 * n)).column("text").to_pylist()
    bodies, seen = [], set()
    for text in texts:
        words = sorted(set(re.findall(r"[a-z]{4,}", text.lower())))
        if len(words) < 2:
            continue
        q = " ".join(rng.choice(words, size=min(len(words), int(rng.integers(2, 5))), replace=False))
        if q not in seen:
            seen.add(q)
            bodies.append({"query": q, "k": 10})
        if len(bodies) == n:
            break
    return bodies


# ----------------------------------------------------------------------------------------- load


def fuzzed_requests(url: str, n: int, seed: int = 21) -> list[dict]:
    """``n`` requests to ``POST /rank`` that Schemathesis generates from the running service's OpenAPI document
    (half valid, half not), as keyword arguments of ``requests.request``."""
    import hypothesis
    import schemathesis

    op = schemathesis.openapi.from_url(f"{url}/openapi.json")["/rank"]["POST"]
    out: list[dict] = []
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

        @hypothesis.seed(seed)
        @hypothesis.settings(max_examples=n // 2, database=None, deadline=None, phases=[hypothesis.Phase.generate],
                             suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
        @hypothesis.given(case=op.as_strategy(generation_mode=mode))
        def collect(case) -> None:
            out.append(case.as_transport_kwargs(base_url=url))

        collect()
    return out


def closed_loop(url: str, bodies: list[dict], clients: int, seconds: float, bad_every: int = 0,
                raw: bool = False) -> dict:  # fmt: skip
    """``clients`` threads, each sending its next request when the last one answered, for ``seconds``. ``raw``:
    ``bodies`` are ``requests.request`` keyword arguments (any method, path, headers and body), not /rank bodies."""
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
                if raw:
                    code = s.request(**{**body, "timeout": 120}).status_code
                else:
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
        service.rank(b["query"], b["k"], b.get("candidates"))
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


def scale_rows(label: str, service, url: str, index_dir: Path, clients: int, seconds: float,
               seed: int) -> list[tuple[str, dict]]:  # fmt: skip
    """Retrieve-and-rank rows, each on its own distinct queries (none repeats within or across rows, so no replica
    answers from its query cache), and a row of 100 candidates by docid (a query's BM25 top 100)."""
    queries = passage_queries(index_dir, 9_000, seed)
    chunks = [queries[i::3] for i in range(3)]
    by_id = [{**b, "candidates": [{"docid": d} for d in service.retrieve(b["query"], 100)]}
             for b in passage_queries(index_dir, 600, seed + 1)]  # fmt: skip
    by_id = [b for b in by_id if b["candidates"]]
    return [
        (f"{label}: in-process, retrieve + rank", in_process(service, chunks[0], seconds)),
        (f"{label}: Serve, 1 client, retrieve + rank", closed_loop(url, chunks[1], 1, seconds)),
        (f"{label}: Serve, {clients} clients, retrieve + rank", closed_loop(url, chunks[2], clients, seconds)),
        (f"{label}: Serve, 1 client, 100 docids", closed_loop(url, by_id, 1, seconds)),
    ]  # fmt: skip


def print_table(rows: list[tuple[str, dict]], width: int = 52) -> None:
    head = (f"{'row':<{width}} {'ok':>6} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'4xx':>5} "
            f"{'503':>5} {'5xx':>4} {'conn':>5}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for name, r in rows:
        print(f"{name:<{width}} {r['ok']:>6} {r['rps']:>7.1f} {r['p50']:>8.1f} {r['p95']:>8.1f} {r['p99']:>8.1f} "
              f"{r['4xx']:>5} {r['503']:>5} {r['5xx']:>4} {r['conn_err']:>5}")  # fmt: skip


def open_service(S, cfg) -> tuple[object, float]:
    t0 = time.perf_counter()
    service = S.RankService(cfg)
    return service, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="10 DL19 queries' passages, a 100k-passage synthetic corpus, 5 s per row (minutes)")  # fmt: skip
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients in the load tests")
    ap.add_argument("--seconds", type=float, help="duration of each row (default 5 quick, 20 full)")
    ap.add_argument(
        "--synth-docs", type=int, help="synthetic corpus size (default 100,000 quick, 1,000,000 full)"
    )
    a = ap.parse_args()
    seconds = a.seconds or (5.0 if a.quick else 20.0)
    n_synth = a.synth_docs or (100_000 if a.quick else 1_000_000)

    from ray import serve

    from cluster.embedded import init_ray
    from models.loading import cpu_description
    from pipelines import serve as S

    init_ray("local", num_cpus=2)
    root, bodies = build_inputs(10 if a.quick else None)
    synth_root = build_synthetic(n_synth)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def config(index_root: Path, name: str):
        return S.ServeConfig(
            ranker=str(root / "ranker"), index=str(index_root / "index"), port=port, name=name, auth_token_env=None,
            deployment={"num_cpus": 0.5, "threads": 1, "max_ongoing_requests": 4,
                        "max_queued_requests": 2 * a.clients, "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
        )  # fmt: skip

    cfg = config(root, "bench")
    import lightgbm  # noqa: F401  (imports are not the service's open time)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    service, open_dl19 = open_service(S, cfg)
    # warm: first-call costs are not the service's
    service.rank(bodies[0]["query"], 10, bodies[0]["candidates"])
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(S.build_app(cfg), name=cfg.name, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    closed_loop(url, bodies, 2, 2.0)  # warm the replicas
    fuzzed = fuzzed_requests(url, 100 if a.quick else 400)

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
        (f"Serve, {a.clients} clients, fuzzed (Schemathesis)", closed_loop(url, fuzzed, a.clients, seconds, raw=True)),
    ]  # fmt: skip
    dl19_label = f"DL19 {service.n_docs:,}"
    scale = scale_rows(dl19_label, service, url, root / "index", a.clients, seconds, seed=2)
    n_dl19 = service.n_docs
    serve.delete(cfg.name)
    del service

    synth_cfg = config(synth_root, "bench-synth")
    synth, open_synth = open_service(S, synth_cfg)
    warm = passage_queries(synth_root / "index", 20, seed=99)
    synth.rank(warm[0]["query"], 10)
    serve.run(S.build_app(synth_cfg), name=synth_cfg.name, route_prefix="/", blocking=False)
    closed_loop(url, warm, 2, 2.0)
    synth_label = f"synthetic {synth.n_docs:,}"
    scale += scale_rows(synth_label, synth, url, synth_root / "index", a.clients, seconds, seed=3)
    serve.shutdown()

    print(f"CPU: {cpu_description()}")
    print(f"Table 1. POST /rank, 100 candidates -> top 10; {len(bodies)} DL19 queries, index of {n_dl19:,} "
          f"passages; 2 replicas x 0.5 CPU, 1 thread; {seconds:g} s per row, 2 cores shared with the clients")  # fmt: skip
    print_table(rows, 44)
    print()
    print(f"Table 2. Corpus scale: POST /rank without candidates (BM25 top 100 from the corpus -> ranker -> top 10), "
          f"and 100 candidates by docid only (a query's BM25 top 100); same replicas and ranker. Queries: 2-4 words of a "
          f"random passage of the corpus, none repeated. Service open time: DL19 {open_dl19:.1f} s, synthetic "
          f"{open_synth:.1f} s (memory-mapped store, BM25 arrays and vectors; ranker and encoder loads included). "
          f"The synthetic corpus' document vectors are random unit vectors (MiniLM over {synth.n_docs:,} passages "
          f"would take hours here).")  # fmt: skip
    print_table(scale, 52)
    by = dict(rows)
    load = by[f"Serve, {a.clients} clients (load test)"]
    rec = by["Serve, a replica killed, 1 client"]
    fuzz = by[f"Serve, {a.clients} clients, fuzzed (Schemathesis)"]
    errors_5xx = (sum(r["5xx"] for _, r in rows + scale)
                  + sum(r["503"] for n, r in rows + scale if "past the queue" not in n and "killed" not in n))  # fmt: skip
    overhead = by["Serve, 1 client"]["p50"] / by["in-process RankService, 1 caller"]["p50"]
    big = dict(scale)
    d = big[f"{dl19_label}: Serve, {a.clients} clients, retrieve + rank"]
    y = big[f"{synth_label}: Serve, {a.clients} clients, retrieve + rank"]
    print()
    print(
        f"recovery after a replica kill: {rec['recovery_s']:.1f} s until Serve ran 2 replicas again; the client "
        f"meanwhile: {rec['ok']} answered, 503 x{rec['503']}, other 5xx x{rec['5xx']}, "
        f"connection errors x{rec['conn_err']}"
    )
    print(f"RESULT rps={load['rps']:.1f} p50_ms={load['p50']:.1f} p99_ms={load['p99']:.1f} errors_5xx={errors_5xx} "
          f"overhead_ratio={overhead:.2f} recovery_s={rec['recovery_s']:.1f} p50_ms_dl19={d['p50']:.1f} "
          f"p99_ms_dl19={d['p99']:.1f} p50_ms_synth={y['p50']:.1f} p99_ms_synth={y['p99']:.1f} "
          f"synth_docs={synth.n_docs} fuzzed={fuzz['ok'] + fuzz['4xx'] + fuzz['503'] + fuzz['5xx']} "
          f"fuzzed_5xx={fuzz['5xx'] + fuzz['503']}")  # fmt: skip


if __name__ == "__main__":
    main()
