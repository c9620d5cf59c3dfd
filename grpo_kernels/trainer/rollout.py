"""Rollouts: G sampled completions per prompt through ``generate``, with the completion mask.

A completion ends at its first EOS token (the EOS is part of it and of the mask; whatever ``generate`` wrote after
it is padding). A completion without EOS within ``max_new_tokens`` is *truncated*: it is scored like any other, and
with ``mask_truncated`` it is left out of the loss (DAPO's overlong filtering). A completion that is only an EOS is
*empty*: its text is ``""``, its mask holds the one EOS token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Rollout:
    input_ids: Tensor  # [B, P + C] int64: left-padded prompt, then the completion (padded on the right)
    attention_mask: Tensor  # [B, P + C] 0 on padding on either side
    completion_mask: Tensor  # [B, C] float32, 1 on the tokens that take part in the loss
    prompt_length: int  # P
    completions: list[str]  # [B] decoded completions, special tokens and the EOS removed
    completion_lengths: list[int]  # [B] tokens up to and including the EOS
    truncated: list[bool]  # [B] no EOS within max_new_tokens

    @property
    def completion_ids(self) -> Tensor:  # [B, C]
        return self.input_ids[:, self.prompt_length :]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer has no EOS token: completions could never end")
    return sorted(ids)


def tokenize_prompts(tokenizer, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-padded ``[B, P]`` ids and attention mask. A chat-templated prompt already holds its special tokens."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_generations: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    mask_truncated: bool = False,
) -> Rollout:
    """``num_generations`` completions of every prompt; the G completions of prompt i are rows ``i*G .. i*G+G-1``."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, device)
    prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)  # [B, P]
    prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    eos = eos_token_ids(model, tokenizer)
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        **sampling,
    )
    # An FSDP-sharded model: transformers turns synced_gpus on for it (one all-reduce per token until every rank has
    # finished), which pairs up only if every rank calls generate equally often. The trainer generates on gathered
    # weights (fsdp.full_weights), so no rank needs the others: off.
    from torch.distributed.fsdp import FSDPModule

    unsynced = {"synced_gpus": False} if isinstance(model, FSDPModule) else {}
    sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config, **unsynced)
    prompt_length = prompt_ids.shape[1]
    completion = sequences[:, prompt_length:]  # [B, C], C <= max_new_tokens (generate stops when all rows ended)

    is_eos = torch.isin(completion, torch.tensor(eos, device=device))
    has_eos = is_eos.any(dim=1)
    end = torch.where(has_eos, is_eos.int().argmax(dim=1), completion.shape[1])  # index of the first EOS, or C
    positions = torch.arange(completion.shape[1], device=device)
    in_completion = positions[None, :] <= end[:, None]  # [B, C] up to and including the EOS
    lengths = in_completion.sum(dim=1)
    texts = tokenizer.batch_decode(
        [row[: int(e)] for row, e in zip(completion.tolist(), end.tolist(), strict=True)], skip_special_tokens=True
    )
    completion_mask = in_completion.float()
    truncated = ~has_eos
    if mask_truncated:
        completion_mask = completion_mask * (~truncated).float()[:, None]
    return Rollout(
        input_ids=sequences,
        attention_mask=torch.cat([prompt_mask, in_completion.long()], dim=1),
        completion_mask=completion_mask,
        prompt_length=prompt_length,
        completions=texts,
        completion_lengths=lengths.tolist(),
        truncated=truncated.tolist(),
    )


def demonstration_batch(tokenizer, prompts: list[str], completions: list[str], device: torch.device) -> Rollout:
    """Prompts with given completions (+ EOS) in the rollout layout, for the supervised warm-up."""
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, device)
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in completions]
    width = max(len(r) for r in rows)
    completion = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        completion[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1.0
    completion, mask = completion.to(device), mask.to(device)
    return Rollout(
        input_ids=torch.cat([prompt_ids, completion], dim=1),
        attention_mask=torch.cat([prompt_mask, mask.long()], dim=1),
        completion_mask=mask,
        prompt_length=prompt_ids.shape[1],
        completions=list(completions),
        completion_lengths=[len(r) for r in rows],
        truncated=[False] * len(rows),
    )
