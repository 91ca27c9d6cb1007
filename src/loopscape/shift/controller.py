"""SHIFT on any model and in any training loop: :class:`ShiftController`
applies the one :class:`~loopscape.shift.schedule.ShiftSchedule` to a model
(anything holding a module with an ``n_loops`` attribute: a loopified HF model's
``LoopedRange``, loopscape's toys and looped GPT) and its optimiser. The HF and
Lightning callbacks are thin adapters of it; a plain PyTorch loop uses it
directly::

    shift = ShiftController(ShiftSchedule.fixed(n_loops=3, at=1000), model, optimizer)
    for step in range(1, steps + 1):
        shift.before_step(step)          # sets the model's loop count for this step
        ...                              # forward, backward, optimizer.step()
        if step % eval_every == 0:
            shift.after_evaluation(step, val_loss, grad_norm)

Under ``torch.distributed`` the decision is rank 0's, broadcast to every rank,
so all ranks switch at the same step even if their evaluations differ.

Its state (:meth:`ShiftController.state_dict`) is saved under one name, :data:`STATE_KEY`
(``shift_state``), by every trainer and callback; :func:`saved_state` also reads where earlier
checkpoints kept it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from loopscape.looped import find_looped, get_n_loops, set_n_loops  # noqa: F401  (names this module kept)
from loopscape.shift.criterion import DECISIONS, GRAD_NORMS
from loopscape.shift.schedule import ShiftSchedule

log = logging.getLogger(__name__)

# the controller's state in a checkpoint (Markov, population and algorithmic trainers; the callbacks' state)
STATE_KEY = "shift_state"


def saved_state(extra: dict):
    """The controller's state (a list of them for a population) in a checkpoint's extras or a callback's saved
    state: under :data:`STATE_KEY`, or where earlier versions kept it: the population's ``schedules``, the Markov
    trainer's and Lightning's extras themselves (``schedule``, ``switches``, ``applied``), the algorithmic trainer's
    ``schedule`` (and a schedule's bare state there); None if there is none."""
    if STATE_KEY in extra:
        return extra[STATE_KEY]
    if "schedules" in extra:
        return extra["schedules"]
    if "switches" in extra:
        return extra
    return extra.get("schedule")


def loop_count_holder(model):
    """Where SHIFT sets the loop count: the model's :class:`~loopscape.looped.Looped` part, else (a loop of
    one's own that keeps only a count) its first module with an ``n_loops`` attribute; an object that is not
    a module (a population member) is its own holder."""
    if not isinstance(model, nn.Module):
        return model
    try:
        return find_looped(model)
    except ValueError:
        holder = next((m for m in model.modules() if hasattr(m, "n_loops")), None)
        if holder is None:
            raise
        return holder


class ShiftController:
    """SHIFT's schedule applied to ``model``. When a new stage starts and the schedule says ``optimizer="reset"``,
    the optimiser's state is cleared: by ``reset()`` if given (e.g. one population member's moments), else by
    ``optimizer.state.clear()``. Without a model it sets no loop count: a trainer that reads the stage itself (the
    algorithmic trainer's per-row ``T(n)``) asks ``schedule.stage(step)``.

    ``grad_norm``: which gradient norm the caller feeds SCP, by its name in
    :data:`~loopscape.shift.criterion.GRAD_NORMS` (``full_batch``, ``step_mean``, ``last_logged``); kept in the
    state and named when SCP never fired. None: not said (a loop of yours)."""

    def __init__(
        self,
        schedule: ShiftSchedule,
        model: nn.Module | None = None,
        optimizer=None,
        *,
        reset: Callable[[], None] | None = None,
        grad_norm: str | None = None,
    ):
        if not isinstance(schedule, ShiftSchedule):
            raise ValueError(f"schedule must be a loopscape ShiftSchedule (got {type(schedule).__name__})")
        if grad_norm is not None and grad_norm not in GRAD_NORMS:
            raise ValueError(f"grad_norm must be None or one of {list(GRAD_NORMS)} (got {grad_norm!r})")
        if reset is not None and not callable(reset):
            raise ValueError(f"reset must be a callable that clears the optimiser's state (got {reset!r})")
        self.schedule, self.model, self.optimizer, self.holder = schedule, None, optimizer, None
        self.reset, self.grad_norm = reset, grad_norm
        self.switches: list[tuple[int, int]] = []  # (step, loop count from that step on)
        self._applied: int | None = None  # the last step applied: a framework may announce a step twice
        if model is not None:
            self.attach(model, optimizer)

    def attach(self, model: nn.Module, optimizer=None) -> None:
        self.holder = loop_count_holder(model)  # found once; one clear line if there is nothing to loop
        self.model, self.optimizer = model, optimizer if optimizer is not None else self.optimizer

    def before_step(self, step: int) -> int:
        """Set the loop count of training step ``step`` (counted from 1); returns it. A step that starts
        a new stage is recorded in ``switches`` (and resets the optimiser if the schedule says so). A step
        already applied (the HF Trainer announces the first step of a run twice; a checkpoint may be written
        after the next step was applied) only sets the loop count: it is not recorded or reset again."""
        k = self.schedule.n_loops_at(step)
        if step != self._applied and self.schedule.starts_stage(step):
            self.switches.append((step, k))
            if self.schedule.resets_optimizer:
                self._reset_optimizer()
        self._applied = step
        if self.holder is not None and k != self.holder.n_loops:  # a resumed holder starts from its own default
            self.holder.n_loops = k
        return k

    def _reset_optimizer(self) -> None:
        if self.reset is not None:
            self.reset()
        elif self.optimizer is not None:
            self.optimizer.state.clear()

    def after_evaluation(self, step: int, val_loss: float | None, grad_norm: float | None = None) -> bool:
        """Report the evaluation after step ``step``; True if step ``step + 1`` starts a new stage."""
        if self.schedule.criterion is not None and self.schedule.shift_step is None:
            if val_loss is None or grad_norm is None:
                raise ValueError(
                    "SCP needs a validation loss and a gradient norm at every evaluation "
                    f"(got val_loss={val_loss}, grad_norm={grad_norm}): evaluate on a validation set and log the "
                    "gradient norm at least as often"
                )
        self.schedule.observe(step, val_loss, grad_norm)
        if dist.is_available() and dist.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            decided = self.schedule.shift_step
            decided = torch.tensor([-1 if decided is None else decided], device=device)
            dist.broadcast(decided, src=0)
            self.schedule.shift_step = None if int(decided) < 0 else int(decided)
        return self.schedule.starts_stage(step + 1)

    def scp_progress(self) -> dict[str, float]:
        """What SCP has seen so far, for the logs as it happens (empty without SCP): ``scp_evaluations``,
        ``scp_since_best`` (evaluations without a gain), ``scp_plateau_at`` and ``scp_grad_norm``, the last
        gradient norm it read (of the kind named by ``grad_norm``); once it fired, ``scp_fired_at`` (the
        evaluation) and ``scp_decided_by``, the index in :data:`~loopscape.shift.criterion.DECISIONS` (0: its
        own decision, 1: forced by ``max_wait``, 2: forced by ``shift_by``)."""
        c = self.schedule.criterion
        if c is None:
            return {}
        if c.shifted:
            return {"scp_fired_at": c.shift_at, "scp_decided_by": list(DECISIONS).index(c.decided_by or "settled")}
        out = {"scp_evaluations": c.evaluations, "scp_since_best": c.since_best}
        if c.plateau_at is not None:
            out["scp_plateau_at"] = c.plateau_at
        if c.grad_norms:
            out["scp_grad_norm"] = c.grad_norms[-1]
        return out

    def decision(self) -> str | None:
        """One line saying who decided the switch (None before it): the fixed schedule, or SCP and how
        (:data:`~loopscape.shift.criterion.DECISIONS`)."""
        shift, c = self.schedule.shift_step, self.schedule.criterion
        if shift is None:
            return None
        if c is None or not c.shifted:
            return f"SHIFT: Stage II from step {shift + 1} ({self.schedule.n_loops} loops), as the schedule fixed it"
        return f"SHIFT: Stage II from step {shift + 1} ({self.schedule.n_loops} loops): {c.status()}"

    def report_end(self, last_step: int, main_process: bool = True) -> None:
        """At the end of training, on the main process: a warning if Stage II never started or SCP was
        forced to switch (by ``max_wait`` or ``shift_by``), else the decision logged at INFO level."""
        never, c = self.end_of_training(last_step), self.schedule.criterion
        if not main_process:
            return
        if never is not None or (c is not None and c.forced):
            warnings.warn(never or self.decision(), stacklevel=3)
        elif self.decision() is not None:
            log.info(self.decision())

    def end_of_training(self, last_step: int) -> str | None:
        """None if Stage II started by ``last_step``; otherwise one line saying that it never did, and why."""
        shift = self.schedule.shift_step
        if shift is not None and shift < last_step:
            return None
        if shift is not None:
            why = f"the switch comes after step {shift}, and training ended at step {last_step}"
        elif self.schedule.criterion is not None:
            why = self.schedule.criterion.status() + (
                "; ShiftCriterion(shift_by=N) bounds the wait from the start of training"
            )
            if self.grad_norm is not None:
                why += f" (the gradient norm SCP read, {self.grad_norm}: {GRAD_NORMS[self.grad_norm]})"
        else:
            why = "the schedule has no switch"
        return f"SHIFT: Stage II never started ({self.schedule.n_loops} loops): {why}"

    def state_dict(self) -> dict:
        """Saved under :data:`STATE_KEY` by every trainer and callback."""
        return {
            "schedule": self.schedule.state_dict(),
            "switches": [list(s) for s in self.switches],
            "applied": self._applied,  # a resumed run does not apply (record, reset) that step again
            "grad_norm": self.grad_norm,  # which gradient norm SCP read (GRAD_NORMS)
        }

    def load_state_dict(self, state: dict) -> None:
        if "switches" not in state:  # a checkpoint from before the controller: the schedule's state, bare or keyed
            self.schedule.load_state_dict(state.get("schedule", state))
            return
        self.schedule.load_state_dict(state["schedule"])
        self.switches = [tuple(s) for s in state["switches"]]
        self._applied = state.get("applied")
