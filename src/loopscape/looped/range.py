"""The loop over a range of a Hugging Face decoder's layers: :class:`LoopedRange`, made by ``loopify``.

The model's layer list is untouched; the loop lives in the decoder's forward path as two forward hooks, one
before the range's first layer and one after its last. With the range's input ``e``, its layers ``B`` and
the injection (:data:`INJECTIONS`), the hook after the range runs the loops the stack's own pass did not::

    h_1 = B(e)                                  # the stack's own pass through the range
    for t = 2..n_loops:
        h_t = B(inject(h_{t-1}, e))             # add: h + e; none: h; concat: W [h; e] + c
        a token that meets the exit (looped.exit.Exit) keeps h_{t-1} from here on
    return h_{n_loops}                          # to the layers after the range

Everything one forward holds (its inputs, the loop running now, the caller's grad mode) lives in one
:class:`_Call`, created by the hook before the range and dropped when the decoder stack returns.

**Cache.** Cache slot ``s >= 1`` of layer ``l`` is its own virtual layer of the model's Hugging Face cache
(index ``L + (s-1)(b-a) + (l-a)`` for ``L`` decoder layers; slot 0 is the layer's own index), made like the
layer's own entry (full or sliding window), so beam search's reordering, cropping and batch selection work
through HF's own cache classes. Which slot each loop writes and reads (``kv_sharing``), and what an exited
token leaves in the deeper loops: :mod:`loopscape.looped.kv`.

**Exit.** An exited token keeps its exit state through the deeper loops; a forward whose tokens have all
exited stops looping (a decode step saves the deeper loops' layer calls), while in a forward with tokens
still looping the layers run on every position and an exited one's results are replaced by its own.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from loopscape.looped import kv
from loopscape.looped.exit import NO_EXIT, Exit
from loopscape.looped.lora import LoopLoRA, lora_targets
from loopscape.looped.protocol import check_n_loops, own_copies, slots, while_set
from loopscape.looped.structure import Structure, linear_shape

log = logging.getLogger(__name__)

INJECTIONS = ("add", "none", "concat")
CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")
CACHE_MID_GENERATION = (
    "loopify: n_loops changed in the middle of a cached generation (the cache holds {held} loops, the model runs "
    "{now}); call set_n_loops between generate() calls, or generate with use_cache=False"
)
SHARING_MID_GENERATION = (
    "loopify: kv_sharing changed in the middle of a cached generation (the cache was written with {held!r}, the "
    "model runs {now!r}); change it between generate() calls"
)
CACHE_UNUSABLE = (
    "loopify: the cache passed to a looped model must be a Hugging Face Cache holding per-layer entries "
    "(e.g. DynamicCache, or none: the model makes one); got {kind}"
)


@dataclass
class _Call:
    """One forward's passage through the range."""

    args: tuple  # the range's first layer's arguments: the input e, then the rest
    kwargs: dict
    loop: int | None = 0  # the loop running now (0-based), for the per-loop LoRA; None between loops
    inside: bool = False  # the range's own loops are running (the hooks let those calls through)
    grad_saved: bool | None = None  # the caller's grad mode, while truncated backprop runs without a graph
    past: bool = False  # the cache it was handed already holds tokens (a decode step)
    shared: object = None  # the looped.kv.LoopCache of this forward (with kv_sharing or an exit)


class LoopedRange(nn.Module):
    """The loop over decoder layers ``start..stop-1`` (module docstring); implements
    :class:`~loopscape.looped.protocol.Looped`. It keeps the layers, the final norm and the LM head as
    plain references (not submodules), so the model's own parameters and state-dict keys are the
    original's; its own parameters are the loop's (the concat adapter, the per-loop LoRA), saved under its
    name."""

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
        kv_sharing: str | None = None,
    ):
        super().__init__()
        self.start, self.stop, self.injection, self._backprop_loops = start, stop, injection, backprop_loops
        self._sharing = kv_sharing
        self.loop_lora, self.lora_layers = loop_lora, lora_layers
        self._layers = list(structure.layers)  # a plain list: not registered again as submodules
        self._stack = (structure.stack,)  # the decoder stack, not registered (it holds this module)
        self._lens = (structure.norm, structure.head)  # the final norm and LM head
        self._config = config
        self._exit: Exit | None = None
        self._n_loops = n_loops
        self._call: _Call | None = None
        self._recording: list[torch.Tensor] | None = None
        self._untied: list[dict[int, torch.Tensor]] | None = None
        self._tail: list = []  # while recording: the arguments of each layer after the range, last forward
        self._reading = False  # readout is running the layers after the range (not a forward to record)
        self._recorded_past = False  # the forward recorded last had a cache with past tokens
        self._drafting = False  # inside drafting(): fewer loops than the cache holds, for a draft
        self.loops_used: torch.Tensor | None = None  # (batch, positions) of the last call
        # loops used -> tokens through the range since reset_exit_counts(): a generation's prompt tokens included
        self.exit_counts: dict[int, int] = {}
        # the modules whose `layer_idx` names their cache entry, per looped layer
        self._slots = slots(self.range_layers())  # where each layer's weights sit in looped_parameters()
        self._cache_name, self._cache_position = _cache_parameter(self.range_layers()[0])
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
            for i, name, module in lora_targets(self.range_layers(), start, lora_layers):
                fan_in, fan_out = linear_shape(module)
                key = f"{i}_{name.replace('.', '_')}"
                self.lora[key] = LoopLoRA(lora_loops or n_loops, loop_lora, fan_in, fan_out, like)
                lora_hooks.append(module.register_forward_hook(self._lora_hook(key)))
        self._hooks = [
            *lora_hooks,
            self._layers[start].register_forward_pre_hook(self._before_range, with_kwargs=True),
            # after _before_range: with kv_sharing="first", loop 0 of every looped layer keeps what it attends to
            *(layer.register_forward_pre_hook(self._loop0_cache, with_kwargs=True) for layer in self.range_layers()),
            self._layers[stop - 1].register_forward_hook(self._after_range, with_kwargs=True),
            # the caller's grad mode comes back even when a layer raises inside the range
            structure.stack.register_forward_hook(self._after_stack, always_call=True),
        ]
        self._save()

    # --- the protocol -------------------------------------------------------------------------------------
    @property
    def n_loops(self) -> int:
        return self._n_loops

    @n_loops.setter
    def n_loops(self, value: int) -> None:
        self._n_loops = check_n_loops(value)  # min_loops above it is read as n_loops (SHIFT's Stage I)
        self._save()

    def looped_parameters(self) -> list[nn.Parameter]:
        """The weights every loop shares: the range's layers'."""
        return [p for layer in self.range_layers() for p in layer.parameters()]

    def untie_loops(self, weights: list[dict[int, torch.Tensor]]):
        """Loop ``t >= 1`` (0-based) runs on ``weights[t]`` (``weights[t][i]``: its copy of
        ``looped_parameters()[i]``; loops past ``len(weights)``: the last). Loop 0 is the model's own pass
        through the range: it runs the model's weights, so ``weights[0]`` must be empty."""
        if weights and weights[0]:
            raise ValueError(
                "weights[0] must be empty for a loopified range: its first loop is the model's own forward "
                "(give loop 0's copy as the model's parameters, e.g. by torch.func.functional_call)"
            )
        return while_set(self, "_untied", weights)

    @contextlib.contextmanager
    def recording(self):
        """Within the context, the list it yields holds each loop's state of the last forward, and
        :meth:`readout` reads them (the layers after the range run on the arguments they had then)."""
        previous = self._recording, self._tail, self._recorded_past  # an outer recording goes on after this one
        self._recording = states = []
        tail = self._layers[self.stop :]
        hooks = [layer.register_forward_pre_hook(self._keep_tail(j), with_kwargs=True) for j, layer in enumerate(tail)]
        self._tail = [None] * len(tail)
        try:
            yield states
        finally:
            self._recording, self._tail, self._recorded_past = previous
            for h in hooks:
                h.remove()

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """The logits the model would give with ``h`` as the range's output: the layers after the range (on
        the arguments of the last forward recorded, cache left out), the final norm and the LM head."""
        x, tail = h, self._layers[self.stop :]
        if tail and (not self._tail or self._tail[0] is None):
            raise ValueError("readout reads the states of a forward run inside recording() (none was)")
        if tail and self._recorded_past:
            raise ValueError(
                "readout reads a forward without a cache's past (a decode step's later layers would attend to nothing "
                "before the new token): record with use_cache=False"
            )
        reading, self._reading = self._reading, True
        try:
            for layer, (args, kwargs) in zip(tail, self._tail):
                x, _ = _split(layer(x, *args, **kwargs))
        finally:
            self._reading = reading
        norm, head = self._lens
        return head(norm(x))

    def weights_per_token(self, n_loops: int, last: int | None = None) -> int:
        """Weights a token multiplies through in the range's last ``last`` loops (all if None) of ``n_loops``:
        the layers' once per loop, the adapter once per loop from the second, each loop's own LoRA. Forward
        FLOPs are twice this; the backward of truncated backprop goes through ``last = backprop_loops``."""
        last = n_loops if last is None else min(last, n_loops)
        first = n_loops - last  # 0-based index of the first loop counted
        layers = sum(p.numel() for p in self.looped_parameters())
        adapter = sum(p.numel() for p in self.adapter_parameters()) * (last - (first == 0))
        lora = sum(m.weights_per_loop() for m in self.lora.values()) if self.loop_lora else 0
        return last * layers + adapter + max(0, min(n_loops, self._lora_loops()) - first) * lora

    # --- settings -------------------------------------------------------------------------------------
    @property
    def backprop_loops(self) -> int | None:
        """Truncated backprop: only the last ``backprop_loops`` loops build a graph (None: every loop)."""
        return self._backprop_loops

    @backprop_loops.setter
    def backprop_loops(self, k: int | None) -> None:
        self._backprop_loops = None if k is None else check_n_loops(k, "backprop_loops")
        self._save()

    @property
    def kv_sharing(self) -> str | None:
        """Which cache slot each loop's keys and values go to (:mod:`loopscape.looped.kv`)."""
        return self._sharing

    @kv_sharing.setter
    def kv_sharing(self, value: str | None) -> None:
        self._sharing = kv.check_sharing(value, self.n_loops)
        self._save()

    @property
    def exit(self) -> Exit | None:
        """The per-token exit policy (None: every token runs ``n_loops`` loops)."""
        return self._exit

    @exit.setter
    def exit(self, policy: Exit | None) -> None:
        if policy is not None and not isinstance(policy, Exit):
            raise ValueError(f"exit must be a loopscape.looped.exit.Exit or None (got {policy!r})")
        check_exit_reads(policy, self.start, self.stop, len(self._layers))
        self._exit = policy
        self._save()

    def set_exit(self, exit: str | None = None, exit_threshold: float = 0.0, min_loops: int = 1) -> None:
        """Per-token exit by ``loopify``'s arguments; ``exit=None`` runs every token ``n_loops`` times."""
        self.exit = Exit.of(exit, exit_threshold, min_loops, self.n_loops)

    def settings(self) -> dict:
        return {
            "layers": [self.start, self.stop],
            "n_loops": self.n_loops,
            "injection": self.injection,
            "backprop_loops": self.backprop_loops,
            "loop_lora": self.loop_lora,
            "lora_layers": self.lora_layers,
            "lora_loops": self._lora_loops() or None,  # the loops the LoRA was made for (n_loops may move)
            "kv_sharing": self._sharing,
            **(NO_EXIT if self._exit is None else self._exit.settings()),
        }

    def _save(self) -> None:
        if self._config is not None:
            self._config.loopscape = self.settings()

    def range_layers(self) -> list[nn.Module]:
        """The looped layers ``start..stop-1``."""
        return self._layers[self.start : self.stop]

    def loop_parameters(self) -> list[nn.Parameter]:
        """The loop's own weights (concat adapter, per-loop LoRA), which the original model does not have."""
        return list(self.parameters())

    def lora_parameters(self) -> list[nn.Parameter]:
        """The per-loop LoRA's parameters (for an optimiser group of their own)."""
        return list(self.lora.parameters()) if self.loop_lora is not None else []

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The concat injection's adapter's parameters."""
        return list(self.adapter.parameters()) if self.injection == "concat" else []

    @property
    def current_loop(self) -> int | None:
        """The loop running now (0-based) inside a forward, else None."""
        return None if self._call is None else self._call.loop

    def _lora_loops(self) -> int:
        return next(iter(self.lora.values())).n_loops if self.loop_lora else 0

    def _lora_hook(self, key: str):
        def hook(module, args, output):
            loop = self.current_loop
            if loop is None or loop >= self._lora_loops():  # loops past those made run the shared weights
                return None
            return output + self.lora[key].delta(args[0], loop)

        return hook

    def reset_exit_counts(self) -> None:
        self.exit_counts = {}

    def depth_per_call(self, model: nn.Module) -> None:
        """``model(..., n_loops=k)`` runs ``k`` loops for that call only (Huginn's ``num_steps``), the model's own
        count back afterwards, even if the call raises: the keyword is taken off the call before the model sees
        it (its ``**kwargs`` would pass it on unread). Hooks are bound methods, so a deep copy of the model
        gets hooks on its own copy of the range."""
        self._depths: list[int | None] = []
        self._hooks += [
            model.register_forward_pre_hook(self._depth_before, with_kwargs=True),
            model.register_forward_hook(self._depth_after, with_kwargs=True, always_call=True),
        ]

    @contextlib.contextmanager
    def drafting(self, k: int):
        """Run ``k`` loops (fewer than the cache was made for) without changing what the cache holds: the
        draft steps of :func:`~loopscape.looped.speculative.generate_speculative`, whose entries are cut back
        before the full-depth forward that verifies them."""
        saved = self._n_loops, self._drafting
        self._n_loops, self._drafting = check_n_loops(k), True
        try:
            yield
        finally:
            self._n_loops, self._drafting = saved

    def _loop0_cache(self, module, args, kwargs):
        call = self._call
        if call is None or call.inside or call.shared is None or self._sharing != "first":
            return None
        rest, kwargs = self._with_cache(args[1:], kwargs, call.shared)
        return (*args[:1], *rest), kwargs

    def _with_cache(self, args: tuple, kwargs: dict, cache) -> tuple[tuple, dict]:
        """A looped layer's arguments after the hidden states, with ``cache`` where the layer takes its cache:
        the keyword it was given, else its position, else its keyword by the layer's signature."""
        for name in CACHE_NAMES:
            if name in kwargs:
                return args, {**kwargs, name: cache}
        i = self._cache_position
        if i is not None and i < len(args):
            return (*args[:i], cache, *args[i + 1 :]), kwargs
        return args, {**kwargs, self._cache_name: cache}

    def _depth_before(self, module, args, kwargs):
        k = kwargs.get("n_loops")
        self._depths.append(None if k is None else self._n_loops)  # one entry per call, popped after it
        if k is None:
            return None
        kwargs = {name: v for name, v in kwargs.items() if name != "n_loops"}
        self._n_loops = check_n_loops(k)  # for this call: not saved in the config
        return args, kwargs

    def _depth_after(self, module, args, kwargs, output):
        own = self._depths.pop() if self._depths else None
        if own is not None:
            self._n_loops = own

    def remove(self) -> None:
        """Undo the loop: remove the hooks (the model is the original again)."""
        for h in self._hooks:
            h.remove()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings().items() if v is not None)

    # --- the forward path ---------------------------------------------------------------------------------
    def _before_range(self, module, args, kwargs):
        if self._call is not None and self._call.inside:
            return None
        if torch.is_grad_enabled() and getattr(self._stack[0], "gradient_checkpointing", False):
            # the recomputed layers would not know their loop (LoRA), and would run without the shared cache
            on = {"loop_lora": self.loop_lora, "kv_sharing": self._sharing, "an exit": self._exit}
            what = [name for name, setting in on.items() if setting is not None]
            if what:
                raise ValueError(
                    f"{' and '.join(what)} cannot train under gradient checkpointing: the recomputed layers would not "
                    "know their loop or their shared cache (turn checkpointing off, or train without it)"
                )
        self._call = call = _Call(args, kwargs)
        cache = _cache(args, kwargs)
        if cache is not None:
            self._make_room(cache)
            call.past = getattr(cache, "self_attention_cache", cache).get_seq_length() > 0
        if (self._exit is not None or self._sharing is not None) and self.n_loops > 1:
            call.shared = kv.LoopCache(cache, self._sharing, list(range(self.start, self.stop)))
        k = self.backprop_loops
        if k is not None and self.n_loops > k and torch.is_grad_enabled():
            call.grad_saved = True  # truncated backprop: the first loop, before the last k, keeps no graph
            torch.set_grad_enabled(False)
        return None

    def _after_range(self, module, args, kwargs, output):
        call = self._call
        if call is None or call.inside:
            return None
        grad = self._restore_grad()
        call.loop = None
        h, rest = _split(output)
        if self._recording is not None:
            self._recording[:] = [h]
            self._recorded_past = call.past
        if self.n_loops == 1:
            self.loops_used = None
            return None
        e, rest_args = call.args[0] if call.args else call.kwargs["hidden_states"], call.args[1:]
        kwargs = {k: v for k, v in call.kwargs.items() if k != "hidden_states"}
        used = torch.ones(h.shape[:-1], dtype=torch.long, device=h.device)
        exited = torch.zeros(h.shape[:-1], dtype=torch.bool, device=h.device)
        policy, k = self._exit, self.backprop_loops
        shared = call.shared  # the layers' cache, which applies sharing and the exit (None: neither is on)
        if shared is not None:
            rest_args, kwargs = self._with_cache(rest_args, kwargs, shared)
        memo: dict = {}  # the exit criterion's state across loops (its candidate vocabulary)
        call.inside = True
        try:
            for t in range(1, self.n_loops):
                gone = int(exited.sum()) if policy is not None else 0  # (no exit: no branch for torch.compile)
                if policy is not None and gone == exited.numel():  # every token has exited: nothing left to do
                    shared.write_exited(t, self._index)
                    if self._recording is not None:
                        self._recording.append(h)
                    continue
                if shared is not None:
                    shared.loop, shared.exited = t, exited if gone else None
                # truncated backprop: only the last k loops build a graph; e keeps its gradient in them
                with torch.set_grad_enabled(grad and (k is None or t >= self.n_loops - k)):
                    x = self._inject(h, e)
                    call.loop = t
                    for j, layer in enumerate(self.range_layers()):
                        if shared is not None:
                            shared.layer = j
                        with self._at_loop(t, j):
                            x, rest = _split(self._run(t, j, layer, x, rest_args, kwargs))
                    call.loop = None
                if policy is not None:
                    x = torch.where(exited[..., None], h, x)  # an exited token keeps its exit state
                    value = policy.score(h, x, self._lens_of, memo)
                    used = torch.where(exited, used, used + 1)
                    done = used >= min(policy.min_loops, self.n_loops)
                    exited = exited | ((value < policy.threshold) & done)
                h = x
                if self._recording is not None:
                    self._recording.append(h)
        finally:
            call.inside, call.loop = False, None
        self.loops_used = used if policy is not None else torch.full_like(used, self.n_loops)
        if policy is not None:
            for n, count in zip(*torch.unique(used, return_counts=True)):
                self.exit_counts[int(n)] = self.exit_counts.get(int(n), 0) + int(count)
            log.debug("loopify exit: mean %.3f loops per token over %d tokens", used.float().mean(), used.numel())
        return h if rest is None else (h, *rest)

    def _after_stack(self, *_) -> None:
        self._restore_grad()  # and, should a layer have raised inside the range, drop what the call held
        self._call = None

    def _restore_grad(self) -> bool:
        """The caller's grad mode, back in force (see ``_before_range``)."""
        call = self._call
        if call is not None and call.grad_saved is not None:
            torch.set_grad_enabled(call.grad_saved)
            call.grad_saved = None
        return torch.is_grad_enabled()

    def _run(self, t: int, j: int, layer: nn.Module, x, args: tuple, kwargs: dict):
        """Layer ``j`` of the range at loop ``t``: on its untied copy inside :meth:`untie_loops`."""
        own = self._own_weights(t, j)
        if own:
            return functional_call(layer, own, (x, *args), kwargs)
        return layer(x, *args, **kwargs)

    def _own_weights(self, t: int, j: int) -> dict[str, torch.Tensor]:
        if not self._untied:
            return {}
        return own_copies(self._slots[j], self._untied[min(t, len(self._untied) - 1)])

    def _lens_of(self, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The exit criteria's readout of a state: the final norm and the LM head (the range ends at the last
        layer, which the exit setter checks), on the head's ``rows`` only when given (``(..., k)`` token ids).
        Where the rows of every position outnumber the head's (a long prompt), the whole head is cheaper."""
        norm, head = self._lens
        if rows is None:
            return head(norm(h))
        if rows.numel() >= head.weight.shape[0]:
            return head(norm(h)).gather(-1, rows)
        weight = head.weight[rows]  # (..., k, d)
        logits = (weight @ norm(h).unsqueeze(-1)).squeeze(-1)
        return logits if head.bias is None else logits + head.bias[rows]

    def _keep_tail(self, j: int):
        def hook(module, args, kwargs):
            if not self._reading and self._tail:
                self._tail[j] = (tuple(None if _is_cache(a) else a for a in args[1:]), _without_cache(kwargs))

        return hook

    def _inject(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if self.injection == "add":
            return h + e
        if self.injection == "concat":
            return self.adapter(torch.cat([h, e], -1))
        return h

    # --- the cache ------------------------------------------------------------------------------------------
    def _index(self, loop: int, j: int) -> int:
        """The cache index loop ``loop`` (0-based) of the range's ``j``-th layer writes and reads."""
        s = kv.slot(self._sharing, loop)
        return self.start + j if s == 0 else len(self._layers) + (s - 1) * (self.stop - self.start) + j

    @contextlib.contextmanager
    def _at_loop(self, loop: int, j: int):
        modules = self._indexed[j]
        saved = [m.layer_idx for m in modules]
        for m in modules:
            m.layer_idx = self._index(loop, j)
        try:
            yield
        finally:
            for m, i in zip(modules, saved):
                m.layer_idx = i

    def _make_room(self, cache) -> None:
        """Give ``cache`` an entry for every (loop, layer) this call will write, made like the layer's own."""
        cache = getattr(cache, "self_attention_cache", cache)  # an encoder-decoder cache: its decoder part
        held = getattr(cache, "_loopscape_n_loops", None)
        if self._drafting and held is not None and self.n_loops <= held:
            return  # a draft: the cache keeps its room for the full depth
        if held is not None and held != self.n_loops and cache.get_seq_length() > 0:
            raise ValueError(CACHE_MID_GENERATION.format(held=held, now=self.n_loops))
        sharing = getattr(cache, "_loopscape_sharing", self._sharing)
        if sharing != self._sharing and cache.get_seq_length() > 0:
            raise ValueError(SHARING_MID_GENERATION.format(held=sharing, now=self._sharing))
        if self.n_loops == 1 and held is None:
            return
        layers = getattr(cache, "layers", None)
        if layers is None:
            if not hasattr(cache, "key_cache"):  # transformers < 4.56: lists that grow on update
                raise ValueError(CACHE_UNUSABLE.format(kind=type(cache).__name__))
        elif getattr(cache, "layer_class_to_replicate", None) is None:
            needed = len(self._layers) + (kv.n_slots(self._sharing, self.n_loops) - 1) * (self.stop - self.start)
            for v in range(len(layers), needed):
                source = layers[self.start + (v - len(self._layers)) % (self.stop - self.start)]
                if getattr(source, "is_initialized", False) and cache.get_seq_length() > 0:
                    raise ValueError(CACHE_MID_GENERATION.format(held=held or 1, now=self.n_loops))
                layers.append(copy.deepcopy(source))
        cache._loopscape_n_loops, cache._loopscape_sharing = self.n_loops, self._sharing


def check_exit_reads(policy: Exit | None, start: int, stop: int, n_layers: int) -> None:
    """The distribution criteria need the model's readout of every loop: the final norm and LM head, when the
    range ends at the last layer; through the layers after it, they would cost more than the loop."""
    if policy is not None and policy.criterion in ("kl", "entropy") and stop < n_layers:
        after = n_layers - stop
        follow = f"{after} decoder layer{'s' * (after > 1)} follow{'s' * (after == 1)}"
        raise ValueError(
            f"exit {policy.criterion!r} reads each loop's next-token distribution, and {follow} the range (layers "
            f"{start}..{stop - 1} of {n_layers}): reading through them at every loop costs more than a loop; use "
            "exit='state', or loop a range that ends at the last layer"
        )


def _split(output):
    return (output[0], output[1:]) if isinstance(output, tuple) else (output, None)


def _is_cache(value) -> bool:
    return value is not None and not isinstance(value, torch.Tensor) and hasattr(value, "get_seq_length")


def _cache(args: tuple, kwargs: dict):
    """The cache a decoder layer was handed: ``cache`` (transformers >= 5.24), ``past_key_values``,
    ``layer_past`` (GPT-2), or positionally after the hidden states (GPT-2 5.x)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) and args[1] is not None else None


def _cache_parameter(layer: nn.Module) -> tuple[str, int | None]:
    """The name under which a decoder layer takes its cache (transformers >= 5.24: ``cache``), and its
    position among the arguments after the hidden states (None: keyword only)."""
    params = inspect.signature(layer.forward).parameters
    name = next((n for n in CACHE_NAMES if n in params), "past_key_values")
    positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return name, (positional.index(name) - 1 if name in positional[1:] else None)


def _without_cache(kwargs: dict) -> dict:
    out = {k: (None if k in CACHE_NAMES else v) for k, v in kwargs.items()}
    if "use_cache" in out:
        out["use_cache"] = False
    return out
