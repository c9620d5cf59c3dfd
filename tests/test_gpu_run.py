"""The GPU run's tooling without a GPU: benchmarks/gpu_run.sh in its dry mode (stages, caps, the deadline, the files
it leaves in $OUT), the per-backend verdict that writes verified.json, and the wheel-set check of fetch_wheels.sh."""

from __future__ import annotations

import json
import os
import re
import subprocess
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_run, wheelset

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "benchmarks" / "gpu_run.sh", ROOT / "benchmarks" / "fetch_wheels.sh"]
VERIFIED_KEYS = {"backend", "arch", "device", "date", "torch", "triton", "cuda", "tests"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_dry_run_stages_caps_deadline_and_files(tmp_path):
    """Every stage in order; a stage past its cap is stopped and reported as such; a stage that would start too close
    to the deadline is skipped; what $OUT holds fits the device tool's return limits."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(
        os.environ,
        OUT=str(out),
        WORK=str(work),
        GPU_RUN_DRY="1",
        CAP_build="1",
        TOTAL_S="6",
        RESERVE_S="1",
        MIN_STAGE_S="2",
        GPU_RUN_DRY_SLEEP="build:4,racecheck:3",
    )
    proc = subprocess.run(
        ["bash", str(SCRIPTS[0])], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    summary = (out / "summary.md").read_text()
    rows = [line.split(" | ") for line in summary.splitlines() if line.startswith("| ") and "---" not in line][1:]
    stages = [row[0].strip("| ") for row in rows]
    assert stages == ["env", "build", "warm", "test", "headline", "memcheck", "racecheck", "grid"]
    status = {row[0].strip("| "): row[1] for row in rows}
    assert status["env"] == status["test"] == "ok"
    assert status["build"] == "timeout (cap 1 s)"
    assert status["grid"] == "skipped"
    assert "verified: none" in summary and summary.rstrip().splitlines()[-1].startswith("done in")
    assert json.loads((out / "verified.json").read_text()) == []
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert {str(f) for f in files} == {"junit.xml", "results.tar.gz", "run.log", "summary.md", "verified.json"}
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", str(f)) for f in files)
    log = (out / "run.log").read_text()
    assert log.count("=== build") == 2 and "would run: python3 -m pytest" in log


def test_unknown_stage_is_refused(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "o"), WORK=str(tmp_path / "w"), GPU_RUN_DRY="1")
    proc = subprocess.run(
        ["bash", str(SCRIPTS[0]), "tests"], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and "unknown stage tests" in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# the verdict behind verified.json
# ----------------------------------------------------------------------------------------------------------------
FACTS = {
    "device": "NVIDIA H200",
    "arch": "sm_90",
    "driver": "580",
    "torch": "2.11.0+cu130",
    "triton": "3.6.0",
    "cuda": "13.0",
    "date": "2026-12-01",
}


def _junit(path: Path, cases: list[tuple[str, str, str]]) -> Path:
    """A pytest-style junit XML file of (module, test name, outcome) with outcome passed/failed/error/skipped."""
    body = []
    for module, name, outcome in cases:
        inner = {
            "passed": "",
            "failed": '<failure message="x"/>',
            "error": '<error message="x"/>',
            "skipped": '<skipped message="x"/>',
        }[outcome]
        body.append(f'<testcase classname="tests.{module}" name="{name}" time="0.1">{inner}</testcase>')
    path.write_text(
        f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{"".join(body)}</testsuite></testsuites>'
    )
    return path


def test_classify():
    assert (
        gpu_run.classify("tests.test_grpo_loss", "test_float32_matches_reference[triton-grpo-token-plain]") == "triton"
    )
    assert gpu_run.classify("tests.test_token_logprobs", "test_strided_logits_are_not_copied_and_match[cuda]") == "cuda"
    assert gpu_run.classify("tests.test_gpu", "test_dense_beyond_2_31_elements[gpu-torch-rows8200-V262144]") == "torch"
    assert gpu_run.classify("tests.test_gpu", "test_dense_beyond_2_31_elements[cpu-torch-rows8200-V262144]") == "other"
    assert gpu_run.classify("tests.test_triton_kernels", "test_vocab_tiling") == "triton"
    assert gpu_run.classify("tests.test_grpo_loss", "test_gradcheck_float64_torch_backend") == "shared"
    assert gpu_run.classify("tests.test_benchmarks_smoke", "test_report[cuda]") == "other"


def _ids(cases):
    return [(f"tests.{module}", name) for module, name, _ in cases]


def test_verdict_per_backend(tmp_path):
    cases = [
        ("test_grpo_loss", "test_a[triton-x]", "passed"),
        ("test_grpo_loss", "test_a[torch-x]", "passed"),
        ("test_grpo_loss", "test_a[cuda-x]", "failed"),
        ("test_grpo_loss", "test_b[cuda-y]", "passed"),
        ("test_grpo_loss", "test_shared", "passed"),
        ("test_benchmarks_smoke", "test_report[cuda]", "error"),
        ("test_gpu", "test_c[gpu-torch]", "skipped"),
    ]
    results = gpu_run.junit_results(_junit(tmp_path / "j.xml", cases))
    counts = gpu_run.count(results, _ids(cases))
    assert counts["cuda"] == {"passed": 1, "failed": 1, "skipped": 0, "missing": 0}
    assert counts["other"]["failed"] == 1
    entries, lines = gpu_run.verdict(counts, 1, FACTS, collected=True)
    assert [e["backend"] for e in entries] == ["torch", "triton"]  # cuda failed; tooling errors count for no one
    assert all(set(e) == VERIFIED_KEYS for e in entries)
    assert entries[1] == {
        "backend": "triton",
        "arch": "sm_90",
        "device": "NVIDIA H200",
        "date": "2026-12-01",
        "torch": "2.11.0+cu130",
        "triton": "3.6.0",
        "cuda": "13.0",
        "tests": 2,
    }
    assert "cuda: 1 passed, 1 failed, 0 skipped, 0 not run -> not verified" in lines


def test_a_run_stopped_by_its_cap_verifies_the_backends_it_completed(tmp_path):
    done = [("test_grpo_loss", "test_shared", "passed"), ("test_grpo_loss", "test_a[cuda-x]", "passed")]
    not_run = [("test_grpo_loss", "test_a[triton-x]", "passed")]
    results = gpu_run.junit_results(_junit(tmp_path / "j.xml", done))
    entries, lines = gpu_run.verdict(gpu_run.count(results, _ids(done + not_run)), 124, FACTS, collected=True)
    assert [e["backend"] for e in entries] == ["cuda"]
    assert "triton: 0 passed, 0 failed, 0 skipped, 1 not run -> not verified" in lines
    # without the collected list, a stopped run verifies nothing
    assert gpu_run.verdict(gpu_run.count(results), 124, FACTS)[0] == []


@pytest.mark.parametrize("why", ["shared failure", "shared not run", "interrupted", "cpu", "only skipped"])
def test_verdict_verifies_nothing_when(tmp_path, why):
    cases = [("test_grpo_loss", "test_a[triton-x]", "skipped" if why == "only skipped" else "passed")]
    collected = _ids(cases)
    if why == "shared failure":
        cases.append(("test_reference_like", "test_shared", "failed"))
    if why == "shared not run":
        collected.append(("tests.test_reference_like", "test_shared"))
    results = gpu_run.junit_results(_junit(tmp_path / "j.xml", cases))
    with_list = why != "interrupted"
    counts = gpu_run.count(results, collected if with_list else None)
    exit_code = 2 if why == "interrupted" else 0
    facts = dict(FACTS, arch=None, device="cpu") if why == "cpu" else FACTS
    entries, lines = gpu_run.verdict(counts, exit_code, facts, collected=with_list)
    assert entries == [] and any("not verified" in line for line in lines)


def test_junit_id_and_priority_order():
    assert gpu_run.junit_id("tests/test_gpu.py::test_x[gpu-cuda-V1]") == ("tests.test_gpu", "test_x[gpu-cuda-V1]")
    assert gpu_run.junit_id("tests/test_a.py::TestB::test_c") == ("tests.test_a.TestB", "test_c")
    from benchmarks import gpu_order

    class Item:
        def __init__(self, nodeid):
            self.nodeid = nodeid

    names = [
        "tests/test_grpo_loss.py::test_a[torch]",
        "tests/test_grpo_loss.py::test_a[triton]",
        "tests/test_benchmarks_smoke.py::test_r",
        "tests/test_grpo_loss.py::test_a[cuda]",
        "tests/test_grpo_loss.py::test_shared",
        "tests/test_grpo_loss.py::test_b[cuda]",
    ]
    items = [Item(n) for n in names]
    gpu_order.pytest_collection_modifyitems(None, None, items)
    assert [i.nodeid for i in items] == [names[4], names[3], names[5], names[1], names[0], names[2]]


def test_verdict_command_writes_the_file(tmp_path, capsys):
    junit = _junit(tmp_path / "j.xml", [("test_gpu", "test_x[gpu-cuda-V151936]", "passed")])
    ids = tmp_path / "collected.txt"
    ids.write_text("tests/test_gpu.py::test_x[gpu-cuda-V151936]\n")
    out = tmp_path / "verified.json"
    argv = ["verdict", str(junit), "--exit-code", "124", "--out", str(out), "--collected", str(ids)]
    gpu_run.main([*argv, "--facts", json.dumps(FACTS)])
    assert [e["backend"] for e in json.loads(out.read_text())] == ["cuda"]
    assert "@@ verified: cuda" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# the wheel-set check
# ----------------------------------------------------------------------------------------------------------------
KINDS = """## `nvidia-h200`
| pip list, as a session saw it | 2026-11: accelerate 1.15.0, torch 2.11.0, transformers 5.17.0 |

nvidia-h200: their image, 'cuda', holds these. Packages: accelerate, numpy, torch, transformers, triton.
"""


def _wheel(folder: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any") -> None:
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}\n\nlong description\nRequires-Dist: not-a-header\n".format(
        name, version, "\n".join(f"Requires-Dist: {r}" for r in requires)
    )
    with zipfile.ZipFile(folder / f"{name}-{version}-{tag}.whl", "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)


def test_image_packages_parse():
    names, versions = wheelset.image_packages(KINDS)
    assert names == {"accelerate", "numpy", "torch", "transformers", "triton"}
    assert str(versions["transformers"]) == "5.17.0" and "numpy" not in versions


def test_wheel_set_ok_with_markers_and_extras(tmp_path):
    _wheel(tmp_path, "liger_kernel", "0.8.5", ["torch>=2.1.2", "triton>=2.3.1", 'pytest; extra == "dev"'])
    _wheel(tmp_path, "trl", "1.16.0", ["accelerate>=1.10.1", "datasets>=4.7.0", 'pywin32; sys_platform == "win32"'])
    _wheel(tmp_path, "datasets", "5.2.0", ["numpy>=1.17"])
    problems, notes = wheelset.check(tmp_path, KINDS)
    assert problems == [] and any("numpy" in n for n in notes)


def test_wheel_set_problems(tmp_path):
    _wheel(tmp_path, "trl", "1.16.0", ["datasets>=4.7.0", "transformers>=6"])
    _wheel(tmp_path, "dill", "0.4.1", [])
    _wheel(tmp_path, "dill", "0.4.0", [])
    _wheel(tmp_path, "multiprocess", "0.70.19", ["dill>=0.4.1"], tag="py311-none-any")
    problems, _ = wheelset.check(tmp_path, KINDS)
    assert any("datasets>=4.7.0: neither carried nor in the image" in p for p in problems)
    assert any("transformers>=6, the image has transformers 5.17.0" in p for p in problems)
    assert any("dill carried 2 times" in p for p in problems)
    assert any("needs dill>=0.4.1, carried dill 0.4.0" in p for p in problems)
    assert any("no tag for Python 3.12" in p for p in problems)


# ----------------------------------------------------------------------------------------------------------------
# what the headline stage asks of the report
# ----------------------------------------------------------------------------------------------------------------
def test_report_cases_selects_named_cases_and_refuses_unknown_ones():
    import argparse

    from benchmarks import report

    wanted = "grpo_loss-N16384-V151936-is-token-beta0.04-bfloat16"
    args = argparse.Namespace(ops=["grpo_loss"], cases=[wanted])
    assert [c.id for c in report._selected_cases("gpu", args)] == [wanted]
    fused = "fused_linear_grpo_loss-N16384-V151936-H4096-is-token-beta0.04-bfloat16"
    args = argparse.Namespace(ops=["fused_linear_grpo_loss"], cases=[fused])
    assert [c.id for c in report._selected_cases("gpu", args)] == [fused]
    with pytest.raises(SystemExit, match="not in preset"):
        report._selected_cases("gpu", argparse.Namespace(ops=["grpo_loss"], cases=["grpo_loss-N1-V1"]))


def test_cuda_gif_provider_is_the_cuda_backend_with_grad_in_forward():
    import torch

    from benchmarks import providers
    from benchmarks.cases import Case

    loss = Case(op="grpo_loss", dtype="bfloat16", tokens=16384, seq_len=1024, vocab=151936, beta=0.04)
    fn, args, wrt = providers.objective("cuda_gif", loss)
    assert fn.keywords == {"beta": 0.04, "level": "token", "backend": "cuda", "grad_in_forward": True}
    assert (args, wrt) == providers.objective("cuda", loss)[1:]
    fused = Case(op="fused_linear_grpo_loss", dtype="bfloat16", tokens=32, seq_len=8, vocab=50, hidden=8)
    assert "grpo_loss only" in providers.unavailable_reason("cuda_gif", fused, torch.device("cpu"))
    assert providers.unavailable_reason("cuda_gif", loss, torch.device("cpu")) == providers.unavailable_reason(
        "cuda", loss, torch.device("cpu")
    )


def test_goals_of_the_headline_case_with_beta_0_04():
    from benchmarks import render
    from benchmarks.cases import Case

    case = Case(op="grpo_loss", dtype="bfloat16", tokens=16384, seq_len=1024, vocab=151936, beta=0.04)
    rows = [
        {
            "op": "grpo_loss",
            "status": "ok",
            "case": case,
            "case_id": case.id,
            "provider": "cuda_gif",
            "pct_copy_min": 90.0,
            "x_liger": 1.4,
            "x_eager": 12.0,
        },
    ]
    case_id, lines = render._goal_rows(rows, render.LOSS_GOAL_CASE, render.LOSS_GOALS)
    assert case_id == case.id
    assert lines == [
        "| cuda_gif | % of copy bandwidth, 2 passes | 90.00 | 85 | met |",
        "| cuda_gif | x Liger triton_grpo_loss | 1.40 | 1.5 | missed |",
        "| cuda_gif | x eager | 12.00 | 10 | met |",
    ]


def test_warm_calls_run_with_the_torch_backend():
    """The warm stage's calls (signatures, shapes) on the CPU at a tiny vocabulary; on a GPU they run per backend."""
    import torch

    calls = gpu_run._warm_calls(torch.device("cpu"), torch.float32, vocab=64)
    assert len(calls) == 7
    for name, fn in calls:
        value = gpu_run._first(fn("torch"))
        assert torch.isfinite(torch.as_tensor(value)).all(), name
