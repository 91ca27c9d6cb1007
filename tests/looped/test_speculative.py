"""Loop-speculative decoding: drafts at fewer loops, verified at full depth, give plain greedy decoding."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_families import V, build  # noqa: E402

from loopscape import generate_speculative, loopify  # noqa: E402
from loopscape.looped import set_exit  # noqa: E402
from loopscape.looped.decoder import looped_layers  # noqa: E402
from loopscape.looped.speculative import draft_model  # noqa: E402


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_greedy_output_is_full_depth_greedy_token_for_token(family):
    model = loopify(build(family, dtype=torch.float64), layers=(1, 3), n_loops=4)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    accepted = []
    for seed in range(3):
        prompt = torch.randint(1, V, (1, 7 + seed), generator=torch.Generator().manual_seed(seed))
        reference = model.generate(prompt, max_new_tokens=16, do_sample=False)
        for draft_loops in (1, 2, 3):
            for block in (1, 4):
                out, stats = generate_speculative(
                    model, prompt, draft_loops, max_new_tokens=16, num_draft_tokens=block, return_stats=True
                )
                assert torch.equal(out, reference), (family, seed, draft_loops, block)
                assert stats["accepted"] <= stats["drafted"] == stats["draft_forwards"]
                accepted.append(stats["acceptance"])
    # drafts were all kept in some runs and refused in others: both paths of the verifier ran
    assert max(accepted) == 1.0 and min(accepted) < 1.0


def test_it_stops_at_the_end_of_sequence_token_as_generate_does():
    model = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=3)
    prompt = torch.randint(1, V, (1, 6), generator=torch.Generator().manual_seed(1))
    free = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    eos = int(free[0, 6 + 5])  # the sixth new token ends the sequence
    first = int((free[0, 6:] == eos).nonzero()[0])
    out = generate_speculative(model, prompt, 1, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(out, free[:, : 6 + first + 1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"draft_loops": 3}, r"draft_loops must be an integer from 1 to n_loops - 1 \(2\) \(got 3\)"),
        ({"draft_loops": 0}, r"draft_loops must be an integer from 1 to n_loops - 1 \(2\) \(got 0\)"),
        ({"draft_loops": 1, "do_sample": True}, "decodes greedily: do_sample must be False"),
        ({"draft_loops": 1, "num_beams": 2}, "decodes greedily: do_sample must be False and num_beams 1"),
        ({"draft_loops": 1, "temperature": 0.5}, r"takes no \['temperature'\]"),
        ({"draft_loops": 1, "num_draft_tokens": 0}, r"num_draft_tokens must be an integer >= 1 \(got 0\)"),
    ],
)
def test_bad_arguments_are_one_line_naming_them(kwargs, message):
    model = loopify(build("llama"), layers=(1, 3), n_loops=3)
    with pytest.raises(ValueError, match=message):
        generate_speculative(model, torch.ones(1, 4, dtype=torch.long), **kwargs)


def test_a_batch_and_an_exit_are_refused():
    model = loopify(build("llama"), layers=(1, 3), n_loops=3)
    with pytest.raises(ValueError, match=r"input_ids must be one row, shape \(1, length\) \(got \(2, 4\)\)"):
        generate_speculative(model, torch.ones(2, 4, dtype=torch.long), 1)
    set_exit(model, "state", 1e-3)
    with pytest.raises(ValueError, match="needs a model without a per-token exit"):
        generate_speculative(model, torch.ones(1, 4, dtype=torch.long), 1)


def test_a_cycle_sharing_is_refused_and_first_sharing_is_exact():
    """A cycle's entries depend on how the tokens were read (one forward or one by one), so its verifier would
    not be its greedy decoding: refused. With "first", speculative output is the model's own greedy output."""
    model = loopify(build("llama"), layers=(1, 3), n_loops=3, kv_sharing="cycle:2")
    prompt = torch.randint(1, V, (1, 6), generator=torch.Generator().manual_seed(3))
    refused = r"^loop-speculative decoding needs kv_sharing None or 'first' \(got 'cycle:2'"
    with pytest.raises(ValueError, match=refused):
        generate_speculative(model, prompt, 1)
    draft = draft_model(loopify(build("llama"), layers=(1, 3), n_loops=3), 1)
    looped_layers(draft).kv_sharing = "cycle:2"  # after the draft was made: checked at each call
    with pytest.raises(ValueError, match=refused):
        draft.generate(prompt, max_new_tokens=2)
    looped_layers(model).kv_sharing = "first"
    greedy = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate_speculative(model, prompt, 1, max_new_tokens=10, eos_token_id=None), greedy)


def test_hf_assisted_generation_with_a_loop_draft_is_full_depth_greedy():
    """``draft_model(model, k)`` is a draft Hugging Face's assisted generation takes: greedy output equal to the
    model's own, and the model keeps its depth."""
    model = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=3)
    greedy = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    for seed in range(3):
        prompt = torch.randint(1, V, (1, 6), generator=torch.Generator().manual_seed(seed))
        full = model.generate(prompt, **greedy)
        for k in (1, 2):
            assert torch.equal(model.generate(prompt, assistant_model=draft_model(model, k), **greedy), full)
    assert looped_layers(model).n_loops == 3 and model.config.loopscape["n_loops"] == 3
    with pytest.raises(ValueError, match=r"^draft_loops must be an integer from 1 to n_loops - 1 \(2\) \(got 3\)$"):
        draft_model(model, 3)


@pytest.mark.slow
def test_hf_assisted_sampling_with_a_loop_draft_samples_the_full_depth_distribution():
    """HF's speculative acceptance rule with a 1-loop draft: the first sampled token follows the full-depth
    distribution (chi-square, 2000 draws, seed 0), not the draft's (the same test rejects it: power)."""
    from scipy.stats import chisquare

    model = loopify(build("llama", dtype=torch.float64), layers=(1, 3), n_loops=3)
    prompt = torch.randint(1, V, (1, 6), generator=torch.Generator().manual_seed(3))
    temperature, n = 0.1, 2000
    with torch.no_grad():
        full = torch.softmax(model(input_ids=prompt).logits[0, -1] / temperature, -1)
        draft_p = torch.softmax(model(input_ids=prompt, n_loops=1).logits[0, -1] / temperature, -1)
    draft = draft_model(model, 1)
    sample = dict(do_sample=True, temperature=temperature, top_k=0, max_new_tokens=2, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    draws = [int(model.generate(prompt, assistant_model=draft, **sample)[0, 6]) for _ in range(n)]
    counts = torch.bincount(torch.tensor(draws), minlength=V).double()

    def p_value(p):
        keep = p * n >= 5  # the rest pooled into one cell
        observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
        expected = torch.cat([p[keep], p[~keep].sum()[None]]) * n
        return chisquare(observed.numpy(), expected.numpy() / expected.sum().item() * n).pvalue

    assert p_value(full) > 1e-3 and p_value(draft_p) < 1e-3
