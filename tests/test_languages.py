"""The language chosen by the paper's data facts, the headroom over the bigram rule, the exact Bayes accuracy,
and the phase-consistent reading of Table 1 (position codes counted from the end)."""

import dataclasses

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from loopscape.cli import app, parse_seeds
from loopscape.data.languages import PAPER_SIMPLE_SHARE, feasibility, fit, headroom, rank_languages
from loopscape.data.markov import (
    DEFAULT_LANGUAGE_SEED,
    ROWS,
    MarkovDataConfig,
    MarkovLanguage,
    MarkovTask,
    SequenceSet,
)
from loopscape.models.linear_attn import looped_attn


@pytest.mark.parametrize("length", [4, 5, 7])
@pytest.mark.parametrize("targets", ["cyclic", "aligned"])
def test_exact_bayes_accuracy_equals_enumeration(length, targets):
    lang = MarkovLanguage(3, 4, seed=5).test_law(length, targets)
    seqs, p = lang.tilted_probabilities(2.0, length)
    hit = (lang.bayes_prediction(torch.from_numpy(seqs[:, :-1])) == torch.from_numpy(seqs[:, -1])).numpy()
    assert lang.bayes_accuracy(2.0, length) == pytest.approx(float(p[hit].sum()), abs=1e-12)


def test_headroom_by_hand():
    """Bigram rule T_3[x_2] -> token 1 for every x_2 (by construction); training rows by hand."""
    lang = MarkovLanguage(3, 4, seed=0)
    lang.transitions = np.tile(np.array([0.2, 0.5, 0.3]), (3, 3, 1))  # every row: argmax 1
    # prefix (0,0,0): targets 2, 2, 1 (majority 2: the ceiling beats the bigram rule by memorising it)
    # prefix (1,1,1): targets 1, 0 (majority 1 = the bigram rule)
    tokens = torch.tensor([[0, 0, 0, 2], [0, 0, 0, 2], [0, 0, 0, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    train = SequenceSet(tokens, torch.arange(5, dtype=torch.float64))
    low = torch.tensor([True, True, False, False, False])
    high = torch.tensor([False, False, False, True, True])
    h = headroom(lang, MarkovTask(train, train, low, high))
    assert h["all"] == {"bayes_ceiling": 3 / 5, "bigram_rule": 2 / 5, "headroom": pytest.approx(1 / 5)}
    assert (h["low"]["bayes_ceiling"], h["low"]["bigram_rule"]) == (1.0, 0.0)
    assert (h["high"]["bayes_ceiling"], h["high"]["bigram_rule"], h["high"]["headroom"]) == (0.5, 0.5, 0.0)


def test_the_rule_can_pass_and_fail():
    base = {"ic_max": 14.0, "simple_share": dict(PAPER_SIMPLE_SHARE), "headroom": {"low": {"bayes_ceiling": 1.0}}}
    assert fit(base) == {"eligible": True, "why_not": "", "share_error_pts": 0.0}
    off = {**base, "ic_max": 20.0, "simple_share": {8: 1.0, 11: 1.0, 14: 0.995, 17: 0.81}}
    off["headroom"] = {"low": {"bayes_ceiling": 0.645}}
    r = fit(off)
    assert not r["eligible"] and r["why_not"] == "largest IC 20.00 bits, low-IC Bayes 64.5%"
    assert r["share_error_pts"] == pytest.approx(100 * (0.005 + 0.355 + 0.995 + 0.81) / 4)


def test_the_default_language_is_the_best_fit_over_seeds_0_to_399():
    """The default data seed is the rule's winner, and meets the paper's facts (no training decides it)."""
    ranked = rank_languages(MarkovDataConfig(), range(400))
    best = ranked[0]
    assert best["seed"] == DEFAULT_LANGUAGE_SEED == MarkovDataConfig().seed
    assert best["eligible"] and abs(best["ic_max"] - 14.57) <= 3
    assert best["headroom"]["low"]["bayes_ceiling"] >= 0.95
    assert [r["eligible"] for r in ranked] == sorted((r["eligible"] for r in ranked), reverse=True)
    errors = [r["share_error_pts"] for r in ranked if r["eligible"]]
    assert errors == sorted(errors)
    assert all(r["headroom"]["all"]["headroom"] >= -1e-12 for r in ranked)  # the ceiling is the best predictor


def test_feasibility_shares_are_consistent():
    rows = feasibility(MarkovDataConfig(), n_languages=20)
    assert [(r["rows"], r["include_all"]) for r in rows] == [(k, a) for k in ROWS for a in (True, False)]
    for r in rows:
        s = r["share"]
        assert 0 <= s["jointly"] <= min(v for k, v in s.items() if k != "jointly") <= 1


def test_row_distributions_are_stochastic_and_uniform_is_unchanged():
    for rows in ROWS:
        np.testing.assert_allclose(MarkovLanguage(3, 4, seed=1, rows=rows).transitions.sum(-1), 1.0)
    raw = np.random.default_rng(1).random((3, 3, 3))
    np.testing.assert_array_equal(MarkovLanguage(3, 4, seed=1).transitions, raw / raw.sum(-1, keepdims=True))
    with pytest.raises(ValueError, match="rows must be one of"):
        MarkovLanguage(3, 4, rows="gaussian")


def test_codes_from_the_end_equal_codes_from_the_start_at_the_training_length_and_keep_the_query_code():
    start = looped_attn(n_loops=3, max_len=3, positions="cyclic")
    end = looped_attn(n_loops=3, max_len=3, positions="cyclic_end")
    end.load_state_dict(start.state_dict())
    x = torch.randint(0, 3, (6, 3))
    torch.testing.assert_close(end(x), start(x), rtol=0, atol=0)  # the same model in training
    long = torch.randint(0, 3, (6, 8))
    E = end.embed(long)
    torch.testing.assert_close(E[:, -3:], end.embed(long[:, -3:]))  # the last three keep codes 0, 1, 2
    assert not torch.equal(start.embed(long)[:, -1], E[:, -1])  # from the start, the query's code moved


def test_parse_seeds_takes_ranges():
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_seeds("5") == [5]


def test_languages_command_writes_its_table(tmp_path):
    out = tmp_path / "lang"
    r = CliRunner().invoke(app, ["languages", "--seeds", "20-25", "-o", str(out), "-q", "--set", "n_feasibility=5"])
    assert r.exit_code == 0, r.output
    assert "**Best fit: data seed 24**" in r.output and (out / "languages.json").exists()
    assert (out / "languages.md").read_text() in r.output
    r = CliRunner().invoke(app, ["languages", "--seeds", "0", "-o", str(out), "-q"])
    assert r.exit_code == 2 and "exists" in r.output


def test_data_settings_other_than_the_seed_keep_the_language_facts_reproducible():
    a = rank_languages(MarkovDataConfig(), [24])[0]
    b = rank_languages(dataclasses.replace(MarkovDataConfig(), seed=3), [24])[0]
    assert a == b  # the scored seed replaces data.seed: nothing else of the config's seed leaks in


def test_no_common_test_length_means_no_share_error_not_nan():
    facts = {"ic_max": 14.0, "simple_share": {5: 1.0}, "headroom": {"low": {"bayes_ceiling": 1.0}}}
    assert fit(facts)["share_error_pts"] is None
    ranked = rank_languages(MarkovDataConfig(test_lengths=[5, 6], n_test=50), [0, 24])
    assert all(r["share_error_pts"] is None for r in ranked)
