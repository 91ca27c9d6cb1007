"""Every verdict rule of the Markov report on hand-made results: each outcome, "not tested" included,
and no empty, None or NaN cell in a verdict row."""

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
        ([12, 12, 12, 12, 12], [0, 0, 0, 0, 0], "reproduced"),
        ([3, 3, 3, 3, 3], [0, 0, 0, 0, 0], "partly reproduced"),  # below the 5-point bar, above its noise
        ([0, 0, 0, 0, 0], [6, 6, 6, 6, 6], "not reproduced"),
    ],
)
def test_observation1_outcomes(looped, single, expected):
    v = summary.observation1_verdict(obs1_metrics(300, looped, single))
    assert v["verdict"] == expected
    assert summary.observation1_row(v)["verdict"] == expected


def test_observation1_not_tested_on_a_run_that_ends_before_the_phase_boundary():
    v = summary.observation1_verdict(obs1_metrics(40, [12, 12], [0, 0]))
    assert v["verdict"] == "not tested" and "40 epochs" in v["reason"]
    row = summary.observation1_row(v)
    assert row["verdict"] == "not tested" and row["ours"] == v["reason"]


def traj(looped_entropy, single_entropy, epochs):
    return {
        "looped_attn": {"epochs": np.asarray(epochs), "entropy": np.asarray(looped_entropy, float)},
        "single_attn": {"epochs": np.asarray(epochs), "entropy": np.asarray(single_entropy, float)},
    }


def test_observation2_outcomes():
    epochs = np.arange(0, 401)
    c = 0.1 * np.log(50)
    flat = np.full(epochs.size, 2.0)
    dip = np.where(epochs <= 100, 2.0 - 3 * c * epochs / 100, 2.0 - 3 * c + 3 * c * np.clip((epochs - 100) / 100, 0, 1))
    assert hessian.observation2_verdict(traj(dip, flat, epochs), 50)["verdict"] == "reproduced"
    assert hessian.observation2_verdict(traj(flat, flat, epochs), 50)["verdict"] == "partly reproduced"  # static only
    noisy = 2.0 + 5 * c * (epochs % 2)
    assert hessian.observation2_verdict(traj(flat, noisy, epochs), 50)["verdict"] == "not reproduced"
    short = np.arange(0, 41)
    v = hessian.observation2_verdict(traj(np.full(41, 2.0), np.full(41, 2.0), short), 50)
    assert v["verdict"] == "not tested" and "epoch 40" in v["reason"]
    rows = hessian.verdict_rows(v, {"assumption1": {40: {"m_single": 3, "m_looped": 5, "holds": True}}})
    assert [r["verdict"] for r in rows] == ["not tested", "not tested"]  # Assumption 1 is judged at epoch 150


def test_observation2_can_pass_and_fail_at_the_scale_of_one_binning_per_run():
    """Entropies on one binning stay far below log(n_bins) = 3.9: Figure 3c's collapse (0.26 -> 0.09 by epoch 4)
    must count, and a curve without it must not (the old c = 0.1 log(n_bins) = 0.39 made collapse impossible)."""
    epochs = np.arange(0, 601)
    looped = np.interp(epochs, [0, 1, 4, 150, 300, 600], [0.26, 0.26, 0.09, 0.30, 0.47, 0.47])
    single = np.full(epochs.size, 0.20)
    v = hessian.observation2_verdict(traj(looped, single, epochs), 50)
    assert v["verdict"] == "reproduced" and v["looped_collapse"] and v["c"] == pytest.approx(0.047)
    no_dip = np.interp(epochs, [0, 150, 300, 600], [0.26, 0.30, 0.47, 0.47])
    v = hessian.observation2_verdict(traj(no_dip, single, epochs), 50)
    assert not v["looped_collapse"] and v["verdict"] == "partly reproduced"  # static Single-Attn alone
    zero = np.zeros(epochs.size)
    assert hessian.observation2_verdict(traj(zero, zero, epochs), 50)["verdict"] == "not tested"


def test_assumption1_outcomes():
    o2 = {"verdict": "not tested", "reason": "short"}
    holds = {150: {"m_single": 3, "m_looped": 5, "holds": True}, 600: {"m_single": 3, "m_looped": 6, "holds": True}}
    assert hessian.verdict_rows(o2, {"assumption1": holds})[1]["verdict"] == "holds"
    fails = {**holds, 600: {"m_single": 6, "m_looped": 3, "holds": False}}
    assert hessian.verdict_rows(o2, {"assumption1": fails})[1]["verdict"] == "fails"


@pytest.mark.parametrize(
    "epochs, run_epochs, expected",
    [
        ([120, 130, 140], 600, "reproduced"),
        ([60, 70, 80], 600, "partly reproduced"),
        ([300, 320, 310], 600, "not reproduced"),
        ([None, None, None], 600, "not reproduced"),  # SCP never fired in a full-length run: evidence against
        ([None, None], 40, "not tested"),  # the run ends before the paper's range
    ],
)
def test_scp_shift_point_outcomes(epochs, run_epochs, expected):
    v = shift.scp_point_verdict(epochs, run_epochs)
    assert v["verdict"] == expected
    speed = {"verdict": "not tested", "reason": "r", "looped_epochs_speedup": None, "acc_all_minus_looped_pts": None}
    assert shift.verdict_rows({"scp_shift_point": v, "shift_speedup": speed})[0]["verdict"] == expected


def policy(speed, loss, shift_epochs=(120, 130), wall=None):
    def stat(m):
        return {"mean": m, "std": 0.0, "n": 2}

    return {
        "looped_epochs_speedup": stat(speed),
        "flops_speedup_total": stat(speed),
        "wall_s_speedup_total": stat(speed if wall is None else wall),
        "wall_s_speedup_to_target": stat(speed),
        "acc_all_minus_looped": stat(loss),
        "shift_epochs": list(shift_epochs),
    }


@pytest.mark.parametrize(
    "entry, expected",
    [
        (policy(1.3, 0.0), "reproduced"),
        (policy(1.3, -2.0), "partly reproduced"),  # fast, but a loss beyond the tolerance
        (policy(0.9, 0.0), "not reproduced"),
        (policy(1.3, 0.0, (None, 130)), "not tested"),  # one seed never shifted: it is Single-Attn
        (policy(1.3, 0.0, (124,)), "not tested"),  # one seed: a speed-up at no loss needs seeds
        (policy(1.26, 0.0, wall=1.05), "reproduced"),  # the paper's measure decides; a loaded machine does not
        (policy(1.05, 0.0, wall=1.5), "partly reproduced"),  # nor does an idle one
    ],
)
def test_shift_speedup_outcomes(entry, expected):
    v = shift.speedup_verdict(entry, tolerance_pts=0.5)
    assert v["verdict"] == expected
    point = {"verdict": "reproduced", "median": 125.0, "epochs": [120, 130], "reason": None}
    row = shift.verdict_rows({"scp_shift_point": point, "shift_speedup": v})[1]
    assert row["verdict"] == expected
    assert row["ours"] == v["reason"] if v["reason"] else row["ours"].startswith(f"{v['looped_epochs_speedup']:.2f}x")


def length_results(diffs, n_seeds=3, lengths=(8, 11)):
    rows = {"4": {"single_attn": {"all": {"mean": 70.0, "std": 1.0, "n": n_seeds}}}}
    for L, d in zip(lengths, diffs):
        rows[str(L)] = {
            "single_attn": {"all": {"mean": 50.0, "std": 2.0, "n": n_seeds}},
            "looped_attn": {"all": {"mean": 50.0 + d, "std": 2.0, "n": n_seeds}},
        }
    return rows


@pytest.mark.parametrize(
    "res, expected",
    [
        (length_results([10, 10]), "reproduced"),
        (length_results([10, 0]), "partly reproduced"),
        (length_results([-5, 0]), "not reproduced"),
        (length_results([], lengths=()), "not tested"),  # test_lengths = []: nothing past the training length
        (length_results([10, 10], n_seeds=1), "not tested"),  # one seed: no standard error
    ],
)
def test_length_generalisation_outcomes(res, expected):
    v = length.length_verdict(res, train_length=4)
    assert v["verdict"] == expected
    assert length.verdict_row(v)["verdict"] == expected


def bound(meeting, held):
    return {"instances": 10, "meeting_assumptions": meeting, "held": held}


def theory_results(meeting=5, held=5, checks=True, a4=1.0, along=0.95):
    c = {"C_ratio_to_U": 3.0, "final_loss_below_U": True, "river_progress_beyond_U": True}
    summary3 = {}
    if a4 is not None:
        summary3["assumption-4 initialisation/W_K"] = {"fraction_nonnegative": a4, "n": 5}
        summary3["trajectory/W_K"] = {"fraction_nonnegative": along, "n": 20}
    return {
        "Theorem 1": bound(meeting, held),
        "Theorem 2": bound(meeting, held),
        "Corollaries 1-2": {"checks": {"V": c} if checks else {}},
        "Theorem 3": {"summary": summary3},
    }


def test_theory_outcomes():
    assert [r["verdict"] for r in theory.verdict_rows(theory_results())] == ["reproduced"] * 4
    assert [r["verdict"] for r in theory.verdict_rows(theory_results(held=4, a4=0.9))] == [
        "not reproduced",
        "not reproduced",
        "reproduced",
        "not reproduced",
    ]
    # holds where its assumption is met, not along training (where SHIFT uses it): partly, and the row says both
    row = theory.verdict_rows(theory_results(along=0.41))[3]
    assert row["verdict"] == "partly reproduced" and "100% of 5" in row["ours"] and "along training 41%" in row["ours"]
    rows = theory.verdict_rows(theory_results(meeting=0, held=0, checks=False, a4=None))
    assert [r["verdict"] for r in rows] == ["not tested"] * 4
    assert all(r["ours"] for r in rows)


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
