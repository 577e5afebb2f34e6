"""Dataset facts, in one place: what each dataset holds before a byte of it is read.

The spec validates image sizes and picks the normalization from these; ``wrn_cluster.data``
reads class counts, image counts and the COCO layout from here too.
"""

from __future__ import annotations

from dataclasses import dataclass

# What a COCO evaluation reports (pycocotools' summary, in its order).
COCO_AP_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

MeanStd = tuple[tuple[float, float, float], tuple[float, float, float]]

IMAGENET_MEAN_STD: MeanStd = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR_MEAN_STD: MeanStd = (
    (125.3 / 255, 123.0 / 255, 113.9 / 255),
    (63.0 / 255, 62.1 / 255, 66.7 / 255),
)
# The paper feeds SVHN as pixels / 255, without mean/std.
UNNORMALIZED: MeanStd = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@dataclass(frozen=True)
class DatasetFacts:
    """None where the data decides: imagefolder takes its classes and sizes from the files."""

    num_classes: int | None
    image_size: int | None
    mean_std: MeanStd
    train_images: int | None  # SVHN without its extra set; for plans made before loading


DATASET_FACTS: dict[str, DatasetFacts] = {
    "cifar10": DatasetFacts(10, 32, CIFAR_MEAN_STD, 50_000),
    "cifar100": DatasetFacts(100, 32, CIFAR_MEAN_STD, 50_000),
    "svhn": DatasetFacts(10, 32, UNNORMALIZED, 73_257),
    "imagefolder": DatasetFacts(None, None, IMAGENET_MEAN_STD, None),
}

# COCO 2017's layout under its root: train and val annotations, then train and val images.
COCO_LAYOUT = (
    "annotations/instances_train2017.json",
    "annotations/instances_val2017.json",
    "train2017",
    "val2017",
)
