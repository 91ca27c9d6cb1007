"""Loop a range of a Hugging Face decoder's layers (Appendix B: "introduce
recursion into some of its blocks and continue to train").

``loopify(model, layers=(a, b), n_loops=k)`` makes the decoder layers
``a..b-1`` of any causal LM run ``k`` times. With the range's input ``e`` and
its layers ``B``, as the looped GPT does (Fan et al.):

    injection="add":     h_1 = B(e),  h_t = B(h_{t-1} + e)      (input injection)
    injection="none":    h_1 = B(e),  h_t = B(h_{t-1})
    injection="concat":  h_1 = B(e),  h_t = B(W [h_{t-1}; e] + c)  (a learned adapter, as retrofitted
                         recurrence and Huginn inject; W = [I I], c = 0 at the start: "add" exactly)

so ``n_loops = 1`` is the original model. ``loop_lora=r`` gives loop ``t`` of each chosen linear layer
of the range its own rank-``r`` difference, ``W + B_t A_t`` (Relaxed Recursive Transformers, Bae et al.,
2025), ``B_t = 0`` at the start (the tied loop exactly). The model stays an ordinary module
tree: its layer list is untouched (iterating, indexing, hooks, parameter
counts and state-dict keys are the original's), and the loop lives in the
decoder's forward path, as two forward hooks on the range's first and last
layer held by a :class:`LoopedRange` (a module added to the decoder stack,
without parameters unless it holds the concat adapter or the per-loop LoRA:
those are saved under its name and loaded back by :func:`from_pretrained`).
The settings live in ``model.config.loopscape``, so :func:`from_pretrained`
gives the looped model back.

**Cache.** Loop ``t >= 2`` of layer ``l`` is its own virtual layer of the
model's Hugging Face cache (index ``L + (t-2)(b-a) + (l-a)`` for ``L`` decoder
layers; loop 1 keeps the layer's own index), made like the layer's own entry
(full or sliding window). Generation with ``use_cache=True`` therefore keeps
one key-value entry per (loop, layer), and beam search's reordering, cropping
and batch selection work through HF's own cache classes.

**Per-token exit** (``exit="kl" | "entropy" | "state"``): after each loop
from the second on, a token whose criterion falls below ``exit_threshold``
(with at least ``min_loops`` loops done) stops looping. Policy: an exited
token keeps its exit state through the deeper loops, and the layers still run
on that state, so its keys and values at a deeper loop are those of its exit
state and later tokens always find an entry to attend to at every loop. The
cached decode then equals a full forward exactly (each token's decisions depend
only on earlier tokens); what exit saves is depth per token, read in
:attr:`LoopedRange.loops_used`, not layer calls.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from loopscape.shift.controller import get_n_loops, set_n_loops  # the loop count of any looped model

__all__ = [
    "LoopedRange",
    "from_pretrained",
    "get_n_loops",
    "loop_logits",
    "loopify",
    "looped_layers",
    "set_exit",
    "set_n_loops",
]

log = logging.getLogger(__name__)

INJECTIONS = ("add", "none", "concat")
EXITS = (None, "kl", "entropy", "state")
CACHE_MID_GENERATION = (
    "loopify: n_loops changed in the middle of a cached generation (the cache holds {held} loops, the model runs "
    "{now}); call set_n_loops between generate() calls, or generate with use_cache=False"
)
CACHE_UNUSABLE = (
    "loopify: the cache passed to a looped model must be a Hugging Face Cache holding per-layer entries "
    "(e.g. DynamicCache, or none: the model makes one); got {kind}"
)


class Structure:
    """Where a causal LM keeps what loopify needs, found by structure (not by ``model_type``): the decoder
    stack, its ``nn.ModuleList`` of decoder layers, the norm applied before the LM head, and the LM head."""

    def __init__(self, model: nn.Module):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise ValueError(
                f"model must be a causal LM with its LM head (e.g. GPT2LMHeadModel, LlamaForCausalLM); "
                f"{type(model).__name__} has no output embeddings (a base model?)"
            )
        config = getattr(model, "config", None)
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        expected = getattr(text, "num_hidden_layers", None)
        lists = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(x) for x in m}) == 1
        ]
        if expected is not None:
            lists = [(n, m) for n, m in lists if len(m) == expected] or lists
        if not lists:
            raise ValueError(
                f"model must hold its decoder layers in an nn.ModuleList of one layer class "
                f"(looked in {type(model).__name__} and found none)"
            )
        name, self.layers = max(lists, key=lambda nm: len(nm[1]))
        parent_name, _, self.layers_name = name.rpartition(".")
        self.stack = model.get_submodule(parent_name) if parent_name else model
        children = list(self.stack.named_children())
        after = [m for n, m in children[[n for n, _ in children].index(self.layers_name) + 1 :] if _is_norm(m)]
        if not after:
            raise ValueError(
                f"model must apply a final norm after its decoder layers (looked in {type(self.stack).__name__} "
                f"after .{self.layers_name} for a LayerNorm/RMSNorm module and found none)"
            )
        self.norm, self.head = after[0], head
        self.hidden_size = getattr(text, "hidden_size", None) or model.get_input_embeddings().embedding_dim


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or type(module).__name__.endswith(
        ("Norm", "LayerNorm", "RMSNorm")
    )


class LoopLoRA(nn.Module):
    """Per-loop low-rank differences of one linear layer: loop ``t`` adds ``x A_t^T B_t^T`` to its output
    (``A`` as PEFT initialises LoRA's, ``B = 0``; scale 1)."""

    def __init__(self, n_loops: int, rank: int, fan_in: int, fan_out: int, like: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(torch.empty(n_loops, rank, fan_in, dtype=like.dtype, device=like.device))
        self.B = nn.Parameter(torch.zeros(n_loops, fan_out, rank, dtype=like.dtype, device=like.device))
        for a in self.A.data:
            nn.init.kaiming_uniform_(a, a=5**0.5)

    def delta(self, x: torch.Tensor, loop: int) -> torch.Tensor:
        return (x @ self.A[loop].T) @ self.B[loop].T


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of an ``nn.Linear`` or of GPT-2's ``Conv1D`` (weight stored as in x out); None otherwise."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    return None


class LoopedRange(nn.Module):
    """The loop over decoder layers ``start..stop-1`` (see the module docstring). It holds no parameters
    and keeps the layers, the final norm and the LM head as plain references (not submodules), so the
    model's parameters and state dict are the original's."""

    holds_loops = True  # the SHIFT controller sets the loop count here, not on a wrapper's n_loops attribute

    def __init__(
        self,
        structure: Structure,
        start: int,
        stop: int,
        n_loops: int,
        injection: str,
        config=None,
        backprop_loops: int | None = None,
        loop_lora: int | None = None,
        lora_layers: list[str] | None = None,
        lora_loops: int | None = None,
    ):
        super().__init__()
        self.start, self.stop, self.injection, self.backprop_loops = start, stop, injection, backprop_loops
        self.loop_lora, self.lora_layers = loop_lora, lora_layers
        self._loop: int | None = None  # the loop running now (0-based), for the per-loop LoRA
        self._grad_saved: bool | None = None  # the caller's grad mode while the range's first loop runs without
        self._layers = list(structure.layers)  # a plain list: not registered again as submodules
        self._readout = (structure.norm, structure.head)
        self._config = config
        self._settings = {"exit": None, "exit_threshold": 0.0, "min_loops": 1}
        self._n_loops = n_loops
        self.record = False  # keep each loop's output in `loop_states` (a logit lens over loops)
        self.loop_states: list[torch.Tensor] = []
        self.loops_used: torch.Tensor | None = None  # (batch, positions) of the last call
        self.exit_counts: dict[int, int] = {}  # loops used -> tokens, since the last reset_exit_counts()
        self._inside, self._call = False, None
        # the modules whose `layer_idx` names their cache entry, per looped layer
        self._indexed = [
            [m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
            for layer in self.range_layers()
        ]
        like = next(p for layer in self.range_layers() for p in layer.parameters())
        if injection == "concat":  # W = [I I], c = 0: exactly injection="add" until trained
            d = structure.hidden_size
            self.adapter = nn.Linear(2 * d, d, dtype=like.dtype, device=like.device)
            with torch.no_grad():
                self.adapter.weight.copy_(torch.cat([torch.eye(d), torch.eye(d)], 1))
                self.adapter.bias.zero_()
        lora_hooks = []
        if loop_lora is not None:
            self.lora = nn.ModuleDict()
            for i, name, module in _lora_targets(self.range_layers(), start, lora_layers):
                fan_in, fan_out = _linear_shape(module)
                key = f"{i}_{name.replace('.', '_')}"
                self.lora[key] = LoopLoRA(lora_loops or n_loops, loop_lora, fan_in, fan_out, like)
                lora_hooks.append(module.register_forward_hook(self._lora_hook(key)))
        self._hooks = [
            *lora_hooks,
            self._layers[start].register_forward_pre_hook(self._before_range, with_kwargs=True),
            self._layers[stop - 1].register_forward_hook(self._after_range, with_kwargs=True),
            # the caller's grad mode comes back even when a layer raises inside the range
            structure.stack.register_forward_hook(self._after_stack, always_call=True),
        ]
        self._save()

    # --- settings -------------------------------------------------------------------------------------
    @property
    def n_loops(self) -> int:
        return self._n_loops

    @n_loops.setter
    def n_loops(self, value: int) -> None:
        _check_loops(value)  # min_loops above it is read as n_loops (SHIFT's Stage I runs one loop)
        self._n_loops = value
        self._save()

    @property
    def exit(self) -> str | None:
        return self._settings["exit"]

    def set_exit(self, exit: str | None = None, exit_threshold: float = 0.0, min_loops: int = 1) -> None:
        """Per-token exit (module docstring); ``exit=None`` runs every token ``n_loops`` times."""
        _check_exit(exit, exit_threshold, min_loops, self.n_loops)
        self._settings = {"exit": exit, "exit_threshold": float(exit_threshold), "min_loops": min_loops}
        self._save()

    def settings(self) -> dict:
        return {
            "layers": [self.start, self.stop],
            "n_loops": self.n_loops,
            "injection": self.injection,
            "backprop_loops": self.backprop_loops,
            "loop_lora": self.loop_lora,
            "lora_layers": self.lora_layers,
            "lora_loops": self._lora_loops() or None,  # the loops the LoRA was made for (n_loops may move)
            **self._settings,
        }

    def _save(self) -> None:
        if self._config is not None:
            self._config.loopscape = self.settings()

    def range_layers(self) -> list[nn.Module]:
        """The looped layers ``start..stop-1``."""
        return self._layers[self.start : self.stop]

    def looped_parameters(self) -> list[nn.Parameter]:
        """The weights every loop shares (``landscape.loops``): the range's layers'."""
        return [p for layer in self.range_layers() for p in layer.parameters()]

    def weight_ids(self) -> set[int]:
        """``id`` of every weight a token meets inside the loop: the range's layers' and the loop's own
        (adapter, LoRA), for the FLOP counts that treat them apart from the rest of the model."""
        return {id(p) for p in self.looped_parameters()} | {id(p) for p in self.parameters()}

    def lora_parameters(self) -> list[nn.Parameter]:
        """The per-loop LoRA's parameters (for an optimiser group of their own)."""
        return list(self.lora.parameters()) if self.loop_lora is not None else []

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The concat injection's adapter's parameters."""
        return list(self.adapter.parameters()) if self.injection == "concat" else []

    def weights_per_token(self, n_loops: int, last: int | None = None) -> int:
        """Weights a token multiplies through in the range's last ``last`` loops (all if None) of ``n_loops``:
        the layers' once per loop, the adapter once per loop from the second, each loop's own LoRA. Forward
        FLOPs are twice this; the backward of truncated backprop goes through ``last = backprop_loops``."""
        last = n_loops if last is None else min(last, n_loops)
        first = n_loops - last  # 0-based index of the first loop counted
        layers = sum(p.numel() for layer in self.range_layers() for p in layer.parameters())
        adapter = sum(p.numel() for p in self.adapter_parameters()) * (last - (first == 0))
        lora = sum(m.A[0].numel() + m.B[0].numel() for m in self.lora.values()) if self.loop_lora else 0
        return last * layers + adapter + max(0, min(n_loops, self._lora_loops()) - first) * lora

    def _lora_loops(self) -> int:
        return next(iter(self.lora.values())).A.shape[0] if self.loop_lora else 0

    def _lora_hook(self, key: str):
        def hook(module, args, output):
            loop = self._loop
            if loop is None or loop >= self._lora_loops():  # loops past those made run the shared weights
                return None
            return output + self.lora[key].delta(args[0], loop)

        return hook

    def reset_exit_counts(self) -> None:
        self.exit_counts = {}

    def remove(self) -> None:
        """Undo the loop: remove the hooks (the model is the original again)."""
        for h in self._hooks:
            h.remove()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings().items() if v is not None)

    # --- the forward path ---------------------------------------------------------------------------------
    def _virtual(self, loop: int, j: int) -> int:
        """The cache index of loop ``loop`` (0-based, >= 1) of the range's ``j``-th layer."""
        return len(self._layers) + (loop - 1) * (self.stop - self.start) + j

    @contextmanager
    def _at_loop(self, loop: int, j: int):
        modules = self._indexed[j]
        saved = [m.layer_idx for m in modules]
        for m in modules:
            m.layer_idx = self._virtual(loop, j)
        try:
            yield
        finally:
            for m, i in zip(modules, saved):
                m.layer_idx = i

    def _before_range(self, module, args, kwargs):
        if self._inside:
            return None
        self._call, self._loop = (args, kwargs), 0
        cache = _cache(args, kwargs)
        if cache is not None:
            self._make_room(cache)
        k = self.backprop_loops
        if k is not None and self.n_loops > k and torch.is_grad_enabled():
            self._grad_saved = True  # truncated backprop: the first loop, before the last k, keeps no graph
            torch.set_grad_enabled(False)
        return None

    def _after_stack(self, *_) -> None:
        self._restore_grad()  # and, should a layer have raised inside the range, drop what the call held
        self._call, self._loop, self._inside = None, None, False

    def _restore_grad(self) -> bool:
        """The caller's grad mode, back in force (see ``_before_range``)."""
        if self._grad_saved is not None:
            torch.set_grad_enabled(self._grad_saved)
            self._grad_saved = None
        return torch.is_grad_enabled()

    def _make_room(self, cache) -> None:
        """Give ``cache`` an entry for every (loop, layer) this call will write, made like the layer's own."""
        cache = getattr(cache, "self_attention_cache", cache)  # an encoder-decoder cache: its decoder part
        held = getattr(cache, "_loopscape_n_loops", None)
        if held is not None and held != self.n_loops and cache.get_seq_length() > 0:
            raise ValueError(CACHE_MID_GENERATION.format(held=held, now=self.n_loops))
        if self.n_loops == 1 and held is None:
            return
        layers = getattr(cache, "layers", None)
        if layers is None:
            if not hasattr(cache, "key_cache"):  # transformers < 4.56: lists that grow on update
                raise ValueError(CACHE_UNUSABLE.format(kind=type(cache).__name__))
        elif getattr(cache, "layer_class_to_replicate", None) is None:
            needed = self._virtual(self.n_loops - 1, self.stop - self.start - 1) + 1
            for v in range(len(layers), needed):
                source = layers[self.start + (v - len(self._layers)) % (self.stop - self.start)]
                if getattr(source, "is_initialized", False) and cache.get_seq_length() > 0:
                    raise ValueError(CACHE_MID_GENERATION.format(held=held or 1, now=self.n_loops))
                layers.append(copy.deepcopy(source))
        cache._loopscape_n_loops = self.n_loops

    def _after_range(self, module, args, kwargs, output):
        if self._inside:
            return None
        grad = self._restore_grad()
        self._loop = None
        h, rest = _split(output)
        self.loop_states = [h] if self.record else []
        exit = self.exit
        call_args, call_kwargs = self._call
        self._call = None  # the range's inputs are not kept past the call
        if self.n_loops == 1:
            self.loops_used = None
            return None
        e = call_args[0] if call_args else call_kwargs["hidden_states"]
        rest_args = call_args[1:]
        call_kwargs = {k: v for k, v in call_kwargs.items() if k != "hidden_states"}
        used = torch.ones(h.shape[:-1], dtype=torch.long, device=h.device)
        exited = torch.zeros(h.shape[:-1], dtype=torch.bool, device=h.device)
        self._inside = True
        try:
            k = self.backprop_loops
            for t in range(1, self.n_loops):
                # truncated backprop: only the last k loops build a graph; e keeps its gradient in them
                with torch.set_grad_enabled(grad and (k is None or t >= self.n_loops - k)):
                    x = self._inject(h, e)
                    self._loop = t
                    for j, layer in enumerate(self.range_layers()):
                        with self._at_loop(t, j):
                            x, rest = _split(layer(x, *rest_args, **call_kwargs))
                    self._loop = None
                if exit is not None:
                    x = torch.where(exited[..., None], h, x)  # an exited token keeps its exit state
                    value = self._criterion(h, x)
                    used = torch.where(exited, used, used + 1)
                    done = used >= min(self._settings["min_loops"], self.n_loops)
                    exited = exited | ((value < self._settings["exit_threshold"]) & done)
                h = x
                if self.record:
                    self.loop_states.append(h)
        finally:
            self._inside, self._loop = False, None
        self.loops_used = used if exit is not None else torch.full_like(used, self.n_loops)
        if exit is not None:
            for k, n in zip(*torch.unique(used, return_counts=True)):
                self.exit_counts[int(k)] = self.exit_counts.get(int(k), 0) + int(n)
            log.debug("loopify exit: mean %.3f loops per token over %d tokens", used.float().mean(), used.numel())
        return h if rest is None else (h, *rest)

    def _inject(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if self.injection == "add":
            return h + e
        if self.injection == "concat":
            return self.adapter(torch.cat([h, e], -1))
        return h

    def _criterion(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """Per token, the exit criterion between successive loops' outputs. ``kl``: KL(p_t || p_{t-1}) of the
        next-token distributions read through the final norm and LM head (the layers after the range are
        skipped, a logit lens), Huginn's KL exit (Geiping et al., 2025, "Scaling up test-time compute with
        latent reasoning", Sec. 6); ``entropy``: |H(p_t) - H(p_{t-1})|, the entropy-change exit of the same
        work; ``state``: ||h_t - h_{t-1}|| / ||h_t||, the relative change of the latent state (Huginn's
        convergence measure of the recurrent state)."""
        if self.exit == "state":
            return (after - before).float().norm(dim=-1) / after.float().norm(dim=-1).clamp_min(1e-30)
        norm, head = self._readout
        logp_before = F.log_softmax(head(norm(before)).float(), dim=-1)
        logp_after = F.log_softmax(head(norm(after)).float(), dim=-1)
        if self.exit == "kl":
            return (logp_after.exp() * (logp_after - logp_before)).sum(-1)
        entropy = lambda lp: -(lp.exp() * lp).sum(-1)  # noqa: E731
        return (entropy(logp_after) - entropy(logp_before)).abs()


def _lora_targets(layers: list[nn.Module], start: int, names: list[str] | None):
    """(layer index, name, module) of the range's linear layers whose name is, or ends in, one of ``names``
    (all of them if None); a name that matches nothing is one line naming what there is."""
    found = [
        (start + i, name, m)
        for i, layer in enumerate(layers)
        for name, m in layer.named_modules()
        if _linear_shape(m) is not None and (names is None or any(name == n or name.endswith("." + n) for n in names))
    ]
    if names is not None:
        missing = [n for n in names if not any(name == n or name.endswith("." + n) for _, name, _ in found)]
        if missing:
            there = sorted({name for name, m in layers[0].named_modules() if _linear_shape(m) is not None})
            raise ValueError(
                f"lora_layers must name linear layers of the looped range (got {missing}; there are {there})"
            )
    return found


def _split(output):
    return (output[0], output[1:]) if isinstance(output, tuple) else (output, None)


def _cache(args: tuple, kwargs: dict):
    """The cache a decoder layer was handed: ``cache`` (transformers >= 5.24), ``past_key_values``,
    ``layer_past`` (GPT-2), or positionally after the hidden states (GPT-2 5.x)."""
    for name in ("cache", "past_key_values", "past_key_value", "layer_past"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) and args[1] is not None else None


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
) -> nn.Module:
    """Loop the decoder layers ``layers[0]..layers[1]-1`` of ``model`` ``n_loops`` times, in place;
    returns the model. ``layers=None`` reads the settings saved in ``model.config.loopscape``
    (a looped model loaded back with ``from_pretrained``). ``exit``, ``exit_threshold`` and ``min_loops``:
    per-token exit (module docstring; ``n_loops`` is then the most loops a token runs).
    ``backprop_loops=k``: truncated backprop through the loops (Huginn's training, Geiping et al., 2025,
    Sec. 4; retrofitted recurrence): the first ``n_loops - k`` loops run without a graph, the state entering
    loop ``n_loops - k + 1`` is detached, and the range's input keeps its gradient in the last ``k`` loops, so
    the layers before the range still train; activation memory then grows with ``k``, not the depth. A loop
    count at or below ``k`` (a sampled depth, SHIFT's Stage I) back-propagates through every loop. Curvature
    tools (``loopscape.landscape``) differentiate what the forward records, so on a truncated model they see
    the truncated surrogate: set ``backprop_loops=None`` (loopify again) to measure the loss itself.
    ``injection="concat"``, ``loop_lora=r`` and ``lora_layers`` (names of the range's linear layers, e.g.
    ``["q_proj", "v_proj"]``; all of them if None): see the module docstring. The LoRA is made for the
    ``n_loops`` given here; loops beyond them (a larger ``n_loops`` set later) run the shared weights."""
    structure = Structure(model)
    saved = getattr(model.config, "loopscape", None)
    layers_given = layers is not None  # else the saved settings, whose n_loops may be a later one (SHIFT's)
    if layers is None:
        if saved is None:
            raise ValueError("layers must be a pair (start, stop) of decoder layer indices (got None)")
        layers, n_loops, injection = tuple(saved["layers"]), saved["n_loops"], saved["injection"]
        exit, exit_threshold, min_loops = saved.get("exit"), saved.get("exit_threshold", 0.0), saved.get("min_loops", 1)
        backprop_loops = saved.get("backprop_loops")
        loop_lora, lora_layers, lora_loops = saved.get("loop_lora"), saved.get("lora_layers"), saved.get("lora_loops")
    else:
        lora_loops = None
    n = len(structure.layers)
    if not (isinstance(layers, (tuple, list)) and len(layers) == 2 and 0 <= layers[0] < layers[1] <= n):
        raise ValueError(f"layers must be a pair (start, stop) with 0 <= start < stop <= {n} (got {layers!r})")
    if injection not in INJECTIONS:
        raise ValueError(f"injection must be one of {INJECTIONS} (got {injection!r})")
    _check_loops(n_loops)
    _check_exit(exit, exit_threshold, min_loops, n_loops)
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
        structure,
        layers[0],
        layers[1],
        n_loops,
        injection,
        model.config,
        backprop_loops,
        loop_lora,
        lora_layers,
        lora_loops,
    )
    looped.set_exit(exit, exit_threshold, min_loops)
    structure.stack.looped_range = looped
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and getattr(config, "use_cache", None) is False:
            config.use_cache = True  # a looped model keeps its cache per loop
    return model


def set_exit(model: nn.Module, exit: str | None = None, exit_threshold: float = 0.0, min_loops: int = 1) -> None:
    """Change a loopified model's per-token exit (saved in ``config.loopscape``)."""
    looped = looped_layers(model)
    if looped is None:
        raise ValueError(f"model must be loopified (loopscape.loopify) to set its exit ({type(model).__name__})")
    looped.set_exit(exit, exit_threshold, min_loops)


def from_pretrained(path, **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)``, looped again by the settings its config
    holds, with the loop's own weights (concat adapter, per-loop LoRA) loaded back (a plain
    ``from_pretrained`` gives the unlooped model; it does not know ``config.loopscape``)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the loop's own weights are "unused" by the plain model: reported below
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        others = [k for k in info.get(kind, []) if ".looped_range." not in f".{_key(k)}"]
        if others:
            log.warning("loopscape.from_pretrained(%r): %s %s", path, kind.replace("_", " "), others[:5])
    if getattr(model.config, "loopscape", None) is None:
        raise ValueError(f"path must hold a model saved after loopscape.loopify ({path!r} has no loopscape settings)")
    loopify(model)
    load_loop_weights(model, path, kwargs.get("subfolder", ""))
    return model


def _key(k) -> str:
    return k if isinstance(k, str) else str(k[0])  # mismatched keys come as (name, shapes)


def load_loop_weights(model: nn.Module, path, subfolder: str = "") -> None:
    """Load the loop's own weights (under ``looped_range``: the concat adapter, the per-loop LoRA) of a
    loopified ``model`` from the checkpoint folder ``path`` it was loaded from (``*.safetensors`` or
    ``pytorch_model*.bin``, sharded or not); nothing to do for a loop without weights."""
    own = {k for k in model.state_dict() if ".looped_range." in f".{k}"}
    if not own:
        return
    from pathlib import Path

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


def _read_weights(folder, keys: set[str]) -> dict[str, torch.Tensor]:
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


def _check_loops(n_loops) -> None:
    if not isinstance(n_loops, int) or isinstance(n_loops, bool) or n_loops < 1:
        raise ValueError(f"n_loops must be an integer >= 1 (got {n_loops!r})")


def _check_exit(exit, threshold, min_loops, n_loops) -> None:
    if exit not in EXITS:
        raise ValueError(f"exit must be one of {EXITS} (got {exit!r})")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold >= 0:
        raise ValueError(f"exit_threshold must be a number >= 0 (got {threshold!r})")
    if not isinstance(min_loops, int) or isinstance(min_loops, bool) or not 1 <= min_loops <= n_loops:
        raise ValueError(f"min_loops must be an integer from 1 to n_loops ({n_loops}) (got {min_loops!r})")


@torch.no_grad()
def loop_logits(model: nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits read from every loop's output ``(n_loops, B, W, V)``: the final norm and the LM head
    applied to the state after loop ``t`` (a logit lens; the layers after the range are skipped)."""
    looped = looped_layers(model)
    if looped is None:
        raise ValueError(f"model must be loopified (loopscape.loopify) to read its loops ({type(model).__name__})")
    looped.record = True
    try:
        model(input_ids=input_ids, use_cache=False, **kwargs)
        states = looped.loop_states
    finally:
        looped.record, looped.loop_states = False, []
    norm, head = looped._readout
    return torch.stack([head(norm(h)) for h in states])
