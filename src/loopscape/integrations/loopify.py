"""Loop a range of a Hugging Face decoder's layers (Appendix B: "introduce
recursion into some of its blocks and continue to train").

``loopify(model, layers=(a, b), n_loops=k)`` makes the decoder layers
``a..b-1`` of a GPT-2 or Llama-family causal LM run ``k`` times. With the
range's input ``e`` and its layers ``B``, as the looped GPT does (Fan et al.):

    injection="add":   h_1 = B(e),  h_t = B(h_{t-1} + e)      (input injection)
    injection="none":  h_1 = B(e),  h_t = B(h_{t-1})

so ``n_loops = 1`` is the original model. The layers stay where they were in
the module tree (the state dict's keys do not change, ``save_pretrained`` and
``from_pretrained`` read and write the usual files); the loop settings live in
``model.config.loopscape`` and in the :class:`LoopedLayers` list that replaces
the decoder's layer list. ``n_loops`` can be changed at any time
(:func:`set_n_loops`, SHIFT's Stage II), and :func:`loop_logits` reads every
loop's state through the final norm and the LM head (a logit lens over loops).

The key-value cache is not kept per loop: a looped model (``n_loops > 1``)
runs without it (``loopify`` turns ``use_cache`` off in the model's config and
generation config, so ``generate()`` decodes without a cache), and a call that
asks for it gets one clear error.
"""

from __future__ import annotations

import torch
from torch import nn

from loopscape.shift.controller import get_n_loops, set_n_loops  # the loop count of any looped model

__all__ = ["LoopedLayers", "get_n_loops", "loop_logits", "loopify", "looped_layers", "set_n_loops"]

INJECTIONS = ("add", "none")
# model_type -> (attribute path of the decoder stack, its layer list, its final norm); the Llama layout is shared
# by Qwen2 and Mistral
FAMILIES = {
    "gpt2": ("transformer", "h", "ln_f"),
    "llama": ("model", "layers", "norm"),
    "qwen2": ("model", "layers", "norm"),
    "mistral": ("model", "layers", "norm"),
}
CACHE_REFUSED = (
    "loopify: the key-value cache is not kept per loop; call the looped model with use_cache=False "
    "(generate() does so by default after loopify)"
)


class LoopedLayers(nn.ModuleList):
    """The decoder's layer list, with layers ``start..stop-1`` run ``n_loops`` times.

    It holds the same modules at the same indices as the list it replaces, so
    parameters and state-dict keys are unchanged; only iteration (what the
    decoder's forward does) sees the range as one looped step.
    """

    holds_loops = True  # the SHIFT controller sets the loop count here, not on a wrapper's n_loops attribute

    def __init__(
        self, layers: nn.ModuleList, start: int, stop: int, n_loops: int, injection: str, config=None, generation=None
    ):
        super().__init__(list(layers))
        self.start, self.stop, self.injection = start, stop, injection
        # the model's config and generation config: the loop settings are saved there whenever n_loops is set
        self._configs = (config, generation)
        self.n_loops = n_loops
        self.record = False  # keep each loop's output in `loop_states` (a logit lens over loops)
        self.loop_states: list[torch.Tensor] = []

    @property
    def n_loops(self) -> int:
        return self._n_loops

    @n_loops.setter
    def n_loops(self, value: int) -> None:
        _check_loops(value)
        self._n_loops = value
        config, generation = self._configs
        if config is not None:
            config.loopscape = {"layers": [self.start, self.stop], "n_loops": value, "injection": self.injection}
            # the cache is not kept per loop (module docstring): a looped model decodes without it
            config.use_cache = value == 1
        if generation is not None:
            generation.use_cache = value == 1

    def __iter__(self):
        layers = list(super().__iter__())
        return iter(layers[: self.start] + [self._looped] + layers[self.stop :])

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # Llama's forward iterates self.layers[:num_hidden_layers]
            if range(len(self))[idx] != range(len(self)):
                raise ValueError(f"loopify: looped layers can be sliced only as a whole (got {idx})")
            return list(self)
        return super().__getitem__(idx)

    def range_layers(self) -> list[nn.Module]:
        """The looped layers ``start..stop-1``."""
        return list(super().__iter__())[self.start : self.stop]

    def _looped(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.n_loops > 1 and kwargs.get("use_cache") and _past(args, kwargs) is not None:
            raise ValueError(CACHE_REFUSED)
        e, h, rest = hidden_states, None, None
        self.loop_states = []
        for t in range(self.n_loops):
            h = e if t == 0 else (h + e if self.injection == "add" else h)
            for layer in self.range_layers():
                out = layer(h, *args, **kwargs)
                h, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
            if self.record:
                self.loop_states.append(h)
        return h if rest is None else (h, *rest)


def _past(args: tuple, kwargs: dict):
    """The cache a decoder layer was handed: ``past_key_values`` (transformers < 5.24 Llama
    layout), ``cache`` (5.24 on) or ``layer_past`` (GPT-2), or positionally."""
    for name in ("past_key_values", "cache", "layer_past"):
        if name in kwargs:
            return kwargs[name]
    return args[0] if args and not isinstance(args[0], torch.Tensor) else None


def _family(model: nn.Module) -> tuple[nn.Module, str, str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"model must be a Hugging Face causal LM of one of the model types {sorted(FAMILIES)} "
            f"(got {type(model).__name__} with model_type {model_type!r})"
        )
    stack, layers, norm = FAMILIES[model_type]
    if not hasattr(model, stack):
        raise ValueError(
            f"model must be a causal LM with its LM head ({stack!r} inside it, e.g. GPT2LMHeadModel or "
            f"LlamaForCausalLM); got the base model {type(model).__name__}"
        )
    return getattr(model, stack), layers, norm


def looped_layers(model: nn.Module) -> LoopedLayers | None:
    """The model's :class:`LoopedLayers`, or None if it is not loopified."""
    return next((m for m in model.modules() if isinstance(m, LoopedLayers)), None)


def loopify(
    model: nn.Module,
    layers: tuple[int, int] | None = None,
    n_loops: int = 1,
    injection: str = "add",
) -> nn.Module:
    """Loop the decoder layers ``layers[0]..layers[1]-1`` of ``model`` ``n_loops`` times, in place;
    returns the model. ``layers=None`` reads the settings saved in ``model.config.loopscape``
    (a looped model loaded back with ``from_pretrained``)."""
    stack, name, _ = _family(model)
    saved = getattr(model.config, "loopscape", None)
    if layers is None:
        if saved is None:
            raise ValueError("layers must be a pair (start, stop) of decoder layer indices (got None)")
        layers, n_loops, injection = tuple(saved["layers"]), saved["n_loops"], saved["injection"]
    current = getattr(stack, name)
    n = len(current)
    if not (isinstance(layers, (tuple, list)) and len(layers) == 2 and 0 <= layers[0] < layers[1] <= n):
        raise ValueError(f"layers must be a pair (start, stop) with 0 <= start < stop <= {n} (got {layers!r})")
    if injection not in INJECTIONS:
        raise ValueError(f"injection must be one of {INJECTIONS} (got {injection!r})")
    _check_loops(n_loops)
    plain = nn.ModuleList(list(nn.ModuleList.__iter__(current)))
    looped = LoopedLayers(
        plain, layers[0], layers[1], n_loops, injection, model.config, getattr(model, "generation_config", None)
    )
    setattr(stack, name, looped)
    return model


def _check_loops(n_loops) -> None:
    if not isinstance(n_loops, int) or n_loops < 1:
        raise ValueError(f"n_loops must be an integer >= 1 (got {n_loops!r})")


@torch.no_grad()
def loop_logits(model: nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits read from every loop's output ``(n_loops, B, W, V)``: the final norm and the LM head
    applied to the state after loop ``t`` (a logit lens; the layers after the range are skipped)."""
    looped = looped_layers(model)
    if looped is None:
        raise ValueError(f"model must be loopified (loopscape.loopify) to read its loops ({type(model).__name__})")
    stack, _, norm = _family(model)
    looped.record = True
    try:
        model(input_ids=input_ids, use_cache=False, **kwargs)
        states = looped.loop_states
    finally:
        looped.record, looped.loop_states = False, []
    head = model.get_output_embeddings()
    return torch.stack([head(getattr(stack, norm)(h)) for h in states])
