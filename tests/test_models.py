import pytest
import torch

from loopscape.models.linear_attn import LinearAttn, LinearAttnConfig, looped_attn, single_attn


def hand_model(n_loops: int) -> LinearAttn:
    # V = 2, token one-hot embedding (d = 2): x = [0, 1] gives E_0 = I, z_0 = e_1.
    m = LinearAttn(LinearAttnConfig(vocab_size=2, n_loops=n_loops, embedding="token"))
    with torch.no_grad():
        m.W_Q.copy_(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
        m.W_K.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        m.W_V.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        m.W_h.copy_(torch.eye(2))
    return m


def test_single_attn_forward_by_hand():
    # W_Q z0 = (2,1); W_K^T (2,1) = (3,1); E E^T = I; W_V (3,1) = (1,3); z1 = (0,1) + (1,3) = (1,4).
    logits = hand_model(1)(torch.tensor([[0, 1]]))
    assert torch.equal(logits, torch.tensor([[1.0, 4.0]]))


def test_looped_attn_forward_by_hand():
    # E_1 = I + W_V W_K^T W_Q = [[1,1],[1,4]]; z_1 = (1,4);
    # E_1 E_1^T = [[2,5],[5,17]]; W_K^T W_Q z_1 = (13,4); E_1 E_1^T (13,4) = (46,133);
    # W_V (46,133) = (133,46); z_2 = (1,4) + (133,46) = (134,50).
    logits = hand_model(2)(torch.tensor([[0, 1]]))
    assert torch.equal(logits, torch.tensor([[134.0, 50.0]]))


@pytest.mark.parametrize("embedding", ["onehot", "token", "random"])
def test_single_attn_is_the_papers_equation_written_out(embedding):
    """y = W_h (z_0 + W_V E E^T W_K^T W_Q z_0), E = g(X) in the paper's (d x n) layout, one sample at a time."""
    torch.manual_seed(0)
    a = single_attn(embedding=embedding).double()
    x = torch.randint(0, 3, (16, 3))
    got = a(x)
    for i in range(len(x)):
        E = a.embed(x[i]).T  # (d, n)
        z0 = E[:, -1]
        z1 = z0 + a.W_V @ E @ E.T @ a.W_K.T @ a.W_Q @ z0
        torch.testing.assert_close(got[i], a.W_h @ z1, rtol=1e-12, atol=1e-12)


def test_query_state_is_last_column_of_embedding_state():
    # z_t and the last column of E_t follow the same update (Appendix D), so a
    # looped model's z_T equals the last row of E_T computed with all T updates.
    torch.manual_seed(1)
    m = looped_attn(n_loops=3, embedding="random", d_model=8)
    x = torch.randint(0, 3, (5, 6))
    E = m.embed(x)
    for _ in range(3):
        E = E + m.attn(E, E)
    torch.testing.assert_close(m(x), E[:, -1] @ m.W_h.T)


def test_embedding_is_fixed_and_any_length_works():
    m = looped_attn(n_loops=3)
    assert {n for n, p in m.named_parameters()} == {"W_V", "W_K", "W_Q", "W_h"}
    assert m(torch.randint(0, 3, (2, 16))).shape == (2, 3)
    with pytest.raises(ValueError, match="max_len"):
        m(torch.randint(0, 3, (2, 17)))


def test_invalid_model_settings():
    with pytest.raises(ValueError, match="n_loops"):
        LinearAttn(LinearAttnConfig(vocab_size=3, n_loops=0))
    with pytest.raises(ValueError, match="embedding"):
        LinearAttn(LinearAttnConfig(vocab_size=3, embedding="learned"))
    with pytest.raises(ValueError, match="vocab_size must be set"):  # a study's section until the data fills it in
        LinearAttn(LinearAttnConfig())


@pytest.mark.parametrize("n_loops", [1, 3])
def test_normalise_by_length_is_f_divided_by_n(n_loops):
    """At one input length n, f / n is the unnormalised model with W_V / n (f is linear in W_V)."""
    torch.manual_seed(0)
    plain = looped_attn(n_loops=n_loops, max_len=3, positions="cyclic")
    mean = looped_attn(n_loops=n_loops, max_len=3, positions="cyclic", normalise_by_length=True)
    mean.load_state_dict(plain.state_dict())
    for n in (3, 7):
        x = torch.randint(0, 3, (5, n))
        with torch.no_grad():
            scaled = looped_attn(n_loops=n_loops, max_len=3, positions="cyclic")
            scaled.load_state_dict(plain.state_dict())
            scaled.W_V.div_(n)
        torch.testing.assert_close(mean(x), scaled(x))
        assert not torch.allclose(mean(x), plain(x))


def test_the_untied_control_starts_as_the_same_function_with_its_own_weights_per_loop():
    """untied_like: every loop a copy of Looped-Attn's W_Q, W_K, W_V (the same outputs at the start), and after one
    gradient step the loops differ (nothing shared), while the tied model's three loops stay one matrix."""
    import torch.nn.functional as F

    from loopscape.models.linear_attn import looped_attn, untied_like

    torch.manual_seed(0)
    tied = looped_attn(n_loops=3, vocab_size=3, max_len=3, positions="cyclic_end").double()
    untied = untied_like(tied).double()
    x = torch.randint(0, 3, (16, 3))
    y = torch.randint(0, 3, (16,))
    assert torch.equal(tied(x), untied(x))
    assert sum(p.numel() for p in untied.parameters()) == sum(p.numel() for p in tied.parameters()) + 2 * 3 * 36
    F.cross_entropy(untied(x), y).backward()
    g1, g2 = untied.loop_weights(1)[0].grad, untied.loop_weights(2)[0].grad
    assert g1 is not None and g2 is not None and not torch.allclose(g1, g2)
    assert untied.looped_parameters() == []
