"""Loop a range of a Hugging Face decoder's layers (Appendix B: "introduce recursion into some of its
blocks and continue to train").

``loopify(model, layers=(a, b), n_loops=k)`` makes the decoder layers ``a..b-1`` of any causal LM run ``k``
times. With the range's input ``e`` and its layers ``B``, as the looped GPT does (Fan et al.):

    injection="add":     h_1 = B(e),  h_t = B(h_{t-1} + e)      (input injection)
    injection="none":    h_1 = B(e),  h_t = B(h_{t-1})
    injection="concat":  h_1 = B(e),  h_t = B(W [h_{t-1}; e] + c)  (a learned adapter, as retrofitted
                         recurrence and Huginn inject; W = [I I], c = 0 at the start: "add" exactly)

so ``n_loops = 1`` is the original model. ``loop_lora=r`` gives loop ``t`` of each chosen linear layer of the
range its own rank-``r`` difference (:mod:`loopscape.looped.lora`); ``exit=`` stops each token at its own
loop (:mod:`loopscape.looped.exit`). The model stays an ordinary module tree (layer list, hooks, parameter
counts and state-dict keys are the original's); the loop is a :class:`~loopscape.looped.range.LoopedRange`
added to the decoder stack, which implements the :class:`~loopscape.looped.protocol.Looped` protocol. The
settings live in ``model.config.loopscape``, so :func:`~loopscape.looped.io.from_pretrained` gives the looped
model back, with the loop's own weights.
"""

from __future__ import annotations

import types
import warnings

import torch
from torch import nn

from loopscape.looped.exit import EXITS, Exit
from loopscape.looped.kv import check_sharing
from loopscape.looped.protocol import check_n_loops, find_looped, get_n_loops, loop_settings, set_n_loops
from loopscape.looped.range import INJECTIONS, LoopedRange, check_exit_reads
from loopscape.looped.structure import Structure

__all__ = [
    "EXITS",
    "INJECTIONS",
    "LoopedRange",
    "get_n_loops",
    "loop_logits",
    "loopify",
    "looped_layers",
    "set_exit",
    "set_n_loops",
]


def looped_layers(model: nn.Module) -> LoopedRange | None:
    """The model's :class:`LoopedRange`, or None if it is not loopified."""
    return next((m for m in model.modules() if isinstance(m, LoopedRange)), None)


def loopify(
    model: nn.Module,
    layers: tuple[int, int] | None = None,
    n_loops: int = 1,
    injection: str = "add",
    exit: str | None = None,
    exit_threshold: float = 0.0,
    min_loops: int = 1,
    backprop_loops: int | None = None,
    loop_lora: int | None = None,
    lora_layers: list[str] | None = None,
    kv_sharing: str | None = None,
) -> nn.Module:
    """Loop the decoder layers ``layers[0]..layers[1]-1`` of ``model`` ``n_loops`` times, in place;
    returns the model. ``layers=None`` reads the settings saved in ``model.config.loopscape``
    (a looped model loaded back with ``from_pretrained``). ``exit``, ``exit_threshold`` and ``min_loops``:
    per-token exit (:class:`~loopscape.looped.exit.Exit`; ``n_loops`` is then the most loops a token runs).
    ``backprop_loops=k``: truncated backprop through the loops (Huginn's training, Geiping et al., 2025,
    Sec. 4; retrofitted recurrence): the first ``n_loops - k`` loops run without a graph, the state entering
    loop ``n_loops - k + 1`` is detached, and the range's input keeps its gradient in the last ``k`` loops, so
    the layers before the range still train; activation memory then grows with ``k``, not the depth. A loop
    count at or below ``k`` (a sampled depth, SHIFT's Stage I) back-propagates through every loop. Curvature
    tools (``loopscape.landscape``) differentiate what the forward records, so on a truncated model they see
    the truncated surrogate (they warn): ``loopscape.looped.set_backprop_loops(model, None)`` measures the loss itself.
    ``injection="concat"``, ``loop_lora=r`` and ``lora_layers`` (names of the range's linear layers, e.g.
    ``["q_proj", "v_proj"]``; all of them if None): see the module docstring. The LoRA is made for the
    ``n_loops`` given here; loops beyond them (a larger ``n_loops`` set later) run the shared weights.
    ``kv_sharing``: ``None`` (every loop its own keys and values), ``"first"`` (deeper loops attend to loop
    1's) or ``"cycle:K"`` (K cache slots, loop t in slot t mod K): :mod:`loopscape.looped.kv`."""
    structure = Structure(model)
    saved = getattr(model.config, "loopscape", None)
    layers_given = layers is not None  # else the saved settings, whose n_loops may be a later one (SHIFT's)
    lora_loops = None
    if layers is None:
        if saved is None:
            raise ValueError("layers must be a pair (start, stop) of decoder layer indices (got None)")
        layers, n_loops, injection = tuple(saved["layers"]), saved["n_loops"], saved["injection"]
        exit, exit_threshold, min_loops = saved.get("exit"), saved.get("exit_threshold", 0.0), saved.get("min_loops", 1)
        backprop_loops = saved.get("backprop_loops")
        loop_lora, lora_layers, lora_loops = saved.get("loop_lora"), saved.get("lora_layers"), saved.get("lora_loops")
        kv_sharing = saved.get("kv_sharing")
    n = len(structure.layers)
    if not (isinstance(layers, (tuple, list)) and len(layers) == 2 and 0 <= layers[0] < layers[1] <= n):
        raise ValueError(f"layers must be a pair (start, stop) with 0 <= start < stop <= {n} (got {layers!r})")
    if injection not in INJECTIONS:
        raise ValueError(f"injection must be one of {INJECTIONS} (got {injection!r})")
    check_n_loops(n_loops)
    policy = Exit.of(exit, exit_threshold, min_loops, n_loops)
    # saved settings: K was checked against the n_loops of their time (SHIFT may have moved it since)
    kv_sharing = check_sharing(kv_sharing, n_loops if layers_given else 1 << 30)
    try:
        check_exit_reads(policy, layers[0], layers[1], n)
    except ValueError as refused:
        if layers_given:
            raise
        warnings.warn(f"{refused}; the saved exit is dropped (saved before loopscape refused it)", stacklevel=2)
        policy = None
    k, top = backprop_loops, n_loops if saved is None or layers_given else max(n_loops, backprop_loops or 1)
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= top):
        raise ValueError(f"backprop_loops must be an integer from 1 to n_loops ({n_loops}) or None (got {k!r})")
    if loop_lora is not None and (not isinstance(loop_lora, int) or isinstance(loop_lora, bool) or loop_lora < 1):
        raise ValueError(f"loop_lora must be an integer rank >= 1, or None for no per-loop LoRA (got {loop_lora!r})")
    if lora_layers is not None and loop_lora is None:
        raise ValueError("lora_layers goes with loop_lora (a rank); got lora_layers without it")
    lora_layers = None if lora_layers is None else [str(n) for n in lora_layers]
    old = looped_layers(model)
    if old is not None:  # loopify again: the new settings replace the old loop
        old.remove()
    looped = LoopedRange(
        structure, layers[0], layers[1], n_loops, injection, model.config, backprop_loops, loop_lora, lora_layers,
        lora_loops, kv_sharing,
    )  # fmt: skip
    looped.exit = policy
    looped.depth_per_call(model)
    if hasattr(type(model), "generate"):
        model.generate = types.MethodType(_generate, model)
    structure.stack.looped_range = looped
    if loop_lora is not None and backprop_loops is not None and backprop_loops < n_loops and layers_given:
        warnings.warn(
            f"loop_lora with backprop_loops={backprop_loops} trains the LoRA of the last {backprop_loops} of "
            f"{n_loops} loops only: loops 1..{n_loops - backprop_loops} run without a graph and keep B = 0",
            stacklevel=2,
        )
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and getattr(config, "use_cache", None) is False:
            config.use_cache = True  # a looped model keeps its cache per loop
    return model


def _generate(self, *args, n_loops: int | None = None, **kwargs):
    """The model's own ``generate``; with ``n_loops=k``, at ``k`` loops for this call only (the model's own
    count back afterwards): HF's ``generate`` refuses keywords its ``forward`` does not name."""
    if n_loops is None:
        return type(self).generate(self, *args, **kwargs)
    with loop_settings(self, n_loops=n_loops):
        return type(self).generate(self, *args, **kwargs)


def set_exit(model: nn.Module, exit: str | None = None, exit_threshold: float = 0.0, min_loops: int = 1) -> None:
    """Change a loopified model's per-token exit (saved in ``config.loopscape``)."""
    looped = looped_layers(model)
    if looped is None:
        raise ValueError(f"model must be loopified (loopscape.loopify) to set its exit ({type(model).__name__})")
    looped.set_exit(exit, exit_threshold, min_loops)


@torch.no_grad()
def loop_logits(model: nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits read from every loop's output ``(n_loops, B, W, V)``: each loop's state read out as the
    model's output (the protocol's ``readout``: the layers after the range, the final norm, the LM head)."""
    looped = find_looped(model)
    with looped.recording() as states:
        model(input_ids=input_ids, use_cache=False, **kwargs)
        return torch.stack([looped.readout(h) for h in states])
