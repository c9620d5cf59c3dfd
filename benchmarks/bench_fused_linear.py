"""The fused-linear GRPO loss against the ways of getting the same gradients with logits: time and peak memory.

    python -m benchmarks.bench_fused_linear [--tokens 2048] [--hidden 512] [--vocab 32000] [--chunk-tokens 256]

Every variant computes the GRPO loss (dapo, token-level ratio against old log-probs) of ``logits = hidden @ W.T``
and ``d loss / d hidden``, ``d loss / d W`` through ``loss.backward()``:

    eager         logits materialised, log_softmax + gather + the loss through autograd (benchmarks/eager.py)
    materialised  logits materialised, grpo_kernels.grpo_loss (torch backend, in-place backward)
    fused         grpo_kernels.fused_linear_grpo_loss (torch backend, tiles of --chunk-tokens rows; default: the
                  library's, about 512 MiB of logits): the logits never exist                      6 N H V FLOPs
    trl-chunked   TRL 1.16's ChunkedLogProbFunction (its torch fallback off-GPU) + the loss on the log-probs:
                  log-probs in the forward, the logits recomputed in the backward                  8 N H V FLOPs

``matmul floor`` = 6 N H V / (the rate of one [N, H] x [H, V] ``torch.mm`` measured in the same process): the time
three GEMMs of that shape would take, the least any of these variants could take.

Peak memory on the CPU has no allocator counter, so each variant runs in its own subprocess, resets the kernel's
peak-RSS mark once its inputs exist (``/proc/self/clear_refs``) and reports the peak resident set size over the
timed runs minus the resident size at that point: the extra memory the step needs (gradients included: the
``[V, H]`` and ``[N, H]`` gradients are the same in every variant).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

from benchmarks.measure import repeated_runs

VARIANTS = ("eager", "materialised", "fused", "trl-chunked")


def _inputs(tokens: int, hidden: int, vocab: int, dtype):
    import torch

    from grpo_kernels.fused_linear import fused_linear_token_logprobs

    g = torch.Generator().manual_seed(0)
    batch = 8
    seq = tokens // batch
    h = torch.randn(batch, seq, hidden, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * 2 / hidden**0.5).to(dtype).requires_grad_(True)  # logits ~ N(0, 4)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq)
    adv = torch.randn(batch, generator=g)
    old = fused_linear_token_logprobs(h, w, ids) + 0.1 * torch.randn(batch, seq, generator=g)
    return h, w, ids, mask, adv, old


def _loss_from_logprobs(lp, old, adv, mask, epsilon=0.2):
    """dapo, token level: -min(rho A, clip(rho) A), summed over the mask / its size."""
    import torch

    ratio = torch.exp(lp - old)
    a = adv.unsqueeze(1)
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon) * a)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def run_one(
    variant: str, tokens: int, hidden: int, vocab: int, repeats: int, threads: int, dtype_name: str, chunk: int | None
) -> dict:
    import torch

    from benchmarks.eager import eager_grpo_loss
    from grpo_kernels import grpo_loss
    from grpo_kernels.fused_linear import fused_linear_grpo_loss

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    h, w, ids, mask, adv, old = _inputs(tokens, hidden, vocab, dtype)

    if variant == "matmul":  # the GEMM rate of this machine at this shape
        a, b = h.detach().reshape(-1, hidden), w.detach().T
        return dict(variant=variant, **repeated_runs(lambda: torch.mm(a, b), repeats, torch.device("cpu")))

    if variant == "trl-chunked":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE  # TRL's vocabulary tile (32768)

    def clear_grads():
        h.grad = w.grad = None

    def step():
        if variant == "eager":
            loss = eager_grpo_loss(h @ w.T, ids, adv, mask=mask, old_logprobs=old)[0]
        elif variant == "materialised":
            loss = grpo_loss(
                h @ w.T, ids, adv, mask=mask, old_logprobs=old, backend="torch", inplace_backward=True
            ).loss
        elif variant == "fused":
            loss = fused_linear_grpo_loss(
                h, w, ids, adv, mask=mask, old_logprobs=old, backend="torch", chunk_tokens=chunk
            ).loss
        else:
            lp = ChunkedLogProbFunction.apply(
                h.reshape(-1, hidden), w, None, ids.reshape(-1), 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ()
            )[0]
            loss = _loss_from_logprobs(lp.view(ids.shape), old, adv, mask)
        loss.backward()

    return dict(variant=variant, **repeated_runs(step, repeats, torch.device("cpu"), before_each=clear_grads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--chunk-tokens", type=int, default=None, help="tile rows of the fused variant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS)
    )
    parser.add_argument("--one", choices=VARIANTS + ("matmul",), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    sizes = (args.tokens, args.hidden, args.vocab, args.repeats, args.threads, args.dtype, args.chunk_tokens)
    if args.one:
        print(json.dumps(run_one(args.one, *sizes)))
        return

    def spawn(variant: str) -> dict:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.bench_fused_linear",
            "--one",
            variant,
            "--tokens",
            str(args.tokens),
            "--hidden",
            str(args.hidden),
            "--vocab",
            str(args.vocab),
            "--repeats",
            str(args.repeats),
            "--threads",
            str(args.threads),
            "--dtype",
            args.dtype,
        ]
        if args.chunk_tokens:
            cmd += ["--chunk-tokens", str(args.chunk_tokens)]
        return json.loads(subprocess.check_output(cmd).decode().strip().splitlines()[-1])

    import torch

    matmul = spawn("matmul")
    results = [spawn(v) for v in args.variants.split(",")]
    n, h, v = args.tokens, args.hidden, args.vocab
    floor_s = 3 * matmul["median_s"]  # 6 N H V FLOPs at the measured rate of one 2 N H V GEMM
    itemsize = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    print(f"device: CPU {cpu}, {args.threads} threads, torch {torch.__version__}")
    from grpo_kernels.fused_linear import default_chunk_tokens

    chunk = args.chunk_tokens or default_chunk_tokens(v, getattr(torch, args.dtype))
    print(
        f"N={n} H={h} V={v} {args.dtype} (logits {n * v * itemsize / 2**20:.0f} MiB; fused tiles of {chunk} "
        f"tokens, {min(chunk, n) * v * itemsize / 2**20:.0f} MiB), forward+backward, median of {args.repeats}"
    )
    print("timings are wall clock on a machine other jobs may share: compare variants of one run only")
    print(
        f"matmul floor 6NHV: {floor_s * 1e3:.1f} ms ({2 * n * h * v / matmul['median_s'] / 1e9:.1f} GFLOP/s per GEMM)"
    )
    base = results[0]
    print(
        f"{'variant':<14} {'time (ms)':>10} {'vs floor':>9} {'vs ' + base['variant']:>12} {'peak extra (MiB)':>17}"
        f" {'vs ' + base['variant']:>12}"
    )
    for r in results:
        print(
            f"{r['variant']:<14} {r['median_s'] * 1e3:>10.1f} {r['median_s'] / floor_s:>8.2f}x "
            f"{r['median_s'] / base['median_s']:>11.2f}x {r['peak_extra_bytes'] / 2**20:>17.0f} "
            f"{r['peak_extra_bytes'] / base['peak_extra_bytes']:>11.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    tokens=n,
                    hidden=h,
                    vocab=v,
                    dtype=args.dtype,
                    threads=args.threads,
                    chunk_tokens=chunk,
                    matmul=matmul,
                    results=results,
                ),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
