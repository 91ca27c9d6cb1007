"""SHIFT's one schedule (Section 5): how many loops the next step or epoch runs.

SHIFT trains Single-Attn (Stage I, one loop) and then Looped-Attn on the same
parameters (Stage II, ``n_loops``). :class:`ShiftSchedule` decides when, and
knows nothing of the model or the trainer: a trainer asks
:meth:`~ShiftSchedule.n_loops_at` before each unit of training (an optimiser
step, or an epoch), reports each evaluation to :meth:`~ShiftSchedule.observe`,
and applies what it is told. Our three trainers do exactly that, and so can a
plain PyTorch loop::

    schedule = ShiftSchedule.scp(n_loops=3, criterion=ShiftCriterion())
    for step in range(1, steps + 1):
        model.n_loops = schedule.n_loops_at(step)
        ...                                           # one step (or epoch)
        if schedule.observe(step, val_loss, grad_norm) and schedule.resets_optimizer:
            optimizer.state.clear()

Three ways to decide:

* ``fixed``: a switch point ``s`` given in advance;
* ``scp``: SCP (:class:`~loopscape.shift.criterion.ShiftCriterion`) fires on
  the evaluations reported to :meth:`observe`;
* ``progressive``: a given ``T(step)``, as milestones ``{s: k}``: units after
  ``s`` run ``k`` loops.

**Depth** in Stage II (a fixed point or SCP), ``depth=``:

* ``"fixed"``: every unit runs ``n_loops``;
* ``"uniform"``: each unit draws its loop count uniformly from ``1..n_loops``;
* ``"poisson-lognormal"``: Huginn's recurrence distribution (Geiping et al.,
  2025, "Scaling up test-time compute with latent reasoning", Eq. 1):
  ``tau ~ N(log(m - 1) - sigma^2 / 2, sigma)``, ``depth = 1 + Poisson(e^tau)``,
  whose mean is ``m = mean_depth`` (``sigma = 0.5`` as there), cut at ``n_loops``.

and a **depth curriculum**, ``ramp="linear"`` or ``"1-sqrt"`` over
``ramp_steps`` units from ``ramp_start`` (default: the switch), as retrofitted
recurrence schedules its mean depth (McLeish et al., 2025): at progress
``p in [0, 1]`` the mean depth (the loop count itself with ``"fixed"``, the top
of the range with ``"uniform"``) is ``1 + (target - 1) f(p)``, ``f(p) = p`` or
``1 - sqrt(1 - p)`` (our reading of "1-sqrt": the 1-sqrt cooldown's shape turned
into a rise, below the linear ramp all along, slow at first and steepest at the end).
Every draw comes from ``seed`` and the unit's number alone, so a resumed run
and every rank draw the same counts.

Convention (one for every trainer): the switch point ``s`` is the last unit of
Stage I. Units ``1..s`` run one loop, units ``s+1..`` run ``n_loops``; ``s = 0``
is Looped-Attn from the start. The state is a JSON-able dict
(:meth:`state_dict` / :meth:`load_state_dict`), so a run resumes across the switch.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, fields

import numpy as np

from loopscape.config import ConfigError
from loopscape.shift.criterion import ShiftCriterion

OPTIMIZER_AT_SHIFT = ("keep", "reset")
DEPTHS = ("fixed", "uniform", "poisson-lognormal")
RAMPS = (None, "linear", "1-sqrt")
# the switch point's one name on disk (metrics rows, members.json, done.json); older run folders used the others
SWITCH_KEY = "shift_step"
OLD_SWITCH_KEYS = ("shifted_at", "shift_epoch")


def recorded_switch(record: dict) -> int | None:
    """The switch point a row or file of a run folder records, under ``shift_step`` or an older name; None if
    it records none (or records that there was none)."""
    return next((record[k] for k in (SWITCH_KEY, *OLD_SWITCH_KEYS) if k in record), None)


class ShiftSchedule:
    """The loop count of every unit of training; see the module docstring."""

    def __init__(
        self,
        n_loops: int,
        *,
        at: int | None = None,
        criterion: ShiftCriterion | None = None,
        milestones: dict[int, int] | None = None,
        optimizer: str = "keep",
        depth: str = "fixed",
        seed: int = 0,
        mean_depth: float | None = None,
        sigma: float = 0.5,
        ramp: str | None = None,
        ramp_steps: int = 0,
        ramp_start: int | None = None,
    ):
        if sum(x is not None for x in (at, criterion, milestones)) != 1:
            raise ValueError(
                "give exactly one of at (a fixed switch point), criterion (SCP) or milestones (a progressive schedule)"
            )
        if optimizer not in OPTIMIZER_AT_SHIFT:
            raise ValueError(f"optimizer must be one of {OPTIMIZER_AT_SHIFT} (got {optimizer!r})")
        if n_loops < 2:
            raise ValueError(f"n_loops must be >= 2 for Stage II (got {n_loops})")
        if at is not None and at < 0:
            raise ValueError(f"at must be an integer >= 0 (got {at})")
        if milestones is not None and not all(s >= 0 and 1 <= k <= n_loops for s, k in milestones.items()):
            raise ValueError(f"milestones must map steps >= 0 to loop counts in 1..{n_loops} (got {milestones})")
        _check_depth(n_loops, depth, mean_depth, sigma, ramp, ramp_steps, ramp_start)
        if (depth != "fixed" or ramp is not None) and milestones is not None:
            raise ValueError(
                "a depth distribution or curriculum goes with a fixed switch point (at) or SCP (criterion), "
                "not milestones"
            )
        self.n_loops, self.criterion, self.optimizer = n_loops, criterion, optimizer
        self.depth, self.seed, self.mean_depth, self.sigma = depth, seed, mean_depth, sigma
        self.ramp, self.ramp_steps, self.ramp_start = ramp, ramp_steps, ramp_start
        self.milestones = dict(sorted(milestones.items())) if milestones is not None else None
        # the last unit of Stage I: known in advance, or set when SCP fires
        self.shift_step: int | None = at
        if self.milestones is not None:
            self.shift_step = next((s for s, k in self.milestones.items() if k > 1), None)

    @property
    def sampled(self) -> bool:
        """Whether Stage II's loop count changes from unit to unit (a distribution or a curriculum)."""
        return self.depth != "fixed" or self.ramp is not None

    @classmethod
    def fixed(cls, n_loops: int, at: int, optimizer: str = "keep") -> ShiftSchedule:
        return cls(n_loops, at=at, optimizer=optimizer)

    @classmethod
    def scp(cls, n_loops: int, criterion: ShiftCriterion, optimizer: str = "keep") -> ShiftSchedule:
        return cls(n_loops, criterion=criterion, optimizer=optimizer)

    @classmethod
    def sampled_depth(
        cls, n_loops: int, at: int | None = None, criterion: ShiftCriterion | None = None, seed: int = 0
    ) -> ShiftSchedule:
        """Stage II draws each unit's loop count from ``1..n_loops``; the switch is ``at`` or SCP's."""
        return cls(n_loops, at=at, criterion=criterion, depth="uniform", seed=seed)

    @classmethod
    def progressive(cls, milestones: dict[int, int], optimizer: str = "keep") -> ShiftSchedule:
        return cls(max(2, *milestones.values()), milestones=milestones, optimizer=optimizer)

    @property
    def resets_optimizer(self) -> bool:
        """Whether the optimiser's state is dropped when the loop count changes."""
        return self.optimizer == "reset"

    def n_loops_at(self, step: int) -> int:
        """The loop count of unit ``step`` (counted from 1)."""
        if self.milestones is not None:
            starts = list(self.milestones)
            i = bisect.bisect_left(starts, step) - 1  # the last milestone s < step
            return self.milestones[starts[i]] if i >= 0 else 1
        if self.shift_step is None or step <= self.shift_step:
            return 1
        if self.depth == "poisson-lognormal":
            mean = self.mean_depth_at(step)
            if mean <= 1:
                return 1
            rng = np.random.default_rng([int(self.seed) % (1 << 63), step])  # the seed and the unit alone
            tau = rng.normal(math.log(mean - 1) - self.sigma**2 / 2, self.sigma)
            return min(self.n_loops, 1 + int(rng.poisson(math.exp(tau))))
        top = round(self.mean_depth_at(step))
        if self.depth == "uniform":  # string seeds are hashed with SHA-512: the same draw in every process
            return random.Random(f"{self.seed}:{step}").randint(1, top)
        return top

    def mean_depth_at(self, step: int) -> float:
        """Stage II's target at unit ``step`` after the curriculum: the mean depth of ``"poisson-lognormal"``,
        the top of ``"uniform"``'s range, the loop count of ``"fixed"`` (module docstring)."""
        target = self.mean_depth if self.depth == "poisson-lognormal" else self.n_loops
        if self.ramp is None:
            return target
        start = self.ramp_start if self.ramp_start is not None else self.shift_step
        if start is None:
            return 1.0
        p = min(1.0, max(0.0, (step - start) / self.ramp_steps))
        f = p if self.ramp == "linear" else 1 - math.sqrt(1 - p)
        return 1 + (target - 1) * f

    def starts_stage(self, step: int) -> bool:
        """Whether unit ``step`` starts a new stage: its loop count differs from unit ``step - 1``'s
        (with a sampled depth, only the first unit after the switch: later draws are not stages)."""
        if self.sampled:
            return self.shift_step is not None and step == self.shift_step + 1
        return self.n_loops_at(step) != self.n_loops_at(step - 1)

    def stage(self, step: int) -> int:
        """The stage of unit ``step``: 1 (Stage I, Single-Attn) up to the switch, 2 (Stage II) after it; for a
        trainer whose looped stage sets its own loop counts (the algorithmic trainer's per-row ``T(n)``)."""
        return 2 if self.shifted_by(step - 1) else 1

    def shifted_by(self, step: int) -> bool:
        """Whether Stage II has begun after unit ``step`` (the switch is decided by then)."""
        return self.shift_step is not None and self.shift_step <= step

    def observe(self, step: int, val_loss: float | None = None, grad_norm: float | None = None) -> bool:
        """Report unit ``step``'s evaluation. Returns True if unit ``step + 1``
        starts a new stage (:meth:`starts_stage`; the trainer applies it then).

        Only SCP reads the numbers; it is fed one evaluation per call.
        """
        if self.criterion is not None and self.shift_step is None:
            if self.criterion.update(val_loss, grad_norm):
                self.shift_step = step
        return self.starts_stage(step + 1)

    def state_dict(self) -> dict:
        return {
            "shift_step": self.shift_step,
            "criterion": self.criterion.state_dict() if self.criterion is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.shift_step = state["shift_step"]
        if self.criterion is not None and state["criterion"] is not None:
            self.criterion.load_state_dict(state["criterion"])


def _check_depth(n_loops, depth, mean_depth, sigma, ramp, ramp_steps, ramp_start) -> None:
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {DEPTHS} (got {depth!r})")
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    if depth == "poisson-lognormal":
        if not number(mean_depth) or not 1 < mean_depth <= n_loops:
            raise ValueError(
                f"mean_depth must be a number above 1 and at most n_loops ({n_loops}) for depth='poisson-lognormal' "
                f"(got {mean_depth!r})"
            )
        if not number(sigma) or not sigma > 0:
            raise ValueError(f"sigma must be a number > 0 (got {sigma!r})")
    elif mean_depth is not None:
        raise ValueError(f"mean_depth goes with depth='poisson-lognormal' (got depth={depth!r})")
    if ramp not in RAMPS:
        raise ValueError(f"ramp must be one of {RAMPS} (got {ramp!r})")
    if ramp is not None and (not isinstance(ramp_steps, int) or ramp_steps < 1):
        raise ValueError(f"ramp_steps must be an integer >= 1 with a ramp (got {ramp_steps!r})")
    if ramp_start is not None and ramp_start < 0:
        raise ValueError(f"ramp_start must be an integer >= 0 or None for the switch (got {ramp_start!r})")


@dataclass
class ShiftConfig:
    """How SHIFT switches, as plain settings: the one place where settings become a :class:`ShiftSchedule`
    (the HF and Lightning callbacks, the SHIFT study's policies and the algorithmic trainer all build
    theirs here).

    ``at``: a fixed last Stage-I unit; ``milestones``: ``{unit: loops}``, a progressive T(step); otherwise
    SCP with ``scp``'s settings (:class:`~loopscape.shift.criterion.ShiftCriterion`'s keywords, its
    defaults if None). At most one of ``at``, ``scp`` and ``milestones``. ``depth`` (``fixed``,
    ``uniform``, ``poisson-lognormal`` with ``mean_depth`` and ``sigma``), ``ramp``, ``ramp_steps``,
    ``ramp_start``: Stage II's depth distribution and curriculum (:mod:`loopscape.shift.schedule`),
    drawn from ``seed``."""

    n_loops: int = 2
    at: int | None = None
    scp: dict | None = None
    milestones: dict | None = None
    optimizer: str = "keep"
    depth: str = "fixed"
    seed: int = 0
    mean_depth: float | None = None
    sigma: float = 0.5
    ramp: str | None = None
    ramp_steps: int = 0
    ramp_start: int | None = None

    @classmethod
    def of(cls, n_loops: int = 2, *, sampled_depth: bool = False, **settings) -> ShiftConfig:
        """The callbacks' arguments as a config (``sampled_depth=True``: the older name of ``depth="uniform"``,
        which checkpoints saved before ``depth`` existed still pass)."""
        if sampled_depth:
            settings.setdefault("depth", "uniform")
        return cls(n_loops, **settings)

    @staticmethod
    def upgrade(data: dict) -> dict:
        """Older settings: ``sampled_depth: true`` is ``depth: uniform``."""
        data = dict(data)
        if "sampled_depth" in data:
            sampled = data.pop("sampled_depth")
            if sampled:
                data.setdefault("depth", "uniform")
        return data

    def validate(self, p: str = "") -> None:
        """One :class:`~loopscape.config.ConfigError` line naming the setting if these settings build no schedule."""
        try:
            self.build()
        except (ValueError, TypeError) as err:
            where = f"{p.rstrip('.')}: " if p else ""
            hint = f" (set {p}scp=null for a fixed switch)" if self.at is not None and self.scp is not None else ""
            raise ConfigError(f"{where}{err}{hint}") from None

    def build(self) -> ShiftSchedule:
        given = [name for name in ("at", "scp", "milestones") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(
                "give at most one of at (a fixed switch step), scp (SCP's settings) and milestones (a progressive "
                f"schedule); got {' and '.join(given)}"
            )
        depth = dict(
            depth=self.depth,
            seed=self.seed,
            mean_depth=self.mean_depth,
            sigma=self.sigma,
            ramp=self.ramp,
            ramp_steps=self.ramp_steps,
            ramp_start=self.ramp_start,
        )
        if self.milestones is not None:
            if not self.milestones:
                raise ValueError("milestones must map at least one step to a loop count (got {})")
            return ShiftSchedule(
                n_loops=max(2, *self.milestones.values()),
                milestones={int(s): k for s, k in self.milestones.items()},
                optimizer=self.optimizer,
                **depth,
            )
        known = {f.name for f in fields(ShiftCriterion)}
        unknown = sorted(set(self.scp or {}) - known)
        if unknown:
            raise ValueError(f"scp must hold ShiftCriterion's settings {sorted(known)} (got {', '.join(unknown)})")
        criterion = None if self.at is not None else ShiftCriterion(**(self.scp or {}))
        return ShiftSchedule(self.n_loops, at=self.at, criterion=criterion, optimizer=self.optimizer, **depth)
