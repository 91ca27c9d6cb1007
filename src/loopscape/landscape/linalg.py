"""Spectral algorithms on a symmetric linear operator.

Everything here needs only ``op.shape``, ``op.matvec(v)`` and ``op.matmat(V)``
(a :class:`~loopscape.landscape.hessian.HessianOperator`, or
:class:`DenseOperator` around a matrix): exact spectra for small operators,
Lanczos for extreme eigenvalues, stochastic Lanczos quadrature (SLQ) for the
spectral density, and Hutch++ for the trace. Krylov arithmetic is float64
whatever the operator's type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


class DenseOperator:
    """A dense symmetric matrix behind the operator interface (tests, baselines)."""

    def __init__(self, A: torch.Tensor):
        self.A = A
        self.shape = tuple(A.shape)
        self.dtype = A.dtype

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.A @ v.to(self.A)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.A @ V.to(self.A)


# -- exact -----------------------------------------------------------------------------------


@dataclass
class ExactSpectrum:
    eigenvalues: torch.Tensor  # ascending, float64
    asymmetry: float  # ||H - H^T||_F / ||H||_F of the assembled matrix, before symmetrising


def dense_matrix(op, chunk: int | None = None) -> torch.Tensor:
    """Assemble ``H`` column by column from batched products (``H I``), in float64."""
    P = op.shape[0]
    eye = torch.eye(P, dtype=torch.float64)
    step = chunk or P
    return torch.cat([op.matmat(eye[:, i : i + step]).double() for i in range(0, P, step)], dim=1)


def exact_spectrum(op, chunk: int | None = None) -> ExactSpectrum:
    """All eigenvalues: assemble, symmetrise, ``eigvalsh`` in float64; the asymmetry is reported."""
    H = dense_matrix(op, chunk)
    norm = torch.linalg.matrix_norm(H).item()
    asym = torch.linalg.matrix_norm(H - H.T).item() / norm if norm > 0 else 0.0
    return ExactSpectrum(torch.linalg.eigvalsh((H + H.T) / 2), asym)


# -- Lanczos ------------------------------------------------------------------------------------


@dataclass
class LanczosResult:
    eigenvalues: torch.Tensor  # float64, sorted as asked (largest first for "LA")
    eigenvectors: torch.Tensor | None  # (P, k) Ritz vectors
    residuals: torch.Tensor  # |beta_m * s_{m,i}| = ||H y_i - theta_i y_i||
    iterations: int
    converged: bool


def _lanczos_tridiag(op, v0: torch.Tensor, steps: int, reorth: bool, tol_break: float = 1e-12):
    """``steps`` Lanczos steps from ``v0``; returns (alpha, beta, Q), Q with the basis as columns."""
    P = v0.numel()
    Q = torch.zeros(P, steps + 1, dtype=torch.float64)
    alpha = torch.zeros(steps, dtype=torch.float64)
    beta = torch.zeros(steps, dtype=torch.float64)
    Q[:, 0] = v0 / torch.linalg.vector_norm(v0)
    m = steps
    for j in range(steps):
        w = op.matvec(Q[:, j]).double()
        alpha[j] = w @ Q[:, j]
        w = w - alpha[j] * Q[:, j] - (beta[j - 1] * Q[:, j - 1] if j > 0 else 0)
        if reorth:  # twice is enough (Kahan-Parlett): full re-orthogonalisation against the basis
            for _ in range(2):
                w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        beta[j] = torch.linalg.vector_norm(w)
        if beta[j] <= tol_break * max(1.0, abs(alpha[j].item())):
            m = j + 1
            break
        Q[:, j + 1] = w / beta[j]
    return alpha[:m], beta[:m], Q[:, : m + 1]


def lanczos(
    op,
    k: int = 5,
    which: str = "LA",
    max_iter: int | None = None,
    tol: float = 1e-10,
    reorth: bool = True,
    seed: int = 0,
    return_vectors: bool = False,
) -> LanczosResult:
    """Extreme eigenvalues of a symmetric operator by Lanczos.

    Args:
        k: how many eigenvalues.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic.
        max_iter: Krylov dimension limit (default ``min(P, max(4k, 60))``, grown
            until convergence up to ``P``).
        tol: stop when each wanted Ritz pair has residual ``<= tol * max(|theta|, |theta_max|)``.
        reorth: full re-orthogonalisation (default). Without it, rounding lets
            converged eigenvalues reappear as spurious copies ("ghosts").
    """
    if which not in ("LA", "SA"):
        raise ValueError(f"which must be 'LA' or 'SA' (got {which!r})")
    P = op.shape[0]
    k = min(k, P)
    g = torch.Generator().manual_seed(seed)
    v0 = torch.randn(P, generator=g, dtype=torch.float64)
    steps = min(P, max_iter or max(4 * k, 60))
    while True:
        alpha, beta, Q = _lanczos_tridiag(op, v0, steps, reorth)
        m = alpha.numel()
        T = torch.diag(alpha) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
        theta, S = torch.linalg.eigh(T)
        order = torch.argsort(theta, descending=(which == "LA"))[:k]
        theta, S = theta[order], S[:, order]
        res = (beta[m - 1] * S[m - 1, :]).abs() if m < P and beta[m - 1] > 0 else torch.zeros(len(order))
        scale = max(theta.abs().max().item(), 1e-300)
        converged = bool((res <= tol * scale).all()) or m >= P or m < steps
        if converged or steps >= P or (max_iter is not None and steps >= max_iter):
            vecs = Q[:, :m] @ S if return_vectors else None
            return LanczosResult(theta, vecs, res, m, converged)
        steps = min(P, 2 * steps)


# -- spectral density (SLQ) -----------------------------------------------------------------------------


@dataclass
class SpectralDensity:
    """SLQ quadrature: per probe, Ritz values (nodes) and weights summing to 1.

    The density estimate is ``sum over probes and nodes of weight * N(lambda; node, sigma^2) / n_probes``;
    ``sigma`` is in eigenvalue units.
    """

    nodes: torch.Tensor  # (probes, steps)
    weights: torch.Tensor  # (probes, steps)
    sigma: float

    def density(self, grid: torch.Tensor | np.ndarray) -> np.ndarray:
        x = torch.as_tensor(grid, dtype=torch.float64)[:, None, None]
        k = torch.exp(-0.5 * ((x - self.nodes) / self.sigma) ** 2) / (self.sigma * math.sqrt(2 * math.pi))
        return (k * self.weights).sum(dim=(1, 2)).numpy() / self.nodes.shape[0]

    def measure(self) -> tuple[np.ndarray, np.ndarray]:
        """The discrete spectral measure (points, masses summing to 1), pooled over probes."""
        return self.nodes.reshape(-1).numpy(), (self.weights.reshape(-1) / self.nodes.shape[0]).numpy()


def slq_density(op, n_probes: int = 10, n_steps: int = 96, seed: int = 0, sigma: float | None = None) -> SpectralDensity:
    """Stochastic Lanczos quadrature with Rademacher probes (Ghorbani et al. 2019; Lin et al. 2016).

    Each probe runs ``n_steps`` Lanczos steps with full re-orthogonalisation;
    the nodes are the Ritz values and the weights the squared first components
    of the Ritz vectors. ``sigma`` defaults to 1% of the observed spectral range.
    """
    P = op.shape[0]
    steps = min(n_steps, P)
    g = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for _ in range(n_probes):
        v = torch.randint(0, 2, (P,), generator=g).double() * 2 - 1
        alpha, beta, _ = _lanczos_tridiag(op, v, steps, reorth=True)
        m = alpha.numel()
        T = torch.diag(alpha) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
        theta, S = torch.linalg.eigh(T)
        pad = steps - m  # an early breakdown gives fewer nodes: pad with zero weight
        nodes.append(torch.cat([theta, theta.new_full((pad,), theta[-1].item())]))
        weights.append(torch.cat([S[0, :] ** 2, theta.new_zeros(pad)]))
    nodes_t, weights_t = torch.stack(nodes), torch.stack(weights)
    if sigma is None:
        sigma = max(0.01 * (nodes_t.max() - nodes_t.min()).item(), 1e-12)
    return SpectralDensity(nodes_t, weights_t, sigma)


# -- trace (Hutch++) --------------------------------------------------------------------------------------


@dataclass
class TraceEstimate:
    trace: float
    stderr: float  # standard error of the stochastic (Hutchinson) part
    matvecs: int


def hutchpp_trace(op, n_matvecs: int = 60, seed: int = 0) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): exact trace on a sketched
    top subspace plus Hutchinson on the rest, ``n_matvecs`` products in all."""
    P = op.shape[0]
    m = max(3, n_matvecs // 3)
    g = torch.Generator().manual_seed(seed)
    S = torch.randint(0, 2, (P, m), generator=g).double() * 2 - 1
    G = torch.randint(0, 2, (P, m), generator=g).double() * 2 - 1
    Q, _ = torch.linalg.qr(op.matmat(S).double())
    top = torch.trace(Q.T @ op.matmat(Q).double()).item()
    G = G - Q @ (Q.T @ G)
    samples = (G * op.matmat(G).double()).sum(dim=0)
    rest = samples.mean().item()
    stderr = samples.std(unbiased=True).item() / math.sqrt(m) if m > 1 else float("nan")
    return TraceEstimate(top + rest, stderr, 3 * m)
