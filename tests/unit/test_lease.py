"""Two submissions of the same job at once: the second is refused with the first's identity,
and the run folder holds the checkpoints of one run only. The cluster lease on a real local Ray
is in tests/integration/test_lease.py."""

import subprocess
import sys

import pytest
import yaml

from tests.util import as_spec, digits_job
from wrn_cluster import lease

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


def test_a_local_submit_while_the_job_runs_is_refused_before_ray_starts(tmp_path):
    from tests.datasets import write_digits_imagefolder

    write_digits_imagefolder(tmp_path / "data", size=16)
    job = digits_job(tmp_path / "data", tmp_path / "runs", name="twice")
    spec_file = tmp_path / "twice.yaml"
    spec_file.write_text(yaml.safe_dump(job))
    # This test process is the job's first run: it holds the lease another submit would take.
    with lease.file_lease(as_spec(job), lease.holder("twice-20261127-050000")):
        second = subprocess.run(
            [sys.executable, "-m", "wrn_cluster.cli", "submit", str(spec_file)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert second.returncode == 1
    assert "job 'twice' is already running (submission twice-20261127-050000 on " in second.stderr
    assert "Traceback" not in second.stderr and "embedded local Ray" not in second.stdout
    assert not list((tmp_path / "runs").glob("twice/checkpoint_*"))
