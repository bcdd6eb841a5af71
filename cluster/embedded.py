"""Start or join Ray: embedded on this machine by default, or a cluster named by address.

One function decides, so every command runs the same on a laptop (embedded Ray, sized to the machine) and on a
cluster (``--address`` / ``RAY_ADDRESS``, or ``augrel submit`` which sets it for the job's driver).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import psutil

from models.loading import augrel_home

log = logging.getLogger("augrel")

#: Ray reads this at import: when "0" it keeps a single-host cluster on 127.0.0.1 instead of the machine's
#: network address, so local clusters never listen on or talk to anything but loopback.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback(address: str | None) -> bool:
    host = (address or "").split("://")[-1].rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost", "::1", "[::1]")


def default_object_store_bytes(num_nodes: int = 1) -> int:
    """30% of available memory split over the nodes on this host, at least 256 MiB and at most 16 GiB each."""
    avail = psutil.virtual_memory().available
    return int(min(max(0.3 * avail / num_nodes, 256 * 2**20), 16 * 2**30))


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int | None = None,
    dashboard: bool = False,
    log_file: str | os.PathLike | None = None,
    quiet: bool = True,
    worker_output: bool | None = None,
) -> dict[str, Any]:
    """Connect to ``address`` (or ``$RAY_ADDRESS``), else start an embedded Ray sized to this machine.

    Returns what was started or joined (address, resources, log file). A no-op when Ray is already up.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "local") or is_loopback(address):
        os.environ.setdefault(LOOPBACK_ENV, "0")
    import ray

    log_path = (
        Path(log_file)
        if log_file
        else augrel_home() / "logs" / f"augrel-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    )
    _log_to_file(log_path)
    if ray.is_initialized():
        return _describe(ray, log_path)
    kwargs: dict[str, Any] = {
        # worker_output: show what tasks and actors print (the fine-tune's progress lines) without Ray's INFO logs
        "log_to_driver": (not quiet) if worker_output is None else worker_output,
        "logging_level": logging.WARNING if quiet else logging.INFO,
    }
    if address in (None, "local"):
        kwargs.update(
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            object_store_memory=object_store_memory or default_object_store_bytes(),
            include_dashboard=dashboard,
            configure_logging=True,
        )
        if not dashboard:
            # Without the dashboard there is no State API: Ray Train's placement-group cleaner (a safety net for a
            # controller that dies, which an embedded Ray takes down with the driver anyway) would log that it
            # cannot query it once a second for the whole fine-tune. Every worker drops that one warning.
            kwargs["runtime_env"] = {"worker_process_setup_hook": _quiet_placement_group_cleaner}
        if num_gpus is not None:
            kwargs["num_gpus"] = num_gpus
        log.info(
            "starting embedded Ray: %s CPUs, %.1f GiB object store",
            kwargs["num_cpus"],
            kwargs["object_store_memory"] / 2**30,
        )
    else:
        kwargs["address"] = address
        log.info("joining Ray cluster at %s", address)
    ray.init(**kwargs)
    return _describe(ray, log_path)


def _quiet_placement_group_cleaner() -> None:
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
        logging.ERROR
    )


def _describe(ray: Any, log_path: Path) -> dict[str, Any]:
    ctx = ray.get_runtime_context()
    return {
        "address": ctx.gcs_address,
        "resources": ray.cluster_resources(),
        "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
        "log_file": str(log_path),
    }


def _log_to_file(path: Path) -> None:
    """augrel's and Ray's driver-side log records go to one file; the terminal keeps only what the user asked for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and getattr(h, "_augrel", False) for h in root.handlers):
        return
    handler = logging.FileHandler(path)
    handler._augrel = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    for name in ("augrel", "ray"):
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("augrel").setLevel(logging.INFO)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
