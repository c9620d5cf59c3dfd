"""Rule-based rewards: a registry of built-ins, user callables given as ``module:function``, weighted combination.

Every reward function is called with keyword arguments and returns one float per completion (``None`` or NaN
means "no score": :func:`grpo_kernels.group_advantages` leaves such a completion out of its group's statistics)::

    fn(prompts=[...], completions=[...], answers=[...], completion_lengths=[...], truncated=[...],
       max_completion_length=int, raw_prompts=[...]) -> list[float]

``prompts`` are the texts the policy saw (through its chat template), ``raw_prompts`` the prompts before it (what a
reward model with its own chat template reads: :mod:`.reward_model`).

Built-ins:

- ``accuracy``: numeric answer match. The answer is *marked* when it appears as ``#### 42`` (GSM8K),
  ``\\boxed{42}`` or ``<answer>42</answer>``; otherwise the last number of the completion is taken. Score 1.0 when the
  marked answer equals the reference, **0.5 ("partially correct") when the completion marks no answer but its last
  number equals the reference** (right value, answer not given in the requested form), 0.0 otherwise (a marked but
  wrong answer scores 0 even if a correct number appears elsewhere). Numbers compare by value: ``1,000`` = ``1000``,
  ``42.0`` = ``42``, ``$5`` = ``5``.
- ``format``: 1.0 when the completion is exactly ``<think>…</think><answer>…</answer>`` (whitespace around the tags
  allowed), else 0.0.
- ``length``: DAPO's soft overlong penalty: 0 while the completion has at most ``L_max - L_buffer`` tokens, then
  falling linearly to -1 at ``L_max`` (= max new tokens); -1 for a truncated completion. ``L_buffer = L_max // 4``.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from decimal import Decimal

RewardFn = Callable[..., Sequence[float | None]]

# A minus sign belongs to the number only when it does not follow a word or ")" ("5-3" is 5 and 3, "x = -3" is -3);
# a comma groups thousands only in threes ("1,234" is one number, "3,4" is two).
_NUMBER = r"(?:(?<![\w)])-)?\$?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(_NUMBER)
_HASHES_RE = re.compile(r"####\s*(" + _NUMBER + ")")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def last_number(text: str) -> Decimal | None:
    """The last number in ``text`` (``"1,234.50"``, ``"$5"``, ``"-3"``) as a Decimal; None when there is none."""
    numbers = _NUMBER_RE.findall(text)
    return Decimal(numbers[-1].replace(",", "").replace("$", "")) if numbers else None


def _boxed_contents(text: str) -> list[tuple[int, str]]:
    """``(position, content)`` of every ``\\boxed{...}``, nested braces (``\\boxed{\\frac{1}{2}}``) kept whole."""
    contents = []
    for match in re.finditer(r"\\boxed\{", text):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            contents.append((match.start(), text[match.end() : i - 1]))
    return contents


def extract_answer(text: str) -> tuple[Decimal | None, bool]:
    """``(number, marked)``: the marked answer (``#### x``, ``\\boxed{x}``, ``<answer>x</answer>``; the last one in the
    text wins) if there is one, else the last number of the text with ``marked=False``."""
    candidates = []  # (position, content)
    candidates += [(m.start(), m.group(1)) for m in _HASHES_RE.finditer(text)]
    candidates += _boxed_contents(text)
    candidates += [(m.start(), m.group(1)) for m in _ANSWER_TAG_RE.finditer(text)]
    if candidates:
        return last_number(max(candidates, key=lambda pc: pc[0])[1]), True
    return last_number(text), False


def answer_score(completion: str, answer: str) -> float:
    """1.0 correct (marked answer), 0.5 partially correct (right last number, no marked answer), 0.0 wrong."""
    reference, _ = extract_answer(answer)
    value, marked = extract_answer(completion)
    if reference is None or value is None or value != reference:
        return 0.0
    return 1.0 if marked else 0.5


def accuracy_reward(*, completions: Sequence[str], answers: Sequence[str], **_) -> list[float]:
    return [answer_score(c, a) for c, a in zip(completions, answers, strict=True)]


def format_reward(*, completions: Sequence[str], **_) -> list[float]:
    return [1.0 if _FORMAT_RE.match(c) else 0.0 for c in completions]


def length_reward(
    *, completion_lengths: Sequence[int], truncated: Sequence[bool], max_completion_length: int, **_
) -> list[float]:
    buffer = max(1, max_completion_length // 4)
    free = max_completion_length - buffer
    return [
        -1.0 if cut else min(0.0, (free - n) / buffer) for n, cut in zip(completion_lengths, truncated, strict=True)
    ]


REWARDS: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward, "length": length_reward}


class RewardError(RuntimeError):
    """A reward function raised or returned something unusable; the message names it."""


def load_reward(name: str) -> RewardFn:
    """A built-in name, or ``package.module:function`` importable from ``sys.path`` (the working directory too)."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}: use one of {sorted(REWARDS)} or 'module:function'")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r} ({e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {name!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def parse_reward_spec(spec: str) -> tuple[str, float]:
    """``"accuracy"`` -> ("accuracy", 1.0); ``"pkg.mod:fn=0.5"`` -> ("pkg.mod:fn", 0.5)."""
    name, sep, weight = spec.rpartition("=")
    if not sep:
        return spec, 1.0
    try:
        return name, float(weight)
    except ValueError:
        raise ValueError(f"reward {spec!r}: the weight after '=' must be a number, got {weight!r}") from None


class RewardSet:
    """Several named reward functions with weights; :meth:`__call__` returns the ``[B, R]`` table of scores."""

    def __init__(self, specs: Sequence[str], named: dict[str, RewardFn] | None = None):
        """``specs``: ``NAME[=WEIGHT]``; ``named``: reward functions built by the caller (reward models), by name."""
        if not specs:
            raise ValueError("at least one reward is needed (--reward NAME[=WEIGHT])")
        named = named or {}
        parsed = [parse_reward_spec(s) for s in specs]
        self.names = [name for name, _ in parsed]
        self.weights = [weight for _, weight in parsed]
        self.fns = [named[name] if name in named else load_reward(name) for name in self.names]

    def __call__(self, **batch) -> list[list[float]]:
        size = len(batch["completions"])
        columns = []
        for name, fn in zip(self.names, self.fns, strict=True):
            try:
                scores = list(fn(**batch))
            except Exception as e:
                raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
            if len(scores) != size:
                raise RewardError(f"reward function {name!r} returned {len(scores)} scores for {size} completions")
            try:
                columns.append([math.nan if s is None else float(s) for s in scores])
            except (TypeError, ValueError) as e:
                raise RewardError(f"reward function {name!r} returned a non-number: {e}") from e
        return [list(row) for row in zip(*columns, strict=True)]
