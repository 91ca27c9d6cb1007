"""SHIFT's one schedule (Section 5): how many loops the next step or epoch runs.

SHIFT trains Single-Attn (Stage I, one loop) and then Looped-Attn on the same
parameters (Stage II, ``n_loops``). :class:`ShiftSchedule` decides when, and
knows nothing of the model or the trainer: a trainer asks
:meth:`~ShiftSchedule.n_loops_at` before each unit of training (an optimiser
step, or an epoch), reports each evaluation to :meth:`~ShiftSchedule.observe`,
and applies what it is told. Our three trainers do exactly that, and so can a
plain PyTorch loop::

    schedule = ShiftConfig(n_loops=3, scp={"patience": 10}).build()   # or ShiftSchedule.scp(3, ShiftCriterion())
    for step in range(1, steps + 1):
        model.n_loops = schedule.n_loops_at(step)
        ...                                           # one step (or epoch)
        if schedule.observe(step, val_loss, grad_norm) and schedule.resets_optimizer:
            optimizer.state.clear()

Every setting is a field of :class:`ShiftConfig`, listed and checked there once;
a schedule is built from one (``ShiftConfig(...).build()``, or
``ShiftSchedule(n_loops, **settings)`` and the shorthands ``fixed``, ``scp``,
``progressive`` and ``sampled_depth``, which make the config).

Three ways to decide (at most one of ``at``, ``scp`` and ``milestones``; none is SCP):

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
from typing import Any

import numpy as np

from loopscape.config import ConfigError
from loopscape.shift.criterion import SCPConfig, ShiftCriterion

OPTIMIZER_AT_SHIFT = ("keep", "reset")
DEPTHS = ("fixed", "uniform", "poisson-lognormal")
RAMPS = (None, "linear", "1-sqrt")
# the switch point's one name on disk (metrics rows, members.json, done.json); older run folders used the others
SWITCH_KEY = "shift_step"
OLD_SWITCH_KEYS = ("shifted_at", "shift_epoch")
# how the switch is decided: at most one of these settings is given (none: SCP with its default settings)
POLICIES = {"at": "fixed", "scp": "scp", "milestones": "progressive"}


def recorded_switch(record: dict) -> int | None:
    """The switch point a row or file of a run folder records, under ``shift_step`` or an older name; None if
    it records none (or records that there was none)."""
    return next((record[k] for k in (SWITCH_KEY, *OLD_SWITCH_KEYS) if k in record), None)


@dataclass
class ShiftConfig:
    """SHIFT's settings, listed and checked here once: every :class:`ShiftSchedule` is built from one (the HF and
    Lightning callbacks' arguments, the algorithmic ``train.shift:`` section, each SHIFT-study policy, and
    ``ShiftSchedule(n_loops, **settings)`` with its shorthands).

    The switch, one rule: at most one of ``at`` (a fixed last Stage-I unit), ``scp`` (SCP with these settings,
    :class:`~loopscape.shift.criterion.SCPConfig`; a dict of them is read as one) and ``milestones``
    (``{unit: loops}``, a progressive T(step)); none of the three is SCP with its default settings
    (:attr:`policy`). ``n_loops``: Stage II's loop count (with milestones, at least their largest count).
    ``optimizer``: ``keep`` or ``reset`` the optimiser's state when a stage starts. ``depth`` (``fixed``,
    ``uniform``, ``poisson-lognormal`` with ``mean_depth`` and ``sigma``), ``ramp``, ``ramp_steps``,
    ``ramp_start``: Stage II's depth distribution and curriculum (:mod:`loopscape.shift.schedule`), drawn from
    ``seed``; they go with ``at`` or SCP, not milestones."""

    n_loops: int = 2
    at: int | None = None
    scp: SCPConfig | None = None
    milestones: dict | None = None
    optimizer: str = "keep"
    depth: str = "fixed"
    seed: int = 0
    mean_depth: float | None = None
    sigma: float = 0.5
    ramp: str | None = None
    ramp_steps: int = 0
    ramp_start: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.scp, dict):  # the callbacks' scp={...}, a saved callback's arguments
            self.scp = SCPConfig.of(self.scp)
        elif isinstance(self.scp, SCPConfig) and type(self.scp) is not SCPConfig:  # a ShiftCriterion: its settings
            self.scp = SCPConfig(**self.scp.settings())

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

    @property
    def policy(self) -> str:
        """How the switch is decided: ``"fixed"`` (``at``), ``"progressive"`` (``milestones``) or ``"scp"``
        (``scp``, or none of the three)."""
        return next((POLICIES[name] for name in POLICIES if getattr(self, name) is not None), "scp")

    def check(self) -> None:
        """The one check of these settings: a ValueError naming the first that builds no schedule."""
        given = [name for name in POLICIES if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(
                "give at most one of at (a fixed switch step), scp (SCP's settings) and milestones (a progressive "
                f"schedule); got {' and '.join(given)}"
            )
        if self.optimizer not in OPTIMIZER_AT_SHIFT:
            raise ValueError(f"optimizer must be one of {OPTIMIZER_AT_SHIFT} (got {self.optimizer!r})")
        if self.n_loops < 2:
            raise ValueError(f"n_loops must be >= 2 for Stage II (got {self.n_loops!r})")
        if self.at is not None and self.at < 0:
            raise ValueError(f"at must be an integer >= 0 (got {self.at!r})")
        if self.scp is not None:
            self.scp.check()
        if self.milestones is not None:
            if not self.milestones:
                raise ValueError("milestones must map at least one step to a loop count (got {})")
            if not all(int(s) >= 0 and k >= 1 for s, k in self.milestones.items()):
                raise ValueError(f"milestones must map steps >= 0 to loop counts >= 1 (got {self.milestones})")
        self._check_depth()
        if (self.depth != "fixed" or self.ramp is not None) and self.milestones is not None:
            raise ValueError(
                "a depth distribution or curriculum goes with a fixed switch point (at) or SCP, not milestones"
            )

    def _check_depth(self) -> None:
        if self.depth not in DEPTHS:
            raise ValueError(f"depth must be one of {DEPTHS} (got {self.depth!r})")
        number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
        if self.depth == "poisson-lognormal":
            if not number(self.mean_depth) or not 1 < self.mean_depth <= self.n_loops:
                raise ValueError(
                    f"mean_depth must be a number above 1 and at most n_loops ({self.n_loops}) for "
                    f"depth='poisson-lognormal' (got {self.mean_depth!r})"
                )
            if not number(self.sigma) or not self.sigma > 0:
                raise ValueError(f"sigma must be a number > 0 (got {self.sigma!r})")
        elif self.mean_depth is not None:
            raise ValueError(f"mean_depth goes with depth='poisson-lognormal' (got depth={self.depth!r})")
        if self.ramp not in RAMPS:
            raise ValueError(f"ramp must be one of {RAMPS} (got {self.ramp!r})")
        if self.ramp is not None and (not isinstance(self.ramp_steps, int) or self.ramp_steps < 1):
            raise ValueError(f"ramp_steps must be an integer >= 1 with a ramp (got {self.ramp_steps!r})")
        if self.ramp_start is not None and self.ramp_start < 0:
            raise ValueError(f"ramp_start must be an integer >= 0 or None for the switch (got {self.ramp_start!r})")

    def validate(self, p: str = "") -> None:
        """One :class:`~loopscape.config.ConfigError` line naming the setting if these settings build no schedule."""
        try:
            self.check()
        except (ValueError, TypeError) as err:
            where = f"{p.rstrip('.')}: " if p else ""
            hint = f" (set {p}scp=null for a fixed switch)" if self.at is not None and self.scp is not None else ""
            raise ConfigError(f"{where}{err}{hint}") from None

    def build(self) -> ShiftSchedule:
        return ShiftSchedule(self)


class ShiftSchedule:
    """The loop count of every unit of training, from a :class:`ShiftConfig`; see the module docstring.

    ``ShiftSchedule(config)``. ``ShiftSchedule(n_loops, **settings)`` is ``ShiftSchedule(ShiftConfig(n_loops,
    **settings))``, where ``criterion=`` (a :class:`~loopscape.shift.criterion.ShiftCriterion`) gives SCP's
    settings and is the object the schedule feeds. The settings read through: ``schedule.depth`` is
    ``schedule.config.depth`` (but ``schedule.scp`` is the shorthand: SCP's settings are ``schedule.config.scp``,
    its state ``schedule.criterion``); ``n_loops`` and ``milestones`` are the ones in use (milestones sorted, and
    ``n_loops`` at least their largest count)."""

    def __init__(self, config: ShiftConfig | int | None = None, *, criterion: ShiftCriterion | None = None, **settings):
        if not isinstance(config, ShiftConfig):
            if criterion is not None:
                if settings.get("scp") is not None:
                    raise TypeError("give SCP's settings once: criterion= or scp=, not both")
                settings["scp"] = criterion.settings()
            config = ShiftConfig(**settings) if config is None else ShiftConfig(config, **settings)
        elif settings:
            raise TypeError(f"ShiftSchedule(config) takes no other settings (got {', '.join(settings)})")
        config.check()
        if criterion is not None and (
            config.policy != "scp" or (config.scp or SCPConfig()).settings() != criterion.settings()
        ):
            raise ValueError("criterion goes with SCP and must have the settings of config.scp")
        self.config = config
        self.criterion: ShiftCriterion | None = None
        if config.policy == "scp":
            self.criterion = criterion if criterion is not None else (config.scp or SCPConfig()).build()
        self.milestones = None
        self.n_loops = config.n_loops
        if config.milestones is not None:
            self.milestones = dict(sorted((int(s), k) for s, k in config.milestones.items()))
            self.n_loops = max(config.n_loops, *self.milestones.values())
        # the last unit of Stage I: known in advance, or set when SCP fires
        self.shift_step: int | None = config.at
        if self.milestones is not None:
            self.shift_step = next((s for s, k in self.milestones.items() if k > 1), None)

    def __getattr__(self, name: str) -> Any:
        config = self.__dict__.get("config")  # (absent while unpickling)
        if config is not None and name in SETTINGS:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def sampled(self) -> bool:
        """Whether Stage II's loop count changes from unit to unit (a distribution or a curriculum)."""
        return self.config.depth != "fixed" or self.config.ramp is not None

    @classmethod
    def fixed(cls, n_loops: int, at: int, optimizer: str = "keep") -> ShiftSchedule:
        return cls(ShiftConfig(n_loops, at=at, optimizer=optimizer))

    @classmethod
    def scp(cls, n_loops: int, criterion: ShiftCriterion, optimizer: str = "keep") -> ShiftSchedule:
        return cls(ShiftConfig(n_loops, scp=criterion.settings(), optimizer=optimizer), criterion=criterion)

    @classmethod
    def sampled_depth(
        cls, n_loops: int, at: int | None = None, criterion: ShiftCriterion | None = None, seed: int = 0
    ) -> ShiftSchedule:
        """Stage II draws each unit's loop count from ``1..n_loops``; the switch is ``at`` or SCP's."""
        return cls(n_loops, at=at, criterion=criterion, depth="uniform", seed=seed)

    @classmethod
    def progressive(cls, milestones: dict[int, int], optimizer: str = "keep") -> ShiftSchedule:
        return cls(ShiftConfig(milestones=milestones, optimizer=optimizer))

    @property
    def resets_optimizer(self) -> bool:
        """Whether the optimiser's state is dropped when the loop count changes."""
        return self.config.optimizer == "reset"

    def n_loops_at(self, step: int) -> int:
        """The loop count of unit ``step`` (counted from 1)."""
        if self.milestones is not None:
            starts = list(self.milestones)
            i = bisect.bisect_left(starts, step) - 1  # the last milestone s < step
            return self.milestones[starts[i]] if i >= 0 else 1
        if self.shift_step is None or step <= self.shift_step:
            return 1
        c = self.config
        if c.depth == "poisson-lognormal":
            mean = self.mean_depth_at(step)
            if mean <= 1:
                return 1
            rng = np.random.default_rng([int(c.seed) % (1 << 63), step])  # the seed and the unit alone
            tau = rng.normal(math.log(mean - 1) - c.sigma**2 / 2, c.sigma)
            return min(self.n_loops, 1 + int(rng.poisson(math.exp(tau))))
        top = round(self.mean_depth_at(step))
        if c.depth == "uniform":  # string seeds are hashed with SHA-512: the same draw in every process
            return random.Random(f"{c.seed}:{step}").randint(1, top)
        return top

    def mean_depth_at(self, step: int) -> float:
        """Stage II's target at unit ``step`` after the curriculum: the mean depth of ``"poisson-lognormal"``,
        the top of ``"uniform"``'s range, the loop count of ``"fixed"`` (module docstring)."""
        c = self.config
        target = c.mean_depth if c.depth == "poisson-lognormal" else self.n_loops
        if c.ramp is None:
            return target
        start = c.ramp_start if c.ramp_start is not None else self.shift_step
        if start is None:
            return 1.0
        p = min(1.0, max(0.0, (step - start) / c.ramp_steps))
        f = p if c.ramp == "linear" else 1 - math.sqrt(1 - p)
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


# the settings a schedule reads through to its config
SETTINGS = frozenset(f.name for f in fields(ShiftConfig))
