"""The keyword settings of both callbacks, turned into the one SHIFT schedule."""

from __future__ import annotations

from loopscape.shift.criterion import ShiftCriterion
from loopscape.shift.schedule import ShiftSchedule


def schedule_from_settings(
    n_loops: int,
    at: int | None,
    scp: dict | None,
    milestones: dict | None,
    optimizer: str,
    sampled_depth: bool = False,
    seed: int = 0,
) -> ShiftSchedule:
    """``at``: a fixed last Stage-I step; ``milestones``: ``{step: loops}`` (a progressive T(step));
    otherwise SCP with ``scp``'s settings (``ShiftCriterion``'s keywords; its defaults if None).
    ``sampled_depth``: Stage II draws each step's loop count from ``1..n_loops`` (``seed``)."""
    given = [name for name, v in (("at", at), ("scp", scp), ("milestones", milestones)) if v is not None]
    if len(given) > 1:
        raise ValueError(
            f"give at most one of at (a fixed switch step), scp (SCP's settings) and milestones (a progressive "
            f"schedule); got {' and '.join(given)}"
        )
    if milestones is not None:
        return ShiftSchedule(
            n_loops=max(2, *milestones.values()),
            milestones={int(s): k for s, k in milestones.items()},
            optimizer=optimizer,
            sampled=sampled_depth,
        )
    criterion = None if at is not None else ShiftCriterion(**(scp or {}))
    return ShiftSchedule(n_loops, at=at, criterion=criterion, optimizer=optimizer, sampled=sampled_depth, seed=seed)
