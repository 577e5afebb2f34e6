"""Model packaging: a trained network logged to a run as an MLflow model that loads without
this project (torch.export for classifiers, TorchScript for detectors), with its model card."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from wrn_cluster.data import eval_resize
from wrn_cluster.models import count_params, measure_gmacs
from wrn_cluster.models.serving import ServingClassifier, ServingDetector
from wrn_cluster.spec import ClassifyJob
from wrn_cluster.tracking.context import params

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from torch import nn

MODEL_NAME = "model"


def log_classifier(
    client: MlflowClient,
    run_id: str,
    spec: ClassifyJob,
    net: nn.Module,
    class_names: list[str],
    image_size: int,
) -> tuple[str, dict[str, Any]]:
    """Log the model in torch.export format, loadable without this package; returns its
    URI and the facts its registered version is tagged with."""
    import mlflow
    from mlflow.models import infer_signature

    mean, std = spec.data.mean_std()
    net = copy.deepcopy(net).float().cpu().eval()  # training's copy stays as it is
    serving = ServingClassifier(net, mean, std).eval()
    example = torch.rand(2, 3, image_size, image_size)
    with torch.no_grad():
        output = serving(example).numpy()
    preprocessing = {
        "input_size": image_size,
        "resize": eval_resize(spec),
        "mean": list(mean),
        "std": list(std),
        "input": "RGB float32 NCHW in [0, 1], resized then centre-cropped",
    }
    gmacs = measure_gmacs(net, image_size)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            serving,
            name=MODEL_NAME,
            signature=infer_signature(example.numpy().astype(np.float32), output),
            input_example=example.numpy().astype(np.float32),
            serialization_format="pt2",
            metadata={"class_names": class_names, "preprocessing": preprocessing},
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "mlflow"],
        )
    client.log_dict(run_id, {"classes": class_names, **preprocessing}, "model_card.json")
    facts = {"params": count_params(net), "gmacs": round(gmacs, 4)}
    client.log_batch(run_id, params=params({f"model.{k}": v for k, v in facts.items()}))
    return info.model_uri, facts


def log_detector(
    client: MlflowClient,
    run_id: str,
    net: nn.Module,
    categories: list[dict],
    options: dict[str, Any],
) -> tuple[str, dict[str, Any]]:
    """Log a detector as TorchScript (torch.export cannot trace torchvision's detectors:
    their NMS output sizes depend on the data); returns what log_classifier returns.

    TorchScript stores the code with the weights, so loading it needs torch and torchvision
    (imported first: it registers the nms/roi_align ops) but not this project, and runs no
    Python pickle. MLflow files it under serialization_format "pickle", its name for
    "not pt2"; the file itself is written by torch.jit.save."""
    import mlflow
    import torchvision

    net = copy.deepcopy(net).float().cpu().eval()  # training's copy stays as it is
    serving = ServingDetector(net, [c["id"] for c in categories]).eval()
    with warnings.catch_warnings():  # torch marks TorchScript deprecated; it still works
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(serving)
    card = {
        "task": "detect",
        "categories": categories,
        "input": "list of RGB float32 [3, H, W] tensors in [0, 1], any size; resized inside "
        f"to a shorter side of {options['min_size']} (longer side at most "
        f"{options['max_size']})",
        "output": "per image: boxes [N, 4] x1, y1, x2, y2 in input pixels, scores, labels "
        "(1..K), category_ids (COCO ids)",
        "load": "import torchvision before loading (it registers the detection ops)",
        "detector": options,
    }
    # MLflow warns that the "pickle" format runs pickle; for a ScriptModule it does not.
    with mlflow.start_run(run_id=run_id), _quiet("mlflow.pytorch"):
        info = mlflow.pytorch.log_model(
            scripted,
            name=MODEL_NAME,
            serialization_format="pickle",
            metadata=card,
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"torchvision=={torchvision.__version__.split('+')[0]}",
                "mlflow",
            ],
        )
    client.log_dict(run_id, card, "model_card.json")
    facts = {"params": count_params(net)}
    client.log_batch(run_id, params=params({f"model.{k}": v for k, v in facts.items()}))
    return info.model_uri, facts


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
