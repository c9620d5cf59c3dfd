"""The Python side of ``benchmarks/gpu_run.sh``: one subcommand per job a stage needs, each printing its key numbers
on lines that start with ``@@ `` (the shell script copies those into ``summary.md``).

    python -m benchmarks.gpu_run env                      # the machine, the versions, the carried packages
    python -m benchmarks.gpu_run build                    # build / load the CUDA extension, timed; the backends
    python -m benchmarks.gpu_run warm                     # first (JIT) and second call of every kernel, per dtype
    python -m benchmarks.gpu_run verdict JUNIT --exit-code RC --out verified.json [--collected IDS]
    python -m benchmarks.gpu_run headline RESULTS_DIR     # the headline numbers of a report folder

``verdict`` writes the JSON list the package's backend table reads: one entry per backend ("triton", "cuda",
"torch") whose GPU test selection passed with zero failures, with the keys ``backend, arch, device, date, torch,
triton, cuda, tests`` (``tests``: the number of that backend's tests that passed, the shared ones included).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

KEY = "@@ "
BACKENDS = ("torch", "triton", "cuda")
# Test modules whose results say nothing about a backend's kernels: their failures are reported, not held against
# any backend (the benchmark tooling, and the CPU stand-ins of tests/test_gpu.py when they run on the GPU machine).
NON_BLOCKING_MODULES = ("test_benchmarks_smoke",)
CPU_TOKEN = "cpu"
# the order the GPU run schedules the groups in (benchmarks/gpu_order.py): a run its cap stops completes the first
PRIORITY = ("shared", "cuda", "triton", "torch", "other")


def key(line: str) -> None:
    print(KEY + line, flush=True)


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _command(args: list[str]) -> str | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def device_facts() -> dict:
    """Device name, sm_XY, driver and the versions the verdict records (torch imported here, CUDA not initialised
    beyond the device query)."""
    import torch

    facts = {
        "device": "cpu",
        "arch": None,
        "driver": None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        facts.update(
            device=torch.cuda.get_device_name(0),
            arch=f"sm_{major}{minor}",
            driver=_command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        )
    return facts


# ----------------------------------------------------------------------------------------------------------------
# env
# ----------------------------------------------------------------------------------------------------------------
def cmd_env(args: argparse.Namespace) -> int:
    import torch

    facts = device_facts()
    if args.facts_out:
        args.facts_out.write_text(json.dumps(facts))
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    print(f"torch {torch.__version__} (CUDA runtime {torch.version.cuda}), triton {facts['triton']}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(
            f"device {p.name}: {facts['arch']}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
            f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB, driver {facts['driver']}"
        )
    else:
        print("no CUDA device visible to torch")
    for name in (
        "transformers",
        "accelerate",
        "liger-kernel",
        "trl",
        "datasets",
        "dill",
        "multiprocess",
        "pyarrow",
        "fsspec",
        "pandas",
        "numpy",
        "pytest",
        "pytest-xdist",
        "pytest-timeout",
    ):
        print(f"{name}: {_version(name)}")
    imports = {}
    for module in (
        "liger_kernel.transformers.grpo_loss",
        "liger_kernel.chunked_loss",
        "trl.kernels",
        "trl",
        "datasets",
    ):
        try:
            importlib.import_module(module)
            imports[module] = "ok"
        except Exception as e:  # noqa: BLE001 - reported; the providers that need it are skipped with the reason
            imports[module] = f"{type(e).__name__}: {e}"
        print(f"import {module}: {imports[module]}")
    dev = facts["device"] if facts["arch"] is None else f"{facts['device']} ({facts['arch']})"
    key(
        f"{dev}, driver {facts['driver']}, torch {facts['torch']} (CUDA {facts['cuda']}), triton {facts['triton']}, "
        f"Python {sys.version.split()[0]}"
    )
    bad = [m for m, r in imports.items() if r != "ok"]
    key(
        f"liger-kernel {_version('liger-kernel')}, trl {_version('trl')}: "
        + ("all imports ok" if not bad else f"NOT importable: {', '.join(bad)}")
    )
    return 0


# ----------------------------------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    import torch

    from grpo_kernels.backends import _cuda_build, unavailable_reason

    archs = ";".join(_cuda_build.archs())
    status = 0
    if torch.cuda.is_available():
        from torch.utils import cpp_extension

        try:  # torch's private helper (2.4-2.11 at least): where load() builds
            build_dir = Path(cpp_extension._get_build_directory(_cuda_build.EXTENSION_NAME, verbose=False))
            fresh = not any(build_dir.glob("*.so"))
        except Exception:  # noqa: BLE001 - only the wording of the line below depends on it
            build_dir, fresh = "torch's extension cache", True
        start = time.perf_counter()
        error = _cuda_build.load()
        seconds = time.perf_counter() - start
        what = "built" if fresh else "loaded (already built in this machine's cache)"
        if error is None:
            key(f"CUDA extension {what} in {seconds:.1f} s (archs {archs}, nvcc {_nvcc_version()}, {build_dir})")
        else:
            key(f"CUDA extension FAILED after {seconds:.1f} s: {error[:300]}")
            status = 1
        # a second process loads the cached build: what every later stage and test worker pays
        start = time.perf_counter()
        probe = "from grpo_kernels.backends import _cuda_build; assert _cuda_build.load() is None"
        ok = subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0
        key(f"CUDA extension load in a fresh process: {time.perf_counter() - start:.1f} s ({'ok' if ok else 'FAILED'})")
    else:
        key("no CUDA device: nothing to build")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reasons = {name: unavailable_reason(name, device) for name in BACKENDS}
    for name, reason in reasons.items():
        print(f"backend {name} on {device}: {reason or 'available'}")
    key(
        "backends on {}: {}".format(
            device, ", ".join(f"{n} {'ok' if r is None else 'UNAVAILABLE'}" for n, r in reasons.items())
        )
    )
    return status


def _nvcc_version() -> str | None:
    text = _command(["nvcc", "--version"]) or ""
    found = re.search(r"release (\d+\.\d+)", text)
    return found.group(1) if found else None


# ----------------------------------------------------------------------------------------------------------------
# warm: first call (compilation) and second call of each kernel
# ----------------------------------------------------------------------------------------------------------------
def _warm_calls(device, dtype, vocab: int):
    """(name, fn) pairs, each a call that launches one group of kernels of a backend (passed to fn)."""
    import torch

    from grpo_kernels import group_advantages, grpo_loss, token_logprobs
    from grpo_kernels.fused_linear import fused_linear_grpo_loss

    g = torch.Generator(device=device).manual_seed(0)
    b, t = 4, 256
    z = torch.randn(b, t, vocab, generator=g, device=device, dtype=dtype).mul_(2.0)
    ids = torch.randint(0, vocab, (b, t), generator=g, device=device)
    mask = torch.ones(b, t, device=device)
    adv = torch.randn(b, generator=g, device=device)
    old = torch.randn(b, t, generator=g, device=device) - 12.0
    rewards = torch.randn(4096, generator=g, device=device)
    hid = torch.randn(b, t, 512, generator=g, device=device, dtype=dtype)
    w = torch.randn(vocab, 512, generator=g, device=device, dtype=dtype).mul_(512**-0.5)

    def leaf(x):
        return x.detach().clone().requires_grad_(True)

    def logprobs(backend):
        with torch.no_grad():
            return token_logprobs(z, ids, backend=backend)

    def logprobs_entropy_backward(backend):
        zz = leaf(z)
        lp, h = token_logprobs(zz, ids, return_entropy=True, backend=backend)
        return torch.autograd.grad(lp.sum() + h.sum(), zz)[0]

    def loss(level, **extra):
        def run(backend):
            zz = leaf(z)
            out = grpo_loss(
                zz,
                ids,
                adv,
                mask=mask,
                old_logprobs=old,
                ref_logprobs=old,
                beta=0.04,
                importance_sampling_level=level,
                backend=backend,
                **extra,
            )
            return out.loss, torch.autograd.grad(out.loss, zz)[0]

        return run

    def fused_linear(backend):
        hh, ww = leaf(hid), leaf(w)
        out = fused_linear_grpo_loss(hh, ww, ids, adv, mask=mask, old_logprobs=old, backend=backend)
        return out.loss, *torch.autograd.grad(out.loss, (hh, ww))

    return [
        ("token_logprobs", logprobs),
        ("token_logprobs+entropy fwd+bwd", logprobs_entropy_backward),
        ("grpo_loss token fwd+bwd", loss("token")),
        ("grpo_loss sequence fwd+bwd", loss("sequence")),
        ("grpo_loss grad_in_forward", loss("token", grad_in_forward=True)),
        ("group_advantages", lambda backend: group_advantages(rewards, group_size=16, backend=backend)),
        ("fused_linear fwd+bwd", fused_linear),
    ]


def cmd_warm(args: argparse.Namespace) -> int:
    import torch

    from grpo_kernels.backends import unavailable_reason

    if not torch.cuda.is_available():
        key("no CUDA device: nothing to warm")
        return 0
    device = torch.device("cuda")
    backends = [b for b in ("triton", "cuda") if unavailable_reason(b, device) is None]
    print(f"{'backend':<8} {'dtype':<9} {'call':<32} {'first s':>8} {'second ms':>10}  loss vs torch")
    status = 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        totals, slowest = {}, {}
        calls = _warm_calls(device, dtype, args.vocab)
        for name, fn in calls:
            expect = _first(fn("torch"))
            for backend in backends:
                try:
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    first = fn(backend)
                    torch.cuda.synchronize()
                    first_s = time.perf_counter() - start
                    start = time.perf_counter()
                    fn(backend)
                    torch.cuda.synchronize()
                    second_ms = (time.perf_counter() - start) * 1e3
                except Exception as e:  # noqa: BLE001 - reported, and the stage fails; the other calls go on
                    print(f"{backend:<8} {str(dtype)[6:]:<9} {name:<32} FAILED: {type(e).__name__}: {e}")
                    status = 1
                    continue
                diff = abs(float(_first(first)) - float(expect)) / max(abs(float(expect)), 1e-12)
                print(f"{backend:<8} {str(dtype)[6:]:<9} {name:<32} {first_s:8.2f} {second_ms:10.2f}  {diff:.1e}")
                totals[backend] = totals.get(backend, 0.0) + first_s
                slowest[backend] = max(slowest.get(backend, (0.0, "")), (first_s, name))
        # one line per dtype as it completes: a stage stopped by its cap still reports the dtypes it did
        key(
            f"{str(dtype)[6:]}: first calls of {len(calls)} kernel groups (JIT included): "
            + ", ".join(f"{b} {t:.1f} s (slowest {slowest[b][1]}, {slowest[b][0]:.1f} s)" for b, t in totals.items())
            + ("" if status == 0 else "; SOME CALLS FAILED")
        )
    return status


def _first(x):
    import torch

    while isinstance(x, (tuple, list)):
        x = x[0]
    return x.float().sum() if isinstance(x, torch.Tensor) and x.dim() else x


# ----------------------------------------------------------------------------------------------------------------
# verdict: per-backend results of the GPU test selection
# ----------------------------------------------------------------------------------------------------------------
def classify(classname: str, name: str) -> str:
    """The backend a test result speaks for: a backend name, ``"shared"`` (kernel tests of no one backend: a failure
    there counts against all) or ``"other"`` (tooling and CPU stand-ins: reported only)."""
    module = classname.rsplit(".", 1)[-1]
    params = set(re.split(r"[-\[\]]", name.partition("[")[2]))
    if module in NON_BLOCKING_MODULES or CPU_TOKEN in params:
        return "other"
    found = [b for b in BACKENDS if b in params]
    if found:
        return found[0]
    if module.startswith("test_triton"):
        return "triton"
    if module.startswith("test_cuda"):
        return "cuda"
    return "shared"


def junit_id(nodeid: str) -> tuple[str, str]:
    """pytest's node id -> the (classname, name) its junit XML gives the test."""
    path, _, rest = nodeid.partition("::")
    parts = rest.split("::")
    module = path.removesuffix(".py").replace("/", ".")
    return ".".join([module, *parts[:-1]]), parts[-1]


def junit_results(path: Path) -> dict[tuple[str, str], str]:
    """``{(classname, name): passed / failed / skipped}`` of a pytest junit XML file (errors count as failures)."""
    results = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                break
            if child.tag == "skipped":
                outcome = "skipped"
        key = (case.get("classname", ""), case.get("name", ""))
        if not key[1]:  # the nameless entry an interrupted xdist run adds: no test of ours
            continue
        if results.get(key) != "failed":  # a test that failed in its teardown has two entries: failed wins
            results[key] = outcome
    return results


def count(results: dict[tuple[str, str], str], collected: list[tuple[str, str]] | None = None) -> dict:
    """``{group: {passed, failed, skipped, missing}}``; ``missing``: collected but without a result (not run)."""
    counts: dict[str, dict[str, int]] = {}
    for key in set(results) | set(collected or ()):
        c = counts.setdefault(classify(*key), {"passed": 0, "failed": 0, "skipped": 0, "missing": 0})
        c[results.get(key, "missing")] += 1
    return counts


def verdict(counts: dict, exit_code: int, facts: dict, collected: bool = False) -> tuple[list[dict], list[str]]:
    """``(verified entries, summary lines)``. A backend is verified, on a CUDA device, when >= 1 of its tests passed
    and none of its own nor of the shared tests failed or is missing. Missing is known from the collected list
    (``collected``): then a run stopped by its cap still verifies the backends whose tests all ran (the GPU run
    orders them shared, cuda, triton, torch: benchmarks/gpu_order.py); without it, only a run that finished
    (pytest exit code 0 or 1) verifies anything."""
    zero = {"passed": 0, "failed": 0, "skipped": 0, "missing": 0}
    shared = counts.get("shared", zero)
    complete = (lambda c: c["missing"] == 0) if collected else (lambda c: exit_code in (0, 1))
    lines, entries = [], []
    for backend in BACKENDS:
        c = counts.get(backend, zero)
        ok = (
            facts["arch"] is not None
            and c["passed"] > 0
            and c["failed"] == 0
            and shared["failed"] == 0
            and complete(c)
            and complete(shared)
        )
        lines.append(f"{backend}: {_counts_text(c, collected)}" + (" -> verified" if ok else " -> not verified"))
        if ok:
            entries.append(
                {
                    "backend": backend,
                    "arch": facts["arch"],
                    "device": facts["device"],
                    "date": facts["date"],
                    "torch": facts["torch"],
                    "triton": facts["triton"],
                    "cuda": facts["cuda"],
                    "tests": c["passed"] + shared["passed"],
                }
            )
    for group in ("shared", "other"):
        lines.append(f"{group}: {_counts_text(counts.get(group, zero), collected)}")
    if exit_code not in (0, 1):
        lines.append(f"pytest exit code {exit_code}: the run did not finish")
    if facts["arch"] is None:
        lines.append("not on a CUDA device: no backend is verified")
    return entries, lines


def _counts_text(c: dict, collected: bool) -> str:
    text = f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"
    return text + (f", {c['missing']} not run" if collected else "")


def cmd_verdict(args: argparse.Namespace) -> int:
    if args.facts:
        facts = json.loads(args.facts)
    elif args.facts_file and args.facts_file.exists():
        facts = json.loads(args.facts_file.read_text())
    else:
        facts = device_facts()
    results = junit_results(args.junit) if args.junit.exists() else {}
    if not results:
        print(f"no test results in {args.junit}")
    collected = None
    if args.collected and args.collected.exists():
        collected = [junit_id(line.strip()) for line in args.collected.read_text().splitlines() if line.strip()]
    entries, lines = verdict(count(results, collected), args.exit_code, facts, collected=collected is not None)
    args.out.write_text(json.dumps(entries, indent=1) + "\n")
    for line in lines:
        key(line)
    key("verified: " + (", ".join(e["backend"] for e in entries) or "none"))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# headline: key numbers of a report folder
# ----------------------------------------------------------------------------------------------------------------
def cmd_headline(args: argparse.Namespace) -> int:
    from benchmarks import render

    file = args.results / "results.json"
    if not file.exists():
        key(f"no {file}")
        return 1
    results = json.loads(file.read_text())
    run = results["runs"][-1]["ceilings"]
    key(
        f"{args.results.name}: ceilings of its last run: copy {run['copy']['bytes_per_s'] / 1e9:.0f} GB/s, "
        f"{run['matmul']['dtype']} matmul {run['matmul']['flop_per_s'] / 1e12:.1f} TFLOP/s"
    )
    rows = render.derive(results)
    for case_id in dict.fromkeys(r["case_id"] for r in rows):
        cells = []
        for r in (r for r in rows if r["case_id"] == case_id):
            if r["status"] != "ok":
                cells.append(f"{r['provider']} {r['status']}")
                continue
            extra = f"{r['floor_ratio']:.2f}x floor" if r.get("floor_ratio") else f"{r['pct_copy']:.0f}% copy"
            check = "" if r.get("check_ok", True) else " MISMATCH"
            peak = r["peak_extra_bytes"] / 2**30
            cells.append(f"{r['provider']} {r['median_ms']:.2f} ms ({extra}, peak +{peak:.2f} GiB){check}")
        key(f"{case_id}: " + "; ".join(cells))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env")
    env.add_argument("--facts-out", type=Path, help="also write the device facts there (JSON) for the verdict")
    sub.add_parser("build")
    warm = sub.add_parser("warm")
    warm.add_argument("--vocab", type=int, default=151936)
    v = sub.add_parser("verdict")
    v.add_argument("junit", type=Path)
    v.add_argument("--exit-code", type=int, required=True, help="pytest's exit code (124: stopped by timeout)")
    v.add_argument("--out", type=Path, required=True)
    v.add_argument("--facts", help="device facts as JSON (default: --facts-file, else read from torch)")
    v.add_argument("--facts-file", type=Path, help="the facts `env --facts-out` wrote (spares importing torch)")
    v.add_argument("--collected", type=Path, help="the collected node ids, one a line (benchmarks/gpu_order.py)")
    h = sub.add_parser("headline")
    h.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    return {"env": cmd_env, "build": cmd_build, "warm": cmd_warm, "verdict": cmd_verdict, "headline": cmd_headline}[
        args.command
    ](args)


if __name__ == "__main__":
    sys.exit(main())
