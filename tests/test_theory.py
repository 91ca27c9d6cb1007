import pytest
import torch
from torch.func import functional_call

from loopscape.experiments.theory import TheoryStudyConfig, check_bound
from loopscape.landscape.alignment import gradient_alignment
from loopscape.landscape.quadratic import RiverValley, decoupled_run, run, u_and_v_valleys, valley_force
from loopscape.landscape.river_valley import assumption1
from loopscape.models.linear_attn import looped_attn, single_attn


def test_gradient_descent_matches_closed_form_on_2d_quadratic():
    # L = 1/2 a v^2 - h r + c r v: theta = (v, r), x_{k+1} = (I - eta A) x_k + eta b
    a, c, h, eta = 2.0, 0.5, 1.0, 0.1
    land = RiverValley(
        torch.tensor([[a]], dtype=torch.float64),
        torch.tensor([[c]], dtype=torch.float64),
        torch.tensor([h], dtype=torch.float64),
    )
    tr = run(land, torch.tensor([1.0], dtype=torch.float64), eta=eta, steps=30)
    A = torch.tensor([[a, c], [c, 0.0]], dtype=torch.float64)
    b = torch.tensor([0.0, h], dtype=torch.float64)
    M = torch.eye(2, dtype=torch.float64) - eta * A
    x = torch.tensor([1.0, 0.0], dtype=torch.float64)
    for k in range(31):
        torch.testing.assert_close(torch.cat([tr.theta_V[k], tr.theta_R[k]]), x, rtol=1e-12, atol=1e-12)
        x = M @ x + eta * b
    assert run(land, torch.tensor([1.0], dtype=torch.float64), eta=0.05, steps=5, optimizer="adam").loss.shape == (6,)


def test_valley_force_closed_form():
    # Setting 1: C_K = sum_i (v_i^T theta0 / lambda_i) H_RV v_i (1 - (1 - eta lambda_i)^K)  (Appendix F, eq. 6)
    u, _, theta0 = u_and_v_valleys(d_V=6, d_R=3, seed=1)
    eta, K = 0.7, 25
    lam, V = torch.linalg.eigh(u.H_V)
    expected = sum((V[:, i] @ theta0) / lam[i] * (u.H_RV @ V[:, i]) * (1 - (1 - eta * lam[i]) ** K) for i in range(6))
    torch.testing.assert_close(valley_force(u, theta0, eta, K)[-1], expected, rtol=1e-10, atol=1e-12)
    tr = decoupled_run(u, theta0, eta, K)
    torch.testing.assert_close(tr.theta_R[-1], K * eta * u.h_R - expected, rtol=1e-10, atol=1e-10)


def test_u_and_v_valleys_meet_their_definitions():
    u, v, theta0 = u_and_v_valleys(d_V=12, kappa_v=50.0, delta=0.2)
    assert u.kappa <= 1.2 + 1e-12 and v.kappa == pytest.approx(50.0)
    assert torch.equal(u.H_RV, v.H_RV) and torch.equal(u.h_R, v.h_R)
    assert assumption1(u.valley_eigenvalues, v.valley_eigenvalues, eps=0.0)["holds"]
    assert v.force_bound(theta0) > u.force_bound(theta0)  # Corollary 1's direction


@pytest.mark.parametrize("quartic", [False, True])
def test_theorems_1_and_2_bounds_on_random_instances(quartic):
    r = check_bound(quartic, TheoryStudyConfig(instances=30, steps=200, seed=3))
    assert r["meeting_assumptions"] >= 10
    assert r["fraction_held"] == 1.0 and not r["counterexamples"]


def test_alignment_matches_finite_differences():
    torch.manual_seed(0)
    s = single_attn(embedding="random", d_model=4).double()
    lp = looped_attn(n_loops=3, embedding="random", d_model=4).double()
    x, y = torch.randint(0, 3, (40, 3)), torch.randint(0, 3, (40,))
    params = {n: p.detach() for n, p in s.named_parameters()}
    got = gradient_alignment(s, lp, params, x, y)
    buffers = dict(s.named_buffers())

    def fd_grad(model, name, eps=1e-6):
        g = torch.zeros_like(params[name])
        for idx in range(params[name].numel()):
            for sign in (1, -1):
                p = {k: v.clone() for k, v in params.items()}
                p[name].view(-1)[idx] += sign * eps
                loss = torch.nn.functional.cross_entropy(functional_call(model, {**buffers, **p}, (x,)), y)
                g.view(-1)[idx] += sign * loss / (2 * eps)
        return g

    for name in ("W_K", "W_Q"):
        inner = (fd_grad(s, name) * fd_grad(lp, name)).sum().item()
        assert got[name]["inner"] == pytest.approx(inner, rel=1e-6, abs=1e-10)
        assert -1 <= got[name]["cosine"] <= 1


def test_meets_assumption4_by_hand():
    from loopscape.landscape.alignment import meets_assumption4

    assert meets_assumption4(torch.diag(torch.tensor([1.0, 2.0])) + 0.1)
    assert not meets_assumption4(torch.diag(torch.tensor([1.0, -2.0])))
    assert not meets_assumption4(torch.ones(3, 3))  # ||eps|| = 2 > 0.5 * 1


@pytest.mark.parametrize("quartic", [False, True])
def test_closed_form_valley_gradient_matches_autograd(quartic):
    from loopscape.experiments.theory import random_instance

    land, theta0, _, _ = random_instance(torch.Generator().manual_seed(3), quartic)
    t = theta0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(land.loss(t, torch.zeros(land.H_RV.shape[0], dtype=t.dtype)), t)
    torch.testing.assert_close(land.valley_gradient(theta0), g, rtol=1e-12, atol=1e-12)
    # and the cumulative force agrees with the step-by-step run of the proofs' dynamics
    torch.testing.assert_close(
        valley_force(land, theta0, 0.01, 50), decoupled_run(land, theta0, 0.01, 50).river_force, rtol=1e-10, atol=1e-12
    )
