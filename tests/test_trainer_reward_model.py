"""Learned rewards: a sequence-classification model as a reward (--reward-model), the --reward learned model."""

import json
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from grpo_kernels.trainer.cli import main
from grpo_kernels.trainer.data import AdditionTask, heldout_set
from grpo_kernels.trainer.loop import Trainer, train
from grpo_kernels.trainer.metrics import read_metrics
from grpo_kernels.trainer.model import builtin_tokenizer, tiny_model
from grpo_kernels.trainer.reward_model import (
    PAIR_KINDS,
    RewardModel,
    parse_reward_model_spec,
    preference_pairs,
)
from grpo_kernels.trainer.rewards import accuracy_reward, format_reward
from tests.trainer_helpers import tiny_cli_args, tiny_config, tiny_reward_model_dir

CPU = torch.device("cpu")


def _unbatched_scores(path, texts):
    """Ground truth: the model loaded by transformers itself, one text at a time, no padding."""
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return [float(model(**tokenizer(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0]) for t in texts]


def test_scores_are_batched_and_padded_without_changing_them(tmp_path):
    path = tiny_reward_model_dir(tmp_path / "rm")
    scorer = RewardModel.from_directory(path, device=CPU, batch_size=3)
    prompts = ["1+2=", "47+85=", "9+9=", "12+30=", "5+5=", "0+0=", "99+1="]
    completions = ["3", "<think>7+5+0=12,4+8+1=13</think><answer>132</answer>", "", "42", "<answer>10", "0", "1"]
    ours = scorer(raw_prompts=prompts, completions=completions, prompts=["ignored"] * 7)
    expected = _unbatched_scores(path, [p + c for p, c in zip(prompts, completions, strict=True)])
    assert len(set(expected)) == len(expected)  # the scores differ: a mix-up between rows would show
    assert ours == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_reward_model_uses_its_own_chat_template(tmp_path):
    template = "{% for m in messages %}[{{ m['role'][0] }}:{{ m['content'] }}]{% endfor %}"
    path = tiny_reward_model_dir(tmp_path / "rm", chat_template=template)
    scorer = RewardModel.from_directory(path, device=CPU, system_prompt="0")
    texts = scorer.texts(["1+2="], ["3"])
    assert texts == ["[s:0][u:1+2=][a:3]"]
    assert scorer(raw_prompts=["1+2="], completions=["3"]) == pytest.approx(_unbatched_scores(path, texts), rel=1e-5)


def test_reward_model_spec():
    assert parse_reward_model_spec("dir") == ("dir", 1.0)
    assert parse_reward_model_spec("a/dir=0.25") == ("a/dir", 0.25)
    with pytest.raises(ValueError, match=r"--reward-model 'dir=x': the weight after '=' must be a number"):
        parse_reward_model_spec("dir=x")


def test_reward_model_with_a_rule_reward_end_to_end(tmp_path):
    """--reward accuracy --reward-model DIR=0.5: the table holds the rule score and the model's score of each
    (raw prompt, completion), and the whole loop runs and logs both."""
    path = tiny_reward_model_dir(tmp_path / "rm")
    settings = dict(
        sft_steps=1, steps=1, rewards=["accuracy"], reward_models=[f"{path}=0.5"], reward_model_batch_size=5
    )
    trainer = Trainer(tiny_config(tmp_path / "unit", **settings))
    assert trainer.rewards.names == ["accuracy", f"reward_model:{path}"] and trainer.rewards.weights == [1.0, 0.5]
    trainer._begin_grpo()
    (batch,) = trainer.rollout_step_batches()
    prompts = [e.prompt for e in trainer._local_share(trainer.cfg.batch_prompts) for _ in range(4)]
    expected = _unbatched_scores(path, [p + c for p, c in zip(prompts, batch.rollout.completions, strict=True)])
    assert batch.rewards[:, 1].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    answers = [e.answer for e in trainer._local_share(trainer.cfg.batch_prompts) for _ in range(4)]
    assert batch.rewards[:, 0].tolist() == accuracy_reward(completions=batch.rollout.completions, answers=answers)

    train(tiny_config(tmp_path / "run", **settings))
    (record,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("phase") == "grpo"]
    assert {"reward/accuracy", f"reward/reward_model:{path}", "accuracy"} <= record.keys()
    combined = record["reward/accuracy"] + 0.5 * record[f"reward/reward_model:{path}"]
    assert record["reward_mean"] == pytest.approx(combined, rel=1e-5, abs=1e-6)


def test_preference_pairs_are_worse_by_the_rule_rewards():
    """Each rejected completion loses to the correct demonstration on the accuracy or the format reward."""
    task = AdditionTask(2)
    pairs = preference_pairs(task, heldout_set(task, 40, seed=3), random.Random(0))
    assert {kind for *_, kind in pairs} == set(PAIR_KINDS) and len(pairs) == 40 * len(PAIR_KINDS)
    for prompt, chosen, rejected, kind in pairs:
        answer = str(sum(int(x) for x in prompt.rstrip("=").split("+")))
        chosen_acc, rejected_acc = accuracy_reward(completions=[chosen, rejected], answers=[answer, answer])
        chosen_fmt, rejected_fmt = format_reward(completions=[chosen, rejected])
        assert chosen_acc == 1.0 and chosen_fmt == 1.0
        if kind.startswith("wrong"):
            assert rejected_acc == 0.0 and rejected_fmt == 1.0, (prompt, rejected)
        else:
            assert rejected_fmt == 0.0, (prompt, rejected)
        if kind == "wrong_column":  # the wrong computation is carried through to the answer consistently
            columns = rejected.split("<think>")[1].split("</think>")[0].split(",")
            sums = [int(c.split("=")[1]) for c in columns]
            digits = "".join(str(s % 10) for s in reversed(sums))
            assert int(rejected.split("<answer>")[1].split("</answer>")[0]) == int(str(sums[-1] // 10) + digits)


def test_learned_reward_is_trained_reported_saved_and_optimised(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(out, rewards=["learned", "accuracy=0"], learned_reward_steps=30, learned_reward_pairs=24))
    records = read_metrics(out / "metrics.jsonl")
    (report,) = [r for r in records if r.get("reward_model") == "learned"]
    assert (
        json.loads((out / "reward_model" / "report.json").read_text())["heldout_pairwise_accuracy"]
        == (report["heldout_pairwise_accuracy"])
    )
    # Recount the held-out pairwise accuracy with the saved model, loaded by transformers, one text at a time.
    task = AdditionTask(2)
    from grpo_kernels.trainer.loop import derived_seed

    seed = derived_seed(0, "reward_model")
    pairs = preference_pairs(task, heldout_set(task, 8, 0), random.Random(f"{seed}/preference/held"))
    chosen = _unbatched_scores(out / "reward_model", [p + c for p, c, _, _ in pairs])
    rejected = _unbatched_scores(out / "reward_model", [p + r for p, _, r, _ in pairs])
    wins = [c > r for c, r in zip(chosen, rejected, strict=True)]
    assert report["heldout_pairs"] == len(pairs) == 48
    assert report["heldout_pairwise_accuracy"] == sum(wins) / len(wins)
    grpo = [r for r in records if r.get("phase") == "grpo"]
    # GRPO optimises the learned score alone (accuracy has weight 0); the true accuracy is logged beside it.
    assert grpo and all({"reward/learned", "reward/accuracy", "accuracy"} <= r.keys() for r in grpo)
    assert all(r["reward_mean"] == pytest.approx(r["reward/learned"], rel=1e-6, abs=1e-7) for r in grpo)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda p: ["--reward-model", str(p / "missing")], "--reward-model '{p}/missing' is not a directory"),
        (lambda p: ["--reward-model", str(p / "causal")], "is not a sequence-classification model"),
        (lambda p: ["--reward-model", str(p / "two")], "its head has 2 outputs; a reward model has exactly one"),
        (lambda p: ["--reward", "learned", "--data", str(p / "ok.jsonl")], "--reward learned trains its reward"),
        (lambda p: ["--learned-reward-steps", "0"], "--learned-reward-steps must be >= 1"),
    ],
    ids=["missing", "causal-lm", "two-outputs", "learned-with-data", "steps"],
)
def test_bad_reward_models_are_clear_errors(tmp_path, capsys, make_args, message):
    tokenizer = builtin_tokenizer()
    tiny_model(tokenizer, hidden_size=32, num_layers=1).save_pretrained(tmp_path / "causal")
    tiny_reward_model_dir(tmp_path / "two", num_labels=2)
    (tmp_path / "ok.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    capsys.readouterr()  # the progress output of the saves above
    assert main(tiny_cli_args(tmp_path / "out") + make_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("grpo-train: error: ") and message.format(p=tmp_path) in err, err
    assert not (tmp_path / "out").exists()  # refused before anything was written
