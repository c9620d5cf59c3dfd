"""CI without a GPU: every kernel translation unit in csrc/ compiles for sm_80 and sm_90 with ``ptxas -v``, without a
spill store, with 16-byte global loads in the row kernels, and with the Hopper instructions really in the sm_90
2-pass kernel. Skipped (with the reason) where nvcc is absent. Compiled units are shared by the whole session
(benchmarks/static_report_cuda.py caches them by content hash in a session temp dir).
"""

import subprocess
import time
from pathlib import Path

import pytest

from benchmarks import static_report_cuda as report

pytestmark = pytest.mark.skipif(
    report.find_tool("nvcc") is None, reason="nvcc not found: the CUDA kernels cannot be compiled"
)

KEYS = {"kernel", "target", "registers", "spill_bytes", "shared_mem_bytes", "widest_global_load_bytes"}


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cuda_compile")


@pytest.fixture(scope="session")
def table(cache):
    start = time.perf_counter()
    rows = report.rows(cache)
    print(
        f"\ncompiled {len(report.KERNEL_SOURCES)} units x {len(report.TARGETS)} targets in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return rows


def test_every_kernel_compiles_for_every_target_without_spills(table):
    assert table and all(set(row) == KEYS for row in table)
    for target in report.TARGETS:
        kernels = {row["kernel"] for row in table if row["target"] == target}
        for name in (
            "row_forward_kernel",
            "row_backward_kernel",
            "scale_gradient_kernel",
            "grpo_loss_two_pass_kernel",
            "group_stats_kernel",
            "row_totals_kernel",
            "group_sums_kernel",
            "batch_summary_kernel",
            "advantages_kernel",
        ):
            assert any(k.startswith(name) for k in kernels), (name, target)
    spilled = [(row["kernel"], row["target"], row["spill_bytes"]) for row in table if row["spill_bytes"] > 0]
    assert not spilled, f"spill stores: {spilled}"


def test_row_kernels_load_16_bytes_at_a_time(table):
    rows = [row for row in table if row["kernel"].startswith(("row_forward_kernel", "row_backward_kernel"))]
    assert len(rows) == 2 * 3 * 2 * 3  # (fwd logprobs, fwd loss, bwd) x dtype x team x target, counted below
    assert all(row["widest_global_load_bytes"] == 16 for row in rows), [
        (row["kernel"], row["target"], row["widest_global_load_bytes"]) for row in rows
    ]


def _entry_ptx(ptx: str, kernel: str) -> str:
    start = ptx.index(next(line for line in ptx.splitlines() if ".entry" in line and kernel in line))
    return ptx[start : ptx.index("\n}", start)]


def test_two_pass_kernel_uses_clusters_and_bulk_copies_on_sm90_only(cache):
    units = {(u.source, u.target): u for u in report.compile_all(cache)}
    hopper = _entry_ptx(units["grpo_loss.cu", "sm_90"].ptx.read_text(), "grpo_loss_two_pass_kernel")
    for instruction in (
        "cp.async.bulk.shared::cluster.global",
        "mbarrier.try_wait.parity",
        "barrier.cluster.wait",
        "mapa",
        "st.global.cs.v4",
    ):
        assert instruction in hopper, instruction
    ampere = _entry_ptx(units["grpo_loss.cu", "sm_80"].ptx.read_text(), "grpo_loss_two_pass_kernel")
    assert "cp.async.bulk" not in ampere and "ld.global" not in ampere  # compiled out below sm_90


def test_ptx_and_sass_load_parsers():
    ptx = """.visible .entry k1(
    ld.global.cs.v4.u32 {%r1, %r2, %r3, %r4}, [%rd1];
    ld.global.nc.u16 %rs1, [%rd2];
}
.visible .entry k2(
    ld.global.f32 %f1, [%rd3];
    ld.global.v2.u64 {%rd4, %rd5}, [%rd6];
}"""
    assert report.widest_loads_ptx(ptx) == {"k1": 16, "k2": 16}
    sass = """        Function : k1
        /*0010*/  LDG.E.EF.128 R4, desc[UR4][R2.64] ;
        /*0020*/  LDG.E.U16.CONSTANT R1, desc[UR4][R6.64] ;
        Function : k2
        /*0010*/  LDG.E.CONSTANT R3, desc[UR4][R2.64] ;"""
    assert report.widest_loads_sass(sass) == {"k1": 16, "k2": 4}


def test_ptxas_log_parser():
    log = """ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'
ptxas info    : Function properties for _Z1kv
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem"""
    assert report.parse_ptxas(log) == {"_Z1kv": {"registers": 40, "spill_bytes": 4, "shared_mem_bytes": 128}}


def _torch_includes() -> list[str]:
    from torch.utils import cpp_extension

    return cpp_extension.include_paths()


@pytest.mark.slow
def test_torch_binding_compiles(tmp_path):
    """The binding against this torch's headers (object file only: a CPU torch has no CUDA libraries to link).
    CPU wheels lack the generated c10/cuda/impl/cuda_cmake_macros.h; a one-line stand-in is supplied then."""
    includes = _torch_includes()
    if not any((Path(p) / "c10" / "cuda" / "CUDAGuard.h").is_file() for p in includes):
        pytest.skip("this torch has no c10/cuda headers")
    shim = tmp_path / "shim"
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in includes):
        (shim / "c10/cuda/impl").mkdir(parents=True)
        (shim / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [
        report.find_tool("nvcc"),
        "-std=c++17",
        "-arch=sm_90",
        f"-I{report.CSRC / 'include'}",
        f"-I{shim}",
        *(f"-I{p}" for p in includes),
        "-c",
        str(report.CSRC / "torch_binding.cu"),
        "-o",
        str(tmp_path / "b.o"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
