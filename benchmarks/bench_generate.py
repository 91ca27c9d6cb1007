"""Benchmark: generation by a loopified model with its per-(loop, layer) cache, against without it, beside
the plain decoder unrolled to the same number of layer calls (HF's own cache: the limit).

For each prompt length, 64 new tokens (greedy, batch 1), four ways side by side in one run:

* looped, cache:     ``loopify(model, layers=(a, b), n_loops=3, injection="none")``, ``use_cache=True`` (no
  injection, so that the unrolled model computes the same function: checked before timing)
* looped, no cache:  the same model, ``use_cache=False`` (every token reruns the whole context)
* unrolled, cache:   a plain model whose layer list holds the looped layers 3 times over (the very same
  modules), run by HF's own forward, ``use_cache=True``
* unrolled, no cache

Reported per length: tokens per second of each, the cache speed-up of the looped model and of the unrolled
one, their ratio (the goal: within 10%, i.e. >= 0.9), and the looped model's decode cost per token
relative to the shortest prompt's (flat: near 1). Each measurement is the fastest of ``--repeats``.

    python benchmarks/bench_generate.py                       # Llama, d 256, 6 layers, CPU
    python benchmarks/bench_generate.py --device cuda --d-model 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers
from torch import nn

from loopscape import loopify


def build(d: int, layers: int, vocab: int, positions: int) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=4 * d,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=positions,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


class Indexed(nn.Module):
    """One call of a shared layer, with its own cache index (as a layer of an unrolled model has)."""

    def __init__(self, inner: nn.Module, idx: int):
        super().__init__()
        self.inner, self.idx = inner, idx

    def forward(self, *args, **kwargs):
        saved, self.inner.self_attn.layer_idx = self.inner.self_attn.layer_idx, self.idx
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.inner.self_attn.layer_idx = saved


def unrolled(model: nn.Module, start: int, stop: int, k: int) -> nn.Module:
    """A plain model whose layer list is the original's with layers start..stop-1 listed k times (the same
    modules), run by HF's own forward and cache."""
    plain = build(model.config.hidden_size, 1, model.config.vocab_size, model.config.max_position_embeddings)
    src = list(model.model.layers)
    order = src[:start] + src[start:stop] * k + src[stop:]
    plain.lm_head = model.lm_head
    plain.model.embed_tokens, plain.model.norm = model.model.embed_tokens, model.model.norm
    plain.config.num_hidden_layers = len(order)
    plain.model.layers = nn.ModuleList([Indexed(layer, i) for i, layer in enumerate(order)])
    return plain


def tokens_per_second(model, prompt, new, use_cache, repeats) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=use_cache)
        best = min(best, time.perf_counter() - t0)
    return new / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--range", type=int, nargs=2, default=(2, 4))
    ap.add_argument("--loops", type=int, default=3)
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    positions = max(args.prompts) + args.new
    a, b = args.range
    model = build(args.d_model, args.layers, 512, positions)
    model = loopify(model, layers=(a, b), n_loops=args.loops, injection="none")
    plain = unrolled(build(args.d_model, args.layers, 512, positions), a, b, args.loops)  # same seed: same weights
    model.to(args.device), plain.to(args.device)
    rows = []
    for n in args.prompts:
        prompt = torch.randint(1, 512, (1, n), generator=torch.Generator().manual_seed(n)).to(args.device)
        with torch.no_grad():  # the two compute the same function: checked before timing
            gap = (model(input_ids=prompt).logits - plain(input_ids=prompt).logits).abs().max().item()
        assert gap < 1e-4, f"the looped and the unrolled model differ by {gap}"
        row = {"prompt": n}
        for name, m in (("looped", model), ("unrolled", plain)):
            row[f"{name}_cache"] = tokens_per_second(m, prompt, args.new, True, args.repeats)
            row[f"{name}_no_cache"] = tokens_per_second(m, prompt, args.new, False, args.repeats)
            row[f"{name}_speedup"] = row[f"{name}_cache"] / row[f"{name}_no_cache"]
        row["speedup_ratio"] = row["looped_speedup"] / row["unrolled_speedup"]
        rows.append(row)
    first = rows[0]["looped_cache"]
    for r in rows:
        r["looped_cost_per_token_vs_shortest"] = first / r["looped_cache"]
    print(f"Llama d={args.d_model}, {args.layers} layers, layers {a}..{b - 1} x {args.loops}, {args.new} new tokens")
    print(
        "| prompt | looped cache tok/s | looped no-cache | speed-up | unrolled cache | unrolled no-cache | speed-up "
        "| ratio | looped cost/token vs shortest |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['prompt']} | {r['looped_cache']:.1f} | {r['looped_no_cache']:.1f} | {r['looped_speedup']:.2f}x "
            f"| {r['unrolled_cache']:.1f} | {r['unrolled_no_cache']:.1f} | {r['unrolled_speedup']:.2f}x "
            f"| {r['speedup_ratio']:.2f} | {r['looped_cost_per_token_vs_shortest']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
