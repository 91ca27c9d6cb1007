"""Per-token exit: after each loop from the second on, a token whose criterion between its last two states
falls below a threshold stops looping. The criteria are small classes, after Huginn's exit evaluators
(Geiping et al., 2025, "Scaling up test-time compute with latent reasoning", Sec. 6); each reads two
successive states.

The distribution criteria (KL, entropy) read the states through ``lens``, the final norm and LM head, which
is the model's own readout only for a range that ends at the last decoder layer (loopify refuses them
elsewhere). They do not pay a full LM-head pass per loop: the first state they read in a forward goes
through the whole head once, and every later loop's distribution is read on that state's top
:data:`TOP_K` tokens only, renormalised there (the criteria compare distributions over those candidates;
mass outside them is not seen). Cost per token and forward: one head pass, plus ``TOP_K`` head rows a loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def state_change(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per token, the relative change of the latent state ``||h_t - h_{t-1}|| / ||h_t||`` (Huginn's
    convergence measure of the recurrent state): the one formula the exit and the sweeps use."""
    after, before = _wide(after), _wide(before)
    return (after - before).norm(dim=-1) / after.norm(dim=-1).clamp_min(1e-30)


TOP_K = 64  # the candidate tokens the distribution criteria read after the first loop (module docstring)


class KL:
    """``KL(p_t || p_{t-1})`` of the next-token distributions (Huginn's KL exit), over the candidates."""

    def __call__(self, before, after, lens: Callable, memo: dict) -> torch.Tensor:
        logp_before, logp_after = _candidate_log_probs(before, after, lens, memo)
        return (logp_after.exp() * (logp_after - logp_before)).sum(-1)


class Entropy:
    """``|H(p_t) - H(p_{t-1})|``: the entropy-change exit of the same work, over the candidates."""

    def __call__(self, before, after, lens: Callable, memo: dict) -> torch.Tensor:
        entropy = lambda lp: -(lp.exp() * lp).sum(-1)  # noqa: E731
        logp_before, logp_after = _candidate_log_probs(before, after, lens, memo)
        return (entropy(logp_after) - entropy(logp_before)).abs()


class State:
    """:func:`state_change` of the latent state: no readout."""

    def __call__(self, before, after, lens: Callable, memo: dict) -> torch.Tensor:
        return state_change(before, after)


def _candidate_log_probs(before, after, lens: Callable, memo: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``before`` and ``after`` over the candidate tokens: the top :data:`TOP_K` of the
    first state read in this forward (``memo`` carries them, and the last distribution, from loop to loop)."""
    if "rows" not in memo:
        full = _wide(lens(before))
        memo["rows"] = full.topk(min(TOP_K, full.shape[-1]), dim=-1).indices
        memo["last"] = F.log_softmax(full.gather(-1, memo["rows"]), dim=-1)
    logp_after = F.log_softmax(_wide(lens(after, memo["rows"])), dim=-1)
    logp_before, memo["last"] = memo["last"], logp_after
    return logp_before, logp_after


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32 (a softmax over a vocabulary needs it); float64 stays float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


CRITERIA = {"kl": KL(), "entropy": Entropy(), "state": State()}
EXITS = (None, *CRITERIA)  # None: every token runs every loop


@dataclass(frozen=True)
class Exit:
    """A per-token exit policy, validated once: ``criterion`` (``"kl"``, ``"entropy"`` or ``"state"``),
    the ``threshold`` below which a token stops, after at least ``min_loops`` loops (a loop count below
    ``min_loops``, e.g. SHIFT's Stage I, reads it as that count)."""

    criterion: str
    threshold: float = 0.0
    min_loops: int = 1

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"exit must be one of {EXITS} (got {self.criterion!r})")
        object.__setattr__(self, "threshold", _check_threshold(self.threshold))
        m = self.min_loops
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"min_loops must be an integer >= 1 (got {m!r})")

    @classmethod
    def of(cls, exit: str | None, threshold: float = 0.0, min_loops: int = 1, n_loops: int | None = None):
        """The policy of ``loopify``'s ``exit``, ``exit_threshold`` and ``min_loops`` arguments (None for no
        exit); ``min_loops`` is checked against ``n_loops`` too when given."""
        if exit is not None and exit not in CRITERIA:
            raise ValueError(f"exit must be one of {EXITS} (got {exit!r})")
        _check_threshold(threshold)
        if n_loops is not None and (
            not isinstance(min_loops, int) or isinstance(min_loops, bool) or not 1 <= min_loops <= n_loops
        ):
            raise ValueError(f"min_loops must be an integer from 1 to n_loops ({n_loops}) (got {min_loops!r})")
        if exit is None:
            return None
        return cls(exit, threshold, min_loops)

    def score(self, before: torch.Tensor, after: torch.Tensor, lens: Callable, memo: dict | None = None):
        """The criterion per token between two successive states; ``memo``: one dict per forward, kept from
        loop to loop (the distribution criteria's candidates)."""
        return CRITERIA[self.criterion](before, after, lens, {} if memo is None else memo)

    def settings(self) -> dict:
        """As ``config.loopscape`` saves it."""
        return {"exit": self.criterion, "exit_threshold": self.threshold, "min_loops": self.min_loops}


def _check_threshold(t) -> float:
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not t >= 0:
        raise ValueError(f"exit_threshold must be a number >= 0 (got {t!r})")
    return float(t)


NO_EXIT = {"exit": None, "exit_threshold": 0.0, "min_loops": 1}
