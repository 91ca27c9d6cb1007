"""One call for the common curvature questions about any model and any data.

    top_eigenvalues(model, data, k=5)         # the k largest Hessian eigenvalues (Lanczos)
    spectral_density(model, data)             # SLQ estimate of the eigenvalue density (top 20 deflated)
    hessian_trace(model, data)                # Hutch++ estimate of the trace

``data`` is any iterable of batches :class:`~loopscape.landscape.hessian.HessianOperator`
reads (a DataLoader of ``(inputs, targets)``, Hugging Face dict batches with
``labels``, ...), held fixed; ``params`` picks the parameters (a name pattern,
a module, a list), the rest held fixed. Everything is computed in float64 by
default, on the model's device, and leaves the model as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from loopscape.landscape.hessian import HessianOperator, as_batch_list
from loopscape.landscape.linalg import (
    LanczosResult,
    SpectralDensity,
    TraceEstimate,
    hutchpp_trace,
    lanczos,
    slq_density,
)


def hessian_operator(model: nn.Module, data, params=None, dtype: torch.dtype | None = torch.float64, **options):
    """The Hessian of ``model``'s loss over ``data`` as a linear operator (``options``: those of
    :class:`HessianOperator`, e.g. ``cache_graph=True``). ``data``: batches, or one batch."""
    return HessianOperator(model, as_batch_list(data), dtype=dtype, params=params, **options)


def top_eigenvalues(
    model: nn.Module,
    data,
    k: int = 5,
    params=None,
    eigenvectors: bool = False,
    tol: float = 1e-10,
    dtype: torch.dtype | None = torch.float64,
    block: int = 1,
    **options,
) -> torch.Tensor | LanczosResult:
    """The ``k`` largest eigenvalues, largest first (Lanczos with full re-orthogonalisation, to a
    residual of ``tol`` times the largest); with ``eigenvectors=True`` the whole
    :class:`LanczosResult` (Ritz vectors, residuals). ``block`` > 1: block Lanczos, each step one
    batched product of ``block`` columns (worth it where such a batch costs about one product)."""
    H = hessian_operator(model, data, params, dtype, **options)
    if not 1 <= k <= H.shape[0]:
        raise ValueError(f"k must be between 1 and the number of parameters selected ({H.shape[0]}) (got {k})")
    result = lanczos(H, k=k, which="LA", tol=tol, return_vectors=eigenvectors, block=block)
    return result if eigenvectors else result.eigenvalues


def spectral_density(
    model: nn.Module,
    data,
    params=None,
    n_probes: int = 10,
    n_steps: int = 64,
    seed: int = 0,
    deflate: int = 20,
    dtype: torch.dtype | None = torch.float64,
    **options,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature: ``n_probes`` Rademacher probes, ``n_steps`` Lanczos steps each,
    after the ``deflate`` largest eigenvalues are taken exactly (at most a quarter of the parameters;
    :func:`~loopscape.landscape.linalg.slq_density`)."""
    for name, value in (("n_probes", n_probes), ("n_steps", n_steps)):  # before the operator's forward passes
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
    H = hessian_operator(model, data, params, dtype, **options)
    deflate = min(deflate, H.shape[0] // 4)
    return slq_density(H, n_probes=n_probes, n_steps=min(n_steps, H.shape[0] - deflate), seed=seed, deflate=deflate)


def hessian_trace(
    model: nn.Module,
    data,
    params=None,
    n_matvecs: int = 60,
    seed: int = 0,
    dtype: torch.dtype | None = torch.float64,
    **options,
) -> TraceEstimate:
    """Hutch++ with ``n_matvecs`` products: the trace with its standard error."""
    return hutchpp_trace(hessian_operator(model, data, params, dtype, **options), n_matvecs=n_matvecs, seed=seed)
