"""Small helpers the tests share: free ports, bounded waits, stopping the Ray processes a test
started (and only those), and the digits classification job many tests submit."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack, suppress
from pathlib import Path

import psutil
import pytest
import yaml

from tests.datasets import write_digits_imagefolder
from wrn_cluster.spec import parse


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout: float, what: str, interval: float = 0.5):
    """condition()'s first truthy value, polled until ``timeout``; else a TimeoutError saying
    what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}")


def get_json(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0):
    """The JSON a URL answers with, or None while it answers nothing that parses."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read())
    except (OSError, ValueError):  # refused, timed out, HTTP error, or not JSON (yet)
        return None


def free_ports(count: int) -> list[int]:
    """Distinct free ports: every socket stays bound until all are picked."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def node_ports(ports: list[int]) -> list[str]:
    """The per-node ports two raylets on one machine must not share; worker ports are random."""
    manager, objects, agent_http, agent_grpc, runtime_env, metrics = ports
    return [
        f"--node-manager-port={manager}",
        f"--object-manager-port={objects}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
        "--min-worker-port=0",
        "--max-worker-port=0",
    ]


def stop_processes_of(temp: Path, marker: str | None = None) -> None:
    """Stop what our `ray start`s launched, by process id: every process naming our temp dir
    (and ``marker``, e.g. one node's port, if given) and all their descendants (Ray workers, the
    job driver). Never `ray stop`, which would also stop other Ray clusters on this machine."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.pid == os.getpid() or not any(str(temp) in p for p in cmdline):
            continue
        if marker is None or any(marker in p for p in cmdline):
            roots.append(proc)
    tree = {p.pid: p for root in roots for p in [root, *_descendants(root)]}
    for proc in tree.values():
        with suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(list(tree.values()), timeout=5)  # gcs_server can sit out SIGTERM
    for proc in alive:
        with suppress(psutil.NoSuchProcess):
            proc.kill()


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def digits_data(data_url) -> dict:
    """The data section of the digits jobs: 16-pixel images read in this process."""
    return {
        "dataset": "imagefolder",
        "url": str(data_url),
        "image_size": 16,
        "eval_resize": 16,
        "batch_size": 64,
        "loader_workers": 0,
        "augment": False,
    }


def digits_job(data_url, storage, name="digits", **sections) -> dict:
    job = {
        "kind": "classify",
        "name": name,
        "seed": 7,
        "model": {"arch": "wrn-10-2"},
        "data": digits_data(data_url),
        "optimizer": {"lr": 0.05, "weight_decay": 5e-4},
        "schedule": {"epochs": 8, "type": "cosine", "warmup_epochs": 1},
        "scaling": {"workers": 2},
        "checkpoint": {"storage": str(storage), "every_epochs": 1, "keep": 2},
        "tracking": {"enabled": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            job[section] = {**job.get(section, {}), **values}
        else:
            job[section] = values
    return job


def tune_job(name, data_url, storage, space, epochs, seed=3, **tune) -> dict:
    """A CPU-sized width/depth search on the digits: 1-worker trials of WRN-10-k, each with its
    MLflow child run, the best registered as <name>_best."""
    return {
        "kind": "tune",
        "name": name,
        "seed": seed,
        "model": {"arch": "wrn-10-1"},
        "data": digits_data(data_url),
        "optimizer": {"lr": 0.05},
        "schedule": {"epochs": epochs, "type": "cosine"},
        "scaling": {"workers": 1},
        "checkpoint": {"storage": str(storage), "keep": 1},
        "tracking": {"experiment": name, "registered_model": f"{name}_best"},
        "tune": {"space": space, "max_concurrent_trials": 2, "max_failures": 0, **tune},
    }


def as_spec(job: dict):
    return parse(yaml.safe_dump(job), "test.yaml")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    write_digits_imagefolder(root, size=16)
    return root


def final_state(storage: Path, name: str) -> dict:
    """The newest checkpoint's state (Ray names checkpoint folders by time)."""
    import torch

    from wrn_cluster.train import checkpoint

    newest = max((storage / name).glob(f"checkpoint_*/{checkpoint.STATE_FILE}"))
    return torch.load(newest, weights_only=True)


def kill_a_worker_after_first_checkpoint(run_dir: Path, proc) -> bool:
    """SIGKILL a Ray Train worker as soon as Ray Train has registered the first checkpoint."""
    deadline = time.monotonic() + 300
    workers = []
    while not workers and time.monotonic() < deadline and proc.poll() is None:
        workers = [
            p.pid
            for p in psutil.Process(proc.pid).children(recursive=True)  # this job's Ray only
            if any("RayTrainWorker" in part for part in cmdline(p))
        ]
        time.sleep(0.2)
    while workers and time.monotonic() < deadline and proc.poll() is None:
        # Ray Train has registered a checkpoint once its manager's snapshot names one; a
        # checkpoint folder alone may still be uploading, and a restart would not see it.
        snapshot = run_dir / "checkpoint_manager_snapshot.json"
        if snapshot.is_file() and "checkpoint_" in snapshot.read_text(errors="replace"):
            os.kill(workers[-1], signal.SIGKILL)
            return True
        time.sleep(0.05)
    return False


def submit_killing_a_worker(
    job: dict, spec_file: Path, run_dir: Path, env: dict | None = None
) -> tuple[bool, int, str]:
    """`wrn-cluster submit` of ``job`` (written to ``spec_file``) on an embedded Ray of 4
    logical CPUs, one of its training workers SIGKILLed once the run in ``run_dir`` has its
    first checkpoint: (whether one was killed, the exit code, the output)."""
    spec_file.write_text(yaml.safe_dump(job))
    proc = subprocess.Popen(
        [sys.executable, "-m", "wrn_cluster.cli", "submit", str(spec_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {}), "WRN_CLUSTER_LOCAL_CPUS": "4"},
    )
    try:
        killed = kill_a_worker_after_first_checkpoint(run_dir, proc)
        output, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    return killed, proc.returncode, output


def cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # gone, or a zombie, meanwhile
        return []


def shard_epoch(train, epoch: int = 0) -> list[tuple]:
    """Epoch ``epoch`` of a shard stream (``shards.build``'s) read in this process, in its
    order: (image, label, the record's index in its split) of each sample."""
    train.start_epoch(epoch, 0)
    return [(*train.transform(record, epoch), int(record["index"])) for record in train.stream]


def positions_of(epoch: list[tuple], indices) -> set[int]:
    """Where in an epoch read by ``shard_epoch`` the samples of these split indices come."""
    wanted = set(indices)
    return {i for i, (_, _, index) in enumerate(epoch) if index in wanted}
