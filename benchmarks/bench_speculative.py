"""Benchmark: loop-speculative decoding (``loopscape.generate_speculative``) against full-depth greedy decoding
and against the plain model, side by side in one run (batch 1, greedy, the per-loop cache).

The prompt: 32 tokens of held-out pydoc prose for a model saved with its tokenizer, else random tokens.
Rows: the plain model (one loop), full depth (``generate``), full depth with a depth per call
(``generate(..., n_loops=)``), and speculative at each draft depth below the full one. Per row: tokens per
second, the ratio to full depth, the acceptance rate, and whether the tokens equal full-depth greedy's. Each
time is the fastest of ``--repeats``.

    python benchmarks/bench_speculative.py                                  # a tiny Llama, 3 loops
    python benchmarks/bench_speculative.py --model runs/retrofit-smollm2/seed0/shift/model --tokens 48
    python benchmarks/bench_speculative.py --model M --device cuda --repeats 5   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import pydoc_data.topics
import time

import torch
import transformers

from loopscape import from_pretrained, generate_speculative, loopify
from loopscape.looped import find_looped, loop_settings
from loopscape.looped.io import load_tokenizer


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4
    )
    return loopify(transformers.LlamaForCausalLM(config).eval(), layers=(2, 4), n_loops=3)


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a looped checkpoint folder (default: a tiny Llama)")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = (from_pretrained(args.model) if args.model else tiny()).to(args.device).eval()
    model.generation_config.eos_token_id = None  # every row decodes the same number of tokens
    n = find_looped(model).n_loops
    tokenizer = load_tokenizer(args.model) if args.model else None
    if tokenizer is not None:  # real prose: the start of the held-out tenth of CPython's pydoc topics
        text = "\n".join(pydoc_data.topics.topics.values())
        prompt = torch.tensor([tokenizer(text[int(0.9 * len(text)) :])["input_ids"][:32]])
    else:
        prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(args.device)
    greedy = dict(max_new_tokens=args.tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        t_full, full = timed(lambda: model.generate(prompt, **greedy), args.repeats)
        rows = [{"setting": f"full depth ({n} loops)", "seconds": t_full, "equal": True}]
        with loop_settings(model, n_loops=1):
            t, _ = timed(lambda: model.generate(prompt, **greedy), args.repeats)
        rows.insert(0, {"setting": "plain model (1 loop)", "seconds": t, "equal": None})
        t, out = timed(lambda: model.generate(prompt, n_loops=n, **greedy), args.repeats)
        rows.append({"setting": f"generate(n_loops={n})", "seconds": t, "equal": torch.equal(out, full)})
        for k in range(1, n):
            t, (out, stats) = timed(
                lambda k=k: generate_speculative(
                    model, prompt, k, args.tokens, num_draft_tokens=args.draft_tokens, return_stats=True
                ),
                args.repeats,
            )
            rows.append(
                {
                    "setting": f"speculative, draft {k} loop(s), {args.draft_tokens} tokens",
                    "seconds": t,
                    "equal": torch.equal(out, full),
                    "acceptance": round(stats["acceptance"], 3),
                    "verify_forwards": stats["verify_forwards"],
                }
            )
    for r in rows:
        r["tokens_per_s"] = round(args.tokens / r["seconds"], 2)
        r["vs_full_depth"] = round(t_full / r["seconds"], 3)
    print(json.dumps({"model": args.model or "tiny Llama", "threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
