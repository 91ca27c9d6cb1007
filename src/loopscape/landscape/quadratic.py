"""River-Valley landscapes you can run (Section 4.2-4.3, Appendix F).

Setting 1, the quadratic River-Valley loss (line numbers refer to the paper's text)::

    L(theta_V, theta_R) = 1/2 theta_V^T H_V theta_V - h_R^T theta_R + theta_R^T H_RV theta_V

Theorem 1 bounds the cumulative force that valley dynamics put on the river,

    C_K = eta * sum_{k<K} H_RV Phi^k theta_V0,     Phi = I - eta H_V,
    ||C_K|| <= C = sqrt(d_V) * h_bar * alpha_bar * sum_i 1/|lambda_i|,

with ``||H_RV|| <= h_bar`` and ``||theta_V0|| <= alpha_bar``. The proof uses
``|1 - (1 - eta lambda_i)^K| <= 1``, i.e. ``0 < eta lambda_i <= 1``: an
instance outside that range does not meet the theorem's assumptions.

Setting 2 / Theorem 2 replace ``H_V`` by a path-dependent valley Hessian
bounded below, ``H_V(theta_k) >= H^B``; :class:`QuarticValley` is such a loss
(``H_V(theta) = H^B + 3 beta diag(theta^2)`` in the eigenbasis of ``H^B``), and
its bound uses the spectrum of ``H^B``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loopscape.landscape.river_valley import TAU, assumption1

Tensor = torch.Tensor


@dataclass
class RiverValley:
    """Setting 1: valley Hessian ``H_V`` (d_V x d_V), coupling ``H_RV`` (d_R x d_V), river drive ``h_R``."""

    H_V: Tensor
    H_RV: Tensor
    h_R: Tensor

    @property
    def d_V(self) -> int:
        return self.H_V.shape[0]

    @property
    def valley_eigenvalues(self) -> Tensor:
        return torch.linalg.eigvalsh(self.H_V)

    @property
    def kappa(self) -> float:
        lam = self.valley_eigenvalues
        return (lam[-1] / lam[0]).item()

    def loss(self, theta_V: Tensor, theta_R: Tensor) -> Tensor:
        return 0.5 * theta_V @ self.H_V @ theta_V - self.h_R @ theta_R + theta_R @ self.H_RV @ theta_V

    def valley_gradient(self, theta_V: Tensor) -> Tensor:
        """Gradient of the valley loss alone (``theta_R = 0``), in closed form."""
        return self.H_V @ theta_V

    def force_bound(self, theta_V0: Tensor) -> float:
        """Theorem 1's ``C`` with the tightest constants: ``h_bar = ||H_RV||_2``, ``alpha_bar = ||theta_V0||``."""
        lam = self.valley_eigenvalues
        h_bar = torch.linalg.matrix_norm(self.H_RV, ord=2).item()
        return math.sqrt(self.d_V) * h_bar * theta_V0.norm().item() * (1 / lam.abs()).sum().item()

    def meets_theorem1(self, eta: float) -> bool:
        lam = self.valley_eigenvalues
        return bool((lam > 0).all() and (eta * lam <= 1).all())


def random_orthogonal(d: int, g: torch.Generator) -> Tensor:
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


def u_and_v_valleys(
    d_V: int = 20,
    d_R: int = 5,
    tau: float = TAU,
    kappa_v: float = 100.0,
    delta: float = 0.2,
    h_bar: float = 1.0,
    seed: int = 0,
) -> tuple[RiverValley, RiverValley, Tensor]:
    """A River-U-Valley and a River-V-Valley that satisfies Assumption 1 relative to it.

    Both share ``d_V``, the eigenbasis, ``H_RV`` (spectral norm ``h_bar``), ``h_R`` and
    the initial valley parameters (returned third). The U valley's spectrum spans
    ``[hi / (1 + delta), hi]`` with ``hi = tau (1 + delta/2)``, so ``kappa = 1 + delta``; the V valley's
    is log-spaced over ``[lambda_max / kappa_v, lambda_max]`` with the U valley's
    largest eigenvalue as ``lambda_max``, so it has more eigenvalues below ``tau``
    and its sorted small ones lie below the U valley's.
    """
    g = torch.Generator().manual_seed(seed)
    Q = random_orthogonal(d_V, g)
    hi = tau * (1 + delta / 2)
    lo = hi / (1 + delta)  # kappa_U = 1 + delta exactly
    lam_u = torch.linspace(lo, hi, d_V, dtype=torch.float64)
    lam_v = torch.logspace(math.log10(hi / kappa_v), math.log10(hi), d_V, dtype=torch.float64)
    H_RV = torch.randn(d_R, d_V, generator=g, dtype=torch.float64)
    H_RV = h_bar * H_RV / torch.linalg.matrix_norm(H_RV, ord=2)
    h_R = torch.randn(d_R, generator=g, dtype=torch.float64)
    theta_V0 = torch.randn(d_V, generator=g, dtype=torch.float64)

    def make(lam):
        return RiverValley((Q * lam) @ Q.T, H_RV, h_R)

    u, v = make(lam_u), make(lam_v)
    assert assumption1(lam_u, lam_v, eps=0.0, tau=tau)["holds"]
    return u, v, theta_V0


# -- optimisers --------------------------------------------------------------------------


@dataclass
class Trajectory:
    theta_V: Tensor  # (steps + 1, d_V)
    theta_R: Tensor  # (steps + 1, d_R)
    loss: Tensor  # (steps + 1,)
    river_force: Tensor  # (steps, d_R): eta * sum_{j<=k} H_RV theta_V,j, the valley's push on the river so far


def run(
    landscape,
    theta_V0: Tensor,
    theta_R0: Tensor | None = None,
    eta: float = 0.1,
    steps: int = 500,
    optimizer: str = "gd",
) -> Trajectory:
    """Gradient descent (the theorems' setting) or Adam on the full coupled loss; every iterate kept."""
    if optimizer not in ("gd", "adam"):
        raise ValueError(f"optimizer must be 'gd' or 'adam' (got {optimizer!r})")
    d_R = landscape.H_RV.shape[0]
    tV = theta_V0.clone().requires_grad_(True)
    tR = (torch.zeros(d_R, dtype=theta_V0.dtype) if theta_R0 is None else theta_R0.clone()).requires_grad_(True)
    opt = torch.optim.SGD([tV, tR], lr=eta) if optimizer == "gd" else torch.optim.Adam([tV, tR], lr=eta)
    Vs, Rs, Ls, force = [tV.detach().clone()], [tR.detach().clone()], [], []
    total = torch.zeros(d_R, dtype=theta_V0.dtype)
    for _ in range(steps):
        opt.zero_grad()
        loss = landscape.loss(tV, tR)
        loss.backward()
        Ls.append(loss.detach().clone())
        total = total + eta * landscape.H_RV @ tV.detach()
        force.append(total.clone())
        opt.step()
        Vs.append(tV.detach().clone())
        Rs.append(tR.detach().clone())
    Ls.append(landscape.loss(tV, tR).detach().clone())
    return Trajectory(torch.stack(Vs), torch.stack(Rs), torch.stack(Ls), torch.stack(force))


def valley_path(landscape, theta_V0: Tensor, eta: float, steps: int) -> Tensor:
    """``theta_V,k`` for ``k = 0..steps-1`` (rows): gradient descent on the valley loss alone."""
    theta, path = theta_V0.clone(), []
    for _ in range(steps):
        path.append(theta)
        theta = theta - eta * landscape.valley_gradient(theta)
    return torch.stack(path)


def valley_force(landscape, theta_V0: Tensor, eta: float, steps: int) -> Tensor:
    """The theorems' cumulative force ``C_K = eta sum_{k<K} H_RV theta_V,k`` for ``K = 1..steps`` (rows)."""
    return eta * torch.cumsum(valley_path(landscape, theta_V0, eta, steps) @ landscape.H_RV.T, dim=0)


def decoupled_run(landscape, theta_V0: Tensor, eta: float, steps: int) -> Trajectory:
    """The dynamics of the proofs of Theorems 1-2: the valley follows gradient
    descent on the valley loss alone (no feedback from the river; for Setting 1
    ``theta_V,k = Phi^k theta_V0``), and the river takes its gradient steps,
    ``theta_R,K = K eta h_R - C_K``: the drive minus the valley's cumulative force."""
    theta = theta_V0.clone()
    d_R = landscape.H_RV.shape[0]
    zero_R = torch.zeros(d_R, dtype=theta_V0.dtype)
    total, Vs, Rs, Ls, force = torch.zeros_like(zero_R), [theta.clone()], [zero_R.clone()], [], []
    for k in range(1, steps + 1):
        Ls.append(landscape.loss(theta, Rs[-1]).detach())
        total = total + eta * landscape.H_RV @ theta
        force.append(total.clone())
        t = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(landscape.loss(t, zero_R), t)
        theta = theta - eta * g
        Vs.append(theta.clone())
        Rs.append(k * eta * landscape.h_R - total)
    Ls.append(landscape.loss(theta, Rs[-1]).detach())
    return Trajectory(torch.stack(Vs), torch.stack(Rs), torch.stack(Ls), torch.stack(force))


# -- Setting 2 -----------------------------------------------------------------------------


@dataclass
class QuarticValley(RiverValley):
    """Setting 2: valley loss ``sum_i lambda^B_i/2 u_i^2 + beta/4 u_i^4`` with ``u = Q^T theta_V``.

    Its valley Hessian ``Q diag(lambda^B + 3 beta u^2) Q^T`` changes along the path
    and stays above ``H^B = H_V`` (Assumption 3); the coupling is ``H_RV``
    (constant, so Assumption 2 holds with ``h_bar_gen = ||H_RV||``).
    """

    beta: float = 1.0

    def __post_init__(self) -> None:
        self._lam, self._Q = torch.linalg.eigh(self.H_V)  # H^B's eigenpairs, used at every step

    def loss(self, theta_V: Tensor, theta_R: Tensor) -> Tensor:
        u = self._Q.T @ theta_V
        return (
            (0.5 * self._lam * u**2 + 0.25 * self.beta * u**4).sum()
            - self.h_R @ theta_R
            + theta_R @ self.H_RV @ theta_V
        )

    def valley_gradient(self, theta_V: Tensor) -> Tensor:
        u = self._Q.T @ theta_V
        return self._Q @ (self._lam * u + self.beta * u**3)

    def valley_hessian_eigenvalues(self, theta_V: Tensor) -> Tensor:
        """Eigenvalues of ``H_V(theta) = Q diag(lambda^B + 3 beta u^2) Q^T`` (unsorted)."""
        return self._lam + 3 * self.beta * (self._Q.T @ theta_V) ** 2

    def largest_eigenvalue_along(self, path: Tensor) -> float:
        """``max_k lambda_max(H_V(theta_k))`` over the rows ``theta_k`` of ``path``."""
        return (self._lam + 3 * self.beta * (path @ self._Q) ** 2).max().item()
