"""Job specs: jobs/ validate, bad specs give exact one-line errors, overrides, schema."""

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from wrn_cluster.spec import SpecError, json_schema, load, parse

ROOT = Path(__file__).resolve().parents[2]
GOOD = """\
kind: classify
name: digits
model:
  arch: wrn-16-2
data:
  dataset: imagefolder
  url: /data/digits
  image_size: 32
  batch_size: 64
schedule:
  epochs: 10
  milestones: [5, 8]
"""


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_is_valid(path):
    spec = load(path)
    assert spec.name


def test_defaults_are_the_papers_cifar_recipe():
    spec = parse("kind: classify\nname: c\ndata: {dataset: cifar10, url: /d}\n")
    assert (spec.optimizer.lr, spec.optimizer.momentum, spec.optimizer.nesterov) == (0.1, 0.9, True)
    assert (spec.optimizer.weight_decay, spec.data.batch_size) == (5e-4, 128)
    assert (spec.schedule.epochs, spec.schedule.milestones, spec.schedule.gamma) == (
        200,
        [60, 120, 160],
        0.2,
    )
    assert spec.image_size == 32 and spec.augment


# Each bad spec, as a change to GOOD (or whole text), and the exact lines it must print.
BAD = {
    "unknown key suggests the closest": (
        GOOD.replace("  batch_size: 64", "  batch_szie: 64"),
        ["bad.yaml:9: data.batch_szie: unknown key 'batch_szie'; did you mean 'batch_size'?"],
    ),
    "unknown top-level key lists the keys": (
        GOOD + "flavour: vanilla\n",
        [
            "bad.yaml:13: flavour: unknown key 'flavour'; allowed keys: name, seed, model, "
            "optimizer, schedule, precision, scaling, checkpoint, tracking, ema, kind, data"
        ],
    ),
    "bad arch lists valid depths": (
        GOOD.replace("wrn-16-2", "wrn-29-2"),
        [
            "bad.yaml:4: model.arch: model 'wrn-29-2': depth 29 is not valid; CIFAR/SVHN depths "
            "are 6n+4: 10, 16, 22, 28, 40, 52 (any 6n+4 except 34); ImageNet depths are 18, 34 "
            "(basic) and 50, 101 (bottleneck) (got 'wrn-29-2')"
        ],
    ),
    "wrong type names value": (
        GOOD.replace("batch_size: 64", "batch_size: lots"),
        [
            "bad.yaml:9: data.batch_size: input should be a valid integer, unable to parse "
            "string as an integer (got 'lots')"
        ],
    ),
    "enum lists choices": (
        GOOD.replace("imagefolder", "mnist"),
        [
            "bad.yaml:6: data.dataset: input should be 'imagefolder', 'cifar10', 'cifar100' or "
            "'svhn' (got 'mnist')"
        ],
    ),
    "milestone past the end": (
        GOOD.replace("[5, 8]", "[5, 12]"),
        [
            "bad.yaml:12: schedule.milestones: milestones [12] are not before the last epoch "
            "(10); use milestones below schedule.epochs"
        ],
    ),
    "warmup as long as training": (
        GOOD + "  warmup_epochs: 10\n",
        [
            "bad.yaml:13: schedule.warmup_epochs: warmup of 10.0 epochs is not shorter than "
            "training (10 epochs)"
        ],
    ),
    "image too small for an ImageNet net": (
        GOOD.replace("wrn-16-2", "wrn-50-2").replace("image_size: 32", "image_size: 16"),
        [
            "bad.yaml:8: data.image_size: 16px is smaller than wrn-50-2's total stride (32); "
            "use at least 32"
        ],
    ),
    "cifar is 32px": (
        GOOD.replace("imagefolder", "cifar10").replace("image_size: 32", "image_size: 64"),
        [
            "bad.yaml:8: data.image_size: cifar10 images are 32x32; got 64, set it to 32 or "
            "leave it out"
        ],
    ),
    "batch does not split over workers": (
        GOOD.replace("batch_size: 64", "batch_size: 63") + "scaling:\n  workers: 2\n",
        [
            "bad.yaml:9: data.batch_size: 63 does not split evenly over 2 workers x 1 "
            "accumulation steps; use a multiple of 2"
        ],
    ),
    "elastic range upside down": (
        GOOD + "scaling:\n  workers: {min: 3, max: 1}\n",
        ["bad.yaml:14: scaling.workers.max: 1 is below min 3; set max >= min"],
    ),
    "elastic range wider than the batch": (
        GOOD + "scaling:\n  workers: {min: 1, max: 100}\n",
        [
            "bad.yaml:9: data.batch_size: 64 does not give each of up to 100 workers a share "
            "of 1 equal micro-batches; use a multiple of 1 of at least 100"
        ],
    ),
    "elastic shards need equal shares": (
        GOOD.replace("  image_size: 32", "  format: shards\n  image_size: 32")
        + "scaling:\n  workers: {min: 2, max: 3}\n",
        [
            "bad.yaml:10: data.batch_size: 64 does not split evenly over 3 workers x 1 "
            "accumulation steps, a size the elastic range 2-3 can take, and this reader needs "
            "equal shares; use a multiple of 6, or a narrower range"
        ],
    ),
    "no workers": (
        GOOD + "scaling:\n  workers: 0\n",
        ["bad.yaml:14: scaling.workers: 0 workers; use 1 or more, or {min: 1, max: N} (got 0)"],
    ),
    "negative learning rate": (
        GOOD + "optimizer:\n  lr: -0.1\n",
        ["bad.yaml:14: optimizer.lr: input should be greater than 0 (got -0.1)"],
    ),
    "missing data section": (
        "kind: classify\nname: x\n",
        ["bad.yaml:1: data: required, but missing; add it"],
    ),
    "unknown kind": (
        GOOD.replace("kind: classify", "kind: segment"),
        ["bad.yaml:1: kind: got 'segment'; kind must be one of classify, detect, tune"],
    ),
    "secret key is refused": (
        GOOD + "  aws_secret_access_key: abc\n",
        [
            "bad.yaml:13: schedule.aws_secret_access_key: credentials never live in a spec; remove "
            "this key and set them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "MLFLOW_TRACKING_TOKEN) or the cluster's secrets"
        ],
    ),
    "password in a URL is refused": (
        GOOD.replace("/data/digits", "s3://me:hunter2@bucket/digits"),
        [
            "bad.yaml:7: data.url: this value looks like a URL with a password in it; "
            "credentials never live in a spec: set them in the environment or the cluster's "
            "secrets"
        ],
    ),
    "yaml syntax error gives line and column": (
        GOOD.replace("  arch: wrn-16-2", "  arch: [wrn-16-2"),
        [
            "bad.yaml:5: YAML syntax error at line 5, column 5: expected ',' or ']', but got "
            "':'; fix the indentation or quoting there"
        ],
    ),
    "two problems, two lines": (
        GOOD.replace("batch_size: 64", "batch_size: 0").replace("arch: wrn-16-2", "arch: vgg"),
        [
            "bad.yaml:4: model.arch: unknown model 'vgg': names are wrn-DEPTH-WIDTH, e.g. "
            "wrn-28-10 or wrn-50-2 (see `wrn-cluster models list`) (got 'vgg')",
            "bad.yaml:9: data.batch_size: input should be greater than or equal to 1 (got 0)",
        ],
    ),
    "not a mapping": (
        "- just\n- a list\n",
        ["bad.yaml:1: a job spec is a YAML mapping with at least kind, name, data"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_spec_gives_exact_error(case):
    text, expected = BAD[case]
    with pytest.raises(SpecError) as caught:
        parse(text, "bad.yaml")
    assert [str(p) for p in caught.value.problems] == expected


@pytest.mark.parametrize("case", ["unknown key suggests the closest", "two problems, two lines"])
def test_validate_command_prints_errors_without_traceback(case, tmp_path):
    text, expected = BAD[case]
    (tmp_path / "bad.yaml").write_text(text)
    (tmp_path / "good.yaml").write_text(GOOD)
    run = subprocess.run(
        [sys.executable, "-m", "wrn_cluster.cli", "validate", "good.yaml", "bad.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert run.stderr.splitlines() == expected
    assert "Traceback" not in run.stderr + run.stdout
    assert "good.yaml: ok" in run.stdout


def test_overrides_apply_and_are_validated():
    spec = parse(GOOD, "s.yaml", ["optimizer.lr=0.05", "scaling.workers=4", "model.dropout=0.3"])
    assert (spec.optimizer.lr, spec.scaling.workers, spec.model.dropout) == (0.05, 4, 0.3)
    with pytest.raises(SpecError) as caught:
        parse(GOOD, "s.yaml", ["optimizer.lr=fast"])
    assert [str(p) for p in caught.value.problems] == [
        "--set: optimizer.lr: input should be a valid number, unable to parse string as a "
        "number (got 'fast')"
    ]
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        parse(GOOD, "s.yaml", ["optimizer.lr"])


def test_schema_command_matches_the_models():
    run = subprocess.run(
        [sys.executable, "-m", "wrn_cluster.cli", "schema"], capture_output=True, text=True
    )
    assert run.returncode == 0
    schema = json.loads(run.stdout)
    assert schema == json_schema()
    import yaml

    jsonschema.validate(yaml.safe_load(GOOD), schema)
    for path in (ROOT / "jobs").glob("*.yaml"):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {"kind": "classify", "name": "x", "data": {"url": "/d", "nope": 1}}, schema
        )


def test_shards_are_read_for_every_classification_dataset_but_not_synthesized():
    good = parse(
        "kind: classify\nname: s\nmodel: {arch: wrn-50-2}\n"
        "data: {dataset: imagefolder, format: shards, url: s3://datasets/imagenet-shards}\n"
    )
    assert (good.data.format, good.data.canonical_nodes) == ("shards", 8)
    cifar = parse("kind: classify\nname: s\ndata: {dataset: cifar10, format: shards, url: /d}\n")
    assert (cifar.data.format, cifar.image_size) == ("shards", 32)
    with pytest.raises(SpecError, match="data.synthesize: synthetic data is written as files"):
        parse(
            "kind: classify\nname: s\nmodel: {arch: wrn-50-2}\ndata: {dataset: imagefolder, "
            "format: shards, url: /d, synthesize: {classes: 2}}\n",
            "s.yaml",
        )
    with pytest.raises(SpecError, match="'lots' is not a size; write it like 500mb, 200gb"):
        parse(
            "kind: classify\nname: s\nmodel: {arch: wrn-50-2}\ndata: {dataset: imagefolder, "
            "format: shards, url: /d, shard_cache_limit: lots}\n",
            "s.yaml",
        )


def test_an_elastic_range_is_a_worker_count_between_min_and_max():
    spec = parse(GOOD + "scaling:\n  workers: {min: 1, max: 3}\n", "s.yaml")
    scaling = spec.scaling
    assert (scaling.elastic, scaling.min_workers, scaling.max_workers) == (True, 1, 3)
    assert scaling.describe() == "1-3 (elastic)"
    # Files split a batch of 64 over 3 workers as 22, 21 and 21 (the loss weighs each share).
    assert spec.worker_batch(3) == 22 and spec.worker_batch(1) == 64
    fixed = parse(GOOD, "s.yaml").scaling
    assert (fixed.elastic, fixed.min_workers, fixed.max_workers, fixed.describe()) == (
        False,
        2,
        2,
        "2",
    )
    again = parse(GOOD, "s.yaml", ["scaling.workers={min: 2, max: 4}"])
    assert again.scaling.describe() == "2-4 (elastic)"


def test_a_field_error_survives_pickling_as_ray_sends_a_workers_error():
    import pickle

    from wrn_cluster.spec.sections import FieldError

    error = pickle.loads(pickle.dumps(FieldError("data.url", "no such folder")))
    assert (error.field, error.message, str(error)) == (
        "data.url",
        "no such folder",
        "no such folder",
    )
