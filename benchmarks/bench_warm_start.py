"""Benchmark: top-5 Hessian eigenvalues tracked along a real training run, Lanczos started cold against
started from the previous measurement's Ritz vectors (``lanczos(..., start=...)``, a block start).

The looped GPT trains on Parity (the cpu-small model: d 32, one layer, the task's length curriculum and
per-row loop counts T(n)); every ``--every`` steps the Hessian of the loss on fixed probe rows over one
block of weights (``--params``) is measured three ways:

* exact: the dense Hessian's eigenvalues (float64), the reference;
* cold: Lanczos from a random vector, to a residual of ``--tol`` times the largest Ritz value;
* warm: block Lanczos from the previous measurement's top-5 Ritz vectors, to the same tolerance.

Reported per measurement: the products each needed (one per Krylov vector) and each one's largest
relative error against the exact top 5; then the totals and their ratio (the goal: warm needs at
least 3x fewer products at equal accuracy).

    python benchmarks/bench_warm_start.py                 # 600 steps, a measurement every 50
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from loopscape.data.algorithmic import AlgorithmicTask, Curriculum
from loopscape.landscape.hessian import HessianOperator
from loopscape.landscape.linalg import dense_matrix, lanczos
from loopscape.models.looped_gpt import LoopedGPT, LoopedGPTConfig
from loopscape.training.algorithmic import ScoredRows, scored_rows_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--params", default="model.layers.0.attn.proj.*")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    task = AlgorithmicTask("parity")
    model = LoopedGPT(LoopedGPTConfig(vocab_size=task.vocab_size, d_model=32, n_heads=4, n_layers=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    curriculum = Curriculum(10, 125)
    g = torch.Generator().manual_seed(args.seed)
    probe = task.batch(torch.randint(1, 11, (args.rows,), generator=torch.Generator().manual_seed(99)), g)
    targets = torch.where(probe.mask, probe.targets, -100)
    previous, totals = None, {"cold": 0, "warm": 0}
    print("| step | exact top 5 | cold products | cold max rel. error | warm products | warm max rel. error |")
    print("|---|---|---|---|---|---|")
    for step in range(1, args.steps + 1):
        b = task.batch(curriculum.lengths(step, 32, g), g)
        logits = model(b.inputs, b.n_loops)
        loss = F.cross_entropy(logits[b.mask], b.targets[b.mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.every:
            continue
        model.eval()
        H = HessianOperator(
            ScoredRows(model, probe.n_loops),
            [(probe.inputs, targets)],
            loss_fn=scored_rows_loss,
            dtype=torch.float64,
            params=args.params,
            cache_graph=True,
        )
        exact = torch.linalg.eigvalsh(dense_matrix(H)).flip(0)[:5]
        cold = lanczos(H, k=5, tol=args.tol, check_every=1, return_vectors=True)
        warm = cold if previous is None else lanczos(H, k=5, tol=args.tol, start=previous, return_vectors=True)
        previous = warm.eigenvectors
        model.train()
        err = {
            n: ((r.eigenvalues - exact).abs() / exact.abs()).max().item() for n, r in (("cold", cold), ("warm", warm))
        }
        if step > args.every:  # the first measurement has nothing to start from
            totals["cold"] += cold.iterations
            totals["warm"] += warm.iterations
        print(
            f"| {step} | {', '.join(f'{x:.4g}' for x in exact)} | {cold.iterations} | {err['cold']:.1e} | "
            f"{'-' if warm is cold else warm.iterations} | {err['warm']:.1e} |",
            flush=True,
        )
    print(
        f"\nFrom the second measurement on: cold {totals['cold']} products, warm {totals['warm']}, "
        f"ratio {totals['cold'] / max(totals['warm'], 1):.2f}x"
    )


if __name__ == "__main__":
    main()
