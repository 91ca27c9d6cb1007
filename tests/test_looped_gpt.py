"""The looped GPT: per-sample steps, all-step logits, causality, adaptive stopping and the oracle."""

import pytest
import torch

from loopscape.models.looped_gpt import LoopedGPTConfig, adaptive_decode, exact_match, looped_gpt, oracle_decode


@pytest.fixture
def model():
    torch.manual_seed(0)
    return looped_gpt(6, d_model=32, n_heads=4, n_layers=2).eval()


def test_per_sample_steps_equal_one_sample_at_a_time(model):
    x = torch.randint(0, 6, (7, 9))
    steps = torch.tensor([3, 1, 4, 1, 2, 4, 6])
    batched = model(x, steps)
    for i in range(7):
        assert torch.allclose(batched[i], model(x[i : i + 1], int(steps[i]))[0], atol=1e-5)


def test_all_steps_are_the_models_with_fewer_steps(model):
    x = torch.randint(0, 6, (3, 5))
    every = model.all_loops(x, 4)
    for t in range(1, 5):
        assert torch.allclose(every[t - 1], model(x, t), atol=1e-5)


def test_single_attn_is_the_block_applied_once(model):
    x = torch.randint(0, 6, (2, 5))
    h = model.block(model.embed(x))  # h_1 = B(h_0 + E(x)) with h_0 = 0
    assert torch.allclose(model(x, 1), model.head(h), atol=1e-6)
    h2 = model.block(h + model.embed(x))  # input injection at step 2
    assert torch.allclose(model(x, 2), model.head(h2), atol=1e-5)


def test_without_injection_the_state_alone_is_looped():
    torch.manual_seed(0)
    m = looped_gpt(6, d_model=16, n_heads=2, input_injection=False).eval()
    x = torch.randint(0, 6, (2, 5))
    assert torch.allclose(m(x, 2), m.head(m.block(m.block(m.embed(x)))), atol=1e-6)


def test_causal_and_no_positional_encoding(model):
    x = torch.randint(0, 6, (1, 8))
    y = x.clone()
    y[0, 5:] = (y[0, 5:] + 1) % 6
    assert torch.allclose(model(x, 3)[0, :5], model(y, 3)[0, :5], atol=1e-5)  # the future is not read
    # NoPE: with causal attention position is only implicit; a shifted copy of a constant row gives equal outputs
    c = torch.full((1, 6), 2)
    out = model(c, 2)[0]
    assert torch.allclose(out[0], out[-1], atol=1e-4)


def test_gradients_flow_through_every_step(model):
    x = torch.randint(0, 6, (4, 5))
    model(x, torch.tensor([5, 5, 1, 2])).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


class Scripted(torch.nn.Module):
    """A stand-in whose per-step logits are given: adaptive stopping is checked against a hand count."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def all_loops(self, x, max_loops):
        return self.logits[:max_loops]


def test_adaptive_stopping_picks_the_most_confident_step():
    # 3 steps, 2 rows, 1 scored position, 2 classes; confidence = CE of a step against its own argmax
    sure, unsure = torch.tensor([5.0, 0.0]), torch.tensor([0.2, 0.0])
    logits = torch.stack(
        [
            torch.stack([unsure, unsure]),  # step 1: both unsure
            torch.stack([sure, unsure]),  # step 2: row 0 sure
            torch.stack([unsure, -sure]),  # step 3: row 1 sure (of class 1)
        ]
    )[:, :, None, :]  # (S, B, W=1, V)
    mask = torch.ones(2, 1, dtype=torch.bool)
    x = torch.zeros(2, 1, dtype=torch.long)
    pred, steps = adaptive_decode(Scripted(logits), x, mask, 3, per_sample=True)
    assert steps.tolist() == [2, 3] and pred[:, 0].tolist() == [0, 1]
    pred, steps = adaptive_decode(Scripted(logits), x, mask, 3)  # one step for the batch: mean confidence, 2 ties 3
    assert steps.tolist() == [2, 2]


def test_oracle_reads_at_T_n_and_exact_match(model):
    x = torch.randint(0, 6, (3, 4))
    steps = torch.tensor([1, 2, 3])
    assert torch.equal(oracle_decode(model, x, steps), model(x, steps).argmax(-1))
    t = torch.tensor([[1, 2], [1, 2]])
    p = torch.tensor([[0, 2], [1, 2]])
    m = torch.tensor([[False, True], [True, True]])
    assert exact_match(p, t, m).tolist() == [True, True]
    assert exact_match(p, t, torch.ones_like(m)).tolist() == [False, True]


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="n_heads must divide d_model"):
        LoopedGPTConfig(vocab_size=4, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_loops must be >= 1 for every sample"):
        looped_gpt(4, d_model=8, n_heads=2)(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]))
