"""Check a folder of wheels carried to the GPU machine against what its image already holds.

    python -m benchmarks.wheelset .whl [--kinds /work/.library/device/KINDS.md] [--python 3.12]
    python -m benchmarks.wheelset .whl --installed     # on the GPU machine, after the install: the real versions

The GPU machine has no network: what its image lacks travels as wheels and is installed with ``pip install
--no-deps`` (the device README's command), so nothing resolves dependencies there. This check does it here, from
each wheel's ``Requires-Dist`` (markers evaluated for CPython ``--python`` on x86-64 Linux, extras left out):

* every requirement is either carried in the folder (at a version that satisfies it) or in the image's package list;
* no distribution is carried twice (two versions stop the whole install);
* where the image's version is known (the "pip list" row of KINDS.md), it satisfies the requirement; where it is
  not known, the requirement is printed for the GPU run to check (``benchmarks/gpu_run.sh`` prints those versions).

``--installed`` checks the same requirements against the distributions the running interpreter sees (run it there
after the install, with the install folder on ``PYTHONPATH``). Exit status 1 when something is missing, duplicated
or known to conflict. Only the standard library and ``packaging`` are used (no torch).
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

DEFAULT_KINDS = Path("/work/.library/device/KINDS.md")
KIND = "nvidia-h200"


def wheel_requirements(path: Path) -> list[Requirement]:
    """``Requires-Dist`` of a wheel, as :class:`Requirement` objects (markers not yet evaluated)."""
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        if len(names) != 1:
            raise ValueError(f"{path.name}: expected one .dist-info/METADATA, found {names}")
        text = z.read(names[0]).decode()
    headers = text.split("\n\n", 1)[0]
    return [
        Requirement(line.split(":", 1)[1].strip()) for line in headers.splitlines() if line.startswith("Requires-Dist:")
    ]


def target_environment(python: str) -> dict[str, str]:
    """Marker environment of CPython ``python`` ("3.12") on x86-64 Linux."""
    env = default_environment()
    env.update(
        python_version=python,
        python_full_version=f"{python}.0",
        implementation_name="cpython",
        platform_python_implementation="CPython",
        sys_platform="linux",
        platform_system="Linux",
        os_name="posix",
        platform_machine="x86_64",
        extra="",
    )
    return env


def applies(req: Requirement, env: dict[str, str]) -> bool:
    """Whether a requirement holds without extras in ``env`` (``extra == "x"`` markers evaluate false)."""
    return req.marker is None or req.marker.evaluate(env)


def image_packages(kinds_text: str, kind: str = KIND) -> tuple[set[str], dict[str, Version]]:
    """The image's package names (the kind's line of the "Packages:" list) and the versions the "pip list" row gives."""
    names: set[str] = set()
    for line in kinds_text.splitlines():
        if line.startswith(f"{kind}:") and "Packages:" in line:
            listed = line.split("Packages:", 1)[1].strip().rstrip(".")
            names = {canonicalize_name(n.strip()) for n in listed.split(",") if n.strip()}
    versions: dict[str, Version] = {}
    in_kind = False
    for line in kinds_text.splitlines():
        if line.startswith("## "):
            in_kind = line.strip() == f"## `{kind}`"
        if in_kind and line.startswith("| pip list"):
            for name, version in re.findall(r"([A-Za-z0-9_.\-]+) (\d+(?:\.\d+)+(?:\.post\d+)?)", line):
                versions[canonicalize_name(name)] = Version(version)
    return names, versions


def check(folder: Path, kinds_text: str, python: str = "3.12") -> tuple[list[str], list[str]]:
    """``(problems, notes)``: problems make the wheel set unusable; notes are requirements to check on the machine."""
    wheels = sorted(folder.glob("*.whl"))
    problems, notes = [], []
    if not wheels:
        return [f"no wheels in {folder}"], notes
    carried: dict[str, list[Version]] = {}
    for w in wheels:
        name, version, _, tags = parse_wheel_filename(w.name)
        carried.setdefault(canonicalize_name(name), []).append(version)
        if not any(
            t.interpreter in ("py3", f"py{python.replace('.', '')}", f"cp{python.replace('.', '')}") for t in tags
        ):
            problems.append(f"{w.name}: no tag for Python {python}")
    for name, versions in carried.items():
        if len(versions) > 1:
            problems.append(f"{name} carried {len(versions)} times ({', '.join(map(str, versions))}): keep one")
    image, known = image_packages(kinds_text)
    if not image:
        problems.append(f"no package list for {KIND} found in the KINDS text")
    env = target_environment(python)
    for w in wheels:
        for req in wheel_requirements(w):
            if not applies(req, env):
                continue
            name = canonicalize_name(req.name)
            if name in carried:
                bad = [v for v in carried[name] if v not in req.specifier]
                if bad:
                    problems.append(f"{w.name} needs {req}, carried {name} {bad[0]}")
            elif name not in image:
                problems.append(f"{w.name} needs {req}: neither carried nor in the image")
            elif name in known:
                if known[name] not in req.specifier:
                    problems.append(f"{w.name} needs {req}, the image has {name} {known[name]}")
            elif str(req.specifier):
                notes.append(f"{w.name} needs {req}; the image's {name} version is not recorded: check it there")
    return problems, notes


def check_installed(folder: Path, python: str | None = None) -> list[str]:
    """Problems of the carried wheels' requirements against the distributions this interpreter can import."""
    from importlib.metadata import PackageNotFoundError, version

    python = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    env = target_environment(python)
    problems = []
    for w in sorted(folder.glob("*.whl")):
        for req in wheel_requirements(w):
            if not applies(req, env):
                continue
            try:
                found = Version(version(req.name))
            except PackageNotFoundError:
                problems.append(f"{w.name} needs {req}: not installed")
                continue
            if found not in req.specifier:
                problems.append(f"{w.name} needs {req}, found {req.name} {found}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--kinds", type=Path, default=DEFAULT_KINDS, help="the device tool's KINDS.md")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (major.minor)")
    parser.add_argument("--installed", action="store_true", help="check against this interpreter's installed packages")
    args = parser.parse_args(argv)
    if args.installed:
        problems = check_installed(args.folder)
        for line in problems:
            print(f"PROBLEM: {line}")
        print("installed requirements: OK" if not problems else f"installed requirements: {len(problems)} problem(s)")
        return 1 if problems else 0
    if not args.kinds.exists():
        print(f"{args.kinds} not found: cannot compare with the image's package list", file=sys.stderr)
        return 1
    problems, notes = check(args.folder, args.kinds.read_text(), args.python)
    for w in sorted(args.folder.glob("*.whl")):
        print(f"carried: {w.name}")
    for line in notes:
        print(f"note: {line}")
    for line in problems:
        print(f"PROBLEM: {line}")
    print("wheel set: OK" if not problems else f"wheel set: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
