"""One GRPO training micro-step (``_compute_loss`` + backward) of stock ``trl.GRPOTrainer`` against the drop-in's two
paths.

    python -m benchmarks.bench_trl [--vocab 151936] [--hidden 256] [--batch 8] [--completion 128] [--repeats 3]
                                   [--variants trl fused_linear logits]

Every variant gets the same prepared batch (what ``_generate_and_score_completions`` returns) and the same model: a
2-layer Qwen2 with random weights, float32, whose LM head is the realistic part (``--vocab``). Stock TRL 1.16 scores
the completion through its chunked LM head (tiles of 4096 tokens x 32768 vocabulary entries, recomputed in the
backward). The drop-in's ``fused_linear`` path (its default) projects the hidden states tile by tile and finishes the
gradients in the forward; its ``logits`` path takes the model's logits ``[B, C, V]`` and the fused loss, whose
backward writes the gradient over them.

Each variant runs in its own subprocess. The peak is measured over the timed runs, after one warm-up run (so the
parameters' ``.grad`` buffers are in the baseline): ``torch.cuda.max_memory_allocated`` on a GPU, the peak resident
set size (``VmHWM``, reset through ``/proc/self/clear_refs``) on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchmarks.measure import repeated_runs

VARIANTS = ("trl", "fused_linear", "logits")


def _trainer(variant: str, vocab: int, hidden: int, batch: int, completion: int, workdir: str):
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig

    if variant == "trl":
        from trl import GRPOTrainer

        extra = {}
    else:
        from grpo_kernels.integrations.trl import GRPOTrainer

        extra = dict(loss_path=variant)

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    args = GRPOConfig(
        output_dir=workdir,
        per_device_train_batch_size=batch,
        num_generations=2,
        max_completion_length=completion,
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        save_strategy="no",
    )
    trainer = GRPOTrainer(
        model=Qwen2ForCausalLM(config),
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a"] * batch}),
        processing_class=tokenizer,
        **extra,
    )
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def run_one(variant: str, vocab: int, hidden: int, batch: int, prompt: int, completion: int, repeats: int) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as workdir:
        trainer = _trainer(variant, vocab, hidden, batch, completion, workdir)
        device = trainer.accelerator.device
        g = torch.Generator().manual_seed(0)
        inputs = {
            "prompt_ids": torch.randint(3, vocab, (batch, prompt), generator=g),
            "prompt_mask": torch.ones(batch, prompt, dtype=torch.long),
            "completion_ids": torch.randint(3, vocab, (batch, completion), generator=g),
            "completion_mask": torch.ones(batch, completion, dtype=torch.long),
            "advantages": torch.randn(batch, generator=g),
            "old_per_token_logps": -10 - torch.rand(batch, completion, generator=g),
            "num_items_in_batch": torch.tensor(batch * completion),
        }
        inputs = {k: v.to(device) for k, v in inputs.items()}

        def step():
            trainer.model.zero_grad(set_to_none=False)
            trainer._compute_loss(trainer.model, dict(inputs)).backward()

        measured = repeated_runs(step, repeats, device)  # the warm-up allocates the .grad buffers: baseline
    return dict(variant=variant, device=str(device), **measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--completion", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    shape = (args.vocab, args.hidden, args.batch, args.prompt, args.completion, args.repeats)
    if args.one:
        print(json.dumps(run_one(args.one, *shape)))
        return
    results = []
    for variant in args.variants:
        cmd = [sys.executable, "-m", "benchmarks.bench_trl", "--one", variant]
        for flag, value in zip(("--vocab", "--hidden", "--batch", "--prompt", "--completion", "--repeats"), shape):
            cmd += [flag, str(value)]
        out = subprocess.check_output(cmd, env={**os.environ, "TQDM_DISABLE": "1"}, stderr=subprocess.DEVNULL)
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    tokens = args.batch * args.completion
    logits_mib = tokens * args.vocab * 4 / 2**20
    print(
        f"device {results[0]['device']}; B={args.batch} C={args.completion} (N={tokens} tokens) V={args.vocab} "
        f"H={args.hidden}, float32 (logits {logits_mib:.0f} MiB); median of {args.repeats}"
    )
    print(f"{'variant':<13} {'time (ms)':>10} {'peak extra (MiB)':>17}")
    for r in results:
        print(f"{r['variant']:<13} {r['median_s'] * 1e3:>10.1f} {r['peak_extra_bytes'] / 2**20:>17.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=1)


if __name__ == "__main__":
    main()
