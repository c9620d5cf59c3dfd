"""The torch (CPU) backend against eager PyTorch: forward+backward time and peak memory, side by side.

    python -m benchmarks.bench_torch_backend [--tokens 4096] [--vocab 32000] [--repeats 5]

Eager = what TRL did before its kernels: ``log_softmax`` + ``gather`` + the same GRPO loss through autograd
(:mod:`benchmarks.eager`).

Peak memory on the CPU has no allocator counter, so each variant runs in its own subprocess, resets the kernel's
peak-RSS mark once its inputs exist (``/proc/self/clear_refs``) and reports the peak resident set size over the
timed runs minus the resident size at that point: the extra memory the loss needs.
The logits themselves (N x V x 4 bytes) are in the baseline, not in the extra (torch-inplace keeps a second
copy of them in the baseline, to restore the values it overwrites between runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks.measure import repeated_runs

VARIANTS = ("eager", "torch", "torch-inplace")


def run_one(variant: str, tokens: int, vocab: int, repeats: int, threads: int) -> dict:
    import torch

    from benchmarks.eager import eager_grpo_loss
    from grpo_kernels import grpo_loss, token_logprobs

    class ModelOutput(torch.autograd.Function):
        """Hands out ``values`` as a non-leaf that requires grad (like a model's logits) and drops its gradient."""

        @staticmethod
        def forward(ctx, anchor, values):
            return values

        @staticmethod
        def backward(ctx, grad):
            return torch.zeros(()), None

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    batch = 16
    seq = tokens // batch
    values = torch.randn(batch, seq, vocab, generator=g) * 2
    anchor = torch.zeros((), requires_grad=True)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq)
    adv = torch.randn(batch, generator=g)
    old = token_logprobs(values, ids) + 0.1 * torch.randn(batch, seq, generator=g)

    def forward_backward():
        logits = ModelOutput.apply(anchor, values)
        if variant == "eager":
            loss = eager_grpo_loss(logits, ids, adv, mask=mask, old_logprobs=old)[0]
        else:
            loss = grpo_loss(
                logits,
                ids,
                adv,
                mask=mask,
                old_logprobs=old,
                backend="torch",
                inplace_backward=variant == "torch-inplace",
            ).loss
        loss.backward()

    if variant == "torch-inplace":  # the in-place backward overwrites the logits: give each run fresh values
        pristine = values.clone()
        restore = lambda: values.copy_(pristine)  # noqa: E731
    else:
        restore = None
    return dict(variant=variant, **repeated_runs(forward_backward, repeats, torch.device("cpu"), before_each=restore))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.tokens, args.vocab, args.repeats, args.threads)))
        return
    results = []
    for variant in VARIANTS:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.bench_torch_backend",
            "--one",
            variant,
            "--tokens",
            str(args.tokens),
            "--vocab",
            str(args.vocab),
            "--repeats",
            str(args.repeats),
            "--threads",
            str(args.threads),
        ]
        results.append(json.loads(subprocess.check_output(cmd).decode().strip().splitlines()[-1]))
    import platform

    import torch

    logits_mb = args.tokens * args.vocab * 4 / 2**20
    print(f"CPU: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(
        f"N={args.tokens} V={args.vocab} fp32 (logits {logits_mb:.0f} MiB), forward+backward, median of {args.repeats}"
    )
    eager = results[0]
    print(f"{'variant':<14} {'time (ms)':>10} {'vs eager':>9} {'peak extra (MiB)':>17} {'vs eager':>9}")
    for r in results:
        print(
            f"{r['variant']:<14} {r['median_s'] * 1e3:>10.1f} {r['median_s'] / eager['median_s']:>8.2f}x "
            f"{r['peak_extra_bytes'] / 2**20:>17.0f} {r['peak_extra_bytes'] / eager['peak_extra_bytes']:>8.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tokens=args.tokens, vocab=args.vocab, threads=args.threads, results=results), f, indent=1)


if __name__ == "__main__":
    main()
