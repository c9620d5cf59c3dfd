"""LoRA (--lora-r): only the adapters train, the reference is the base with adapters disabled, checkpoints hold the
adapters, final/ loads with peft, the loss and its gradient against reference.py, bad targets."""

import copy

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from grpo_kernels import reference
from grpo_kernels.trainer.checkpoint import list_checkpoints
from grpo_kernels.trainer.cli import main
from grpo_kernels.trainer.loop import Trainer, train
from grpo_kernels.trainer.model import position_ids
from tests.trainer_helpers import tiny_cli_args, tiny_config

LORA = dict(lora_r=4, lora_alpha=8.0, lora_dropout=0.0, lora_target_modules="q_proj,v_proj,down_proj,lm_head")


def _logits(model, rollout):
    c = rollout.completion_ids.shape[1]
    with torch.no_grad():
        out = model(
            input_ids=rollout.input_ids,
            attention_mask=rollout.attention_mask,
            position_ids=position_ids(rollout.attention_mask),
            use_cache=False,
        ).logits
    return out[:, -(c + 1) : -1]


@pytest.mark.parametrize(
    "options", [{}, dict(inplace_backward=True, grad_in_forward=True)], ids=["logits", "inplace-grad-in-forward"]
)
def test_lora_step_trains_only_adapters_against_reference(tmp_path, options):
    """grpo_loss on the logits of the wrapped model (LoRA on the LM head too): the adapters' gradient equals
    reference.grpo_loss's in float64; the base gets none; the reference log-probs are the base model's."""
    trainer = Trainer(tiny_config(tmp_path, sft_steps=0, beta=0.1, loss_type="grpo", grad_accum=1, **LORA, **options))
    base = copy.deepcopy(trainer.model)
    trainer._begin_grpo()
    # A non-zero B: a fresh adapter is the identity, and would hide a reference computed with the adapters on.
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any("lm_head.lora_A" in n for n in trainable)
    assert len(trainer.optimizer.param_groups[0]["params"]) == len(trainable)

    (batch,) = trainer.rollout_step_batches()
    expected_ref, _ = reference.token_logprobs(_logits(base, batch.rollout).double(), batch.rollout.completion_ids)
    mask = batch.rollout.completion_mask.bool()
    torch.testing.assert_close(batch.ref_logprobs.double()[mask], expected_ref[mask], rtol=0, atol=1e-5)
    policy_lp, _ = reference.token_logprobs(
        _logits(trainer.model, batch.rollout).double(), batch.rollout.completion_ids
    )
    assert (policy_lp - expected_ref)[mask].abs().max() > 1e-3  # the adapters change the policy

    num_items = float(batch.rollout.completion_mask.sum())
    ours = trainer.policy_loss(batch, num_items).loss
    ours.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(p.grad is None for p in trainer.model.parameters() if not p.requires_grad)
    trainer.model.zero_grad(set_to_none=True)
    logits = trainer._completion_logits(trainer.model, batch.rollout).double()
    expected = reference.grpo_loss(
        logits,
        batch.rollout.completion_ids,
        batch.advantages.double(),
        mask=batch.rollout.completion_mask,
        ref_logprobs=batch.ref_logprobs,
        beta=0.1,
        loss_type="grpo",
    ).loss
    expected.backward()
    assert float(ours) == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            scale = float(p.grad.abs().max())
            torch.testing.assert_close(grads[name], p.grad.float(), rtol=1e-4, atol=1e-6 * scale + 1e-10)


def test_adapter_dropout_only_in_the_loss_forward(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, sft_steps=0, **{**LORA, "lora_dropout": 0.5}))
    trainer._begin_grpo()
    (batch,) = trainer.rollout_step_batches()
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    a, b = (trainer.policy_loss(batch, 1.0).logprobs.detach() for _ in range(2))
    assert not torch.equal(a, b)  # dropout masks differ between two forward passes
    c, d = (trainer._logprobs(trainer.model, batch.rollout) for _ in range(2))
    assert torch.equal(c, d)  # sampling-side log-probs: no dropout
    assert not any(m.training for m in trainer.model.modules())


def test_final_model_loads_with_peft(tmp_path):
    """Built-in model + warm-up: final/ holds the adapters and final/base the base; PeftModel reproduces the policy."""
    out = tmp_path / "run"
    train(tiny_config(out, sft_steps=1, steps=2, save_every=1, keep_checkpoints=5, **LORA))
    base = AutoModelForCausalLM.from_pretrained(out / "final" / "base")
    model = PeftModel.from_pretrained(base, out / "final").eval()
    resumed = Trainer(tiny_config(out, resume="latest", sft_steps=1, steps=2, **LORA))  # the last checkpoint
    ids = torch.tensor([[7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, resumed.model(input_ids=ids).logits, rtol=0, atol=0)
    # warm-up checkpoint: the full model; GRPO checkpoints with a base from this run: the whole wrapped model
    files = [sorted(p.name for p in d.glob("*.safetensors")) for d in list_checkpoints(out / "checkpoints")]
    assert files == [["model.safetensors", "optimizer.safetensors", "rng.safetensors"]] * 3


def test_lora_on_a_model_directory_saves_only_adapters(tmp_path):
    train(tiny_config(tmp_path / "first", sft_steps=1, steps=0, eval_size=0))
    model_dir = tmp_path / "first" / "final"
    out = tmp_path / "run"
    train(tiny_config(out, model=str(model_dir), sft_steps=0, steps=1, eval_size=0, **LORA))
    (checkpoint,) = list_checkpoints(out / "checkpoints")
    adapters = load_file(str(checkpoint / "adapter.safetensors"))
    assert not (checkpoint / "model.safetensors").exists() and not (out / "final" / "base").exists()
    assert adapters and all(".lora_" in k for k in adapters)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "final")
    trained = {k: v for k, v in model.named_parameters() if ".lora_" in k}
    assert trained.keys() == adapters.keys() and all(torch.equal(trained[k], adapters[k]) for k in adapters)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lora-r", "4", "--lora-target-modules", "q_proj,nope"], "'nope' matches no module of the model"),
        (["--lora-r", "4", "--lora-target-modules", "input_layernorm"], "is a LlamaRMSNorm, which LoRA does not"),
        (["--lora-target-modules", "q_proj"], "--lora-target-modules needs --lora-r > 0"),
        (["--lora-r", "-1"], "--lora-r must be >= 0"),
        (["--lora-r", "4", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
        (["--lora-r", "4", "--lora-alpha", "0"], "--lora-alpha must be > 0"),
        (["--lora-r", "4", "--beta", "0.1", "--ref-sync-every", "2"], "--ref-sync-every cannot be used with --lora-r"),
    ],
    ids=["no-match", "unsupported", "no-rank", "rank", "dropout", "alpha", "ref-sync"],
)
def test_bad_lora_settings_are_clear_errors(tmp_path, capsys, args, message):
    assert main(tiny_cli_args(tmp_path / "out", sft_steps=0, steps=1) + args) == 2
    err = capsys.readouterr().err
    assert "grpo-train: error: " in err and message in err, err
    assert not (tmp_path / "out").exists()  # refused before anything ran
