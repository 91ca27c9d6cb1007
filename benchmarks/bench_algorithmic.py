"""Benchmark: training throughput and peak memory of the looped GPT, ours vs a
straightforward eager implementation of the same model.

Both sides train the same parameters (one initialisation, copied) with AdamW on
Parity batches from the end of the curriculum (lengths 1..n, T(n) = n):

* eager, the way research code is usually written: each row built in Python
  from lists (``random`` bits, padding by hand), the batch run through the block
  for the batch's largest number of steps, the logits of every step kept and
  each row's read out at its own T(n); attention written out (scores, causal
  mask, softmax);
* ours: :class:`AlgorithmicTask` batches generated as tensors, and
  :class:`LoopedGPT`, which sorts rows by T(n) and runs each step only on the
  rows still going, with ``scaled_dot_product_attention``.

Each side runs in a fresh process: samples per second over the timed steps;
activation memory (every tensor storage autograd keeps for the backward of a
step, counted once, mean over 5 steps: the part of memory that the loop
changes); and on CUDA the peak of ``max_memory_allocated``. Goal: >= 2x
samples/s on CPU.

    python benchmarks/bench_algorithmic.py                 # cpu-small Parity block (d = 32)
    python benchmarks/bench_algorithmic.py --preset paper  # d = 256, 1 layer, 64 heads (GPU: run there)
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import random
import time

import torch
import torch.nn.functional as F


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
    pad = lambda r, v: r + [v] * (width - len(r))
    return (torch.tensor([pad(r, vocab["<pad>"]) for r in rows]), torch.tensor([pad(t, vocab["<pad>"]) for t in targets]),
            torch.tensor([pad(m, 1) for m in masks], dtype=torch.bool), torch.tensor(steps))


def eager_forward(model, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The same model: every row runs the batch's largest T, each row read at its own step."""
    e = model.embed(x)
    h = torch.zeros_like(e)
    outs = []
    for _ in range(int(steps.max())):
        z = h + e
        for layer in model.layers:
            a = layer.ln_1(z)
            B, W, d = a.shape
            nh = layer.attn.n_heads
            q, k, v = layer.attn.qkv(a).split(d, dim=-1)
            q, k, v = (t.view(B, W, nh, d // nh).transpose(1, 2) for t in (q, k, v))
            att = (q @ k.transpose(-2, -1)) / math.sqrt(d // nh)
            att = att.masked_fill(torch.ones(W, W, dtype=torch.bool).triu(1).to(att.device), float("-inf")).softmax(-1)
            z = z + layer.attn.proj((att @ v).transpose(1, 2).reshape(B, W, d))
            z = z + layer.mlp(layer.ln_2(z))
        h = model.ln_f(z)
        outs.append(model.head(h))
    every = torch.stack(outs, dim=1)  # (B, T_max, W, V)
    return every[torch.arange(len(steps)), steps - 1]


def _worker(side: str, args: dict, queue) -> None:
    from loopscape.data.algorithmic import AlgorithmicTask
    from loopscape.models.looped_gpt import looped_gpt

    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    task = AlgorithmicTask("parity")
    torch.manual_seed(0)
    model = looped_gpt(task.vocab_size, d_model=args["d_model"], n_heads=args["n_heads"], n_layers=args["n_layers"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = {s: i for i, s in enumerate(task.vocab)}
    rng, gen = random.Random(0), torch.Generator(device=device).manual_seed(0)

    def one_step():
        if side == "eager":
            x, y, m, st = (t.to(device) for t in eager_batch(rng, args["batch"], args["n"], vocab))
            logits = eager_forward(model, x, st)
        else:
            b = task.batch(torch.randint(1, args["n"] + 1, (args["batch"],), generator=gen, device=device), gen)
            x, y, m = b.inputs, b.targets, b.mask
            logits = model(x, b.steps)
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        loss = (nll * m).sum() / m.sum()
        return loss

    def train_step(measure: bool = False) -> float:
        saved: dict[int, int] = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        if measure:  # activation memory: every storage autograd keeps for the backward, counted once
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = one_step()
        else:
            loss = one_step()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return sum(saved.values()) / 2**20

    for _ in range(args["warmup"]):
        train_step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args["steps"]):
        train_step()
    sync()
    elapsed = time.perf_counter() - t0
    out = {"samples_per_s": args["steps"] * args["batch"] / elapsed, "s_per_step": elapsed / args["steps"]}
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    # same seeds on both sides' measuring steps: a few batches, mean of the saved-activation size
    out["activations_mib"] = sum(train_step(measure=True) for _ in range(5)) / 5
    queue.put(out)


def run_side(side: str, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(side, args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=("cpu-small", "paper"), default="cpu-small")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    if a.preset == "paper":
        args = {"d_model": 256, "n_heads": 64, "n_layers": 1, "n": 20, "steps": a.steps or 20}
    else:
        args = {"d_model": 32, "n_heads": 4, "n_layers": 1, "n": 10, "steps": a.steps or 40}
    args.update(batch=64, warmup=3, device=a.device, threads=a.threads)
    res = {side: run_side(side, args) for side in ("eager", "ours")}
    res["speedup_samples_per_s"] = round(res["ours"]["samples_per_s"] / res["eager"]["samples_per_s"], 2)
    res["activation_memory_ratio_eager_over_ours"] = round(res["eager"]["activations_mib"] / res["ours"]["activations_mib"], 2)
    if "peak_mib" in res["ours"]:
        res["peak_memory_ratio_eager_over_ours"] = round(res["eager"]["peak_mib"] / res["ours"]["peak_mib"], 2)
    print(json.dumps({"torch": torch.__version__, "config": args, **res}, indent=2))


if __name__ == "__main__":
    main()
