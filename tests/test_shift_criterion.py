import math

import numpy as np
import pytest

from loopscape.shift.criterion import ShiftCriterion


def feed(scp, losses, grads):
    for e, (loss, g) in enumerate(zip(losses, grads), start=1):
        if scp.update(loss, g):
            return e
    return None


def test_noisy_plateau_then_settled_gradient():
    rng = np.random.default_rng(0)
    # decreasing until evaluation 40, then flat with noise below delta_1
    losses = [1.0 / (1 + 0.1 * e) if e <= 40 else 1 / 5 + 1e-4 * rng.standard_normal() for e in range(1, 200)]
    grads = [1.0 + 1e-3 * rng.standard_normal() for _ in losses]
    scp = ShiftCriterion(patience=10, min_delta=1e-3, wait=10, grad_tol=0.1)
    e = feed(scp, losses, grads)
    # the decrease per evaluation falls below 1e-3 before 40;
    # the plateau comes 10 evaluations after the last improvement
    assert scp.plateau_at is not None and 20 < scp.plateau_at <= 51
    assert e == scp.plateau_at + 10 and not scp.forced  # settled gradient: E_shift = E_plateau + W exactly


def test_no_plateau_ever():
    scp = ShiftCriterion(patience=5, min_delta=1e-3)
    assert feed(scp, [1.0 - 0.01 * e for e in range(90)], [1.0] * 90) is None
    assert scp.plateau_at is None and not scp.shifted


def test_plateau_at_once():
    scp = ShiftCriterion(patience=3, wait=2, grad_tol=0.1)
    assert (
        feed(scp, [0.5] * 10, [1.0] * 10) == 6
    )  # best set at 1; 2, 3, 4 do not improve -> plateau at 4; shift at 4 + 2
    assert scp.plateau_at == 4


def test_unsettled_gradient_waits_and_max_wait_forces():
    grads = [1.0, 3.0] * 50  # oscillating: coefficient of variation 0.5, never <= 0.1
    scp = ShiftCriterion(patience=3, wait=4, grad_tol=0.1, max_wait=None)
    assert feed(scp, [0.5] * 100, grads) is None and scp.plateau_at == 4
    forced = ShiftCriterion(patience=3, wait=4, grad_tol=0.1, max_wait=10)
    assert feed(forced, [0.5] * 100, grads) == 14 and forced.forced


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_an_error_not_a_switch(bad):
    scp = ShiftCriterion()
    with pytest.raises(ValueError, match="non-finite"):
        scp.update(bad, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        scp.update(1.0, bad)
    assert not scp.shifted


def test_state_round_trip_resumes_identically():
    rng = np.random.default_rng(1)
    losses = list(np.maximum(1 - 0.02 * np.arange(100), 0.3) + 1e-4 * rng.standard_normal(100))
    grads = list(1 + 0.01 * rng.standard_normal(100))
    full = ShiftCriterion(patience=5, wait=5)
    e_full = feed(full, losses, grads)
    part = ShiftCriterion(patience=5, wait=5)
    feed(part, losses[:30], grads[:30])
    resumed = ShiftCriterion(patience=5, wait=5)
    resumed.load_state_dict(part.state_dict())
    e_rest = feed(resumed, losses[30:], grads[30:])
    assert e_full is not None and e_rest is not None and 30 + e_rest == e_full


def test_invalid_settings():
    with pytest.raises(ValueError, match="patience"):
        ShiftCriterion(patience=0)
    with pytest.raises(ValueError, match="max_wait"):
        ShiftCriterion(wait=10, max_wait=5)


def test_spread_is_the_coefficient_of_variation():
    assert ShiftCriterion.spread([1.0, 3.0]) == pytest.approx(0.5)  # std 1 / mean 2, worked by hand
    assert ShiftCriterion.spread([2.0] * 5) == 0.0 and ShiftCriterion.spread([0.0, 0.0]) == 0.0


def test_the_logs_and_the_end_say_who_decided_the_switch():
    """SCP's own decision, forced by max_wait, forced by shift_by: each is named in the status line, in the log
    rows (scp_decided_by 0 / 1 / 2) and in the controller's decision line."""
    from loopscape.shift.controller import ShiftController
    from loopscape.shift.criterion import DECISIONS, ShiftCriterion
    from loopscape.shift.schedule import ShiftSchedule

    cases = [
        ({"patience": 1, "wait": 2}, [1.0, 1.0, 1.0, 1.0], [1.0] * 4, "settled"),
        ({"patience": 1, "wait": 2, "max_wait": 3, "grad_tol": 1e-9}, [1.0] * 5, [1.0, 2.0, 1.0, 2.0, 1.0], "max_wait"),
        ({"shift_by": 3}, [3.0, 2.0, 1.0], [1.0] * 3, "shift_by"),  # still improving: the bound forces it
    ]
    for settings, losses, norms, expected in cases:
        shift = ShiftController(ShiftSchedule.scp(3, ShiftCriterion(**settings)))
        for step, (loss, norm) in enumerate(zip(losses, norms), 1):
            shift.after_evaluation(step * 10, loss, norm)
        c = shift.schedule.criterion
        assert c.decided_by == expected, (settings, c)
        assert shift.scp_progress() == {"scp_fired_at": len(losses), "scp_decided_by": list(DECISIONS).index(expected)}
        assert DECISIONS[expected] in shift.decision() and f"from step {10 * len(losses) + 1}" in shift.decision()
