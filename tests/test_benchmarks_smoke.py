"""The benchmark tooling keeps working: byte counts, the report at a tiny size, the CPU worker, the baselines' call
signatures (against eager, through the Triton interpreter on CPU) and the static report's table."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest
import torch
from conftest import DEVICE

from benchmarks import providers, report, static_report
from benchmarks.cases import OPS, Case, build_cases, flops, make_inputs, traffic


def test_byte_and_flop_counts_are_the_stated_formulas():
    case = Case(op="grpo_loss", dtype="bfloat16", tokens=4096, seq_len=1024, vocab=32000)
    t = traffic(case)
    logits = 4096 * 32000 * 2
    per_token = 4096 * (8 + 4 + 4 + 4 + 4) + 4 * 4  # ids, mask, old lp in; lp, per-token loss out; 4 advantages
    assert t["bytes"] == 3 * logits + per_token
    assert t["bytes_min"] == 2 * logits + per_token
    assert sum(b for _, b in t["terms"]) == t["bytes"]
    with_ref = traffic(Case(op="grpo_loss", dtype="bfloat16", tokens=4096, seq_len=1024, vocab=32000, beta=0.04))
    assert with_ref["bytes"] == t["bytes"] + 4096 * 4
    forward = traffic(Case(op="token_logprobs", dtype="float32", tokens=8, seq_len=8, vocab=10))
    assert forward["bytes"] == forward["bytes_min"] == 8 * 10 * 4 + 8 * 8 + 8 * 4
    fused = Case(op="fused_linear_grpo_loss", dtype="bfloat16", tokens=16384, seq_len=1024, vocab=151936, hidden=4096)
    assert flops(fused) == 6 * 16384 * 4096 * 151936


def test_gpu_grid_is_the_issue_grid():
    grpo = build_cases("gpu", ("grpo_loss",))
    assert {(c.tokens, c.vocab) for c in grpo} == {(n, v) for n in (4096, 16384) for v in (32000, 128256, 151936)}
    assert {(c.importance_sampling_level, c.beta) for c in grpo} == {
        (level, b) for level in ("token", "sequence") for b in (0.0, 0.04)
    }
    assert {c.dtype for c in grpo} == {"bfloat16"}


# On a GPU machine the report also runs on the GPU: do_bench, max_memory_allocated and the GPU backends at a tiny size.
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_report_at_a_tiny_size_writes_json_markdown_and_plots(tmp_path, device):
    out = tmp_path / "run"
    argv = [
        "--preset",
        "smoke",
        "--device",
        device,
        "--threads",
        "1",
        "--in-process",
        "--out",
        str(out),
        "--providers",
        "torch,triton,cuda,eager",
        "--note",
        "smoke test",
    ]
    report.main(argv)
    results = json.loads((out / "results.json").read_text())
    measured = {(m["op"], m["provider"]) for m in results["measurements"]}
    for op in OPS:
        assert (op, "eager") in measured and (op == "fused_linear_grpo_loss" or (op, "torch") in measured)
    for m in results["measurements"]:
        assert m["status"] == "ok", m
        assert m["median_ms"] > 0 and m["q20_ms"] <= m["median_ms"] <= m["q80_ms"] and m["peak_extra_bytes"] >= 0
        case = results["cases"][m["case_id"]]
        assert case["bytes"] == traffic(Case(**case["case"]))["bytes"]
    if device == "cpu":  # Triton is never timed through the interpreter
        assert "grpo_loss/triton" in results["skipped"] and "## Not measured" in (out / "report.md").read_text()
    ceilings = results["runs"][0]["ceilings"]
    assert ceilings["copy"]["bytes_per_s"] > 0 and ceilings["matmul"]["flop_per_s"] > 0

    text = (out / "report.md").read_text()
    assert "| 32 | 500 | token | 0.04 | torch |" in text and "smoke test" in text
    # the torch backend agrees with eager (the check column), in every table
    torch_rows = sum(m["provider"] == "torch" for m in results["measurements"])
    measured_rows = re.findall(r"\| torch \| [0-9.]+ \|", text)  # op-table rows (goal rows name a measure)
    assert torch_rows >= 4 and len(measured_rows) == torch_rows and "MISMATCH" not in text
    for op in ("token_logprobs", "grpo_loss", "group_advantages"):
        assert (out / f"{op}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report.main(["--render", str(out)])  # re-rendering from the JSON gives the same report
    assert (out / "report.md").read_text() == text
    report.main(argv + ["--budget-s", "0"])  # a second run into the folder measures nothing twice
    again = json.loads((out / "results.json").read_text())
    assert len(again["runs"]) == 2 and len(again["measurements"]) == len(results["measurements"])


def test_cpu_worker_measures_in_its_own_process():
    case = build_cases("smoke", ("token_logprobs",))[0]
    result = report.measure_in_subprocess(case, "eager", report.TIMING["smoke"], threads=1)
    assert result["status"] == "ok", result
    expected = providers.summarize(case, providers.build("eager", case, make_inputs(case, torch.device("cpu")))())
    assert result["norms"] == pytest.approx(expected["norms"], rel=1e-6)  # same seed, same inputs, same answer


@pytest.mark.parametrize("provider,op", sorted(providers.EXTERNAL), ids=lambda x: str(x))
def test_baselines_compute_what_eager_computes(provider, op):
    """Liger's and TRL's call signatures as the report uses them: same numbers as eager (interpreter on CPU)."""
    variants = (
        [("token", 0.04), ("sequence", 0.0)] if op in ("grpo_loss", "fused_linear_grpo_loss") else [("token", 0.0)]
    )
    for level, beta in variants:
        case = Case(
            op=op,
            dtype="float32",
            tokens=24,
            seq_len=12,
            vocab=50,
            hidden=8 if op.startswith("fused") else 0,
            importance_sampling_level=level,
            beta=beta,
        )
        reason = providers.unavailable_reason(provider, case, DEVICE, interpreter=True)
        if reason is not None:
            pytest.skip(reason)
        inputs = make_inputs(case, DEVICE)
        ours = providers.summarize(case, providers.build(provider, case, inputs)())
        eager = providers.summarize(case, providers.build("eager", case, inputs)())
        assert ours["norms"] == pytest.approx(eager["norms"], rel=1e-4), (case.id, ours, eager)
        if eager["loss"] is not None:
            assert ours["loss"] == pytest.approx(eager["loss"], rel=1e-4, abs=1e-6)


def test_static_report_combines_sources_and_names_missing_ones(monkeypatch):
    fake = types.ModuleType("benchmarks.fake_static_source")
    fake.rows = lambda: [
        dict(
            kernel="grpo_loss_fwd",
            target="sm_90",
            registers=40,
            spill_bytes=0,
            shared_mem_bytes=1024,
            widest_global_load_bytes=16,
        )
    ]
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    sources = (("triton", fake.__name__), ("cuda", "benchmarks.no_such_static_source"))
    rows, notes = static_report.collect(sources)
    assert rows == [dict(source="triton", **fake.rows()[0])]
    assert notes == ["cuda: benchmarks/no_such_static_source.py is not there yet (the cuda backend has not landed)"]
    text = static_report.markdown(rows, notes, dict(triton="3.x", nvcc=None, python="3"))
    assert "| triton | grpo_loss_fwd | sm_90 | 40 | 0 | 1024 | 16 |" in text

    fake.rows = lambda: [dict(kernel="k", target="sm_80")]
    with pytest.raises(KeyError, match="registers"):
        static_report.collect(sources)
