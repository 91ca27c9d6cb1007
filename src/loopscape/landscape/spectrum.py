"""Matrix Entropy and Mutual Information of Hessian spectra (Section 4.1).

The paper writes

    E(H)           = - sum_i p(|lambda_i|) log p(|lambda_i|)
    I(H_s; H_s+1)  = sum_ij p(|lambda_i|_s, |lambda_j|_s+1) log [p(.,.) / (p(.) p(.))]

and states ``I(H_s; H_s+1) <= min(E(H_s), E(H_s+1))``, which holds for
discrete distributions on one discretisation. The reading taken
(``../shared/spec/paper-map.md``), the **histogram** variant, the default:

* ``p`` is the histogram of ``|lambda|`` over ``n_bins`` equal bins on
  ``[0, max |lambda|]``, the maximum taken over every spectrum compared (a
  pair in :func:`pair_metrics`, the whole run in :func:`trajectory_metrics`),
  so consecutive epochs share one binning;
* the joint ``p(., .)`` is the 2-D histogram of index-aligned pairs: the i-th
  largest ``|lambda|`` at epoch s with the i-th largest at s+1. Its marginals
  are the two 1-D histograms, hence the bound.

Entropies are in nats. The **normalised spectral** variant,
``p_i = |lambda_i| / sum_j |lambda_j|``, is :func:`spectral_entropy`.
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_BINS = 50


def _abs_sorted(eigs) -> np.ndarray:
    a = np.abs(np.asarray(eigs.detach().cpu() if torch.is_tensor(eigs) else eigs, dtype=np.float64))
    return np.sort(a)[::-1]


def shared_edges(*spectra, n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """Equal bins on ``[0, max |lambda|]`` over all given spectra."""
    top = max(float(_abs_sorted(s)[0]) for s in spectra)
    return np.linspace(0.0, top if top > 0 else 1.0, n_bins + 1)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def matrix_entropy(eigs, edges: np.ndarray | None = None, n_bins: int = DEFAULT_BINS) -> float:
    """``E(H)``: entropy of the histogram of ``|lambda|`` (bins ``edges``, or its own ``n_bins``)."""
    a = _abs_sorted(eigs)
    edges = shared_edges(a, n_bins=n_bins) if edges is None else edges
    counts, _ = np.histogram(a, bins=edges)
    return _entropy(counts / counts.sum())


def mutual_information(eigs_s, eigs_next, edges: np.ndarray | None = None, n_bins: int = DEFAULT_BINS) -> float:
    """``I(H_s; H_s+1)`` of index-aligned ``|lambda|`` pairs on a shared binning."""
    a, b = _abs_sorted(eigs_s), _abs_sorted(eigs_next)
    if a.shape != b.shape:
        raise ValueError(f"spectra must have the same size (got {a.size} and {b.size})")
    edges = shared_edges(a, b, n_bins=n_bins) if edges is None else edges
    joint, _, _ = np.histogram2d(a, b, bins=[edges, edges])
    joint /= joint.sum()
    return _entropy(joint.sum(1)) + _entropy(joint.sum(0)) - _entropy(joint.ravel())


def pair_metrics(eigs_s, eigs_next, n_bins: int = DEFAULT_BINS) -> dict[str, float]:
    """``E(H_s)``, ``E(H_s+1)`` and ``I(H_s; H_s+1)`` on the pair's shared binning."""
    edges = shared_edges(eigs_s, eigs_next, n_bins=n_bins)
    return {
        "entropy_s": matrix_entropy(eigs_s, edges),
        "entropy_next": matrix_entropy(eigs_next, edges),
        "mutual_information": mutual_information(eigs_s, eigs_next, edges),
    }


def spectral_entropy(eigs) -> float:
    """Normalised spectral entropy: ``p_i = |lambda_i| / sum_j |lambda_j|`` (named variant)."""
    a = _abs_sorted(eigs)
    total = a.sum()
    return _entropy(a / total) if total > 0 else 0.0


def trajectory_metrics(spectra: list, n_bins: int = DEFAULT_BINS) -> dict[str, np.ndarray]:
    """Matrix Entropy and Mutual Information along a run of spectra (Figures 3c, 3d).

    Every epoch is binned on one binning, ``n_bins`` equal bins on
    ``[0, max |lambda|]`` over the whole run: consecutive epochs share it, so
    every plotted pair satisfies ``I(H_s; H_s+1) <= min(E(H_s), E(H_s+1))``
    (with a binning per pair, ``E(H_s+1)`` as plotted would come from the
    next pair's binning and the bound could fail). ``entropy[s]`` is
    ``E(H_s)``; ``mutual_information[s]`` is ``I(H_s; H_s+1)``
    (``len(spectra) - 1`` values).
    """
    edges = shared_edges(*spectra, n_bins=n_bins)
    return {
        "entropy": np.array([matrix_entropy(s, edges) for s in spectra]),
        "mutual_information": np.array(
            [mutual_information(spectra[s], spectra[s + 1], edges) for s in range(len(spectra) - 1)]
        ),
        "spectral_entropy": np.array([spectral_entropy(s) for s in spectra]),
    }
