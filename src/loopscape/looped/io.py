"""The one loader of a looped checkpoint: :func:`from_pretrained` (used by the lm-eval adapter and the loop
sweep too), and the loop's own weights (concat adapter, per-loop LoRA) read back from a saved folder."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from loopscape.looped.decoder import loopify

log = logging.getLogger(__name__)
OWN = ".looped_range."  # where the loop's own weights sit in a loopified model's state dict


def from_pretrained(path, layers: tuple[int, int] | None = None, injection: str = "add", **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)``, looped again by the settings its config
    holds, with the loop's own weights (concat adapter, per-loop LoRA) loaded back (a plain
    ``from_pretrained`` gives the unlooped model; it does not know ``config.loopscape``). A plain checkpoint
    is looped by ``layers`` and ``injection`` (one loop: set ``n_loops`` after); for a looped one, ``layers``
    may only repeat the range it loops."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the loop's own weights are "unused" by the plain model: reported below
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        others = [k for k in info.get(kind, []) if OWN not in f".{_key(k)}"]
        if others:
            log.warning("loopscape.from_pretrained(%r): %s %s", path, kind.replace("_", " "), others[:5])
    saved = getattr(model.config, "loopscape", None)
    if saved is None:
        if layers is None:
            raise ValueError(
                f"path must hold a model saved after loopscape.loopify ({path!r} has no loopscape settings; "
                "give layers=(start, stop) to loop a plain checkpoint)"
            )
        return loopify(model, layers=tuple(layers), n_loops=1, injection=injection)
    if layers is not None and list(layers) != list(saved["layers"]):
        raise ValueError(
            f"layers must be the range the checkpoint loops ({tuple(saved['layers'])}), or left out "
            f"(got {tuple(layers)})"
        )
    loopify(model)
    load_loop_weights(model, path, kwargs.get("subfolder", ""))
    return model


def _key(k) -> str:
    return k if isinstance(k, str) else str(k[0])  # mismatched keys come as (name, shapes)


def load_loop_weights(model: nn.Module, path, subfolder: str = "") -> None:
    """Load the loop's own weights (under ``looped_range``: the concat adapter, the per-loop LoRA) of a
    loopified ``model`` from the checkpoint folder ``path`` it was loaded from (``*.safetensors`` or
    ``pytorch_model*.bin``, sharded or not); nothing to do for a loop without weights."""
    own = {k for k in model.state_dict() if OWN in f".{k}"}
    if not own:
        return
    folder = Path(path) / subfolder
    if not folder.is_dir():
        raise ValueError(
            f"path must be a local save_pretrained folder to load the loop's own weights (got {str(folder)!r})"
        )
    weights = _read_weights(folder, own)
    if set(weights) != own:
        missing = sorted(own - set(weights))
        raise ValueError(f"path must hold the loop's own weights ({str(folder)!r} lacks {missing[:3]})")
    model.load_state_dict(weights, strict=False)


def _read_weights(folder: Path, keys: set[str]) -> dict[str, torch.Tensor]:
    """``keys`` from the weight files of a ``save_pretrained`` folder (safetensors or torch, sharded or not)."""
    from safetensors import safe_open

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if k in keys})
    if not out:
        for file in sorted(folder.glob("pytorch_model*.bin")):
            out.update({k: v for k, v in torch.load(file, map_location="cpu", weights_only=True).items() if k in keys})
    return out
