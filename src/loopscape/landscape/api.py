"""One call for the common curvature questions about any model and any data.

    top_eigenvalues(model, data, k=5)         # the k largest Hessian eigenvalues (Lanczos)
    spectral_density(model, data)             # SLQ estimate of the eigenvalue density (top 20 deflated)
    hessian_trace(model, data)                # Hutch++ estimate of the trace

``data`` is any iterable of batches :class:`~loopscape.landscape.hessian.HessianOperator`
reads (a DataLoader of ``(inputs, targets)``, Hugging Face dict batches with
``labels``, ...), held fixed; ``params`` picks the parameters (a name pattern,
a module, a list), the rest held fixed. On the model's device, leaving the model
as it was.

The defaults take the fast path where it fits: products in the model's precision
(``dtype=None``, at least float32; Krylov arithmetic is float64 whatever it is) through the kept
gradient graph when its memory fits the operator's budget (``cache_graph=None``).
``dtype=torch.float64`` (with a tight ``tol``) gives exact-arithmetic answers on small
models. Each call logs the path it took (logger ``loopscape.landscape``) and, with
``verbose`` (default: when standard error is a terminal), prints it and shows the
products done on a progress bar.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
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

log = logging.getLogger("loopscape.landscape")


def hessian_operator(
    model: nn.Module, data, params=None, dtype: torch.dtype | None = None, cache_graph: bool | None = None, **options
) -> HessianOperator:
    """The Hessian of ``model``'s loss over ``data`` as a linear operator (``options``: those of
    :class:`HessianOperator`). ``data``: batches, or one batch. ``dtype=None``: the model's precision, at
    least float32 (a bfloat16 product is good to 1e-2 or so); ``cache_graph=None``: keep the gradient graph if
    it fits (``H.path`` says which)."""
    if dtype is None:
        first = next((p for p in model.parameters() if p.is_floating_point()), None)
        if first is not None and first.dtype.itemsize < 4:
            dtype = torch.float32
    return HessianOperator(model, as_batch_list(data), dtype=dtype, params=params, cache_graph=cache_graph, **options)


@contextlib.contextmanager
def _reported(H: HessianOperator, what: str, verbose: bool | None) -> Iterator[None]:
    """Say which path ``H`` takes, and show its products on a progress bar while the block runs."""
    line = f"{what}: {H.shape[0]:,} parameters, {H.path}"
    log.info(line)
    if verbose is None:
        verbose = sys.stderr is not None and sys.stderr.isatty()
    if not verbose:
        yield
        return
    console = Console(stderr=True)
    console.print(line, highlight=False, soft_wrap=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}: {task.completed:,.0f} products"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(what, total=None)
        H.on_products = lambda n: bar.advance(task, n)
        try:
            yield
        finally:
            H.on_products = None


def top_eigenvalues(
    model: nn.Module,
    data,
    k: int = 5,
    params=None,
    eigenvectors: bool = False,
    tol: float = 1e-5,
    dtype: torch.dtype | None = None,
    block: int = 1,
    cache_graph: bool | None = None,
    verbose: bool | None = None,
    **options,
) -> torch.Tensor | LanczosResult:
    """The ``k`` largest eigenvalues, largest first, by Lanczos with full re-orthogonalisation, to a
    residual of ``tol`` times the largest (:func:`~loopscape.landscape.linalg.lanczos`). The default 1e-5 is
    about what float32 products resolve. ``eigenvectors=True``: the whole
    :class:`LanczosResult` (Ritz vectors, residuals, ``iterations``: the products). ``block`` > 1: block
    Lanczos, each step one batched product of ``block`` columns (worth it where such a batch costs
    about one product)."""
    H = hessian_operator(model, data, params, dtype, cache_graph, **options)
    if not 1 <= k <= H.shape[0]:
        raise ValueError(f"k must be between 1 and the number of parameters selected ({H.shape[0]}) (got {k})")
    with _reported(H, "top_eigenvalues", verbose):
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
    dtype: torch.dtype | None = None,
    cache_graph: bool | None = None,
    verbose: bool | None = None,
    **options,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature: ``n_probes`` Rademacher probes, ``n_steps`` Lanczos steps each,
    after the ``deflate`` largest eigenvalues are taken exactly (at most a quarter of the parameters;
    :func:`~loopscape.landscape.linalg.slq_density`)."""
    for name, value in (("n_probes", n_probes), ("n_steps", n_steps)):  # before the operator's forward passes
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
    H = hessian_operator(model, data, params, dtype, cache_graph, **options)
    deflate = min(deflate, H.shape[0] // 4)
    with _reported(H, "spectral_density", verbose):
        return slq_density(H, n_probes=n_probes, n_steps=min(n_steps, H.shape[0] - deflate), seed=seed, deflate=deflate)


def hessian_trace(
    model: nn.Module,
    data,
    params=None,
    n_matvecs: int = 60,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    cache_graph: bool | None = None,
    verbose: bool | None = None,
    **options,
) -> TraceEstimate:
    """Hutch++ with ``n_matvecs`` products: the trace with its standard error."""
    H = hessian_operator(model, data, params, dtype, cache_graph, **options)
    with _reported(H, "hessian_trace", verbose):
        return hutchpp_trace(H, n_matvecs=n_matvecs, seed=seed)
