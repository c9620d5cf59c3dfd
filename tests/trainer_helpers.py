"""User reward functions (``tests.trainer_helpers:NAME``) and a tiny config for the trainer tests."""

import os
import time

from grpo_kernels.trainer.config import TrainConfig

_calls = {"n": 0}


def digit_reward(completions, **_):
    """A dense, deterministic score with spread inside a group (so the advantages are not all zero)."""
    return [float(sum(int(ch) for ch in text if ch.isdigit()) % 7) for text in completions]


def raising_reward(completions, **_):
    raise ZeroDivisionError("the test reward always fails")


def short_reward(completions, **_):
    return [1.0] * (len(completions) - 1)


def none_first_reward(completions, **_):
    return [None] + [1.0] * (len(completions) - 1)


def reset_calls() -> None:
    _calls["n"] = 0


def interrupting_reward(completions, **kwargs):
    """``digit_reward``, except in the middle of a step (after the rollout, before the update):

    - call number $GRPO_TEST_INTERRUPT_AT raises KeyboardInterrupt (Ctrl-C);
    - call number $GRPO_TEST_BLOCK_AT writes $GRPO_TEST_MARKER and hangs, so that a test can SIGKILL the process.
    """
    _calls["n"] += 1
    if os.environ.get("GRPO_TEST_INTERRUPT_AT") == str(_calls["n"]):
        raise KeyboardInterrupt
    if os.environ.get("GRPO_TEST_BLOCK_AT") == str(_calls["n"]):
        with open(os.environ["GRPO_TEST_MARKER"], "a") as f:  # a line per process (torchrun: one per rank)
            f.write(f"{os.getpid()}\n")
        time.sleep(600)
    return digit_reward(completions, **kwargs)


# The built-in task on a 1-layer, 32-wide model: seconds per run on one CPU core.
TINY = dict(
    tiny_hidden_size=32,
    tiny_layers=1,
    sft_steps=2,
    sft_batch_size=8,
    steps=2,
    batch_prompts=4,
    num_generations=4,
    max_new_tokens=12,
    eval_size=8,
    eval_batch_size=8,
    progress=False,
    plot=False,
    save_every=0,
    rewards=["tests.trainer_helpers:digit_reward"],
)


def tiny_config(output_dir, **overrides) -> TrainConfig:
    return TrainConfig(output_dir=str(output_dir), **{**TINY, **overrides})


def tiny_cli_args(output_dir, **overrides) -> list[str]:
    """``tiny_config`` as ``grpo-train`` flags."""
    args = ["--output-dir", str(output_dir)]
    for key, value in {**TINY, **overrides}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):  # --reward and --reward-model are repeated, one value each
            flag = {"rewards": "--reward", "reward_models": "--reward-model"}[key]
            args += [x for item in value for x in (flag, item)]
        else:
            args += [flag, str(value)]
    return args


SEEN_PROMPTS: list[str] = []


def recording_reward(prompts, completions, **kwargs):
    """``digit_reward`` that also records the prompts as the model saw them."""
    SEEN_PROMPTS.extend(prompts)
    return digit_reward(completions, **kwargs)


def tiny_reward_model_dir(path, *, num_labels=1, chat_template=None, seed=0):
    """A tiny sequence-classification model (random weights from ``seed``) and the built-in tokenizer, saved to
    ``path`` with ``save_pretrained``, as ``--reward-model`` reads it."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from grpo_kernels.trainer.model import builtin_tokenizer

    tokenizer = builtin_tokenizer()
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a score head with spread (the default init is small)
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
