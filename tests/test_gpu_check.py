"""scripts/gpu_check.sh, the device check of issues 19 and 24, rehearsed here (`--dry-run`) so that it cannot rot
between the sessions that are lent a GPU, in a virtual environment that mirrors the device image: torch (2.13 CPU
stands in for the image's 2.11, which the package index here lacks), triton 3.6, pybind11, pytest,
pytest-benchmark, numpy, tqdm, pillow, and none of hypothesis, matplotlib, faiss, diffusers. Every stage must run,
no selected test may fail to import, the Triton launcher and tuning code must run through the interpreter, the
GPU-only parts must say why they skipped, and $OUT must hold what the device tool brings back (at most 8 files, at
most two folders deep).

The environment is built in a temporary folder (about 45 s from the package index), or kept between runs in
$ELSFAST_IMAGE_VENV (outside the checkout), rebuilt there when IMAGE_PACKAGES change."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
IMAGE_PACKAGES = [
    "torch==2.13.0",
    "triton==3.6.0",
    "pybind11",
    "pytest",
    "pytest-benchmark",
    "numpy",
    "tqdm",
    "pillow",
]
ABSENT_ON_THE_IMAGE = ["hypothesis", "matplotlib", "faiss", "diffusers"]
STAGES = ["environment", "build", "precompile", "accuracy", "kernel-tests", "benchmarks"]


def image_venv(tmp_path: Path) -> Path:
    """The Python of a virtual environment holding only IMAGE_PACKAGES ($ELSFAST_IMAGE_VENV when set, reused while
    its recorded package list is IMAGE_PACKAGES; else a fresh one under `tmp_path`)."""
    kept = os.environ.get("ELSFAST_IMAGE_VENV")
    folder = Path(kept).expanduser().resolve() if kept else tmp_path / "image-venv"
    if folder.is_relative_to(REPO):
        raise ValueError(f"ELSFAST_IMAGE_VENV must lie outside the checkout {REPO}, got {folder}")
    python, stamp = folder / "bin" / "python", folder / "elsfast-image-packages.json"
    wanted = json.dumps(IMAGE_PACKAGES)
    if python.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return python
    if folder.exists() and not stamp.is_file() and any(folder.iterdir()):
        raise ValueError(f"ELSFAST_IMAGE_VENV={folder} exists and was not made by this test: name another folder")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *IMAGE_PACKAGES]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"cannot build the image's environment: {done.stderr[-3000:]}"
    stamp.write_text(wanted)
    return python


@pytest.mark.slow_ci
@pytest.mark.skipif(torch.cuda.is_available(), reason="rehearses the check on a machine without a GPU")
def test_gpu_check_rehearsal_in_the_device_images_environment(tmp_path):
    python = image_venv(tmp_path)
    for name in ABSENT_ON_THE_IMAGE:  # the mirror is honest: what the image lacks cannot be imported here
        probe = subprocess.run([str(python), "-c", f"import {name}"], capture_output=True, text=True)
        assert probe.returncode != 0, f"{name} is importable in the image's environment"

    out = tmp_path / "out"
    # as on the device: no interpreter, no benchmark sizes, data folder or disk cache from outside
    drop = ("TRITON_INTERPRET", "PYTHONPATH", "ELSFAST_CACHE", "TRITON_CACHE_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ELSFAST_BENCH_")}
    env["ELSFAST_PYTHON"] = str(python)
    # 2x the rehearsal's 200 s: each stage's budget scales with it, so a busy CI machine does not time a stage out
    cmd = ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--budget", "400", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == STAGES, done.stdout[-3000:]
    assert summary["environment"]["triton"] == "3.6.0" and summary["environment"]["python"] == sys.version.split()[0]

    nvcc = shutil.which("nvcc") or os.environ.get("CUDA_HOME")
    expected_failures = [] if nvcc else ["build"]
    assert summary["failed_stages"] == expected_failures, done.stdout[-5000:]
    assert done.returncode == (1 if expected_failures else 0)
    assert summary["mode"] == "rehearsal" and summary["environment"]["cuda_available"] is False
    assert summary["elapsed_s"] < 400

    # no selected test failed to import (a collection error is an error of the stage)
    for name in ("accuracy", "kernel-tests", "benchmarks"):
        counts = stages[name]["tests"]["counts"]
        assert counts["errors"] == 0 and counts["failed"] == 0, stages[name]["tests"]["failures"]

    # the launcher, the split planning and the tuning code ran through the interpreter, before any test
    precompile = stages["precompile"]
    assert [c["status"] for c in precompile["cases"]] == ["passed", "passed"], precompile
    assert any("tuned" in c["case"] for c in precompile["cases"])
    assert all(s["compiles"] == 0 for s in summary["stages"] if s["name"] != "build" and s["name"] != "kernel-tests")

    accuracy = stages["accuracy"]
    assert accuracy["by_marker"]["gpu"]["skipped"] == 8 and "gpu: skipped: no CUDA device" in accuracy["reason"]

    kernel_tests = stages["kernel-tests"]
    assert kernel_tests["by_marker"]["aot"]["passed"] >= 1, kernel_tests
    assert kernel_tests["compiles"] >= 1  # the ahead-of-time compile, counted in the run's own Triton cache
    assert kernel_tests["by_marker"]["interpreter"]["passed"] >= 10, kernel_tests
    assert kernel_tests["by_marker"]["gpu"]["skipped"] >= 1 and not kernel_tests["by_marker"]["gpu"]["passed"]
    assert "gpu: skipped: no CUDA device" in kernel_tests["reason"]
    tuning_ran = [c for c in kernel_tests["tests"]["cases"] if "test_tuning" in c["test"] and c["outcome"] == "passed"]
    assert len(tuning_ran) >= 5

    bench = json.loads((out / "kernels-benchmark.json").read_text())
    assert bench["machine_info"]["device"] and bench["machine_info"]["torch_cuda"] is None
    ran = {b["extra_info"].get("formulation", b["name"]): b["extra_info"] for b in bench["benchmarks"]}
    assert {"torch", "sdpa", "test_cifar_sample"} <= set(ran)
    assert ran["torch"]["train_images"] == int(summary["benchmark_sizes"]["ELSFAST_BENCH_TORCH_IMAGES"])
    for info in (ran["torch"], ran["sdpa"]):
        assert info["max_abs_deviation_from_float64"] < 1e-3
    skipped = {s["test"].split("[")[-1] for s in stages["benchmarks"]["tests"]["skips"]}
    assert {"3-triton]", "3-cuda]"} <= skipped

    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)
    log = (out / "gpu_check.log").read_text().splitlines()
    assert sum(line.startswith("=== ") and "(budget" in line for line in log) == len(STAGES)
    markdown = (out / "summary.md").read_text()
    assert "| kernel-tests |" in markdown and "- device: no CUDA device" in markdown and "Left out" in markdown


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_selected_test_files_import_nothing_the_image_lacks():
    """Every file the device check runs imports with hypothesis, matplotlib, faiss and diffusers made unimportable
    (a None entry in sys.modules), as on the device image; tests/test_fuzz.py would not."""
    check = load_gpu_check()
    files = [*check.ACCURACY_TEST_FILES, *check.KERNEL_TEST_FILES, "benchmarks/bench_kernels.py"]
    script = (
        "import importlib.util, sys\n"
        f"for name in {ABSENT_ON_THE_IMAGE!r}: sys.modules[name] = None\n"
        "sys.path[:0] = [sys.argv[1] + '/tests', sys.argv[1] + '/benchmarks', sys.argv[1]]\n"
        "for path in sys.argv[2:]:\n"
        "    spec = importlib.util.spec_from_file_location(path.replace('/', '.'), sys.argv[1] + '/' + path)\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "    print('imported', path)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for paths, ok in ((["tests/conftest.py", *files], True), (["tests/test_fuzz.py"], False)):
        done = subprocess.run(
            [sys.executable, "-c", script, str(REPO), *paths], capture_output=True, text=True, env=env
        )
        assert (done.returncode == 0) == ok, done.stdout + done.stderr[-2000:]
    assert "import of hypothesis halted" in done.stderr or "No module named 'hypothesis'" in done.stderr


def test_fill_data_copies_cifar10_and_mnist_training_sets(tmp_path, monkeypatch):
    check = load_gpu_check()
    source = tmp_path / "source"
    for name in [check.CIFAR_NPZ, *check.MNIST_TRAIN]:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(str(name).encode())
    monkeypatch.setattr(check, "REPO", tmp_path)
    monkeypatch.setattr(check, "DEVICE_DATA", tmp_path / "data" / "device")
    assert check.fill_data(source) == 0
    for name in [check.CIFAR_NPZ, *check.MNIST_TRAIN]:
        assert (tmp_path / "data" / "device" / name).read_bytes() == str(name).encode()
    (source / check.MNIST_TRAIN[1]).unlink()
    assert check.fill_data(source) == 1  # a missing file is named, nothing half-copied is claimed
