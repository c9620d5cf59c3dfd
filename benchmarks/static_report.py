"""The static report: registers, spills, shared memory and the widest global load of every kernel, without a GPU.

    python -m benchmarks.static_report [--out DIR]

Combines two sources, each a module with ``rows() -> list[dict]`` (keys ``kernel, target, registers, spill_bytes,
shared_mem_bytes, widest_global_load_bytes``):

* ``benchmarks/static_report_triton.py``: every Triton kernel compiled for sm_90 and sm_80 with ``triton.compile``
  and a ``GPUTarget`` (no GPU needed);
* ``benchmarks/static_report_cuda.py``: every CUDA kernel through ``nvcc -Xptxas -v`` (and its SASS).

A source that is not there yet (its backend has not landed) is named in a note. Prints the markdown table; with
``--out`` also writes ``static_report.md`` and ``static_report.json`` there.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import subprocess
import sys
from pathlib import Path

SOURCES = (("triton", "benchmarks.static_report_triton"), ("cuda", "benchmarks.static_report_cuda"))
KEYS = ("kernel", "target", "registers", "spill_bytes", "shared_mem_bytes", "widest_global_load_bytes")
HEAD = ("source", "kernel", "target", "registers", "spills (B)", "shared memory (B)", "widest global load (B)")


def collect(sources=SOURCES) -> tuple[list[dict], list[str]]:
    """``(rows, notes)``: every source's rows, each tagged with its source; a note per missing source."""
    rows, notes = [], []
    for source, module_name in sources:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:  # the module exists but one of its own imports is missing: that is a failure
                raise
            notes.append(
                f"{source}: {module_name.replace('.', '/')}.py is not there yet (the {source} backend has not landed)"
            )
            continue
        for row in module.rows():
            missing = [k for k in KEYS if k not in row]
            if missing:
                raise KeyError(f"{module_name}.rows() returned a row without {missing}: {row}")
            rows.append(dict(source=source, **{k: row[k] for k in KEYS}))
    return rows, notes


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        triton = version("triton")
    except PackageNotFoundError:
        triton = None
    try:
        banner = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True).stdout
        nvcc = next((line.split(",", 1)[1].strip() for line in banner.splitlines() if "release" in line), None)
    except (OSError, subprocess.SubprocessError):
        nvcc = None
    return dict(triton=triton, nvcc=nvcc, python=sys.version.split()[0])


def markdown(rows: list[dict], notes: list[str], versions: dict) -> str:
    lines = [f"Static kernel report (triton {versions['triton']}; nvcc: {versions['nvcc']})", ""]
    lines += ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(str(row[k]) for k in ("source",) + KEYS) + " |" for row in rows]
    if not rows:
        lines.append("| " + " | ".join(["–"] * len(HEAD)) + " |")
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write static_report.md and static_report.json into this folder")
    args = parser.parse_args(argv)
    rows, notes = collect()
    versions = _versions()
    text = markdown(rows, notes, versions)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "static_report.md").write_text(text)
        generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        (out / "static_report.json").write_text(
            json.dumps(dict(generated_utc=generated, versions=versions, notes=notes, rows=rows), indent=1)
        )


if __name__ == "__main__":
    main()
