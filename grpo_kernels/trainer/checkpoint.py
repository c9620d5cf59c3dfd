"""Crash-safe checkpoints (safetensors + JSON, a checksum manifest, atomic rename) and metrics-file repair.

Layout of ``OUTPUT/checkpoints/step_00000050/``::

    model.safetensors       policy weights (tied weights stored once)
    ref_model.safetensors   the frozen reference model, when beta > 0 (without LoRA)
    adapter.safetensors     with LoRA and --model DIR (no warm-up): the adapters only, in place of model.safetensors
    optimizer.safetensors   AdamW moments; hyper-parameters and step counts in state.json
    rng.safetensors         torch RNG state of every rank (CPU, and CUDA when used)
    state.json              step, held-out results, config, optimizer param groups, Python/NumPy RNG per rank
    manifest.json           size and sha256 of every file above; written last

A checkpoint (and the learned reward model: :func:`write_directory`) is written into a hidden ``.step_00000050.tmp``
directory, every file fsynced, the manifest last, and only then renamed to its final name (a rename within one
directory is atomic), so a checkpoint directory either exists complete or not at all. A kill during the write
leaves only the ``.tmp`` directory, which the next save or resume removes. On load every file is checked against
the manifest; any mismatch is a :class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint (or the metrics file beside it) is missing, partial or corrupted; the message says which."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def optimizer_to_tensors(optimizer: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``state_dict()`` (of an optimizer, or the dict itself) split into safetensors-storable tensors
    (``"<param>.<key>"``) and JSON (the rest)."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors, scalars = {}, {}
    for param, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{param}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of :func:`optimizer_to_tensors`: a ``state_dict`` for ``optimizer.load_state_dict``."""
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        param, key = name.split(".", 1)
        state.setdefault(int(param), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def write_directory(final: Path, write) -> Path:
    """Create ``final`` atomically: ``write(tmp)`` fills a hidden ``.<name>.tmp`` directory beside it, every file is
    fsynced, the manifest (size and sha256 of each file) written last, then the directory is renamed to ``final``
    (replacing an older one of that name). Returns ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        _fsync(tmp / name)
    manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in files}
    (tmp / MANIFEST).write_text(json.dumps({"files": manifest}, indent=1))
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    if final.exists():  # e.g. the same step saved again (a resumed run re-reaching it): drop the old copy first
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)
    return final


def save_checkpoint(root: Path, step: int, *, models: dict, tensors: dict[str, dict], state: dict, keep: int) -> Path:
    """Write ``root/step_<step>`` atomically; keep the ``keep`` newest checkpoints. Returns the directory.

    ``models``: name -> nn.Module (saved with safetensors' ``save_model``, which stores tied weights once);
    ``tensors``: name -> {key: tensor}; ``state``: JSON-serialisable.
    """
    from safetensors.torch import save_file, save_model

    def write(tmp: Path) -> None:
        for name, model in models.items():
            save_model(model, str(tmp / f"{name}.safetensors"))
        for name, group in tensors.items():
            save_file(group, str(tmp / f"{name}.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))

    final = write_directory(root / f"step_{step:08d}", write)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Completed checkpoint directories under ``root``, oldest first (``.tmp`` leftovers are not listed)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def remove_partial_checkpoints(root: Path) -> None:
    for leftover in root.glob(".step_*.tmp") if root.is_dir() else []:
        shutil.rmtree(leftover)


def verify_directory(path: Path, what: str = "checkpoint") -> dict:
    """The manifest of ``path`` after checking every file's size and sha256; :class:`CheckpointError` otherwise."""
    where = f"{what} {str(path)!r}"
    if not path.is_dir():
        raise CheckpointError(f"{where} does not exist")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{where} is partial: it has no {MANIFEST} (it was not completely written)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where} is corrupted: unreadable {MANIFEST} ({e})") from None
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{where} is partial: {name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{where} is corrupted: {name} has {size} bytes, expected {expected['bytes']}")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{where} is corrupted: the sha256 of {name} does not match the manifest")
    return manifest


def verify_checkpoint(path: Path) -> dict:
    return verify_directory(path, "checkpoint")


def load_checkpoint(path: Path) -> tuple[dict, dict[str, Path]]:
    """``(state, files)`` of a verified checkpoint: ``files`` maps each safetensors name (no suffix) to its path."""
    verify_checkpoint(path)
    state = json.loads((path / "state.json").read_text())
    files = {p.stem: p for p in path.glob("*.safetensors")}
    return state, files


def resolve_resume(root: Path, resume: str) -> Path:
    """``"latest"`` -> the newest checkpoint under ``root``; anything else is a checkpoint directory."""
    if resume != "latest":
        return Path(resume)
    found = list_checkpoints(root)
    if not found:
        raise CheckpointError(f"--resume: no checkpoint under {str(root)!r}")
    return found[-1]


def repair_metrics(path: Path, last_step: int) -> int:
    """Cut ``metrics.jsonl`` back to the records of steps ``<= last_step`` (the checkpoint being resumed).

    A kill can leave a partial last line (dropped) and records of steps after the checkpoint (dropped: those steps
    run again). A malformed line anywhere else is a :class:`CheckpointError`. Returns the number of records kept.
    """
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").split("\n")
    kept = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if lineno == len(lines):  # no newline after it: the write was cut short
                break
            raise CheckpointError(f"{path}:{lineno}: malformed metrics record (not a partial last line)") from None
        if record.get("step", 0) <= last_step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, path)
    return len(kept)
