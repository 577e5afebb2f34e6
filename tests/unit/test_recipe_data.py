"""Issue 18's data side on real images: the augmentation policy and random erasing after each
reader's view, repeated augmentation in the epoch's order, and the evaluation crop size."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tests.datasets import write_cifar10, write_digits_imagefolder
from wrn_cluster.data import build_datasets, shards
from wrn_cluster.data.transforms import decode, resize_center_crop
from wrn_cluster.spec import ClassifyJob
from wrn_cluster.train import classify, order
from wrn_cluster.train.checkpoint import CheckpointError

CPU = torch.device("cpu")


def classify_spec(dataset: str, url: str | Path, seed: int = 0, **data) -> ClassifyJob:
    return ClassifyJob.model_validate(
        {
            "kind": "classify",
            "name": "recipe-test",
            "seed": seed,
            "model": {"arch": "wrn-16-2"},
            "data": {"dataset": dataset, "url": str(url), "loader_workers": 0, **data},
            "schedule": {"epochs": 2, "milestones": [1]},
        }
    )


TRIVIAL = {"policy": "trivial_augment", "random_erasing": 0.5}


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    write_digits_imagefolder(root, size=32)
    return root


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, per_batch=20)  # 100 training images, 20 test images
    return root


def items(dataset, indices) -> list[torch.Tensor]:
    return [dataset[i][0] for i in indices]


def changed(first: list[torch.Tensor], second: list[torch.Tensor]) -> int:
    return sum(not torch.equal(a, b) for a, b in zip(first, second, strict=True))


# ---------------------------------------------------------------------------------------------
# The policy: after the reader's view, drawn from the item's generator


@pytest.mark.parametrize("dataset", ["imagefolder", "cifar10"])
def test_the_policy_changes_training_images_identically_in_two_dataset_instances(
    dataset, digits_folder, cifar_folder
):
    url = digits_folder if dataset == "imagefolder" else cifar_folder
    size = {"image_size": 24} if dataset == "imagefolder" else {}
    plain, _, _ = build_datasets(classify_spec(dataset, url, **size))
    first, _, _ = build_datasets(classify_spec(dataset, url, augmentation=TRIVIAL, **size))
    second, _, _ = build_datasets(classify_spec(dataset, url, augmentation=TRIVIAL, **size))
    for data in (plain, first, second):
        data.set_epoch(1)
    indices = range(0, 60, 3)
    torch.manual_seed(0)  # whatever the process's global stream holds
    ours = items(first, indices)
    torch.manual_seed(1)
    assert all(torch.equal(a, b) for a, b in zip(ours, items(second, indices), strict=True))
    # TrivialAugment's identity and zero-magnitude draws leave some images as the view made them.
    assert changed(ours, items(plain, indices)) >= len(indices) // 2
    assert all(image.dtype == torch.uint8 for image in ours)


def test_the_policy_gives_the_same_batches_for_any_loader_worker_count(cifar_folder):
    train, _, _ = build_datasets(classify_spec("cifar10", cifar_folder, augmentation=TRIVIAL))
    train.set_epoch(3)
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(train, batch_size=10, num_workers=workers)
        batches[workers] = torch.cat([images for images, _ in loader])
    assert torch.equal(batches[0], batches[2])


def test_the_policy_draws_differently_in_each_epoch(cifar_folder):
    """Without the reader's view the base image is the same every epoch: what differs is the
    policy's draw."""
    spec = classify_spec("cifar10", cifar_folder, augment=False, augmentation=TRIVIAL)
    train, _, _ = build_datasets(spec)
    indices = range(40)
    train.set_epoch(0)
    epoch0 = items(train, indices)
    train.set_epoch(1)
    epoch1 = items(train, indices)
    assert changed(epoch0, epoch1) >= len(indices) // 2
    untouched = [train.images[i] for i in indices]
    assert changed(epoch0, untouched) >= len(indices) // 2


def test_an_item_leaves_the_process_global_random_stream_as_it_was(digits_folder):
    spec = classify_spec("imagefolder", digits_folder, image_size=24, augmentation=TRIVIAL)
    train, _, _ = build_datasets(spec)
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    for index in range(10):
        train[index]
    assert torch.equal(torch.rand(5), expected)


@pytest.mark.parametrize("dataset", ["imagefolder", "cifar10"])
def test_validation_images_are_untouched_by_the_policy(dataset, digits_folder, cifar_folder):
    url = digits_folder if dataset == "imagefolder" else cifar_folder
    size = {"image_size": 24} if dataset == "imagefolder" else {}
    _, plain, _ = build_datasets(classify_spec(dataset, url, **size))
    everything = {"policy": "rand_augment", "random_erasing": 1.0}
    _, val, _ = build_datasets(classify_spec(dataset, url, augmentation=everything, **size))
    indices = range(len(val))
    assert changed(items(val, indices), items(plain, indices)) == 0


def test_random_erasing_fills_with_the_mean_pixel_and_the_policy_pickles(cifar_folder):
    """torchvision's recipe erases to 0 after normalization: the dataset's mean colour."""
    spec = classify_spec("cifar10", cifar_folder, augment=False, augmentation={"random_erasing": 1})
    train, _, _ = build_datasets(spec)
    train = pickle.loads(pickle.dumps(train))  # as DataLoader workers get it
    mean = torch.tensor([round(255 * m) for m in spec.data.mean_std()[0]], dtype=torch.uint8)
    erased = 0
    for index in range(20):
        image = train[index][0]
        source = train.images[index]
        differ = (image != source).any(0)
        erased += bool(differ.any())
        assert (image.permute(1, 2, 0)[differ] == mean).all()
    assert erased >= 15  # RandomErasing gives up on a few draws of an impossible box


# ---------------------------------------------------------------------------------------------
# Repeated augmentation: r adjacent copies of the first N / r of the epoch's permutation


def epoch_order(size: int, micro: int, world: int, repeats: int, epoch: int = 2) -> list[int]:
    """The epoch's positions as the ranks' micro-batches hold them, dealt back in order."""
    ranks = [order.EpochBatches(size, micro, r, world, 7, repeats) for r in range(world)]
    for batches in ranks:
        batches.set_epoch(epoch)
    positions: list[int] = []
    for group in zip(*(list(batches) for batches in ranks), strict=True):
        for q in range(max(len(batch) for batch in group)):
            positions += [batch[q] for batch in group if q < len(batch)]
    return positions


def test_repeats_keep_the_epoch_at_n_samples_with_each_item_s_copies_adjacent():
    size, repeats = 100, 3
    positions = epoch_order(size, 20, 1, repeats)
    assert len(positions) == size and len(set(positions)) == size
    permutation = torch.randperm(size, generator=torch.Generator().manual_seed(7 + 2)).tolist()
    chosen = permutation[: -(-size // repeats)]
    for k, item in enumerate(chosen):
        copies = positions[k * repeats : (k + 1) * repeats]
        assert [index % size for index in copies] == [item] * len(copies)
        assert copies == [c * size + item for c in range(len(copies))]


def test_a_resume_inside_an_epoch_whose_repeats_changed_is_refused(cifar_folder):
    twice = classify_spec("cifar10", cifar_folder, augmentation={"repeats": 2})
    recorded = {"seed": 0, **order.order_facts(twice, 2)}
    order.check_resume_order(recorded, twice, 1)
    with pytest.raises(CheckpointError, match="data.augmentation.repeats 2, but the spec now"):
        order.check_resume_order(recorded, classify_spec("cifar10", cifar_folder), 2)


def test_repeats_give_each_copy_its_own_pixels(cifar_folder):
    spec = classify_spec("cifar10", cifar_folder, augmentation={"repeats": 3})
    train, _, _ = build_datasets(spec)
    train.set_epoch(2)
    size = len(train)
    for item in range(5):
        copies = [train[c * size + item] for c in range(3)]
        assert {label for _, label in copies} == {int(train.labels[item])}
        images = [image for image, _ in copies]
        assert changed(images[:2], images[1:]) == 2 and not torch.equal(images[0], images[2])
    with pytest.raises(IndexError):
        train[3 * size]


def test_repeats_order_is_the_same_on_one_or_two_ranks_and_resumes_exactly(cifar_folder):
    spec = classify_spec("cifar10", cifar_folder, batch_size=20, augmentation={"repeats": 2})
    train, val, _ = build_datasets(spec)
    per_rank = {}
    for world in (1, 2):
        ranks = [classify.loaders(spec, train, val, r, world, CPU)[0] for r in range(world)]
        for batches in ranks:
            batches.set_epoch(1)
        # Global batch j: the ranks' micro-batches j, position q of it on rank q % world.
        per_rank[world] = [
            [index for q in range(len(group[0])) for index in (b[q] for b in group)]
            for group in zip(*(list(batches) for batches in ranks), strict=True)
        ]
    assert per_rank[1] == per_rank[2]
    whole = [index for batch in per_rank[1] for index in batch]
    assert len(whole) == len(train) and len({i % len(train) for i in whole}) == len(train) // 2

    # A resume after 2 micro-batches continues with the same samples, images included.
    resumed, loader, _ = classify.loaders(spec, train, val, 0, 1, CPU)
    resumed.set_epoch(1, skip=2)
    assert list(resumed) == per_rank[1][2:]
    train.set_epoch(1)
    expected = torch.stack([train[i][0] for i in per_rank[1][2]])
    assert torch.equal(next(iter(loader))[0], expected)


def test_repeats_leave_validation_with_each_sample_once(cifar_folder):
    spec = classify_spec("cifar10", cifar_folder, batch_size=20, augmentation={"repeats": 4})
    train, val, _ = build_datasets(spec)
    images = []
    for rank in range(2):
        _, _, val_loader = classify.loaders(spec, train, val, rank, 2, CPU)
        images += [image for batch, _ in val_loader for image in batch]
    assert len(images) == len(val)
    held = sorted(image.numpy().tobytes() for image in images)
    assert held == sorted(val[i][0].numpy().tobytes() for i in range(len(val)))


# ---------------------------------------------------------------------------------------------
# The evaluation crop


def test_eval_size_gives_the_crop_asked_for_after_its_resize(digits_folder):
    spec = classify_spec("imagefolder", digits_folder, image_size=24, eval_size=32)
    train, val, _ = build_datasets(spec)
    assert train[0][0].shape == (3, 24, 24) and val[0][0].shape == (3, 32, 32)
    path = Path(digits_folder, "val", val.index.paths[0].decode())
    expected = resize_center_crop(decode(path.read_bytes(), 37), 37, 32)  # round(32 / 0.875)
    assert torch.equal(val[0][0], expected)
    _, val40, _ = build_datasets(
        classify_spec("imagefolder", digits_folder, image_size=24, eval_size=32, eval_resize=40)
    )
    assert torch.equal(val40[0][0], resize_center_crop(decode(path.read_bytes(), 40), 40, 32))


# ---------------------------------------------------------------------------------------------
# Packed shards: the same policy and evaluation crop as the files reader


def test_the_shard_reader_applies_the_policy_and_the_eval_size_as_the_files_reader(
    digits_folder, tmp_path
):
    shards.pack_here(str(digits_folder), str(tmp_path / "dst"), 400)
    options = {"image_size": 24, "eval_size": 32, "augmentation": TRIVIAL}
    spec = classify_spec(
        "imagefolder",
        tmp_path / "dst",
        format="shards",
        shard_cache=str(tmp_path / "cache"),
        **options,
    )
    stream, val, _ = build_datasets(spec)
    files, files_val, _ = build_datasets(classify_spec("imagefolder", digits_folder, **options))
    plain, _, _ = build_datasets(classify_spec("imagefolder", digits_folder, image_size=24))
    files.set_epoch(2)
    plain.set_epoch(2)
    stream.start_epoch(2, 0)
    ours, theirs, without = [], [], []
    records = list(stream.stream)  # the whole epoch, undecoded
    for record in records[:30]:
        image, label = stream.transform(record, 2)
        index = int(record["index"])
        assert label == files[index][1]
        ours.append(image)
        theirs.append(files[index][0])
        without.append(plain[index][0])
    assert changed(ours, theirs) == 0
    assert changed(ours, without) >= len(ours) // 2
    assert val[0][0].shape == (3, 32, 32) and torch.equal(val[0][0], files_val[0][0])
