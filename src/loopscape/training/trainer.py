"""Training the toy models on the Markov language (Appendix E.1.1).

Adam, learning rate 1e-3, 600 epochs (one epoch = one pass over the N
training sequences, in shuffled mini-batches). After every epoch the whole
training and validation sets are evaluated and one row is appended to
``metrics.jsonl``: losses, accuracy on all / low-IC / high-IC training
sequences, and the norm of the full-batch training gradient. Row 0 is the
model at initialisation.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loopscape.config import require
from loopscape.data.markov import SequenceSet
from loopscape.io import JsonlLog, read_jsonl
from loopscape.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_weights


@dataclass
class TrainConfig:
    """Optimisation settings. ``batch_size`` is not given by the paper; see docs/markov.md."""

    epochs: int = 600
    lr: float = 1e-3
    batch_size: int = 32
    checkpoint_every: int = 50

    def validate(self, p: str = "") -> None:
        require(self.epochs >= 1, f"{p}epochs", "an integer >= 1", self.epochs)
        require(self.lr > 0, f"{p}lr", "a number > 0", self.lr)
        require(self.batch_size >= 1, f"{p}batch_size", "an integer >= 1", self.batch_size)
        require(self.checkpoint_every >= 1, f"{p}checkpoint_every", "an integer >= 1", self.checkpoint_every)


@dataclass
class MarkovTask:
    """What a run trains and evaluates on: the training set with its IC groups, and a validation set."""

    train: SequenceSet
    val: SequenceSet
    low: torch.Tensor  # bool mask over train: lowest-IC 40%
    high: torch.Tensor  # bool mask over train: highest-IC 40%


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


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


def train(
    model: nn.Module,
    task: MarkovTask,
    config: TrainConfig,
    run_dir: str | Path,
    seed: int,
    resume: bool = False,
    on_epoch: Callable[[int], None] | None = None,
    trackers: Sequence = (),
    controller=None,
) -> list[dict]:
    """Train ``model`` in place, logging to ``run_dir``; returns every metrics row.

    ``seed`` drives the mini-batch order. With ``resume=True`` the run continues
    from its latest checkpoint (rows logged after it are dropped and redone),
    and ends with the same numbers as an uninterrupted run. ``trackers`` are
    callbacks with ``open(run_dir, start_epoch)``, ``update(epoch, model)``,
    ``close()`` and optionally ``flush()``, called before every checkpoint
    (e.g. :class:`~loopscape.landscape.tracking.HessianTracker`).
    A ``controller`` (e.g. :class:`~loopscape.shift.training.ShiftController`)
    may change the model after each epoch's evaluation; its state is saved in
    every checkpoint, and rows then record the loop count ``n_loops``.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    start = 0
    ckpt = latest_checkpoint(ckpt_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, generator)
        start = state["epoch"]
        if controller is not None:
            controller.load_state_dict(state["extra"]["controller"], model)
    elif controller is not None:
        controller.begin(model)
    loops = (lambda: {"n_loops": model.n_loops}) if controller is not None else dict
    n = len(task.train)
    inputs, targets = task.train.inputs, task.train.targets
    for t in trackers:
        t.open(run_dir, start)
    with JsonlLog(run_dir / "metrics.jsonl", keep=lambda r: start > 0 and r["epoch"] <= start) as log:
        if start == 0:
            log.append({"epoch": 0, **evaluate(model, task), "time_s": 0.0, **loops()})
            for t in trackers:
                t.update(0, model)
        for epoch in range(start + 1, config.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            for idx in torch.randperm(n, generator=generator).split(config.batch_size):
                loss = F.cross_entropy(model(inputs[idx]), targets[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            elapsed = time.perf_counter() - t0
            model.eval()
            row = {"epoch": epoch, **evaluate(model, task), "time_s": elapsed, **loops()}
            log.append(row)
            for t in trackers:
                t.update(epoch, model)
            if controller is not None:
                controller.after_epoch(epoch, row, model, optimizer)
            if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
                for t in trackers:  # what a tracker still holds is written before the run can resume past it
                    getattr(t, "flush", lambda: None)()
                extra = {"controller": controller.state_dict()} if controller is not None else None
                save_checkpoint(ckpt_dir, epoch, model, optimizer, generator, extra=extra)
            if on_epoch is not None:
                on_epoch(epoch)
    for t in trackers:
        t.close()
    save_weights(run_dir / "model.safetensors", model)
    return read_jsonl(run_dir / "metrics.jsonl")
