"""Static report of the Triton kernels, no GPU needed: registers, spills, shared memory, widest global load.

    python -m benchmarks.static_report_triton            # table
    python -m benchmarks.static_report_triton --json     # rows as JSON

Every kernel is compiled (``triton.compile`` with ``GPUTarget("cuda", 90 | 80, 32)``) in each mode variant that
changes its code, with the launch configuration the backend uses for V = 151936 (``vocab_tiling``) and the
specialisation a real launch gets (pointers, V and strides divisible by 16, as they are for 151936). Then:

* registers and spill bytes: ``ptxas -v`` on the PTX Triton produced (Triton's bundled ptxas, same flags);
* shared memory: the dynamic shared memory Triton requests at launch (reduction scratch);
* widest global load: the widest ``ld.global`` in the hot loop (the body of the kernel's loops; a loop-free kernel
  counts as a whole). A bf16 row read with 16-byte vectors shows ``ld.global.v4.b32`` = 16 bytes.

:func:`rows` is what ``tests/test_triton_static.py`` and the benchmark tables use. When this process runs the
Triton interpreter (``TRITON_INTERPRET=1``, where kernels cannot be compiled), :func:`rows` runs this script in a
fresh process without it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

TARGETS = (90, 80)
VOCAB = 151936  # Qwen2.5 / Qwen3: the benchmark vocabulary

# pointer element types by argument name (anything else ending in _ptr is float32)
_POINTER_TYPES = {
    "token_ids_ptr": "*i64",
    "order_ptr": "*i64",
    "cu_groups_ptr": "*i64",
    "flags_ptr": "*u8",
    "lse64_ptr": "*fp64",  # the divergence kernels' float64 log-sum-exps
    "lse_ref64_ptr": "*fp64",
}
_FLOAT_ARGS = {
    "inv_temperature",
    "beta",
    "clip_low",
    "clip_high",
    "eps_high",
    "delta",
    "dual_clip",
    "sapo_pos",
    "sapo_neg",
    "eps",
}
_LOGITS_ARGS = {"logits_ptr", "out_ptr", "student_ptr", "teacher_ptr", "out_student_ptr", "out_teacher_ptr"}


def _variants():
    """``(name, kernel, logits dtype, constexprs, num_warps)`` for every variant worth compiling."""
    from grpo_kernels.backends.triton import advantages, divergence, grpo_loss, logprobs
    from grpo_kernels.backends.triton.common import vocab_tiling

    out = []
    for dtype, size in (("bf16", 2), ("fp32", 4)):
        block, warps = vocab_tiling(VOCAB, size)
        for entropy in (True, False):
            tag = f"{dtype},{'entropy' if entropy else 'lp only'}"
            out.append(
                (
                    f"token_logprobs_fwd[{tag}]",
                    logprobs._token_logprobs_fwd_kernel,
                    dtype,
                    dict(WITH_ENTROPY=entropy, BLOCK_V=block),
                    warps,
                )
            )
            out.append(
                (
                    f"token_logprobs_bwd[{tag}]",
                    logprobs._token_logprobs_bwd_kernel,
                    dtype,
                    dict(HAS_ENTROPY_GRAD=entropy, BLOCK_V=block),
                    warps,
                )
            )
    block, warps = vocab_tiling(VOCAB, 2)
    base = dict(
        FAMILY=0,
        ESTIMATOR=0,
        HAS_OLD=True,
        HAS_KL=True,
        HAS_IS_WEIGHTS=False,
        HAS_DELTA=False,
        HAS_DUAL_CLIP=False,
        BIAS_CORRECTED=False,
        WITH_ENTROPY=False,
        BLOCK_V=block,
    )
    every_option = dict(ESTIMATOR=3, HAS_IS_WEIGHTS=True, HAS_DELTA=True, HAS_DUAL_CLIP=True, BIAS_CORRECTED=True)
    loss_variants = {
        "clip,k3": {},
        "clip,all options": {**every_option, "WITH_ENTROPY": True},
        "cispo,k2": dict(FAMILY=1, ESTIMATOR=2),
        "sapo,k1,bias-corrected": dict(FAMILY=2, ESTIMATOR=1, BIAS_CORRECTED=True),
        "clip,on-policy,no KL": dict(HAS_OLD=False, HAS_KL=False),
    }
    for tag, change in loss_variants.items():
        out.append((f"grpo_loss_fwd[bf16,{tag}]", grpo_loss._grpo_loss_fwd_kernel, "bf16", {**base, **change}, warps))
    group_variants = [("sum,group", 0, 0, "grpo"), ("sum,batch", 0, 1, "grpo"), ("normalize", 1, 0, "grpo")]
    group_variants += [
        (name, 0, 0 if name == "grpo_passk" else 2, name) for name in advantages._ESTIMATOR if name != "grpo"
    ]
    for tag, multi, scale, estimator in group_variants:
        out.append(
            (
                f"group_advantages[{tag}]",
                advantages._group_advantages_kernel,
                "fp32",
                dict(
                    MULTI_REWARD=multi,
                    SCALE=scale,
                    ESTIMATOR=advantages._ESTIMATOR[estimator],
                    WRITE_TOTALS=scale == 1 or multi == 1 or estimator == "gpg",
                    BLOCK_B=16,
                    BLOCK_R=4,
                ),
                4,
            )
        )
    out.append(("batch_scale", advantages._batch_scale_kernel, "fp32", dict(CENTRE_ON_BATCH_MEAN=True, BLOCK=1024), 4))
    out.append(("gpg_scale", advantages._gpg_scale_kernel, "fp32", dict(BLOCK=1024), 4))
    out.append(("whiten", advantages._whiten_kernel, "fp32", dict(BLOCK=1024), 4))
    block, warps = divergence._tiling(VOCAB)  # student and teacher both bf16
    for kind, code in (("reverse_kl", 0), ("jsd", 2)):
        fwd_block, fwd_warps = divergence._tiling(VOCAB, forward_jsd=kind == "jsd")
        out.append(
            (
                f"divergence_fwd[bf16,{kind},lp]",
                divergence._divergence_fwd_kernel,
                "bf16",
                dict(KIND=code, WITH_LOGPROBS=True, BLOCK_V=fwd_block),
                fwd_warps,
            )
        )
    for tag, code, teacher in (("reverse_kl,student+lp", 0, False), ("jsd,student+teacher+lp", 2, True)):
        out.append(
            (
                f"divergence_bwd[bf16,{tag}]",
                divergence._divergence_bwd_kernel,
                "bf16",
                dict(KIND=code, STUDENT_GRAD=True, TEACHER_GRAD=teacher, HAS_GRAD_LP=True, BLOCK_V=block),
                warps,
            )
        )
    return out


def _compile(kernel, dtype: str, constexprs: dict, num_warps: int, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}" if name in _LOGITS_ARGS else _POINTER_TYPES.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:  # shapes and strides: divisible by 16 for V = 151936
            signature[name] = "i32"
            if name not in ("seq_len", "num_rewards", "batch"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def _ptxas_candidates(arch: int = 90) -> list[str]:
    """Triton's bundled ptxas binaries, the one Triton itself uses for ``arch`` first (3.9: ``ptxas-blackwell``
    from sm_90 on, ``ptxas`` below; older releases ship ``ptxas`` only)."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    names = ("ptxas-blackwell", "ptxas") if arch >= 90 else ("ptxas", "ptxas-blackwell")
    return [str(bin_dir / name) for name in names if (bin_dir / name).exists()]


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """``(registers, spill bytes)`` from ``ptxas -v`` (the first bundled ptxas that accepts this PTX version)."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        errors = []
        for ptxas in _ptxas_candidates(arch):
            cmd = [ptxas, "-lineinfo", "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "kernel.cubin")]
            run = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if run.returncode == 0:
                log = run.stdout + run.stderr
                registers = int(re.search(r"Used (\d+) registers", log).group(1))
                spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
                return registers, spills
            errors.append(f"{ptxas}: {run.stderr.strip()[:200]}")
    raise RuntimeError("no bundled ptxas accepted the PTX: " + "; ".join(errors))


_LABEL = re.compile(r"^\s*(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_LOAD = re.compile(r"\bld\.global((?:\.\w+)*)")


def hot_loop_lines(ptx: str) -> list[str]:
    """PTX lines inside loops (from a label to a later branch back to it); all lines if there is no loop."""
    lines = ptx.splitlines()
    labels = {}
    hot = set()
    for i, line in enumerate(lines):
        if m := _LABEL.match(line):
            labels[m.group(1)] = i
        if (m := _BRANCH.search(line)) and m.group(1) in labels:  # a branch back to an earlier label: a loop
            hot.update(range(labels[m.group(1)], i + 1))
    return [lines[i] for i in sorted(hot)] if hot else lines


def load_width(suffixes: str) -> int:
    """Bytes moved by one ``ld.global`` from its suffixes, e.g. ``.v4.b32`` -> 16, ``.b16`` -> 2."""
    parts = suffixes.strip(".").split(".")
    lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bufs]\d+", p)), 0)
    return lanes * bits // 8


def widest_global_load(ptx: str) -> int:
    return max((load_width(m.group(1)) for line in hot_loop_lines(ptx) if (m := _LOAD.search(line))), default=0)


def _rows_here() -> list[dict]:
    rows = []
    for name, kernel, dtype, constexprs, num_warps in _variants():
        for arch in TARGETS:
            compiled = _compile(kernel, dtype, constexprs, num_warps, arch)
            ptx = compiled.asm["ptx"]
            registers, spills = _ptxas_usage(ptx, arch)
            rows.append(
                dict(
                    kernel=name,
                    target=f"sm_{arch}",
                    registers=registers,
                    spill_bytes=spills,
                    shared_mem_bytes=int(compiled.metadata.shared),
                    widest_global_load_bytes=widest_global_load(ptx),
                )
            )
    return rows


def _interpreted() -> bool:
    from triton.runtime.jit import JITFunction

    from grpo_kernels.backends.triton import logprobs

    return not isinstance(logprobs._token_logprobs_fwd_kernel, JITFunction)


def rows() -> list[dict]:
    """One dict per (kernel variant, target): ``kernel, target, registers, spill_bytes, shared_mem_bytes,
    widest_global_load_bytes``."""
    if not _interpreted():
        return _rows_here()
    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.static_report_triton", "--json"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(run.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    table = rows()
    if args.json:
        print(json.dumps(table))
        return
    import triton

    print(f"triton {triton.__version__}, bundled {', '.join(Path(p).name for p in _ptxas_candidates())}, V = {VOCAB}")
    header = ("kernel", "target", "registers", "spill_bytes", "shared_mem_bytes", "widest_global_load_bytes")
    widths = [max(len(h), *(len(str(r[h])) for r in table)) for h in header]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in table:
        print("  ".join(str(r[h]).ljust(w) for h, w in zip(header, widths)))


if __name__ == "__main__":
    main()
