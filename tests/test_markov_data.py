import numpy as np
import pytest
import torch
from scipy import stats

from loopscape.data.markov import MarkovLanguage, SequenceSet, bayes_ceiling


def chi2_pvalue(samples: np.ndarray, seqs: np.ndarray, p: np.ndarray) -> float:
    """Pearson chi-square of sampled sequences against exact probabilities, pooling cells with expected count < 5."""
    V = int(seqs.max()) + 1

    def code(x):
        return (x * V ** np.arange(x.shape[1])[::-1]).sum(1)

    index = {c: i for i, c in enumerate(code(seqs))}
    observed = np.bincount([index[c] for c in code(samples)], minlength=len(seqs)).astype(float)
    expected = p * len(samples)
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return stats.chisquare(obs, exp).pvalue


def test_transitions_are_distinct_stochastic_matrices():
    lang = MarkovLanguage(3, 4, seed=0)
    assert lang.transitions.shape == (3, 3, 3)
    np.testing.assert_allclose(lang.transitions.sum(-1), 1.0)
    assert not np.allclose(lang.transitions[0], lang.transitions[1])


@pytest.mark.parametrize("length", [4, 7])
def test_probabilities_sum_to_one(length):
    lang = MarkovLanguage(3, 4, seed=3)
    p = np.exp2(lang.log2_prob(lang.enumerate(length)))
    assert p.sum() == pytest.approx(1.0, abs=1e-12)


def test_ic_by_hand():
    lang = MarkovLanguage(2, 3, seed=0)
    T1, T2 = lang.transitions
    x = np.array([[1, 0, 1]])
    expected = -np.log2(0.5 * T1[1, 0] * T2[0, 1])
    assert lang.information_content(x)[0] == pytest.approx(expected)
    # cyclic: at length 5 the steps use T1, T2, T1, T2
    y = np.array([[0, 1, 1, 0, 0]])
    expected = -np.log2(0.5 * T1[0, 1] * T2[1, 1] * T1[1, 0] * T2[0, 0])
    assert lang.information_content(y)[0] == pytest.approx(expected)


def test_enumerated_sampler_matches_tilted_distribution():
    lang = MarkovLanguage(3, 4, seed=1)
    seqs, p = lang.tilted_probabilities(alpha=2.0)
    samples = lang.sample_enumerated(30000, 2.0, np.random.default_rng(0))
    assert chi2_pvalue(samples, seqs, p) > 1e-3


@pytest.mark.parametrize("length", [4, 6])
def test_tilted_chain_sampler_matches_enumeration(length):
    lang = MarkovLanguage(3, 4, seed=2)
    seqs, p = lang.tilted_probabilities(alpha=2.0, length=length)
    samples = lang.sample_tilted_chain(40000, 2.0, length, np.random.default_rng(1))
    assert chi2_pvalue(samples, seqs, p) > 1e-3


def test_chi2_check_rejects_a_wrong_sampler():
    # The same check must fail when the tilt is wrong (alpha = 1 draws judged against alpha = 2).
    lang = MarkovLanguage(3, 4, seed=2)
    seqs, p = lang.tilted_probabilities(alpha=2.0, length=5)
    samples = lang.sample_tilted_chain(40000, 1.0, 5, np.random.default_rng(1))
    assert chi2_pvalue(samples, seqs, p) < 1e-6


def test_tilted_chain_handles_long_sequences():
    lang = MarkovLanguage(3, 4, seed=0)
    x = lang.sample_tilted_chain(1000, 2.0, 60, np.random.default_rng(0))
    assert x.shape == (1000, 60) and x.min() >= 0 and x.max() < 3
    assert np.isfinite(lang.information_content(x)).all()


def test_training_set_holds_every_sequence_and_ic_groups():
    lang = MarkovLanguage(3, 4, seed=0)
    train = lang.training_set(500, 2.0, np.random.default_rng(0))
    assert len(train) == 500
    assert torch.equal(train.tokens[:81], torch.from_numpy(lang.enumerate()))
    low, high = train.ic_groups()
    assert low.sum() == high.sum() == 200 and not (low & high).any()
    assert train.ic[low].max() <= train.ic[high].min()
    small = lang.training_set(50, 2.0, np.random.default_rng(0))
    assert len(small) == 50


def test_bayes_ceiling_by_hand():
    # inputs (0,0) -> targets 1, 1, 2 (majority 1); input (1,1) -> 0, 2 (tie: smallest, 0)
    tokens = torch.tensor([[0, 0, 1], [0, 0, 1], [0, 0, 2], [1, 1, 0], [1, 1, 2]])
    s = SequenceSet(tokens, torch.zeros(5, dtype=torch.float64))
    assert bayes_ceiling(s).tolist() == [True, True, False, True, False]


def test_aligned_language_ends_every_test_sequence_with_the_training_targets_transition():
    lang = MarkovLanguage(3, 4, seed=0)  # T_1, T_2, T_3
    T1, T2, T3 = lang.transitions
    for L in (8, 11, 14, 17):
        np.testing.assert_array_equal(lang.transition(L - 1), T1)  # the paper's cyclic reading: T_1 makes the target
        aligned = lang.aligned(L)
        np.testing.assert_array_equal(aligned.transition(L - 1), T3)
        np.testing.assert_array_equal(aligned.transition(L - 2), T2)
        np.testing.assert_array_equal(aligned.transition(L - 3), T1)  # still cyclic, only the phase moved
    np.testing.assert_array_equal(lang.aligned(4).transitions, lang.transitions)  # the training length: unchanged
    assert lang.transitions is not lang.aligned(8).transitions and np.array_equal(lang.transition(1), T1)
    # the IC of a sequence under the aligned law, by hand: L = 5 uses T_3, T_1, T_2, T_3
    x = np.array([[0, 1, 2, 0, 1]])
    by_hand = np.log2(3) - np.log2(T3[0, 1] * T1[1, 2] * T2[2, 0] * T3[0, 1])
    assert lang.aligned(5).information_content(x)[0] == pytest.approx(by_hand)
