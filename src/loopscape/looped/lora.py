"""Per-loop LoRA: loop ``t`` of a shared linear layer runs ``W + B_t A_t`` (Relaxed Recursive Transformers,
Bae et al., 2025), ``B_t = 0`` at the start, so the looped model starts as the tied loop exactly."""

from __future__ import annotations

import torch
from torch import nn

from loopscape.looped.structure import linear_shape


class LoopLoRA(nn.Module):
    """Per-loop low-rank differences of one linear layer: loop ``t`` adds ``x A_t^T B_t^T`` to its output
    (``A`` as PEFT initialises LoRA's, ``B = 0``; scale 1)."""

    def __init__(self, n_loops: int, rank: int, fan_in: int, fan_out: int, like: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(torch.empty(n_loops, rank, fan_in, dtype=like.dtype, device=like.device))
        self.B = nn.Parameter(torch.zeros(n_loops, fan_out, rank, dtype=like.dtype, device=like.device))
        for a in self.A.data:
            nn.init.kaiming_uniform_(a, a=5**0.5)

    @property
    def n_loops(self) -> int:
        """The loops it was made for (loops past them run the shared weights)."""
        return self.A.shape[0]

    def delta(self, x: torch.Tensor, loop: int) -> torch.Tensor:
        return (x @ self.A[loop].T) @ self.B[loop].T

    def weights_per_loop(self) -> int:
        return self.A[0].numel() + self.B[0].numel()


def lora_targets(layers: list[nn.Module], start: int, names: list[str] | None):
    """(layer index, name, module) of the range's linear layers whose name is, or ends in, one of ``names``
    (all of them if None); a name that matches nothing is one line naming what there is."""
    found = [
        (start + i, name, m)
        for i, layer in enumerate(layers)
        for name, m in layer.named_modules()
        if linear_shape(m) is not None and (names is None or any(name == n or name.endswith("." + n) for n in names))
    ]
    if names is not None:
        missing = [n for n in names if not any(name == n or name.endswith("." + n) for _, name, _ in found)]
        if missing:
            there = sorted({name for name, m in layers[0].named_modules() if linear_shape(m) is not None})
            raise ValueError(
                f"lora_layers must name linear layers of the looped range (got {missing}; there are {there})"
            )
    return found
