"""Packed shards without Ray (data/shards.py): parts packed from real JPEGs (sklearn's digits),
the manifest's counts and hashes, reruns, the stream's order and resume with MosaicML Streaming,
and each bad input as one message. Packing on Ray, shards on moto's S3 and training from them:
tests/integration/test_shards.py."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.datasets import write_cifar10, write_cifar100, write_digits_imagefolder, write_svhn
from wrn_cluster.data import DataError, shards

PER_SHARD = 400


def pack_locally(src: Path, dst: Path) -> dict:
    return shards.pack_here(str(src), str(dst), PER_SHARD)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    counts = write_digits_imagefolder(root / "src", size=16)
    victim = sorted((root / "src" / "train").glob("*/*.jpg"))[5]
    victim.write_bytes(b"\xff\xd8\xff this is not a JPEG")
    manifest = pack_locally(root / "src", root / "dst")
    return root, counts, manifest, victim


def stream(dst: Path, cache: Path, batch: int = 8):
    return shards.build(
        str(dst),
        size=16,
        eval_resize=16,
        augment=True,
        seed=3,
        per_worker_batch=batch,
        cache=str(cache),
        cache_limit=None,
        canonical_nodes=8,
    )


def test_the_manifest_counts_every_image_and_hashes_every_shard(packed):
    root, counts, manifest, victim = packed
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert manifest["classes"] == counts["classes"] and manifest["version"] == shards.VERSION
    assert train["samples"] == counts["train"] - 1 and train["left_out"] == 1
    assert train["left_out_examples"] == [victim.relative_to(root / "src" / "train").as_posix()]
    assert val["samples"] == counts["val"] and val["left_out"] == 0
    assert len(train["shards"]) == -(-counts["train"] // PER_SHARD)
    for shard in train["shards"] + val["shards"]:
        data = (root / "dst" / shard["name"]).read_bytes()
        assert len(data) == shard["bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert sum(s["samples"] for s in train["shards"]) == train["samples"]


def test_a_rerun_with_another_shard_size_packs_every_part_again(packed, tmp_path):
    root = packed[0]
    copy = tmp_path / "dst"
    subprocess.run(["cp", "-r", str(root / "dst"), str(copy)], check=True)
    parts = shards.plan(str(root / "src"), PER_SHARD // 2).parts
    assert not any(shards.part_is_done(str(copy), p) for ps in parts.values() for p in ps)
    manifest = shards.pack_here(str(root / "src"), str(copy), PER_SHARD // 2)
    assert manifest["splits"]["train"]["samples"] == packed[2]["splits"]["train"]["samples"]
    assert all(s["samples"] <= PER_SHARD // 2 for s in manifest["splits"]["train"]["shards"])


def test_a_part_of_only_broken_images_is_recorded_without_a_shard_and_rerun_skips_it(tmp_path):
    write_digits_imagefolder(tmp_path / "src", size=16)
    for jpeg in sorted((tmp_path / "src" / "val").glob("*/*.jpg"))[:4]:
        jpeg.write_bytes(b"not an image")
    parts = shards.plan(str(tmp_path / "src"), 4).parts
    first_val = parts["val"][0]
    record = shards.pack_part(str(tmp_path / "src"), str(tmp_path / "dst"), first_val)
    assert (record["samples"], record["shard"], len(record["left_out"])) == (0, None, 4)
    assert shards.part_is_done(str(tmp_path / "dst"), first_val)


def test_a_rerun_packs_only_the_shard_that_is_gone(packed, tmp_path):
    root, _, _, _ = packed
    copy = tmp_path / "dst"
    subprocess.run(["cp", "-r", str(root / "dst"), str(copy)], check=True)
    (copy / "train" / "shard.00002.mds").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (copy / "train").glob("*.mds")}
    parts = shards.plan(str(root / "src"), PER_SHARD).parts
    undone = [
        (p.split, p.number)
        for ps in parts.values()
        for p in ps
        if not shards.part_is_done(str(copy), p)
    ]
    assert undone == [("train", 2)]
    pack_locally(root / "src", copy)
    after = {p.name: p.stat().st_mtime_ns for p in (copy / "train").glob("*.mds")}
    assert {name for name in after if after[name] != before.get(name)} == {"shard.00002.mds"}
    assert (copy / "train" / "shard.00002.mds").read_bytes() == (
        root / "dst" / "train" / "shard.00002.mds"
    ).read_bytes()  # the JPEG bytes as they were, in the same order


def test_the_stream_decodes_the_images_and_validation_reads_each_sample_by_its_index(
    packed, tmp_path
):
    root, counts, _, _ = packed
    train, val, classes = stream(root / "dst", tmp_path / "cache")
    assert classes == counts["classes"] and len(val) == counts["val"]
    image, label = val[0]
    assert image.shape == (3, 16, 16) and 0 <= label < 10
    # Item i is the split's sample i, so the ranks' slices i::world (the loaders') cover each once.
    assert [int(val.stream.get_item(i)["index"]) for i in range(len(val))] == list(range(len(val)))
    train.start_epoch(0, 0)
    first = list(train)
    assert len(train) == counts["train"] - 1
    assert all(image.shape == (3, 16, 16) for image, _ in first[:8])


@pytest.mark.parametrize(("batch", "workers"), [(8, 0), (8, 2), (479, 0), (1437, 2)])
def test_the_batches_of_an_epoch_are_counted_as_streaming_pads_them(
    packed, tmp_path, batch, workers
):
    """1437 samples over 8 canonical nodes pad to 1440: a batch of 479 gets a fourth batch."""
    from torch.utils.data import DataLoader

    train, _, _ = stream(packed[0] / "dst", tmp_path / "cache", batch=batch)
    train.start_epoch(0, 0)
    yielded = sum(1 for _ in DataLoader(train, batch_size=batch, num_workers=workers))
    assert train.batches_per_epoch(0, 1, 1, workers) == yielded
    if batch == 479:
        assert yielded == 4 > -(-len(train) // batch)


def test_a_file_url_reads_as_its_path(packed, tmp_path):
    train, val, _ = stream(f"file://{packed[0] / 'dst'}", tmp_path / "cache")
    train.start_epoch(0, 0)
    assert len(list(train)) >= len(train) and val[0][0].shape == (3, 16, 16)


def _order(dst: Path, cache: Path, epoch: int, after: int = 0, workers: int = 0) -> list[int]:
    from torch.utils.data import DataLoader

    train, _, _ = stream(dst, cache)
    train.start_epoch(epoch, after)
    # The records themselves (train.stream), to compare the samples' indices in their split.
    loader = DataLoader(train.stream, batch_size=8, num_workers=workers, collate_fn=_indices)
    return [index for batch in loader for index in batch]


def _indices(records: list[dict]) -> list[int]:
    return [int(record["index"]) for record in records]


def test_an_epoch_resumed_after_k_samples_continues_with_sample_k(packed, tmp_path):
    root = packed[0]
    whole = _order(root / "dst", tmp_path / "a", epoch=2)
    assert _order(root / "dst", tmp_path / "b", epoch=2, after=160, workers=2) == whole[160:]
    assert _order(root / "dst", tmp_path / "c", epoch=2, workers=2) == whole  # any loader count
    assert _order(root / "dst", tmp_path / "d", epoch=3) != whole


RANK_SCRIPT = """
import json, os, sys
rank, world, dst, cache, port = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6]
os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                  LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
from wrn_cluster.data import shards
train, _, _ = shards.build(dst, size=16, eval_resize=16, augment=False, seed=3,
                           per_worker_batch=16 // world, cache=cache, cache_limit=None,
                           canonical_nodes=8)
train.start_epoch(1, 0)
print(json.dumps([int(record["index"]) for record in train.stream]))
"""


def _steps(dst: Path, cache: Path, world: int) -> list[list[int]]:
    """The samples each global batch of 16 holds, with ``world`` ranks (processes) reading."""
    with socket.socket() as probe:  # Streaming's barriers use torch.distributed
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    args = [str(world), str(dst), str(cache), port]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(rank), *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    ranks = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    per = 16 // world
    return [
        sorted(index for r in ranks for index in r[i * per : (i + 1) * per])
        for i in range(len(ranks[0]) // per)
    ]


def test_each_global_batch_holds_the_same_samples_on_one_or_two_ranks(packed, tmp_path):
    root = packed[0]
    one, two = _steps(root / "dst", tmp_path / "one", 1), _steps(root / "dst", tmp_path / "two", 2)
    assert len(one) == len(two) and one == two
    assert len({i for step in one for i in step}) == 1437  # every readable image, some twice


# ---------------------------------------------------------------------------------------------
# Bad input: one message naming the shard and the fix


CONCURRENT_SCRIPT = """
import sys
from wrn_cluster.data import shards
dst, cache = sys.argv[1:3]
for round in range(3):
    train, val, _ = shards.build(dst, size=16, eval_resize=16, augment=False, seed=3,
                                 per_worker_batch=8, cache=f"{cache}/{round}", cache_limit=None,
                                 canonical_nodes=8)
    print(len(val))
"""


def test_jobs_starting_streams_on_one_node_at_once_each_get_their_own_registration(
    packed, tmp_path
):
    """Streaming finds a free shared-memory prefix and then creates it; without the node's
    registration lock, processes doing so at once collide (FileExistsError on one of them)."""
    root = packed[0]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_SCRIPT, str(root / "dst"), str(tmp_path / str(n))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    outcomes = [p.communicate(timeout=180) for p in procs]
    for proc, (out, err) in zip(procs, outcomes, strict=True):
        assert proc.returncode == 0, err
        assert out.split() == [str(packed[1]["val"])] * 3  # every sample of val, each time


def _copy(packed, tmp_path) -> Path:
    copy = tmp_path / "dst"
    subprocess.run(["cp", "-r", str(packed[0] / "dst"), str(copy)], check=True)
    return copy


def test_a_missing_shard_is_named_with_the_fix(packed, tmp_path):
    copy = _copy(packed, tmp_path)
    (copy / "val" / "shard.00000.mds").unlink()
    with pytest.raises(DataError) as caught:
        shards.check(str(copy))
    assert str(caught.value) == (
        f"{copy}/val/shard.00000.mds: the shard is missing; {shards.PACK_AGAIN}"
    )


def test_a_truncated_shard_is_named_with_the_fix(packed, tmp_path):
    copy = _copy(packed, tmp_path)
    shard = copy / "train" / "shard.00001.mds"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"train/shard.00001.mds: 1000 bytes, the manifest says"):
        shards.check(str(copy))


def test_a_shard_that_does_not_match_its_sha256_stops_the_read_with_its_name(packed, tmp_path):
    copy = _copy(packed, tmp_path)
    shard = copy / "train" / "shard.00000.mds"
    data = bytearray(shard.read_bytes())
    data[-100:] = bytes(100)  # same size: only the hash tells
    shard.write_bytes(bytes(data))
    shards.check(str(copy))  # sizes agree
    train, _, _ = stream(copy, tmp_path / "cache")
    train.start_epoch(0, 0)
    with pytest.raises(DataError) as caught:
        list(train)
    assert str(caught.value).startswith(
        f"{copy}/train/shard.00000.mds: the shard does not match its SHA-256 in the manifest"
    ), caught.value


def test_a_manifest_of_another_format_version_or_no_manifest_is_refused(packed, tmp_path):
    copy = _copy(packed, tmp_path)
    manifest = json.loads((copy / shards.MANIFEST).read_text())
    (copy / shards.MANIFEST).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(DataError, match="has format version 99, this wrn-cluster reads version 1"):
        shards.check(str(copy))
    (copy / shards.MANIFEST).unlink()
    with pytest.raises(DataError, match="no manifest.json; data.format shards reads a dataset"):
        shards.check(str(copy))


def test_shards_whose_classes_differ_from_the_model_are_refused(packed):
    with pytest.raises(DataError) as caught:
        shards.check(str(packed[0] / "dst"), num_classes=1000)
    assert "the shards hold 10 classes, but model.num_classes is 1000" in str(caught.value)


def test_packing_a_folder_that_is_not_there_is_one_message_and_starts_nothing(tmp_path):
    from typer.testing import CliRunner

    from wrn_cluster.cli import app

    result = CliRunner().invoke(app, ["data", "pack", str(tmp_path / "nope"), str(tmp_path / "d")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{tmp_path / 'nope'}: no such dataset folder" in result.output
    assert not (tmp_path / "d").exists()


def test_a_cache_limit_under_four_shards_is_refused_with_the_size_to_set(packed):
    with pytest.raises(DataError) as caught:
        shards.check(str(packed[0] / "dst"), cache_limit="100kb")
    assert "data.shard_cache_limit 100kb holds fewer than four of its largest shards" in str(
        caught.value
    ) and "raise it to at least 2mb" in str(caught.value)
    shards.check(str(packed[0] / "dst"), cache_limit="2mb")


def test_nodes_of_unequal_workers_or_canonical_nodes_that_do_not_divide_are_refused():
    shards.check_layout("s3://d", world=8, local_world=4, canonical_nodes=8)  # 2 nodes of 4
    with pytest.raises(DataError, match="do not split into nodes of 8; set scaling.workers"):
        shards.check_layout("s3://d", world=12, local_world=8, canonical_nodes=8)
    with pytest.raises(DataError, match="data.canonical_nodes 8 and the 3 nodes the workers"):
        shards.check_layout("s3://d", world=6, local_world=2, canonical_nodes=8)


# ---------------------------------------------------------------------------------------------
# CIFAR and SVHN releases: their pixels packed as they are, read as the in-memory reader does


def shards_of(dst: Path, cache: Path, augment: bool = True):
    return shards.build(
        str(dst),
        size=32,
        eval_resize=32,
        augment=augment,
        seed=5,
        per_worker_batch=10,
        cache=str(cache),
        cache_limit=None,
        canonical_nodes=1,
    )


@pytest.mark.parametrize(
    ("kind", "write", "classes"),
    [("cifar10", write_cifar10, 10), ("cifar100", write_cifar100, 100), ("svhn", write_svhn, 10)],
)
def test_a_cifar_or_svhn_release_packs_its_pixels_and_streams_what_the_memory_reader_gives(
    tmp_path, kind, write, classes
):
    from wrn_cluster.data import cifar

    write(tmp_path / "src", 24 if kind == "cifar10" else 120)
    manifest = shards.pack_here(str(tmp_path / "src"), str(tmp_path / "dst"), 50, kind)
    assert (manifest["kind"], len(manifest["classes"])) == (kind, classes)
    assert manifest["image"] == {"encoding": "raw", "dtype": "uint8", "shape": [3, 32, 32]}
    memory_train, memory_val, names = cifar.build(kind, str(tmp_path / "src"), True, seed=5)
    assert manifest["classes"] == names
    assert manifest["splits"]["train"]["samples"] == len(memory_train)
    assert manifest["splits"]["val"]["samples"] == len(memory_val)
    assert manifest["splits"]["train"]["left_out"] == 0
    train, val, _ = shards_of(tmp_path / "dst", tmp_path / "cache")
    # Validation: item i is the release's test image i, untouched.
    for i in (0, len(val) - 1):
        image, label = val[i]
        expected, expected_label = memory_val[i]
        assert torch.equal(image, expected) and label == expected_label
    # Training, epoch 2: each sample's augmentation is the memory reader's for its index.
    memory_train.set_epoch(2)
    train.start_epoch(2, 0)
    seen = 0
    for record in train.stream:
        image, label = train.transform(record, 2)
        expected, expected_label = memory_train[int(record["index"])]
        assert torch.equal(image, expected) and label == expected_label
        seen += 1
    assert seen == len(memory_train)


def test_a_cifar_rerun_after_its_pixels_changed_packs_that_part_again(tmp_path):
    import pickle

    write_cifar10(tmp_path / "src", 20)  # 100 training images: parts of 50
    shards.pack_here(str(tmp_path / "src"), str(tmp_path / "dst"), 50, "cifar10")
    batch_path = tmp_path / "src" / "data_batch_5"  # images 80-99: the second part
    batch = pickle.loads(batch_path.read_bytes(), encoding="bytes")
    batch[b"data"] = 255 - batch[b"data"]
    batch_path.write_bytes(pickle.dumps(batch, protocol=2))
    parts = shards.plan(str(tmp_path / "src"), 50, "cifar10").parts
    undone = [
        (p.split, p.number)
        for ps in parts.values()
        for p in ps
        if not shards.part_is_done(str(tmp_path / "dst"), p)
    ]
    assert undone == [("train", 1)]


def test_shards_of_another_dataset_kind_or_an_unknown_kind_are_refused_with_the_fix(tmp_path):
    from wrn_cluster.pack import pack

    write_cifar10(tmp_path / "src", 4)
    shards.pack_here(str(tmp_path / "src"), str(tmp_path / "dst"), 50, "cifar10")
    with pytest.raises(DataError) as caught:
        shards.check(str(tmp_path / "dst"), dataset="svhn")
    assert (
        "the shards were packed from a cifar10 dataset, but data.dataset is svhn; set "
        "data.dataset: cifar10, or pack the svhn data with `wrn-cluster data pack SRC DST "
        "--dataset svhn`"
    ) in str(caught.value)
    with pytest.raises(
        DataError,
        match="--dataset mnist: packs one of cifar10, cifar100, svhn, imagefolder, coco; name",
    ):
        pack(
            str(tmp_path / "src"),
            str(tmp_path / "d2"),
            images_per_shard=8,
            address=None,
            say=print,
            kind="mnist",
        )
    with pytest.raises(DataError, match="data_batch_1: missing"):
        shards.plan(str(tmp_path / "dst"), 50, "cifar10")
