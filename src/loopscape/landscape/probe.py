"""Curvature tracked during training, for any model: :class:`CurvatureProbe`.

Every ``every`` steps, on fixed probe batches (any form
:class:`~loopscape.landscape.hessian.HessianOperator` reads), it runs one
stochastic Lanczos quadrature: ``n_probes`` Rademacher probes, ``n_steps``
Lanczos steps each, in lockstep (one batched product per step). That one
Krylov run gives all it reports: the spectral density (SLQ), the ``k``
largest eigenvalues (the probes' largest Ritz values, with their residual
bounds), the trace (Hutchinson: ``v^T H v`` is the run's first coefficient)
and, from the density's pseudo-spectrum
(:meth:`~loopscape.landscape.linalg.SpectralDensity.pseudo_spectrum`), the
paper's Matrix Entropy and the Mutual Information with the previous
measurement (Section 4.1; one binning per pair, ``n_bins`` bins, recorded in each
row). Products are in the model's
own precision. Rows go to ``curvature.jsonl`` in ``folder`` (and TensorBoard
scalars with ``tensorboard=True``, or into the folder ``tensorboard`` names); the state (rows, last pseudo-spectrum)
resumes with a run. The HF and Lightning ``CurvatureCallback`` and our
trainers call :meth:`CurvatureProbe.maybe_measure` after each optimiser step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from loopscape.io import JsonlLog, rewrite_jsonl
from loopscape.landscape.api import hessian_operator
from loopscape.landscape.linalg import lanczos, slq_density
from loopscape.landscape.spectrum import DEFAULT_BINS, matrix_entropy, mutual_information, shared_edges

PSEUDO_POINTS = 20_000  # eigenvalues standing for a density (at most the number of parameters)
WARM_TOL = 1e-3  # the warm-started top k's tolerance (benchmarks/bench_warm_start.py's)
WARM_MAX_ITER = 200  # and the most products it may take inside a training loop


class CurvatureProbe:
    """See the module docstring. ``every``: steps between measurements (500, as the Hugging Face
    Trainer's ``save_steps`` and ``logging_steps``); ``k``: top eigenvalues (at most ``n_steps``);
    ``params``: which parameters (``HessianOperator``'s ``params``); ``n_probes`` x ``n_steps``: the
    products of one measurement; ``dtype``: the products' (``None``: the model's);
    ``warm_start``: also take the top ``k`` by Lanczos to ``WARM_TOL`` (at most ``WARM_MAX_ITER`` products),
    each measurement started from the
    last one's Ritz vectors (a block start; the first, and the first after a resume, start cold), and report
    those, with the products they took (``top_products``). Off by default: along a real training run it
    took more products than a cold start, not fewer (docs/curvature.md, "Tracking from the last
    measurement"); it pays where the top eigenvectors move little between measurements.
    ``operator_options``: more of ``HessianOperator``'s arguments (e.g. ``loss_fn``)."""

    def __init__(
        self,
        batches,
        every: int = 500,
        k: int = 5,
        params=None,
        n_probes: int = 4,
        n_steps: int = 16,
        n_bins: int = DEFAULT_BINS,
        folder: str | Path | None = None,
        tensorboard: bool | str | Path = False,
        dtype: torch.dtype | None = None,
        warm_start: bool = False,
        **operator_options,
    ):
        if every < 1 or k < 1 or n_probes < 1 or n_steps < 2 or k > n_steps:
            raise ValueError(
                "every, k, n_probes must be integers >= 1, n_steps >= 2 and k <= n_steps "
                f"(got every={every}, k={k}, n_probes={n_probes}, n_steps={n_steps})"
            )
        self.batches = list(batches)
        self.every, self.k, self.params, self.dtype = every, k, params, dtype
        self.n_probes, self.n_steps, self.n_bins = n_probes, n_steps, n_bins
        self.folder = None if folder is None else Path(folder)
        self.tensorboard = tensorboard
        self.operator_options = operator_options  # e.g. loss_fn, for HessianOperator
        self.warm_start = warm_start
        self._ritz: torch.Tensor | None = None  # the last warm-started measurement's Ritz vectors
        self.rows: list[dict] = []
        self._previous: np.ndarray | None = None
        self._writer = None

    def maybe_measure(self, model: nn.Module, step: int) -> dict | None:
        """Measure after step ``step`` if it is due (``step % every == 0``); returns the row or None."""
        if step % self.every or any(r["step"] == step for r in self.rows):
            return None
        return self.measure(model, step)

    def measure(self, model: nn.Module, step: int) -> dict:
        training = model.training
        model.eval()  # a Hessian of a stochastic loss is noise: dropout off while measuring
        try:
            # a kept gradient graph: each Krylov step is one batched backward through it (the probe batches are small)
            H = hessian_operator(
                model, self.batches, self.params, self.dtype, cache_graph=True, **self.operator_options
            )
            P = H.shape[0]
            density = slq_density(H, n_probes=self.n_probes, n_steps=min(self.n_steps, P), seed=step)
            top, residuals = density.top(min(self.k, P))
            if self.warm_start:
                k, limit = min(self.k, P), min(P, WARM_MAX_ITER)
                fits = self._ritz is not None and self._ritz.shape[0] == P and self._ritz.shape[1] <= limit - k
                start = self._ritz if fits else None  # else cold: a block start needs room for k more
                warm = lanczos(H, k=k, tol=WARM_TOL, start=start, return_vectors=True, seed=step, max_iter=limit)
                top, residuals, self._ritz = warm.eigenvalues, warm.residuals, warm.eigenvectors
        finally:
            model.train(training)
        trace = density.trace()
        pseudo = density.pseudo_spectrum(min(P, PSEUDO_POINTS))
        row = {
            "step": step,
            "top_eigenvalues": [float(x) for x in top],
            "top_residuals": [float(x) for x in residuals],
            "trace": trace.trace,
            "trace_stderr": trace.stderr,
            "matrix_entropy": matrix_entropy(pseudo, n_bins=self.n_bins),
            "mutual_information": None,
            "n_bins": self.n_bins,  # the binning of both entropies, for the report's threshold (reporting.curvature)
            **({"top_products": warm.iterations} if self.warm_start else {}),
        }
        if self._previous is not None and self._previous.size == pseudo.size:
            edges = shared_edges(self._previous, pseudo, n_bins=self.n_bins)
            row["mutual_information"] = mutual_information(self._previous, pseudo, edges)
        self._previous = pseudo
        self.rows.append(row)
        self._write(row)
        return row

    def _write(self, row: dict) -> None:
        if self.folder is None:
            return
        with JsonlLog(self.folder / "curvature.jsonl") as log:
            log.append(row)
        if self.tensorboard:
            if self._writer is None:
                from loopscape.extras import require_extra

                tensorboard = require_extra("torch.utils.tensorboard", "tensorboard")
                where = self.folder / "tensorboard" if self.tensorboard is True else Path(self.tensorboard)
                self._writer = tensorboard.SummaryWriter(str(where))
            for name, value in scalars(row).items():
                self._writer.add_scalar(name, value, row["step"])
            self._writer.flush()

    def state_dict(self) -> dict:
        previous = None if self._previous is None else self._previous.tolist()
        return {"rows": [dict(r) for r in self.rows], "previous": previous}

    def load_state_dict(self, state: dict) -> None:
        self.rows = [dict(r) for r in state["rows"]]
        self._ritz = None  # not kept in the state: the first measurement after a resume starts cold
        self._previous = None if state["previous"] is None else np.asarray(state["previous"], dtype=np.float64)
        if self.folder is not None:  # the file says what the state says (a resume cuts it back)
            self.folder.mkdir(parents=True, exist_ok=True)
            rewrite_jsonl(self.folder / "curvature.jsonl", self.rows)


def scalars(row: dict) -> dict[str, float]:
    """A measurement as named scalars for loggers: ``curvature/lambda_1`` ... ``curvature/lambda_k``,
    ``curvature/trace``, ``curvature/matrix_entropy`` and, from the second on, ``curvature/mutual_information``."""
    out = {f"curvature/lambda_{i + 1}": v for i, v in enumerate(row["top_eigenvalues"])}
    out.update(
        {f"curvature/{k}": row[k] for k in ("trace", "matrix_entropy", "mutual_information") if row[k] is not None}
    )
    return out


def probe_batches_to_device(batches, device: torch.device) -> list:
    """Probe batches moved to ``device`` (tuples or dicts of tensors)."""
    out = []
    for b in batches:
        if isinstance(b, dict):
            out.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()})
        else:
            out.append(tuple(t.to(device) for t in b))
    return out
