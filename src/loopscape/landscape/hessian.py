"""The Hessian of a model's loss over a fixed dataset, as a linear operator.

``HessianOperator(model, batches)`` represents ``H = d^2 L / d theta^2`` with

    L(theta) = sum_b sum_i w_bi * loss(model(x_bi; theta), y_bi),   sum w = 1,

through Hessian-vector products (forward-over-reverse, ``torch.func.jvp`` of
``torch.func.grad``) and batched products (``torch.func.vmap``). Algorithms
(``loopscape.landscape.linalg``) see only ``shape``, ``dtype``, ``matvec`` and
``matmat``, never the model.

The functional core (``torch.func.functional_call``) works on a detached copy
of the parameters: it never reads or writes ``.grad``, leaves
``model.training`` and the global RNG state as it found them, and runs
scaled-dot-product attention on its math kernel (the fused kernels have no
double backward). A Hessian of a stochastic loss is noise, so the operator
evaluates the loss twice at construction and refuses (``StochasticLossError``)
if the two differ, as with active dropout or train-mode BatchNorm, unless
``allow_stochastic=True``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs, targets, per-sample weights


class StochasticLossError(RuntimeError):
    """The loss differs between two evaluations at the same parameters."""


class NonFiniteLossError(StochasticLossError):
    """The loss is NaN or infinite at the operator's parameters (a diverged model, not a random loss)."""


def cross_entropy_per_sample(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def weighted_batches(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int | None = None,
    dedupe: str | None = None,
    num_classes: int | None = None,
) -> list[Batch]:
    """Split a dataset into batches with weights ``1/N`` per sample, so the
    operator's loss is the dataset mean whatever the batch sizes.

    ``dedupe`` merges repeated samples into one, weighted by its count (the
    same loss and Hessian up to rounding, from fewer products):

    * ``"pairs"``: repeated ``(input, target)`` pairs; right for any loss.
    * ``"inputs"``: repeated inputs, their class-index targets replaced by the
      class frequencies among them (soft labels). Right for cross-entropy,
      which is linear in the target distribution; ``F.cross_entropy`` takes
      such targets as they are. The Markov training set has 500 sequences,
      at most 81 distinct ones and 27 distinct inputs.
    """
    n = inputs.shape[0]
    weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    if dedupe not in (None, "pairs", "inputs"):
        raise ValueError(f"dedupe must be None, 'pairs' or 'inputs' (got {dedupe!r})")
    if dedupe == "inputs" and (targets.is_floating_point() or targets.dim() != 1):
        raise ValueError("dedupe='inputs' needs class-index targets of shape (N,)")
    if dedupe:
        key = inputs.reshape(n, -1)
        if dedupe == "pairs":
            key = torch.cat([key, targets.reshape(n, -1).to(key.dtype)], dim=1)
        uniq, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
        first = torch.full((len(uniq),), n, dtype=torch.long).scatter_reduce(0, inverse, torch.arange(n), "amin")
        if dedupe == "inputs":
            k = num_classes or int(targets.max()) + 1
            freq = torch.zeros(len(uniq), k, dtype=torch.float64).index_put_(
                (inverse, targets), torch.ones(n, dtype=torch.float64), accumulate=True
            )
            targets = freq / counts[:, None]
        else:
            targets = targets[first]
        inputs, weights = inputs[first], counts.double() / n
    size = batch_size or inputs.shape[0]
    return [(x, y, w) for x, y, w in zip(inputs.split(size), targets.split(size), weights.split(size))]


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    with sdpa_kernel(SDPBackend.MATH):
        yield


class HessianOperator:
    """``H`` of ``model``'s loss over ``batches`` at the model's current parameters.

    Args:
        model: any ``nn.Module``; its parameters with ``requires_grad`` are the variables.
        batches: ``(inputs, targets, weights)`` triples, e.g. from :func:`weighted_batches`;
            the weights of all batches sum to 1.
        loss_fn: per-sample loss ``(outputs, targets) -> (B,)``; cross-entropy by default.
        dtype: compute in this floating type (``torch.float64`` for exact spectra);
            ``None`` keeps the model's.
        allow_stochastic: skip the determinism check.
        chunk_size: columns per ``vmap`` call in :meth:`matmat` (memory bound).
        cache_graph: keep the gradient's autograd graph (all batches' activations)
            and answer :meth:`matvec` with one backward through it
            (reverse-over-reverse; :meth:`matmat` as one batched backward)
            instead of a fresh forward-over-reverse pass: faster per product
            (docs/curvature.md), at the memory of one training step over the
            whole dataset. Off by default.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Batch],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_per_sample,
        dtype: torch.dtype | None = None,
        allow_stochastic: bool = False,
        chunk_size: int | None = 256,
        cache_graph: bool = False,
    ):
        self.model = model
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        first = named[0][1]
        self.dtype = dtype or first.dtype
        self.device = first.device

        def cast(t):
            return t.detach().to(self.dtype) if t.is_floating_point() else t.detach()

        self.theta = torch.cat([cast(p).reshape(-1) for _, p in named])
        self.buffers = {n: cast(b) for n, b in model.named_buffers()}
        self.frozen = {n: cast(p) for n, p in model.named_parameters() if not p.requires_grad}
        self.batches = [tuple(cast(t).to(self.device) for t in b) for b in batches]
        self.shape = (self.theta.numel(), self.theta.numel())
        self._graph = None
        with self._guard():  # one guard: the second pass below draws fresh random numbers
            if cache_graph:
                leaf = self.theta.clone().requires_grad_(True)
                with torch.enable_grad():
                    a = sum(self._batch_loss(leaf, *b) for b in self.batches)
                    self._graph = (leaf, torch.autograd.grad(a, leaf, create_graph=True)[0])
            else:
                a = sum(self._batch_loss(self.theta, *b) for b in self.batches)
            if not torch.isfinite(a):
                raise NonFiniteLossError(
                    f"the loss is {a.item()} at these parameters: the model has diverged (NaN or inf), "
                    "so its Hessian means nothing; check the run's learning rate"
                )
            if not allow_stochastic:
                b = sum(self._batch_loss(self.theta, *bt) for bt in self.batches)
                if not torch.equal(a.detach(), b):
                    raise StochasticLossError(
                        f"the loss differs between two evaluations ({a.item():.6g} vs {b.item():.6g}): "
                        "dropout or train-mode BatchNorm is active; call model.eval() or pass allow_stochastic=True"
                    )

    # -- functional core ----------------------------------------------------------------
    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = [t.view(s) for t, s in zip(theta.split(self.sizes), self.shapes)]
        return {**self.buffers, **self.frozen, **dict(zip(self.names, parts))}

    def _batch_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, self._params(theta), (x,))
        return (self.loss_fn(out, y) * w).sum()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        training = self.model.training
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), _math_attention():
            try:
                yield
            finally:
                self.model.train(training)

    def loss(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        theta = self.theta if theta is None else theta
        with self._guard():
            return sum(self._batch_loss(theta, *b) for b in self.batches)

    def gradient(self) -> torch.Tensor:
        with self._guard():
            return sum(grad(self._batch_loss)(self.theta, *b) for b in self.batches)

    def _hvp(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(self.theta)
        for b in self.batches:

            def g(th, b=b):
                return grad(self._batch_loss)(th, *b)

            out = out + jvp(g, (self.theta,), (v,))[1]
        return out

    def dense_at(self, thetas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(H(theta_e), L(theta_e))`` for a stack of ``E`` parameter vectors ``(E, P)``:
        dense Hessians ``(E, P, P)`` and losses ``(E,)``, in one vectorised call
        (``vmap`` of ``jacrev(jacrev(L))``). For a small model, where each product
        is dominated by per-operation overhead, the stack shares that overhead
        (Single-Attn: 1.6x cheaper per Hessian at ten than one at a time,
        ``benchmarks/bench_hessian.py``); :class:`~loopscape.landscape.tracking.HessianTracker`
        stacks epochs this way.
        """

        def loss(th):
            return sum(self._batch_loss(th, *b) for b in self.batches)

        with self._guard():
            thetas = thetas.to(self.theta)
            return vmap(jacrev(jacrev(loss)))(thetas), vmap(loss)(thetas)

    # -- linear-operator interface ------------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a vector of length ``P`` (any float dtype; returned in the operator's)."""
        if self._graph is not None:
            leaf, g = self._graph
            return torch.autograd.grad(g, leaf, v.to(self.theta), retain_graph=True)[0].detach()
        with self._guard():
            return self._hvp(v.to(self.theta))

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` for ``V`` of shape ``(P, k)``, by batched products (``vmap``) in chunks."""
        V = V.to(self.theta)
        if self._graph is not None:  # one batched backward through the kept gradient graph
            leaf, g = self._graph
            cols = V.T.split(self.chunk_size or V.shape[1])
            return torch.cat(
                [torch.autograd.grad(g, leaf, c, retain_graph=True, is_grads_batched=True)[0] for c in cols]
            ).T.detach()
        with self._guard():
            cols = V.T.split(self.chunk_size or V.shape[1])
            return torch.cat([vmap(self._hvp)(c) for c in cols]).T

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)
