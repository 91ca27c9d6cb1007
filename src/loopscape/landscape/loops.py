"""The Hessian of a looped model, split by loop pairs.

Weights ``theta`` shared by ``T`` loops are ``T`` copies tied together: with a separate copy ``theta_t``
at each loop, the loss is ``L(theta_1, ..., theta_T)`` and the tied Hessian is the sum of its blocks,

    H = sum_{s, t} H_st,    H_st = d^2 L / (d theta_s d theta_t)   at theta_1 = ... = theta_T = theta.

The diagonal blocks ``H_tt`` are what an unrolled, untied model sees; the cross-loop blocks (``s != t``)
are exactly what tying adds. :func:`loop_hessian` gives each block, their sums ``diagonal()`` and
``cross()``, and ``full()`` as operators on the interface of
:class:`~loopscape.landscape.hessian.HessianOperator` (``shape``, ``dtype``, ``matvec``, ``matmat``), so
Lanczos, SLQ and Hutch++ run on them; every product goes through an untied functional call of the model
(forward-over-reverse, one product per tangent), never a dense matrix.

The model is read through the loop protocol (:class:`~loopscape.looped.Looped`): its
``looped_parameters()`` are the weights split, ``untie_loops(weights)`` runs loop ``t`` on copy ``t``, and
``recording()`` counts the loops a forward runs. Loop 0 runs the model's own weights, which the functional
call sets to copy 0 (a loopified range's first loop is the model's own pass), so ``weights[0]`` is empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from loopscape.landscape.hessian import HessianOperator, as_batch_list, select_parameters
from loopscape.looped import Looped, find_looped


def looped_parameter_names(model: nn.Module, looped: Looped | None = None) -> list[str]:
    """Names (in ``model.named_parameters()``) of the weights the loop of ``model`` (``looped``, found if not
    given) shares."""
    looped = find_looped(model) if looped is None else looped
    shared = {id(p) for p in looped.looped_parameters()}
    return [n for n, p in model.named_parameters() if id(p) in shared]


class LoopHessian:
    """See the module docstring. Build with :func:`loop_hessian`."""

    def __init__(self, model: nn.Module, data, params=None, dtype: torch.dtype | None = torch.float64, **options):
        try:
            self.looped = find_looped(model)
        except ValueError:
            self.looped = None
        looped = looped_parameter_names(model, self.looped) if self.looped is not None else []
        if not looped:
            raise ValueError(
                f"model must loop some of its weights (the loop protocol's looped_parameters(): loopscape's looped "
                f"models or loopify); {type(model).__name__} has none"
            )
        named = dict(model.named_parameters())
        chosen = select_parameters(model, [named[n] for n in looped] if params is None else params)
        outside = [n for n in chosen if n not in looped]
        if outside:
            raise ValueError(
                f"params must select looped weights only ({len(outside)} selected outside the loop, e.g. "
                f"{outside[0]!r}; the looped ones are {looped[:3]}{'...' if len(looped) > 3 else ''})"
            )
        self.op = HessianOperator(model, as_batch_list(data), dtype=dtype, params=[named[n] for n in chosen], **options)
        self.model, self.names = model, self.op.names
        self.shape, self.dtype = self.op.shape, self.op.dtype
        position = {id(p): i for i, p in enumerate(self.looped.looped_parameters())}
        self._index = [position[id(named[n])] for n in self.names]  # each split weight's looped_parameters() slot
        self.n_loops = self._count_loops()

    # -- the untied loss -------------------------------------------------------------------------------
    def _split(self, theta: torch.Tensor) -> dict[int, torch.Tensor]:
        """Copy ``theta`` of the split weights, keyed by their slot in ``looped_parameters()``."""
        parts = zip(self._index, theta.split(self.op.sizes), self.op.shapes)
        return {i: t.view(shape) for i, t, shape in parts}

    def _untied_loss(self, thetas: torch.Tensor) -> torch.Tensor:
        """``L(theta_1, ..., theta_T)`` for ``thetas`` of shape ``(T, P)``: the model runs at ``theta_1``
        (loop 0's copy), loops ``t >= 1`` on their own."""
        weights, total = [{}] + [self._split(t) for t in thetas[1:]], 0
        for batch in self.op.batches:
            with self.looped.untie_loops(weights):
                total = total + self.op._batch_loss(thetas[0], batch)
        return total

    def _count_loops(self) -> int:
        """The loops one forward of the first batch runs (its recorded states)."""
        theta = self.op.theta
        with torch.no_grad(), self.op._guard(), self.looped.recording() as states:
            self.op._batch_loss(theta, self.op.batches[0])
            return len(states)

    def _products(self, tangents: torch.Tensor) -> torch.Tensor:
        """``(T, P)`` tangents ``U`` -> ``(T, P)``: row ``s`` is ``sum_t H_st U_t``."""
        thetas = self.op.theta.expand(self.n_loops, -1).clone()
        with self.op._guard():
            return jvp(grad(self._untied_loss), (thetas,), (tangents.to(thetas),))[1]

    # -- operators -----------------------------------------------------------------------------------------
    def block(self, s: int, t: int) -> LoopOperator:
        """``H_st`` (0-based loops): ``v`` in loop ``t``'s copy to the gradient change of loop ``s``'s."""
        for name, i in (("s", s), ("t", t)):
            if not (isinstance(i, int) and 0 <= i < self.n_loops):
                raise ValueError(f"{name} must be a loop index from 0 to {self.n_loops - 1} (got {i!r})")
        return LoopOperator(self, f"H_{s}{t}", lambda v: self._slot(v, [t])[s])

    def full(self) -> LoopOperator:
        """``sum_{s,t} H_st``: the tied Hessian over the same weights (equal to the plain operator's)."""
        return LoopOperator(self, "full", lambda v: self._slot(v, range(self.n_loops)).sum(0))

    def diagonal(self) -> LoopOperator:
        """``sum_t H_tt``: what an untied, unrolled model would see (``n_loops`` products per product)."""
        return LoopOperator(self, "diagonal", lambda v: sum(self._slot(v, [t])[t] for t in range(self.n_loops)))

    def cross(self) -> LoopOperator:
        """``sum_{s != t} H_st``: what tying the loops adds (``full - diagonal``)."""
        full, diagonal = self.full(), self.diagonal()
        return LoopOperator(self, "cross", lambda v: full.matvec(v) - diagonal.matvec(v))

    def measure(self, k: int = 5, exact: bool | None = None, tol: float = 1e-8, eps: float | None = None) -> dict:
        """One measurement: for ``full``, ``diagonal`` and ``cross``, the top-``k`` eigenvalues and the trace;
        the share of the trace and of the top eigenvalue that the cross-loop terms carry (the latter as
        ``u^T cross u / lambda_1`` with ``u`` the top eigenvector of ``full``); with the whole spectrum
        (``exact``: dense, the default up to 2,000 weights), the valley diagnostics (Definition 1) of each.
        Without it the traces are Hutch++ estimates (60 products each) and the diagnostics are left out.
        The valley threshold is ONE ``eps`` for every part (default ``EPS_REL`` times the tied Hessian's
        largest ``|lambda|``), so full and diagonal are compared on the same cut; ``eigenvalues`` keeps each
        part's spectrum for curves over ``eps``."""
        from loopscape.landscape.linalg import dense_matrix, hutchpp_trace, lanczos
        from loopscape.landscape.river_valley import EPS_REL, valley_diagnostics

        P = self.shape[0]
        exact = P <= 2000 if exact is None else exact
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= P:
            raise ValueError(f"k must be an integer between 1 and the number of weights split ({P}) (got {k!r})")
        parts = {"full": self.full(), "diagonal": self.diagonal(), "cross": self.cross()}
        out: dict = {"n_loops": self.n_loops, "params": P, "exact": exact}
        if exact:
            dense = {name: dense_matrix(parts[name]) for name in ("full", "diagonal")}
            dense["cross"] = dense["full"] - dense["diagonal"]
            spectra = {name: torch.linalg.eigh((H + H.T) / 2) for name, H in dense.items()}
            eps = EPS_REL * spectra["full"][0].abs().max().item() if eps is None else eps
            for name, H in dense.items():
                eigs, vecs = spectra[name]
                out[name] = {
                    "top": eigs.flip(0)[:k].tolist(),
                    "trace": torch.trace(H).item(),
                    "valley": valley_diagnostics(eigs, eps).as_dict(),
                    "eigenvalues": eigs.tolist(),
                }
                if name == "full":
                    u = vecs[:, -1]
            rayleigh = (u @ dense["cross"] @ u).item()
        else:
            for name, op in parts.items():
                result = lanczos(op, k=k, which="LA", tol=tol, return_vectors=name == "full")
                out[name] = {"top": result.eigenvalues.tolist(), "trace": hutchpp_trace(op).trace}
                if name == "full":
                    u = result.eigenvectors[:, 0]
            rayleigh = (u @ parts["cross"].matvec(u).double().cpu()).item()
        top = out["full"]["top"][0]
        out["cross_share_trace"] = out["cross"]["trace"] / out["full"]["trace"] if out["full"]["trace"] else None
        out["cross_share_top"] = rayleigh / top if top else None
        return out

    def _slot(self, v: torch.Tensor, loops) -> torch.Tensor:
        loops, zero = set(loops), torch.zeros_like(v)
        return self._products(torch.stack([v if t in loops else zero for t in range(self.n_loops)]))  # vmap-able


@dataclass
class LoopOperator:
    """One part of a :class:`LoopHessian` as a linear operator (``shape``, ``dtype``, ``matvec``, ``matmat``)."""

    parent: LoopHessian
    name: str
    _apply: object

    @property
    def shape(self) -> tuple[int, int]:
        return self.parent.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.parent.dtype

    @property
    def device(self) -> torch.device:
        return self.parent.op.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._apply(v.to(device=self.device, dtype=self.dtype)).detach()

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``V`` in chunks of columns that fit the operator's memory budget: each column of a loop part
        takes ``n_loops`` tangents at once (the Hessian operator's own chunk, divided by the loops)."""
        V = V.to(device=self.device, dtype=self.dtype)
        per = max(1, self.parent.op.columns_per_product() // self.parent.n_loops)
        return torch.cat([self._columns(chunk) for chunk in V.split(per, dim=1)], 1)

    def _columns(self, V: torch.Tensor) -> torch.Tensor:
        try:
            return vmap(self._apply, in_dims=1, out_dims=1)(V).detach()
        except RuntimeError:  # a model vmap cannot batch through: one column at a time
            return torch.stack([self.matvec(c) for c in V.T], 1)

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    def __repr__(self) -> str:
        return f"LoopOperator({self.name}, shape={self.shape}, n_loops={self.parent.n_loops})"


def loop_hessian(model: nn.Module, data, params=None, dtype: torch.dtype | None = torch.float64, **options):
    """The Hessian of ``model``'s loss over ``data`` split by loop pairs (module docstring). ``params``: the
    looped weights to untie (a name pattern, a module, a list; default every looped weight); ``options``:
    :class:`~loopscape.landscape.hessian.HessianOperator`'s."""
    return LoopHessian(model, data, params=params, dtype=dtype, **options)


def loop_coupling(lh: LoopHessian, k: int = 5, curves: bool = False) -> dict:
    """The one loop-coupling measurement, as the studies keep it: one exact :meth:`LoopHessian.measure` of
    the top ``k`` (at most the weights), its loops and weights, the cross-loop shares of the trace and of the
    top eigenvalue, kappa and the valley shape of the tied Hessian (full) and of its diagonal loop part at one
    eps, each part's top eigenvalues and trace; with ``curves``, kappa of full and diagonal over the eps grid
    relative to full's largest ``|lambda|`` and the smallest ``log10(kappa_full / kappa_diagonal)`` over it."""
    m = lh.measure(k=min(k, lh.shape[0]), exact=True)
    out = {
        "n_loops": lh.n_loops,
        "params": lh.shape[0],
        "cross_share_trace": m["cross_share_trace"],
        "cross_share_top": m["cross_share_top"],
        **{f"{part}_{key}": m[part]["valley"][key] for part in ("full", "diagonal") for key in ("kappa", "shape")},
        "top": {part: m[part]["top"] for part in ("full", "diagonal", "cross")},
        "trace": {part: m[part]["trace"] for part in ("full", "diagonal", "cross")},
    }
    return {**out, **kappa_curves(m)} if curves else out


def kappa_curves(m: dict) -> dict:
    """kappa over the eps grid of ``full`` and ``diagonal`` of one exact :meth:`LoopHessian.measure`, both
    relative to full's largest ``|lambda|``, and the smallest ``log10(kappa_full / kappa_diagonal)``."""
    from loopscape.landscape.river_valley import common_eps, kappa_curve

    ref = common_eps(m["full"]["eigenvalues"], rel=1.0)
    parts = {part: kappa_curve(m[part]["eigenvalues"], ref) for part in ("full", "diagonal")}
    ratios = [math.log10(f / d) for f, d in zip(parts["full"], parts["diagonal"]) if f is not None and d is not None]
    return {"kappa_curves": parts, "min_log10_ratio": min(ratios) if ratios else None}
