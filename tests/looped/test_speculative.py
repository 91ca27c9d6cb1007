"""Loop-speculative decoding: drafts at fewer loops, verified at full depth, give plain greedy decoding."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_families import V, build  # noqa: E402

from loopscape import generate_speculative, loopify  # noqa: E402
from loopscape.looped import set_exit  # noqa: E402


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
    set_exit(model, "kl", 1e-3)
    with pytest.raises(ValueError, match="needs a model without a per-token exit"):
        generate_speculative(model, torch.ones(1, 4, dtype=torch.long), 1)
