"""GPT-2 blocks looped with input injection: Single-Attn and Looped-Attn of
Appendix E.2 ("FOP-Loop-Adaptive", after Fan et al., 2024).

With read-in ``E(x)`` (a linear map with bias on the one-hot tokens, or an
embedding table; no positional encoding: NoPE) and a block ``B`` of
``n_layers`` pre-LayerNorm GPT-2 layers and a final LayerNorm,

    h_0 = 0,    h_t = B(h_{t-1} + E(x))      (input injection)
    logits_t = W_out h_t                     (read-out shared by all loops)

Looped-Attn supervises sample ``i`` at its own step ``T(n_i)``; Single-Attn is
the same block applied once (``n_loops = 1``). At inference the number of loops
is chosen by :func:`adaptive_decode` (the model's confidence in its own greedy
decode) or given (the oracle ``T(n)``).

Initialisation as the authors' code (spec, "Model"): read-in and read-out at
PyTorch's default (``nn.Linear``: uniform within ``1/sqrt(fan_in)``;
``nn.Embedding``: ``N(0, 1)``), the GPT-2 backbone at ``N(0, 0.02)`` with the
residual output projections at ``0.02 / sqrt(2 x layers)``, biases 0.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from loopscape.looped.protocol import check_n_loops, own_copies, slots, while_set

READ_INS = ("linear", "embedding")
INITS = ("authors", "normal")


@dataclass
class LoopedGPTConfig:
    """A study's ``model:`` section is this dataclass; the study fills in
    ``vocab_size`` from its task at build time.

    Attributes:
    vocab_size: tokens (the task's vocabulary, pad included); ``None`` until built.
    d_model: width (256 in the paper).
    n_heads: attention heads; must divide ``d_model``.
    n_layers: GPT-2 layers inside the looped block.
    mlp_ratio: MLP hidden width / ``d_model`` (4 in GPT-2).
    input_injection: add ``E(x)`` before every step (else ``h_0 = E(x)``, ``h_t = B(h_{t-1})``).
    read_in: ``"linear"``: a linear map with bias on the one-hot tokens (the
        authors' bit tasks); ``"embedding"``: an embedding table (their Unique Set).
    head_bias: a bias in the read-out (the authors': yes).
    init: ``"authors"`` (above); ``"normal"``: every linear and embedding weight
        ``N(0, init_std)`` and biases 0 (our earlier reading, with
        ``read_in="embedding"`` and ``head_bias=False``).
    init_std: the backbone's std (GPT-2: 0.02); with ``init="normal"`` every weight's.
    backprop_loops: back-propagate through only the last ``k`` loops of each sample (truncated backprop
        through the recurrence, as Huginn's training does: Geiping et al., 2025, Sec. 4); the earlier loops
        run without a graph and ``E(x)`` keeps its gradient in the last ``k``. ``None``: every loop. A
        sample with ``k`` loops or fewer back-propagates through all of them.
    """

    vocab_size: int | None = None
    d_model: int = 256
    n_heads: int = 8
    n_layers: int = 1
    mlp_ratio: int = 4
    input_injection: bool = True
    read_in: str = "linear"
    head_bias: bool = True
    init: str = "authors"
    init_std: float = 0.02
    backprop_loops: int | None = None

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads must divide d_model (got d_model={self.d_model}, n_heads={self.n_heads})")
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "mlp_ratio"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {getattr(self, name)})")
        for name, allowed in (("read_in", READ_INS), ("init", INITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed} (got {getattr(self, name)!r})")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be a number > 0 (got {self.init_std})")
        k = self.backprop_loops
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ValueError(f"backprop_loops must be an integer >= 1 or None for every loop (got {k!r})")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: LoopedGPTConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, W, d = x.shape
        q, k, v = self.qkv(x).view(B, W, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, W, d))


class MLP(nn.Module):
    def __init__(self, config: LoopedGPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Layer(nn.Module):
    """One pre-LayerNorm GPT-2 layer: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, config: LoopedGPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class LoopedGPT(nn.Module):
    """The looped block with read-in and read-out. ``model(x, n_loops)``; implements the
    :class:`~loopscape.looped.Looped` protocol (``n_loops``: the count a call without one runs)."""

    def __init__(self, config: LoopedGPTConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("vocab_size must be set to build a model (a study fills it in from its task)")
        self.config = config
        self._n_loops = 1
        self._untied: list[dict[int, torch.Tensor]] | None = None
        self._recording: list[torch.Tensor] | None = None
        V, d = config.vocab_size, config.d_model
        self.read_in = nn.Linear(V, d) if config.read_in == "linear" else nn.Embedding(V, d)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, V, bias=config.head_bias)
        self._slots = slots([*self.layers, self.ln_f])  # where each module's weights sit in looped_parameters()
        self.reset_backbone()
        if config.init == "normal":
            for module in (self.read_in, self.head):
                nn.init.normal_(module.weight, std=config.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def reset_backbone(self) -> None:
        """GPT-2's initialisation of the block: ``N(0, init_std)``, residual output projections
        ``init_std / sqrt(2 n_layers)`` under ``init="authors"`` (two residual branches per layer)."""
        std = self.config.init_std
        residual = std / math.sqrt(2 * self.config.n_layers) if self.config.init == "authors" else std
        for layer in self.layers:
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    is_residual = module is layer.attn.proj or module is layer.mlp.proj
                    nn.init.normal_(module.weight, std=residual if is_residual else std)
                    nn.init.zeros_(module.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``E(x)``: token ids ``(B, W)`` to ``(B, W, d)``; the linear read-in takes their one-hot codes."""
        if isinstance(self.read_in, nn.Embedding):
            return self.read_in(x)
        return self.read_in(F.one_hot(x, self.config.vocab_size).to(self.read_in.weight.dtype))

    def block(self, h: torch.Tensor, loop: int = 0) -> torch.Tensor:
        """``B(h)``: the looped block, final LayerNorm included (at loop ``loop``, 0-based: its own copy of
        the block's weights inside :meth:`untie_loops`)."""
        *own, own_norm = self._own_weights(loop)
        for layer, weights in zip(self.layers, own):
            h = _call(layer, weights, h)
        return _call(self.ln_f, own_norm, h)

    def step(self, h: torch.Tensor | None, e: torch.Tensor, loop: int = 0) -> torch.Tensor:
        """``h_t`` from ``h_{t-1}`` (``None`` for ``h_0``) and the read-in ``e = E(x)``; ``loop = t - 1``."""
        if h is None:
            return self.block(e, loop)  # h_0 = 0 with injection; h_0 = E(x) without: both give B(E(x))
        return self.block(h + e if self.config.input_injection else h, loop)

    def forward(self, x: torch.Tensor, n_loops: int | torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, W, V)`` of each sample after its own number of loops.

        ``n_loops``: an int for the whole batch (default: the model's ``n_loops``), or ``(B,)`` per sample
        (each >= 1). Samples are sorted by loop count, so at loop ``t`` the block runs only on the samples
        still going (a contiguous prefix: no gather), and a sample's compute is ``T(n_i)`` loops, not the
        batch's largest.
        """
        n_loops = self.n_loops if n_loops is None else n_loops
        if self._recording is not None:
            self._recording.clear()
        e, k, grad = self.embed(x), self.backprop_loops, torch.is_grad_enabled()
        if isinstance(n_loops, int) or n_loops.dim() == 0:
            h, n = None, int(n_loops)
            for t in range(1, n + 1):
                with torch.set_grad_enabled(grad and (k is None or t > n - k)):  # truncated: the last k only
                    h = self.step(h, e, t - 1)
                self._record(h)
            return self.head(h)
        if int(n_loops.min()) < 1:
            raise ValueError("n_loops must be >= 1 for every sample")
        order = torch.argsort(n_loops, descending=True, stable=True)
        counts = torch.bincount(n_loops).tolist()  # counts[t]: samples whose last step is t (one host sync)
        active = len(n_loops)  # samples with n_loops >= t
        e, h, done = e[order], None, []
        for t in range(1, len(counts)):
            # truncated: samples with n_i >= t + k are not yet in their last k loops (a prefix): no graph
            early = sum(counts[t + k :]) if k is not None and grad else 0
            if early:
                with torch.no_grad():
                    h_early = self.step(None if h is None else h[:early], e[:early], t - 1)
                late = self.step(None if h is None else h[early:], e[early:active], t - 1) if early < active else None
                h = h_early if late is None else torch.cat([h_early, late])
            else:
                h = self.step(h, e[:active], t - 1)
            self._record(h)
            finished = counts[t]  # they sit at the end of the prefix
            if finished:
                done.append(h[active - finished :])
                active -= finished
                h = h[:active]
        out = torch.cat(done[::-1])  # back to descending loop-count order
        return self.head(out)[torch.argsort(order)]

    def all_loops(self, x: torch.Tensor, max_loops: int) -> torch.Tensor:
        """Logits after every loop ``t = 1..max_loops``: ``(max_loops, B, W, V)`` (the logit lens; the block
        ends in the final LayerNorm, so loop ``t``'s readout is the model run at ``t`` loops)."""
        with self.recording() as states:
            self(x, max_loops)
            return torch.stack([self.readout(h) for h in states])

    # -- the loop protocol (loopscape.looped.Looped) ------------------------------------------------------
    @property
    def n_loops(self) -> int:
        return self._n_loops

    @n_loops.setter
    def n_loops(self, value: int) -> None:
        self._n_loops = check_n_loops(value)

    @property
    def backprop_loops(self) -> int | None:
        """Truncated backprop through the last ``k`` loops (the config's ``backprop_loops``; None: every loop)."""
        return self.config.backprop_loops

    @backprop_loops.setter
    def backprop_loops(self, k: int | None) -> None:
        self.config = dataclasses.replace(self.config, backprop_loops=None if k is None else check_n_loops(k))

    def recording(self):
        """Within this context the list it yields holds each loop's state of the last forward (with loop
        counts per sample: at loop ``t`` the samples still going, in descending order of their loop counts)."""
        return while_set(self, "_recording", [])

    def _record(self, h: torch.Tensor) -> None:
        if self._recording is not None:
            self._recording.append(h)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """The logits of a state: the read-out ``W_out h`` (the block already ends in the final norm)."""
        return self.head(h)

    def untie_loops(self, weights: list[dict[int, torch.Tensor]]):
        """Within this context loop ``t`` (0-based) runs the block on ``weights[t]`` (``weights[t][i]``: its
        copy of ``looped_parameters()[i]``; one not given stays shared; loops past ``len(weights)``: the last)."""
        return while_set(self, "_untied", weights)

    def weights_per_token(self, n_loops: int, last: int | None = None) -> int:
        """Weights a token multiplies through in the last ``last`` loops (all if None) of ``n_loops``: the
        block's linear layers once per loop (biases and LayerNorms, O(d), left out; the attention's
        context-length term is :func:`attention_flops`)."""
        last = n_loops if last is None else min(last, n_loops)
        return last * _linear_weights(self.config)

    def get_input_embeddings(self) -> nn.Module:
        """The read-in (Hugging Face's name: a token costs a look-up here, not a product)."""
        return self.read_in

    def _own_weights(self, loop: int) -> list[dict[str, torch.Tensor]]:
        """Loop ``loop``'s own weights inside :meth:`untie_loops`: per module of the block (its layers, then
        the final norm), a dict of its own parameter names (empty: shared)."""
        if not self._untied:
            return [{}] * (len(self.layers) + 1)
        given = self._untied[min(loop, len(self._untied) - 1)]
        return [own_copies(module_slots, given) for module_slots in self._slots]

    def looped_parameters(self) -> list[nn.Parameter]:
        """The weights every loop shares (``landscape.loops``): the block's, final LayerNorm included."""
        return [*self.layers.parameters(), *self.ln_f.parameters()]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _call(module: nn.Module, own: dict[str, torch.Tensor] | None, x: torch.Tensor) -> torch.Tensor:
    return module(x) if not own else functional_call(module, own, (x,))


def looped_gpt(vocab_size: int, **config) -> LoopedGPT:
    return LoopedGPT(LoopedGPTConfig(vocab_size=vocab_size, **config))


# -- inference: adaptive stopping and the oracle --------------------------------------------------


@torch.no_grad()
def adaptive_decode(
    model: LoopedGPT, inputs: torch.Tensor, mask: torch.Tensor, max_loops: int, per_sample: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decode with adaptive stopping (Fan et al., 2024; spec "Adaptive stopping").

    At each loop ``t <= max_loops`` the greedy decode ``y_t = argmax logits_t``
    is scored by the cross-entropy of ``logits_t`` against ``y_t`` over the
    answer positions (``mask``): the model's confidence in its own output. The
    step with the lowest such loss is chosen, one per batch (the authors'
    rule; test batches hold one length) or, with ``per_sample``, one per sample.

    Returns ``(predictions (B, W), chosen loop counts (B,))``.
    """
    return adaptive_choice(model.all_loops(inputs, max_loops), mask, per_sample)


def adaptive_choice(
    logits: torch.Tensor, mask: torch.Tensor, per_sample: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`adaptive_decode` from given all-step logits ``(S, B, W, V)``."""
    pred = logits.argmax(-1)
    nll = F.cross_entropy(logits.flatten(0, 2), pred.flatten(), reduction="none").view(pred.shape)
    m = mask.to(nll.dtype)
    per_row = (nll * m).sum(-1) / m.sum(-1).clamp(min=1)  # (S, B)
    if per_sample:
        best = per_row.argmin(0)
    else:
        best = per_row.mean(1).argmin().expand(pred.shape[1])
    chosen = pred.gather(0, best[None, :, None].expand(1, *pred.shape[1:]))[0]
    return chosen, best + 1


@torch.no_grad()
def oracle_decode(model: LoopedGPT, inputs: torch.Tensor, n_loops: torch.Tensor) -> torch.Tensor:
    """Greedy decode read after exactly ``T(n)`` loops per sample."""
    return model(inputs, n_loops).argmax(-1)


def exact_match(pred: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row: every scored position right. ``(B,)`` bool."""
    return ((pred == targets) | ~mask).all(-1)


def _linear_weights(config: LoopedGPTConfig) -> int:
    """Weights of the block's linear layers: ``qkv``, ``proj``, ``fc``, ``proj`` per layer."""
    d = config.d_model
    return config.n_layers * (3 * d * d + d * d + 2 * config.mlp_ratio * d * d)


def attention_flops(config: LoopedGPTConfig, width: int) -> float:
    """Forward FLOPs per token and loop of the causal attention's ``q k^T`` and ``a v`` at row width
    ``width`` (on average half the row is attended): the term no weight count holds."""
    return config.n_layers * (2 * 2 * config.d_model * (width + 1) / 2)


def flops_per_token_step(config: LoopedGPTConfig, width: int) -> float:
    """Forward FLOPs of one block step per token at row width ``width``: 2 per weight of
    :meth:`LoopedGPT.weights_per_token` at one loop, plus :func:`attention_flops`."""
    return 2 * _linear_weights(config) + attention_flops(config, width)
