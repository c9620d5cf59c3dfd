"""Learned rewards: a Hugging Face sequence-classification model as a reward function, and the small Bradley-Terry
reward model that ``--reward learned`` trains on the built-in task before GRPO.

A reward model scores the text ``(prompt, completion)`` with *its own* tokenizer: through its chat template as a
user turn and an assistant turn (``--system-prompt`` as a system turn) when it has one, else as the plain
concatenation ``prompt + completion``. The prompt is the raw one, before the policy's chat template. Batches are
padded on the right, so a sequence's positions and its score do not depend on the other sequences of the batch
(the head pools the last non-padding token); the model runs on the policy's device, in ``eval()`` mode, under
``no_grad``.

``--reward learned`` (:func:`train_learned_reward`): preference pairs ``(prompt, chosen, rejected)`` in which the
chosen completion is the task's correct demonstration and the rejected one is, by kind:

- ``wrong_answer``: the correct scratchpad, a different number in ``<answer>``;
- ``wrong_column``: one column's sum off by 1 to 3, the carries and the answer following from it (a consistent
  but wrong computation);
- ``no_tags`` (the bare number), ``no_think`` (``<answer>`` only), ``unclosed`` (no ``</answer>``), ``trailing``
  (a character after ``</answer>``): the right answer, the wrong format.

The Bradley-Terry loss is ``-log sigmoid(r(chosen) - r(rejected))``, averaged over the pairs of a step. The
held-out pairwise accuracy (the fraction of pairs with ``r(chosen) > r(rejected)``) is measured on pairs built from
problems the reward model never trains on (the policy's held-out problems when they are task problems).
"""

from __future__ import annotations

import json
import random
from contextlib import nullcontext
from pathlib import Path

import torch

from .data import AdditionTask, Example

PAIR_KINDS = ("wrong_answer", "wrong_column", "no_tags", "no_think", "unclosed", "trailing")
REPORT = "report.json"  # the training report beside the weights of a --reward learned model


def parse_reward_model_spec(spec: str) -> tuple[str, float]:
    """``"DIR"`` -> (DIR, 1.0); ``"DIR=0.5"`` -> (DIR, 0.5). A directory whose name holds '=' is taken whole."""
    path, sep, weight = spec.rpartition("=")
    if not sep or Path(spec).is_dir():
        return spec, 1.0
    try:
        return path, float(weight)
    except ValueError:
        raise ValueError(f"--reward-model {spec!r}: the weight after '=' must be a number, got {weight!r}") from None


def load_reward_model(path: str | Path):
    """``(model, tokenizer)`` of a sequence-classification reward model directory, after checking it is one.

    ValueError when the directory does not exist, is not a ``*ForSequenceClassification`` model, its head has more
    (or fewer) than one output, or the head's weights are not in the checkpoint (they would be random).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    where = f"--reward-model {str(path)!r}"
    if not Path(path).is_dir():
        raise ValueError(f"{where} is not a directory (expected a local Hugging Face sequence-classification model)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{where} is not a Hugging Face model directory ({e})") from None
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise ValueError(
            f"{where} is not a sequence-classification model (architectures: {architectures or 'none'}); "
            "a reward model is an AutoModelForSequenceClassification with one output"
        )
    if config.num_labels != 1:
        raise ValueError(
            f"{where}: its head has {config.num_labels} outputs; a reward model has exactly one "
            "(num_labels=1), the score"
        )
    model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    if info["missing_keys"]:
        missing = ", ".join(sorted(info["missing_keys"])[:4])
        raise ValueError(f"{where}: weights missing from the checkpoint ({missing}): they would be random")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model.config.pad_token_id is None:  # the head finds each sequence's last token through it
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.float().eval().requires_grad_(False), tokenizer


class RewardModel:
    """A reward function (see :mod:`.rewards`) backed by a sequence-classification model: one float per completion."""

    def __init__(
        self, model, tokenizer, *, device, batch_size: int = 64, system_prompt: str | None = None, autocast=nullcontext
    ):
        self.model, self.tokenizer = model.to(device), tokenizer
        self.device, self.batch_size, self.system_prompt, self.autocast = device, batch_size, system_prompt, autocast
        self.templated = bool(getattr(tokenizer, "chat_template", None))

    @classmethod
    def from_directory(cls, path: str | Path, **kwargs) -> RewardModel:
        return cls(*load_reward_model(path), **kwargs)

    def texts(self, prompts: list[str], completions: list[str]) -> list[str]:
        """What the reward model reads for each pair (its chat template, or prompt + completion)."""
        if not self.templated:
            return [p + c for p, c in zip(prompts, completions, strict=True)]
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [
            self.tokenizer.apply_chat_template(
                [*system, {"role": "user", "content": p}, {"role": "assistant", "content": c}], tokenize=False
            )
            for p, c in zip(prompts, completions, strict=True)
        ]

    def score_texts(self, texts: list[str]) -> torch.Tensor:
        """``[len(texts)]`` float32 scores (differentiable when called with grad enabled: the training uses it)."""
        scores = []
        for i in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer(
                texts[i : i + self.batch_size], return_tensors="pt", padding=True, add_special_tokens=not self.templated
            )
            encoded = {k: v.to(self.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
            with self.autocast():
                scores.append(self.model(**encoded).logits[:, 0].float())
        return torch.cat(scores) if scores else torch.zeros(0, device=self.device)

    @torch.no_grad()
    def __call__(self, *, raw_prompts, completions, **_) -> list[float]:
        return self.score_texts(self.texts(list(raw_prompts), list(completions))).tolist()


# ----------------------------------------------------------------------------------------------------------------
# --reward learned: synthetic preference pairs on the built-in task, Bradley-Terry training
# ----------------------------------------------------------------------------------------------------------------
def _columns(task: AdditionTask, a: int, b: int, error_at: int | None = None, error: int = 0) -> tuple[str, int]:
    """The scratchpad and the answer, with ``error`` added to the sum of column ``error_at`` (0 = rightmost)."""
    x, y = f"{a:0{task.digits}d}", f"{b:0{task.digits}d}"
    carry, columns, digits = 0, [], []
    for k, i in enumerate(reversed(range(task.digits))):
        total = int(x[i]) + int(y[i]) + carry + (error if k == error_at else 0)
        columns.append(f"{x[i]}+{y[i]}+{carry}={total}")
        carry, digits = total // 10, [total % 10, *digits]
    return ",".join(columns), int("".join(map(str, [carry, *digits])))


def rejected_completion(task: AdditionTask, example: Example, kind: str, rng: random.Random) -> str:
    """A completion worse than ``example.completion`` in the way ``kind`` names (see the module docstring)."""
    a, b = (int(s) for s in example.prompt.rstrip("=").split("+"))
    right = a + b
    if kind == "wrong_answer":
        wrong = right
        while wrong == right:
            wrong = max(0, right + rng.choice([-1, 1]) * rng.randint(1, 10 ** rng.randint(1, task.digits)))
        return f"<think>{_columns(task, a, b)[0]}</think><answer>{wrong}</answer>"
    if kind == "wrong_column":
        k = rng.randrange(task.digits)
        total = _columns_total(task, a, b, k)
        errors = [e for e in (-3, -2, -1, 1, 2, 3) if 0 <= total + e <= 19]
        scratch, wrong = _columns(task, a, b, error_at=k, error=rng.choice(errors))
        return f"<think>{scratch}</think><answer>{wrong}</answer>"
    scratch = _columns(task, a, b)[0]
    return {
        "no_tags": f"{right}",
        "no_think": f"<answer>{right}</answer>",
        "unclosed": f"<think>{scratch}</think><answer>{right}",
        "trailing": f"<think>{scratch}</think><answer>{right}</answer>{rng.choice('0123456789=+')}",
    }[kind]


def _columns_total(task: AdditionTask, a: int, b: int, k: int) -> int:
    """The correct sum (with carry) of column ``k`` from the right."""
    carry = 0
    for j in range(k + 1):
        total = (a // 10**j) % 10 + (b // 10**j) % 10 + carry
        carry = total // 10
    return total


def preference_pairs(
    task: AdditionTask, examples: list[Example], rng: random.Random, kinds=PAIR_KINDS
) -> list[tuple[str, str, str, str]]:
    """``(prompt, chosen, rejected, kind)``, one pair per example and kind."""
    return [(e.prompt, e.completion, rejected_completion(task, e, kind, rng), kind) for e in examples for kind in kinds]


def builtin_reward_model(tokenizer, *, hidden_size: int, num_layers: int, max_positions: int = 128):
    """A small ``LlamaForSequenceClassification`` (one output) on the built-in tokenizer, from the current seed."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForSequenceClassification(config)


def pairwise_accuracy(scorer: RewardModel, pairs) -> dict:
    """Fraction of pairs with ``r(chosen) > r(rejected)``, overall and by kind."""
    with torch.no_grad():
        chosen = scorer.score_texts(scorer.texts([p for p, *_ in pairs], [c for _, c, _, _ in pairs]))
        rejected = scorer.score_texts(scorer.texts([p for p, *_ in pairs], [r for _, _, r, _ in pairs]))
    wins = (chosen > rejected).tolist()
    by_kind = {}
    for kind in dict.fromkeys(k for *_, k in pairs):
        picked = [w for w, (*_, k) in zip(wins, pairs, strict=True) if k == kind]
        by_kind[kind] = sum(picked) / len(picked)
    return {"accuracy": sum(wins) / max(len(wins), 1), "pairs": len(wins), "by_kind": by_kind}


def train_learned_reward(
    *,
    task: AdditionTask,
    stream,  # a PromptStream over the task (the held-out prompts excluded)
    heldout: list[Example],
    out_dir: Path,
    seed: int,
    steps: int,
    pairs_per_step: int,
    lr: float,
    hidden_size: int,
    num_layers: int,
    device: torch.device,
) -> dict:
    """Train the ``--reward learned`` model (Bradley-Terry, AdamW) and save it to ``out_dir`` (atomically, with a
    checksum manifest): ``save_pretrained`` weights and tokenizer, and ``report.json``. Returns the report.

    Seeded by ``seed`` alone, on a forked RNG, so the policy's own random stream is the same with or without it.
    """
    from .checkpoint import write_directory
    from .model import builtin_tokenizer

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        tokenizer = builtin_tokenizer()
        tokenizer.padding_side = "right"
        model = builtin_reward_model(tokenizer, hidden_size=hidden_size, num_layers=num_layers).to(device)
        scorer = RewardModel(model, tokenizer, device=device, batch_size=2 * pairs_per_step)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        kinds_per_step = max(1, -(-pairs_per_step // len(PAIR_KINDS)))  # examples per step, one pair of each kind
        model.train()
        losses = []
        for step in range(steps):
            rng = random.Random(f"{seed}/preference/{step}")
            pairs = preference_pairs(task, stream.batch(step, kinds_per_step), rng)[:pairs_per_step]
            prompts = [p for p, *_ in pairs] * 2
            scores = scorer.score_texts(scorer.texts(prompts, [c for _, c, _, _ in pairs] + [r for *_, r, _ in pairs]))
            margin = scores[: len(pairs)] - scores[len(pairs) :]
            loss = -torch.nn.functional.logsigmoid(margin).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        model.eval()
        held = pairwise_accuracy(scorer, preference_pairs(task, heldout, random.Random(f"{seed}/preference/held")))
    report = {
        "heldout_pairwise_accuracy": held["accuracy"],
        "heldout_pairs": held["pairs"],
        "heldout_pairwise_accuracy_by_kind": held["by_kind"],
        "steps": steps,
        "pairs_per_step": pairs_per_step,
        "final_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1),
    }

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / REPORT).write_text(json.dumps(report, indent=1))

    write_directory(out_dir, write)
    return report
