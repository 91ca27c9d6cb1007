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

``eps`` is not given by the paper. Definition 1 has ONE threshold, and the models compared share
one loss on one dataset, so every pair compared is cut at one ``eps``: :func:`common_eps`,
``EPS_REL = 1e-3`` times the largest ``|lambda|`` over both spectra (a threshold relative to each
model's own largest eigenvalue would decide the comparison by itself). Assumption 1's ``tau = 0.5``
is absolute (Remark 5). With ``eps`` relative to a reference, ``kappa`` is capped at ``1 / EPS_REL``
times the reference ratio, so :func:`kappa_curve` gives it over ``EPS_GRID`` (1e-4 to 1e-1 of the
reference) and :func:`cap_free` gives statistics that need no threshold.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

TAU = 0.5
EPS_REL = 1e-3
DELTA = 1.0
EPS_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # relative to the common reference
TOP_K = 10  # lambda_1 / lambda_k of cap_free


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


def common_eps(*spectra, rel: float = EPS_REL) -> float:
    """One threshold for spectra that are compared: ``rel`` times the largest ``|lambda|`` over all of them."""
    return rel * max(float(np.abs(_np(e)).max()) for e in spectra)


def kappa_curve(eigs, reference: float, rels=EPS_GRID) -> list[float | None]:
    """The valley's ``kappa`` at ``eps = rel * reference`` for each ``rel`` (``None`` where the valley is empty)."""
    out = []
    for rel in rels:
        valley, _ = valley_eigenvalues(eigs, rel * reference)
        out.append(float(valley[-1] / valley[0]) if valley.size else None)
    return out


def cap_free(eigs, tau: float = TAU, k: int = TOP_K, decades: int = 6) -> dict:
    """Statistics of a spectrum that need no valley threshold: the count of positive eigenvalues in each
    decade below the largest (``(lambda_1 / 10^(j+1), lambda_1 / 10^j]``, j = 0..decades-1),
    ``lambda_1 / lambda_k``, the participation ratio ``(sum |lambda|)^2 / sum lambda^2`` (how many
    directions carry the curvature), and the count of eigenvalues in ``(0, tau]`` (tau absolute)."""
    e = _np(eigs)[::-1]
    top = float(e[0])
    pos = e[e > 0]
    per_decade = [int(((pos <= top / 10**j) & (pos > top / 10 ** (j + 1))).sum()) for j in range(decades)]
    a = np.abs(e)
    return {
        "per_decade": per_decade,
        "top_ratio_k": k,
        "top_ratio": float(top / e[k - 1]) if e.size >= k and e[k - 1] > 0 else None,
        "participation_ratio": float(a.sum() ** 2 / (a**2).sum()) if a.any() else 0.0,
        "m_tau_absolute": int(((e > 0) & (e <= tau)).sum()),
    }


def assumption1(eigs_single, eigs_looped, eps: float | None = None, tau: float = TAU) -> dict:
    """Assumption 1 (a) dimension and (b) dominance, Looped-Attn against Single-Attn, both cut at one ``eps``
    (default :func:`common_eps` of the pair). ``dominance_margin``: the smallest ``log10(lambda~_j^(1) /
    lambda~_j^(2))`` over ``j <= min(m_1, m_2)``, positive iff the sorted low eigenvalues of Looped-Attn are
    component-wise smaller there (``None`` when either set is empty)."""
    eps = common_eps(eigs_single, eigs_looped) if eps is None else eps
    v1, _ = valley_eigenvalues(eigs_single, eps)
    v2, _ = valley_eigenvalues(eigs_looped, eps)
    low1, low2 = v1[v1 <= tau], v2[v2 <= tau]
    m1, m2 = int(low1.size), int(low2.size)
    dominance = m2 >= m1 and bool(np.all(low2[:m1] < low1))
    j = min(m1, m2)
    margin = float(np.min(np.log10(low1[:j] / low2[:j]))) if j else None
    return {
        "eps": eps,
        "tau": tau,
        "m_single": m1,
        "m_looped": m2,
        "dimension": m2 > m1,
        "dominance": dominance,
        "dominance_margin": margin,
        "holds": m2 > m1 and dominance,
    }


def cumulative_force(
    H_ref: torch.Tensor,
    H_later: list[torch.Tensor],
    theta_ref: torch.Tensor,
    theta_final: torch.Tensor,
    eps: float | None = None,
) -> dict:
    """Theorem 1's ``C`` from measured quantities, basis fixed at the reference Hessian ``H_ref``. Pass the
    ``eps`` shared with the model it is compared to (:func:`common_eps`); by default its own."""
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
