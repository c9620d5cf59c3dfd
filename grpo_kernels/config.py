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

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
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


def knob(default, help: str, *, choices=None, low=None, low_inclusive: bool = True, checked: bool = True):
    """A field of a configuration: its default, one line of help, and its check (``choices`` or a lower bound;
    ``checked=False`` for a field that a rule of ``__post_init__`` checks instead)."""
    meta = {"help": help, "choices": choices, "low": low, "low_inclusive": low_inclusive, "checked": checked}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class LossConfig:
    """The hyper-parameters of the GRPO loss (docs/math.md sections 3-6). Defaults are TRL 1.16's.

    Built once per call (or once per :class:`grpo_kernels.GRPOLoss`) and checked here: a wrong value raises
    ``ValueError`` / ``TypeError`` naming the argument. ``epsilon_high=None`` resolves to ``epsilon_low``.
    """

    loss_type: str = knob("dapo", "aggregation (and policy term for cispo, sapo)", choices=LOSS_TYPES)
    beta: float = knob(0.0, "KL coefficient; > 0 needs the reference policy's log-probs", low=0)
    epsilon_low: float = knob(0.2, "lower clip range of the ratio", low=0)
    epsilon_high: float | None = knob(None, "upper clip range (default: epsilon_low; cispo: the cap of the ratio)", low=0)
    delta: float | None = knob(None, "two-sided clip: the ratio is capped at delta > 1 (INTELLECT-2)", low=1,
                               low_inclusive=False)  # fmt: skip
    dual_clip: float | None = knob(None, "dual-clip constant c > 1 for negative advantages (verl)", low=1,
                                   low_inclusive=False)  # fmt: skip
    temperature: float = knob(1.0, "divides the logits before the softmax (the sampling temperature)", low=0,
                              low_inclusive=False)  # fmt: skip
    importance_sampling_level: str = knob("token", "ratio per token, or per sequence (GSPO)", choices=IS_LEVELS)
    kl_estimator: str = knob("k3", "estimator of the KL to the reference policy", choices=KL_ESTIMATORS)
    bias_corrected_kl: bool = knob(False, "multiply the KL by the ratio (TRL's use_bias_correction_kl)")
    sapo_temperature_pos: float = knob(1.0, "SAPO temperature for positive advantages", low=0, low_inclusive=False)
    sapo_temperature_neg: float = knob(1.05, "SAPO temperature for negative advantages", low=0, low_inclusive=False)
    max_completion_length: int | None = knob(None, "dr_grpo's normaliser: sum m L / (B * max_completion_length)",
                                             checked=False)  # checked by the dr_grpo rule below  # fmt: skip

    def __post_init__(self):
        check_fields(self)
        if self.epsilon_high is None:
            object.__setattr__(self, "epsilon_high", self.epsilon_low)
        length = self.max_completion_length
        if self.loss_type == "dr_grpo" and (isinstance(length, bool) or not isinstance(length, int) or length <= 0):
            raise ValueError(f"loss_type='dr_grpo' needs max_completion_length, a positive int; got {length!r}")

    # ---- derived facts that callers ask about (so that they need not name the knobs) -------------------------
    @property
    def sequence_level(self) -> bool:
        return self.importance_sampling_level == "sequence"

    @property
    def uses_reference(self) -> bool:
        """The loss reads the reference policy's log-probs (``beta != 0``)."""
        return self.beta != 0.0

    @property
    def normalised_by_items(self) -> bool:
        """The loss is a sum over tokens divided by ``num_items_in_batch`` (dapo, cispo): under gradient
        accumulation it is already a share of the global batch and needs no ``1 / accumulation`` scale."""
        return self.loss_type in ("dapo", "cispo")


@dataclass(frozen=True)
class AdvantageConfig:
    """The settings of the group-relative advantages (docs/math.md section 2, section 10 for the estimators).
    Defaults are TRL 1.16's. ``scale=None`` resolves to the estimator's own (``ADVANTAGE_ESTIMATORS``)."""

    scale: str | None = knob(None, "denominator: the group's std, the batch's std, or none (Dr. GRPO); default: the "
                                   "estimator's own (group for grpo)", choices=ADVANTAGE_SCALES)  # fmt: skip
    eps: float = knob(1e-4, "added to the std (TRL 1e-4; verl 1e-6)", low=0)
    multi_reward: str = knob("sum_then_normalize", "how several reward columns combine", choices=MULTI_REWARD_MODES)
    estimator: str = knob("grpo", "advantage estimator (verl's names; opo and reinforce_plus_plus_baseline read the "
                                  "completion lengths)", choices=tuple(ADVANTAGE_ESTIMATORS))  # fmt: skip

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


__all__ = ["ADVANTAGE_ESTIMATORS", "ADVANTAGE_SCALES", "ESTIMATORS_WITH_LENGTHS", "IS_LEVELS", "KL_ESTIMATORS", "KNOBS", "LOSS_TYPES", "MULTI_REWARD_MODES", "AdvantageConfig",
           "LossConfig", "check_option", "config_from", "knob", "knob_table", "with_knob_parameters"]
