"""loopify on nine Hugging Face families: a per-(loop, layer) key-value cache, per-token exit, and a looped
model that stays an ordinary module tree (tiny models built offline from configs)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_families import FAMILIES, V, build  # noqa: E402

from loopscape.looped import from_pretrained  # noqa: E402
from loopscape.looped.decoder import (  # noqa: E402
    loop_logits,
    looped_layers,
    loopify,
    set_exit,
    set_n_loops,
)
from loopscape.looped.exit import state_change  # noqa: E402

GENERATION_FAMILIES = ("gpt2", "llama", "qwen2", "mistral")


def looped(family, dtype=torch.float64, **kwargs):
    return loopify(build(family, dtype=dtype), **{"layers": (1, 3), "n_loops": 3, **kwargs})


def _cache_of(out):
    return out.cache if "cache" in out else out.past_key_values


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_one_loop_exact_cache_equals_full_forward_and_round_trips(family, tmp_path):
    x = torch.randint(1, V, (2, 9))
    model = build(family, dtype=torch.float64)
    with torch.no_grad():
        original = model(input_ids=x).logits
        assert torch.equal(loopify(model, layers=(1, 3), n_loops=1)(input_ids=x).logits, original)
        set_n_loops(model, 3)
        full = model(input_ids=x, use_cache=False).logits
        prefill = model(input_ids=x[:, :6], use_cache=True)
        cache = _cache_of(prefill)
        assert len(cache.layers) == 4 + 2 * 2  # 4 layers, and loops 2 and 3 of the 2 looped layers
        decoded = [prefill.logits]
        for i in range(6, 9):  # one token at a time, as generate() does
            out = model(input_ids=x[:, i : i + 1], cache=cache, use_cache=True)
            cache = _cache_of(out)
            decoded.append(out.logits)
    assert (torch.cat(decoded, 1) - full).abs().max() < 1e-10
    assert not torch.allclose(full, original)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        back = from_pretrained(tmp_path, dtype=torch.float64).eval()
        # (Gemma recomputes its embedding scale in float32 on loading: 5e-8 apart, not bit for bit)
        assert (back(input_ids=x, use_cache=False).logits - full).abs().max() < 1e-6
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
        assert (plain(input_ids=x).logits - original).abs().max() < 1e-6  # plain loading: the unlooped model


def _generate(model, prompt, mask, use_cache, **kwargs):
    torch.manual_seed(7)
    out = model.generate(
        input_ids=prompt,
        attention_mask=mask,
        max_new_tokens=6,
        use_cache=use_cache,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("family", GENERATION_FAMILIES)
@pytest.mark.parametrize(
    "mode", [dict(do_sample=False), dict(do_sample=True, top_k=0), dict(do_sample=False, num_beams=3)]
)
def test_generate_with_the_cache_equals_generate_without_it(family, mode):
    """Greedy, seeded sampling and beam search, on a left-padded batch: the same tokens and scores."""
    model = looped(family)
    model.generation_config.pad_token_id = 0
    prompt = torch.randint(1, V, (2, 7))
    prompt[1, :3] = 0
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    with torch.no_grad():
        cached, cached_scores = _generate(model, prompt, mask, True, **mode)
        plain, plain_scores = _generate(model, prompt, mask, False, **mode)
    assert torch.equal(cached, plain)
    finite = torch.isfinite(plain_scores)
    assert torch.equal(finite, torch.isfinite(cached_scores))
    assert (cached_scores[finite] - plain_scores[finite]).abs().max() < 1e-10


def test_float32_cache_within_1e_4():
    model, x = looped("llama", dtype=torch.float32), torch.randint(1, V, (2, 12))
    with torch.no_grad():
        full = model(input_ids=x, use_cache=False).logits
        prefill = model(input_ids=x[:, :8], use_cache=True)
        rest = model(input_ids=x[:, 8:], cache=_cache_of(prefill), use_cache=True)
    assert (torch.cat([prefill.logits, rest.logits], 1) - full).abs().max() < 1e-4


def test_n_loops_between_generate_calls_and_refused_in_the_middle_of_one():
    model, prompt = looped("llama"), torch.randint(1, V, (1, 5))
    model.generation_config.pad_token_id = 0
    set_n_loops(model, 2)
    two = model.generate(prompt, max_new_tokens=5, do_sample=False)
    fresh = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=2)
    fresh.generation_config.pad_token_id = 0
    assert torch.equal(two, fresh.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False))

    class ChangeLoops(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == 7:
                set_n_loops(model, 3)
            return scores

    with pytest.raises(ValueError, match=r"^loopify: n_loops changed in the middle of a cached generation") as err:
        model.generate(prompt, max_new_tokens=5, do_sample=False, logits_processor=[ChangeLoops()])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_looped_model_is_an_ordinary_module_tree(family):
    model = build(family)
    layers = model.transformer.h if family == "gpt2" else model.model.layers
    keys, counts = list(model.state_dict()), [sum(p.numel() for p in layer.parameters()) for layer in layers]
    loopify(model, layers=(1, 3), n_loops=3)
    layers = model.transformer.h if family == "gpt2" else model.model.layers
    assert isinstance(layers, torch.nn.ModuleList) and len(list(layers)) == len(layers) == 4
    assert [sum(p.numel() for p in layer.parameters()) for layer in layers] == counts
    assert list(model.state_dict()) == keys
    assert isinstance(layers[1:3], torch.nn.ModuleList) and list(layers[1:3]) == [layers[1], layers[2]]
    calls = []
    handle = layers[2].register_forward_hook(lambda *a: calls.append(1))
    for layer in layers:
        layer.requires_grad_(False)
    assert not any(p.requires_grad for layer in layers for p in layer.parameters())
    with torch.no_grad():
        model(input_ids=torch.randint(1, V, (1, 4)))
    handle.remove()
    assert len(calls) == 3  # the user's hook sees every loop of its layer


@pytest.mark.parametrize("exit", ["kl", "entropy", "state"])
def test_exit_threshold_zero_is_full_depth_exactly(exit):
    x = torch.randint(1, V, (2, 8))
    with torch.no_grad():
        full = looped("llama", layers=(1, 4))(input_ids=x).logits  # kl, entropy: a range ending at the last layer
        model = looped("llama", layers=(1, 4), exit=exit, exit_threshold=0.0)
        assert torch.equal(model(input_ids=x).logits, full)
    assert torch.equal(looped_layers(model).loops_used, torch.full((2, 8), 3))


def test_state_exit_stops_each_token_where_its_state_settles():
    """Rows of one token attend only to themselves: each row's loops equal the first loop t >= 2 whose
    relative state change ||h_t - h_{t-1}|| / ||h_t|| is below the threshold, read from a full-depth run."""
    x = torch.randint(1, V, (16, 1))
    model = looped("llama", n_loops=6)
    with torch.no_grad(), looped_layers(model).recording() as recorded:
        model(input_ids=x, use_cache=False)
    states = torch.stack(recorded)[:, :, 0]  # (loops, rows, d)
    change = (states[1:] - states[:-1]).norm(dim=-1) / states[1:].norm(dim=-1)  # change[t-1]: after loop t+1
    threshold = change.median().item()
    below = change < threshold
    expected = torch.where(below.any(0), below.float().argmax(0) + 2, torch.full((16,), 6))
    set_exit(model, "state", threshold)
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
    assert torch.equal(looped_layers(model).loops_used[:, 0], expected)
    assert len(expected.unique()) > 1
    assert model.config.loopscape["exit"] == "state" and model.config.loopscape["exit_threshold"] == threshold


@pytest.mark.parametrize("exit", ["kl", "state"])
def test_exit_with_the_cache_equals_the_same_policy_without_it(exit):
    """The slow reference: the full forward of the whole sequence (no cache) with the same exit policy."""
    model, x = looped("llama", layers=(1, 4), n_loops=5), torch.randint(1, V, (2, 10))
    # the threshold: the median of the criterion over a full-depth run, so tokens exit at different loops
    if exit == "state":
        with torch.no_grad(), looped_layers(model).recording() as recorded:
            model(input_ids=x, use_cache=False)
        states = torch.stack(recorded)
        values = (states[1:] - states[:-1]).norm(dim=-1) / states[1:].norm(dim=-1)
    else:  # the criterion itself, on a full-depth run's states
        from loopscape.looped.exit import Exit

        loop = looped_layers(model)
        with torch.no_grad(), loop.recording() as recorded:
            model(input_ids=x, use_cache=False)
            values = torch.stack([Exit("kl").score(a, b, loop._lens_of) for a, b in zip(recorded, recorded[1:])])
    threshold = values.flatten().median().item()
    set_exit(model, exit, threshold, min_loops=2)
    with torch.no_grad():
        full = model(input_ids=x, use_cache=False).logits
        full_loops = looped_layers(model).loops_used.clone()
        prefill = model(input_ids=x[:, :6], use_cache=True)
        loops, logits, cache = [looped_layers(model).loops_used], [prefill.logits], _cache_of(prefill)
        for i in range(6, 10):
            out = model(input_ids=x[:, i : i + 1], cache=cache, use_cache=True)
            loops.append(looped_layers(model).loops_used)
            logits.append(out.logits)
    assert (torch.cat(logits, 1) - full).abs().max() < 1e-10
    assert torch.equal(torch.cat(loops, 1), full_loops)
    assert full_loops.min() >= 2 and len(full_loops.unique()) > 1


def test_loop_logits_reads_every_loop():
    model, x = looped("qwen2", n_loops=4), torch.randint(1, V, (2, 6))
    lens = loop_logits(model, x)
    assert lens.shape == (4, 2, 6, V) and not torch.allclose(lens[0], lens[-1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"exit": "halt"}, r"^exit must be one of \(None, 'kl', 'entropy', 'state'\) \(got 'halt'\)$"),
        ({"exit": "kl", "exit_threshold": -1.0}, r"^exit_threshold must be a number >= 0 \(got -1.0\)$"),
        ({"exit": "kl", "min_loops": 4}, r"^min_loops must be an integer from 1 to n_loops \(3\) \(got 4\)$"),
        ({"layers": (0, 5)}, r"^layers must be a pair \(start, stop\) with 0 <= start < stop <= 4 \(got \(0, 5\)\)$"),
    ],
)
def test_bad_exit_settings_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        looped("llama", **kwargs)


def test_structures_it_cannot_read_get_one_line():
    with pytest.raises(ValueError, match=r"^model must be a causal LM with its LM head .* LlamaModel has no output"):
        loopify(build("llama").model, layers=(0, 2), n_loops=2)

    class NoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 4)

        def get_output_embeddings(self):
            return self.head

    with pytest.raises(ValueError, match=r"^model must hold its decoder layers in an nn.ModuleList .* NoLayers"):
        loopify(NoLayers(), layers=(0, 1), n_loops=2)
    with pytest.raises(ValueError, match=r"^path must hold a model saved after loopscape.loopify"):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            build("gpt2").save_pretrained(d)
            from_pretrained(d)


def test_the_top_level_names():
    import loopscape

    assert loopscape.from_pretrained is from_pretrained and loopscape.set_exit is set_exit


def test_gradient_checkpointing_gives_the_same_gradients():
    x, grads = torch.randint(1, V, (2, 8)), []
    for checkpointing in (False, True):
        model = looped("llama").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])


def test_what_the_range_cannot_do_is_one_line():
    """readout after a cached decode step; an untied first loop (the model's own pass); per-loop LoRA under
    gradient checkpointing."""
    model, x = looped("llama"), torch.randint(1, V, (1, 6))
    loop = looped_layers(model)
    with torch.no_grad(), loop.recording() as states:
        out = model(input_ids=x[:, :5], use_cache=True)
        model(input_ids=x[:, 5:], cache=_cache_of(out), use_cache=True)
        with pytest.raises(ValueError, match=r"^readout reads a forward without a cache's past .* use_cache=False$"):
            loop.readout(states[-1])
    with pytest.raises(ValueError, match=r"^weights\[0\] must be empty for a loopified range"):
        loop.untie_loops([{0: torch.zeros(1)}])
    lora = looped("llama", loop_lora=2).train()
    lora.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match=r"^loop_lora cannot train under gradient checkpointing"):
        lora(input_ids=x, labels=x, use_cache=False).loss.backward()


@pytest.mark.parametrize("sharing", [None, "first", "cycle:2"])
def test_a_static_cache_generates_the_tokens_of_the_dynamic_one(sharing):
    """``cache_implementation="static"``: the cache slots are made like the model's own static layers (a
    revisited cycle slot is written at its positions, where a dynamic one is cut and appended), and greedy
    decoding gives the same tokens, with a per-token exit too."""
    model = loopify(build("llama"), layers=(1, 3), n_loops=3, kv_sharing=sharing)
    prompt = torch.randint(1, V, (1, 9), generator=torch.Generator().manual_seed(0))
    greedy = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    dynamic = model.generate(prompt, **greedy)
    assert torch.equal(model.generate(prompt, cache_implementation="static", **greedy), dynamic)
    with torch.no_grad(), looped_layers(model).recording() as states:
        model(input_ids=prompt, use_cache=False)
    set_exit(model, "state", state_change(states[0], states[1]).median().item(), min_loops=2)
    dynamic = model.generate(prompt, **greedy)
    assert torch.equal(model.generate(prompt, cache_implementation="static", **greedy), dynamic)
    assert len(looped_layers(model).exit_counts) > 1  # tokens exited at different loops


@pytest.mark.parametrize("sharing", [None, "first", "cycle:2"])
def test_a_looped_forward_is_one_graph_for_torch_compile(sharing):
    """torch.compile traces through the loop's hooks and the shared cache: one graph, no graph break (on this
    torch), with the cache and without. (An exit breaks the graph once a loop: whether every token has
    exited is a value the forward branches on.)"""
    import torch._dynamo as dynamo

    model = loopify(build("llama"), layers=(1, 3), n_loops=3, kv_sharing=sharing)
    ids = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(0))
    for use_cache in (False, True):
        dynamo.reset()
        with torch.no_grad():
            explained = dynamo.explain(model)(input_ids=ids, use_cache=use_cache)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons[:3]


def test_the_distribution_criteria_read_the_first_loops_top_k(monkeypatch):
    """KL after the first comparison is over the first state's top TOP_K tokens, renormalised, as worked out
    here from the readout (the final norm and head: the range ends at the last layer); with TOP_K at least
    the vocabulary it is the full KL."""
    import torch.nn.functional as F

    from loopscape.looped import exit as exits

    model, x = looped("llama", layers=(1, 4), n_loops=3), torch.randint(1, V, (2, 5))
    loop = looped_layers(model)
    with torch.no_grad(), loop.recording() as states:
        model(input_ids=x, use_cache=False)
        full = [F.log_softmax(loop.readout(h), -1) for h in states]
        for k in (V, 5):
            monkeypatch.setattr(exits, "TOP_K", k)
            rows = full[0].topk(k, -1).indices
            lp = [F.log_softmax(f.gather(-1, rows), -1) for f in full]
            memo = {}
            for t in (1, 2):
                got = exits.Exit("kl").score(states[t - 1], states[t], loop._lens_of, memo)
                want = (lp[t].exp() * (lp[t] - lp[t - 1])).sum(-1)
                assert (got - want).abs().max() < 1e-12
            if k == V:
                assert (got - (full[2].exp() * (full[2] - full[1])).sum(-1)).abs().max() < 1e-12


def test_beam_search_with_first_sharing_equals_it_without_the_cache():
    model = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=3, kv_sharing="first")
    prompt = torch.randint(1, V, (1, 7), generator=torch.Generator().manual_seed(5))
    beams = dict(max_new_tokens=8, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(
        model.generate(prompt, use_cache=True, **beams), model.generate(prompt, use_cache=False, **beams)
    )
