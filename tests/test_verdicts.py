"""Every verdict rule of the Markov report on hand-made results: the positive word on data with an effect, not
on data without one, each other outcome ("not tested" included), and no empty, None or NaN cell in a row."""

import json

import numpy as np
import pytest

from loopscape.reporting import hessian, length, shift, summary, theory
from loopscape.reporting.html import verdict_row


def obs1_metrics(epochs: int, rise_looped: list[float], rise_single: list[float]) -> dict:
    """High-IC accuracy flat until the phase boundary, then rising linearly by the given points per seed."""

    def curves(rises):
        t = np.arange(epochs + 1)
        after = np.clip(t - summary.PHASE_EPOCH, 0, None) / max(epochs - summary.PHASE_EPOCH, 1)
        return np.array([0.4 + r / 100 * after for r in rises])

    zeros = np.zeros((len(rise_looped), epochs + 1))
    return {
        "looped_attn": {"acc_high": curves(rise_looped), "acc_low": zeros, "acc_all": zeros, "train_loss": zeros},
        "single_attn": {"acc_high": curves(rise_single), "acc_low": zeros, "acc_all": zeros, "train_loss": zeros},
    }


@pytest.mark.parametrize(
    "looped, single, expected",
    [
        ([12, 11, 13, 12, 12], [0, 0, 0, 0, 0], "reproduced"),  # the paper's effect, over every seed
        ([1.0, -1.0, 0.5, -0.5, 0.2], [0, 0, 0, 0, 0], "direction only"),  # null-like: right sign, not significant
        ([3, 3.2, 2.9, 3.1, 3], [0, 0, 0, 0, 0], "not reproduced"),  # significant, wholly below the 5-point bar
        ([0, 0, 0, 0, 0], [6, 6.5, 5.5, 6, 6.2], "contradicted"),
        ([-0.4, 1.15, -0.9, 2.7, 0.7], [0, 0, 0, 0, 0], "direction only"),  # the seeds of the report at 4c0c3a9
    ],
)
def test_observation1_outcomes(looped, single, expected):
    v = summary.observation1_verdict(obs1_metrics(300, looped, single))
    assert v["verdict"] == expected
    row = summary.observation1_row(v)
    assert row["verdict"] == expected and row["test"]["n_seeds"] == 5
    assert row["test"]["null_rate"] <= 0.05 and row["test"]["interval"][0] < row["test"]["interval"][1]


def test_observation1_not_tested_on_a_run_that_ends_before_the_phase_boundary():
    v = summary.observation1_verdict(obs1_metrics(40, [12, 12], [0, 0]))
    assert v["verdict"] == "not tested" and "40 epochs" in v["reason"]
    row = summary.observation1_row(v)
    assert row["verdict"] == "not tested" and row["ours"] == v["reason"] and row["test"]["p_value"] is None


def spectra_runs(looped_curves, single_curves, epochs):
    """Spectra whose Matrix Entropy follows the given shapes: a share of the spectrum moved to larger |lambda|."""

    def spectrum(level):  # 40 eigenvalues; the first k spread over bins, the rest in the first bin
        k = int(round(level))
        return np.concatenate([np.linspace(0.1, 10.0, max(k, 1)), np.full(40 - max(k, 1), 0.01)])

    def runs(curves):
        return [(epochs, np.array([spectrum(x) for x in c])) for c in curves]

    return {"single_attn": runs(single_curves), "looped_attn": runs(looped_curves)}


def test_observation2_gives_the_positive_word_only_to_a_looped_model_with_three_phases():
    epochs = np.arange(0, 401)
    dip = np.interp(epochs, [0, 1, 60, 200, 400], [30, 30, 2, 30, 30])  # collapse, diversify, stabilise
    flat = np.full(epochs.size, 6.0)
    seeds = 5  # identical seeds have no spread: the sign test needs 5 of 5 (p = 1/32)
    v = hessian.observation2_verdict(spectra_runs([dip] * seeds, [flat] * seeds, epochs), 50)
    assert v["verdict"] == "reproduced" and all(r["looped"]["score"] > 0 for r in v["seeds"])
    # the same curves for both models (no difference between them): not reproduced, whatever the shape
    v = hessian.observation2_verdict(spectra_runs([dip] * seeds, [dip] * seeds, epochs), 50)
    assert v["verdict"] != "reproduced"
    # the models swapped: Single-Attn shows the phases, Looped-Attn is static: contradicted
    v = hessian.observation2_verdict(spectra_runs([flat] * seeds, [dip] * seeds, epochs), 50)
    assert v["verdict"] == "contradicted"
    short = np.arange(0, 41)
    v = hessian.observation2_verdict(spectra_runs([dip[:41]] * 2, [flat[:41]] * 2, short), 50)
    assert v["verdict"] == "not tested" and "epoch 40" in v["reason"]


def test_phase_margins_by_hand():
    epochs = np.arange(0, 401)
    curve = np.interp(epochs, [0, 1, 50, 200, 400], [1.0, 1.0, 0.5, 1.2, 1.2])
    m = hessian.phase_margins(curve, epochs, c=0.1)
    assert m["collapse"] == pytest.approx((1.0 - 0.5) / 0.1 - 1)
    assert m["diversification"] == pytest.approx((1.2 - 0.5) / 0.1 - 1)
    assert m["stabilisation"] == pytest.approx(1.0)
    assert m["score"] == pytest.approx(1.0) and m["min_epoch"] == 50
    assert m["static"] == pytest.approx(1 - 0.7 / 0.1)


def land_rows(pairs, epochs=(150, 600)):
    """Landscape rows from (single spectrum, looped spectrum) per seed, through the real table builder."""
    spectra = {
        "single_attn": [(np.array(epochs), np.array([s] * len(epochs))) for s, _ in pairs],
        "looped_attn": [(np.array(epochs), np.array([lp] * len(epochs))) for _, lp in pairs],
    }
    return hessian.landscape_table(spectra, list(epochs))


def test_assumption1_with_one_threshold_for_both_models():
    """Looped-Attn's largest eigenvalue is 100x Single-Attn's. One threshold (1e-3 x 100 = 0.1) leaves Single-Attn
    3 valley eigenvalues <= tau and Looped-Attn 5, each smaller: Assumption 1 is reproduced. A threshold per model
    (1e-3 x its own max) would keep Single-Attn's 0.005 and 0.004 too, and the comparison would fail."""
    from loopscape.landscape.river_valley import assumption1, valley_eigenvalues

    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(5):
        single = np.array([1.0, 0.45, 0.4, 0.3, 0.005, 0.004]) * rng.uniform(0.95, 1.05)
        looped = np.array([100.0, 0.4, 0.35, 0.29, 0.25, 0.2, 0.01]) * rng.uniform(0.95, 1.05)
        pairs.append((single, looped))
    land = land_rows(pairs)
    a = land["rows"][0]["assumption1"]
    assert (a["m_single"], a["m_looped"]) == (3, 5) and a["dominance"]
    assert hessian.assumption1_verdict(land, [150, 600])["verdict"] == "reproduced"
    single, looped = pairs[0]
    own = [valley_eigenvalues(e)[0] for e in (single, looped)]  # each model's own threshold
    assert [int((v <= 0.5).sum()) for v in own] == [5, 5]  # per-model thresholds: (a) m_looped > m_single fails
    assert assumption1(single, looped)["holds"]  # the default: one threshold for the pair
    # no difference between the models: not reproduced
    same = land_rows([(s, s) for s, _ in pairs])
    assert hessian.assumption1_verdict(same, [150, 600])["verdict"] == "not reproduced"
    short = land_rows(pairs, epochs=(40,))
    assert hessian.assumption1_verdict(short, [40])["verdict"] == "not tested"


def test_conjectures_are_judged_over_the_whole_eps_range():
    """Looped-Attn's valley spreads over 4 decades, Single-Attn's over 1: a kappa ratio >= 2 at every eps."""
    rng = np.random.default_rng(1)
    v_shape = [np.geomspace(1e-4, 1.0, 20) * rng.uniform(0.9, 1.1) for _ in range(5)]
    u_shape = [np.concatenate([np.linspace(0.5, 1.0, 10) * rng.uniform(0.9, 1.1), np.zeros(10)]) for _ in range(5)]
    land = land_rows(list(zip(u_shape, v_shape)))
    assert hessian.conjectures_verdict(land, 600)["verdict"] == "reproduced"
    land = land_rows(list(zip(v_shape, v_shape)))  # the same spectrum: a ratio of 1 everywhere
    assert hessian.conjectures_verdict(land, 600)["verdict"] == "not reproduced"
    land = land_rows(list(zip(v_shape, u_shape)))
    assert hessian.conjectures_verdict(land, 600)["verdict"] == "contradicted"


def test_corollary1_needs_a_ratio_of_ten_over_seeds():
    def force(ratios):
        return {
            "reference_epoch": 150,
            "per_seed": [{"single_attn": {"C": 1.0}, "looped_attn": {"C": r}} for r in ratios],
        }

    assert hessian.corollary1_verdict(force([40, 30, 60, 50]))["verdict"] == "reproduced"
    assert hessian.corollary1_verdict(force([3.0, 4.0, 3.5, 4.2]))["verdict"] == "not reproduced"  # far below 10x
    assert hessian.corollary1_verdict(force([0.5, 2.0, 1.1, 0.8]))["verdict"] in ("direction only", "not reproduced")
    assert hessian.corollary1_verdict(force([0.1, 0.12, 0.09]))["verdict"] == "contradicted"
    assert hessian.corollary1_verdict(force([40]))["verdict"] == "not tested"  # one seed
    short = hessian.corollary1_verdict({**force([40, 30, 60]), "reference_epoch": 40})
    assert short["verdict"] == "not tested" and "epoch 150" in short["reason"]


def test_coupling_verdict_over_seeds():
    def coupling(ratios):
        return {"per_seed": [{"epoch": 600, "min_log10_ratio": r} for r in ratios]}

    assert hessian.coupling_verdict(coupling([1.0, 0.9, 1.1]))["verdict"] == "reproduced"
    assert hessian.coupling_verdict(coupling([0.13, 0.19, -0.12]))["verdict"] == "direction only"
    assert hessian.coupling_verdict({"per_seed": []})["verdict"] == "not tested"
    assert hessian.coupling_verdict({"per_seed": [{"epoch": 40, "min_log10_ratio": 1.0}]})["verdict"] == "not tested"


def test_corollary2_on_the_toys():
    def metrics(single_loss, looped_loss):
        z = np.zeros((len(single_loss), 301))
        return {
            "single_attn": {"train_loss": z + np.array(single_loss)[:, None]},
            "looped_attn": {"train_loss": z + np.array(looped_loss)[:, None]},
        }

    assert summary.corollary2_verdict(metrics([0.9, 0.91, 0.92], [0.8, 0.8, 0.81]))["verdict"] == "reproduced"
    assert summary.corollary2_verdict(metrics([0.9, 0.8, 0.85], [0.85, 0.85, 0.85]))["verdict"] != "reproduced"
    row = summary.corollary2_row(summary.corollary2_verdict(metrics([0.7, 0.7, 0.71], [0.8, 0.8, 0.81])))
    assert row["verdict"] == "contradicted"


@pytest.mark.parametrize(
    "epochs, run_epochs, expected",
    [
        ([120, 130, 125, 128], 600, "reproduced"),
        ([60, 130, 200, 125], 600, "inconclusive"),  # a mean near the range, an interval wider than it
        ([300, 320, 310], 600, "not reproduced"),
        ([None, None, None], 600, "not reproduced"),  # SCP never fired on any seed
        ([120, 130, 125, None], 600, "inconclusive"),  # inside the range where it fired, but one seed never did
        ([None, None], 40, "not tested"),  # the run ends before the paper's range
    ],
)
def test_scp_shift_point_outcomes(epochs, run_epochs, expected):
    v = shift.scp_point_verdict(epochs, run_epochs)
    assert v["verdict"] == expected
    speed = shift.speedup_verdict({**policy([]), "per_seed": [shifted(None, 1.0, 0.0)]}, 0.5)
    assert shift.verdict_rows({"scp_shift_point": v, "shift_speedup": speed})[0]["verdict"] == expected


def shifted(epoch, speedup, loss, drop=0.0):
    return {
        "shift_epoch": epoch,
        "flops_speedup_total": speedup,
        "acc_all_minus_looped": loss,
        "drop_at_shift_pts": drop,
    }


def policy(rows):
    def stat(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return {"mean": float(np.mean(vals)) if vals else None, "std": 0.0, "n": len(vals)}

    speed = stat("flops_speedup_total")
    return {
        "looped_epochs_speedup": speed,
        "flops_speedup_total": speed,
        "wall_s_speedup_total": speed,
        "wall_s_speedup_to_target": speed,
        "acc_all_minus_looped": stat("acc_all_minus_looped") if rows else {"mean": None},
        "per_seed": rows,
    }


FAST_NO_LOSS = [shifted(124, 1.26 + d, d / 10) for d in (0.0, 0.01, -0.01, 0.02, -0.02)]


@pytest.mark.parametrize(
    "rows, expected",
    [
        (FAST_NO_LOSS, "reproduced"),
        ([shifted(124, 1.26, loss) for loss in (-2.0, -2.1, -1.9, -2.05, -1.95)], "contradicted"),  # a loss
        ([shifted(124, 1.26, loss) for loss in (-0.52, 0.3, -1.2, 0.1, -0.9)], "inconclusive"),  # a coin flip
        ([shifted(20, 1.02 + d, 0.0 + d) for d in (0.0, 0.005, -0.005)], "not reproduced"),  # far below 1.13
        ([shifted(None, 1.0, 0.0), shifted(124, 1.26, 0.0)], "not tested"),  # one seed never shifted
        (FAST_NO_LOSS[:1], "not tested"),  # one seed
    ],
)
def test_shift_speedup_outcomes(rows, expected):
    v = shift.speedup_verdict(policy(rows), tolerance_pts=0.5)
    assert v["verdict"] == expected
    point = shift.scp_point_verdict([120, 130, 125], 600)
    row = shift.verdict_rows({"scp_shift_point": point, "shift_speedup": v})[1]
    assert row["verdict"] == expected
    if expected != "not tested":
        assert row["test"]["null_rate"] <= 0.05 and set(row["test"]["parts"]) == {"speed-up (FLOPs)", "no loss"}


def test_drop_at_the_switch():
    acc = np.array([0.5] * 10 + [0.40, 0.45, 0.5, 0.5, 0.5, 0.5])
    from loopscape.experiments.shift import drop_at_shift

    assert drop_at_shift(acc, 9) == pytest.approx(10.0)  # 50% at the last Stage-I epoch (9), 40% at the lowest after
    assert drop_at_shift(acc, None) is None and drop_at_shift(acc, 15) is None
    small = policy([shifted(124, 1.2, 0.0, d) for d in (0.05, 0.1, 0.0, 0.08, 0.02)])
    assert shift.drop_verdict(small, 0.5)["verdict"] == "reproduced"
    large = policy([shifted(124, 1.2, 0.0, d) for d in (5.0, 6.0, 5.5, 4.8, 5.2)])
    assert shift.drop_verdict(large, 0.5)["verdict"] == "contradicted"
    risen = policy([shifted(124, 1.2, 0.0, d) for d in (-1.0, -1.2, -0.9, -1.1)])
    assert shift.drop_verdict(risen, 0.5)["verdict"] == "reproduced"  # accuracy rose at the switch: no drop


def length_results(diffs_per_length, n_seeds=3, lengths=(8, 11)):
    rows = {"4": {"single_attn": {"all": {"mean": 70.0, "std": 1.0, "n": n_seeds}}}}
    rng = np.random.default_rng(0)
    for L, d in zip(lengths, diffs_per_length):
        single = 50.0 + rng.normal(0, 2.0, n_seeds)
        rows[str(L)] = {
            "single_attn": {"all_per_seed": single.tolist()},
            "looped_attn": {"all_per_seed": (single + d + rng.normal(0, 0.5, n_seeds)).tolist()},
        }
    return rows


@pytest.mark.parametrize(
    "res, expected",
    [
        (length_results([10, 10]), "reproduced"),
        (length_results([10, 0]), "not reproduced"),  # every length must hold; at L = 11 there is no effect
        (length_results([-5, -5]), "contradicted"),
        (length_results([], lengths=()), "not tested"),  # test_lengths = []: nothing past the training length
        (length_results([10, 10], n_seeds=1), "not tested"),  # one seed: no spread to test against
    ],
)
def test_length_generalisation_outcomes(res, expected):
    v = length.length_verdict(res, train_length=4)
    assert v["verdict"] == expected
    assert length.verdict_row(v)["verdict"] == expected


def test_table1_over_readings_is_reading_dependent_when_the_sign_changes():
    def reading(attention, diffs, default=False):
        res = length_results(diffs)
        return {
            "attention": attention,
            "positions": "cyclic_end",
            "test_targets": "aligned",
            "default": default,
            "verdict": length.length_verdict(res, 4),
        }

    rows = [reading("sum", [-20, -20], default=True), reading("mean", [10, 10])]
    v = length.readings_verdict(rows)
    assert v["verdict"] == "reading-dependent" and v["test"]["contradicting_readings"]
    row = length.readings_row(v, rows)
    assert "contradicted: 1 reading(s)" in row["ours"] and "reproduced: 1 reading(s)" in row["ours"]
    rows = [reading("sum", [-20, -20], default=True), reading("mean", [-10, -10])]
    assert length.readings_verdict(rows)["verdict"] == "contradicted"


def bound(meeting, held):
    return {"instances": 100, "meeting_assumptions": meeting, "held": held}


def theory_results(meeting=60, held=60, checks=True, along=(0.95, 0.97, 0.96)):
    c = {"C_ratio_to_U": 3.0, "final_loss_below_U": True, "river_progress_beyond_U": True}
    rows = []
    for seed, f in enumerate(along):
        n = 20
        rows += [{"seed": seed, "where": "trajectory", "inner": 1.0 if i < f * n else -1.0} for i in range(n)]
    summary3 = {"assumption-4 initialisation/W_K": {"fraction_nonnegative": 1.0, "n": 5, "cosine_min": 0.2}}
    return {
        "Theorem 1": bound(meeting, held),
        "Theorem 2": bound(meeting, held),
        "Corollaries 1-2": {"checks": {"V": c} if checks else {}},
        "Theorem 3": {
            "summary": summary3,
            "rows": rows,
            "assumption5": [{"min_over_max_eigenvalue": -0.02, "asymmetry": 0.3}],
        },
    }


def test_theory_outcomes():
    rows = theory.verdict_rows(theory_results())
    assert [r["verdict"] for r in rows] == ["reproduced"] * 4
    assert rows[0]["test"]["null_rate"] <= 0.05 and rows[0]["test"]["upper_bound"] < 0.05  # 60 clean instances
    rows = theory.verdict_rows(theory_results(held=59, along=(0.3, 0.35, 0.25)))
    assert [r["verdict"] for r in rows] == ["contradicted", "contradicted", "reproduced", "contradicted"]
    assert "along training" in rows[3]["ours"] and "Assumption 5" in rows[3]["ours"]
    rows = theory.verdict_rows(theory_results(along=(0.6, 0.4, 0.55)))
    assert rows[3]["verdict"] in ("direction only", "not reproduced")
    rows = theory.verdict_rows(theory_results(meeting=0, held=0, checks=False, along=()))
    assert [r["verdict"] for r in rows] == ["not tested"] * 4
    # each not-tested row says why, naming what was missing (a setting to change where there is one)
    assert [r["ours"].split(";")[0] for r in rows] == [
        "none of 100 random instances meets the theorem's assumptions",
        "none of 100 random instances meets the theorem's assumptions",
        "no V valley was compared (theory.kappas)",
        "no point along training was measured (theory.alignment_epochs)",
    ]


@pytest.mark.parametrize("ours", ["", "   ", "median None", "delta nan pts"])
def test_a_verdict_row_refuses_an_empty_or_missing_number(ours):
    with pytest.raises(ValueError, match="ours cell"):
        verdict_row("claim", "Section 1", ours, "paper", "reproduced")


def test_a_verdict_row_refuses_an_unknown_verdict():
    with pytest.raises(ValueError, match="verdict must be one of"):
        verdict_row("claim", "Section 1", "ours", "paper", "probably")


def _curve(entropies, every=500):
    return [[{"step": every * (i + 1), "matrix_entropy": e, "top_eigenvalues": [1.0]} for i, e in enumerate(entropies)]]


@pytest.mark.parametrize(
    "single, looped, expected",
    [
        # 12 measurements over 6000 steps: first quarter = steps <= 1500, last sixth = steps > 5000
        ([1.0] * 12, [2.0, 1.2, 1.0, 1.5, 2.0, 2.2, 2.3, 2.3, 2.3, 2.3, 2.3, 2.3], "reproduced"),
        ([1.0] * 12, [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0], "partly reproduced"),
        ([1.0, 2.0] * 6, [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 3.0, 1.0, 3.0], "not reproduced"),
    ],
)
def test_observation2_on_the_looped_gpt(single, looped, expected):
    from loopscape.reporting.curvature import observation2

    verdict = observation2({"single": _curve(single), "looped": _curve(looped)}, total_steps=6000)
    assert verdict["verdict"] == expected


def test_observation2_on_the_looped_gpt_needs_measurements_in_both_windows():
    from loopscape.reporting.curvature import observation2

    verdict = observation2({"single": _curve([1.0] * 3, 2000), "looped": _curve([1.0] * 3, 2000)}, total_steps=6000)
    assert verdict["verdict"] == "not tested" and "in the first quarter" in verdict["reason"]


def test_observation2_on_the_looped_gpt_refuses_a_degenerate_histogram():
    """Entropies all near 0 (the spectrum in the first bin): 'static' would be an artefact, so not tested."""
    from loopscape.reporting.curvature import observation2

    verdict = observation2({"single": _curve([0.01] * 12), "looped": _curve([0.02, 0.001] * 6)}, total_steps=6000)
    assert verdict["verdict"] == "not tested" and "cannot see the spectrum" in verdict["reason"]


def test_observation2_on_the_looped_gpt_takes_the_probes_n_bins():
    """c = 0.1 log(n_bins) of the probe that measured (its rows say): Single-Attn's entropy range 0.3 is static
    under 50 bins (c = 0.391), not under 10 (c = 0.230). Rows without n_bins were binned by the probe's default."""
    import inspect
    import math

    from loopscape.landscape.probe import CurvatureProbe
    from loopscape.reporting.curvature import observation2

    def curves(n_bins, single=(1.0, 1.3) * 6, looped=(2.0, 1.2, 1.0, 1.5, 2.0, 2.2) + (2.3,) * 6):
        extra = {} if n_bins is None else {"n_bins": n_bins}
        tag = lambda entropies: [[{**r, **extra} for r in rows] for rows in _curve(entropies)]  # noqa: E731
        return {"single": tag(single), "looped": tag(looped)}

    default = inspect.signature(CurvatureProbe).parameters["n_bins"].default
    v = observation2(curves(None), total_steps=6000)
    assert v["verdict"] == "reproduced" and v["n_bins"] == default and v["c"] == pytest.approx(0.1 * math.log(default))
    assert observation2(curves(default), total_steps=6000) == v
    v = observation2(curves(10), total_steps=6000)
    assert v["verdict"] == "partly reproduced" and not v["single_static"] and v["n_bins"] == 10
    assert v["c"] == pytest.approx(0.1 * math.log(10))
    mixed = {"single": curves(10)["single"], "looped": curves(default)["looped"]}
    v = observation2(mixed, total_steps=6000)
    assert v["verdict"] == "not tested" and v["reason"] == (
        f"the measurements were binned differently (n_bins [10, {default}]), so no one threshold c fits them all"
    )


def test_tracking_cost_is_the_probes_time_over_the_training_steps_time(tmp_path):
    """Summed over the seeds from each run's last metrics row; a paradigm not tracked on every seed is left out."""
    from loopscape.reporting.curvature import tracking_cost

    def write(seed, paradigm, rows):
        folder = tmp_path / f"seed-{seed}" / paradigm
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    write(0, "single", [{"time_s": 1.0, "curvature_time_s": 0.0}, {"time_s": 30.0, "curvature_time_s": 2.0}])
    write(1, "single", [{"time_s": 10.0, "curvature_time_s": 1.0}])
    write(0, "looped", [{"time_s": 10.0, "curvature_time_s": 1.0}])
    write(1, "looped", [{"time_s": 10.0}])
    assert tracking_cost(tmp_path, [0, 1], ["single", "looped", "shift"]) == {"single": 3.0 / 40.0}
