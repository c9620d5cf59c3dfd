"""How the benchmarks measure: time, peak memory, the two ceilings (copy bandwidth, matmul rate), the machine.

The same functions run on a GPU and on the CPU:

* time: ``triton.testing.do_bench`` medians on a GPU (CUDA events, L2 flushed before every run); on the CPU a
  ``perf_counter`` loop (warm-up, then at least ``min_runs`` runs and ``rep_ms`` of them), median.
* peak memory: on a GPU ``torch.cuda.max_memory_allocated`` over one run minus what was allocated before it; on
  the CPU the kernel's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) over one run minus
  the resident set before it. The CPU figure is only meaningful in a fresh process per case (freed memory stays in
  the allocator), which is why :mod:`benchmarks.report` measures each CPU case in its own subprocess.
* ceilings: a large device-to-device copy (bytes read + bytes written, over the median time) and a large square
  matmul (2 n^3 FLOPs over the median time), measured in the same run as the cases they are compared with.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------
# time
# ----------------------------------------------------------------------------------------------------------------
def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 200.0,
    min_runs: int = 5,  # >= 2 (percentiles)
) -> dict:
    """Median time of ``fn()`` in ms, with the 20th/80th percentiles and the number of timed runs.

    The caller has already run ``fn`` once or twice (JIT compilation and autotuning stay out of the numbers).
    """
    if device.type == "cuda":
        import triton.testing

        q50, q20, q80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return dict(median_ms=q50, q20_ms=q20, q80_ms=q80, timer="triton.testing.do_bench")
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start) * 1e3 < rep_ms:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    quintiles = statistics.quantiles(times, n=5, method="inclusive")  # the 20th, 40th, 60th, 80th percentiles
    return dict(
        median_ms=statistics.median(times),
        q20_ms=quintiles[0],
        q80_ms=quintiles[-1],
        runs=len(times),
        timer="perf_counter",
    )


# ----------------------------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------------------------
def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset this process's peak resident set (``VmHWM``) to its current size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def repeated_runs(
    step: Callable[[], object], repeats: int, device: torch.device, before_each: Callable[[], object] | None = None
) -> dict:
    """Wall time of ``repeats`` calls of ``step()`` after one warm-up call, and their peak memory above the start.

    ``before_each`` runs untimed before every call, the warm-up's included, and once more before the baseline is
    read: what it frees (e.g. ``.grad`` set to None) is not in the baseline, so the peak counts it again; what the
    warm-up leaves alive otherwise (``.grad`` buffers reused in place, caches) belongs to the baseline. Peak memory:
    on a GPU ``torch.cuda.max_memory_allocated``; on the CPU the peak resident set (``VmHWM``, reset first). Returns
    ``median_s``, ``min_s`` and ``peak_extra_bytes``.
    """
    cuda = device.type == "cuda"
    prepare = before_each or (lambda: None)
    prepare()
    step()
    synchronize(device)
    prepare()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _release_free_heap()
        reset_peak_rss()
        base = status_bytes("VmRSS")
    times = []
    for i in range(repeats):
        if i:
            prepare()
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else status_bytes("VmHWM")
    times.sort()
    return dict(median_s=times[len(times) // 2], min_s=times[0], peak_extra_bytes=peak - base)


def _release_free_heap() -> None:
    """Give the allocator's free pages back to the kernel, so that a later run's peak counts its allocations."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the peak may then undercount reused memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory of one ``fn()`` above what was in use before it (its outputs included until it returns)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        del out
        return torch.cuda.max_memory_allocated(device) - base
    _release_free_heap()
    reset_peak_rss()
    base = status_bytes("VmRSS")
    out = fn()
    del out
    return status_bytes("VmHWM") - base


# ----------------------------------------------------------------------------------------------------------------
# ceilings
# ----------------------------------------------------------------------------------------------------------------
def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> dict:
    """Device-to-device copy of ``nbytes`` (default 2 GiB on a GPU, 256 MiB on the CPU): bytes read + written / s."""
    nbytes = nbytes or (2 << 30 if device.type == "cuda" else 256 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = time_ms(lambda: dst.copy_(src), device)
    moved = 2 * nbytes
    return dict(bytes=moved, median_ms=t["median_ms"], bytes_per_s=moved / (t["median_ms"] * 1e-3))


def fresh_write_bandwidth(nbytes: int = 256 << 20) -> dict:
    """CPU: bytes / s of a first write of ``nbytes`` of new memory (``torch.empty`` then ``fill_``), page faults
    included: what returning a new buffer of that size costs at the least, on top of computing it."""
    device = torch.device("cpu")
    t = time_ms(lambda: torch.empty(nbytes // 4).fill_(1.0), device)
    return dict(bytes=nbytes, median_ms=t["median_ms"], bytes_per_s=nbytes / (t["median_ms"] * 1e-3))


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None) -> dict:
    """FLOP/s of an ``n x n @ n x n`` product on random data (default n = 8192 on a GPU, 1024 on the CPU)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    t = time_ms(lambda: a @ b, device)
    flops = 2 * n**3
    return dict(
        n=n,
        dtype=str(dtype).removeprefix("torch."),
        median_ms=t["median_ms"],
        flop_per_s=flops / (t["median_ms"] * 1e-3),
    )


# ----------------------------------------------------------------------------------------------------------------
# the machine
# ----------------------------------------------------------------------------------------------------------------
def _command(args: list[str]) -> str | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict:
    """Device, driver, CPU, threads, library versions and the git commit: recorded with every result."""
    info = dict(
        date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        device_type=device.type,
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        python=sys.version.split()[0],
        torch=torch.__version__,
        triton=_package_version("triton"),
        liger_kernel=_package_version("liger-kernel"),
        trl=_package_version("trl"),
        transformers=_package_version("transformers"),
        load_average=list(os.getloadavg()),  # 1, 5, 15 minutes (uptime's), when the run started
        # a tree copied without .git (the lent GPU machine): the commit benchmarks/gpu_run.sh was told
        git_commit=_command(["git", "rev-parse", "HEAD"]) or os.environ.get("GPU_RUN_COMMIT"),
        # code only: result files written into benchmarks/results/ by earlier runs do not make a run "dirty"
        git_dirty=bool(
            _command(
                ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"]
            )
        ),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name,
            sm_count=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}",
            memory_bytes=props.total_memory,
            cuda_runtime=torch.version.cuda,
            driver=_command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        )
    else:
        info.update(device_name=info["cpu_model"])
    return info
