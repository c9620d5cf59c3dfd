"""The wheel ships what the package needs outside a checkout: the CUDA sources (found by the JIT build through
importlib.resources), the verified-backends table, py.typed, the license; the version is written once."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (a build leaves build/ and *.egg-info where it runs)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in ("grpo_kernels", "csrc"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("grpo_kernels-*.whl")
    return path


def test_wheel_contents(wheel):
    import grpo_kernels

    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert {f"grpo_kernels/{s}" for s in sources} <= names  # csrc/... -> grpo_kernels/csrc/...
    assert {"grpo_kernels/py.typed", "grpo_kernels/backends/verified.json"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names
    assert wheel.name.startswith(f"grpo_kernels-{grpo_kernels.__version__}-")


def test_jit_build_finds_its_sources_in_a_fresh_venv(wheel, tmp_path):
    """Installed from the wheel into a venv outside the checkout, the CUDA build step locates every source file
    inside the installed package (compiling needs CUDA torch; finding the sources does not)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from a checkout on the path
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall", str(wheel)]
    result = subprocess.run(install, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    code = (
        "import pathlib, grpo_kernels\n"
        "from grpo_kernels.backends import _cuda_build as b\n"
        "package = pathlib.Path(grpo_kernels.__file__).parent\n"
        "assert package.is_relative_to(pathlib.Path(sys.argv[1])), package\n"
        "assert b.CSRC == package / 'csrc', b.CSRC\n"
        "missing = [s for s in b.sources() + [str(pathlib.Path(d) / 'grpo_kernels' / 'row_math.cuh') "
        "for d in b.include_dirs()] if not pathlib.Path(s).is_file()]\n"
        "assert not missing, missing\n"
        "print('ok', len(b.sources()))\n"
    )
    result = subprocess.run(
        [str(python), "-c", "import sys\n" + code, str(venv)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-3000:]
