"""The bad-input catalogue (docs/reliability.md): every malformed or non-finite input gets a clear exception naming
the argument and what was expected, or a defined result tested here against reference.py. Every case runs on every
available backend. Extends tests/test_validation.py, whose cases are not repeated here."""

import math

import pytest
import torch
from conftest import DEVICE
from helpers import make_batch, rel_err
from reliability_helpers import INTERPRETED, assert_matches, grad_of

from grpo_kernels import GRPOLoss, group_advantages, grpo_loss, token_logprobs
from grpo_kernels import reference as ref
from grpo_kernels.config import LossConfig
from grpo_kernels.loss_math import segment_sum

B, T, V = 3, 4, 11
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
META = torch.device("meta")  # a second device on every machine: tensors on it must be refused, never read


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        logits=torch.randn(B, T, V, generator=g).to(DEVICE),
        token_ids=torch.randint(0, V, (B, T), generator=g).to(DEVICE),
        advantages=torch.randn(B, generator=g).to(DEVICE),
    )


def _packed(d, cu=(0, 5, 12)):
    """The same tokens as packed [N, V] logits with cu_seqlens (S = len(cu) - 1 sequences)."""
    return dict(
        logits=d["logits"].reshape(B * T, V),
        token_ids=d["token_ids"].reshape(-1),
        advantages=torch.randn(len(cu) - 1, device=DEVICE),
        cu_seqlens=torch.tensor(cu, device=DEVICE),
    )


# ----------------------------------------------------------------------------------------------------------------
# rejected inputs: (case id, function, changes to the inputs, exception type, message fragment)
# a change is a value or a function of the input dict; "logits", "token_ids", "advantages" (grpo_loss) / "rewards"
# (group_advantages) are positional, everything else a keyword
# ----------------------------------------------------------------------------------------------------------------
def _z(**kw):  # fresh logits of shape [B, T, V] built another way
    return lambda d: torch.randn(B, T, V, device=DEVICE, **kw)


LOSS_REJECTS = [
    # logits
    (
        "logits-0d",
        dict(logits=torch.tensor(1.0)),
        ValueError,
        r"logits must be \[B, T, V\] or packed \[N, V\], got shape \[\]",
    ),
    (
        "logits-bool",
        dict(logits=lambda d: d["logits"] > 0),
        TypeError,
        "logits must be float16, bfloat16, float32 or float64, got torch.bool",
    ),
    ("logits-complex", dict(logits=lambda d: d["logits"].to(torch.complex64)), TypeError, "got torch.complex64"),
    ("logits-empty-vocab", dict(logits=lambda d: d["logits"][..., :0]), ValueError, "vocabulary of at least 1 entry"),
    (
        "logits-transposed",
        dict(logits=lambda d: torch.randn(B, V, T, device=DEVICE).transpose(1, 2)),
        ValueError,
        r"stride 1\), got strides \[44, 1, 4\]",
    ),
    # token_ids
    (
        "ids-bool",
        dict(token_ids=lambda d: d["token_ids"] > 0),
        TypeError,
        "token_ids must be an integer tensor, got torch.bool",
    ),
    (
        "ids-3d",
        dict(token_ids=lambda d: d["token_ids"][..., None]),
        ValueError,
        r"token_ids must have the shape of logits without the last dim \[3, 4\]",
    ),
    (
        "ids-flat-with-3d-logits",
        dict(token_ids=lambda d: d["token_ids"].reshape(-1)),
        ValueError,
        r"token_ids must have the shape .* \[3, 4\], got \[12\]",
    ),
    (
        "ids-ignore-index-mismatch",
        dict(token_ids=lambda d: d["token_ids"].fill_(-100), ignore_index=-1),
        ValueError,
        r"or equal ignore_index=-1\) where mask != 0; got -100",
    ),
    # tensors on another device than the logits
    (
        "ids-on-meta",
        dict(token_ids=lambda d: d["token_ids"].to(META)),
        ValueError,
        "token_ids is on meta but logits are on",
    ),
    ("mask-on-meta", dict(mask=torch.ones(B, T, device=META)), ValueError, "mask is on meta but logits are on"),
    ("adv-on-meta", dict(advantages=torch.ones(B, device=META)), ValueError, "advantages is on meta but logits are on"),
    ("old-on-meta", dict(old_logprobs=torch.zeros(B, T, device=META)), ValueError, "old_logprobs is on meta"),
    ("ref-on-meta", dict(ref_logprobs=torch.zeros(B, T, device=META), beta=0.1), ValueError, "ref_logprobs is on meta"),
    ("isw-on-meta", dict(is_weights=torch.ones(B, device=META)), ValueError, "is_weights is on meta"),
    (
        "cu-on-meta",
        dict(
            **{"logits": lambda d: d["logits"].reshape(-1, V), "token_ids": lambda d: d["token_ids"].reshape(-1)},
            cu_seqlens=torch.tensor([0, 12], device=META),
        ),
        ValueError,
        "cu_seqlens is on meta",
    ),
    # per-sequence / per-token shapes: an exact shape match, never broadcasting
    (
        "adv-0d",
        dict(advantages=torch.tensor(1.0, device=DEVICE)),
        ValueError,
        r"advantages must be per sequence \[B\]=\[3\] / \[B, 1\] or per token \[B, T\]=\[3, 4\], got \[\]",
    ),
    (
        "adv-length-T",
        dict(advantages=torch.ones(T, device=DEVICE)),
        ValueError,
        r"per token \[B, T\]=\[3, 4\], got \[4\]",
    ),
    ("adv-1-broadcast", dict(advantages=torch.ones(1, device=DEVICE)), ValueError, r"got \[1\]"),
    ("adv-B-T-1", dict(advantages=torch.ones(B, T, 1, device=DEVICE)), ValueError, r"got \[3, 4, 1\]"),
    ("adv-T-B", dict(advantages=torch.ones(T, B, device=DEVICE)), ValueError, r"got \[4, 3\]"),
    (
        "isw-length-T",
        dict(is_weights=torch.ones(T, device=DEVICE)),
        ValueError,
        r"is_weights must be per sequence \[B\]=\[3\]",
    ),
    (
        "old-per-sequence",
        dict(old_logprobs=torch.zeros(B, 1, device=DEVICE)),
        ValueError,
        r"old_logprobs must have the shape of token_ids \[3, 4\], got \[3, 1\]",
    ),
    (
        "mask-transposed",
        dict(mask=torch.ones(T, B, device=DEVICE)),
        ValueError,
        r"mask must have the shape of token_ids \[3, 4\], got \[4, 3\]",
    ),
    # dtypes of the per-token inputs
    (
        "old-int",
        dict(old_logprobs=torch.zeros(B, T, dtype=torch.long, device=DEVICE)),
        TypeError,
        "old_logprobs must be a floating-point tensor",
    ),
    (
        "ref-int",
        dict(ref_logprobs=torch.zeros(B, T, dtype=torch.int32, device=DEVICE), beta=0.1),
        TypeError,
        "ref_logprobs must be a floating-point",
    ),
    (
        "isw-int",
        dict(is_weights=torch.ones(B, dtype=torch.long, device=DEVICE)),
        TypeError,
        "is_weights must be a floating-point",
    ),
    (
        "adv-bool",
        dict(advantages=torch.ones(B, dtype=torch.bool, device=DEVICE)),
        TypeError,
        "advantages must be a floating-point",
    ),
    ("adv-list", dict(advantages=[1.0, 2.0, 3.0]), TypeError, "advantages must be a torch.Tensor, got list"),
    # packed layout
    (
        "packed-adv-N-1",
        dict(**_packed(_inputs()) | {"advantages": torch.ones(12, 1, device=DEVICE)}),
        ValueError,
        r"per sequence \[S\]=\[2\] or per token \[N\]=\[12\] for packed logits, got \[12, 1\]",
    ),
    (
        "packed-adv-S+1",
        dict(**_packed(_inputs()) | {"advantages": torch.ones(3, device=DEVICE)}),
        ValueError,
        r"got \[3\]",
    ),
    (
        "cu-float",
        dict(**_packed(_inputs()) | {"cu_seqlens": torch.tensor([0.0, 5.0, 12.0], device=DEVICE)}),
        ValueError,
        "cu_seqlens must be a 1-D integer tensor",
    ),
    (
        "cu-2d",
        dict(**_packed(_inputs()) | {"cu_seqlens": torch.tensor([[0, 12]], device=DEVICE)}),
        ValueError,
        r"cu_seqlens must be a 1-D integer tensor \[S\+1\] with S >= 1",
    ),
    (
        "cu-no-sequence",
        dict(**_packed(_inputs()) | {"cu_seqlens": torch.tensor([0], device=DEVICE)}),
        ValueError,
        "with S >= 1",
    ),
    ("cu-decreasing", dict(**_packed(_inputs(), cu=(0, 7, 5, 12))), ValueError, "never decrease"),
    ("cu-not-from-0", dict(**_packed(_inputs(), cu=(1, 5, 12))), ValueError, "cu_seqlens must start at 0"),
    # scalars
    ("temperature-tensor", dict(temperature=torch.tensor(1.0)), TypeError, "temperature must be a number, got Tensor"),
    ("temperature-bool", dict(temperature=True), TypeError, "temperature must be a number, got bool"),
    ("epsilon-nan", dict(epsilon_low=math.nan), ValueError, "epsilon_low must be finite, got nan"),
    ("delta-below-1", dict(delta=0.5), ValueError, "delta must be > 1, got 0.5"),
    ("delta-nan", dict(delta=math.nan), ValueError, "delta must be finite"),
    ("dual-clip-inf", dict(dual_clip=math.inf), ValueError, "dual_clip must be finite"),
    ("dual-clip-1", dict(dual_clip=1), ValueError, "dual_clip must be > 1, got 1"),
    ("beta-inf", dict(beta=math.inf, ref_logprobs=torch.zeros(B, T, device=DEVICE)), ValueError, "beta must be finite"),
    ("sapo-tau-zero", dict(loss_type="sapo", sapo_temperature_pos=0.0), ValueError, "sapo_temperature_pos must be > 0"),
    (
        "sapo-tau-negative",
        dict(loss_type="sapo", sapo_temperature_neg=-1.0),
        ValueError,
        "sapo_temperature_neg must be > 0",
    ),
    (
        "dr-grpo-length-zero",
        dict(loss_type="dr_grpo", max_completion_length=0),
        ValueError,
        "needs max_completion_length, a positive int; got 0",
    ),
    (
        "dr-grpo-length-float",
        dict(loss_type="dr_grpo", max_completion_length=4.0),
        ValueError,
        "a positive int; got 4.0",
    ),
    (
        "dr-grpo-length-bool",
        dict(loss_type="dr_grpo", max_completion_length=True),
        ValueError,
        "a positive int; got True",
    ),
    ("num-items-nan", dict(num_items_in_batch=math.nan), ValueError, "num_items_in_batch must be finite"),
    (
        "num-items-2-elements",
        dict(num_items_in_batch=torch.ones(2)),
        ValueError,
        r"num_items_in_batch must be a number or a 1-element tensor, got \[2\]",
    ),
    ("num-items-string", dict(num_items_in_batch="12"), TypeError, "num_items_in_batch must be a number, got str"),
    (
        "loss-type-case",
        dict(loss_type="GRPO"),
        ValueError,
        r"loss_type must be one of \['grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo', 'sapo', 'vespo', 'geo_mean', 'gpg', "
        r"'clip_cov', 'kl_cov'\], got 'GRPO'",
    ),
    ("backend-none", dict(backend=None), ValueError, "backend must be one of"),
    # the knobs of docs/math.md section 9
    (
        "vespo-lambda-zero",
        dict(loss_type="vespo", vespo_lambda_pos=0.0),
        ValueError,
        "vespo_lambda_pos must be > 0, got 0.0",
    ),
    (
        "vespo-lambda-negative",
        dict(loss_type="vespo", vespo_lambda_neg=-1.0),
        ValueError,
        "vespo_lambda_neg must be > 0, got -1.0",
    ),
    ("vespo-k-nan", dict(loss_type="vespo", vespo_k_pos=math.nan), ValueError, "vespo_k_pos must be finite, got nan"),
    ("vespo-k-string", dict(loss_type="vespo", vespo_k_neg="3"), TypeError, "vespo_k_neg must be a number, got str"),
    (
        "vespo-per-sequence-isw",
        dict(loss_type="vespo", is_weights=torch.ones(B, device=DEVICE)),
        ValueError,
        r"loss_type='vespo' takes token-level is_weights \(the shape of token_ids \[3, 4\]\)",
    ),
    (
        "vespo-delta",
        dict(loss_type="vespo", delta=1.5),
        ValueError,
        r"delta applies to the clip family .* not to loss_type='vespo'",
    ),
    (
        "clip-cov-ratio-zero",
        dict(loss_type="clip_cov", clip_cov_ratio=0.0),
        ValueError,
        "clip_cov_ratio must be > 0, got 0.0",
    ),
    (
        "clip-cov-ratio-above-1",
        dict(loss_type="clip_cov", clip_cov_ratio=1.5),
        ValueError,
        "clip_cov_ratio must be <= 1, got 1.5",
    ),
    (
        "clip-cov-band-empty",
        dict(loss_type="clip_cov", clip_cov_lb=5.0, clip_cov_ub=1.0),
        ValueError,
        "clip_cov_lb must be < clip_cov_ub, got 5.0 and 1.0",
    ),
    ("clip-cov-ub-inf", dict(loss_type="clip_cov", clip_cov_ub=math.inf), ValueError, "clip_cov_ub must be finite"),
    (
        "kl-cov-ratio-negative",
        dict(loss_type="kl_cov", kl_cov_ratio=-0.1),
        ValueError,
        "kl_cov_ratio must be > 0, got -0.1",
    ),
    ("kl-cov-ratio-above-1", dict(loss_type="kl_cov", kl_cov_ratio=2), ValueError, "kl_cov_ratio must be <= 1, got 2"),
    (
        "ppo-kl-coef-negative",
        dict(loss_type="kl_cov", ppo_kl_coef=-1.0),
        ValueError,
        "ppo_kl_coef must be >= 0, got -1.0",
    ),
    (
        "geo-mean-sequence-level",
        dict(loss_type="geo_mean", importance_sampling_level="sequence"),
        ValueError,
        r"loss_type='geo_mean' uses the token-level ratio .* importance_sampling_level must be 'token'",
    ),
    ("gpg-dual-clip", dict(loss_type="gpg", dual_clip=3.0), ValueError, r"dual_clip applies to the clip family"),
    (
        "aggregation-verl-name",
        dict(loss_type="gpg", aggregation="token-mean"),
        ValueError,
        r"aggregation must be one of \['grpo', 'bnpo', 'dr_grpo', 'dapo'\], got 'token-mean'",
    ),
    (
        "aggregation-dr-grpo-no-length",
        dict(loss_type="kl_cov", aggregation="dr_grpo"),
        ValueError,
        "aggregation='dr_grpo' needs max_completion_length, a positive int; got None",
    ),
    # in-place backward over a leaf (its .grad would alias its data): a view of a leaf is refused too
    (
        "inplace-view-of-leaf",
        dict(
            logits=lambda d: d["logits"].requires_grad_(True)[:, :-1],
            token_ids=lambda d: d["token_ids"][:, :-1],
            inplace_backward=True,
        ),
        ValueError,
        "leaf tensor that requires grad \\(or a view of one\\)",
    ),
]


def _apply(d: dict, changes: dict) -> dict:
    d = dict(d)
    for key, value in changes.items():
        d[key] = value(d) if callable(value) else value
    return d


@pytest.mark.parametrize("case,changes,exc,match", LOSS_REJECTS, ids=[c[0] for c in LOSS_REJECTS])
def test_grpo_loss_rejects(backend, case, changes, exc, match):
    d = _apply(_inputs(), changes)
    args = (d.pop("logits"), d.pop("token_ids"), d.pop("advantages"))
    with pytest.raises(exc, match=match):
        grpo_loss(*args, **{"backend": backend, **d})


LOGPROB_REJECTS = [
    (
        "logits-1d",
        dict(logits=lambda d: d["logits"].reshape(-1)),
        ValueError,
        r"logits must be \[B, T, V\] or packed \[N, V\]",
    ),
    (
        "logits-int",
        dict(logits=lambda d: d["logits"].long()),
        TypeError,
        "logits must be float16, bfloat16, float32 or float64",
    ),
    (
        "logits-strided-vocab",
        dict(logits=lambda d: torch.randn(B, T, 2 * V, device=DEVICE)[..., ::2]),
        ValueError,
        "contiguous in the vocabulary dimension",
    ),
    (
        "ids-float",
        dict(token_ids=lambda d: d["token_ids"].double()),
        TypeError,
        "token_ids must be an integer tensor, got torch.float64",
    ),
    (
        "ids-shape",
        dict(token_ids=lambda d: d["token_ids"].T),
        ValueError,
        r"token_ids must have the shape .* \[3, 4\], got \[4, 3\]",
    ),
    (
        "ids-equal-V",
        dict(token_ids=lambda d: d["token_ids"].fill_(V)),
        ValueError,
        r"token_ids must lie in \[0, 11\) .* got 11 at flat position 0",
    ),
    (
        "ids-negative",
        dict(token_ids=lambda d: d["token_ids"].fill_(-1)),
        ValueError,
        r"or equal ignore_index=-100\) where mask != 0; got -1",
    ),
    ("ids-on-meta", dict(token_ids=lambda d: d["token_ids"].to(META)), ValueError, "token_ids is on meta"),
    ("mask-on-meta", dict(mask=torch.ones(B, T, device=META)), ValueError, "mask is on meta"),
    ("temperature-negative", dict(temperature=-0.5), ValueError, "temperature must be > 0, got -0.5"),
    ("temperature-nan", dict(temperature=math.nan), ValueError, "temperature must be finite, got nan"),
    ("temperature-inf", dict(temperature=math.inf), ValueError, "temperature must be finite, got inf"),
    ("backend-unknown", dict(backend="tpu"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("case,changes,exc,match", LOGPROB_REJECTS, ids=[c[0] for c in LOGPROB_REJECTS])
def test_token_logprobs_rejects(backend, case, changes, exc, match):
    d = _apply(_inputs(), {"backend": backend, **changes})
    d.pop("advantages")
    with pytest.raises(exc, match=match):
        token_logprobs(d.pop("logits"), d.pop("token_ids"), **d)


ADV_REJECTS = [
    ("rewards-list", dict(rewards=[1.0, 2.0], group_size=2), TypeError, "rewards must be a torch.Tensor, got list"),
    (
        "rewards-0d",
        dict(rewards=torch.tensor(1.0), group_size=1),
        ValueError,
        r"rewards must be \[B\] or \[B, R\], got shape \[\]",
    ),
    (
        "rewards-bool",
        dict(rewards=torch.ones(4, dtype=torch.bool), group_size=2),
        TypeError,
        "rewards must be a floating-point",
    ),
    (
        "group-size-float",
        dict(rewards=torch.zeros(4), group_size=2.0),
        ValueError,
        "group_size must be a positive int, got 2.0",
    ),
    (
        "group-size-bool",
        dict(rewards=torch.zeros(4), group_size=True),
        ValueError,
        "group_size must be a positive int, got True",
    ),
    (
        "group-size-larger-than-B",
        dict(rewards=torch.zeros(4), group_size=8),
        ValueError,
        "group_size=8 must divide the batch size B=4",
    ),
    (
        "group-ids-2d",
        dict(rewards=torch.zeros(4), group_ids=torch.zeros(4, 1, dtype=torch.long)),
        ValueError,
        r"group_ids must have shape \[B\]=\[4\], got \[4, 1\]",
    ),
    (
        "group-ids-too-long",
        dict(rewards=torch.zeros(4), group_ids=torch.zeros(5, dtype=torch.long)),
        ValueError,
        r"got \[5\]",
    ),
    (
        "group-ids-bool",
        dict(rewards=torch.zeros(4), group_ids=torch.zeros(4, dtype=torch.bool)),
        TypeError,
        "group_ids must be an integer",
    ),
    (
        "group-ids-list",
        dict(rewards=torch.zeros(4), group_ids=[0, 0, 1, 1]),
        TypeError,
        "group_ids must be an integer torch.Tensor",
    ),
    (
        "group-ids-on-meta",
        dict(rewards=torch.zeros(4), group_ids=torch.zeros(4, dtype=torch.long, device=META)),
        ValueError,
        "group_ids is on meta but rewards are on",
    ),
    (
        "weights-2d",
        dict(rewards=torch.zeros(4, 2), group_size=2, reward_weights=torch.ones(2, 1)),
        ValueError,
        r"reward_weights must have shape \[R\]=\[2\], got \[2, 1\]",
    ),
    (
        "weights-for-1-column",
        dict(rewards=torch.zeros(4), group_size=2, reward_weights=[1.0, 1.0]),
        ValueError,
        r"\[R\]=\[1\], got \[2\]",
    ),
    (
        "weights-inf",
        dict(rewards=torch.zeros(4, 2), group_size=2, reward_weights=[math.inf, 1.0]),
        ValueError,
        "reward_weights must be finite",
    ),
    ("eps-nan", dict(rewards=torch.zeros(4), group_size=2, eps=math.nan), ValueError, "eps must be finite"),
    (
        "reward-minus-inf",
        dict(rewards=torch.tensor([0.0, 1.0, -math.inf, 2.0]), group_size=2),
        ValueError,
        "rewards must be finite, or NaN for 'no score'; got -inf at row 2",
    ),
    (
        "reward-inf-in-a-column",
        dict(rewards=torch.tensor([[0.0, 1.0], [math.inf, 2.0]]), group_size=2),
        ValueError,
        r"got \[inf, 2.0\] at row 1",
    ),
    # estimators (docs/math.md section 10)
    (
        "estimator-unknown",
        dict(rewards=torch.zeros(4), group_size=2, estimator="ppo"),
        ValueError,
        r"estimator must be one of \['grpo', 'rloo', 'grpo_passk', 'reinforce_plus_plus_baseline', 'opo', 'gpg'\], "
        r"got 'ppo'",
    ),
    (
        "scale-unknown",
        dict(rewards=torch.zeros(4), group_size=2, scale="std"),
        ValueError,
        r"scale must be one of \['group', 'batch', 'none'\], got 'std'",
    ),
    (
        "rloo-scale-group",
        dict(rewards=torch.zeros(4), group_size=2, estimator="rloo", scale="group"),
        ValueError,
        r"scale must be one of \['none'\] with estimator='rloo', got 'group'",
    ),
    (
        "passk-scale-batch",
        dict(rewards=torch.zeros(4), group_size=2, estimator="grpo_passk", scale="batch"),
        ValueError,
        r"scale must be one of \['group', 'none'\] with estimator='grpo_passk', got 'batch'",
    ),
    (
        "gpg-normalize-then-sum",
        dict(rewards=torch.zeros(4, 2), group_size=2, estimator="gpg", multi_reward="normalize_then_sum"),
        ValueError,
        "multi_reward='normalize_then_sum' is defined for estimator='grpo' only, got 'gpg'",
    ),
    (
        "opo-without-lengths",
        dict(rewards=torch.zeros(4), group_size=2, estimator="opo"),
        ValueError,
        r"estimator='opo' needs completion_lengths \[B\], the tokens of each completion$",
    ),
    (
        "rf++-without-lengths",
        dict(rewards=torch.zeros(4), group_size=2, estimator="reinforce_plus_plus_baseline"),
        ValueError,
        r"needs completion_lengths \[B\], the tokens of each completion \(torch.ones\(B\) whitens over completions",
    ),
    (
        "lengths-for-grpo",
        dict(rewards=torch.zeros(4), group_size=2, completion_lengths=torch.ones(4)),
        ValueError,
        "completion_lengths is read only by estimator opo / reinforce_plus_plus_baseline, not 'grpo'",
    ),
    (
        "lengths-for-rloo",
        dict(rewards=torch.zeros(4), group_size=2, estimator="rloo", completion_lengths=torch.ones(4)),
        ValueError,
        "not 'rloo'",
    ),
    (
        "lengths-2d",
        dict(rewards=torch.zeros(4), group_size=2, estimator="opo", completion_lengths=torch.ones(4, 1)),
        ValueError,
        r"completion_lengths must have shape \[B\]=\[4\], got \[4, 1\]",
    ),
    (
        "lengths-too-short",
        dict(rewards=torch.zeros(4), group_size=2, estimator="opo", completion_lengths=torch.ones(3)),
        ValueError,
        r"got \[3\]",
    ),
    (
        "lengths-bool",
        dict(rewards=torch.zeros(4), group_size=2, estimator="opo", completion_lengths=torch.ones(4, dtype=torch.bool)),
        TypeError,
        "completion_lengths must be an integer or float torch.Tensor, got torch.bool",
    ),
    (
        "lengths-list",
        dict(rewards=torch.zeros(4), group_size=2, estimator="opo", completion_lengths=[1, 2, 3, 4]),
        TypeError,
        "completion_lengths must be an integer or float torch.Tensor, got list",
    ),
    (
        "lengths-negative",
        dict(rewards=torch.zeros(4), group_size=2, estimator="opo", completion_lengths=torch.tensor([3, 1, -1, 2])),
        ValueError,
        r"completion_lengths must be finite and >= 0, got -1.0 at row 2",
    ),
    (
        "lengths-nan",
        dict(
            rewards=torch.zeros(4),
            group_size=2,
            estimator="reinforce_plus_plus_baseline",
            completion_lengths=torch.tensor([3.0, math.nan, 1.0, 2.0]),
        ),
        ValueError,
        "got nan at row 1",
    ),
    (
        "lengths-inf",
        dict(
            rewards=torch.zeros(4),
            group_size=2,
            estimator="opo",
            completion_lengths=torch.tensor([3.0, 1.0, 1.0, math.inf]),
        ),
        ValueError,
        "got inf at row 3",
    ),
    (
        "lengths-on-meta",
        dict(rewards=torch.zeros(4), group_size=2, estimator="opo", completion_lengths=torch.ones(4, device=META)),
        ValueError,
        "completion_lengths is on meta but rewards are on",
    ),
]


@pytest.mark.parametrize("case,kwargs,exc,match", ADV_REJECTS, ids=[c[0] for c in ADV_REJECTS])
def test_group_advantages_rejects(backend, case, kwargs, exc, match):
    kwargs = {
        k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v) for k, v in kwargs.items()
    }
    rewards = kwargs.pop("rewards")
    with pytest.raises(exc, match=match):
        group_advantages(rewards, backend=backend, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(beta=-0.1), "beta must be >= 0"),
        (dict(importance_sampling_level="seq"), "importance_sampling_level must be one of"),
        (dict(kl_estimator="kl"), "kl_estimator must be one of"),
    ],
)
def test_module_rejects_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPOLoss(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# defined results for unusual but legal inputs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,packed_cu",
    [((2, 0), None), ((0, 3), None), ((0,), None), ((0,), (0, 0)), ((0,), (0, 0, 0))],
    ids=["T=0", "B=0", "packed-N=0", "packed-N=0-one-empty-seq", "packed-N=0-two-empty-seqs"],
)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_empty_batch(backend, shape, packed_cu, level):
    """No token at all: loss 0 (every normaliser is max(1, .)), empty outputs, metrics 0, a gradient of zeros."""
    z = torch.randn(*shape, V, device=DEVICE, requires_grad=True)
    ids = torch.zeros(shape, dtype=torch.long, device=DEVICE)
    num_seqs = shape[0] if len(shape) == 2 else (len(packed_cu) - 1 if packed_cu else 1)
    cu = None if packed_cu is None else torch.tensor(packed_cu, device=DEVICE)
    out = grpo_loss(
        z,
        ids,
        torch.randn(num_seqs, device=DEVICE),
        cu_seqlens=cu,
        old_logprobs=torch.randn(shape, device=DEVICE),
        importance_sampling_level=level,
        return_entropy=True,
        backend=backend,
    )
    assert out.loss.item() == 0.0 and out.logprobs.shape == shape and out.entropy.shape == shape
    for key in ("kl_mean", "clip_low", "clip_high", "clip_region", "entropy_mean", "logprob_mean"):
        assert getattr(out, key).item() == 0.0, key
    grad = grad_of(out.loss, z)
    assert grad.shape == z.shape
    lp, h = token_logprobs(z, ids, return_entropy=True, backend=backend)
    assert lp.shape == shape and h.shape == shape
    assert grad_of(lp.sum() + h.sum(), z).shape == z.shape


@pytest.mark.parametrize("by_ids", [False, True])
def test_empty_rewards(backend, by_ids):
    rewards = torch.zeros(0, device=DEVICE)
    groups = dict(group_ids=torch.zeros(0, dtype=torch.long, device=DEVICE)) if by_ids else dict(group_size=4)
    out = group_advantages(rewards, return_stats=True, backend=backend, **groups)
    assert out.advantages.shape == (0,) and out.group_mean.shape == (0,) and out.frac_zero_std.item() == 0.0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_vocabulary_of_one(backend, level):
    """V = 1: every log-prob and entropy is exactly 0 and the logits get a zero gradient; the loss is the
    reference's."""
    d = make_batch(3, 4, 1, seed=3)
    z = d["logits"].requires_grad_(True)
    out = grpo_loss(
        z,
        d["ids"],
        d["adv"],
        mask=d["mask"],
        old_logprobs=d["old"],
        ref_logprobs=d["ref"],
        beta=0.1,
        importance_sampling_level=level,
        return_entropy=True,
        backend=backend,
    )
    expect = ref.grpo_loss(
        z.detach().double(),
        d["ids"],
        d["adv"],
        mask=d["mask"],
        old_logprobs=d["old"],
        ref_logprobs=d["ref"],
        beta=0.1,
        importance_sampling_level=level,
    )
    assert torch.equal(out.logprobs, torch.zeros_like(out.logprobs))
    assert torch.equal(out.entropy, torch.zeros_like(out.entropy))
    assert rel_err(out.loss, expect.loss) < 1e-6
    assert torch.equal(grad_of(out.loss + out.entropy.sum(), z), torch.zeros_like(z))


def test_out_of_range_ids_where_not_taking_part(backend):
    """Ids outside [0, V) are legal where mask == 0 or id == ignore_index (e.g. a pad id beyond the vocabulary)."""
    d = make_batch(3, 5, 13, seed=4)
    ids = d["ids"].clone()
    ids[d["mask"] == 0] = 10**9
    ids[0, 0] = -7  # taking part only through ignore_index=-7
    mask = d["mask"].clone()
    kw = dict(mask=mask, old_logprobs=d["old"], ignore_index=-7)
    out = grpo_loss(d["logits"], ids, d["adv"], backend=backend, **kw)
    expect = ref.grpo_loss(d["logits"].double(), ids, d["adv"], **kw)
    assert out.logprobs[0, 0] == 0 and rel_err(out.loss, expect.loss) < 1e-5
    assert rel_err(out.logprobs, expect.logprobs) < 1e-5


def test_advantage_shape_rule(backend):
    """Padded: exactly [B] or [B, 1] is per sequence, exactly [B, T] per token, so B == T is not ambiguous.
    Packed: exactly [N] is per token, else exactly [S] or [S, 1] per sequence; when S == N the two read the same."""
    n = 4
    d = make_batch(n, n, 9, seed=5)  # B == T
    seq_adv, tok_adv = d["adv"], torch.randn(n, n, device=DEVICE)
    kw = dict(mask=d["mask"], old_logprobs=d["old"], loss_type="grpo")
    for adv in (seq_adv, seq_adv[:, None], tok_adv):
        out = grpo_loss(d["logits"], d["ids"], adv, backend=backend, **kw)
        expect = ref.grpo_loss(d["logits"].double(), d["ids"], adv, **kw)
        assert rel_err(out.per_token_loss, expect.per_token_loss) < 1e-5
    per_seq = grpo_loss(d["logits"], d["ids"], seq_adv, backend=backend, **kw)
    expanded = grpo_loss(d["logits"], d["ids"], seq_adv[:, None].expand(n, n), backend=backend, **kw)
    assert torch.equal(per_seq.loss, expanded.loss)
    # packed, S == N (one token per sequence): [S] and [N] are the same numbers and mean the same thing
    z, ids = d["logits"][0], d["ids"][0]
    cu = torch.arange(n + 1, device=DEVICE)
    a = grpo_loss(z, ids, seq_adv, cu_seqlens=cu, backend=backend)
    b = grpo_loss(z, ids, seq_adv[:, None], cu_seqlens=cu, backend=backend)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.per_token_loss, b.per_token_loss)


def test_input_dtypes_are_converted(backend):
    """Integer ids of any width, masks of any dtype, float64/bf16 advantages and log-probs: same result as the
    canonical int64 / float32 inputs (advantages and log-probs are read as float32)."""
    d = make_batch(3, 5, 17, seed=6)
    kw = dict(old_logprobs=d["old"], ref_logprobs=d["ref"], beta=0.1, backend=backend)
    base = grpo_loss(d["logits"], d["ids"], d["adv"], mask=d["mask"], **kw)
    for ids_dtype in (torch.int32, torch.int16, torch.uint8):
        out = grpo_loss(d["logits"], d["ids"].to(ids_dtype), d["adv"], mask=d["mask"], **kw)
        assert torch.equal(out.loss, base.loss), ids_dtype
    for mask in (d["mask"].bool(), d["mask"].long(), d["mask"].half()):
        assert torch.equal(grpo_loss(d["logits"], d["ids"], d["adv"], mask=mask, **kw).loss, base.loss), mask.dtype
    assert torch.equal(grpo_loss(d["logits"], d["ids"], d["adv"].double(), mask=d["mask"], **kw).loss, base.loss)
    wide = dict(kw, old_logprobs=d["old"].double(), ref_logprobs=d["ref"].double())
    assert torch.equal(grpo_loss(d["logits"], d["ids"], d["adv"], mask=d["mask"], **wide).loss, base.loss)


def test_num_items_in_batch_zero_is_clamped(backend):
    """dapo/cispo divide by max(1, num_items_in_batch), as the reference does: 0 means a divisor of 1."""
    d = make_batch(2, 4, 7, seed=7)
    kw = dict(mask=d["mask"], old_logprobs=d["old"], num_items_in_batch=0)
    out = grpo_loss(d["logits"], d["ids"], d["adv"], backend=backend, **kw)
    assert rel_err(out.loss, ref.grpo_loss(d["logits"].double(), d["ids"], d["adv"], **kw).loss) < 1e-5


def test_inplace_backward_aliasing(backend):
    """inplace_backward overwrites the logits with their gradient: anything that reads them afterwards must fail
    loudly (autograd's version counter), and logits that need no gradient are never touched."""
    d = make_batch(2, 4, 11, seed=8)
    w = torch.randn(11, 8, device=DEVICE, requires_grad=True)
    hidden = torch.randn(2, 4, 8, device=DEVICE)
    kw = dict(mask=d["mask"], inplace_backward=True, backend=backend)
    logits = hidden @ w.T
    first = grpo_loss(logits, d["ids"], d["adv"], **kw)  # two losses over the same logits
    second = grpo_loss(logits, d["ids"], -d["adv"], **kw)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (first.loss + second.loss).backward()
    logits = hidden @ w.T
    out = grpo_loss(logits, d["ids"], d["adv"], **kw)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()  # a second backward would read the gradient as logits
    frozen = d["logits"].clone()
    grpo_loss(frozen, d["ids"], d["adv"], **kw)
    assert torch.equal(frozen, d["logits"])


# ----------------------------------------------------------------------------------------------------------------
# non-finite values: at a position that takes part they propagate exactly as in the reference (NaN is never turned
# into a plausible number); at a position that does not take part they have no effect at all
# ----------------------------------------------------------------------------------------------------------------
def _poison_logits(value, target=False, whole_row=False):
    def poison(x, b, t, ids):
        if whole_row:
            x["logits"][b, t] = value
        else:
            x["logits"][b, t, ids[b, t] if target else (ids[b, t] + 3) % V] = value

    return poison


def _poison_token(key, value):
    def poison(x, b, t, ids):
        x[key][b, t] = value

    return poison


NON_FINITE = {
    "logit-nan": _poison_logits(math.nan),
    "logit-+inf": _poison_logits(math.inf),
    "logit-row--inf": _poison_logits(-math.inf, whole_row=True),
    "logit-target--inf": _poison_logits(-math.inf, target=True),
    "adv-nan": _poison_token("adv", math.nan),
    "adv-inf": _poison_token("adv", math.inf),
    "old-nan": _poison_token("old", math.nan),
    "old-+inf": _poison_token("old", math.inf),
    "old--inf": _poison_token("old", -math.inf),
    "ref-nan": _poison_token("ref", math.nan),
    "ref-+inf": _poison_token("ref", math.inf),
    "ref--inf": _poison_token("ref", -math.inf),
    "isw-nan": _poison_token("isw", math.nan),
    "isw-inf": _poison_token("isw", math.inf),
}
CONFIGS = {
    "dapo-token-k3": dict(loss_type="dapo", beta=0.04),
    "grpo-sequence-k3-bc": dict(
        loss_type="grpo", importance_sampling_level="sequence", beta=0.1, bias_corrected_kl=True
    ),
    "cispo-token-lowvar": dict(loss_type="cispo", beta=0.1, kl_estimator="low_var_kl", epsilon_high=4.0),
    "vespo-k3": dict(loss_type="vespo", beta=0.04),
    "geo_mean-k3": dict(loss_type="geo_mean", beta=0.04),
    "kl_cov-k3": dict(loss_type="kl_cov", beta=0.04, kl_cov_ratio=0.2),
}
# vespo follows TRL: a NaN in its log-weight (old log-prob, IS weight) gives phi = 0 (nan_to_num), not a NaN loss
PHI_ZEROES_NAN = {("vespo-k3", "old-nan"), ("vespo-k3", "isw-nan")}


def _non_finite_run(fn, x, z, config, **extra):
    kw = dict(mask=x["mask"], old_logprobs=x["old"], ref_logprobs=x["ref"], is_weights=x["isw"], **CONFIGS[config])
    return fn(z, x["ids"], x["adv"], **kw, **extra)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("what", list(NON_FINITE))
@pytest.mark.parametrize("taking_part", [True, False], ids=["taking-part", "masked"])
def test_non_finite_input(backend, what, config, taking_part):
    if backend in INTERPRETED and config != "dapo-token-k3":
        pytest.skip("interpreted backend: one configuration in the default run (all of them on a GPU)")
    d = make_batch(3, 5, V, seed=9, masked_tail=False, empty_row=False)
    g = torch.Generator().manual_seed(9)
    clean = dict(d, adv=torch.randn(3, 5, generator=g).to(DEVICE), isw=(0.5 + torch.rand(3, 5, generator=g)).to(DEVICE))
    clean["mask"][1, 3:] = 0
    b, t = (1, 2) if taking_part else (1, 4)
    x = {k: v.clone() for k, v in clean.items()}
    NON_FINITE[what](x, b, t, x["ids"])
    z = x["logits"].requires_grad_(True)
    out = _non_finite_run(grpo_loss, x, z, config, return_entropy=True, backend=backend)
    grad = grad_of(out.loss, z)
    if not taking_part:  # bitwise the result of the clean inputs
        z0 = clean["logits"].clone().requires_grad_(True)
        expect = _non_finite_run(grpo_loss, clean, z0, config, return_entropy=True, backend=backend)
        for key in ("loss", "logprobs", "entropy", "per_token_loss", "kl_mean", "clip_region"):
            assert torch.equal(getattr(out, key), getattr(expect, key)), key
        assert torch.equal(grad, grad_of(expect.loss, z0))
        return
    z64 = x["logits"].detach().double().requires_grad_(True)
    expect = _non_finite_run(ref.grpo_loss, x, z64, config)
    if "nan" in what and (config, what) not in PHI_ZEROES_NAN:
        assert math.isnan(out.loss.item())
    for key in ("loss", "logprobs", "entropy", "per_token_loss"):
        assert_matches(getattr(out, key), getattr(expect, key))
    # Gradient rows the bad value cannot reach (other tokens; other sequences for a sequence-level ratio) are the
    # reference's. The rows it reaches hold a 0 * inf somewhere, which autograd (the reference) and the closed form
    # resolve differently (e.g. a clipped token: 0 for us, NaN for autograd); what is required of them is that a
    # finite loss never comes with a non-finite gradient.
    reached = torch.zeros(x["ids"].shape, dtype=torch.bool, device=DEVICE)
    coupling = LossConfig(**CONFIGS[config]).coupling  # what else a token's gradient reads: its sequence, the batch
    reached[(b, t) if coupling is None else (b,) if coupling == "sequence" else ()] = True
    grad64 = grad_of(expect.loss, z64)
    assert_matches(grad[~reached], grad64[~reached])
    if math.isfinite(out.loss.item()):
        assert torch.isfinite(grad).all()


def test_nan_mask_value_takes_part(backend):
    """A mask value is a weight: NaN is != 0, so the position takes part and the loss is NaN."""
    d = make_batch(2, 4, V, seed=10)
    mask = d["mask"].clone()
    mask[0, 0] = math.nan
    assert math.isnan(grpo_loss(d["logits"], d["ids"], d["adv"], mask=mask, backend=backend).loss.item())


def test_nan_advantage_of_an_empty_sequence_has_no_effect(backend):
    d = make_batch(3, 4, V, seed=11)  # the last sequence is entirely masked
    adv = d["adv"].clone()
    adv[-1] = math.nan
    for loss_type in ("grpo", "dapo"):
        a = grpo_loss(d["logits"], d["ids"], adv, mask=d["mask"], loss_type=loss_type, backend=backend)
        b = grpo_loss(d["logits"], d["ids"], d["adv"], mask=d["mask"], loss_type=loss_type, backend=backend)
        assert torch.equal(a.loss, b.loss)


def test_nan_num_items_in_batch_tensor_propagates(backend):
    d = make_batch(2, 4, V, seed=12)
    out = grpo_loss(
        d["logits"], d["ids"], d["adv"], num_items_in_batch=torch.tensor(math.nan, device=DEVICE), backend=backend
    )
    assert math.isnan(out.loss.item())


def test_token_logprobs_nan_stays_in_its_row(backend):
    d = make_batch(2, 4, V, seed=13, masked_tail=False, empty_row=False)
    z = d["logits"].clone()
    z[1, 2, 5] = math.nan
    z.requires_grad_(True)
    lp, h = token_logprobs(z, d["ids"], return_entropy=True, backend=backend)
    z64 = z.detach().double().requires_grad_(True)
    lp64, h64 = ref.token_logprobs(z64, d["ids"])
    assert_matches(lp, lp64)
    assert_matches(h, h64)
    assert_matches(grad_of(lp.sum() + h.sum(), z), grad_of(lp64.sum() + h64.sum(), z64))


def test_nan_reward_gets_zero_and_is_excluded(backend):
    """A NaN reward: advantage exactly 0, and its group's statistics are those of the other members alone."""
    rewards = torch.tensor([0.5, math.nan, 2.0, 3.5, 1.0, 0.0, 4.0, 2.0], device=DEVICE)
    out = group_advantages(rewards, group_size=4, return_stats=True, backend=backend)
    assert out.advantages[1].item() == 0.0
    rest = torch.tensor([0.5, 2.0, 3.5], dtype=torch.float64)
    assert out.group_mean[0].item() == pytest.approx(rest.mean().item(), rel=1e-6)
    assert out.group_std[0].item() == pytest.approx(rest.std().item(), rel=1e-6)
    expect = (rest - rest.mean()) / (rest.std() + 1e-4)
    torch.testing.assert_close(out.advantages[[0, 2, 3]].cpu().double(), expect, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# regression tests of the FOUNDATION CHANGE commits
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_nan_logit_reaches_the_on_policy_loss(backend, loss_type, level):
    """Regression: without old_logprobs the ratio was a constant 1, so a NaN log-prob left the loss finite."""
    d = make_batch(2, 4, 9, seed=1, masked_tail=False, empty_row=False)
    z = d["logits"].clone()
    z[0, 1, 3] = math.nan
    kw = dict(loss_type=loss_type, importance_sampling_level=level, max_completion_length=4)
    out = grpo_loss(z, d["ids"], d["adv"], backend=backend, **kw)
    expect = ref.grpo_loss(z.double(), d["ids"], d["adv"].double(), **kw)
    assert math.isnan(expect.loss.item()) and math.isnan(out.loss.item())


def test_segment_sum_keeps_non_finite_values_in_their_segment():
    """Regression: the prefix sum carried inf/NaN into every later segment (inf - inf = NaN)."""
    inf, nan = math.inf, math.nan
    values = torch.tensor([1.0, 2.0, inf, 3.0, nan, 4.0, -inf, inf, 5.0, -inf, 6.0], device=DEVICE)
    cu = torch.tensor([0, 2, 4, 6, 8, 9, 11, 11], device=DEVICE)
    expect = torch.tensor([3.0, inf, nan, nan, 5.0, -inf, 0.0])
    torch.testing.assert_close(segment_sum(values, cu).cpu(), expect, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_non_finite_old_logprob_stays_in_its_sequence(backend, bad):
    """Regression (segment_sum): a NaN/-inf old log-prob in sequence 0 makes that sequence's loss NaN/inf as the
    reference does, and leaves the other sequences (loss values and gradient rows) as the reference has them."""
    d = make_batch(3, 4, 11, seed=2, masked_tail=False, empty_row=False)
    old = d["old"].clone()
    old[0, 2] = bad
    kw = dict(mask=d["mask"], old_logprobs=old, loss_type="grpo", importance_sampling_level="sequence")
    z = d["logits"].clone().requires_grad_(True)
    out = grpo_loss(z, d["ids"], d["adv"], backend=backend, **kw)
    z64 = d["logits"].double().requires_grad_(True)
    expect = ref.grpo_loss(z64, d["ids"], d["adv"].double(), **kw)
    assert_matches(out.loss, expect.loss)
    assert_matches(out.per_token_loss, expect.per_token_loss)
    assert_matches(grad_of(out.loss, z), grad_of(expect.loss, z64))


@pytest.mark.parametrize("bad", [math.inf, -math.inf])
def test_infinite_reward_is_an_error(backend, bad):
    """Regression: an infinite reward zeroed the advantages of its group (and, through the prefix sums, of every
    later group) without a word. It has no z-score: eager mode raises, torch.compile makes every advantage NaN."""
    rewards = torch.tensor([1.0, 2.0, bad, 3.0, 1.0, 2.0, 3.0, 4.5], device=DEVICE)
    with pytest.raises(ValueError, match=r"rewards must be finite, or NaN for 'no score'; got -?inf at row 2"):
        group_advantages(rewards, group_size=4, backend=backend)
    group_advantages(rewards.nan_to_num(posinf=0.0, neginf=0.0), group_size=4, backend=backend)  # warm: imports
    compiled = torch.compile(
        lambda r: group_advantages(r, group_size=4, backend=backend), fullgraph=True, backend="aot_eager"
    )
    assert torch.isnan(compiled(rewards)).all()


def test_negative_completion_length_is_an_error(backend):
    """A negative (or NaN) completion length has no meaning as a weight: eager mode raises, torch.compile (no
    data-dependent errors) makes every advantage NaN, as for an infinite reward."""
    rewards = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 2.0, 3.0, 4.5], device=DEVICE)
    lengths = torch.tensor([3, 1, 4, -2, 5, 9, 2, 6], device=DEVICE)
    with pytest.raises(ValueError, match=r"completion_lengths must be finite and >= 0, got -2.0 at row 3"):
        group_advantages(rewards, group_size=4, estimator="opo", completion_lengths=lengths, backend=backend)
    compiled = torch.compile(
        lambda r, n: group_advantages(r, group_size=4, estimator="opo", completion_lengths=n, backend=backend),
        fullgraph=True,
        backend="aot_eager",
    )
    assert torch.isnan(compiled(rewards, lengths)).all()
    assert not torch.isnan(compiled(rewards, lengths.abs())).any()
