"""``--fsdp``: the policy (and the reference copy) sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

What shards where (W ranks, P parameters)::

    fully_shard(layer) for every decoder layer (the classes in the model's ``_no_split_modules``), then
    fully_shard(model): the root group holds the rest (embeddings, final norm, LM head; tied weights stay one).
    Every parameter is a DTensor sharded on dim 0: rank r keeps rows [r * ceil(n / W), (r + 1) * ceil(n / W)).
    Gradients and AdamW moments are sharded the same way: 4 + 4 + 4 = 12 B per parameter / W in float32.

Training passes run FSDP's own hooks: each group is all-gathered before its forward, freed after it (the root
group stays until the backward), all-gathered again for its backward, and its gradient reduce-scattered (summed and
divided by W, as DDP averages). Gradient accumulation reduce-scatters on every micro-batch, so only sharded
gradients are ever kept (FSDP's ``set_requires_gradient_sync(False)`` would hold P unsharded gradients instead).

Passes without a gradient (generation, old and reference log-probs, held-out evaluation) run inside
:func:`full_weights`: one all-gather per group, then no collective until the weights are resharded. ``generate``
stops when its batch has ended and held-out shards differ in size, so ranks run different numbers of forward passes
there; FSDP's per-forward all-gathers would then not pair up across ranks and hang. The price is the full weights on
every rank for the duration of those passes.

Checkpoints are gathered (:func:`full_state_dict`, :func:`full_optimizer_state`): rank 0 writes the same
single-file safetensors + manifest as a run without FSDP, through the same atomic rename (``checkpoint.py``), and
every rank reads the full tensors back and keeps its shard (:func:`shard_like`). See docs/distributed.md (section 3)
for the reason.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def _fsdp():
    from torch.distributed import fsdp

    return fsdp


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules whose class is in the model's ``_no_split_modules`` (transformers' decoder-layer classes)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"--fsdp: {type(model).__name__} declares no decoder-layer classes (_no_split_modules = {sorted(names)}) "
            "found in the model; FSDP2 shards one group per decoder layer"
        )
    return layers


def shard(model: nn.Module, *, bf16: bool) -> nn.Module:
    """``fully_shard`` every decoder layer, then the root (in place; returns ``model``).

    ``bf16``: FSDP2 mixed precision, bf16 parameters in forward and backward, float32 gradient reduction and
    float32 master weights and moments. Only on CUDA (the caller decides): on CPU everything stays float32.
    """
    fsdp = _fsdp()
    policy = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for layer in decoder_layers(model):
        fsdp.fully_shard(layer, reshard_after_forward=True, **kwargs)
    # FSDP2's default for the root, made explicit so that full_weights can restore it: its group stays gathered
    # from the forward to the backward (it would be all-gathered again at once).
    fsdp.fully_shard(model, reshard_after_forward=False, **kwargs)
    return model


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    fsdp = _fsdp()
    return [m for m in model.modules() if isinstance(m, fsdp.FSDPModule)]


@contextmanager
def full_weights(*models: nn.Module | None):
    """Every FSDP group of ``models`` unsharded (one all-gather each) for the duration; no collective inside.

    A no-op for a model that is not FSDP-sharded (or None).
    """
    roots = [model for model in models if model is not None and _fsdp_modules(model)]
    for root in roots:
        root.set_reshard_after_forward(False)  # the forwards inside find their group unsharded: no all-gather
        for m in _fsdp_modules(root):
            m.unshard()
    try:
        yield
    finally:
        for root in roots:
            for m in _fsdp_modules(root):
                m.reshard()
            root.set_reshard_after_forward(True)  # the settings of shard(): layers True, the root False
            root.set_reshard_after_forward(False, recurse=False)


def reference_copy(model: nn.Module, *, bf16: bool) -> nn.Module:
    """A frozen copy of the sharded ``model``, sharded the same way, built on the meta device (never whole).

    Every rank copies its own shards and every buffer: no communication, and exactly the policy's values.
    """
    fsdp = _fsdp()
    cls = next(c for c in type(model).__mro__[1:] if not issubclass(c, fsdp.FSDPModule))  # the class FSDP2 wrapped
    device = next(model.parameters()).device
    with torch.device("meta"):
        copy = cls(model.config)
    shard(copy, bf16=bf16)
    copy.to_empty(device=device)
    with torch.no_grad():
        for (name, dst), (_, src) in zip(copy.named_parameters(), model.named_parameters(), strict=True):
            assert dst.shape == src.shape, name
            dst.to_local().copy_(src.to_local())
        for dst, src in zip(copy.buffers(), model.buffers(), strict=True):
            dst.copy_(src)
    return copy.requires_grad_(False).eval()


def _first_names(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """name -> the first name holding the same storage (tied weights: ``lm_head.weight`` -> the embedding's)."""
    first, out = {}, {}
    for name, t in state.items():
        local = t.to_local() if is_sharded(t) else t
        out[name] = first.setdefault((local.untyped_storage().data_ptr(), local.storage_offset(), local.shape), name)
    return out


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every shard gathered, on CPU; tied names share one tensor, as in the unsharded
    model (``save_pretrained`` stores it once). Collective: every rank calls it, in step."""
    state, out = model.state_dict(), {}
    for name, first in _first_names(state).items():
        if first != name:
            out[name] = out[first]
            continue
        t = state[name]
        out[name] = (t.full_tensor() if is_sharded(t) else t).detach().cpu().contiguous()
    return out


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the names of a tensor already listed (safetensors refuses shared tensors)."""
    seen, out = set(), {}
    for name, t in state.items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (every rank holds it) as a tensor placed like ``like``: its own shard when ``like`` is a DTensor."""
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=like.device, dtype=like.dtype)
    if not is_sharded(like):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)  # no communication


def load_full_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy a :func:`full_state_dict` (tied names once: :func:`unique_tensors`) into the sharded ``model``; each
    rank keeps its shard."""
    state = model.state_dict()
    first = _first_names(state)
    needed = {first[name] for name in state}
    if not needed <= tensors.keys() or not tensors.keys() <= state.keys():
        missing, extra = sorted(needed - tensors.keys()), sorted(tensors.keys() - state.keys())
        raise ValueError(f"{where}: the model's tensors do not match (missing {missing[:5]}, unexpected {extra[:5]})")
    with torch.no_grad():
        for name in needed:
            target, full = state[name], tensors[name]
            if full.shape != target.shape:
                raise ValueError(f"{where}: {name} is {list(full.shape)}, the model's {list(target.shape)}")
            target.copy_(shard_like(full, target))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded moment gathered: the format of an unsharded optimizer.
    Collective: every rank calls it, in step."""
    sd = optimizer.state_dict()
    state = {
        index: {key: value.full_tensor() if is_sharded(value) else value for key, value in entry.items()}
        for index, entry in sd["state"].items()
    }
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> dict:
    """The inverse of :func:`full_optimizer_state` for this rank: every moment of a sharded parameter sharded
    like it (``step`` stays a scalar)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {
        index: {
            key: shard_like(value, params[index]) if torch.is_tensor(value) and value.dim() else value
            for key, value in entry.items()
        }
        for index, entry in sd["state"].items()
    }
    return {"state": state, "param_groups": sd["param_groups"]}
