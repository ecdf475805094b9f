"""Triton kernels of elsfast, installed as `elsfast.kernels` (this folder is mapped into the package by setup.py).
Kernels and their launchers only; dispatch lives in `elsfast.reduce`. Importing this package needs triton."""
