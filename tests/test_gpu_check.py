"""scripts/gpu_check.sh, the device check of issue 19, rehearsed here (`--dry-run`) so that it cannot rot between the
sessions that are lent a GPU: every stage must run, the GPU-only parts must say why they skipped, and $OUT must hold
what the device tool brings back (at most 8 files, at most two folders deep)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="rehearses the check on a machine without a GPU")
def test_gpu_check_rehearsal_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    # as on the device: no interpreter, no benchmark sizes from outside (the rehearsal's own tiny ones apply)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("ELSFAST_BENCH_")}
    env["ELSFAST_PYTHON"] = sys.executable
    # 4x the rehearsal's 115 s: each stage's budget scales with it, so a busy CI machine does not time a stage out
    cmd = ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--budget", "460", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["environment", "build", "kernel-tests", "benchmarks"], done.stdout[-3000:]

    nvcc = shutil.which("nvcc") or os.environ.get("CUDA_HOME")
    expected_failures = [] if nvcc else ["build"]
    assert summary["failed_stages"] == expected_failures, done.stdout[-5000:]
    assert done.returncode == (1 if expected_failures else 0)
    assert summary["mode"] == "rehearsal" and summary["environment"]["cuda_available"] is False
    assert summary["elapsed_s"] < 460

    kernel_tests = stages["kernel-tests"]
    assert kernel_tests["by_marker"]["aot"]["passed"] >= 1, kernel_tests
    assert kernel_tests["by_marker"]["gpu"]["skipped"] >= 1 and not kernel_tests["by_marker"]["gpu"]["passed"]
    assert "gpu: skipped: no CUDA device" in kernel_tests["reason"]

    bench = json.loads((out / "kernels-benchmark.json").read_text())
    assert bench["machine_info"]["device"] and bench["machine_info"]["torch_cuda"] is None
    ran = {b["extra_info"].get("formulation", b["name"]): b["extra_info"] for b in bench["benchmarks"]}
    assert {"torch", "sdpa", "test_cifar_sample"} <= set(ran)
    assert ran["sdpa"]["sdpa_kernel"] in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
    assert ran["torch"]["train_images"] == int(summary["benchmark_sizes"]["ELSFAST_BENCH_TORCH_IMAGES"])
    for info in (ran["torch"], ran["sdpa"]):
        assert info["max_abs_deviation_from_float64"] < 1e-3
    skipped = {s["test"].split("[")[-1] for s in stages["benchmarks"]["tests"]["skips"]}
    assert {"3-triton]", "3-cuda]"} <= skipped

    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)
    log = (out / "gpu_check.log").read_text().splitlines()
    assert sum(line.startswith("=== ") and "(budget" in line for line in log) == 4
    assert "| kernel-tests |" in (out / "summary.md").read_text()
