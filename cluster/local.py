"""``augrel cluster up|down|status``: a real multi-node Ray cluster on this machine, on 127.0.0.1.

``up`` runs ``ray start --head`` plus N worker raylets, each as its own process group, and records their
process ids in ``$AUGREL_HOME/clusters/<name>.json``. Each node gets an ``AUGREL_HOME`` of its own
(``$AUGREL_HOME/clusters/<name>-nodes/<role>``), as KubeRay pods each have their own disk: whatever a task
resolves on its node (the converted offline model, caches) lands in that node's home, so a path that only exists
on the driver's node fails here as it would on a real cluster. ``$AUGREL_MODEL_CACHE``, when set, is every
node's shared model cache (a PVC's role). ``down`` stops exactly those process groups (never
``ray stop``, which would kill every Ray process on the host, including other users' and the tests').
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from cluster.embedded import augrel_home, default_object_store_bytes
from pipelines.errors import AugrelError


class ClusterError(AugrelError):
    pass


@dataclass
class NodeProc:
    role: str  # "head" or "worker-<i>"
    pid: int
    log: str
    home: str = ""  # the node's AUGREL_HOME


@dataclass
class LocalCluster:
    name: str
    gcs_address: str
    dashboard_url: str
    temp_dir: str
    nodes: list[NodeProc] = field(default_factory=list)
    started_at: str = ""

    @staticmethod
    def state_path(name: str) -> Path:
        return augrel_home() / "clusters" / f"{name}.json"

    def save(self) -> None:
        p = self.state_path(self.name)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, name: str) -> LocalCluster | None:
        p = cls.state_path(name)
        if not p.exists():
            return None
        d = json.loads(p.read_text())
        d["nodes"] = [NodeProc(**n) for n in d["nodes"]]
        return cls(**d)

    def alive(self) -> list[NodeProc]:
        return [n for n in self.nodes if _group_alive(n.pid)]


def _group_members(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return out


def _group_alive(pgid: int) -> bool:
    return bool(_group_members(pgid))


def ray_auth_token() -> str | None:
    """Ray's token (``$RAY_AUTH_TOKEN``, the file at ``$RAY_AUTH_TOKEN_PATH``, or ~/.ray/auth_token), if any."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return path.read_text().strip() if path.exists() else None


def auth_headers() -> dict[str, str]:
    token = ray_auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _get(url: str, timeout: float) -> bytes:
    req = urllib.request.Request(url, headers=auth_headers())
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        _get(url, timeout)
        return True
    except OSError:
        return False


def _alive_nodes(dashboard_url: str) -> int:
    try:
        data = json.loads(_get(f"{dashboard_url}/nodes?view=summary", timeout=3))
        return sum(1 for n in data["data"]["summary"] if n.get("raylet", {}).get("state") == "ALIVE")
    except (OSError, KeyError, ValueError):
        return 0


def node_home(name: str, role: str) -> Path:
    """The AUGREL_HOME of node ``role`` ("head", "worker-0", ...) of local cluster ``name``."""
    return augrel_home() / "clusters" / f"{name}-nodes" / role


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def up(
    workers: int = 1,
    *,
    name: str = "local",
    cpus_per_node: int | None = None,
    head_cpus: int | None = None,
    gpus_per_node: int = 0,
    port: int | None = None,
    dashboard_port: int | None = None,
    timeout_s: float = 300.0,
) -> LocalCluster:
    """Start a head and ``workers`` worker nodes on 127.0.0.1; wait until every node is alive.

    ``head_cpus``: CPUs the head offers (default: ``cpus_per_node``); 0 keeps tasks off the head, which then
    runs only job drivers, as on a KubeRay cluster whose head has ``num-cpus: "0"``."""
    existing = LocalCluster.load(name)
    if existing and existing.alive():
        raise ClusterError(
            f"cluster '{name}' is already up (dashboard {existing.dashboard_url}); `augrel cluster down` first"
        )
    n_nodes = workers + 1
    cpus = cpus_per_node or max(1, (os.cpu_count() or 1) // n_nodes)
    port = port or _free_port()
    dashboard_port = dashboard_port or _free_port()
    # A short path: Ray's Unix sockets live under it and their paths are limited to ~107 bytes.
    temp_dir = f"/tmp/augrel-{name}-{port}"
    log_dir = augrel_home() / "clusters" / f"{name}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # Token auth on, as Ray 2.60 defaults to: nodes, drivers and `augrel submit` all read the same token.
    if ray_auth_token() is None:
        from ray._private.authentication.authentication_token_setup import generate_and_save_token

        generate_and_save_token()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    # Job drivers run `python -m pipelines.cli`: make the interpreter that runs augrel the one on PATH.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    store = str(default_object_store_bytes(n_nodes))
    base = [
        sys.executable,
        "-m",
        "cluster.raystart",
        "start",
        "--block",
        f"--num-gpus={gpus_per_node}",
        # Ray 2.60 resolves the node address to the machine's network address without it
        "--node-ip-address=127.0.0.1",
        f"--object-store-memory={store}",
        "--disable-usage-stats",
    ]
    cluster = LocalCluster(
        name=name,
        gcs_address=f"127.0.0.1:{port}",
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        temp_dir=temp_dir,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    cwd = str(Path(__file__).resolve().parent.parent)

    def spawn(role: str, args: list[str], node_env: dict[str, str]) -> None:
        log = log_dir / f"{role}.log"
        home = node_home(name, role)
        home.mkdir(parents=True, exist_ok=True)
        node_env = dict(node_env, AUGREL_HOME=str(home))
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                base + args,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=node_env,
                cwd=cwd,
                start_new_session=True,  # own process group: `down` stops exactly it
            )
        cluster.nodes.append(NodeProc(role, proc.pid, str(log), str(home)))
        cluster.save()

    def gpu_env(i: int) -> dict[str, str]:
        # Several raylets on one host would each claim every GPU: give node i its own slice.
        if not gpus_per_node:
            return env
        ids = range(i * gpus_per_node, (i + 1) * gpus_per_node)
        return dict(env, CUDA_VISIBLE_DEVICES=",".join(map(str, ids)))

    def node_ports() -> list[str]:
        # Ray's per-node agents listen on fixed default ports (52365, ...): with several nodes on one host, or
        # another Ray beside this cluster, the second one to start silently loses its HTTP agent (and on the
        # head that means "No available agent to submit job"). Give every node its own free ports.
        return [
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
        ]

    spawn(
        "head",
        [
            "--head",
            f"--num-cpus={cpus if head_cpus is None else head_cpus}",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--include-dashboard=true",
            f"--ray-client-server-port={_free_port()}",
            f"--temp-dir={temp_dir}",
            *node_ports(),
        ],
        gpu_env(0),
    )
    deadline = time.monotonic() + timeout_s
    try:
        _wait(lambda: _http_ok(f"{cluster.dashboard_url}/api/version"), deadline, cluster, "the head node")
        for i in range(workers):
            # One at a time: raylets on one host share the session directory, and each names its Unix sockets
            # by the first free index there; two starting together took the same one ("plasma_store.1") and
            # the second failed to bind it.
            for attempt in (1, 2):
                spawn(f"worker-{i}", [f"--address={cluster.gcs_address}", f"--num-cpus={cpus}", *node_ports()],
                      gpu_env(i + 1))  # fmt: skip
                try:
                    _wait(lambda n=i + 2: _alive_nodes(cluster.dashboard_url) >= n, deadline, cluster,
                          f"{i + 2} alive nodes")  # fmt: skip
                    break
                except ClusterError:
                    # A raylet aborts when its agents start slower than Ray waits for them (a busy host): a
                    # worker that died starting is started once more; anything else is an error.
                    worker_died, head_alive = (
                        not _group_alive(cluster.nodes[-1].pid),
                        _group_alive(cluster.nodes[0].pid),
                    )
                    if attempt == 2 or not (worker_died and head_alive):
                        raise
                    cluster.nodes.pop()
                    cluster.save()
    except ClusterError:
        down(name)
        raise
    return cluster


def _wait(ok, deadline: float, cluster: LocalCluster, what: str) -> None:
    while time.monotonic() < deadline:
        if ok():
            return
        dead = [n for n in cluster.nodes if not _group_alive(n.pid)]
        if dead:
            tail = Path(dead[0].log).read_text()[-2000:]
            raise ClusterError(
                f"{dead[0].role} exited while waiting for {what}; its log ({dead[0].log}) ends:\n{tail}"
            )
        time.sleep(0.5)
    raise ClusterError(f"timed out waiting for {what}; logs in {Path(cluster.nodes[0].log).parent}")


def down(name: str = "local", grace_s: float = 20.0) -> list[str]:
    """Stop the nodes ``up`` started (workers first), each by its process group; return what was stopped."""
    cluster = LocalCluster.load(name)
    if cluster is None:
        raise ClusterError(f"no cluster named '{name}' (nothing recorded in {LocalCluster.state_path(name)})")
    stopped = []
    for node in reversed(cluster.nodes):
        if not _group_alive(node.pid):
            continue
        with contextlib.suppress(ProcessLookupError):  # `ray start --block` stops its own children on SIGTERM
            os.kill(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(node.pid):
            time.sleep(0.3)
        leftover = _group_members(node.pid)  # whatever did not stop in time
        for p in leftover:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(leftover, timeout=10)  # SIGKILL is asynchronous: return once they are gone
        stopped.append(node.role)
    LocalCluster.state_path(name).unlink(missing_ok=True)
    return stopped


def status(name: str = "local") -> dict:
    cluster = LocalCluster.load(name)
    if cluster is None:
        return {"name": name, "up": False}
    return {
        "name": name,
        "up": bool(cluster.alive()),
        "gcs_address": cluster.gcs_address,
        "dashboard_url": cluster.dashboard_url,
        "nodes_alive": _alive_nodes(cluster.dashboard_url),
        "processes": {n.role: n.pid for n in cluster.nodes if _group_alive(n.pid)},
        "homes": {n.role: n.home for n in cluster.nodes},
    }
