"""SHIFT (Section 5): Stage I Single-Attn, Stage II Looped-Attn on the same parameters.

:class:`ShiftController` plugs into :func:`loopscape.training.trainer.train`.
It starts the model with one loop, and after each epoch's evaluation decides,
by a fixed epoch or by SCP (:class:`~loopscape.shift.criterion.ShiftCriterion`),
whether to raise the loop count. On the toy models the switch keeps every
matrix as it is and only changes ``n_loops``; what happens to Adam's moments is
an option (``optimizer="keep"`` or ``"reset"``). Its state travels in every
checkpoint, so a run resumes correctly across the switch.

Epoch convention: ``shift_epoch = s`` means epochs ``1..s`` train Single-Attn and
epochs ``s+1..`` Looped-Attn; ``s = 0`` is Looped-Attn from the start.
"""

from __future__ import annotations

from torch import nn

from loopscape.shift.criterion import ShiftCriterion

OPTIMIZER_AT_SHIFT = ("keep", "reset")


class ShiftController:
    def __init__(self, n_loops: int = 3, at_epoch: int | None = None, criterion: ShiftCriterion | None = None, optimizer: str = "keep"):
        if (at_epoch is None) == (criterion is None):
            raise ValueError("give exactly one of at_epoch (a fixed shift epoch) or criterion (SCP)")
        if optimizer not in OPTIMIZER_AT_SHIFT:
            raise ValueError(f"optimizer must be one of {OPTIMIZER_AT_SHIFT} (got {optimizer!r})")
        if n_loops < 2:
            raise ValueError(f"n_loops must be >= 2 for Stage II (got {n_loops})")
        self.n_loops, self.at_epoch, self.criterion, self.optimizer = n_loops, at_epoch, criterion, optimizer
        self.shift_epoch: int | None = None

    def begin(self, model: nn.Module) -> None:
        model.n_loops = 1
        if self.at_epoch == 0:
            self._switch(0, model, None)

    def _switch(self, epoch: int, model: nn.Module, optimizer) -> None:
        model.n_loops = self.n_loops
        self.shift_epoch = epoch
        if optimizer is not None and self.optimizer == "reset":
            optimizer.state.clear()

    def decide(self, epoch: int, row: dict) -> bool:
        """Feed one epoch's metrics row; True once, at the epoch after which Stage II begins.

        The decision alone, for trainers that apply the switch themselves
        (:mod:`loopscape.training.population`); it records ``shift_epoch``.
        """
        if self.shift_epoch is not None:
            return False
        if self.criterion is not None:
            decide = self.criterion.update(row["val_loss"], row["grad_norm"])
        else:
            decide = epoch >= self.at_epoch
        if decide:
            self.shift_epoch = epoch
        return decide

    def after_epoch(self, epoch: int, row: dict, model: nn.Module, optimizer) -> None:
        if self.decide(epoch, row):
            self._switch(epoch, model, optimizer)

    def state_dict(self) -> dict:
        return {"shift_epoch": self.shift_epoch, "criterion": self.criterion.state_dict() if self.criterion else None}

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        self.shift_epoch = state["shift_epoch"]
        if self.criterion is not None and state["criterion"] is not None:
            self.criterion.load_state_dict(state["criterion"])
        model.n_loops = self.n_loops if self.shift_epoch is not None else 1
