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
    with torch.no_grad():  # the block's weights at 20x their initial scale: each loop changes what is read
        for p in model.layers.parameters():
            p.mul_(20 if p.dim() == 2 else 1)
    x = torch.randint(0, 6, (6, 8))
    steps = torch.tensor([1, 3, 2, 3, 1, 2])
    # independently: each sample on its own, at its own fixed loop count
    each = torch.cat([model(x[i : i + 1], int(steps[i])).argmax(-1) for i in range(len(x))])
    for t in (1, 2, 3):  # one loop count for the batch reads otherwise: this test tells them apart
        assert not torch.equal(each, model(x, t).argmax(-1))
    assert torch.equal(oracle_decode(model, x, steps), each)
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
    with pytest.raises(ValueError, match=r"read_in must be one of \('linear', 'embedding'\)"):
        LoopedGPTConfig(vocab_size=4, d_model=8, n_heads=2, read_in="table")


def test_read_in_is_a_linear_map_with_bias_on_one_hot_tokens():
    torch.manual_seed(0)
    m = looped_gpt(5, d_model=8, n_heads=2)
    x = torch.tensor([[0, 3, 4, 1]])
    one_hot = torch.eye(5)[x]
    torch.testing.assert_close(m.embed(x), one_hot @ m.read_in.weight.T + m.read_in.bias, rtol=0, atol=0)


def test_initialisation_is_the_authors():
    """Read-in and read-out at PyTorch's default (uniform within 1/sqrt(fan_in), biases too), the backbone
    N(0, 0.02) with residual projections N(0, 0.02/sqrt(2 layers)), biases 0; Unique Set's table N(0, 1)."""
    torch.manual_seed(0)
    V, d, layers = 52, 512, 4
    m = looped_gpt(V, d_model=d, n_heads=8, n_layers=layers)
    for lin, fan_in in ((m.read_in, V), (m.head, d)):
        bound = 1 / fan_in**0.5
        for p in (lin.weight, lin.bias):
            assert p.abs().max() <= bound and p.abs().max() > 0.95 * bound  # fills the interval
            assert abs(p.std().item() - bound / 3**0.5) < 0.1 * bound  # the uniform's sd
    layer = m.layers[0]
    for w, std in ((layer.attn.qkv.weight, 0.02), (layer.mlp.fc.weight, 0.02)):
        assert abs(w.std().item() - std) < 0.02 * std
    residual = 0.02 / (2 * layers) ** 0.5
    for w in (layer.attn.proj.weight, layer.mlp.proj.weight):
        assert abs(w.std().item() - residual) < 0.02 * residual
    assert all(b.abs().max() == 0 for b in (layer.attn.qkv.bias, layer.attn.proj.bias, layer.mlp.fc.bias))
    table = looped_gpt(V, d_model=d, n_heads=8, read_in="embedding").read_in.weight
    assert abs(table.std().item() - 1.0) < 0.02
    # the injected input is O(1) per coordinate, not 0.02: at d = 32 on Parity's 4 tokens its norm is about 2.3
    parity = looped_gpt(4, d_model=32, n_heads=4)
    assert 1.2 < parity.embed(torch.arange(4)).norm(dim=-1).mean() < 3.5


def test_normal_init_is_the_earlier_reading():
    torch.manual_seed(0)
    m = looped_gpt(6, d_model=256, n_heads=8, init="normal", read_in="embedding", head_bias=False)
    assert m.head.bias is None and isinstance(m.read_in, torch.nn.Embedding)
    for w in (m.read_in.weight, m.head.weight, m.layers[0].attn.proj.weight, m.layers[0].mlp.proj.weight):
        assert abs(w.std().item() - 0.02) < 0.002
