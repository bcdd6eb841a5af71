"""The console of an embedded Ray run shows augrel's progress and what workers print, not library narration."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

from cluster.embedded import (
    AUTH_LOGGER,
    QUIET_WORKERS_ENV,
    WORKER_LOG_ENV,
    _Divert,
    _divert_library_deprecations,
    _narration_loggers,
    _quiet_worker,
    worker_runtime_env,
)

REPO = Path(__file__).resolve().parents[2]

# A fresh driver: the test session's own Ray is already up (ray_session), and init_ray is a no-op then.
DRIVER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path

    from cluster.embedded import init_ray

    model, log_file, out, console = sys.argv[1:5]
    init_ray("local", num_cpus=2, object_store_memory=256 * 2**20, log_file=log_file, worker_output=True)

    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # as augrel's stages do


    class LoadModel:
        def __init__(self, path):
            from transformers import AutoModel

            AutoModel.from_pretrained(path)
            # transformers' bar went to stderr, which Ray forwards apart from stdout: mark both streams
            print("worker says: model loaded", flush=True)
            print("worker says on stderr: model loaded", file=sys.stderr, flush=True)

        def __call__(self, batch):
            return batch


    ds = ray.data.range(8, override_num_blocks=2).map_batches(
        LoadModel, fn_constructor_args=(model,), compute=ray.data.ActorPoolStrategy(size=1), batch_size=4
    )
    ds.write_parquet(out)
    # Ray forwards worker output asynchronously: wait (bounded) until the worker's own line has arrived here, so
    # everything that worker wrote before it has arrived too.
    deadline = time.monotonic() + 120
    while (
        not all(m in Path(console).read_text() for m in ("worker says:", "worker says on stderr:"))
        and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    ray.shutdown()
    """
)

NARRATION = [
    "Loading weights",  # transformers' per-actor progress bar
    "Starting execution of Dataset",  # Ray Data, driver
    "Execution plan of Dataset",
    "execution finished in",
    "Data sink Parquet finished",
    "Progress bars disabled",
    "Token authentication is enabled for this Ray cluster",  # embedded Ray on loopback
]


def test_embedded_run_prints_worker_output_but_no_library_narration(tiny_encoder, tmp_path):
    console, log_file = tmp_path / "console.txt", tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HF_HUB_DISABLE_PROGRESS_BARS")}
    with console.open("w") as out:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                DRIVER,
                str(tiny_encoder),
                str(log_file),
                str(tmp_path / "out"),
                str(console),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**env, "PYTHONPATH": str(REPO)},
            timeout=600,
        )
    text = console.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "worker says: model loaded" in text and "worker says on stderr: model loaded" in text, text[-3000:]
    printed = [n for n in NARRATION if n in text]
    assert not printed, f"{printed} reached the console:\n{text[-3000:]}"
    logged = log_file.read_text()
    for line in ("Starting execution of Dataset", "execution finished in", "Data sink Parquet finished"):
        assert line in logged, f"{line!r} missing from the run's log file:\n{logged[-3000:]}"


def test_workers_get_quiet_settings_without_overriding_the_users(tmp_path):
    log_path = tmp_path / "run.log"
    env = worker_runtime_env(
        embedded=True, quiet=True, dashboard=False, cpu_only=True, log_path=log_path, environ={}
    )
    assert env["worker_process_setup_hook"] is _quiet_worker
    assert env["env_vars"]["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert env["env_vars"]["DS_ACCELERATOR"] == "cpu"
    assert env["env_vars"][WORKER_LOG_ENV] == str(log_path)

    user = {"HF_HUB_DISABLE_PROGRESS_BARS": "0", "DS_ACCELERATOR": "cuda"}
    env = worker_runtime_env(
        embedded=True, quiet=True, dashboard=False, cpu_only=True, log_path=log_path, environ=user
    )
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in env["env_vars"] and "DS_ACCELERATOR" not in env["env_vars"]


def test_a_joined_cluster_detects_its_own_gpus_and_logs_on_its_own_nodes(tmp_path):
    # the job's variables (set by `augrel submit`) are in the driver's environment: Ray would refuse a duplicate
    job_env = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env = worker_runtime_env(
        embedded=False,
        quiet=True,
        dashboard=False,
        cpu_only=False,
        log_path=tmp_path / "x.log",
        environ=job_env,
    )
    assert env["env_vars"] == {QUIET_WORKERS_ENV: "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    assert env["worker_process_setup_hook"] is _quiet_worker
    assert (
        worker_runtime_env(
            embedded=False,
            quiet=False,
            dashboard=False,
            cpu_only=False,
            log_path=tmp_path / "x.log",
            environ={},
        )
        == {}
    )


def test_divert_sends_narration_to_the_file_and_keeps_warnings_on_the_console():
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    divert = _Divert(Keep(), local=True)

    def record(name, level, msg):
        return logging.LogRecord(name, level, __file__, 1, msg, None, None)

    assert not divert.filter(record("ray.data.dataset", logging.INFO, "Data sink Parquet finished."))
    assert not divert.filter(
        record("ray.data._internal.progress", logging.WARNING, "Progress bars disabled.")
    )
    assert divert.filter(record("ray.data.dataset", logging.WARNING, "Block too large, check your memory"))
    assert divert.filter(record("ray.data.dataset", logging.DEBUG, "detail for Ray's own file"))
    auth = "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
    assert not divert.filter(record(AUTH_LOGGER, logging.WARNING, auth))
    assert _Divert(Keep(), local=False).filter(record(AUTH_LOGGER, logging.WARNING, auth))
    assert [r.getMessage()[:20] for r in seen] == ["Data sink Parquet fi", "Progress bars disabl", auth[:20]]


def test_the_loggers_named_by_file_exist_in_this_ray():
    # Ray Train names one module's logger after its path: a moved module would silently print again
    paths = [n for n in _narration_loggers() if n.endswith(".py")]
    assert paths and all(Path(p).is_file() for p in paths)


def test_a_library_deprecation_goes_to_the_file_and_one_at_our_code_still_prints():
    to_file: list[str] = []
    printed: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            to_file.append(record.getMessage())

    saved = warnings.showwarning
    try:
        warnings.showwarning = lambda message, *a, **k: printed.append(str(message))  # stands for the console
        _divert_library_deprecations(Keep())
        lib = (
            "/venv/lib/python3.11/site-packages/ray/data/_internal/execution/interfaces/execution_options.py"
        )
        warnings.showwarning(
            DeprecationWarning("`ExecutionOptions.exclude_resources` is deprecated"),
            DeprecationWarning,
            lib,
            436,
        )
        warnings.showwarning(
            FutureWarning("`x` is deprecated"), FutureWarning, str(REPO / "models" / "a.py"), 7
        )
        warnings.showwarning(UserWarning("weights not initialised"), UserWarning, lib, 9)
    finally:
        warnings.showwarning = saved
    assert len(to_file) == 1 and "exclude_resources" in to_file[0]
    assert printed == ["`x` is deprecated", "weights not initialised"]
