"""The recipe options of the training step and loop (issue 18), on real tensors: MixUp/CutMix's
soft labels, binary cross-entropy, gradient clipping, progressive resizing, flip test-time
augmentation, the EMA's closed form and its checkpoint, stop_at's rule, and each option's spec
errors. The data side (TrivialAugment, random erasing, repeats, eval_size):
tests/unit/test_recipe_data.py; end to end: tests/integration/test_recipes.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from ray.train import Checkpoint
from torch import nn

from wrn_cluster.models import build_model
from wrn_cluster.spec import ClassifyJob, SpecError, parse
from wrn_cluster.spec.classify import EmaSection
from wrn_cluster.train import checkpoint, classify, metrics
from wrn_cluster.train.ema import WeightAverage


def spec(**sections) -> ClassifyJob:
    job = {
        "kind": "classify",
        "name": "recipe-test",
        "model": {"arch": "wrn-10-1", "num_classes": 4},
        "data": {"dataset": "imagefolder", "url": "/unused", "image_size": 16, "batch_size": 8},
        "scaling": {"workers": 1},
        "precision": {"dtype": "fp32", "channels_last": False},
    }
    for section, values in sections.items():
        job[section] = {**job.get(section, {}), **values}
    return ClassifyJob.model_validate(job)


def built(job: ClassifyJob) -> classify.TrainStep:
    torch.manual_seed(0)
    return classify.step(job, build_model(job.model.arch, 4), torch.device("cpu"))


def batch(n: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    return images, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3][:n])


# ---------------------------------------------------------------------------------------------
# MixUp and CutMix: torchvision's, on the normalized batch


def test_mixup_mixes_images_and_labels_with_the_same_weight():
    mix = classify.mixing(spec(data={"augmentation": {"mixup": 0.2}}), 4)
    images, labels = torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    torch.manual_seed(3)
    mixed, soft = mix(images, labels)
    assert torch.allclose(soft.sum(1), torch.ones(8))
    lam = soft[0, 0].item()  # sample 0 (class 0) is mixed with the batch rolled by one (class 3)
    assert soft[0, 3].item() == pytest.approx(1 - lam)
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)


def test_cutmix_labels_weigh_each_image_by_the_area_it_keeps():
    mix = classify.mixing(spec(data={"augmentation": {"cutmix": 1.0}}), 4)
    images = torch.zeros(8, 3, 16, 16) + torch.arange(8.0).view(8, 1, 1, 1)  # one value each
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    for seed in range(5):
        torch.manual_seed(seed)
        mixed, soft = mix(images, labels)
        assert torch.allclose(soft.sum(1), torch.ones(8))
        pasted = (mixed[1] == images[0]).float().mean().item()  # image 1 holds image 0's box
        assert soft[1, 0].item() == pytest.approx(pasted, abs=1e-6)
        assert soft[1, 1].item() == pytest.approx(1 - pasted, abs=1e-6)


def test_with_both_on_each_batch_gets_one_of_them_at_the_switch_probability():
    job = spec(data={"augmentation": {"mixup": 0.2, "cutmix": 1.0, "mix_switch": 0.25}})
    mix = classify.mixing(job, 4)
    images, labels = torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    torch.manual_seed(0)
    cut = 0
    for _ in range(400):
        mixed, soft = mix(images, labels)
        lam = soft[0, 0].item()
        blended = torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)
        cut += not blended
    assert 0.18 < cut / 400 < 0.32
    assert classify.mixing(spec(), 4) is None


def test_a_mixed_step_trains_on_soft_labels_and_counts_accuracy_on_the_true_ones():
    job = spec(data={"augmentation": {"mixup": 0.4}}, optimizer={"label_smoothing": 0.1})
    step = built(job)
    reference = copy.deepcopy(step.model)
    images, labels = batch()
    labels[5] = -1  # an unreadable image adds nothing
    torch.manual_seed(4)
    loss, totals = step(images, labels)
    torch.manual_seed(4)
    mixed, soft = step.mix(step.to_input(images), labels.clamp(min=0))
    logits = reference(mixed)
    per_sample = F.cross_entropy(logits, soft, reduction="none", label_smoothing=0.1)
    valid = labels >= 0
    # Image 6 is mixed with image 5's blank (torchvision pairs each with the one before it).
    used = valid & valid.roll(1, 0)
    assert used.tolist() == [True] * 5 + [False, False, True]
    assert loss.item() == pytest.approx(per_sample[used].mean().item(), rel=1e-5)
    assert totals[1].item() == ((logits.argmax(1) == labels) & valid).sum().item()
    assert totals[2:].tolist() == [7.0, 1.0]


def test_binary_cross_entropy_sums_one_sigmoid_per_class_against_smoothed_targets():
    logits, labels = torch.randn(5, 4), torch.tensor([0, 3, 1, 2, 2])
    got = classify.sample_losses(logits, labels, "binary_cross_entropy", 0.1)
    targets = F.one_hot(labels, 4).float() * 0.9 + 0.1 / 4
    expected = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)).sum(1)
    assert torch.allclose(got, expected, atol=1e-6)


def test_gradient_clipping_bounds_the_update():
    job = spec(optimizer={"grad_clip_norm": 0.01, "weight_decay": 0.0, "nesterov": False})
    step = built(job)
    before = [p.detach().clone() for p in step.model.parameters()]
    step(*batch())
    moved = torch.cat(
        [(p.detach() - b).flatten() for p, b in zip(step.model.parameters(), before, strict=True)]
    )
    # First SGD step with momentum: the update is lr x the (clipped) gradient.
    assert moved.norm().item() == pytest.approx(job.optimizer.lr * 0.01, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# Resolution: progressive resizing, eval size, flip test-time augmentation


def test_progressive_resizing_plans_each_epochs_size_and_the_step_trains_at_it():
    job = spec(
        data={
            "image_size": 64,
            "progressive": {"start": 32, "end": 64, "from_epoch": 1, "to_epoch": 5, "multiple": 8},
        },
        schedule={"epochs": 7, "type": "cosine"},
    )
    assert [job.train_size(e) for e in range(7)] == [32, 32, 40, 48, 56, 64, 64]
    # FFCV's 40-epoch ramp: 160 until epoch 29, 192 from 34, the nearest multiple of 32 between.
    ffcv = spec(
        data={
            "image_size": 192,
            "progressive": {"start": 160, "end": 192, "from_epoch": 29, "to_epoch": 34},
        },
        schedule={"epochs": 40, "type": "cosine"},
    )
    assert [ffcv.train_size(e) for e in range(28, 40)] == [160] * 4 + [192] * 8
    # Without to_epoch the size reaches its end at the last epoch.
    default = spec(
        data={"image_size": 64, "progressive": {"start": 32, "end": 64, "multiple": 8}},
        schedule={"epochs": 5, "type": "cosine"},
    )
    assert [default.train_size(e) for e in range(5)] == [32, 40, 48, 56, 64]
    # A resume in epoch 3 trains at epoch 3's size: the size is a function of the epoch only.
    assert job.train_size(3) == 48
    step = built(job)
    seen = []
    step.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-1]))
    step.size = job.train_size(2)
    step(*batch(size=64))
    assert seen == [40]


def test_flip_tta_evaluates_the_mean_of_an_image_and_its_mirror():
    job = spec(data={"eval_flip": True})
    step = built(job)
    images, labels = batch()
    loader = [(images, labels)]
    got = classify.evaluate(step.model, loader, step, None, rank=0, world=1)
    net = step.model.eval()
    with torch.no_grad():
        x = step.to_input(images)
        logits = (net(x) + net(x.flip(-1))) / 2
    assert got["val_loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert got["val_top1"] == (logits.argmax(1) == labels).float().mean().item()


# ---------------------------------------------------------------------------------------------
# EMA of the weights


def test_the_average_after_n_updates_is_the_closed_form_of_the_weight_sequence():
    net = nn.Linear(3, 2)
    weights = [torch.full_like(net.weight, float(k)) for k in range(1, 8)]
    ema = WeightAverage(net, EmaSection(decay=0.8, every_steps=1))
    for step, w in enumerate(weights, start=1):
        net.weight.data.copy_(w)
        ema.after_step(step, net)
    d, n = 0.8, len(weights)
    expected = weights[0] * d ** (n - 1)
    for k in range(2, n + 1):
        expected = expected + (1 - d) * d ** (n - k) * weights[k - 1]
    assert torch.allclose(ema.network.weight, expected, atol=1e-6)
    assert ema.updates == n


def test_the_average_updates_every_n_steps_and_copies_the_weights_during_warm_up():
    net = nn.Linear(3, 2)
    ema = WeightAverage(net, EmaSection(decay=0.5, every_steps=2, warmup_steps=4))
    for step in range(1, 7):
        net.weight.data.fill_(float(step))
        ema.after_step(step, net)
        if step == 4:  # updates at 2 and 4, both in the warm-up: a copy of step 4's weights
            assert torch.allclose(ema.network.weight, torch.full_like(net.weight, 4.0))
    assert torch.allclose(ema.network.weight, torch.full_like(net.weight, 0.5 * 4 + 0.5 * 6))


def _training(seed: int, ema: bool) -> checkpoint.Training:
    torch.manual_seed(seed)
    net = build_model("wrn-10-1", 4)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    average = WeightAverage(net, EmaSection(decay=0.5)) if ema else None
    return checkpoint.Training(net, optimizer, scheduler, torch.amp.GradScaler("cpu"), average)


def _saved(tmp_path, state: dict) -> Checkpoint:
    folder = tmp_path / "checkpoint_2026-01-01_00-00-01.000000"
    folder.mkdir()
    checkpoint.save(folder, state)
    return Checkpoint(str(folder))


def _state(training: checkpoint.Training) -> dict:
    return checkpoint.training_state(
        training,
        arch="wrn-10-1",
        num_classes=4,
        epoch=0,
        seed=0,
        rng=[checkpoint.rng_state()],
        resumed=checkpoint.Resumed(),
        metrics={"epoch": 1, "elapsed_s": 30.0, "device_hours": 0.25},
        extra={},
    )


def test_the_average_is_checkpointed_and_restored_with_its_update_count(tmp_path):
    trained = _training(1, ema=True)
    for step in range(1, 4):
        for p in trained.model.parameters():
            p.data.add_(0.1 * step)
        trained.ema.after_step(step, trained.model)
    fresh = _training(2, ema=True)
    resumed = checkpoint.restore(_saved(tmp_path, _state(trained)), fresh, "wrn-10-1", 4, 0)
    assert fresh.ema.updates == trained.ema.updates == 3
    for name, value in trained.ema.state_dict().items():
        assert torch.equal(fresh.ema.state_dict()[name], value), name
    assert (resumed.elapsed_s, resumed.device_hours) == (30.0, 0.25)  # carried over attempts


def test_a_checkpoint_from_before_ema_resumes_with_the_average_starting_at_its_weights(tmp_path):
    old = _state(_training(1, ema=False))
    assert "ema" not in old
    fresh = _training(2, ema=True)
    checkpoint.restore(_saved(tmp_path, old), fresh, "wrn-10-1", 4, 0)
    for name, value in old["model"].items():
        assert torch.equal(fresh.ema.state_dict()[name], value), name


# ---------------------------------------------------------------------------------------------
# stop_at and the shipped weights


def test_stop_at_is_reached_at_or_above_the_value_and_a_loss_at_or_below():
    top1 = metrics.Target({"val_top1": 0.9}, ("time_to_val_top1_0.9", "d"))
    assert not top1.reached({"val_top1": 0.89}) and top1.reached({"val_top1": 0.9})
    assert not top1.reached({"step": 10})  # a step checkpoint's report holds no score
    loss = metrics.Target({"val_loss": 0.5}, ("t", "d"))
    assert loss.reached({"val_loss": 0.5}) and not loss.reached({"val_loss": 0.51})
    assert not metrics.Target(None, None).reached({"val_top1": 1.0})
    assert top1.record(61.0, 0.034) == {"time_to_val_top1_0.9": 61.0, "d": 0.034}
    assert spec(schedule={"stop_at": {"val_top1": 0.785}}).schedule.target_keys() == (
        "time_to_val_top1_0.785",
        "device_hours_to_val_top1_0.785",
    )


def test_the_better_of_the_raw_and_averaged_weights_is_shipped():
    job = spec(ema={"decay": 0.999})
    assert job.ships_average({"val_top1": 0.7, "val_top1_ema": 0.72})
    assert not job.ships_average({"val_top1": 0.72, "val_top1_ema": 0.72})
    assert not job.ships_average({"val_top1": 0.7})
    by_loss = spec(ema={"decay": 0.999}, tracking={"promotion_metric": "val_loss"})
    assert by_loss.ships_average({"val_loss": 0.5, "val_loss_ema": 0.4})
    by_average = spec(ema={"decay": 0.999}, tracking={"promotion_metric": "val_top1_ema"})
    assert by_average.ships_average({"val_top1": 0.9, "val_top1_ema": 0.8})
    # The average's loss is a loss too: lower is better, for stop_at as for promotion.
    assert metrics.Target({"val_loss_ema": 0.5}, ("t", "d")).reached({"val_loss_ema": 0.4})
    assert not metrics.Target({"val_loss_ema": 0.5}, ("t", "d")).reached({"val_loss_ema": 3.2})


# ---------------------------------------------------------------------------------------------
# Bad input: one message naming the field and the fix

GOOD = """\
kind: classify
name: recipe
model: {arch: wrn-18-1}
data: {dataset: imagefolder, url: /data, image_size: 64, batch_size: 8}
scaling: {workers: 1}
schedule: {epochs: 10, type: cosine}
"""


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "schedule: {epochs: 10, type: cosine, stop_at: {val_top9: 0.5}}",
            "recipe.yaml:6: schedule.stop_at: 'val_top9' is not a metric this job evaluates; use "
            "one of val_top1, val_top5, val_loss",
        ),
        (
            "schedule: {epochs: 10, type: cosine, stop_at: {val_top1: 0.5, val_top5: 0.9}}",
            "give one metric and its value",
        ),
        (
            "tracking: {max_device_hours: 4}",
            "tracking.max_device_hours: a budget to reach a target needs the target",
        ),
        (
            "data: {dataset: imagefolder, url: /data, image_size: 64, batch_size: 8, "
            "progressive: {start: 32, end: 96}}",
            "data.progressive.end: 96px is larger than the 64px the loader gives; set "
            "data.image_size to at least 96",
        ),
        (
            "data: {dataset: imagefolder, url: /data, image_size: 64, batch_size: 8, "
            "progressive: {start: 64, end: 32}}",
            "data.progressive.end: 32 is below start 64; sizes only grow",
        ),
        (
            "data: {dataset: imagefolder, format: shards, url: /data, image_size: 64, "
            "batch_size: 8, augmentation: {repeats: 4}}",
            "data.augmentation.repeats: repeated augmentation needs the files reader",
        ),
        (
            "data: {dataset: imagefolder, url: /data, image_size: 64, batch_size: 8, "
            "augmentation: {policy: auto_augment}}",
            "data.augmentation.policy",
        ),
        ("ema: {decay: 1.5}", "ema.decay"),
        (
            "schedule: {epochs: 10, type: cosine, stop_at: {val_top1: 78.5}}",
            "schedule.stop_at: val_top1 is a fraction from 0 to 1; 78.5 reads as a percentage, "
            "write 0.785",
        ),
        (
            "data: {dataset: imagefolder, url: /data, image_size: 64, batch_size: 8, "
            "progressive: {start: 32, end: 64, from_epoch: 9}}",
            "data.progressive.from_epoch: epoch 9 leaves no later epoch to grow into",
        ),
        (
            "data: {dataset: cifar10, url: /data, batch_size: 8, eval_size: 40}",
            "data.eval_size: cifar10 images are 32x32 and evaluated as they are; got 40",
        ),
    ],
)
def test_a_bad_recipe_option_is_one_message_naming_the_field(extra, expected):
    text = GOOD
    key = extra.split(":")[0]
    text = "\n".join(line for line in text.splitlines() if not line.startswith(key + ":"))
    with pytest.raises(SpecError) as caught:
        parse(text + "\n" + extra + "\n", "recipe.yaml")
    (problem,) = caught.value.problems
    assert expected in str(problem), str(problem)
