"""Single-Attn and Looped-Attn: the one-layer linear-attention toys of
Section 3 and Appendix D.

With the input embedding ``E_0 in R^{d x n}`` and query ``z_0`` its last column,

    f(E, z) = W_V E E^T W_K^T W_Q z,        f(E) = W_V E E^T W_K^T W_Q E,

    Single-Attn:  z_1 = z_0 + f(E_0, z_0)
    Looped-Attn:  z_t = z_{t-1} + f(E_{t-1}, z_{t-1}),
                  E_t = E_{t-1} + f(E_{t-1}),            t = 1..T
    logits:       y_hat = W_h z_T.

Single-Attn is Looped-Attn with ``T = 1``. The paper's ``f`` sums over the
``n`` tokens; ``normalise_by_length`` divides it by ``n``, as many
linear-attention implementations do (a reading the paper does not take). The embedding ``g`` is fixed (not
trainable, Appendix D). Code stores ``E`` row-major, ``(batch, n, d)``, i.e.
the paper's ``E^T``; the equations below are written in the paper's layout.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from loopscape.config import require
from loopscape.looped.protocol import check_n_loops, while_set

EMBEDDINGS = ("onehot", "token", "random")
POSITIONS = ("absolute", "cyclic", "cyclic_end")


@dataclass
class LinearAttnConfig:
    """Configuration of the toy model.

    A study's ``model:`` section is this dataclass (the Markov study's
    defaults are the paper's setting: 3 cyclic position codes, ``T = 3``);
    the study fills in ``vocab_size`` from its data and sets ``n_loops`` per
    model (1 for Single-Attn).

    Attributes:
        vocab_size: number of tokens ``V``; ``None`` in a study's config, where
            the data decides it at build time.
        n_loops: ``T``; 1 is Single-Attn.
        embedding: the fixed map ``g``. ``"onehot"``: token one-hot concatenated
            with position one-hot, ``d = V + max_len``. ``"token"``: token
            one-hot alone, ``d = V`` (no position information). ``"random"``: fixed
            Gaussian token and position vectors of width ``d_model``, entries
            ``N(0, 1/d_model)``, summed (as a transformer's token + position
            embedding).
        d_model: width ``d`` for ``"random"``; ignored by ``"onehot"``.
        max_len: number of position codes.
        positions: ``"absolute"``: input position ``i`` gets code ``i``, and an
            input longer than ``max_len`` is an error. ``"cyclic"``: code
            ``i mod max_len``, so any length can be read (the Markov language's
            transitions cycle the same way at test lengths, Appendix E.1.3).
            ``"cyclic_end"``: codes counted cyclically from the end, ``(i - n) mod max_len``,
            so the query (the last input) keeps the code it had in training at every
            length; at ``n = max_len`` it is ``"cyclic"`` exactly.
        init_scale: ``W ~ U(-s/sqrt(d), s/sqrt(d))`` with ``s = init_scale``;
            1.0 is PyTorch's ``nn.Linear`` default.
        embedding_seed: seed of the ``"random"`` embedding.
        normalise_by_length: ``f(E, z) / n`` (``n`` the input length), so a longer input
            does not make every update larger; the paper's ``f`` has no ``1/n`` (False).
    """

    vocab_size: int | None = None
    n_loops: int = 1
    embedding: str = "onehot"
    d_model: int = 16
    max_len: int = 16
    positions: str = "absolute"
    init_scale: float = 1.0
    embedding_seed: int = 0
    normalise_by_length: bool = False

    def validate(self, p: str = "") -> None:
        require(
            self.vocab_size is None or self.vocab_size >= 2,
            f"{p}vocab_size",
            "null (from the data) or an integer >= 2",
            self.vocab_size,
        )
        require(self.n_loops >= 1, f"{p}n_loops", "an integer >= 1 (T)", self.n_loops)
        require(self.embedding in EMBEDDINGS, f"{p}embedding", f"one of {list(EMBEDDINGS)}", self.embedding)
        require(self.d_model >= 1, f"{p}d_model", "an integer >= 1", self.d_model)
        require(self.max_len >= 1, f"{p}max_len", "an integer >= 1", self.max_len)
        require(self.positions in POSITIONS, f"{p}positions", f"one of {list(POSITIONS)}", self.positions)
        require(self.init_scale > 0, f"{p}init_scale", "a number > 0", self.init_scale)

    @property
    def d(self) -> int:
        return {"onehot": self.vocab_size + self.max_len, "token": self.vocab_size}.get(self.embedding, self.d_model)


class FixedEmbedding(nn.Module):
    """The fixed embedding ``g: V^n -> R^{d x n}``: token code plus position code.

    Both codes are buffers, so they travel with ``.to(device)`` but never
    receive gradients or optimiser updates.
    """

    def __init__(self, config: LinearAttnConfig):
        super().__init__()
        V, L, d = config.vocab_size, config.max_len, config.d
        if config.embedding == "onehot":
            token = torch.cat([torch.eye(V), torch.zeros(V, L)], dim=1)
            position = torch.cat([torch.zeros(L, V), torch.eye(L)], dim=1)
        elif config.embedding == "token":
            token, position = torch.eye(V), torch.zeros(L, V)
        elif config.embedding == "random":
            g = torch.Generator().manual_seed(config.embedding_seed)
            token = torch.randn(V, d, generator=g) / math.sqrt(d)
            position = torch.randn(L, d, generator=g) / math.sqrt(d)
        else:
            raise ValueError(f"embedding must be one of {EMBEDDINGS} (got {config.embedding!r})")
        if config.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS} (got {config.positions!r})")
        self.positions = config.positions
        self.register_buffer("token", token)
        self.register_buffer("position", position)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, slots = x.shape[-1], self.position.shape[0]
        if self.positions != "absolute":
            i = torch.arange(n, device=x.device)
            return self.token[x] + self.position[(i - n if self.positions == "cyclic_end" else i) % slots]
        if n > slots:
            raise ValueError(
                f"input length {n} exceeds the embedding's max_len {slots} (positions='absolute'; 'cyclic' reads "
                "any length)"
            )
        return self.token[x] + self.position[:n]


class LinearAttn(nn.Module):
    """Single-Attn (``n_loops = 1``) or Looped-Attn (``n_loops = T > 1``)."""

    def __init__(self, config: LinearAttnConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("vocab_size must be set to build a model (a study fills it in from its data)")
        check_n_loops(config.n_loops)
        self.config = config
        d, V = config.d, config.vocab_size
        self.embed = FixedEmbedding(config)
        self.W_V = nn.Parameter(torch.empty(d, d))
        self.W_K = nn.Parameter(torch.empty(d, d))
        self.W_Q = nn.Parameter(torch.empty(d, d))
        self.W_h = nn.Parameter(torch.empty(V, d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.config.init_scale / math.sqrt(self.config.d)
        for w in (self.W_V, self.W_K, self.W_Q, self.W_h):
            nn.init.uniform_(w, -bound, bound)

    @property
    def n_loops(self) -> int:
        return self.config.n_loops

    @n_loops.setter
    def n_loops(self, value: int) -> None:
        # SHIFT raises the loop count of a trained model in place (Section 5).
        check_n_loops(value)
        self.config = dataclasses.replace(self.config, n_loops=value)  # never into the config it was built from

    def looped_parameters(self) -> list[nn.Parameter]:
        """The weights every loop shares (``landscape.loops``): the attention's; ``W_h`` reads out once."""
        return [self.W_Q, self.W_K, self.W_V]

    def untie_loops(self, weights: list[dict[int, torch.Tensor]]):
        """Within this context loop ``t`` (0-based) reads its attention weights from ``weights[t]``
        (``weights[t][i]``: its copy of ``looped_parameters()[i]``; one not given stays shared): the untied
        model of ``landscape.loops`` (the :class:`~loopscape.looped.Looped` protocol)."""
        return while_set(self, "_untied", weights)

    def recording(self):
        """Within this context the list it yields holds ``z_1 .. z_T`` of the last forward (each ``(B, 1, d)``)."""
        return while_set(self, "_recording", [])

    def readout(self, z: torch.Tensor) -> torch.Tensor:
        """Logits ``W_h z`` of a state ``z`` ``(B, 1, d)``: ``(B, V)``."""
        return self._logits(z).squeeze(-2)

    def weights_per_token(self, n_loops: int, last: int | None = None) -> int:
        """The query's multiply-adds with the loop's weights: ``W_Q``, ``W_K``, ``W_V`` once per loop (the
        ``E E^T`` products of Eq. 1 are counted in :mod:`loopscape.shift.compute`)."""
        last = n_loops if last is None else min(last, n_loops)
        return last * sum(p.numel() for p in self.looped_parameters())

    def loop_weights(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W_Q, W_K, W_V)`` of loop ``t`` (1-based): the shared ones, or loop ``t``'s own when untied."""
        untied = getattr(self, "_untied", None)
        shared = (self.W_Q, self.W_K, self.W_V)
        if not untied:
            return shared
        own = untied[min(t - 1, len(untied) - 1)]
        return tuple(own.get(i, w) for i, w in enumerate(shared))

    def attn(self, E: torch.Tensor, Z: torch.Tensor, weights: tuple | None = None) -> torch.Tensor:
        """``f(E, Z) = W_V E E^T W_K^T W_Q Z`` for a batch of query sets ``Z`` (Eq. 1; divided by
        ``n`` with ``normalise_by_length``).

        ``E`` is ``(..., n, d)`` and ``Z`` is ``(..., m, d)`` (rows are the paper's
        columns); ``f(E, z)`` is ``m = 1`` and ``f(E)`` is ``Z = E``. Leading axes
        broadcast against the weights', so stacked weights ``(S, 1, d, d)`` run
        ``S`` models at once (:mod:`loopscape.training.population`).
        """
        W_Q, W_K, W_V = weights or (self.W_Q, self.W_K, self.W_V)
        scores = _times(Z, W_Q.mT @ W_K) @ E.mT  # z^T W_Q^T W_K E  -> (..., m, n)
        if self.config.normalise_by_length:
            scores = scores / E.shape[-2]
        return _times(scores @ E, W_V.mT)  # (W_V E E^T W_K^T W_Q z)^T

    def forward(self, x: torch.Tensor, all_loops: bool = False) -> torch.Tensor:
        """Logits ``W_h z_T`` for token ids ``x`` of shape ``(B, n)``: ``(B, V)``.

        With ``all_loops=True``, the logits ``W_h z_t`` of every loop ``t = 1..T``,
        ``(B, T, V)``: step ``t`` is exactly the model with ``n_loops = t``.
        """
        E = self.embed(x)  # E_0
        z = E[..., -1:, :]  # z_0: the last token's embedding
        steps = []
        for t in range(1, self.n_loops + 1):
            weights = self.loop_weights(t)
            z_next = z + self.attn(E, z, weights)
            if t < self.n_loops:  # E_T itself is never read: skip the last update
                E = E + self.attn(E, E, weights)
            z = z_next
            steps.append(z)
        if getattr(self, "_recording", None) is not None:
            self._recording[:] = steps
        if all_loops:
            return self._logits(torch.cat(steps, dim=-2))  # every loop's readout in one product
        return self.readout(z)

    def _logits(self, z: torch.Tensor) -> torch.Tensor:
        return _times(z, self.W_h.mT)


class UntiedLinearAttn(LinearAttn):
    """Looped-Attn unrolled with each loop's own ``W_Q, W_K, W_V`` (no weight sharing, so no cross-loop
    coupling of one weight's loops): the intervention control of the V-valley's source. Built by
    :func:`untied_like` from a Looped-Attn at its initialisation, every loop starting at that model's
    weights, so both start as the same function and differ only in tying during training."""

    def __init__(self, config: LinearAttnConfig):
        super().__init__(config)
        d = config.d
        # loops 2..T; loop 1 is W_Q, W_K, W_V as in the tied model
        self.later = nn.ParameterList(nn.Parameter(torch.empty(d, d)) for _ in range(3 * (config.n_loops - 1)))

    def loop_weights(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if t == 1:
            return self.W_Q, self.W_K, self.W_V
        i = 3 * (t - 2)
        return self.later[i], self.later[i + 1], self.later[i + 2]

    def looped_parameters(self) -> list[nn.Parameter]:
        return []  # nothing is shared between loops


def untied_like(model: LinearAttn) -> UntiedLinearAttn:
    """The unrolled, untied copy of ``model``: every loop starts at ``model``'s attention weights."""
    untied = UntiedLinearAttn(model.config)
    untied.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for t in range(2, model.n_loops + 1):
            for w, src in zip(untied.loop_weights(t), (model.W_Q, model.W_K, model.W_V)):
                w.copy_(src)
    return untied


def _times(X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``X @ W`` for activations ``(..., k, d)`` and a weight ``(d, e)`` or stacked ``(S, 1, d, e)``.

    For stacked weights ``einsum`` makes ``S`` large products, where ``@`` would
    broadcast them into one tiny product per sample; for one weight ``@`` is faster.
    """
    return X @ W if W.dim() == 2 else torch.einsum("...kd,...de->...ke", X, W)


def single_attn(vocab_size: int = 3, **config) -> LinearAttn:
    """Single-Attn: ``z_1 = z_0 + f(E_0, z_0)``."""
    return LinearAttn(LinearAttnConfig(vocab_size=vocab_size, **{**config, "n_loops": 1}))


def looped_attn(n_loops: int = 3, vocab_size: int = 3, **config) -> LinearAttn:
    """Looped-Attn with ``T = n_loops`` (3 in the paper)."""
    return LinearAttn(LinearAttnConfig(vocab_size=vocab_size, **{**config, "n_loops": n_loops}))
