"""Loop-speculative decoding: draft tokens with fewer loops, verify them at full depth in one forward.

A looped model drafts for itself (as LayerSkip drafts with its early layers, and as Huginn's
``generate_speculative`` drafts with fewer recurrence steps): ``draft_loops`` loops propose
``num_draft_tokens`` tokens one by one, then the model at its own ``n_loops`` reads the pending token and
the whole draft in one forward, and keeps the longest run of drafted tokens that its own greedy choice
agrees with, plus its own next token (the correction, or a bonus token when every draft was kept). The
output is plain full-depth greedy decoding; only the number of full-depth forwards changes.

The cache: one per-(loop, layer) cache, made for ``n_loops``. A draft step at ``k < n_loops`` loops writes
the entries of loops ``1..k`` and of the layers outside the range; before verifying, every entry is cut back
to the tokens verified so far, so the verifier computes every loop of the drafted
positions afresh and the cache never holds a position at some loops and not at others. (The verifier could
keep the draft's entries of loops ``1..k``, which depend only on earlier loops; that saving is not taken.)

Greedy only, batch 1, no per-token exit, ``kv_sharing`` None or ``"first"``: sampling, a batch, an exit
policy or a cycle's sharing are refused in one line.
"""

from __future__ import annotations

import copy
import inspect
import types

import torch
from torch import nn

from loopscape.looped.protocol import find_looped


@torch.no_grad()
def generate_speculative(
    model: nn.Module,
    input_ids: torch.Tensor,
    draft_loops: int,
    max_new_tokens: int = 32,
    num_draft_tokens: int = 4,
    eos_token_id: int | None = None,
    return_stats: bool = False,
    **generate_kwargs,
):
    """Greedy decoding of a loopified Hugging Face causal LM, drafted at ``draft_loops`` loops and verified at
    the model's own ``n_loops`` (module docstring). Returns the ids (prompt and new tokens), and with
    ``return_stats`` also ``{"drafted", "accepted", "acceptance", "verify_forwards", "draft_forwards"}``."""
    from transformers import DynamicCache

    looped = find_looped(model)
    _check_draft(looped, draft_loops)
    if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be an integer >= 1 (got {num_draft_tokens!r})")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be one row, shape (1, length) (got {tuple(input_ids.shape)})")
    if generate_kwargs.get("do_sample") or generate_kwargs.get("num_beams", 1) != 1:
        raise ValueError("generate_speculative decodes greedily: do_sample must be False and num_beams 1")
    unknown = set(generate_kwargs) - {"do_sample", "num_beams"}
    if unknown:
        raise ValueError(f"generate_speculative takes no {sorted(unknown)} (it decodes greedily, batch 1)")
    if getattr(looped, "exit", None) is not None:
        raise ValueError("generate_speculative needs a model without a per-token exit (set_exit(model, None))")
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]) - {None}

    cache = DynamicCache()
    # transformers >= 5.24 names it `cache` (and deprecates the older `past_key_values`)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    logits = model(input_ids=input_ids, **{key: cache}, use_cache=True).logits
    ids = torch.cat([input_ids, logits[:, -1:].argmax(-1)], 1)  # the last token is pending: not in the cache
    stats = {"drafted": 0, "accepted": 0, "verify_forwards": 1, "draft_forwards": 0}
    while ids.shape[1] - input_ids.shape[1] < max_new_tokens and int(ids[0, -1]) not in stops:
        done = ids.shape[1] - 1  # positions the cache holds
        want = min(num_draft_tokens, max_new_tokens - (ids.shape[1] - input_ids.shape[1]))
        draft, token = [], ids[:, -1:]
        with looped.drafting(draft_loops):
            for _ in range(want):
                token = model(input_ids=token, **{key: cache}, use_cache=True).logits[:, -1:].argmax(-1)
                draft.append(token)
                stats["draft_forwards"] += 1
                if int(token) in stops:
                    break
        _cut(cache, done)
        block = torch.cat([ids[:, -1:], *draft], 1)
        verified = model(input_ids=block, **{key: cache}, use_cache=True).logits.argmax(-1)
        stats["verify_forwards"] += 1
        kept = 0
        while kept < len(draft) and int(draft[kept]) == int(verified[0, kept]):
            kept += 1
        stats["drafted"] += len(draft)
        stats["accepted"] += kept
        new = [*draft[:kept], verified[:, kept : kept + 1]]
        _cut(cache, done + kept + 1)  # the pending token and the kept drafts; the verifier's token is pending
        ids = torch.cat([ids, *new], 1)
        hit = [i for i, t in enumerate(ids[0, -len(new) :].tolist()) if t in stops]
        if hit:
            ids = ids[:, : ids.shape[1] - len(new) + hit[0] + 1]
    ids = ids[:, : input_ids.shape[1] + max_new_tokens]
    stats["acceptance"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else None
    return (ids, stats) if return_stats else ids


def draft_model(model: nn.Module, draft_loops: int) -> nn.Module:
    """``model`` at ``draft_loops`` loops, as Hugging Face's assisted generation takes a draft:
    ``model.generate(ids, assistant_model=draft_model(model, k), do_sample=...)`` drafts with ``k`` loops and
    verifies at the model's own depth, greedy (the model's own greedy output) or sampled by HF's speculative
    acceptance rule (as LayerSkip's ``assistant_early_exit`` drafts with the early layers). A shallow copy: every
    weight is the model's; its ``generate`` runs at ``k`` loops and keeps its own cache and generation config."""
    from loopscape.looped.decoder import _generate

    def generate(self, *args, **kwargs):  # checked again at each call: the model's settings may have moved
        _check_draft(find_looped(self), draft_loops)
        return _generate(self, *args, n_loops=draft_loops, **kwargs)

    _check_draft(find_looped(model), draft_loops)
    draft = copy.copy(model)
    draft.generation_config = copy.deepcopy(model.generation_config)
    draft.generate = types.MethodType(generate, draft)
    return draft


def _check_draft(looped, draft_loops) -> None:
    n = looped.n_loops
    if not isinstance(draft_loops, int) or isinstance(draft_loops, bool) or not 1 <= draft_loops < n:
        raise ValueError(f"draft_loops must be an integer from 1 to n_loops - 1 ({n - 1}) (got {draft_loops!r})")
    sharing = getattr(looped, "kv_sharing", None)
    if sharing is not None and sharing != "first":
        raise ValueError(
            f"loop-speculative decoding needs kv_sharing None or 'first' (got {sharing!r}: a cycle's verifier, reading "
            "the draft block in one forward, would see other entries than token-by-token decoding)"
        )


def _cut(cache, length: int) -> None:
    """Every entry of ``cache`` cut back to its first ``length`` positions (entries may differ in length after a
    draft, which transformers' ``crop`` does not allow for)."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # transformers < 4.56: lists of tensors
        for store in (cache.key_cache, cache.value_cache):
            store[:] = [t[..., :length, :] if torch.is_tensor(t) and t.dim() == 4 else t for t in store]
        return
    for layer in layers:
        if getattr(layer, "is_initialized", True) and getattr(layer, "keys", None) is not None:
            layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]
