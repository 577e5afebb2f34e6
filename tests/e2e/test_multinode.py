"""Multi-node Ray without Docker: a head and a second Ray node process on this machine, each its
own raylet with its own ports, S3 (moto) as the checkpoint storage they share, and 2-worker jobs
submitted through the Jobs API that Ray SPREADs over both nodes: one that trains through, and
one whose second node is drained for preemption (`ray drain-node`, as an autoscaler does) and
then stopped."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml

from tests.datasets import write_digits_imagefolder
from tests.util import digits_job, free_ports, node_ports, stop_processes_of, wait_until
from wrn_cluster.train import checkpoint, order

pytestmark = pytest.mark.slow
VENV_BIN = str(Path(sys.executable).parent)
BUCKET = "wrn-multinode"
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
EPOCHS_ELASTIC = 10
# After a node is lost, an elastic group first waits this long for its maximum (60 s by default)
# before it starts with what is there. The controller polls at Ray's default 2 s here (the other
# tests poll every 0.5 s, tests/conftest.py): at 0.5 s the 1-worker epochs after the shrink ran
# so fast that the job finished before the third node had joined, and it grew only after its
# last epoch.
ELASTIC_ENV = {
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2",
}


@pytest.fixture(scope="module")
def s3(s3_env):
    import s3fs

    fs = s3fs.S3FileSystem(
        key=s3_env["AWS_ACCESS_KEY_ID"],
        secret=s3_env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=s3_env["AWS_ENDPOINT_URL_S3"],
    )
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    return fs


class Cluster(NamedTuple):
    address: str  # the dashboard's URL: the Jobs API
    gcs: str  # the head's GCS, for `ray drain-node`
    temp: Path
    second_node_port: int  # its node manager's: names the second node's processes


@pytest.fixture(scope="module")
def cluster(s3_env):
    """A head (with the dashboard) and a second node, 2 CPUs each. The nodes, and so every Ray
    worker and job driver, hold the S3 endpoint and credentials."""
    from ray.util.state import list_nodes

    # Short: Ray's unix sockets live under it, and their paths are limited to 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="wrn-mn-"))
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", **s3_env, **ELASTIC_ENV}
    env[order.SAMPLE_LOG] = str(temp / "samples")  # the workers record what they train
    gcs, dashboard, client, *ports = free_ports(15)
    common = [
        "--node-ip-address=127.0.0.1", "--num-cpus=2", "--object-store-memory=100000000",
        f"--temp-dir={temp}", "--disable-usage-stats",
    ]  # fmt: skip
    head = [
        f"{VENV_BIN}/ray", "start", "--head", f"--port={gcs}", f"--ray-client-server-port={client}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        *common, *node_ports(ports[:6]),
    ]  # fmt: skip
    second = [
        f"{VENV_BIN}/ray", "start", f"--address=127.0.0.1:{gcs}", *common, *node_ports(ports[6:]),
    ]  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        for command in (head, second):
            started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
            assert started.returncode == 0, started.stdout + started.stderr
        wait_until(
            lambda: len(_alive_nodes(list_nodes, address)) == 2,
            timeout=60,
            what="both nodes to be ALIVE in the state API",
        )
        yield Cluster(address, f"127.0.0.1:{gcs}", temp, ports[6])
    finally:
        stop_processes_of(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _train_workers(list_actors, address: str) -> list:
    """The job's RayTrainWorker actors once the state API lists both, else []."""
    try:
        workers = list_actors(
            address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True
        )
    except Exception:  # the state API is busy; ask again
        return []
    return workers if len(workers) >= 2 else []


def _alive_nodes(list_nodes, address: str) -> list:
    try:
        return [n for n in list_nodes(address=address) if n.state == "ALIVE"]
    except Exception:  # the dashboard is still starting
        return []


def test_two_workers_spread_over_two_nodes_and_checkpoint_to_s3(cluster, s3, s3_env, tmp_path):
    from ray.util.state import list_actors, list_nodes

    two_nodes = cluster.address
    # The data stays on this machine's disk, which both nodes see (as they would an NFS mount);
    # everything Ray Train writes goes to S3.
    write_digits_imagefolder(tmp_path / "digits", size=16)
    job = digits_job(
        tmp_path / "digits",
        f"s3://{BUCKET}/runs",
        name="multinode",
        model={"arch": "wrn-10-1"},
        schedule={"epochs": 2, "warmup_epochs": 0},
        scaling={"workers": 2, "placement_strategy": "SPREAD"},
    )
    spec_file = tmp_path / "multinode.yaml"
    spec_file.write_text(yaml.safe_dump(job))
    # The submitting shell holds the credentials too, as a user's would; only the endpoint
    # travels with the job: credentials come from the nodes' own environment.
    submitter_env = {**os.environ, **s3_env}
    run = subprocess.run(
        [sys.executable, "-m", "wrn_cluster.cli", "submit", str(spec_file), "--address", two_nodes],
        capture_output=True,
        text=True,
        timeout=240,
        env=submitter_env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "epoch 2/2" in run.stdout, run.stdout

    # Not in the runtime env the dashboard shows, nor in the job's logs or the submit's output.
    from ray.job_submission import JobSubmissionClient

    job_id = run.stdout.split("job ", 1)[1].split()[0]
    client = JobSubmissionClient(two_nodes)
    shown = json.dumps(client.get_job_info(job_id).runtime_env) + client.get_job_logs(job_id)
    for name in CREDENTIAL_VARS:
        value = s3_env.get(name)
        assert not value or value not in shown + run.stdout + run.stderr, name
    assert s3_env["AWS_ENDPOINT_URL_S3"] in shown  # what does travel

    nodes = {n.node_id for n in list_nodes(address=two_nodes)}
    # The state API learns of the job's actors from the GCS a moment after they run.
    workers = wait_until(
        lambda: _train_workers(list_actors, two_nodes),
        timeout=60,
        what="the state API to list the job's 2 RayTrainWorker actors",
    )
    assert len(workers) == 2, workers  # one worker group: no restart
    assert len(nodes) == 2 and {w.node_id for w in workers} == nodes  # one worker on each node

    saved = sorted(s3.glob(f"{BUCKET}/runs/multinode/checkpoint_*/{checkpoint.STATE_FILE}"))
    assert len(saved) == 2, saved  # one per epoch, keep: 2
    state = torch.load(io.BytesIO(s3.cat_file(saved[-1])), weights_only=True)
    assert state["epoch"] == 2 and state["resumes"] == []


def test_an_elastic_job_checkpoints_on_a_drain_shrinks_grows_back_and_survives_a_lost_node(
    cluster, s3, s3_env, tmp_path
):
    """Runs last: the second node is gone afterwards. An elastic group of 1-2 workers (2 CPUs
    each, so one per node): the second node is drained with a 20 s deadline and then stopped,
    a third node joins, and is then stopped without notice. The job checkpoints within the
    deadline, shrinks to 1 worker, grows back to 2, shrinks again, and finishes with the
    learning-rate curve of an unresized run, each resume continuing at its checkpoint's step."""
    from ray.util.state import list_nodes

    from wrn_cluster.spec import parse
    from wrn_cluster.train import optim

    epochs, steps_per_epoch = EPOCHS_ELASTIC, 45
    write_digits_imagefolder(tmp_path / "digits", size=16)
    job = digits_job(
        tmp_path / "digits",
        f"s3://{BUCKET}/runs",
        name="elastic",
        model={"arch": "wrn-10-1"},
        schedule={"epochs": epochs, "warmup_epochs": 0},
        scaling={
            "workers": {"min": 1, "max": 2},
            "cpus_per_worker": 2,
            "placement_strategy": "SPREAD",
            "resize_check_s": 5,
        },
        data={"batch_size": 32, "image_size": 32, "eval_resize": 32},  # 45 steps an epoch
        checkpoint={"preemption_check_steps": 3, "every_steps": 15, "keep": 50, "max_failures": 2},
    )
    spec_file = tmp_path / "elastic.yaml"
    spec_file.write_text(yaml.safe_dump(job))
    submit = [sys.executable, "-m", "wrn_cluster.cli", "submit", str(spec_file)]
    proc = subprocess.Popen(
        [*submit, "--address", cluster.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **s3_env},
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()

    def text() -> str:  # the submit shows some lines of the job's log twice: once each here
        return "".join(dict.fromkeys(lines))

    def printed(pattern: str, count: int = 1) -> bool:
        return len(re.findall(pattern, text())) >= count

    try:
        states = f"{BUCKET}/runs/elastic/checkpoint_*/{checkpoint.STATE_FILE}"
        wait_until(lambda: s3.invalidate_cache() or s3.glob(states), 240, "a first checkpoint")
        [second] = [n for n in _alive_nodes(list_nodes, cluster.address) if not n.is_head_node]
        drain = [
            f"{VENV_BIN}/ray", "drain-node", f"--address={cluster.gcs}",
            f"--node-id={second.node_id}", "--reason=DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message=spot instance reclaimed", "--deadline-remaining-seconds=20",
        ]  # fmt: skip
        drained = subprocess.run(drain, capture_output=True, text=True, timeout=60)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        time.sleep(20)  # the deadline: then the node goes, as the autoscaler would end it
        stop_processes_of(cluster.temp, marker=f"={cluster.second_node_port}")
        wait_until(lambda: printed(r"shrank from 2 to 1"), 180, "the group to shrink to 1")
        third_port = _start_node(cluster, s3_env)  # a node joins: the group grows at its next check
        wait_until(lambda: printed(r"grew from 1 to 2"), 180, "the group to grow back to 2")
        wait_until(
            lambda: printed(r"grew from 1 to 2(.|\n)*step \d+: .* 2 workers  checkpoint"),
            120,
            "a checkpoint of the 2 workers",
        )
        stop_processes_of(cluster.temp, marker=f"={third_port}")  # gone without notice
        wait_until(lambda: printed(r"shrank from 2 to 1", 2), 180, "the group to shrink again")
        proc.wait(timeout=600)
        reader.join(timeout=10)
    finally:
        proc.kill()
    output = text()
    print(output)  # shown with -s: the lines the README quotes
    assert proc.returncode == 0, output
    found = re.search(
        r"\[elastic\] node [0-9a-f]{8} is being preempted: checkpointed at step (\d+) in "
        r"([\d.]+)s, (-?\d+)s before its deadline",
        output,
    )
    assert found, output
    jit_step, left = int(found.group(1)), int(found.group(3))
    assert left > 0, output
    # Each resize continues from the step of a stored checkpoint, the first from the drain's
    # (or a later one) and none from before it: no sample of an epoch trained twice or skipped.
    resizes = [
        (how, int(step))
        for how, step in re.findall(
            r"\[elastic\] (shrank|grew) from \d to \d workers at step (\d+)", output
        )
    ]
    assert [how for how, _ in resizes] == ["shrank", "grew", "shrank"], output
    assert resizes[0][1] >= jit_step, output
    resumed = [int(step) for step in re.findall(r"\[elastic\] resumed .*\(step (\d+)\)", output)]
    assert {step for _, step in resizes} <= set(resumed), output
    s3.invalidate_cache()
    saved = {
        torch.load(io.BytesIO(s3.cat_file(path)), weights_only=True)["step"]: path
        for path in s3.glob(states)
    }
    assert jit_step in saved and all(step in saved for step in resumed)
    final = torch.load(io.BytesIO(s3.cat_file(saved[max(saved)])), weights_only=True)
    assert final["epoch"] == epochs and final["step"] == epochs * steps_per_epoch
    assert len(final["resumes"]) >= 3 and final["data_order"]["workers"] == 1
    # The learning rate at each epoch's end is the unresized schedule's.
    spec = parse(yaml.safe_dump(job), "elastic.yaml")
    factor = optim.lr_multiplier(spec, steps_per_epoch)
    base = optim.effective_lr(spec, spec.data.batch_size)
    printed_lr = {
        int(epoch): float(lr)
        for epoch, lr in re.findall(
            rf"\[elastic\] epoch (\d+)/{epochs}  .*?lr ([\d.e-]+)  ", output
        )
    }
    assert sorted(printed_lr) == list(range(1, epochs + 1)), output
    for epoch, lr in printed_lr.items():
        assert lr == pytest.approx(base * factor(epoch * steps_per_epoch), rel=1e-3), epoch
    assert re.search(r"\[elastic\] epoch \d+/\d+  .* 1 worker(?!s)", output), output
    # Every training sample of every epoch was trained once, by what the workers recorded.
    trained = trained_once(cluster.temp / "samples" / "elastic", epochs, steps_per_epoch)
    images = len(list((tmp_path / "digits" / "train").rglob("*.jpg")))
    assert trained == dict.fromkeys(range(epochs), images), trained


def trained_once(records: Path, epochs: int, micro_batches: int) -> dict[int, int]:
    """Epoch -> distinct samples it trained, from the workers' records (order.sample_record),
    asserting that each micro-batch of each epoch was trained once, by every rank of one
    attempt, with no sample twice but in the last micro-batch's padding. An attempt's records
    past the point the next attempt resumed from were rolled back with it, so they do not
    count."""
    attempts: dict[str, dict] = {}
    for path in records.glob("*.jsonl"):
        started, token, rank, _, world = path.stem.split("-")
        attempt = attempts.setdefault(token, {"started": int(started), "rows": []})
        attempt["started"] = min(attempt["started"], int(started))
        for line in path.read_text().splitlines():
            epoch, micro, indices = json.loads(line)
            attempt["rows"].append((epoch, micro, int(rank), int(world), indices))
    ordered = [a for a in sorted(attempts.values(), key=lambda a: a["started"]) if a["rows"]]
    kept = []
    for attempt, following in zip(ordered, [*ordered[1:], None], strict=True):
        cut = min((e, m) for e, m, *_ in following["rows"]) if following else (epochs, 0)
        kept += [row for row in attempt["rows"] if (row[0], row[1]) < cut]
    per_epoch = {}
    for epoch in range(epochs):
        shares: dict[int, list[tuple[int, int]]] = {}
        samples: list[int] = []
        before_last: list[int] = []  # the last micro-batch is the only one padded
        for _, micro, rank, world, indices in (row for row in kept if row[0] == epoch):
            shares.setdefault(micro, []).append((rank, world))
            samples += indices
            before_last += indices if micro < micro_batches - 1 else []
        assert sorted(shares) == list(range(micro_batches)), f"epoch {epoch}: a micro-batch lost"
        for micro, held in shares.items():
            world = held[0][1]
            assert sorted(held) == [(r, world) for r in range(world)], (epoch, micro, held)
        assert len(before_last) == len(set(before_last)), f"epoch {epoch}: a sample twice"
        padding = len(samples) - len(set(samples))
        assert padding < shares[micro_batches - 1][0][1], (epoch, padding)  # < its world
        per_epoch[epoch] = len(set(samples))
    return per_epoch


def _start_node(cluster: Cluster, s3_env: dict) -> int:
    """Another node of 2 CPUs joins the cluster; returns its node manager's port."""
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", **s3_env, **ELASTIC_ENV}
    env[order.SAMPLE_LOG] = str(cluster.temp / "samples")
    ports = free_ports(6)
    command = [
        f"{VENV_BIN}/ray", "start", f"--address={cluster.gcs}", "--node-ip-address=127.0.0.1",
        "--num-cpus=2", "--object-store-memory=100000000", f"--temp-dir={cluster.temp}",
        "--disable-usage-stats", *node_ports(ports),
    ]  # fmt: skip
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    return ports[0]
