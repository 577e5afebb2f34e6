"""The training step the loop runs and `bench train-step` times: what it computes, on the CPU."""

import copy

import pytest
import torch
import torch.nn.functional as F

from wrn_cluster.models import build_model
from wrn_cluster.spec import ClassifyJob
from wrn_cluster.train import classify, optim, precision


def spec(**sections) -> ClassifyJob:
    job = {
        "kind": "classify",
        "name": "step-test",
        "model": {"arch": "wrn-10-1", "num_classes": 4},
        "data": {"dataset": "imagefolder", "url": "/unused", "image_size": 16, "batch_size": 8},
        "scaling": {"workers": 1},
        "precision": {"dtype": "fp32", "channels_last": False},
        **sections,
    }
    return ClassifyJob.model_validate(job)


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 4, (n,), generator=generator)


def built(job: ClassifyJob) -> classify.TrainStep:
    torch.manual_seed(0)
    model = build_model(job.model.arch, 4)
    model = model.to(memory_format=classify.memory_format(job, torch.device("cpu")))
    return classify.step(job, model, torch.device("cpu"))


def test_input_is_the_batch_normalized_with_the_datasets_mean_and_std():
    step = built(spec())
    images, _ = batch()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in spec().data.mean_std())
    expected = (images.float() / 255 - mean) / std
    assert torch.allclose(step.to_input(images), expected, atol=1e-5)


def test_one_step_is_cross_entropy_backward_and_an_sgd_update():
    job = spec()
    step = built(job)
    reference = copy.deepcopy(step.model)
    images, labels = batch()
    loss, totals = step(images, labels)

    logits = reference(step.to_input(images))
    expected = F.cross_entropy(logits, labels)
    assert torch.allclose(loss, expected.detach(), atol=1e-5)
    assert totals[0].item() == pytest.approx(expected.item() * 8, rel=1e-5)
    assert totals[1].item() == (logits.argmax(1) == labels).sum().item()
    assert totals[2:].tolist() == [8.0, 0.0]
    pairs = zip(step.model.parameters(), reference.parameters(), strict=True)
    assert all(not torch.equal(a, b) for a, b in pairs)


def test_unreadable_images_are_skipped_counted_and_a_batch_of_only_them_changes_nothing():
    step = built(spec())
    images, labels = batch()
    labels[:3] = -1
    loss, totals = step(images, labels)
    assert totals[2:].tolist() == [5.0, 3.0]
    assert torch.isfinite(loss)

    before = copy.deepcopy(step.model.state_dict())
    loss, totals = step(images, torch.full_like(labels, -1))
    assert loss.item() == 0.0 and totals.tolist() == [0.0, 0.0, 0.0, 8.0]
    after = step.model.state_dict()
    # No gradient: weight decay and momentum still move weights, but nothing becomes NaN.
    assert all(torch.isfinite(after[k].float()).all() for k in before)


def test_two_micro_batches_step_once_on_their_mean_gradient():
    job = spec(optimizer={"grad_accum_steps": 2})
    step = built(job)
    reference = copy.deepcopy(step.model)
    optimizer = optim.build_optimizer(reference, job, job.data.batch_size)
    images, labels = batch(8)
    for half in (slice(0, 4), slice(4, 8)):
        loss = F.cross_entropy(reference(step.to_input(images[half])), labels[half])
        (loss / 2).backward()
    optimizer.step()

    first = [p.detach().clone() for p in step.model.parameters()]
    step(images[:4], labels[:4], last_micro=False)
    assert all(torch.equal(a, b) for a, b in zip(first, step.model.parameters(), strict=True))
    step(images[4:], labels[4:], last_micro=True)
    for a, b in zip(step.model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_bf16_channels_last_step_trains_and_stays_finite():
    job = spec(precision={"dtype": "bf16", "channels_last": True})
    step = built(job)
    images, labels = batch()
    losses = [step(images, labels)[0].item() for _ in range(8)]
    assert step.dtype == "bf16" and step.layout == torch.channels_last
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_the_default_layout_is_channels_last_only_where_it_measured_faster():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    native = precision.cpu_supports_bf16()
    assert precision.layout("auto", "bf16", cuda)[0] and precision.layout("auto", "fp16", cuda)[0]
    assert precision.layout("auto", "fp32", cpu)[0] is False  # 0.91x on an AVX2 CPU
    assert precision.layout("auto", "bf16", cpu)[0] is native
    assert precision.layout(True, "fp32", cpu) == (True, "set in the spec")
    assert precision.layout(False, "bf16", cuda) == (False, "set in the spec")
    # The step the loop builds from the spec's defaults follows the rule on this CPU.
    step = built(spec(precision={}))
    assert step.dtype == ("bf16" if native else "fp32")
    assert step.layout == (torch.channels_last if native else torch.contiguous_format)
