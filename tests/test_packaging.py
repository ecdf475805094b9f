"""Packaging: one version, a licence, type information, and an sdist that carries what the tests need.

The sdist must hold the test suite and its helpers (conftest.py, problems.py, reference.py), the kernel sources,
the benchmarks, the examples and scripts some tests run, LICENSE, README and CHANGELOG, so that the tests run from
an unpacked sdist. `MANIFEST.in` says so; these tests check it without a build (setuptools' own template
processing over this checkout) and with one (`setuptools.build_meta.build_sdist` in a subprocess, about 1.5 s).
"""

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

import elsfast

ROOT = Path(__file__).resolve().parents[1]

# What an unpacked sdist needs for `python -m pytest -q` (besides the package itself, which setuptools adds).
REQUIRED = [
    "LICENSE",
    "README.md",
    "CHANGELOG.md",
    "pyproject.toml",
    "setup.py",
    "MANIFEST.in",
    "tests/conftest.py",
    "tests/problems.py",
    "tests/reference.py",
    "tests/test_backends.py",
    "tests/test_packaging.py",
    "csrc/cpu_reduce.cpp",
    "csrc/cpu_kernel.inc",
    "csrc/cpu_shift_kernel.inc",
    "csrc/reduce.cu",
    "csrc/reduce.h",
    "kernels/softmax_reduce.py",
    "benchmarks/conftest.py",
    "benchmarks/bench_cpu.py",
    "examples/sharded_sampling.py",
    "scripts/gpu_check.sh",
    "elsfast/py.typed",
]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_is_written_once():
    project = _pyproject()["project"]
    assert "version" not in project, "pyproject.toml must not repeat the version: it is elsfast.__version__"
    assert "version" in project["dynamic"]
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "elsfast.__version__"}


def test_installed_version_is_the_package_version():
    try:
        installed = importlib.metadata.version("elsfast")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("elsfast is not installed (running from a checkout on PYTHONPATH)")
    assert elsfast.__version__ == installed


def test_licence():
    """The licence pyproject.toml declares is the file shipped (py.typed is checked in test_integrations)."""
    project = _pyproject()["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert "MIT License" in (ROOT / "LICENSE").read_text()


def test_manifest_selects_what_the_tests_need(monkeypatch):
    """MANIFEST.in, applied by setuptools to this checkout, selects every required file and no compiled module."""
    from setuptools.command.egg_info import FileList

    monkeypatch.chdir(ROOT)
    files = FileList()
    files.findall()
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            files.process_template_line(line)
    selected = {Path(f).as_posix() for f in files.files}
    missing = [f for f in REQUIRED if f != "MANIFEST.in" and f not in selected]
    assert not missing, f"MANIFEST.in does not select {missing}"
    assert not [f for f in selected if f.endswith(".so")]


def _setuptools_version() -> tuple[int, ...]:
    import setuptools

    return tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())


@pytest.mark.skipif(
    _setuptools_version() < (77,),
    reason='setuptools < 77 cannot read `license = "MIT"` (pip builds with its own >= 77 in isolation)',
)
def test_sdist_contains_what_the_tests_need(tmp_path):
    """Build the sdist as pip's build backend does (no extension is compiled for an sdist) and list it."""
    env = {**os.environ, "ELSFAST_CPU": "0", "ELSFAST_CUDA": "0"}
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    name = result.stdout.strip().splitlines()[-1]
    assert name == f"elsfast-{elsfast.__version__}.tar.gz"
    with tarfile.open(tmp_path / name) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    missing = [f for f in REQUIRED if f not in members]
    assert not missing, f"the sdist lacks {missing}"
    assert not [m for m in members if m.endswith(".so") or "__pycache__" in m]
