"""The loop sweep: a looped Hugging Face model read at every loop count, test-time compute made visible.

:func:`loop_sweep` runs a loopified model (:func:`loopscape.loopify`) over fixed token batches at each loop
count asked for, including counts beyond those it was trained with, and reports per count the next-token
perplexity and accuracy and the FLOPs per token; at the largest count, the logit lens per loop (each loop's
state read through the final norm and LM head) and the hidden state's convergence between loops; and, for
given thresholds, the per-token exit histogram with the quality it keeps. It flags *overthinking* by
:data:`OVERTHINKING_RULE`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loopscape.integrations.loopify import looped_layers

OVERTHINKING_TOLERANCE = 0.01
OVERTHINKING_RULE = (
    "overthinking: the perplexity is lowest at some loop count k* below the largest count swept, and at the "
    f"largest count it is more than {OVERTHINKING_TOLERANCE:.0%} above its value at k*"
)


def _scores(logits: torch.Tensor, batch: dict) -> tuple[float, float, int]:
    """(summed next-token NLL, correct predictions, scored positions) of one batch; padding is not scored."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    keep = (mask[:, 1:] * mask[:, :-1]).bool()
    logp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    target = ids[:, 1:]
    nll = -logp.gather(-1, target[..., None])[..., 0][keep].sum().item()
    correct = (logp.argmax(-1) == target)[keep].sum().item()
    return nll, correct, int(keep.sum())


def flops_per_token(model: nn.Module, n_loops: int) -> float:
    """Forward FLOPs per token, 2 per weight multiply-add: every non-embedding weight once, the looped layers'
    weights ``n_loops`` times (attention's context-length term left out: it is the same for every count)."""
    looped = looped_layers(model)
    in_range = {id(p) for layer in looped.range_layers() for p in layer.parameters()}
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    total = 0
    for p in model.parameters():
        if id(p) in embeddings and p is not model.get_output_embeddings().weight:
            continue
        total += p.numel() * (n_loops if id(p) in in_range else 1)
    return 2.0 * total


@torch.no_grad()
def loop_sweep(
    model: nn.Module, batches: list[dict], loops: list[int], thresholds: list[float] = (), exit: str = "kl"
) -> dict:
    """See the module docstring. ``batches``: dicts with ``input_ids`` (and ``attention_mask``); the model's
    loop and exit settings are restored afterwards."""
    looped = looped_layers(model)
    if looped is None:
        raise ValueError(f"model must be loopified (loopscape.loopify) to sweep its loops ({type(model).__name__})")
    if not loops or any(not isinstance(k, int) or k < 1 for k in loops):
        raise ValueError(f"loops must be a non-empty list of integers >= 1 (got {loops!r})")
    if not batches:
        raise ValueError("batches must hold at least one batch of input_ids (got none)")
    saved_loops, saved_exit = looped.n_loops, dict(looped._settings)
    model.eval()
    rows, top = [], max(loops)
    try:
        looped.set_exit(None)
        for k in sorted(set(loops)):
            looped.n_loops = k
            rows.append({"n_loops": k, **_quality(model, batches), "flops_per_token": flops_per_token(model, k)})
        looped.n_loops = top
        lens, convergence = _lens(model, looped, batches)
        exits = []
        for threshold in thresholds:
            looped.set_exit(exit, threshold)
            looped.reset_exit_counts()
            quality = _quality(model, batches)
            counts = dict(sorted(looped.exit_counts.items()))
            tokens = sum(counts.values())
            mean = sum(k * n for k, n in counts.items()) / max(tokens, 1)
            exits.append({"exit": exit, "threshold": threshold, **quality, "histogram": counts, "mean_loops": mean})
    finally:
        looped.n_loops = saved_loops
        looped.set_exit(**saved_exit)
    best, flagged = overthinking(rows)
    return {
        "counts": rows,
        "logit_lens": lens,
        "convergence": convergence,
        "exits": exits,
        "best_n_loops": best,
        "overthinking": flagged,
        "overthinking_rule": OVERTHINKING_RULE,
        "trained_n_loops": saved_loops,
    }


def overthinking(rows: list[dict]) -> tuple[int, bool]:
    """``(best loop count, flagged)`` by :data:`OVERTHINKING_RULE`; ``rows`` sorted by ``n_loops``."""
    best = min(rows, key=lambda r: r["perplexity"])
    last = rows[-1]
    flagged = best["n_loops"] < last["n_loops"] and last["perplexity"] > best["perplexity"] * (
        1 + OVERTHINKING_TOLERANCE
    )
    return best["n_loops"], flagged


def _quality(model: nn.Module, batches: list[dict]) -> dict:
    nll = correct = count = 0
    for batch in batches:
        logits = model(**batch, use_cache=False).logits
        a, b, c = _scores(logits, batch)
        nll, correct, count = nll + a, correct + b, count + c
    return {"perplexity": math.exp(nll / count), "accuracy": correct / count, "tokens": count}


def _lens(model: nn.Module, looped, batches: list[dict]) -> tuple[list[dict], list[float]]:
    """Per loop at the largest count: the perplexity and accuracy read through the final norm and LM head,
    and the mean relative change of the state from the previous loop (``||h_t - h_{t-1}|| / ||h_t||``)."""
    norm, head = looped._readout
    per_loop, change = None, None
    looped.record = True
    try:
        for batch in batches:
            model(**batch, use_cache=False)
            states = looped.loop_states
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
            scores = [_scores(head(norm(h)), batch) for h in states]
            deltas = [
                ((b - a).float().norm(dim=-1) / b.float().norm(dim=-1).clamp_min(1e-30))[mask].sum().item()
                for a, b in zip(states[:-1], states[1:])
            ]
            if per_loop is None:
                per_loop, change, tokens = [list(s) for s in scores], deltas, int(mask.sum())
            else:
                per_loop = [[x + y for x, y in zip(p, s)] for p, s in zip(per_loop, scores)]
                change, tokens = [x + y for x, y in zip(change, deltas)], tokens + int(mask.sum())
    finally:
        looped.record, looped.loop_states = False, []
    lens = [
        {"loop": t + 1, "perplexity": math.exp(nll / n), "accuracy": c / n} for t, (nll, c, n) in enumerate(per_loop)
    ]
    return lens, [d / tokens for d in change]
