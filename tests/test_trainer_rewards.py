"""Reward functions of the trainer: answer extraction, the 1.0 / 0.5 / 0.0 scoring, format, length, combination."""

import math
from decimal import Decimal

import pytest

from grpo_kernels.trainer.rewards import (
    RewardError,
    RewardSet,
    accuracy_reward,
    answer_score,
    extract_answer,
    format_reward,
    length_reward,
    load_reward,
    parse_reward_spec,
)


@pytest.mark.parametrize(
    "text, number, marked",
    [
        ("so the total is\n#### 42", "42", True),
        ("#### 1,234", "1234", True),
        ("#### -7", "-7", True),
        ("#### $18.50", "18.50", True),
        ("#### 7 and then 8", "7", True),  # the marked answer wins over a later number
        ("first \\boxed{3}, finally \\boxed{42}", "42", True),  # the last marked answer wins
        ("\\boxed{\\frac{1}{2}} no", "2", True),  # nested braces stay inside the box; last number in it
        ("\\boxed{x = 12}", "12", True),
        ("<think>7+5=12</think><answer>132</answer>", "132", True),
        ("<answer>1</answer> then #### 2", "2", True),  # the last marked answer of any kind
        ("the answer is 42.", "42", False),
        ("5-3", "3", False),  # a minus after a digit is an operator, not a sign
        ("x = -3", "-3", False),
        ("3,4", "4", False),  # a comma groups thousands only in threes
        ("costs $1,000,000 total", "1000000", False),
        ("0.5 or .5?", "0.5", False),
        ("#### ", None, False),  # "####" without a number is no marked answer; no number at all
        ("\\boxed{} 9", None, True),  # an empty box is a marked answer without a number (scores 0)
        ("no digits here", None, False),
        ("", None, False),
    ],
)
def test_extract_answer(text, number, marked):
    value, was_marked = extract_answer(text)
    assert value == (None if number is None else Decimal(number))
    assert was_marked is marked


@pytest.mark.parametrize(
    "completion, answer, score",
    [
        ("#### 42", "42", 1.0),
        ("\\boxed{42.0}", "42", 1.0),  # numbers compare by value
        ("<answer>1,000</answer>", "#### 1000", 1.0),  # the reference is extracted the same way (GSM8K answers)
        ("I get 42", "42", 0.5),  # partially correct: right value, answer not marked
        ("#### 41, no wait, 42", "42", 0.0),  # a marked wrong answer is wrong even if 42 appears later
        ("#### 41", "42", 0.0),
        ("42 is not it, 43", "42", 0.0),
        ("", "42", 0.0),  # an empty completion
        ("#### 42", "forty-two", 0.0),  # a reference without a number can never be matched
    ],
)
def test_answer_score(completion, answer, score):
    assert answer_score(completion, answer) == score


def test_accuracy_and_format_rewards():
    completions = ["<think>a</think><answer>5</answer>", " <think>\nx\n</think>\n<answer>4</answer>\n", "5", ""]
    assert accuracy_reward(completions=completions, answers=["5"] * 4) == [1.0, 0.0, 0.5, 0.0]
    assert format_reward(completions=completions) == [1.0, 1.0, 0.0, 0.0]
    wrong_order, trailing = "<answer>5</answer><think>a</think>", "<think>a</think><answer>5</answer> tail"
    assert format_reward(completions=[wrong_order, trailing]) == [0.0, 0.0]


def test_length_reward_is_dapo_soft_overlong_penalty():
    # L_max = 20, buffer = 5: free up to 15 tokens, then -1/5 per token, -1 when truncated.
    lengths, truncated = [3, 15, 16, 18, 20, 20], [False] * 5 + [True]
    out = length_reward(completion_lengths=lengths, truncated=truncated, max_completion_length=20)
    assert out == pytest.approx([0.0, 0.0, -0.2, -0.6, -1.0, -1.0])


def test_reward_set_combines_and_names_failures():
    rewards = RewardSet(["accuracy", "format=0.25", "tests.trainer_helpers:digit_reward=2"])
    assert rewards.names == ["accuracy", "format", "tests.trainer_helpers:digit_reward"]
    assert rewards.weights == [1.0, 0.25, 2.0]
    table = rewards(completions=["<think></think><answer>12</answer>", "7"], answers=["12", "12"], prompts=["p", "p"])
    assert table == [[1.0, 1.0, 3.0], [0.0, 0.0, 0.0]]

    with pytest.raises(RewardError, match=r"'tests.trainer_helpers:raising_reward' raised ZeroDivisionError"):
        RewardSet(["tests.trainer_helpers:raising_reward"])(completions=["a"], answers=["1"])
    with pytest.raises(RewardError, match=r"'tests.trainer_helpers:short_reward' returned 1 scores for 2"):
        RewardSet(["tests.trainer_helpers:short_reward"])(completions=["a", "b"], answers=["1", "1"])


def test_reward_none_means_no_score():
    out = RewardSet(["tests.trainer_helpers:none_first_reward"])(completions=["a", "b"])
    assert math.isnan(out[0][0]) and out[1][0] == 1.0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope", "unknown reward 'nope'"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("tests.trainer_helpers:missing", "has no callable 'missing'"),
    ],
)
def test_load_reward_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        load_reward(spec)


def test_parse_reward_spec():
    assert parse_reward_spec("accuracy") == ("accuracy", 1.0)
    assert parse_reward_spec("pkg.mod:fn=0.5") == ("pkg.mod:fn", 0.5)
    with pytest.raises(ValueError, match="must be a number"):
        parse_reward_spec("format=high")
    with pytest.raises(ValueError, match="at least one reward"):
        RewardSet([])
