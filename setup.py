"""Build script. Metadata lives in pyproject.toml; this file holds what setuptools can only describe in code:
the Triton kernels of the top-level `kernels/` folder, installed as `elsfast.kernels`, and the two compiled
extensions of `csrc/`: the CPU kernel `elsfast._cpu` and the CUDA extension `elsfast._cuda`.

The CPU extension is C++ with OpenMP, bound with pybind11 (raw pointers, no torch at build time); its kernel is
compiled once for AVX2 + FMA and once for AVX-512F under `#pragma GCC target`, so the module loads on any x86-64
CPU and says which of them it can run (`isas()`). `ELSFAST_CPU`: unset: build it, and if that fails warn and
install without it; 1: fail the install if it cannot be built; 0: do not build it.

The CUDA extension is a standalone nvcc + pybind11 module (raw device pointers and the stream; no torch at build
time, independent of the torch ABI, see ../shared/TOOLCHAIN.md). `ELSFAST_CUDA`:
  unset  build it when nvcc is found (PATH or $CUDA_HOME/bin); if the build fails, warn and install without it;
  1      build it and fail the install if it cannot be built;
  0      do not build it.
`ELSFAST_CUDA_ARCHS` (default "80;90"): the SM architectures to compile for; PTX of the last one is embedded too.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CUDA_SOURCES = ["csrc/reduce.cu"]
SHARED_HEADERS = ["csrc/reduce_args.h", "csrc/reduce_binding.h"]  # included by both extensions


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_root(nvcc: str) -> Path:
    """The toolkit root: nvcc on PATH may be a wrapper script, so ask nvcc itself (its TOP)."""
    dry = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, check=False)
    top = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    return Path(top.group(1)).resolve() if top else Path(nvcc).resolve().parents[1]


class BuildExt(build_ext):
    """Compile the .cu sources with nvcc into objects linked into `elsfast._cuda` (static cudart)."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name == "elsfast._cuda":
            nvcc = find_nvcc()
            if nvcc is None:
                raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
            root = cuda_root(nvcc)
            archs = os.environ.get("ELSFAST_CUDA_ARCHS", "80;90").split(";")
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
            gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
            build = Path(self.build_temp) / "cuda"
            build.mkdir(parents=True, exist_ok=True)
            for source in CUDA_SOURCES:
                obj = build / (Path(source).stem + ".o")
                cmd = [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Icsrc", *gencode, "-c", source, "-o"]
                self.spawn([*cmd, str(obj)])
                ext.extra_objects.append(str(obj))
            lib = next((root / d for d in ("lib64", "targets/x86_64-linux/lib") if (root / d).is_dir()), root / "lib")
            ext.library_dirs.append(str(lib))
        super().build_extension(ext)


def cpu_extensions() -> list[Extension]:
    mode = os.environ.get("ELSFAST_CPU", "")
    if mode == "0":
        return []
    import pybind11

    return [
        Extension(
            "elsfast._cpu",
            sources=["csrc/cpu_bindings.cpp", "csrc/cpu_reduce.cpp"],
            depends=[*SHARED_HEADERS, "csrc/cpu_reduce.h", "csrc/cpu_kernel.inc", "csrc/cpu_shift_kernel.inc"],
            include_dirs=[pybind11.get_include(), "csrc"],
            extra_compile_args=["-O3", "-std=c++17", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            language="c++",
            optional=mode != "1",
        )
    ]


def cuda_extensions() -> list[Extension]:
    mode = os.environ.get("ELSFAST_CUDA", "")
    if mode == "0" or (mode != "1" and find_nvcc() is None):
        return []
    import pybind11

    return [
        Extension(
            "elsfast._cuda",
            sources=["csrc/bindings.cpp"],
            depends=[*SHARED_HEADERS, "csrc/reduce.h", *CUDA_SOURCES],
            include_dirs=[pybind11.get_include(), "csrc"],
            libraries=["cudart_static", "dl", "rt", "pthread"],
            extra_compile_args=["-O3", "-std=c++17"],
            language="c++",
            optional=mode != "1",
        )
    ]


setup(
    packages=[*find_packages(include=["elsfast", "elsfast.*"]), "elsfast.kernels"],
    package_dir={"elsfast.kernels": "kernels"},
    ext_modules=cpu_extensions() + cuda_extensions(),
    cmdclass={"build_ext": BuildExt},
)
