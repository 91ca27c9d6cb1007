"""Gradient alignment between two architectures at shared parameters (Theorem 3, Appendix G).

Theorem 3 ("shared river upstream") states that at the same parameters the
gradients of Single-Attn's and Looped-Attn's losses with respect to ``W_K``
and ``W_Q`` have a non-negative inner product. :func:`gradient_alignment`
measures it for any two models that share parameter names (the toys here,
the looped GPTs of Appendix E.2 too): both are called functionally on one
parameter dict, so nothing is copied and no ``.grad`` is touched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad


def gradient_alignment(
    model_1: nn.Module,
    model_2: nn.Module,
    params: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    names: Sequence[str] = ("W_K", "W_Q"),
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> dict[str, dict[str, float]]:
    """``<grad_name L_1, grad_name L_2>`` and their cosine, for each parameter in ``names``."""
    buffers = {n: b for n, b in model_1.named_buffers()}

    def loss(model: nn.Module) -> Callable:
        return lambda p: loss_fn(functional_call(model, {**buffers, **p}, (inputs,)), targets)

    p = {n: t.detach() for n, t in params.items()}
    g1, g2 = grad(loss(model_1))(p), grad(loss(model_2))(p)
    out = {}
    for n in names:
        a, b = g1[n].reshape(-1), g2[n].reshape(-1)
        inner = (a @ b).item()
        denom = (a.norm() * b.norm()).item()
        out[n] = {"inner": inner, "cosine": inner / denom if denom > 0 else 0.0}
    return out


def meets_assumption4(W: torch.Tensor, ratio: float = 0.5) -> bool:
    """Assumption 4 (Appendix G.1.1), read as: ``W = D + eps`` with a non-negative
    diagonal ``D`` and ``||eps||_2 <= ratio * ||D||_2`` ("significantly smaller";
    the paper gives no number, 0.5 is ours)."""
    D = torch.diagonal(W)
    if (D < 0).any():
        return False
    eps = W - torch.diag(D)
    return torch.linalg.matrix_norm(eps, ord=2).item() <= ratio * D.abs().max().item()
