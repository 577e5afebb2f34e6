"""The order in which an epoch's samples reach the steps, and how a resumed run skips the part of
an epoch that a step checkpoint says was already trained.

The order of an epoch is torch's ``DistributedSampler`` permutation for (seed, epoch), or with
repeated augmentation its first N / r samples, each r times in a row (``EpochBatches``). Rank r of
w takes every w-th index of it, so micro-batch j of every rank together holds positions
``[j * w * b, (j + 1) * w * b)`` of the permutation (b samples per rank), and optimizer step i
holds positions ``[i * B, (i + 1) * B)`` for the global batch B, whatever the number of workers.
A step checkpoint therefore records one number, the samples of the epoch already trained
(``samples_done``): a resumed run on any number of workers skips that many positions and trains
on the rest in the same order. (Aspect-ratio grouped detection batches regroup each rank's share,
so there the exact order holds when the worker count is unchanged.)

Packed shards keep the same property through MosaicML Streaming, whose order is a function of
(seed, epoch, canonical nodes) and which starts an epoch after a sample count (``StreamBatches``).

The skip happens on indices, before anything is read or decoded. torchdata's StatefulDataLoader
keeps a state per rank and loader process instead, which cannot follow a changed worker count.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator, Sized
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from wrn_cluster.data.shards import ShardStream
from wrn_cluster.train.checkpoint import CheckpointError


class EpochSampler(Protocol):
    def set_epoch(self, epoch: int) -> None: ...


class BatchesOf(Protocol, Sized):
    """A batch sampler over a distributed sampler: BatchSampler or coco.GroupedBatchSampler."""

    sampler: EpochSampler

    def __iter__(self) -> Iterator[list[int]]: ...


class ResumableBatches(Sampler[list[int]]):
    """A batch sampler that can start an epoch past its first ``skip`` batches.

    The skip stays set for every iterator made until the next ``set_epoch``: a DataLoader with
    loader processes asks its batch sampler for an iterator twice before the first batch. Its
    length is always the whole epoch's, so step counts and learning-rate schedules are those of
    an uninterrupted run.
    """

    def __init__(self, batches: BatchesOf, record: Path | None = None) -> None:
        self.batches = batches
        self.skip = 0
        self.epoch = 0
        self.record = record  # see sample_record

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Start ``epoch`` (0-based) after its first ``skip`` batches of this rank."""
        if not 0 <= skip <= len(self.batches):
            raise ValueError(f"cannot skip {skip} of the epoch's {len(self.batches)} batches")
        getattr(self.batches, "sampler", self.batches).set_epoch(epoch)
        self.skip, self.epoch = skip, epoch

    def weight(self, micro_batch: int, size: int) -> float:
        """How much this rank's mean loss over ``size`` samples counts (see EpochBatches)."""
        weigh = getattr(self.batches, "weight", None)
        return weigh(micro_batch, size) if weigh else 1.0

    def __iter__(self) -> Iterator[list[int]]:
        batches = iter(self.batches)
        for _ in range(self.skip):
            next(batches, None)
        if self.record is None:
            yield from batches
            return
        for micro_batch, indices in enumerate(batches, start=self.skip):
            with open(self.record, "a") as out:
                out.write(json.dumps([self.epoch, micro_batch, list(indices)]) + "\n")
            yield indices

    def __len__(self) -> int:
        return len(self.batches)


# A folder every node can write: each rank of a classification job reading files appends there,
# per attempt of the job, the samples of each micro-batch it hands its loader, to check on a
# real cluster that resizes and restarts train every sample of an epoch once
# (tests/e2e/test_multinode.py). Unset: nothing is written.
SAMPLE_LOG = "WRN_CLUSTER_SAMPLE_LOG"


def sample_record(job: str, rank: int, world: int) -> Path | None:
    """Where this rank records its micro-batches (JSON lines of [epoch, micro-batch, indices]):
    <SAMPLE_LOG>/<job>/<ms since the epoch>-<attempt>-<rank>-of-<world>.jsonl, the attempt
    named by rank 0; None when SAMPLE_LOG is unset. A collective: every rank calls it, and
    does so whether SAMPLE_LOG is set on its node or not."""
    attempt = attempt_token(world)
    if not os.environ.get(SAMPLE_LOG):
        return None
    folder = Path(os.environ[SAMPLE_LOG]) / job
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{time.time_ns() // 1_000_000}-{attempt}-{rank}-of-{world}.jsonl"


class EpochBatches:
    """This rank's micro-batches of an epoch, for any number of ranks.

    Micro-batch j of the epoch holds positions ``[j * M, (j + 1) * M)`` of the epoch's order
    (torch's ``DistributedSampler`` permutation for seed + epoch; M the global micro-batch) and
    position ``j * M + q`` goes to rank ``q % world``. When ``world`` divides M that is exactly
    ``BatchSampler(DistributedSampler(...), M // world)``; when it does not (an elastic group of
    3 with a batch of 128), shares differ by one and ``weight`` makes each rank's mean loss count
    by its share, so DDP's average of the ranks' gradients is the gradient of the batch's mean.
    The last micro-batch of an epoch is padded from the epoch's start as ``DistributedSampler``
    pads it when the shares are equal, and otherwise only as far as one sample for every rank;
    nothing is padded when the global micro-batch divides the data set.

    With ``repeats`` r > 1 (repeated augmentation, Hoffer et al. 2019, "Augment your batch") the
    epoch keeps its N samples: the first ceil(N / r) of the permutation, each r times in a row,
    cut at N. Copy c of item i is index ``c * N + i``, which the dataset reads as item i but
    augments from its own generator (``data.transforms.source_index``).
    """

    def __init__(
        self, size: int, global_micro: int, rank: int, world: int, seed: int, repeats: int = 1
    ) -> None:
        if global_micro < world:
            raise ValueError(f"a micro-batch of {global_micro} cannot feed {world} ranks")
        self.size, self.micro, self.seed, self.repeats = size, global_micro, seed, repeats
        self.rank, self.world = rank, world
        self.epoch = 0
        self.full = (len(self) - 1) * global_micro  # positions before the last micro-batch
        last = size - self.full
        if global_micro % world == 0:  # as DistributedSampler pads: equal shares to the end
            last = -(-last // world) * world
        self.total = self.full + max(last, world)  # at least one sample for every rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.size // self.micro)

    def order(self) -> list[int]:
        """The epoch's positions, padded: what every rank draws its share from."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        indices = torch.randperm(self.size, generator=generator).tolist()
        if self.repeats > 1:
            # Adjacent copies share a global batch on any rank count (Hoffer et al.; on one rank
            # they share its batch). Dealt to ranks like any positions, several ranks get one
            # copy each, as with torchvision's RASampler, which repeats and deals the same way
            # but cuts the epoch to floor(N / 256) * 256 samples, split by the rank count.
            chosen = indices[: -(-self.size // self.repeats)]
            r = range(self.repeats)
            indices = [copy * self.size + i for i in chosen for copy in r][: self.size]
        while len(indices) < self.total:
            indices += indices[: self.total - len(indices)]
        return indices

    def __iter__(self) -> Iterator[list[int]]:
        indices = self.order()
        for j in range(len(self)):
            start = j * self.micro
            yield indices[start + self.rank : start + self.global_size(j) : self.world]

    def global_size(self, micro_batch: int) -> int:
        """Samples of micro-batch ``micro_batch`` over all ranks: M, and what is left (padded)
        for the last."""
        return self.micro if micro_batch < len(self) - 1 else self.total - self.full

    def weight(self, micro_batch: int, size: int) -> float:
        """``size * world / global size``: exactly 1.0 when the shares are equal."""
        return size * self.world / self.global_size(micro_batch)


def samples_done(steps_in_epoch: int, batch_size: int) -> int:
    """Samples of the epoch trained after ``steps_in_epoch`` optimizer steps of ``batch_size``
    (the global batch): what a step checkpoint records."""
    return steps_in_epoch * batch_size


def micro_batches_done(samples: int, global_micro: int) -> int:
    """The micro-batches every rank skips to continue after ``samples`` samples of an epoch
    (``global_micro`` samples a micro-batch over all ranks); refuses a count that does not fall
    on a whole micro-batch."""
    micro, rest = divmod(samples, global_micro)
    if rest:
        raise ValueError(
            f"the checkpoint stopped after {samples} samples of its epoch, which micro-batches "
            f"of {global_micro} samples cannot continue from exactly; keep data.batch_size and "
            "optimizer.grad_accum_steps as they were"
        )
    return micro


def loader_generator(seed: int, rank: int) -> torch.Generator:
    """The generator a rank's DataLoaders draw their loader-process seeds from. Without one, a
    DataLoader draws from torch's global stream each time it starts an epoch, and a run resumed
    mid-epoch (whose global stream the checkpoint restores) would be one draw off from then on:
    dropout would differ from the uninterrupted run's."""
    return torch.Generator().manual_seed(seed * 7919 + rank)


class StreamBatches:
    """What ``ResumableBatches`` is for a map-style dataset, for packed shards: the stream's own
    epoch order (Streaming's, a function of the seed and epoch), started after ``skip``
    micro-batches of every rank, i.e. after that many samples of the whole epoch."""

    def __init__(
        self, stream: ShardStream, per_worker_batch: int, rank: int, world: int, workers: int
    ) -> None:
        self.stream = stream
        self.per_worker_batch = per_worker_batch
        self.world = world
        # Ray Train, like torchrun, says how many ranks share this node; Streaming reads it too.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        self.batches = stream.batches_per_epoch(rank, local_world, world, workers)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if not 0 <= skip <= len(self):
            raise ValueError(f"cannot skip {skip} of the epoch's {len(self)} batches")
        self.stream.start_epoch(epoch, skip * self.per_worker_batch * self.world)

    def weight(self, micro_batch: int, size: int) -> float:
        return 1.0  # Streaming gives every rank the same batch size (the spec sees to it)

    def __len__(self) -> int:
        return self.batches


def attempt_token(world: int) -> str:
    """One name for this attempt of the job, the same on every rank (rank 0's, broadcast)."""
    token = [uuid.uuid4().hex[:12]]
    if world > 1 and dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return token[0]


def order_facts(spec: Any, world: int) -> dict[str, Any]:
    """Besides the seed, what an epoch's order depends on, as a step checkpoint records it."""
    facts: dict[str, Any] = {"reader": getattr(spec.data, "format", "files"), "workers": world}
    augmentation = getattr(spec.data, "augmentation", None)
    if augmentation is not None:
        facts["repeats"] = augmentation.repeats
    if facts["reader"] == "shards":
        facts["canonical_nodes"] = spec.data.canonical_nodes
    if getattr(spec.data, "grouped", False):
        facts["grouped"] = True  # detection: each rank regroups its own share
    return facts


ORDER_FIELDS = {
    "seed": "seed",
    "reader": "data.format",
    "canonical_nodes": "data.canonical_nodes",
    "repeats": "data.augmentation.repeats",
}


def check_resume_order(recorded: dict[str, Any], spec: Any, world: int) -> None:
    """Refuse to continue inside an epoch whose order the spec would no longer give: the rest
    of the epoch would repeat some samples and skip others. Checkpoints that predate these
    facts are taken as they are."""
    now = {"seed": spec.seed, **order_facts(spec, world)}
    changed = [
        (field, recorded[key], now.get(key))
        for key, field in ORDER_FIELDS.items()
        if key in recorded and recorded[key] != now.get(key)
    ]
    if recorded.get("grouped") and recorded.get("workers", world) != world:
        changed.append(("scaling.workers", recorded["workers"], world))  # each rank regroups
    if changed:
        field, was, is_now = changed[0]
        raise CheckpointError(
            f"the job's last checkpoint stopped inside an epoch whose sample order came from "
            f"{field} {was}, but the spec now gives {is_now}; continuing there would repeat and "
            f"skip samples: set {field} back to {was} to resume, or use another job name to "
            "start fresh"
        )
