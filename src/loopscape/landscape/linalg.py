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

from loopscape.config import require_fits


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


class ForeignOperator:
    """Another library's symmetric operator behind our interface, so every algorithm here runs on
    it: a ``scipy.sparse.linalg.LinearOperator`` (NumPy in and out), or a PyTorch-style operator
    with ``shape`` and ``@`` on tensors (curvlinops 3's ``HessianLinearOperator``, a matrix).
    Products come back in float64 on the CPU."""

    def __init__(self, op):
        if not (hasattr(op, "shape") and (hasattr(op, "matvec") or hasattr(op, "__matmul__"))):
            raise ValueError(
                f"op must be a scipy LinearOperator or have shape and @ on tensors (got {type(op).__name__})"
            )
        self.op, self.shape, self.dtype = op, tuple(op.shape), torch.float64
        self._scipy = type(op).__module__.startswith("scipy")
        self._device = getattr(op, "device", torch.device("cpu"))
        self._op_dtype = getattr(op, "dtype", torch.float64) if not self._scipy else None

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self._scipy:
            return torch.from_numpy(np.asarray(self.op.matmat(V.double().cpu().numpy()))).double()
        dtype = self._op_dtype if isinstance(self._op_dtype, torch.dtype) else torch.float64
        return (self.op @ V.to(device=self._device, dtype=dtype)).double().cpu()

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v.reshape(-1, 1)).reshape(-1)


@dataclass
class ExactSpectrum:
    eigenvalues: torch.Tensor  # ascending, float64
    asymmetry: float  # ||H - H^T||_F / ||H||_F of the assembled matrix, before symmetrising


def dense_matrix(op, chunk: int | None = None) -> torch.Tensor:
    """Assemble ``H`` column by column from batched products (``H I``), in float64. A size that would
    not fit in memory (the identity, ``H`` and its symmetrised copy: ``3 x 8 P^2`` bytes) is refused
    in one line, before any product."""
    P = op.shape[0]
    require_fits(3 * 8 * P * P, "params", f"{P:,} parameters", "a dense Hessian and its copies, float64")
    eye = torch.eye(P, dtype=torch.float64)
    step = chunk or P
    return torch.cat([op.matmat(eye[:, i : i + step]).double() for i in range(0, P, step)], dim=1)


def exact_spectrum(op, chunk: int | None = None) -> ExactSpectrum:
    """All eigenvalues: assemble, symmetrise, ``eigvalsh`` in float64; the asymmetry is reported."""
    return dense_spectrum(dense_matrix(op, chunk))


def dense_spectrum(H: torch.Tensor) -> ExactSpectrum:
    """:func:`exact_spectrum` of an assembled ``H``; a stack ``(E, P, P)`` gives
    eigenvalues ``(E, P)`` and the asymmetries as a list."""
    H = H.double()
    norm = torch.linalg.matrix_norm(H)
    asym = torch.where(norm > 0, torch.linalg.matrix_norm(H - H.mT) / norm.clamp(min=1e-300), 0.0)
    return ExactSpectrum(torch.linalg.eigvalsh((H + H.mT) / 2), asym.item() if asym.dim() == 0 else asym.tolist())


# -- Lanczos ------------------------------------------------------------------------------------


@dataclass
class LanczosResult:
    eigenvalues: torch.Tensor  # float64, sorted as asked (largest first for "LA")
    eigenvectors: torch.Tensor | None  # (P, k) Ritz vectors
    residuals: torch.Tensor  # |beta_m * s_{m,i}| = ||H y_i - theta_i y_i||
    iterations: int
    converged: bool


class _Lanczos:
    """Lanczos recurrence, one step at a time, float64, optional full re-orthogonalisation."""

    def __init__(self, op, v0: torch.Tensor, max_steps: int, reorth: bool):
        self.op, self.reorth = op, reorth
        # the basis grows by doubling: max_steps may be P, far more than a run needs
        self.Q = torch.zeros(v0.numel(), min(max_steps, 32) + 1, dtype=torch.float64)
        self.alpha = torch.zeros(max_steps, dtype=torch.float64)
        self.beta = torch.zeros(max_steps, dtype=torch.float64)
        self.Q[:, 0] = v0 / torch.linalg.vector_norm(v0)
        self.m = 0  # steps taken
        self.breakdown = False  # an invariant subspace was found: the Ritz values are exact

    def step(self) -> None:
        j = self.m
        if j + 1 >= self.Q.shape[1]:
            grown = min(2 * (self.Q.shape[1] - 1), self.alpha.numel()) + 1
            # the old basis and the grown one are both alive while copying: refuse in one line, not by running out
            what = f"a Lanczos basis of {self.Q.shape[0]:,} x {grown:,} and its copy, float64"
            require_fits(8 * self.Q.shape[0] * (grown + self.Q.shape[1]), "max_iter", grown, what)
            self.Q = torch.cat([self.Q, self.Q.new_zeros(self.Q.shape[0], grown - self.Q.shape[1])], dim=1)
        Q = self.Q
        w = self.op.matvec(Q[:, j]).double()
        self.alpha[j] = w @ Q[:, j]
        w = w - self.alpha[j] * Q[:, j] - (self.beta[j - 1] * Q[:, j - 1] if j > 0 else 0)
        if self.reorth:  # twice is enough (Kahan-Parlett)
            for _ in range(2):
                w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        self.beta[j] = torch.linalg.vector_norm(w)
        self.m += 1
        if self.beta[j] <= 1e-12 * max(1.0, abs(self.alpha[j].item())):
            self.breakdown = True
        else:
            Q[:, j + 1] = w / self.beta[j]

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending) and eigenvectors of the tridiagonal matrix T_m."""
        m = self.m
        T = torch.diag(self.alpha[:m]) + torch.diag(self.beta[: m - 1], 1) + torch.diag(self.beta[: m - 1], -1)
        return torch.linalg.eigh(T)


def _lanczos_tridiag(op, v0: torch.Tensor, steps: int, reorth: bool):
    """``steps`` Lanczos steps (fewer on breakdown); returns the Ritz pairs of T."""
    lz = _Lanczos(op, v0, steps, reorth)
    while lz.m < steps and not lz.breakdown:
        lz.step()
    return lz.ritz()


def lanczos(
    op,
    k: int = 5,
    which: str = "LA",
    max_iter: int | None = None,
    tol: float = 1e-10,
    reorth: bool = True,
    seed: int = 0,
    return_vectors: bool = False,
    check_every: int = 5,
) -> LanczosResult:
    """Extreme eigenvalues of a symmetric operator by Lanczos.

    Args:
        k: how many eigenvalues.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic.
        max_iter: Krylov dimension limit (default ``P``).
        tol: stop when every wanted Ritz pair has residual
            ``|beta_m s_{m,i}| = ||H y_i - theta_i y_i|| <= tol * max_i |theta_i|``,
            checked every ``check_every`` steps.
        reorth: full re-orthogonalisation (default). Without it, rounding lets
            converged eigenvalues reappear as spurious copies ("ghosts").
    """
    if which not in ("LA", "SA"):
        raise ValueError(f"which must be 'LA' or 'SA' (got {which!r})")
    P = op.shape[0]
    k = min(k, P)
    limit = min(P, max_iter or P)
    g = torch.Generator().manual_seed(seed)
    lz = _Lanczos(op, torch.randn(P, generator=g, dtype=torch.float64), limit, reorth)
    while True:
        lz.step()
        done = lz.breakdown or lz.m >= limit
        if not done and (lz.m < k + 1 or lz.m % check_every):
            continue
        theta, S = lz.ritz()
        order = torch.argsort(theta, descending=(which == "LA"))[:k]
        theta, S = theta[order], S[:, order]
        res = (lz.beta[lz.m - 1] * S[-1, :]).abs() if not lz.breakdown else torch.zeros(len(order))
        converged = lz.breakdown or bool((res <= tol * theta.abs().max().clamp_min(1e-300)).all())
        if converged or done:
            vecs = lz.Q[:, : lz.m] @ S if return_vectors else None
            return LanczosResult(theta, vecs, res, lz.m, converged or lz.m >= P)


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

    def pseudo_spectrum(self, n: int) -> np.ndarray:
        """``n`` eigenvalues standing for the measure: its quantiles at ``(i + 1/2) / n``, ascending.

        With ``n`` the number of parameters this is the spectrum the density describes, so the
        paper's metrics (Matrix Entropy, Mutual Information, the river/valley split) apply where the
        exact spectrum is out of reach; their error is the density's, not a new one.
        """
        points, masses = self.measure()
        order = np.argsort(points)
        cdf = np.cumsum(masses[order]) / masses.sum()
        levels = (np.arange(n) + 0.5) / n
        return points[order][np.minimum(np.searchsorted(cdf, levels), len(cdf) - 1)]


def slq_density(
    op, n_probes: int = 10, n_steps: int = 96, seed: int = 0, sigma: float | None = None
) -> SpectralDensity:
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
        theta, S = _lanczos_tridiag(op, v, steps, reorth=True)
        pad = steps - theta.numel()  # an early breakdown gives fewer nodes: pad with zero weight
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
