"""``grpo-train``: the command line of the reference trainer (flags generated from :class:`TrainConfig`).

grpo-train                                   # built-in task: warm-up, then GRPO; held-out accuracy before/after
grpo-train --model ./Qwen2.5-0.5B-Instruct --data gsm8k.jsonl --reward accuracy --reward format=0.2
torchrun --nproc_per_node=2 -m grpo_kernels.trainer --steps 20
grpo-train sweep --num-generations 2,4,8 --seeds 0,1,2 --budget completions    # see sweep.py
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

from .config import TrainConfig


def _base_type(annotation: str):
    """``"int | None"`` -> int (the dataclass uses postponed annotations)."""
    hint = typing.get_type_hints(TrainConfig)[annotation]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    return args[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo-train",
        description="Minimal GRPO trainer on grpo_kernels' fused loss. With no arguments: the built-in addition task "
        "(a tiny model, a short supervised warm-up, then GRPO) on CPU or GPU in a few minutes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        kind = _base_type(f.name)
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, **meta)
        elif typing.get_origin(kind) is list:
            meta.setdefault("metavar", "NAME[=WEIGHT]")
            parser.add_argument(flag, dest=f.name, action="append", default=None, **meta)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default, **meta)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sweep"]:
        from .sweep import main as sweep_main

        return sweep_main(argv[1:])
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DataError
    from .loop import train
    from .rewards import RewardError

    try:
        train(TrainConfig(**vars(args)))
    except (DataError, CheckpointError, RewardError, FileNotFoundError, ValueError) as e:
        print(f"grpo-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
