"""Benchmark: causal attention kernels on the looped GPT's head shapes, forward
and backward, one thread.

Compares ``scaled_dot_product_attention`` on its default kernel (the CPU flash
kernel), on its math kernel, and attention written out (scores, causal mask,
softmax) at the shapes the looped block sees: the cpu-small block (4 heads of
8, rows of 12 tokens) and the paper's Parity block (64 heads of 4, 22 tokens),
for a few to all 64 rows of a batch (the rows still looping shrink step by
step). The backward gets a dense upstream gradient as in training: a
``y.sum().backward()`` hands bmm an expanded (stride-0) gradient that takes a
slow path and makes written-out attention look 2-3x slower than it is.

    python benchmarks/bench_attention.py
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def sdpa_default(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_math(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def written_out(q, k, v):
    W = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return (
        scores.masked_fill(torch.ones(W, W, dtype=torch.bool, device=q.device).triu(1), float("-inf")).softmax(-1) @ v
    )


KERNELS = {"sdpa_default": sdpa_default, "sdpa_math": sdpa_math, "written_out": written_out}


def time_ms(
    kernel, rows: int, width: int, heads: int, head_dim: int, device: torch.device, iters: int, repeats: int
) -> float:
    """Fastest mean time of forward + backward, from the block's fused qkv projection on."""
    qkv = torch.randn(rows, width, 3, heads, head_dim, device=device, requires_grad=True)
    grad = torch.randn(rows, heads, width, head_dim, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once():
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        kernel(q, k, v).backward(grad)

    for _ in range(5):
        once()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            once()
        sync()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    results = []
    for block, (heads, head_dim, width) in {"cpu-small": (4, 8, 12), "paper": (64, 4, 22)}.items():
        for rows in (1, 8, 32, 64):
            ms = {
                name: round(time_ms(k, rows, width, heads, head_dim, device, a.iters, a.repeats), 3)
                for name, k in KERNELS.items()
            }
            results.append(
                {"block": block, "heads": heads, "head_dim": head_dim, "width": width, "rows": rows, "ms_fwd_bwd": ms}
            )
            print(
                f"{block:9s} rows {rows:2d}: " + "  ".join(f"{name} {t:.3f} ms" for name, t in ms.items()), flush=True
            )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
