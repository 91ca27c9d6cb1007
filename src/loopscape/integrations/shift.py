"""Moved: the framework-free SHIFT controller lives in :mod:`loopscape.shift.controller`; this name stays
for code written against it."""

from loopscape.shift.controller import ShiftController, get_n_loops, loop_holder, set_n_loops

__all__ = ["ShiftController", "get_n_loops", "loop_holder", "set_n_loops"]
