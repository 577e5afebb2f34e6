"""ImageNet WRNs on torchvision's ResNet.

Bottleneck WRN-50-k / WRN-101-k are torchvision's ResNet with ``width_per_group = 64k``, the same
modules and state-dict keys as ``wide_resnet50_2``. The basic-block WRN-18-k / WRN-34-k of the
paper's Table 7 keep the 64-wide stem and widen the four stages to 64k, 128k, 256k and 512k.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

BOTTLENECK_LAYERS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
BASIC_LAYERS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def bottleneck_wrn(depth: int, width: float, num_classes: int) -> ResNet:
    return ResNet(
        Bottleneck,
        BOTTLENECK_LAYERS[depth],
        num_classes=num_classes,
        width_per_group=int(round(64 * width)),
    )


def basic_wrn(depth: int, width: float, num_classes: int) -> ResNet:
    model = ResNet(BasicBlock, BASIC_LAYERS[depth], num_classes=num_classes)
    # torchvision's BasicBlock has no width knob, so rebuild the stages wider with its own
    # _make_layer, which adds the 1x1 projection wherever the width or stride changes.
    model.inplanes = 64
    stages = zip((64, 128, 256, 512), BASIC_LAYERS[depth], strict=True)
    for stage, (planes, blocks) in enumerate(stages):
        stride = 1 if stage == 0 else 2
        layer = model._make_layer(BasicBlock, int(round(planes * width)), blocks, stride=stride)
        setattr(model, f"layer{stage + 1}", layer)
    model.fc = nn.Linear(model.inplanes, num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model
