"""Package discovery only (metadata lives in pyproject.toml).

``kernels/`` sits at the top of the repository but installs as ``qtune.kernels``: a top-level
``kernels`` module would clash with Hugging Face's ``kernels`` package.
"""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["qtune", "qtune.*"]) + ["qtune.kernels"])
