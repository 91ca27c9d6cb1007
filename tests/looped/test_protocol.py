"""The loop protocol: the three looped models implement it, every tool finds it by one scan, and each model's
recording, readout and untying agree with an independent computation."""

import pytest
import torch
from torch import nn

from loopscape.looped import Looped, find_looped, get_n_loops, loop_settings, set_n_loops
from loopscape.models.linear_attn import looped_attn, untied_like
from loopscape.models.looped_gpt import LoopedGPT, LoopedGPTConfig


def gpt(**config) -> LoopedGPT:
    torch.manual_seed(0)
    return LoopedGPT(LoopedGPTConfig(vocab_size=5, d_model=8, n_heads=2, n_layers=2, **config)).double().eval()


def test_the_models_implement_the_protocol_and_one_scan_finds_it():
    toy = looped_attn(n_loops=3, vocab_size=3, max_len=4)
    model = gpt()
    for m in (toy, model):
        assert isinstance(m, Looped) and find_looped(m) is m
    assert find_looped(nn.Sequential(nn.Linear(2, 2), model)) is model  # inside a wrapper
    set_n_loops(nn.Sequential(model), 4)
    assert get_n_loops(model) == 4 and model.n_loops == 4
    with pytest.raises(ValueError, match=r"^model must be a looped model .* Linear has nothing to loop$"):
        find_looped(nn.Linear(2, 2))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=rf"^n_loops must be an integer >= 1 \(got {bad!r}\)$"):
            set_n_loops(model, bad)


def test_loop_settings_come_back_even_on_error():
    model = gpt()
    model.n_loops = 2
    with pytest.raises(RuntimeError, match="inside"):
        with loop_settings(model, n_loops=7) as looped:
            assert looped.n_loops == 7
            raise RuntimeError("inside")
    assert model.n_loops == 2


def test_readout_of_the_last_state_is_the_models_output_and_one_state_per_loop():
    x = torch.randint(0, 3, (6, 4), generator=torch.Generator().manual_seed(0))
    toy = looped_attn(n_loops=3, vocab_size=3, max_len=4).double()
    with toy.recording() as states:
        out = toy(x)
    assert len(states) == 3 and torch.equal(toy.readout(states[-1]), out)
    # every loop's readout is the model run at that many loops
    for t, z in enumerate(states, 1):
        with loop_settings(toy, n_loops=t):
            assert torch.equal(toy.readout(z), toy(x))
    model, ids = gpt(), torch.randint(0, 5, (3, 6), generator=torch.Generator().manual_seed(1))
    with model.recording() as states:
        out = model(ids, 4)
    assert len(states) == 4 and torch.equal(model.readout(states[-1]), out)
    assert torch.equal(model.all_loops(ids, 4)[1], model(ids, 2))


def test_untied_loops_read_their_own_weights():
    """Untying the toy with the copies of an unrolled model gives that model's output; untying the looped GPT's
    second loop gives a second model's block at that loop, written out by hand."""
    toy = looped_attn(n_loops=3, vocab_size=3, max_len=4).double()
    unrolled = untied_like(toy).double()
    with torch.no_grad():
        for w in unrolled.later:
            w.add_(0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(2), dtype=w.dtype))
    x = torch.randint(0, 3, (6, 4), generator=torch.Generator().manual_seed(0))
    weights = [{}] + [dict(enumerate(unrolled.loop_weights(t))) for t in (2, 3)]
    with toy.untie_loops(weights):
        untied = toy(x)
    assert torch.allclose(untied, unrolled(x), rtol=0, atol=1e-12) and not torch.allclose(untied, toy(x))

    a, b = gpt(), gpt()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05)
    ids = torch.randint(0, 5, (3, 6), generator=torch.Generator().manual_seed(1))
    own = dict(enumerate(p for p, _ in zip(b.looped_parameters(), a.looped_parameters())))
    with torch.no_grad(), a.untie_loops([{}, own]):
        untied = a(ids, 2)
    e = a.embed(ids)
    with torch.no_grad():
        by_hand = a.head(b.block(a.block(e) + e))
    assert torch.allclose(untied, by_hand, rtol=0, atol=1e-12) and not torch.allclose(untied, a(ids, 2))


def test_recordings_and_untyings_nest():
    toy = looped_attn(n_loops=2, vocab_size=3, max_len=4).double()
    x = torch.randint(0, 3, (4, 4), generator=torch.Generator().manual_seed(0))
    with toy.recording() as outer:
        with toy.recording() as inner:
            toy(x)
        toy(x)  # the outer recording goes on after the inner one
    assert len(inner) == 2 and len(outer) == 2 and toy._recording is None
    with toy.untie_loops([{}, {0: toy.W_Q * 2}]):
        with toy.untie_loops([{}]):
            shared = toy(x)
        untied = toy(x)
    assert torch.equal(shared, toy(x)) and not torch.equal(untied, shared)


def test_the_looped_gpt_records_one_state_per_loop_with_per_sample_counts_and_truncation():
    model = gpt(backprop_loops=1).train()
    ids = torch.randint(0, 5, (4, 6), generator=torch.Generator().manual_seed(1))
    counts = torch.tensor([1, 3, 2, 3])
    with model.recording() as states:
        model(ids, counts).sum().backward()  # the truncated path steps twice per loop (early and late rows)
    # loop t holds the rows still going, in descending order of their counts: 4, then 3, then 2 rows
    assert [len(h) for h in states] == [4, 3, 2]
