"""Static report of the CUDA kernels (csrc/), from compiling them without a GPU.

    python -m benchmarks.static_report_cuda [--targets sm_80,sm_90] [--cache DIR]

Every kernel translation unit (not the torch binding) is compiled for each target with ``nvcc`` + ``ptxas -v``;
per kernel the report gives the registers per thread, the spill store bytes, the static shared memory and the
widest global load in bytes (16 = the 16-byte vector loads the kernels are written for), read from the SASS
(``cuobjdump -sass``: from the CUDA toolkit, or the copy Triton ships) or, without cuobjdump, from the PTX
(``ld.global.v4.u32`` = 16 bytes). Dynamic shared memory (the sm_90 2-pass kernel's row slice, sized at launch) is
not in these numbers: docs/cuda.md has it.

``rows()`` returns the table as ``list[dict]`` with keys ``kernel, target, registers, spill_bytes,
shared_mem_bytes, widest_global_load_bytes``; compiled units are cached by content hash under ``cache``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNEL_SOURCES = ("logprobs.cu", "grpo_loss.cu", "advantages.cu")  # as grpo_kernels/backends/_cuda_build.py
TARGETS = ("sm_80", "sm_90")
NVCC_FLAGS = ("-std=c++17", "-O3", "--expt-relaxed-constexpr", "-Werror", "all-warnings")


class CompileError(RuntimeError):
    pass


def find_tool(name: str) -> str | None:
    """A CUDA tool on PATH, in $CUDA_HOME/bin, or shipped with Triton (cuobjdump, nvdisasm, ptxas)."""
    found = shutil.which(name)
    if found:
        return found
    for base in filter(None, (os.environ.get("CUDA_HOME"), "/usr/local/cuda")):
        candidate = Path(base) / "bin" / name
        if candidate.is_file():
            return str(candidate)
    try:
        import triton
    except ImportError:
        return None
    candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(candidate) if candidate.is_file() else None


@dataclass
class Unit:
    """One translation unit compiled for one target."""

    source: str
    target: str
    ptxas_log: str
    ptx: Path
    cubin: Path


def _content_key(source: Path, target: str, nvcc: str) -> str:
    h = hashlib.sha256()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    for part in (version, target, " ".join(NVCC_FLAGS)):
        h.update(part.encode())
    for path in [source, *sorted((CSRC / "include").rglob("*"))]:
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def compile_unit(source: Path, target: str, cache: Path) -> Unit:
    """nvcc -> PTX, then PTX -> cubin with ``-Xptxas -v``; reused when nothing it depends on changed."""
    nvcc = find_tool("nvcc")
    if nvcc is None:
        raise CompileError("nvcc not found")
    arch = target.removeprefix("sm_")
    out = cache / f"{source.stem}-{target}-{_content_key(source, target, nvcc)}"
    ptx, cubin, log = out / f"{source.stem}.ptx", out / f"{source.stem}.cubin", out / "ptxas.log"
    if not log.is_file():
        out.mkdir(parents=True, exist_ok=True)
        include = f"-I{CSRC / 'include'}"
        steps = (
            [nvcc, *NVCC_FLAGS, include, f"-arch=compute_{arch}", "--ptx", str(source), "-o", str(ptx)],
            [nvcc, f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", str(ptx), "-o", str(cubin)],
        )
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise CompileError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
        log.write_text(done.stdout + done.stderr)
    return Unit(source.name, target, log.read_text(), ptx, cubin)


def compile_all(cache: Path, targets=TARGETS, jobs: int | None = None) -> list[Unit]:
    work = [(CSRC / name, target) for name in KERNEL_SOURCES for target in targets]
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda st: compile_unit(st[0], st[1], cache), work))


# ----------------------------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------------------------
_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\S+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, dict]:
    """``-Xptxas -v`` output -> {mangled kernel: {registers, spill_bytes, shared_mem_bytes}}."""
    stats: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = stats.setdefault(m.group(1), {"registers": 0, "spill_bytes": 0, "shared_mem_bytes": 0})
        elif current is not None and (m := _SPILL.search(line)):
            current["spill_bytes"] = int(m.group(2))
        elif current is not None and (m := _USED.search(line)):
            current["registers"] = int(m.group(1))
            smem = _SMEM.search(line)
            current["shared_mem_bytes"] = int(smem.group(1)) if smem else 0
    return stats


_PTX_WIDTH = {"8": 1, "16": 2, "32": 4, "64": 8}
_PTX_LOAD = re.compile(r"\bld\.global(?:\.[a-z0-9:]+)*?(?:\.v(\d))?\.[a-z]+(8|16|32|64)\b")


def widest_loads_ptx(ptx: str) -> dict[str, int]:
    """{mangled kernel: widest ``ld.global`` in bytes} from PTX (``ld.global.cs.v4.u32`` -> 16)."""
    widest: dict[str, int] = {}
    current = None
    for line in ptx.splitlines():
        if m := re.match(r"\s*\.(?:visible\s+)?\.entry\s+(\S+?)\(", line):
            current = m.group(1)
            widest[current] = 0
        elif current is not None and (m := _PTX_LOAD.search(line)):
            width = int(m.group(1) or 1) * _PTX_WIDTH[m.group(2)]
            widest[current] = max(widest[current], width)
    return widest


_SASS_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def widest_loads_sass(sass: str) -> dict[str, int]:
    """{mangled kernel: widest ``LDG`` in bytes} from ``cuobjdump -sass`` (``LDG.E.128`` -> 16, ``LDG.E`` -> 4)."""
    widest: dict[str, int] = {}
    current = None
    for line in sass.splitlines():
        if m := re.match(r"\s*Function : (\S+)", line):
            current = m.group(1)
            widest[current] = 0
        elif current is not None and (m := re.search(r"\bLDG((?:\.[A-Z0-9]+)*)\s", line)):
            modifiers = m.group(1).split(".")
            width = next((_SASS_WIDTH[x] for x in modifiers if x in _SASS_WIDTH), 4)
            widest[current] = max(widest[current], width)
    return widest


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if filt is None:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout.splitlines()
    short = [re.sub(r"^void grpo_kernels::(sm90::)?|\(.*$", "", s).replace("grpo_kernels::", "") for s in out]
    return dict(zip(names, short))


def rows(cache: Path | str | None = None, targets=TARGETS, jobs: int | None = None) -> list[dict]:
    """The report table: one dict per (kernel, target)."""
    import tempfile

    cache = Path(cache) if cache is not None else Path(tempfile.gettempdir()) / "grpo_kernels_static_report_cuda"
    cuobjdump = find_tool("cuobjdump")
    table = []
    for unit in compile_all(cache, targets, jobs):
        stats = parse_ptxas(unit.ptxas_log)
        if cuobjdump is not None:
            sass = subprocess.run(
                [cuobjdump, "-sass", str(unit.cubin)], capture_output=True, text=True, check=True
            ).stdout
            loads = widest_loads_sass(sass)
        else:
            loads = widest_loads_ptx(unit.ptx.read_text())
        names = _demangle(sorted(stats))
        for mangled in sorted(stats):
            table.append(
                dict(
                    kernel=names[mangled],
                    target=unit.target,
                    **stats[mangled],
                    widest_global_load_bytes=loads.get(mangled, 0),
                )
            )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--cache", default=None, help="directory for compiled units (default: a temp dir)")
    args = parser.parse_args()
    table = rows(args.cache, tuple(args.targets.split(",")))
    head = ("kernel", "target", "registers", "spill_bytes", "shared_mem_bytes", "widest_global_load_bytes")
    width = max(len(r["kernel"]) for r in table)
    print(f"{head[0]:<{width}}  " + "  ".join(f"{h:>{len(h)}}" for h in head[1:]))
    for r in table:
        print(f"{r['kernel']:<{width}}  " + "  ".join(f"{r[h]:>{len(h)}}" for h in head[1:]))
    print(
        f"\nloads read from: {'SASS (cuobjdump)' if find_tool('cuobjdump') else 'PTX'}; the sm_90 2-pass kernel "
        "loads the logits with cp.async.bulk (not an LDG), its widest LDG is a per-token input."
    )


if __name__ == "__main__":
    main()
