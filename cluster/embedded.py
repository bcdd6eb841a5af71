"""Start or join Ray: embedded on this machine by default, or a cluster named by address.

One function decides, so every command runs the same on a laptop (embedded Ray, sized to the machine) and on a
cluster (``--address`` / ``RAY_ADDRESS``, or ``augrel submit`` which sets it for the job's driver).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import psutil

from models.loading import augrel_home

log = logging.getLogger("augrel")

#: Ray reads this at import: when "0" it keeps a single-host cluster on 127.0.0.1 instead of the machine's
#: network address, so local clusters never listen on or talk to anything but loopback.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

#: Set for the workers of an embedded Ray: the run's log file, where they append the library lines they keep off
#: the console (one host, so the driver's path is theirs). A joined cluster's workers write beside Ray's own logs.
WORKER_LOG_ENV = "AUGREL_WORKER_LOG"
#: Set for the workers of an embedded Ray without dashboard (no State API): see _quiet_worker.
NO_STATE_API_ENV = "AUGREL_NO_STATE_API"
#: Set for the workers of a quiet driver (every augrel command unless --verbose).
QUIET_WORKERS_ENV = "AUGREL_QUIET_WORKERS"

#: Library loggers whose INFO lines narrate what the library is doing (a dataset starts, a checkpoint is saved, a
#: worker group is placed): the run's log file keeps them, the console shows augrel's progress instead. Their
#: warnings and errors still print.
LIBRARY_NARRATION_LOGGERS = (
    "ray.data._internal.execution.streaming_executor",
    "ray.data._internal.progress",
    "ray.data._internal.progress.logging_progress",
    "ray.data.dataset",
    "ray.data._internal.logging",
    "ray.train.v2._internal.execution.context",
    "ray.train.v2._internal.execution.storage",
    "ray.train.v2._internal.execution.worker_group.worker_group",
    "ray.train.v2._internal.execution.scaling_policy.scaling_policy",
    "ray.train.v2.torch.train_loop_utils",
    "ray.train.torch.train_loop_utils",
    "ray.train.torch.config",
)
#: Warnings a user cannot act on: augrel turns Ray Data's bars off on purpose (it counts documents and pairs itself).
NAG_PREFIXES = ("Progress bars disabled", "Progress bars for operators disabled")
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
    embedded = address in (None, "local")
    if embedded or is_loopback(address):
        os.environ.setdefault(LOOPBACK_ENV, "0")
    import ray

    log_path = (
        Path(log_file)
        if log_file
        else augrel_home() / "logs" / f"augrel-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    )
    file_handler = _log_to_file(log_path)
    if ray.is_initialized():
        return _describe(ray, log_path)
    if quiet:
        _divert_narration(file_handler, local=embedded or is_loopback(address))
    kwargs: dict[str, Any] = {
        # worker_output: show what tasks and actors print (the fine-tune's progress lines) without Ray's INFO logs
        "log_to_driver": (not quiet) if worker_output is None else worker_output,
        "logging_level": logging.WARNING if quiet else logging.INFO,
    }
    if embedded:
        kwargs.update(
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            object_store_memory=object_store_memory or default_object_store_bytes(),
            include_dashboard=dashboard,
            configure_logging=True,
        )
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
    runtime_env = worker_runtime_env(
        embedded=embedded,
        quiet=quiet,
        dashboard=dashboard,
        cpu_only=embedded and _no_gpu(num_gpus),
        log_path=log_path,
    )
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    try:
        ray.init(**kwargs)
    except ValueError as e:
        # A job submitted with its own setup hook or the same variables: Ray refuses to merge ours into it.
        if "runtime_env" not in kwargs or "Failed to merge" not in str(e):
            raise
        log.warning("the job's runtime_env already sets what augrel would add to quiet its workers: %s", e)
        del kwargs["runtime_env"]
        ray.init(**kwargs)
    file_handler.setFormatter(
        logging.Formatter(LOG_FORMAT)
    )  # ray.init gives every handler of "ray" its format
    return _describe(ray, log_path)


def worker_runtime_env(
    *, embedded: bool, quiet: bool, dashboard: bool, cpu_only: bool, log_path: Path, environ=os.environ
) -> dict[str, Any]:
    """What every worker of this driver starts with so that the console shows progress, not library chatter.

    A variable already in ``environ`` is the user's (or the submitted job's) choice: it is left out, so Ray neither
    overrides it nor refuses to merge it into the job's runtime_env. A joined cluster gets no DS_ACCELERATOR (its
    GPUs must be detected) and no log path (the driver's file is not on its nodes).
    """
    hook_env: dict[str, str] = {}
    if embedded and not dashboard:
        hook_env[NO_STATE_API_ENV] = "1"
    if not quiet:
        return {"worker_process_setup_hook": _quiet_worker, "env_vars": hook_env} if hook_env else {}
    env = {
        # transformers' "Loading weights" bars, one per actor (its tqdm follows huggingface_hub's switch)
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        # Ray Train's print patch logs each print() of a train worker and, Ray having wrapped stdout, prints it
        # too: every step line showed twice. Unpatched, a print is a print.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        QUIET_WORKERS_ENV: "1",
        WORKER_LOG_ENV: str(log_path) if embedded else "",
        **hook_env,
    }
    if cpu_only:
        # DeepSpeed warns in every Train worker that it fell back to CPU; no GPU is used here, so say so
        env["DS_ACCELERATOR"] = "cpu"
    env = {k: v for k, v in env.items() if v and k not in environ}
    return {"worker_process_setup_hook": _quiet_worker, "env_vars": env}


def _no_gpu(num_gpus: int | None) -> bool:
    """Whether an embedded Ray will have no GPU: asked for none, or Ray's own detection finds none."""
    if num_gpus is not None:
        return num_gpus == 0
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        return get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators() == 0
    except Exception:  # an unknown detector: let DeepSpeed look for itself
        return False


class _Divert(logging.Filter):
    """On a library's own logger: hand its narration to ``handler`` (the log file) only, so no console prints it.

    A filter on the logger that creates the record, not on a console handler: Ray Data and Ray Train rebuild the
    handlers of "ray.data" / "ray.train" in every worker, and "ray.data" may be imported after Ray starts.
    """

    def __init__(self, handler: logging.Handler, *, local: bool = False):
        super().__init__()
        self.handler = handler
        self.local = local

    def filter(self, record: logging.LogRecord) -> bool:
        if _is_narration(record, local=self.local):
            self.handler.handle(record)
            return False
        return True


def _is_narration(record: logging.LogRecord, *, local: bool) -> bool:
    if record.name == AUTH_LOGGER:
        # an embedded Ray listens on loopback only: the token protects it without the user doing anything
        return local and record.getMessage().startswith(
            "Token authentication is enabled for this Ray cluster"
        )
    if record.levelno == logging.WARNING:
        return record.getMessage().startswith(NAG_PREFIXES)
    return logging.INFO <= record.levelno < logging.WARNING  # DEBUG stays where the library files it


def _narration_loggers() -> tuple[str, ...]:
    import ray

    # Ray Train names this module's logger after its file ("Reporting training result ..." at every report)
    context = Path(ray.__file__).parent / "train" / "v2" / "_internal" / "execution" / "context.py"
    return (*LIBRARY_NARRATION_LOGGERS, str(context), AUTH_LOGGER)


def _divert_narration(handler: logging.Handler, *, local: bool) -> None:
    for name in _narration_loggers():
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, _Divert)]:
            logger.removeFilter(f)
        logger.addFilter(_Divert(handler, local=local))


class _WorkerLogHandler(logging.Handler):
    """Appends to the run's log file (embedded Ray) or to augrel-worker-PID.log beside Ray's logs on this node,
    opened on the first record so a worker that has nothing to say leaves no file."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._file: logging.FileHandler | None = None
        self.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [worker pid %(process)d]: %(message)s")
        )

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is None:
            path = os.environ.get(WORKER_LOG_ENV) or self._session_log()
            if not path:
                return
            self._file = logging.FileHandler(path)
            self._file.setFormatter(self.formatter)
        self._file.emit(record)

    @staticmethod
    def _session_log() -> str | None:
        try:
            import ray

            session = ray._private.worker._global_node.get_session_dir_path()
        except Exception:
            return None
        return os.path.join(session, "logs", f"augrel-worker-{os.getpid()}.log")


def _quiet_worker() -> None:
    """Ray runs this in every worker process before it runs a task or hosts an actor."""
    if os.environ.get(NO_STATE_API_ENV) == "1":
        _quiet_placement_group_cleaner()
    if os.environ.get(QUIET_WORKERS_ENV) != "1":
        return  # not quiet (augrel --verbose): the workers keep every library line
    handler = _WorkerLogHandler()
    _divert_narration(handler, local=False)
    _divert_library_deprecations(handler)


def _divert_library_deprecations(handler: logging.Handler) -> None:
    """Deprecation notes a library raises about its own calls (transformers, torch, Ray Data's DatasetManager) go to
    the log file; one raised at augrel's code still prints, since that is ours to fix."""
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (DeprecationWarning, FutureWarning)) and _in_a_library(filename):
            text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
            handler.handle(logging.makeLogRecord({"name": "py.warnings", "levelno": logging.WARNING,
                                                   "levelname": "WARNING", "msg": text}))  # fmt: skip
            return
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def _in_a_library(filename: str) -> bool:
    parts = Path(str(filename)).parts
    return "site-packages" in parts or "dist-packages" in parts


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


def _log_to_file(path: Path) -> logging.Handler:
    """augrel's and Ray's driver-side log records go to one file; the terminal keeps only what the user asked for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for h in logging.getLogger("augrel").handlers:
        if getattr(h, "_augrel", False):
            return h
    handler = logging.FileHandler(path)
    handler._augrel = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    for name in ("augrel", "ray"):
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("augrel").setLevel(logging.INFO)
    return handler


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
