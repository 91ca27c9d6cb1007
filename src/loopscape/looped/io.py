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


class NotLoopedError(ValueError):
    """A plain checkpoint given where a looped one (or ``layers=``) was needed: callers name their own flag."""


def from_pretrained(path, layers: tuple[int, int] | None = None, injection: str | None = None, **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)``, looped again by the settings its config
    holds, with the loop's own weights (concat adapter, per-loop LoRA) loaded back (a plain
    ``from_pretrained`` gives the unlooped model; it does not know ``config.loopscape``). A plain checkpoint
    is looped by ``layers`` and ``injection`` (default ``"add"``; one loop: set ``n_loops`` after); for a looped
    one, ``layers`` and ``injection`` may only repeat what it saved."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    named = kwargs.pop("gguf_file", None)  # transformers' and lm-eval's way to name it: a folder and a file name
    gguf = gguf_file(Path(path) / named if named else path)
    if gguf is not None:
        model, info = load_gguf(gguf, **kwargs), {}
    else:
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
            raise NotLoopedError(
                f"path must hold a model saved after loopscape.loopify ({path!r} has no loopscape settings; "
                "give layers=(start, stop) to loop a plain checkpoint)"
            )
        return loopify(model, layers=tuple(layers), n_loops=1, injection=injection or "add")
    if layers is not None and list(layers) != list(saved["layers"]):
        raise ValueError(
            f"layers must be the range the checkpoint loops ({tuple(saved['layers'])}), or left out "
            f"(got {tuple(layers)})"
        )
    if injection is not None and injection != saved["injection"]:
        raise ValueError(
            f"injection must be the checkpoint's own ({saved['injection']!r}), or left out (got {injection!r})"
        )
    loopify(model)
    load_loop_weights(model, path, kwargs.get("subfolder", ""))
    return model


def gguf_file(path) -> Path | None:
    """The GGUF file ``path`` names (a ``.gguf`` file, or a folder holding one and no ``config.json``), or
    None for a ``save_pretrained`` folder."""
    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ValueError(f"path must be an existing GGUF file (got {str(p)!r})")
        return p
    if p.is_dir() and not (p / "config.json").exists():
        found = sorted(p.glob("*.gguf"))
        if len(found) > 1:
            raise ValueError(f"path must hold one .gguf file (found {len(found)} in {str(p)!r}); name the file")
        return found[0] if found else None
    return None


def load_gguf(path: Path, **kwargs) -> nn.Module:
    """A llama.cpp checkpoint as a plain, float Hugging Face causal LM: transformers reads and dequantises
    it (the ``gguf`` package), and the model is rebuilt from its config without the GGUF quantisation, so it
    trains (the HF Trainer refuses a quantised model) and saves as an ordinary checkpoint. An architecture
    transformers cannot read, or a torn file, is one line naming the file."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError(f"reading {path.name} needs the gguf package: pip install 'loopscape[hf]'") from None
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        quantised = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    except Exception as error:  # transformers' and gguf's own errors (ValueError, KeyError, OSError, ...)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"path must be a GGUF file of an architecture transformers reads ({path.name}: {reason})"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=quantised.dtype)
    model.load_state_dict(quantised.state_dict())
    return model.eval()


def load_tokenizer(path):
    """The tokenizer saved with the checkpoint ``path`` (a GGUF file or folder, or a ``save_pretrained``
    folder), or None when it holds none."""
    from transformers import AutoTokenizer

    gguf = gguf_file(path)
    try:
        if gguf is not None:
            return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


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
