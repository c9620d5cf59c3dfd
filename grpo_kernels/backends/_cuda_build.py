"""Building and loading the CUDA extension (csrc/), shared by setup.py and the CUDA backend.

Two ways in, both optional (``pip install`` never needs nvcc):

* ahead of time: ``GRPO_KERNELS_BUILD_CUDA=1 pip install .`` builds ``grpo_kernels/_C_cuda*.so`` (setup.py);
* just in time: on first use, ``torch.utils.cpp_extension.load`` compiles csrc/ into torch's extension cache
  (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and later processes reuse it.

Either way the library registers its ops under ``torch.ops.grpo_kernels_cuda``. Architectures come from
``GRPO_KERNELS_CUDA_ARCHS`` (default ``"80;90"``): machine code for each, plus PTX of the newest so later GPUs can
JIT it. sm_90a is not needed: the Hopper path uses clusters, distributed shared memory and bulk copies, all plain
sm_90 (no wgmma, no setmaxnreg).

This module imports nothing but the standard library at import time: setup.py loads it by path, where torch may be
absent (pip's build isolation).
"""

from __future__ import annotations

import os
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"
# The kernels' translation units; torch_binding.cu is the only one that includes torch.
KERNEL_SOURCES = ("logprobs.cu", "grpo_loss.cu", "advantages.cu")
BINDING_SOURCE = "torch_binding.cu"
DEFAULT_ARCHS = "80;90"
EXTENSION_NAME = "grpo_kernels_cuda"


def archs(spec: str | None = None) -> list[str]:
    """``"80;90"`` (or ``GRPO_KERNELS_CUDA_ARCHS``) -> ``["80", "90"]``; ``8.0``/``sm_80`` spellings accepted."""
    spec = spec if spec is not None else os.environ.get("GRPO_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
    out = []
    for item in spec.replace(",", ";").split(";"):
        item = item.strip().lower().removeprefix("sm_").replace(".", "")
        if item:
            if not item.rstrip("a").isdigit():
                raise ValueError(f"GRPO_KERNELS_CUDA_ARCHS: cannot read {item!r} in {spec!r} (expected e.g. '80;90')")
            out.append(item)
    return out


def nvcc_flags(spec: str | None = None) -> list[str]:
    """-gencode flags (SASS per arch + PTX of the newest) and the kernels' compile options."""
    arch_list = archs(spec)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arch_list]
    newest = max(arch_list, key=lambda a: int(a.rstrip("a")))
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    # no --use_fast_math: the kernels are held to 1e-5 of float64 and use accurate expf/logf on purpose
    return flags + ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def sources() -> list[str]:
    return [str(CSRC / name) for name in (*KERNEL_SOURCES, BINDING_SOURCE)]


def include_dirs() -> list[str]:
    return [str(CSRC / "include")]


def _aot_library() -> Path | None:
    """The library built by ``GRPO_KERNELS_BUILD_CUDA=1 pip install``, if any."""
    package = Path(__file__).resolve().parents[1]
    found = sorted(package.glob("_C_cuda*.so"))
    return found[0] if found else None


_state: dict[str, object] = {}


def load() -> str | None:
    """Make ``torch.ops.grpo_kernels_cuda`` available. None on success, else a sentence saying why it is not.

    The first call may compile (a minute or two); the answer is cached for the process.
    """
    if "error" in _state:
        return _state["error"]  # type: ignore[return-value]
    _state["error"] = _load()
    return _state["error"]  # type: ignore[return-value]


def _load() -> str | None:
    import torch

    library = _aot_library()
    if library is not None:
        try:
            torch.ops.load_library(str(library))
            return None
        except OSError as e:  # e.g. built against another torch: fall through to the JIT build
            aot_error = f"the prebuilt {library.name} did not load ({e}); "
    else:
        aot_error = ""
    if not CSRC.is_dir():
        return f"{aot_error}the CUDA sources (csrc/) are not installed next to the package; build with GRPO_KERNELS_BUILD_CUDA=1"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return f"{aot_error}nvcc was not found (set CUDA_HOME or put nvcc on PATH) to build the CUDA extension"
    try:
        cpp_extension.load(
            name=EXTENSION_NAME,
            sources=sources(),
            extra_include_paths=include_dirs(),
            extra_cuda_cflags=nvcc_flags(),
            is_python_module=False,
            verbose=os.environ.get("GRPO_KERNELS_VERBOSE_BUILD") == "1",
        )
    except Exception as e:  # noqa: BLE001 - any build failure becomes the backend's unavailable_reason
        return f"{aot_error}building the CUDA extension failed: {type(e).__name__}: {str(e).strip()[-2000:]}"
    return None
