"""The TRL drop-in against stock ``trl.GRPOTrainer`` (1.16) on the model families beyond a dense text LM.

- Mixture-of-experts causal LMs (Qwen3-MoE, Mixtral, GPT-OSS), whose router load-balancing loss TRL adds to the
  training loss (``router_aux_loss_coef``, the ``aux_loss`` metric).
- TRL's own argument checks come first: what stock TRL refuses fails with TRL's exception and message.

Tiny models built from configs in code (no download); the helpers and tolerances are those of
``test_integration_trl.py``: loss, every parameter gradient and every logged metric equal stock TRL's on the same
batch, on both of our paths, in training mode with 2 accumulation steps unless a case says otherwise.
"""

from __future__ import annotations

import pytest
import torch
from test_integration_trl import (
    LOSS_TYPES,
    PATHS,
    USE_CPU,
    assert_same,
    loss_grads_metrics,
    make_inputs,
    make_tokenizer,
    make_trainer,
    needs_trl,
    reward_len_e,
    select,
)

MOE_FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss")


def moe_model(family, vocab_size):
    """A 2-layer MoE causal LM, 4 experts, top-2 routing, random weights; the config's own router_aux_loss_coef."""
    import transformers

    config_class, model_class, extra = {
        "qwen3_moe": (
            transformers.Qwen3MoeConfig,
            transformers.Qwen3MoeForCausalLM,
            dict(moe_intermediate_size=16, num_experts=4),
        ),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(num_local_experts=4)),
        "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM, dict(num_local_experts=4)),
    }[family]
    torch.manual_seed(5)
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        **extra,
    )
    return model_class(config)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, tokenizer):
    """family -> a saved tiny MoE model (each trainer and TRL's reference model load it)."""
    dirs = {}
    for family in MOE_FAMILIES:
        path = tmp_path_factory.mktemp(family)
        moe_model(family, len(tokenizer)).save_pretrained(path)
        dirs[family] = str(path)
    return dirs


@pytest.fixture(scope="module")
def moe_inputs(moe_dirs, tokenizer, tmp_path_factory):
    """family -> the prepared batch of test_integration_trl, with old / ref log-probs near that model's."""
    return {f: make_inputs(d, tokenizer, tmp_path_factory.mktemp(f"out-{f}")) for f, d in moe_dirs.items()}


def moe_parity(moe_dirs, moe_inputs, tokenizer, tmp_path, family, path, eval_mode=False, keep=(), **config):
    from trl import GRPOTrainer as StockTrainer

    from grpo_kernels.integrations.trl import GRPOTrainer

    trainers = [
        make_trainer(GRPOTrainer, moe_dirs[family], tokenizer, tmp_path, path, **config),
        make_trainer(StockTrainer, moe_dirs[family], tokenizer, tmp_path, **config),
    ]
    for trainer in trainers:
        assert trainer.aux_loss_enabled
        if eval_mode:
            trainer.model.eval()
    ours, stock = (loss_grads_metrics(t, select(moe_inputs[family], keep)) for t in trainers)
    assert_same(ours, stock)
    return ours, stock


# ----------------------------------------------------------------------------------------------------------------
# the router auxiliary loss
# ----------------------------------------------------------------------------------------------------------------
@needs_trl
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_router_aux_loss_matches_trl(moe_dirs, moe_inputs, tokenizer, tmp_path, family, path):
    """The config's own coefficient (TRL's default router_aux_loss_coef=None reads it): loss, every gradient (the
    routers' included) and every metric, aux_loss among them, equal TRL's; and the auxiliary term is really there:
    the loss differs from the one without it by exactly coef * aux / accumulation steps."""
    from grpo_kernels.integrations.trl import GRPOTrainer

    config = dict(loss_type="dapo", beta=0.04)
    (loss, grads, metrics), _ = moe_parity(moe_dirs, moe_inputs, tokenizer, tmp_path, family, path, **config)
    assert metrics["aux_loss"] > 0
    assert any("router" in name or "gate" in name for name in grads)
    without = make_trainer(GRPOTrainer, moe_dirs[family], tokenizer, tmp_path, path, router_aux_loss_coef=0.0, **config)
    assert not without.aux_loss_enabled
    loss_without, _, metrics_without = loss_grads_metrics(without, select(moe_inputs[family]))
    assert "aux_loss" not in metrics_without
    coef = without.model.config.router_aux_loss_coef
    torch.testing.assert_close(loss - loss_without, torch.tensor(coef * metrics["aux_loss"] / 2), rtol=1e-4, atol=0)


@needs_trl
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "case, config",
    [
        ("grpo-coef", dict(loss_type="grpo", router_aux_loss_coef=0.5)),
        ("vespo-sequence", dict(loss_type="vespo", router_aux_loss_coef=0.5, importance_sampling_level="sequence")),
        ("accumulation-3-bonus", dict(loss_type="bnpo", gradient_accumulation_steps=3, entropy_coef=0.05)),
        ("eval", dict(loss_type="dapo", router_aux_loss_coef=0.5, eval_mode=True)),
        ("tool-mask", dict(loss_type="cispo", epsilon_high=1.2, router_aux_loss_coef=0.5, keep=("tool_mask",))),
    ],
)
def test_moe_router_aux_loss_settings_match_trl(moe_dirs, moe_inputs, tokenizer, tmp_path, case, config, path):
    """A coefficient set in GRPOConfig, other loss types, 3 accumulation steps with the entropy bonus, eval mode (no
    division by the accumulation steps) and a tool mask (the aux loss counts every attended token), on Qwen3-MoE."""
    moe_parity(moe_dirs, moe_inputs, tokenizer, tmp_path, "qwen3_moe", path, **config)


@needs_trl
def test_moe_fused_linear_runs_the_backbone_once(moe_dirs, moe_inputs, tokenizer, tmp_path):
    """On the fused-linear path the router logits come from the one backbone run inside the fused forward: every
    MoE block runs once per loss call, and the LM head module never."""
    from grpo_kernels.integrations.trl import GRPOTrainer

    trainer = make_trainer(GRPOTrainer, moe_dirs["qwen3_moe"], tokenizer, tmp_path, "fused_linear")
    calls = []
    blocks = [m for m in trainer.model.modules() if type(m).__name__.endswith("SparseMoeBlock")]
    assert len(blocks) == 2
    handles = [b.register_forward_hook(lambda *a: calls.append("moe")) for b in blocks]
    handles.append(trainer.model.get_output_embeddings().register_forward_hook(lambda *a: calls.append("head")))
    _, _, metrics = loss_grads_metrics(trainer, select(moe_inputs["qwen3_moe"]))
    for handle in handles:
        handle.remove()
    assert calls == ["moe", "moe"] and metrics["aux_loss"] > 0


# ----------------------------------------------------------------------------------------------------------------
# the existing parity matrix (loss types x IS levels x beta) on an MoE model
# ----------------------------------------------------------------------------------------------------------------
@needs_trl
@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_moe_matrix_matches_trl(moe_dirs, moe_inputs, tokenizer, tmp_path, loss_type, level, beta, path):
    config = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta, router_aux_loss_coef=0.1)
    config["epsilon_high"] = 1.2 if loss_type == "cispo" else 0.28
    moe_parity(moe_dirs, moe_inputs, tokenizer, tmp_path, "qwen3_moe", path, **config)


# ----------------------------------------------------------------------------------------------------------------
# real training
# ----------------------------------------------------------------------------------------------------------------
@needs_trl
@pytest.mark.parametrize("path", PATHS)
def test_moe_one_optimizer_step_matches_trl(moe_dirs, tokenizer, tmp_path, path):
    """trainer.train() on Qwen3-MoE: generation, rewards, 2 accumulated micro-batches with the router auxiliary loss,
    one SGD step: the same update and the same logged aux_loss as stock TRL."""
    from trl import GRPOTrainer as StockTrainer

    from grpo_kernels.integrations.trl import GRPOTrainer

    deltas, logs = [], []
    for cls, loss_path in ((GRPOTrainer, path), (StockTrainer, None)):
        trainer = make_trainer(
            cls,
            moe_dirs["qwen3_moe"],
            tokenizer,
            tmp_path,
            loss_path,
            max_steps=1,
            learning_rate=0.1,
            optim="sgd",
            loss_type="grpo",
            router_aux_loss_coef=0.5,
        )
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        deltas.append({n: (p.detach() - before[n], before[n].abs().max()) for n, p in trainer.model.named_parameters()})
        logs.append(trainer.state.log_history[0])
    ours, stock = deltas
    for name, (d_ref, size) in stock.items():
        err = (ours[name][0] - d_ref).abs().max().item()
        floor = 2 * torch.finfo(torch.float32).eps * size.item()
        assert err <= 1e-5 * d_ref.abs().max().item() + floor, f"{name}: max |diff| {err:.3e}"
    assert logs[0].keys() == logs[1].keys() and "aux_loss" in logs[1]
    for key in ("loss", "reward", "entropy", "aux_loss"):
        assert logs[0][key] == pytest.approx(logs[1][key], rel=1e-4, abs=1e-6), key


# ----------------------------------------------------------------------------------------------------------------
# TRL's own checks come first
# ----------------------------------------------------------------------------------------------------------------
def stock_error(build):
    """The (type, message) stock TRL raises for ``build(trl.GRPOTrainer)``."""
    with pytest.raises(Exception) as info:
        build(__import__("trl").GRPOTrainer)
    return type(info.value), str(info.value)


@needs_trl
@pytest.mark.parametrize(
    "case",
    ["aux_coef_on_dense_model", "liger_fused_linear_cross_entropy", "sync_ref_model_without_beta", "reward_weights"],
)
def test_what_trl_refuses_fails_with_trls_error(tmp_path, case):
    """Settings stock TRL 1.16 refuses in its constructor: the drop-in raises the same exception type with the same
    message (its own checks, e.g. on use_liger_kernel, run only after TRL's). Each also sets one of the drop-in's
    own refusals or a bad loss_path, which must not win."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpo_kernels.integrations.trl import GRPOTrainer

    tokenizer = make_tokenizer()
    config = {
        "aux_coef_on_dense_model": dict(router_aux_loss_coef=0.1, use_liger_kernel=True),
        "liger_fused_linear_cross_entropy": dict(
            use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": True}
        ),
        "sync_ref_model_without_beta": dict(sync_ref_model=True, beta=0.0, use_liger_kernel=True),
        "reward_weights": dict(reward_weights=[1.0, 2.0], loss_type="not_a_loss"),
    }[case]

    def build(cls, **extra):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=len(tokenizer),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
            )
        )
        return make_trainer(cls, model, tokenizer, tmp_path, **config, **extra)

    error_type, message = stock_error(build)
    with pytest.raises(error_type) as info:
        build(GRPOTrainer, loss_path="chunked")
    assert str(info.value) == message


@needs_trl
def test_peft_adapter_on_lm_head_fails_with_trls_error(tmp_path):
    """TRL 1.16 refuses a PEFT adapter on lm_head (its log-probs read lm_head.weight); so does the drop-in, with TRL's
    exception, before its own use_liger_kernel refusal."""
    from peft import LoraConfig
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpo_kernels.integrations.trl import GRPOTrainer

    tokenizer = make_tokenizer()
    errors = []
    for cls in (__import__("trl").GRPOTrainer, GRPOTrainer):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=len(tokenizer),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
            )
        )
        with pytest.raises(Exception) as info:
            cls(
                model=model,
                reward_funcs=reward_len_e,
                args=__import__("trl").GRPOConfig(
                    output_dir=str(tmp_path), use_cpu=USE_CPU, report_to=[], use_liger_kernel=True
                ),
                train_dataset=__import__("datasets").Dataset.from_dict({"prompt": ["ab", "cd"]}),
                processing_class=tokenizer,
                peft_config=LoraConfig(r=2, target_modules=["q_proj", "lm_head"]),
            )
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1] and "lm_head" in errors[0][1]
