"""The torch backend's compiled CPU passes: ``cpu_kernels.cpp``, built on first use, cached, called through ctypes.

Why a plain C++ file and not ``torch.compile`` or a torch extension: the source includes no torch header, so it
builds in seconds (a ``torch.utils.cpp_extension`` build takes a minute or more, an inductor compile some seconds
per dtype, shape class and variant), it is one library for every shape, dtype and variant (nothing recompiles when
N or V changes), and it cannot be re-entered while ``torch.compile`` traces (the backend runs inside opaque custom
ops; :func:`usable` also refuses while compiling). ``pip install`` still needs no compiler: without one the
torch-ops path in ``logprobs.py`` runs, and the reason is logged once.

    GRPO_KERNELS_CPU_NATIVE=0     never build or use the compiled passes (the torch-ops path everywhere)
    CXX                           the compiler (default: the first of c++, g++, clang++ on PATH)
    GRPO_KERNELS_CACHE_DIR        where the library is kept (default: $XDG_CACHE_HOME/grpo_kernels, ~/.cache/...)

The library is compiled with ``-march=native``, so its cache key includes the compiler's version and this CPU's
model and flags (a home directory shared by different machines gets one library per kind of CPU). It is built
into a temporary file and renamed into place: concurrent first uses (pytest-xdist, DDP ranks) are safe.
float64 and non-CPU tensors never come here (the torch path is exact in float64 and runs on any device).
The exact divergences ``reverse_kl`` and ``forward_kl`` (``divergence.py``; the student's gradient only) have
passes here too; ``jsd`` and teacher gradients keep the torch ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger("grpo_kernels")

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ("-O3", "-march=native", "-std=gnu++17", "-ffp-contract=off", "-fPIC", "-shared", "-pthread")
DISABLE_ENV = "GRPO_KERNELS_CPU_NATIVE"
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib" (ctypes.CDLL or None), "reason" (str or None), "dtypes" (frozenset)


def _cache_dir() -> Path:
    root = os.environ.get("GRPO_KERNELS_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "grpo_kernels"


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or cxx
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_signature() -> str:
    """CPU model and feature flags (what ``-march=native`` compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _build(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), cxx, version, " ".join(FLAGS), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels-{key}.so"
    if target.exists():
        logger.info("grpo_kernels: torch backend CPU kernels loaded from the cache (%s)", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    start = time.perf_counter()
    try:
        cmd = [cxx, *FLAGS, str(SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or ["no output"]
            first_error = next((ln for ln in lines if "error" in ln), lines[-1])
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {first_error}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info(
        "grpo_kernels: compiled the torch backend's CPU kernels in %.1f s (%s)", time.perf_counter() - start, target
    )
    return target


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, f"{DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    if not SOURCE.exists():
        return None, f"{SOURCE.name} is not installed next to {__name__}"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found (set CXX, or install g++ or clang++)"
    try:
        lib = ctypes.CDLL(str(_build(cxx)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"could not build or load {SOURCE.name}: {type(e).__name__}: {e}"
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.grpo_cpu_dtypes.restype = ctypes.c_int
    lib.grpo_cpu_token_logprobs_forward.restype = ctypes.c_int
    lib.grpo_cpu_token_logprobs_forward.argtypes = [
        ptr,
        ctypes.c_int,
        i64,
        i64,
        i64,
        i64,
        i64,
        ptr,
        f32,
        ptr,
        ptr,
        ptr,
        ctypes.c_int,
    ]
    lib.grpo_cpu_token_logprobs_backward.restype = ctypes.c_int
    lib.grpo_cpu_token_logprobs_backward.argtypes = [
        ptr,
        ctypes.c_int,
        i64,
        i64,
        i64,
        i64,
        i64,
        ptr,
        i64,
        i64,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        f32,
        ctypes.c_int,
    ]
    i32, f64p = ctypes.c_int, ptr
    for name, args in (
        (
            "grpo_cpu_divergence_forward",
            [ptr, i32, i64, i64, ptr, i32, i64, i64, i64, i64, i64, ptr, i32, f32]
            + [ptr, ptr, f64p, f64p, ptr, ptr, i32],
        ),
        (
            "grpo_cpu_divergence_backward",
            [ptr, i32, i64, i64, ptr, i32, i64, i64, i64, i64, i64, ptr, i64, i64]
            + [ptr, f64p, f64p, ptr, ptr, ptr, i32, f32, i32],
        ),
    ):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = args
    return lib, None


def library() -> ctypes.CDLL | None:
    """The loaded library, building it on the first call; None where it cannot be had (reason logged once)."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib, reason = _load()
                if reason is not None:
                    logger.info("grpo_kernels: torch backend uses its torch-ops path on the CPU: %s", reason)
                mask = lib.grpo_cpu_dtypes() if lib is not None else 0
                _state.update(reason=reason, dtypes=frozenset(d for d, c in _DTYPE_CODES.items() if mask >> c & 1))
                _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    """None when the compiled passes are in use, else why not."""
    library()
    return _state["reason"]  # type: ignore[return-value]


def usable(logits: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the compiled passes take these tensors: CPU, float32 / bfloat16 / float16 (where compiled), unit
    stride along V, not under tracing."""
    if logits.device.type != "cpu" or logits.dtype not in _DTYPE_CODES or torch.compiler.is_compiling():
        return False
    if any(t.device.type != "cpu" or t.dtype != logits.dtype for t in others):
        return False
    if any(t.stride(-1) != 1 and t.shape[-1] > 1 for t in (logits, *others)):
        return False
    return library() is not None and logits.dtype in _state["dtypes"]  # type: ignore[operator]


def _ids_in_range(ids: torch.Tensor, vocab: int) -> bool:
    """The kernels index the logits with the ids unchecked: refuse an out-of-range one (the torch path raises).
    ``vocab`` itself is allowed: the vocabulary-parallel marker "target in another shard", never read."""
    return ids.numel() == 0 or int(ids.max()) <= vocab


def _f32_ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def token_logprobs_forward(logits, token_ids, temperature, with_entropy):
    """``(lp, lse, entropy)`` [N] float32 (entropy [0] unless asked for), or None when the ids are out of range."""
    from ... import _alloc

    batch, seq, vocab = logits.shape
    ids = token_ids.to(torch.int64).contiguous()
    if not _ids_in_range(ids, vocab):
        return None
    n = ids.shape[0]
    lp = _alloc.empty(n, dtype=torch.float32, device=logits.device)
    lse = _alloc.empty(n, dtype=torch.float32, device=logits.device)
    entropy = _alloc.empty(n if with_entropy else 0, dtype=torch.float32, device=logits.device)
    status = library().grpo_cpu_token_logprobs_forward(
        logits.data_ptr(),
        _DTYPE_CODES[logits.dtype],
        batch,
        seq,
        vocab,
        logits.stride(0),
        logits.stride(1),
        ids.data_ptr(),
        float(temperature),
        lp.data_ptr(),
        lse.data_ptr(),
        entropy.data_ptr() if with_entropy else None,
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(f"grpo_cpu_token_logprobs_forward returned {status} for {logits.dtype}")
    return lp, lse, entropy


def token_logprobs_backward(logits, token_ids, lse, entropy, g, g_h, temperature, out) -> bool:
    """Write the gradient into ``out`` from ``g``, ``g_h`` (float32 [N], already / tau, 0 on rows not taking part);
    False (nothing written) when the ids are out of range."""
    batch, seq, vocab = logits.shape
    ids = token_ids.to(torch.int64).contiguous()
    if not _ids_in_range(ids, vocab):
        return False
    lse = lse.to(torch.float32).contiguous()
    g = g.contiguous()
    if g_h is not None:
        g_h = g_h.contiguous()
        entropy = entropy.to(torch.float32).contiguous()
    status = library().grpo_cpu_token_logprobs_backward(
        logits.data_ptr(),
        _DTYPE_CODES[logits.dtype],
        batch,
        seq,
        vocab,
        logits.stride(0),
        logits.stride(1),
        out.data_ptr(),
        out.stride(0),
        out.stride(1),
        ids.data_ptr(),
        lse.data_ptr(),
        entropy.data_ptr() if g_h is not None else None,
        g.data_ptr(),
        _f32_ptr(g_h),
        float(temperature),
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(f"grpo_cpu_token_logprobs_backward returned {status} for {logits.dtype}")
    return True


# ----------------------------------------------------------------------------------------------------------------
# the exact divergences (divergence.py): reverse_kl and forward_kl; jsd keeps the torch-ops path
# ----------------------------------------------------------------------------------------------------------------
DIVERGENCE_KINDS = {"reverse_kl": 0, "forward_kl": 1}


def usable_pair(student: torch.Tensor, teacher: torch.Tensor, *outs: torch.Tensor) -> bool:
    """Whether the compiled divergence passes take these tensors: as :func:`usable` for each (the student's and the
    teacher's dtypes may differ; an output has the student's), the same ``[B, T, V]`` shape."""
    return teacher.shape == student.shape and usable(student, *outs) and usable(teacher)


def divergence_forward(student, teacher, token_ids, kind, temperature, with_logprobs):
    """``(div, lp, lse, lse_ref, kl_student, kl_teacher)`` as ``divergence.divergence_forward`` (float32, the
    log-sum-exps float64), or None when the ids are out of range."""
    from ... import _alloc

    batch, seq, vocab = student.shape
    ids = token_ids.to(torch.int64).contiguous()
    if not _ids_in_range(ids, vocab):
        return None
    n = ids.shape[0]
    div, kl_s, kl_t = (_alloc.empty(n, dtype=torch.float32, device=student.device) for _ in range(3))
    lse, lse_ref = (_alloc.empty(n, dtype=torch.float64, device=student.device) for _ in range(2))
    lp = _alloc.empty(n if with_logprobs else 0, dtype=torch.float32, device=student.device)
    status = library().grpo_cpu_divergence_forward(
        student.data_ptr(),
        _DTYPE_CODES[student.dtype],
        student.stride(0),
        student.stride(1),
        teacher.data_ptr(),
        _DTYPE_CODES[teacher.dtype],
        teacher.stride(0),
        teacher.stride(1),
        batch,
        seq,
        vocab,
        ids.data_ptr(),
        DIVERGENCE_KINDS[kind],
        float(temperature),
        div.data_ptr(),
        lp.data_ptr() if with_logprobs else None,
        lse.data_ptr(),
        lse_ref.data_ptr(),
        kl_s.data_ptr(),
        kl_t.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(f"grpo_cpu_divergence_forward returned {status} for {student.dtype}, {teacher.dtype}")
    return div, lp, lse, lse_ref, kl_s, kl_t


def divergence_backward(student, teacher, token_ids, lse, lse_ref, kl_student, c, c_lp, kind, temperature, out):
    """Write the student's gradient into ``out`` from ``c = grad_div / tau`` and ``c_lp = grad_lp / tau`` (float32
    ``[N]``, 0 on rows not taking part; ``c_lp`` None: no lp term); False (nothing written) when the ids are out of
    range."""
    batch, seq, vocab = student.shape
    ids = token_ids.to(torch.int64).contiguous()
    if not _ids_in_range(ids, vocab):
        return False
    lse, lse_ref = (t.to(torch.float64).contiguous() for t in (lse, lse_ref))
    k = kl_student.to(torch.float32).contiguous()
    c = c.to(torch.float32).contiguous()
    c_lp = None if c_lp is None else c_lp.to(torch.float32).contiguous()
    status = library().grpo_cpu_divergence_backward(
        student.data_ptr(),
        _DTYPE_CODES[student.dtype],
        student.stride(0),
        student.stride(1),
        teacher.data_ptr(),
        _DTYPE_CODES[teacher.dtype],
        teacher.stride(0),
        teacher.stride(1),
        batch,
        seq,
        vocab,
        out.data_ptr(),
        out.stride(0),
        out.stride(1),
        ids.data_ptr(),
        lse.data_ptr(),
        lse_ref.data_ptr(),
        k.data_ptr(),
        c.data_ptr(),
        _f32_ptr(c_lp),
        DIVERGENCE_KINDS[kind],
        float(temperature),
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(f"grpo_cpu_divergence_backward returned {status} for {student.dtype}, {teacher.dtype}")
    return True
