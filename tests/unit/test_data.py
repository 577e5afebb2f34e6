"""Datasets: imagefolder, CIFAR-10/100, SVHN, synthetic data, prepare() checks. On moto's S3:
tests/integration/test_data.py."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.datasets import (
    digits,
    write_cifar10,
    write_cifar100,
    write_digits_imagefolder,
    write_svhn,
)
from wrn_cluster.data import DataError, build_datasets, prepare
from wrn_cluster.data.synthetic import write_imagefolder
from wrn_cluster.spec import ClassifyJob

ROOT = Path(__file__).resolve().parents[2]


def classify_spec(dataset: str, url: str | Path, seed: int = 0, **data) -> ClassifyJob:
    return ClassifyJob.model_validate(
        {
            "kind": "classify",
            "name": "data-test",
            "seed": seed,
            "model": {"arch": "wrn-16-2"},
            "data": {"dataset": dataset, "url": str(url), **data},
            "schedule": {"epochs": 2, "milestones": [1]},
        }
    )


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    write_digits_imagefolder(root, size=32)
    return root


def index_of(dataset, relative: str) -> int:
    return [p.decode() for p in dataset.index.paths].index(relative)


# ---------------------------------------------------------------------------------------------
# imagefolder


def test_imagefolder_items_are_uint8_images_labelled_by_their_folder(digits_folder):
    train, val, classes = build_datasets(classify_spec("imagefolder", digits_folder, image_size=32))
    assert classes == [str(d) for d in range(10)]
    assert (len(train), len(val)) == (1438, 359)
    for dataset, split in ((train, "train"), (val, "val")):
        for i in (0, len(dataset) // 2, len(dataset) - 1):
            image, label = dataset[i]
            assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
            folder = dataset.index.paths[i].decode().split("/")[0]
            assert label == int(folder)
            assert (digits_folder / split / dataset.index.paths[i].decode()).is_file()


def test_imagefolder_finds_jpeg_and_png_in_any_case_and_skips_other_files(tmp_path):
    write_imagefolder(str(tmp_path), classes=2, per_class=4, size=16)
    from PIL import Image

    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "train" / "class_00" / "red.PNG")
    (tmp_path / "train" / "class_00" / "big.JPEG").write_bytes(
        (tmp_path / "train" / "class_00" / "00001.jpg").read_bytes()
    )
    (tmp_path / "train" / "class_01" / "notes.txt").write_text("not an image")
    train, val, classes = build_datasets(classify_spec("imagefolder", tmp_path, image_size=16))
    assert classes == ["class_00", "class_01"]
    assert len(train) == 2 * 3 + 2 and len(val) == 2
    red, label = train[index_of(train, "class_00/red.PNG")]
    assert label == 0 and red.shape == (3, 16, 16)


def test_training_view_depends_only_on_seed_epoch_and_index(digits_folder):
    spec = classify_spec("imagefolder", digits_folder, image_size=24)
    train, _, _ = build_datasets(spec)
    again, _, _ = build_datasets(spec)
    assert torch.equal(train[7][0], train[7][0])
    assert all(torch.equal(train[i][0], again[i][0]) for i in range(20))
    again.set_epoch(1)
    assert sum(not torch.equal(train[i][0], again[i][0]) for i in range(20)) >= 18
    other_seed, _, _ = build_datasets(classify_spec("imagefolder", digits_folder, 1, image_size=24))
    assert sum(not torch.equal(train[i][0], other_seed[i][0]) for i in range(20)) >= 18


def test_evaluation_view_is_fixed_and_ignores_the_epoch(digits_folder):
    spec = classify_spec("imagefolder", digits_folder, image_size=24, eval_resize=28)
    _, val, _ = build_datasets(spec)
    first = [val[i][0] for i in range(10)]
    val.set_epoch(5)
    assert all(torch.equal(a, val[i][0]) for i, a in enumerate(first))


def test_training_without_augmentation_shows_the_evaluation_view(digits_folder):
    spec = classify_spec("imagefolder", digits_folder, image_size=24, augment=False)
    train, _, _ = build_datasets(spec)
    spec_val = classify_spec("imagefolder", digits_folder, image_size=24)
    _, val, _ = build_datasets(spec_val)
    # Same file through both: train/ index 0 is not in val/, so compare against a fresh decode.
    from wrn_cluster.data.transforms import decode, resize_center_crop

    path = digits_folder / "train" / train.index.paths[0].decode()
    expected = resize_center_crop(decode(path.read_bytes()), round(24 / 0.875), 24)
    assert torch.equal(train[0][0], expected)
    train.set_epoch(3)
    assert torch.equal(train[0][0], expected)
    assert val.augment is None


def test_batches_are_the_same_with_0_or_2_loader_workers(digits_folder):
    train, _, _ = build_datasets(classify_spec("imagefolder", digits_folder, image_size=32))
    train.set_epoch(2)

    def first_batches(workers: int) -> list:
        loader = DataLoader(train, batch_size=32, shuffle=False, num_workers=workers)
        return [batch for batch, _ in zip(loader, range(4), strict=False)]

    for (images_a, labels_a), (images_b, labels_b) in zip(
        first_batches(0), first_batches(2), strict=True
    ):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


def test_datasets_survive_pickling(digits_folder):
    train, val, _ = build_datasets(classify_spec("imagefolder", digits_folder, image_size=32))
    train.set_epoch(4)
    copy = pickle.loads(pickle.dumps(train))
    assert torch.equal(copy[3][0], train[3][0])
    assert torch.equal(pickle.loads(pickle.dumps(val))[3][0], val[3][0])


@pytest.mark.parametrize(
    "content",
    [b"\xff\xd8\xff not really a jpeg", b"", "truncated"],
    ids=["garbage", "empty", "truncated"],
)
def test_unreadable_image_gives_label_minus_one_not_a_crash(tmp_path, content):
    write_imagefolder(str(tmp_path), classes=2, per_class=6, size=32)
    victim = tmp_path / "train" / "class_01" / "00003.jpg"
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2] if content == "truncated" else content)
    for augment in (True, False):
        train, _, _ = build_datasets(
            classify_spec("imagefolder", tmp_path, image_size=32, augment=augment)
        )
        image, label = train[index_of(train, "class_01/00003.jpg")]
        assert label == -1
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and not image.any()
        assert train[index_of(train, "class_01/00004.jpg")][1] == 1


# ---------------------------------------------------------------------------------------------
# prepare(): synthetic data and checks


def test_prepare_writes_synthetic_data_when_the_folder_is_missing(tmp_path):
    url = tmp_path / "synth"
    synth = {"classes": 3, "per_class": 8, "size": 24, "val_fraction": 0.25}
    spec = classify_spec("imagefolder", url, image_size=16, synthesize=synth)
    prepare(spec)
    assert len(list((url / "train").glob("class_0*/*.jpg"))) == 3 * 6
    assert len(list((url / "val").glob("class_0*/*.jpg"))) == 3 * 2
    train, val, classes = build_datasets(spec)
    assert classes == ["class_00", "class_01", "class_02"]
    assert sorted({label for _, label in (train[i] for i in range(len(train)))}) == [0, 1, 2]
    # A second run keeps what is there.
    (url / "train" / "class_00" / "00005.jpg").unlink()
    prepare(spec)
    assert not (url / "train" / "class_00" / "00005.jpg").exists()


def test_prepare_fills_an_empty_folder(tmp_path):
    synth = {"classes": 2, "per_class": 4, "size": 16}
    prepare(classify_spec("imagefolder", tmp_path, image_size=16, synthesize=synth))
    assert len(list(tmp_path.glob("*/class_0*/*.jpg"))) == 8


def test_synthetic_data_is_the_same_for_the_same_seed(tmp_path):
    counts = write_imagefolder(str(tmp_path / "a"), classes=2, per_class=4, size=16, seed=3)
    write_imagefolder(str(tmp_path / "b"), classes=2, per_class=4, size=16, seed=3)
    write_imagefolder(str(tmp_path / "c"), classes=2, per_class=4, size=16, seed=4)
    assert counts == {"classes": 2, "train": 6, "val": 2}
    a, b, c = (tmp_path / n / "train" / "class_01" / "00002.jpg" for n in "abc")
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def _break(root: Path, how: str) -> str:
    """Damage a good imagefolder at root; return the text the error must name."""
    if how == "missing url":
        return str(root / "nowhere")
    write_imagefolder(str(root), classes=3, per_class=4, size=16)
    if how == "empty class folder":
        for image in (root / "train" / "class_01").iterdir():
            image.unlink()
        return f"{root}/train/class_01"
    if how == "no val split":
        for image in (root / "val").glob("*/*"):
            image.unlink()
        for folder in (root / "val").iterdir():
            folder.rmdir()
        (root / "val").rmdir()
        return "no val/ folder"
    if how == "no class folders":
        for image in (root / "train").glob("*/*"):
            image.unlink()
        for folder in (root / "train").iterdir():
            folder.rmdir()
        return f"{root}/train: no class folders"
    if how == "val class not in train":
        (root / "val" / "class_09").mkdir()
        (root / "val" / "class_01" / "00000.jpg").rename(root / "val" / "class_09" / "x.jpg")
        return f"{root}/val/class_09"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "missing url",
        "empty class folder",
        "no val split",
        "no class folders",
        "val class not in train",
    ],
)
def test_prepare_names_the_url_and_the_fix_for_a_broken_imagefolder(tmp_path, how):
    root = tmp_path / "data"
    named = _break(root, how)
    url = named if how == "missing url" else str(root)
    with pytest.raises(DataError) as caught:
        prepare(classify_spec("imagefolder", url, image_size=16))
    message = str(caught.value)
    assert url in message and named in message
    assert any(fix in message for fix in ("add ", "set ", "put ", "must use", "remove"))


@pytest.mark.parametrize(
    "dataset, writer, removed",
    [
        ("cifar10", lambda root: write_cifar10(root, 4), "data_batch_3"),
        ("cifar100", lambda root: write_cifar100(root, 4), "meta"),
        ("svhn", lambda root: write_svhn(root, 4), "test_32x32.mat"),
    ],
)
def test_prepare_names_a_missing_release_file(tmp_path, dataset, writer, removed):
    writer(tmp_path)
    prepare(classify_spec(dataset, tmp_path))
    (tmp_path / removed).unlink()
    with pytest.raises(DataError, match=f"{tmp_path}/{removed}: missing") as caught:
        prepare(classify_spec(dataset, tmp_path))
    assert "https://" in str(caught.value) or "http://" in str(caught.value)
    with pytest.raises(DataError, match="no such dataset folder"):
        prepare(classify_spec(dataset, tmp_path / "nowhere"))


def test_a_damaged_cifar_file_is_a_data_error(tmp_path):
    write_cifar10(tmp_path, 4)
    (tmp_path / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=f"{tmp_path}/data_batch_2: not a CIFAR"):
        build_datasets(classify_spec("cifar10", tmp_path))


# ---------------------------------------------------------------------------------------------
# CIFAR and SVHN


def test_cifar10_reads_the_five_batches_the_test_batch_and_the_names(tmp_path):
    written = write_cifar10(tmp_path, per_batch=6)
    train, val, classes = build_datasets(classify_spec("cifar10", tmp_path, augment=False))
    assert classes == written["classes"]
    assert (len(train), len(val)) == (30, 6)
    images, labels = written["data_batch_2"]
    image, label = train[6 + 1]
    assert torch.equal(image, torch.from_numpy(images[1])) and label == labels[1]
    images, labels = written["test_batch"]
    assert [val[i][1] for i in range(6)] == labels.tolist()
    assert torch.equal(val[5][0], torch.from_numpy(images[5]))


def test_cifar10_release_folder_inside_the_url_is_found(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=2)
    spec = classify_spec("cifar10", tmp_path)
    prepare(spec)
    train, val, _ = build_datasets(spec)
    assert (len(train), len(val)) == (10, 2)


def test_cifar100_uses_fine_labels_and_names(tmp_path):
    written = write_cifar100(tmp_path, n=20)
    train, val, classes = build_datasets(classify_spec("cifar100", tmp_path))
    assert classes == written["classes"] and len(classes) == 100
    assert [train[i][1] for i in range(20)] == written["train"][1].tolist()
    assert [val[i][1] for i in range(20)] == written["test"][1].tolist()
    assert torch.equal(val[3][0], torch.from_numpy(written["test"][0][3]))


def test_svhn_reads_mat_files_and_maps_label_10_to_digit_0(tmp_path):
    written = write_svhn(tmp_path, n=60)
    spec = classify_spec("svhn", tmp_path)
    assert not spec.augment  # the paper trains SVHN without augmentation
    train, val, classes = build_datasets(spec)
    assert classes == [str(d) for d in range(10)]
    assert (len(train), len(val)) == (60, 60)
    labels = [train[i][1] for i in range(60)]
    assert labels == written["train"][1].tolist() and 0 in labels and 10 not in labels
    for i in range(60):
        assert torch.equal(train[i][0], torch.from_numpy(written["train"][0][i]))
    assert torch.equal(val[9][0], torch.from_numpy(written["test"][0][9]))


def _pad_crop_flip_of(original: np.ndarray, seen: np.ndarray) -> tuple[int, int, bool] | None:
    padded = np.pad(original, ((0, 0), (4, 4), (4, 4)), mode="reflect")
    for top in range(9):
        for left in range(9):
            crop = padded[:, top : top + 32, left : left + 32]
            for flipped in (False, True):
                if np.array_equal(crop[:, :, ::-1] if flipped else crop, seen):
                    return top, left, flipped
    return None


def test_cifar_training_augmentation_is_reflect_pad_4_crop_and_flip(tmp_path):
    written = write_cifar10(tmp_path, per_batch=4)
    spec = classify_spec("cifar10", tmp_path)
    assert spec.augment
    train, val, _ = build_datasets(spec)
    originals = np.concatenate([written[f"data_batch_{b}"][0] for b in range(1, 6)])
    found = set()
    for epoch in range(3):
        train.set_epoch(epoch)
        for i in range(len(train)):
            image, _ = train[i]
            assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
            how = _pad_crop_flip_of(originals[i], image.numpy())
            assert how is not None, f"item {i} is not a padded crop of its image"
            found.add(how)
    offsets = {(top, left) for top, left, _ in found}
    assert {flipped for _, _, flipped in found} == {False, True}
    assert len(offsets) > 20 and any(0 in o or 8 in o for o in offsets)
    assert torch.equal(val[0][0], torch.from_numpy(written["test_batch"][0][0]))


def test_storage_takes_s3_settings_from_the_environment_only(monkeypatch):
    from wrn_cluster.data.storage import filesystem, s3_options

    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id-from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-env")
    options = s3_options()
    assert options["endpoint_url"] == "http://127.0.0.1:1"
    assert (options["key"], options["secret"]) == ("id-from-env", "secret-from-env")
    assert options["client_kwargs"] == {"region_name": "eu-west-3"}
    assert options["config_kwargs"]["request_checksum_calculation"] == "when_required"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    assert s3_options()["endpoint_url"] == "http://127.0.0.1:2"
    fs, path = filesystem("s3://bucket/some/prefix/")
    assert path == "bucket/some/prefix" and "s3" in fs.protocol
    fs, path = filesystem("file:///tmp/x/")
    assert path == "/tmp/x"
    monkeypatch.chdir("/tmp")
    assert filesystem("relative/data")[1] == "/tmp/relative/data"


def test_the_data_package_imports_neither_ray_nor_mlflow():
    code = (
        "import sys; import wrn_cluster.data as d; "
        "from wrn_cluster.data import cifar, imagefolder, storage, synthetic, transforms; "
        "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_cli_synth_imagefolder_writes_files_and_prints_counts(tmp_path):
    dest = tmp_path / "synth"
    command = [sys.executable, "-m", "wrn_cluster.cli", "data", "synth-imagefolder", str(dest)]
    options = ["--classes", "3", "--per-class", "10", "--size", "20", "--val-fraction", "0.2"]
    result = subprocess.run(
        [*command, *options, "--seed", "1"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "24 train and 6 val JPEGs (3 classes, 20x20)" in result.stdout
    assert len(list(dest.glob("train/class_0*/*.jpg"))) == 24
    assert len(list(dest.glob("val/class_0*/*.jpg"))) == 6
    bad = subprocess.run(
        [*command, "--val-fraction", "1.0"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert bad.returncode == 1 and "val_fraction" in bad.stderr and "Traceback" not in bad.stderr


def test_digits_helper_matches_sklearn(tmp_path):
    counts = write_digits_imagefolder(tmp_path, size=16)
    images, labels = digits(16)
    assert counts["train"] + counts["val"] == len(labels) == 1797
    assert images.shape == (1797, 16, 16, 3)


# ---------------------------------------------------------------------------------------------
# Speed paths: reduced-size JPEG decoding, the PIL fallback, workers that persist across epochs


def _photo_jpeg(width: int, height: int, **save) -> bytes:
    import io

    from PIL import Image
    from sklearn.datasets import load_sample_images

    photo = Image.fromarray(load_sample_images().images[0]).resize((width, height))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90, **save)
    return buffer.getvalue()


def test_a_large_jpeg_is_decoded_smaller_yet_gives_the_same_view():
    from wrn_cluster.data.transforms import RandomResizedCropFlip, decode, item_generator

    data = _photo_jpeg(1600, 1200)
    crop = RandomResizedCropFlip(48)
    assert decode(data, 150).shape == (3, 300, 400)  # 1/4 scale keeps twice 150 pixels
    assert decode(data, 75).shape == (3, 150, 200)
    assert decode(data).shape == (3, 1200, 1600)
    for index in range(12):
        fast = crop.decoded(data, item_generator(0, 0, index)).float()
        full = crop(decode(data), item_generator(0, 0, index)).float()
        assert fast.shape == full.shape == (3, 48, 48)
        # Same box (snapped to the smaller image's pixel grid) and flip: a few levels apart.
        assert (fast - full).abs().mean() < 8, index
        assert torch.corrcoef(torch.stack([fast.flatten(), full.flatten()]))[0, 1] > 0.99


def test_png_cmyk_and_grayscale_images_decode_to_rgb():
    import io

    from PIL import Image

    from wrn_cluster.data.transforms import RandomResizedCropFlip, decode, item_generator

    photo = Image.open(io.BytesIO(_photo_jpeg(64, 48)))
    encoded = {}
    for name, mode, fmt in (("png", "RGB", "PNG"), ("cmyk", "CMYK", "JPEG"), ("gray", "L", "JPEG")):
        buffer = io.BytesIO()
        photo.convert(mode).save(buffer, fmt)
        encoded[name] = buffer.getvalue()
    for name, data in encoded.items():
        image = decode(data)
        assert image.shape == (3, 48, 64) and image.dtype == torch.uint8, name
        view = RandomResizedCropFlip(16).decoded(data, item_generator(0, 0, 1))
        assert view.shape == (3, 16, 16), name


def test_persistent_loader_workers_see_each_new_epoch(digits_folder):
    train, _, _ = build_datasets(classify_spec("imagefolder", digits_folder, image_size=24))
    loader = DataLoader(train, batch_size=16, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in range(2):
        train.set_epoch(epoch)
        epochs.append(next(iter(loader))[0])
    fresh, _, _ = build_datasets(classify_spec("imagefolder", digits_folder, image_size=24))
    fresh.set_epoch(1)
    expected = torch.stack([fresh[i][0] for i in range(16)])
    assert not torch.equal(epochs[0], epochs[1])
    assert torch.equal(epochs[1], expected)


def test_s3_urls_become_bucket_and_key_as_s3fs_strips_them():
    """data.storage.s3_path wraps s3fs's private _strip_protocol: pinned here, so an s3fs upgrade
    that changes it fails in this test, not in every S3 job."""
    import s3fs

    from wrn_cluster.data.storage import s3_path

    fs = s3fs.S3FileSystem(anon=True, skip_instance_cache=True)
    assert s3_path(fs, "s3://bucket/data/imagenet/") == "bucket/data/imagenet"
    assert s3_path(fs, "s3a://bucket/key.tar") == "bucket/key.tar"
    assert s3_path(fs, "s3://bucket") == "bucket"
