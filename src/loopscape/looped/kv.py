"""What the keys and values of a loopified range's deeper loops are, and where they live in the cache.

**Sharing** (``loopify(..., kv_sharing=...)``), for loop ``t`` (0-based; loop 0 is the model's own pass) of
a looped layer:

* ``None``: loop ``t`` writes its own slot ``t``; its queries attend to slot ``t``: every earlier token's
  keys and values at loop ``t``, and the token's own. Exact: a cached decode equals the full forward.
* ``"first"`` (Mixture-of-Recursions' recursive sharing, Bae et al., 2025): loops ``t >= 1`` write nothing;
  their queries attend to the keys and values loop 0 attended to (every token's loop-0 entry up to and
  including their own; a sliding-window layer's window of them). A full forward and a cached decode agree;
  the cache is the plain model's.
* ``"cycle:K"`` (Huginn's ``compress-sK``, Geiping et al., 2025): ``K`` slots per layer; loop ``t`` writes
  slot ``t mod K``, over the entry an earlier loop of the same token wrote there, and attends to that slot.
  A token decoded before the current forward is seen through the last loop it wrote to the slot; the tokens
  of the current forward (a prompt) see each other's loop-``t`` entries, as without sharing. So a prompt
  read in one forward and one read token by token differ; ``cycle:n_loops`` is ``None``. A sliding-window
  layer's cache is refused (its window may have dropped what the slot wrote).

**Exit.** A token that has exited at loop ``e`` keeps its state; wherever a deeper loop writes, it writes the
token's loop-``e`` keys and values (a reference, not a computation), so later tokens find an entry at every
loop. A forward whose positions have all exited stops looping (a decode step computes nothing deeper); in
one forward over many positions (a prompt, a partly exited batch) the layers still run on every position,
and an exited position's output and keys and values are replaced by its own.

:class:`LoopCache` is what the range's layers are handed as their cache when sharing or an exit is on: it
applies both rules and passes everything else to the model's cache (or keeps nothing when the forward has
none).
"""

from __future__ import annotations

import torch


def check_sharing(value, n_loops: int) -> str | None:
    """``value`` as ``config.loopscape`` saves it, or one line naming ``kv_sharing`` and what it allows."""
    if value is None or value == "first":
        return value
    if isinstance(value, str) and value.startswith("cycle:"):
        k = value.split(":", 1)[1]
        if k.isdigit() and 1 <= int(k) <= n_loops:
            return f"cycle:{int(k)}"
        raise ValueError(f"kv_sharing 'cycle:K' needs K an integer from 1 to n_loops ({n_loops}) (got {value!r})")
    raise ValueError(f"kv_sharing must be None, 'first' or 'cycle:K' with K from 1 to n_loops (got {value!r})")


def slot(sharing: str | None, loop: int) -> int:
    """The cache slot loop ``loop`` (0-based) writes and reads (slot 0: the layer's own cache entry)."""
    if sharing is None:
        return loop
    if sharing == "first":
        return 0
    return loop % int(sharing.split(":")[1])


def n_slots(sharing: str | None, n_loops: int) -> int:
    """Cache slots per looped layer at ``n_loops`` loops."""
    return max(slot(sharing, t) for t in range(n_loops)) + 1


def cache_bytes(cache) -> int:
    """Bytes of every key and value tensor a Hugging Face cache holds."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # transformers < 4.56: lists of tensors
        tensors = [*cache.key_cache, *cache.value_cache]
    else:
        tensors = [getattr(layer, name, None) for layer in layers for name in ("keys", "values")]
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def entries(cache, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values cache entry ``idx`` holds."""
    if getattr(cache, "layers", None) is None:
        return cache.key_cache[idx], cache.value_cache[idx]
    layer = cache.layers[idx]
    return layer.keys, layer.values


def _rewrite(cache, idx: int, keys: torch.Tensor, values: torch.Tensor, args: tuple, kwargs: dict):
    """Entry ``idx``'s last positions (this forward's, written by an earlier loop) replaced by ``keys`` and
    ``values``: a cycle's revisited slot."""
    layer = None if getattr(cache, "layers", None) is None else cache.layers[idx]
    if getattr(layer, "is_sliding", False):  # a window may have dropped or rolled what the slot wrote
        raise ValueError("kv_sharing 'cycle:K' cannot rewrite a sliding-window cache layer: use 'first' or None")
    if hasattr(layer, "max_cache_len") or (layer is None and "Static" in type(cache).__name__):
        if hasattr(layer, "cumulative_length"):  # transformers >= 5: the layer counts its own positions
            layer.cumulative_length -= keys.shape[-2]
        return cache.update(keys, values, idx, *args, **kwargs)  # (older static caches: at cache_position)
    q = keys.shape[-2]
    old_k, old_v = entries(cache, idx)
    k, v = torch.cat([old_k[..., :-q, :], keys], -2), torch.cat([old_v[..., :-q, :], values], -2)
    if layer is None:  # transformers < 4.56: lists of tensors
        cache.key_cache[idx], cache.value_cache[idx] = k, v
    else:
        layer.keys, layer.values = k, v
    return k, v


class LoopCache:
    """The cache the range's layers see in one forward (module docstring): in loop 0 with ``"first"`` (to keep
    the keys and values loop 0 attends to), in loops ``t >= 1`` with any sharing or an exit. ``cache``: the
    model's cache, or None (nothing is kept beyond this forward). ``first[j]``: layer ``j``'s own cache index.
    The range sets ``loop``, ``layer`` and ``exited`` (``(batch, positions)``, None while no token has exited)
    before each deeper layer call."""

    def __init__(self, cache, sharing: str | None, first: list[int]):
        self.cache, self.sharing, self._first = cache, sharing, first
        self.loop, self.layer = 0, 0
        self.exited: torch.Tensor | None = None
        self._loop0: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> what loop 0 attended to
        self._own: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> each position's last entry
        self._written = set(first)  # cache indices that already hold this forward's positions (loop 0's)
        self._call: dict[int, tuple[tuple, dict]] = {}  # layer -> update()'s other arguments (cache_position)

    def __getattr__(self, name):  # the model's cache answers everything else (lengths, masks)
        cache = self.__dict__.get("cache")
        if cache is None:
            raise AttributeError(f"a looped layer asked its cache for {name!r}, and this forward has none")
        return getattr(cache, name)

    def update(self, keys: torch.Tensor, values: torch.Tensor, idx: int, *args, **kwargs):
        if self.loop == 0:  # the model's own pass ("first" only): what it attends to, the deeper loops will
            out = (keys, values) if self.cache is None else self.cache.update(keys, values, idx, *args, **kwargs)
            self._loop0[self._first.index(idx)] = out
            return out
        j = self.layer
        if self.exited is not None and j in self._own:
            gone = self.exited[:, None, :, None]  # (batch, heads, positions, head_dim)
            keys, values = torch.where(gone, self._own[j][0], keys), torch.where(gone, self._own[j][1], values)
        self._own[j] = keys, values
        self._call[j] = args, kwargs
        if self.sharing == "first":  # loops >= 1 attend to what loop 0 attended to, and write nothing
            return self._loop0[j]
        if self.cache is None:
            return keys, values
        if idx in self._written:
            return _rewrite(self.cache, idx, keys, values, args, kwargs)
        self._written.add(idx)
        return self.cache.update(keys, values, idx, *args, **kwargs)

    def write_exited(self, loop: int, index) -> None:
        """Loop ``loop``'s entries when every position has exited: each position's exit entry, written where
        the loop writes (``index(loop, j)``), nothing computed."""
        if self.sharing == "first" or self.cache is None:
            return
        self.loop = loop
        for j, (keys, values) in list(self._own.items()):
            self.layer = j
            args, kwargs = self._call[j]
            self.update(keys, values, index(loop, j), *args, **kwargs)
