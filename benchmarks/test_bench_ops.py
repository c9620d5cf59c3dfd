"""pytest-benchmark suite: every op x every provider available on the current device.

    pytest benchmarks/ --benchmark-only                          # the device's preset: gpu on CUDA, cpu otherwise
    GRPO_BENCH_PRESET=smoke pytest benchmarks/ --benchmark-only  # tiny shapes (seconds)
    pytest benchmarks/ --benchmark-only -k "grpo_loss and (triton or liger or eager)"
    pytest benchmarks/ --benchmark-disable                       # run every case once: a check, no timing

Not part of the test run (pyproject's ``testpaths`` is ``tests/``). One test per (case, provider); a provider that
cannot run skips with the reason. Before timing, each provider's result is compared with eager's (gradient or output
norms, :func:`benchmarks.providers.summarize`): a wrong answer fails instead of being timed. Timings use
pytest-benchmark's timer with a device synchronize after each call; each result's ``extra_info`` holds the byte
count, FLOPs and GB/s. For do_bench medians, peak memory, the ceilings and ratios in one table:
``python -m benchmarks.report``.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.cases import build_cases, default_preset, flops, make_inputs, traffic
from benchmarks.measure import synchronize
from benchmarks.providers import PROVIDERS, build, check_tolerance, summarize, unavailable_reason

DEVICE = torch.device(os.environ.get("GRPO_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
PRESET = os.environ.get("GRPO_BENCH_PRESET") or default_preset(DEVICE)
CASES = build_cases(PRESET)

_current: dict = {}  # one case's inputs and eager's check values at a time (GPU cases are gigabytes)


def _inputs_and_reference(case):
    if _current.get("case_id") != case.id:
        _current.clear()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        inputs = make_inputs(case, DEVICE)
        _current.update(case_id=case.id, inputs=inputs, eager=summarize(case, build("eager", case, inputs)()))
    return _current["inputs"], _current["eager"]


@pytest.mark.parametrize("case,provider", [pytest.param(c, p, id=f"{c.id}-{p}") for c in CASES for p in PROVIDERS])
def test_op(benchmark, case, provider):
    reason = unavailable_reason(provider, case, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    inputs, eager = _inputs_and_reference(case)
    run = build(provider, case, inputs)
    got = summarize(case, run())  # also the warm-up: compilation and autotuning happen here
    for ours, ref in zip(got["norms"], eager["norms"]):
        assert abs(ours - ref) <= check_tolerance(case) * abs(ref), f"{provider} disagrees with eager: {got} vs {eager}"

    def call():
        run()
        synchronize(DEVICE)

    call()
    t = traffic(case)
    benchmark.group = case.id
    benchmark.extra_info.update(
        op=case.op, provider=provider, device=str(DEVICE), bytes=t["bytes"], bytes_min=t["bytes_min"], flops=flops(case)
    )
    benchmark(call)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = t["bytes"] / benchmark.stats.stats.median / 1e9
