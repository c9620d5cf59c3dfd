"""distill_loss on the CPU: the torch backend (also in place) against eager and torch.compile, and its block size.

    python -m benchmarks.bench_divergence [--tokens 1024] [--vocab 32000] [--divergence jsd] [--repeats 5]
    python -m benchmarks.bench_divergence --interleaved                      # times only, all variants in one process
    python -m benchmarks.bench_divergence --block-sizes 64,256,1024,4096      # the torch backend's _BUFFER_BYTES (KiB)

Variants: ``eager`` (TRL's ``generalized_jsd_loss`` as written: :func:`benchmarks.eager.eager_distill_loss`),
``compile`` (``torch.compile`` of it), ``torch`` (``distill_loss(backend="torch")``) and ``torch-inplace``
(``inplace_backward=True``: the gradient over the student's logits). Forward + backward w.r.t. the student's logits,
labels given. Each variant runs in its own subprocess (its own peak resident memory, as in
:mod:`benchmarks.bench_torch_backend`); the logits are a non-leaf (a model's output), so the in-place variant is
allowed, and are restored between its runs. On a shared machine the time of separate processes moves with the
load: ``--interleaved`` runs every variant once per round in one process, so that they share it (no memory figures
there). ``--block-sizes`` times the torch backend at several block sizes in one
process, interleaved, ``--repeats`` rounds each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.measure import repeated_runs

VARIANTS = ("eager", "compile", "torch", "torch-inplace")


def _inputs(tokens: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    seq = min(128, tokens)
    student = torch.randn(tokens // seq, seq, vocab, generator=g) * 2
    teacher = student * 0.8 + torch.randn(student.shape, generator=g)
    labels = torch.randint(0, vocab, (tokens // seq, seq), generator=g)
    return student, teacher, labels


def _steps(variants, tokens: int, vocab: int, divergence: str, beta: float) -> dict:
    """``{variant: (step, restore or None)}``: one forward + backward each, on shared inputs."""
    import torch

    from benchmarks.eager import eager_distill_loss
    from grpo_kernels import distill_loss

    values, teacher, labels = _inputs(tokens, vocab)
    anchor = torch.zeros((), requires_grad=True)
    pristine = values.clone() if "torch-inplace" in variants else None

    class ModelOutput(torch.autograd.Function):
        """Hands out ``values`` as a non-leaf that requires grad (like a model's logits) and drops its gradient."""

        @staticmethod
        def forward(ctx, anchor, values):
            return values

        @staticmethod
        def backward(ctx, grad):
            return torch.zeros(()), None

    def eager(z):
        return eager_distill_loss(z, teacher, labels, divergence=divergence, beta=beta)

    compiled = torch.compile(eager) if "compile" in variants else None

    def make(variant):
        def step():
            z = ModelOutput.apply(anchor, values)
            if variant == "eager":
                loss = eager(z)
            elif variant == "compile":
                loss = compiled(z)
            else:
                loss = distill_loss(
                    z,
                    teacher,
                    labels,
                    divergence=divergence,
                    beta=beta,
                    backend="torch",
                    inplace_backward=variant == "torch-inplace",
                ).loss
            loss.backward()

        def restore():
            values.copy_(pristine)

        return step, restore if variant == "torch-inplace" else None

    return {variant: make(variant) for variant in variants}


def run_one(variant: str, tokens: int, vocab: int, divergence: str, beta: float, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    step, restore = _steps((variant,), tokens, vocab, divergence, beta)[variant]
    if restore is not None:
        restore()
    step()  # compilation (compile) happens here, outside the timed runs
    return dict(variant=variant, **repeated_runs(step, repeats, torch.device("cpu"), before_each=restore))


def interleaved(tokens: int, vocab: int, divergence: str, beta: float, repeats: int, threads: int) -> list[dict]:
    """Every variant once per round, in one process, ``repeats`` rounds: times that share the machine's load."""
    import statistics

    import torch

    torch.set_num_threads(threads)
    steps = _steps(VARIANTS, tokens, vocab, divergence, beta)
    times = {variant: [] for variant in VARIANTS}
    for round_ in range(repeats + 1):
        for variant, (step, restore) in steps.items():
            if restore is not None:
                restore()
            start = time.perf_counter()
            step()
            if round_:  # round 0 is the warm-up (and compile's compilation)
                times[variant].append(time.perf_counter() - start)
    return [{"variant": v, "median_s": statistics.median(t), "min_s": min(t), "runs_s": t} for v, t in times.items()]


def block_sizes(
    sizes_kib: list[int], tokens: int, vocab: int, divergence: str, beta: float, repeats: int, threads: int
) -> list[dict]:
    import torch

    from grpo_kernels import distill_loss
    from grpo_kernels.backends.torch import divergence as torch_divergence

    torch.set_num_threads(threads)
    values, teacher, labels = _inputs(tokens, vocab)
    z = values.requires_grad_(True)
    times = {kib: [] for kib in sizes_kib}

    def run():
        return torch.autograd.grad(
            distill_loss(z, teacher, labels, divergence=divergence, beta=beta, backend="torch").loss, z
        )

    for _ in range(repeats):
        for kib in sizes_kib:
            torch_divergence._BUFFER_BYTES = kib * 1024
            run()
            start = time.perf_counter()
            run()
            times[kib].append(time.perf_counter() - start)
    return [{"buffer_kib": kib, "min_s": min(t), "runs_s": t} for kib, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--divergence", default="jsd", choices=("jsd", "reverse_kl", "forward_kl"))
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--block-sizes", help="comma-separated KiB per buffer: time the torch backend at each")
    parser.add_argument("--interleaved", action="store_true", help="all variants in one process, round by round")
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    common = (args.tokens, args.vocab, args.divergence, args.beta, args.repeats, args.threads)
    if args.one:
        print(json.dumps(run_one(args.one, *common)))
        return
    import platform

    import torch

    with open("/proc/loadavg") as f:
        load_start = " ".join(f.read().split()[:3])
    header = (
        f"CPU: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
        f"N={args.tokens} V={args.vocab} fp32, {args.divergence}"
        f"{f' beta={args.beta:g}' if args.divergence == 'jsd' else ''}, forward+backward"
    )
    if args.interleaved:
        results = interleaved(*common)
        print(header + f", {args.repeats} interleaved rounds in one process; load average at start {load_start}")
        compiled = results[1]
        print(f"{'variant':<14} {'median (ms)':>12} {'min (ms)':>9} {'compile/this (median)':>22}  runs (ms)")
        for r in results:
            print(
                f"{r['variant']:<14} {r['median_s'] * 1e3:>12.1f} {r['min_s'] * 1e3:>9.1f} "
                f"{compiled['median_s'] / r['median_s']:>21.2f}x  " + " ".join(f"{t * 1e3:.0f}" for t in r["runs_s"])
            )
    elif args.block_sizes:
        results = block_sizes([int(x) for x in args.block_sizes.split(",")], *common)
        print(header + f", {args.repeats} interleaved rounds; load average at start {load_start}")
        for r in results:
            print(
                f"buffer {r['buffer_kib']:>5} KiB: min {r['min_s'] * 1e3:7.1f} ms  runs "
                + " ".join(f"{t * 1e3:.0f}" for t in r["runs_s"])
            )
    else:
        results = []
        for variant in VARIANTS:
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.bench_divergence",
                "--one",
                variant,
                "--tokens",
                str(args.tokens),
                "--vocab",
                str(args.vocab),
                "--divergence",
                args.divergence,
                "--beta",
                str(args.beta),
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
            ]
            results.append(json.loads(subprocess.check_output(cmd).decode().strip().splitlines()[-1]))
        print(header + f", median of {args.repeats}; load average at start {load_start}")
        compiled = results[1]
        print(f"{'variant':<14} {'time (ms)':>10} {'compile/this':>13} {'peak extra (MiB)':>17} {'this/compile':>13}")
        for r in results:
            print(
                f"{r['variant']:<14} {r['median_s'] * 1e3:>10.1f} {compiled['median_s'] / r['median_s']:>12.2f}x "
                f"{r['peak_extra_bytes'] / 2**20:>17.0f} {r['peak_extra_bytes'] / compiled['peak_extra_bytes']:>12.3f}x"
            )
    with open("/proc/loadavg") as f:
        print(f"load average at the end {' '.join(f.read().split()[:3])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "load_average_start": load_start, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
