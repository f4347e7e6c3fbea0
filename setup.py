"""Build script. The package is pure Python (Triton kernels compile at run time); the metadata lives in
pyproject.toml. The optional CUDA C++ extension of csrc/ will be declared here."""

from setuptools import setup

setup()
