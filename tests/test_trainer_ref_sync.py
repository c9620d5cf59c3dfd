"""The reference policy: --ref-sync-every N / --ref-mixup-alpha (TRL's sync_ref_model), beta = 0 keeps none."""

import pytest
import torch
from safetensors.torch import load_file

import tests.trainer_helpers as helpers
from grpo_kernels.trainer.cli import main
from grpo_kernels.trainer.loop import Trainer, train
from grpo_kernels.trainer.metrics import TIMING_KEYS, read_metrics
from tests.trainer_helpers import tiny_cli_args, tiny_config


def _params(model):
    return [p.detach().double().clone() for p in model.parameters()]


def _grpo_steps(trainer, count):
    """Run ``count`` GRPO steps as Trainer.run does; yields (policy after, ref before, ref after, record)."""
    trainer._begin_grpo()
    for _ in range(count):
        ref_before = _params(trainer.ref_model)
        record = trainer.grpo_step()
        trainer.step += 1
        yield _params(trainer.model), ref_before, _params(trainer.ref_model), record


def test_sync_mixes_the_policy_into_the_reference_every_n_steps(tmp_path):
    alpha = 0.3
    trainer = Trainer(tiny_config(tmp_path, sft_steps=0, beta=0.1, ref_sync_every=2, ref_mixup_alpha=alpha))
    for k, (policy, ref_before, ref_after, record) in enumerate(_grpo_steps(trainer, 4), start=1):
        synced = k % 2 == 0
        assert record["ref_syncs"] == int(synced)
        for p, before, after in zip(policy, ref_before, ref_after, strict=True):
            if synced:  # ref <- alpha * policy + (1 - alpha) * ref, in float32
                expected = alpha * p + (1 - alpha) * before
                torch.testing.assert_close(
                    after, expected, rtol=0, atol=4 * torch.finfo(torch.float32).eps * (1 + expected.abs().max())
                )
            else:
                assert torch.equal(after, before)
        if k == 1:
            assert any(not torch.equal(p, r) for p, r in zip(policy, ref_after, strict=True))  # the policy moved


def test_alpha_one_makes_the_reference_the_policy(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, sft_steps=0, beta=0.1, ref_sync_every=1, ref_mixup_alpha=1.0))
    for policy, _, ref_after, _ in _grpo_steps(trainer, 2):
        assert all(torch.equal(p, r) for p, r in zip(policy, ref_after, strict=True))


def test_sync_counts_optimizer_steps_as_trl(tmp_path):
    """With --num-iterations 2 a GRPO step holds two optimizer steps: every 3 of them is after steps 2, 3, 5, 6."""
    trainer = Trainer(tiny_config(tmp_path, sft_steps=0, beta=0.1, num_iterations=2, ref_sync_every=3))
    syncs = [record["ref_syncs"] for *_, record in _grpo_steps(trainer, 3)]
    assert syncs == [0, 1, 1]  # optimizer steps (1, 2), (3, 4), (5, 6)


def test_resume_after_interrupt_with_ref_sync_is_exact(tmp_path, monkeypatch):
    """The synced reference is in the checkpoint (ref_model.safetensors) and the sync schedule follows the step: a
    run interrupted in step 5 (checkpoint 3) and resumed equals the straight one. (SIGKILL: test_trainer_crash.py,
    -m slow.)"""
    common = dict(
        sft_steps=2,
        steps=4,
        save_every=3,
        beta=0.05,
        ref_sync_every=2,
        ref_mixup_alpha=0.5,
        rewards=["tests.trainer_helpers:interrupting_reward"],
    )
    helpers.reset_calls()
    train(tiny_config(tmp_path / "a", **common))
    helpers.reset_calls()
    monkeypatch.setenv("GRPO_TEST_INTERRUPT_AT", "3")
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "b", **common))
    monkeypatch.delenv("GRPO_TEST_INTERRUPT_AT")
    train(tiny_config(tmp_path / "b", resume="latest", **common))
    a, b = (
        [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(d / "metrics.jsonl")]
        for d in (tmp_path / "a", tmp_path / "b")
    )
    assert a == b and [r.get("ref_syncs") for r in a if r.get("phase") == "grpo"] == [0, 1, 0, 1]
    wa, wb = (load_file(str(d / "final" / "model.safetensors")) for d in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_no_reference_without_beta(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, sft_steps=0, beta=0.0))
    trainer._begin_grpo()
    (batch,) = trainer.rollout_step_batches()
    assert trainer.ref_model is None and batch.ref_logprobs is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--beta", "0.1", "--ref-sync-every", "1", "--ref-mixup-alpha", "1.5"], "--ref-mixup-alpha must be in [0, 1]"),
        (["--beta", "0.1", "--ref-sync-every", "1", "--ref-mixup-alpha", "-0.1"], "--ref-mixup-alpha must be in"),
        (["--beta", "0.1", "--ref-sync-every", "-1"], "--ref-sync-every must be >= 0"),
        (["--beta", "0", "--ref-sync-every", "4"], "--ref-sync-every needs --beta > 0"),
    ],
    ids=["alpha-high", "alpha-low", "negative", "no-beta"],
)
def test_bad_ref_sync_settings_are_clear_errors(tmp_path, capsys, args, message):
    assert main(tiny_cli_args(tmp_path / "out") + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("grpo-train: error: ") and message in err, err
