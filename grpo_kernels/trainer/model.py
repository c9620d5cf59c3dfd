"""The policy: any Hugging Face causal LM from a local directory, or the built-in tiny model and tokenizer.

The built-in pair is made in code (no downloads): a character-level tokenizer whose vocabulary covers the built-in
task (digits, ``+ = ,``, the four ``<think>``/``<answer>`` tags as single tokens) and a 2-layer Llama.
Both are saved with ``save_pretrained`` at the end of a run, so ``--model OUTPUT/final`` loads them again.
"""

from __future__ import annotations

from pathlib import Path

import torch

TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
CHARACTERS = list("0123456789+-*=,.() ")


def builtin_tokenizer():
    """A character-level ``PreTrainedTokenizerFast``; left padding (generation appends on the right)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<unk>"]
    vocab = {token: i for i, token in enumerate(special + TAGS + CHARACTERS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Each tag is one token, every other character its own token.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(TAGS) + "|."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def tiny_model(tokenizer, *, hidden_size: int = 128, num_layers: int = 2, max_positions: int = 128):
    """A small Llama (about 0.5 M parameters at the defaults) with random weights drawn from the current seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def load_model_and_tokenizer(path: str | None, *, tiny_hidden_size: int = 128, tiny_layers: int = 2):
    """``(model, tokenizer)`` in float32: from ``path`` (a local directory), or the built-in pair when None."""
    if path is None:
        tokenizer = builtin_tokenizer()
        return tiny_model(tokenizer, hidden_size=tiny_hidden_size, num_layers=tiny_layers), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"--model {path!r} is not a directory (expected a local Hugging Face model directory)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # many causal LMs ship without one; the completion mask handles the overlap
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path).float()  # float32 master weights; bf16 comes from autocast
    return model, tokenizer


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip the left padding, as ``generate`` computes them, so scores match the sampled tokens."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
