"""Benchmark: looped inference that saves time or memory, side by side in one run (batch 1, greedy).

Rows: the plain model (one loop); the plain model unrolled to full depth (the looped layers listed n times,
HF's own forward and cache: the limit a looped model's bookkeeping is measured against); a fixed depth of
k loops for every k up to the model's n_loops; the state exit at each threshold; each key-value sharing
mode; loop-speculative decoding at each draft depth (``generate_speculative``, and HF's assisted generation
with ``draft_model``); the static cache, and with ``--compile`` the static
cache under ``torch.compile``.

Per row: decode tokens per second and the ratio to full depth; the cache's bytes after the generation and
the ratio to the plain model's; mean loops per generated token (exit rows); held-out perplexity read the way decoding
reads it (token by token through the cache, which is what a cycle's sharing and the exit change) and its
ratio to full depth; whether the generated tokens equal full-depth greedy's. Exit rows add the speed ratio
to a fixed-depth model at the same mean loops (interpolated between the fixed rows; the thresholds 0 and inf,
always run, are the exit at full depth and at 2 loops: its overhead), and speculative rows
their acceptance rate. Each time is the fastest of ``--repeats``.

The text: held-out pydoc prose (the last tenth of CPython's ``pydoc_data.topics``, as the retrofit holds it
out) for a model saved with its tokenizer; random tokens for the tiny random model (its perplexity ratios
then only say how far a mode moves the model's function).

    python benchmarks/bench_inference.py                                         # a tiny Llama, 4 loops
    python benchmarks/bench_inference.py --model runs/retrofit-smollm2/seed0/shift/model --thresholds 0.05 0.1 0.2
    python benchmarks/bench_inference.py --model M --loops 8 --only plain full sharing    # the cache at 8 loops
    python benchmarks/bench_inference.py --model M --device cuda --repeats 5 --compile    # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import pydoc_data.topics
import time

import torch
import transformers
from torch import nn

from loopscape import draft_model, from_pretrained, generate_speculative, loopify
from loopscape.looped import find_looped, loop_settings
from loopscape.looped.decoder import looped_layers
from loopscape.looped.exit import Exit
from loopscape.looped.io import load_tokenizer
from loopscape.looped.kv import cache_bytes
from loopscape.looped.structure import Structure

KINDS = ("plain", "unrolled", "full", "exit", "sharing", "speculative", "static")


def tiny() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4
    )
    return loopify(transformers.LlamaForCausalLM(config).eval(), layers=(2, 6), n_loops=4)


class Indexed(nn.Module):
    """One call of a shared layer with its own cache index, as a layer of an unrolled model has."""

    def __init__(self, inner: nn.Module, idx: int):
        super().__init__()
        self.inner, self.idx = inner, idx
        self.indexed = [m for m in inner.modules() if isinstance(getattr(m, "layer_idx", None), int)]

    def forward(self, *args, **kwargs):
        saved = [m.layer_idx for m in self.indexed]
        for m in self.indexed:
            m.layer_idx = self.idx
        try:
            return self.inner(*args, **kwargs)
        finally:
            for m, i in zip(self.indexed, saved):
                m.layer_idx = i


def unrolled(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` whose layer list holds the looped layers n_loops times over (no injection:
    a timing reference, not the same function)."""
    looped = looped_layers(model)
    a, b, n = looped.start, looped.stop, looped.n_loops
    plain = copy.deepcopy(model)
    looped_layers(plain).remove()
    structure = Structure(plain)
    src = list(structure.layers)
    order = src[:a] + src[a:b] * n + src[b:]
    setattr(structure.stack, structure.layers_name, nn.ModuleList([Indexed(x, i) for i, x in enumerate(order)]))
    plain.config.num_hidden_layers = len(order)
    types = getattr(plain.config, "layer_types", None)
    if types:
        plain.config.layer_types = types[:a] + types[a:b] * n + types[b:]
    del plain.config.loopscape
    return plain


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


@torch.no_grad()
def decode_perplexity(model: nn.Module, windows: list[torch.Tensor]) -> tuple[float, float | None]:
    """Perplexity of each window's next tokens, read one token at a time through the cache (teacher
    forcing), and the mean loops per token of that reading (None without an exit)."""
    looped = looped_layers(model)
    # transformers >= 5.24 names it `cache` (and deprecates the older `past_key_values`)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    nll, count, loops = 0.0, 0, []
    for ids in windows:
        out = model(input_ids=ids[:, :1], use_cache=True)
        logits = [out.logits]
        for i in range(1, ids.shape[1] - 1):
            cache = out.cache if "cache" in out else out.past_key_values
            out = model(input_ids=ids[:, i : i + 1], **{key: cache}, use_cache=True)
            logits.append(out.logits)
            if looped is not None and looped.exit is not None:
                loops.append(float(looped.loops_used.float().mean()))
        logp = torch.log_softmax(torch.cat(logits, 1).float(), -1)
        nll -= logp.gather(-1, ids[:, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    return math.exp(nll / count), (sum(loops) / len(loops) if loops else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a looped checkpoint folder (default: a tiny random Llama)")
    parser.add_argument("--loops", type=int, default=None, help="full depth (default: the model's n_loops)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.05, 0.1, 0.2, 0.4])
    parser.add_argument("--sharing", nargs="*", default=["first", "cycle:1", "cycle:2"])
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--windows", type=int, default=4, help="held-out windows for the perplexity")
    parser.add_argument("--context", type=int, default=64, help="tokens per held-out window")
    parser.add_argument("--only", nargs="*", choices=KINDS, default=list(KINDS), help="the kinds of row to run")
    parser.add_argument("--compile", action="store_true", help="also the static cache under torch.compile")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = (from_pretrained(args.model) if args.model else tiny()).to(args.device).eval()
    model.generation_config.eos_token_id = None  # every row decodes the same number of tokens
    looped = find_looped(model)
    n = looped.n_loops = args.loops or looped.n_loops
    tokenizer = load_tokenizer(args.model) if args.model else None
    if tokenizer is not None:  # the held-out tenth of CPython's pydoc topics, as the retrofit holds it out
        text = "\n".join(pydoc_data.topics.topics.values())
        ids = torch.tensor(tokenizer(text[int(0.9 * len(text)) :], add_special_tokens=False)["input_ids"])
    else:
        ids = torch.randint(0, model.config.vocab_size, (4096,), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    prompt = ids[None, : args.prompt]
    start = args.prompt + args.tokens  # the perplexity windows come after the prompt's text
    windows = [ids[None, start + i * args.context : start + (i + 1) * args.context] for i in range(args.windows)]
    greedy = dict(max_new_tokens=args.tokens, do_sample=False, pad_token_id=0)

    def generation(m, **kwargs):
        out = m.generate(prompt, return_dict_in_generate=True, **greedy, **kwargs)
        return out.sequences, cache_bytes(out.past_key_values)

    def generated_loops() -> float:
        """Mean loops per generated token of one generation: its exit counts less its prompt's."""
        looped.reset_exit_counts()
        model(input_ids=prompt)
        prompt_counts = dict(looped.exit_counts)
        looped.reset_exit_counts()
        generation(model)
        counts = {k: c - prompt_counts.get(k, 0) for k, c in looped.exit_counts.items()}
        return sum(k * c for k, c in counts.items()) / sum(counts.values())

    rows, full_tokens = [], None

    def row(setting, kind, fn, quality_of=None, **extra):
        seconds, (tokens, nbytes) = timed(fn, args.repeats)
        ppl, loops = decode_perplexity(quality_of, windows) if quality_of is not None else (None, None)
        r = {"setting": setting, "kind": kind, "seconds": seconds, "cache_bytes": nbytes, "perplexity": ppl}
        r["mean_loops"] = loops
        r["equal_to_full_depth"] = None if full_tokens is None else torch.equal(tokens, full_tokens)
        rows.append({**r, **extra})
        print(f"  {setting}: {args.tokens / seconds:.2f} tokens/s", flush=True)
        return tokens

    with torch.no_grad():
        full_tokens = row(f"full depth ({n} loops)", "full", lambda: generation(model), model, fixed=n)
        rows[-1]["equal_to_full_depth"] = True
        if "plain" in args.only:
            with loop_settings(model, n_loops=1):
                row("plain model (1 loop)", "plain", lambda: generation(model), model, fixed=1)
        if "unrolled" in args.only:
            plain = unrolled(model)
            row(f"plain model unrolled to {n} loops (no injection)", "unrolled", lambda: generation(plain))
            del plain
        if "full" in args.only or "exit" in args.only:
            for k in range(2, n):
                with loop_settings(model, n_loops=k):
                    row(f"fixed depth {k} loops", "full", lambda: generation(model), model, fixed=k)
        if "exit" in args.only:
            # threshold 0: the exit never fires (its bookkeeping against full depth); inf: every token stops
            # after 2 loops (against fixed 2 loops); the two read the exit's overhead
            for t in [0.0, *args.thresholds, math.inf]:
                with loop_settings(model, exit=Exit("state", t, min_loops=2)):
                    row(f"state exit < {t:g}", "exit", lambda: generation(model), model, threshold=t)
                    rows[-1]["mean_loops"] = generated_loops()
        if "sharing" in args.only:
            for mode in args.sharing:
                with loop_settings(model, kv_sharing=mode):
                    row(f"kv_sharing {mode}", "sharing", lambda: generation(model), model, sharing=mode)
        if "speculative" in args.only:
            for k in range(1, n):
                stats = {}

                def speculate(k=k, stats=stats):
                    out, s = generate_speculative(
                        model, prompt, k, args.tokens, num_draft_tokens=args.draft_tokens, return_stats=True
                    )
                    stats.update(s)
                    return out, None

                row(f"speculative, draft {k} loop(s), {args.draft_tokens} tokens", "speculative", speculate)
                rows[-1]["acceptance"] = round(stats["acceptance"], 3)
                draft = draft_model(model, k)  # the same through HF's assisted generation
                row(
                    f"HF assisted generation, draft {k} loop(s)",
                    "speculative",
                    lambda draft=draft: generation(model, assistant_model=draft),
                )
        if "static" in args.only:
            row("static cache", "static", lambda: generation(model, cache_implementation="static"))
            if args.compile:
                forward = model.forward
                model.forward = torch.compile(forward)
                try:
                    generation(model, cache_implementation="static")  # the compilation, not timed
                    compiled = lambda: generation(model, cache_implementation="static")  # noqa: E731
                    row("static cache + torch.compile", "static", compiled)
                finally:
                    model.forward = forward

    full = rows[0]
    plain = next((r for r in rows if r["kind"] == "plain"), None)
    fixed = sorted((r["fixed"], args.tokens / r["seconds"]) for r in rows if "fixed" in r)
    for r in rows:
        r["tokens_per_s"] = round(args.tokens / r["seconds"], 2)
        r["vs_full_depth"] = round(full["seconds"] / r["seconds"], 3)
        if plain is not None and r["cache_bytes"]:
            r["cache_vs_plain"] = round(r["cache_bytes"] / plain["cache_bytes"], 3)
        if r["perplexity"] is not None:
            r["perplexity_vs_full_depth"] = round(r["perplexity"] / full["perplexity"], 4)
        if r.get("mean_loops") is not None and len(fixed) > 1:  # a fixed model at the same mean depth
            at_m = _interpolate(fixed, min(max(r["mean_loops"], fixed[0][0]), fixed[-1][0]))
            r["vs_fixed_at_mean_loops"] = round(r["tokens_per_s"] / at_m, 3)
    header = ["setting", "tokens_per_s", "vs_full_depth", "cache_bytes", "cache_vs_plain", "mean_loops", "perplexity"]
    header += ["perplexity_vs_full_depth", "vs_fixed_at_mean_loops", "acceptance", "equal_to_full_depth"]
    where = args.model or "tiny random Llama (layers 2..5 of 6)"
    threads = torch.get_num_threads()
    print(f"\n{where}: {n} loops, batch 1, {args.tokens} new tokens, {threads} thread(s), {args.device}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(_cell(r.get(h)) for h in header) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


def _interpolate(points: list[tuple[int, float]], x: float) -> float:
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


if __name__ == "__main__":
    main()
