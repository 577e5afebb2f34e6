"""Each bench runs on tiny sizes and ends with its ratio line; how fast is never asserted. The
bench that starts a local Ray is in tests/integration/test_bench.py."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RATIO_LINE = re.compile(r"^(?P<name>[a-z-]+): ratio (?P<ratio>\d+\.\d\d) \(project vs baseline\)$")


def bench(*args: str, timeout: int = 120) -> tuple[str, str]:
    """Run `wrn-cluster bench ARGS`; return (stdout, stderr), failing on a non-zero exit."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "-m", "wrn_cluster.cli", "bench", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, result.stderr


def assert_ratio(stdout: str, name: str, written: Path) -> dict:
    last = stdout.strip().splitlines()[-1]
    match = RATIO_LINE.match(last)
    assert match and match["name"] == name, stdout
    result = json.loads(written.read_text())
    assert result["bench"] == name and f"{result['ratio']:.2f}" == match["ratio"]
    assert result["baseline"]["median"] > 0 and result["project"]["median"] > 0
    assert len(result["round_ratios"]) == result["settings"]["rounds"]
    return result


def test_train_step_bench_prints_the_ratio_and_the_table_lists_it(tmp_path):
    written = tmp_path / "train-step.json"
    stdout, _ = bench(
        "train-step", "--model", "wrn-10-1", "--batch", "4", "--rounds", "2", "--steps", "1",
        "--json", str(written),
    )  # fmt: skip
    result = assert_ratio(stdout, "train-step", written)
    assert result["settings"]["model"] == "wrn-10-1" and result["settings"]["device"] == "cpu"
    assert result["extra"]["gmacs_per_image"] > 0 and result["extra"]["project_tflops"] > 0
    assert "reference" in stdout and "wrn_cluster.train.classify" in stdout
    table, _ = bench("table", str(written), str(written))
    rows = [line for line in table.splitlines() if line.startswith("| train-step")]
    assert len(rows) == 2 and "model wrn-10-1" in rows[0]


def test_train_step_bench_measures_a_chosen_precision_in_cpu_seconds(tmp_path):
    written = tmp_path / "fp32.json"
    stdout, _ = bench(
        "train-step", "--model", "wrn-10-1", "--image-size", "16", "--batch", "2",
        "--rounds", "1", "--steps", "1", "--dtype", "fp32", "--nchw", "--threads", "1",
        "--cpu-time", "--json", str(written),
    )  # fmt: skip
    result = assert_ratio(stdout, "train-step", written)
    assert result["settings"]["precision"] == {
        "dtype": "fp32",
        "channels_last": False,
        "compile": False,
    }
    assert "step: fp32, NCHW, eager, SGD (fused)" in result["project"]["description"]
    assert result["unit"] == "img/CPU-s" and result["settings"]["threads"] == 1


def test_train_step_bench_refuses_the_fp16_baseline_on_the_cpu():
    result = subprocess.run(
        [sys.executable, "-m", "wrn_cluster.cli", "bench", "train-step", "--device", "cpu",
         "--baseline", "fp16", "--model", "wrn-10-1"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "CUDA only" in result.stderr and "Traceback" not in result.stderr


def test_input_bench_prints_the_ratio_over_real_photo_jpegs(tmp_path):
    written = tmp_path / "input.json"
    stdout, stderr = bench(
        "input", "--images", "16", "--size", "32", "--batch", "8", "--rounds", "2",
        "--json", str(written),
    )  # fmt: skip
    result = assert_ratio(stdout, "input", written)
    assert result["unit"] == "img/s/core" and result["settings"]["images"] == 16
    assert "wrote 16 photo JPEGs" in stderr


def test_photo_jpegs_are_real_photographs_of_imagenet_size(tmp_path):
    from PIL import Image

    from wrn_cluster.bench.input_pipeline import write_photo_jpegs

    root = write_photo_jpegs(tmp_path, 12, seed=1)
    files = sorted((root / "train").glob("*/*.jpg"))
    assert len(files) == 12 and {f.parent.name for f in files} == {"china", "flower"}
    for path in files:
        with Image.open(path) as image:
            assert image.format == "JPEG" and max(image.size) == 500
            assert min(image.size) in (333, 375)
            # A photograph, not a flat synthetic pattern: many distinct colours.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 5000


def test_the_bench_package_imports_neither_ray_nor_mlflow():
    code = (
        "import sys; from wrn_cluster.bench import common, input_pipeline, ray_overhead, "
        "train_step; print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_gpu_script_is_valid_bash_and_runs_both_networks():
    script = ROOT / "bench" / "gpu.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    assert "wrn-50-2" in text and "wrn-28-10" in text and "markdown_table" in text


def test_tracking_overhead_bench_prints_its_ratio(tmp_path):
    written = tmp_path / "tracking.json"
    out, _ = bench(
        "tracking-overhead", "--model", "wrn-10-1", "--size", "16", "--batch", "8",
        "--steps", "4", "--rounds", "2", "--json", str(written),
    )  # fmt: skip
    result = assert_ratio(out, "tracking-overhead", written)
    assert result["extra"]["values_logged"] == 2 * (2 * 4 + 2)


def test_a_result_keeps_its_ratio_unrounded_so_the_table_prints_what_the_line_did(tmp_path):
    from wrn_cluster.bench.common import Comparison, Variant

    # 0.955049 prints as 0.96; rounded to 4 places first (0.955) it would print 0.95.
    result = Comparison(
        bench="b", unit="img/s", baseline=Variant("baseline", "", [100.0]),
        project=Variant("project", "", [95.5049]), settings={}, machine={"summary": "here"},
    )  # fmt: skip
    result.write_json(tmp_path / "b.json")
    written = json.loads((tmp_path / "b.json").read_text())
    assert result.lines()[-1] == "b: ratio 0.96 (project vs baseline)"
    assert f"{written['ratio']:.2f}" == "0.96"
