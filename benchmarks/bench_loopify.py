"""Benchmark: a loopified model's training step against the same layers called k times by hand.

Issue 17's target: a training step of ``loopify(model, layers=(a, b), n_loops=k)``
costs at most 1.05x the same model with the range's layers called ``k`` times
"by hand": a plain model of the same family whose layer list holds the looped
layers ``k`` times over, as the very same module objects (``[0, 1, 2, 1, 2,
1, 2, 3]``), run by the library's own forward. Both compute the same function
(``injection="none"``; ``tests/looped/test_loopify.py`` checks they agree), so the
ratio is loopify's overhead alone. Steps are AdamW on random tokens; the sides
alternate in each of ``--rounds`` rounds, and each round's time is the fastest
of ``--repeats`` blocks of ``--steps`` steps.

    python benchmarks/bench_loopify.py                    # GPT-2 and Llama, small, CPU
    python benchmarks/bench_loopify.py --device cuda --d-model 512 --batch 16
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers
from torch import nn

from loopscape import loopify


def build(family: str, d: int, layers: int, vocab: int) -> nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_positions=256, n_embd=d, n_layer=layers, n_head=8)
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=4 * d,
        num_hidden_layers=layers,
        num_attention_heads=8,
        max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(config)


def by_hand(family: str, d: int, start: int, stop: int, k: int, vocab: int) -> nn.Module:
    """The model with layers start..stop-1 listed k times over (the same modules), run by HF's forward."""
    model = build(family, d, 4, vocab)
    stack = model.transformer if family == "gpt2" else model.model
    name = "h" if family == "gpt2" else "layers"
    layers = list(getattr(stack, name))
    order = layers[:start] + layers[start:stop] * k + layers[stop:]
    setattr(stack, name, nn.ModuleList(order))
    if family == "llama":
        model.config.num_hidden_layers = len(order)
    return model


def step_time(model: nn.Module, x: torch.Tensor, steps: int, repeats: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def one():
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        one()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        sync()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--loops", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    device, vocab = torch.device(args.device), 1000
    x = torch.randint(0, vocab, (args.batch, args.width), device=device)
    results = {}
    for family in ("gpt2", "llama"):
        looped = loopify(build(family, args.d_model, 4, vocab), layers=(1, 3), n_loops=args.loops, injection="none")
        hand = by_hand(family, args.d_model, 1, 3, args.loops, vocab)
        looped, hand = looped.to(device).train(), hand.to(device).train()
        with torch.no_grad():
            # no cache: the hand-unrolled list would feed a layer's second call the keys cached by its first
            same = (looped(input_ids=x, use_cache=False).logits - hand(input_ids=x, use_cache=False).logits).abs().max()
        rounds = []
        for _ in range(args.rounds):
            t_loop = step_time(looped, x, args.steps, args.repeats)
            t_hand = step_time(hand, x, args.steps, args.repeats)
            rounds.append(t_loop / t_hand)
        results[family] = {
            "loopify_over_by_hand": min(rounds),
            "rounds": rounds,
            "max_abs_logit_diff": same.item(),
            "target": "<= 1.05",
        }
        print(
            f"{family}: loopify / by hand = {min(rounds):.3f} (rounds {', '.join(f'{r:.3f}' for r in rounds)}), "
            f"logits agree to {same:.1e}"
        )
    print(json.dumps({"device": str(device), "torch": torch.__version__, **vars(args), "results": results}))


if __name__ == "__main__":
    main()
