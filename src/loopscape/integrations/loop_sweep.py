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


def _scored(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, scored) for the positions ``0..W-2``, whose outputs predict the next token: padding is not
    scored; with ``labels`` (Hugging Face's convention: the model shifts them, -100 is not scored) only the
    labelled positions are."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    target = batch["labels"][:, 1:] if "labels" in batch else ids[:, 1:]
    return target, (mask[:, 1:] * mask[:, :-1]).bool() & (target != -100)


def _scores(logits: torch.Tensor, batch: dict) -> tuple[float, float, int, int, int]:
    """(summed next-token NLL, correct predictions, scored positions, rows all right, scored rows) of one
    batch (:func:`_scored`); a row is right when all its scored positions are."""
    target, keep = _scored(batch)
    logp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, target.clamp_min(0)[..., None])[..., 0][keep].sum().item()
    hit = logp.argmax(-1) == target
    scored = keep.any(-1)
    rows_right = ((hit | ~keep).all(-1) & scored).sum().item()
    return nll, hit[keep].sum().item(), int(keep.sum()), rows_right, int(scored.sum())


def flops_per_token(model: nn.Module, n_loops: int) -> float:
    """Forward FLOPs per token, 2 per weight multiply-add: every non-embedding weight outside the range once,
    the range's as :meth:`LoopedRange.weights_per_token` counts them at ``n_loops`` (its layers once per loop,
    a concat adapter and per-loop LoRA as used); attention's context-length term left out: it is the same
    for every count."""
    looped = looped_layers(model)
    inside = looped.weight_ids()
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    total = looped.weights_per_token(n_loops)
    for p in model.parameters():
        if id(p) in inside or (id(p) in embeddings and p is not model.get_output_embeddings().weight):
            continue
        total += p.numel()
    return 2.0 * total


@torch.no_grad()
def loop_sweep(
    model: nn.Module,
    batches: list[dict],
    loops: list[int],
    thresholds: list[float] = (),
    exit: str = "kl",
    exit_loops: int | None = None,
) -> dict:
    """See the module docstring. ``batches``: dicts with ``input_ids`` (and ``attention_mask``, ``labels``);
    the exits run with at most ``exit_loops`` loops (default: the model's own ``n_loops``). The model's loop
    and exit settings are restored afterwards."""
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
        looped.n_loops = saved_loops if exit_loops is None else exit_loops
        exits = [_exit_reading(model, looped, batches, exit, threshold) for threshold in thresholds]
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
        "exit_loops": saved_loops if exit_loops is None else exit_loops,
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
    totals = [0, 0, 0, 0, 0]
    for batch in batches:
        logits = model(**_inputs(batch), use_cache=False).logits
        totals = [x + y for x, y in zip(totals, _scores(logits, batch))]
    return quality_summary(totals, any("labels" in b for b in batches))


def quality_summary(totals, labelled: bool) -> dict:
    nll, correct, count, rows_right, rows = totals
    out = {"perplexity": math.exp(nll / count), "accuracy": correct / count, "tokens": count}
    if labelled:  # task rows: exact match of every labelled position
        out["exact_match"] = rows_right / rows
    return out


def _exit_reading(model: nn.Module, looped, batches: list[dict], exit: str, threshold: float) -> dict:
    """Quality with per-token exit at ``threshold``, and the loops used by the scored positions (the
    tokens whose outputs are read: with ``labels``, the answers' only)."""
    looped.set_exit(exit, threshold)
    totals, used = [0, 0, 0, 0, 0], []
    for batch in batches:
        logits = model(**_inputs(batch), use_cache=False).logits
        totals = [x + y for x, y in zip(totals, _scores(logits, batch))]
        held = looped.loops_used  # None at one loop: every token ran it
        held = torch.ones_like(batch["input_ids"]) if held is None else held
        used.append(held[:, :-1][_scored(batch)[1]])
    used = torch.cat(used)
    histogram = {int(k): int(n) for k, n in zip(*torch.unique(used, return_counts=True))}
    quality = quality_summary(totals, any("labels" in b for b in batches))
    return {
        "exit": exit,
        "threshold": threshold,
        **quality,
        "histogram": histogram,
        "mean_loops": used.float().mean().item(),
    }


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}  # scored here, not by the model's own loss


def _lens(model: nn.Module, looped, batches: list[dict]) -> tuple[list[dict], list[float]]:
    """Per loop at the largest count: the perplexity and accuracy read through the final norm and LM head,
    and the mean relative change of the state from the previous loop (``||h_t - h_{t-1}|| / ||h_t||``)."""
    norm, head = looped._readout
    per_loop, change, tokens = None, None, 0
    looped.record = True
    try:
        for batch in batches:
            model(**_inputs(batch), use_cache=False)
            states = looped.loop_states
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
            scores = [_scores(head(norm(h)), batch) for h in states]
            deltas = [
                ((b - a).float().norm(dim=-1) / b.float().norm(dim=-1).clamp_min(1e-30))[mask].sum().item()
                for a, b in zip(states[:-1], states[1:])
            ]
            if per_loop is None:
                per_loop, change = [list(s) for s in scores], deltas
            else:
                per_loop = [[x + y for x, y in zip(p, s)] for p, s in zip(per_loop, scores)]
                change = [x + y for x, y in zip(change, deltas)]
            tokens += int(mask.sum())
    finally:
        looped.record, looped.loop_states = False, []
    labelled = any("labels" in b for b in batches)
    lens = [{"loop": t + 1, **quality_summary(totals, labelled)} for t, totals in enumerate(per_loop)]
    for row in lens:
        del row["tokens"]
    return lens, [d / tokens for d in change]
