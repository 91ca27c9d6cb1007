"""Training the toy models on the Markov language (Appendix E.1.1).

Adam, learning rate 1e-3, 600 epochs (one epoch = one pass over the N
training sequences, in shuffled mini-batches). After every epoch the whole
training and validation sets are evaluated and one row is appended to
``metrics.jsonl``: losses, accuracy on all / low-IC / high-IC training
sequences, and ``grad_norm``, the norm of the full-batch training gradient
(the number SCP reads here: ``full_batch`` in
:data:`~loopscape.shift.criterion.GRAD_NORMS`). Row 0 is the model at
initialisation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loopscape.config import require
from loopscape.data.markov import MarkovTask
from loopscape.errors import DivergenceError
from loopscape.shift.controller import STATE_KEY, ShiftController, saved_state
from loopscape.shift.schedule import ShiftSchedule
from loopscape.training.run import RunState, check_finite


@dataclass
class MarkovTrainConfig:
    """Optimisation settings. ``batch_size`` is not given by the paper; see docs/markov.md."""

    epochs: int = 600
    lr: float = 1e-3
    batch_size: int = 32
    checkpoint_every: int = 50
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars (run_dir/tensorboard)

    def validate(self, p: str = "") -> None:
        require(self.epochs >= 1, f"{p}epochs", "an integer >= 1", self.epochs)
        require(self.lr > 0, f"{p}lr", "a number > 0", self.lr)
        require(self.batch_size >= 1, f"{p}batch_size", "an integer >= 1", self.batch_size)
        require(self.checkpoint_every >= 1, f"{p}checkpoint_every", "an integer >= 1", self.checkpoint_every)


def scores(logits: torch.Tensor, val_logits: torch.Tensor, task: MarkovTask) -> dict[str, torch.Tensor]:
    """Losses and accuracies from logits ``(..., N, V)``; leading (member) axes are kept."""

    def nll(lg: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -torch.log_softmax(lg, -1).gather(-1, y.expand(lg.shape[:-1]).unsqueeze(-1)).squeeze(-1)

    correct = (logits.argmax(-1) == task.train.targets).to(logits.dtype)
    return {
        "train_loss": nll(logits, task.train.targets).mean(-1),
        "val_loss": nll(val_logits, task.val.targets).mean(-1),
        "acc_all": correct.mean(-1),
        "acc_low": correct[..., task.low].mean(-1),
        "acc_high": correct[..., task.high].mean(-1),
        "val_acc": (val_logits.argmax(-1) == task.val.targets).to(logits.dtype).mean(-1),
    }


def evaluate(model: nn.Module, task: MarkovTask) -> dict[str, float]:
    """Full-batch metrics of the current model; touches no ``.grad``."""
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(task.train.inputs)
    with torch.no_grad():
        val_logits = model(task.val.inputs)
    row = scores(logits, val_logits, task)
    grads = torch.autograd.grad(row["train_loss"], params)
    row["grad_norm"] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return {k: v.item() for k, v in row.items()}


def train_markov(
    model: nn.Module,
    task: MarkovTask,
    config: MarkovTrainConfig,
    run_dir: str | Path,
    seed: int,
    resume: bool = False,
    on_epoch: Callable[[int], None] | None = None,
    trackers: Sequence = (),
    schedule: ShiftSchedule | None = None,
) -> list[dict]:
    """Train ``model`` in place, logging to ``run_dir``; returns every metrics row.

    ``seed`` drives the mini-batch order. With ``resume=True`` the run continues
    from its latest checkpoint and ends with the same numbers as an
    uninterrupted run (:class:`~loopscape.training.run.RunState`). ``trackers``
    are callbacks with ``open(run_dir, start_epoch)``, ``update(epoch, model)``,
    ``close()`` and optionally ``flush()``, called before every checkpoint
    (e.g. :class:`~loopscape.landscape.tracking.HessianTracker`).
    With a SHIFT ``schedule`` every epoch trains with the loop count it gives,
    each evaluation is reported to it (the validation loss and the full-batch
    gradient norm, ``full_batch``), its controller's state is saved in every
    checkpoint (under ``shift_state``), and rows record the loop count ``n_loops``.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    run = RunState(run_dir, config.epochs, config.checkpoint_every, unit="epoch", tensorboard=config.tensorboard)
    extra = run.resume(model, optimizer, generator) if resume else {}
    shift = ShiftController(schedule, model, optimizer, grad_norm="full_batch") if schedule is not None else None
    if shift is not None and saved_state(extra) is not None:
        shift.load_state_dict(saved_state(extra))

    def loops(epoch: int) -> dict:
        """Set the epoch's loop count (epoch 0, the initial evaluation, uses epoch 1's)."""
        if shift is None:
            return {}
        return {"n_loops": shift.before_step(max(epoch, 1))}

    n = len(task.train)
    inputs, targets = task.train.inputs, task.train.targets

    def checked(row: dict) -> dict:
        """The row, once its loss and gradient are finite (else the run stops, marked failed)."""
        where = f"{run.run_dir}, epoch {row['epoch']}"
        check_finite({k: row[k] for k in ("train_loss", "grad_norm")}, where, f"train.lr (now {config.lr})")
        return row

    for t in trackers:
        t.open(run.run_dir, run.start)
    try:
        with run.open_log() as log:
            if run.start == 0:
                n_loops = loops(0)
                log.append(checked({"epoch": 0, **evaluate(model, task), "time_s": 0.0, **n_loops}))
                for t in trackers:
                    t.update(0, model)
            for epoch in range(run.start + 1, config.epochs + 1):
                n_loops = loops(epoch)
                t0 = time.perf_counter()
                model.train()
                for idx in torch.randperm(n, generator=generator).split(config.batch_size):
                    loss = F.cross_entropy(model(inputs[idx]), targets[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                elapsed = time.perf_counter() - t0
                model.eval()
                row = checked({"epoch": epoch, **evaluate(model, task), "time_s": elapsed, **n_loops})
                log.append(row)
                for t in trackers:
                    t.update(epoch, model)
                if shift is not None:
                    shift.after_evaluation(epoch, row["val_loss"], row["grad_norm"])
                    loops(epoch + 1)  # the next epoch's stage, applied before this epoch's checkpoint
                if run.checkpoint_due(epoch):
                    for t in trackers:  # what a tracker still holds is written before the run can resume past it
                        getattr(t, "flush", lambda: None)()
                    extra = {STATE_KEY: shift.state_dict()} if shift is not None else None
                    run.save(epoch, model, optimizer, generator, extra=extra)
                if on_epoch is not None:
                    on_epoch(epoch)
    except DivergenceError as err:
        run.fail(err)
        raise
    for t in trackers:
        t.close()
    return run.finish(model)
