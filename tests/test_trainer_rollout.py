"""Rollout plumbing: the completion mask (EOS, truncation, empty completions), demonstrations, advantages layout."""

import pytest
import torch

from grpo_kernels import group_advantages
from grpo_kernels.trainer.model import builtin_tokenizer, position_ids
from grpo_kernels.trainer.rollout import demonstration_batch, generate


class _ScriptedModel(torch.nn.Module):
    """``generate`` appends fixed completions (as a real model would, padded with pad after an early stop)."""

    def __init__(self, completions: list[list[int]]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.completions = completions
        self.generation_config = None

    def generate(self, input_ids, attention_mask, generation_config):
        assert generation_config.max_new_tokens == 5
        width = max(len(c) for c in self.completions)
        tail = torch.tensor([c + [generation_config.pad_token_id] * (width - len(c)) for c in self.completions])
        return torch.cat([input_ids, tail], dim=1)


def test_completion_mask_eos_truncation_and_empty():
    tok = builtin_tokenizer()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    one, two = tok.convert_tokens_to_ids(["1", "2"])
    completions = [
        [one, two, eos],  # ends with EOS: mask covers the EOS
        [eos],  # empty completion: only the EOS
        [one, one, one, one, one],  # no EOS within max_new_tokens: truncated
        [two, eos, one, one],  # tokens after the first EOS are not part of the completion
    ]
    model = _ScriptedModel(completions)
    for mask_truncated in (False, True):
        r = generate(model, tok, ["12+3=", "4+5="], num_generations=2, max_new_tokens=5, mask_truncated=mask_truncated)
        assert r.prompt_length == 5
        assert r.completions == ["12", "", "11111", "2"]
        assert r.completion_lengths == [3, 1, 5, 2]
        assert r.truncated == [False, False, True, False]
        expected = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).float()
        if mask_truncated:
            expected[2] = 0
        assert torch.equal(r.completion_mask, expected)
        # the attention mask: left padding of the shorter prompt, then the completion up to its EOS (even truncated)
        assert r.attention_mask[:, :5].tolist() == [[1] * 5, [1] * 5, [0, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
        assert r.attention_mask[:, 5:].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1] * 5, [1, 1, 0, 0, 0]]
        assert torch.equal(r.completion_ids[1], torch.tensor([eos, pad, pad, pad, pad]))


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def test_demonstration_batch():
    tok = builtin_tokenizer()
    batch = demonstration_batch(tok, ["1+1=", "10+10="], ["<answer>2</answer>", "20"], torch.device("cpu"))
    assert batch.prompt_length == 6
    assert batch.completion_lengths == [4, 3]  # tags are single tokens; + EOS
    assert batch.completion_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert tok.decode(batch.completion_ids[0]) == "<answer>2</answer><eos>"
    assert batch.input_ids[0, :2].tolist() == [tok.pad_token_id] * 2


def test_group_advantages_follow_the_rollout_layout():
    """Rows i*G .. i*G+G-1 are the G completions of prompt i: each group is normalised on its own."""
    g = 4
    rewards = torch.tensor([[1.0], [0.0], [0.0], [0.0], [0.5], [0.5], [0.5], [0.5], [1.0], [1.0], [0.0], [0.0]])
    out = group_advantages(rewards, group_size=g, return_stats=True)
    a = out.advantages
    assert a[0] > 0 and bool((a[1:4] < 0).all())
    assert torch.equal(a[4:8], torch.zeros(4))  # equal rewards: no signal
    std = (4 * 0.5**2 / 3) ** 0.5  # Bessel-corrected
    assert torch.allclose(a[8:12], torch.tensor([0.5, 0.5, -0.5, -0.5]) / (std + 1e-4))
    assert float(out.frac_zero_std) == pytest.approx(1 / 3)
