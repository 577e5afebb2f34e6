"""Classification jobs with bad input, refused before Ray starts: one message, no traceback.
Training on a real local Ray is in tests/integration/test_training.py; the Jobs API path is in
tests/e2e/test_jobs_api.py."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.util import digits as digits
from tests.util import digits_job

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _submit(tmp_path, job) -> subprocess.CompletedProcess:
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(job))
    return subprocess.run(
        [sys.executable, "-m", "wrn_cluster.cli", "submit", str(spec_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_data_url_is_one_message_before_ray_starts(tmp_path):
    missing = tmp_path / "nowhere"
    run = _submit(tmp_path, digits_job(missing, tmp_path / "runs"))
    assert run.returncode == 1
    assert str(missing) in run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert "embedded local Ray" not in run.stdout  # failed before starting Ray


def test_empty_class_folder_is_one_message(tmp_path, digits):
    import shutil

    data_root = tmp_path / "data"
    shutil.copytree(digits, data_root)
    empty = data_root / "train" / "7"
    for image in empty.iterdir():
        image.unlink()
    run = _submit(tmp_path, digits_job(data_root, tmp_path / "runs"))
    assert run.returncode == 1
    assert str(empty) in run.stderr or "7" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout
