"""The Hessian split by loop pairs: blocks against the dense tied Hessian, by hand, on every looped model."""

import numpy as np
import pytest
import torch
from torch import nn

from loopscape.landscape.hessian import HessianOperator
from loopscape.landscape.linalg import dense_matrix
from loopscape.landscape.loops import loop_hessian
from loopscape.looped.protocol import while_set
from loopscape.models.linear_attn import looped_attn, single_attn
from loopscape.models.looped_gpt import LoopedGPT, LoopedGPTConfig


class Scalar(nn.Module):
    """h_1 = w x, h_t = w h_{t-1}: one weight shared by T loops; a model of one's own implementing the loop
    protocol (loopscape.looped.Looped)."""

    def __init__(self, w: float, n_loops: int):
        super().__init__()
        self.cell, self.n_loops = nn.Linear(1, 1, bias=False).double(), n_loops
        self._untied, self._states = None, None
        with torch.no_grad():
            self.cell.weight.fill_(w)

    def looped_parameters(self):
        return [self.cell.weight]

    def untie_loops(self, weights):
        return while_set(self, "_untied", weights)

    def recording(self):
        return while_set(self, "_states", [])

    def readout(self, h):
        return h

    def weights_per_token(self, n_loops, last=None):
        return n_loops if last is None else min(last, n_loops)

    def forward(self, x):
        h = x
        for t in range(self.n_loops):
            own = self._untied[min(t, len(self._untied) - 1)] if self._untied else {}
            h = h * own[0][0, 0] if 0 in own else self.cell(h)
            if self._states is not None:
                self._states.append(h)
        return h


def half_square(out, y):
    return 0.5 * (out[:, 0] - y) ** 2


def _tied(model, data, names, loss_fn):
    named = dict(model.named_parameters())
    op = HessianOperator(model, data, dtype=torch.float64, params=[named[n] for n in names], loss_fn=loss_fn)
    return dense_matrix(op)


def _check_blocks(lh, model, data):
    H = _tied(model, data, lh.names, lh.op.loss_fn)
    T = lh.n_loops
    blocks = [[dense_matrix(lh.block(s, t)) for t in range(T)] for s in range(T)]
    scale = H.abs().max()
    assert (sum(b for row in blocks for b in row) - H).abs().max() <= 1e-8 * scale
    for s in range(T):
        for t in range(T):
            assert (blocks[s][t] - blocks[t][s].T).abs().max() <= 1e-8 * scale
    diagonal = dense_matrix(lh.diagonal())
    assert (diagonal - sum(blocks[t][t] for t in range(T))).abs().max() <= 1e-8 * scale
    assert (dense_matrix(lh.cross()) + diagonal - H).abs().max() <= 1e-8 * scale
    assert (dense_matrix(lh.full()) - H).abs().max() <= 1e-8 * scale
    return H, blocks


def test_two_loops_of_one_weight_by_hand():
    w, x, y = 0.7, 1.3, 0.4
    model = Scalar(w, 2)
    data = [(torch.tensor([[x]], dtype=torch.float64), torch.tensor([y], dtype=torch.float64))]
    lh = loop_hessian(model, data, loss_fn=half_square)
    assert lh.n_loops == 2
    # L(w1, w2) = (w2 w1 x - y)^2 / 2: H_11 = H_22 = w^2 x^2, H_12 = 2 w^2 x^2 - x y
    H, blocks = _check_blocks(lh, model, data)
    assert blocks[0][0].item() == pytest.approx(w**2 * x**2, rel=1e-12)
    assert blocks[1][1].item() == pytest.approx(w**2 * x**2, rel=1e-12)
    assert blocks[0][1].item() == pytest.approx(2 * w**2 * x**2 - x * y, rel=1e-12)
    assert H.item() == pytest.approx(6 * w**2 * x**2 - 2 * x * y, rel=1e-12)


def test_several_batches_untie_each_forward_from_its_first_loop():
    # two batches, two loops: the blocks are the sums of each batch's own (each batch weighted 1/2)
    w, xs, ys = 0.7, (1.3, -0.6), (0.4, 0.9)
    model = Scalar(w, 2)
    data = [(torch.tensor([[x]], dtype=torch.float64), torch.tensor([y], dtype=torch.float64)) for x, y in zip(xs, ys)]
    lh = loop_hessian(model, data, loss_fn=half_square)
    assert lh.n_loops == 2
    _, blocks = _check_blocks(lh, model, data)
    mean = lambda f: sum(f(x, y) for x, y in zip(xs, ys)) / 2  # noqa: E731
    assert blocks[0][0].item() == pytest.approx(mean(lambda x, y: w**2 * x**2), rel=1e-12)
    assert blocks[1][1].item() == pytest.approx(mean(lambda x, y: w**2 * x**2), rel=1e-12)
    assert blocks[0][1].item() == pytest.approx(mean(lambda x, y: 2 * w**2 * x**2 - x * y), rel=1e-12)


def test_one_loop_is_the_hessian():
    model = Scalar(0.7, 1)
    data = [(torch.tensor([[1.3]], dtype=torch.float64), torch.tensor([0.4], dtype=torch.float64))]
    lh = loop_hessian(model, data, loss_fn=half_square)
    assert lh.n_loops == 1
    assert dense_matrix(lh.cross()).abs().max() == 0
    assert dense_matrix(lh.block(0, 0)).item() == pytest.approx(
        _tied(model, data, lh.names, half_square).item(), rel=1e-12
    )


def test_the_linear_attention_toy_splits_exactly():
    torch.manual_seed(0)
    model = looped_attn(n_loops=3, vocab_size=3, max_len=3).double()
    data = [(torch.randint(0, 3, (8, 3)), torch.randint(0, 3, (8,)))]
    lh = loop_hessian(model, data)
    assert lh.n_loops == 3 and lh.names == ["W_V", "W_K", "W_Q"]
    _check_blocks(lh, model, data)
    m = lh.measure(k=3)
    assert m["exact"] and m["full"]["trace"] == pytest.approx(m["diagonal"]["trace"] + m["cross"]["trace"])
    # the shares against the dense blocks: u^T (sum of the off-diagonal blocks) u / lambda_1
    H, blocks = _check_blocks(lh, model, data)
    cross = sum(blocks[s][t] for s in range(3) for t in range(3) if s != t)
    eigs, vecs = torch.linalg.eigh(H)
    u = vecs[:, -1]
    assert m["cross_share_top"] == pytest.approx((u @ cross @ u / eigs[-1]).item(), rel=1e-8)
    assert m["cross_share_trace"] == pytest.approx((torch.trace(cross) / torch.trace(H)).item(), rel=1e-8)
    assert m["full"]["top"][0] == pytest.approx(eigs[-1].item(), rel=1e-10)


def test_the_looped_gpt_and_a_loopified_llama_split_exactly():
    torch.manual_seed(0)
    gpt = LoopedGPT(LoopedGPTConfig(vocab_size=5, d_model=8, n_heads=2, n_layers=1)).double().eval()

    class AtThree(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = gpt

        def forward(self, x):
            return self.model(x, 3)

    x = torch.randint(0, 5, (3, 4))
    data = [(x, torch.randint(0, 5, (3, 4)))]
    loss = lambda out, y: nn.functional.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)  # noqa: E731
    lh = loop_hessian(AtThree(), data, params="model.layers.0.attn.proj.*", loss_fn=loss)
    assert lh.n_loops == 3 and lh.names == ["model.layers.0.attn.proj.weight", "model.layers.0.attn.proj.bias"]
    _check_blocks(lh, AtThree(), data)

    transformers = pytest.importorskip("transformers")  # noqa: F841
    from hf_families import V, build

    from loopscape.looped.decoder import loopify

    llama = loopify(build("llama", n_layer=3, dtype=torch.float64), layers=(1, 2), n_loops=2)
    ids = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(0))
    hf_data = [{"input_ids": ids, "labels": ids}]
    lh = loop_hessian(llama, hf_data, params="model.layers.1.post_attention_layernorm.weight")
    assert lh.n_loops == 2
    _check_blocks(lh, llama, hf_data)


def test_bad_inputs_are_one_line():
    data = [(torch.randint(0, 3, (4, 5)), torch.randint(0, 3, (4,)))]
    with pytest.raises(ValueError, match=r"^model must loop some of its weights"):
        loop_hessian(nn.Sequential(nn.Linear(2, 2)), [(torch.ones(1, 2), torch.zeros(1, dtype=torch.long))])
    toy = looped_attn(n_loops=2, vocab_size=3, max_len=5).double()
    with pytest.raises(
        ValueError, match=r"^params must select looped weights only \(1 selected outside the loop, e\.g\. 'W_h'"
    ):
        loop_hessian(toy, data, params="W_*")
    lh = loop_hessian(toy, data)
    with pytest.raises(ValueError, match=r"^t must be a loop index from 0 to 1 \(got 2\)"):
        lh.block(0, 2)
    for k in (0, lh.shape[0] + 1):
        with pytest.raises(
            ValueError,
            match=rf"^k must be an integer between 1 and the number of weights split \({lh.shape[0]}\) \(got {k}\)$",
        ):
            lh.measure(k=k)
    with pytest.raises(ValueError, match=r"^t must be a loop index from 0 to 0 \(got 1\)"):  # one loop: no cross block
        loop_hessian(single_attn(vocab_size=3, max_len=5).double(), data).block(0, 1)


def test_full_and_diagonal_are_cut_at_one_eps_and_compared_over_the_grid():
    """measure() cuts every part at one eps (1e-3 x full's largest |lambda|); kappa_curves compares kappa of
    full and diagonal at each eps of the grid relative to full's largest |lambda|, by hand on given spectra."""
    from loopscape.landscape.loops import kappa_curves

    model = looped_attn(n_loops=3, vocab_size=3, max_len=3).double()
    x = torch.randint(0, 3, (6, 3), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(1))
    m = loop_hessian(model, [(x, y)]).measure(k=2, exact=True)
    top = max(abs(e) for e in m["full"]["eigenvalues"])
    assert m["full"]["valley"]["eps"] == m["diagonal"]["valley"]["eps"] == pytest.approx(1e-3 * top)
    given = {"full": {"eigenvalues": [100.0, 10.0, 1.0, 0.0]}, "diagonal": {"eigenvalues": [50.0, 25.0, 10.0, 0.0]}}
    c = kappa_curves(given)
    # eps = 1e-4 x 100 = 0.01: full's valley 100..1 (kappa 100), diagonal's 50..10 (kappa 5)
    assert c["kappa_curves"]["full"][0] == pytest.approx(100.0) and c["kappa_curves"]["diagonal"][0] == 5.0
    # eps = 0.1 x 100 = 10: full's valley is 100 alone (kappa 1), diagonal's 50, 25 (kappa 2): the smallest ratio
    assert c["kappa_curves"]["full"][-1] == 1.0 and c["kappa_curves"]["diagonal"][-1] == 2.0
    assert c["min_log10_ratio"] == pytest.approx(np.log10(0.5))


def test_the_loop_parts_run_in_chunks_that_fit_the_memory_budget():
    """A budget of one column per product: every part's matmat runs one column at a time (n_loops tangents
    each) and gives what the unchunked product gives."""
    toy = looped_attn(n_loops=3, vocab_size=3, max_len=4).double()
    data = [(torch.randint(0, 3, (6, 4), generator=torch.Generator().manual_seed(0)), torch.randint(0, 3, (6,)))]
    whole = loop_hessian(toy, data)
    small = loop_hessian(toy, data, chunk_size=1)
    V = torch.randn(whole.shape[0], 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calls = []
    original = small.full()._apply
    part = small.full()
    part._apply = lambda v: calls.append(v.shape) or original(v)
    assert torch.allclose(part.matmat(V), whole.full().matmat(V), rtol=1e-10, atol=1e-12)
    assert len(calls) == 5  # one product per column under the budget
