"""The TRL drop-in against stock ``trl.GRPOTrainer`` (1.16) on the model families beyond a dense text LM.

- Mixture-of-experts causal LMs (Qwen3-MoE, Mixtral, GPT-OSS), whose router load-balancing loss TRL adds to the
  training loss (``router_aux_loss_coef``, the ``aux_loss`` metric).
- A vision-language model (Qwen2-VL) with an image in each prompt, the image inputs passed as TRL passes them.
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


def assert_same_update(ours, stock):
    """name -> (update, max |parameter|) of two train() runs: equal to float32 rounding. The floor: one ulp of the
    parameter's magnitude (the update is rounded onto float32 parameters), and 1e-7 of the largest update anywhere
    (a zero-initialised parameter whose gradient is itself at rounding level, e.g. 1e-12 beside updates of 1e-2)."""
    largest = max(d.abs().max().item() for d, _ in stock.values())
    for name, (d_ref, size) in stock.items():
        err = (ours[name][0] - d_ref).abs().max().item()
        floor = 2 * torch.finfo(torch.float32).eps * size.item() + 1e-7 * largest
        assert err <= 1e-5 * d_ref.abs().max().item() + floor, f"{name}: max |diff| {err:.3e}"


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
@pytest.mark.slow  # the multi-turn rollout_func test below runs train() on this model in the default run
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
    assert_same_update(ours, stock)
    assert logs[0].keys() == logs[1].keys() and "aux_loss" in logs[1]
    for key in ("loss", "reward", "entropy", "aux_loss"):
        assert logs[0][key] == pytest.approx(logs[1][key], rel=1e-4, abs=1e-6), key


# ----------------------------------------------------------------------------------------------------------------
# vision-language models: Qwen2-VL (vision tower, M-RoPE), images in the prompt as TRL passes them
# ----------------------------------------------------------------------------------------------------------------
VLM_VOCAB = 40  # the test tokenizer's 34 ids, then <|image_pad|> 36, <|video_pad|> 37, vision start 38 / end 39
IMAGE_PAD, VISION_START, VISION_END = 36, 38, 39


def qwen2_vl_model():
    """A 1-layer Qwen2-VL: a 1-block vision tower (patch 4, 2x2 merge) and a 1-layer language model."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(7)
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=VLM_VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
        ),
        vision_config=dict(
            depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2
        ),
        image_token_id=IMAGE_PAD,
        video_token_id=37,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return Qwen2VLForConditionalGeneration(config)


def qwen2_vl_images(trainer, batch):
    """One image per prompt (a 2x2 grid of 4x4 patches, merged to 1 token) in the layout TRL's
    _generate_and_score_completions builds: the last three prompt columns are <vision_start> <image_pad>
    <vision_end>, pixel_values [4 B, 3 * 2 * 4 * 4] (patches of all images), image_grid_thw [B, 3], num_images, and
    mm_token_type_ids over prompt + completion (1 at the image token, zeros over the completion)."""
    g = torch.Generator().manual_seed(3)
    device = batch["prompt_ids"].device
    batch["prompt_ids"][:, -3:] = torch.tensor([VISION_START, IMAGE_PAD, VISION_END], device=device)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    rows = batch["prompt_ids"].shape[0]
    return dict(
        pixel_values=torch.randn(4 * rows, 96, generator=g).to(device),
        image_grid_thw=torch.tensor([[1, 2, 2]] * rows, device=device),
        num_images=[1] * rows,
        mm_token_type_ids=(ids == IMAGE_PAD).long(),
    )


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2-vl")
    qwen2_vl_model().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def vlm_inputs(vlm_dir, tokenizer, tmp_path_factory):
    return make_inputs(vlm_dir, tokenizer, tmp_path_factory.mktemp("out-vlm"), forward_inputs=qwen2_vl_images)


@needs_trl
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "case, config",
    [
        ("dapo-beta", dict(loss_type="dapo", beta=0.04)),
        ("grpo-sequence-bonus", dict(loss_type="grpo", importance_sampling_level="sequence", entropy_coef=0.05)),
        ("vespo-accumulation-3", dict(loss_type="vespo", gradient_accumulation_steps=3, top_entropy_quantile=0.5)),
    ],
)
def test_vlm_matches_trl(vlm_dir, vlm_inputs, tokenizer, tmp_path, case, config, path):
    """Qwen2-VL with an image in every prompt: the image inputs reach the model as TRL passes them (the vision tower
    and its patch embedding get gradients), and loss, every gradient and every metric equal stock TRL's. The
    fused-linear path takes the language model's hidden states after the vision tower and projects with lm_head."""
    from trl import GRPOTrainer as StockTrainer

    from grpo_kernels.integrations.trl import GRPOTrainer

    ours_trainer = make_trainer(GRPOTrainer, vlm_dir, tokenizer, tmp_path, path, **config)
    stock_trainer = make_trainer(StockTrainer, vlm_dir, tokenizer, tmp_path, **config)
    ours, stock = (loss_grads_metrics(t, select(vlm_inputs)) for t in (ours_trainer, stock_trainer))
    assert_same(ours, stock)
    vision = [g for name, g in stock[1].items() if "visual" in name]
    assert vision and any(g.abs().max() > 0 for g in vision)
    # the images matter: without them (text only, same token ids) the loss is another
    text_only = {k: v for k, v in select(vlm_inputs).items() if k not in ("pixel_values", "image_grid_thw")}
    text_only.pop("mm_token_type_ids")
    text_only.pop("num_images")
    assert not torch.allclose(loss_grads_metrics(ours_trainer, text_only)[0], ours[0], rtol=1e-4, atol=0)


@needs_trl
def test_vlm_without_a_plain_linear_head_falls_back_with_the_reason(tokenizer, tmp_path, vlm_inputs, caplog):
    """A Qwen2-VL whose LM head has a forward of its own: the logits path, the reason logged once at INFO, the
    image inputs still reach the model (the vision tower gets gradients)."""
    import logging

    from test_integration_trl import ShiftedLinear

    from grpo_kernels.integrations.trl import GRPOTrainer

    model = qwen2_vl_model()
    model.lm_head = ShiftedLinear(16, VLM_VOCAB, bias=False)
    with caplog.at_level(logging.INFO, logger="grpo_kernels.integrations.trl"):
        trainer = make_trainer(GRPOTrainer, model, tokenizer, tmp_path, loss_type="dapo")
    assert trainer.loss_path == "logits" and "not a plain torch.nn.Linear" in trainer.loss_path_reason
    assert "fused-linear path is not available" in caplog.text
    loss, grads, _ = loss_grads_metrics(trainer, select(vlm_inputs))
    assert torch.isfinite(loss) and any(g.abs().max() > 0 for n, g in grads.items() if "visual" in n)


@needs_trl
def test_hf_helper_refuses_a_lora_adapter_on_the_lm_head(tokenizer):
    """causal_lm_head_inputs used to project with lm_head.weight under a PEFT LoRA adapter on lm_head, silently
    dropping the adapter; it now raises, naming the head and the alternatives (TRL 1.16 refuses the same)."""
    from peft import LoraConfig, get_peft_model
    from test_integration_trl import tiny_model

    from grpo_kernels.integrations.hf import causal_lm_grpo_loss

    model = tiny_model(tokenizer)
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(16, len(tokenizer), bias=False)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    ids = torch.randint(3, len(tokenizer), (2, 6))
    with pytest.raises(ValueError, match="the LM head is a Linear, not a plain torch.nn.Linear.*merge_and_unload"):
        causal_lm_grpo_loss(peft_model.get_base_model(), ids, None, 3, torch.ones(2))
    merged = peft_model.merge_and_unload()  # the alternative the message names: the adapter folded into the weight
    assert torch.isfinite(causal_lm_grpo_loss(merged, ids, None, 3, torch.ones(2)).loss)


def llava_model_and_processor():
    """A tiny LLaVA (1-layer CLIP vision tower on 8x8 images, 4 image tokens; 1-layer Llama) and its processor,
    built locally: the test tokenizer plus an <image> token, a CLIP image processor, a chat template that renders
    image blocks as <image>."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = (
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} {% endif %}"
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}),
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    torch.manual_seed(9)
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=8,
            patch_size=4,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(config), processor


def reward_conversational(completions, **kwargs):
    return [float(len(set(c[0]["content"])) + c[0]["content"].count("e")) for c in completions]


@needs_trl
@pytest.mark.parametrize("path", PATHS)
def test_vlm_with_processor_one_optimizer_step_matches_trl(tmp_path, path):
    """trainer.train() as a TRL user runs a vision-language model: a LLaVA with its processor as processing_class,
    an image per conversational prompt; TRL generates with the images, then one SGD step over 2 accumulated
    micro-batches: the same update (the vision tower's included) and the same logged metrics as stock TRL."""
    import numpy as np
    from datasets import Dataset
    from PIL import Image
    from trl import GRPOConfig
    from trl import GRPOTrainer as StockTrainer

    from grpo_kernels.integrations.trl import GRPOTrainer

    model, processor = llava_model_and_processor()
    model_dir = str(tmp_path / "llava")
    model.save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((8, 8, 3)) * 255).astype("uint8")) for _ in range(4)]
    dataset = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": text}] for text in ("hi", "sky", "abc", "go")], "image": images}
    )
    deltas, logs = [], []
    for cls, loss_path in ((GRPOTrainer, path), (StockTrainer, None)):
        args = GRPOConfig(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=6,
            gradient_accumulation_steps=2,
            steps_per_generation=2,
            max_steps=1,
            learning_rate=0.1,
            optim="sgd",
            beta=0.04,
            loss_type="dapo",
            bf16=False,
            use_cpu=USE_CPU,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            seed=0,
        )
        extra = {} if loss_path is None else dict(loss_path=loss_path)
        trainer = cls(
            model=model_dir,
            reward_funcs=reward_conversational,
            args=args,
            train_dataset=dataset,
            processing_class=processor,
            **extra,
        )
        assert trainer._is_vlm
        if loss_path is not None:
            assert trainer.loss_path == loss_path
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        deltas.append({n: (p.detach() - before[n], before[n].abs().max()) for n, p in trainer.model.named_parameters()})
        logs.append(trainer.state.log_history[0])
    ours, stock = deltas
    largest = max(d.abs().max().item() for d, _ in stock.values())
    assert max(d.abs().max().item() for n, (d, _) in stock.items() if "vision_tower" in n) > 1e-3 * largest
    assert_same_update(ours, stock)
    assert logs[0].keys() == logs[1].keys()
    for key, value in logs[1].items():
        if isinstance(value, float) and "time" not in key and "per_second" not in key:
            assert logs[0][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


# ----------------------------------------------------------------------------------------------------------------
# multi-turn rollouts: rollout_func with an environment mask (TRL's tool_mask)
# ----------------------------------------------------------------------------------------------------------------
def multi_turn_rollout(tokenizer):
    """A rollout_func (TRL's experimental hook) that plays a fixed two-turn episode per prompt: model tokens, a
    tool result (env_mask 0: TRL's tool_mask, excluded from the loss), more model tokens. Seeded, so two trainers
    fed the same prompts get the same rollouts; sampling log-probs near uniform, for the off-policy mask."""
    g = torch.Generator().manual_seed(11)
    vocab = len(tokenizer)

    def rollout(prompts, trainer):
        prompt_ids, completion_ids, logprobs, env_mask = [], [], [], []
        for prompt in prompts:
            turn, tool, reply = (int(n) for n in torch.randint(1, 4, (3,), generator=g))
            ids = torch.randint(3, vocab, (turn + tool + reply,), generator=g).tolist()
            prompt_ids.append(tokenizer(prompt)["input_ids"])
            completion_ids.append(ids)
            logprobs.append((-3.5 + 0.1 * torch.randn(len(ids), generator=g)).tolist())
            env_mask.append([1] * turn + [0] * tool + [1] * reply)
        return dict(prompt_ids=prompt_ids, completion_ids=completion_ids, logprobs=logprobs, env_mask=env_mask)

    return rollout


@needs_trl
@pytest.mark.parametrize("path", PATHS)
def test_multi_turn_rollout_func_one_optimizer_step_matches_trl(tokenizer, tmp_path, monkeypatch, path):
    """trainer.train() with a rollout_func whose episodes hold tool-result tokens (env_mask -> tool_mask), with the
    off-policy mask on the rollout's sampling log-probs: one SGD step over 2 accumulated micro-batches gives the
    same update and the same logged metrics as stock TRL (on the Qwen3-MoE model: router auxiliary loss too)."""
    from trl import GRPOTrainer as StockTrainer

    from grpo_kernels.integrations.trl import GRPOTrainer

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    model_dir = str(tmp_path / "model")
    moe_model("qwen3_moe", len(tokenizer)).save_pretrained(model_dir)
    deltas, logs = [], []
    for cls, loss_path in ((GRPOTrainer, path), (StockTrainer, None)):
        from datasets import Dataset
        from trl import GRPOConfig

        args = GRPOConfig(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=9,
            gradient_accumulation_steps=2,
            steps_per_generation=2,
            max_steps=1,
            learning_rate=0.1,
            optim="sgd",
            beta=0.04,
            loss_type="grpo",
            off_policy_mask_threshold=0.5,
            router_aux_loss_coef=0.5,
            bf16=False,
            use_cpu=USE_CPU,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            seed=0,
        )
        extra = {} if loss_path is None else dict(loss_path=loss_path)
        trainer = cls(
            model=model_dir,
            reward_funcs=reward_len_e,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["hello", "the sky", "abc", "one two"]}),
            processing_class=tokenizer,
            rollout_func=multi_turn_rollout(tokenizer),
            **extra,
        )
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        deltas.append({n: (p.detach() - before[n], before[n].abs().max()) for n, p in trainer.model.named_parameters()})
        logs.append(trainer.state.log_history[0])
    ours, stock = deltas
    assert any(d.abs().max() > 0 for d, _ in stock.values())
    assert_same_update(ours, stock)
    assert logs[0].keys() == logs[1].keys()
    for key, value in logs[1].items():
        if isinstance(value, float) and "time" not in key and "per_second" not in key:
            assert logs[0][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


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
