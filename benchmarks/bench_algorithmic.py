"""Benchmark: training throughput and peak memory of the looped GPT, ours vs a
straightforward eager implementation of the same model.

All sides train the same parameters (one initialisation) with AdamW on Parity
batches from the end of the curriculum (lengths 1..n, T(n) = n):

* ``eager``: the way research code is usually written. Each row is built in
  Python from lists (``random`` bits, padding by hand); the whole batch runs
  through the block for ``horizon`` steps, the logits of every step are kept
  and each row's are read at its own T(n); attention is written out (scores,
  causal mask, softmax); plain ``torch.optim.AdamW``. Two horizons:

  - ``eager-tight``: the batch's largest T(n), the least work such a loop can do;
  - ``eager-authors``: the fixed horizon of the authors' training loop
    (``looped-tf``'s ``train.py`` runs ``curriculum.n_points + 2`` steps, where
    training lengths are ``1..n_points - 1``: the longest length + 3).

* ``ours``: :class:`AlgorithmicTask` batches generated as tensors, and the
  trainer's own step (:func:`loopscape.training.algorithmic.train_step`,
  :func:`make_optimizer`): :class:`LoopedGPT` sorts rows by T(n) and runs each
  step only on the rows still going, with ``scaled_dot_product_attention``.

Each side runs in a fresh process, the sides interleaved for ``--rounds``
rounds: samples per second over the timed steps (the fastest of ``--repeats``
timed blocks and of the rounds, against machine noise; the speed-up of every
round is printed too); activation memory (every tensor storage autograd keeps for the backward
of a step, counted once, mean over 5 steps: the part of memory that the loop
changes); on CUDA the peak of ``max_memory_allocated``; and the training FLOPs
of a step (forward + 2x for the backward, :func:`step_flops`), so the
``work ratio`` says how much of a speed-up skipping finished rows can give at
all, and ``speedup / work ratio`` how fast each FLOP runs. Goal: >= 2x samples/s on CPU.

    python benchmarks/bench_algorithmic.py                 # cpu-small Parity block (d = 32)
    python benchmarks/bench_algorithmic.py --preset paper  # d = 256, 1 layer, 64 heads (GPU: run there)
    python benchmarks/bench_algorithmic.py --fixed-cost    # our step at 1-128 rows: cost per block step,
                                                           # fixed and per row
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from bench_attention import written_out


def eager_batch(rng: random.Random, batch: int, n_max: int, vocab: dict[str, int]):
    """Rows built one by one in Python, then padded by hand."""
    rows, targets, masks, steps = [], [], [], []
    for _ in range(batch):
        n = rng.randint(1, n_max)
        bits = [rng.randint(0, 1) for _ in range(n)]
        answer = [sum(bits) % 2]
        inp = bits + [vocab["="]] + [vocab["<pad>"]] * len(answer)
        tgt = [vocab["<pad>"]] * n + answer + [vocab["<pad>"]]
        rows.append(inp), targets.append(tgt), masks.append([0] * n + [1] * (len(answer) + 1)), steps.append(n)
    width = max(len(r) for r in rows)

    def pad(r, v):
        return r + [v] * (width - len(r))

    return (
        torch.tensor([pad(r, vocab["<pad>"]) for r in rows]),
        torch.tensor([pad(t, vocab["<pad>"]) for t in targets]),
        torch.tensor([pad(m, 1) for m in masks], dtype=torch.bool),
        torch.tensor(steps),
    )


def eager_forward(model, x: torch.Tensor, steps: torch.Tensor, horizon: int) -> torch.Tensor:
    """The same model: every row runs ``horizon`` steps, each row read at its own step."""
    e = model.embed(x)
    h = torch.zeros_like(e)
    outs = []
    for _ in range(horizon):
        z = h + e
        for layer in model.layers:
            a = layer.ln_1(z)
            B, W, d = a.shape
            nh = layer.attn.n_heads
            q, k, v = layer.attn.qkv(a).split(d, dim=-1)
            q, k, v = (t.view(B, W, nh, d // nh).transpose(1, 2) for t in (q, k, v))
            z = z + layer.attn.proj(written_out(q, k, v).transpose(1, 2).reshape(B, W, d))
            z = z + layer.mlp(layer.ln_2(z))
        h = model.ln_f(z)
        outs.append(model.head(h))
    every = torch.stack(outs, dim=1)  # (B, horizon, W, V)
    return every[torch.arange(len(steps)), steps - 1]


def _setup(side: str, args: dict):
    """Parity, the model (one initialisation for every side) and the side's optimiser."""
    from loopscape.data.algorithmic import AlgorithmicTask
    from loopscape.models.looped_gpt import looped_gpt
    from loopscape.training.algorithmic import AlgorithmicTrainConfig, make_optimizer

    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    task = AlgorithmicTask("parity")
    torch.manual_seed(0)
    model = looped_gpt(task.vocab_size, d_model=args["d_model"], n_heads=args["n_heads"], n_layers=args["n_layers"]).to(
        device
    )
    config = AlgorithmicTrainConfig(lr=1e-4)
    opt = (
        make_optimizer(model, config)
        if side == "ours"
        else torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    )
    return task, model, config, opt, device


def _time_steps(one_step, args: dict, device: torch.device) -> float:
    """Seconds per step: the fastest of ``repeats`` blocks of ``steps`` steps (warm up first)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(args["repeats"]):
        sync()
        t0 = time.perf_counter()
        for _ in range(args["steps"]):
            one_step()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best / args["steps"]


def fixed_cost(args: dict, rows=(1, 4, 16, 64, 128)) -> dict:
    """Our step on batches of ``rows`` rows, all at the longest length n (n block steps
    each): the line through (rows, time per step) splits a block step's cost into a
    part paid whatever the rows (intercept / n; optimiser and loss included) and a
    part per row (slope / n)."""
    from loopscape.training.algorithmic import train_step

    task, model, config, opt, device = _setup("ours", args)
    gen = torch.Generator(device=device).manual_seed(0)

    def ms_at(B: int) -> float:
        b = task.batch(torch.full((B,), args["n"], device=device), gen)

        def one_step():
            return train_step(model, opt, b, b.n_loops, config)

        for _ in range(args["warmup"]):
            one_step()
        return 1e3 * _time_steps(one_step, args, device)

    ms = [ms_at(B) for B in rows]
    slope, intercept = np.polyfit(rows, ms, 1)
    return {
        "rows": list(rows),
        "ms_per_step": [round(t, 2) for t in ms],
        "block_steps": args["n"],
        "fixed_ms_per_block_step": round(intercept / args["n"], 3),
        "ms_per_row_block_step": round(slope / args["n"], 4),
    }


def _worker(side: str, args: dict, queue) -> None:
    from loopscape.data.algorithmic import AlgorithmicBatch
    from loopscape.training.algorithmic import step_flops, train_step

    task, model, config, opt, device = _setup(side, args)
    vocab = {s: i for i, s in enumerate(task.vocab)}
    rng, gen = random.Random(0), torch.Generator(device=device).manual_seed(0)
    flops: list[float] = []

    def eager_step() -> None:
        x, y, m, st = (t.to(device) for t in eager_batch(rng, args["batch"], args["n"], vocab))
        horizon = int(st.max()) if side == "eager-tight" else args["n"] + 3
        logits = eager_forward(model, x, st, horizon)
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        loss = (nll * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # every row runs `horizon` block steps with a read-out after each: horizon one-step batches
        flops.append(horizon * step_flops(model.config, AlgorithmicBatch(x, y, m, st, st), torch.ones_like(st)))

    def ours_step() -> None:
        b = task.batch(torch.randint(1, args["n"] + 1, (args["batch"],), generator=gen, device=device), gen)
        train_step(model, opt, b, b.n_loops, config)
        flops.append(step_flops(model.config, b, b.n_loops))

    one_step = ours_step if side == "ours" else eager_step

    def activation_mib() -> float:
        saved: dict[int, int] = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            one_step()
        return sum(saved.values()) / 2**20

    for _ in range(args["warmup"]):
        one_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    flops.clear()
    s_per_step = _time_steps(one_step, args, device)
    out = {
        "samples_per_s": args["batch"] / s_per_step,
        "s_per_step": s_per_step,
        "gflop_per_step": sum(flops) / len(flops) / 1e9,
    }
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    out["activations_mib"] = sum(activation_mib() for _ in range(5)) / 5
    queue.put(out)


def run_side(side: str, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(side, args, q))
    p.start()
    out = q.get()
    p.join()
    return out


SIDES = ("eager-tight", "eager-authors", "ours")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=("cpu-small", "paper"), default="cpu-small")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per block")
    ap.add_argument("--repeats", type=int, default=None, help="timed blocks; the fastest counts")
    ap.add_argument(
        "--rounds", type=int, default=None, help="fresh processes per side, interleaved; each side's fastest counts"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--fixed-cost",
        action="store_true",
        help="only our step at 1-128 rows of the longest length: the cost of a block step paid whatever the rows, "
        "and per row",
    )
    a = ap.parse_args()
    if a.preset == "paper":
        args = {
            "d_model": 256,
            "n_heads": 64,
            "n_layers": 1,
            "n": 20,
            "steps": a.steps or 10,
            "repeats": a.repeats or 2,
        }
        a.rounds = a.rounds or 1
    else:
        args = {"d_model": 32, "n_heads": 4, "n_layers": 1, "n": 10, "steps": a.steps or 40, "repeats": a.repeats or 3}
        a.rounds = a.rounds or 3
    args.update(batch=64, warmup=3, device=a.device, threads=a.threads)
    if a.fixed_cost:
        print(json.dumps({"torch": torch.__version__, "config": args, **fixed_cost(args)}, indent=2))
        return
    rounds = [
        {side: run_side(side, args) for side in SIDES} for _ in range(a.rounds)
    ]  # sides interleaved: drift hits all
    res = {side: max((r[side] for r in rounds), key=lambda out: out["samples_per_s"]) for side in SIDES}
    ours = res["ours"]
    for side in SIDES[:2]:
        eager = res[side]
        speedup = ours["samples_per_s"] / eager["samples_per_s"]
        work = eager["gflop_per_step"] / ours["gflop_per_step"]
        res[f"vs_{side}"] = {
            "speedup_samples_per_s": round(speedup, 2),
            "speedup_per_round": [round(r["ours"]["samples_per_s"] / r[side]["samples_per_s"], 2) for r in rounds],
            "work_ratio": round(work, 2),
            "speedup_per_work": round(speedup / work, 2),
            "activation_memory_ratio": round(eager["activations_mib"] / ours["activations_mib"], 2),
            **({"peak_memory_ratio": round(eager["peak_mib"] / ours["peak_mib"], 2)} if "peak_mib" in ours else {}),
        }
    print(json.dumps({"torch": torch.__version__, "config": args, **res}, indent=2))


if __name__ == "__main__":
    main()
