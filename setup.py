"""Packaging metadata lives in pyproject.toml; this file adds two build steps.

* The CUDA sources (``csrc/``, at the top of the repository) are copied into the built package as
  ``grpo_kernels/csrc`` (package data): a wheel install JIT-builds from them (``backends/_cuda_build.py`` finds them
  through ``importlib.resources``); an editable install reads the checkout's ``csrc/`` directly.
* The optional ahead-of-time CUDA build, below.

`pip install .` never compiles anything and never imports torch here (pip's build isolation has none). With
``GRPO_KERNELS_BUILD_CUDA=1`` (and ``--no-build-isolation``, so the installed CUDA torch is used) it builds csrc/ into
``grpo_kernels/_C_cuda*.so`` for the architectures in ``GRPO_KERNELS_CUDA_ARCHS`` (default "80;90"). Without it,
the CUDA backend compiles itself on first use (see grpo_kernels/backends/_cuda_build.py).
"""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class BuildWithSources(build_py):
    """build_py that also ships csrc/ inside the package (grpo_kernels/csrc)."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "grpo_kernels" / "csrc"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / "csrc", target)


def _cuda_extension_kwargs() -> dict:
    if os.environ.get("GRPO_KERNELS_BUILD_CUDA") != "1":
        return {}
    # load the build helper by path: importing the grpo_kernels package would import torch before it is needed
    spec = importlib.util.spec_from_file_location(
        "_cuda_build", Path(__file__).parent / "grpo_kernels/backends/_cuda_build.py"
    )
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    if torch.version.cuda is None or CUDA_HOME is None:
        raise RuntimeError(
            "GRPO_KERNELS_BUILD_CUDA=1 needs a CUDA build of torch and nvcc (CUDA_HOME); install with "
            "--no-build-isolation so the installed CUDA torch is used, or unset it (the backend then builds on "
            "first use)"
        )

    root = Path(__file__).parent
    extension = CUDAExtension(
        name="grpo_kernels._C_cuda",
        sources=[str(Path(s).relative_to(root.resolve())) for s in build.sources()],
        include_dirs=build.include_dirs(),
        extra_compile_args={"cxx": ["-O3"], "nvcc": build.nvcc_flags()},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


_cuda = _cuda_extension_kwargs()
setup(ext_modules=_cuda.get("ext_modules", []), cmdclass={"build_py": BuildWithSources, **_cuda.get("cmdclass", {})})
