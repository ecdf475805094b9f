"""Build script. All metadata lives in pyproject.toml; this file exists for the optional compiled parts
(the CUDA extension in csrc/), which setuptools can only describe in code."""

from setuptools import setup

setup()
