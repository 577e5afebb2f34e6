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
