"""The keyword settings of both callbacks, turned into the one SHIFT schedule."""

from __future__ import annotations

from loopscape.shift.criterion import ShiftCriterion
from loopscape.shift.schedule import ShiftSchedule


def schedule_from_settings(
    n_loops: int, at: int | None, scp: dict | None, milestones: dict | None, optimizer: str
) -> ShiftSchedule:
    """``at``: a fixed last Stage-I step; ``milestones``: ``{step: loops}`` (a progressive T(step));
    otherwise SCP with ``scp``'s settings (``ShiftCriterion``'s keywords; its defaults if None)."""
    if at is not None and milestones is not None:
        raise ValueError("give at most one of at (a fixed switch step) and milestones (a progressive schedule)")
    if at is not None:
        return ShiftSchedule.fixed(n_loops, at=at, optimizer=optimizer)
    if milestones is not None:
        return ShiftSchedule.progressive({int(s): k for s, k in milestones.items()}, optimizer=optimizer)
    return ShiftSchedule.scp(n_loops, ShiftCriterion(**(scp or {})), optimizer=optimizer)
