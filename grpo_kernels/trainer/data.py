"""Prompts: JSONL files (``prompt``, ``answer``, optional ``completion``) or the built-in addition task.

Batches are a pure function of ``(seed, batch index)``, so resuming needs nothing but the step number, and a batch
is the same whichever rank or how many ranks draw it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    completion: str | None = None  # a demonstration for the supervised warm-up


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and line."""


def read_jsonl(path: str | Path) -> list[Example]:
    """One JSON object per line with a string ``prompt``, an ``answer`` (string or number) and optionally a string
    ``completion`` (a demonstration used by the warm-up). Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object with 'prompt' and 'answer', got {type(row).__name__}")
            for key in ("prompt", "answer"):
                if key not in row:
                    raise DataError(f"{where}: missing key {key!r} (keys: {sorted(row)})")
            if not isinstance(row["prompt"], str) or not row["prompt"]:
                raise DataError(f"{where}: 'prompt' must be a non-empty string")
            if isinstance(row["answer"], bool) or not isinstance(row["answer"], (str, int, float)):
                raise DataError(f"{where}: 'answer' must be a string or a number, got {type(row['answer']).__name__}")
            completion = row.get("completion")
            if completion is not None and not isinstance(completion, str):
                raise DataError(f"{where}: 'completion' must be a string when given")
            examples.append(Example(row["prompt"], str(row["answer"]), completion))
    if not examples:
        raise DataError(f"data file {str(path)!r} holds no examples")
    return examples


class AdditionTask:
    """The built-in task: add two ``digits``-digit numbers, written with leading zeros.

    The demonstration works column by column from the right, each column as ``x+y+carry=sum``, then gives the
    result: ``"47+85="`` -> ``"<think>7+5+0=12,4+8+1=13</think><answer>132</answer>"``. The scratchpad makes the
    task learnable by a tiny model in seconds; the answer is scored exactly by the ``accuracy`` reward.
    """

    def __init__(self, digits: int):
        if digits < 1:
            raise ValueError(f"task digits must be >= 1, got {digits}")
        self.digits = digits

    def example(self, a: int, b: int) -> Example:
        x, y = f"{a:0{self.digits}d}", f"{b:0{self.digits}d}"
        carry, columns = 0, []
        for i in reversed(range(self.digits)):
            total = int(x[i]) + int(y[i]) + carry
            columns.append(f"{x[i]}+{y[i]}+{carry}={total}")
            carry = total // 10
        completion = f"<think>{','.join(columns)}</think><answer>{a + b}</answer>"
        return Example(f"{x}+{y}=", str(a + b), completion)

    def sample(self, rng: random.Random) -> Example:
        high = 10**self.digits
        return self.example(rng.randrange(high), rng.randrange(high))


class PromptStream:
    """Batch ``k`` of a run: from a list of examples (reshuffled every epoch) or sampled from a task.

    ``exclude`` holds prompts that must never be trained on (the held-out set of the task).
    """

    def __init__(
        self,
        seed: int,
        *,
        examples: list[Example] | None = None,
        task: AdditionTask | None = None,
        exclude: frozenset[str] = frozenset(),
    ):
        if (examples is None) == (task is None):
            raise ValueError("PromptStream needs exactly one of examples and task")
        self.seed, self.examples, self.task, self.exclude = seed, examples, task, exclude
        self._orders: dict[int, list[int]] = {}  # epoch -> permutation of the examples

    def batch(self, index: int, size: int) -> list[Example]:
        if self.task is not None:
            rng = random.Random(f"{self.seed}/batch/{index}")
            out = []
            while len(out) < size:
                example = self.task.sample(rng)
                if example.prompt not in self.exclude:
                    out.append(example)
            return out
        out = []
        for position in range(index * size, (index + 1) * size):
            epoch, offset = divmod(position, len(self.examples))
            out.append(self.examples[self._order(epoch)[offset]])
        return out

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.examples)))
            random.Random(f"{self.seed}/epoch/{epoch}").shuffle(order)
            self._orders = {epoch: order}  # batches move forward: only the current epoch is kept
        return self._orders[epoch]


def heldout_set(task: AdditionTask, size: int, seed: int) -> list[Example]:
    """``size`` distinct problems, the same for every run with this seed; training never sees them."""
    rng = random.Random(f"{seed}/heldout")
    examples: dict[str, Example] = {}
    limit = 10 ** (2 * task.digits)
    if size > limit // 2:
        raise ValueError(f"eval size {size} is too large for {task.digits}-digit problems (at most {limit // 2})")
    while len(examples) < size:
        example = task.sample(rng)
        examples.setdefault(example.prompt, example)
    return list(examples.values())


def format_prompt(tokenizer, prompt: str, system_prompt: str | None = None) -> str:
    """The prompt as the model sees it: through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt if system_prompt is None else f"{system_prompt}\n{prompt}"
