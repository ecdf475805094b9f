"""The package's layout holds: every module imports alone (no import cycle held together by import order), each
package imports only the packages of its row of `IMPORTS` (the table its docstring quotes), no private name crosses
a module boundary, and one training-set hash serves everyone."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import torch

import elsfast
from elsfast.common.fingerprint import training_set_sha256

PACKAGE = Path(elsfast.__file__).resolve().parent

# The elsfast packages each package may import (besides itself): the rule each package's docstring quotes as
# `quoted_rule(package)`. The dependency direction is one way: cli -> research -> integrations -> sampling/nets ->
# machine -> reduce/datasets/plots -> common, and not every lower package (nets never the reduction, sampling never
# the datasets).
IMPORTS: dict[str, tuple[str, ...]] = {
    "common": (),
    "kernels": (),  # the Triton kernels import nothing of elsfast
    "reduce": ("common", "kernels"),
    "datasets": ("common",),
    "plots": ("common",),
    "machine": ("common", "reduce", "datasets"),
    "sampling": ("common", "reduce", "machine"),
    "nets": ("common", "datasets"),
    "research": ("common", "reduce", "datasets", "plots", "machine", "sampling", "nets", "integrations"),
    "integrations": ("common", "reduce", "machine", "sampling"),
    "cli": ("common", "reduce", "datasets", "plots", "machine", "sampling", "nets", "research", "integrations"),
}
IMPORTS[""] = (*IMPORTS["cli"], "cli")  # elsfast/__init__.py and __main__.py: the user API
COMPILED = {"_cpu", "_cuda"}  # the compiled extensions: imported by the backends that wrap them


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(("elsfast", *parts))] = path
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] not in ("__main__", *COMPILED) else ""


def _imports(module: str, path: Path):
    """(line, imported module, names) for every import of an elsfast module, at any depth (lazy imports too)."""
    is_package = path.name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "elsfast" or target.startswith("elsfast."):
                yield node.lineno, target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("elsfast"):
                    yield node.lineno, alias.name, []


def test_dependencies_point_one_way_and_no_private_name_crosses_a_module():
    modules = _modules()
    assert len(modules) > 40 and set(map(_package, modules)) <= set(IMPORTS)
    problems = []
    for module, path in modules.items():
        src = _package(module)
        for line, target, names in _imports(module, path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            for name in names or [None]:
                if target == "elsfast" and name and name.startswith("__"):
                    continue  # the package's metadata (__version__) is no layer
                full = f"{target}.{name}" if name and f"{target}.{name}" in modules else target
                dst = _package(full)
                if full.split(".")[-1] in COMPILED or dst == src:
                    pass
                elif dst not in IMPORTS[src]:
                    problems.append(f"{where}: {module} ({src}) imports {full} ({dst}), not in its row of IMPORTS")
                if (
                    name
                    and name.startswith("_")
                    and not name.startswith("__")
                    and full == target
                    and name not in COMPILED
                ):
                    problems.append(f"{where}: {module} imports the private name {name} from {target}")
    assert not problems, "\n".join(problems)


def quoted_rule(package: str) -> str:
    """The sentence of `package`'s docstring that quotes its row of `IMPORTS`."""
    allowed = ", ".join(f"`elsfast.{name}`" for name in IMPORTS[package]) or "nothing"
    return f"Imports of other elsfast packages (tests/test_layout.py): {allowed}."


def test_each_package_docstring_quotes_its_import_rule():
    """The rule a maintainer reads in a package's docstring is the rule this file holds."""
    missing = []
    for package in IMPORTS:
        if package in ("", "kernels"):  # the user API may import anything; kernels/ is outside the package
            continue
        path = PACKAGE / f"{package}.py" if (PACKAGE / f"{package}.py").exists() else PACKAGE / package / "__init__.py"
        docstring = " ".join((ast.get_docstring(ast.parse(path.read_text())) or "").split())
        if quoted_rule(package) not in docstring:
            missing.append(f"{path.relative_to(PACKAGE.parent)}: {quoted_rule(package)}")
    assert not missing, "docstrings that do not quote their rule:\n" + "\n".join(missing)


def test_every_module_imports_alone():
    """Each module imported first, in a fresh set of elsfast modules (torch stays loaded: it is not ours): an
    import cycle that works only when another module happened to be imported first fails here."""
    modules = [m for m in _modules() if not m.endswith("__main__")]
    script = f"""
import importlib, json, sys
failures = {{}}
for name in {modules!r}:
    for loaded in [m for m in sys.modules if m == "elsfast" or m.startswith("elsfast.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:  # an optional library (triton, diffusers) that is not installed
        if (err.name or "").startswith("elsfast"):
            failures[name] = repr(err)
    except Exception as err:
        failures[name] = f"{{type(err).__name__}}: {{err}}"
print(json.dumps(failures))
"""
    import torch  # noqa: F401  (the subprocess imports it once, before the loop)

    done = subprocess.run(
        [sys.executable, "-c", "import torch\n" + script], capture_output=True, text=True, check=True, timeout=300
    )
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failures, failures


def test_one_training_set_hash():
    g = torch.Generator().manual_seed(5)
    images = torch.rand(6, 1, 5, 5, generator=g) * 2 - 1
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    machine = elsfast.ScoreMachine(images, labels)
    assert machine.fingerprint == training_set_sha256(machine.images, labels)
    assert elsfast.reduce.caches.content_hash(images) == training_set_sha256(images)
    assert training_set_sha256(images, labels.to(torch.int32)) == training_set_sha256(images, labels)
    assert training_set_sha256(images, labels) != training_set_sha256(images, labels.flip(0))
    assert training_set_sha256(images) != training_set_sha256(images.double())
