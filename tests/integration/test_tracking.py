"""MLflow tracking against a real `mlflow server` on PostgreSQL with artifacts and checkpoints
in moto's S3: runs, registry promotion, a resubmitted job continuing its run, pulls in a plain
process, a server outage, no leaks."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import s3fs
import torch
import yaml

from tests.conftest import S3_KEY_ID, S3_SECRET
from tests.util import as_spec, digits_job, wait_until
from wrn_cluster import driver
from wrn_cluster.models import build_model
from wrn_cluster.models.serving import ServingClassifier
from wrn_cluster.spec import CIFAR_MEAN_STD, IMAGENET_MEAN_STD
from wrn_cluster.train import checkpoint

pytestmark = pytest.mark.slow
MODEL = "digits_wrn"


def tracked_job(tracked, name, epochs, lr, **extra):
    job = digits_job(
        tracked["data"],
        f"s3://checkpoints/{name}-runs",
        name=name,
        schedule={"epochs": epochs, "type": "cosine", "warmup_epochs": 0},
        optimizer={"lr": lr},
        tracking={"enabled": True, "experiment": "digits", "registered_model": MODEL},
        **extra,
    )
    return as_spec(job)


def bucket() -> s3fs.S3FileSystem:
    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem(
        key=S3_KEY_ID, secret=S3_SECRET, endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"]
    )


def fs_epochs(fs: s3fs.S3FileSystem, run_folder: str) -> list[int]:
    """The epoch of each checkpoint left in a run folder, from its manifest."""
    found = []
    for manifest in fs.glob(f"{run_folder}/checkpoint_*/{checkpoint.MANIFEST_FILE}"):
        found.append(json.loads(fs.cat_file(manifest))["metrics"]["epoch"])
    return found


def champion(client):
    return client.get_model_version_by_alias(MODEL, "champion")


def test_registry_promotes_only_better_models_and_keeps_everything_in_s3(tracked, capfd):
    client = tracked["client"]
    weak = tracked_job(tracked, "weak", epochs=1, lr=0.02)
    driver.run(weak)
    first = champion(client)
    assert first.version == "1"

    worse = tracked_job(tracked, "worse", epochs=1, lr=1e-6)
    driver.run(worse)
    assert champion(client).version == "1"  # refused: lower val_top1
    refused = client.get_model_version(MODEL, "2")
    assert refused.tags["promotion"].startswith("kept digits_wrn@champion: v2 val_top1=")

    # The strong job trains in two submissions: the second continues the first's MLflow run.
    # It keeps only its newest checkpoint, and the ones registered versions were made from.
    retention = {"keep": 1, "keep_best": 0}
    strong = tracked_job(tracked, "strong", epochs=2, lr=0.05, checkpoint=retention)
    driver.run(strong)
    assert champion(client).version == "3"
    longer = yaml.safe_load(yaml.safe_dump(strong.model_dump(mode="json")))
    longer["schedule"]["epochs"] = 4
    driver.run(as_spec(longer))
    best = champion(client)
    assert best.version == "4" and best.run_id == client.get_model_version(MODEL, "3").run_id
    (strong_run,) = client.search_runs(
        [client.get_experiment_by_name("digits").experiment_id],
        "tags.`wrn_cluster.job_name` = 'strong'",
    )
    assert strong_run.info.run_id == best.run_id
    newest = max(bucket().glob("checkpoints/strong-runs/strong/checkpoint_*/state.pt"))
    with bucket().open(newest) as handle:
        assert torch.load(handle, weights_only=True)["mlflow_run_id"] == best.run_id
    assert float(best.tags["val_top1"]) > float(first.tags["val_top1"])

    # Epoch 1 and 3 went; epoch 2 stays while version 3 (made from it) exists. The controller
    # waits for retention's pass after the last epoch: this holds once fit() has returned.
    assert sorted(fs_epochs(bucket(), "checkpoints/strong-runs/strong")) == [2, 4]
    v3_source = client.get_model_version(MODEL, "3").tags["checkpoint"]
    assert bucket().exists(f"{v3_source}/state.pt")
    assert best.tags["promotion"].startswith("promoted")
    assert {"dataset", "params", "gmacs", "job_name", "val_top5"} <= set(best.tags)

    run = client.get_run(best.run_id)
    assert run.data.params["optimizer.lr"] == "0.05" and run.data.params["kind"] == "classify"
    assert run.data.tags["wrn_cluster.job_name"] == "strong"
    history = client.get_metric_history(best.run_id, "val_top1")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert client.get_metric_history(best.run_id, "step_train_loss")
    artifacts = {a.path for a in client.list_artifacts(best.run_id)}
    assert {"spec.yaml", "model_card.json"} <= artifacts

    fs = bucket()
    stored = fs.find("mlflow/artifacts")
    assert any(best.run_id in key and key.endswith("spec.yaml") for key in stored)
    assert any(key.endswith("model.pt2") for key in stored)
    assert fs.glob("checkpoints/strong-runs/strong/checkpoint_*/state.pt")

    # No credential value anywhere a user or the dashboard can see it.
    leaks = [S3_SECRET, S3_KEY_ID]
    for found in client.search_runs([run.info.experiment_id]):
        text = json.dumps([found.data.params, found.data.tags])
        assert not any(secret in text for secret in leaks)
    for key in stored + fs.find("checkpoints"):
        if fs.size(key) < 5_000_000:
            blob = fs.cat_file(key)
            assert not any(secret.encode() in blob for secret in leaks), key
    output = capfd.readouterr()
    assert not any(secret in output.out + output.err for secret in leaks)


PLAIN_LOAD = """
import sys
class NoProject:  # prove the model loads without this project's code
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "wrn_cluster":
            raise ImportError("wrn_cluster is not installed here")
sys.meta_path.insert(0, NoProject())
import mlflow, numpy as np, torch
x = np.load(sys.argv[1])
torch_model = mlflow.pytorch.load_model(sys.argv[2])
pyfunc_model = mlflow.pyfunc.load_model(sys.argv[2])
with torch.no_grad():
    np.save(sys.argv[3], torch_model(torch.from_numpy(x)).numpy())
np.save(sys.argv[4], np.asarray(pyfunc_model.predict(x)))
"""


def test_pulled_champion_predicts_like_the_trained_model_without_the_project(tracked, tmp_path):
    client = tracked["client"]
    best = champion(client)
    # The trained model, rebuilt from the job's last checkpoint in the bucket.
    fs = bucket()
    newest = max(fs.glob(f"checkpoints/{best.tags['job_name']}-runs/*/checkpoint_*/state.pt"))
    with fs.open(newest) as handle:
        state = torch.load(handle, weights_only=True)
    net = build_model(state["arch"], state["num_classes"])
    net.load_state_dict(state["model"])
    trained = ServingClassifier(net, *IMAGENET_MEAN_STD).eval()
    assert IMAGENET_MEAN_STD != CIFAR_MEAN_STD  # imagefolder data uses ImageNet statistics
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        expected = trained(x).numpy()
    np.save(tmp_path / "x.npy", x.numpy())

    script = tmp_path / "load.py"
    script.write_text(PLAIN_LOAD)
    env = {**os.environ, "PYTHONPATH": ""}
    uri = f"models:/{MODEL}@champion"
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "x.npy"), uri,
         str(tmp_path / "torch.npy"), str(tmp_path / "pyfunc.npy")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "torch.npy"), expected, atol=1e-4)
    np.testing.assert_allclose(np.load(tmp_path / "pyfunc.npy"), expected, atol=1e-4)

    cli = [sys.executable, "-m", "wrn_cluster.cli"]
    pulled = subprocess.run(
        [*cli, "pull", uri, "--dst", str(tmp_path / "model")], capture_output=True, text=True
    )
    assert pulled.returncode == 0, pulled.stderr
    assert f"{MODEL} version {best.version}" in pulled.stdout
    assert (tmp_path / "model" / "MLmodel").is_file()
    images = sorted((tracked["data"] / "val" / "3").glob("*.jpg"))[:2]
    predicted = subprocess.run(
        [*cli, "predict", uri, *map(str, images)], capture_output=True, text=True
    )
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.splitlines()
    assert lines[0] == f"{images[0]}:" and len(lines) == 12  # 2 images x (name + top 5)
    assert lines[1].split()[-1] == "3"  # the strong model knows a 3


def test_mlflow_serves_the_champion_one_prediction_per_image_for_any_batch(tracked, tmp_path):
    """`mlflow models serve` (MLflow's own server, on this environment) answers /invocations
    for batches of 1, 3 and 64 images with one row of class scores per image, the pulled
    model's own."""
    import mlflow

    from tests.util import free_port

    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "models", "serve",
         "-m", f"models:/{MODEL}@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # uvicorn: its child
        # As from an activated environment: MLflow starts uvicorn from the PATH.
        env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
    )  # fmt: skip
    try:

        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as reply:
                    return reply.status == 200
            except OSError:
                return server.poll() is not None  # gone: stop waiting, say why below

        wait_until(answers, 120, "mlflow models serve to answer /ping")
        assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        local = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
        for batch in (1, 3, 64):
            images = np.random.default_rng(batch).random((batch, 3, 16, 16), dtype=np.float32)
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=json.dumps({"inputs": images.tolist()}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as reply:
                predictions = np.asarray(json.loads(reply.read())["predictions"])
            assert predictions.shape == (batch, 10), predictions.shape
            np.testing.assert_allclose(predictions, local.predict(images), atol=1e-4)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # mlflow and the uvicorn it started
        server.wait(timeout=30)
        log.close()


def test_runs_list_and_show_read_the_jobs_from_the_tracking_server(tracked):
    from typer.testing import CliRunner

    from wrn_cluster.cli import app

    client = tracked["client"]
    listed = CliRunner().invoke(app, ["runs", "list", "--experiment", "digits", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["job"]: row for row in json.loads(listed.output)}
    assert {"weak", "worse", "strong"} <= set(rows)  # every job, newest first, once
    for job in ("weak", "worse", "strong"):
        (run,) = client.search_runs(
            [client.get_experiment_by_name("digits").experiment_id],
            f"tags.`wrn_cluster.job_name` = '{job}'",
        )
        assert rows[job]["run_id"] == run.info.run_id and rows[job]["status"] == "FINISHED"
        assert rows[job]["score"]["value"] == round(run.data.metrics["val_top1"], 6)
    assert rows["weak"]["versions"] == [f"{MODEL} v1"]
    assert rows["worse"]["versions"] == [f"{MODEL} v2"]  # refused the alias
    assert rows["strong"]["versions"] == [f"{MODEL} v3", f"{MODEL} v4 @champion"]
    assert rows["strong"]["epochs"] == 4 and rows["strong"]["kind"] == "classify"

    table = CliRunner().invoke(app, ["runs", "list"])
    assert table.exit_code == 0 and rows["strong"]["run_id"] in table.output

    shown = CliRunner().invoke(app, ["runs", "show", "strong"])
    assert shown.exit_code == 0, shown.output
    assert f"strong (classify) run {rows['strong']['run_id']}: FINISHED" in shown.output
    assert "optimizer.lr: 0.05" in shown.output and "spec.yaml" in shown.output
    missing = CliRunner().invoke(app, ["runs", "show", "no-such-job"])
    assert missing.exit_code == 1 and "no run or job named 'no-such-job'" in missing.output


def test_a_job_stops_at_its_target_records_the_time_and_registers_the_better_of_raw_and_ema(
    tracked,
):
    """schedule.stop_at ends the job at the first epoch that reaches it, with the time and
    device-hours to it in the run and on the version; with ema, the weights that scored better
    (raw or averaged) are the model logged and registered."""
    import mlflow

    name = "digits_recipe"
    job = digits_job(
        tracked["data"],
        "s3://checkpoints/target-runs",
        name="target",
        schedule={"epochs": 8, "type": "cosine", "warmup_epochs": 0, "stop_at": {"val_top1": 0.9}},
        ema={"decay": 0.9, "every_steps": 2},
        tracking={"enabled": True, "experiment": "recipes", "registered_model": name},
    )
    spec = as_spec(job)
    driver.prepare(spec)
    result = driver.run(spec)
    client = tracked["client"]
    (run,) = client.search_runs([client.get_experiment_by_name("recipes").experiment_id])
    history = sorted(
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_top1")
    )
    reached = [epoch for epoch, value in history if value >= 0.9]
    assert reached and reached[0] == history[-1][0] == result.metrics["epoch"] < 8, history
    seconds = run.data.metrics["time_to_val_top1_0.9"]
    hours = run.data.metrics["device_hours_to_val_top1_0.9"]
    assert 0 < seconds <= run.data.metrics["elapsed_s"] + 1e-6
    assert hours == pytest.approx(seconds * 2 / 3600, rel=0.05)  # 2 CPU workers
    assert run.data.tags["wrn_cluster.recipe"].startswith("ema 0.9 every 2")

    version = client.get_model_version_by_alias(name, "champion")
    raw, averaged = run.data.metrics["val_top1"], run.data.metrics["val_top1_ema"]
    assert version.tags["weights" if averaged > raw else "val_top1"] == (
        "ema" if averaged > raw else str(round(raw, 6))
    )
    assert float(version.tags["val_top1"]) == pytest.approx(max(raw, averaged), abs=1e-6)
    assert float(version.tags["time_to_val_top1_0.9"]) == pytest.approx(seconds, rel=1e-5)
    # The registered network is the better of the checkpoint's two sets of weights.
    fs = bucket()
    newest = max(fs.glob("checkpoints/target-runs/*/checkpoint_*/state.pt"))
    with fs.open(newest) as handle:
        state = torch.load(handle, weights_only=True)
    x = torch.rand(4, 3, 16, 16)
    outputs = {}
    for part in ("model", "ema"):
        net = build_model(state["arch"], state["num_classes"])
        net.load_state_dict(state[part])
        with torch.no_grad():
            outputs[part] = ServingClassifier(net, *IMAGENET_MEAN_STD).eval()(x).numpy()
    logged = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}").predict(x.numpy())
    shipped, other = ("ema", "model") if averaged > raw else ("model", "ema")
    np.testing.assert_allclose(np.asarray(logged), outputs[shipped], atol=1e-4)
    assert not np.allclose(outputs[shipped], outputs[other], atol=1e-4)


def test_training_survives_a_tracking_server_outage(tracked):
    client, server = tracked["client"], tracked["server"]
    spec = tracked_job(tracked, "outage", epochs=6, lr=0.05)
    spec.data.batch_size = 32  # longer epochs, so the outage falls mid-run

    def outage():
        runs = []
        deadline = time.monotonic() + 240
        while not runs and time.monotonic() < deadline:
            experiment = client.get_experiment_by_name("digits")
            runs = client.search_runs(
                [experiment.experiment_id], "tags.`wrn_cluster.job_name` = 'outage'"
            )
            if runs and client.get_metric_history(runs[0].info.run_id, "val_top1"):
                break
            runs = []
            time.sleep(0.5)
        server.kill()
        time.sleep(6)
        server.start()

    breaker = threading.Thread(target=outage)
    breaker.start()
    result = driver.run(spec)
    breaker.join(timeout=300)
    assert result.metrics["epoch"] == 6
    run = client.search_runs(
        [client.get_experiment_by_name("digits").experiment_id],
        "tags.`wrn_cluster.job_name` = 'outage'",
    )[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")] == list(
        range(1, 7)
    )
    assert run.info.status == "FINISHED"
    assert client.get_model_version_by_alias(MODEL, "champion")  # registry still answers
