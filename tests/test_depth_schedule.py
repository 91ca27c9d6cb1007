"""Stage II's depth: distributions (fixed, uniform, Huginn's Poisson-log-normal) and curricula (linear,
1-sqrt), all forms of the one ShiftSchedule: drawn from the seed and the step alone."""

import math

import numpy as np
import pytest

from loopscape.config import ConfigError, from_dict
from loopscape.shift.criterion import ShiftCriterion
from loopscape.shift.schedule import ShiftConfig, ShiftSchedule


def test_poisson_lognormal_has_the_asked_mean_and_huginns_law():
    s = ShiftSchedule(64, at=0, depth="poisson-lognormal", mean_depth=8.0, seed=1)
    draws = np.array([s.n_loops_at(k) for k in range(1, 20001)])
    assert draws.min() >= 1 and draws.max() <= 64
    se = draws.std() / math.sqrt(len(draws))
    assert abs(draws.mean() - 8.0) < 4 * se  # E[1 + Poisson(e^tau)] = 1 + E[e^tau] = mean_depth
    # the law by hand: P(depth = 1) = E[exp(-e^tau)], tau ~ N(log 7 - 1/8, 1/2), by quadrature
    z = np.linspace(-8, 8, 4001)
    tau = math.log(7) - 0.125 + 0.5 * z
    p1 = np.trapezoid(np.exp(-np.exp(tau)) * np.exp(-(z**2) / 2) / math.sqrt(2 * math.pi), z)
    share = (draws == 1).mean()
    assert abs(share - p1) < 4 * math.sqrt(p1 * (1 - p1) / len(draws))
    assert draws.var() > draws.mean()  # over-dispersed against a plain Poisson of the same mean


def test_draws_come_from_the_seed_and_the_step_alone():
    make = lambda seed: ShiftSchedule(16, at=5, depth="poisson-lognormal", mean_depth=4, seed=seed)  # noqa: E731
    a, b = make(3), make(3)
    forward = [a.n_loops_at(k) for k in range(1, 300)]
    assert forward[:5] == [1] * 5
    assert [b.n_loops_at(k) for k in reversed(range(1, 300))][::-1] == forward  # order does not matter (resume)
    assert forward != [make(4).n_loops_at(k) for k in range(1, 300)]


@pytest.mark.parametrize("ramp", ["linear", "1-sqrt"])
def test_a_curriculum_ramps_the_depth_from_the_switch(ramp):
    fixed = ShiftSchedule(9, at=10, ramp=ramp, ramp_steps=100)
    f = (lambda p: p) if ramp == "linear" else (lambda p: 1 - math.sqrt(1 - p))
    for step in (11, 35, 60, 85, 110, 500):
        p = min(1.0, (step - 10) / 100)
        assert fixed.mean_depth_at(step) == pytest.approx(1 + 8 * f(p))
        assert fixed.n_loops_at(step) == round(1 + 8 * f(p))
    assert [fixed.n_loops_at(k) for k in range(1, 11)] == [1] * 10
    linear = ShiftSchedule(9, at=10, ramp="linear", ramp_steps=100)
    for step in (35, 60, 85):  # the shape: 1-sqrt stays below the linear ramp, and its rise speeds up
        assert (fixed.mean_depth_at(step) < linear.mean_depth_at(step)) == (ramp == "1-sqrt")
    if ramp == "1-sqrt":
        assert fixed.mean_depth_at(35) - fixed.mean_depth_at(10) < fixed.mean_depth_at(110) - fixed.mean_depth_at(85)
    counts = [fixed.n_loops_at(k) for k in range(11, 200)]
    assert counts == sorted(counts) and counts[-1] == 9  # non-decreasing, up to n_loops
    plnorm = ShiftSchedule(16, at=0, depth="poisson-lognormal", mean_depth=6, ramp=ramp, ramp_steps=50, ramp_start=100)
    assert plnorm.mean_depth_at(100) == 1 and plnorm.n_loops_at(100) == 1  # a given start, before the switch's
    assert plnorm.mean_depth_at(150) == 6 and plnorm.mean_depth_at(125) == pytest.approx(1 + 5 * f(0.5))


def test_an_scp_switch_starts_the_ramp_when_it_fires():
    s = ShiftSchedule(5, criterion=ShiftCriterion(), ramp="linear", ramp_steps=40)
    assert s.mean_depth_at(100) == 1.0  # no switch yet: nothing to ramp from
    s.shift_step = 60  # as if SCP fired at step 60
    assert s.n_loops_at(60) == 1 and s.mean_depth_at(80) == pytest.approx(3.0) and s.n_loops_at(100) == 5
    assert s.starts_stage(61) and not s.starts_stage(90)  # one stage change, not one per ramp step


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"depth": "gamma"}, "depth must be one of ('fixed', 'uniform', 'poisson-lognormal') (got 'gamma')"),
        (
            {"depth": "poisson-lognormal", "mean_depth": 9},
            "mean_depth must be a number above 1 and at most n_loops (4) for depth='poisson-lognormal' (got 9)",
        ),
        ({"depth": "poisson-lognormal"}, "mean_depth must be a number above 1 and at most n_loops (4)"),
        ({"mean_depth": 2}, "mean_depth goes with depth='poisson-lognormal' (got depth='fixed')"),
        ({"ramp": "cosine", "ramp_steps": 5}, "ramp must be one of (None, 'linear', '1-sqrt') (got 'cosine')"),
        ({"ramp": "linear"}, "ramp_steps must be an integer >= 1 with a ramp (got 0)"),
    ],
)
def test_bad_depth_settings_are_one_line(settings, message):
    with pytest.raises(ConfigError) as error:
        ShiftConfig(n_loops=4, at=3, **settings).validate("train.shift.")
    assert str(error.value).startswith(f"train.shift: {message}")


def test_old_sampled_depth_settings_read_as_uniform():
    config = from_dict(ShiftConfig, {"n_loops": 4, "at": 2, "sampled_depth": True})
    draws = [config.build().n_loops_at(k) for k in range(3, 200)]  # past the switch: every depth, not only 4
    assert config.depth == "uniform" and set(draws) == {1, 2, 3, 4}
    assert from_dict(ShiftConfig, {"n_loops": 4, "at": 2, "sampled_depth": False}).depth == "fixed"


def test_the_callbacks_take_the_depth_settings_and_old_saved_args():
    pytest.importorskip("transformers")
    from loopscape.integrations.hf import ShiftCallback

    cb = ShiftCallback(n_loops=6, at=2, depth="poisson-lognormal", mean_depth=3.0, ramp="1-sqrt", ramp_steps=20)
    again = ShiftCallback(**cb.state()["args"])  # how HF restores a callback from a checkpoint
    assert [again.controller.schedule.n_loops_at(k) for k in range(1, 80)] == [
        cb.controller.schedule.n_loops_at(k) for k in range(1, 80)
    ]
    old = {
        "n_loops": 4,
        "at": 2,
        "scp": None,
        "milestones": None,
        "optimizer": "keep",
        "sampled_depth": True,
        "seed": 0,
    }
    assert ShiftCallback(**old).controller.schedule.depth == "uniform"
