"""Pulling and predicting, for users of the registry: a registered model's files copied out,
or images run through it as its own metadata says."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wrn_cluster.tracking.server import bind_fluent, client_for, tracking_uri

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion


def resolve_version(model_uri: str) -> ModelVersion | None:
    """The registry version behind models:/NAME@alias or models:/NAME/VERSION, else None."""
    if not model_uri.startswith("models:/"):
        return None
    client = client_for(tracking_uri())
    ref = model_uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, version = ref.split("/", 1)
    return client.get_model_version(name, version)


def pull(model_uri: str, dst: str | Path) -> dict[str, Any]:
    """The model's files copied into ``dst`` (new or empty), and what the registry says of it."""
    import mlflow

    bind_fluent(tracking_uri())
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty; choose another --dst or empty it")
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=scratch)
        for item in Path(local).iterdir():
            shutil.move(str(item), dst / item.name)
    version = resolve_version(model_uri)
    info = {"model_uri": model_uri, "path": str(dst)}
    if version is not None:
        info.update(
            name=version.name,
            version=version.version,
            run_id=version.run_id,
            source=version.source,
            aliases=list(version.aliases),
            tags=dict(version.tags),
        )
    return info


def predict(
    model_uri: str, images: list[Path], top: int = 5, min_score: float = 0.5
) -> list[list[tuple]]:
    """Per image, a classifier's top classes as (class, probability), or a detector's boxes
    scoring at least ``min_score`` (at most ``top``) as (category, score, [x1, y1, x2, y2]);
    preprocessed as the model's own metadata says."""
    import mlflow
    import torch
    from PIL import Image

    # Imported before loading: torchvision registers the ops scripted detectors call.
    from torchvision.transforms.v2 import functional as F

    bind_fluent(tracking_uri())
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    meta = mlflow.models.Model.load(local).metadata or {}
    pictures = []
    for path in images:
        with Image.open(path) as image:
            pictures.append(F.pil_to_tensor(image.convert("RGB")))
    if meta.get("task") == "detect":
        names = {c["id"]: c["name"] for c in meta["categories"]}
        # TorchScript's deprecation notices and torchvision's "always returns a tuple" note.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            model = mlflow.pytorch.load_model(local)
            found = model([picture.float() / 255 for picture in pictures])
        return [
            [
                (names[int(category)], float(score), [round(v, 1) for v in box.tolist()])
                for box, score, category in zip(
                    f["boxes"], f["scores"], f["category_ids"], strict=True
                )
                if score >= min_score
            ][:top]
            for f in found
        ]
    model = mlflow.pytorch.load_model(local)
    prep, classes = meta["preprocessing"], meta["class_names"]
    batch = []
    for tensor in pictures:
        tensor = F.resize(tensor, prep["resize"], antialias=True)
        tensor = F.center_crop(tensor, prep["input_size"])
        batch.append(tensor.float() / 255)
    with torch.no_grad():
        probs = model(torch.stack(batch)).softmax(dim=1)
    values, indices = probs.topk(min(top, probs.shape[1]), dim=1)
    return [
        [(classes[i], float(p)) for p, i in zip(row_p, row_i, strict=True)]
        for row_p, row_i in zip(values.tolist(), indices.tolist(), strict=True)
    ]
