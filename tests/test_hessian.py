import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from loopscape.data.markov import MarkovDataConfig, build_task
from loopscape.landscape.hessian import HessianOperator, StochasticLossError, weighted_batches
from loopscape.landscape.linalg import DenseOperator, dense_matrix, exact_spectrum, hutchpp_trace, lanczos, slq_density
from loopscape.models.linear_attn import looped_attn, single_attn
from loopscape.training.run import seeded

torch.set_default_dtype(torch.float32)


def mse_per_sample(out, y):
    return (out.squeeze(-1) - y) ** 2


def test_linear_regression_closed_form():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(40, generator=g, dtype=torch.float64)
    model = nn.Linear(5, 1, bias=False).double()
    op = HessianOperator(model, weighted_batches(X, y, batch_size=7), loss_fn=mse_per_sample)
    torch.testing.assert_close(dense_matrix(op), 2 * X.T @ X / 40, rtol=1e-12, atol=1e-12)


def test_logistic_regression_closed_form():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(60, 4, generator=g, dtype=torch.float64)
    y = (torch.rand(60, generator=g) < 0.5).double()
    model = nn.Linear(4, 1, bias=False).double()

    def bce(out, t):
        return F.binary_cross_entropy_with_logits(out.squeeze(-1), t, reduction="none")

    op = HessianOperator(model, weighted_batches(X, y, batch_size=16), loss_fn=bce)
    p = torch.sigmoid(X @ model.weight.detach().T).squeeze(-1)
    torch.testing.assert_close(dense_matrix(op), X.T @ torch.diag(p * (1 - p)) @ X / 60, rtol=1e-12, atol=1e-12)


def toy_setup(n_loops):
    _, task = build_task(MarkovDataConfig(n_train=120, n_val=10))
    with seeded(0):
        model = (
            looped_attn(n_loops=n_loops, embedding="random", d_model=4)
            if n_loops > 1
            else single_attn(embedding="random", d_model=4)
        )
    return model, task


def reference_hessian(model, x, y):
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    buffers = {n: b.double() for n, b in model.named_buffers()}
    names = list(params)

    def loss(flat):
        parts, i = {}, 0
        for n in names:
            k = params[n].numel()
            parts[n] = flat[i : i + k].view(params[n].shape)
            i += k
        return F.cross_entropy(functional_call(model, {**buffers, **parts}, (x,)), y)

    flat = torch.cat([params[n].reshape(-1) for n in names])
    return hessian(loss)(flat), loss, flat


@pytest.mark.parametrize("n_loops", [1, 3])
def test_toy_hessian_matches_torch_func_and_finite_differences(n_loops):
    model, task = toy_setup(n_loops)
    x, y = task.train.inputs, task.train.targets
    op = HessianOperator(model, weighted_batches(x, y, batch_size=50, dedupe="inputs"), dtype=torch.float64)
    H = dense_matrix(op)
    H_ref, loss, flat = reference_hessian(model, x, y)
    torch.testing.assert_close(H, H_ref, rtol=1e-9, atol=1e-11)
    # central finite differences of the gradient along a random direction
    g = torch.Generator().manual_seed(2)
    v = torch.randn(flat.numel(), generator=g, dtype=torch.float64)

    def grad_at(th):
        return torch.autograd.grad(loss(th.requires_grad_()), th)[0]

    eps = 1e-5
    fd = (grad_at(flat + eps * v) - grad_at(flat - eps * v)) / (2 * eps)
    torch.testing.assert_close(op.matvec(v), fd, rtol=1e-6, atol=1e-8)


def test_operator_leaves_model_untouched_and_refuses_dropout():
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    model.train()
    with pytest.raises(StochasticLossError, match="dropout"):
        HessianOperator(model, weighted_batches(x, y))
    model.eval()
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    state = torch.random.get_rng_state()
    op = HessianOperator(model, weighted_batches(x, y))
    op.matvec(v)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    model.train()
    HessianOperator(model, weighted_batches(x, y), allow_stochastic=True).matvec(torch.ones(op.shape[0]))
    assert model.training


@pytest.mark.parametrize("mode, most", [("pairs", 81), ("inputs", 27)])
def test_dedupe_keeps_the_loss_and_hessian(mode, most):
    model, task = toy_setup(3)
    x, y = task.train.inputs, task.train.targets
    a = HessianOperator(model, weighted_batches(x, y), dtype=torch.float64)
    b = HessianOperator(model, weighted_batches(x, y, dedupe=mode), dtype=torch.float64)
    assert sum(len(bb[0]) for bb in b.batches) <= most
    torch.testing.assert_close(a.loss(), b.loss(), rtol=1e-12, atol=0)
    v = torch.randn(a.shape[0], dtype=torch.float64)
    torch.testing.assert_close(a.matvec(v), b.matvec(v), rtol=1e-10, atol=1e-12)


def test_dedupe_inputs_needs_class_targets():
    with pytest.raises(ValueError, match="class-index"):
        weighted_batches(torch.zeros(4, 2), torch.zeros(4), dedupe="inputs")


def spiked(P=300, seed=0):
    """Well-separated outliers over a bulk, with a random eigenbasis."""
    g = torch.Generator().manual_seed(seed)
    eig = torch.cat(
        [torch.tensor([100.0, 50.0, 25.0, -30.0]), torch.rand(P - 4, generator=g, dtype=torch.float64)]
    ).double()
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    return (Q * eig) @ Q.T, eig


def test_lanczos_matches_eigh_largest_and_smallest():
    A, eig = spiked()
    op = DenseOperator(A)
    exact = torch.sort(eig, descending=True).values
    top = lanczos(op, k=5, which="LA")
    assert top.converged
    torch.testing.assert_close(top.eigenvalues, exact[:5], rtol=1e-8, atol=0)
    bottom = lanczos(op, k=3, which="SA")
    torch.testing.assert_close(bottom.eigenvalues, torch.sort(eig).values[:3], rtol=1e-8, atol=1e-10)


def test_lanczos_without_reorthogonalisation_shows_ghosts():
    A, eig = spiked()
    op = DenseOperator(A)
    ghosts = lanczos(op, k=6, which="LA", max_iter=200, reorth=False)
    # the converged outlier 100 reappears: two Ritz values near 100, where the matrix has one
    assert (ghosts.eigenvalues - 100).abs().lt(1e-6).sum() >= 2
    clean = lanczos(op, k=6, which="LA", max_iter=200, reorth=True)
    assert (clean.eigenvalues - 100).abs().lt(1e-6).sum() == 1
    torch.testing.assert_close(clean.eigenvalues, torch.sort(eig, descending=True).values[:6], rtol=1e-8, atol=0)


def test_lanczos_on_a_cluster_is_right_inside_and_across_k_and_a_loose_tolerance_stops_sooner():
    # the top three 1e-6 apart over a bulk below 8: asked for 1, 2 or 3 of them (the cluster straddling k, or
    # inside it), each eigenvalue is within its residual of the truth and the residuals within tol
    g = torch.Generator().manual_seed(0)
    P = 400
    eig = torch.cat([torch.tensor([10.0, 10 - 1e-6, 10 - 2e-6]), torch.rand(P - 3, generator=g) * 8.0]).double()
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    A = (Q * eig) @ Q.T
    for k in (1, 2, 3):
        loose, tight = (lanczos(DenseOperator(A), k=k, tol=tol) for tol in (1e-5, 1e-10))
        assert loose.converged and (loose.residuals <= 1e-5 * 10).all()
        assert ((loose.eigenvalues - eig[:k]).abs() <= loose.residuals + 1e-12).all()
        assert loose.iterations + 10 <= tight.iterations, (k, loose.iterations, tight.iterations)


class CountingOperator(DenseOperator):
    """Counts the batched products (``matmat`` calls) and their columns."""

    def __init__(self, A):
        super().__init__(A)
        self.calls = self.columns = 0

    def matmat(self, V):
        self.calls, self.columns = self.calls + 1, self.columns + V.shape[1]
        return super().matmat(V)


@pytest.mark.parametrize("block", [2, 3, 5])
def test_block_lanczos_matches_eigh_with_true_residuals_and_one_product_per_step(block):
    A, eig = spiked()
    op = CountingOperator(A)
    top = lanczos(op, k=5, which="LA", block=block, return_vectors=True)
    assert top.converged
    torch.testing.assert_close(top.eigenvalues, torch.sort(eig, descending=True).values[:5], rtol=1e-8, atol=0)
    # the reported residuals are the Ritz pairs' own, and the Ritz vectors orthonormal
    Y = top.eigenvectors
    torch.testing.assert_close(
        torch.linalg.vector_norm(A @ Y - Y * top.eigenvalues, dim=0), top.residuals, rtol=1e-3, atol=1e-12
    )
    torch.testing.assert_close(Y.T @ Y, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)
    # each step is one batched product of `block` columns, the Krylov dimension is their number
    assert op.columns == top.iterations == block * op.calls
    bottom = lanczos(DenseOperator(A), k=3, which="SA", block=block)
    torch.testing.assert_close(bottom.eigenvalues, torch.sort(eig).values[:3], rtol=1e-8, atol=1e-10)


def test_block_lanczos_goes_on_past_an_invariant_subspace():
    # rank 3: the second block already spans everything the operator reaches from the first;
    # the recurrence refills it with fresh directions instead of breaking down, and the zero
    # eigenvalues come out exactly, with orthonormal vectors
    U = torch.randn(50, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    A = U @ U.T
    result = lanczos(DenseOperator(A), k=5, block=2, return_vectors=True)
    assert result.converged
    exact = torch.linalg.eigvalsh(A).flip(0)[:5]
    torch.testing.assert_close(result.eigenvalues, exact, rtol=1e-10, atol=1e-12)
    Y = result.eigenvectors
    torch.testing.assert_close(Y.T @ Y, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(A @ Y, Y * result.eigenvalues, rtol=0, atol=1e-10)


def test_block_lanczos_spanning_the_whole_space_is_exact_and_a_bad_block_is_refused():
    A = torch.randn(10, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    A = A + A.T
    full = lanczos(DenseOperator(A), k=8, which="SA", block=2)  # five blocks of two: all of R^10
    assert full.converged and full.iterations == 10
    torch.testing.assert_close(full.eigenvalues, torch.linalg.eigvalsh(A)[:8], rtol=0, atol=1e-12)
    short = lanczos(DenseOperator(A), k=7, which="SA", block=3)  # three blocks of three: 9 of 10 dimensions
    assert not short.converged and short.iterations == 9
    for block in (0, 4):
        with pytest.raises(
            ValueError, match=rf"^block must be between 1 and the Krylov dimension limit less k \(3\) \(got {block}\)$"
        ):
            lanczos(DenseOperator(A), k=7, block=block)


def wasserstein1(x, wx, y, wy):
    grid = np.sort(np.concatenate([x, y]))
    cx = np.array([wx[x <= t].sum() for t in grid])
    cy = np.array([wy[y <= t].sum() for t in grid])
    return float((np.abs(cx - cy)[:-1] * np.diff(grid)).sum())


def test_slq_density_matches_exact_spectrum():
    A, eig = spiked(P=200)
    sd = slq_density(DenseOperator(A), n_probes=10, n_steps=80, seed=0)
    nodes, masses = sd.measure()
    assert masses.sum() == pytest.approx(1.0)
    e = eig.numpy()
    w1 = wasserstein1(nodes, masses, e, np.full(e.size, 1 / e.size))
    assert w1 < 0.02 * (e.max() - e.min())  # stated bound: 2% of the spectral range
    grid = np.linspace(e.min() - 5, e.max() + 5, 4000)
    assert np.trapezoid(sd.density(grid), grid) == pytest.approx(1.0, abs=1e-3)


def test_hutchpp_trace():
    A, eig = spiked(P=200)
    est = hutchpp_trace(DenseOperator(A), n_matvecs=90, seed=0)
    assert abs(est.trace - eig.sum().item()) < 4 * est.stderr + 1e-8
    assert est.stderr < 0.05 * abs(eig.sum().item())


def test_exact_spectrum_reports_asymmetry():
    A, eig = spiked(P=50)
    s = exact_spectrum(DenseOperator(A))
    torch.testing.assert_close(s.eigenvalues, torch.sort(eig).values, rtol=1e-10, atol=1e-10)
    assert s.asymmetry < 1e-14
    B = A.clone()
    B[0, 1] += 1.0
    assert exact_spectrum(DenseOperator(B)).asymmetry > 1e-4


def test_cached_graph_products_equal_recomputed_ones():
    model, task = toy_setup(3)
    batches = weighted_batches(task.train.inputs, task.train.targets, batch_size=40)
    a = HessianOperator(model, batches, dtype=torch.float64)
    b = HessianOperator(model, batches, dtype=torch.float64, cache_graph=True)
    v = torch.randn(a.shape[0], dtype=torch.float64)
    torch.testing.assert_close(a.matvec(v), b.matvec(v), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.matvec(v), b.matvec(v), rtol=0, atol=0)  # the graph survives reuse
    torch.testing.assert_close(dense_matrix(a), dense_matrix(b), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n_loops", [1, 3])
def test_stacked_hessians_equal_one_at_a_time(n_loops):
    """dense_at over several parameter vectors gives each one's Hessian, loss and spectrum."""
    from loopscape.landscape.linalg import dense_spectrum

    _, task = build_task(MarkovDataConfig(n_train=60, n_test=10))
    batches = weighted_batches(task.train.inputs, task.train.targets, dedupe="inputs")
    with seeded(0):
        model = looped_attn(n_loops=n_loops) if n_loops > 1 else single_attn()
    op = HessianOperator(model, batches, dtype=torch.float64)
    thetas = op.theta + 0.1 * torch.randn(
        4, op.theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    H, losses = op.dense_at(thetas)
    spectra = dense_spectrum(H)
    for i, th in enumerate(thetas):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(th.float(), model.parameters())
        one = HessianOperator(model, batches, dtype=torch.float64)
        one.theta = th  # exact float64 parameters, not their float32 copy in the model
        ref = dense_matrix(one)
        scale = ref.abs().max()
        assert (H[i] - ref).abs().max() <= 1e-12 * scale  # float64 rounding of two orders of differentiation
        assert losses[i].item() == pytest.approx(one.loss().item(), rel=1e-12)
        assert (spectra.eigenvalues[i] - exact_spectrum(one).eigenvalues).abs().max() <= 1e-12 * scale
    assert len(spectra.asymmetry) == 4 and max(spectra.asymmetry) < 1e-12


def test_hessian_at_leaves_the_model_as_it_was_and_needs_no_class_to_appear():
    """Targets drawn from classes 0 and 1 only, of a 3-class model: the class count is given, not inferred."""
    from loopscape.landscape.tracking import hessian_at

    with seeded(0):
        model = single_attn(max_len=3).double()
    x = torch.randint(0, 3, (30, 3), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (30,), generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in model.parameters()]
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach() + 0.3
    H = hessian_at(model, theta, x, y, num_classes=3)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    moved = single_attn(max_len=3).double()
    torch.nn.utils.vector_to_parameters(theta, moved.parameters())
    op = HessianOperator(moved, weighted_batches(x, y), dtype=torch.float64)
    ref = dense_matrix(op)
    torch.testing.assert_close(H, (ref + ref.T) / 2, rtol=1e-10, atol=1e-12)


def test_tracker_stores_float64_spectra(tmp_path):
    from loopscape.landscape.linalg import dense_spectrum
    from loopscape.landscape.tracking import HessianTracker, load_spectra

    _, task = build_task(MarkovDataConfig(n_train=60, n_val=10))
    with seeded(0):
        model = single_attn(max_len=3)
    tracker = HessianTracker(task.train.inputs, task.train.targets, 3, stack=1)
    tracker.open(tmp_path, 0)
    tracker.update(0, model)
    tracker.close()
    _, eigs = load_spectra(tmp_path / "spectra.jsonl")
    op = HessianOperator(model, tracker.batches, dtype=torch.float64)
    H, _ = op.dense_at(op.theta[None])
    assert np.array_equal(eigs[0], dense_spectrum(H).eigenvalues[0].numpy())  # every float64 bit kept


def test_a_warm_start_from_the_last_ritz_vectors_needs_far_fewer_products():
    # nearly equal top eigenvalues, moved a little between two measurements: cold Lanczos needs many products
    # to resolve the cluster to 1e-3; a block start from the last measurement's Ritz vectors spans it at once
    g = torch.Generator().manual_seed(5)
    P = 300
    top = torch.tensor([10.0, 9.99, 9.98, 9.97, 9.96])
    A_eig = torch.cat([top, torch.rand(P - 5, generator=g) * 9.0]).double()
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    A = (Q * A_eig) @ Q.T
    first = lanczos(DenseOperator(A), k=5, tol=1e-8, return_vectors=True)
    E = torch.randn(P, P, generator=g, dtype=torch.float64) * 1e-3
    B = A + (E + E.T) / 2
    cold = lanczos(DenseOperator(B), k=5, tol=1e-3)
    warm = lanczos(DenseOperator(B), k=5, tol=1e-3, start=first.eigenvectors)
    exact = torch.linalg.eigvalsh(B).flip(0)[:5]
    assert (cold.eigenvalues - exact).abs().max() < 1e-4 and (warm.eigenvalues - exact).abs().max() < 1e-4
    assert warm.converged and warm.iterations * 3 <= cold.iterations, (warm.iterations, cold.iterations)
    # one vector: plain Lanczos from it (the exact top eigenvector: the largest value in the first steps)
    u = torch.linalg.eigh(B).eigenvectors[:, -1]
    one = lanczos(DenseOperator(B), k=1, tol=1e-3, start=u, check_every=1)
    assert one.iterations <= 2 and one.eigenvalues[0] == pytest.approx(exact[0].item(), rel=1e-9)
    with pytest.raises(ValueError, match=r"^start must be a \(P, b\) or \(P,\) tensor of the operator's size P = 300"):
        lanczos(DenseOperator(B), k=5, start=torch.ones(7, 2))
