"""Preflight: `wrn-cluster submit --dry-run` prints the plan and starts nothing; every setting that
would stop a job is one message naming it and the fix, before Ray starts, in seconds. Against
S3 and a live MLflow server: tests/integration/test_preflight.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.util import free_port
from wrn_cluster import preflight
from wrn_cluster.cli import app
from wrn_cluster.data.synthetic import write_imagefolder
from wrn_cluster.spec import parse
from wrn_cluster.train import precision


def job(tmp_path: Path, **sections) -> dict:
    spec = {
        "kind": "classify",
        "name": "preflight",
        "model": {"arch": "wrn-10-2"},
        "data": {"dataset": "imagefolder", "url": str(tmp_path / "data"), "image_size": 16},
        "optimizer": {"lr": 0.1},
        "schedule": {"epochs": 5, "milestones": [3]},
        "scaling": {"workers": 2},
        "checkpoint": {"storage": str(tmp_path / "runs"), "every_epochs": 2, "keep": 2},
        "tracking": {"experiment": "preflight", "registered_model": "wrn_preflight"},
    }
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values}
    return spec


@pytest.fixture
def embedded(tmp_path, monkeypatch):
    """No cluster or tracking server in the environment; the home under tmp_path."""
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WRN_CLUSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WRN_CLUSTER_LOCAL_CPUS", "4")
    return tmp_path


def dry_run(tmp_path: Path, spec: dict, *args: str):
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    started = time.monotonic()
    result = CliRunner().invoke(app, ["submit", str(spec_file), "--dry-run", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result, time.monotonic() - started


def test_dry_run_prints_the_plan_and_starts_or_leaves_nothing(embedded):
    import ray

    write_imagefolder(str(embedded / "data"), classes=4, per_class=40, size=16)
    spec = job(
        embedded,
        data={"batch_size": 32},
        optimizer={"scale_lr_with_batch": True, "base_batch_size": 16, "grad_accum_steps": 2},
    )
    result, _ = dry_run(embedded, spec)
    assert result.exit_code == 0, result.output
    runs = embedded / "runs"
    expected = [
        f"{embedded / 'data'}: imagefolder, 120 training images",
        "workers                 2 x 1 CPU (PACK)",
        "batch                   32 global = 2 workers x 8 x 2 accumulation steps",
        "lr                      0.2 (optimizer.lr 0.1 x batch 32/16, the linear scaling rule)",
        "epochs                  5 (multistep)",
        "steps per epoch         4 (120 training images)",  # 60 per worker, 8 a batch, 2 a step
        f"checkpoints             3 (every 2 epochs and the last; newest 2 kept) in {runs}"
        "/preflight/checkpoint_*, in the background",
        "preemption              a drained node's notice (asked every 10 steps) checkpoints at "
        "once; restarts without limit",
        f"{runs}: writable (marker written, read, deleted)",
        "embedded Ray would have 4 CPU",
        "wrn_preflight@champion: usable",
        "embedded store (MLFLOW_TRACKING_URI unset)",
    ]
    for text in expected:
        assert text in result.stdout, text
    assert not runs.exists()  # the marker and the folders made for it are gone
    assert not ray.is_initialized()


def test_the_plan_names_the_precision_and_layout_this_cpu_gets_and_why(embedded):
    write_imagefolder(str(embedded / "data"), classes=4, per_class=8, size=16)
    result, _ = dry_run(embedded, job(embedded))
    assert result.exit_code == 0, result.output
    [line] = [row for row in result.stdout.splitlines() if row.startswith("  precision ")]
    if precision.cpu_supports_bf16():
        assert line.endswith(
            "bf16 autocast: this CPU has native bf16; channels_last: 1.13x over NCHW with "
            "native bf16 on the CPU"
        ), line
    else:
        assert line.endswith(
            "fp32: this CPU has no native bf16; NCHW: channels_last ran 0.91x of NCHW in fp32 "
            "on the CPU"
        ), line
    assert "warning:" not in result.stdout


def test_explicit_bf16_warns_in_the_dry_run_when_this_cpu_would_emulate_it(embedded):
    write_imagefolder(str(embedded / "data"), classes=4, per_class=8, size=16)
    result, _ = dry_run(embedded, job(embedded, precision={"dtype": "bf16"}))
    assert result.exit_code == 0, result.output
    warnings = [row for row in result.stdout.splitlines() if row.startswith("warning:")]
    if precision.cpu_supports_bf16():
        assert warnings == []
    else:
        assert warnings == [
            "warning: precision.dtype: bf16 on a CPU without native bf16 (no avx512_bf16 or "
            "amx_bf16) runs emulated, about 12x slower than fp32 (a WRN-50-2 epoch: 766 s vs "
            "64 s); set precision.dtype: auto or fp32"
        ]
    # On GPU workers the CPU's bf16 does not matter: no warning, and CUDA's layout rule.
    gpu = job(embedded, precision={"dtype": "bf16"})
    assert precision.emulated_bf16_warning("bf16", use_gpu=True) is None
    gpu["scaling"]["use_gpu"] = True
    assert preflight.precision_plan(parse(yaml.safe_dump(gpu), "gpu.yaml")) == (
        "bf16 autocast: set in the spec; channels_last: cuDNN's tensor-core convolutions read NHWC"
    )


def test_dry_run_reports_synthetic_data_it_would_write_without_writing_it(embedded):
    synth = {"classes": 3, "per_class": 8, "size": 16}
    result, _ = dry_run(embedded, job(embedded, data={"synthesize": synth, "batch_size": 8}))
    assert result.exit_code == 0, result.output
    assert (
        "missing or empty; the submit writes synthetic JPEGs (3 classes x 8 images, 16px) there; "
        "nothing written now"
    ) in result.stdout
    assert "steps per epoch         3 (18 training images)" in result.stdout
    assert not (embedded / "data").exists()


def test_dry_run_names_every_broken_setting_and_its_fix_in_seconds(embedded, monkeypatch):
    (embedded / "runs").write_text("a file where the checkpoint folder should be")
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    spec = job(
        embedded,
        scaling={"workers": 16, "cpus_per_worker": 2},
        data={"batch_size": 64},
        tracking={"registered_model": "team/wrn", "alias": "latest"},
    )
    result, elapsed = dry_run(embedded, spec)
    assert result.exit_code == 1
    problems = result.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in problems), problems
    for setting, fix in [
        (str(embedded / "data"), "set data.url"),
        ("checkpoint.storage", "set checkpoint.storage to a folder"),
        ("MLFLOW_TRACKING_URI", f"no MLflow server answers at {dead}"),
        ("tracking.registered_model", "use letters, digits"),
        ("tracking.alias", "reserved"),
        ("asks for 32 CPU", "the embedded Ray would have 4 CPU; lower scaling.workers"),
    ]:
        assert any(setting in line and fix in line for line in problems), (setting, problems)
    assert len(problems) == 6
    assert elapsed < 20


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return {**env, "WRN_CLUSTER_HOME": str(tmp_path / "home"), "WRN_CLUSTER_LOCAL_CPUS": "4"}


def test_submit_runs_the_preflight_before_starting_ray(embedded):
    write_imagefolder(str(embedded / "data"), classes=2, per_class=4, size=16)
    (embedded / "runs").write_text("not a folder")
    spec_file = embedded / "job.yaml"
    spec_file.write_text(yaml.safe_dump(job(embedded)))
    run = subprocess.run(
        [sys.executable, "-m", "wrn_cluster.cli", "submit", str(spec_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(embedded),
    )
    assert run.returncode == 1
    assert "error: checkpoint.storage: cannot write a checkpoint to" in run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert "embedded local Ray" not in run.stdout


@pytest.mark.parametrize(
    "tracking, problem",
    [
        ({"registered_model": "team/wrn"}, "tracking.registered_model: Invalid model name"),
        ({"registered_model": "wrn:50"}, "tracking.registered_model: Invalid model name"),
        ({"registered_model": "wrn@2"}, "models:/NAME@ALIAS"),
        ({"alias": "v2"}, "tracking.alias: Version alias name 'v2' is reserved"),
        ({"alias": "the best"}, "tracking.alias: Invalid alias name"),
    ],
)
def test_unusable_registry_names_are_refused_before_training(embedded, tracking, problem):
    spec = parse(yaml.safe_dump(job(embedded, tracking=tracking)))
    with pytest.raises(preflight.PreflightError) as caught:
        preflight.check(spec)
    assert len(caught.value.problems) == 1 and problem in caught.value.problems[0]


def test_the_plan_names_step_checkpoints(embedded):
    write_imagefolder(str(embedded / "data"), classes=4, per_class=40, size=16)
    spec = job(embedded, checkpoint={"every_steps": 50, "keep": 3})
    result, _ = dry_run(embedded, spec)
    assert result.exit_code == 0, result.output
    assert (
        "3 at epoch ends (every 2 epochs and the last, plus every 50 steps inside an epoch; "
        "newest 3 of both kinds kept)"
    ) in result.stdout


def test_the_plan_of_an_elastic_group_gives_its_range_and_shares(embedded):
    write_imagefolder(str(embedded / "data"), classes=4, per_class=40, size=16)
    spec = job(embedded, scaling={"workers": {"min": 1, "max": 3}}, data={"batch_size": 64})
    result, _ = dry_run(embedded, spec)
    assert result.exit_code == 0, result.output
    assert "1-3 (elastic) x 1 CPU (PACK)" in result.stdout
    assert "64 global = the workers' shares, 22-64 each" in result.stdout
    # It needs room for its minimum only: 5 workers' worth of CPUs is more than the 4 here.
    too_many = job(embedded, scaling={"workers": {"min": 5, "max": 8}}, data={"batch_size": 64})
    result, _ = dry_run(embedded, too_many)
    assert result.exit_code != 0
    assert "asks for 5 CPU (5 workers x 1 CPU)" in result.output


def test_the_plan_checks_packed_shards_and_names_a_missing_one(embedded):
    from wrn_cluster.data import shards

    write_imagefolder(str(embedded / "files"), classes=4, per_class=40, size=16)
    shards.pack_here(str(embedded / "files"), str(embedded / "data"), 50)
    spec = job(embedded, data={"format": "shards"})
    result, _ = dry_run(embedded, spec)
    assert result.exit_code == 0, result.output
    data = embedded / "data"
    assert (
        f"{data}: imagefolder in shards (manifest and every shard's size checked), 120 "
        "training images"
    ) in result.stdout
    (data / "train" / "shard.00001.mds").unlink()
    result, _ = dry_run(embedded, spec)
    assert result.exit_code == 1
    assert f"{data}/train/shard.00001.mds: the shard is missing; pack the dataset again" in (
        result.output
    )
