"""The Hessian of a model's loss over a fixed dataset, as a linear operator.

``HessianOperator(model, batches)`` represents ``H = d^2 L / d theta^2`` with

    L(theta) = sum_b sum_i w_bi * loss(model(x_bi; theta), y_bi),   sum w = 1,

where ``batches`` is any iterable (a DataLoader, a list) of ``(inputs, targets,
weights)``, ``(inputs, targets)`` (each sample weighted ``1/N``) or Hugging Face
dict batches (``input_ids``, ``attention_mask``, ``labels``), whose loss is the
model's own: next-token cross-entropy on ``labels`` shifted by one, positions
labelled ``-100`` left out, each scored token weighted ``1/(tokens scored in all
batches)``. A model may return a tensor or a ``ModelOutput`` (its ``logits``).
``params`` picks the variables (a name pattern, a module or a list of
parameters); the others are held fixed.

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
import fnmatch
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jacrev, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from loopscape.config import machine_memory
from loopscape.extras import require_extra
from loopscape.looped import get_n_loops, truncation

TRUNCATED = (
    "the model back-propagates through its last {k} of {n} loops only (backprop_loops={k}): this curvature is the "
    "truncated surrogate's (the blocks of the earlier loops are zero); loopscape.looped.set_backprop_loops(model, "
    "None) measures the loss itself"
)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs, targets, per-sample weights


# a batched product through the gradient's graph holds about this many copies of the forward's saved
# activations per column (an estimate, for sizing chunks: the double backward makes a gradient for each)
COLUMN_COPIES = 3
# a kept gradient graph holds the forward's saved activations and the backward's: about this many copies
GRAPH_COPIES = 2


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


def select_parameters(model: nn.Module, params=None) -> list[str]:
    """Names of the variables: ``None`` every parameter with ``requires_grad``; a name pattern
    (``fnmatch``, e.g. ``"model.layers.1.*"``); a module of ``model``; or a list of its parameters."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        chosen = [n for n, _ in named]
    elif isinstance(params, str):
        chosen = [n for n, _ in named if fnmatch.fnmatchcase(n, params)]
    elif isinstance(params, nn.Module):
        ids = {id(p) for p in params.parameters()}
        chosen = [n for n, p in named if id(p) in ids]
    else:
        ids = {id(p) for p in params}
        chosen = [n for n, p in named if id(p) in ids]
    if not chosen:
        frozen = _frozen_matches(model, params)
        if frozen:
            raise ValueError(
                f"params selects only frozen parameters (requires_grad=False), e.g. {frozen[0]!r}: unfreeze them "
                "(requires_grad_(True)) or select trainable ones"
            )
        raise ValueError(
            f"params must select at least one trainable parameter of the model: a name pattern, a module or a "
            f"list of parameters (got {params!r}, which matches none)"
        )
    return chosen


def _frozen_matches(model: nn.Module, params) -> list[str]:
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    if params is None:
        return [n for n, _ in frozen]
    if isinstance(params, str):
        return [n for n, _ in frozen if fnmatch.fnmatchcase(n, params)]
    ids = {id(p) for p in (params.parameters() if isinstance(params, nn.Module) else params)}
    return [n for n, p in frozen if id(p) in ids]


def _logits(out):
    """A model's output as logits: a tensor, or the ``logits`` of a ``ModelOutput`` / dict."""
    if isinstance(out, torch.Tensor):
        return out
    logits = out["logits"] if isinstance(out, Mapping) else getattr(out, "logits", None)
    if logits is None:
        raise ValueError(f"the model's output must be a tensor or carry logits (got {type(out).__name__})")
    return logits


def _global_count(n: int, distributed: bool) -> int:
    """``n`` summed over the ranks when the data is sharded across them."""
    if not distributed:
        return n
    t = torch.tensor([n], dtype=torch.float64)
    dist.all_reduce(t)
    return int(t.item())


def as_batch_list(data) -> list:
    """``data`` as a list of batches: one batch given bare (a dict, or an ``(inputs, targets[, weights])``
    tuple of tensors) is a list of one; any other iterable is read through."""
    if isinstance(data, Mapping):
        return [data]
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return [tuple(data)]
    return list(data)


def _read_batches(batches: Iterable, distributed: bool = False) -> list[tuple[str, object]]:
    """Each batch as ``("tuple", (x, y, w))`` or ``("dict", {...})``, with its weights set so the
    loss is the mean over every sample (tuples) or every scored token (dicts) of all batches (of
    all ranks, when ``distributed``)."""
    out = []
    for b in batches:
        if isinstance(b, Mapping):
            if "labels" not in b:
                raise ValueError("a dict batch must hold labels (with -100 where nothing is scored)")
            out.append(("dict", dict(b)))
        elif isinstance(b, (tuple, list)) and len(b) in (2, 3) and all(isinstance(t, torch.Tensor) for t in b):
            out.append(("tuple", tuple(b)))
        else:
            got = type(b).__name__
            if isinstance(b, (tuple, list)):
                got += f" of {len(b)} " + ", ".join(sorted({type(t).__name__ for t in b}))
            raise ValueError(
                "batches must be (inputs, targets), (inputs, targets, weights) or dict batches with labels "
                f"(got a {got})"
            )
    if not out:
        raise ValueError("batches must hold at least one batch (got none)")
    kinds = {k for k, _ in out}
    if len(kinds) > 1 or (kinds == {"tuple"} and len({len(b) for _, b in out}) > 1):
        raise ValueError("batches must be all of one form: (inputs, targets), (inputs, targets, weights) or dicts")
    if kinds == {"dict"}:
        tokens = _global_count(sum(int((b["labels"][..., 1:] != -100).sum()) for _, b in out), distributed)
        if tokens == 0:
            raise ValueError(
                "batches' labels must score at least one token: every label after the first position is -100"
            )
        return [("dict", {**b, "weight": torch.tensor(1.0 / tokens, dtype=torch.float64)}) for _, b in out]
    if len(out[0][1]) == 2:
        n = _global_count(sum(len(b[0]) for _, b in out), distributed)
        return [("tuple", (x, y, torch.full((len(x),), 1.0 / n, dtype=torch.float64))) for _, (x, y) in out]
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 100 * 2**20 else f"{n / 2**20:,.0f} MiB"


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    with sdpa_kernel(SDPBackend.MATH):
        yield


class HessianOperator:
    """``H`` of ``model``'s loss over ``batches`` at the model's current parameters.

    Args:
        model: any ``nn.Module``.
        batches: any iterable of batches (module docstring): ``(inputs, targets, weights)``
            triples, e.g. from :func:`weighted_batches` (the weights of all batches sum to 1),
            ``(inputs, targets)`` pairs, or Hugging Face dict batches with ``labels``.
        loss_fn: per-sample loss ``(outputs, targets) -> (B,)`` of tuple batches; cross-entropy by default.
        params: the variables (:func:`select_parameters`); ``None``: every trainable parameter.
        distributed: the batches are this rank's shard of the data (``torch.distributed``
            initialised; every rank builds the operator and calls each product together): sample
            and token counts, losses, gradients and products are summed over the ranks, so every
            rank holds the Hessian of the whole data.
        dtype: compute in this floating type (``torch.float64`` for exact spectra);
            ``None`` keeps the model's.
        allow_stochastic: skip the determinism check.
        chunk_size: columns per ``vmap`` call in :meth:`matmat`; ``None``: as many as
            ``memory_budget`` holds, by an estimate of one column's memory (the activations the
            loss's forward saves, times ``COLUMN_COPIES``).
        memory_budget: bytes one batched product may take; ``None``: half the free memory of a
            CUDA device, a quarter of this machine's memory otherwise.
        cache_graph: keep the gradient's autograd graph (all batches' activations)
            and answer :meth:`matvec` with one backward through it
            (reverse-over-reverse; :meth:`matmat` as one batched backward)
            instead of a fresh forward-over-reverse pass: faster per product
            (docs/curvature.md), at the memory of one training step over the
            whole dataset. Off by default; ``None`` keeps it when that memory and one product's
            (estimated from one recorded forward) fit in ``memory_budget``; batched products then
            share what the graph leaves of it.

    ``path`` says which way products are taken (kept graph or not, and why; the products' type);
    ``products`` counts the products taken so far (one per column), and ``on_products``, when
    set, is called with the number each call adds (a progress bar's update).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_per_sample,
        dtype: torch.dtype | None = None,
        allow_stochastic: bool = False,
        chunk_size: int | None = None,
        cache_graph: bool | None = False,
        params=None,
        distributed: bool = False,
        memory_budget: int | None = None,
    ):
        if distributed and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs an initialised torch.distributed process group")
        self.distributed = distributed
        self.model = model
        self.loss_fn = loss_fn
        k = truncation(model)
        if k is not None:
            warnings.warn(TRUNCATED.format(k=k, n=get_n_loops(model)), stacklevel=2)
        self.chunk_size, self.memory_budget = chunk_size, memory_budget
        self._columns = chunk_size  # columns per batched product, sized on first use when None
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch dtype or None (the model's) (got {dtype!r})")
        chosen = set(select_parameters(model, params))
        named = [(n, p) for n, p in model.named_parameters() if n in chosen]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        first = named[0][1]
        self.dtype = dtype or first.dtype
        self.device = first.device

        def cast(t):
            t = t.detach().to(self.device)
            return t.to(self.dtype) if t.is_floating_point() else t

        self.theta = torch.cat([cast(p).reshape(-1) for _, p in named])
        self.buffers = {n: cast(b) for n, b in model.named_buffers()}
        self.frozen = {n: cast(p) for n, p in model.named_parameters() if n not in chosen}
        self.batches = [
            (kind, {k: cast(t) for k, t in b.items()} if kind == "dict" else tuple(cast(t) for t in b))
            for kind, b in _read_batches(batches, distributed)
        ]
        self._no_cache = "use_cache" in inspect.signature(model.forward).parameters
        self.shape = (self.theta.numel(), self.theta.numel())
        self._graph = None
        self.products, self.on_products = 0, None
        self._saved: int | None = None
        cache_graph, self.path = self._choose_path(cache_graph)
        if params is not None:  # a selection that also matched frozen weights says it left them out
            left_out = set(_frozen_matches(model, params))
            frozen = sum(p.numel() for n, p in model.named_parameters() if n in left_out)
            self.path += f"; {frozen:,} frozen weights it matched left out" if frozen else ""
        with self._guard():  # one guard: the second pass below draws fresh random numbers
            if cache_graph:  # H v = the vjp of the gradient: the gradient's graph is recorded once, here
                with torch.enable_grad():
                    _, self._graph, a = vjp(grad_and_value(self._total_loss), self.theta, has_aux=True)
            else:
                a = self._total_loss(self.theta)
            total = self._summed(a.detach())  # every rank decides alike, or a refusing rank would hang the others
            if not torch.isfinite(total):
                raise NonFiniteLossError(
                    f"the loss is {total.item()} at these parameters: the model has diverged (NaN or inf), "
                    "so its Hessian means nothing; check the run's learning rate"
                )
            if not allow_stochastic:
                b = self._total_loss(self.theta)
                differs = self._summed(torch.tensor(float(not torch.equal(a.detach(), b)), dtype=torch.float64))
                if differs > 0:
                    raise StochasticLossError(
                        f"the loss differs between two evaluations ({a.item():.6g} vs {b.item():.6g}): "
                        "dropout or train-mode BatchNorm is active; call model.eval() or pass allow_stochastic=True"
                    )

    # -- functional core ----------------------------------------------------------------
    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = [t.view(s) for t, s in zip(theta.split(self.sizes), self.shapes)]
        return {**self.buffers, **self.frozen, **dict(zip(self.names, parts))}

    def _batch_loss(self, theta: torch.Tensor, batch: tuple[str, object]) -> torch.Tensor:
        kind, b = batch
        if kind == "tuple":
            x, y, w = b
            out = _logits(functional_call(self.model, self._params(theta), (x,)))
            return (self.loss_fn(out, y) * w).sum()
        inputs = {k: t for k, t in b.items() if k not in ("labels", "weight")}
        if self._no_cache:
            inputs["use_cache"] = False
        logits = _logits(functional_call(self.model, self._params(theta), (), inputs))[..., :-1, :]
        labels = b["labels"][..., 1:]  # next-token prediction: position t is scored on token t + 1
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
        return nll * b["weight"]

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        training = self.model.training
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), _math_attention():
            try:
                yield
            finally:
                self.model.train(training)

    def _summed(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (the operator's data is sharded), else as it is."""
        if self.distributed:
            t = t.detach().clone()
            dist.all_reduce(t)
        return t

    def _total_loss(self, theta: torch.Tensor) -> torch.Tensor:
        return sum(self._batch_loss(theta, b) for b in self.batches)

    def loss(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        theta = self.theta if theta is None else theta
        with self._guard():
            return self._summed(self._total_loss(theta))

    def _hvp(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(self.theta)
        for b in self.batches:

            def g(th, b=b):
                return grad(self._batch_loss)(th, b)

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

        with self._guard():
            thetas = thetas.to(self.theta)
            return vmap(jacrev(jacrev(self._total_loss)))(thetas), vmap(self._total_loss)(thetas)

    # -- linear-operator interface ------------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a vector of length ``P`` (any float dtype; returned in the operator's)."""
        self._count(1)
        if self._graph is not None:
            return self._summed(self._graph(v.to(self.theta))[0].detach())
        with self._guard():
            return self._summed(self._hvp(v.to(self.theta)))

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` for ``V`` of shape ``(P, k)``, by batched products (``vmap``) in chunks."""
        V = V.to(self.theta)
        self._count(V.shape[1])
        if self._graph is not None:  # one batched backward through the kept gradient graph
            cols = V.T.split(self.columns_per_product())
            return self._summed(torch.cat([vmap(self._graph)(c)[0] for c in cols]).T.detach())
        with self._guard():
            cols = V.T.split(self.columns_per_product())
            return self._summed(torch.cat([vmap(self._hvp)(c) for c in cols]).T)

    def columns_per_product(self) -> int:
        """Columns per batched product: ``chunk_size``, or what ``memory_budget`` holds."""
        if self._columns is None:
            saved = self._saved_bytes()
            budget = self._budget() - (GRAPH_COPIES * saved if self._graph is not None else 0)  # the kept graph's
            self._columns = max(1, int(budget // (COLUMN_COPIES * saved)))
        return self._columns

    def _budget(self) -> int:
        """``memory_budget``, or half the free memory of a CUDA device, a quarter of this machine's."""
        if self.memory_budget is not None:
            return self.memory_budget
        cuda = self.device.type == "cuda"
        return torch.cuda.mem_get_info(self.device)[0] // 2 if cuda else machine_memory() // 4

    def _choose_path(self, cache_graph: bool | None) -> tuple[bool, str]:
        """Whether to keep the gradient's graph (``None``: if it fits the budget), and a line saying so."""
        why = ""
        if cache_graph is None:
            # the kept graph, and one product's backward through it
            need, budget = (GRAPH_COPIES + COLUMN_COPIES) * self._saved_bytes(), self._budget()
            cache_graph = need <= budget
            why = f" (graph and a product: about {_mib(need)}, budget {_mib(budget)})"
        how = (
            "one backward per product through the kept gradient graph"
            if cache_graph
            else "a forward-over-reverse pass per product"
        )
        return cache_graph, f"{how}{why}, {str(self.dtype).removeprefix('torch.')} products"

    def _count(self, columns: int) -> None:
        self.products += columns
        if self.on_products is not None:
            self.on_products(columns)

    def _saved_bytes(self) -> int:
        """Bytes the loss's forward saves for its backward (activations, mostly), by one recorded forward."""
        if self._saved is not None:
            return self._saved
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        leaf = self.theta.detach().requires_grad_(True)
        with self._guard(), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self._total_loss(leaf)
        self._saved = max(saved, 1)
        return self._saved

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    def to_scipy(self):
        """``H`` as a ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out), for scipy's
        ``eigsh`` and friends."""
        LinearOperator = require_extra("scipy.sparse.linalg", "curvature").LinearOperator

        def mv(v):
            return self.matvec(torch.as_tensor(v.reshape(-1))).double().cpu().numpy()

        def mm(V):
            return self.matmat(torch.as_tensor(V)).double().cpu().numpy()

        return LinearOperator(self.shape, matvec=mv, matmat=mm, rmatvec=mv, rmatmat=mm, dtype="float64")
