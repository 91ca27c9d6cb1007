"""The SHIFT criterion with patience, SCP (Section 5, Appendix E.1.4).

SCP watches one evaluation at a time, ``(validation loss, gradient norm)``,
and says when to switch from Single-Attn to Looped-Attn:

1. **Plateau.** An evaluation *improves* if its validation loss is below the
   best so far by more than ``min_delta`` (delta_1). After ``patience`` (P)
   consecutive evaluations without improvement, the plateau is reached at
   that evaluation: ``E_plateau``.
2. **Gradient stabilisation wait.** The paper writes ``E_shift = E_plateau + W``
   and asks the gradient norm to settle within delta_2; it does not say what
   happens if it has not. Our definition: the shift is the first evaluation
   ``e >= E_plateau + wait`` at which the last ``wait`` (W) gradient norms have
   a coefficient of variation ``std / mean <= grad_tol`` (delta_2). With a
   settled gradient that is exactly ``E_plateau + W``; otherwise SCP waits
   until it settles, or until ``max_wait`` evaluations after the plateau
   (then it shifts regardless, and says so in ``forced``; ``None`` waits forever).
3. **A bound from the start (optional).** ``shift_by``: if SCP has not fired by
   that evaluation, counted from the start of training, it shifts there
   (``forced``). Off by default (the paper has no such bound); on real data
   where the validation loss keeps creeping down, it keeps Stage II from never
   starting. :meth:`ShiftCriterion.status` says why SCP has not fired yet.

Why a coefficient of variation and these defaults: under Adam at a constant
learning rate the full-batch gradient norm on a plateau never becomes smooth;
on the Markov toy its window-of-10 coefficient of variation sits at 0.1-0.6
after the plateau (5 seeds), against ~1 in the first epochs. delta_2 = 0.5
therefore waits out the early spikes without waiting forever on noise that
does not go away. The defaults were set before the shift-point study was run
and were not tuned on its outcome.

**Which gradient norm.** SCP reads one number per evaluation, and what that
number is depends on who feeds it: each feeder names its definition
(:data:`GRAD_NORMS`, kept in its controller's state and listed in docs/shift.md):

* ``full_batch``: the norm of the full-batch training-loss gradient, computed
  at the evaluation (the Markov and population trainers; the ``grad_norm`` of
  their rows);
* ``step_mean``: the mean, over the optimiser steps since the previous
  evaluation, of each step's global gradient norm before clipping (the
  algorithmic trainer, the ``grad_norm`` of its rows; the Lightning callback);
* ``last_logged``: the last ``grad_norm`` the Hugging Face Trainer logged
  before the evaluation, one step's global norm before clipping (the HF callback).

The defaults above were chosen from ``full_batch`` norms on the Markov toy and
were not re-tuned for the other two.

Evaluations are counted from 1. The object is framework-free and its state is
a JSON-able dict (``state_dict`` / ``load_state_dict``) so a run can resume.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field, fields

from loopscape.config import ConfigError

# the gradient norms SCP may be fed, by name: every feeder says which one it reads (module docstring)
GRAD_NORMS = {
    "full_batch": "the norm of the full-batch training-loss gradient, computed at the evaluation",
    "step_mean": "the mean, over the optimiser steps since the previous evaluation, of each step's global gradient "
    "norm before clipping",
    "last_logged": "the last grad_norm the Hugging Face Trainer logged before the evaluation (one step's global "
    "gradient norm before clipping)",
}


@dataclass
class SCPConfig:
    """SCP's settings, listed once: the ``scp`` section of :class:`~loopscape.shift.schedule.ShiftConfig` (the
    algorithmic ``train.shift.scp:``, the callbacks' ``scp=``) and the SHIFT study's ``scp:``.
    :class:`ShiftCriterion` is these settings plus SCP's state. Defaults: P = 10 evaluations, delta_1 = 1e-3,
    W = 10 evaluations, delta_2 = 0.5 (coefficient of variation), at most 50 evaluations after the plateau, no
    bound from the start."""

    patience: int = 10
    min_delta: float = 1e-3
    wait: int = 10
    grad_tol: float = 0.5
    max_wait: int | None = 50
    shift_by: int | None = None  # shift at this evaluation at the latest (from the start of training)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """A ValueError naming the first setting out of range."""
        for name, ok, allowed in (
            ("patience", self.patience >= 1, "an integer >= 1"),
            ("min_delta", self.min_delta >= 0, "a number >= 0"),
            ("wait", self.wait >= 1, "an integer >= 1"),
            ("grad_tol", self.grad_tol >= 0, "a number >= 0"),
            ("max_wait", self.max_wait is None or self.max_wait >= self.wait, "None or an integer >= wait"),
            ("shift_by", self.shift_by is None or self.shift_by >= 1, "None or an integer >= 1"),
        ):
            if not ok:
                raise ValueError(f"{name} must be {allowed} (got {getattr(self, name)!r})")

    @classmethod
    def of(cls, settings: dict) -> SCPConfig:
        """Settings given as a dict (``scp={"patience": 2}``); an unknown key is one ValueError line."""
        known = [f.name for f in fields(SCPConfig)]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ValueError(f"scp must hold SCP's settings {known} (got {', '.join(map(str, unknown))})")
        return cls(**settings)

    def settings(self) -> dict:
        """The settings alone (of a :class:`ShiftCriterion` too: without its state)."""
        return {f.name: getattr(self, f.name) for f in fields(SCPConfig)}

    def validate(self, p: str = "") -> None:
        try:
            self.check()
        except ValueError as e:
            raise ConfigError(f"{p}{e}") from None

    def build(self) -> ShiftCriterion:
        """A fresh criterion with these settings."""
        return ShiftCriterion(**self.settings())


DECISIONS = {  # what made SCP fire, as the logs' scp_decided_by codes 0, 1, 2 and the end-of-training line say
    "settled": "SCP's own decision (a plateau, then the gradient norm settled)",
    "max_wait": "forced by max_wait (a plateau, but the gradient norm did not settle in time)",
    "shift_by": "forced by shift_by (the bound from the start of training)",
}


@dataclass
class ShiftCriterion(SCPConfig):
    """SCP: :class:`SCPConfig`'s settings (the same keywords and defaults) and the state of the evaluations
    seen so far."""

    # state
    evaluations: int = 0
    best: float = math.inf
    since_best: int = 0
    plateau_at: int | None = None
    shift_at: int | None = None
    forced: bool = False
    decided_by: str | None = None  # once fired: one of DECISIONS
    grad_norms: list[float] = field(default_factory=list)

    @property
    def shifted(self) -> bool:
        return self.shift_at is not None

    def update(self, val_loss: float, grad_norm: float) -> bool:
        """Feed one evaluation; returns True at the evaluation where SCP says "shift" (once)."""
        if not (math.isfinite(val_loss) and math.isfinite(grad_norm)):
            raise ValueError(
                f"SCP got a non-finite evaluation (val_loss={val_loss}, grad_norm={grad_norm}); refusing to decide"
            )
        if self.shifted:
            return False
        self.evaluations += 1
        e = self.evaluations
        self.grad_norms = (self.grad_norms + [float(grad_norm)])[-self.wait :]
        if self.shift_by is not None and e >= self.shift_by:
            self.shift_at, self.forced, self.decided_by = e, True, "shift_by"
            return True
        if self.plateau_at is None:
            if val_loss < self.best - self.min_delta:
                self.best, self.since_best = float(val_loss), 0
            else:
                self.since_best += 1
                if self.since_best >= self.patience:
                    self.plateau_at = e
            return False
        if e < self.plateau_at + self.wait:
            return False
        spread = self.spread(self.grad_norms)
        if spread <= self.grad_tol or (self.max_wait is not None and e >= self.plateau_at + self.max_wait):
            self.shift_at, self.forced = e, spread > self.grad_tol
            self.decided_by = "max_wait" if self.forced else "settled"
            return True
        return False

    def status(self) -> str:
        """Where SCP stands, in one line: why it has not fired yet (or when it did), with the values it saw."""
        if self.shifted:
            return f"SCP fired at evaluation {self.shift_at}: {DECISIONS[self.decided_by or 'settled']}"
        if self.evaluations == 0:
            return "SCP saw no evaluation: evaluate on a validation set (and log the gradient norm) during training"
        if self.plateau_at is None:
            return (
                f"no plateau in {self.evaluations} evaluations: the validation loss was still improving (best "
                f"{self.best:.4g}, {self.since_best} of patience {self.patience} evaluations without a gain of more "
                f"than {self.min_delta:g})"
            )
        cv = self.spread(self.grad_norms) if self.grad_norms else float("nan")
        return (
            f"plateau at evaluation {self.plateau_at}, then the gradient norm did not settle in "
            f"{self.evaluations - self.plateau_at} evaluations (coefficient of variation {cv:.3g} > {self.grad_tol:g}; "
            f"wait {self.wait}, max_wait {self.max_wait})"
        )

    @staticmethod
    def spread(grad_norms: list[float]) -> float:
        """The coefficient of variation ``std / mean`` of a window of gradient norms (0 if all are 0)."""
        mean = statistics.fmean(grad_norms)
        return statistics.pstdev(grad_norms) / mean if mean > 0 else 0.0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
