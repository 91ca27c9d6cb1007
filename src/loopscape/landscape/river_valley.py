"""River-Valley diagnostics on measured spectra (Definition 1, Assumption 1, Theorem 1).

* Definition 1: the river is spanned by eigenvectors with ``lambda <= eps``,
  the valley by those with ``lambda > eps``; the valley is U-shaped if its
  condition number ``kappa = lambda_1 / lambda_dV <= 1 + delta`` and V-shaped
  if ``kappa >> 1`` (here: ``kappa > 1 + delta``).
* Assumption 1: with ``m_k = |{valley lambda <= tau}|`` (tau = 0.5 as the
  paper), Looped-Attn (2) against Single-Attn (1) has (a) ``m_2 > m_1`` and
  (b) component-wise smaller sorted low-curvature eigenvalues,
  ``lambda~_j^(2) < lambda~_j^(1)`` for ``j <= m_1``.
* Theorem 1's bound ``C = sqrt(d_V) h_bar alpha_bar sum_i 1/|lambda_i|`` with
  ``h_bar >= ||H_RV||`` and ``alpha_bar >= ||theta_V,0||`` (Setting 1). In a
  Hessian's own eigenbasis ``H_RV = 0``, so :func:`cumulative_force` fixes the
  river/valley basis at a reference checkpoint and measures
  ``H_RV(t) = R^T H_t V`` at later ones; ``h_bar`` is the largest spectral norm
  seen, and ``alpha_bar = ||V^T (theta_ref - theta_final)||``, the valley
  displacement still ahead of the run at the reference point (our reading).

``eps`` is not given by the paper; the default is relative,
``eps = 1e-3 * max |lambda|``, so the split does not depend on the loss scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

TAU = 0.5
EPS_REL = 1e-3
DELTA = 1.0


def _np(eigs) -> np.ndarray:
    return np.sort(np.asarray(eigs.detach().cpu() if torch.is_tensor(eigs) else eigs, dtype=np.float64))


@dataclass
class ValleyDiagnostics:
    eps: float
    n_river: int
    d_valley: int
    kappa: float  # lambda_max / lambda_min over the valley (inf if empty)
    shape: str  # "U" or "V" (Definition 1 at delta), "none" without a valley
    tau: float
    m_tau: int  # valley eigenvalues <= tau
    spectral_force: float  # sqrt(d_V) * sum 1/|lambda_i| over the valley (Theorem 1 without h_bar, alpha_bar)

    def as_dict(self) -> dict:
        return asdict(self)


def valley_eigenvalues(eigs, eps: float | None = None) -> tuple[np.ndarray, float]:
    """Sorted valley eigenvalues (``> eps``) and the ``eps`` used."""
    e = _np(eigs)
    eps = EPS_REL * float(np.abs(e).max()) if eps is None else eps
    return e[e > eps], eps


def valley_diagnostics(eigs, eps: float | None = None, delta: float = DELTA, tau: float = TAU) -> ValleyDiagnostics:
    valley, eps = valley_eigenvalues(eigs, eps)
    n = _np(eigs).size
    if valley.size == 0:
        return ValleyDiagnostics(eps, n, 0, math.inf, "none", tau, 0, 0.0)
    kappa = float(valley[-1] / valley[0])
    return ValleyDiagnostics(
        eps=eps,
        n_river=n - valley.size,
        d_valley=int(valley.size),
        kappa=kappa,
        shape="U" if kappa <= 1 + delta else "V",
        tau=tau,
        m_tau=int((valley <= tau).sum()),
        spectral_force=float(math.sqrt(valley.size) * (1.0 / np.abs(valley)).sum()),
    )


def assumption1(eigs_single, eigs_looped, eps: float | None = None, tau: float = TAU) -> dict:
    """Assumption 1 (a) dimension and (b) dominance, Looped-Attn against Single-Attn."""
    v1, _ = valley_eigenvalues(eigs_single, eps)
    v2, _ = valley_eigenvalues(eigs_looped, eps)
    low1, low2 = v1[v1 <= tau], v2[v2 <= tau]
    m1, m2 = int(low1.size), int(low2.size)
    dominance = m2 >= m1 and bool(np.all(low2[:m1] < low1))
    return {
        "tau": tau,
        "m_single": m1,
        "m_looped": m2,
        "dimension": m2 > m1,
        "dominance": dominance,
        "holds": m2 > m1 and dominance,
    }


def cumulative_force(
    H_ref: torch.Tensor,
    H_later: list[torch.Tensor],
    theta_ref: torch.Tensor,
    theta_final: torch.Tensor,
    eps: float | None = None,
) -> dict:
    """Theorem 1's ``C`` from measured quantities, basis fixed at the reference Hessian ``H_ref``."""
    lam, U = torch.linalg.eigh(H_ref.double())
    eps = EPS_REL * lam.abs().max().item() if eps is None else eps
    valley = lam > eps
    V, R = U[:, valley], U[:, ~valley]
    d_V = int(valley.sum())
    if d_V == 0 or R.shape[1] == 0:
        return {"eps": eps, "d_valley": d_V, "h_bar": None, "alpha_bar": None, "C": None}
    h_bar = max(torch.linalg.matrix_norm(R.T @ H.double() @ V, ord=2).item() for H in [H_ref, *H_later])
    alpha_bar = torch.linalg.vector_norm(V.T @ (theta_ref - theta_final).double()).item()
    inv = (1.0 / lam[valley].abs()).sum().item()
    return {
        "eps": eps,
        "d_valley": d_V,
        "h_bar": h_bar,
        "alpha_bar": alpha_bar,
        "sum_inv_lambda": inv,
        "C": math.sqrt(d_V) * h_bar * alpha_bar * inv,
    }
