"""FAISS index types on augrel's build path: build seconds, bytes per vector, queries/s and recall@10 against
exact search (Flat), per index kind, on three vector sets:

- mixture: N (1M; 200k with ``--quick``) 384-d unit vectors from a Gaussian mixture, clustered like real
  sentence embeddings, not uniform on the sphere (on which every ANN index looks bad and no real corpus lies):
  C centres (4,000; 1,000 with ``--quick``) drawn from an anisotropic Gaussian (per-direction scales decaying
  as 1/sqrt(rank), randomly rotated: a few dominant directions, like MiniLM's), cluster sizes Zipf-distributed
  (exponent 1), each point its centre plus anisotropic noise of the same spectrum at 0.55x the centres' norm,
  then L2-normalised; 1,000 queries drawn the same way (not in the corpus);
- dl19 / hotpotqa: the real all-MiniLM-L6-v2 vectors (the packaged model, bf16 where the CPU computes it
  natively) of the 10,818 TREC DL 2019 passages with its 200 queries, and of the 4,931 HotpotQA dev-500
  paragraphs (every context of its 500 questions; a few have fewer than 10) with the questions; encoded once
  and cached under ``$AUGREL_BENCH_CACHE`` (default ``~/.cache/augrel/bench``).

Every index is built by ``retrieval.dense.DenseIndexBuilder`` (what ``augrel index build`` runs): vectors written
in batches of 65,536 into a memory-mapped vectors.npy, ivf / ivfpq trained on a seeded sample of 100 vectors a
cell (PQ: 48 sub-quantizers of 8 dims; 96 of 4 dims trained 20x slower in this FAISS build), then added in row
order; build seconds cover all of it and the save. Bytes per vector: index.faiss on disk
/ n (what a replica holds in RAM), and for IVF-PQ with re-ranking also the stored float32 vectors it reads the
candidates from (vectors.npy, memory-mapped: on disk, in the page cache only as far as pages are touched; this
benchmark's vectors.npy fits the page cache, so re-ranking reads memory here). queries/s: all queries in one
batch, k=10, faiss.omp_set_num_threads(2) (both cores); best of 3 runs. Recall@10: |top-10 ∩ Flat's top-10| / 10.
The machine is shared with other jobs: queries/s and seconds are noisy, recalls are not.

    python benchmarks/faiss_index.py [--quick] [--n N] [--sets mixture,dl19,hotpotqa]

Last line: ``RESULT hnsw_recall10=.. hnsw_qps_x_flat=.. ivfpq_recall10=.. ivfpq_qps_x_flat=..
ivfpq_bytes_per_vec=..`` for the mixture (the HNSW and IVF-PQ rows named there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.loading import cpu_description
from retrieval.dense import DenseIndex, DenseIndexBuilder, DenseParams

DATA = Path(os.environ.get("AUGREL_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
CACHE = Path(os.environ.get("AUGREL_BENCH_CACHE", Path.home() / ".cache" / "augrel" / "bench"))
FLAT_BYTES = 384 * 4
K = 10


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def mixture(n: int, n_queries: int, centres: int, dim: int = 384, noise: float = 0.55, seed: int = 0):
    """(corpus, queries) unit vectors from the anisotropic Gaussian mixture described in the module doc."""
    rng = np.random.default_rng(seed)
    spectrum = (1.0 / np.sqrt(np.arange(1, dim + 1))).astype(np.float32)
    spectrum /= np.sqrt(np.mean(spectrum**2))
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    rotation = rotation.astype(np.float32)
    centre = (rng.normal(size=(centres, dim)).astype(np.float32) * spectrum) @ rotation
    centre /= np.sqrt(np.mean(np.sum(centre**2, axis=1)))
    weights = 1.0 / np.arange(1, centres + 1)
    weights /= weights.sum()

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), np.float32)
        for start in range(0, m, 100_000):
            size = min(100_000, m - start)
            k = rng.choice(centres, size, p=weights)
            z = (rng.normal(size=(size, dim)).astype(np.float32) * spectrum) @ rotation
            out[start : start + size] = _unit(centre[k] + noise * z / np.sqrt(dim))
        return out

    return draw(n), draw(n_queries)


def real_sets(names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MiniLM vectors of the DL19 passages / HotpotQA paragraphs and their queries, cached after the first run."""
    out = {}
    for name in names:
        path = CACHE / f"minilm-{name}.npz"
        if not path.exists():
            docs, queries = _texts(name)
            from models.encoder import BiEncoder

            enc = BiEncoder(dtype="auto")
            t0 = time.perf_counter()
            d, q = enc.encode_passages(docs), enc.encode_queries(queries)
            print(f"encoded {name}: {len(docs):,} passages + {len(queries)} queries in "
                  f"{time.perf_counter() - t0:.0f}s -> {path}")  # fmt: skip
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, docs=d, queries=q)
        z = np.load(path)
        out[name] = (z["docs"], z["queries"])
    return out


def _texts(name: str) -> tuple[list[str], list[str]]:
    if name == "dl19":
        src = DATA / "trec-dl-2019"
        docs = [json.loads(line)["doc"] for line in (src / "passages.jsonl").open()]
        queries = [line.split("\t", 1)[1].strip() for line in (src / "queries.tsv").open() if line.strip()]
        return docs, queries
    rows = [json.loads(line) for line in (DATA / "hotpotqa-dev-500" / "questions.jsonl").open()]
    docs = [f"{c['title']}. {c['paragraph_text']}" for r in rows for c in r["contexts"]]
    return docs, [r["question_text"] for r in rows]


def build(docs: np.ndarray, params: DenseParams, path: Path) -> tuple[DenseIndex, float, int]:
    """Built as ``augrel index build`` does (streamed batches into a memory-mapped vectors.npy)."""
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    builder = DenseIndexBuilder(path, [str(i) for i in range(len(docs))], params)
    for start in range(0, len(docs), 65_536):
        builder.add(np.arange(start, min(start + 65_536, len(docs))), docs[start : start + 65_536])
    index = builder.finish()
    return index, time.perf_counter() - t0, (path / "index.faiss").stat().st_size


def timed_search(index: DenseIndex, queries: np.ndarray) -> tuple[float, list[list[tuple[str, float]]]]:
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        hits = index.search(queries, K)
        best = min(best, time.perf_counter() - t0)
    return len(queries) / best, hits


def bench_set(name: str, docs: np.ndarray, queries: np.ndarray, work: Path, kinds: list[str]) -> list[dict]:
    n = len(docs)
    nlist = max(1, min(int(2 * np.sqrt(n)), n // 39))
    # (label, params to build, search-time variants of it)
    plans = [
        ("flat", DenseParams(kind="flat"), [("", {})]),
        ("hnsw M=32 efC=40", DenseParams(kind="hnsw", hnsw_m=32, ef_construction=40),
         [("efS=64", {"ef_search": 64}), ("efS=128", {"ef_search": 128}), ("efS=256", {"ef_search": 256})]),
        (f"ivf nlist={nlist}", DenseParams(kind="ivf", nlist=nlist),
         [("nprobe=8", {"nprobe": 8}), ("nprobe=16", {"nprobe": 16}), ("nprobe=32", {"nprobe": 32})]),
        (f"ivfpq nlist={nlist} m=48x8b", DenseParams(kind="ivfpq", nlist=nlist, pq_m=48, refine=0),
         [("nprobe=16 no refine", {"nprobe": 16, "refine": 0}),
          ("nprobe=16 refine x4", {"nprobe": 16, "refine": 4}),
          ("nprobe=16 refine x10", {"nprobe": 16, "refine": 10}),
          ("nprobe=32 refine x10", {"nprobe": 32, "refine": 10}),
          ("nprobe=32 refine x30", {"nprobe": 32, "refine": 30}),
          ("nprobe=32 refine x50", {"nprobe": 32, "refine": 50})]),
    ]  # fmt: skip
    rows, exact = [], None
    for label, params, variants in plans:
        if params.kind not in kinds and params.kind != "flat":  # flat: the exact answers recall is counted on
            continue
        index, build_s, size = build(docs, params, work / name / params.kind)
        for vlabel, change in variants:
            p = replace(params, **change)
            variant = DenseIndex(index.index, index.docids, p, index.vectors)
            if p.kind == "hnsw":
                variant.index.hnsw.efSearch = p.ef_search
            elif p.kind in ("ivf", "ivfpq"):
                variant.index.nprobe = p.nprobe
            qps, hits = timed_search(variant, queries)
            found = [{d for d, _ in h} for h in hits]
            if exact is None:
                exact = found
                # how clustered the set is, to compare the mixture with the real vectors
                top1 = np.mean([h[0][1] for h in hits])
                top10 = np.mean([h[-1][1] for h in hits])
            recall = float(np.mean([len(f & e) / K for f, e in zip(found, exact, strict=True)]))
            rows.append({"set": name, "kind": p.kind, "refine": p.refines, "label": f"{label} {vlabel}".strip(),
                         "build_s": build_s, "index_bpv": size / n,
                         "stored_bpv": docs.shape[1] * 4 if p.refines else 0, "qps": qps, "recall": recall})  # fmt: skip
        del index, variant
        shutil.rmtree(work / name / params.kind, ignore_errors=True)
    flat_qps = rows[0]["qps"]
    for r in rows:
        r["qps_x_flat"] = r["qps"] / flat_qps
    rows[0]["cosines"] = (top1, top10)
    return rows


def print_table(name: str, docs: np.ndarray, n_queries: int, rows: list[dict]) -> None:
    top1, top10 = rows[0]["cosines"]
    print(
        f"\n{name}: {len(docs):,} vectors x {docs.shape[1]}-d, {n_queries:,} queries, k={K}; exact cosine of "
        f"a query's 1st / 10th neighbour: {top1:.3f} / {top10:.3f} (mean)"
    )
    print(f"{'index':<44} {'build s':>8} {'index B/vec':>12} {'+stored B/vec':>14} {'vs Flat mem':>12} "
          f"{'queries/s':>10} {'x Flat':>7} {'recall@10':>10}")  # fmt: skip
    for r in rows:
        mem = r["index_bpv"] + r["stored_bpv"]
        print(f"{r['label']:<44} {r['build_s']:>8.1f} {r['index_bpv']:>12.1f} {r['stored_bpv'] or '-':>14} "
              f"{FLAT_BYTES / r['index_bpv']:>11.1f}x {r['qps']:>10.0f} {r['qps_x_flat']:>6.1f}x "
              f"{r['recall']:>10.3f}" + (f"  (with stored vectors: {FLAT_BYTES / mem:.1f}x)" if r["stored_bpv"] else ""))  # fmt: skip


def pick(rows: list[dict], kind: str, refine: bool | None, recall: float) -> dict:
    """The fastest row of a kind that reaches ``recall``; else its most accurate row."""
    mine = [r for r in rows if r["kind"] == kind and (refine is None or r["refine"] == refine)]
    good = [r for r in mine if r["recall"] >= recall]
    return max(good, key=lambda r: r["qps"]) if good else max(mine, key=lambda r: r["recall"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="200k mixture vectors, 1,000 centres (a few minutes)"
    )
    ap.add_argument("--n", type=int, help="mixture vectors (default 1,000,000; 200,000 with --quick)")
    ap.add_argument(
        "--sets", default="mixture,dl19,hotpotqa", help="comma-separated: mixture, dl19, hotpotqa"
    )
    ap.add_argument(
        "--kinds", default="flat,hnsw,ivf,ivfpq", help="comma-separated index kinds (flat always runs)"
    )
    args = ap.parse_args()
    import faiss

    faiss.omp_set_num_threads(2)
    sets = args.sets.split(",")
    n = args.n or (200_000 if args.quick else 1_000_000)
    work = CACHE / "indexes"
    print(f"FAISS {faiss.__version__} index benchmark; {cpu_description()}; FAISS threads: 2")
    results: dict[str, list[dict]] = {}
    vectors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if "mixture" in sets:
        t0 = time.perf_counter()
        vectors["mixture"] = mixture(n, 1000, centres=1000 if args.quick else 4000)
        print(f"mixture drawn in {time.perf_counter() - t0:.0f}s")
    vectors.update(real_sets([s for s in sets if s in ("dl19", "hotpotqa")]))
    for name, (docs, queries) in vectors.items():
        results[name] = bench_set(name, docs, queries, work, args.kinds.split(","))
        print_table(name, docs, len(queries), results[name])
    shutil.rmtree(work, ignore_errors=True)
    if "mixture" in results and {"hnsw", "ivfpq"} <= set(args.kinds.split(",")):
        rows = results["mixture"]
        hnsw = pick(rows, "hnsw", None, 0.95)
        pq = pick(rows, "ivfpq", True, 0.90)
        print(
            f"\npicked: hnsw = {hnsw['label']}, ivfpq = {pq['label']} (fastest reaching 0.95 / 0.90 recall)"
        )
        print(f"RESULT hnsw_recall10={hnsw['recall']:.3f} hnsw_qps_x_flat={hnsw['qps_x_flat']:.1f} "
              f"ivfpq_recall10={pq['recall']:.3f} ivfpq_qps_x_flat={pq['qps_x_flat']:.1f} "
              f"ivfpq_bytes_per_vec={pq['index_bpv']:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
