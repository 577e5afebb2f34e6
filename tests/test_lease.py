"""Two submissions of the same job at once: the second is refused with the first's identity,
and the run folder holds the checkpoints of one run only."""

import subprocess
import sys

import pytest
import torch
import yaml

from tests.test_training import as_spec, digits_job
from tests.util import wait_until
from wrn_cluster import lease
from wrn_cluster.train import checkpoint

pytestmark = pytest.mark.slow


def test_the_lock_file_refuses_a_second_holder_and_frees_on_release(tmp_path):
    spec = as_spec(digits_job(tmp_path / "data", tmp_path / "runs", name="locked"))
    with lease.file_lease(spec, "process 1 on here"):
        with pytest.raises(lease.JobRunningError) as caught, lease.file_lease(spec, "second"):
            pass
        assert str(caught.value) == (
            f"job 'locked' is already running (process 1 on here) and writes its checkpoints to "
            f"{tmp_path / 'runs'}/locked; wait for it to end (`wrn-cluster status`), stop it "
            "(`wrn-cluster stop`), or give this job another name"
        )
    with lease.file_lease(spec, "later"):  # released with the first
        pass


def test_a_cluster_lease_is_one_named_actor_per_job_and_storage(tmp_path):
    import ray

    ray.init(num_cpus=2, object_store_memory=80 * 1024**2, include_dashboard=False)
    try:
        spec = as_spec(digits_job(tmp_path / "data", tmp_path / "runs", name="leased"))
        other_storage = as_spec(
            digits_job(tmp_path / "data", tmp_path / "elsewhere", name="leased")
        )
        with lease.cluster_lease(spec, "submission leased-1"):
            refused = pytest.raises(lease.JobRunningError, match=r"\(submission leased-1\)")
            with refused, lease.cluster_lease(spec, "submission leased-2"):
                pass
            with lease.cluster_lease(other_storage, "another run folder"):
                pass

        def free() -> bool:
            try:
                with lease.cluster_lease(spec, "after the first ended"):
                    return True
            except lease.JobRunningError:
                return False

        wait_until(free, timeout=30)
    finally:
        ray.shutdown()


def test_two_local_submits_of_one_job_at_once_run_it_once(tmp_path):
    from tests.datasets import write_digits_imagefolder

    write_digits_imagefolder(tmp_path / "data", size=16)
    storage = tmp_path / "runs"
    job = digits_job(
        tmp_path / "data", storage, name="twice", schedule={"epochs": 2, "warmup_epochs": 0}
    )
    job["scaling"]["workers"] = 1
    spec_file = tmp_path / "twice.yaml"
    spec_file.write_text(yaml.safe_dump(job))
    submit = [sys.executable, "-m", "wrn_cluster.cli", "submit", str(spec_file)]
    runs = [
        subprocess.Popen(submit, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert codes == [0, 1], outputs
    refused = next(err for run, (_, err) in zip(runs, outputs, strict=True) if run.returncode == 1)
    assert "job 'twice' is already running (submission twice-" in refused
    assert "Traceback" not in refused
    states = [
        torch.load(path, weights_only=True)
        for path in (storage / "twice").glob(f"checkpoint_*/{checkpoint.STATE_FILE}")
    ]
    assert sorted(s["epoch"] for s in states) == [1, 2]
    assert all(s["resumes"] == [] for s in states)
