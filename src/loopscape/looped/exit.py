"""Per-token exit: after each loop from the second on, a token whose criterion between its last two states
falls below a threshold stops looping. The criteria are small classes, after Huginn's exit evaluators
(Geiping et al., 2025, "Scaling up test-time compute with latent reasoning", Sec. 6); each reads two
successive states, and the distribution criteria read them through ``lens``, the final norm and LM head (a
cheap logit lens: the layers after a loopified range are not run at every loop)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def state_change(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per token, the relative change of the latent state ``||h_t - h_{t-1}|| / ||h_t||`` (Huginn's
    convergence measure of the recurrent state): the one formula the exit and the sweeps use."""
    return (after - before).float().norm(dim=-1) / after.float().norm(dim=-1).clamp_min(1e-30)


class KL:
    """``KL(p_t || p_{t-1})`` of the next-token distributions (Huginn's KL exit)."""

    def __call__(self, before, after, lens: Callable) -> torch.Tensor:
        logp_before, logp_after = _log_probs(before, lens), _log_probs(after, lens)
        return (logp_after.exp() * (logp_after - logp_before)).sum(-1)


class Entropy:
    """``|H(p_t) - H(p_{t-1})|``: the entropy-change exit of the same work."""

    def __call__(self, before, after, lens: Callable) -> torch.Tensor:
        entropy = lambda lp: -(lp.exp() * lp).sum(-1)  # noqa: E731
        return (entropy(_log_probs(after, lens)) - entropy(_log_probs(before, lens))).abs()


class State:
    """:func:`state_change` of the latent state."""

    def __call__(self, before, after, lens: Callable) -> torch.Tensor:
        return state_change(before, after)


def _log_probs(h: torch.Tensor, lens: Callable) -> torch.Tensor:
    return F.log_softmax(lens(h).float(), dim=-1)


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

    def score(self, before: torch.Tensor, after: torch.Tensor, lens: Callable) -> torch.Tensor:
        """The criterion per token between two successive states."""
        return CRITERIA[self.criterion](before, after, lens)

    def settings(self) -> dict:
        """As ``config.loopscape`` saves it."""
        return {"exit": self.criterion, "exit_threshold": self.threshold, "min_loops": self.min_loops}


def _check_threshold(t) -> float:
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not t >= 0:
        raise ValueError(f"exit_threshold must be a number >= 0 (got {t!r})")
    return float(t)


NO_EXIT = {"exit": None, "exit_threshold": 0.0, "min_loops": 1}
