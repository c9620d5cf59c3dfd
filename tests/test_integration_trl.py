"""The TRL drop-in against stock ``trl.GRPOTrainer`` (1.16) on identical inputs, with a tiny random model.

Both trainers load the same 2-layer Qwen2 (built from a config, saved to a temp dir: no download) with a tokenizer
built in code, and run ``_compute_loss`` + backward on the same prepared inputs. Loss, every parameter's gradient
and every logged metric must agree to float32 rounding: the two compute the same function by different routes
(TRL: chunked LM head + online log-sum-exp; ours: hidden states + LM head through the fused-linear op, or the model's
logits + the fused op), so they differ only in summation order. The parity tests run on both of our paths. Tests
that need TRL skip with the reason when it is not installed; CI installs trl==1.16.0.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

import pytest
import torch

HAS_TRL = importlib.util.find_spec("trl") is not None
needs_trl = pytest.mark.skipif(
    not HAS_TRL, reason='TRL is not installed (pip install "grpo-kernels[trl]"); CI installs trl==1.16.0'
)

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?"
B, P, C = 4, 5, 7  # sequences, prompt width, completion width of the prepared inputs
GRAD_RTOL = 1e-5  # max |g_ours - g_trl| <= GRAD_RTOL * max |g_trl| per parameter (observed ~1e-6)
USE_CPU = not torch.cuda.is_available()
PATHS = ("fused_linear", "logits")  # our two loss paths, each forced (a silent fallback would fail the test)


# ----------------------------------------------------------------------------------------------------------------
# tiny model, tokenizer, trainers, inputs
# ----------------------------------------------------------------------------------------------------------------
def make_tokenizer():
    """A character-level tokenizer built in code: <pad>=0, <eos>=1, <unk>=2, then one id per character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *CHARS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def save_tiny_qwen2(path, vocab_size, tie_word_embeddings=False):
    """A 2-layer Qwen2 with random weights (seed 0), saved to ``path``: the model of the drop-in's parity tests."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        eos_token_id=1,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """The tiny Qwen2, saved once: each trainer (and TRL's reference model) loads it."""
    return str(save_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), len(tokenizer)))


def reward_len_e(completions, **kwargs):
    """Distinct characters plus the count of 'e': varies across random completions, so advantages are not 0."""
    return [float(len(set(c)) + c.count("e")) for c in completions]


def make_trainer(cls, model_dir, tokenizer, output_dir, loss_path=None, **config):
    """``cls`` (ours or stock) on ``model_dir`` (a path or a model); ``loss_path`` only for ours (None: default)."""
    from datasets import Dataset
    from trl import GRPOConfig

    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=B,
        num_generations=2,
        max_completion_length=C,
        gradient_accumulation_steps=2,
        steps_per_generation=4,
        bf16=False,
        use_cpu=USE_CPU,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    args = GRPOConfig(**{**defaults, **config})
    dataset = Dataset.from_dict({"prompt": ["hello", "the sky", "abc", "one two", "why", "a, b", "go!", "it is"]})
    extra = {} if loss_path is None else dict(loss_path=loss_path)
    trainer = cls(
        model=model_dir,
        reward_funcs=reward_len_e,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        **extra,
    )
    if loss_path is not None:
        assert trainer.loss_path == loss_path
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # set by Trainer's training loop
    trainer.model.train()
    return trainer


@pytest.fixture(scope="module")
def inputs(model_dir, tokenizer, tmp_path_factory):
    return make_inputs(model_dir, tokenizer, tmp_path_factory.mktemp("out"))


def make_inputs(model_dir, tokenizer, output_dir, forward_inputs=None):
    """A prepared batch in the layout TRL's ``_generate_and_score_completions`` returns: left-padded prompts,
    right-padded completions of ragged length (one empty), old/ref log-probs near the model's, so that ratios
    straddle the clip range. ``forward_inputs(trainer, batch)``: more keys (image inputs) the model needs; they are
    added before the log-probs are computed, and to the batch."""
    from trl import GRPOTrainer as StockTrainer

    trainer = make_trainer(StockTrainer, model_dir, tokenizer, output_dir)
    device = trainer.accelerator.device
    g = torch.Generator().manual_seed(1)
    vocab = len(tokenizer)
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    completion_ids = torch.randint(3, vocab, (B, C), generator=g)
    completion_mask = torch.ones(B, C, dtype=torch.long)
    for b, length in enumerate([C, 3, 5, 0]):
        prompt_mask[b, : b % 3], prompt_ids[b, : b % 3] = 0, 0
        completion_mask[b, length:], completion_ids[b, length:] = 0, 0
    batch = dict(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        advantages=torch.rand(B, generator=g) * torch.tensor([1.0, -1.0, -1.0, 1.0]),
        num_items_in_batch=completion_mask.sum() * 2,  # the generation batch spans 2 micro-batches
    )
    batch = {k: v.to(device) for k, v in batch.items()}
    if forward_inputs is not None:
        batch.update(forward_inputs(trainer, batch))
    with torch.no_grad():
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        extra = {k: v for k, v in batch.items() if k in IMAGE_INPUT_KEYS}
        lp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, C, **extra)

    def noise(scale):
        return scale * torch.randn(B, C, generator=g).to(device)

    # Rows 0 (A > 0) and 2 (A < 0) drift against their advantage's sign, so that whole sequences clip too
    # (sequence-level ratio), and row 2 is off-policy enough for off_policy_mask_threshold to drop it.
    drift = torch.tensor([0.4, 0.0, 0.4, 0.0], device=device).unsqueeze(1) * batch["advantages"].sign().unsqueeze(1)
    batch["old_per_token_logps"] = lp + noise(0.3) - drift
    batch["ref_per_token_logps"] = lp + noise(0.3)
    batch["sampling_per_token_logps"] = batch["old_per_token_logps"] + noise(0.2)
    batch["importance_sampling_ratio"] = 0.5 + torch.rand(B, C, generator=g).to(device)
    tool_mask = torch.ones(B, C, dtype=torch.long)
    tool_mask[0, 2:4], tool_mask[2, 1] = 0, 0
    batch["tool_mask"] = tool_mask.to(device)
    return batch


def loss_grads_metrics(trainer, inputs):
    trainer.model.zero_grad()
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode].clear()
    loss = trainer._compute_loss(trainer.model, dict(inputs))
    if loss.requires_grad:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {k: v[-1] for k, v in trainer._metrics[mode].items()}


def assert_same(ours, stock):
    (loss, grads, metrics), (loss_ref, grads_ref, metrics_ref) = ours, stock
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name, g_ref in grads_ref.items():
        # a gradient stored in bf16 (a bf16 model) is rounded once more: one ulp of that dtype at most
        rtol = max(GRAD_RTOL, torch.finfo(g_ref.dtype).eps)
        err = (grads[name].double() - g_ref.double()).abs().max().item()
        assert err <= rtol * g_ref.abs().max().item() + 1e-12, f"{name}: max |diff| {err:.3e}"
    assert metrics.keys() == metrics_ref.keys()
    for key, value in metrics_ref.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


OPTIONAL_KEYS = ("sampling_per_token_logps", "importance_sampling_ratio", "tool_mask")
IMAGE_INPUT_KEYS = ("pixel_values", "image_grid_thw", "num_images", "mm_token_type_ids", "token_type_ids")


def select(inputs, keep=(), drop=()):
    """The prepared batch without the optional keys (vLLM / tools) a case does not ask for."""
    return {k: v for k, v in inputs.items() if (k not in OPTIONAL_KEYS or k in keep) and k not in drop}


def _vllm_correction(trainer):
    # What TRL's vLLM generation path sets; the ratio itself comes in the inputs (no vLLM is started here).
    trainer.use_vllm = True
    trainer.vllm_importance_sampling_correction = True


# ----------------------------------------------------------------------------------------------------------------
# parity with stock TRL
# ----------------------------------------------------------------------------------------------------------------
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


@pytest.fixture(scope="module")
def stock_results():
    """Stock TRL's (loss, grads, metrics) per configuration, computed once for both of our paths."""
    return {}


@needs_trl
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_trl(model_dir, tokenizer, tmp_path, inputs, stock_results, loss_type, level, beta, path):
    from trl import GRPOTrainer as StockTrainer

    from grpo_kernels.integrations.trl import GRPOTrainer

    config = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta)
    config["epsilon_high"] = 1.2 if loss_type == "cispo" else 0.28  # cispo's cap is the ratio itself
    key = (loss_type, level, beta)
    if key not in stock_results:
        stock_results[key] = loss_grads_metrics(
            make_trainer(StockTrainer, model_dir, tokenizer, tmp_path, **config), select(inputs)
        )
    stock = stock_results[key]
    ours = loss_grads_metrics(make_trainer(GRPOTrainer, model_dir, tokenizer, tmp_path, path, **config), select(inputs))
    assert_same(ours, stock)
    assert any(g.abs().max() > 0 for g in stock[1].values())
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):  # the inputs do exercise the clip branches
        assert stock[2]["clip_ratio/region_mean"] > 0
    if loss_type == "vespo":  # gamma weights away from 0 and from 1
        assert 0.05 < stock[2]["vespo/phi_seq_mean"] < 0.95


# name -> GRPOConfig overrides, plus: "keep" / "drop" (optional input keys), "setup" (trainer attributes that TRL's
# vLLM path would set), "per_sequence_is_ratio", "is_ratio_like_trl" (the vLLM ratio 1 where the loss mask is 0, as
# TRL's generation computes it), "eval", "steps" (calls in a row), "paths" (default: both).
KNOBS = {
    "delta": dict(config=dict(loss_type="grpo", delta=1.5, epsilon_high=0.28)),
    # delta below 1 + epsilon_high: TRL's clip metrics see min(rho, delta)
    "delta_below_1_plus_epsilon": dict(config=dict(loss_type="dapo", delta=1.1)),
    "no_bias_correction_kl": dict(config=dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=False)),
    "sapo_temperatures": dict(
        config=dict(loss_type="sapo", beta=0.04, sapo_temperature_pos=0.5, sapo_temperature_neg=2.0)
    ),
    "temperature": dict(config=dict(loss_type="dapo", beta=0.04, temperature=0.7)),
    "entropy_quantile_and_bonus": dict(config=dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.05)),
    "adaptive_entropy": dict(
        config=dict(loss_type="grpo", use_adaptive_entropy=True, entropy_coef=0.1, entropy_target=10.0), steps=3
    ),
    "off_policy_mask": dict(config=dict(loss_type="dapo", off_policy_mask_threshold=0.02)),
    "off_policy_mask_sampling": dict(
        config=dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, off_policy_mask_threshold=0.02),
        keep=("sampling_per_token_logps",),
    ),
    "vllm_is_ratio_token": dict(
        config=dict(loss_type="dapo", beta=0.04), setup=_vllm_correction, keep=("importance_sampling_ratio",)
    ),
    "vllm_is_ratio_sequence": dict(
        config=dict(loss_type="grpo", beta=0.04, top_entropy_quantile=0.3),
        setup=_vllm_correction,
        keep=("importance_sampling_ratio",),
        per_sequence_is_ratio=True,
    ),
    "tool_mask": dict(config=dict(loss_type="bnpo", beta=0.04), keep=("tool_mask",)),
    # float32-exact knob values (TRL builds its (k, lambda) tensor in float32)
    "vespo_knobs": dict(
        config=dict(
            loss_type="vespo", beta=0.04, vespo_k_pos=1.5, vespo_lambda_pos=0.75, vespo_k_neg=4.0, vespo_lambda_neg=5.0
        )
    ),
    "vespo_vllm_is_ratio": dict(
        config=dict(loss_type="vespo", beta=0.04),
        setup=_vllm_correction,
        keep=("importance_sampling_ratio",),
        is_ratio_like_trl=True,
    ),
    # the vLLM ratio inside phi, the masks on the advantages, a tool mask, the entropy bonus, bias-corrected KL
    "vespo_masks_vllm_tools": dict(
        config=dict(
            loss_type="vespo", beta=0.04, off_policy_mask_threshold=0.02, top_entropy_quantile=0.5, entropy_coef=0.05
        ),
        setup=_vllm_correction,
        keep=("importance_sampling_ratio", "tool_mask", "sampling_per_token_logps"),
        is_ratio_like_trl=True,
    ),
    # TRL clamps the decay rates to 1e-4 (get_gamma_weights); so does the drop-in
    "vespo_lambda_clamped": dict(config=dict(loss_type="vespo", vespo_lambda_pos=0.0, vespo_lambda_neg=-1.0)),
    "vespo_on_policy_sequence": dict(
        config=dict(loss_type="vespo", importance_sampling_level="sequence", beta=0.04), drop=("old_per_token_logps",)
    ),
    "vespo_eval_accumulation_3": dict(config=dict(loss_type="vespo", gradient_accumulation_steps=3), eval=True),
    "entropy_bonus_accumulation_3": dict(
        config=dict(loss_type="dapo", beta=0.04, entropy_coef=0.05, gradient_accumulation_steps=3)
    ),
    "entropy_bonus_grpo": dict(config=dict(loss_type="grpo", top_entropy_quantile=0.7, entropy_coef=0.05)),
    "on_policy": dict(config=dict(loss_type="grpo", beta=0.04), drop=("old_per_token_logps",)),
    "on_policy_sequence_cispo": dict(
        config=dict(loss_type="cispo", importance_sampling_level="sequence"), drop=("old_per_token_logps",)
    ),
    "eval_mode": dict(config=dict(loss_type="dapo", beta=0.04, entropy_coef=0.01), eval=True),
    # a bf16 model (no autocast) whose LM head TRL casts to float32: float32 logits for both
    "cast_lm_head_to_fp32": dict(
        config=dict(loss_type="dapo", beta=0.04, cast_lm_head_to_fp32=True, model_init_kwargs={"dtype": "bfloat16"})
    ),
    # bf16 autocast with a float32 LM head outside it, as TRL projects (the logits path refuses this combination):
    # the same bf16 backbone, then float32 heads, so float32 rounding again
    "cast_lm_head_to_fp32_bf16_autocast": dict(
        config=dict(loss_type="dapo", beta=0.04, entropy_coef=0.01, cast_lm_head_to_fp32=True, bf16=True),
        paths=("fused_linear",),
    ),
}
KNOB_CASES = [(case, path) for case, spec in KNOBS.items() for path in spec.get("paths", PATHS)]


@needs_trl
@pytest.mark.parametrize("case, path", KNOB_CASES, ids=[f"{case}-{path}" for case, path in KNOB_CASES])
def test_knob_matches_trl(model_dir, tokenizer, tmp_path, inputs, case, path):
    from trl import GRPOTrainer as StockTrainer

    from grpo_kernels.integrations.trl import GRPOTrainer

    spec = KNOBS[case]
    batch = select(inputs, spec.get("keep", ()), spec.get("drop", ()))
    if spec.get("per_sequence_is_ratio"):  # TRL's sequence_* vLLM modes give one ratio per sequence, [B, 1]
        batch["importance_sampling_ratio"] = batch["importance_sampling_ratio"][:, :1]
    if spec.get("is_ratio_like_trl"):  # TRL: exp((old - sampling) * mask) = 1 where the mask is 0
        loss_mask = batch["completion_mask"] * batch.get("tool_mask", 1)
        batch["importance_sampling_ratio"] = torch.where(loss_mask > 0, batch["importance_sampling_ratio"], 1.0)
    trainers = [
        make_trainer(GRPOTrainer, model_dir, tokenizer, tmp_path, path, **spec["config"]),
        make_trainer(StockTrainer, model_dir, tokenizer, tmp_path, **spec["config"]),
    ]
    for trainer in trainers:
        if "setup" in spec:
            spec["setup"](trainer)
        if spec.get("eval"):
            trainer.model.eval()
    for _ in range(spec.get("steps", 1)):  # adaptive entropy: the coefficient moves between calls
        ours, stock = (loss_grads_metrics(t, batch) for t in trainers)
        assert_same(ours, stock)
    assert trainers[0].entropy_coef == trainers[1].entropy_coef


@needs_trl
def test_knobs_change_the_objective(model_dir, tokenizer, tmp_path, inputs):
    """The knob cases above are not vacuous: on these inputs each one changes the loss or the gradient."""
    from grpo_kernels.integrations.trl import GRPOTrainer

    def loss_and_lm_head_grad(config, keep=(), setup=None):
        batch = select(inputs, keep)
        trainer = make_trainer(GRPOTrainer, model_dir, tokenizer, tmp_path, **config)
        if setup is not None:
            setup(trainer)
        loss, grads, _ = loss_grads_metrics(trainer, batch)
        return loss, grads["lm_head.weight"]

    base = loss_and_lm_head_grad(dict(loss_type="dapo"))
    variants = [
        loss_and_lm_head_grad(dict(loss_type="dapo", top_entropy_quantile=0.5)),
        loss_and_lm_head_grad(dict(loss_type="dapo", off_policy_mask_threshold=0.02)),
        loss_and_lm_head_grad(dict(loss_type="dapo"), keep=("importance_sampling_ratio",), setup=_vllm_correction),
        loss_and_lm_head_grad(dict(loss_type="dapo", delta=1.1)),
        loss_and_lm_head_grad(dict(loss_type="dapo", entropy_coef=0.05)),
    ]
    vespo = loss_and_lm_head_grad(dict(loss_type="vespo"))
    variants += [
        vespo,
        loss_and_lm_head_grad(dict(loss_type="vespo"), keep=("importance_sampling_ratio",), setup=_vllm_correction),
        loss_and_lm_head_grad(dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=5.0)),
    ]
    for i, (loss, grad) in enumerate(variants):
        other = vespo if i >= len(variants) - 2 else base  # the vespo knobs against plain vespo
        assert not torch.allclose(grad, other[1], rtol=1e-4, atol=0) or abs(float(loss - other[0])) > 1e-4


@needs_trl
def test_backward_writes_the_gradient_over_the_model_logits(model_dir, tokenizer, tmp_path, inputs, monkeypatch):
    """Logits path: the op receives the LM head's own output (no slice, no copy) and its backward writes into that
    buffer."""
    from grpo_kernels.backends import get_backend, resolve_backend
    from grpo_kernels.integrations.trl import GRPOTrainer

    trainer = make_trainer(
        GRPOTrainer, model_dir, tokenizer, tmp_path, "logits", loss_type="dapo", beta=0.04, entropy_coef=0.01
    )
    backend = get_backend(resolve_backend("auto", trainer.accelerator.device))
    head_outputs, writes = [], []
    trainer.model.lm_head.register_forward_hook(lambda module, args, out: head_outputs.append(out.data_ptr()))
    original = backend.token_logprobs_backward

    def recording(logits, *args):
        writes.append((logits.data_ptr(), args[-1].data_ptr()))  # (the logits read, the buffer written)
        return original(logits, *args)

    monkeypatch.setattr(backend, "token_logprobs_backward", recording)
    trainer._compute_loss(trainer.model, select(inputs)).backward()
    assert writes == [(head_outputs[-1], head_outputs[-1])]


# ----------------------------------------------------------------------------------------------------------------
# which path: the fused-linear one by default, the logits one with a logged reason
# ----------------------------------------------------------------------------------------------------------------
def tiny_model(tokenizer, arch="llama"):
    """A 1-layer Llama, or Cohere (logit_scale, which both TRL's head and ours read), with a tied head (an instance:
    both trainers accept one)."""
    import transformers

    config_class, model_class, extra = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM, dict(logit_scale=0.5)),
    }[arch]
    torch.manual_seed(2)
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        **extra,
    )
    return model_class(config)


def record_head_calls(trainer, calls):
    """Append the output shape of every call of the trainer's LM head module to ``calls``; returns the hook."""
    head = trainer.model.get_output_embeddings()
    return head.register_forward_hook(lambda module, args, out: calls.append(tuple(out.shape)))


@needs_trl
@pytest.mark.parametrize("arch", ["qwen2", "llama", "cohere"])
def test_fused_linear_is_the_default_and_never_materialises_the_logits(
    model_dir, tokenizer, tmp_path, inputs, caplog, arch
):
    """With no loss_path, a standard causal LM takes the fused-linear path (logged once at INFO): the LM head module
    never runs, so no [B, C, V] logits exist; the hook does see the logits path's call. Llama and Cohere (tied heads,
    Cohere's logit_scale; entropy bonus + high-entropy mask) are also compared with stock TRL; Qwen2 is in every
    parity test."""
    from trl import GRPOTrainer as StockTrainer

    from grpo_kernels.integrations.trl import GRPOTrainer

    config = dict(loss_type="grpo", entropy_coef=0.05, top_entropy_quantile=0.6)
    build = (lambda: model_dir) if arch == "qwen2" else (lambda: tiny_model(tokenizer, arch))
    with caplog.at_level(logging.INFO, logger="grpo_kernels.integrations.trl"):
        trainer = make_trainer(GRPOTrainer, build(), tokenizer, tmp_path, **config)
    assert (trainer.loss_path, trainer.loss_path_reason) == ("fused_linear", None)
    assert [r.levelname for r in caplog.records] == ["INFO"] and "fused-linear path" in caplog.text

    calls = []
    handle = record_head_calls(trainer, calls)
    ours = loss_grads_metrics(trainer, select(inputs))
    handle.remove()
    assert calls == []
    logits_trainer = make_trainer(GRPOTrainer, build(), tokenizer, tmp_path, "logits", **config)
    handle = record_head_calls(logits_trainer, calls)
    loss_grads_metrics(logits_trainer, select(inputs))
    handle.remove()
    assert calls == [(B, C, len(tokenizer))]
    if arch != "qwen2":
        stock = make_trainer(StockTrainer, build(), tokenizer, tmp_path, **config)
        assert_same(ours, loss_grads_metrics(stock, select(inputs)))


def scaled_logits_model(tokenizer):
    """A Qwen2 whose forward halves its logits: post-processing that no config attribute declares."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    class ScaledQwen2(Qwen2ForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    torch.manual_seed(3)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
        eos_token_id=1,
    )
    return ScaledQwen2(config)


class ShiftedLinear(torch.nn.Linear):
    """An LM head with a forward of its own, as a quantised or adapted layer has."""

    def forward(self, x):
        return super().forward(x) + 1.0


def custom_head_model(tokenizer):
    model = tiny_model(tokenizer)
    model.config.tie_word_embeddings = False
    model.lm_head = ShiftedLinear(model.config.hidden_size, model.config.vocab_size, bias=False)
    return model


@needs_trl
@pytest.mark.parametrize(
    "build, reason",
    [
        (scaled_logits_model, "post-processes its logits in a way the fused-linear path does not know"),
        (custom_head_model, "the LM head is a ShiftedLinear, not a plain torch.nn.Linear"),
    ],
    ids=["unknown-logit-post-processing", "lm-head-not-a-plain-linear"],
)
def test_unsupported_model_falls_back_with_the_reason(tokenizer, tmp_path, inputs, caplog, build, reason):
    """The logits path, with the reason logged once at INFO, and it trains; loss_path='fused_linear' raises it."""
    from grpo_kernels.integrations.trl import GRPOTrainer

    with caplog.at_level(logging.INFO, logger="grpo_kernels.integrations.trl"):
        trainer = make_trainer(GRPOTrainer, build(tokenizer), tokenizer, tmp_path, loss_type="dapo")
    assert trainer.loss_path == "logits" and reason in trainer.loss_path_reason
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "fused-linear path is not available" in caplog.text and reason in caplog.text
    calls = []
    handle = record_head_calls(trainer, calls)
    loss, grads, _ = loss_grads_metrics(trainer, select(inputs))
    handle.remove()
    assert torch.isfinite(loss) and grads["lm_head.weight"].abs().max() > 0 and calls == [(B, C, len(tokenizer))]
    with pytest.raises(ValueError, match="loss_path='fused_linear' is not available for this model"):
        make_trainer(GRPOTrainer, build(tokenizer), tokenizer, tmp_path, "fused_linear", loss_type="dapo")


@needs_trl
def test_logits_path_on_request_is_logged(model_dir, tokenizer, tmp_path, caplog):
    from grpo_kernels.integrations.trl import GRPOTrainer

    with caplog.at_level(logging.INFO, logger="grpo_kernels.integrations.trl"):
        trainer = make_trainer(GRPOTrainer, model_dir, tokenizer, tmp_path, "logits")
    assert trainer.loss_path == "logits" and "loss_path='logits'" in caplog.text


@needs_trl
@pytest.mark.parametrize(
    "path, extra",
    [("fused_linear", {}), ("logits", {}), ("fused_linear", dict(cast_lm_head_to_fp32=True))],
    ids=["fused_linear", "logits", "fused_linear-cast_lm_head_to_fp32"],
)
def test_bf16_autocast_error_is_trls(model_dir, tokenizer, tmp_path, inputs, path, extra):
    """Under TRL's default bf16 autocast the two routes round differently, so they are compared with a float64 run
    instead: our gradients' error must stay within 2x stock TRL's (measured ~1.1x on this model). With
    cast_lm_head_to_fp32 (fused-linear path only) both project in float32 outside autocast."""
    from trl import GRPOTrainer as StockTrainer

    from grpo_kernels.integrations.trl import GRPOTrainer

    config = dict(loss_type="dapo", beta=0.04, entropy_coef=0.01)
    exact = make_trainer(GRPOTrainer, model_dir, tokenizer, tmp_path, path, **config)
    exact.model.double()  # float64 weights and logits; the op runs in float64 on the torch backend
    batch = select(inputs)
    _, grads64, _ = loss_grads_metrics(exact, {k: v.double() if v.is_floating_point() else v for k, v in batch.items()})
    norm = sum(g.pow(2).sum() for g in grads64.values()).sqrt().item()
    errors = []
    for cls, loss_path in ((GRPOTrainer, path), (StockTrainer, None)):
        trainer = make_trainer(cls, model_dir, tokenizer, tmp_path, loss_path, bf16=True, **config, **extra)
        _, grads, _ = loss_grads_metrics(trainer, batch)
        errors.append(sum((grads[n].double() - g).pow(2).sum() for n, g in grads64.items()).sqrt().item() / norm)
    ours, stock = errors
    assert 0 < stock < 0.05  # bf16 rounding is there, and small
    assert ours <= 2 * stock + 1e-6, f"relative gradient error: ours {ours:.3e}, TRL {stock:.3e}"


# ----------------------------------------------------------------------------------------------------------------
# real training
# ----------------------------------------------------------------------------------------------------------------
@needs_trl
@pytest.mark.parametrize("path", PATHS)
def test_one_optimizer_step_matches_trl(model_dir, tokenizer, tmp_path, path):
    """trainer.train(): generation, rewards, 2 accumulated micro-batches, one SGD step; same update as stock TRL."""
    from trl import GRPOTrainer as StockTrainer

    from grpo_kernels.integrations.trl import GRPOTrainer

    deltas, logs = [], []
    for cls, loss_path in ((GRPOTrainer, path), (StockTrainer, None)):
        trainer = make_trainer(
            cls,
            model_dir,
            tokenizer,
            tmp_path,
            loss_path,
            max_steps=1,
            learning_rate=0.1,
            optim="sgd",
            beta=0.04,
            loss_type="grpo",
        )
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        deltas.append({n: (p.detach() - before[n], before[n].abs().max()) for n, p in trainer.model.named_parameters()})
        logs.append(trainer.state.log_history[0])
    ours, stock = deltas
    assert any(d.abs().max() > 0 for d, _ in stock.values())
    for name, (d_ref, size) in stock.items():
        # The update is rounded onto float32 parameters: one ulp of the parameter's magnitude is the floor.
        err = (ours[name][0] - d_ref).abs().max().item()
        floor = 2 * torch.finfo(torch.float32).eps * size.item()
        assert err <= GRAD_RTOL * d_ref.abs().max().item() + floor, f"{name}: max |diff| {err:.3e}"
    assert logs[0].keys() == logs[1].keys()
    for key in ("loss", "reward", "kl", "entropy", "clip_ratio/region_mean", "clip_ratio/low_min"):
        assert logs[0][key] == pytest.approx(logs[1][key], rel=1e-4, abs=1e-6), key


@needs_trl
def test_trains_end_to_end_with_trl_defaults(model_dir, tokenizer, tmp_path):
    """A few real steps with TRL's defaults (bf16 autocast, AdamW, loss_type='dapo'): finite losses, TRL's metric
    names, parameters that move."""
    from grpo_kernels.integrations.trl import GRPOTrainer

    trainer = make_trainer(
        GRPOTrainer, model_dir, tokenizer, tmp_path, max_steps=3, steps_per_generation=2, bf16=True, learning_rate=1e-2
    )
    assert trainer.loss_path == "fused_linear"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert len(steps) == 3
    for log in steps:
        assert torch.isfinite(torch.tensor(log["loss"]))
        assert {"reward", "entropy", "clip_ratio/low_mean", "clip_ratio/high_max", "clip_ratio/region_mean"} <= set(log)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())


# ----------------------------------------------------------------------------------------------------------------
# what is not supported raises at construction
# ----------------------------------------------------------------------------------------------------------------
@needs_trl
@pytest.mark.parametrize(
    "config, message",
    [
        (dict(loss_type="not_a_loss"), "loss_type='not_a_loss' is not supported"),
        (dict(use_liger_kernel=True), "use_liger_kernel=True is not supported"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(delta=0.9), "delta"),
        (dict(cast_lm_head_to_fp32=True, bf16=True, loss_path="logits"), "cast_lm_head_to_fp32=True with bf16/fp16"),
        (dict(loss_path="chunked"), "loss_path must be one of"),
    ],
)
def test_unsupported_config_raises_at_construction(model_dir, tokenizer, tmp_path, config, message):
    from grpo_kernels.integrations.trl import GRPOTrainer

    with pytest.raises(ValueError, match=message):
        make_trainer(GRPOTrainer, model_dir, tokenizer, tmp_path, **config)


# ----------------------------------------------------------------------------------------------------------------
# TRL is optional
# ----------------------------------------------------------------------------------------------------------------
def _forget(monkeypatch, prefix):
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        monkeypatch.delitem(sys.modules, name)


def test_package_imports_without_trl(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now fails, as when it is not installed
    _forget(monkeypatch, "grpo_kernels.integrations")
    importlib.import_module("grpo_kernels.integrations")
    importlib.import_module("grpo_kernels.integrations.adapter")


def test_trl_integration_without_trl_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    _forget(monkeypatch, "grpo_kernels.integrations")
    with pytest.raises(ImportError, match=r'pip install "grpo-kernels\[trl\]"'):
        importlib.import_module("grpo_kernels.integrations.trl")
