"""Hessian spectra tracked over training (Section 4.1, Figures 3c, 3d, 9b, 9c).

:class:`HessianTracker` is a trainer callback: every ``every`` epochs (and at
initialisation) it computes the exact spectrum of the training-loss Hessian
in float64 and appends ``{"epoch", "eigenvalues", "asymmetry", "loss", "theta"}``
to ``<run>/spectra.jsonl`` (``theta``: the flat parameters, so any tracked
Hessian can be rebuilt later, e.g. to measure the river-valley coupling). On resume it drops rows past the checkpoint, so the
log matches an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from loopscape.io import JsonlLog, read_jsonl
from loopscape.landscape.hessian import HessianOperator, weighted_batches
from loopscape.landscape.linalg import dense_matrix, exact_spectrum


class HessianTracker:
    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, every: int = 1, filename: str = "spectra.jsonl"):
        # repeated inputs merge into one with soft labels: the same Hessian from fewer products
        self.batches = weighted_batches(inputs, targets, dedupe="inputs")
        self.every = every
        self.filename = filename
        self.log: JsonlLog | None = None

    def open(self, run_dir: str | Path, start_epoch: int) -> None:
        self.log = JsonlLog(Path(run_dir) / self.filename, keep=lambda r: start_epoch > 0 and r["epoch"] <= start_epoch)

    def update(self, epoch: int, model: nn.Module) -> None:
        if epoch % self.every:
            return
        op = HessianOperator(model, self.batches, dtype=torch.float64, cache_graph=True)
        spec = exact_spectrum(op)
        self.log.append(
            {
                "epoch": epoch,
                "loss": op.loss().item(),
                "asymmetry": spec.asymmetry,
                "eigenvalues": [float(np.float32(x)) for x in spec.eigenvalues],
                "theta": op.theta.tolist(),
            }
        )

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def load_spectra(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(epochs, eigenvalues (epochs x P))`` from a ``spectra.jsonl``."""
    rows = read_jsonl(path)
    return np.array([r["epoch"] for r in rows]), np.array([r["eigenvalues"] for r in rows])


def load_thetas(path: str | Path) -> dict[int, torch.Tensor]:
    """``{epoch: flat parameters (float64)}`` from a ``spectra.jsonl``."""
    return {r["epoch"]: torch.tensor(r["theta"], dtype=torch.float64) for r in read_jsonl(path)}


def hessian_at(model: nn.Module, theta: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The dense float64 training-loss Hessian of ``model`` with its parameters set to ``theta``."""
    from torch.nn.utils import vector_to_parameters

    with torch.no_grad():
        vector_to_parameters(theta.to(next(model.parameters()).dtype), model.parameters())
    op = HessianOperator(model, weighted_batches(inputs, targets, dedupe="inputs"), dtype=torch.float64)
    H = dense_matrix(op)
    return (H + H.T) / 2
