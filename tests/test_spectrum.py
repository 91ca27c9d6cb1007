import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loopscape.landscape.spectrum import (
    matrix_entropy,
    mutual_information,
    pair_metrics,
    spectral_entropy,
    trajectory_metrics,
)


def test_entropy_by_hand():
    # |lambda| = 0, 0, 1, 1 on bins [0, .5), [.5, 1]: p = (1/2, 1/2) -> log 2
    assert matrix_entropy([0.0, 0.0, -1.0, 1.0], edges=np.array([0, 0.5, 1.0])) == pytest.approx(np.log(2))
    assert matrix_entropy([3.0, 3.0, 3.0]) == pytest.approx(0.0)
    assert spectral_entropy([1.0, -1.0, 1.0, 1.0]) == pytest.approx(np.log(4))


def test_mutual_information_by_hand():
    edges = np.array([0, 0.5, 1.0])
    # identical two-level spectra: I = E = log 2
    assert mutual_information([0, 0, 1, 1], [0, 0, 1, 1], edges) == pytest.approx(np.log(2))
    # aligned by rank: largest with largest, so the same split gives I = log 2 again
    assert mutual_information([1, 0, 1, 0], [0, 1, 0, 1], edges) == pytest.approx(np.log(2))
    # a constant spectrum carries no information
    assert mutual_information([0, 0, 1, 1], [1, 1, 1, 1], edges) == pytest.approx(0.0)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(2, 60).flatmap(
        lambda n: st.tuples(
            st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=n, max_size=n),
            st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=n, max_size=n),
            st.integers(2, 80),
        )
    )
)
def test_mutual_information_is_bounded_by_both_entropies(args):
    a, b, bins = args
    m = pair_metrics(a, b, n_bins=bins)
    assert -1e-12 <= m["mutual_information"] <= min(m["entropy_s"], m["entropy_next"]) + 1e-12


def test_trajectory_lengths():
    rng = np.random.default_rng(0)
    spectra = [rng.normal(size=30) for _ in range(5)]
    t = trajectory_metrics(spectra)
    assert t["entropy"].shape == (5,) and t["mutual_information"].shape == (4,)


def test_plotted_trajectory_satisfies_the_bound_on_every_consecutive_pair():
    """Spectra whose scale changes along the run (as Looped-Attn's do): with a binning per pair the
    plotted E(H_s+1) came from the next pair's binning and the bound failed; on one binning it holds."""
    rng = np.random.default_rng(3)
    spectra = [rng.normal(size=40) * scale for scale in np.geomspace(0.1, 10.0, 30)]
    t = trajectory_metrics(spectra, n_bins=20)
    for s in range(len(spectra) - 1):
        assert t["mutual_information"][s] <= min(t["entropy"][s], t["entropy"][s + 1]) + 1e-12
    edges = np.linspace(0, max(np.abs(x).max() for x in spectra), 21)
    assert t["entropy"][4] == matrix_entropy(spectra[4], edges)  # E(H_s) on the run's one binning
