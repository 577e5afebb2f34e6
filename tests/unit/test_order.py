"""The sample order of an epoch and the mid-epoch skip of a resumed run (train/order.py), with
torch's own samplers and DataLoaders: which samples each optimizer step trains on, for any
number of workers, and what a run resumed from a step checkpoint trains on next."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from wrn_cluster.train import order

SAMPLES, BATCH, SEED, EPOCH = 96, 8, 3, 2  # BATCH is the global batch (data.batch_size)


class Indices(Dataset):
    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> int:
        return index


def rank_batches(world: int, accum: int) -> list[order.ResumableBatches]:
    per_worker = BATCH // (world * accum)
    return [
        order.ResumableBatches(
            BatchSampler(
                DistributedSampler(Indices(), world, rank, shuffle=True, seed=SEED),
                per_worker,
                drop_last=False,
            )
        )
        for rank in range(world)
    ]


def steps(world: int, accum: int = 1, after_samples: int = 0) -> list[list[int]]:
    """The samples of each optimizer step that ``world`` ranks train on in EPOCH, starting
    after ``after_samples`` samples of it as a resumed run would."""
    ranks = rank_batches(world, accum)
    skip = order.micro_batches_done(after_samples, BATCH // accum)
    for batches in ranks:
        batches.set_epoch(EPOCH, skip)
    micro = list(zip(*(list(batches) for batches in ranks), strict=True))
    return [
        sorted(i for group in micro[s : s + accum] for batch in group for i in batch)
        for s in range(0, len(micro), accum)
    ]


@pytest.mark.parametrize(("world", "accum"), [(1, 1), (2, 1), (4, 1), (2, 2), (1, 4)])
def test_each_step_trains_on_the_same_samples_whatever_the_worker_count(world, accum):
    assert steps(world, accum) == steps(1)
    assert sorted(i for step in steps(world, accum) for i in step) == list(range(SAMPLES))


def test_the_order_is_a_function_of_the_seed_and_the_epoch():
    def epoch_order(epoch: int, seed: int) -> list[int]:
        batches = order.ResumableBatches(
            BatchSampler(DistributedSampler(Indices(), 1, 0, seed=seed), BATCH, drop_last=False)
        )
        batches.set_epoch(epoch)
        return [i for batch in batches for i in batch]

    assert epoch_order(EPOCH, SEED) == epoch_order(EPOCH, SEED)
    assert epoch_order(EPOCH, SEED) != epoch_order(EPOCH + 1, SEED)
    assert epoch_order(EPOCH, SEED) != epoch_order(EPOCH, SEED + 1)


@pytest.mark.parametrize(
    ("before", "after", "accum_before", "accum_after"),
    [(2, 2, 1, 1), (2, 1, 1, 1), (1, 2, 1, 1), (2, 1, 2, 1), (1, 2, 1, 2)],
)
def test_a_resumed_epoch_continues_with_the_next_sample_on_any_worker_count(
    before, after, accum_before, accum_after
):
    uninterrupted = steps(1)
    done = 5  # optimizer steps the killed run had checkpointed
    trained = steps(before, accum_before)[:done]
    samples = order.samples_done(done, BATCH)
    resumed = steps(after, accum_after, after_samples=samples)
    assert trained + resumed == uninterrupted
    counts = Counter(i for step in trained + resumed for i in step)
    assert set(counts) == set(range(SAMPLES)) and set(counts.values()) == {1}  # none twice


def test_the_skip_holds_for_every_iterator_until_the_next_epoch():
    batches = rank_batches(1, 1)[0]
    batches.set_epoch(EPOCH, skip=3)
    first, second = list(batches), list(batches)
    assert first == second and len(first) == len(batches) - 3  # len stays the whole epoch's
    batches.set_epoch(EPOCH + 1)
    assert len(list(batches)) == len(batches)


def test_a_dataloader_with_loader_processes_skips_without_reading_the_skipped_samples():
    batches = rank_batches(2, 1)[0]
    loader = DataLoader(
        Indices(),
        batch_sampler=batches,
        num_workers=2,
        persistent_workers=True,
        generator=order.loader_generator(SEED, 0),
    )
    batches.set_epoch(EPOCH)
    whole = [t.tolist() for t in loader]
    batches.set_epoch(EPOCH, skip=4)
    assert [t.tolist() for t in loader] == whole[4:]
    batches.set_epoch(EPOCH)
    assert [t.tolist() for t in loader] == whole


def test_loaders_with_their_own_generator_leave_the_global_stream_alone():
    """A checkpoint restores torch's global stream mid-epoch; a loader that drew from it when
    its epoch starts would shift dropout after a resume."""
    loader = DataLoader(Indices(), batch_size=8, generator=order.loader_generator(SEED, 1))
    before = torch.get_rng_state()
    list(loader)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_position_that_is_not_a_whole_micro_batch_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="keep data.batch_size and optimizer.grad_accum_steps"):
        order.micro_batches_done(12, 8)
    with pytest.raises(ValueError, match="cannot skip 99"):
        rank_batches(1, 1)[0].set_epoch(0, skip=99)


def test_a_step_checkpoint_and_a_resume_each_print_where_the_epoch_stands():
    from wrn_cluster.train import metrics

    report = metrics.step_metrics(1, 120, 3840, 1.23456, 0.1, 55.0)
    line = metrics.progress_line("digits", "classify", 10, report)
    assert line == "[digits] epoch 2/10 step 120: 3840 samples in  train loss 1.2346  lr 0.1"
    assert metrics.resume_line("digits", 10, 1, 3840, 120) == (
        "[digits] resumed in epoch 2/10 after 3840 samples (step 120)"
    )
    assert metrics.resume_line("digits", 10, 2, 0, 150) == (
        "[digits] resumed at the start of epoch 3/10 (step 150)"
    )


def test_a_resume_inside_an_epoch_whose_order_the_spec_changed_is_refused():
    from types import SimpleNamespace

    from wrn_cluster.train.checkpoint import CheckpointError

    def spec(seed=3, **data):
        return SimpleNamespace(seed=seed, data=SimpleNamespace(format="files", **data))

    recorded = {"seed": 3, **order.order_facts(spec(), 2)}
    order.check_resume_order(recorded, spec(), 1)  # files: any worker count continues exactly
    order.check_resume_order({"seed": 3}, spec(), 1)  # a checkpoint from before the facts
    with pytest.raises(CheckpointError, match="came from seed 3, but the spec now gives 4"):
        order.check_resume_order(recorded, spec(seed=4), 2)
    grouped = {"seed": 3, **order.order_facts(spec(grouped=True), 2)}
    with pytest.raises(CheckpointError, match="set scaling.workers back to 2 to resume"):
        order.check_resume_order(grouped, spec(grouped=True), 1)
    shards_spec = SimpleNamespace(seed=3, data=SimpleNamespace(format="shards", canonical_nodes=8))
    recorded = {"seed": 3, **order.order_facts(shards_spec, 2)}
    shards_spec.data.canonical_nodes = 4
    with pytest.raises(CheckpointError, match="data.canonical_nodes 8, but the spec now gives 4"):
        order.check_resume_order(recorded, shards_spec, 2)


def epoch_batches(world: int, size: int = SAMPLES, micro: int = BATCH) -> list[list[list[int]]]:
    """Each rank's micro-batches of EPOCH from order.EpochBatches."""
    ranks = [order.EpochBatches(size, micro, rank, world, SEED) for rank in range(world)]
    for batches in ranks:
        batches.set_epoch(EPOCH)
    return [list(batches) for batches in ranks]


@pytest.mark.parametrize(
    ("size", "world", "micro"), [(96, 2, 8), (101, 4, 8), (7, 2, 4), (96, 1, 8)]
)
def test_epoch_batches_are_torch_s_distributed_batches_when_the_shares_are_equal(
    size, world, micro
):
    class Sized(Dataset):
        def __len__(self) -> int:
            return size

    for rank, ours in enumerate(epoch_batches(world, size, micro)):
        sampler = DistributedSampler(Sized(), world, rank, shuffle=True, seed=SEED)
        sampler.set_epoch(EPOCH)
        assert ours == list(BatchSampler(sampler, micro // world, drop_last=False))


@pytest.mark.parametrize("world", [3, 5, 7])
def test_unequal_shares_train_every_sample_once_in_the_same_steps(world):
    ranks = epoch_batches(world)
    sizes = {len(batch) for batches in ranks for batch in batches}
    assert sizes == {BATCH // world, BATCH // world + 1}  # shares differ by one
    per_step = [
        sorted(i for batches in group for i in batches) for group in zip(*ranks, strict=True)
    ]
    assert per_step == steps(1)
    assert Counter(i for step in per_step for i in step) == Counter(range(SAMPLES))


def test_an_elastic_epoch_trains_every_sample_once_across_resizes():
    """2 workers for 3 steps, then 3 (a node came back) for 4, then 1 (two nodes went)."""
    trained: list[list[int]] = []  # each step's samples
    done = 0
    for world, steps_here in [(2, 3), (3, 4), (1, None)]:
        ranks = [order.EpochBatches(SAMPLES, BATCH, r, world, SEED) for r in range(world)]
        skip = order.micro_batches_done(done, BATCH)
        resumable = [order.ResumableBatches(batches) for batches in ranks]
        for batches in resumable:
            batches.set_epoch(EPOCH, skip)
        groups = list(zip(*(list(b) for b in resumable), strict=True))[:steps_here]
        trained += [sorted(i for batch in group for i in batch) for group in groups]
        done += len(groups) * BATCH
    assert trained == steps(1)
    assert Counter(i for step in trained for i in step) == Counter(range(SAMPLES))


def test_the_epoch_end_pads_so_that_every_rank_has_a_sample():
    ranks = epoch_batches(3, size=10, micro=4)  # micro-batches of 4, 4 and the last 2 (+1 pad)
    assert [len(batches) for batches in ranks] == [3, 3, 3]
    assert [len(batches[-1]) for batches in ranks] == [1, 1, 1]
    trained = Counter(i for batches in ranks for b in batches for i in b)
    assert trained.keys() == set(range(10)) and sum(trained.values()) == 11


def test_weighted_unequal_shares_give_the_gradient_of_the_whole_batch():
    """What DDP computes for 3 ranks holding 3, 3 and 2 of a batch of 8: the mean of the ranks'
    gradients, each of the rank's mean loss times its weight."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 2)
    inputs, labels = torch.randn(8, 5), torch.randint(0, 2, (8,))
    whole = torch.autograd.grad(
        torch.nn.functional.cross_entropy(layer(inputs), labels), layer.weight
    )[0]
    batches = order.EpochBatches(8, 8, 0, 3, SEED)
    shares = [inputs[0:3], inputs[3:6], inputs[6:8]], [labels[0:3], labels[3:6], labels[6:8]]
    grads = [
        torch.autograd.grad(
            torch.nn.functional.cross_entropy(layer(x), y) * batches.weight(0, len(y)),
            layer.weight,
        )[0]
        for x, y in zip(*shares, strict=True)
    ]
    assert torch.allclose(sum(grads) / 3, whole, atol=1e-6)
    assert batches.weight(0, 3) == 1.125 and order.EpochBatches(8, 8, 0, 2, SEED).weight(0, 4) == 1


def test_an_elastic_group_prints_its_size_and_every_resize():
    from wrn_cluster.train import metrics

    report = {**metrics.step_metrics(1, 120, 3840, 1.23456, 0.1, 55.0), "workers": 3}
    line = metrics.progress_line("digits", "classify", 10, report, elastic=True)
    assert line.endswith("lr 0.1  3 workers")
    assert "workers" not in metrics.progress_line("digits", "classify", 10, report)
    assert (
        metrics.resize_line("digits", 2, 1, 135)
        == "[digits] shrank from 2 to 1 workers at step 135"
    )
    assert (
        metrics.resize_line("digits", 1, 2, 200) == "[digits] grew from 1 to 2 workers at step 200"
    )


def test_with_a_sample_log_each_rank_records_the_micro_batches_it_hands_out(tmp_path, monkeypatch):
    assert order.sample_record("job", 0, 1) is None  # unset: nothing is written
    monkeypatch.setenv(order.SAMPLE_LOG, str(tmp_path))
    record = order.sample_record("job", 0, 1)
    assert record.parent == tmp_path / "job" and record.name.endswith("-0-of-1.jsonl")
    batches = order.ResumableBatches(order.EpochBatches(10, 4, 0, 1, seed=3), record)
    batches.set_epoch(2, skip=1)
    handed = list(batches)
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert rows == [[2, j, indices] for j, indices in enumerate(handed, start=1)]
