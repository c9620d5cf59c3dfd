"""Trainer data: JSONL parsing and its errors, the built-in task, deterministic batches, prompt formatting."""

import json

import pytest

from grpo_kernels.trainer.data import (
    AdditionTask,
    DataError,
    Example,
    PromptStream,
    format_prompt,
    heldout_set,
    read_jsonl,
)
from grpo_kernels.trainer.rewards import answer_score


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_read_jsonl(tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        [
            json.dumps({"prompt": "1+1=", "answer": 2}),
            "",
            json.dumps({"prompt": "q", "answer": "#### 5", "completion": "#### 5", "extra": 1}),
        ],
    )
    assert read_jsonl(path) == [Example("1+1=", "2"), Example("q", "#### 5", "#### 5")]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "answer": 1', r"d.jsonl:2: not valid JSON"),
        ('["a", 1]', r"d.jsonl:2: expected a JSON object"),
        ('{"prompt": "a"}', r"d.jsonl:2: missing key 'answer'"),
        ('{"answer": "a"}', r"d.jsonl:2: missing key 'prompt'"),
        ('{"prompt": "", "answer": 1}', r"d.jsonl:2: 'prompt' must be a non-empty string"),
        ('{"prompt": "a", "answer": [1]}', r"d.jsonl:2: 'answer' must be a string or a number"),
        ('{"prompt": "a", "answer": 1, "completion": 3}', r"d.jsonl:2: 'completion' must be a string"),
    ],
)
def test_read_jsonl_names_the_bad_line(tmp_path, line, message):
    path = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": "ok", "answer": 1}), line])
    with pytest.raises(DataError, match=message):
        read_jsonl(path)


def test_read_jsonl_missing_or_empty(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="holds no examples"):
        read_jsonl(_write(tmp_path / "empty.jsonl", ["", "  "]))


def test_addition_task_demonstrations_are_correct():
    task = AdditionTask(3)
    example = task.example(47, 985)
    assert example.prompt == "047+985="
    assert example.answer == "1032"
    assert example.completion == "<think>7+5+0=12,4+8+1=13,0+9+1=10</think><answer>1032</answer>"
    import random

    rng = random.Random(1)
    for _ in range(200):  # every demonstration earns the full accuracy reward
        e = task.sample(rng)
        assert answer_score(e.completion, e.answer) == 1.0


def test_prompt_stream_is_a_function_of_seed_and_index():
    task = AdditionTask(2)
    held_out = heldout_set(task, 64, seed=0)
    assert len({e.prompt for e in held_out}) == 64
    assert heldout_set(task, 64, seed=0) == held_out
    stream = PromptStream(3, task=task, exclude=frozenset(e.prompt for e in held_out))
    assert stream.batch(5, 16) == stream.batch(5, 16)
    assert stream.batch(5, 16) != stream.batch(6, 16)
    seen = {e.prompt for i in range(200) for e in stream.batch(i, 16)}
    assert not seen & {e.prompt for e in held_out}

    examples = [Example(str(i), str(i)) for i in range(10)]
    listed = PromptStream(0, examples=examples)
    first_epoch = [e.prompt for i in range(5) for e in listed.batch(i, 2)]
    assert sorted(first_epoch) == sorted(e.prompt for e in examples)  # one epoch = every example once
    assert first_epoch != [e.prompt for e in examples]  # shuffled
    assert [e.prompt for e in listed.batch(7, 3)] == [e.prompt for e in PromptStream(0, examples=examples).batch(7, 3)]


class _ChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"


class _PlainTokenizer:
    chat_template = None


def test_format_prompt_uses_the_chat_template_when_there_is_one():
    assert format_prompt(_ChatTokenizer(), "2+2?") == "user:2+2?|assistant:"
    assert format_prompt(_ChatTokenizer(), "2+2?", "be brief") == "system:be brief|user:2+2?|assistant:"
    assert format_prompt(_PlainTokenizer(), "2+2?") == "2+2?"
    assert format_prompt(_PlainTokenizer(), "2+2?", "be brief") == "be brief\n2+2?"
