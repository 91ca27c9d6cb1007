"""Benchmark: truncated backprop through loops (``backprop_loops=k``) against full backprop.

A loopified Llama (layers 1..L-2 looped; Huginn's and retrofitted recurrence's training) and the looped GPT
(``LoopedGPTConfig.backprop_loops``), one training step (forward + backward) on one batch, at
``n_loops`` = 4, 8, 16 with k = 1, 2, 4 and full backprop, side by side in one run. Reported per setting:

* activation bytes: the tensors autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``),
  each storage counted once and the parameters left out: what the graph holds at the end of the forward
* the ratio of those bytes to full backprop's at the same depth (the goal: <= 0.40 at 8 loops, k = 1)
* step time (the fastest of ``--repeats``), and with ``--device cuda`` the CUDA peak memory of the step

    python benchmarks/bench_backprop.py                        # CPU, Llama d 128 and the GPT d 128
    python benchmarks/bench_backprop.py --device cuda --d-model 512 --batch 16 --width 256
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers

from loopscape import loopify
from loopscape.models.looped_gpt import LoopedGPT, LoopedGPTConfig


def saved_bytes(step, params: set[int]) -> int:
    """Bytes autograd saves during ``step()`` (a forward), each storage once, parameters left out."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values())


def timed(step, device: torch.device, repeats: int) -> tuple[float, int | None]:
    best, peak = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        best = min(best, time.perf_counter() - t0)
    return best, peak


def llama(args, device: torch.device):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=args.d_model,
        intermediate_size=4 * args.d_model,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.width,
        use_cache=False,
    )
    model = loopify(transformers.LlamaForCausalLM(config).to(device), layers=(1, 3), n_loops=1)
    ids = torch.randint(0, 256, (args.batch, args.width), device=device)

    def setting(n: int, k: int | None):
        loopify(model, layers=(1, 3), n_loops=n, backprop_loops=k)
        return lambda: model(input_ids=ids, labels=ids).loss

    return model, setting


def looped_gpt(args, device: torch.device):
    torch.manual_seed(0)
    model = LoopedGPT(LoopedGPTConfig(vocab_size=8, d_model=args.d_model, n_heads=4, n_layers=2)).to(device)
    x = torch.randint(0, 8, (args.batch, args.width), device=device)

    def setting(n: int, k: int | None):
        model.config.backprop_loops = k
        return lambda: model(x, n).square().mean()

    return model, setting


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--loops", default="4,8,16")
    p.add_argument("--ks", default="1,2,4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    device = torch.device(args.device)
    rows = []
    print(
        "| model | n_loops | k | activation MB | vs full | step s | vs full |"
        + (" CUDA peak MB |" if device.type == "cuda" else "")
    )
    print("|---|---|---|---|---|---|---|" + ("---|" if device.type == "cuda" else ""))
    for name, build in (("loopified Llama", llama), ("looped GPT", looped_gpt)):
        model, setting = build(args, device)
        params = {q.untyped_storage().data_ptr() for q in model.parameters()}
        for n in (int(v) for v in args.loops.split(",")):
            full = None
            for k in [None, *(int(v) for v in args.ks.split(",") if int(v) < n)]:
                step = setting(n, k)
                act = saved_bytes(step, params)
                seconds, peak = timed(step, device, args.repeats)
                model.zero_grad(set_to_none=True)
                full = full or (act, seconds)
                row = {
                    "model": name,
                    "n_loops": n,
                    "k": k or "full",
                    "activation_bytes": act,
                    "step_s": seconds,
                    "bytes_vs_full": act / full[0],
                    "time_vs_full": seconds / full[1],
                    "cuda_peak": peak,
                }
                rows.append(row)
                cuda = f" {peak / 2**20:.0f} |" if peak is not None else ""
                print(
                    f"| {name} | {n} | {row['k']} | {act / 2**20:.1f} | {row['bytes_vs_full']:.2f} | "
                    f"{seconds:.3f} | {row['time_vs_full']:.2f} |{cuda}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
