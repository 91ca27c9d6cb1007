"""The loop sweep: any looped model (:class:`~loopscape.looped.Looped`) read at every loop count, test-time
compute made visible.

:func:`loop_sweep` runs the model over fixed batches at each loop count asked for, including counts beyond
those it was trained with, and reports per count the perplexity, accuracy (and, for rows scored on labels or
a mask, exact match) and the forward FLOPs per token (:func:`flops_per_token`); at the largest count, the
logit lens per loop (each loop's state read out by the protocol's ``readout``) and the state's convergence
between loops (:func:`~loopscape.looped.exit.state_change`); and, for a loopified model with given
thresholds, the per-token exit histogram with the quality it keeps. It flags *overthinking* by
:data:`OVERTHINKING_RULE`. What is scored is a :class:`Scorer`: :class:`NextToken` (Hugging Face batches,
``labels`` optional) or :class:`Masked` (task rows: inputs, targets and the positions scored).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loopscape.looped.exit import Exit, state_change
from loopscape.looped.protocol import find_looped, loop_settings, weights_inside

OVERTHINKING_TOLERANCE = 0.01
OVERTHINKING_RULE = (
    "overthinking: the perplexity is lowest at some loop count k* below the largest count swept, and at the "
    f"largest count it is more than {OVERTHINKING_TOLERANCE:.0%} above its value at k*"
)


class NextToken:
    """Hugging Face batches (``input_ids``, ``attention_mask``, ``labels``): the outputs at ``0..W-2``
    predict the next token; padding is not scored; with ``labels`` (the model shifts them, -100 is not
    scored) only the labelled positions are, and rows by exact match too."""

    def logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}  # scored here, not by the model's own loss
        return model(**inputs, use_cache=False).logits

    def labelled(self, batches: list[dict]) -> bool:
        return any("labels" in b for b in batches)

    def scored(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets, scored) of the positions whose outputs are read."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids))
        target = batch["labels"][:, 1:] if "labels" in batch else ids[:, 1:]
        return target, (mask[:, 1:] * mask[:, :-1]).bool() & (target != -100)

    def scores(self, logits: torch.Tensor, batch: dict) -> list:
        target, keep = self.scored(batch)
        return _scores(logits[:, :-1], target, keep)

    def positions(self, batch: dict, state: torch.Tensor) -> torch.Tensor:
        """The tokens whose state change is averaged: every real (unpadded) one."""
        return batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()

    def exit_positions(self, batch: dict) -> torch.Tensor:
        return torch.nn.functional.pad(self.scored(batch)[1], (0, 1))  # outputs read, in input positions


class Masked:
    """Task rows ``{"inputs", "targets", "mask"}`` (e.g. an algorithmic task's answers): scored where
    ``mask`` holds, rows by exact match; the model is called as ``model(inputs)``."""

    def logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["inputs"])

    def labelled(self, batches: list[dict]) -> bool:
        return True

    def scores(self, logits: torch.Tensor, batch: dict) -> list:
        targets = batch["targets"]
        return _scores(logits.reshape(*targets.shape, -1), targets, batch["mask"])

    def positions(self, batch: dict, state: torch.Tensor) -> torch.Tensor:
        """Every position of the state (the answers read it, and so do the later positions)."""
        return torch.ones(state.shape[:-1], dtype=torch.bool, device=state.device)

    def exit_positions(self, batch: dict) -> torch.Tensor:
        return batch["mask"]


def _scores(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> list:
    """[summed NLL, correct predictions, scored positions, rows all right, scored rows]; a row is right when
    all its scored positions are."""
    logp = F.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(-1, target.clamp_min(0)[..., None])[..., 0][keep].sum().item()
    hit = logp.argmax(-1) == target
    scored = keep.any(-1)
    rows_right = ((hit | ~keep).all(-1) & scored).sum().item()
    return [nll, hit[keep].sum().item(), int(keep.sum()), rows_right, int(scored.sum())]


def quality_summary(totals, labelled: bool) -> dict:
    nll, correct, count, rows_right, rows = totals
    out = {"perplexity": math.exp(nll / count), "accuracy": correct / count, "tokens": count}
    if labelled:  # task rows: exact match of every labelled position
        out["exact_match"] = rows_right / rows
    return out


def flops_per_token(model: nn.Module, n_loops: int) -> float:
    """Forward FLOPs per token, 2 per weight multiply-add: the loop's weights as its ``weights_per_token``
    counts them at ``n_loops``, and every other weight of the model once, input embeddings left out (a
    look-up) and a tied LM head counted; attention's context-length term left out (the looped GPT's is
    :func:`~loopscape.models.looped_gpt.attention_flops`)."""
    looped = find_looped(model)
    inside = weights_inside(looped)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = {id(p) for p in embed.parameters()} if embed is not None else set()
    tied = getattr(head, "weight", None)
    total = looped.weights_per_token(n_loops)
    for p in model.parameters():
        if id(p) in inside or (id(p) in embeddings and p is not tied):
            continue
        total += p.numel()
    return 2.0 * total


@torch.no_grad()
def loop_sweep(
    model: nn.Module,
    batches: list[dict],
    loops: list[int],
    thresholds: list[float] = (),
    exit: str = "state",
    exit_loops: int | None = None,
    scorer: NextToken | Masked | None = None,
) -> dict:
    """See the module docstring. ``batches``: what ``scorer`` reads (default :class:`NextToken`); the exits
    (a loopified model only) run with at most ``exit_loops`` loops (default: the model's own ``n_loops``).
    The model's loop and exit settings are restored afterwards. ``per_batch`` holds each batch's quality
    at every count (e.g. one batch per test length)."""
    looped = find_looped(model)
    scorer = NextToken() if scorer is None else scorer
    if not loops or any(not isinstance(k, int) or k < 1 for k in loops):
        raise ValueError(f"loops must be a non-empty list of integers >= 1 (got {loops!r})")
    if not batches:
        raise ValueError("batches must hold at least one batch (got none)")
    if thresholds and not hasattr(looped, "exit"):
        raise ValueError(f"thresholds must be empty: {type(looped).__name__} has no per-token exit (loopify's)")
    trained, counts, labelled = looped.n_loops, sorted(set(loops)), scorer.labelled(batches)
    exits_at = trained if exit_loops is None else exit_loops
    model.eval()
    plain = {"exit": None} if hasattr(looped, "exit") else {}
    rows, per_batch = [], []
    for k in counts:
        with loop_settings(looped, n_loops=k, **plain):
            each = [scorer.scores(scorer.logits(model, b), b) for b in batches]
        per_batch.append([quality_summary(s, labelled) for s in each])
        quality = quality_summary(_sum(each), labelled)
        rows.append({"n_loops": k, **quality, "flops_per_token": flops_per_token(model, k)})
    with loop_settings(looped, n_loops=max(counts), **plain):
        lens, convergence = _lens(model, looped, batches, scorer, labelled)
    exits = [_exit_reading(model, looped, batches, scorer, Exit(exit, t), exits_at) for t in thresholds]
    best, flagged = overthinking(rows)
    return {
        "counts": rows,
        "per_batch": [[per_batch[i][j] for i in range(len(counts))] for j in range(len(batches))],
        "logit_lens": lens,
        "convergence": convergence,
        "exits": exits,
        "best_n_loops": best,
        "overthinking": flagged,
        "overthinking_rule": OVERTHINKING_RULE,
        "trained_n_loops": trained,
        "exit_loops": exits_at,
    }


def overthinking(rows: list[dict]) -> tuple[int, bool]:
    """``(best loop count, flagged)`` by :data:`OVERTHINKING_RULE`; ``rows`` sorted by ``n_loops``."""
    best = min(rows, key=lambda r: r["perplexity"])
    last = rows[-1]
    flagged = best["n_loops"] < last["n_loops"] and last["perplexity"] > best["perplexity"] * (
        1 + OVERTHINKING_TOLERANCE
    )
    return best["n_loops"], flagged


def _sum(totals: list[list]) -> list:
    out = [0, 0, 0, 0, 0]
    for t in totals:
        out = [x + y for x, y in zip(out, t)]
    return out


def _exit_reading(model, looped, batches: list[dict], scorer, policy: Exit, n_loops: int) -> dict:
    """Quality with per-token exit by ``policy``, and the loops used by the scored positions (the tokens
    whose outputs are read: with ``labels``, the answers' only)."""
    totals, used = [], []
    with loop_settings(looped, n_loops=n_loops, exit=policy):
        for batch in batches:
            totals.append(scorer.scores(scorer.logits(model, batch), batch))
            where = scorer.exit_positions(batch)
            held = looped.loops_used  # None at one loop: every token ran it
            held = torch.ones(where.shape, dtype=torch.long, device=where.device) if held is None else held
            used.append(held[where])
    used = torch.cat(used)
    histogram = {int(k): int(n) for k, n in zip(*torch.unique(used, return_counts=True))}
    return {
        "exit": policy.criterion,
        "threshold": policy.threshold,
        **quality_summary(_sum(totals), scorer.labelled(batches)),
        "histogram": histogram,
        "mean_loops": used.float().mean().item(),
    }


def _lens(model, looped, batches: list[dict], scorer, labelled: bool) -> tuple[list[dict], list[float]]:
    """Per loop at the model's loop count: the quality of each loop's state read out, and the mean relative
    change of the state from the previous loop over the scorer's positions."""
    per_loop, change, tokens = None, None, 0
    with looped.recording() as states:
        for batch in batches:
            scorer.logits(model, batch)
            scores = [scorer.scores(looped.readout(h), batch) for h in states]
            positions = scorer.positions(batch, states[0])
            deltas = [state_change(a, b)[positions].sum().item() for a, b in zip(states[:-1], states[1:])]
            if per_loop is None:
                per_loop, change = scores, deltas
            else:
                per_loop = [[x + y for x, y in zip(p, s)] for p, s in zip(per_loop, scores)]
                change = [x + y for x, y in zip(change, deltas)]
            tokens += int(positions.sum())
    lens = [{"loop": t + 1, **quality_summary(totals, labelled)} for t, totals in enumerate(per_loop)]
    for row in lens:
        del row["tokens"]
    return lens, [d / tokens for d in change]
