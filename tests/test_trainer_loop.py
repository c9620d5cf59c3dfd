"""The training loop in-process: the step's loss and gradient against reference.py, exact resume, bad inputs."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import tests.trainer_helpers as helpers
from grpo_kernels import reference
from grpo_kernels.trainer.cli import main
from grpo_kernels.trainer.loop import LOSS_KNOBS, Trainer, train
from grpo_kernels.trainer.metrics import TIMING_KEYS, read_metrics
from grpo_kernels.trainer.rewards import RewardError
from tests.trainer_helpers import tiny_cli_args, tiny_config

# grpo_loss arguments that reference.grpo_loss takes too (not the backend choices or the entropy output)
REFERENCE_KEYS = [k for k in LOSS_KNOBS if k not in ("inplace_backward", "grad_in_forward", "backend")] + [
    "max_completion_length"
]


def _scaled_losses(trainer, batches, loss_fn):
    """Sum over micro-batches of loss_fn(batch) scaled as the trainer scales it, backward included; the grads."""
    token_normalised = trainer.cfg.loss_type in ("dapo", "cispo")
    total = 0.0
    for batch in batches:
        loss = loss_fn(batch)
        scaled = loss if token_normalised else loss / len(batches)
        scaled.backward()
        total += float(scaled.detach())
    grads = [p.grad.detach().clone() for p in trainer.model.parameters()]
    trainer.model.zero_grad(set_to_none=True)
    return total, grads


@pytest.mark.parametrize(
    "variant",
    [
        dict(),  # dapo, on-policy, no KL: the defaults
        dict(beta=0.1, kl_estimator="k3", loss_type="grpo", num_iterations=2),  # reference model + old log-probs
        dict(
            loss_type="dr_grpo",
            importance_sampling_level="sequence",
            epsilon_high=0.28,
            temperature=0.7,
            inplace_backward=True,
        ),
        dict(loss_type="cispo", epsilon_high=3.0, beta=0.02, kl_estimator="low_var_kl", mask_truncated=True),
        dict(grad_in_forward=True),  # the gradient computed in the forward, loss_scale matching the backward's
        dict(loss_type="bnpo", grad_in_forward=True, inplace_backward=True),  # loss_scale 1 vs 1/2: the rescale
    ],
    ids=["dapo", "grpo-kl-mu2", "drgrpo-gspo", "cispo", "dapo-grad-in-forward", "bnpo-grad-in-forward-inplace"],
)
def test_step_loss_and_gradient_match_reference(tmp_path, variant):
    trainer = Trainer(tiny_config(tmp_path, sft_steps=0, batch_prompts=4, grad_accum=2, **variant))
    trainer._begin_grpo()
    start = copy.deepcopy(trainer.model.state_dict())
    batches = trainer.rollout_step_batches()
    assert len(batches) == 2 and any(bool((b.advantages != 0).any()) for b in batches)
    if trainer.cfg.beta > 0:
        assert all(b.ref_logprobs is not None for b in batches)
    num_items = sum(float(b.rollout.completion_mask.sum()) for b in batches)

    ours, our_grads = _scaled_losses(trainer, batches, lambda b: trainer.policy_loss(b, num_items).loss)

    config = {k: trainer.loss_config[k] for k in REFERENCE_KEYS}

    def reference_loss(b):
        logits = trainer._completion_logits(trainer.model, b.rollout).double()
        return reference.grpo_loss(
            logits,
            b.rollout.completion_ids,
            b.advantages.double(),
            mask=b.rollout.completion_mask,
            old_logprobs=b.old_logprobs,
            ref_logprobs=b.ref_logprobs,
            num_items_in_batch=num_items,
            **config,
        ).loss

    expected, ref_grads = _scaled_losses(trainer, batches, reference_loss)
    assert ours == pytest.approx(expected, rel=1e-5, abs=1e-7)
    for ours_g, ref_g in zip(our_grads, ref_grads):
        torch.testing.assert_close(ours_g, ref_g, rtol=1e-4, atol=1e-6 * float(ref_g.abs().max()) + 1e-10)

    # The full step draws the same batch (seeded by step and micro-batch) and logs that loss.
    trainer.model.load_state_dict(start)
    record = trainer.grpo_step()
    if trainer.cfg.num_iterations == 1:
        assert record["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert not torch.equal(trainer.model.state_dict()["lm_head.weight"], start["lm_head.weight"])


def _final_weights(out):
    return load_file(str(out / "final" / "model.safetensors"))


def _stable_metrics(out):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(out / "metrics.jsonl")]


def test_resume_after_interrupt_is_exact(tmp_path, monkeypatch):
    """k steps straight == k1 steps, Ctrl-C in the middle of step k1 + 1, --resume: same weights, same metrics."""
    common = dict(sft_steps=2, steps=4, save_every=3, beta=0.05, rewards=["tests.trainer_helpers:interrupting_reward"])
    helpers.reset_calls()
    straight = train(tiny_config(tmp_path / "a", **common))

    helpers.reset_calls()
    monkeypatch.setenv("GRPO_TEST_INTERRUPT_AT", "3")  # the 3rd GRPO step = step 5; checkpoint at 3, step 4 logged
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "b", **common))
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "phase" in r] == [1, 2, 3, 4]
    monkeypatch.delenv("GRPO_TEST_INTERRUPT_AT")
    resumed = train(tiny_config(tmp_path / "b", resume="latest", **common))

    assert resumed["evals"] == straight["evals"]
    assert _stable_metrics(tmp_path / "b") == _stable_metrics(tmp_path / "a")  # step 4 not duplicated
    a, b = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reward_that_raises_is_named(tmp_path):
    with pytest.raises(RewardError, match=r"function 'tests.trainer_helpers:raising_reward' raised ZeroDivision"):
        train(tiny_config(tmp_path, sft_steps=0, steps=1, rewards=["tests.trainer_helpers:raising_reward"]))


def test_every_grpo_loss_knob_is_a_flag():
    import dataclasses
    import inspect

    import grpo_kernels
    from grpo_kernels.trainer.config import TrainConfig

    per_batch = {
        "logits",
        "token_ids",
        "advantages",
        "mask",
        "old_logprobs",
        "ref_logprobs",
        "ref_logits",
        "num_items_in_batch",
        "is_weights",
        "cu_seqlens",
        "ignore_index",
        "loss_scale",
        "vocab_parallel_group",
        "vocab_start",
    }  # loss_scale: computed per step; vocab_parallel_group / vocab_start: where the logits are, not loss math
    knobs = set(inspect.signature(grpo_kernels.grpo_loss).parameters) - per_batch
    assert knobs == set(LOSS_KNOBS) | {"return_entropy", "max_completion_length"}  # --entropy, --max-new-tokens
    assert set(LOSS_KNOBS) <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--model",
        "--data",
        "--resume",
        "--loss-type",
        "--beta",
        "--num-iterations",
        "--grad-accum",
        "--mask-truncated",
        "--reward",
        "--importance-sampling-level",
        "--dual-clip",
        "--delta",
        "--reward-model",
        "--ref-sync-every",
        "--ref-mixup-alpha",
        "--lora-r",
        "--lora-target-modules",
    ):
        assert flag in text


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda p: ["--data", str(p / "missing.jsonl")], "missing.jsonl' does not exist"),
        (lambda p: ["--data", str(p / "bad.jsonl")], r"bad.jsonl:2: not valid JSON"),
        (lambda p: ["--eval-data", str(p / "bad.jsonl")], r"bad.jsonl:2: not valid JSON"),
        (lambda p: ["--model", str(p / "no-model")], "is not a directory"),
        (lambda p: ["--resume"], "no checkpoint under"),
        (lambda p: ["--reward", "nope"], "unknown reward 'nope'"),
        (lambda p: ["--batch-prompts", "6", "--grad-accum", "4"], "must be divisible"),
        (lambda p: ["--data", str(p / "ok.jsonl"), "--sft-steps", "3"], "needs a 'completion'"),
        (lambda p: ["--reward", "tests.trainer_helpers:raising_reward", "--sft-steps", "0"], "raised ZeroDivision"),
    ],
)
def test_cli_bad_inputs_exit_with_a_clear_message(tmp_path, capsys, make_args, message):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": oops}\n')
    (tmp_path / "ok.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    assert main(tiny_cli_args(tmp_path / "out") + make_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("grpo-train: error: ") and message in err, err


def test_hf_model_directory_jsonl_data_and_chat_template(tmp_path):
    """--model DIR (a previous run's final/ export, given a chat template) with --data JSONL and a warm-up."""
    train(tiny_config(tmp_path / "first", sft_steps=1, steps=0, eval_size=0))
    model_dir = tmp_path / "first" / "final"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = "{% for m in messages %}({{ m['content'] }}){% endfor %}="
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"{a}+{a}", "answer": 2 * a, "completion": f"<answer>{2 * a}</answer>"} for a in range(10)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    helpers.SEEN_PROMPTS.clear()
    summary = train(
        tiny_config(
            tmp_path / "second",
            model=str(model_dir),
            data=str(data),
            eval_data=str(data),
            sft_steps=1,
            steps=1,
            rewards=["tests.trainer_helpers:recording_reward"],
        )
    )
    assert helpers.SEEN_PROMPTS and all(p.startswith("(") and p.endswith(")=") for p in helpers.SEEN_PROMPTS)
    assert summary["evals"]["after_grpo"]["total"] == 8  # --eval-size 8 of the 10 lines
    records = read_metrics(tmp_path / "second" / "metrics.jsonl")
    assert [r["phase"] for r in records if "phase" in r] == ["sft", "grpo"]


def test_fresh_run_refuses_a_used_output_dir(tmp_path):
    train(tiny_config(tmp_path, sft_steps=1, steps=0, eval_size=0, save_every=1))
    with pytest.raises(ValueError, match=r"holds a previous run \(checkpoints, metrics.jsonl, final\)"):
        train(tiny_config(tmp_path, sft_steps=1, steps=0, eval_size=0))
    train(tiny_config(tmp_path, sft_steps=2, steps=0, eval_size=0, save_every=0, overwrite=True))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000002"]


@pytest.mark.slow
def test_default_run_raises_heldout_accuracy(tmp_path):
    """The README's main command, `grpo-train` with no arguments (minutes on a CPU): GRPO must beat the warm-up."""
    from grpo_kernels.trainer.config import TrainConfig

    evals = train(TrainConfig(output_dir=str(tmp_path), progress=False))["evals"]
    before, after = evals["before_grpo"], evals["after_grpo"]
    assert before["total"] == after["total"] == 256
    assert after["accuracy"] >= before["accuracy"] + 0.1, (before, after)
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "final" / "config.json").exists()
