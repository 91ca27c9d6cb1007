"""Shared key-value caches and an exit that skips work, each against a slow reference of its policy.

The reference (:func:`reference`) knows nothing of loopify's hooks or of caches: it reads one token at a
time, runs the plain model's layers by hand on the positions up to it (the loop written out, injection
"add"), and puts in the keys and values the policy names for every earlier position by hooks on ``k_proj``
and ``v_proj`` (the projections before RoPE), from a store of every position's projections at every
(loop, layer). The last position's output is then what the policy defines."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_families import FAMILIES, V, build  # noqa: E402

from loopscape.looped.decoder import looped_layers, loopify, set_exit  # noqa: E402
from loopscape.looped.exit import state_change  # noqa: E402
from loopscape.looped.kv import cache_bytes, n_slots, slot  # noqa: E402

START, STOP, N = 1, 3, 4  # layers 1..2 of 4, looped 4 times


def _chosen(sharing, n_loops, t, q_exit):
    """The loop whose entry of an earlier token (exit loop ``q_exit``) loop ``t`` reads (module docstring)."""
    if sharing == "first":
        return 0
    if sharing is None:
        return min(t, q_exit)
    last = max(u for u in range(n_loops) if slot(sharing, u) == slot(sharing, t))  # the slot's last writer
    return min(last, q_exit)


def reference(plain, ids, sharing, threshold=None, min_loops=1):
    """Logits of each position and the loops it ran, one token at a time (module docstring)."""
    store: dict = {}  # (position, layer, loop) -> {"k": k_proj row, "v": v_proj row}
    exits: list[int] = []  # each earlier position's last loop (0-based)
    logits = [_read_position(plain, ids, p, store, exits, sharing, threshold, min_loops) for p in range(ids.shape[1])]
    return torch.stack(logits)[None], torch.tensor(exits) + 1


def _read_position(plain, ids, p, store, exits, sharing, threshold, min_loops):
    """Position ``p``'s logits, its projections added to ``store`` and its last loop to ``exits``."""
    layers, stack = plain.model.layers, plain.model
    now = {}  # the loop each layer runs for position p (outside the range: 0)

    def entry_of(i, q):  # the loop whose entry of position q layer i reads now
        if not START <= i < STOP:
            return 0
        if q == p:
            return 0 if sharing == "first" else now[i]
        return _chosen(sharing, N, now[i], exits[q])

    def hook(i, which):
        def substitute(module, args, out):
            out = out.clone()
            store.setdefault((p, i, now[i]), {})[which] = out[0, p].clone()
            for q in range(p + 1):
                if q < p or (sharing == "first" and now[i] >= 1):
                    out[0, q] = store[(q, i, entry_of(i, q))][which]
            return out

        return substitute

    handles = [
        h
        for i, layer in enumerate(layers)
        for h in (
            layer.self_attn.k_proj.register_forward_hook(hook(i, "k")),
            layer.self_attn.v_proj.register_forward_hook(hook(i, "v")),
        )
    ]
    x = stack.embed_tokens(ids[:, : p + 1])
    pe = stack.rotary_emb(x, torch.arange(p + 1)[None])

    def run(i, h, loop=0):
        now[i] = loop
        return layers[i](h, position_embeddings=pe, attention_mask=None)  # the last row: causal by itself

    try:
        for i in range(START):
            x = run(i, x)
        e = x
        for i in range(START, STOP):
            x = run(i, x)
        last = 0
        for t in range(1, N):
            h = x + e
            for i in range(START, STOP):
                h = run(i, h, t)
            before, x, last = x, h, t
            if threshold is not None and t + 1 >= min_loops and state_change(before[0, p], x[0, p]) < threshold:
                break
        for i in range(STOP, len(layers)):
            x = run(i, x)
    finally:
        for h in handles:
            h.remove()
    exits.append(last)
    return plain.lm_head(stack.norm(x))[0, p]


def _decode(model, ids, prefill):
    """The cached decode: ``prefill`` tokens in one forward, then one token at a time."""
    looped = looped_layers(model)
    out = model(input_ids=ids[:, :prefill], use_cache=True)
    cache, logits, used = out.past_key_values, [out.logits], [looped.loops_used]
    for i in range(prefill, ids.shape[1]):
        out = model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
        used.append(looped.loops_used)
    return torch.cat(logits, 1), (None if used[0] is None else torch.cat(used, 1)[0]), cache


def _model(sharing, **kwargs):
    plain = build("llama", dtype=torch.float64)
    model = loopify(copy.deepcopy(plain), layers=(START, STOP), n_loops=N, kv_sharing=sharing, **kwargs)
    return plain, model


def _threshold(model, ids):
    """The middle of a full-depth run's state changes: tokens then exit at different loops."""
    looped = looped_layers(model)
    with torch.no_grad(), looped.recording() as states:
        model(input_ids=ids, use_cache=False)
    s = torch.stack(states)
    values = state_change(s[:-1], s[1:]).flatten().sort().values
    k = len(values) // 2
    return (values[k - 1] + values[k]).item() / 2  # between two values: no token sits on the threshold


@pytest.mark.parametrize("sharing", [None, "first", "cycle:1", "cycle:2", "cycle:3"])
@pytest.mark.parametrize("exit", [False, True])
def test_the_cached_decode_is_the_policy_of_the_slow_reference(sharing, exit):
    torch.manual_seed(1)
    ids = torch.randint(1, V, (1, 10))
    plain, model = _model(sharing)
    threshold = None
    if exit:
        threshold = _threshold(model, ids)
        set_exit(model, "state", threshold, min_loops=2)
    prefill = 1 if sharing and sharing.startswith("cycle") else 5  # a cycle's prompt reads as without sharing
    with torch.no_grad():
        want, want_used = reference(plain, ids, sharing, threshold, min_loops=2)
        got, got_used, cache = _decode(model, ids, prefill)
    assert (got - want).abs().max() < 1e-10
    if exit:
        assert torch.equal(got_used, want_used) and len(want_used.unique()) > 1  # mixed exit depths
    # the cache holds the plain model's 4 layers, and the slots beyond the first of the 2 looped layers
    assert len(cache.layers) == 4 + 2 * (n_slots(sharing, N) - 1)


@pytest.mark.parametrize("sharing", [None, "first"])
def test_a_full_forward_is_the_same_policy_as_the_decode(sharing):
    """None and "first" read a prompt in one forward as token by token (a cycle does not: module docstring)."""
    torch.manual_seed(2)
    ids = torch.randint(1, V, (2, 9))
    plain, model = _model(sharing)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        decoded, _, _ = _decode(model, ids, 3)
        want = torch.cat([reference(plain, row[None], sharing)[0] for row in ids])
    assert (full - want).abs().max() < 1e-10 and (decoded - want).abs().max() < 1e-10


def test_first_sharing_changes_the_function_and_a_cycle_of_n_loops_is_no_sharing():
    torch.manual_seed(3)
    ids = torch.randint(1, V, (1, 8))
    with torch.no_grad():
        exact = _decode(_model(None)[1], ids, 1)[0]
        first = _decode(_model("first")[1], ids, 1)[0]
        cycle = _decode(_model(f"cycle:{N}")[1], ids, 1)[0]
    assert torch.equal(cycle, exact) and not torch.allclose(first, exact)


def test_cache_bytes_per_sharing():
    """Per-loop: 4 + 2 x 3 entries per token; first: the plain model's 4; cycle:2: 4 + 2."""
    ids = torch.randint(1, V, (1, 7))
    plain = build("llama", dtype=torch.float64)
    with torch.no_grad():
        base = cache_bytes(plain(input_ids=ids, use_cache=True).past_key_values)
        sizes = {s: cache_bytes(_decode(_model(s)[1], ids, 7)[2]) for s in (None, "first", "cycle:2")}
    assert sizes == {None: base * 10 // 4, "first": base, "cycle:2": base * 6 // 4}


def test_a_decode_step_whose_tokens_have_exited_runs_no_deeper_layer():
    """Every token exits after loop 2 (a huge threshold): loops 3 and 4 call no looped layer, in the prompt's
    forward and in each decode step."""
    _, model = _model(None)
    set_exit(model, "state", 1e9, min_loops=2)
    calls = []
    handle = looped_layers(model).range_layers()[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        _decode(model, torch.randint(1, V, (1, 6)), 3)  # a prompt of 3, then 3 decode steps
    handle.remove()
    assert len(calls) == 4 * 2  # per forward: loop 1 (the model's own pass) and loop 2


def test_a_partly_exited_batch_keeps_its_exited_rows():
    """Rows of one token each: a row that exits keeps its state while the others loop on; each row's logits
    are those of the row decoded alone."""
    torch.manual_seed(4)
    ids = torch.randint(1, V, (6, 1))
    _, model = _model(None)
    set_exit(model, "state", _threshold(model, ids), min_loops=2)
    looped = looped_layers(model)
    with torch.no_grad():
        together = model(input_ids=ids, use_cache=True).logits
        rows_used = looped.loops_used[:, 0].clone()
        alone = torch.cat([model(input_ids=row[None], use_cache=True).logits for row in ids])
    assert (together - alone).abs().max() < 1e-10 and len(rows_used.unique()) > 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"kv_sharing": "last"},
            r"^kv_sharing must be None, 'first' or 'cycle:K' with K from 1 to n_loops \(got 'last'\)$",
        ),
        (
            {"kv_sharing": "cycle:5"},
            r"^kv_sharing 'cycle:K' needs K an integer from 1 to n_loops \(4\) \(got 'cycle:5'\)$",
        ),
        (
            {"kv_sharing": "cycle:0"},
            r"^kv_sharing 'cycle:K' needs K an integer from 1 to n_loops \(4\) \(got 'cycle:0'\)$",
        ),
        ({"exit": "state", "exit_threshold": "x"}, r"^exit_threshold must be a number >= 0 \(got 'x'\)$"),
        ({"exit": "state", "exit_threshold": -0.5}, r"^exit_threshold must be a number >= 0 \(got -0.5\)$"),
        (
            {"exit": "kl"},
            r"^exit 'kl' reads each loop's next-token distribution, and 1 decoder layer follows the range",
        ),
    ],
)
def test_bad_sharing_and_exit_settings_are_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _model(kwargs.pop("kv_sharing", None), **kwargs)


def test_the_sharing_is_saved_and_loaded_back(tmp_path):
    from loopscape.looped import from_pretrained

    _, model = _model("cycle:2")
    model.save_pretrained(tmp_path)
    back = from_pretrained(tmp_path, dtype=torch.float64)
    assert looped_layers(back).kv_sharing == "cycle:2" and back.config.loopscape["kv_sharing"] == "cycle:2"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_decodes_first_sharing_and_the_exit_as_its_full_forward(family):
    """``"first"`` and the exit's entries read a prompt in one forward as token by token, in every family (its
    layers are handed the shared cache where they take their own, by keyword or by position)."""
    x = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(0))
    for sharing, threshold in (("first", None), (None, 0.3), ("first", 0.3)):
        model = loopify(build(family, dtype=torch.float64), layers=(1, 3), n_loops=3, kv_sharing=sharing)
        if threshold is not None:
            set_exit(model, "state", threshold, min_loops=2)
        with torch.no_grad():
            full = model(input_ids=x, use_cache=False).logits
            decoded, _, _ = _decode(model, x, 6)
        assert (decoded - full).abs().max() < 1e-10, (sharing, threshold)


def _sliding(window=4):
    from hf_families import GQA, TOKENS

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("mistral", **GQA, num_hidden_layers=4, sliding_window=window, **TOKENS)
    return transformers.AutoModelForCausalLM.from_config(config).to(torch.float64).eval()


@pytest.mark.parametrize("implementation", ["dynamic", "static"])
def test_a_cycle_on_a_sliding_window_cache_is_one_line(implementation):
    """A sliding window may drop or roll the positions a cycle's slot wrote: refused, dynamic or static."""
    model = loopify(_sliding(), layers=(1, 3), n_loops=3, kv_sharing="cycle:2")
    prompt = torch.randint(1, V, (1, 5))
    with pytest.raises(ValueError, match=r"^kv_sharing 'cycle:K' cannot rewrite a sliding-window cache layer"):
        model.generate(prompt, max_new_tokens=3, do_sample=False, cache_implementation=implementation, pad_token_id=0)


@pytest.mark.parametrize("sharing, threshold", [("first", None), (None, 0.3), ("first", 0.3)])
def test_past_a_sliding_window_first_sharing_and_the_exit_decode_as_the_full_forward(sharing, threshold):
    """A window of 4 over 12 tokens: the deeper loops attend to what loop 1 attended to (its window), not to
    what the cache keeps."""
    model = loopify(_sliding(), layers=(1, 3), n_loops=3, kv_sharing=sharing)
    if threshold is not None:
        set_exit(model, "state", threshold, min_loops=2)
    x = torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=x, use_cache=False).logits
        decoded, _, _ = _decode(model, x, 6)
    assert (decoded - full).abs().max() < 1e-10


def test_sharing_and_the_exit_refuse_gradient_checkpointing_and_a_change_mid_generation():
    _, model = _model("first")
    model.train()
    model.gradient_checkpointing_enable()
    x = torch.randint(1, V, (1, 6))
    with pytest.raises(ValueError, match=r"^kv_sharing cannot train under gradient checkpointing"):
        model(input_ids=x, labels=x, use_cache=False)
    model.gradient_checkpointing_disable()
    model.eval()
    with torch.no_grad():
        cache = model(input_ids=x, use_cache=True).past_key_values
        looped_layers(model).kv_sharing = None
        with pytest.raises(ValueError, match=r"^loopify: kv_sharing changed in the middle of a cached generation"):
            model(input_ids=x[:, :1], past_key_values=cache, use_cache=True)


def test_a_checkpoint_saved_with_a_refused_exit_loads_without_it(tmp_path):
    """Saved before loopscape refused KL on a range with layers after it: loads with a warning, no exit."""
    from loopscape.looped import from_pretrained

    _, model = _model(None)
    model.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"exit": null', '"exit": "kl"')
    (tmp_path / "config.json").write_text(config)
    with pytest.warns(UserWarning, match=r"exit 'kl' reads each loop's .*; the saved exit is dropped"):
        back = from_pretrained(tmp_path, dtype=torch.float64)
    assert looped_layers(back).exit is None and back.config.loopscape["exit"] is None
