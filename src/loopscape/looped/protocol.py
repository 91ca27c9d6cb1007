"""What "a looped model" is, said once: the :class:`Looped` protocol (PEP 544), and the one scan that finds
it in a model.

A looped model runs some of its weights ``n_loops`` times (the paper's Looped-Attn, Eq. 2; the looped GPT of
Appendix E.2; a loopified Hugging Face decoder). Every tool that reads loops (SHIFT's controller, the loop
sweep, the loop-split Hessian, the FLOP counts, the lm-eval adapter) asks for this interface and nothing else:

* ``n_loops``: the loop count, settable (SHIFT's Stage II sets it in place);
* ``looped_parameters()``: the weights every loop shares;
* ``untie_loops(weights)``: a context in which loop ``t`` (0-based) reads ``weights[t]``, a dict from slots
  of ``looped_parameters()`` to tensors (a slot not given stays shared; loops past ``len(weights)`` read the
  last), the untied model of :mod:`loopscape.landscape.loops`. Loop 0 may also read its own copy, except in a
  loopified range, whose first loop is the model's own pass (its ``weights[0]`` must be empty);
* ``recording()``: a context that yields a list, filled with each loop's state by the forwards run inside it;
* ``readout(h)``: the model's logits from a loop's state ``h`` (everything the model runs after the loop);
* ``weights_per_token(n_loops, last=None)``: the weights a token multiplies through inside the loop's last
  ``last`` loops (all if None) of ``n_loops``, for FLOP counts.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Looped(Protocol):
    """The loop protocol (module docstring). :class:`~loopscape.models.linear_attn.LinearAttn`,
    :class:`~loopscape.models.looped_gpt.LoopedGPT` and :class:`~loopscape.looped.range.LoopedRange`
    implement it."""

    n_loops: int

    def looped_parameters(self) -> list[nn.Parameter]: ...

    def untie_loops(self, weights: list[dict[int, torch.Tensor]]) -> contextlib.AbstractContextManager: ...

    def recording(self) -> contextlib.AbstractContextManager[list[torch.Tensor]]: ...

    def readout(self, h: torch.Tensor) -> torch.Tensor: ...

    def weights_per_token(self, n_loops: int, last: int | None = None) -> int: ...


@contextlib.contextmanager
def while_set(owner, name: str, value):
    """``owner.<name> = value`` within the context, its previous value after it (also on error); yields
    ``value``. The models' ``untie_loops`` and ``recording`` are this on their own attribute (so they nest)."""
    previous = getattr(owner, name, None)
    setattr(owner, name, value)
    try:
        yield value
    finally:
        setattr(owner, name, previous)


def slots(modules: list[nn.Module]) -> list[list[tuple[str, int]]]:
    """Per module, each parameter's own name and its slot in ``[*m.parameters() for m in modules]``: where a
    model whose ``looped_parameters()`` is that list finds loop ``t``'s copies in ``untie_loops``' weights."""
    out, offset = [], 0
    for m in modules:
        names = [n for n, _ in m.named_parameters()]
        out.append([(n, offset + k) for k, n in enumerate(names)])
        offset += len(names)
    return out


def own_copies(module_slots: list[tuple[str, int]], given: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One module's copies in one loop's untied weights (:func:`slots`), by the module's own names."""
    return {name: given[i] for name, i in module_slots if i in given}


def check_n_loops(value, name: str = "n_loops") -> int:
    """``value`` if it is an integer >= 1; else one line naming ``name``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
    return int(value)


def find_looped(model) -> Looped:
    """The :class:`Looped` part of ``model``: ``model`` itself, or its first submodule that implements the
    protocol (a loopified Hugging Face model's ``LoopedRange``; loopscape's model inside a LightningModule).
    One line if there is none."""
    if isinstance(model, Looped):
        return model
    if isinstance(model, nn.Module):
        found = next((m for m in model.modules() if isinstance(m, Looped)), None)
        if found is not None:
            return found
    raise ValueError(
        f"model must be a looped model (loopscape's LinearAttn or LoopedGPT) or hold one, or be loopified "
        f"(loopscape.loopify): {type(model).__name__} has nothing to loop"
    )


def weights_inside(looped: Looped) -> set[int]:
    """``id`` of every weight a token meets inside the loop, which ``weights_per_token`` counts: the shared
    ones, and the loop's own where it has some (a loopified range's ``loop_parameters()``: adapter, LoRA)."""
    own = looped.loop_parameters() if hasattr(looped, "loop_parameters") else []
    return {id(p) for p in [*looped.looped_parameters(), *own]}


def truncation(model) -> int | None:
    """``k`` if the loop of ``model`` back-propagates through only its last ``k`` of ``n_loops`` loops (truncated
    backprop, ``backprop_loops=k < n_loops``), so gradients and curvature are the truncated surrogate's; else
    None (also for a model that does not loop)."""
    try:
        looped = find_looped(model)
    except ValueError:
        return None
    k = getattr(looped, "backprop_loops", None)
    return k if k is not None and looped.n_loops > k else None


def set_backprop_loops(model, k: int | None) -> None:
    """Back-propagate through the last ``k`` loops of ``model`` (None: every loop, the loss itself), e.g. on
    a retrofit saved with ``backprop_loops`` before measuring its curvature (a loopified model saves it)."""
    if k is not None:
        check_n_loops(k, "backprop_loops")
    looped = find_looped(model)
    if not hasattr(looped, "backprop_loops"):
        raise ValueError(f"model must support truncated backprop (a backprop_loops setting): {type(looped).__name__}")
    looped.backprop_loops = k


def get_n_loops(model) -> int:
    """The loop count of ``model`` (:func:`find_looped`)."""
    return int(find_looped(model).n_loops)


def set_n_loops(model, n_loops: int) -> None:
    """Set the loop count of ``model`` (:func:`find_looped`): SHIFT's Stage II, or a test-time sweep."""
    find_looped(model).n_loops = check_n_loops(n_loops)


@contextlib.contextmanager
def loop_settings(model, **settings) -> Iterator[Looped]:
    """Within the context, the looped part of ``model`` runs with ``settings`` (e.g. ``n_loops=6``, or a
    loopified model's ``exit=Exit(...)``); its own settings come back afterwards, also on error."""
    looped = find_looped(model)
    saved = {name: getattr(looped, name) for name in settings}
    try:
        for name, value in settings.items():
            setattr(looped, name, value)
        yield looped
    finally:
        for name, value in saved.items():
            setattr(looped, name, value)
