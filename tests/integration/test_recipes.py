"""The two ImageNet recipes of jobs/ (torchvision's V2 and the short FFCV/Composer-style one)
run end to end on a real local Ray, at tiny sizes on sklearn's digits, with every option they
name active and each read as its job reads ImageNet (the V2 recipe from files, the short one from
packed shards); a run whose worker is SIGKILLed inside an epoch resumes to the same final
weights, the weights' moving average (EMA) included, as an uninterrupted one."""

from pathlib import Path

import pytest
import torch
import yaml

from tests.util import as_spec, final_state, submit_killing_a_worker
from tests.util import digits as digits
from wrn_cluster import driver
from wrn_cluster.data import shards

pytestmark = pytest.mark.slow

JOBS = Path(__file__).parents[2] / "jobs"


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=4, object_store_memory=128 * 1024**2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def packed_digits(digits, tmp_path_factory):
    """The digits packed into shards, as `wrn-cluster data pack` writes them."""
    dst = tmp_path_factory.mktemp("digits-shards")
    shards.pack_here(str(digits), str(dst), 400)
    return dst


def tiny(job_file: str, data_url: Path, storage: Path, name: str) -> dict:
    """The recipe as written, at the digits' size: a small ImageNet-family WRN, 32-48 px, two
    CPU workers, two epochs of 45 steps, fp32 (bitwise reproducible on the CPU). The data is
    read in the job's own format: ``data_url`` is the digits' folder or their shards."""
    job = yaml.safe_load((JOBS / job_file).read_text())
    data = job["data"]
    data.update(
        url=str(data_url),
        batch_size=32,
        loader_workers=1,
        image_size=48 if data.get("progressive") else 32,
        eval_size=40,
        eval_resize=44,
    )
    data.pop("shard_cache_limit", None)
    if data.get("format") == "shards":  # each run's cache apart from the other's
        data["shard_cache"] = str(storage / "shard-cache")
    if data.get("progressive"):  # 32 px, then 48: the size changes between the two epochs
        data["progressive"] = {"start": 32, "end": 48, "from_epoch": 0, "to_epoch": 1}
        data["progressive"]["multiple"] = 16
    job["name"] = name
    job["model"]["arch"] = "wrn-18-0.5"
    job["optimizer"].update(lr=0.05, scale_lr_with_batch=False)
    job["schedule"].update(epochs=2, warmup_epochs=0.5)
    job["schedule"].pop("stop_at", None)  # both epochs run (stop_at: tests/integration/...)
    job["ema"].update(every_steps=4, warmup_steps=8)
    job["precision"] = {"dtype": "fp32", "channels_last": False}
    job["scaling"] = {"workers": 2}
    job["checkpoint"] = {"storage": str(storage), "every_steps": 10, "max_failures": 2, "keep": 2}
    job["tracking"] = {"enabled": False}
    return job


@pytest.mark.parametrize("job_file", ["imagenet_wrn50_2_tv2.yaml", "imagenet_wrn50_2_fast.yaml"])
def test_a_recipe_runs_with_every_option_and_resumes_after_a_sigkill_to_the_same_weights(
    job_file, digits, packed_digits, tmp_path, local_ray
):
    as_written = yaml.safe_load((JOBS / job_file).read_text())["data"].get("format", "files")
    source = packed_digits if as_written == "shards" else digits
    reference = tiny(job_file, source, tmp_path / "ref", "ref")
    spec = as_spec(reference)
    assert len(spec.recipe()) >= 6, spec.recipe()  # the recipe's options are all on
    driver.prepare(spec)
    result = driver.run(spec)
    assert result.metrics["epoch"] == 2
    for key in ("val_top1", "val_top1_ema", "val_loss_ema"):
        assert 0.0 <= result.metrics[key] <= (1.0 if "top1" in key else 50.0), result.metrics

    faulty = tiny(job_file, source, tmp_path / "faulty", "faulty")
    killed, returncode, output = submit_killing_a_worker(
        faulty, tmp_path / "faulty.yaml", tmp_path / "faulty" / "faulty"
    )
    assert killed and returncode == 0, output
    resumed, uninterrupted = (
        final_state(tmp_path / "faulty", "faulty"),
        final_state(tmp_path / "ref", "ref"),
    )
    assert len(resumed["resumes"]) == 1 and "resumed in epoch" in output, output
    assert resumed["step"] == uninterrupted["step"] == 2 * 45
    assert resumed["ema_updates"] == uninterrupted["ema_updates"] > 1
    for part in ("model", "ema"):
        for key, tensor in uninterrupted[part].items():
            assert torch.equal(resumed[part][key], tensor), (part, key)
