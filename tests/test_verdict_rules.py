"""The statistics layer of every verdict (reporting/verdicts.py): words worked out by hand, exact false-positive
rates checked against simulation, the power behind the minimum detectable effect, composites and readings."""

import numpy as np
import pytest
from scipy import stats

from loopscape.reporting import verdicts as V


def simulate(rule, n_sets: int, n: int, sd: float, centre: float, seed: int = 0) -> float:
    """How often ``rule`` says "reproduced" on ``n_sets`` Gaussian samples of size ``n``."""
    rng = np.random.default_rng(seed)
    return float(np.mean([rule(centre + sd * rng.standard_normal(n)) == V.REPRODUCED for _ in range(n_sets)]))


@pytest.mark.parametrize("n, bar", [(3, 0.0), (5, 0.0), (5, 0.5), (10, 0.2)])
def test_the_exact_null_rate_of_the_directional_test_matches_simulation(n, bar):
    exact = V.directional_null_rate(n, sd=1.0, bar=bar)
    assert exact == pytest.approx(V.ALPHA, abs=1e-6)  # a t-test on Gaussian data at its null's boundary: alpha
    sim = simulate(lambda x: V.directional_word(x, bar), 4000, n, 1.0, bar)  # the claim false at its bar
    assert sim == pytest.approx(exact, abs=0.012)


@pytest.mark.parametrize("n", [3, 5, 8])
def test_the_minimum_detectable_effect_has_the_stated_power(n):
    mde = V.min_detectable(n, sd=1.0)
    t_crit = stats.t.ppf(1 - V.ALPHA, n - 1)
    assert stats.nct.sf(t_crit, n - 1, mde * np.sqrt(n)) == pytest.approx(V.POWER, abs=1e-6)
    sim = simulate(V.directional_word, 3000, n, 1.0, mde, seed=1)
    assert sim == pytest.approx(V.POWER, abs=0.03)


def test_directional_words_by_hand():
    def word(values, bar=0.0):
        return V.directional(values, name="t", statistic="s", bar=bar)["verdict"]

    # mean 2, sd 1 over 4 seeds: t = 4, p = 0.014 (one-sided, 3 df); the 90% interval is 2 +- 2.353 / 2
    v = V.directional([1.0, 2.0, 3.0, 2.0], name="t", statistic="s", bar=1.0)
    assert v["verdict"] == V.REPRODUCED
    assert v["test"]["p_value"] == pytest.approx(stats.t.sf((2 - 1) / (np.std([1, 2, 3, 2], ddof=1) / 2), 3))
    lo, hi = v["test"]["interval"]
    assert (lo + hi) / 2 == pytest.approx(2.0) and hi - lo == pytest.approx(
        2 * 2.353363 * np.std([1, 2, 3, 2], ddof=1) / 2
    )
    assert word([1.0, 2.0, 3.0, 2.0], bar=2.5) == V.DIRECTION_ONLY  # significant, interval reaches the bar
    assert word([1.0, 1.1, 0.9, 1.0], bar=5.0) == V.NOT_REPRODUCED  # significant, interval wholly below the bar
    assert word([0.5, -0.3, 0.4, 0.1]) == V.DIRECTION_ONLY  # right sign, not significant
    assert word([-0.5, 0.3, -0.4, -0.1]) == V.NOT_REPRODUCED  # wrong sign, not significant
    assert word([-1.0, -2.0, -3.0, -2.0]) == V.CONTRADICTED
    assert word([2.0, 2.0, 2.0]) == V.DIRECTION_ONLY  # no spread: the sign test, p = 1/8
    assert word([2.0] * 5) == V.REPRODUCED  # p = 1/32
    one = V.directional([3.0], name="t", statistic="s")
    assert one["verdict"] == V.NOT_TESTED and "one seed" in one["reason"] and one["test"]["p_value"] is None
    assert V.directional([None, float("nan")], name="t", statistic="s")["verdict"] == V.NOT_TESTED


def test_no_loss_and_range_words_and_rates():
    def no_loss(values):
        return V.non_inferiority(values, 0.5, name="e", statistic="s")

    assert no_loss([0.01, -0.02, 0.03, 0.0, -0.01])["verdict"] == V.REPRODUCED
    assert no_loss([-2.0, -2.1, -1.9, -2.0])["verdict"] == V.CONTRADICTED
    assert no_loss([-0.52, 0.3, -1.2, 0.1, -0.9])["verdict"] == V.INCONCLUSIVE
    assert no_loss([2.0, 2.1, 1.9])["verdict"] == V.REPRODUCED  # a gain is no loss
    assert no_loss([0.1, 0.1])["verdict"] == V.INCONCLUSIVE  # no spread, too few values for a sign test
    rate = no_loss([0.3, -0.4, 0.2, 0.1, -0.3])["test"]["null_rate"]
    assert rate == pytest.approx(V.ALPHA, abs=1e-6)
    sd = float(np.std([0.3, -0.4, 0.2, 0.1, -0.3], ddof=1))
    sim = simulate(lambda x: V.tost_word(x, -0.5, np.inf), 4000, 5, sd, -0.5, seed=2)
    assert sim == pytest.approx(rate, abs=0.012)
    r = V.in_range([120, 130, 125, 128], 100, 150, name="r", statistic="s")["test"]["null_rate"]
    sim = simulate(lambda x: V.tost_word(x, 100, 150), 4000, 4, float(np.std([120, 130, 125, 128], ddof=1)), 100, 3)
    assert r <= V.ALPHA and sim == pytest.approx(r, abs=0.012)
    assert V.in_range([120, 130, 125], 100, 150, name="r", statistic="s")["verdict"] == V.REPRODUCED
    assert V.in_range([300, 310, 320], 100, 150, name="r", statistic="s")["verdict"] == V.NOT_REPRODUCED


def test_all_of_takes_the_weakest_part_and_bounds_the_rate():
    good = V.directional([1.0, 2.0, 3.0, 2.0], name="a", statistic="s")
    weak = V.directional([0.5, -0.3, 0.4, 0.1], name="b", statistic="s")
    both = V.all_of({"a": good, "b": good}, name="ab", statistic="s")
    assert both["verdict"] == V.REPRODUCED
    assert both["test"]["null_rate"] == max(good["test"]["null_rate"], good["test"]["null_rate"])
    assert V.all_of({"a": good, "b": weak}, name="ab", statistic="s")["verdict"] == V.DIRECTION_ONLY
    missing = V.all_of({"a": good, "b": V.not_tested("b", "s", "too short")}, name="ab", statistic="s")
    assert missing["verdict"] == V.NOT_TESTED and missing["reason"] == "b: too short"
    down = V.directional([-1.0, -2.0, -3.0, -2.0], name="c", statistic="s")
    hidden = V.all_of({"c": down, "b": V.not_tested("b", "s", "too short")}, name="cb", statistic="s")
    assert hidden["verdict"] == V.CONTRADICTED  # a tested failure is not hidden by an untested part
    readings = V.over_readings({"x": down, "y": good}, "x", name="r", statistic="s")
    assert V.all_of({"r": readings, "a": good}, name="ra", statistic="s")["verdict"] == V.READING_DEPENDENT


def test_readings_that_disagree_in_sign_are_reading_dependent():
    up = V.directional([1.0, 2.0, 3.0, 2.0], name="a", statistic="s")
    down = V.directional([-1.0, -2.0, -3.0, -2.0], name="a", statistic="s")
    flat = V.directional([-0.5, 0.3, -0.4, -0.1], name="a", statistic="s")
    assert V.over_readings({"x": down, "y": up}, "x", name="r", statistic="s")["verdict"] == V.READING_DEPENDENT
    assert V.over_readings({"x": down, "y": flat}, "x", name="r", statistic="s")["verdict"] == V.CONTRADICTED
    assert V.over_readings({"x": up, "y": flat}, "x", name="r", statistic="s")["verdict"] == V.REPRODUCED


def test_a_bound_check_is_reproduced_only_without_violations():
    clean = V.bound_check(60, 60, name="b", statistic="s")
    assert clean["verdict"] == V.REPRODUCED
    assert clean["test"]["upper_bound"] == pytest.approx(1 - 0.05 ** (1 / 60))  # Clopper-Pearson, zero events
    assert clean["test"]["null_rate"] == pytest.approx(0.05)
    assert V.bound_check(59, 60, name="b", statistic="s")["verdict"] == V.CONTRADICTED
    assert V.bound_check(0, 0, name="b", statistic="s")["verdict"] == V.NOT_TESTED


def test_a_positive_word_with_a_null_rate_above_alpha_is_refused():
    from loopscape.reporting.html import verdict_row

    test = V.test_fields("x", "s", 3, null_rate=0.2)
    with pytest.raises(ValueError, match="null rate above"):
        verdict_row("claim", "Section 1", "ours 1", "paper", "reproduced", test)
    assert verdict_row("claim", "Section 1", "ours 1", "paper", "direction only", test)["test"] is test


def test_the_rules_version_names_the_module_and_its_text():
    version = V.rules_version()
    assert version["module"] == "loopscape.reporting.verdicts" and len(version["sha256"]) == 16
