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

from loopscape.config import device_memory, require_fits


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
    what = "a dense Hessian and its copies, float64"
    require_fits(3 * 8 * P * P, "params", f"{P:,} parameters", what, _krylov_device(op))
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
    iterations: int  # Krylov dimension reached: one product per basis vector
    converged: bool


def _krylov_device(op) -> torch.device:
    """Where the Krylov basis lives: the operator's device (products never leave it)."""
    return torch.device(getattr(op, "device", "cpu"))


class _Lanczos:
    """Lanczos recurrences, one step at a time, float64 on the operator's device, optional full
    re-orthogonalisation. ``v0`` of shape ``(b, P)`` runs ``b`` independent recurrences in lockstep
    (SLQ's probes): each step is one ``op.matmat`` for all of them."""

    def __init__(self, op, v0: torch.Tensor, max_steps: int, reorth: bool):
        self.op, self.reorth = op, reorth
        V0 = v0.reshape(-1, v0.shape[-1]).to(_krylov_device(op), torch.float64)
        b = V0.shape[0]
        # the basis grows by doubling: max_steps may be P, far more than a run needs
        cols, P = min(max_steps, 32) + 1, V0.shape[1]
        require_fits(
            8 * b * P * cols, "max_iter", cols - 1, f"a Lanczos basis of {b} x {P:,} x {cols}, float64", V0.device
        )
        self.Q = V0.new_zeros(b, cols, P)
        self.alpha = V0.new_zeros(b, max_steps)
        self.beta = V0.new_zeros(b, max_steps)
        self.Q[:, 0] = V0 / torch.linalg.vector_norm(V0, dim=1, keepdim=True)
        self.m = 0  # steps taken
        self.steps = [0] * b  # steps each recurrence took before it broke down
        self.stopped = [False] * b  # an invariant subspace was found: that recurrence's Ritz values are exact

    @property
    def breakdown(self) -> bool:
        return all(self.stopped)

    def _products(self, V: torch.Tensor) -> torch.Tensor:
        out = self.op.matvec(V[0])[None] if V.shape[0] == 1 else self.op.matmat(V.T).T
        return out.to(V.device, torch.float64)

    def step(self) -> None:
        j = self.m
        b, cols, P = self.Q.shape
        if j + 1 >= cols:
            grown = min(2 * (cols - 1), self.alpha.shape[1]) + 1
            # the old basis and the grown one are both alive while copying: refuse in one line, not by running out
            what = f"a Lanczos basis of {b} x {P:,} x {grown:,} and its copy, float64"
            require_fits(8 * b * P * (grown + cols), "max_iter", grown, what, self.Q.device)
            self.Q = torch.cat([self.Q, self.Q.new_zeros(b, grown - cols, P)], dim=1)
        Q = self.Q
        W = self._products(Q[:, j])
        alpha = (W * Q[:, j]).sum(1)
        W = W - alpha[:, None] * Q[:, j] - (self.beta[:, j - 1, None] * Q[:, j - 1] if j > 0 else 0)
        if self.reorth:  # twice is enough (Kahan-Parlett)
            for _ in range(2):
                W = W - torch.einsum("bkp,bk->bp", Q[:, : j + 1], torch.einsum("bkp,bp->bk", Q[:, : j + 1], W))
        beta = torch.linalg.vector_norm(W, dim=1)
        self.m += 1
        for i in range(b):
            if self.stopped[i]:  # its basis vector is zero: its products are zero, its coefficients stay 0
                continue
            self.alpha[i, j], self.beta[i, j] = alpha[i], beta[i]
            self.steps[i] += 1
            if beta[i] <= 1e-12 * max(1.0, abs(alpha[i].item())):
                self.stopped[i] = True
            else:
                Q[i, j + 1] = W[i] / beta[i]

    @property
    def dim(self) -> int:
        return self.m

    def ritz(self, i: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending), eigenvectors of recurrence ``i``'s tridiagonal matrix T_m and
        each pair's residual ``||H y - theta y|| = |beta_m s_{m,i}|`` (zero once it broke down)."""
        m, a, c = self.steps[i], self.alpha[i], self.beta[i]
        T = torch.diag(a[:m]) + torch.diag(c[: m - 1], 1) + torch.diag(c[: m - 1], -1)
        theta, S = torch.linalg.eigh(T)
        res = torch.zeros_like(theta) if self.stopped[i] else (c[m - 1] * S[-1, :]).abs()
        return theta, S, res

    def vectors(self, S: torch.Tensor) -> torch.Tensor:
        """Ritz vectors of recurrence 0."""
        return self.Q[0, : self.m].T @ S


class _BlockLanczos:
    """Block Lanczos (Golub and Underwood 1977) with full re-orthogonalisation, float64 on the
    operator's device: ``H Q_j = Q_{j-1} B_{j-1}^T + Q_j A_j + Q_{j+1} B_j`` with ``b``-column blocks,
    each step one ``op.matmat`` of ``b`` columns. A rank-deficient block is refilled with random
    directions orthogonal to the basis, coupled by zero, so the recurrence never breaks down before
    ``P``."""

    def __init__(self, op, X0: torch.Tensor, max_blocks: int, seed: int):
        self.op, self.b, self.max_blocks = op, X0.shape[1], max_blocks
        self.g = torch.Generator().manual_seed(seed + 1)
        Q0 = torch.linalg.qr(X0.to(_krylov_device(op), torch.float64))[0]
        self.basis = Q0.new_zeros(Q0.shape[0], 0)
        self._reserve(2 * self.b)
        self.basis[:, : self.b] = Q0
        self.A: list[torch.Tensor] = []  # diagonal blocks of T
        self.B: list[torch.Tensor] = []  # B_j couples block j + 1 to block j

    breakdown = False  # refilled blocks carry it on to the Krylov limit

    @property
    def dim(self) -> int:
        return self.b * len(self.A)

    def _reserve(self, cols: int) -> None:
        """Room for ``cols`` basis vectors. The basis grows by doubling, as _Lanczos's (``max_blocks``
        may be ``P / b``, far more than a run needs); old and grown are both alive while copying."""
        P, have = self.basis.shape
        if cols <= have:
            return
        grown = min(max(cols, 2 * have), self.max_blocks * self.b)
        what = f"a block Lanczos basis of {P:,} x {grown:,} and its copy, float64"
        require_fits(8 * P * (grown + have), "max_iter", grown, what, self.basis.device)
        self.basis = torch.cat([self.basis, self.basis.new_zeros(P, grown - have)], dim=1)

    def _orthogonalise(self, W: torch.Tensor, cols: int) -> torch.Tensor:
        basis = self.basis[:, :cols]
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            W = W - basis @ (basis.T @ W)
        return W

    def step(self) -> None:
        b, j = self.b, len(self.A)
        Qj = self.basis[:, j * b : (j + 1) * b]
        W = self.op.matmat(Qj).to(Qj.device, torch.float64)
        A = Qj.T @ W
        self.A.append((A + A.T) / 2)
        W = self._orthogonalise(W, (j + 1) * b)  # removes Q_j A_j, Q_{j-1} B_{j-1}^T and rounding
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        kept = s > 1e-12 * max(1.0, torch.linalg.matrix_norm(self.A[-1], 2).item())
        self.B.append(torch.where(kept[:, None], s[:, None] * Vh, 0.0))
        if j + 1 >= self.max_blocks:
            return
        self._reserve((j + 2) * b)
        self.basis[:, (j + 1) * b : (j + 2) * b] = U
        if not kept.all():  # an invariant subspace: go on from fresh directions, coupled by zero
            fill = torch.randn(U.shape[0], int((~kept).sum()), generator=self.g, dtype=torch.float64).to(U.device)
            self.basis[:, (j + 1) * b : (j + 2) * b][:, ~kept] = 0.0
            fill = torch.linalg.qr(self._orthogonalise(fill, (j + 2) * b))[0]
            self.basis[:, (j + 1) * b + torch.nonzero(~kept).reshape(-1)] = fill

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending), eigenvectors of the block-tridiagonal ``T`` and each pair's
        residual ``||H y_i - theta_i y_i|| = ||B_m S_{last block, i}||``."""
        n, b = len(self.A), self.b
        T = torch.block_diag(*self.A)
        for j, B in enumerate(self.B[: n - 1]):
            T[(j + 1) * b : (j + 2) * b, j * b : (j + 1) * b] = B
            T[j * b : (j + 1) * b, (j + 1) * b : (j + 2) * b] = B.T
        theta, S = torch.linalg.eigh(T)
        return theta, S, torch.linalg.vector_norm(self.B[n - 1] @ S[-b:, :], dim=0)

    def vectors(self, S: torch.Tensor) -> torch.Tensor:
        return self.basis[:, : self.dim] @ S


def lanczos(
    op,
    k: int = 5,
    which: str = "LA",
    max_iter: int | None = None,
    tol: float = 1e-10,
    reorth: bool = True,
    seed: int = 0,
    return_vectors: bool = False,
    check_every: int = 1,
    block: int = 1,
    start: torch.Tensor | None = None,
) -> LanczosResult:
    """Extreme eigenvalues of a symmetric operator by Lanczos.

    Args:
        k: how many eigenvalues.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic.
        max_iter: Krylov dimension limit (default ``P``).
        tol: stop when every wanted Ritz pair has residual
            ``|beta_m s_{m,i}| = ||H y_i - theta_i y_i|| <= tol * max_i |theta_i|`` (each eigenvalue is then
            within that of an eigenvalue of ``H``), checked every ``check_every`` steps. A rule on the gap
            to the next Ritz value (the quadratic bound ``||R||^2 / delta``) stops sooner on a cluster inside
            the top ``k``, but early and wrong on one that straddles ``k``: not used (docs/curvature.md).
        check_every: steps between checks (default every step: a check is the eigendecomposition of
            the small tridiagonal matrix, cheaper than a product on a model; on a tiny operator it may not be).
        reorth: full re-orthogonalisation (default). Without it, rounding lets
            converged eigenvalues reappear as spurious copies ("ghosts").
        block: ``b > 1`` runs block Lanczos (:class:`_BlockLanczos`, always re-orthogonalised),
            each step one batched product of ``b`` columns. It needs more products than one
            vector for the same accuracy, and fewer steps: it pays where a batch of ``b``
            products costs about one (a GPU with room to spare), not where products are
            compute-bound (docs/curvature.md).
        start: ``(P, b)`` vectors to start from, e.g. the previous measurement's Ritz vectors
            (``return_vectors=True``) when tracking a slowly changing spectrum: a block start, so
            block Lanczos with ``b`` columns (``block`` is then ``b``), checked every step. A start
            that already spans the wanted eigenvectors converges in a block or two.
    """
    if start is not None:
        if not torch.is_tensor(start) or start.dim() not in (1, 2) or start.shape[0] != op.shape[0]:
            got = tuple(start.shape) if torch.is_tensor(start) else type(start).__name__
            raise ValueError(
                f"start must be a (P, b) or (P,) tensor of the operator's size P = {op.shape[0]} (got {got})"
            )
        start = start.reshape(op.shape[0], -1)
        if start.shape[1] > max(1, min(op.shape[0], max_iter or op.shape[0]) - k):
            raise ValueError(f"start must have fewer columns than the Krylov limit less k (got {start.shape[1]})")
        block = start.shape[1]
        check_every = 1 if block > 1 else check_every
    if which not in ("LA", "SA"):
        raise ValueError(f"which must be 'LA' or 'SA' (got {which!r})")
    P = op.shape[0]
    k = min(k, P)
    limit = min(P, max_iter or P)
    if not 1 <= block <= max(1, limit - k):  # whole blocks must hold k vectors within the limit
        raise ValueError(
            f"block must be between 1 and the Krylov dimension limit less k ({max(1, limit - k)}) (got {block})"
        )
    g = torch.Generator().manual_seed(seed)
    if block == 1:
        v0 = torch.randn(P, generator=g, dtype=torch.float64) if start is None else start[:, 0].double().cpu()
        lz = _Lanczos(op, v0, limit, reorth)
    else:
        X0 = torch.randn(P, block, generator=g, dtype=torch.float64) if start is None else start.double().cpu()
        lz = _BlockLanczos(op, X0, limit // block, seed)
    every = max(1, check_every // block)  # in steps
    while True:
        lz.step()
        done = lz.breakdown or lz.dim + block > limit
        if not done and (lz.dim < k + block or (lz.dim // block) % every):
            continue
        theta, S, res = lz.ritz()
        order = torch.argsort(theta, descending=(which == "LA"))[:k]
        theta, S, res = theta[order], S[:, order], res[order]
        converged = lz.breakdown or bool((res <= tol * theta.abs().max().clamp_min(1e-300)).all())
        if converged or done:
            vecs = lz.vectors(S).cpu() if return_vectors else None
            return LanczosResult(theta.cpu(), vecs, res.cpu(), lz.dim, converged or lz.dim >= P)


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
    residuals: torch.Tensor | None = None  # (probes, steps): ||H y - theta y|| of each Ritz pair, inf where padded
    dim: int | None = None  # P, the operator's size

    def __repr__(self) -> str:  # the nodes and weights run to thousands of numbers
        probes, steps = self.nodes.shape
        lo, hi = self.nodes[torch.isfinite(self.nodes)].aminmax() if self.nodes.numel() else (0.0, 0.0)
        return (
            f"SpectralDensity(probes={probes}, steps={steps}, sigma={self.sigma:.3g}, dim={self.dim}, "
            f"nodes in [{float(lo):.4g}, {float(hi):.4g}])"
        )

    def top(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest eigenvalues as the probes' Krylov spaces see them, largest first, with
        their residual bounds: for each rank ``j`` the largest ``j``-th Ritz value over the probes
        (each is a lower bound on ``lambda_j``, by Cauchy interlacing)."""
        valid = torch.isfinite(self.residuals)
        ranked = torch.where(valid, self.nodes, -torch.inf).sort(dim=1, descending=True)
        order = ranked.indices[:, :k]
        values, res = ranked.values[:, :k], self.residuals.gather(1, order)
        best = values.argmax(dim=0)
        cols = torch.arange(values.shape[1])
        return values[best, cols], res[best, cols]

    def trace(self) -> TraceEstimate:
        """Hutchinson on the probes, for free: ``v^T H v = P alpha_1 = P sum_i w_i theta_i`` for a
        Rademacher ``v``; the standard error is over the probes."""
        samples = self.dim * (self.weights * self.nodes).sum(dim=1)
        n = samples.numel()
        stderr = samples.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
        return TraceEstimate(samples.mean().item(), stderr, 0)

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


class _Deflated:
    """``(I - U U^T) H (I - U U^T)``: the operator with the orthonormal columns of ``U`` projected off."""

    def __init__(self, op, U: torch.Tensor):
        self.op, self.U, self.shape = op, U, op.shape
        self.device = U.device

    def project(self, V: torch.Tensor) -> torch.Tensor:
        V = V.to(self.U)
        return V - self.U @ (self.U.T @ V)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.project(self.op.matmat(self.project(V)))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v.reshape(-1, 1)).reshape(-1)


def slq_density(
    op,
    n_probes: int = 10,
    n_steps: int = 96,
    seed: int = 0,
    sigma: float | None = None,
    block: int | None = None,
    deflate: int = 0,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature with Rademacher probes (Ghorbani et al. 2019; Lin et al. 2016).

    Each probe runs ``n_steps`` Lanczos steps with full re-orthogonalisation;
    the nodes are the Ritz values and the weights the squared first components
    of the Ritz vectors. ``sigma`` defaults to 1% of the observed spectral range.
    ``block`` probes run in lockstep, sharing each step's product (``op.matmat``):
    by default all of them, as many as a quarter of the memory where the Krylov basis lives holds
    (the CUDA device's for an operator on a GPU, this machine's otherwise).

    ``deflate`` > 0 first finds the ``deflate`` largest eigenpairs (:func:`lanczos`, tolerance
    1e-6) and takes them exactly, each with mass ``1/P``; the probes, projected off them, see
    only the rest of the spectrum, which keeps mass ``(P - deflate)/P``. A few outliers carry most
    of SLQ's error (each probe weighs an eigenvalue by a chi-square draw), so this buys accuracy
    at the price of one Lanczos run.
    """
    for name, value in (("n_probes", n_probes), ("n_steps", n_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
    P = op.shape[0]
    exact = None
    if deflate:
        exact = lanczos(op, k=deflate, which="LA", tol=1e-6, return_vectors=True)
        op = _Deflated(op, exact.eigenvectors.to(_krylov_device(op)))
    steps = min(n_steps, P - deflate)
    g = torch.Generator().manual_seed(seed)
    probes = [torch.randint(0, 2, (P,), generator=g).double() * 2 - 1 for _ in range(n_probes)]
    if deflate:
        probes = [op.project(v) for v in probes]
    if block is None:  # each probe keeps a basis of P x (steps + 1) and, while it grows, a copy
        block = max(1, min(n_probes, device_memory(_krylov_device(op)) // 4 // (16 * P * (steps + 1))))
    nodes, weights, residuals = [], [], []
    for first in range(0, n_probes, block):
        lz = _Lanczos(op, torch.stack(probes[first : first + block]), steps, reorth=True)
        while lz.m < steps and not lz.breakdown:
            lz.step()
        for i, m in enumerate(lz.steps):
            theta, S, res = (t.cpu() for t in lz.ritz(i))
            pad = steps - m  # an early breakdown gives fewer nodes: pad with zero weight
            nodes.append(torch.cat([theta, theta.new_full((pad,), theta[-1].item())]))
            weights.append(torch.cat([S[0, :] ** 2, theta.new_zeros(pad)]))
            residuals.append(torch.cat([res, res.new_full((pad,), torch.inf)]))
    nodes_t, weights_t, residuals_t = torch.stack(nodes), torch.stack(weights), torch.stack(residuals)
    if exact is not None:  # every probe's measure: the exact outliers, then the rest at its share of the mass
        rows = nodes_t.shape[0]
        nodes_t = torch.cat([exact.eigenvalues.expand(rows, -1), nodes_t], dim=1)
        weights_t = torch.cat([weights_t.new_full((rows, deflate), 1 / P), weights_t * (P - deflate) / P], dim=1)
        residuals_t = torch.cat([exact.residuals.expand(rows, -1), residuals_t], dim=1)
    if sigma is None:
        sigma = max(0.01 * (nodes_t.max() - nodes_t.min()).item(), 1e-12)
    return SpectralDensity(nodes_t, weights_t, sigma, residuals_t, P)


# -- trace (Hutch++) --------------------------------------------------------------------------------------


@dataclass
class TraceEstimate:
    trace: float
    stderr: float  # standard error of the stochastic (Hutchinson) part
    matvecs: int


def hutchpp_trace(op, n_matvecs: int = 60, seed: int = 0) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): exact trace on a sketched
    top subspace plus Hutchinson on the rest, ``n_matvecs`` products in all."""
    if not isinstance(n_matvecs, int) or isinstance(n_matvecs, bool) or n_matvecs < 9:
        raise ValueError(f"n_matvecs must be an integer >= 9: three thirds of at least 3 products (got {n_matvecs!r})")
    P = op.shape[0]
    m = n_matvecs // 3
    g = torch.Generator().manual_seed(seed)
    device = _krylov_device(op)
    S = (torch.randint(0, 2, (P, m), generator=g).double() * 2 - 1).to(device)
    G = (torch.randint(0, 2, (P, m), generator=g).double() * 2 - 1).to(device)
    Q, _ = torch.linalg.qr(op.matmat(S).to(device, torch.float64))
    top = torch.trace(Q.T @ op.matmat(Q).to(device, torch.float64)).item()
    G = G - Q @ (Q.T @ G)
    samples = (G * op.matmat(G).to(device, torch.float64)).sum(dim=0)
    rest = samples.mean().item()
    stderr = samples.std(unbiased=True).item() / math.sqrt(m) if m > 1 else float("nan")
    return TraceEstimate(top + rest, stderr, 3 * m)
