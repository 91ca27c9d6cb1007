"""loopify on tiny Hugging Face models built from configs (nothing is downloaded)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_families import V, family_config  # noqa: E402

from loopscape.looped.decoder import loop_logits, loopify, set_n_loops  # noqa: E402


def gpt2(n_layer=4):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=32, n_embd=32, n_layer=n_layer, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def llama(n_layer=4, cls=None):
    torch.manual_seed(0)
    return (cls or transformers.LlamaForCausalLM)(family_config("llama", n_layer)).eval()


FAMILIES = {"gpt2": gpt2, "llama": llama}


def unrolled(family, order, inject_at=None):
    """A plain model whose layers are the 4-layer model's in ``order`` (weights shared by copy), so
    HF's own forward runs the loop unrolled. ``inject_at``: (copy index, source index) adds the input
    of layer ``source`` to the input of layer ``copy`` (input injection), by a forward pre-hook."""
    base = FAMILIES[family]()
    plain = FAMILIES[family](n_layer=len(order))
    layers = plain.transformer.h if family == "gpt2" else plain.model.layers
    src = base.transformer.h if family == "gpt2" else base.model.layers
    for i, j in enumerate(order):
        layers[i].load_state_dict(src[j].state_dict())
    rest = {k: v for k, v in base.state_dict().items() if ".h." not in k and ".layers." not in k}
    plain.load_state_dict(rest, strict=False)
    if inject_at is not None:
        saved = {}
        for copy, source in inject_at:
            layers[source].register_forward_pre_hook(
                lambda m, a, kw, s=source: saved.__setitem__(s, a[0]), with_kwargs=True
            )

            def add(m, args, kwargs, s=source):
                return (args[0] + saved[s], *args[1:]), kwargs

            layers[copy].register_forward_pre_hook(add, with_kwargs=True)
    return plain


@pytest.mark.parametrize("family", FAMILIES)
def test_one_loop_is_the_original_model_exactly(family):
    model, x = FAMILIES[family](), torch.randint(0, V, (3, 9))
    with torch.no_grad():
        before = model(x).logits
        after = loopify(model, layers=(1, 3), n_loops=1)(x).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("family", FAMILIES)
def test_loops_equal_the_unrolled_model(family):
    """Layers 1..2 looped 3 times = layers [0, 1, 2, 1, 2, 1, 2, 3] run by HF's own forward;
    with injection, the range's input added before loops 2 and 3."""
    x = torch.randint(0, V, (2, 7))
    order = [0, 1, 2, 1, 2, 1, 2, 3]
    with torch.no_grad():
        plain = loopify(FAMILIES[family](), layers=(1, 3), n_loops=3, injection="none")(x).logits
        torch.testing.assert_close(plain, unrolled(family, order)(x).logits)
        injected = loopify(FAMILIES[family](), layers=(1, 3), n_loops=3)(x).logits
        torch.testing.assert_close(injected, unrolled(family, order, inject_at=[(3, 1), (5, 1)])(x).logits)
    assert not torch.allclose(plain, injected)


@pytest.mark.parametrize("family", FAMILIES)
def test_n_loops_changes_at_any_time_and_the_lens_reads_every_loop(family):
    model, x = FAMILIES[family](), torch.randint(0, V, (2, 6))
    loopify(model, layers=(0, 2), n_loops=1)
    with torch.no_grad():
        one = model(x).logits
        set_n_loops(model, 4)
        four = model(x).logits
        lens = loop_logits(model, x)
    assert lens.shape == (4, 2, 6, V) and not torch.allclose(one, four)
    # each loop's state is read out through the layers after the range (2, 3), the final norm and the head:
    # at the last loop, the model's own output
    assert torch.equal(lens[-1], four) and not torch.allclose(lens[0], lens[-1])
    assert model.config.loopscape == {
        "layers": [0, 2],
        "n_loops": 4,
        "injection": "add",
        "backprop_loops": None,
        "loop_lora": None,
        "lora_layers": None,
        "lora_loops": None,
        "exit": None,
        "exit_threshold": 0.0,
        "min_loops": 1,
        "kv_sharing": None,
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_its_cache_equals_greedy_decoding_written_out(family):
    model = loopify(FAMILIES[family](), layers=(1, 3), n_loops=2)
    prompt = torch.randint(1, V, (1, 4))
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)  # use_cache=True by default
    step_by_step = prompt
    with torch.no_grad():
        for _ in range(6):  # greedy decoding written out: each step reads the whole sequence
            step_by_step = torch.cat([step_by_step, model(step_by_step).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, step_by_step)
    assert model.config.use_cache and model.generation_config.use_cache is not False


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_back_with_the_loop_settings(family, tmp_path):
    model, x = loopify(FAMILIES[family](), layers=(1, 3), n_loops=3, injection="none"), torch.randint(0, V, (2, 5))
    model.save_pretrained(tmp_path)
    loaded = loopify(transformers.AutoModelForCausalLM.from_pretrained(tmp_path)).eval()
    assert loaded.config.loopscape["layers"] == [1, 3] and loaded.config.loopscape["n_loops"] == 3
    assert loaded.config.loopscape["injection"] == "none"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_and_padding_work_as_in_the_original(family):
    model = loopify(FAMILIES[family](), layers=(1, 3), n_loops=2)
    x = torch.randint(1, V, (2, 6))
    with torch.no_grad():
        out = model(x, labels=x)
        manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
        torch.testing.assert_close(out.loss, manual)
        padded = torch.cat([x[:1], torch.zeros(1, 3, dtype=torch.long)], dim=1)
        mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], dim=1).long()
        torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, :6], model(x[:1]).logits)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": (2, 2)}, r"layers must be a pair \(start, stop\) with 0 <= start < stop <= 4 \(got \(2, 2\)\)"),
        ({"layers": (0, 5)}, r"layers must be a pair \(start, stop\) with 0 <= start < stop <= 4 \(got \(0, 5\)\)"),
        ({"layers": (0, 2), "n_loops": 0}, r"n_loops must be an integer >= 1 \(got 0\)"),
        ({"layers": (0, 2), "injection": "cat"}, r"injection must be one of \('add', 'none', 'concat'\) \(got 'cat'\)"),
        ({}, r"layers must be a pair \(start, stop\) of decoder layer indices \(got None\)"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        loopify(gpt2(), **kwargs)


def test_a_model_without_an_lm_head_is_refused_in_one_line():
    config = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"causal LM with its LM head .* BertModel has no output embeddings"):
        loopify(transformers.BertModel(config), layers=(0, 1), n_loops=2)
    with pytest.raises(ValueError, match="has nothing to loop"):
        set_n_loops(torch.nn.Linear(2, 2), 2)


def test_a_depth_per_call_runs_that_call_only_in_forward_and_generate():
    """``model(x, n_loops=k)`` and ``model.generate(x, n_loops=k)`` equal the model set to ``k`` loops, and the
    model's own count is back afterwards, after a refused count too; a deep copy keeps its own hooks."""
    import copy

    from loopscape.looped import get_n_loops

    model = loopify(llama().eval(), layers=(1, 3), n_loops=2)
    x = torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        per_call = model(x, n_loops=4).logits
        assert get_n_loops(model) == 2 and model.config.loopscape["n_loops"] == 2
        own = model(x).logits
        set_n_loops(model, 4)
        four = model(x).logits
        greedy = model.generate(x[:1], max_new_tokens=5, do_sample=False)
        set_n_loops(model, 2)
        assert torch.equal(per_call, four) and not torch.allclose(own, four)
        assert torch.equal(model.generate(x[:1], max_new_tokens=5, do_sample=False, n_loops=4), greedy)
        assert get_n_loops(model) == 2
        with pytest.raises(ValueError, match=r"n_loops must be an integer >= 1 \(got 0\)"):
            model(x, n_loops=0)
        assert get_n_loops(model) == 2 and torch.equal(model(x).logits, own)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(x, n_loops=4).logits, four) and get_n_loops(twin) == 2 and get_n_loops(model) == 2
