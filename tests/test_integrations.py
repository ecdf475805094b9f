"""Optional libraries that are missing or broken (`elsfast.integrations.optional_import`), and the package
contract users of the adapters expect (`py.typed`).

A library can be installed and still fail to import: diffusers beside PyPI's torchvision (a CUDA build) and a CPU
torch raises `RuntimeError: operator torchvision::nms does not exist`. The tests below simulate that with an
import hook, so they run wherever diffusers is installed or not.
"""

import importlib.abc
import importlib.resources
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from elsfast.integrations import integration_status, optional_import

ROOT = Path(__file__).resolve().parent.parent
NMS = "operator torchvision::nms does not exist"

# A pytest plugin / sitecustomize-style module: every import of diffusers' models package raises the error a
# torchvision built for another torch raises. diffusers imports its submodules lazily, so `import diffusers`
# succeeds and the failure comes when ModelMixin or DiffusionPipeline is first touched, as in the real case.
BREAK_DIFFUSERS = textwrap.dedent(
    f"""
    import importlib.abc, sys

    class BrokenTorchvision(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "diffusers.models" or name.startswith("diffusers.models."):
                raise RuntimeError({NMS!r})
            return None

    sys.meta_path.insert(0, BrokenTorchvision())
    """
)


class _Raising(importlib.abc.MetaPathFinder):
    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, name, path, target=None):
        if name == self.name:
            raise RuntimeError(NMS)
        return None


def test_optional_import_reports_missing_and_broken_libraries(monkeypatch):
    module, reason = optional_import("elsfast_no_such_library")
    assert module is None and reason == "ModuleNotFoundError: No module named 'elsfast_no_such_library'"
    monkeypatch.setattr(sys, "meta_path", [_Raising("elsfast_broken_library"), *sys.meta_path])
    module, reason = optional_import("elsfast_broken_library")
    assert module is None and reason == f"RuntimeError: {NMS}"
    module, reason = optional_import("json", ("dumps", "no_such_attribute"))
    assert module is None and reason.startswith("AttributeError:")
    module, reason = optional_import("json", ("dumps",))
    assert module is not None and reason == ""


def test_integration_status_names_each_library():
    status = integration_status()
    assert set(status) == {"diffusers", "k-diffusion"}
    assert all(state.startswith(("yes (", "no (")) for state in status.values())


def _with_broken_diffusers(tmp_path: Path, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    (tmp_path / "break_diffusers.py").write_text(BREAK_DIFFUSERS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "OMP_WAIT_POLICY": "passive"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_broken_diffusers_is_reported_like_a_missing_one(tmp_path):
    """With diffusers broken at import: the adapter module imports, ELSUNet still predicts epsilon (without the
    diffusers base classes), what needs diffusers raises ImportError with the reason, and `elsfast info` prints it."""
    code = textwrap.dedent(
        f"""
        import break_diffusers
        from types import SimpleNamespace
        import torch, elsfast
        from elsfast.integrations import diffusers as adapter
        assert {NMS!r} in adapter.DIFFUSERS_UNAVAILABLE, adapter.DIFFUSERS_UNAVAILABLE
        m = elsfast.ScoreMachine(torch.rand(2, 1, 4, 4) * 2 - 1)
        s = SimpleNamespace(alphas_cumprod=torch.linspace(0.99, 0.01, 10), config={{}})
        out = adapter.ELSUNet(m, s)(torch.randn(1, 1, 4, 4), 3)
        assert type(out) is adapter.ELSUNetOutput, type(out)
        for call in (lambda: adapter.ELSUNet(m, s).save_pretrained("x"), lambda: adapter.make_ddim_scheduler(5)):
            try:
                call()
            except ImportError as err:
                assert {NMS!r} in str(err), err
            else:
                raise AssertionError("no ImportError")
        try:
            from elsfast.integrations.diffusers import ELSPipeline
        except ImportError as err:
            assert {NMS!r} in str(err), err
        else:
            raise AssertionError("ELSPipeline imported")
        from elsfast.cli import main
        assert main(["info"]) == 0
        """
    )
    result = _with_broken_diffusers(tmp_path, ["-c", code])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    diffusers_line = next(line for line in lines if line.startswith("diffusers:"))
    assert diffusers_line.startswith("diffusers: no (RuntimeError:") and NMS in diffusers_line


@pytest.mark.slow
def test_adapter_tests_skip_with_the_reason_when_diffusers_is_broken(tmp_path):
    """The diffusers tests skip, saying why, and the k-diffusion tests (a separate file) still run."""
    result = _with_broken_diffusers(
        tmp_path,
        [
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "break_diffusers",
            "-p",
            "no:cacheprovider",
            "tests/test_diffusers.py",
            "tests/test_k_diffusion.py",
            "-k",
            "not imports_without_diffusers",
        ],
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "error" not in output.splitlines()[-1].lower(), output
    skipped = [line for line in output.splitlines() if line.startswith("SKIPPED")]
    assert skipped and all(NMS in line for line in skipped), output
    assert "test_k_diffusion.py" not in "".join(skipped)


def test_py_typed_is_shipped():
    """PEP 561: the package declares its type hints (the marker file, listed as package data)."""
    assert importlib.resources.files("elsfast").joinpath("py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["elsfast"]
