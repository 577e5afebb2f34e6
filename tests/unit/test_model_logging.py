"""The driver logs a finished run's network once: a resubmitted finished job, whose last
checkpoint is the same, logs (and so registers) nothing new. On an embedded SQLite store."""

from mlflow import MlflowClient

from tests.util import digits_job
from wrn_cluster import tracking
from wrn_cluster.models import build_model
from wrn_cluster.spec import ClassifyJob


def test_a_finished_runs_model_is_logged_once_per_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    job = digits_job(tmp_path / "data", tmp_path / "runs", name="model-once")
    spec = ClassifyJob.model_validate(job)
    context = tracking.RunContext(tracking.tracking_uri(), str(tmp_path / "artifacts"))
    run = tracking.RunTracker(spec, context)
    run.close()
    net = build_model(spec.model.arch, 10)

    def log(client, run_id):
        return tracking.log_classifier(client, run_id, spec, net, [str(i) for i in range(10)], 16)

    first = tracking.log_trained_model(spec, context, run.run_id, "runs/ckpt_1", log)
    again = tracking.log_trained_model(spec, context, run.run_id, "runs/ckpt_1", log)
    newer = tracking.log_trained_model(spec, context, run.run_id, "runs/ckpt_2", log)

    assert (first, again, newer) == (True, False, True)
    client = MlflowClient(context.tracking_uri)
    experiment = client.get_run(run.run_id).info.experiment_id
    logged = client.search_logged_models([experiment])
    assert len(logged) == 2 and all(m.source_run_id == run.run_id for m in logged)
    assert not (tmp_path / "mlruns").exists()
