"""Faster R-CNN with an FPN over a WRN backbone, built from torchvision's detection modules.

What is WRN-specific is small: the backbone is our ImageNet WRN (a torchvision ``ResNet``), whose
stage widths are 64k..512k for the basic-block WRN-18/34-k and 4x that for WRN-50/101-k, so the
FPN's input channels are read from the network rather than assumed (torchvision's
``_resnet_fpn_extractor`` derives them from ResNet-50's ratios, wrong for widths like 0.3).
Freezing follows torchvision's ``trainable_layers`` and ``FrozenBatchNorm2d`` conventions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops.misc import FrozenBatchNorm2d

from wrn_cluster.models.registry import build_model
from wrn_cluster.spec.names import UnknownModelError, parse_name

STAGES = ("layer1", "layer2", "layer3", "layer4")
# torchvision's order for trainable_layers: the top stage first, the stem last.
TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")
ASPECT_RATIOS = (0.5, 1.0, 2.0)
# The FPN pools its top level once more (P6), so a 5th anchor size; RoIs pool 7x7 from P2..P5.
ROI_SIZE = 7


def stage_channels(backbone: nn.Module) -> list[int]:
    """Output channels of layer1..layer4: the last convolution of each stage's last block."""
    channels = []
    for stage in STAGES:
        convs = [m for m in getattr(backbone, stage)[-1].modules() if isinstance(m, nn.Conv2d)]
        channels.append(convs[-1].out_channels)
    return channels


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d with a FrozenBatchNorm2d holding the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def wrn_fpn_backbone(
    arch: str,
    trainable_layers: int = 5,
    frozen_bn: bool = False,
    fpn_channels: int = 256,
    weights: dict[str, torch.Tensor] | None = None,
) -> BackboneWithFPN:
    """An ImageNet WRN with an FPN on layer1..layer4 (P2..P5, plus P6 by max-pooling).

    ``weights`` is a classifier state dict of the same arch (its fc is ignored);
    ``trainable_layers`` counts stages from the top, as torchvision's does (5: all of them).
    """
    info = parse_name(arch)
    if info.family == "cifar":
        raise UnknownModelError(
            f"{arch} is a CIFAR/SVHN network; detection backbones are wrn-18/34-K and wrn-50/101-K"
        )
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers is 0..5, got {trainable_layers}")
    backbone = build_model(arch, num_classes=1000)
    if weights is not None:
        # The classifier's head is not part of the backbone; everything else must fit exactly.
        missing, unexpected = backbone.load_state_dict(
            {k: v for k, v in weights.items() if not k.startswith("fc.")}, strict=False
        )
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(
                f"the backbone weights do not fit {arch}: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}; use a checkpoint of a {arch} classifier"
            )
    if frozen_bn:
        freeze_batchnorm(backbone)
    trained = list(TRAINABLE_ORDER[:trainable_layers]) + (["bn1"] if trainable_layers == 5 else [])
    for name, parameter in backbone.named_parameters():
        if not name.startswith(tuple(trained)):
            parameter.requires_grad_(False)
    return BackboneWithFPN(
        backbone,
        return_layers={stage: str(i) for i, stage in enumerate(STAGES)},
        in_channels_list=stage_channels(backbone),
        out_channels=fpn_channels,
    )


def build(
    arch: str,
    num_classes: int,
    *,
    trainable_layers: int = 5,
    frozen_bn: bool = False,
    backbone_weights: dict[str, torch.Tensor] | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    box_head_size: int = 1024,
    anchor_sizes: tuple[int, ...] | list[int] = (32, 64, 128, 256, 512),
    rpn_train_proposals: int = 2000,
    rpn_test_proposals: int = 1000,
    box_samples_per_image: int = 512,
    detections_per_image: int = 100,
    score_threshold: float = 0.05,
) -> FasterRCNN:
    """torchvision's FasterRCNN over ``wrn_fpn_backbone``; ``num_classes`` counts background.

    The model takes a list of float RGB images in [0, 1] of any size, resizes and normalizes
    them itself (ImageNet mean/std), and returns boxes in the input images' pixels.
    """
    backbone = wrn_fpn_backbone(
        arch, trainable_layers, frozen_bn, fpn_channels, weights=backbone_weights
    )
    anchors = AnchorGenerator(
        sizes=tuple((size,) for size in anchor_sizes),
        aspect_ratios=(ASPECT_RATIOS,) * len(anchor_sizes),
    )
    return FasterRCNN(
        backbone,
        num_classes=None,  # the predictor below says it
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=rpn_train_proposals,
        rpn_post_nms_top_n_train=rpn_train_proposals,
        rpn_pre_nms_top_n_test=rpn_test_proposals,
        rpn_post_nms_top_n_test=rpn_test_proposals,
        box_head=TwoMLPHead(fpn_channels * ROI_SIZE**2, box_head_size),
        box_predictor=FastRCNNPredictor(box_head_size, num_classes),
        box_batch_size_per_image=box_samples_per_image,
        box_detections_per_img=detections_per_image,
        box_score_thresh=score_threshold,
    )


def options(spec: Any) -> dict[str, Any]:
    """``build``'s keyword arguments from a DetectJob (backbone weights aside), as plain values
    that a checkpoint can hold and ``build(**options)`` can rebuild from."""
    detector = spec.detector
    return {
        "arch": spec.model.arch,
        "trainable_layers": spec.model.layers_trained,
        "frozen_bn": spec.model.batchnorm_frozen,
        "min_size": spec.data.min_size,
        "max_size": spec.data.max_size,
        "fpn_channels": detector.fpn_channels,
        "box_head_size": detector.box_head_size,
        "anchor_sizes": list(detector.anchor_sizes),
        "rpn_train_proposals": detector.rpn_train_proposals,
        "rpn_test_proposals": detector.rpn_test_proposals,
        "box_samples_per_image": detector.box_samples_per_image,
        "detections_per_image": detector.detections_per_image,
        "score_threshold": detector.score_threshold,
    }


def from_checkpoint(state: dict[str, Any]) -> FasterRCNN:
    """The trained detector of a detection checkpoint (``train.checkpoint.load``), in eval mode."""
    model = build(num_classes=state["num_classes"], **state["detector"])
    model.load_state_dict(state["model"])
    return model.eval()
