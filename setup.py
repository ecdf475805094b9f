"""Build script. Metadata lives in pyproject.toml; this file holds what setuptools can only describe in code:
the Triton kernels of the top-level `kernels/` folder, installed as `elsfast.kernels`, and the optional CUDA
extension `elsfast._cuda` of `csrc/`."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["elsfast", "elsfast.*"]), "elsfast.kernels"],
    package_dir={"elsfast.kernels": "kernels"},
)
