"""Compute accounting and length generalisation pieces, against hand-worked values and independent counts."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from loopscape.data.markov import MarkovLanguage
from loopscape.models.linear_attn import looped_attn
from loopscape.shift import compute


def test_forward_flops_by_hand():
    # n = 3, d = 6, V = 3: f(1) = 4*36 + 4*3*6 = 216; f(3) = 648; read-out 2*6*3 = 36
    assert compute.forward_flops(3, 6, 3, 1) == 216 + 36
    assert compute.forward_flops(3, 6, 3, 3) == 3 * 216 + 2 * 648 + 36
    # one epoch, N = 500 in 16 batches of <= 32: 3 * (500 * 252 + 16 * 2 * 216)
    assert compute.epoch_flops(500, 32, 3, 6, 3, 1) == 3 * (500 * 252 + 16 * 432)


@pytest.mark.parametrize("T", [1, 2, 3])
def test_forward_flops_match_torch_flop_counter(T):
    model = looped_attn(n_loops=T, max_len=3)
    x = torch.randint(0, 3, (32, 3))
    with FlopCounterMode(display=False) as fc:
        model(x)
    d = model.config.d
    assert fc.get_total_flops() == 32 * compute.forward_flops(3, d, 3, T) + (2 * T - 1) * 2 * d**3


def test_cumulative_cost_and_time_to_target():
    loops = np.array([[1, 1, 1, 3, 3], [3, 3, 3, 3, 3]])
    cum = compute.cumulative(loops, {1: 1.0, 3: 4.0})
    np.testing.assert_array_equal(cum, [[0, 1, 2, 6, 10], [0, 4, 8, 12, 16]])
    acc = np.array([0.1, 0.5, 0.7, 0.8, 0.8])
    assert compute.time_to_target(acc, cum[0], 0.7) == (2, 2.0)
    e, c = compute.time_to_target(acc, cum[0], 0.9)
    assert e is None and np.isnan(c)


@pytest.mark.parametrize("length", [4, 5, 8])
def test_bayes_prediction_is_the_argmax_of_the_tilted_conditional(length):
    lang = MarkovLanguage(3, 4, seed=2)
    seqs, p = lang.tilted_probabilities(2.0, length)
    inputs = torch.from_numpy(seqs[:, :-1])
    pred = lang.bayes_prediction(inputs)
    # brute force: for each prefix, the target with the largest total tilted probability
    for i in range(0, len(seqs), 3):  # sequences come in groups of V sharing a prefix
        assert pred[i].item() == int(np.argmax(p[i : i + 3]))


def test_cyclic_positions_read_any_length():
    model = looped_attn(n_loops=3, max_len=3, positions="cyclic")
    x = torch.randint(0, 3, (4, 7))
    E = model.embed(x)
    torch.testing.assert_close(E[:, 3:6], model.embed(x[:, 3:6]))  # positions 3..5 reuse codes 0..2
    with pytest.raises(ValueError, match="max_len"):
        looped_attn(n_loops=3, max_len=3)(x)  # absolute positions refuse longer inputs


def test_the_papers_speedup_is_looped_epochs_saved_with_stage_one_free():
    assert compute.looped_epochs_speedup(600, 124) == pytest.approx(1.2605, abs=1e-4)  # Section 5's 1.26
    assert compute.looped_epochs_speedup(600, 0) == 1.0  # Looped-Attn from the start
    assert compute.looped_epochs_speedup(600, None) is None  # never switched: Single-Attn, not SHIFT
