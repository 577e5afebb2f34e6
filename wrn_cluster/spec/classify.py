"""``kind: classify``: train a WRN on CIFAR-10/100, SVHN or ImageNet-style folders."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from wrn_cluster.spec.datasets import DATASET_FACTS
from wrn_cluster.spec.names import parse_name
from wrn_cluster.spec.sections import (
    DataSection,
    FieldError,
    JobBase,
    ModelSection,
    OptimizerSection,
    ScheduleSection,
    Section,
    ShardedData,
    TrackingSection,
)


class AugmentationSection(Section):
    """Recipe augmentations on top of the reader's view (crop and flip), each off by default as
    in the paper. Sources: torchvision's V2 ImageNet recipe (pytorch.org, "How to train
    state-of-the-art models using torchvision's latest primitives"), timm's train.py."""

    policy: Literal["none", "trivial_augment", "rand_augment"] = Field(
        "none",
        description="A per-image policy after the crop: TrivialAugmentWide or RandAugment "
        "(torchvision.transforms.v2), drawn from the image's own (seed, epoch, index) generator.",
    )
    random_erasing: float = Field(
        0.0, ge=0.0, le=1.0, description="Probability of torchvision's RandomErasing per image."
    )
    mixup: float = Field(
        0.0, ge=0.0, description="MixUp's Beta(alpha, alpha) on the batch; 0 turns it off."
    )
    cutmix: float = Field(
        0.0, ge=0.0, description="CutMix's Beta(alpha, alpha) on the batch; 0 turns it off."
    )
    mix_switch: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="With both mixup and cutmix on, the probability that a batch gets CutMix.",
    )
    repeats: int = Field(
        1,
        ge=1,
        description="Repeated augmentation: each chosen image appears this many times in an "
        "epoch, each copy augmented differently, an epoch keeping its length (files reader).",
    )

    @property
    def mixes(self) -> bool:
        return bool(self.mixup or self.cutmix)


class ProgressiveResizing(Section):
    """Train at a size growing from ``start`` to ``end`` px, linearly over epochs
    ``from_epoch``..``to_epoch``, rounded to the nearest ``multiple`` (FFCV's ResNet-50
    schedule: 160 to 192 over epochs 29-34 of 40). The batch is resized on the device, as
    MosaicML Composer's ProgressiveResizing does."""

    start: int = Field(..., ge=8)
    end: int = Field(..., ge=8)
    from_epoch: int = Field(0, ge=0, description="Epoch (0-based) the size starts growing.")
    to_epoch: int | None = Field(
        None, ge=1, description="Epoch (0-based) the size reaches ``end``; the last if unset."
    )
    multiple: int = Field(32, ge=1, description="Sizes are rounded to the nearest multiple.")


class EmaSection(Section):
    """An exponential moving average of the weights (torch.optim.swa_utils.AveragedModel),
    evaluated each epoch beside the raw weights as val_*_ema; the better one is registered."""

    decay: float = Field(0.9999, gt=0.0, lt=1.0, description="Per update.")
    every_steps: int = Field(1, ge=1, description="Update every N optimizer steps.")
    warmup_steps: int = Field(
        0, ge=0, description="Until this optimizer step the average copies the weights."
    )


class ClassifyOptimizer(OptimizerSection):
    loss: Literal["cross_entropy", "binary_cross_entropy"] = Field(
        "cross_entropy",
        description="binary_cross_entropy: one sigmoid per class against the (mixed, smoothed) "
        "targets, summed over classes (MosaicML Composer's ResNet recipes).",
    )
    grad_clip_norm: float | None = Field(
        None, gt=0.0, description="Clip the gradients' global L2 norm to this before a step."
    )


class ClassifyData(DataSection, ShardedData):
    augmentation: AugmentationSection = Field(default_factory=AugmentationSection)
    eval_size: int | None = Field(
        None,
        ge=8,
        description="Evaluation crop apart from the training size (FixRes: train 176, "
        "evaluate 224); the training size if unset.",
    )
    progressive: ProgressiveResizing | None = Field(
        None, description="Progressive resizing of the training batch by epoch."
    )
    eval_flip: bool = Field(
        False,
        description="Test-time augmentation: evaluate the mean of an image's and its "
        "mirror's predictions.",
    )


class ClassifyJob(
    JobBase[ModelSection, ClassifyData, ClassifyOptimizer, ScheduleSection, TrackingSection]
):
    model: ModelSection = Field(default_factory=ModelSection)
    optimizer: ClassifyOptimizer = Field(default_factory=ClassifyOptimizer)
    ema: EmaSection | None = Field(
        None, description="Keep an exponential moving average of the weights; off if unset."
    )
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    kind: Literal["classify"]
    data: ClassifyData

    @property
    def uneven_shares(self) -> bool:
        return self.data.format == "files"  # Streaming gives every rank the same batch size

    @model_validator(mode="after")
    def _data_fits_model(self) -> ClassifyJob:
        info = parse_name(self.model.arch)
        fixed = DATASET_FACTS[self.data.dataset].image_size
        if fixed and self.data.image_size not in (None, fixed):
            raise FieldError(
                "data.image_size",
                f"{self.data.dataset} images are {fixed}x{fixed}; got {self.data.image_size}, "
                f"set it to {fixed} or leave it out",
            )
        size = self.image_size
        if size < info.total_stride:
            raise FieldError(
                "data.image_size",
                f"{size}px is smaller than {self.model.arch}'s total stride "
                f"({info.total_stride}); use at least {info.total_stride}",
            )
        if info.family != "cifar" and self.model.dropout:
            raise FieldError(
                "model.dropout",
                f"dropout is defined for the CIFAR/SVHN family only, not {self.model.arch}; "
                "set it to 0",
            )
        if self.data.format == "shards" and self.data.synthesize:
            raise FieldError(
                "data.synthesize",
                "synthetic data is written as files; remove it, or pack the files first",
            )
        if self.data.synthesize and self.data.dataset != "imagefolder":
            raise FieldError(
                "data.synthesize", "synthetic data is written as an imagefolder; remove it"
            )
        if fixed and self.data.eval_size not in (None, fixed):
            raise FieldError(
                "data.eval_size",
                f"{self.data.dataset} images are {fixed}x{fixed} and evaluated as they are; "
                f"got {self.data.eval_size}, set it to {fixed} or leave it out",
            )
        if self.data.augmentation.repeats > 1 and self.data.format == "shards":
            raise FieldError(
                "data.augmentation.repeats",
                "repeated augmentation needs the files reader (the shards' order is "
                "Streaming's); set it to 1, or data.format to files",
            )
        progressive = self.data.progressive
        if progressive:
            if progressive.start > progressive.end:
                raise FieldError(
                    "data.progressive.end",
                    f"{progressive.end} is below start {progressive.start}; sizes only grow",
                )
            if progressive.end > size:
                raise FieldError(
                    "data.progressive.end",
                    f"{progressive.end}px is larger than the {size}px the loader gives; set "
                    f"data.image_size to at least {progressive.end}",
                )
            if progressive.start < info.total_stride:
                raise FieldError(
                    "data.progressive.start",
                    f"{progressive.start}px is smaller than {self.model.arch}'s total stride; "
                    f"use at least {info.total_stride}",
                )
            if progressive.from_epoch >= self.schedule.epochs - 1:
                raise FieldError(
                    "data.progressive.from_epoch",
                    f"epoch {progressive.from_epoch} leaves no later epoch to grow into; use "
                    f"an epoch below {self.schedule.epochs - 1} (epochs count from 0)",
                )
            last = self._last_growing_epoch()
            if not progressive.from_epoch < last < self.schedule.epochs:
                raise FieldError(
                    "data.progressive.to_epoch",
                    f"the size grows from epoch {progressive.from_epoch} to {last}, which must "
                    f"be later and below schedule.epochs ({self.schedule.epochs}; epochs count "
                    "from 0)",
                )
        return self

    def recipe(self) -> list[str]:
        """The recipe options this job turns on, in a user's words; empty for the paper's."""
        data, aug, opt = self.data, self.data.augmentation, self.optimizer
        options = []
        if aug.policy != "none":
            options.append(aug.policy)
        if aug.random_erasing:
            options.append(f"random_erasing {aug.random_erasing:g}")
        if aug.mixup:
            options.append(f"mixup {aug.mixup:g}")
        if aug.cutmix:
            options.append(f"cutmix {aug.cutmix:g}")
        if aug.repeats > 1:
            options.append(f"repeats {aug.repeats}")
        if opt.label_smoothing:
            options.append(f"label_smoothing {opt.label_smoothing:g}")
        if opt.loss != "cross_entropy":
            options.append(opt.loss)
        if not opt.decay_norm_and_bias:
            options.append("no decay on norm and bias")
        if opt.grad_clip_norm:
            options.append(f"grad_clip_norm {opt.grad_clip_norm:g}")
        if self.ema:
            options.append(f"ema {self.ema.decay:g} every {self.ema.every_steps}")
        if data.progressive:
            grow = data.progressive
            options.append(f"progressive {grow.start}->{grow.end}")
        if data.eval_size and data.eval_size != self.image_size:
            options.append(f"train {self.image_size} / eval {data.eval_size}")
        if data.eval_flip:
            options.append("flip TTA")
        return options

    def evaluation_metrics(self) -> list[str]:
        plain = ["val_top1", "val_top5", "val_loss"]
        return plain + [f"{name}_ema" for name in plain] if self.ema else plain

    @property
    def eval_size(self) -> int:
        return self.data.eval_size or self.image_size

    def _last_growing_epoch(self) -> int:
        grow = self.data.progressive
        assert grow is not None
        return grow.to_epoch if grow.to_epoch is not None else self.schedule.epochs - 1

    def train_size(self, epoch: int) -> int:
        """The training batch's size in ``epoch`` (0-based): progressive resizing's, else the
        loader's. The size grows linearly from ``start`` at ``from_epoch`` to ``end`` at
        ``to_epoch`` (the last epoch if unset), rounded to the nearest ``multiple``, as FFCV's
        schedule does."""
        grow = self.data.progressive
        if grow is None:
            return self.image_size
        first, last = grow.from_epoch, self._last_growing_epoch()
        fraction = min(max((epoch - first) / (last - first), 0.0), 1.0)
        size = grow.start + (grow.end - grow.start) * fraction
        return min(max(round(size / grow.multiple) * grow.multiple, grow.start), grow.end)

    @property
    def image_size(self) -> int:
        fixed = DATASET_FACTS[self.data.dataset].image_size
        return self.data.image_size or fixed or parse_name(self.model.arch).default_image_size

    @property
    def augment(self) -> bool:
        if self.data.augment is not None:
            return self.data.augment
        return self.data.dataset != "svhn"
