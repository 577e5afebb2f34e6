"""Detection on a real local Ray: the detector learns synthetic shapes, logs COCO metrics to
MLflow, ships a model that predicts boxes, and resumes from its checkpoint. Scoring, targets,
bad input and the spec are in tests/unit/test_detection.py."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.unit.test_detection import ROOT, as_spec, detect_job
from wrn_cluster.data import coco
from wrn_cluster.data.synthetic import SHAPES
from wrn_cluster.models import build_detector
from wrn_cluster.models import detection as detection_models
from wrn_cluster.spec import DetectJob
from wrn_cluster.train import checkpoint
from wrn_cluster.train.detect import score

# ---------------------------------------------------------------------------------------------
# On a real local Ray: learning, MLflow, a shipped model, resume

MODEL = "shapes_detector"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-epoch run on 96px shapes with 2 workers, tracked in an embedded MLflow store."""
    import ray

    from wrn_cluster import driver

    home = tmp_path_factory.mktemp("home")
    # Run from a directory of its own: no stray MLflow store may appear in it.
    workdir, cwd = tmp_path_factory.mktemp("workdir"), os.getcwd()
    os.chdir(workdir)
    saved = dict(os.environ)
    os.environ.update(WRN_CLUSTER_HOME=str(home))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    job = detect_job(
        home / "shapes",
        home / "runs",
        data={"synthesize": {"images": 160, "size": 96}},
        tracking={"enabled": True, "experiment": "shapes", "registered_model": MODEL},
    )
    spec = as_spec(job)
    ray.init(num_cpus=4, object_store_memory=128 * 1024**2, include_dashboard=False)
    try:
        driver.prepare(spec)  # writes the shapes
        started = time.monotonic()
        result = driver.run(spec)
        seconds = time.monotonic() - started
        yield {
            "job": job,
            "spec": spec,
            "result": result,
            "seconds": seconds,
            "home": home,
            "workdir": workdir,
        }
    finally:
        ray.shutdown()
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved)


def newest_state(home: Path) -> dict:
    return torch.load(
        max((home / "runs" / "shapes").glob(f"checkpoint_*/{checkpoint.STATE_FILE}")),
        weights_only=True,
    )


def untrained_ap50(spec: DetectJob) -> float:
    """AP50 of the same detector before training, scored the way the loop scores."""
    _, val, categories, truth = coco.build(spec)
    torch.manual_seed(spec.seed * 1009)
    model = build_detector(num_classes=categories.num_classes, **detection_models.options(spec))
    loader = DataLoader(val, batch_size=8, collate_fn=coco.collate)
    return score(model, loader, categories, truth, "fp32", torch.device("cpu"))["AP50"]


@pytest.mark.slow
def test_detector_learns_shapes_with_two_workers_and_logs_coco_metrics(trained):
    metrics = trained["result"].metrics
    baseline = untrained_ap50(trained["spec"])
    print(f"AP50 {metrics['AP50']:.3f} (untrained {baseline:.3f}) in {trained['seconds']:.0f}s")
    assert metrics["epoch"] == 4
    assert metrics["AP50"] >= 0.5 and metrics["AP50"] > baseline + 0.4, (metrics, baseline)
    assert {"AP", "AP75", "APs", "APm", "APl", "train_loss_box_reg"} <= set(metrics)

    from mlflow import MlflowClient

    from wrn_cluster import tracking

    client = MlflowClient(tracking.tracking_uri())
    run = client.search_runs(
        [client.get_experiment_by_name("shapes").experiment_id],
        "tags.`wrn_cluster.job_name` = 'shapes'",
    )[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "AP50")] == [1, 2, 3, 4]
    assert run.data.params["kind"] == "detect" and "data.train.images" in run.data.params
    # Registered by the driver in the project's embedded store, and nowhere else.
    assert tracking.tracking_uri() == f"sqlite:///{trained['home'] / 'mlflow.db'}"
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.run_id == run.info.run_id
    assert float(version.tags["AP"]) == pytest.approx(metrics["AP"], abs=1e-6)
    assert list(trained["workdir"].rglob("mlflow.db")) == []
    assert list(trained["workdir"].rglob("mlruns")) == []
    state = newest_state(trained["home"])
    assert [c["id"] for c in state["categories"]] == [cid for cid, _ in SHAPES]


@pytest.mark.slow
def test_pulled_detector_predicts_the_checkpoints_boxes_without_the_project(trained, tmp_path):
    from PIL import Image

    state = newest_state(trained["home"])
    reference = detection_models.from_checkpoint(state)
    picture = sorted((trained["home"] / "shapes" / "val2017").glob("*.jpg"))[0]
    with Image.open(picture) as opened:
        pixels = torch.from_numpy(np.asarray(opened.convert("RGB")).copy()).permute(2, 0, 1)
    with torch.no_grad():
        expected = reference([pixels.float() / 255])[0]
    assert (expected["scores"] > 0.5).any()

    uri = f"models:/{MODEL}@champion"
    env = {**os.environ, "WRN_CLUSTER_HOME": str(trained["home"]), "PYTHONPATH": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    cli = [sys.executable, "-m", "wrn_cluster.cli"]
    pulled = subprocess.run(
        [*cli, "pull", uri, "--dst", str(tmp_path / "model")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    np.save(tmp_path / "image.npy", pixels.numpy())
    script = tmp_path / "load.py"
    script.write_text(PLAIN_LOAD)
    loaded = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "image.npy"),
         str(tmp_path / "found.npz")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    found = np.load(tmp_path / "found.npz")
    np.testing.assert_allclose(found["boxes"], expected["boxes"].numpy(), atol=1e-3)
    ids = np.array([-1, *(c["id"] for c in state["categories"])])
    assert found["category_ids"].tolist() == ids[expected["labels"].numpy()].tolist()

    predicted = subprocess.run(
        [*cli, "predict", uri, str(picture)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.splitlines()
    assert lines[0] == f"{picture}:" and len(lines) >= 2
    assert lines[1].split()[1] in {name for _, name in SHAPES} and lines[1].endswith("]")


PLAIN_LOAD = """
import sys
class NoProject:  # prove the model loads without this project's code
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "wrn_cluster":
            raise ImportError("wrn_cluster is not installed here")
sys.meta_path.insert(0, NoProject())
import mlflow, numpy as np, torch, torchvision  # torchvision registers the detection ops
model = mlflow.pytorch.load_model(sys.argv[1])
image = torch.from_numpy(np.load(sys.argv[2])).float() / 255
with torch.no_grad():
    found = model([image])[0]
np.savez(sys.argv[3], boxes=found["boxes"].numpy(), category_ids=found["category_ids"].numpy())
"""


@pytest.mark.slow
def test_resubmitting_a_longer_detection_job_resumes_its_checkpoint_and_run(trained):
    from mlflow import MlflowClient

    from wrn_cluster import driver, tracking

    longer = copy.deepcopy(trained["job"])
    longer["schedule"]["epochs"] = 5
    result = driver.run(as_spec(longer))
    assert result.metrics["epoch"] == 5
    state = newest_state(trained["home"])
    assert state["epoch"] == 5 and state["resumes"] == [4]
    assert result.metrics["AP50"] >= 0.5

    client = MlflowClient(tracking.tracking_uri())
    runs = client.search_runs(
        [client.get_experiment_by_name("shapes").experiment_id],
        "tags.`wrn_cluster.job_name` = 'shapes'",
    )
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "AP")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]
