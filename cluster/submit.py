"""``augrel submit --address URL -- <augrel args>``: run an augrel command as a Ray job.

The repository is the job's ``working_dir``: the top-level packages ship as they are and the driver runs
``python -m pipelines.cli <args>`` on the cluster. Logs are followed until the job ends; the exit status is
the job's (0 SUCCEEDED, 1 FAILED, 2 STOPPED). Ctrl-C stops the job instead of leaving it running unseen.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cluster.local import LocalCluster, auth_headers
from pipelines.errors import AugrelError

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Never upload outputs and caches with the job (Ray already leaves out .git, .venv and what .gitignore lists).
WORKING_DIR_EXCLUDES = ["runs", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info"]
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 2}


class SubmitError(AugrelError):
    pass


def resolve_address(address: str | None, cluster_name: str = "local") -> str:
    """The Jobs API URL: ``--address``, else $RAY_API_SERVER_ADDRESS, else the cluster `augrel cluster up` made."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        local = LocalCluster.load(cluster_name)
        if local and local.alive():
            address = local.dashboard_url
    if not address:
        raise SubmitError(
            "no cluster to submit to: pass --address http://HOST:8265 (the Ray dashboard / Jobs API), set "
            "RAY_API_SERVER_ADDRESS, or start one with `augrel cluster up`"
        )
    if address.startswith("ray://"):
        raise SubmitError(f"{address}: Ray Client addresses are not Jobs API addresses; use http://HOST:8265")
    return address if "://" in address else f"http://{address}"


def entrypoint(args: Sequence[str]) -> str:
    return shlex.join(["python", "-m", "pipelines.cli", *args])


def runtime_env(env_vars: dict[str, str] | None = None) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k in ("AUGREL_DATA_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env.update(env_vars or {})
    return {"working_dir": str(REPO_ROOT), "excludes": WORKING_DIR_EXCLUDES, "env_vars": env}


def submit(
    args: Sequence[str],
    *,
    address: str | None = None,
    wait: bool = True,
    env_vars: dict[str, str] | None = None,
    submission_id: str | None = None,
    out=sys.stdout,
    agent_wait_s: float = 90.0,
) -> tuple[str, str]:
    """Submit ``augrel <args>``; with ``wait``, stream its logs and return (submission id, final status)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    if not args:
        raise SubmitError(
            "nothing to run: give the augrel command after --, e.g. `augrel submit -- data validate DIR`"
        )
    url = resolve_address(address)
    try:
        # The token travels as a header, so this works whether or not RAY_AUTH_MODE is set here.
        client = JobSubmissionClient(url, headers=auth_headers())
    except Exception as e:  # connection refused, wrong port, auth: say which address failed
        raise SubmitError(f"cannot reach the Ray Jobs API at {url}: {e}") from None
    # A cluster that has just started may not have its job agent registered yet ("No available agent to
    # submit job"): retry that one answer for a while instead of failing the user's command.
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint(args),
                runtime_env=runtime_env(env_vars),
                submission_id=submission_id,
                metadata={"tool": "augrel", "args": shlex.join(args)},
            )
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise SubmitError(f"{url} refused the job: {e}") from None
            time.sleep(2)
    print(f"submitted {job_id} to {url}: augrel {shlex.join(args)}", file=out, flush=True)
    if not wait:
        return job_id, str(client.get_job_status(job_id))

    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(follow())
    except KeyboardInterrupt:
        print(f"\ninterrupted: stopping {job_id}", file=out, flush=True)
        client.stop_job(job_id)
    # tail_job_logs ends when the job does; the status may take a moment to settle
    deadline = time.monotonic() + 30
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    info = client.get_job_info(job_id)
    if status != JobStatus.SUCCEEDED and info.message:
        print(f"{job_id}: {info.message}", file=out, flush=True)
    print(f"{job_id} {status.value}", file=out, flush=True)
    return job_id, status.value
