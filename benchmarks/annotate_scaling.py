"""Distributed annotation: the Ray Data pipeline against the same scorer in one plain process, memory as the
input grows, and 1 vs 2 judge actors. One table; every row measured in this run, each in its own process.

(a) throughput at equal cores: ``augrel annotate`` (2 actors x 1 thread, the cpu-small profile) against a plain
    loop (one process, 2 threads, the same LabelTokenScorer reading the same Parquet in chunks), on the Gemma 3
    270M default over real TREC DL 2019 pairs, and on a tiny random model over 1,000,000 synthetic pairs;
    wall time includes loading the model in both.
(b) peak memory of the driver (RSS) and of the driver plus every Ray process it started: RSS, private memory
    outside the object store ("private"), and the object-store pages the processes hold privately ("store":
    bounded by the store's configured size, not by the input), sampled every 0.5 s, at 100k and 1M synthetic
    pairs (tiny model): streaming should keep private memory flat.
(c) 1 vs 2 actors on the Gemma pairs.
Every pipeline run is checked against its input: pairs lost (neither judged nor rejected) and duplicated. The
100k run also kills one judge actor (SIGKILL) a third of the way through.

Last line: ``RESULT efficiency=.. mem_ratio_1m_vs_100k=.. lost=.. duplicated=..`` where efficiency is the
pipeline's steady-state pairs/s over the plain loop's on the Gemma pairs at equal cores, and the memory ratio is
that of the private memory of all processes outside the object store.

    python benchmarks/annotate_scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("AUGREL_DATA_DIR", ROOT.parent / "shared" / "data"))
WORK = Path(os.environ.get("AUGREL_BENCH_DIR", "/tmp/augrel-bench/annotate"))


# ------------------------------------------------------------------------------------------- inputs


def dl19_pairs(n: int) -> Path:
    from pipelines.data import PrepareConfig, prepare
    from pipelines.io import read_table

    prepared = WORK / "dl19"
    if not (prepared / "pairs").exists():
        prepare(PrepareConfig(format="trec-dl", src=str(DATA / "trec-dl-2019"), out=str(prepared)))
    out = WORK / f"dl19-{n}"
    if not out.exists():
        t = read_table(prepared / "pairs")
        idx = np.random.default_rng(0).permutation(t.num_rows)[:n]
        out.mkdir(parents=True)
        pq.write_table(t.take(pa.array(np.sort(idx))), out / "part-00000.parquet")
    return out


def synthetic_pairs(n: int, shards: int = 8) -> Path:
    from tests.helpers import TINY_VOCAB

    out = WORK / f"synthetic-{n}"
    if out.exists():
        return out
    out.mkdir(parents=True)
    words = np.array([w for w in TINY_VOCAB[13:]])
    rng = np.random.default_rng(0)
    per = -(-n // shards)
    for s in range(shards):
        m = min(per, n - s * per)
        lengths = rng.integers(8, 40, size=m)
        texts = [" ".join(words[rng.integers(0, len(words), size=k)]) for k in lengths]
        ids = np.arange(s * per, s * per + m)
        pq.write_table(pa.table({"qid": [f"q{i // 50}" for i in ids], "docid": [f"d{i}" for i in ids],
                                 "query": ["when was the town founded"] * m, "text": texts}),
                       out / f"part-{s:05d}.parquet")  # fmt: skip
    return out


def tiny_model() -> Path:
    from tests.helpers import build_tiny_causal_lm

    out = WORK / "tiny-lm"
    if not (out / "config.json").exists():
        build_tiny_causal_lm(out)
    return out


# ------------------------------------------------------------------------------- one measurement


class MemorySampler:
    """Peak memory of this process (RSS) and of this process plus all its descendants (Ray's GCS, raylet,
    workers): RSS, and private memory outside the object store. The object store is bounded by its configured
    size whatever the input, but its pages count as a process's private memory (USS) while only that process
    maps them: a worker that wrote a block into the store carries its pages until someone else reads them. So the
    store's pages are counted apart (``store_peak``); growth in the rest is what streaming must avoid.
    """

    def __init__(self, every: float = 0.5):
        import psutil

        self.proc, self.every = psutil.Process(), every
        self.driver_peak = self.total_peak = self.private_peak = self.store_peak = 0
        self.by_kind: dict[str, float] = {}  # peak private memory per kind of process (summed over processes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                driver, private, store = _process_memory(self.proc.pid)
                total, kinds = driver, {"driver": private}
                for c in self.proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error, OSError):  # a task worker that just exited
                        rss, own, in_store = _process_memory(c.pid)
                        kind = _process_kind(c)
                        total, private, store = total + rss, private + own, store + in_store
                        kinds[kind] = kinds.get(kind, 0) + own
                for k, v in kinds.items():
                    self.by_kind[k] = max(self.by_kind.get(k, 0), v)
                self.driver_peak, self.total_peak = max(self.driver_peak, driver), max(self.total_peak, total)
                self.private_peak, self.store_peak = (
                    max(self.private_peak, private),
                    max(self.store_peak, store),
                )
            except (psutil.Error, OSError):
                pass
            self._stop.wait(self.every)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _process_memory(pid: int) -> tuple[int, int, int]:
    """(RSS, private bytes outside the object store, private bytes of object-store pages) of one process, all
    from one read of its smaps (so the three agree); psutil's USS is the sum of the last two. Ray's store is a
    file mapping named plasma* (in /dev/shm by default)."""
    rss = own = store = 0
    in_store = False
    with open(f"/proc/{pid}/smaps", "rb") as f:
        for line in f:
            if line[:1] in b"0123456789abcdef" and b"-" in line.split(b" ", 1)[0]:  # a mapping's header line
                in_store = b"/plasma" in line
            elif line.startswith(b"Rss:"):
                rss += int(line.split()[1]) * 1024
            elif line.startswith((b"Private_Clean:", b"Private_Dirty:")):
                kb = int(line.split()[1]) * 1024
                if in_store:
                    store += kb
                else:
                    own += kb
    return rss, own, store


#: Ray's own per-node and per-dataset helpers, which run as workers too: none of them touches a pair
RAY_HELPERS = (
    "DashboardAgent",
    "RuntimeEnvAgent",
    "ActorLocationTracker",
    "_StatsActor",
    "_AutoscalingCoordinator",
)


def _process_kind(p) -> str:
    """What a Ray process is, from its command line (Ray titles a worker after what it runs): gcs_server,
    raylet, a judge actor, a read/write task worker, an idle worker kept for reuse, one of Ray's helpers, ..."""
    cmd = " ".join(p.cmdline())
    for key in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py"):
        if key in cmd:
            return key
    if "MapWorker" in cmd:
        return "judge actors"
    if any(h in cmd for h in RAY_HELPERS):
        return "ray helpers"
    if cmd.startswith("ray::IDLE"):
        return "idle workers"
    if "default_worker" in cmd or cmd.startswith("ray::"):
        return "task workers"
    return p.name()


def _killer(out: Path, n_units: int, fraction: float, done: threading.Event, killed: list) -> None:
    import psutil

    while not done.is_set():
        if len(list(out.glob("part-*.parquet"))) >= fraction * n_units:
            # Ray names a worker process after the actor it hosts: this run's judge actors are MapWorker(...)
            for p in psutil.Process().children(recursive=True):
                if "MapWorker" in " ".join(p.cmdline()):
                    p.send_signal(signal.SIGKILL)
                    killed.append(p.pid)
                    return
        time.sleep(0.1)


def measure(spec: dict) -> dict:
    """Run one row of the table (in a fresh process) and return its figures."""
    import torch

    from pipelines.io import read_table

    pairs, model = spec["pairs"], spec["model"]
    if spec["mode"] == "plain":
        from models.judge_card import load_judge

        torch.set_num_threads(spec["threads"])
        t0 = time.perf_counter()
        with MemorySampler() as mem:
            judge = load_judge(model)
            scorer = judge.scorer(spec["batch_size"])
            t_loaded = time.perf_counter()
            n = 0
            for f in sorted(Path(pairs).glob("*.parquet")):
                for batch in pq.ParquetFile(f).iter_batches(batch_size=2048, columns=["query", "text"]):
                    s = scorer.score(batch.column("query").to_pylist(), batch.column("text").to_pylist())
                    n += len(s)
        end = time.perf_counter()
        return {"pairs": n, "wall_s": end - t0, "pairs_per_s": n / (end - t0), "steady": n / (end - t_loaded),
                "driver_mb": mem.driver_peak / 2**20, "total_mb": mem.total_peak / 2**20,
                "private_mb": mem.private_peak / 2**20, "store_mb": mem.store_peak / 2**20}  # fmt: skip

    from cluster.embedded import init_ray
    from pipelines.annotate import AnnotateConfig, plan_units, run

    init_ray("local", num_cpus=2)
    out = WORK / "out" / spec["name"]
    cfg = AnnotateConfig(judge=model, pairs=pairs, out=str(out), overwrite=True, concurrency=(spec["actors"],) * 2,
                         num_cpus_per_actor=0.9, torch_threads=spec["threads"], batch_size=spec["batch_size"],
                         unit_rows=spec["unit_rows"])  # fmt: skip
    killed: list = []
    done = threading.Event()
    if spec.get("kill_at"):
        n_units = len(plan_units(pairs, spec["unit_rows"])[0])
        threading.Thread(
            target=_killer, args=(out, n_units, spec["kill_at"], done, killed), daemon=True
        ).start()
    t0 = time.perf_counter()
    with MemorySampler() as mem:
        result = run(cfg)
    done.set()
    wall = time.perf_counter() - t0
    inp = read_table(pairs).select(["qid", "docid"])
    got = read_table(out).select(["qid", "docid"])
    rejected = result.counts["rejected"]
    in_keys = set(zip(inp.column("qid").to_pylist(), inp.column("docid").to_pylist(), strict=True))
    out_keys = list(zip(got.column("qid").to_pylist(), got.column("docid").to_pylist(), strict=True))
    return {"pairs": got.num_rows, "wall_s": wall, "pairs_per_s": got.num_rows / wall,
            "steady": result.extra["steady_pairs_per_s"] or float("nan"),
            "driver_mb": mem.driver_peak / 2**20, "total_mb": mem.total_peak / 2**20,
            "private_mb": mem.private_peak / 2**20, "store_mb": mem.store_peak / 2**20,
            "private_mb_by_process": {k: round(v / 2**20) for k, v in mem.by_kind.items()},
            "lost": len(in_keys - set(out_keys)) - rejected, "duplicated": len(out_keys) - len(set(out_keys)),
            "killed_actors": len(killed)}  # fmt: skip


def run_in_subprocess(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "--measure", json.dumps(spec)], env=env, capture_output=True,
                          text=True)  # fmt: skip
    lines = [x for x in proc.stdout.splitlines() if x.startswith("MEASURE ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{spec['name']} failed:\n{proc.stderr[-4000:]}")
    return {**spec, **json.loads(lines[-1][len("MEASURE ") :])}


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (under 2 minutes)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        print("MEASURE " + json.dumps(measure(json.loads(a.measure))), flush=True)
        return

    WORK.mkdir(parents=True, exist_ok=True)
    n_real = 48 if a.quick else 3000
    n_small, n_large = (4_000, 32_000) if a.quick else (100_000, 1_000_000)
    real, tiny = str(dl19_pairs(n_real)), str(tiny_model())
    small, large = str(synthetic_pairs(n_small)), str(synthetic_pairs(n_large))
    # units of 256 pairs: a dozen on the full set, so the steady rate is measured over most of the run; much
    # smaller units would cost the actors length-bucketing (the plain loop buckets over 2,048-pair chunks)
    gemma = {"model": "gemma3-270m", "pairs": real, "batch_size": 16, "unit_rows": 16 if a.quick else 256}
    # quick: fewer, smaller units so the tiny runs still have units left when the fault run kills an actor
    tinyb = {"model": tiny, "batch_size": 64, "unit_rows": 1024 if a.quick else 4096}
    # --quick keeps the rows of the RESULT line (plain vs 2 actors, small vs large, the fault run) and leaves out
    # the two context rows (1 actor, the tiny model's plain loop): each row is a fresh process and Ray
    context = [] if a.quick else [
        {"name": "gemma pipeline, 1 actor x 1 thread", "mode": "pipeline", "actors": 1, "threads": 1, **gemma},
        {"name": f"tiny plain, {n_large:,} pairs", "mode": "plain", "threads": 2, "pairs": large, **tinyb},
    ]  # fmt: skip
    specs = [
        {"name": "gemma plain, 2 threads", "mode": "plain", "threads": 2, **gemma},
        {"name": "gemma pipeline, 2 actors x 1 thread", "mode": "pipeline", "actors": 2, "threads": 1, **gemma},
        *context,
        {"name": f"tiny pipeline, {n_small:,} pairs", "mode": "pipeline", "actors": 2, "threads": 1,
         "pairs": small, **tinyb},
        {"name": f"tiny pipeline, {n_small:,} pairs, 1 actor killed", "mode": "pipeline", "actors": 2,
         "threads": 1, "pairs": small, "kill_at": 0.33, **tinyb},
        {"name": f"tiny pipeline, {n_large:,} pairs", "mode": "pipeline", "actors": 2, "threads": 1,
         "pairs": large, **tinyb},
    ]  # fmt: skip
    rows = []
    for spec in specs:
        r = run_in_subprocess(spec)
        rows.append(r)
        print(f"  done: {r['name']} ({r['wall_s']:.0f}s)", file=sys.stderr, flush=True)

    by = {r["name"]: r for r in rows}
    head = (f"{'run':<44} {'pairs':>9} {'wall s':>8} {'pairs/s':>9} {'steady/s':>9} {'driver MB':>10} {'all RSS':>8} {'private':>8} {'store':>6} "
            f"{'lost':>5} {'dup':>4}")  # fmt: skip
    from models.loading import cpu_description

    print(f"annotate scaling: {cpu_description()}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:<44} {r['pairs']:>9,} {r['wall_s']:>8.1f} {r['pairs_per_s']:>9.1f} {r['steady']:>9.1f} "
              f"{r['driver_mb']:>10.0f} {r['total_mb']:>8.0f} {r['private_mb']:>8.0f} {r.get('store_mb', 0):>6.0f} "
              f"{r.get('lost', '-'):>5} {r.get('duplicated', '-'):>4}")  # fmt: skip
    plain, pipe2 = by["gemma plain, 2 threads"], by["gemma pipeline, 2 actors x 1 thread"]
    pipe1, tiny_plain = by.get("gemma pipeline, 1 actor x 1 thread"), by.get(f"tiny plain, {n_large:,} pairs")
    small_r = by[f"tiny pipeline, {n_small:,} pairs"]
    fault_r = by[f"tiny pipeline, {n_small:,} pairs, 1 actor killed"]
    large_r = by[f"tiny pipeline, {n_large:,} pairs"]
    # Steady state: after the model is loaded (plain) / after the first units are written (pipeline); start-up is
    # a fixed cost per run that a few-thousand-pair benchmark would otherwise weigh far above a real run's share.
    efficiency = pipe2["steady"] / plain["steady"]
    mem_ratio = large_r["private_mb"] / small_r["private_mb"]
    lost = sum(r.get("lost", 0) for r in rows)
    dup = sum(r.get("duplicated", 0) for r in rows)
    print()
    one_actor = f"; 2 actors / 1 actor = {pipe2['steady'] / pipe1['steady']:.2f}" if pipe1 else ""
    print(f"gemma: pipeline / plain at 2 cores, steady state = {efficiency:.2f} (with start-up: "
          f"{pipe2['pairs_per_s'] / plain['pairs_per_s']:.2f}){one_actor}")  # fmt: skip
    with_store = (large_r["private_mb"] + large_r["store_mb"]) / (small_r["private_mb"] + small_r["store_mb"])
    tiny = (
        f"pipeline / plain at 2 cores, steady state = {large_r['steady'] / tiny_plain['steady']:.2f}; "
        if tiny_plain
        else ""
    )
    print(f"tiny: {tiny}actors killed in the fault run: {fault_r['killed_actors']}")
    print(f"peak memory {n_large:,} vs {n_small:,} pairs: driver {large_r['driver_mb'] / small_r['driver_mb']:.2f}x; "
          f"all processes {large_r['total_mb'] / small_r['total_mb']:.2f}x RSS, {mem_ratio:.2f}x private outside the "
          f"object store, {with_store:.2f}x with the store pages they hold ({small_r['store_mb']:.0f} -> "
          f"{large_r['store_mb']:.0f} MB; the store is capped by its configured size)")  # fmt: skip
    kinds = sorted(set(small_r["private_mb_by_process"]) | set(large_r["private_mb_by_process"]))
    print("peak private memory by kind of process (MB, each kind's own peak): "
          + ", ".join(f"{k} {small_r['private_mb_by_process'].get(k, 0):,} -> "
                      f"{large_r['private_mb_by_process'].get(k, 0):,}" for k in kinds))  # fmt: skip
    print(
        f"RESULT efficiency={efficiency:.2f} mem_ratio_1m_vs_100k={mem_ratio:.2f} lost={lost} duplicated={dup}"
    )


if __name__ == "__main__":
    main()
