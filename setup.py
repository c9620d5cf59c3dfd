"""Packaging metadata lives in pyproject.toml; setup.py is where the optional CUDA extension build will hook in.

`pip install .` never compiles anything.
"""

from setuptools import setup

setup()
