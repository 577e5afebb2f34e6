"""The bench that starts a local Ray (Ray Train vs plain DDP) on tiny sizes, ending with its
ratio line; how fast is never asserted. The other benches are in tests/unit/test_bench.py."""

import pytest

from tests.unit.test_bench import assert_ratio, bench


@pytest.mark.slow
def test_ray_overhead_bench_prints_the_ratio_of_ray_train_to_plain_ddp(tmp_path):
    written = tmp_path / "ray.json"
    stdout, _ = bench(
        "ray-overhead", "--model", "wrn-10-1", "--images", "48", "--size", "16",
        "--batch", "16", "--rounds", "1", "--json", str(written),
        timeout=240,
    )  # fmt: skip
    result = assert_ratio(stdout, "ray-overhead", written)
    assert result["settings"]["workers"] == 2
    assert set(result["extra"]["job_wall_s_median"]) == {"ray", "plain"}


@pytest.mark.slow
def test_input_storage_bench_reads_moto_s3_per_image_and_as_shards(tmp_path):
    written = tmp_path / "storage.json"
    stdout, _ = bench(
        "input-storage", "--images", "24", "--size", "32", "--batch", "8",
        "--images-per-shard", "8", "--delays-ms", "0", "--delay-ms", "5", "--rounds", "1",
        "--json", str(written),
        timeout=240,
    )  # fmt: skip
    result = assert_ratio(stdout, "input-storage", written)
    assert result["settings"]["delays_ms"] == [0, 5]
    assert {
        "shards, disk img/s",
        "per-image, S3 +0 ms img/s",
        "shards / per-image at +5 ms",
    } <= set(result["extra"])
    assert result["extra"]["jpeg_kb"] > 50  # photo-sized files, not synthetic patterns
