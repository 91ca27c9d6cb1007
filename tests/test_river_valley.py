import math

import pytest

from loopscape.landscape.river_valley import assumption1, valley_diagnostics


def test_valley_split_and_shape_by_hand():
    # eps = 1e-3 * 10 = 0.01: river {-1, 0, 0.005}, valley {0.2, 0.4, 10}
    d = valley_diagnostics([-1.0, 0.0, 0.005, 0.2, 0.4, 10.0])
    assert (d.n_river, d.d_valley) == (3, 3)
    assert d.kappa == pytest.approx(50.0) and d.shape == "V"
    assert d.m_tau == 2  # 0.2, 0.4 <= 0.5
    assert d.spectral_force == pytest.approx(math.sqrt(3) * (5 + 2.5 + 0.1))
    u = valley_diagnostics([0.0, 1.0, 1.5, 1.9], eps=0.1, delta=1.0)
    assert u.shape == "U" and u.kappa == pytest.approx(1.9)


def test_assumption1_by_hand():
    single = [0.0, 0.3, 0.45, 2.0]
    assert assumption1(single, [0.0, 0.1, 0.2, 0.4, 3.0], eps=0.01)["holds"]
    dim_only = assumption1(
        single, [0.0, 0.35, 0.2, 0.4, 3.0], eps=0.01
    )  # 0.2 < 0.3 but 0.35 >= 0.45? no: sorted 0.2,0.35,0.4
    assert dim_only["dimension"] and dim_only["dominance"]
    fails = assumption1(single, [0.0, 0.31, 0.5, 3.0], eps=0.01)
    assert fails["m_looped"] == 2 and not fails["dimension"] and not fails["dominance"]


def test_cumulative_force_by_hand():
    import torch

    from loopscape.landscape.river_valley import cumulative_force

    # reference H = diag(2, 4, 0): valley e1, e2 (eigenvalues 2, 4), river e3.
    H_ref = torch.diag(torch.tensor([2.0, 4.0, 0.0], dtype=torch.float64))
    H_later = H_ref.clone()
    H_later[2, 0] = H_later[0, 2] = 0.3  # coupling river-valley appears later
    f = cumulative_force(H_ref, [H_later], torch.tensor([1.0, 2.0, 5.0]), torch.tensor([0.0, 0.0, 7.0]))
    assert f["d_valley"] == 2
    assert f["h_bar"] == pytest.approx(0.3)
    assert f["alpha_bar"] == pytest.approx(5**0.5)
    assert f["C"] == pytest.approx(2**0.5 * 0.3 * 5**0.5 * (1 / 2 + 1 / 4))
