"""The configurations: every hyper-parameter of the loss (and of the advantages), its default, check and help.

:class:`LossConfig` is frozen and validated when it is built. Everything else is derived from its fields:

* the keyword arguments (and signatures) of ``grpo_loss``, ``GRPOLoss``, the fused-linear loss and its module;
* the custom ops' schemas (:mod:`grpo_kernels.ops._define` encodes a config as op arguments and decodes it back);
* ``grpo-train``'s loss flags (:mod:`grpo_kernels.trainer.config`);
* the knob table of the docs (:func:`knob_table`).

The TRL drop-in maps ``GRPOConfig`` onto it in one table (``integrations/trl.py``). Adding a knob is one field here,
its math in ``reference.py``, ``loss_math.py`` and the kernels, and its tests (``docs/developing.md``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass, field

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "geo_mean", "gpg", "clip_cov", "kl_cov")
# the aggregation c_t of docs/math.md section 6, named by the loss type that uses it
AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
# each loss type's own aggregation (the ``aggregation`` knob overrides it): TRL's for TRL's types, verl's default
# ``loss_agg_mode`` ("token-mean" = bnpo) for gpg / clip_cov / kl_cov, and the mean over sequences for geo_mean
# (verl ignores loss_agg_mode there)
DEFAULT_AGGREGATION = {
    "grpo": "grpo",
    "bnpo": "bnpo",
    "dr_grpo": "dr_grpo",
    "dapo": "dapo",
    "cispo": "dapo",
    "sapo": "grpo",
    "vespo": "dapo",
    "geo_mean": "grpo",
    "gpg": "bnpo",
    "clip_cov": "bnpo",
    "kl_cov": "bnpo",
}
# loss types with a ratio of their own (verl's): the token-level ratio only, no delta / dual clip
OWN_RATIO_LOSS_TYPES = ("geo_mean", "gpg", "clip_cov", "kl_cov")
# estimators of the KL from the sampled token's two log-probs (docs/math.md section 5)
SAMPLED_KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
# ... and "exact": KL(p||q) over the whole vocabulary from the reference policy's logits (docs/math.md section 11)
KL_ESTIMATORS = SAMPLED_KL_ESTIMATORS + ("exact",)
IS_LEVELS = ("token", "sequence")
ADVANTAGE_SCALES = ("group", "batch", "none")
MULTI_REWARD_MODES = ("sum_then_normalize", "normalize_then_sum")
# Group-relative advantage estimators (verl 0.9's names) -> the scales each accepts; the first is its default.
ADVANTAGE_ESTIMATORS = {
    "grpo": ("group", "batch", "none"),
    "rloo": ("none",),
    "grpo_passk": ("group", "none"),
    "reinforce_plus_plus_baseline": ("none",),
    "opo": ("none",),
    "gpg": ("none",),
}
ESTIMATORS_WITH_LENGTHS = ("opo", "reinforce_plus_plus_baseline")  # need completion_lengths


def knob(
    default,
    help: str,
    *,
    choices=None,
    low=None,
    low_inclusive: bool = True,
    high=None,
    high_inclusive: bool = True,
    checked: bool = True,
):
    """A field of a configuration: its default, one line of help, and its check (``choices``, or a lower and/or an
    upper bound; ``checked=False`` for a field that a rule of ``__post_init__`` checks instead)."""
    meta = {
        "help": help,
        "choices": choices,
        "low": low,
        "low_inclusive": low_inclusive,
        "high": high,
        "high_inclusive": high_inclusive,
        "checked": checked,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class LossConfig:
    """The hyper-parameters of the GRPO loss (docs/math.md sections 3-6). Defaults are TRL 1.16's.

    Built once per call (or once per :class:`grpo_kernels.GRPOLoss`) and checked here: a wrong value raises
    ``ValueError`` / ``TypeError`` naming the argument. ``epsilon_high=None`` resolves to ``epsilon_low``.
    """

    loss_type: str = knob(
        "dapo", "policy term and its default aggregation (docs/math.md sections 4, 6, 9)", choices=LOSS_TYPES
    )
    beta: float = knob(0.0, "KL coefficient; > 0 needs the reference policy's log-probs", low=0)
    epsilon_low: float = knob(0.2, "lower clip range of the ratio", low=0)
    epsilon_high: float | None = knob(
        None, "upper clip range (default: epsilon_low; cispo: the cap of the ratio)", low=0
    )
    delta: float | None = knob(
        None, "two-sided clip: the ratio is capped at delta > 1 (INTELLECT-2)", low=1, low_inclusive=False
    )
    dual_clip: float | None = knob(
        None, "dual-clip constant c > 1 for negative advantages (verl)", low=1, low_inclusive=False
    )
    temperature: float = knob(
        1.0, "divides the logits before the softmax (the sampling temperature)", low=0, low_inclusive=False
    )
    importance_sampling_level: str = knob("token", "ratio per token, or per sequence (GSPO)", choices=IS_LEVELS)
    kl_estimator: str = knob(
        "k3", "KL to the reference: a sampled-token estimator, or exact (needs ref_logits)", choices=KL_ESTIMATORS
    )
    bias_corrected_kl: bool = knob(False, "multiply the KL by the ratio (TRL's use_bias_correction_kl)")
    sapo_temperature_pos: float = knob(1.0, "SAPO temperature for positive advantages", low=0, low_inclusive=False)
    sapo_temperature_neg: float = knob(1.05, "SAPO temperature for negative advantages", low=0, low_inclusive=False)
    max_completion_length: int | None = knob(
        None, "dr_grpo's normaliser: sum m L / (B * max_completion_length)", checked=False
    )  # checked by the dr_grpo rule below
    aggregation: str | None = knob(
        None, "c_t of another loss type's aggregation (default: loss_type's own)", choices=AGGREGATIONS
    )
    vespo_k_pos: float = knob(2.0, "VESPO power k of the gamma weight for A >= 0 (TRL)")
    vespo_lambda_pos: float = knob(
        3.0, "VESPO decay lambda of the gamma weight for A >= 0 (TRL)", low=0, low_inclusive=False
    )
    vespo_k_neg: float = knob(3.0, "VESPO power k of the gamma weight for A < 0 (TRL)")
    vespo_lambda_neg: float = knob(
        2.0, "VESPO decay lambda of the gamma weight for A < 0 (TRL)", low=0, low_inclusive=False
    )
    clip_cov_ratio: float = knob(
        2e-4, "clip_cov: fraction of the tokens whose loss is dropped (verl)", low=0, low_inclusive=False, high=1
    )
    clip_cov_lb: float = knob(1.0, "clip_cov: lower bound of the covariance band of droppable tokens (verl)")
    clip_cov_ub: float = knob(5.0, "clip_cov: upper bound of that band, > clip_cov_lb (verl)")
    kl_cov_ratio: float = knob(
        2e-4,
        "kl_cov: fraction of the tokens that get the |log-ratio| penalty (verl)",
        low=0,
        low_inclusive=False,
        high=1,
    )
    ppo_kl_coef: float = knob(1.0, "kl_cov: coefficient of the |log-ratio| penalty (verl)", low=0)

    def __post_init__(self):
        check_fields(self)
        if self.epsilon_high is None:
            object.__setattr__(self, "epsilon_high", self.epsilon_low)
        length = self.max_completion_length
        bad_length = isinstance(length, bool) or not isinstance(length, int) or length <= 0
        if self.aggregation_mode == "dr_grpo" and bad_length:
            what = "loss_type='dr_grpo'" if self.loss_type == "dr_grpo" else "aggregation='dr_grpo'"
            raise ValueError(f"{what} needs max_completion_length, a positive int; got {length!r}")
        if self.loss_type in OWN_RATIO_LOSS_TYPES and self.sequence_level:
            raise ValueError(
                f"loss_type={self.loss_type!r} uses the token-level ratio (verl's); importance_sampling_level must be "
                "'token'"
            )
        if self.loss_type in OWN_RATIO_LOSS_TYPES + ("vespo",):
            for name in ("delta", "dual_clip"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} applies to the clip family (grpo, bnpo, dr_grpo, dapo), not to "
                        f"loss_type={self.loss_type!r}; leave it None"
                    )
        if self.exact_kl and self.bias_corrected_kl:
            raise ValueError(
                "bias_corrected_kl reweights a sampled-token KL estimate by the ratio; kl_estimator='exact' sums the "
                "KL over the whole vocabulary, which needs no such correction: leave bias_corrected_kl False"
            )
        if not torch.compiler.is_compiling() and not self.clip_cov_lb < self.clip_cov_ub:  # floats: eager only
            raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got {self.clip_cov_lb} and {self.clip_cov_ub}")

    # ---- derived facts that callers ask about (so that they need not name the knobs) -------------------------
    @property
    def sequence_level(self) -> bool:
        return self.importance_sampling_level == "sequence"

    @property
    def uses_reference(self) -> bool:
        """The loss reads the reference policy's log-probs (``beta != 0``)."""
        return self.beta != 0.0

    @property
    def exact_kl(self) -> bool:
        """The KL term is the exact KL(p||q) over the vocabulary (``kl_estimator="exact"``): the loss reads the
        reference policy's logits instead of its log-probs."""
        return self.kl_estimator == "exact"

    @property
    def aggregation_mode(self) -> str:
        """The aggregation in force: ``aggregation``, or the loss type's own (``DEFAULT_AGGREGATION``)."""
        return self.aggregation or DEFAULT_AGGREGATION[self.loss_type]

    @property
    def coupling(self) -> str | None:
        """What a token's ``g_t`` needs besides its own row: None (nothing: the kernels' per-token epilogue),
        ``"sequence"`` (its sequence: the GSPO ratio, vespo's weight, geo_mean's ratio) or ``"batch"`` (the whole
        batch: clip_cov's and kl_cov's covariance selection). Either is an ``[N]``-sized step between the log-prob
        pass and the gradient pass (docs/math.md sections 8, 9), never another pass over the logits."""
        if self.loss_type in ("clip_cov", "kl_cov"):
            return "batch"
        if self.sequence_level or self.loss_type in ("vespo", "geo_mean"):
            return "sequence"
        return None

    @property
    def normalised_by_items(self) -> bool:
        """The loss is a sum over tokens divided by ``num_items_in_batch`` (dapo's aggregation: dapo, cispo, vespo):
        under gradient accumulation it is already a share of the global batch and needs no ``1 / accumulation``
        scale."""
        return self.aggregation_mode == "dapo"


@dataclass(frozen=True)
class AdvantageConfig:
    """The settings of the group-relative advantages (docs/math.md section 2, section 10 for the estimators).
    Defaults are TRL 1.16's. ``scale=None`` resolves to the estimator's own (``ADVANTAGE_ESTIMATORS``)."""

    scale: str | None = knob(
        None,
        "denominator: the group's std, the batch's std, or none (Dr. GRPO); default: the "
        "estimator's own (group for grpo)",
        choices=ADVANTAGE_SCALES,
    )
    eps: float = knob(1e-4, "added to the std (TRL 1e-4; verl 1e-6)", low=0)
    multi_reward: str = knob("sum_then_normalize", "how several reward columns combine", choices=MULTI_REWARD_MODES)
    estimator: str = knob(
        "grpo",
        "advantage estimator (verl's names; opo and reinforce_plus_plus_baseline read the completion lengths)",
        choices=tuple(ADVANTAGE_ESTIMATORS),
    )

    def __post_init__(self):
        check_fields(self)
        allowed = ADVANTAGE_ESTIMATORS[self.estimator]  # its scales, the default first
        if self.scale is None:
            object.__setattr__(self, "scale", allowed[0])
        if self.scale not in allowed:
            which = "" if self.estimator == "grpo" else f" with estimator={self.estimator!r}"
            raise ValueError(f"scale must be one of {list(allowed)}{which}, got {self.scale!r}")
        if self.multi_reward == "normalize_then_sum" and self.estimator != "grpo":
            raise ValueError(
                f"multi_reward='normalize_then_sum' is defined for estimator='grpo' only, got {self.estimator!r}"
            )
        if self.multi_reward == "normalize_then_sum" and self.scale != "group":
            raise ValueError(
                "multi_reward='normalize_then_sum' normalises per group then over the batch; scale must be 'group'"
            )

    @property
    def reads_lengths(self) -> bool:
        return self.estimator in ESTIMATORS_WITH_LENGTHS


# ----------------------------------------------------------------------------------------------------------------
# checks, driven by each field's type and metadata
# ----------------------------------------------------------------------------------------------------------------
_HINTS: dict[type, dict[str, object]] = {}


def _hints(cls) -> dict[str, object]:
    """The resolved field types of a configuration class (resolved once: ``get_type_hints`` is slow)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _base(hint):
    """``float | None`` -> ``(float, True)``."""
    args = typing.get_args(hint)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return hint, False


def _checked(name: str, value, hint, meta):
    kind, optional = _base(hint)
    if value is None:
        if optional:
            return None
        raise TypeError(f"{name} must be a {kind.__name__}, got None")
    if meta.get("choices") is not None:
        if value not in meta["choices"]:
            raise ValueError(f"{name} must be one of {list(meta['choices'])}, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        expected = "an int" if kind is int else "a number"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    low, inclusive = meta.get("low"), meta.get("low_inclusive", True)
    if low is not None and (value < low or (value == low and not inclusive)):
        raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {low}, got {value}")
    high, inclusive = meta.get("high"), meta.get("high_inclusive", True)
    if high is not None and (value > high or (value == high and not inclusive)):
        raise ValueError(f"{name} must be {'<=' if inclusive else '<'} {high}, got {value}")
    return float(value) if kind is float else value


def check_fields(config) -> None:
    """Check (and normalise: ints to floats) every field of a configuration, by its type and its knob metadata.

    Skipped while torch.compile traces: the float knobs may be symbolic then. They are checked when the op runs:
    the op decodes its arguments and so builds the configuration again, eagerly.
    """
    if torch.compiler.is_compiling():
        return
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        if f.metadata["checked"]:
            object.__setattr__(config, f.name, _checked(f.name, getattr(config, f.name), hints[f.name], f.metadata))


def check_option(name: str, value, hint, *, choices=None, low=None, low_inclusive: bool = True):
    """The same check for an argument that is not a knob (``loss_scale``, ``entropy_coef``, ``logit_scale``, ...)."""
    return _checked(name, value, hint, {"choices": choices, "low": low, "low_inclusive": low_inclusive})


# ----------------------------------------------------------------------------------------------------------------
# entry points take the knobs as keyword arguments: split them off, build the config, generate signatures
# ----------------------------------------------------------------------------------------------------------------
KNOBS = tuple(f.name for f in dataclasses.fields(LossConfig))


_NAMES = {cls: frozenset(f.name for f in dataclasses.fields(cls)) for cls in (LossConfig, AdvantageConfig)}


def config_from(cls, where: str, knobs: dict):
    """``cls(**knobs)``, with an unknown keyword named as the entry point ``where`` would name it."""
    unknown = set(knobs) - _NAMES[cls]  # (names computed at import: torch.compile cannot trace fields() of a class)
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    return cls(**knobs)


def with_knob_parameters(function, cls, *, after: str):
    """Give ``function(..., **knobs)`` a signature that lists every field of ``cls`` (name, default, annotation)
    after the parameter ``after``: what ``help()``, ``inspect.signature`` and IDEs show is the full argument list."""
    signature = inspect.signature(function)
    hints = _hints(cls)
    params = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    at = [p.name for p in params].index(after) + 1
    knobs = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
        for f in dataclasses.fields(cls)
    ]
    function.__signature__ = signature.replace(parameters=params[:at] + knobs + params[at:])
    return function


def knob_table(cls=LossConfig) -> str:
    """The knobs of ``cls`` as a markdown table (name, default, meaning), for the docs."""
    rows = ["| knob | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        choices = f.metadata["choices"]
        meaning = f.metadata["help"] + (f" ({', '.join(choices)})" if choices else "")
        rows.append(f"| `{f.name}` | `{f.default!r}` | {meaning} |")
    return "\n".join(rows)


__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "ADVANTAGE_SCALES",
    "AGGREGATIONS",
    "DEFAULT_AGGREGATION",
    "ESTIMATORS_WITH_LENGTHS",
    "IS_LEVELS",
    "KL_ESTIMATORS",
    "SAMPLED_KL_ESTIMATORS",
    "KNOBS",
    "LOSS_TYPES",
    "MULTI_REWARD_MODES",
    "AdvantageConfig",
    "LossConfig",
    "check_option",
    "config_from",
    "knob",
    "knob_table",
    "with_knob_parameters",
]
