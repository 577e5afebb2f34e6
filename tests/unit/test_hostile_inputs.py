"""Hostile and broken inputs: generated specs and overrides, and images that are not what their
names say, through the same entry points a user reaches (spec.parse, `wrn-cluster validate`,
data.prepare and the imagefolder dataset)."""

from __future__ import annotations

import copy
import io
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from wrn_cluster.cli import app
from wrn_cluster.data import DataError, build_datasets, prepare
from wrn_cluster.data.synthetic import write_imagefolder
from wrn_cluster.spec import ClassifyJob, SpecError, parse

# ---------------------------------------------------------------------------------------------
# Specs: whatever the YAML or the overrides, the answer is a spec or a SpecError


FIELDS = [
    "kind", "name", "seed", "model", "arch", "num_classes", "dropout", "data", "dataset", "url",
    "image_size", "batch_size", "synthesize", "classes", "per_class", "optimizer", "lr",
    "schedule", "epochs", "milestones", "warmup_epochs", "scaling", "workers", "checkpoint",
    "storage", "tracking", "registered_model", "tune", "space", "model.depth", "model.width",
    "grid", "choice", "uniform", "loguniform", "randint", "budget", "detector", "secret_key",
]  # fmt: skip
KINDS = ["classify", "detect", "tune", "Classify", ""]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(KINDS + ["wrn-28-10", "wrn-50-2", "wrn-0-0", "imagefolder", "cifar10"]),
    st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8), st.integers(-3, 3))
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=5)
    ),
    max_leaves=25,
)
# Start most trees from something close to a valid job, so validation goes deep.
BASE = {
    "kind": "classify",
    "name": "fuzz",
    "data": {"dataset": "imagefolder", "url": "/tmp/fuzz", "batch_size": 8},
    "schedule": {"epochs": 2, "milestones": [1]},
    "scaling": {"workers": 1},
}
jobs = st.one_of(
    trees,
    st.builds(lambda extra: {**BASE, **extra}, st.dictionaries(st.sampled_from(FIELDS), trees)),
    st.builds(
        lambda kind, tune: {**BASE, "kind": kind, "tune": tune},
        st.sampled_from(KINDS),
        st.dictionaries(st.sampled_from(["space", "budget", "num_samples", "scheduler"]), trees),
    ),
)
dotted = st.lists(st.sampled_from([*FIELDS, "", "..", "a b"]), min_size=1, max_size=4).map(".".join)
overrides = st.lists(
    st.one_of(
        st.builds(lambda k, v: f"{k}={v}", dotted, st.text(max_size=10)),
        st.builds(lambda k, v: f"{k}={yaml.safe_dump(v).strip()}", dotted, trees),
        st.text(max_size=15),
    ),
    max_size=4,
)
FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def _parses_or_spec_error(text: str, sets: list[str]) -> None:
    try:
        spec = parse(text, "fuzz.yaml", sets)
    except SpecError as error:
        assert error.problems and all(str(p) for p in error.problems)
    else:
        assert spec.kind in ("classify", "detect", "tune")


@FAST
@given(job=jobs, sets=overrides)
def test_generated_specs_and_overrides_give_a_spec_or_a_spec_error(job, sets):
    _parses_or_spec_error(yaml.safe_dump(job, allow_unicode=True), sets)


@FAST
@given(text=st.text(max_size=200))
def test_arbitrary_text_gives_a_spec_or_a_spec_error(text):
    _parses_or_spec_error(text, [])


LAUGHS = "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10)
)  # 10**10 values once expanded, from 700 bytes


@pytest.mark.parametrize(
    "text",
    [
        "kind: classify\x00\n",  # a NUL: yaml's reader refuses it
        "\ufeff\x85kind: classify",
        "[" * 1000,  # deeper than the parser's recursion (its scanner is quadratic in depth)
        "a: &a [*a]",  # an alias cycle
        "!!python/object:os.system {}",
        "? [a, b]\n: 1",  # a key yaml cannot hash
        "kind: classify\nname: x\ndata: {url: /d}\nschedule: {epochs: 1e999}",
        "kind: classify\nname: x\ndata: {url: /d}\n" + LAUGHS,
    ],
    ids=[
        "nul",
        "bom-nel",
        "deep",
        "alias-cycle",
        "python-tag",
        "list-key",
        "huge-float",
        "billion-laughs",
    ],
)
def test_hostile_yaml_is_a_spec_error_within_a_second(text):
    started = time.perf_counter()
    with pytest.raises(SpecError):
        parse(text, "hostile.yaml")
    assert time.perf_counter() - started < 1.0


@settings(max_examples=12, deadline=None, database=None)
@given(job=jobs)
def test_validate_never_prints_a_traceback(tmp_path_factory, job):
    spec_file = tmp_path_factory.mktemp("specs") / "job.yaml"
    spec_file.write_text(yaml.safe_dump(job, allow_unicode=True))
    result = CliRunner().invoke(app, ["validate", str(spec_file)])
    assert result.exit_code in (0, 1), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output


def test_validate_in_a_real_process_prints_problems_not_tracebacks(tmp_path):
    files = {
        "nul.yaml": b"kind: classify\x00\n",
        "latin1.yaml": "name: caf\xe9\n".encode("latin-1"),
        "deep.yaml": b"[" * 1000,
        "tag.yaml": b"!!python/object/apply:os.system ['true']\n",
        "list.yaml": b"- 1\n- 2\n",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    run = subprocess.run(
        [sys.executable, "-m", "wrn_cluster.cli", "validate", *sorted(files)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert "Traceback" not in run.stdout + run.stderr
    for name in files:
        assert name in run.stderr


# ---------------------------------------------------------------------------------------------
# Images: each is either read as a 3-channel image or skipped with label -1


def _jpeg(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **save)
    return buffer.getvalue()


def _declaring(jpeg: bytes, height: int, width: int) -> bytes:
    """The JPEG with its frame header (SOF0) claiming another size; the data stay small."""
    at = jpeg.index(b"\xff\xc0") + 5
    return jpeg[:at] + struct.pack(">HH", height, width) + jpeg[at + 4 :]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _blank_png(side: int) -> bytes:
    """A real, valid side x side black-and-white PNG, written row by row (a few KB per 1e8 px)."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + 1 bit per pixel
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _peak_rss_mb() -> int | None:
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) // 1024 for line in status if "VmHWM" in line)
    except (OSError, StopIteration):
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


NON_UTF8 = b"caf\xe9-latin1.jpg"


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory) -> dict:
    """A small imagefolder whose class_01 also holds every kind of odd image."""
    root = tmp_path_factory.mktemp("hostile")
    write_imagefolder(str(root), classes=2, per_class=8, size=24)
    folder = root / "train" / "class_01"
    good = (folder / "00002.jpg").read_bytes()
    photo = Image.open(io.BytesIO(good)).resize((40, 30))
    rng = np.random.default_rng(0)
    odd = {
        "random.jpg": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "truncated.jpg": good[: len(good) // 2],
        "declares-20000.jpg": _declaring(good, 20000, 20000),
        "bomb-20000.png": _blank_png(20000),
        "bomb-10000.png": _blank_png(10000),  # over PIL's limit, under the limit PIL enforces
        "one-pixel.jpg": _jpeg(Image.new("RGB", (1, 1), (200, 30, 30))),
        "cmyk.jpg": _jpeg(photo.convert("CMYK")),
        "gray.jpg": _jpeg(photo.convert("L")),
    }
    for name, content in odd.items():
        (folder / name).write_bytes(content)
    with open(os.path.join(os.fsencode(folder), NON_UTF8), "wb") as out:
        out.write(good)
    return {"root": root, "names": odd}


def _item(dataset, name: str):
    paths = [os.fsdecode(p) for p in dataset.index.paths]
    return dataset[paths.index(f"class_01/{name}")]


def hostile_spec(root: Path, augment: bool) -> ClassifyJob:
    return ClassifyJob.model_validate(
        {
            "kind": "classify",
            "name": "hostile",
            "model": {"arch": "wrn-16-2"},
            "data": {
                "dataset": "imagefolder",
                "url": str(root),
                "image_size": 16,
                "augment": augment,
            },
            "schedule": {"epochs": 2, "milestones": [1]},
        }
    )


def test_prepare_accepts_a_folder_of_odd_images_and_counts_them(hostile_folder):
    found = prepare(hostile_spec(hostile_folder["root"], augment=True))
    # 6 synthetic training images per class, plus the odd ones and the non-UTF-8 name.
    assert found.train_images == 2 * 6 + len(hostile_folder["names"]) + 1
    assert not found.synthetic


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("augment", [True, False], ids=["train-view", "eval-view"])
@pytest.mark.parametrize(
    "name",
    ["random.jpg", "truncated.jpg", "declares-20000.jpg", "bomb-20000.png", "bomb-10000.png"],
)
def test_unreadable_or_oversized_images_are_skipped_quickly_without_a_big_allocation(
    hostile_folder, name, augment
):
    train, _, _ = build_datasets(hostile_spec(hostile_folder["root"], augment))
    measured = _reset_peak_rss()
    before = _peak_rss_mb()
    started = time.perf_counter()
    image, label = _item(train, name)
    elapsed = time.perf_counter() - started
    assert label == -1
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and not image.any()
    assert elapsed < 2.0
    if measured:
        assert _peak_rss_mb() - before < 100  # decoded, 20000x20000 RGB would be 1.2 GB


@pytest.mark.parametrize("augment", [True, False], ids=["train-view", "eval-view"])
@pytest.mark.parametrize("name", ["one-pixel.jpg", "cmyk.jpg", "gray.jpg", NON_UTF8])
def test_odd_but_valid_images_load_as_three_channel_images_with_their_label(
    hostile_folder, name, augment
):
    train, _, _ = build_datasets(hostile_spec(hostile_folder["root"], augment))
    image, label = _item(train, os.fsdecode(name) if isinstance(name, bytes) else name)
    assert label == 1
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and image.any()
    if name == "gray.jpg":
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    if name == "one-pixel.jpg":
        assert image[0].float().mean() > 150 > image[1].float().mean()


def test_a_class_folder_whose_name_is_not_utf8_is_one_data_error(tmp_path):
    write_imagefolder(str(tmp_path), classes=2, per_class=4, size=16)
    for split in ("train", "val"):
        os.rename(
            os.path.join(os.fsencode(tmp_path), split.encode(), b"class_01"),
            os.path.join(os.fsencode(tmp_path), split.encode(), b"caf\xe9"),
        )
    with pytest.raises(DataError) as caught:
        prepare(hostile_spec(tmp_path, augment=False))
    message = str(caught.value)
    assert "caf\\xe9" in message and "not UTF-8" in message and "rename it" in message
    message.encode("utf-8")  # printable on any console


# ---------------------------------------------------------------------------------------------
# Spec values that become paths, URLs or shell words stay where they belong


def _job_text(**values) -> str:
    job = {
        "kind": "classify",
        "name": "safe",
        "data": {"url": "s3://datasets/imagenet"},
        "schedule": {"epochs": 2, "milestones": [1]},
        "checkpoint": {"storage": "s3://checkpoints/runs"},
    }
    for dotted_key, value in values.items():
        section, _, key = dotted_key.partition("__")
        if key:
            job[section] = {**job[section], key: value}
        else:
            job[section] = value
    return yaml.safe_dump(job)


@pytest.mark.parametrize(
    "field, url",
    [
        ("data__url", "s3://datasets/../private"),
        ("data__url", "s3://datasets/imagenet/%2E%2E/%2e%2e/private"),
        ("data__url", "file:///srv/data/./../etc"),
        ("checkpoint__storage", "s3://checkpoints/runs/.."),
        ("checkpoint__storage", "s3://checkpoints\\..\\other"),
    ],
)
def test_urls_may_not_climb_out_of_their_prefix(field, url):
    with pytest.raises(SpecError) as caught:
        parse(_job_text(**{field: url}), "job.yaml")
    (problem,) = caught.value.problems
    assert problem.field == field.replace("__", ".")
    assert "'..' segments are not allowed" in problem.message and repr(url) in problem.message


def test_local_relative_paths_are_resolved_from_where_the_command_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = parse(_job_text(data__url="../shared/data", checkpoint__storage="runs/../ckpt"))
    assert spec.data.url == str(tmp_path.parent / "shared" / "data")
    assert spec.checkpoint.storage == str(tmp_path / "ckpt")


@pytest.mark.parametrize(
    "name",
    ["../escape", "a/b", "/abs", "x;rm -rf ~", "$(id)", "`id`", "a b", "job\n", ".hidden", "-rf"],
)
def test_job_names_hold_no_path_separators_or_shell_metacharacters(name):
    with pytest.raises(SpecError) as caught:
        parse(_job_text(name=name))
    (problem,) = caught.value.problems
    assert problem.field == "name" and "[A-Za-z0-9]" in problem.message


def test_a_plain_job_name_with_dots_dashes_and_underscores_is_fine():
    assert parse(_job_text(name="wrn-28-10_cifar10.v2")).name == "wrn-28-10_cifar10.v2"


@pytest.mark.parametrize("experiment", ["../../outside", "/etc", "a/b", "..", "."])
def test_experiment_names_keep_their_artifacts_in_one_folder_under_the_home(tmp_path, experiment):
    from urllib.parse import unquote, urlparse

    from wrn_cluster.tracking import artifact_location

    root = tmp_path / "mlartifacts"
    folder = Path(unquote(urlparse(artifact_location(str(root), experiment)).path))
    assert folder.parent == root and folder.name not in (".", "..")


# ---------------------------------------------------------------------------------------------
# COCO annotation files: missing keys, wrong types, NaN/negative boxes, unsafe file names


def _coco_doc() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "b/c.jpg", "width": 32, "height": 32},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [1.0, 2.0, 10.0, 12.0]},
            {"id": 11, "image_id": 2, "category_id": 5, "bbox": [0, 0, 31, 31], "iscrowd": 0},
        ],
        "categories": [{"id": 3, "name": "square"}, {"id": 5, "name": "disc"}],
    }


ODD_VALUES = st.sampled_from(
    [None, float("nan"), float("inf"), -float("inf"), -1, -1e9, 0, 1e308, True, "1", "", [], {},
     [1, 2], [float("nan")] * 4, [1, 2, -3, 4], [1, 2, 3, float("nan")], {"id": 1}, "../../x"]
)  # fmt: skip


def _paths(value, prefix=()):
    """Every (path, container) place in a JSON document, for mutations."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


def _mutate(doc: dict, path: tuple, how: str, new) -> dict:
    if not path:
        return new if how == "set" else doc
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if how == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return doc


@FAST
@given(data=st.data())
def test_broken_coco_annotations_give_checked_annotations_or_one_data_error(data):
    from wrn_cluster.data import coco

    doc = _coco_doc()
    for _ in range(data.draw(st.integers(1, 3))):
        places = list(_paths(doc))
        path = data.draw(st.sampled_from(places))
        how = data.draw(st.sampled_from(["set", "delete"] if path else ["set"]))
        doc = _mutate(doc, path, how, copy.deepcopy(data.draw(ODD_VALUES)))
    try:
        checked = coco.check(doc, "fuzz.json")
    except DataError as error:
        assert str(error).startswith("fuzz.json: ") and "\n" not in str(error)
    else:  # what passes is usable: finite boxes of known images and categories
        categories = {c["id"] for c in checked.doc["categories"]}
        images = {i["id"] for i in checked.doc["images"]}
        for annotation in checked.doc["annotations"]:
            assert annotation["image_id"] in images and annotation["category_id"] in categories
            x, y, w, h = annotation["bbox"]
            assert all(v == v and abs(v) != float("inf") for v in (x, y, w, h)) and w >= 0 <= h


@pytest.mark.parametrize(
    ("change", "where", "says"),
    [
        (lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 4]), "annotations[0].bbox",
         "is not [x, y, width, height]"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, -5, 4]), "annotations[0].bbox",
         "has a negative size"),
        (lambda d: d["annotations"][1].pop("category_id"), "annotations[1].category_id",
         "None is not in categories"),
        (lambda d: d["annotations"][1].update(image_id=[2]), "annotations[1].image_id",
         "[2] is not the id of any image"),
        (lambda d: d["images"][0].pop("width"), "images[0].width", "missing or not a positive"),
        (lambda d: d.pop("categories"), "categories", "missing or not a list"),
        (lambda d: d["images"][1].update(file_name="../../etc/passwd"), "images[1].file_name",
         "is not a path inside the images folder"),
        (lambda d: d["images"][1].update(file_name="/etc/passwd"), "images[1].file_name",
         "is not a path inside the images folder"),
    ],
)  # fmt: skip
def test_each_broken_coco_field_is_named_with_its_json_path(change, where, says):
    from wrn_cluster.data import coco

    doc = _coco_doc()
    change(doc)
    with pytest.raises(DataError) as caught:
        coco.check(doc, "instances.json")
    assert str(caught.value).startswith(f"instances.json: {where}: "), caught.value
    assert says in str(caught.value)


@pytest.mark.parametrize(
    "text", [b"", b"{", b"\xff\xfe\x00garbage", b"[" * 100_000 + b"]" * 100_000, b'{"images": NaN}']
)
def test_an_annotation_file_that_is_not_json_is_one_data_error(tmp_path, text):
    from wrn_cluster.data import coco

    (tmp_path / "instances.json").write_bytes(text)
    with pytest.raises(DataError, match=r"instances.json: (not valid JSON|images: missing)"):
        coco.read(str(tmp_path), "instances.json")


@pytest.mark.parametrize(
    "field", ["train_annotations", "val_annotations", "train_images", "val_images"]
)
@pytest.mark.parametrize("path", ["../secrets.json", "/etc/passwd", "a/./b", "s3://x/y", "~/z"])
def test_detection_paths_stay_inside_the_dataset_root(field, path):
    job = {"kind": "detect", "name": "safe", "data": {"url": "s3://datasets/coco", field: path}}
    with pytest.raises(SpecError) as caught:
        parse(yaml.safe_dump(job), "job.yaml")
    (problem,) = caught.value.problems
    assert problem.field == f"data.{field}" and "a path inside data.url is expected" in (
        problem.message
    )
