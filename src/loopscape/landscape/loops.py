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

A model says which weights it loops by a ``looped_parameters()`` method (on itself or a submodule:
:class:`~loopscape.models.linear_attn.LinearAttn`, :class:`~loopscape.models.looped_gpt.LoopedGPT`,
a loopified model's :class:`~loopscape.integrations.loopify.LoopedRange`). Untying is generic: the modules
that own those weights are called once per loop, and at their ``t``-th call in a forward they run on copy
``t``. A model whose looped weights are read outside such calls (the linear-attention toys) provides
``untie_loops(weights)`` instead, a context in which loop ``t`` reads ``weights[t]``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from loopscape.landscape.hessian import HessianOperator, as_batch_list, select_parameters


def looped_parameter_names(model: nn.Module) -> list[str]:
    """Names (in ``model.named_parameters()``) of the weights ``model`` shares across its loops."""
    looped = {id(p) for m in model.modules() if hasattr(m, "looped_parameters") for p in m.looped_parameters()}
    return [n for n, p in model.named_parameters() if id(p) in looped]


class LoopHessian:
    """See the module docstring. Build with :func:`loop_hessian`."""

    def __init__(self, model: nn.Module, data, params=None, dtype: torch.dtype | None = torch.float64, **options):
        looped = looped_parameter_names(model)
        if not looped:
            raise ValueError(
                f"model must loop some of its weights (a looped_parameters() method: loopscape's looped models or "
                f"loopify); {type(model).__name__} has none"
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
        untie = next((m for m in model.modules() if hasattr(m, "untie_loops")), None)
        self._untie = untie.untie_loops if untie is not None else self._untie_by_calls
        self.n_loops = int(untie.n_loops) if untie is not None else self._count_loops()

    # -- the untied loss -------------------------------------------------------------------------------
    def _owners(self) -> list[tuple[nn.Module, str, int]]:
        """(module, its own name of the parameter, index in the selected names) of every selected weight."""
        index = {n: i for i, n in enumerate(self.names)}
        return [
            (m, local, index[f"{prefix}.{local}" if prefix else local])
            for prefix, m in self.model.named_modules()
            for local in list(m._parameters)
            if (f"{prefix}.{local}" if prefix else local) in index
        ]

    @contextlib.contextmanager
    def _untie_by_calls(self, weights: list[dict[str, torch.Tensor]]):
        """Loop ``t``'s call of each owning module runs on ``weights[t]`` (calls past ``len(weights)``: the last)."""
        owners, calls = self._owners(), {}
        by_module: dict[nn.Module, list[tuple[str, str]]] = {}
        for m, local, i in owners:
            by_module.setdefault(m, []).append((local, self.names[i]))

        def before(module, args):
            t = calls.get(module, 0)
            calls[module] = t + 1
            for local, name in by_module[module]:
                module._parameters[local] = weights[min(t, len(weights) - 1)][name]

        handles = [m.register_forward_pre_hook(before) for m in by_module]
        try:
            yield calls
        finally:
            for h in handles:
                h.remove()

    def _split(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, theta.split(self.op.sizes), self.op.shapes)}

    def _untied_loss(self, thetas: torch.Tensor) -> torch.Tensor:
        """``L(theta_1, ..., theta_T)`` for ``thetas`` of shape ``(T, P)``; each batch's forward counts its
        loops from the first."""
        weights, total = [self._split(t) for t in thetas], 0
        for batch in self.op.batches:
            with self._untie(weights):
                total = total + self.op._batch_loss(thetas[0], batch)
        return total

    def _count_loops(self) -> int:
        theta = self.op.theta
        with torch.no_grad(), self.op._guard(), self._untie([self._split(theta)]) as calls:
            self.op._batch_loss(theta, self.op.batches[0])
        counts = {m: calls.get(m, 0) for m, _, _ in self._owners()}
        if len(set(counts.values())) != 1 or min(counts.values()) < 1:
            raise ValueError(
                "model must call each module that owns a looped weight once per loop (found call counts "
                f"{sorted(set(counts.values()))}); loop_hessian cannot untie it"
            )
        return next(iter(counts.values()))

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
        V = V.to(device=self.device, dtype=self.dtype)
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
