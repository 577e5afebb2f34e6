"""A search whose driver dies resumes with the same submit: `wrn-cluster submit` of a 2-trial
search on an embedded local Ray, killed (the driver and every Ray process it started, SIGKILL)
once Tune has recorded a finished trial; the same submit again restores the search from its
storage (Tune's restore), runs no finished trial again, continues the interrupted one from its
checkpoint, and records everything in the one MLflow sweep it opened first; the same name with
another spec is then refused with one message."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import yaml

from tests.datasets import write_digits_imagefolder
from tests.util import tune_job, wait_until

pytestmark = pytest.mark.slow
NAME = "resumed"
WIDTHS = [1, 2]


def search_job(data: Path, storage: Path) -> dict:
    space = {"model.width": {"grid": WIDTHS}}
    return tune_job(
        NAME, data, storage, space, 3, seed=5, scheduler="fifo", max_concurrent_trials=1
    )


def trial_states(experiment: Path) -> dict[str, str]:
    """Trial id -> status in Tune's newest saved experiment state."""
    states = sorted(experiment.glob("experiment_state*.json"))
    if not states:
        return {}
    try:
        state = json.loads(states[-1].read_text())
    except ValueError:  # being written
        return {}
    trials = [json.loads(trial) for trial, *_ in state.get("trial_data", [])]
    return {t["trial_id"]: t["status"] for t in trials}


def interrupted(runs: Path) -> bool:
    """A trial finished and a running one has a checkpoint Ray Train registered."""
    states = trial_states(runs / NAME)
    if "TERMINATED" not in states.values():
        return False
    return any(
        "checkpoint_" in snapshot.read_text(errors="replace")
        for trial, status in states.items()
        if status == "RUNNING"
        for snapshot in (runs / f"{NAME}-{trial}").glob("checkpoint_manager_snapshot.json")
    )


def kill_tree(proc: subprocess.Popen) -> None:
    family = psutil.Process(proc.pid).children(recursive=True)
    for process in [psutil.Process(proc.pid), *family]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


@pytest.fixture(scope="module")
def search(mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-resume")
    data = root / "digits"
    write_digits_imagefolder(data, size=16)
    spec_file = root / "search.yaml"
    spec_file.write_text(yaml.safe_dump(search_job(data, root / "runs")))
    ray_tmp = Path(tempfile.mkdtemp(prefix="wrn-tr-"))  # unix socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        MLFLOW_TRACKING_URI=mlflow_server.url,
        WRN_CLUSTER_HOME=str(root / "home"),
        WRN_CLUSTER_LOCAL_CPUS="4",
        RAY_TMPDIR=str(ray_tmp),
    )
    command = [sys.executable, "-m", "wrn_cluster.cli", "submit", str(spec_file)]
    try:
        yield {"root": root, "spec_file": spec_file, "env": env, "command": command}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_killed_search_resumes_and_reruns_no_finished_trial(search, mlflow_server):
    from mlflow import MlflowClient

    experiment = search["root"] / "runs" / NAME
    first_log = search["root"] / "first.log"
    with open(first_log, "w") as log:
        first = subprocess.Popen(
            search["command"], env=search["env"], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            # Killed once Tune's saved state holds a finished trial and another one has a
            # checkpoint, as when the head node dies mid-search.
            wait_until(
                lambda: first.poll() is not None or interrupted(search["root"] / "runs"),
                timeout=480,
                what="a finished trial and a checkpointed running one",
            )
            assert first.poll() is None, first_log.read_text()[-5000:]
        finally:
            kill_tree(first)
    before = trial_states(experiment)
    finished = sorted(t for t, status in before.items() if status == "TERMINATED")
    assert finished and len(finished) < len(WIDTHS), before

    second = subprocess.run(
        search["command"], env=search["env"], capture_output=True, text=True, timeout=600
    )
    output = second.stdout + second.stderr
    print(output)  # with -s: what a user sees
    assert second.returncode == 0, output[-6000:]
    assert "Traceback" not in output
    assert (
        f"[{NAME}] resuming the search stored at {search['root'] / 'runs'}/{NAME}: "
        f"{len(finished)} trial(s) finished and are not run again"
    ) in output
    started_again = [t for t in before if f"trial {t} runs" in output]
    assert not set(finished) & set(started_again), output[-6000:]
    for trial in set(before) - set(finished):  # from its checkpoint, not from scratch
        assert re.search(rf"\[{NAME}-{trial}\] resumed at the start of epoch [23]/3", output)
    assert set(trial_states(experiment).values()) == {"TERMINATED"}
    assert len(trial_states(experiment)) == len(WIDTHS)

    client = MlflowClient(mlflow_server.url)
    found = client.get_experiment_by_name(NAME)
    runs = client.search_runs([found.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the first one, reopened
    assert len(children) == len(WIDTHS)  # one run per trial, the interrupted one continued
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_top1")
        assert sorted(m.step for m in history) == [1, 2, 3], child.data.tags
    champion = client.get_model_version_by_alias(f"{NAME}_best", "champion")
    assert champion.run_id in {c.info.run_id for c in children}

    # The same name with another spec: refused, the stored search untouched.
    refused = subprocess.run(
        [*search["command"], "--set", "schedule.epochs=5"],
        env=search["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "Traceback" not in output
    assert (
        f"job {NAME!r}: a search of this name was started at {search['root'] / 'runs'}/{NAME} "
        "with another spec (schedule.epochs differ)"
    ) in output, output[-3000:]
    assert set(trial_states(experiment).values()) == {"TERMINATED"}
