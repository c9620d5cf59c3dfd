"""Custom ops whose arguments include structures (a :class:`TokenBatch`, a :class:`LossConfig`): the one place
where such a structure is turned into op arguments and back.

A ``torch.library`` op takes tensors and scalars. Ours are called with a few tensors (what autograd differentiates),
then structures and options by name. :func:`struct_op` builds the schema from the structures' field types, so a new
field of ``LossConfig`` or ``TokenBatch`` is a new op argument with no edit here:

    Tensor -> Tensor        Tensor | None -> Tensor?        str -> str        bool -> bool    torch.dtype -> ScalarType
    int -> SymInt           int | None -> SymInt?           float -> Tensor   float | None -> Tensor?

A float travels as a 0-dim float64 CPU tensor (exact), not as a ``float`` argument: torch.compile specialises a
float argument of a custom op on its value, so a new ``beta`` would recompile the graph each time; a tensor is an
input like any other. The op decodes the structure on the host when it runs, which also re-checks the configuration
(under torch.compile the floats may be symbolic while tracing, so that is where a bad value is caught).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable

import torch
from torch import Tensor

_FIELDS: dict[type, list[tuple[str, object]]] = {}


def _fields(cls) -> list[tuple[str, object]]:
    """``(name, type)`` of a dataclass's or NamedTuple's fields, types resolved (once per class: the first call comes
    from the op's definition, never from code torch.compile traces)."""
    if cls not in _FIELDS:
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else list(cls._fields)
        _FIELDS[cls] = [(name, hints[name]) for name in names]
    return _FIELDS[cls]


def _schema_type(hint) -> str:
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    kind = {Tensor: "Tensor", str: "str", bool: "bool", int: "SymInt", float: "Tensor", torch.dtype: "ScalarType"}[base]
    return kind + ("?" if optional else "")


def _is_float(hint) -> bool:
    return hint is float or (float in typing.get_args(hint))


def _encode_value(hint, x):
    if _is_float(hint) and x is not None:
        return torch.ones((), dtype=torch.float64) * x  # traced as an op on the (maybe symbolic) float
    return x


def _decode_value(hint, x):
    return x.item() if _is_float(hint) and x is not None else x


def encode(value) -> dict[str, object]:
    """A structure as op arguments by name (floats as 0-dim float64 CPU tensors)."""
    return {name: _encode_value(hint, getattr(value, name)) for name, hint in _fields(type(value))}


def decode(cls, args: dict[str, object]):
    """The inverse of :func:`encode`, run when the op executes (floats read back on the host)."""
    return cls(**{name: _decode_value(hint, args[name]) for name, hint in _fields(cls)})


class StructOp:
    """A custom op called as ``op(*tensors, batch=..., config=..., option=...)``.

    ``positional`` and ``options`` map argument names to Python types (``{"logits": Tensor}``, ``{"backend": str,
    "temperature": float}``); ``structs`` maps a keyword to a structure type, whose fields become op arguments. In
    the schema every tensor is positional (custom ops take no keyword-only tensors; the order is this class's
    business, callers use names) and every other argument is keyword-only.
    """

    def __init__(self, qualname: str, fn: Callable, *, positional, structs, options, returns, mutates_args):
        self.structs = dict(structs)
        self.options = dict(options)
        self.positional = dict(positional)
        args = [(name, _schema_type(hint)) for name, hint in self.positional.items()]
        for cls in self.structs.values():
            args += [(name, _schema_type(hint)) for name, hint in _fields(cls)]
        args += [(name, _schema_type(hint)) for name, hint in self.options.items()]
        names = [name for name, _ in args]
        assert len(names) == len(set(names)), f"{qualname}: two arguments share a name: {names}"
        tensors = [(n, k) for n, k in args if k.startswith("Tensor")]
        others = [(n, k) for n, k in args if not k.startswith("Tensor")]
        self.tensor_names = [n for n, _ in tensors]  # the op's positional arguments, in order
        mutated = set(mutates_args)
        declare = lambda n, k: f"Tensor(a!) {n}" if n in mutated else f"{k} {n}"  # noqa: E731
        arguments = [declare(n, k) for n, k in tensors] + (["*"] if others else []) + [f"{k} {n}" for n, k in others]
        self.schema = f"({', '.join(arguments)}) -> {returns}"

        def flat(*tensors, **kwargs):
            return fn(**self._decode(self.named(tensors, kwargs)))

        self.op = torch.library.custom_op(qualname, flat, mutates_args=tuple(mutates_args), schema=self.schema)

    def named(self, tensors: tuple, kwargs: dict) -> dict[str, object]:
        """Every op argument by name, from the op's positional tensors and keyword arguments."""
        return {**dict(zip(self.tensor_names, tensors)), **kwargs}

    def _decode(self, args: dict) -> dict:
        out = {name: args[name] for name in self.positional}
        out.update({key: decode(cls, args) for key, cls in self.structs.items()})
        out.update({name: _decode_value(hint, args[name]) for name, hint in self.options.items()})
        return out

    def __call__(self, *tensors, **structured):
        args = dict(zip(self.positional, tensors))
        for key in self.structs:
            args.update(encode(structured[key]))
        args.update({name: _encode_value(hint, structured[name]) for name, hint in self.options.items()})
        return self.op(
            *[args[n] for n in self.tensor_names], **{k: v for k, v in args.items() if k not in self.tensor_names}
        )

    def register_fake(self, fn: Callable) -> Callable:
        """``fn(*tensors, **structs, **options)``: the output shapes. Structures without floats (a TokenBatch, a
        GroupLayout) are rebuilt; configurations are not passed (their floats have no value while tracing)."""
        tensor_structs = {
            key: cls for key, cls in self.structs.items() if not any(_is_float(h) for _, h in _fields(cls))
        }

        def fake(*tensors, **kwargs):
            args = self.named(tensors, kwargs)
            rebuilt = {key: cls(**{n: args[n] for n, _ in _fields(cls)}) for key, cls in tensor_structs.items()}
            return fn(*[args[n] for n in self.positional], **rebuilt, **{n: args[n] for n in self.options})

        self.op.register_fake(fake)
        return fn

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """``setup_context(ctx, args, output)`` gets every op argument by name (``args["temperature"]`` is the 0-dim
        tensor, ``args["backend"]`` a str); ``backward(ctx, *grads)`` returns one gradient per ``positional`` tensor
        of the decorator (the other tensors of the op get None)."""
        extra = len(self.tensor_names) - len(self.positional)

        def setup(ctx, inputs, keyword_only_inputs, output):
            setup_context(ctx, self.named(inputs, keyword_only_inputs), output)

        def backward_all(ctx, *grads):
            result = backward(ctx, *grads)
            result = result if isinstance(result, tuple) else (result,)
            return (*result, *[None] * extra)

        self.op.register_autograd(backward_all, setup_context=setup)


def struct_op(qualname: str, *, positional, structs=None, options=None, returns: str, mutates_args=()):
    """Decorator: ``@struct_op("grpo_kernels::grpo_loss", positional={"logits": Tensor}, structs={"batch": TokenBatch,
    "config": LossConfig}, options={"with_entropy": bool, "backend": str}, returns="(Tensor, Tensor)")``; the
    decorated function takes every argument by name, structures rebuilt (``fn(logits, *, batch, config, ...)``)."""

    def wrap(fn: Callable) -> StructOp:
        return StructOp(
            qualname,
            fn,
            positional=positional,
            structs=structs or {},
            options=options or {},
            returns=returns,
            mutates_args=mutates_args,
        )

    return wrap
