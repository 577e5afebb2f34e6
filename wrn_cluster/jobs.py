"""A submitted job through the Ray Jobs API: follow its logs, read its status, stop it, list
the cluster's jobs.

Light on purpose: `wrn-cluster status`, `logs`, `stop` and `list` import this module and
cluster's, not torch, so they answer in about a second (`tests/unit/test_layers.py` pins it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from wrn_cluster.cluster import LaunchError, dashboard_url, jobs_client

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def follow(address: str, job_id: str, write: Callable[[str], object]) -> int:
    """Stream a job's logs until it ends; the exit code is the job's outcome."""
    client = jobs_client(address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            write(lines)

    asyncio.run(tail())
    status = wait_for_end(client, job_id)
    return 0 if status == "SUCCEEDED" else 1


def wait_for_end(client, job_id: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    status = str(client.get_job_status(job_id))
    while status.split(".")[-1] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id))
    return status.split(".")[-1]


def job_info(address: str, job_id: str) -> dict:
    info = _get(address, job_id)
    return {
        "job_id": info.submission_id,
        "status": str(info.status).split(".")[-1],
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "metadata": info.metadata,
    }


def _get(address: str, job_id: str):
    client = jobs_client(address)
    try:
        return client.get_job_info(job_id)
    except RuntimeError:
        raise LaunchError(
            f"no job {job_id!r} on {dashboard_url(address)}; `wrn-cluster list` shows the jobs"
        ) from None


def job_logs(address: str, job_id: str) -> str:
    _get(address, job_id)
    return jobs_client(address).get_job_logs(job_id)


def stop_job(address: str, job_id: str) -> bool:
    _get(address, job_id)
    return jobs_client(address).stop_job(job_id)


def list_jobs(address: str) -> list[dict]:
    jobs = jobs_client(address).list_jobs()
    return [
        {
            "job_id": j.submission_id or j.job_id,
            "status": str(j.status).split(".")[-1],
            "name": (j.metadata or {}).get("job_name", ""),
            "start_time": j.start_time,
        }
        for j in sorted(jobs, key=lambda j: j.start_time or 0)
    ]
