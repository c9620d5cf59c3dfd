"""Static check of the Triton kernels, no GPU needed: each kernel variant compiled for sm_90 and sm_80 (never run)
must not spill and must read the logits with 16-byte vector loads. The numbers come from
``benchmarks/static_report_triton.py`` (a run of all variants takes about half a minute on 2 CPU cores)."""

import pytest

pytest.importorskip("triton")

from benchmarks import static_report_triton as report  # noqa: E402

LOGITS_KERNELS = ("token_logprobs", "grpo_loss", "divergence")


@pytest.fixture(scope="module")
def rows():
    if not report._ptxas_candidates():
        pytest.skip("this Triton ships no ptxas (no NVIDIA backend): nothing to compile with")
    return report.rows()


def test_every_variant_compiles_for_both_targets(rows):
    names = {r["kernel"] for r in rows}
    assert len(rows) == len(names) * len(report.TARGETS)
    assert {r["target"] for r in rows} == {"sm_90", "sm_80"}
    assert any(n.startswith("grpo_loss_fwd") for n in names) and any(n.startswith("group_advantages") for n in names)


def test_no_register_spills(rows):
    spilling = [(r["kernel"], r["target"], r["spill_bytes"]) for r in rows if r["spill_bytes"] != 0]
    assert not spilling


def test_logits_are_read_with_16_byte_vectors(rows):
    narrow = [
        (r["kernel"], r["target"], r["widest_global_load_bytes"])
        for r in rows
        if r["kernel"].startswith(LOGITS_KERNELS) and r["widest_global_load_bytes"] < 16
    ]
    assert not narrow


def test_two_programs_fit_per_sm(rows):
    """8 warps x 128 registers = half the 64K register file: at least two row programs resident per SM."""
    heavy = [
        (r["kernel"], r["target"], r["registers"])
        for r in rows
        if r["kernel"].startswith(LOGITS_KERNELS) and r["registers"] > 128
    ]
    assert not heavy


PTX_LOOP = """
    ld.global.b64 %rd1, [%rd0];
$L__BB0_2:
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd2 + 0 ];
    @%p2 bra $L__BB0_2;
    ld.global.b32 %r9, [%rd3];
"""


def test_ptx_parsing():
    assert report.load_width(".v4.b32") == 16 and report.load_width(".v2.b32") == 8
    assert report.load_width(".b16") == 2 and report.load_width(".nc.b64") == 8
    hot = report.hot_loop_lines(PTX_LOOP)
    assert len(hot) == 3 and "v4" in hot[1]
    assert report.widest_global_load(PTX_LOOP) == 16
    assert report.widest_global_load(PTX_LOOP.replace(".v4.b32 { %r1, %r2, %r3, %r4 }", ".b16 %rs1")) == 2
