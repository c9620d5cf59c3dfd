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

import logging
import os
import time
from pathlib import Path

logger = logging.getLogger("grpo_kernels")


def _csrc_dir() -> Path:
    """The CUDA sources: shipped as package data (``grpo_kernels/csrc``, a wheel install), else the checkout's
    ``csrc/`` (an editable install, or setup.py, which loads this file by path: no package to ask then)."""
    if __name__.startswith("grpo_kernels."):
        from importlib.resources import files

        packaged = files("grpo_kernels").joinpath("csrc")
        if packaged.is_dir():
            return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "csrc"


CSRC = _csrc_dir()
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
        return f"{aot_error}the CUDA sources (csrc/) were not found at {CSRC}; reinstall grpo-kernels"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return f"{aot_error}nvcc was not found (set CUDA_HOME or put nvcc on PATH) to build the CUDA extension"
    # A JIT build takes minutes: say so before it starts (a first training step must not stall silently).
    try:
        cached = (Path(cpp_extension._get_build_directory(EXTENSION_NAME, False)) / f"{EXTENSION_NAME}.so").exists()
    except Exception:  # noqa: BLE001 - a private helper of torch: when it is gone, announce the build anyway
        cached = False
    log = logger.info if cached else logger.warning
    log(
        "grpo_kernels: %s the CUDA extension %s from %s (%d sources, archs %s)%s",
        "loading" if cached else "building",
        EXTENSION_NAME,
        CSRC,
        len(sources()),
        ";".join(archs()),
        "" if cached else "; a first build takes a few minutes, then it is cached (TORCH_EXTENSIONS_DIR)",
    )
    start = time.perf_counter()
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
    log("grpo_kernels: CUDA extension ready in %.1f s", time.perf_counter() - start)
    return None
