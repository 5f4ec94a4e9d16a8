"""scripts/gpu_check.sh's CUDA-free parts, on a CPU (issue 33, item 5): the dry-run plan names every step, the
bundle it would carry and the pytest options that need no pytest-xdist; a step whose limit no longer fits before the
deadline is skipped and recorded so, never started and cut short. (The signature probe of varlen_attn and the GPU
batch arithmetic: tests/modeling/test_kernels.py.)"""

import json
import os
import re
import subprocess

from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def steps_of_script() -> list[str]:
    block = SCRIPT.read_text().split("STEPS=(", 1)[1].split("\n)\n", 1)[0]
    return re.findall(r'^  "([\w.]+)\|', block, flags=re.M)


def test_the_dry_run_plans_every_step_with_its_bundle(tmp_path):
    (tmp_path / "bundle" / "wheels").mkdir(parents=True)
    (tmp_path / "bundle" / "wheels" / "trl-1.12.0-py3-none-any.whl").write_bytes(b"")
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "BUNDLE": str(tmp_path / "bundle"), "GPU_CHECK_SECONDS": "480"})
    assert result.returncode == 0, result.stderr
    planned = re.findall(r"^\| \d+ \| ([\w.]+) \|", result.stdout, flags=re.M)
    assert planned == steps_of_script() and len(planned) >= 10
    assert f"bundle: {tmp_path / 'bundle'}/wheels" in result.stdout and "trl" in result.stdout
    tests_row = next(line for line in result.stdout.splitlines() if "| gpu_tests |" in line)
    assert "-p no:xdist -o addopts=" in tests_row  # the bundle has no pytest-xdist; pyproject's addopts need it
    assert "| decisions | 20 | 0 | runs |" in result.stdout
    assert "skipped unless earlier steps end early" in result.stdout  # the limits add up past 480 s


def test_a_step_that_no_longer_fits_is_recorded_as_skipped_not_cut_short(tmp_path):
    models = tmp_path / "models"
    for name in ("smollm2-135m", "smollm2-1.7b"):  # no setup: the steps are never started
        (models / name).mkdir(parents=True)
        (models / name / "model.safetensors").write_bytes(b"")
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "OUT": str(out), "MODELS": str(models), "GPU_CHECK_SECONDS": "15",
                                 "BUNDLE": str(tmp_path / "no-bundle")})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == steps_of_script()
    assert all(record["status"] == "skipped" and record["seconds"] == 0 for record in records)
    assert "left before the deadline" in records[0]["log"]
    assert "| decisions | skipped |" in (out / "gpu_check.md").read_text()
