"""Hessian spectra tracked over training (Section 4.1, Figures 3c, 3d, 9b, 9c).

:class:`HessianTracker` is a trainer callback: every ``every`` epochs (and at
initialisation) it computes the exact spectrum of the training-loss Hessian
in float64 (ten epochs at a time by default) and appends
``{"epoch", "eigenvalues", "asymmetry", "loss", "theta"}``
to ``<run>/spectra.jsonl`` (``theta``: the flat parameters, so any tracked
Hessian can be rebuilt later, e.g. to measure the river-valley coupling). On
resume it drops rows past the checkpoint, so the log matches an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from loopscape.io import JsonlLog, read_jsonl
from loopscape.landscape.hessian import HessianOperator, weighted_batches
from loopscape.landscape.linalg import dense_matrix, dense_spectrum


class HessianTracker:
    """Trainer callback: the exact training-loss spectrum every ``every`` epochs.

    Epochs are computed ``stack`` at a time (:meth:`HessianOperator.dense_at`):
    on the toy models a Hessian costs mostly per-operation overhead, which a
    stack of ten shares. Parameters wait in memory until then; the trainer
    calls :meth:`flush` before every checkpoint, so a resumed run loses none.
    ``stack=1`` computes each epoch at once.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        num_classes: int,
        every: int = 1,
        filename: str = "spectra.jsonl",
        stack: int = 10,
    ):
        # repeated inputs merge into one with soft labels: the same Hessian from fewer products;
        # the class count is given, since a class may never appear among the targets
        self.batches = weighted_batches(inputs, targets, dedupe="inputs", num_classes=num_classes)
        self.every = every
        self.stack = stack
        self.filename = filename
        self.log: JsonlLog | None = None
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._model: nn.Module | None = None

    def open(self, run_dir: str | Path, start_epoch: int) -> None:
        self.log = JsonlLog(Path(run_dir) / self.filename, keep=lambda r: start_epoch > 0 and r["epoch"] <= start_epoch)
        self._pending = []

    def update(self, epoch: int, model: nn.Module) -> None:
        if epoch % self.every:
            return
        self._model = model
        theta = torch.cat([p.detach().reshape(-1).double() for p in model.parameters() if p.requires_grad])
        self._pending.append((epoch, theta))
        if len(self._pending) >= self.stack:
            self.flush()

    def flush(self) -> None:
        """Compute and log the spectra of every epoch still waiting."""
        if not self._pending:
            return
        # built at the current parameters: its determinism check covers the model as it is now
        op = HessianOperator(self._model, self.batches, dtype=torch.float64)
        epochs, thetas = zip(*self._pending)
        H, losses = op.dense_at(torch.stack(thetas))
        spec = dense_spectrum(H)
        for i, epoch in enumerate(epochs):
            self.log.append(
                {
                    "epoch": epoch,
                    "loss": losses[i].item(),
                    "asymmetry": spec.asymmetry[i],
                    "eigenvalues": spec.eigenvalues[i].tolist(),  # float64, as computed
                    "theta": thetas[i].tolist(),
                }
            )
        self._pending = []

    def close(self) -> None:
        if self.log is not None:
            self.flush()
            self.log.close()


def load_spectra(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(epochs, eigenvalues (epochs x P))`` from a ``spectra.jsonl``."""
    rows = read_jsonl(path)
    return np.array([r["epoch"] for r in rows]), np.array([r["eigenvalues"] for r in rows])


def load_thetas(path: str | Path) -> dict[int, torch.Tensor]:
    """``{epoch: flat parameters (float64)}`` from a ``spectra.jsonl``."""
    return {r["epoch"]: torch.tensor(r["theta"], dtype=torch.float64) for r in read_jsonl(path)}


def hessian_at(
    model: nn.Module, theta: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """The dense float64 training-loss Hessian of ``model`` at parameters ``theta``
    (the model's own parameters are left as they were)."""
    params = list(model.parameters())
    saved = parameters_to_vector(params).detach().clone()
    try:
        with torch.no_grad():
            vector_to_parameters(theta.to(saved.dtype), params)
        batches = weighted_batches(inputs, targets, dedupe="inputs", num_classes=num_classes)
        H = dense_matrix(HessianOperator(model, batches, dtype=torch.float64))
    finally:
        with torch.no_grad():
            vector_to_parameters(saved, params)
    return (H + H.T) / 2
