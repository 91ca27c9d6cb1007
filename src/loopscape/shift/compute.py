"""Compute accounting for SHIFT (Section 5, Figure 4).

Three measures, reported side by side:

* **Looped-Attn epochs saved** (the paper's measure): a run of ``E`` epochs that
  switches at epoch ``e`` trains ``E - e`` epochs as Looped-Attn, so its
  speed-up is ``E / (E - e)`` with Stage I counted as free
  (:func:`looped_epochs_speedup`; 600 / (600 - 124) = 1.26, Section 5).

* **FLOPs**, analytic: matrix products of the toy model's forward pass
  (2 FLOPs per multiply-add; element-wise work is left out), and a backward
  pass of twice the forward (each product's two input gradients cost one
  product each). Exact for the model's arithmetic, blind to overheads.
* **Wall time**: the measured training time of one epoch of each architecture
  (median over the study's single-model runs), so a schedule's time is the sum
  of its epochs' times. On the toy, per-step overhead dominates, which is why
  the two clocks disagree by a wide margin.

A schedule is the loop count of every epoch, ``loops[e]`` for ``e = 1..E``
(entry 0, the initial model, costs nothing).
"""

from __future__ import annotations

import math

import numpy as np


def looped_epochs_speedup(epochs: int, shift_epoch: int | None) -> float | None:
    """The paper's speed-up: Looped-Attn epochs of a full run over those after the switch, ``E / (E - e)``
    (Stage I free). ``None`` for a run that never switched (it is Single-Attn, not SHIFT) or switched at the end."""
    if shift_epoch is None or shift_epoch >= epochs:
        return None
    return epochs / (epochs - shift_epoch)


def attn_flops(m: int, n: int, d: int) -> int:
    """One ``f(E, Z)`` for one sample, ``Z`` with ``m`` rows: ``Z A``, ``(.) E^T``,
    ``(.) E`` and ``(.) W_V^T`` with ``A = W_Q^T W_K`` (a per-batch weight product)."""
    return 2 * m * d * d + 2 * m * d * n + 2 * m * n * d + 2 * m * d * d


def forward_flops(n: int, d: int, vocab_size: int, n_loops: int) -> int:
    """Forward FLOPs of Single-/Looped-Attn for one sample of ``n`` input tokens:
    ``T`` query updates, ``T - 1`` updates of ``E`` (``E_T`` is never read), the read-out."""
    T = n_loops
    return T * attn_flops(1, n, d) + (T - 1) * attn_flops(n, n, d) + 2 * d * vocab_size


def epoch_flops(n_train: int, batch_size: int, n: int, d: int, vocab_size: int, n_loops: int) -> int:
    """Training FLOPs of one epoch (forward + backward over every mini-batch)."""
    batches = math.ceil(n_train / batch_size)
    weight_products = (2 * n_loops - 1) * 2 * d**3  # W_Q^T W_K once per attention call and batch
    return 3 * (n_train * forward_flops(n, d, vocab_size, n_loops) + batches * weight_products)


def cumulative(loops: np.ndarray, cost: dict[int, float]) -> np.ndarray:
    """Cumulative cost after each epoch of schedules ``loops`` (``(..., E + 1)``),
    given the cost of one epoch at each loop count; entry 0 is 0."""
    per_epoch = np.vectorize(lambda t: float(cost[int(t)]))(loops[..., 1:])
    return np.concatenate([np.zeros(loops.shape[:-1] + (1,)), np.cumsum(per_epoch, axis=-1)], axis=-1)


def time_to_target(accuracy: np.ndarray, cum_cost: np.ndarray, target: float) -> tuple[int | None, float]:
    """First epoch at which ``accuracy >= target`` and the cumulative cost then
    (``(None, nan)`` if never)."""
    hit = np.flatnonzero(accuracy >= target)
    if hit.size == 0:
        return None, math.nan
    return int(hit[0]), float(cum_cost[hit[0]])
