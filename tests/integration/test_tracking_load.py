"""Load: several jobs logging at once to the PostgreSQL-backed MLflow server lose no metric."""

from __future__ import annotations

import threading
import time

import pytest
from mlflow import MlflowClient

from wrn_cluster.tracking import MetricSender

pytestmark = pytest.mark.slow
JOBS, STEPS, KEYS = 4, 250, ("train_loss", "lr")  # 4 runs x 500 values


def test_concurrent_jobs_lose_no_metric_value(mlflow_server):
    setup = MlflowClient(mlflow_server.url)
    experiment = setup.create_experiment("metric-load")
    run_ids = [setup.create_run(experiment, run_name=f"job-{i}").info.run_id for i in range(JOBS)]
    unsent: dict[str, int] = {}
    start = threading.Barrier(JOBS)

    def job(run_id: str, seed: int) -> None:
        # Each job has its own client and sender thread, as each job's rank 0 has.
        # flush_s 0.05 rather than a second: many small batches, interleaved across jobs.
        sender = MetricSender(MlflowClient(mlflow_server.url), run_id, retry_s=0.2, flush_s=0.05)
        start.wait()
        for step in range(STEPS):
            sender.add({"train_loss": 1.0 / (step + 1) + seed, "lr": 0.1 * seed + step}, step)
            time.sleep(0.002)  # steps take time
        unsent[run_id] = sender.close(timeout_s=120)

    threads = [threading.Thread(target=job, args=(run_id, i)) for i, run_id in enumerate(run_ids)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert unsent == dict.fromkeys(run_ids, 0)
    for seed, run_id in enumerate(run_ids):
        for key in KEYS:
            history = setup.get_metric_history(run_id, key)
            assert sorted(m.step for m in history) == list(range(STEPS)), (run_id, key)
        losses = {m.step: m.value for m in setup.get_metric_history(run_id, "train_loss")}
        assert losses[STEPS - 1] == pytest.approx(1.0 / STEPS + seed)
    assert sum(len(setup.get_metric_history(r, k)) for r in run_ids for k in KEYS) == 2000
