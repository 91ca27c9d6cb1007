"""Checkpoints: weights and optimiser tensors as safetensors, the rest as JSON.

Layout of a checkpoint folder::

    checkpoints/
      latest.json            {"unit": "epoch", "done": 150, "dir": "epoch-00150"}
      epoch-00150/
        model.safetensors    parameters and buffers (the model's state_dict)
        optimizer.safetensors  per-parameter optimiser state, keyed "<param>.<field>"
        state.json           units done, optimiser hyper-parameters, RNG state, extras

The unit is what the trainer counts: ``epoch`` (the Markov trainers) or
``step`` (optimiser steps, the algorithmic trainer).

A checkpoint is written into a temporary folder, renamed into place, and only
then named by ``latest.json`` (itself written atomically): a crash at any
point leaves ``latest.json`` naming a complete checkpoint. Loading never
unpickles anything.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loopscape.io import check_digest, file_digest, read_json_file, write_json


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, scalars = {}, {}
    for p, state in optimizer.state.items():
        for field, value in state.items():
            key = f"{names[id(p)]}.{field}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().contiguous().cpu()
            else:
                scalars[key] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    params = dict(model.named_parameters())
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        group.update(saved)
    optimizer.state.clear()
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        name, field = key.rsplit(".", 1)
        p = params[name]
        if torch.is_tensor(value) and field != "step":  # Adam keeps `step` on the CPU
            value = value.to(p.device)
        optimizer.state[p][field] = value


def save_checkpoint(
    directory: str | Path,
    done: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None = None,
    extra: dict[str, Any] | None = None,
    keep_last: int = 1,
    unit: str = "epoch",
) -> Path:
    """Write a checkpoint after ``done`` units (epochs or steps) and point ``latest.json`` at it."""
    opt_tensors, opt_meta = _optimizer_tensors(model, optimizer)
    state = {"unit": unit, "done": done, "optimizer": opt_meta, "extra": extra or {}}
    if generator is not None:
        state["generator"] = generator_state(generator)
    return write_checkpoint(directory, model.state_dict(), opt_tensors, state, keep_last)


def _unshared(weights: dict) -> dict:
    """The tensors on the CPU, those that share memory with an earlier one (tied embeddings) copied:
    safetensors refuses shared tensors, and ``load_state_dict`` ties them again."""
    seen, out = set(), {}
    for k, v in weights.items():
        v = v.detach().contiguous().cpu()
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def write_checkpoint(directory: str | Path, weights: dict, opt_tensors: dict, state: dict, keep_last: int = 1) -> Path:
    """The files of :func:`save_checkpoint` from state dicts (``state``: what ``state.json`` holds, with its
    ``unit`` and ``done``): also what a sharded model's gathered state is written with."""
    directory, unit, done = Path(directory), state["unit"], state["done"]
    final = directory / f"{unit}-{done:05d}"
    tmp = directory / f".{unit}-{done:05d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_unshared(weights), str(tmp / "model.safetensors"))
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    state = {
        **state,
        "files": {name: file_digest(tmp / name) for name in ("model.safetensors", "optimizer.safetensors")},
    }
    write_json(tmp / "state.json", state)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    write_json(directory / "latest.json", {"unit": unit, "done": done, "dir": final.name})
    old = sorted(p for p in directory.glob(f"{unit}-*") if p.is_dir() and p != final)
    for p in old[: max(0, len(old) - (keep_last - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The folder ``latest.json`` names, or None before the first checkpoint."""
    pointer = Path(directory) / "latest.json"
    if not pointer.exists():
        return None
    return Path(directory) / read_json_file(pointer)["dir"]


def read_checkpoint(path: str | Path) -> tuple[dict, dict, dict]:
    """(weights, optimiser tensors, ``state.json``) of a checkpoint folder, on the CPU; files that differ from
    what was written (their sizes and hashes are in ``state.json``) are refused."""
    path = Path(path)
    state = read_json_file(path / "state.json")
    for name, digest in state.get("files", {}).items():
        check_digest(path / name, digest)
    return load_file(str(path / "model.safetensors")), load_file(str(path / "optimizer.safetensors")), state


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint in place; returns its ``state.json`` content (see :func:`read_checkpoint`)."""
    device = next(model.parameters()).device
    weights, opt_tensors, state = read_checkpoint(path)
    model.load_state_dict({k: v.to(device) for k, v in weights.items()})
    if optimizer is not None:
        _load_optimizer(model, optimizer, opt_tensors, state["optimizer"])
    if generator is not None and "generator" in state:
        set_generator_state(generator, state["generator"])
    return state


def generator_state(generator: torch.Generator) -> str:
    """A generator's state as text, for JSON."""
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode()


def set_generator_state(generator: torch.Generator, text: str) -> None:
    raw = bytearray(base64.b64decode(text))
    generator.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())


def save_weights(path: str | Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    """Final weights only, as one safetensors file (written atomically)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Load weights written by :func:`save_weights` onto the model's device."""
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(path), device=str(device)))
