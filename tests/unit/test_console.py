"""The job console: the project's lines on the console, every line in the job's log file
(routed at the file descriptors, in a process of its own), `wrn-cluster logs` for embedded jobs,
and the summary block's lines."""

import re
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from wrn_cluster import summary
from wrn_cluster.cli import app
from wrn_cluster.console import FollowedLog, is_projects, log_path, plain
from wrn_cluster.train.metrics import InEpoch, duration

JOB = textwrap.dedent(
    """
    import logging, os, sys, warnings
    from pathlib import Path
    from wrn_cluster.console import JobConsole

    logging.basicConfig(level=logging.INFO)  # a handler bound to stderr before the routing
    with JobConsole("digits", Path(sys.argv[1]), verbose=sys.argv[2] == "1") as console:
        console.say("job digits-1 on an embedded local Ray")
        print("\\x1b[36m(TrainController pid=12)\\x1b[0m [digits] epoch 1/2  train loss 1.0")
        print("\\x1b[36m(RayTrainWorker pid=13)\\x1b[0m INFO mlflow.store.db.utils: Creating")
        print("(TrainController pid=12) [digits-3f2a_00001] trial 3f2a_00001 runs {}")
        print("[other] another job's line")
        warnings.warn("a library's warning")
        logging.getLogger("mlflow").info("a library's log line")
        sys.stdout.flush()
        os.write(2, b"[2026-12-04 E 1 2] core_worker.cc:2465: a C++ line\\n")
        print("warning: the project's own warning", file=sys.stderr)
        print("no newline at the end", end="")
    print("after the job: the console is back")
    """
)


def run_job(tmp_path, verbose: bool):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    log = tmp_path / "logs" / "digits-1.log"
    done = subprocess.run(
        [sys.executable, str(script), str(log), "1" if verbose else "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done, log.read_text()


def test_the_console_shows_the_projects_lines_and_the_log_holds_every_line(tmp_path):
    done, log = run_job(tmp_path, verbose=False)
    assert done.stdout.splitlines() == [
        "job digits-1 on an embedded local Ray",
        "[digits] epoch 1/2  train loss 1.0",
        "[digits-3f2a_00001] trial 3f2a_00001 runs {}",
        "after the job: the console is back",
    ]
    assert done.stderr.splitlines() == ["warning: the project's own warning"]
    assert "\x1b" not in done.stdout + done.stderr
    for line in [
        "job digits-1 on an embedded local Ray",
        "(TrainController pid=12)\x1b[0m [digits] epoch 1/2",
        "INFO mlflow.store.db.utils: Creating",
        "[other] another job's line",
        "UserWarning: a library's warning",
        "INFO:mlflow:a library's log line",
        "core_worker.cc:2465: a C++ line",
        "warning: the project's own warning",
        "no newline at the end",
    ]:
        assert line in log, line
    assert "after the job" not in log


def test_verbose_shows_every_line_as_it_came(tmp_path):
    done, log = run_job(tmp_path, verbose=True)
    assert "INFO mlflow.store.db.utils: Creating" in done.stdout
    assert "\x1b[36m(TrainController pid=12)\x1b[0m [digits] epoch 1/2" in done.stdout
    assert "core_worker.cc:2465: a C++ line" in done.stderr
    assert "UserWarning: a library's warning" in done.stderr
    assert "[other] another job's line" in log


@pytest.mark.parametrize(
    "line, ours",
    [
        ("\x1b[36m(TrainController pid=8123)\x1b[0m [quickstart] epoch 1/6  lr 0.1\n", True),
        ("(RayTrainWorker pid=8270, ip=10.0.0.2) [quickstart] resumed in epoch 2/6\n", True),
        ("[quickstart-a1b2_00000] trial a1b2_00000 runs {'model.width': 2}\n", True),
        ("warning: the tracking server is slow\n", True),
        ("(TrainController pid=8123) 2026/12/04 INFO mlflow.store.db.utils: Creating\n", False),
        ("[quickstarter] epoch 1/6\n", False),  # another job whose name starts alike
        # The project's own warnings.warn, from the driver or a worker, read as warning: lines.
        ("(RayTrainWorker pid=9) /x/wrn_cluster/tracking/sender.py:79: UserWarning: down\n", True),
        ("/x/site-packages/mlflow/utils.py:12: FutureWarning: a library's\n", False),
        (
            "(PlacementGroupCleaner pid=3) Failed to query Ray Train Controller actor state.\n",
            False,
        ),
        ("/x/ray/data/execution_options.py:436: RayDeprecationWarning: deprecated\n", False),
    ],
)
def test_a_line_is_the_projects_by_its_job_name_after_rays_prefix(line, ours):
    assert is_projects(line, "quickstart") is ours
    assert "\x1b" not in plain(line) and "pid=" not in plain(line)
    if "wrn_cluster/" in line:
        assert plain(line) == "warning: down\n"


def test_logs_of_an_embedded_job_print_its_log_file(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("WRN_CLUSTER_HOME", str(tmp_path))
    log = log_path(tmp_path, "digits-20261204-120000")
    log.parent.mkdir(parents=True)
    log.write_text("(TrainController pid=1) INFO a library's line\n[digits] epoch 1/1\n")

    shown = CliRunner().invoke(app, ["logs", "digits-20261204-120000"])
    assert shown.exit_code == 0 and shown.output == log.read_text()

    missing = CliRunner().invoke(app, ["logs", "digits-19990101-000000"])
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    assert f"no log for job 'digits-19990101-000000' in {log.parent}" in missing.output
    assert "the newest local jobs: digits-20261204-120000" in missing.output


FACTS = {
    "job": "quickstart",
    "job_id": "quickstart-20261204-120000",
    "kind": "classify",
    "outcome": "succeeded",
    "wall_s": 3725.4,
    "epochs": 6,
    "final": {"val_top1": 0.984, "val_loss": 0.0512},
    "best": {"metric": "val_top1", "value": 0.99, "epoch": 5},
    "images_per_sec": 471.6,
    "checkpoint": "/tmp/runs/quickstart/checkpoint_2026-12-04_12-00-00.000000",
    "device": "CPU worker",
    "device_hours": 2.0697,
    "mlflow": {
        "tracking_uri": "sqlite:////tmp/.wrn-cluster/mlflow.db",
        "experiment_id": "1",
        "run_id": "f3590",
        "run_status": "FINISHED",
        "run_path": "#/experiments/1/runs/f3590",
        "model": {
            "name": "wrn_quickstart",
            "version": "2",
            "alias": "champion",
            "decision": "kept wrn_quickstart@champion: v2 val_top1=0.99 vs v1 val_top1=1.0",
        },
    },
}


def test_the_summary_says_each_fact_once_and_the_next_commands():
    lines = summary.lines(FACTS)
    text = "\n".join(lines)
    assert lines[0] == "[quickstart] summary: classify job quickstart-20261204-120000 succeeded"
    assert all(line.startswith("[quickstart] ") for line in lines)  # the console shows them
    assert "wall time    1h 02m  (2.0697 CPU worker-h)" in text
    assert "best         val_top1 99.00% (epoch 5)" in text
    assert "final        epoch 6: val_top1 98.40%  val_loss 0.0512" in text
    assert "throughput   472 img/s" in text
    assert f"{summary.UI}/#/experiments/1/runs/f3590" in text
    assert text.count("kept wrn_quickstart@champion: v2") == 1
    assert "next         wrn-cluster pull models:/wrn_quickstart@champion --dst ./model" in text
    assert "mlflow ui --backend-store-uri sqlite:////tmp/.wrn-cluster/mlflow.db" in text


def test_the_summary_says_whether_and_when_the_target_was_reached():
    reached = {**FACTS, "target": {"metric": "val_top1", "value": 0.95, "reached": True}}
    reached["target"] |= {"seconds": 3725.0, "device_hours": 2.0697}
    text = "\n".join(summary.lines(reached))
    assert "target       val_top1 0.95 reached in 1h 02m (2.07 device-hours)" in text
    missed = {**FACTS, "target": {"metric": "val_top1", "value": 0.995, "reached": False}}
    assert "target       val_top1 0.995 not reached in 6 epochs" in "\n".join(summary.lines(missed))


def test_a_servers_run_is_named_by_its_url_and_no_ui_command_is_suggested():
    served = {**FACTS, "mlflow": {**FACTS["mlflow"], "tracking_uri": "http://mlflow:5000"}}
    served["mlflow"]["run_url"] = "http://mlflow:5000/#/experiments/1/runs/f3590"
    text = "\n".join(summary.lines(served))
    assert "MLflow run   f3590  http://mlflow:5000/#/experiments/1/runs/f3590" in text
    assert "mlflow ui" not in text


def test_the_line_inside_an_epoch_says_step_pace_and_time_left():
    progress = InEpoch("imagenet", epochs=2, steps_per_epoch=400, batch=256, every_s=30)
    assert not progress.due()  # not before its first interval
    progress.start_epoch(done=400)  # the second epoch's steps start at the job's step 400
    progress.started -= 10.0  # 100 steps in 10 s: 0.1 s a step
    line = progress.line(epoch=1, done=500, loss=2.31415)
    found = re.fullmatch(
        r"\[imagenet\] epoch 2/2 step 100/400 \(25%\)  loss 2\.3142  (\d+) img/s  "
        r"ETA epoch (\d+)s, job (\d+)s",
        line,
    )
    assert found, line
    assert 2500 <= int(found[1]) <= 2560 and found[2] == found[3] == "30"
    assert not progress.due()  # the clock starts again at each line
    assert InEpoch("x", 1, 10, 8, every_s=0).due() is False  # 0: no lines inside epochs
    assert [duration(s) for s in (9, 252, 11100)] == ["9s", "4m 12s", "3h 05m"]


def test_a_followed_cluster_log_shows_the_projects_lines_and_keeps_every_line(tmp_path):
    shown: list[str] = []
    log = tmp_path / "logs" / "digits-1.log"
    followed = FollowedLog("digits", log, shown.append)
    # The Jobs API sends chunks that cut lines anywhere.
    for chunk in [
        "2026-12-04 INFO worker.py: Connecting to existing Ray cluster\n(TrainCon",
        "troller pid=7) [digits] epoch 1/2  lr 0.1\n(RayTrainWorker pid=8) INFO mlflow",
        ": Creating tables\nerror: job 'digits' is already running\n[digits] summary: done",
    ]:
        followed.write(chunk)
    followed.close()
    assert shown == [
        "[digits] epoch 1/2  lr 0.1\n",
        "error: job 'digits' is already running\n",
        "[digits] summary: done\n",
    ]
    assert log.read_text().splitlines() == [
        "2026-12-04 INFO worker.py: Connecting to existing Ray cluster",
        "(TrainController pid=7) [digits] epoch 1/2  lr 0.1",
        "(RayTrainWorker pid=8) INFO mlflow: Creating tables",
        "error: job 'digits' is already running",
        "[digits] summary: done",
    ]
    everything: list[str] = []
    verbose = FollowedLog("digits", tmp_path / "verbose.log", everything.append, verbose=True)
    verbose.write("(RayTrainWorker pid=8) INFO mlflow: Creating tables\n")
    verbose.close()
    assert everything == ["(RayTrainWorker pid=8) INFO mlflow: Creating tables\n"]


BAR_JOB = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from wrn_cluster.console import JobConsole

    with JobConsole("digits", Path(sys.argv[1])) as console:
        for step in (100, 200):
            print(f"(RayTrainWorker pid=8) [digits] epoch 1/2 step {step}/400 ({step // 4}%)  "
                  "loss 2.3142  2560 img/s  ETA epoch 30s, job 1m 10s", flush=True)
            time.sleep(0.3)
        print("(TrainController pid=7) [digits] epoch 1/2  train loss 2.0000", flush=True)
        time.sleep(0.3)
    """
)


def test_on_a_terminal_the_lines_inside_an_epoch_move_a_progress_bar(tmp_path):
    import os
    import pty

    script = tmp_path / "bar.py"
    script.write_text(BAR_JOB)
    leader, follower = pty.openpty()
    job = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "bar.log")],
        stdout=follower,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the job closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert job.wait(timeout=60) == 0, job.stderr.read()
    os.close(leader)
    terminal = seen.decode(errors="replace")
    assert "200/400" in terminal and "loss 2.3142  2560 img/s" in terminal  # the bar
    assert "step 200/400 (50%)" not in terminal  # not the line itself
    assert "[digits] epoch 1/2  train loss 2.0000" in terminal  # the epoch line, above it
    assert "step 200/400 (50%)  loss 2.3142" in (tmp_path / "bar.log").read_text()


def test_evaluation_says_its_progress_and_yields_every_batch(capsys):
    import time

    progress = InEpoch("digits", epochs=2, steps_per_epoch=10, batch=8, every_s=0.01)
    seen = []
    for batch in progress.evaluating([1, 2, 3, 4], epoch=0):
        time.sleep(0.02)
        seen.append(batch)
    assert seen == [1, 2, 3, 4]
    lines = capsys.readouterr().out.splitlines()
    assert lines, "no evaluation line"
    for line in lines:
        assert re.fullmatch(
            r"\[digits\] epoch 1/2 evaluating batch [1-4]/4 \(\d+%\)  ETA \d+s", line
        )
    quiet = InEpoch("digits", epochs=2, steps_per_epoch=10, batch=8, every_s=0)
    assert list(quiet.evaluating([1, 2], epoch=1)) == [1, 2]
    assert capsys.readouterr().out == ""


def test_json_is_refused_for_a_cluster_job_and_an_unwritable_home_is_one_message(
    tmp_path, monkeypatch
):
    from pathlib import Path

    job = str(Path(__file__).parents[2] / "jobs" / "quickstart.yaml")
    remote = CliRunner().invoke(app, ["submit", job, "--json", "--address", "http://x:8265"])
    assert remote.exit_code == 1 and "--json is for jobs on the embedded Ray" in remote.output

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("WRN_CLUSTER_HOME", str(tmp_path / "a-file" / "home"))
    local = CliRunner().invoke(app, ["submit", job])
    assert local.exit_code == 1 and "Traceback" not in local.output
    assert "cannot write the job's log file in" in local.output
    assert "set WRN_CLUSTER_HOME to a folder you can write" in local.output
